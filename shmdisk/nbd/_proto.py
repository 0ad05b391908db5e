"""NBD wire format: magic numbers, option/command/flag values and packed structs.

Values are from the NBD protocol document (``doc/proto.md`` of the NBD project). Everything on
the wire is big-endian. Nothing here does I/O.
"""

from __future__ import annotations

import errno
import struct

DEFAULT_PORT = 10809  # the IANA-assigned NBD port
DEFAULT_HOST = "127.0.0.1"  # the server listens on loopback unless told otherwise

# --- handshake -----------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x0003E889045565A9  # option reply magic

FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- transmission flags (per export) -------------------------------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# --- commands ------------------------------------------------------------------------------
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

META_BASE_ALLOCATION = "base:allocation"
META_BASE_ALLOCATION_ID = 1  # the one context we offer; any nonzero id would do

# The protocol's own error numbers (they happen to equal Linux errno values, but the wire
# values are fixed by the spec, not by the host).
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

_HOST_TO_NBD = {
    errno.EPERM: EPERM,
    errno.EACCES: EPERM,
    errno.EROFS: EPERM,
    errno.EIO: EIO,
    errno.ENOMEM: ENOMEM,
    errno.EINVAL: EINVAL,
    errno.ENOSPC: ENOSPC,
    errno.EDQUOT: ENOSPC,  # the spec asks for EDQUOT and EFBIG to be reported as ENOSPC
    errno.EFBIG: ENOSPC,
    errno.EOVERFLOW: EOVERFLOW,
    errno.ENOTSUP: ENOTSUP,
    errno.ESHUTDOWN: ESHUTDOWN,
}


def nbd_errno(host_errno: int | None) -> int:
    """Map a host errno to the NBD error set; anything unknown is EIO."""
    if host_errno is None:
        return EIO
    return _HOST_TO_NBD.get(host_errno, EIO)


# --- structs -------------------------------------------------------------------------------
# server greeting: NBDMAGIC, IHAVEOPT, handshake flags
GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
# option request header: IHAVEOPT, option, length
OPTION_HEADER = struct.Struct(">QII")
# option reply header: magic, option, reply type, length
OPTION_REPLY = struct.Struct(">QIII")
# reply to NBD_OPT_EXPORT_NAME: size, transmission flags (then 124 zero bytes unless NO_ZEROES)
EXPORT_NAME_REPLY = struct.Struct(">QH")
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

# request: magic, command flags, type, handle (cookie), offset, length
REQUEST = struct.Struct(">IHHQQI")
# simple reply: magic, error, handle
SIMPLE_REPLY = struct.Struct(">IIQ")
# structured reply chunk header: magic, flags, type, handle, payload length
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# NBD_REPLY_TYPE_OFFSET_DATA chunk header with its payload's offset field
STRUCTURED_DATA = struct.Struct(">IHHQIQ")
# NBD_REPLY_TYPE_OFFSET_HOLE whole chunk
STRUCTURED_HOLE = struct.Struct(">IHHQIQI")
# NBD_REPLY_TYPE_ERROR payload head: error, message length
ERROR_PAYLOAD = struct.Struct(">IH")
# one block-status descriptor: length, status flags
EXTENT = struct.Struct(">II")

# Largest READ/WRITE payload we accept (and advertise as the maximum block size). The spec says
# lengths below 32 MiB should not be treated as a denial of service, so that is the floor.
MAX_REQUEST = 32 * 1024 * 1024
# Longest option payload we read during the handshake; longer ones are a broken or hostile
# client (names are limited to 4096 bytes, and a query list needs little more).
MAX_OPTION = 64 * 1024
MAX_STRING = 4096
