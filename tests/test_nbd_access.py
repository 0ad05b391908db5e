"""Who may use an export over a Unix socket: the socket file's mode, and each client served only
as far as its own uid and groups could open the disk (tested as real other users, as root)."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator

import pytest
from _helpers import NOBODY, new_name
from test_nbd_clients import TIMEOUT
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
        (
            0o200,
            creds(1000),
            Access.REFUSED,
        ),  # write-only: the library cannot open it at all
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


# --- the server ------------------------------------------------------------------------------


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


# --- as other users (root only) --------------------------------------------------------------


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
