"""The server's state: one object, made by the app's lifespan (serve/frontends/app.py) and read by every
front-end through `server(request)`."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from serve.core.engine import Engine

from .metrics import Metrics


class NotReady(Exception):
    """The engine is not loaded (yet, or at all): the message says what the server is doing. Each front-end
    answers it with its protocol's 503."""


@dataclass
class ServerState:
    metrics: Metrics
    chat_template: str | None = None  # --chat-template: a built-in name or a file; None: the model's own
    engine: Engine | None = None  # set once, when the model is loaded and its schedulers run
    status: str = "starting"  # while `engine` is None: what the server is doing, or why loading failed

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise NotReady(self.status)
        return self.engine


def server(request: Request) -> ServerState:
    """The state the lifespan yielded (Starlette copies it into every request's `state`)."""
    state: ServerState = request.state.server
    return state
