"""The NBD server at the wire level: a tiny hand-written client checks every reply byte."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import new_name

import shmdisk
from shmdisk.nbd import Access, NBDServer, Peer, Transport, _buffers, _handlers, _transmission
from shmdisk.nbd import _proto as P

TIMEOUT = 10.0


class Client:
    """Just enough of an NBD client to say anything, right or wrong, and read the answer."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.structured = False

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def closed_by_server(self) -> bool:
        """True once the server has hung up: end-of-file (after any unread replies) or reset."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    # --- handshake ---
    def greet(self, client_flags: int = P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES) -> int:
        magic, opt_magic, flags = P.GREETING.unpack(self.recv(P.GREETING.size))
        assert (magic, opt_magic) == (P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(P.CLIENT_FLAGS.pack(client_flags))
        return int(flags)

    def option(self, option: int, data: bytes = b"") -> None:
        self.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data)

    def reply(self, option: int) -> tuple[int, bytes]:
        magic, opt, kind, length = P.OPTION_REPLY.unpack(self.recv(P.OPTION_REPLY.size))
        assert magic == P.REPLY_MAGIC and opt == option
        return kind, self.recv(length)

    def replies(self, option: int) -> list[tuple[int, bytes]]:
        """All replies up to and including the final one (ACK or an error)."""
        out = []
        while True:
            kind, data = self.reply(option)
            out.append((kind, data))
            if kind == P.REP_ACK or kind & (1 << 31):
                return out

    def go(
        self, name: str = "", infos: tuple[int, ...] = (), option: int = P.OPT_GO
    ) -> list[tuple[int, bytes]]:
        raw = name.encode()
        data = struct.pack(f">I{len(raw)}sH{len(infos)}H", len(raw), raw, len(infos), *infos)
        self.option(option, data)
        return self.replies(option)

    def start(self, name: str = "", *, structured: bool = False, meta: bool = False) -> int:
        """Greet, negotiate, GO; returns the transmission flags."""
        self.greet()
        if structured:
            self.option(P.OPT_STRUCTURED_REPLY)
            assert self.reply(P.OPT_STRUCTURED_REPLY)[0] == P.REP_ACK
            self.structured = True
        if meta:
            assert self.set_meta(name, [P.META_BASE_ALLOCATION])[-1][0] == P.REP_ACK
        replies = self.go(name, (P.INFO_BLOCK_SIZE,))
        assert replies[-1][0] == P.REP_ACK, replies
        return info_export(replies)[1]

    def set_meta(
        self, name: str, queries: list[str], option: int = P.OPT_SET_META_CONTEXT
    ) -> list[tuple[int, bytes]]:
        data = struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(queries))
        for q in queries:
            data += struct.pack(">I", len(q)) + q.encode()
        self.option(option, data)
        return self.replies(option)

    # --- transmission ---
    def request(
        self, cmd: int, offset: int = 0, length: int = 0, flags: int = 0, data: bytes = b""
    ) -> int:
        handle = int.from_bytes(os.urandom(8), "big")
        self.sock.sendall(
            P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, handle, offset, length) + data
        )
        return handle

    def simple(self, handle: int, payload: int = 0) -> tuple[int, bytes]:
        magic, error, h = P.SIMPLE_REPLY.unpack(self.recv(P.SIMPLE_REPLY.size))
        assert magic == P.SIMPLE_REPLY_MAGIC and h == handle
        return error, self.recv(payload) if error == 0 else b""

    def chunks(self, handle: int) -> list[tuple[int, int, bytes]]:
        """(flags, type, payload) of every structured chunk of one reply; simple replies too."""
        out = []
        while True:
            magic = struct.unpack(">I", self.recv(4))[0]
            if magic == P.SIMPLE_REPLY_MAGIC:
                error, h = struct.unpack(">IQ", self.recv(12))
                assert h == handle
                return [(P.REPLY_FLAG_DONE, -1, struct.pack(">I", error))]
            assert magic == P.STRUCTURED_REPLY_MAGIC
            flags, kind, h, length = struct.unpack(">HHQI", self.recv(16))
            assert h == handle
            out.append((flags, kind, self.recv(length)))
            if flags & P.REPLY_FLAG_DONE:
                return out

    def error_of(self, handle: int) -> int:
        """The error of a payload-less reply (simple or structured), 0 for success."""
        if not self.structured:
            return self.simple(handle)[0]
        chunks = self.chunks(handle)
        for _flags, kind, payload in chunks:
            if kind == -1:
                return int(struct.unpack(">I", payload)[0])
            if kind & (1 << 15):
                return int(struct.unpack_from(">I", payload)[0])
        return 0

    def read(self, offset: int, length: int, flags: int = 0) -> bytes:
        handle = self.request(P.CMD_READ, offset, length, flags)
        if not self.structured:
            error, data = self.simple(handle, length)
            assert error == 0, error
            return data
        out = bytearray(length)
        for _flags, kind, payload in self.chunks(handle):
            if kind == P.REPLY_TYPE_OFFSET_DATA:
                (at,) = struct.unpack_from(">Q", payload)
                out[at - offset : at - offset + len(payload) - 8] = payload[8:]
            elif kind == P.REPLY_TYPE_OFFSET_HOLE:
                at, n = struct.unpack(">QI", payload)
                out[at - offset : at - offset + n] = bytes(n)
            else:
                raise AssertionError(f"unexpected chunk type {kind}")
        return bytes(out)

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        return self.error_of(self.request(P.CMD_WRITE, offset, len(data), flags, data))


def info_export(replies: list[tuple[int, bytes]]) -> tuple[int, int]:
    for kind, data in replies:
        if kind == P.REP_INFO and struct.unpack_from(">H", data)[0] == P.INFO_EXPORT:
            _, size, flags = P.INFO_EXPORT_PAYLOAD.unpack(data)
            return size, flags
    raise AssertionError(f"no NBD_INFO_EXPORT in {replies}")


def info_of(replies: list[tuple[int, bytes]], info: int) -> bytes | None:
    for kind, data in replies:
        if kind == P.REP_INFO and struct.unpack_from(">H", data)[0] == info:
            return data[2:]
    return None


@pytest.fixture
def sockdir() -> Iterator[str]:
    # Unix socket paths are limited to 107 bytes, so not pytest's long tmp_path.
    d = tempfile.mkdtemp(prefix="nbd", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def disks() -> Iterator[list[shmdisk.Disk]]:
    """Two small disks: 64 sectors of 512 bytes, and 16 sectors of 4096 bytes."""
    names = [new_name("nbd"), new_name("nbd")]
    made = [shmdisk.create(names[0], 64), shmdisk.create(names[1], 16, 4096)]
    yield made
    for d in made:
        d.disconnect()
    for n in names:
        shmdisk.destroy(n)


@pytest.fixture
def server(disks: list[shmdisk.Disk], sockdir: str) -> Iterator[NBDServer]:
    with NBDServer(disks, socket_path=os.path.join(sockdir, "s")) as srv:
        yield srv


@pytest.fixture
def client(server: NBDServer) -> Iterator[Client]:
    c = Client(str(server.address))
    yield c
    c.close()


def test_list_and_unknown_options(server: NBDServer, disks: list[shmdisk.Disk]) -> None:
    """LIST names every export in order; unknown options get ERR_UNSUP, STARTTLS on a server
    without TLS ERR_POLICY, and talk goes on."""
    c = Client(str(server.address))
    try:
        flags = c.greet()
        assert flags == P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
        c.option(P.OPT_LIST)
        replies = c.replies(P.OPT_LIST)
        names = [d[4 : 4 + struct.unpack_from(">I", d)[0]].decode() for _, d in replies[:-1]]
        assert names == [d.name for d in disks]
        assert replies[-1][0] == P.REP_ACK
        c.option(P.OPT_LIST, b"x")
        assert c.reply(P.OPT_LIST)[0] == P.REP_ERR_INVALID
        for unknown in (4, 99, 0xFFFF):
            c.option(unknown, b"some payload")
            assert c.reply(unknown)[0] == P.REP_ERR_UNSUP
        c.option(P.OPT_STARTTLS)
        assert c.reply(P.OPT_STARTTLS)[0] == P.REP_ERR_POLICY
        replies = c.go(disks[1].name)
        assert replies[-1][0] == P.REP_ACK
        assert info_export(replies)[0] == 16 * 4096
    finally:
        c.close()


def test_info_reports_size_flags_and_block_sizes(client: Client, disks: list[shmdisk.Disk]) -> None:
    """INFO gives size, transmission flags, name, description and block sizes; GO goes on."""
    client.greet()
    replies = client.go("", (P.INFO_NAME, P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE), option=P.OPT_INFO)
    assert replies[-1][0] == P.REP_ACK
    size, flags = info_export(replies)
    assert size == 64 * 512
    want = (
        P.FLAG_HAS_FLAGS
        | P.FLAG_SEND_FLUSH
        | P.FLAG_SEND_FUA
        | P.FLAG_SEND_TRIM
        | P.FLAG_SEND_WRITE_ZEROES
        | P.FLAG_SEND_FAST_ZERO
        | P.FLAG_CAN_MULTI_CONN
        | P.FLAG_SEND_CACHE
    )
    assert flags == want
    assert info_of(replies, P.INFO_NAME) == disks[0].name.encode()
    assert disks[0].name.encode() in (info_of(replies, P.INFO_DESCRIPTION) or b"")
    minimum, preferred, maximum = struct.unpack(">III", info_of(replies, P.INFO_BLOCK_SIZE) or b"")
    assert (minimum, preferred, maximum) == (512, max(4096, disks[0].page_size), P.MAX_REQUEST)
    replies = client.go(disks[1].name, (P.INFO_BLOCK_SIZE,), option=P.OPT_INFO)
    assert struct.unpack(">III", info_of(replies, P.INFO_BLOCK_SIZE) or b"")[0] == 4096
    replies = client.go("no-such-export")
    assert [k for k, _ in replies] == [P.REP_ERR_UNKNOWN]
    assert client.go()[-1][0] == P.REP_ACK
    assert client.read(0, 512) == bytes(512)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name_then_simple_io(
    client: Client, disks: list[shmdisk.Disk], no_zeroes: bool
) -> None:
    """EXPORT_NAME enters transmission (124 zero bytes unless NO_ZEROES); data round-trips."""
    client.greet(P.FLAG_C_FIXED_NEWSTYLE | (P.FLAG_C_NO_ZEROES if no_zeroes else 0))
    client.option(P.OPT_EXPORT_NAME, disks[0].name.encode())
    size, flags = P.EXPORT_NAME_REPLY.unpack(client.recv(P.EXPORT_NAME_REPLY.size))
    assert size == 64 * 512 and flags & P.FLAG_CAN_MULTI_CONN
    if not no_zeroes:
        assert client.recv(124) == bytes(124)
    payload = os.urandom(1500)
    assert client.write(700, payload) == 0  # unaligned is fine: no block size was agreed
    assert client.read(700, 1500) == payload
    expect = bytearray(2560)
    disks[0].read(0, expect)
    assert bytes(expect[700:2200]) == payload
    disks[0].write(4, b"L" * 512)
    assert client.read(2048, 512) == b"L" * 512
    client.request(P.CMD_DISC)
    assert client.closed_by_server()


def test_export_name_unknown_hangs_up(client: Client) -> None:
    """EXPORT_NAME cannot fail politely: an unknown name closes the connection."""
    client.greet()
    client.option(P.OPT_EXPORT_NAME, b"nope")
    assert client.closed_by_server()


def test_errors_keep_the_connection(client: Client, disks: list[shmdisk.Disk]) -> None:
    """Out of range, unknown commands and flags fail with the spec's errno; the next works."""
    client.start()
    size = 64 * 512
    assert client.error_of(client.request(P.CMD_READ, size - 512, 1024)) == P.EINVAL
    assert client.write(size - 512, bytes(1024)) == P.ENOSPC
    assert client.error_of(client.request(P.CMD_WRITE_ZEROES, size, 512)) == P.ENOSPC
    assert client.error_of(client.request(P.CMD_TRIM, size, 512)) == P.EINVAL
    assert client.error_of(client.request(P.CMD_CACHE, size, 512)) == P.EINVAL
    assert client.error_of(client.request(42, 0, 512)) == P.EINVAL
    assert client.error_of(client.request(P.CMD_READ, 0, 512, flags=1 << 9)) == P.EINVAL
    assert client.error_of(client.request(P.CMD_READ, 0, 512, flags=P.CMD_FLAG_DF)) == P.EINVAL
    assert client.error_of(client.request(P.CMD_FLUSH, 512, 0)) == P.EINVAL
    assert client.error_of(client.request(P.CMD_BLOCK_STATUS, 0, 512)) == P.EINVAL
    too_big = client.request(P.CMD_READ, 0, P.MAX_REQUEST + 512)
    assert client.error_of(too_big) == P.EINVAL
    # The client asked for block sizes in GO, so it promised 512-byte alignment.
    assert client.error_of(client.request(P.CMD_READ, 1, 512)) == P.EINVAL
    assert client.write(0, b"x" * 100) == P.EINVAL
    assert client.error_of(client.request(P.CMD_FLUSH)) == 0
    assert client.error_of(client.request(P.CMD_CACHE, 0, size)) == 0
    assert client.write(512, b"y" * 512, flags=P.CMD_FLAG_FUA) == 0
    assert client.read(512, 512) == b"y" * 512


