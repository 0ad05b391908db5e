"""Who may use an export over a Unix socket: the socket file's mode, and each client served only
as far as its own uid and groups could open the disk (tested as real other users, as root)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator

import pytest
from _helpers import NOBODY, as_other_user, new_name
from test_nbd_clients import TIMEOUT, need
from test_nbd_protocol import Client, info_export

import shmdisk
from shmdisk.nbd import Access, NBDServer, Peer
from shmdisk.nbd import _proto as P
from shmdisk.nbd._access import FileFacts, file_access
from shmdisk.nbd._peer import Credentials, proc_groups

MiB = 1 << 20
ROOT = os.geteuid() == 0


def creds(uid: int, gid: int | None = None, *groups: int) -> Credentials:
    return Credentials(pid=1, uid=uid, gid=uid if gid is None else gid, groups=groups)


# --- the rule itself -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "who", "want"),
    [
        (0o600, creds(1000), Access.READ_WRITE),  # the owner
        (0o400, creds(1000), Access.READ_ONLY),
        (0o200, creds(1000), Access.REFUSED),  # write-only: the library cannot open it at all
        (0o600, creds(2000), Access.REFUSED),
        (0o644, creds(2000), Access.READ_ONLY),
        (0o666, creds(2000), Access.READ_WRITE),
        (0o640, creds(2000, 100), Access.READ_ONLY),  # primary group
        (0o660, creds(2000, 2000, 100), Access.READ_WRITE),  # supplementary group
        (0o604, creds(2000, 100), Access.REFUSED),  # the group class decides, not other
        (0o066, creds(1000), Access.REFUSED),  # the owner class decides alone
        (0o000, creds(0), Access.READ_WRITE),  # root may do everything
    ],
)
def test_file_access_follows_the_kernels_mode_rules(
    mode: int, who: Credentials, want: Access
) -> None:
    """Owner, group (primary or supplementary) and other bits decide as open(2) would."""
    got, reason = file_access([FileFacts(1000, 100, mode)], who)
    assert got is want, reason


def test_unknown_credentials_get_nothing() -> None:
    """A Unix client the kernel would not name is refused, whatever the mode."""
    assert file_access([FileFacts(0, 0, 0o666)], None)[0] is Access.REFUSED


def test_an_overlay_needs_read_access_to_its_backing_disks() -> None:
    """Opening an overlay opens each disk below it read-only; unreadable below is refused."""
    top = FileFacts(2000, 2000, 0o600)
    assert file_access([top, FileFacts(0, 0, 0o644)], creds(2000))[0] is Access.READ_WRITE
    got, reason = file_access([top, FileFacts(0, 0, 0o600)], creds(2000))
    assert got is Access.REFUSED and "backed by" in reason


def acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


ANY = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER = 1, 2, 4, 8, 0x10, 0x20


def test_posix_acls_are_honoured() -> None:
    """Named users and groups of an ACL, through its mask; a malformed ACL refuses."""
    raw = acl(
        (USER_OBJ, 6, ANY),
        (USER, 6, 3000),  # rw, but the mask below leaves r
        (USER, 0, 4000),  # nothing, though "other" may read
        (GROUP_OBJ, 0, ANY),
        (GROUP, 6, 500),
        (MASK, 4, ANY),
        (OTHER, 4, ANY),
    )
    f = FileFacts(1000, 100, 0o640, raw)
    assert file_access([f], creds(1000))[0] is Access.READ_WRITE
    assert file_access([f], creds(3000))[0] is Access.READ_ONLY
    assert file_access([f], creds(4000))[0] is Access.REFUSED
    assert file_access([f], creds(5000, 5000, 500))[0] is Access.READ_ONLY  # masked
    assert file_access([f], creds(6000, 100))[0] is Access.REFUSED  # owning group: nothing
    assert file_access([f], creds(7000))[0] is Access.READ_ONLY  # other
    broken = FileFacts(1000, 100, 0o666, raw[:-3])
    assert file_access([broken], creds(7000))[0] is Access.REFUSED


def test_proc_groups_refuses_a_process_that_changed_identity() -> None:
    """/proc is read only for the ids the socket gave: a reused pid lends no groups."""
    me, gid = os.geteuid(), os.getegid()
    assert set(proc_groups(os.getpid(), me, gid)) == set(os.getgroups())
    assert proc_groups(os.getpid(), me + 1, gid) == ()
    assert proc_groups(2**22 + 12345, me, gid) == ()  # no such process


def test_peer_credentials_carry_the_clients_groups(disk: shmdisk.Disk, sockdir: str) -> None:
    """The policy sees the client's uid, gid and supplementary groups."""
    seen: list[Peer] = []

    def policy(export: str, peer: Peer) -> Access:
        seen.append(peer)
        return Access.READ_WRITE

    with NBDServer([disk], socket_path=os.path.join(sockdir, "g"), access=policy) as srv:
        c = Client(str(srv.address))
        c.start()
        c.close()
    cred = seen[0].credentials
    assert cred is not None and cred.uid == os.geteuid() and cred.gid == os.getegid()
    assert set(cred.groups) == set(os.getgroups())


