"""Who may use the server: holders of an API key (--api-key / --api-key-file: HTTP `Authorization: Bearer KEY`
here, the same keys in gRPC's `authorization` metadata in grpc_api.py) and, from a browser, pages of the server's
own origin or of an origin listed in --cors-origins.

The origin check closes a cross-site hole CORS alone leaves open: a page on any site can POST `text/plain` to
http://127.0.0.1:8000/generate (a "simple request": the browser sends it without a preflight and only hides the
answer), so without the check every web page a user visits can make a local server generate. Browsers put an
`Origin` header on every such request; curl and the SDKs send none, and are not affected.

Both checks are pure ASGI middleware: they read the headers only, so a refused request's body is never read.
Refusals answer in the error shape of the route's protocol (OpenAI, Triton, or /generate's)."""

from __future__ import annotations

import enum
import hmac
import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from . import generate
from .anthropic_api import AnthropicError
from .openai_protocol import OpenAIError
from .options import ServerOptions

# Load balancers and orchestrators probe these without credentials; they say only whether the model is loaded.
HEALTH_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})
HTTP_KEY_HINT = "'Authorization: Bearer KEY' header"
KEY_FLAGS = "--api-key / --api-key-file"
DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


class Refusal(enum.Enum):
    MISSING = "missing"
    MALFORMED = "malformed"
    WRONG = "wrong"


class ApiKeys:
    """The server's keys; `check` compares in constant time against every one (no early exit: the time
    says nothing about which key, or how much of one, matched)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._keys = tuple(k.encode() for k in keys)
        if not self._keys:
            raise ValueError("ApiKeys needs at least one key")

    def check(self, authorization: str | bytes | None) -> Refusal | None:
        """None when `authorization` is "Bearer KEY" with one of the keys; else why it is refused."""
        if authorization is None:
            return Refusal.MISSING
        value = authorization.encode("latin-1") if isinstance(authorization, str) else authorization
        scheme, _, token = value.strip().partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return Refusal.MALFORMED
        matches = [hmac.compare_digest(token, key) for key in self._keys]
        return None if any(matches) else Refusal.WRONG


def refusal_message(refusal: Refusal, where: str) -> str:
    """What a refused client is told; `where` names how its protocol carries the key."""
    if refusal is Refusal.MISSING:
        return f"this server needs an API key: send it in an {where}, KEY one of the server's ({KEY_FLAGS})"
    if refusal is Refusal.MALFORMED:
        return f"the authorization is not 'Bearer KEY': send the API key in an {where}"
    return f"invalid API key: the key sent in the {where} is not one of the server's ({KEY_FLAGS})"


def api_key_problem(key: str) -> str | None:
    """Why `key` cannot be an API key (None: it can). HTTP headers and gRPC metadata carry printable ASCII,
    and clients strip a header's surrounding spaces, so other keys could never match."""
    if not key:
        return "an API key is empty"
    if not (key.isascii() and key.isprintable()) or " " in key:
        return "an API key must be printable ASCII without spaces"  # (the key itself is not repeated: a secret)
    return None


def origin_problem(origin: str) -> str | None:
    """Why `origin` cannot be a --cors-origins entry (None: it can). Browsers send an origin as
    scheme://host[:port], lowercase, without a default port or a path; an entry spelled otherwise would never
    match, so it must be spelled that way. "*" allows every origin."""
    if origin == "*":
        return None
    parts = urlsplit(origin)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if not parts.scheme or not parts.hostname or port == -1 or parts.username or parts.password:
        return f"{origin!r} is not an origin: write scheme://host[:port], e.g. http://localhost:3000"
    netloc = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if port is not None and port != DEFAULT_PORTS.get(parts.scheme):
        netloc += f":{port}"
    serialized = f"{parts.scheme}://{netloc}"
    if origin != serialized:
        return f"{origin!r}: write it as browsers send it, {serialized!r} (no path, lowercase, no default port)"
    return None


# llama-server's routes outside /v1 (openai_api.py's and llama_cpp_api.py's): errors in the OpenAI object
OPENAI_SHAPED = frozenset(
    ["/tokenize", "/detokenize", "/completion", "/completions", "/infill", "/embedding", "/embeddings"]
    + ["/props", "/slots", "/apply-template", "/chat/completions", "/models"]
)


