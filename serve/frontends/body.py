"""Request bodies, bounded and parsed one way for every JSON route: at most --max-body-bytes are read (a larger
body is refused as it arrives, whatever Content-Length says), and a body that is not UTF-8 JSON of the
route's schema is a 400 whose message says what to fix. Each front-end words these errors in its protocol.

The byte limit is ASGI middleware (`BodyLimit`) wrapped around `receive`, so it holds for any code that
reads a body; a route that reads through `parse_body` answers the overflow in its protocol's error shape,
anything else gets the generic {"error", "code"} 413.
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

M = TypeVar("M", bound=BaseModel)

# pydantic-core's JSON parser refuses nesting deeper than this (a fixed limit of its parser, jiter).
JSON_DEPTH_LIMIT = 200
# Status logged for a request whose client went away before it was answered (nginx's convention).
CLIENT_CLOSED = 499


class BodyError(Exception):
    """The body cannot be taken as the route's JSON: `status` (400, 413) and a message with a hint."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class BodyTooLarge(BodyError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"the request body is larger than this server's limit of {limit} bytes; "
            "hint: send less text (the server's --max-body-bytes sets the limit)",
        )


async def parse_body(request: Request, model: type[M]) -> M:
    """The body as `model`. Raises `BodyError` for a body too large, not UTF-8, not JSON or nested too
    deeply; the model's own `ValidationError` (fields) for the caller to word in its protocol. A client
    that leaves while sending raises Starlette's `ClientDisconnect` (answered by `add_body_limit`'s handler)."""
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BodyError(
            400,
            f"the body is not valid UTF-8 (byte 0x{body[e.start]:02x} at offset {e.start}); "
            "hint: send the JSON encoded as UTF-8",
        ) from e
    if not text.strip():
        raise BodyError(400, "the body is empty; hint: send the request as a JSON object")
    try:
        return model.model_validate_json(text)
    except ValidationError as e:
        syntax = next((err for err in e.errors() if err["type"] == "json_invalid"), None)
        if syntax is None:
            raise
        raise BodyError(400, _json_message(str(syntax.get("msg", "")))) from e


def _json_message(msg: str) -> str:
    detail = msg.removeprefix("Invalid JSON: ")
    if "recursion limit" in detail:
        return (
            f"malformed JSON: the body nests arrays or objects more than {JSON_DEPTH_LIMIT} levels deep "
            f"({detail}); hint: flatten it"
        )
    return f"malformed JSON: the body is not valid JSON ({detail}); hint: send one JSON object, UTF-8 encoded"


class BodyLimit:
    """ASGI middleware: a request whose body is over `max_bytes` gets `BodyTooLarge` from `receive` (at once
    when Content-Length declares it, else as soon as the chunks received pass the limit), so no more than
    the limit is ever buffered. When the application lets the error through, this answers the 413.

    The connection is not closed after a 413: uvicorn reads and discards the rest of the body (so a client
    that reads only after sending sees the answer), bounded by the read deadline (serve/frontends/http_server.py)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            if declared is not None and declared > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def send_noting_start(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, send_noting_start)
        except BodyTooLarge as e:
            if started:  # (cannot happen on our routes: they read the body before answering)
                raise
            await JSONResponse({"error": e.message, "code": e.status}, status_code=e.status)(scope, receive, send)


def _content_length(scope: dict) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # (the HTTP layer refuses a malformed one before the application sees it)
    return None


def add_body_limit(app: FastAPI, max_bytes: int) -> None:
    """Bound every request's body on `app`, and answer a client that leaves while sending its body without
    an error in the log (nobody is there to read the answer; the access log shows 499)."""
    app.add_middleware(BodyLimit, max_bytes=max_bytes)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_CLOSED)