# --- the socket file -------------------------------------------------------------------------


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A socket directory other users can traverse (the socket's own mode is what counts)."""
    d = tempfile.mkdtemp(prefix="nbda", dir="/tmp")
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def disk() -> Iterator[shmdisk.Disk]:
    """A 1 MiB disk, mode 0600, owned by this process's user."""
    name = new_name("nbda")
    d = shmdisk.create(name, MiB // 512)
    yield d
    d.disconnect()
    shmdisk.destroy(name)


def test_socket_file_is_0600_by_default_and_socket_mode_changes_it(
    disk: shmdisk.Disk, sockdir: str
) -> None:
    """The socket file gets mode 0600 whatever the umask; socket_mode=0o660 gives 0660."""
    old = os.umask(0)
    try:
        with NBDServer([disk], socket_path=os.path.join(sockdir, "a")) as srv:
            assert stat.S_IMODE(os.stat(str(srv.address)).st_mode) == 0o600
        with NBDServer([disk], socket_path=os.path.join(sockdir, "b"), socket_mode=0o660) as srv:
            assert stat.S_IMODE(os.stat(str(srv.address)).st_mode) == 0o660
    finally:
        os.umask(old)


def test_bad_socket_modes_are_refused(disk: shmdisk.Disk) -> None:
    """A mode outside 0..0o777 or not an int is an error before anything listens."""
    with pytest.raises(ValueError, match="outside"):
        NBDServer([disk], socket_path="/tmp/x", socket_mode=0o4777)
    with pytest.raises(TypeError):
        NBDServer([disk], socket_path="/tmp/x", socket_mode="600")  # type: ignore[arg-type]


# --- as other users (root only) --------------------------------------------------------------


def run_as(uid: int, *cmd: str, groups: str = "", data: bytes | None = None) -> tuple[int, bytes]:
    """Run ``cmd`` as ``uid`` (gid the same; supplementary ``groups``, comma-separated, or
    none); its exit status and stdout. stderr goes to the test's output."""
    drop = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={uid}",
        f"--groups={groups}" if groups else "--clear-groups",
        "--",
    ]
    done = subprocess.run(
        [*drop, *cmd], input=data, stdout=subprocess.PIPE, timeout=TIMEOUT, check=False
    )
    return done.returncode, done.stdout


@pytest.fixture
def shared(disk: shmdisk.Disk, sockdir: str) -> Iterator[tuple[NBDServer, shmdisk.Disk, str]]:
    """A server whose socket any local user may connect to (0666): each is then served only
    as the disk's own permissions allow."""
    with NBDServer([disk], socket_path=os.path.join(sockdir, "s"), socket_mode=0o666) as srv:
        yield srv, disk, srv.uri()


def chmod_disk(disk: shmdisk.Disk, mode: int, gid: int | None = None) -> None:
    path = shmdisk.segment_path(disk.name)
    os.chmod(path, mode)
    if gid is not None:
        os.chown(path, -1, gid)


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root to act as other users")
@need("nbdinfo", "setpriv")
def test_other_user_cannot_reach_a_0600_socket(disk: shmdisk.Disk, sockdir: str) -> None:
    """With the default socket mode, another user cannot even connect (even to a 0666 disk)."""
    chmod_disk(disk, 0o666)
    with NBDServer([disk], socket_path=os.path.join(sockdir, "p")) as srv:
        rc, _ = run_as(NOBODY, "nbdinfo", "--size", srv.uri())
        assert rc != 0

        def connect() -> int:
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(str(srv.address))
            except PermissionError:
                return 0
            return 1

        assert as_other_user(connect)[0] == 0


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root to act as other users")
@need("nbdinfo", "nbdcopy", "setpriv")
def test_a_0600_disk_is_refused_to_another_user(
    shared: tuple[NBDServer, shmdisk.Disk, str], caplog: pytest.LogCaptureFixture
) -> None:
    """uid 65534 on a 0600 root disk: GO is ERR_POLICY, LIST hides it, nbdcopy gets nothing;
    the log says who was refused and why."""
    srv, disk, uri = shared
    disk.write_at(0, b"secret".ljust(512, b"\0"))
    rc, out = run_as(NOBODY, "nbdcopy", "--", uri, "-")
    assert rc != 0 and b"secret" not in out
    rc, out = run_as(NOBODY, "nbdinfo", "--list", "--json", f"nbd+unix:///?socket={srv.address}")
    assert rc == 0 and json.loads(out)["exports"] == []

    def go() -> int:
        c = Client(str(srv.address))
        c.greet()
        kinds = [k for k, _ in c.go(disk.name)]
        c.close()
        return 0 if kinds == [P.REP_ERR_POLICY] else 1

    assert as_other_user(go)[0] == 0
    assert "uid 65534 may not read the disk (owner 0, group 0, mode 0600)" in caplog.text


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root to act as other users")
@need("nbdinfo", "nbdcopy", "setpriv")
def test_a_0644_disk_is_read_only_to_another_user(
    shared: tuple[NBDServer, shmdisk.Disk, str],
) -> None:
    """uid 65534 on a 0644 disk: advertised read-only, nbdcopy reads it, a write that comes
    anyway (a client ignoring the flag) is EPERM and changes nothing."""
    srv, disk, uri = shared
    chmod_disk(disk, 0o644)
    disk.write_at(0, b"public".ljust(512, b"\0"))
    rc, out = run_as(NOBODY, "nbdinfo", "--json", uri)
    assert rc == 0 and json.loads(out)["exports"][0]["is_read_only"] is True
    rc, out = run_as(NOBODY, "nbdcopy", "--", uri, "-")
    assert rc == 0 and out[:6] == b"public" and len(out) == MiB
    rc, _ = run_as(NOBODY, "nbdcopy", "--", "-", uri, data=b"x" * MiB)
    assert rc != 0

    def write_anyway() -> int:
        c = Client(str(srv.address))
        flags = c.start()
        err = c.write(0, b"pwned".ljust(512, b"\0"))
        c.close()
        return 0 if flags & P.FLAG_READ_ONLY and err == P.EPERM else 1

    code, _out, err = as_other_user(write_anyway)
    assert code == 0, err
    got = bytearray(512)
    disk.read(0, got)
    assert got[:6] == b"public"


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root to act as other users")
@need("nbdcopy", "setpriv")
def test_a_0666_disk_is_read_write_to_another_user(
    shared: tuple[NBDServer, shmdisk.Disk, str],
) -> None:
    """uid 65534 on a 0666 disk: nbdcopy writes an image in, as it could through the file."""
    _srv, disk, uri = shared
    chmod_disk(disk, 0o666)
    data = os.urandom(MiB)
    rc, _ = run_as(NOBODY, "nbdcopy", "--", "-", uri, data=data)
    assert rc == 0
    got = bytearray(MiB)
    disk.read(0, got)
    assert got == data


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root to act as other users")
@need("nbdinfo", "setpriv")
def test_supplementary_groups_count_as_the_kernel_counts_them(
    shared: tuple[NBDServer, shmdisk.Disk, str],
) -> None:
    """A 0640 disk of group 4242: refused to uid 65534 alone, read-only with that group as a
    supplementary one; a 0660 one is then read-write. chmod applies to the next connection."""
    _srv, disk, uri = shared
    chmod_disk(disk, 0o640, gid=4242)
    rc, _ = run_as(NOBODY, "nbdinfo", "--json", uri)
    assert rc != 0
    rc, out = run_as(NOBODY, "nbdinfo", "--json", uri, groups="4242")
    assert rc == 0 and json.loads(out)["exports"][0]["is_read_only"] is True
    chmod_disk(disk, 0o660)
    rc, out = run_as(NOBODY, "nbdinfo", "--json", uri, groups="4242")
    assert rc == 0 and json.loads(out)["exports"][0]["is_read_only"] is False


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root to act as other users")
def test_an_acl_on_the_disk_is_honoured(shared: tuple[NBDServer, shmdisk.Disk, str]) -> None:
    """A POSIX ACL granting uid 65534 read access on a 0600 disk makes it read-only to it."""
    srv, disk, _uri = shared
    raw = acl(
        (USER_OBJ, 6, ANY), (USER, 4, NOBODY), (GROUP_OBJ, 0, ANY), (MASK, 4, ANY), (OTHER, 0, ANY)
    )
    try:
        os.setxattr(shmdisk.segment_path(disk.name), "system.posix_acl_access", raw)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on /dev/shm here: {exc.strerror}")

    def flags() -> int:
        c = Client(str(srv.address))
        got = c.start()
        c.close()
        return 0 if got & P.FLAG_READ_ONLY else 1

    code, _out, err = as_other_user(flags)
    assert code == 0, err


def as_uid(uid: int, fn: Callable[[], int]) -> int:
    """Run ``fn`` in a forked child that has become ``uid``/``uid``; its exit code."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child never returns into pytest
        code = 99
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            code = fn()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise TimeoutError(f"the child running as uid {uid} hung")
        time.sleep(0.01)


def create_as(uid: int, name: str, fill: bytes) -> None:
    def make() -> int:
        with shmdisk.create(name, 64, mode=0o666) as d:
            d.write(0, fill.ljust(512, b"\0"))
        return 0

    assert as_uid(uid, make) == 0


def go_size(path: str, name: str) -> int | None:
    """The size NBD_OPT_GO reports for ``name``; None if it is refused or unknown."""
    c = Client(path)
    try:
        c.greet()
        replies = c.go(name)
        return info_export(replies)[0] if replies[-1][0] == P.REP_ACK else None
    finally:
        c.close()


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root to act as other users")
def test_a_name_recreated_by_another_user_is_not_served(
    sockdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    """After a destroy, uid 65534 re-creates the name (0666): the server does not attach to
    it, never writes into it, and says so in its log."""
    name = new_name("nbdsq")
    shmdisk.create(name, 128).disconnect()
    try:
        with NBDServer([name], socket_path=os.path.join(sockdir, "sq")) as srv:
            assert go_size(str(srv.address), name) == 128 * 512
            shmdisk.destroy(name)
            create_as(NOBODY, name, b"squatter")
            assert go_size(str(srv.address), name) is None
            assert os.stat(shmdisk.segment_path(name)).st_uid == NOBODY
            assert "not attaching the re-created disk" in caplog.text
        with shmdisk.connect(name, read_only=True, create=False, owner=NOBODY) as d:
            got = bytearray(512)
            d.read(0, got)
            assert got[:8] == b"squatter"  # untouched
    finally:
        shmdisk.destroy(name)


@pytest.mark.root
@pytest.mark.skipif(not ROOT, reason="needs root to act as other users")
def test_reattach_trusts_the_named_owner_and_no_one_else(sockdir: str) -> None:
    """A server told owner=65534 re-attaches to 65534's re-created disk, never to another
    user's (65533) at the same name."""
    name = new_name("nbdow")
    create_as(NOBODY, name, b"first")
    try:
        srv = NBDServer([name], socket_path=os.path.join(sockdir, "ow"), owner=NOBODY)
        with srv:
            assert go_size(str(srv.address), name) == 64 * 512
            shmdisk.destroy(name, owner=NOBODY)
            create_as(NOBODY - 1, name, b"intruder")
            assert go_size(str(srv.address), name) is None
            shmdisk.destroy(name, owner=NOBODY - 1)
            create_as(NOBODY, name, b"second")
            c = Client(str(srv.address))
            try:
                c.start(name)
                assert c.read(0, 512)[:6] == b"second"
            finally:
                c.close()
    finally:
        shmdisk.destroy(name, owner=NOBODY)