def test_structured_reads_holes_and_errors(client: Client, disks: list[shmdisk.Disk]) -> None:
    """Structured READ: one final data chunk (zeros for unmapped pages), or an error chunk."""
    flags = client.start(structured=True)
    assert flags & P.FLAG_SEND_DF
    disk = disks[0]
    page = disk.page_size
    disk.write_at(page, b"d" * 1024)
    handle = client.request(P.CMD_READ, page, 1024, P.CMD_FLAG_DF)
    [(cflags, kind, payload)] = client.chunks(handle)
    assert (cflags, kind) == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA)
    assert payload == struct.pack(">Q", page) + b"d" * 1024
    handle = client.request(P.CMD_READ, 2 * page, 1024)
    [(cflags, kind, payload)] = client.chunks(handle)
    assert kind == P.REPLY_TYPE_OFFSET_DATA and payload == struct.pack(">Q", 2 * page) + bytes(1024)
    handle = client.request(P.CMD_READ, 64 * 512, 512)
    [(cflags, kind, payload)] = client.chunks(handle)
    assert cflags == P.REPLY_FLAG_DONE and kind == P.REPLY_TYPE_ERROR
    error, msg_len = P.ERROR_PAYLOAD.unpack_from(payload)
    assert error == P.EINVAL and len(payload) == 6 + msg_len
    handle = client.request(P.CMD_READ, 0, 0)
    assert client.chunks(handle) == [(P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, b"")]
    assert client.read(page - 512, 2048) == bytes(512) + b"d" * 1024 + bytes(512)


