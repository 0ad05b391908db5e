"""The C accelerator of shmdisk (everything else is in pyproject.toml).

``shmdisk._native`` is optional: where it cannot be built (no compiler, another platform) the
install still succeeds and shmdisk runs its pure-Python engine (see shmdisk/_stripes.py).
"""

import os
import platform

from setuptools import Extension, setup


def _native_extension() -> list[Extension]:
    if os.environ.get("SHMDISK_NO_EXTENSIONS", "") not in ("", "0"):
        return []
    # The lock table's mutexes are glibc's x86-64 ABI; nowhere else is there anything to build.
    if platform.system() != "Linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    if platform.libc_ver()[0] != "glibc":
        return []
    return [
        Extension(
            "shmdisk._native",
            ["shmdisk/_native.c"],
            extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,  # a failed build is a warning: the python engine takes over
        )
    ]


setup(ext_modules=_native_extension())
