"""``python -m shmdisk``: the ``shmdisk`` command."""

import sys

from shmdisk.cli import main

# The guard matters: the demo's workers use the spawn start method, which re-imports this module
# in every child, and a child must not run the command line again.
if __name__ == "__main__":
    sys.exit(main())
