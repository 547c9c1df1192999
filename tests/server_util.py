"""Run the real HTTP server (uvicorn, loopback) in a thread for tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from serve.core.engine import Engine, EngineConfig
from serve.frontends.app import create_app
from serve.frontends.http_server import Server
from serve.frontends.options import ServerOptions, uvicorn_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, timeout_s: float, verify: ssl.SSLContext | bool = True) -> None:
    """Until the server process at `url` answers /health with 200; fails at once if it exits or reports that
    loading failed, and after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, "the server exited" + (f": {proc.communicate()[0]}" if proc.stdout else "")
        assert time.monotonic() < deadline, "the server did not become healthy"
        try:
            r = httpx.get(f"{url}/health", timeout=5, verify=verify)
        except httpx.TransportError:
            r = None
        if r is not None:
            assert "failed" not in r.text, r.text
            if r.status_code == 200:
                return
        time.sleep(0.05)


class ServerThread:
    def __init__(self, cfg: EngineConfig, options: ServerOptions | None = None, **app_options):
        """`app_options`: create_app's (tool_call_parser, reasoning_parser, chat_template)."""
        self._engine: Engine | None = None
        options = options or ServerOptions()

        def load(report) -> Engine:
            self._engine = Engine(cfg)
            return self._engine

        app = create_app(load, options=options, **app_options)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = Server(
            uvicorn_config(app, "127.0.0.1", self.port, options, "warning"), options.shutdown_timeout_s
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not (self.server.started and httpx.get(f"{self.url}/health", timeout=5).status_code == 200):
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.05)

    @property
    def engine(self) -> Engine:
        assert self._engine is not None
        return self._engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def loading_client(status: str = "loading the model") -> Iterator[TestClient]:
    """A client of an app whose engine is still loading: its loader waits until the block ends."""
    release = threading.Event()

    def load(report) -> Engine:
        report(status)
        release.wait()
        raise RuntimeError("the test ended before the model loaded")

    try:
        with TestClient(create_app(load)) as client:
            yield client
    finally:
        release.set()


def pause(engine: Engine) -> None:
    """The engine's schedulers run no step until `resume`: whatever is queued stays queued."""

    async def idle() -> None:
        await asyncio.sleep(0.005)

    for s in engine.schedulers:
        s.step = idle  # type: ignore[method-assign]  # (run_forever on the server's loop reads it each step)


def resume(engine: Engine) -> None:
    for s in engine.schedulers:
        s.__dict__.pop("step", None)


@contextlib.contextmanager
def paused(engine: Engine) -> Iterator[None]:
    pause(engine)
    try:
        yield
    finally:
        resume(engine)


def overflow_queue(
    server: ServerThread, send: Callable[[httpx.AsyncClient], Awaitable[httpx.Response]], queued: int
) -> list[httpx.Response]:
    """`queued` requests sent while the engine is paused (they stay queued: the queue is full), then one
    more (refused), then the engine resumes and the queued ones finish. Their responses, the refused last."""

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            with paused(server.engine):
                tasks = [asyncio.create_task(send(client)) for _ in range(queued)]
                deadline = time.time() + 30
                while sum(s.load for s in server.engine.schedulers) < queued:
                    assert time.time() < deadline, "the requests were not queued"
                    await asyncio.sleep(0.01)
                refused = await send(client)
            return [*await asyncio.gather(*tasks), refused]

    return asyncio.run(run())


TINY_MODEL_NAME = "tiny-llama"


def export_served_tiny(gguf_path: Path, out: Path, stride: int = 8) -> Path:
    """The tiny llama31 model exported (prefill 1,4 / decode 1,4,8), compiled, with a char tokenizer."""
    from compile import CompileRequest, compile_mlir
    from export import paged_llm
    from models.gguf_tokenizer import save_tokenizer
    from tests.tiny import char_tokenizer

    assert (
        paged_llm.main(
            [
                "--gguf-file",
                str(gguf_path),
                "--output-dir",
                str(out),
                "--bs-prefill",
                "1,4",
                "--bs-decode",
                "1,4,8",
                "--block-seq-stride",
                str(stride),
                "--device-block-count",
                "128",
            ]
        )
        == 0
    )
    compile_mlir(CompileRequest(out / "model.mlir"), out / "model.vmfb")
    save_tokenizer(*char_tokenizer(), out)
    return out


def tiny_config(out: Path, **kw) -> EngineConfig:
    kw.setdefault("model_name", TINY_MODEL_NAME)
    kw.setdefault("vmfb", out / "model.vmfb")
    kw.setdefault("parameters", [out / "model.irpa"])
    kw.setdefault("tokenizer", out)
    return EngineConfig(model_config=out / "config.json", **kw)


# A tiny-model server for the chat APIs' tool tests: its template shows the tools briefly (their names) and
# the calls of earlier turns not at all (the server writes them into the content in the parser's format),
# since the tiny model's context is 512 characters. The two tools' argument schemas: each API's tests wrap
# them in its own tool shape.
TOOLS_TEMPLATE = (
    "{% if tools %}[{{ tools | map(attribute='function.name') | join(',') }}]{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
)
TOOL_PARAMETERS: dict[str, dict] = {
    "get_weather": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "days": {"type": "integer", "minimum": 1, "maximum": 14},
        },
        "required": ["city", "days"],
        "additionalProperties": False,  # (else any other key may come too: JSON schema's default)
    },
    "get_time": {
        "type": "object",
        "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    },
}
TOOL_DESCRIPTIONS = {"get_weather": "The weather in a city."}


def tools_server(program: Path, template_dir: Path, **app_options) -> ServerThread:
    """A server over the tiny program with TOOLS_TEMPLATE (`app_options`: the parsers)."""
    template = template_dir / "tools.jinja"
    template.write_text(TOOLS_TEMPLATE)
    return ServerThread(tiny_config(program), chat_template=str(template), **app_options)
