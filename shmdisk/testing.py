"""Test helpers and an opt-in pytest plugin for code that uses shmdisk.

Enable the plugin in a ``conftest.py`` with ``pytest_plugins = ["shmdisk.testing"]`` or on the
command line with ``-p shmdisk.testing``. It provides:

- fixture ``shmdisk``: a fresh disk (default geometry) with a unique name, destroyed after the
  test even when the test fails;
- fixture ``shmdisk_factory``: ``factory(size_sectors, sector_size=512, **kw) -> Disk`` for any
  number of disks (``kw`` goes to ``shmdisk.create``; ``name=`` picks the name), all destroyed
  after the test;
- fixture ``shmdisk_no_leaks``: fails the test (as a teardown error) if it leaves behind a
  shmdisk segment that it or a process it started made (``assert_no_leaks`` says how that is
  told); make it autouse in a ``conftest.py`` to guard a whole suite;
- marker ``@pytest.mark.shmdisk_keep`` and option ``--shmdisk-keep-on-failure``: when the test
  fails, its fixture disks are kept (disconnected, not destroyed) and their names are printed at
  the end of the run, for ``shmdisk-ls`` and a look at the bytes;
- option ``--shmdisk-prefix``: the prefix of fixture disk names (default ``pytest``).

Names are unique across processes and pytest-xdist workers: they carry the prefix, the test's
name, the pid, the xdist worker id and a random token. A disk from a fixture can be handed to
``multiprocessing`` workers as is: a ``Disk`` pickles by name and reconnects in the child.

The helpers ``unique_name`` and ``assert_no_leaks`` do not need pytest, which is only a test
dependency of shmdisk.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from typing import TYPE_CHECKING, Any, Protocol

import shmdisk as _shmdisk

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import pytest
else:
    try:
        import pytest
    except ModuleNotFoundError:  # the helpers below work without pytest
        pytest = None

__all__ = [
    "DiskFactory",
    "LeakedSegmentsError",
    "assert_no_leaks",
    "unique_name",
]

# Leave room under the core's name limit for the pid, worker id and token.
_MAX_PREFIX = 48
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _xdist_worker() -> str:
    # pytest-xdist sets this in each worker process ("gw0", "gw1", ...).
    return os.environ.get("PYTEST_XDIST_WORKER", "")


def unique_name(prefix: str = "test") -> str:
    """Return a disk name no other process or xdist worker will pick.

    ``prefix-<pid>[-<xdist worker>]-<random>``; characters a name may not contain are replaced
    by ``_`` and a long prefix is cut, so any string (a test id, say) can serve as the prefix.
    """
    safe = _UNSAFE.sub("_", prefix)[:_MAX_PREFIX] or "test"
    worker = _xdist_worker()
    middle = f"{os.getpid()}-{worker}" if worker else str(os.getpid())
    # 48 random bits: a pid reused by a later run on the same machine still gets a fresh name.
    name = f"{safe}-{middle}-{secrets.token_hex(6)}"
    _journal(name)
    return name


class LeakedSegmentsError(AssertionError):
    """Raised by ``assert_no_leaks`` when shmdisk segments were left behind."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names

    def __str__(self) -> str:
        return f"{len(self.names)} shmdisk segment(s) leaked: {', '.join(self.names)}"


def _parent_pid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name in parentheses may hold spaces; the parent pid follows the state field.
    return int(stat[stat.rindex(b")") + 2 :].split()[1])


def _descends_from(pid: int, ancestor: int) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        parent = _parent_pid(pid)
        if parent is None or parent <= 1:
            return False
        pid = parent
    return False


# The leak guard's journals: files, named in this variable (several when guards nest), to which
# unique_name appends every name it makes. Children inherit the environment, so the names a
# child makes land in the journal too, and count as the guarded code's even after it exited.
_JOURNALS_ENV = "SHMDISK_TESTING_JOURNALS"


def _journal(name: str) -> None:
    for path in filter(None, os.environ.get(_JOURNALS_ENV, "").split(os.pathsep)):
        try:
            # No O_CREAT: a journal whose guard has ended stays gone.
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.write(fd, f"{name}\n".encode())
        finally:
            os.close(fd)


