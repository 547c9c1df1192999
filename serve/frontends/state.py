"""The server's state: one object, made by the app's lifespan (serve/frontends/app.py) and read by every
front-end through `server(request)`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fastapi import Request

from serve.core.engine import Engine

from .metrics import Metrics

# What a request still generating when the server's shutdown grace ends gets instead of its tokens.
SHUTDOWN_ERROR = "the server is shutting down; retry the request"
# An absolute POSIX path (possibly quoted): shown to clients as its last component only.
_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/:,;()]+/)+([^\s'\"/:,;()]+)")


@dataclass
class RequestDefaults:
    """What a request that omits them gets (llama-server's --temp, --seed, -n): None keeps each API's own."""

    temperature: float | None = None
    seed: int | None = None
    max_tokens: int | None = None


class NotReady(Exception):
    """The engine is not loaded (yet, or at all): the message says what the server is doing. Each front-end
    answers it with its protocol's 503."""


@dataclass
class ServerState:
    metrics: Metrics
    chat_template: str | None = None  # --chat-template: a built-in name or a file; None: the model's own
    tool_call_parser: str | None = None  # --tool-call-parser: llama3, hermes, mistral; None: from the template
    reasoning_parser: str | None = None  # --reasoning-parser: deepseek_r1, qwen3; None: no reasoning_content
    resolved_template: str | None = None  # the chat template's text, once loaded (frontends/chat.py)
    defaults: RequestDefaults = field(default_factory=RequestDefaults)
    engine: Engine | None = None  # set once, when the model is loaded and its schedulers run
    status: str = "starting"  # while `engine` is None: what the server is doing, or why loading failed
    progress: float | None = None  # how far that is (0..1), when known
    failed: bool = False
    stopping: bool = False  # the shutdown grace is over: no sequence runs on, each ends with SHUTDOWN_ERROR

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise NotReady(self.status)
        return self.engine

    def load_failed(self, e: BaseException) -> None:
        """Loading failed: clients see why, without the server's file paths (the log has the whole text)."""
        self.status = f"failed to load the model: {public_message(str(e))} (details in the server log)"
        self.failed, self.progress = True, None

    def end_requests(self) -> None:
        """End every sequence still queued or running (the scheduler frees their pages at its next step);
        the front-ends answer each with SHUTDOWN_ERROR in their protocol. So does any submitted later."""
        self.stopping = True
        for scheduler in self.engine.schedulers if self.engine is not None else []:
            for seq in scheduler.running + scheduler.waiting:
                seq.cancel()


def public_message(text: str) -> str:
    """`text` for a client: every absolute path shortened to its file name."""
    return _PATH.sub(r"\1", text)


def server(request: Request) -> ServerState:
    """The state the lifespan yielded (Starlette copies it into every request's `state`)."""
    state: ServerState = request.state.server
    return state