def block_status(client: Client, offset: int, length: int, flags: int = 0) -> list[tuple[int, int]]:
    handle = client.request(P.CMD_BLOCK_STATUS, offset, length, flags)
    [(cflags, kind, payload)] = client.chunks(handle)
    assert cflags == P.REPLY_FLAG_DONE and kind == P.REPLY_TYPE_BLOCK_STATUS
    (context,) = struct.unpack_from(">I", payload)
    assert context == P.META_BASE_ALLOCATION_ID
    return [struct.unpack_from(">II", payload, 4 + 8 * i) for i in range((len(payload) - 4) // 8)]


def test_block_status_follows_the_page_map(client: Client, disks: list[shmdisk.Disk]) -> None:
    """base:allocation extents are the disk's extents; holes read as zero; REQ_ONE gives one."""
    disk = disks[0]
    page = disk.page_size
    size = 64 * 512
    disk.write_at(page + 100, b"a")
    disk.write_at(3 * page, b"b" * page)
    client.start(structured=True, meta=True)
    hole = P.STATE_HOLE | P.STATE_ZERO
    want = []
    for e in disk.extents():
        want.append((e.n_sectors * 512, 0 if e.mapped else hole))
    assert block_status(client, 0, size) == want
    assert want[0] == (page, hole) and want[1] == (page, 0)
    assert block_status(client, 0, size, P.CMD_FLAG_REQ_ONE) == [(page, hole)]
    assert block_status(client, 512, 1024, P.CMD_FLAG_REQ_ONE) == [(1024, hole)]
    assert block_status(client, 0, page + 512) == [(page, hole), (512, 0)]
    handle = client.request(P.CMD_BLOCK_STATUS, size - 512, 1024)
    assert client.error_of(handle) == P.EINVAL


def test_meta_context_negotiation(client: Client, disks: list[shmdisk.Disk]) -> None:
    """LIST/SET_META_CONTEXT: base:allocation only, after structured replies, per export."""
    client.greet()
    name = disks[0].name
    assert client.set_meta(name, [P.META_BASE_ALLOCATION])[-1][0] == P.REP_ERR_INVALID
    client.option(P.OPT_STRUCTURED_REPLY)
    assert client.reply(P.OPT_STRUCTURED_REPLY)[0] == P.REP_ACK
    for queries in ([], ["base:"], ["base:allocation", "qemu:dirty-bitmap:x"]):
        replies = client.set_meta(name, queries, option=P.OPT_LIST_META_CONTEXT)
        assert replies == [
            (P.REP_META_CONTEXT, b"\0\0\0\0" + b"base:allocation"),
            (P.REP_ACK, b""),
        ]
    assert client.set_meta(name, ["x-other:thing"]) == [(P.REP_ACK, b"")]
    assert client.set_meta(name, ["base:"]) == [(P.REP_ACK, b"")]
    assert client.set_meta("nope", [P.META_BASE_ALLOCATION])[-1][0] == P.REP_ERR_UNKNOWN
    client.option(P.OPT_SET_META_CONTEXT, b"\0\0\0\x09abc")
    assert client.reply(P.OPT_SET_META_CONTEXT)[0] == P.REP_ERR_INVALID
    replies = client.set_meta(name, [P.META_BASE_ALLOCATION])
    assert replies[0] == (P.REP_META_CONTEXT, b"\0\0\0\x01base:allocation")
    # Selected for the first export, but GO picks the second: no block status there.
    assert client.go(disks[1].name)[-1][0] == P.REP_ACK
    client.structured = True
    assert client.error_of(client.request(P.CMD_BLOCK_STATUS, 0, 4096)) == P.EINVAL


def test_trim_and_write_zeroes(client: Client, disks: list[shmdisk.Disk]) -> None:
    """TRIM frees pages; WRITE_ZEROES zeros exactly its range, NO_HOLE keeps pages mapped."""
    disk = disks[0]
    page = disk.page_size
    size = 64 * 512
    disk.write_at(0, b"\xff" * size)
    client.start()
    mapped = disk.mapped_pages()
    assert client.error_of(client.request(P.CMD_TRIM, 0, page)) == 0
    assert disk.mapped_pages() == mapped - 1
    assert client.read(0, page) == bytes(page)
    flags = P.CMD_FLAG_NO_HOLE
    assert client.error_of(client.request(P.CMD_WRITE_ZEROES, page, page, flags)) == 0
    assert disk.mapped_pages() == mapped - 1
    flags = P.CMD_FLAG_FAST_ZERO
    assert client.error_of(client.request(P.CMD_WRITE_ZEROES, 2 * page, page, flags)) == 0
    assert disk.mapped_pages() == mapped - 2
    expect = bytearray(b"\xff" * size)
    expect[: 3 * page] = bytes(3 * page)
    got = bytearray(size)
    disk.read(0, got)
    assert got == expect


def test_unaligned_trim_and_zero_without_block_size_promise(
    client: Client, disks: list[shmdisk.Disk]
) -> None:
    """A client that never agreed to block sizes may zero any byte range, exactly."""
    disk = disks[0]
    size = 64 * 512
    disk.write_at(0, b"\xee" * size)
    client.greet()
    assert client.go()[-1][0] == P.REP_ACK  # no NBD_INFO_BLOCK_SIZE request: default sizes
    assert client.error_of(client.request(P.CMD_WRITE_ZEROES, 300, 2000)) == 0
    assert client.error_of(client.request(P.CMD_WRITE_ZEROES, 5000, 10)) == 0
    assert client.error_of(client.request(P.CMD_TRIM, 10000, 100)) == 0  # a hint: no change
    expect = bytearray(b"\xee" * size)
    expect[300:2300] = bytes(2000)
    expect[5000:5010] = bytes(10)
    got = bytearray(size)
    disk.read(0, got)
    assert got == expect
    assert client.read(1, 3000) == bytes(expect[1:3001])


def test_read_only_export_refuses_writes(disks: list[shmdisk.Disk], sockdir: str) -> None:
    """--read-only: READ_ONLY flag, EPERM for WRITE/TRIM/WRITE_ZEROES, data untouched."""
    disks[0].write_at(0, b"keep" * 128)
    names = [d.name for d in disks]
    with NBDServer(names, socket_path=os.path.join(sockdir, "ro"), read_only=True) as srv:
        c = Client(str(srv.address))
        try:
            flags = c.start(structured=True)
            assert flags & P.FLAG_READ_ONLY
            assert not flags & (P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES)
            assert c.write(0, b"x" * 512) == P.EPERM
            assert c.error_of(c.request(P.CMD_TRIM, 0, 512)) == P.EPERM
            assert c.error_of(c.request(P.CMD_WRITE_ZEROES, 0, 512)) == P.EPERM
            assert c.read(0, 512) == b"keep" * 128
        finally:
            c.close()
    got = bytearray(512)
    disks[0].read(0, got)
    assert got == b"keep" * 128


def test_several_exports_by_name(server: NBDServer, disks: list[shmdisk.Disk]) -> None:
    """Each export name reaches its own disk; the empty name is the first disk."""
    clients = [Client(str(server.address)) for _ in range(3)]
    try:
        clients[0].start(disks[0].name)
        clients[1].start(disks[1].name)
        clients[2].start("")
        assert clients[0].write(0, b"A" * 512) == 0
        assert clients[1].write(0, b"B" * 4096) == 0
        assert clients[2].read(0, 512) == b"A" * 512
        assert clients[1].read(0, 4096) == b"B" * 4096
        assert clients[1].error_of(clients[1].request(P.CMD_READ, 0, 512)) == P.EINVAL
        got = bytearray(4096)
        disks[1].read(0, got)
        assert got == b"B" * 4096
    finally:
        for c in clients:
            c.close()


BAD_CLIENTS = [
    "garbage greeting reply",
    "bad client flags",
    "bad option magic",
    "huge option",
    "truncated option",
    "garbage request",
    "truncated request",
    "truncated write payload",
    "oversize write",
]


def misbehave(c: Client, misdeed: str) -> None:
    """Do one of the BAD_CLIENTS things to the server."""
    if misdeed == "garbage greeting reply":
        c.sock.sendall(os.urandom(64))
        return
    if misdeed == "bad client flags":
        c.sock.sendall(struct.pack(">I", 0x80))
        return
    if misdeed in ("bad option magic", "huge option", "truncated option"):
        c.greet()
        if misdeed == "bad option magic":
            c.sock.sendall(os.urandom(32))
        elif misdeed == "huge option":
            c.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 1 << 30))
        else:
            c.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_GO, 100) + b"abc")
        return
    c.start()
    if misdeed == "garbage request":
        c.sock.sendall(os.urandom(28))
    elif misdeed == "truncated request":
        c.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 1, 0, 512)[:13])
    elif misdeed == "truncated write payload":
        c.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 4096) + b"z" * 1000)
    elif misdeed == "oversize write":
        # Too big even to read and drop (up to twice the maximum is skipped; see below).
        c.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 0xFFFFFE00))
    else:
        raise AssertionError(misdeed)


