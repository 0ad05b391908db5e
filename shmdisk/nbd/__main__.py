"""``python -m shmdisk.nbd NAME ...``: the same as ``shmdisk serve NAME ...``."""

import sys

from shmdisk.nbd.cli import main

sys.exit(main())
