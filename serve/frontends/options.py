"""The server's bounds and security: what python -m serve's flags set for the HTTP and gRPC servers, and the
uvicorn configuration they make. Every resource a client can hold (connections, body bytes, time) is bounded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from .http_server import FLUSH_S, bounded_protocol


@dataclass(frozen=True)
class ServerOptions:
    api_keys: tuple[str, ...] = ()  # empty: no key needed; else every route but the health probes needs one
    cors_origins: tuple[str, ...] = ()  # empty: no CORS headers (browsers refuse cross-origin reads)
    ssl_keyfile: Path | None = None  # both set: HTTPS, and TLS on gRPC with the same files
    ssl_certfile: Path | None = None
    max_body_bytes: int = 8 << 20  # a larger body is a 413 before it is read whole
    max_connections: int = 1024  # open HTTP connections; more are refused
    idle_timeout_s: float = 5.0  # a kept-alive connection with no request in flight is closed after this
    read_timeout_s: float = 30.0  # a request's headers and body must have arrived within this
    shutdown_timeout_s: float = 30.0  # on SIGTERM/SIGINT running requests get this long, then end with an error

    @property
    def tls(self) -> bool:
        return self.ssl_keyfile is not None and self.ssl_certfile is not None


def uvicorn_config(
    app: FastAPI, host: str, port: int, options: ServerOptions, log_level: str = "info"
) -> uvicorn.Config:
    """The uvicorn configuration that applies `options` (python -m serve and the tests' server use it); the
    shutdown timeout needs serve/frontends/http_server.py's `Server` besides."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        http=bounded_protocol(options.read_timeout_s, options.max_connections),
        timeout_keep_alive=options.idle_timeout_s,  # type: ignore[arg-type]  # (typed int; used as call_later's delay)
        # A backstop only: `Server` has ended every request by then; uvicorn would cancel what is left.
        timeout_graceful_shutdown=math.ceil(options.shutdown_timeout_s + FLUSH_S + 2),
        ssl_keyfile=str(options.ssl_keyfile) if options.ssl_keyfile else None,
        ssl_certfile=str(options.ssl_certfile) if options.ssl_certfile else None,
    )