@pytest.mark.parametrize("misdeed", BAD_CLIENTS)
def test_bad_client_does_not_disturb_a_good_one(
    server: NBDServer, disks: list[shmdisk.Disk], misdeed: str
) -> None:
    """Garbage, truncation or oversize requests cost only the offender's connection."""
    good = Client(str(server.address))
    bad = Client(str(server.address))
    try:
        good.start(structured=True)
        assert good.write(0, b"1" * 512) == 0
        misbehave(bad, misdeed)
        if misdeed.startswith("truncated"):
            bad.sock.shutdown(socket.SHUT_WR)  # the rest never comes
        assert bad.closed_by_server()
        assert good.write(512, b"2" * 512) == 0
        assert good.read(0, 1024) == b"1" * 512 + b"2" * 512
        fresh = Client(str(server.address))
        try:
            fresh.start()
            assert fresh.read(0, 1024) == b"1" * 512 + b"2" * 512
        finally:
            fresh.close()
    finally:
        good.close()
        bad.close()
    got = bytearray(1024)
    disks[0].read(0, got)
    assert got == b"1" * 512 + b"2" * 512


def test_abort_is_acknowledged(client: Client) -> None:
    """NBD_OPT_ABORT gets an ACK, then the server hangs up."""
    client.greet()
    client.option(P.OPT_ABORT)
    assert client.reply(P.OPT_ABORT) == (P.REP_ACK, b"")
    assert client.closed_by_server()


def test_many_clients_at_once(server: NBDServer, disks: list[shmdisk.Disk]) -> None:
    """Eight connections write and read their own sectors concurrently, all land."""
    failures: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            c = Client(str(server.address))
            try:
                c.start(structured=i % 2 == 0)
                mine = bytes([i + 1]) * 512
                for _ in range(20):
                    assert c.write(i * 1024, mine * 2) == 0
                    assert c.read(i * 1024, 1024) == mine * 2
            finally:
                c.close()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads)
    assert not failures, failures
    got = bytearray(8 * 1024)
    disks[0].read(0, got)
    assert got == b"".join(bytes([i + 1]) * 1024 for i in range(8))


def test_stop_ends_connections_and_removes_the_socket(
    disks: list[shmdisk.Disk], sockdir: str
) -> None:
    """stop() hangs up on connected clients, refuses new ones, and unlinks the socket file."""
    path = os.path.join(sockdir, "stop")
    srv = NBDServer(disks, socket_path=path).start()
    c = Client(path)
    try:
        c.start()
        assert os.path.exists(path)
        srv.stop()
        assert c.closed_by_server()
        assert not os.path.exists(path)
        with pytest.raises(OSError):
            Client(path)
    finally:
        c.close()
        srv.stop()


def test_stale_socket_is_replaced_but_a_live_one_is_not(
    disks: list[shmdisk.Disk], sockdir: str
) -> None:
    """A socket file left by a dead server is reused; a live server's socket is refused."""
    path = os.path.join(sockdir, "stale")
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()
    with NBDServer(disks, socket_path=path):
        with pytest.raises(FileExistsError):
            NBDServer(disks, socket_path=path).start()
        c = Client(path)
        c.start()
        c.close()
    assert not os.path.exists(path)


