"""``python3 tools/stress ARGS`` from a checkout, or ``python3 -m stress ARGS`` with tools/ on the
path: the stress tool's command line (``--help`` lists the scenarios)."""

import os
import sys

if not __package__:
    # Run as a directory (`python3 tools/stress`): Python put tools/stress itself first on the
    # path. Its parent, tools/, must be there instead, so `stress` and its sibling `stamp`
    # import as they do under pytest; spawned workers inherit this path.
    sys.path[0] = os.path.dirname(os.path.abspath(sys.path[0]))

from stress.cli import main

# The guard matters: spawned workers re-import the main module and must not run the tool again.
if __name__ == "__main__":
    sys.exit(main())