def error_response(path: str, status: int, message: str, code: str | None, headers: dict[str, str]) -> Response:
    """An error in the shape of the protocol `path` belongs to (what its own routes answer)."""
    if path.startswith("/v1/messages"):  # anthropic_api.py's
        return JSONResponse(AnthropicError(status, message).body(), status_code=status, headers=headers)
    if path.startswith("/v1/") or path in OPENAI_SHAPED:  # openai_api.py's, responses_api.py's, llama_cpp_api.py's
        return OpenAIError(status, message, code=code, headers=headers).response()
    if path == "/v2" or path.startswith("/v2/"):  # triton_api.py's
        return JSONResponse({"error": message}, status_code=status, headers=headers)
    return generate.error(status, message, headers)  # /generate, /metrics, anything else


class ApiKeyAuth:
    """ASGI middleware: every HTTP request but the health probes needs `Authorization: Bearer KEY` (or
    `x-api-key: KEY`); else 401 with `WWW-Authenticate: Bearer`."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in HEALTH_PATHS:  # (lifespan; the app has no websockets)
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        api_key = headers.get("x-api-key")  # (Anthropic's clients send the key so; llama-server takes it too)
        refusal = self.keys.check(headers.get("authorization") or (f"Bearer {api_key}" if api_key else None))
        if refusal is None:
            return await self.app(scope, receive, send)
        challenge = 'Bearer error="invalid_token"' if refusal is Refusal.WRONG else "Bearer"
        code = "invalid_api_key" if refusal is Refusal.WRONG else None  # (what OpenAI's API answers)
        response = error_response(
            scope["path"], 401, refusal_message(refusal, HTTP_KEY_HINT), code, {"WWW-Authenticate": challenge}
        )
        await response(scope, receive, send)


def same_origin(origin: str, host: str | None, scheme: str) -> bool:
    """Whether `origin` (an Origin header) names the host:port the request was sent to (its Host header; a
    missing port is the default of the connection's `scheme`, which uvicorn takes from X-Forwarded-Proto
    behind a trusted proxy)."""
    if not host:
        return False
    o, h = urlsplit(origin), urlsplit(f"//{host}")
    try:
        o_port = o.port or DEFAULT_PORTS.get(o.scheme)
        h_port = h.port or DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port out of range or not a number
        return False
    return o.hostname is not None and o.hostname == h.hostname and o_port == h_port


class OriginCheck:
    """ASGI middleware: a request with an `Origin` header (sent by browsers) must come from the server's own
    origin or one of `allowed` (--cors-origins; "*": any); else 403."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app, self.allowed, self.any = app, frozenset(allowed), "*" in allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if (
            origin is None
            or self.any
            or origin in self.allowed
            or same_origin(origin, headers.get("host"), scope.get("scheme", "http"))
        ):
            return await self.app(scope, receive, send)
        message = (
            f"cross-origin request from {origin} refused: this server answers browser pages of its own origin "
            f"only; to allow this one, start it with --cors-origins {origin}"
        )
        await error_response(scope["path"], 403, message, "origin_not_allowed", {})(scope, receive, send)


def add_security(app: FastAPI, options: ServerOptions) -> None:
    """The origin check, CORS (with --cors-origins) and the API key check, on `app`. Starlette runs the
    middleware added last first, so a request meets them in this order, then whatever was added before:
    - the origin check first: a foreign page's request (a preflight included) is a 403 in the route's shape,
      whatever else it carries;
    - then CORS: it answers an allowed origin's preflight (which never carries the key: browsers send
      credentials only on the request itself), and puts its headers on every answer to that origin, the 401s
      included, so the page can read why it was refused;
    - then the key check, before the middleware that reads or bounds the body: a refused request's body is
      never read."""
    if options.api_keys:
        app.add_middleware(ApiKeyAuth, keys=ApiKeys(options.api_keys))
    if options.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(options.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],  # (mirrors the preflight's list: Authorization included)
            expose_headers=["Retry-After", "X-Request-Id", "WWW-Authenticate"],
            allow_private_network=True,  # a listed public site may call a server on localhost (Chrome's PNA)
        )
    app.add_middleware(OriginCheck, allowed=options.cors_origins)


def exposure_warnings(options: ServerOptions, host: str) -> list[str]:
    """What python -m serve warns about at start: a server reachable beyond this machine without a key, or
    with keys that cross the network in clear text."""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        local = False
    if local:
        return []
    if not options.api_keys:
        return [f"listening on {host} without --api-key: anyone who can reach this port can use the model"]
    if not options.tls:
        return [
            f"listening on {host} with API keys but no TLS: the keys cross the network in clear text "
            "(give --ssl-keyfile and --ssl-certfile)"
        ]
    return []
