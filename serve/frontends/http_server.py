"""The HTTP server: uvicorn with every connection and the shutdown bounded in time.

uvicorn (0.54, h11 protocol) bounds neither on its own: a connection that sends nothing, or its headers or
body a byte at a time, is kept open forever (its keep-alive timer runs only between requests), any number
of sockets is accepted (`limit_concurrency` answers 503 to a request but keeps the socket), and a graceful
shutdown waits for every connection without end (`timeout_graceful_shutdown` then cancels the handlers,
which ends a stream without a word and logs each as an ASGI exception). So:
- `BoundedH11Protocol`: a request must arrive whole (headers and body) within the read timeout, counted
  from the connection's start or from the request's first byte; between requests uvicorn's keep-alive
  timer (the idle timeout) applies; while the application answers, neither. A connection over the cap
  closes the longest-idle one (one that has sent nothing yet, or is kept alive between requests), so
  that idle sockets cannot lock clients out; when every one has a request under way, the new one is
  answered 503 and closed as soon as it is accepted.
- `Server`: on SIGTERM / SIGINT uvicorn stops accepting and lets requests finish; after the shutdown
  timeout every sequence still running is ended (each front-end answers SHUTDOWN_ERROR in its protocol:
  an error event on a stream, a 503 otherwise), a moment later every connection left (a body still
  arriving, a client not reading) is closed, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Generator
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .state import ServerState

log = logging.getLogger("aotllm.http")

# After the shutdown timeout: how long the requests just ended get to send their error before every
# connection still open is closed.
FLUSH_S = 1.0

_REFUSAL_BODY = b'{"error": "too many connections to this server; retry shortly", "code": 503}'
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n\r\n" + _REFUSAL_BODY
)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 connection with a read deadline and a cap on open connections (set per server by
    `bounded_protocol`)."""

    read_timeout_s: ClassVar[float] = 30.0
    max_connections: ClassVar[int] = 1024

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._read_deadline: asyncio.TimerHandle | None = None
        self._last_active = self.loop.time()  # the last byte received or response completed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._evict_idle():  # (this one is counted)
            # Answered before its request is read: the socket is the resource being bounded.
            transport.write(_REFUSAL)
            transport.close()
            return
        self._update_read_deadline()

    def data_received(self, data: bytes) -> None:
        self._last_active = self.loop.time()
        super().data_received(data)
        self._update_read_deadline()

    def on_response_complete(self) -> None:
        self._last_active = self.loop.time()
        super().on_response_complete()
        self._update_read_deadline()

    def _idle(self) -> bool:
        """No request of this connection is arriving or being answered: it has sent nothing yet, or it is
        kept alive between requests."""
        if self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0] or self.transport.is_closing():
            return False
        return self.cycle is None or self.cycle.response_complete

    def _evict_idle(self) -> bool:
        """Close the longest-idle other connection, if there is one, to make room for this one."""
        idle = [c for c in self.connections if isinstance(c, BoundedH11Protocol) and c is not self and c._idle()]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c._last_active)
        log.debug("at the cap of %d connections: closing the idle %s", self.max_connections, victim.client)
        victim.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_read_deadline(False)
        super().connection_lost(exc)

    def _reading_request(self) -> bool:
        """A request is due or under way: the connection is new, or the client has sent part of a request
        (headers, or a body not yet complete). Not while the answer is being made, nor between requests."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return True
        return state is h11.IDLE and (self.cycle is None or bool(self.conn.trailing_data[0]))

    def _update_read_deadline(self) -> None:
        self._set_read_deadline(self._reading_request() and not self.transport.is_closing())

    def _set_read_deadline(self, armed: bool) -> None:
        # The deadline is absolute (from the first byte of the request, not the last): trickling bytes
        # does not extend it.
        if armed and self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)
        elif not armed and self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if not self.transport.is_closing():
            # A handler waiting for the body sees the client gone (http.disconnect) and answers no one.
            log.debug("closing %s: no whole request within %g s (--read-timeout)", self.client, self.read_timeout_s)
            self.transport.close()


def bounded_protocol(read_timeout_s: float, max_connections: int) -> type[BoundedH11Protocol]:
    """The protocol class for uvicorn.Config(http=...) with these bounds (uvicorn makes one per connection)."""

    class Protocol(BoundedH11Protocol):
        pass

    Protocol.read_timeout_s, Protocol.max_connections = read_timeout_s, max_connections
    return Protocol


class Server(uvicorn.Server):
    """uvicorn's server with a bounded graceful shutdown that exits cleanly (see the module's docstring)."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.shutdown_timeout_s = shutdown_timeout_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        ender = asyncio.create_task(self._end_requests_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            ender.cancel()

    async def _end_requests_after_grace(self) -> None:
        await asyncio.sleep(self.shutdown_timeout_s)
        state = self.lifespan.state.get("server")
        if isinstance(state, ServerState):
            log.warning("shutdown: still running after %g s: ending every request", self.shutdown_timeout_s)
            state.end_requests()
        await asyncio.sleep(FLUSH_S)
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None and not transport.is_closing():
                transport.close()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's signal handling, without raising the signal again once the server has stopped (uvicorn
        does, so that the process then dies of SIGTERM, or of a KeyboardInterrupt for SIGINT: an exit
        status other than 0 after a clean stop)."""
        if threading.current_thread() is not threading.main_thread():  # (signals reach the main thread only)
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
