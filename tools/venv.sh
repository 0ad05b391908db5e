# Sourced by tools/run-tests and tools/lint: the checkout's virtualenv, with the project and the
# extras asked for installed in it.
#   . tools/venv.sh; use_venv test       # sets PY to the venv's python, puts it first on PATH
#
# Why a virtualenv, always: Debian 12 and Ubuntu 23.04+ refuse `pip install` into the system
# Python (PEP 668, "externally-managed-environment"), and only `python3` may exist there. One
# path for every machine (a fresh Debian, a developer's pyenv, CI) is one path that is tested.
# Why --system-site-packages: what the machine's Python already has (numpy, pytest, mypy ...)
# is used as it is and only what is missing or too old is downloaded, so a machine that has the
# packages sets up in seconds. The venv's own site-packages come first, so the project installed
# here (editable, from this checkout) wins over any copy installed elsewhere.
# The venv is .venv in the checkout (ignored by git), the one the README's quickstart makes.

VENV_DIR=".venv"

use_venv() {
    local extras="$1"
    if [ ! -x "$VENV_DIR/bin/python" ]; then
        if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
            echo "venv: python3 cannot make virtualenvs here; install python3-venv" \
                "(apt-get install python3-venv) and run this again" >&2
            return 1
        fi
        echo "venv: creating $VENV_DIR ($(python3 --version 2>&1))"
        python3 -m venv --system-site-packages "$VENV_DIR"
    fi
    PY="$PWD/$VENV_DIR/bin/python"
    # As `activate` does: `python3` in child processes, such as the `#!/usr/bin/env python3`
    # of tools/shmdisk-ls run by the tests, is the venv's too.
    export VIRTUAL_ENV="$PWD/$VENV_DIR"
    export PATH="$VIRTUAL_ENV/bin:$PATH"
    "$PY" -m pip install -q --disable-pip-version-check -e ".[$extras]"
}