@contextlib.contextmanager
def _journaling() -> Iterator[Callable[[], set[str]]]:
    """Journal the names unique_name makes in the block, here and in children started in it."""
    fd, path = tempfile.mkstemp(prefix="shmdisk-guard-", suffix=".names")
    os.close(fd)
    outer = os.environ.get(_JOURNALS_ENV)
    os.environ[_JOURNALS_ENV] = path if outer is None else f"{path}{os.pathsep}{outer}"

    def names() -> set[str]:
        with open(path) as f:
            return set(f.read().split())

    try:
        yield names
    finally:
        if outer is None:
            os.environ.pop(_JOURNALS_ENV, None)
        else:
            os.environ[_JOURNALS_ENV] = outer
        os.unlink(path)


def _made_by_guarded_code(name: str, journaled: set[str]) -> bool:
    """True for a segment the guarded code made: named by it, or made by it or a child."""
    if name in journaled:
        return True  # unique_name made this name here or in a child: nobody else can have it
    try:
        creator = _shmdisk.inspect(name).creator_pid
    except _shmdisk.ShmdiskError:
        return False  # vanished or unreadable meanwhile: nothing of ours to clean up
    # A header that names no creator (corrupt or half-made) cannot be attributed. Nor can a
    # creator that has exited: an unrelated `shmdisk create` looks just like a child of ours
    # once it is gone, so only a live creator counts: this process or one it started.
    return creator is not None and _descends_from(creator, os.getpid())


@contextlib.contextmanager
def assert_no_leaks(
    *, ignore: Callable[[str], bool] | None = None, cleanup: bool = True
) -> Iterator[None]:
    """Fail with ``LeakedSegmentsError`` if the block leaves new shmdisk segments behind.

    Compares ``shmdisk.list_disks()`` before and after and counts only what the block made: a
    new segment whose name ``unique_name`` made during the block (in this process or in a
    process it started, even one that has exited since), or whose creator is still running and
    is this process or one it started. Segments made meanwhile by anyone else (another test
    run, another xdist worker, a ``shmdisk create`` in a shell) are left alone; so are those
    ``ignore(name)`` accepts, and those whose header names no creator. A child that exits
    after making a disk under a name it chose itself cannot be told from an unrelated process,
    so its disk is not counted: name such disks with ``unique_name``. With ``cleanup`` (the
    default) leaked segments are destroyed after being reported, so one leak does not spill
    into the next test. Nothing is checked when the block itself raises.
    """
    before = set(_shmdisk.list_disks())
    with _journaling() as journaled:
        yield
        made = journaled()
        leaked = sorted(
            name
            for name in set(_shmdisk.list_disks()) - before
            if not (ignore is not None and ignore(name)) and _made_by_guarded_code(name, made)
        )
    if leaked:
        if cleanup:
            for name in leaked:
                _shmdisk.destroy(name)
        raise LeakedSegmentsError(leaked)


class DiskFactory(Protocol):
    """The type of the ``shmdisk_factory`` fixture."""

    def __call__(
        self,
        size_sectors: int = ...,
        sector_size: int = ...,
        *,
        name: str | None = None,
        **kwargs: Any,
    ) -> _shmdisk.Disk: ...


# -- the pytest plugin: everything below needs pytest ---------------------------------------

_KEEP_OPTION = "--shmdisk-keep-on-failure"
_PREFIX_OPTION = "--shmdisk-prefix"
# A kept disk is recorded as a user property of the test: properties travel with the test
# report from an xdist worker to the controller, which prints the summary.
_KEPT_PROPERTY = "shmdisk_kept"

