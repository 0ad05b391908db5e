"""The fixed-newstyle handshake: greeting, then options until the client picks an export.

:func:`negotiate` returns the :class:`Session` the client settled on, or raises
:class:`~shmdisk.nbd._channel.Closed` when it leaves (``NBD_OPT_ABORT``, hang-up, protocol
violation, a failed TLS handshake). One method per option; an option not in the table gets
``NBD_REP_ERR_UNSUP``. Every export the client names is resolved through
:meth:`ExportTable.resolve` with the connection's :class:`~shmdisk.nbd._peer.Peer`, which
applies the access rules.

TLS follows the protocol's STARTTLS section: with ``--tls require`` every option before the
upgrade but ``STARTTLS`` and ``ABORT`` is answered ``NBD_REP_ERR_TLS_REQD`` (and
``EXPORT_NAME``, which cannot fail politely, ends the connection); with ``--tls off``
``STARTTLS`` is ``NBD_REP_ERR_POLICY``; a second ``STARTTLS`` or one with data is
``NBD_REP_ERR_INVALID``. Whatever was negotiated in plain text (structured replies, meta
contexts) is forgotten at the upgrade: a man in the middle may have written it. Nothing the
client sent after ``STARTTLS`` has been read yet when the TLS handshake starts (the channel
reads exactly one option at a time), so plain text slipped in behind it can only break the
handshake, never pass for an encrypted option.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from . import _proto as P
from ._channel import Channel, Closed
from ._exports import Export, ExportRefused, ExportTable, UnknownExport
from ._peer import Peer
from ._tls import TLSCredentials, TLSHandshakeError, start_tls

__all__ = ["Session", "negotiate"]

log = logging.getLogger("shmdisk.nbd")


@dataclass(frozen=True)
class Session:
    """What the handshake settled: the export and how the client will talk about it."""

    export: Export
    structured: bool  # NBD_OPT_STRUCTURED_REPLY was acknowledged
    block_status: bool  # base:allocation was selected for this export
    strict_blocks: bool  # the client asked for block sizes in NBD_OPT_GO, so it obeys them
    peer: Peer  # who the client turned out to be (TLS may have told more)


@dataclass(frozen=True)
class TLSSetting:
    """How one listener treats TLS: ``mode`` is "off", "on" or "require"."""

    mode: str = "off"
    credentials: TLSCredentials | None = None


def negotiate(
    channel: Channel,
    peer: Peer,
    exports: ExportTable,
    label: str,
    stopping: Callable[[], bool],
    tls: TLSSetting | None = None,
) -> Session:
    """Run the handshake on ``channel``; the chosen session, or :class:`Closed`.

    After ``NBD_OPT_STARTTLS``, ``channel.sock`` is the TLS stream.
    """
    return _Negotiation(channel, peer, exports, label, stopping, tls or TLSSetting()).run()


class _Negotiation:
    def __init__(
        self,
        channel: Channel,
        peer: Peer,
        exports: ExportTable,
        label: str,
        stopping: Callable[[], bool],
        tls: TLSSetting,
    ) -> None:
        self.channel = channel
        self.peer = peer
        self.exports = exports
        self.label = label
        self.stopping = stopping
        self.tls = tls
        self.structured = False
        self.no_zeroes = False
        self.meta_export: str | None = None  # the export base:allocation was selected for
        self.session: Session | None = None
        self.handlers: dict[int, Callable[[int, bytes], None]] = {
            P.OPT_EXPORT_NAME: self.export_name,
            P.OPT_ABORT: self.abort,
            P.OPT_LIST: self.list_exports,
            P.OPT_INFO: self.info_or_go,
            P.OPT_GO: self.info_or_go,
            P.OPT_STRUCTURED_REPLY: self.structured_reply,
            P.OPT_LIST_META_CONTEXT: self.meta_context,
            P.OPT_SET_META_CONTEXT: self.meta_context,
            P.OPT_STARTTLS: self.starttls,
        }

    def run(self) -> Session:
        self.channel.send(
            P.GREETING.pack(P.NBDMAGIC, P.IHAVEOPT, P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        )
        (client_flags,) = P.CLIENT_FLAGS.unpack(self.channel.recv_exact(4))
        if client_flags & ~P.KNOWN_CLIENT_FLAGS:
            raise Closed(f"unknown client flags {client_flags:#x}")
        self.no_zeroes = bool(client_flags & P.FLAG_C_NO_ZEROES)
        while self.session is None:
            header = self.channel.recv_exact(P.OPTION_HEADER.size)
            magic, option, length = P.OPTION_HEADER.unpack(header)
            if magic != P.IHAVEOPT:
                raise Closed("bad option magic")
            if length > P.MAX_OPTION:
                raise Closed(f"option {option} too long ({length} bytes)")
            data = self.channel.recv_exact(length)
            if self.stopping() and option != P.OPT_ABORT:
                self.error(option, P.REP_ERR_SHUTDOWN, "server is shutting down")
                continue
            if self.tls.mode == "require" and not self.peer.tls and option not in _BEFORE_TLS:
                if option == P.OPT_EXPORT_NAME:
                    raise Closed("NBD_OPT_EXPORT_NAME before STARTTLS on a TLS-only server")
                self.error(option, P.REP_ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS")
                continue
            handler = self.handlers.get(option)
            if handler is None:
                self.error(option, P.REP_ERR_UNSUP, f"option {option} unsupported")
            else:
                handler(option, data)
        return self.session

    # --- replies -----------------------------------------------------------------------------
    def reply(self, option: int, kind: int, payload: bytes = b"") -> None:
        self.channel.send(P.OPTION_REPLY.pack(P.REPLY_MAGIC, option, kind, len(payload)) + payload)

    def error(self, option: int, kind: int, message: str) -> None:
        self.reply(option, kind, message.encode()[: P.MAX_STRING])

    def resolve(self, name: str) -> Export:
        """The export ``name`` for this peer; unknown and refused names are logged by name."""
        try:
            return self.exports.resolve(name, self.peer)
        except UnknownExport:
            log.warning("%s: asked for unknown export %r", self.label, name)
            raise
        except ExportRefused as exc:
            shown = name or self.exports.default
            log.warning("%s: refused export %r: %s", self.label, shown, exc.reason)
            raise

    # --- options, one method each ------------------------------------------------------------
    def export_name(self, option: int, data: bytes) -> None:
        name = data.decode("utf-8", "replace")
        try:
            export = self.resolve(name)
        except (UnknownExport, ExportRefused):
            # This option cannot fail politely: the spec says to hang up.
            raise Closed(f"unknown or refused export {name[:256]!r}") from None
        reply = P.EXPORT_NAME_REPLY.pack(export.size, export.transmission_flags(self.structured))
        if not self.no_zeroes:
            reply += bytes(124)
        self.channel.send(reply)
        self.enter(export, strict_blocks=False)

    def abort(self, option: int, data: bytes) -> None:
        # Clients commonly send ABORT and hang up without waiting for the ACK (nbdinfo --list
        # does): the spec asks both sides to take that calmly.
        try:
            self.reply(option, P.REP_ACK)
        except (Closed, OSError):
            pass
        raise Closed("client aborted")

    def list_exports(self, option: int, data: bytes) -> None:
        if data:
            self.error(option, P.REP_ERR_INVALID, "LIST takes no data")
            return
        for name in self.exports.visible(self.peer):
            raw = name.encode()
            self.reply(option, P.REP_SERVER, P.U32.pack(len(raw)) + raw)
        self.reply(option, P.REP_ACK)

    def structured_reply(self, option: int, data: bytes) -> None:
        if data:
            self.error(option, P.REP_ERR_INVALID, "takes no data")
            return
        self.structured = True
        self.reply(option, P.REP_ACK)

    def info_or_go(self, option: int, data: bytes) -> None:
        """NBD_OPT_INFO / NBD_OPT_GO: describe the export; GO also enters transmission."""
        parsed = _parse_info_request(data)
        if isinstance(parsed, str):
            self.error(option, P.REP_ERR_INVALID, parsed)
            return
        name, requests = parsed
        try:
            export = self.resolve(name)
        except UnknownExport as exc:
            self.error(option, P.REP_ERR_UNKNOWN, str(exc))
            return
        except ExportRefused as exc:
            self.error(option, P.REP_ERR_POLICY, str(exc))
            return
        info = P.REP_INFO
        flags = export.transmission_flags(self.structured)
        self.reply(option, info, P.INFO_EXPORT_PAYLOAD.pack(P.INFO_EXPORT, export.size, flags))
        if P.INFO_NAME in requests:
            self.reply(option, info, P.U16.pack(P.INFO_NAME) + export.name.encode())
        if P.INFO_DESCRIPTION in requests:
            text = export.description().encode()
            self.reply(option, info, P.U16.pack(P.INFO_DESCRIPTION) + text)
        # Always sent: it tells every client the natural granularity. Only a client that asked
        # for it in NBD_OPT_GO is held to it; others may send any byte range.
        minimum, preferred, maximum = export.block_sizes()
        self.reply(
            option,
            info,
            P.INFO_BLOCK_SIZE_PAYLOAD.pack(P.INFO_BLOCK_SIZE, minimum, preferred, maximum),
        )
        self.reply(option, P.REP_ACK)
        if option == P.OPT_GO:
            self.enter(export, strict_blocks=P.INFO_BLOCK_SIZE in requests)

    def meta_context(self, option: int, data: bytes) -> None:
        setting = option == P.OPT_SET_META_CONTEXT
        if setting:
            self.meta_export = None  # a SET replaces the selection, even when it fails
        if not self.structured:
            self.error(option, P.REP_ERR_INVALID, "structured replies first")
            return
        parsed = _parse_meta_request(data)
        if parsed is None:
            self.error(option, P.REP_ERR_INVALID, "malformed meta context request")
            return
        name, queries = parsed
        try:
            export = self.resolve(name)
        except UnknownExport as exc:
            self.error(option, P.REP_ERR_UNKNOWN, str(exc))
            return
        except ExportRefused as exc:
            self.error(option, P.REP_ERR_POLICY, str(exc))
            return
        if setting:
            match = P.META_BASE_ALLOCATION in queries
        else:
            # An empty query list lists everything we have; "base:" lists the whole namespace.
            match = not queries or any(q in ("base:", P.META_BASE_ALLOCATION) for q in queries)
        if match:
            context_id = P.META_BASE_ALLOCATION_ID if setting else 0
            payload = P.U32.pack(context_id) + P.META_BASE_ALLOCATION.encode()
            self.reply(option, P.REP_META_CONTEXT, payload)
            if setting:
                self.meta_export = export.name
        self.reply(option, P.REP_ACK)

    def starttls(self, option: int, data: bytes) -> None:
        if data:
            self.error(option, P.REP_ERR_INVALID, "STARTTLS takes no data")
            return
        credentials = self.tls.credentials
        if self.tls.mode == "off" or credentials is None:
            self.error(option, P.REP_ERR_POLICY, "TLS is not enabled on this server")
            return
        if self.peer.tls:
            self.error(option, P.REP_ERR_INVALID, "TLS is already in use")
            return
        plain = self.channel.sock
        if not isinstance(plain, socket.socket):  # pragma: no cover - peer.tls says otherwise
            raise Closed("STARTTLS on a stream that is not a plain socket")
        self.reply(option, P.REP_ACK)
        try:
            stream, identity = start_tls(plain, credentials, self.channel.deadline)
        except TLSHandshakeError as exc:
            # Too late for an error reply: the client expects TLS now. One line, no traceback.
            log.warning("%s: %s", self.label, exc)
            raise Closed(str(exc)) from None
        self.channel.sock = stream
        self.peer = dataclasses.replace(self.peer, tls=True, tls_identity=identity)
        # Forget what was negotiated in plain text: the client negotiates again under TLS.
        self.structured = False
        self.meta_export = None
        log.info("%s: TLS started (%s)", self.label, self.peer)

    def enter(self, export: Export, *, strict_blocks: bool) -> None:
        self.session = Session(
            export=export,
            structured=self.structured,
            block_status=self.structured and self.meta_export == export.name,
            strict_blocks=strict_blocks,
            peer=self.peer,
        )


# With --tls require, the options a client may send before it has upgraded.
_BEFORE_TLS = frozenset({P.OPT_STARTTLS, P.OPT_ABORT})


def _parse_info_request(data: bytes) -> tuple[str, set[int]] | str:
    """(name, requested info types) of an INFO/GO payload, or what is wrong with it."""
    if len(data) < 6:
        return "option too short"
    (name_len,) = P.U32.unpack_from(data, 0)
    if name_len > len(data) - 6:
        return "bad name length"
    (count,) = P.U16.unpack_from(data, 4 + name_len)
    if len(data) != 6 + name_len + 2 * count:
        return "bad information request list"
    try:
        name = data[4 : 4 + name_len].decode()
    except UnicodeDecodeError:
        return "export name is not UTF-8"
    requests = {P.U16.unpack_from(data, 6 + name_len + 2 * i)[0] for i in range(count)}
    return name, requests


def _parse_meta_request(data: bytes) -> tuple[str, list[str]] | None:
    """Parse an NBD_OPT_{LIST,SET}_META_CONTEXT payload; None if it is malformed."""
    try:
        pos = 0
        (name_len,) = P.U32.unpack_from(data, pos)
        pos += 4
        if name_len > P.MAX_STRING or pos + name_len > len(data):
            return None
        name = data[pos : pos + name_len].decode()
        pos += name_len
        (count,) = P.U32.unpack_from(data, pos)
        pos += 4
        queries = []
        for _ in range(count):
            (query_len,) = P.U32.unpack_from(data, pos)
            pos += 4
            if query_len > P.MAX_STRING or pos + query_len > len(data):
                return None
            queries.append(data[pos : pos + query_len].decode())
            pos += query_len
        if pos != len(data):
            return None
    except (struct.error, UnicodeDecodeError):
        return None
    return name, queries
