"""Example suites for the shmdisk pytest plugin, run by tests/test_testing_plugin.py.

The example files are copied into a temporary directory and run by a pytest in a subprocess;
they are never collected by the project's own test run.
"""

collect_ignore_glob = ["*.py"]
