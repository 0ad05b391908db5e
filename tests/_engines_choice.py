"""Which engines the reliability tests give their child processes."""

from __future__ import annotations

import shmdisk

# Under the native engine the scenarios mix native and python children on one disk; under the
# python engine (CI's SHMDISK_NO_EXTENSIONS=1 run) every child runs python, as this process does.
ENGINES = "mixed" if shmdisk.ENGINE == "native" else "inherit"
