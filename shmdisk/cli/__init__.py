"""The ``shmdisk`` and ``shmdisk-ls`` commands.

``main(argv) -> int`` and ``ls_main(argv) -> int`` never call ``sys.exit`` themselves, so tests and
other programs can call them. Exit codes: 0 ok, 1 failed, 2 usage error, 130 interrupted (Ctrl-C),
141 the reader of stdout went away (``shmdisk export NAME - | head``, as SIGPIPE ends other
filters), 143 stopped by SIGTERM (``import`` and ``demo`` clean up first, as on Ctrl-C).
Every failure is one line ``shmdisk: error: ...`` on stderr; everything a script may want to read
has ``--json``, an object whose ``"version"`` key is bumped when a field changes meaning.

This module assembles the parser and runs a command; each subcommand lives in its own module
(``_ls``, ``_manage``, ``_map``, ``_image``, ``_copy``, ``_demo``; ``serve`` in
``shmdisk.nbd.cli``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

import shmdisk

from . import _copy, _demo, _image, _ls, _manage, _map
from ._common import JSON_VERSION, CliError, Terminated, UsageError, describe, error

__all__ = ["JSON_VERSION", "ls_main", "main"]


def build_parser() -> tuple[argparse.ArgumentParser, Any]:
    """The ``shmdisk`` parser and its subparsers action (``serve`` is added by ``main``)."""
    parser = argparse.ArgumentParser(
        prog="shmdisk",
        description="Named block devices in POSIX shared memory.",
        epilog="Run `shmdisk COMMAND --help` for each command's options and an example.\n"
        "First time? Try: shmdisk demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # The order here is the order of `shmdisk --help`.
    for module in (_ls, _manage, _map, _image, _copy, _demo):
        module.register(sub)
    return parser, sub


def _load_nbd_cli() -> Any:
    return importlib.import_module("shmdisk.nbd.cli")


def _add_serve(sub: Any) -> None:
    """``serve`` comes from the NBD package; if it cannot load, only ``serve`` says so."""
    try:
        _load_nbd_cli().register(sub)
    except Exception as exc:
        reason = describe(exc)
        p = sub.add_parser("serve", help="serve disks over NBD (unavailable)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)

        def unavailable(args: argparse.Namespace) -> int:
            raise CliError(f"the NBD server is unavailable: {reason}")

        p.set_defaults(func=unavailable)


def _version() -> str:
    # The package's own version, so a checkout run in place (tools/shmdisk-ls) reports itself,
    # not whatever shmdisk happens to be installed.
    # The engine too: which one runs decides how fast, and a missing compiler shows here.
    return f"shmdisk {shmdisk.__version__} ({shmdisk.ENGINE or 'no'} engine)"


def _dispatch(args: argparse.Namespace, prog: str) -> int:
    func: Callable[[argparse.Namespace], int] = args.func
    args.prog = prog
    try:
        return func(args)
    except UsageError as exc:
        error(f"{prog} {getattr(args, 'command', '')}".strip(), str(exc))
        return 2
    except CliError as exc:
        error(prog, str(exc))
    except ValueError as exc:  # parse_size and friends: the user's input, not a crash
        error(prog, describe(exc))
    except (shmdisk.ShmdiskError, OSError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        error(prog, describe(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Terminated:
        return 128 + signal.SIGTERM
    return 1


def _broken_pipe() -> int:
    # `shmdisk ls | head -1`: the reader left. Point stdout at /dev/null so the interpreter's
    # final flush does not raise again, and end quietly with the status of a filter that
    # SIGPIPE ended (cat, gzip: 128 + 13), which `set -o pipefail` scripts know to expect.
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return 128 + signal.SIGPIPE


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors: argparse has printed them
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 2)


def main(argv: list[str] | None = None) -> int:
    """Run ``shmdisk`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser, sub = build_parser()
    _add_serve(sub)
    if not (sys.argv[1:] if argv is None else argv):
        # Bare `shmdisk`: a usage error, but one that shows the commands, not just "required".
        parser.print_help(sys.stderr)
        return 2
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    return _dispatch(args, "shmdisk")


def ls_main(argv: list[str] | None = None) -> int:
    """Run ``shmdisk-ls`` (the same as ``shmdisk ls``); returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="shmdisk-ls",
        description=_ls.LS_DESCRIPTION,
        epilog=_ls.LS_EPILOG.replace("%(prog)s", "shmdisk-ls"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    _ls.add_ls_arguments(parser)
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    return _dispatch(args, "shmdisk-ls")