def test_tcp_loopback(disks: list[shmdisk.Disk], caplog: pytest.LogCaptureFixture) -> None:
    """Plain TCP on 127.0.0.1 (tls="off", with a warning) serves the same protocol."""
    with NBDServer(disks, host="127.0.0.1", port=0, tls="off") as srv:
        assert "plain TCP" in caplog.text and "any local user can" in caplog.text
        address = srv.address
        assert isinstance(address, tuple)
        host, port = address
        assert host == "127.0.0.1" and port > 0
        assert srv.uri() == f"nbd://127.0.0.1:{port}/{disks[0].name}"
        s = socket.create_connection((host, port), timeout=TIMEOUT)
        c = Client.__new__(Client)
        c.sock, c.structured = s, False
        try:
            c.start()
            assert c.write(0, b"t" * 512) == 0
            assert c.read(0, 512) == b"t" * 512
        finally:
            c.close()


def test_block_status_stops_at_the_extent_limit(
    client: Client, disks: list[shmdisk.Disk], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fragmented range gets a short reply (at most the limit); asking on continues it."""
    monkeypatch.setattr(_handlers, "MAX_EXTENTS", 3)
    disk = disks[0]
    page = disk.page_size
    for p in range(0, 8, 2):
        disk.write_at(p * page, b"m")
    client.start(structured=True, meta=True)
    hole = P.STATE_HOLE | P.STATE_ZERO
    assert block_status(client, 0, 8 * page) == [(page, 0), (page, hole), (page, 0)]
    assert block_status(client, 3 * page, 5 * page) == [(page, hole), (page, 0), (page, hole)]


def test_destroyed_disk_gives_eio_not_a_crash(client: Client, disks: list[shmdisk.Disk]) -> None:
    """Requests on a disk destroyed under the server fail with EIO; the server stays up."""
    client.start(disks[1].name, structured=True)
    assert client.write(0, b"q" * 4096) == 0
    shmdisk.destroy(disks[1].name)
    assert client.error_of(client.request(P.CMD_READ, 0, 4096)) == P.EIO
    assert client.write(0, b"q" * 4096) == P.EIO
    assert client.error_of(client.request(P.CMD_FLUSH)) == P.EIO


def test_resize_is_seen_by_new_connections(server: NBDServer, disks: list[shmdisk.Disk]) -> None:
    """A connection gets the disk's size at the time of its handshake."""
    disks[0].resize(128)
    c = Client(str(server.address))
    try:
        c.greet()
        assert info_export(c.go())[0] == 128 * 512
        assert c.write(127 * 512, b"e" * 512) == 0
    finally:
        c.close()


def test_stop_cuts_off_a_client_that_never_reads(disks: list[shmdisk.Disk], sockdir: str) -> None:
    """stop() returns even when a client pipelines reads and never takes the replies."""
    path = os.path.join(sockdir, "stuck")
    srv = NBDServer(disks, socket_path=path).start()
    c = Client(path)
    try:
        c.start()
        c.sock.setblocking(False)
        sent = 0
        request = P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 7, 0, 64 * 512)
        try:
            for _ in range(4096):
                c.sock.send(request)
                sent += 1
        except BlockingIOError:
            pass
        assert sent > 0
        started = time.monotonic()
        srv.stop(timeout=1.0)
        assert time.monotonic() - started < 5.0
        assert not os.path.exists(path)
    finally:
        c.close()
        srv.stop()


def test_sequential_connections_do_not_pile_up_descriptors(server: NBDServer) -> None:
    """Thirty connections one after another, each writing, leave the fd count where it was."""

    def one_connection() -> None:
        c = Client(str(server.address))
        try:
            c.start()
            assert c.write(0, b"w" * 512) == 0
            c.request(P.CMD_DISC)
            assert c.closed_by_server()
        finally:
            c.close()

    one_connection()
    time.sleep(0.05)  # let the server's side of the connection finish closing
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(30):
        one_connection()
    time.sleep(0.05)
    assert len(os.listdir("/proc/self/fd")) <= before + 2


@pytest.mark.parametrize("structured", [False, True])
def test_pipelined_burst_of_mixed_requests(
    client: Client, disks: list[shmdisk.Disk], structured: bool
) -> None:
    """300 requests sent in one go (writes, reads, flushes, a bad one) all get right replies."""
    import random

    rng = random.Random(7)
    size = 64 * 512
    model = bytearray(size)
    client.start(structured=structured)
    batch = bytearray()
    expect: dict[int, tuple[str, bytes | int]] = {}
    for i in range(300):
        handle = i + 1
        kind = rng.choice(["write", "write", "read", "read", "flush", "bad"])
        if kind == "write":
            n = rng.choice([512, 1024, 4096, 8192, 16384])
            off = rng.randrange(0, size - n + 1, 512)
            data = rng.randbytes(n)
            model[off : off + n] = data
            batch += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, handle, off, n) + data
            expect[handle] = ("status", 0)
        elif kind == "read":
            n = rng.choice([512, 4096, 16384, 32768])
            off = rng.randrange(0, size - n + 1, 512)
            batch += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, handle, off, n)
            expect[handle] = ("data", bytes(model[off : off + n]))
        elif kind == "flush":
            batch += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, handle, 0, 0)
            expect[handle] = ("status", 0)
        else:
            batch += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, handle, size, 512)
            expect[handle] = ("status", P.EINVAL)
    sender = threading.Thread(target=client.sock.sendall, args=(bytes(batch),))
    sender.start()
    try:
        for _ in range(len(expect)):
            magic = struct.unpack(">I", client.recv(4))[0]
            if magic == P.SIMPLE_REPLY_MAGIC:
                error, handle = struct.unpack(">IQ", client.recv(12))
                kind, want = expect.pop(handle)
                if kind == "data":
                    assert error == 0 and client.recv(len(want)) == want  # type: ignore[arg-type]
                else:
                    assert error == want
                continue
            flags, ctype, handle, length = struct.unpack(">HHQI", client.recv(16))
            payload = client.recv(length)
            assert flags & P.REPLY_FLAG_DONE
            kind, want = expect.pop(handle)
            if ctype == P.REPLY_TYPE_OFFSET_DATA:
                assert kind == "data" and payload[8:] == want
            else:
                assert ctype == P.REPLY_TYPE_ERROR and struct.unpack_from(">I", payload)[0] == want
    finally:
        sender.join(TIMEOUT)
    assert not expect
    got = bytearray(size)
    disks[0].read(0, got)
    assert got == model


def test_destroyed_and_recreated_disk_is_served_again(sockdir: str) -> None:
    """A disk exported by name and re-created after a destroy reaches new connections."""
    name = new_name("nbdre")
    shmdisk.create(name, 64).disconnect()
    try:
        with NBDServer([name], socket_path=os.path.join(sockdir, "re")) as srv:
            old = Client(str(srv.address))
            try:
                old.start()
                shmdisk.destroy(name)
                assert old.error_of(old.request(P.CMD_READ, 0, 512)) == P.EIO
                c = Client(str(srv.address))
                c.greet()
                assert [k for k, _ in c.go(name)] == [P.REP_ERR_UNKNOWN]
                c.close()
                with shmdisk.create(name, 128) as again:
                    again.write(0, b"N" * 512)
                c = Client(str(srv.address))
                try:
                    c.greet()
                    replies = c.go(name)
                    assert info_export(replies)[0] == 128 * 512
                    assert c.read(0, 512) == b"N" * 512
                finally:
                    c.close()
            finally:
                old.close()
    finally:
        shmdisk.destroy(name)


