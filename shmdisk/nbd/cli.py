"""The ``shmdisk serve`` subcommand: export disks over NBD.

The top-level CLI calls :func:`register` with its subparsers; everything about serving lives here
so ``shmdisk.cli`` needs no knowledge of the protocol.
"""

from __future__ import annotations

import argparse
import sys

from ._listen import DEFAULT_MAX_CONNECTIONS, DEFAULT_SOCKET_MODE
from ._proto import DEFAULT_HOST, DEFAULT_PORT
from ._tls import MODES

DESCRIPTION = """\
Serve one or more disks to NBD clients (nbdinfo, nbdcopy, qemu-img, nbdfuse, nbd-client).
Clients pick a disk by export name; the first NAME is also the default export. Local
processes keep using the disks through shared memory at the same time."""

EXAMPLES = f"""\
Where: --socket PATH, --bind HOST:PORT, or else a listening socket passed by socket
activation (LISTEN_PID/LISTEN_FDS: systemd .socket units, and the "[ CMD ]" of nbdinfo,
nbdcopy and nbdfuse), or else TCP {DEFAULT_HOST}:{DEFAULT_PORT}.

Who gets in: on a Unix socket (mode 0600 unless --socket-mode), each client only as far as
its own uid and groups could open the disk: read-write, read-only, or not at all. Over TCP
clients must use TLS (--tls-certificates DIR) unless --tls off says plain text is wanted.

examples:
  shmdisk serve vm0 --socket /tmp/nbd.sock      nbd+unix:///vm0?socket=/tmp/nbd.sock
  shmdisk serve vm0 --bind 0.0.0.0:10809 --tls-certificates /etc/pki/shmdisk --tls-verify-peer
                                                TLS for clients with a certificate of the CA
  shmdisk serve vm0 --bind 127.0.0.1:0 --tls off   plain TCP on loopback (warns)
  shmdisk serve --read-only --create scratch --socket /tmp/s.sock   clients may only read
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


def parse_mode(text: str) -> int:
    """An octal permission mode such as ``0660`` or ``660``."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad mode {text!r}: use octal, such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode {text!r} is outside 0000..0777")
    return mode


def parse_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


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
        help=f"listen on TCP, with TLS unless --tls off (default {DEFAULT_HOST}:{DEFAULT_PORT})",
    )
    p.add_argument(
        "--socket-mode",
        metavar="MODE",
        type=parse_mode,
        help="permission bits of the --socket file (default 0600: only you and root connect; "
        "each client still gets only what the disk's permissions give its uid)",
    )
    tls = p.add_argument_group("TLS (NBD_OPT_STARTTLS)")
    tls.add_argument(
        "--tls",
        choices=MODES,
        help="off: refuse TLS; on: the client chooses; require: TLS only. Default: require "
        "over TCP; on a Unix socket on with credentials, off without",
    )
    tls.add_argument(
        "--tls-certificates",
        metavar="DIR",
        help="directory with server-cert.pem, server-key.pem and ca-cert.pem (as for nbdkit)",
    )
    tls.add_argument(
        "--tls-verify-peer",
        action="store_true",
        help="refuse clients without a certificate signed by DIR/ca-cert.pem",
    )
    tls.add_argument(
        "--tls-psk",
        metavar="FILE",
        help="pre-shared keys, as psktool writes them (needs Python 3.13 or later)",
    )
    p.add_argument(
        "--max-connections",
        metavar="N",
        type=parse_count,
        default=DEFAULT_MAX_CONNECTIONS,
        help=f"clients served at once; the next ones wait (default {DEFAULT_MAX_CONNECTIONS})",
    )
    p.add_argument(
        "--owner",
        metavar="USER",
        help="serve disks of USER (name or uid) as well as your own and root's",
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

    if args.socket_mode is not None and args.socket is None:
        print(
            "shmdisk serve: error: --socket-mode applies to the file of --socket", file=sys.stderr
        )
        return 1
    socket_mode = DEFAULT_SOCKET_MODE if args.socket_mode is None else int(args.socket_mode)
    try:
        return run_cli(
            names=list(args.names),
            socket_path=args.socket,
            bind=args.bind,
            read_only=bool(args.read_only),
            create=bool(args.create),
            quiet=bool(args.quiet),
            verbose=bool(args.verbose),
            socket_mode=socket_mode,
            tls=args.tls,
            tls_certificates=args.tls_certificates,
            tls_verify_peer=bool(args.tls_verify_peer),
            tls_psk=args.tls_psk,
            max_connections=int(args.max_connections),
            owner=args.owner,
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
