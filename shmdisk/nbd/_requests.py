"""Transmission requests: whether one is valid, and which NBD error a failure is.

:class:`Checker` is the one place a request is judged before anything is done for it; handlers
may assume what it checked. :func:`error_code` maps an exception a disk call raised to the NBD
error the client gets, and tells a server bug (None) from a failure of the disk.
"""

from __future__ import annotations

from typing import NamedTuple

from shmdisk import errors

from . import _proto as P
from ._negotiation import Session

__all__ = ["COMMAND_NAMES", "WRITING", "Checker", "Request", "RequestError", "error_code"]

COMMAND_NAMES = {
    P.CMD_READ: "READ",
    P.CMD_WRITE: "WRITE",
    P.CMD_DISC: "DISC",
    P.CMD_FLUSH: "FLUSH",
    P.CMD_TRIM: "TRIM",
    P.CMD_CACHE: "CACHE",
    P.CMD_WRITE_ZEROES: "WRITE_ZEROES",
    P.CMD_BLOCK_STATUS: "BLOCK_STATUS",
}
# Commands that change the disk: refused on read-only exports, and covered by a FLUSH.
WRITING = frozenset({P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES})
# Past the end of the export a write is ENOSPC (the spec's "no room"), anything else EINVAL.
_ENOSPC_PAST_END = frozenset({P.CMD_WRITE, P.CMD_WRITE_ZEROES})
# Flags each command accepts. FUA is accepted everywhere (the spec allows clients to set it on
# any command); NO_HOLE and FAST_ZERO only qualify WRITE_ZEROES.
_ALLOWED_FLAGS = {
    P.CMD_READ: P.CMD_FLAG_FUA | P.CMD_FLAG_DF,
    P.CMD_WRITE: P.CMD_FLAG_FUA,
    P.CMD_DISC: P.CMD_FLAG_FUA,
    P.CMD_FLUSH: P.CMD_FLAG_FUA,
    P.CMD_TRIM: P.CMD_FLAG_FUA,
    P.CMD_CACHE: P.CMD_FLAG_FUA,
    P.CMD_WRITE_ZEROES: P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO,
    P.CMD_BLOCK_STATUS: P.CMD_FLAG_FUA | P.CMD_FLAG_REQ_ONE,
}
# Hints need not be aligned: a TRIM covers the whole pages inside it, a CACHE does nothing.
_ALIGNED = frozenset({P.CMD_READ, P.CMD_WRITE, P.CMD_WRITE_ZEROES, P.CMD_BLOCK_STATUS})


class RequestError(Exception):
    """A request fails with NBD error ``code``; the connection goes on."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message


class Checker:
    """Judges requests against one session's export size, block sizes and permissions."""

    def __init__(self, session: Session) -> None:
        export = session.export
        self.size = export.size
        self.align = export.sector_size if session.strict_blocks else 1
        self.structured = session.structured
        self.read_only = export.read_only
        self.block_status = session.block_status

    def check(self, cmd: int, flags: int, offset: int, length: int) -> RequestError | None:
        """The error this request deserves, or None if it may be served.

        In the spec's order of concerns: unknown command, flags, permission, lengths, range,
        alignment, then what is particular to a command.
        """
        # The commonest case first, decided in one test.
        if (
            cmd <= P.CMD_WRITE
            and not flags
            and offset + length <= self.size
            and length <= P.MAX_REQUEST
            and not (offset | length) % self.align
            and not (cmd and self.read_only)
        ):
            return None
        name = COMMAND_NAMES.get(cmd)
        if name is None:
            return RequestError(P.EINVAL, f"unknown command {cmd}")
        if flags & ~_ALLOWED_FLAGS[cmd]:
            return RequestError(P.EINVAL, f"{name}: unsupported flags {flags:#x}")
        if flags & P.CMD_FLAG_DF and not self.structured:
            return RequestError(P.EINVAL, "READ: DF flag without structured replies")
        if cmd in WRITING and self.read_only:
            return RequestError(P.EPERM, f"{name}: export is read-only")
        if cmd == P.CMD_FLUSH or cmd == P.CMD_DISC:
            if offset or length:
                return RequestError(P.EINVAL, f"{name}: offset and length must be zero")
            return None
        if length > P.MAX_REQUEST and cmd in (P.CMD_READ, P.CMD_WRITE):
            # A structured reply can say "too large to send in one piece" precisely.
            code = P.EOVERFLOW if cmd == P.CMD_READ and self.structured else P.EINVAL
            return RequestError(code, f"{name}: {length} bytes exceeds the {P.MAX_REQUEST} maximum")
        if offset + length > self.size:
            code = P.ENOSPC if cmd in _ENOSPC_PAST_END else P.EINVAL
            return RequestError(code, f"{name}: range beyond the end of the export")
        if cmd in _ALIGNED and (offset | length) % self.align:
            return RequestError(P.EINVAL, f"{name}: not aligned to {self.align} bytes")
        if cmd == P.CMD_BLOCK_STATUS:
            if not self.block_status:
                return RequestError(P.EINVAL, "BLOCK_STATUS: no metadata context was selected")
            if length == 0:
                return RequestError(P.EINVAL, "BLOCK_STATUS: zero length")
        return None


def error_code(exc: BaseException, cmd: int) -> int | None:
    """The NBD error for ``exc`` raised by the disk while serving ``cmd``; None for a bug.

    Only what a disk call can legitimately raise is mapped; anything else (a TypeError, an
    AttributeError, a bad buffer we built ourselves) is the server's own fault.
    """
    if isinstance(exc, RequestError):
        return exc.code
    if isinstance(exc, errors.OutOfRangeError):
        # The disk shrank under an open connection: same codes as the range check above.
        return P.ENOSPC if cmd in _ENOSPC_PAST_END else P.EINVAL
    if isinstance(exc, (errors.IsReadOnlyError, errors.PermissionDeniedError)):
        return P.EPERM
    if isinstance(exc, errors.DiskFullError):
        return P.ENOSPC
    if isinstance(exc, (errors.DisconnectedError, errors.LockTimeoutError)):
        return P.EIO  # destroyed under us, or a lock never came free: not the client's fault
    if isinstance(exc, (errors.UnknownError, errors.UnimplementedError)):
        return P.nbd_errno(getattr(exc, "errno", None))
    if isinstance(exc, OSError) and not isinstance(exc, errors.ShmdiskError):
        return P.nbd_errno(exc.errno)
    return None


class Request(NamedTuple):
    """One transmission request header, as the client sent it.

    The fields are those of the wire header in its order, so a header unpacks straight into
    one: ``tuple.__new__(Request, REQUEST.unpack_from(...))`` (no Python-level constructor on
    the path every request takes).
    """

    magic: int
    flags: int
    cmd: int
    handle: int
    offset: int
    length: int

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.cmd, f"command {self.cmd}")