def test_half_closed_client_still_gets_every_reply(client: Client) -> None:
    """Requests sent just before the client shuts its sending side all get their replies."""
    client.start()
    burst = b"".join(
        P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, i, i * 512, 512) + bytes([i]) * 512
        for i in range(1, 11)
    )
    burst += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 99, 512, 1024)
    client.sock.sendall(burst)
    client.sock.shutdown(socket.SHUT_WR)
    for i in range(1, 11):
        assert client.simple(i) == (0, b"")
    assert client.simple(99, 1024) == (0, b"\x01" * 512 + b"\x02" * 512)
    assert client.closed_by_server()


# --- requests of one connection served in parallel ---------------------------------------------


def recv_reply(c: Client, payloads: dict[int, int]) -> tuple[int, int, bytes]:
    """The next simple reply: (handle, error, data); ``payloads`` says which handles have data."""
    magic, error, handle = P.SIMPLE_REPLY.unpack(c.recv(P.SIMPLE_REPLY.size))
    assert magic == P.SIMPLE_REPLY_MAGIC
    n = payloads.get(handle, 0) if error == 0 else 0
    return handle, error, c.recv(n)


def held_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
    method: str,
    release: threading.Event | None = None,
    delay: float = 0.0,
) -> list[bool]:
    """Make ``Disk.<method>`` (read_at or write_at) act, for 64 KiB or more, as if another
    process held the pages: ``wait=False`` raises WouldBlockError, ``wait=True`` waits for
    ``release`` (or ``delay`` seconds). Returns the ``wait`` of every such call, in order."""
    original = getattr(shmdisk.Disk, method)
    waits: list[bool] = []

    def held(self: shmdisk.Disk, offset: int, buf: Any, *, wait: bool = True) -> None:
        if len(memoryview(buf)) >= 64 * 1024:
            waits.append(wait)
            if not wait:
                raise shmdisk.WouldBlockError("the pages are locked elsewhere")
            if release is not None:
                assert release.wait(TIMEOUT)
            time.sleep(delay)
        original(self, offset, buf, wait=wait)

    monkeypatch.setattr(shmdisk.Disk, method, held)
    return waits


@pytest.fixture
def wide(sockdir: str) -> Iterator[tuple[shmdisk.Disk, Client]]:
    """A 1 MiB disk, and a client in transmission with simple replies and no block sizes."""
    name = new_name("nbdwide")
    disk = shmdisk.create(name, 2048)
    try:
        with NBDServer([disk], socket_path=os.path.join(sockdir, "wide")) as srv:
            c = Client(str(srv.address))
            c.greet()
            assert c.go()[-1][0] == P.REP_ACK
            yield disk, c
            c.close()
    finally:
        disk.disconnect()
        shmdisk.destroy(name)


def test_flush_waits_for_the_writes_received_before_it(
    wide: tuple[shmdisk.Disk, Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """WRITE (its pages held elsewhere), FLUSH, READ in one burst: the READ is answered at
    once, the FLUSH only after the WRITE before it has completed."""
    disk, c = wide
    release = threading.Event()
    waits = held_elsewhere(monkeypatch, "write_at", release)
    burst = P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 65536) + b"W" * 65536
    burst += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, 2, 0, 0)
    burst += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 3, 65536, 512)
    c.sock.sendall(burst)
    assert recv_reply(c, {3: 512}) == (3, 0, bytes(512))
    time.sleep(0.2)
    c.sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        c.sock.recv(1)  # neither the WRITE nor the FLUSH is answered while the pages are held
    c.sock.setblocking(True)
    c.sock.settimeout(TIMEOUT)
    release.set()
    assert [recv_reply(c, {})[:2] for _ in range(2)] == [(1, 0), (2, 0)]
    assert waits == [False, True]
    got = bytearray(65536)
    disk.read_at(0, got)
    assert got == b"W" * 65536


def test_disc_answers_a_flush_still_waiting_for_writes_first(
    wide: tuple[shmdisk.Disk, Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """WRITE (pages held elsewhere), FLUSH, DISC: once the pages come free, the WRITE and then
    the FLUSH are answered before the server hangs up."""
    _, c = wide
    release = threading.Event()
    held_elsewhere(monkeypatch, "write_at", release)
    flush = shmdisk.Disk.flush

    def slow_flush(self: shmdisk.Disk) -> None:
        time.sleep(0.3)  # the worker is still serving the FLUSH when the writes are done
        flush(self)

    monkeypatch.setattr(shmdisk.Disk, "flush", slow_flush)
    burst = P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 65536) + b"D" * 65536
    burst += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_FLUSH, 2, 0, 0)
    burst += P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_DISC, 3, 0, 0)
    c.sock.sendall(burst)
    time.sleep(0.1)
    release.set()
    assert [recv_reply(c, {})[:2] for _ in range(2)] == [(1, 0), (2, 0)]
    assert c.closed_by_server()


