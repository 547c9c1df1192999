"""Run the real HTTP server (uvicorn, loopback) in a thread for tests."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import uvicorn

from serve.api import create_app
from serve.engine import Engine, EngineConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    def __init__(self, cfg: EngineConfig):
        self.state: dict = {}
        app = create_app(self.state)
        state = self.state

        @app.on_event("startup")
        async def _start():
            engine = Engine(cfg)
            await engine.start()
            state["engine"] = engine

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not (self.server.started and "engine" in self.state):
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.05)

    @property
    def engine(self) -> Engine:
        return self.state["engine"]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


TINY_MODEL_NAME = "tiny-llama"


def export_served_tiny(gguf_path: Path, out: Path, stride: int = 8) -> Path:
    """The tiny llama31 model exported (prefill 1,4 / decode 1,4,8), compiled, with a char tokenizer."""
    from compile import CompileRequest, compile_mlir
    from export import paged_llm
    from models.tokenizer import save_tokenizer
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
    return EngineConfig(model_config=out / "config.json", tokenizer=out, **kw)
