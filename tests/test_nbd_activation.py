"""Socket activation: captive servers started by the block tools, and systemd-style sockets."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from conftest import new_name
from test_nbd_clients import TIMEOUT, Serve, disk_bytes, need, ok, run, sparse_image
from test_nbd_protocol import Client, info_export

import shmdisk
from shmdisk.nbd import Access, NBDServer, Peer, Transport, _activation
from shmdisk.nbd import _proto as P

MiB = 1 << 20
SERVE = [sys.executable, "-m", "shmdisk", "serve"]


@pytest.fixture
def disk() -> Iterator[shmdisk.Disk]:
    """A 4 MiB disk of 512-byte sectors."""
    name = new_name("nbdact")
    d = shmdisk.create(name, 4 * MiB // 512)
    yield d
    d.disconnect()
    shmdisk.destroy(name)


@need("nbdinfo")
def test_nbdinfo_starts_a_captive_server(disk: shmdisk.Disk) -> None:
    """`nbdinfo [ shmdisk serve NAME ]`: nbdinfo starts the server on a socket of its own,
    talks to it, and stops it; the server keeps quiet on the terminal they share."""
    # "--": the command's own options (python3 -m) are not nbdinfo's.
    done = run("nbdinfo", "--json", "--", "[", *SERVE, disk.name, "]")
    assert done.returncode == 0, done.stderr
    [export] = json.loads(done.stdout)["exports"]
    assert export["export-name"] == disk.name
    assert export["export-size"] == 4 * MiB
    assert export["can_multi_conn"] is True
    assert done.stderr == ""


@need("nbdcopy")
def test_nbdcopy_copies_out_and_in_through_captive_servers(
    disk: shmdisk.Disk, tmp_path: pytest.TempPathFactory
) -> None:
    """`nbdcopy -- [ shmdisk serve NAME ] out.img` and `nbdcopy -- in.img [ ... ]`: byte for
    byte both ways, checked through the library."""
    src = os.path.join(str(tmp_path), "in.img")
    content = sparse_image(src, 4 * MiB)
    ok("nbdcopy", "--", src, "[", *SERVE, disk.name, "]")
    assert disk_bytes(disk) == content
    disk.write_at(3 * MiB, b"local")
    out = os.path.join(str(tmp_path), "out.img")
    ok("nbdcopy", "--", "[", *SERVE, disk.name, "]", out)
    with open(out, "rb") as f:
        assert f.read() == disk_bytes(disk)


@need("nbdinfo")
@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_a_systemd_style_socket_is_served_and_left_to_its_owner(
    disk: shmdisk.Disk, tmp_path: pytest.TempPathFactory, kind: str
) -> None:
    """A listening socket passed as descriptor 3 (a .socket unit with Accept=no) is served;
    -v logs its connections as coming through it; on SIGTERM the server exits 0 and leaves
    the socket file to whoever made it."""
    if kind == "unix":
        path = os.path.join(str(tmp_path), "act.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        uri = f"nbd+unix:///{disk.name}?socket={path}"
    else:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        uri = f"nbd://127.0.0.1:{listener.getsockname()[1]}/{disk.name}"
    listener.listen()
    plain_tcp = ("--tls", "off") if kind == "tcp" else ()
    serve = Serve(disk.name, "-v", *plain_tcp, activate=listener)
    try:
        serve.wait_for("serving")
        info = json.loads(ok("nbdinfo", "--json", uri))
        assert info["exports"][0]["export-size"] == 4 * MiB, (info, serve.stderr())
        serve.wait_for(r"conn 1 .*closed")
    finally:
        rc = serve.stop()
        listener.close()
    assert rc == 0, serve.log
    assert "(activated socket)" in serve.log, serve.log
    assert re.search(r"conn 1 \(.*activated socket\): connected", serve.log), serve.log
    if kind == "unix":
        assert os.path.exists(path)
    else:
        assert "warning: serving plain TCP" in serve.log, serve.log


def test_activation_with_a_connected_socket_is_a_clear_error(disk: shmdisk.Disk) -> None:
    """Accept=yes passes a connection, not a listening socket: refused in one line."""
    a, b = socket.socketpair()
    try:
        serve = Serve(disk.name, activate=a)
        try:
            rc = serve.proc.wait(TIMEOUT)
        finally:
            serve.stop()  # (if it did not exit, this ends it) keeps its log in serve.log
    finally:
        a.close()
        b.close()
    assert rc == 1
    assert serve.log == (
        "shmdisk serve: error: socket activation: descriptor 3 is not listening; "
        "a systemd .socket unit for shmdisk needs Accept=no\n"
    )


def test_activation_conflicts_with_an_explicit_address(
    disk: shmdisk.Disk, tmp_path: pytest.TempPathFactory
) -> None:
    """A passed socket and --socket/--bind at once is refused rather than one silently lost."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(os.path.join(str(tmp_path), "a.sock"))
    listener.listen()
    try:
        serve = Serve(
            disk.name, "--socket", os.path.join(str(tmp_path), "b.sock"), activate=listener
        )
        try:
            rc = serve.proc.wait(TIMEOUT)
        finally:
            serve.stop()  # (if it did not exit, this ends it) keeps its log in serve.log
    finally:
        listener.close()
    assert rc == 1
    assert "--socket and --bind cannot be used with it" in serve.log
    assert "Traceback" not in serve.log


def test_activation_meant_for_another_process_is_ignored(
    disk: shmdisk.Disk, tmp_path: pytest.TempPathFactory
) -> None:
    """LISTEN_PID of another process (variables inherited from a parent) is not ours."""
    path = os.path.join(str(tmp_path), "own.sock")
    env = dict(os.environ, LISTEN_PID="1", LISTEN_FDS="1")
    proc = subprocess.Popen(
        [*SERVE, disk.name, "--socket", path],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(path):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        c = Client(path)
        c.greet()
        assert info_export(c.go())[0] == 4 * MiB
        c.close()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err


def test_activated_sockets_follow_the_same_access_policy(disk: shmdisk.Disk) -> None:
    """The policy sees a connection through a handed-over socket as such, and rules on it
    like on any other: a refused export is refused."""
    seen: list[Peer] = []

    def policy(export: str, peer: Peer) -> Access:
        seen.append(peer)
        return Access.REFUSED

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    with NBDServer([disk], sockets=[listener], access=policy, tls="off") as srv:
        assert srv.describe_address() == f"127.0.0.1:{listener.getsockname()[1]}"
        s = socket.create_connection(listener.getsockname(), timeout=TIMEOUT)
        c = Client.__new__(Client)
        c.sock, c.structured = s, False
        try:
            c.greet()
            assert [k for k, _ in c.go(disk.name)] == [P.REP_ERR_POLICY]
        finally:
            c.close()
    assert seen and seen[0].activated and seen[0].transport is Transport.TCP


def test_listen_fds_reads_only_what_is_meant_for_this_process() -> None:
    """No variables, another process's variables: nothing taken, nothing removed; garbage in
    them is an error that says what it found."""
    assert _activation.listen_fds({}) == []
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2"}
    assert _activation.listen_fds(env) == []
    assert env == {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2"}
    assert _activation.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}) == []
    with pytest.raises(_activation.ActivationError, match="LISTEN_FDS='x'"):
        _activation.listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "x"})