def test_a_request_the_disk_would_block_on_waits_on_a_worker(
    wide: tuple[shmdisk.Disk, Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose pages another process holds (the disk says WouldBlockError to a
    wait=False call) is served by a worker that waits, while later requests go on."""
    disk, c = wide
    disk.write_at(0, b"L" * 4096 + b"f" * 4096)
    original = shmdisk.Disk.read_at
    held = threading.Event()
    waits: list[bool] = []

    def read_at(self: shmdisk.Disk, offset: int, buf: Any, *, wait: bool = True) -> None:
        if offset == 0:
            waits.append(wait)
            if not wait:
                raise shmdisk.WouldBlockError("pages 0-0 are locked elsewhere")
            assert held.wait(TIMEOUT)  # "the other process" lets go
        original(self, offset, buf, wait=wait)

    monkeypatch.setattr(shmdisk.Disk, "read_at", read_at)
    first = P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 1, 0, 4096)
    second = P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 2, 4096, 4096)
    c.sock.sendall(first + second)
    sizes = {1: 4096, 2: 4096}
    assert recv_reply(c, sizes) == (2, 0, b"f" * 4096)
    held.set()
    assert recv_reply(c, sizes) == (1, 0, b"L" * 4096)
    assert waits == [False, True]


def test_requests_in_flight_stay_within_the_budget(
    wide: tuple[shmdisk.Disk, Client], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client pipelining more waiting writes than the budget allows: the server stops
    reading rather than holding more payloads; every write still lands and is answered."""
    disk, c = wide
    monkeypatch.setattr(_transmission, "BUDGET", 256 * 1024)
    held_elsewhere(monkeypatch, "write_at", delay=0.02)
    live = peak = 0
    lock = threading.Lock()
    take, give = _buffers.BufferPool.take, _buffers.BufferPool.give

    def counting_take(self: _buffers.BufferPool) -> _buffers.Buffer:
        nonlocal live, peak
        with lock:
            live += 1
            peak = max(peak, live)
        return take(self)

    def counting_give(self: _buffers.BufferPool, buf: _buffers.Buffer) -> None:
        nonlocal live
        with lock:
            live -= 1
        give(self, buf)

    monkeypatch.setattr(_buffers.BufferPool, "take", counting_take)
    monkeypatch.setattr(_buffers.BufferPool, "give", counting_give)
    n, size = 16, 65536
    burst = b"".join(
        P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, i, i * size, size) + bytes([i + 1]) * size
        for i in range(n)
    )
    sender = threading.Thread(target=c.sock.sendall, args=(burst,))
    sender.start()
    answered = {recv_reply(c, {})[:2] for _ in range(n)}
    sender.join(TIMEOUT)
    assert answered == {(i, 0) for i in range(n)}
    # The budget holds 4 payloads with the workers, plus the one being received.
    assert 4 <= peak <= 256 * 1024 // size + 1
    got = bytearray(n * size)
    disk.read_at(0, got)
    assert got == b"".join(bytes([i + 1]) * size for i in range(n))


# --- what a connection may do: the peer and the access policy ----------------------------------


def test_access_policy_sees_the_peer_and_decides_per_export(
    disks: list[shmdisk.Disk], sockdir: str
) -> None:
    """One policy decides for LIST, INFO/GO and EXPORT_NAME alike: read-only is enforced,
    refused exports are hidden from LIST and refused with ERR_POLICY (or a hang-up)."""
    seen: list[tuple[str, Peer]] = []
    ro, hidden = disks[0].name, disks[1].name

    def policy(export: str, peer: Peer) -> Access:
        seen.append((export, peer))
        return Access.READ_ONLY if export == ro else Access.REFUSED

    with NBDServer(disks, socket_path=os.path.join(sockdir, "acl"), access=policy) as srv:
        c = Client(str(srv.address))
        try:
            c.greet()
            c.option(P.OPT_LIST)
            replies = c.replies(P.OPT_LIST)
            assert [d[4:].decode() for _, d in replies[:-1]] == [ro]
            assert [k for k, _ in c.go(hidden)] == [P.REP_ERR_POLICY]
            replies = c.go(ro)
            assert replies[-1][0] == P.REP_ACK and info_export(replies)[1] & P.FLAG_READ_ONLY
            assert c.write(0, b"x" * 512) == P.EPERM
            assert c.read(0, 512) == bytes(512)
        finally:
            c.close()
        c = Client(str(srv.address))
        try:
            c.greet()
            c.option(P.OPT_EXPORT_NAME, hidden.encode())
            assert c.closed_by_server()
        finally:
            c.close()
    peer = seen[0][1]
    assert peer.transport is Transport.UNIX and not peer.activated and peer.address is None
    assert peer.credentials is not None and peer.credentials.pid == os.getpid()
    assert peer.credentials.uid == os.getuid()
    assert {e for e, _ in seen} == {ro, hidden}


def test_tcp_peer_has_an_address_and_no_credentials(disks: list[shmdisk.Disk]) -> None:
    """Over TCP the peer is named by host:port; the kernel vouches for no process there."""
    seen: list[Peer] = []

    def policy(export: str, peer: Peer) -> Access:
        seen.append(peer)
        return Access.READ_WRITE

    with NBDServer(disks, host="127.0.0.1", port=0, access=policy, tls="off") as srv:
        address = srv.address
        assert isinstance(address, tuple)
        s = socket.create_connection(address, timeout=TIMEOUT)
        c = Client.__new__(Client)
        c.sock, c.structured = s, False
        try:
            c.start()
            local = s.getsockname()
        finally:
            c.close()
    assert seen and seen[0].transport is Transport.TCP and seen[0].credentials is None
    assert seen[0].address == f"{local[0]}:{local[1]}"


# --- protocol points found by comparing with nbdkit and qemu-nbd ------------------------------


def test_stop_answers_every_request_already_received(
    disks: list[shmdisk.Disk], sockdir: str
) -> None:
    """On stop (SIGTERM), every request the server received gets a reply before it hangs up:
    served, or ESHUTDOWN for those not started, so a stop is quick even with gigabytes of
    reads queued (serving them all would outlast the stop's timeout and leave them unanswered).
    """
    path = os.path.join(sockdir, "term")
    srv = NBDServer([disks[1]], socket_path=path).start()
    c = Client(path)
    n, size = 50_000, 16 * 4096  # 3 GiB of reads
    sent = 0

    def send_requests() -> None:
        nonlocal sent
        try:
            for i in range(n):
                c.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i, 0, size))
                sent += 1  # all of it is in the server's socket now, so it was received
        except OSError:
            pass  # the server shut its receiving side: the rest is refused

    try:
        c.start()
        sender = threading.Thread(target=send_requests)
        sender.start()
        time.sleep(0.3)
        stopper = threading.Thread(target=srv.stop, kwargs={"timeout": 1.0})
        stopper.start()
        errors: dict[int, int] = {}
        try:
            while True:
                magic, error, handle = P.SIMPLE_REPLY.unpack(c.recv(P.SIMPLE_REPLY.size))
                assert magic == P.SIMPLE_REPLY_MAGIC and handle not in errors
                errors[handle] = error
                if error == 0:
                    assert c.recv(size) == bytes(size)
        except EOFError:
            pass  # the server hung up after its last reply
        sender.join(TIMEOUT)
        stopper.join(TIMEOUT)
        assert 0 < sent < n
        assert set(errors) == set(range(sent)), f"{sent - len(errors)} requests got no reply"
        assert set(errors.values()) == {0, P.ESHUTDOWN}
    finally:
        c.close()
        srv.stop()