if pytest is not None:
    _failed_key = pytest.StashKey[dict[str, bool]]()

    def pytest_addoption(parser: pytest.Parser) -> None:
        group = parser.getgroup("shmdisk", "shmdisk disks for tests")
        group.addoption(
            _KEEP_OPTION,
            action="store_true",
            default=False,
            help="keep the fixture disks of failing tests (not destroyed) and print their names",
        )
        group.addoption(
            _PREFIX_OPTION,
            default="pytest",
            metavar="PREFIX",
            help="prefix of the names of fixture disks (default: pytest)",
        )

    def pytest_configure(config: pytest.Config) -> None:
        config.addinivalue_line(
            "markers",
            "shmdisk_keep: keep this test's shmdisk fixture disks when it fails, for inspection",
        )
        config.pluginmanager.register(_KeptDisksReport(), "shmdisk-kept-disks")

    class _KeptDisksReport:
        """Collects the kept disks from test reports and lists them at the end of the run."""

        def __init__(self) -> None:
            self.kept: list[tuple[str, str]] = []

        def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
            self.kept.extend(
                (str(value), report.nodeid)
                for key, value in report.user_properties
                if key == _KEPT_PROPERTY
            )

        def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
            if not self.kept:
                return
            terminalreporter.section("shmdisk: disks kept after failing tests")
            for name, nodeid in self.kept:
                terminalreporter.line(f"{name}  ({nodeid})")
            terminalreporter.line(
                "inspect with `shmdisk-ls NAME...`; remove with `shmdisk destroy NAME...`"
            )

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_makereport(item: pytest.Item) -> Any:
        # Remember whether setup or call failed, for the fixtures' teardown to see.
        outcome = yield
        report: pytest.TestReport = outcome.get_result()
        item.stash.setdefault(_failed_key, {})[report.when] = report.failed

    def _keep_on_failure(request: pytest.FixtureRequest) -> bool:
        node = request.node
        failed = node.stash.get(_failed_key, {})
        if not (failed.get("setup") or failed.get("call")):
            return False
        return bool(request.config.getoption(_KEEP_OPTION)) or (
            node.get_closest_marker("shmdisk_keep") is not None
        )

    def _kept_names(request: pytest.FixtureRequest) -> set[str]:
        return {str(v) for k, v in request.node.user_properties if k == _KEPT_PROPERTY}

    def _release(request: pytest.FixtureRequest, disks: list[_shmdisk.Disk]) -> None:
        keep = _keep_on_failure(request)
        first_error: BaseException | None = None
        for disk in disks:
            # Go on with the other disks when one fails: each must still be destroyed.
            try:
                disk.disconnect()
                if keep:
                    request.node.user_properties.append((_KEPT_PROPERTY, disk.name))
                else:
                    _shmdisk.destroy(disk.name)
            except Exception as exc:
                first_error = first_error or exc
                with contextlib.suppress(Exception):
                    _shmdisk.destroy(disk.name)
        if first_error is not None:
            raise first_error

    @pytest.fixture(name="shmdisk_factory")
    def shmdisk_factory_fixture(request: pytest.FixtureRequest) -> Iterator[DiskFactory]:
        """A callable ``(size_sectors, sector_size=512, **kw) -> Disk``; all destroyed after."""
        disks: list[_shmdisk.Disk] = []
        prefix = f"{request.config.getoption(_PREFIX_OPTION)}-{request.node.name}"

        def factory(
            size_sectors: int = _shmdisk.DEFAULT_SIZE_SECTORS,
            sector_size: int = _shmdisk.DEFAULT_SECTOR_SIZE,
            *,
            name: str | None = None,
            **kwargs: Any,
        ) -> _shmdisk.Disk:
            disk = _shmdisk.create(
                unique_name(prefix) if name is None else name, size_sectors, sector_size, **kwargs
            )
            disks.append(disk)
            return disk

        try:
            yield factory
        finally:
            _release(request, disks)

    @pytest.fixture(name="shmdisk")
    def shmdisk_fixture(shmdisk_factory: DiskFactory) -> _shmdisk.Disk:
        """A fresh disk of the default geometry with a unique name, destroyed after the test."""
        return shmdisk_factory()

    @pytest.fixture(name="shmdisk_no_leaks")
    def shmdisk_no_leaks_fixture(request: pytest.FixtureRequest) -> Iterator[None]:
        """Fail the test (in teardown) if it leaves a shmdisk segment behind."""
        # Disks kept for inspection after a failure are left behind on purpose.
        with assert_no_leaks(ignore=lambda name: name in _kept_names(request)):
            yield
