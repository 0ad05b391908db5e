"""``shmdisk serve`` argument handling (the server itself is tested in test_nbd_clients.py)."""

from __future__ import annotations

import argparse

import pytest

from shmdisk.nbd import cli


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("127.0.0.1:10810", ("127.0.0.1", 10810)),
        ("localhost", ("localhost", 10809)),
        (":0", ("127.0.0.1", 0)),
        ("[::1]:9000", ("::1", 9000)),
        ("[::1]", ("::1", 10809)),
        ("0.0.0.0:10809", ("0.0.0.0", 10809)),
    ],
)
def test_parse_bind(text: str, want: tuple[str, int]) -> None:
    """HOST:PORT, HOST, :PORT and [IPv6]:PORT all parse; the defaults fill the gaps."""
    assert cli.parse_bind(text) == want


@pytest.mark.parametrize("text", ["host:port", "h:70000", "[::1", "[::1]x"])
def test_parse_bind_rejects_nonsense(text: str) -> None:
    """Bad ports and broken brackets are argument errors, not crashes."""
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_bind(text)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="shmdisk")
    cli.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_register_adds_serve_with_its_options() -> None:
    """register() adds `serve NAME... [--socket|--bind] [--read-only] [--create] [-q]`."""
    args = parse("a", "b", "--socket", "/tmp/x.sock", "--read-only", "-q")
    assert args.names == ["a", "b"] and args.socket == "/tmp/x.sock" and args.bind is None
    assert args.read_only and args.quiet and not args.create
    assert args.func is cli.serve_command
    assert parse("a", "--bind", "[::1]:0").bind == ("::1", 0)


def test_access_and_tls_options_parse() -> None:
    """--socket-mode (octal), --tls MODE, certificates, PSK, --max-connections, --owner."""
    args = parse(
        "a", "--socket", "/tmp/x", "--socket-mode", "660", "--tls", "require",
        "--tls-certificates", "/etc/pki/x", "--tls-verify-peer", "--max-connections", "8",
        "--owner", "alice",
    )  # fmt: skip
    assert args.socket_mode == 0o660 and args.tls == "require"
    assert args.tls_certificates == "/etc/pki/x" and args.tls_verify_peer
    assert args.max_connections == 8 and args.owner == "alice"
    defaults = parse("a")
    assert defaults.tls is None and defaults.socket_mode is None
    assert defaults.max_connections == 64 and not defaults.tls_verify_peer


@pytest.mark.parametrize(
    "argv",
    [
        ("--socket-mode", "0999"),
        ("--socket-mode", "1777"),
        ("--tls", "maybe"),
        ("--max-connections", "0"),
        ("--max-connections", "many"),
    ],
)
def test_bad_access_and_tls_options_are_usage_errors(
    argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """Modes that are not octal or too wide, unknown TLS modes, limits below 1: exit 2."""
    with pytest.raises(SystemExit) as exc:
        parse("a", "--socket", "/tmp/x", *argv)
    assert exc.value.code == 2
    capsys.readouterr()


def test_socket_mode_without_socket_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    """--socket-mode with --bind has no file to apply to: refused rather than ignored."""
    assert cli.serve_command(parse("a", "--bind", ":0", "--socket-mode", "0660")) == 1
    assert "--socket-mode applies to the file of --socket" in capsys.readouterr().err


def test_socket_and_bind_are_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    """One listening address at a time."""
    with pytest.raises(SystemExit) as exc:
        parse("a", "--socket", "/tmp/x", "--bind", ":1")
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


def test_serve_command_reports_errors_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A missing disk gives exit status 1 and one error line, no traceback."""
    args = parse("no-such-disk-for-nbd-cli-test", "--socket", "/tmp/never-bound.sock")
    assert cli.serve_command(args) == 1
    err = capsys.readouterr().err
    assert "shmdisk serve: error:" in err and "no-such-disk-for-nbd-cli-test" in err
    assert "Traceback" not in err


def test_serve_help_shows_examples(capsys: pytest.CaptureFixture[str]) -> None:
    """`shmdisk serve --help` ends with examples, like every other command."""
    with pytest.raises(SystemExit):
        parse("--help")
    out = capsys.readouterr().out
    assert "examples:\n  shmdisk serve vm0 --socket /tmp/nbd.sock" in out
