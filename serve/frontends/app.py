"""The HTTP application: every front-end's routes on one FastAPI app, whose lifespan makes the server state,
loads the engine in a thread (the routes answer 503 meanwhile) and, when asked, serves gRPC beside it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.core.engine import Engine

from . import anthropic_api, generate, llama_cpp_api, openai_api, responses_api, triton_api
from .body import add_body_limit
from .metrics import AccessLog, Metrics
from .options import ServerOptions
from .security import add_security
from .state import RequestDefaults, ServerState, public_message, server

log = logging.getLogger("aotllm.app")

# Builds the engine; blocking (it runs in a thread while the server answers). It reports what it is doing
# through the callback: that text is the 503's message until the engine is ready.
Report = Callable[[str, "float | None"], None]  # (what it is doing, the fraction done when known)
EngineLoader = Callable[[Report], Engine]


def create_app(
    load: EngineLoader,
    chat_template: str | None = None,
    grpc_address: tuple[str, int] | None = None,
    options: ServerOptions | None = None,
    tool_call_parser: str | None = None,
    reasoning_parser: str | None = None,
    defaults: RequestDefaults | None = None,
) -> FastAPI:
    options = options or ServerOptions()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, ServerState]]:
        state = ServerState(
            metrics=Metrics(lambda: state.engine),
            chat_template=chat_template,
            tool_call_parser=tool_call_parser,
            reasoning_parser=reasoning_parser,
            defaults=defaults or RequestDefaults(),
        )
        loop = asyncio.get_running_loop()
        threading.Thread(target=_load, args=(load, state, loop), name="engine-loader", daemon=True).start()
        grpc_server = None
        if grpc_address is not None:
            from .grpc_api import start_grpc_server  # (imports the generated stubs: only when asked for)

            grpc_server = await start_grpc_server(state, *grpc_address, options)
        try:
            yield {"server": state}
        finally:
            if grpc_server is not None:
                await grpc_server.stop(grace=1.0)  # open streams are cancelled, their sequences too

    app = FastAPI(title="aotllm", lifespan=lifespan)
    # Starlette runs the middleware added last first. A request meets the access log (every answer is
    # logged, refusals included), then the origin check, CORS and the API key check (security.py: a refusal
    # from the headers alone), then the body limit.
    add_body_limit(app, options.max_body_bytes)
    add_security(app, options)
    app.add_middleware(AccessLog)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> Response:
        return generate.error(400, generate.validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        """An unknown route or method: the JSON error object every other error uses, not FastAPI's detail."""
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        error = {"code": exc.status_code, "message": f"{exc.detail}: {request.method} {request.url.path}", "type": kind}
        return JSONResponse({"error": error}, exc.status_code, headers=getattr(exc, "headers", None))

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        return Response(server(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)

    generate.add_routes(app)
    openai_api.add_routes(app)
    llama_cpp_api.add_routes(app)
    anthropic_api.add_routes(app)
    responses_api.add_routes(app)
    triton_api.add_routes(app)
    return app


def _load(load: EngineLoader, state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
    """The loader thread: build the engine, start its schedulers on the server's loop, publish it."""

    def report(status: str, progress: float | None = None) -> None:
        state.status, state.progress = public_message(status), progress  # (no server paths to clients)

    try:
        report("loading the model")
        engine = load(report)
        asyncio.run_coroutine_threadsafe(engine.start(), loop).result()
        state.engine = engine
    except Exception as e:  # keep answering with the reason (without the server's paths)
        log.exception("could not load the model")
        state.load_failed(e)
