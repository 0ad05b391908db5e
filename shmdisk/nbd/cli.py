"""The ``shmdisk serve`` subcommand: export disks over NBD.

The top-level CLI calls :func:`register` with its subparsers; everything about serving lives here
so ``shmdisk.cli`` needs no knowledge of the protocol.
"""

from __future__ import annotations

import argparse
import sys

from ._proto import DEFAULT_HOST, DEFAULT_PORT

DESCRIPTION = """\
Serve one or more disks to NBD clients (nbdinfo, nbdcopy, qemu-img, nbdfuse, nbd-client).
Clients pick a disk by export name; the first NAME is also the default export. Local
processes keep using the disks through shared memory at the same time."""

EXAMPLES = f"""\
Where: --socket PATH, --bind HOST:PORT, or else a listening socket passed by socket
activation (LISTEN_PID/LISTEN_FDS: systemd .socket units, and the "[ CMD ]" of nbdinfo,
nbdcopy and nbdfuse), or else TCP {DEFAULT_HOST}:{DEFAULT_PORT}.

examples:
  shmdisk serve vm0 --socket /tmp/nbd.sock      nbd+unix:///vm0?socket=/tmp/nbd.sock
  shmdisk serve vm0 data --bind 0.0.0.0:10809   two exports over TCP, on every interface
  shmdisk serve --read-only --create scratch    clients may only read
  nbdinfo [ shmdisk serve vm0 ]                 captive: the client starts the server
  nbdcopy -- [ shmdisk serve vm0 ] out.img      copy the disk out through a captive server
"""


def parse_bind(text: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT``, ``HOST`` or ``:PORT`` also accepted)."""
    host, port = DEFAULT_HOST, DEFAULT_PORT
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise argparse.ArgumentTypeError(f"bad address {text!r}")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"bad address {text!r}")
            port_text = rest[1:]
        else:
            port_text = ""
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        host = host or DEFAULT_HOST
    else:
        host, port_text = text, ""
    if port_text:
        try:
            port = int(port_text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad port in {text!r}") from None
        if not 0 <= port <= 65535:
            raise argparse.ArgumentTypeError(f"port out of range in {text!r}")
    return host, port


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` subcommand to the top-level parser's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="export disks over the NBD protocol",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("names", nargs="+", metavar="NAME", help="disk to export (export name = NAME)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", metavar="PATH", help="listen on a Unix socket at PATH")
    where.add_argument(
        "--bind",
        metavar="HOST:PORT",
        type=parse_bind,
        help=f"listen on TCP (default {DEFAULT_HOST}:{DEFAULT_PORT}, loopback only)",
    )
    p.add_argument("--read-only", action="store_true", help="refuse writes from clients")
    p.add_argument(
        "--create",
        action="store_true",
        help="create missing disks with the default geometry instead of failing",
    )
    talk = p.add_mutually_exclusive_group()
    talk.add_argument("--quiet", "-q", action="store_true", help="no per-connection log lines")
    talk.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="per-connection log lines even on an activated socket (where they are off)",
    )
    p.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM; 0 on a clean stop, 1 on an error."""
    # Imported here so `shmdisk --help` and the other subcommands never load the server.
    from shmdisk.nbd.server import run_cli

    try:
        return run_cli(
            names=list(args.names),
            socket_path=args.socket,
            bind=args.bind,
            read_only=bool(args.read_only),
            create=bool(args.create),
            quiet=bool(args.quiet),
            verbose=bool(args.verbose),
        )
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # any setup failure is one clear line, not a traceback
        print(f"shmdisk serve: error: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m shmdisk.nbd NAME ...``."""
    parser = argparse.ArgumentParser(prog="shmdisk")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    func = args.func
    rc: int = func(args)
    return rc