def test_unaligned_trim_discards_the_whole_pages_inside(
    client: Client, disks: list[shmdisk.Disk]
) -> None:
    """TRIM is a hint: even from a client held to block sizes, an unaligned TRIM is accepted
    and gives back exactly the whole pages inside it, leaving the ragged ends alone."""
    disk = disks[0]
    page = disk.page_size
    disk.write_at(0, b"\xdd" * (4 * page))
    client.start()  # asks for block sizes in GO: held to 512-byte alignment
    assert client.error_of(client.request(P.CMD_TRIM, 100, 3 * page - 200)) == 0
    assert [e.mapped for e in disk.extents(0, 4 * page // 512)] == [True, False, True]
    assert disk.mapped_pages() == 3  # pages 0, 2, 3: page 1 was the only whole page inside
    expect = b"\xdd" * page + bytes(page) + b"\xdd" * (2 * page)
    assert client.read(0, 4 * page) == expect
    # A TRIM with no whole page inside changes nothing and still succeeds.
    assert client.error_of(client.request(P.CMD_TRIM, 2 * page + 1, page - 2)) == 0
    assert client.read(0, 4 * page) == expect


@pytest.fixture
def big_disk() -> Iterator[shmdisk.Disk]:
    """64 MiB of 512-byte sectors: room for requests past the 32 MiB maximum (sparse: free)."""
    name = new_name("nbdbig")
    d = shmdisk.create(name, 2 * P.MAX_REQUEST // 512)
    yield d
    d.disconnect()
    shmdisk.destroy(name)


@pytest.fixture
def big_client(big_disk: shmdisk.Disk, sockdir: str) -> Iterator[Client]:
    with NBDServer([big_disk], socket_path=os.path.join(sockdir, "big")) as srv:
        c = Client(str(srv.address))
        yield c
        c.close()


def test_cache_beyond_the_maximum_request_is_accepted(big_client: Client) -> None:
    """CACHE carries no payload, so a length past the 32 MiB maximum is fine (it does nothing)."""
    big_client.start(structured=True)
    handle = big_client.request(P.CMD_CACHE, 0, P.MAX_REQUEST + 512)
    assert big_client.error_of(handle) == 0
    assert big_client.error_of(big_client.request(P.CMD_CACHE, 512, 2 * P.MAX_REQUEST)) == P.EINVAL


def test_structured_read_beyond_the_maximum_is_eoverflow(big_client: Client) -> None:
    """A structured READ past the maximum gets EOVERFLOW, as the protocol names it."""
    big_client.start(structured=True)
    handle = big_client.request(P.CMD_READ, 0, P.MAX_REQUEST + 512)
    [(flags, kind, payload)] = big_client.chunks(handle)
    assert kind == P.REPLY_TYPE_ERROR and flags & P.REPLY_FLAG_DONE
    assert struct.unpack_from(">I", payload)[0] == P.EOVERFLOW
    assert big_client.read(0, 512) == bytes(512)


def test_simple_read_beyond_the_maximum_is_einval(big_client: Client) -> None:
    """Without structured replies there is no EOVERFLOW to say: EINVAL, no payload."""
    big_client.start()
    handle = big_client.request(P.CMD_READ, 0, P.MAX_REQUEST + 512)
    assert big_client.simple(handle) == (P.EINVAL, b"")
    assert big_client.read(0, 512) == bytes(512)


def test_write_beyond_the_maximum_is_refused_and_the_connection_kept(
    big_client: Client, big_disk: shmdisk.Disk
) -> None:
    """A WRITE over the maximum is answered EINVAL, its payload read and dropped, and the
    connection goes on (as nbdkit does); the disk is untouched."""
    big_client.start(structured=True)
    length = P.MAX_REQUEST + 4096
    header = P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 77, 0, length)
    sender = threading.Thread(target=big_client.sock.sendall, args=(header + b"w" * length,))
    sender.start()
    assert big_client.error_of(77) == P.EINVAL
    sender.join(TIMEOUT)
    assert big_client.write(0, b"k" * 512) == 0
    assert big_client.read(0, 1024) == b"k" * 512 + bytes(512)
    assert big_disk.mapped_pages() == 1


def test_trim_past_the_end_after_a_live_shrink_is_einval(
    client: Client, disks: list[shmdisk.Disk]
) -> None:
    """The export size is fixed at the handshake; after the disk shrank, a TRIM past its new
    end is EINVAL (out of range), like a READ there, while a WRITE there is ENOSPC."""
    disk = disks[0]
    page = disk.page_size
    disk.write_at(0, b"s" * (64 * 512))
    client.start(structured=True)
    disk.resize(page // 512)  # one page left
    assert client.error_of(client.request(P.CMD_TRIM, page, page)) == P.EINVAL
    assert client.error_of(client.request(P.CMD_TRIM, page, 512)) == P.EINVAL
    assert client.error_of(client.request(P.CMD_READ, page, 512)) == P.EINVAL
    assert client.write(page, b"x" * 512) == P.ENOSPC
    assert client.error_of(client.request(P.CMD_WRITE_ZEROES, page, 512)) == P.ENOSPC
    assert client.error_of(client.request(P.CMD_TRIM, 0, page)) == 0
    assert disk.mapped_pages() == 0


def test_open_connections_keep_their_size_after_a_resize(
    server: NBDServer, disks: list[shmdisk.Disk]
) -> None:
    """What the README promises: an open connection keeps the size of its handshake (after a
    grow, the new space needs a new connection); new connections see the new size."""
    disk = disks[0]
    old = Client(str(server.address))
    try:
        old.start()
        disk.resize(128)
        assert old.error_of(old.request(P.CMD_READ, 64 * 512, 512)) == P.EINVAL
        assert old.write(64 * 512, b"g" * 512) == P.ENOSPC
        assert old.write(63 * 512, b"o" * 512) == 0
        new = Client(str(server.address))
        try:
            new.greet()
            assert info_export(new.go())[0] == 128 * 512
            assert new.write(127 * 512, b"n" * 512) == 0
            assert new.read(63 * 512, 512) == b"o" * 512
        finally:
            new.close()
    finally:
        old.close()


def test_a_big_unwritten_structured_read_is_one_hole_chunk(
    big_client: Client, big_disk: shmdisk.Disk
) -> None:
    """A structured READ of 64 KiB or more over unwritten pages is answered with one hole
    chunk; as soon as one page in it holds data, it is one data chunk with the bytes."""
    c = big_client
    c.start(structured=True)
    handle = c.request(P.CMD_READ, 65536, 131072)
    assert c.chunks(handle) == [
        (P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_HOLE, struct.pack(">QI", 65536, 131072))
    ]
    assert c.read(65536, 131072) == bytes(131072)
    big_disk.write_at(65536 + 100_000, b"!")
    [(flags, kind, payload)] = c.chunks(c.request(P.CMD_READ, 65536, 131072))
    assert kind == P.REPLY_TYPE_OFFSET_DATA and flags & P.REPLY_FLAG_DONE
    assert payload == struct.pack(">Q", 65536) + bytes(100_000) + b"!" + bytes(31071)
    handle = c.request(P.CMD_READ, 0, 4096)  # short reads are never holes
    assert c.chunks(handle)[0][1] == P.REPLY_TYPE_OFFSET_DATA


def test_a_server_bug_is_logged_with_its_traceback_and_answered_eio(
    wide: tuple[shmdisk.Disk, Client],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception no disk call should raise is a bug: the client gets EIO, the log gets the
    traceback, and the connection goes on."""
    _, c = wide

    def broken(self: shmdisk.Disk, offset: int, buf: Any, *, wait: bool = True) -> None:
        raise AttributeError("'NoneType' object has no attribute 'copy'")

    monkeypatch.setattr(shmdisk.Disk, "read_at", broken)
    with caplog.at_level("ERROR", logger="shmdisk.nbd"):
        assert c.error_of(c.request(P.CMD_READ, 0, 512)) == P.EIO
    [record] = [r for r in caplog.records if "server bug" in r.getMessage()]
    assert "while serving READ" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is AttributeError
    monkeypatch.undo()
    assert c.write(0, b"a" * 512) == 0
