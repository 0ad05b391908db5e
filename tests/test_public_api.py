"""The public surface is pinned, so it never changes by accident.

What is public is written in ``shmdisk/__init__.py``'s docstring; these tests hold the package to
it: the top-level names, the public modules, and that every other module is marked internal.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import tomllib
from pathlib import Path

import pytest

import shmdisk
import shmdisk.errors

ROOT = Path(__file__).resolve().parents[1]

#: The public modules, as the package docstring lists them.
PUBLIC_MODULES = ["shmdisk", "shmdisk.errors", "shmdisk.aio", "shmdisk.testing", "shmdisk.nbd"]
#: Top-level modules without a leading underscore that are internal all the same.
INTERNAL_MODULES = {"disk", "cli"}


def test_all_is_pinned() -> None:
    """__all__ lists exactly these names, sorted as written."""
    assert shmdisk.__all__ == [
        "DEFAULT_SECTOR_SIZE",
        "DEFAULT_SIZE_SECTORS",
        "ENGINE",
        "SEGMENT_PREFIX",
        "BackingLostError",
        "BadBufferError",
        "CorruptSegmentError",
        "DisconnectedError",
        "Disk",
        "DiskBusyError",
        "DiskExistsError",
        "DiskFullError",
        "DiskInfo",
        "DiskNotFoundError",
        "Extent",
        "InvalidArgumentError",
        "InvalidGeometryError",
        "InvalidModeError",
        "InvalidNameError",
        "IsReadOnlyError",
        "LayerExtent",
        "LockTimeoutError",
        "NotFrozenError",
        "OutOfRangeError",
        "PermissionDeniedError",
        "ReentrantCallError",
        "SegmentInfo",
        "ShmdiskError",
        "UnimplementedError",
        "UnknownError",
        "UntrustedOwnerError",
        "WouldBlockError",
        "__version__",
        "connect",
        "copy",
        "create",
        "destroy",
        "freeze",
        "inspect",
        "list_disks",
        "segment_path",
    ]
    for n in shmdisk.__all__:
        assert hasattr(shmdisk, n)


def test_defaults_match_mirage() -> None:
    """The default geometry is mirage-block-ramdisk's: 32768 sectors of 512 bytes."""
    assert (shmdisk.DEFAULT_SIZE_SECTORS, shmdisk.DEFAULT_SECTOR_SIZE) == (32768, 512)


def test_docstring_lists_the_public_modules() -> None:
    """The package docstring names exactly the public modules, in this order."""
    doc = shmdisk.__doc__ or ""
    section = doc.split("Public surface", 1)[1].split("Everything else", 1)[0]
    assert re.findall(r"^- ``([\w.]+)``", section, re.M) == PUBLIC_MODULES


def test_every_top_level_module_is_public_or_marked_internal() -> None:
    """A new module must be listed as public or internal, or start with an underscore."""
    for mod in pkgutil.iter_modules(shmdisk.__path__):
        if mod.name.startswith("_"):
            continue
        full = f"shmdisk.{mod.name}"
        assert full in PUBLIC_MODULES or mod.name in INTERNAL_MODULES, (
            f"{full} is neither listed as public nor marked internal in shmdisk/__init__.py"
        )


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_public_modules_declare_what_they_export(name: str) -> None:
    """Each public module has an __all__ whose every name exists and none is private."""
    module = importlib.import_module(name)
    exported = module.__all__
    assert exported, name
    for attr in exported:
        assert hasattr(module, attr), f"{name}.{attr}"
        assert not attr.startswith("_") or attr == "__version__", f"{name}.{attr}"


def test_errors_module_holds_exactly_the_top_level_errors() -> None:
    """shmdisk.errors and shmdisk export the same error classes, the very same objects."""
    top = {n for n in shmdisk.__all__ if n.endswith("Error")}
    assert set(shmdisk.errors.__all__) == top
    for n in top:
        assert getattr(shmdisk.errors, n) is getattr(shmdisk, n)
        assert issubclass(getattr(shmdisk, n), shmdisk.ShmdiskError)


def test_aio_surface_is_pinned() -> None:
    """shmdisk.aio mirrors the top-level functions, and Disk as AsyncDisk."""
    import shmdisk.aio

    assert shmdisk.aio.__all__ == [
        "AsyncDisk",
        "connect",
        "copy",
        "create",
        "destroy",
        "freeze",
        "inspect",
        "list_disks",
        "set_max_workers",
    ]


def test_nbd_is_imported_by_name_only() -> None:
    """`import shmdisk` does not load the NBD server; `import shmdisk.nbd` does."""
    import os
    import subprocess
    import sys

    code = "import sys, shmdisk; print('shmdisk.nbd' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, installed or not
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    ).stdout
    assert out.strip() == "False"


def test_version_has_one_source() -> None:
    """pyproject.toml reads the version from shmdisk/_version.py; CHANGELOG.md has its entry."""
    from shmdisk import _version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "shmdisk._version.__version__"
    assert shmdisk.__version__ == _version.__version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", shmdisk.__version__)
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{shmdisk.__version__}] - " in changelog and "## [Unreleased]" in changelog
