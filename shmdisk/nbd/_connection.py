"""One client connection from accept to close: the handshake, then the transmission.

This is where a connection's life is logged (connected, which export, closed and why, with
its counters) and where whatever ends it is turned into one reason: a hang-up, a protocol
violation, a timeout, or a server bug, which is logged with its traceback and costs this
connection only.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable

from ._channel import Channel, Closed, hangup_reason, shutdown
from ._exports import ExportTable
from ._negotiation import TLSSetting, negotiate
from ._peer import Peer
from ._transmission import Transmission
from ._workers import ThreadCache

__all__ = ["HANDSHAKE_TIMEOUT", "Connection"]

log = logging.getLogger("shmdisk.nbd")

# A client gets this long for the whole handshake (TLS included); one that connects and says
# nothing, or trickles its options, is cut off and frees its connection slot.
HANDSHAKE_TIMEOUT = 60.0


class Connection:
    """A client from its handshake to its close."""

    def __init__(
        self,
        sock: socket.socket,
        peer: Peer,
        label: str,
        exports: ExportTable,
        threads: ThreadCache,
        stopping: Callable[[], bool],
        tls: TLSSetting | None = None,
    ) -> None:
        self.peer = peer
        self.label = label
        self.exports = exports
        self.threads = threads
        self.stopping = stopping
        self.tls = tls or TLSSetting()
        # The socket lives in the channel, which STARTTLS may switch to a TLS stream: shutdown
        # and close always reach whichever it is now.
        self.channel = Channel(sock, stopping)

    def run(self) -> None:
        counters = "0 requests, 0 bytes read, 0 bytes written"
        try:
            self.channel.deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            session = negotiate(
                self.channel, self.peer, self.exports, self.label, self.stopping, self.tls
            )
            self.channel.deadline = None
            sock = self.channel.sock
            sock.settimeout(None)
            export = session.export
            log.info(
                "%s: export %r, %d bytes, %s%s%s",
                self.label,
                export.name,
                export.size,
                "read-only" if export.read_only else "read-write",
                ", structured replies" if session.structured else "",
                ", base:allocation" if session.block_status else "",
            )
            transmission = Transmission(sock, session, self.label, self.threads, self.stopping)
            reason = transmission.run()
            t = transmission
            counters = (
                f"{t.requests} requests, {t.bytes_read + t.worker_bytes_read} bytes read, "
                f"{t.bytes_written + t.worker_bytes_written} bytes written"
            )
        except Closed as exc:
            reason = str(exc)
        except TimeoutError:
            reason = "handshake timed out"
        except OSError as exc:
            reason = hangup_reason(exc) or f"socket error: {exc.strerror or exc}"
        except Exception as exc:  # a bug must cost this connection only, never the server
            log.exception("%s: server bug", self.label)
            reason = f"server bug: {exc!r}"
        finally:
            self.close()
        log.info("%s: closed (%s): %s", self.label, reason, counters)

    def shutdown(self, how: int) -> None:
        """Wake the connection's thread (``SHUT_RD``) or cut the client off (``SHUT_RDWR``)."""
        shutdown(self.channel.sock, how)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.channel.sock.close()
