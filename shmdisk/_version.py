"""The package's version: the one place it is written.

``pyproject.toml`` reads it for the distribution's metadata (``[tool.setuptools.dynamic]``), and
``shmdisk.__version__`` re-exports it, so a checkout run in place reports the same version as an
installed copy. Record each change in CHANGELOG.md under the version it ships in.
"""

__version__ = "0.1.0"
