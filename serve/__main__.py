"""python -m serve: the aotllm HTTP server (and, with --grpc-port, ppl.llm.serving's gRPC service).

With no model arguments it serves the embedded default, SmolLM2-135M-Instruct: exported and compiled
into ~/.cache/aotllm on first use (minutes, with progress), reused afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
import time
from pathlib import Path

import uvicorn

from models.abi import QUANTIZATIONS

from .api import create_app
from .engine import Engine, EngineConfig
from .scheduler import PREFILL_CHUNK

log = logging.getLogger("aotllm")

# --config FILE keys (ppl.llm.serving style) -> our flags
CONFIG_KEYS = {"max_running_batch": "max_running"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__)
    p.add_argument("--config", type=Path, help="a JSON file of these flags (command-line flags win)")
    p.add_argument("--vmfb", type=Path)
    p.add_argument("--parameters", type=Path, nargs="+", help="IRPA file(s): model.irpa [model.rank*.irpa]")
    p.add_argument("--model-config", "--model_config", dest="model_config", type=Path, help="the export's config.json")
    p.add_argument(
        "--tokenizer",
        "--tokenizer_json",
        dest="tokenizer",
        type=Path,
        help="tokenizer.json or its folder (default: next to --model-config)",
    )
    p.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default="none",
        help="the default model only: build it with export's --quantization (w8a8: int8 weights and "
        "activations: ~2x faster decode on CPU, slightly different text; README)",
    )
    p.add_argument("--device", default="local-task", help="IREE driver: local-task, hip or cuda")
    p.add_argument("--device-ids", "--device_ids", dest="device_ids", type=int, nargs="+", default=[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve ppl.llm.serving's gRPC LLMService (llm.proto) on this port, same --host",
    )
    p.add_argument("--kv-pages", type=int, help="KV pages per device (default: the export's device_block_count)")
    p.add_argument("--max-running", type=int, default=16, help="sequences decoding at once per device")
    p.add_argument("--max-queue", type=int, default=256, help="requests queued or running before 503s")
    p.add_argument(
        "--max-tokens-per-step",
        type=int,
        default=PREFILL_CHUNK,
        help="prefill token budget per step: long prompts are prefilled in chunks this size",
    )
    p.add_argument(
        "--max-tokens-per-request",
        type=int,
        default=None,
        help="refuse requests asking for more completion tokens (default: the context length)",
    )
    p.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--model-name", default=None, help="the name /v1/models lists (default: the export folder's)")
    p.add_argument(
        "--chat-template",
        default=None,
        help="built-in (chatml, llama2, llama3, mistral, vicuna) or a Jinja / tokenizer_config.json "
        "file; default: the model's own, else chatml",
    )
    p.add_argument(
        "--pooling",
        choices=("mean", "last"),
        default="mean",
        help="/v1/embeddings: mean of the final hidden states, or the last one (then L2-normalised)",
    )
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    if args.config:
        try:
            conf = json.loads(args.config.read_text())
        except (OSError, json.JSONDecodeError) as e:
            p.error(f"--config {args.config}: {e}")
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for key, value in conf.items():
            dest = CONFIG_KEYS.get(key, key.replace("-", "_"))
            if not hasattr(args, dest):
                p.error(f"--config {args.config}: unknown key {key!r}")
            if dest not in given:
                setattr(
                    args,
                    dest,
                    [Path(v) for v in value]
                    if dest == "parameters"
                    else Path(value)
                    if dest in ("vmfb", "model_config", "tokenizer")
                    else value,
                )
    if args.chat_template:
        from .chat_template import resolve_template

        try:
            resolve_template(args.chat_template, None)
        except ValueError as e:
            p.error(f"--chat-template: {e}")
    model_args = [args.vmfb, args.parameters, args.model_config]
    if any(model_args) and not all(model_args):
        p.error("give --vmfb, --parameters and --model-config together (or none of them for the default model)")
    if args.vmfb and args.quantization != "none":
        p.error("--quantization builds the default model; for your own export give it to python -m export.paged_llm")
    return args


def load_engine(args, state: dict) -> None:
    """Runs in a thread while the HTTP server already answers /health with 503."""
    try:
        if not args.vmfb:
            from export.artifacts import build
            from models.default_model import export_args, smollm2_gguf

            state["status"] = "exporting and compiling the default model (first start only)"
            art = build(smollm2_gguf(), export_args(args.quantization))
            args.vmfb, args.parameters, args.model_config = art.vmfb, art.parameters, art.config
        cfg = EngineConfig(
            vmfb=args.vmfb,
            parameters=args.parameters,
            model_config=args.model_config,
            tokenizer=args.tokenizer or args.model_config.parent,
            device=args.device,
            device_ids=args.device_ids,
            kv_pages=args.kv_pages,
            max_running=args.max_running,
            max_queue=args.max_queue,
            max_tokens_per_step=args.max_tokens_per_step,
            prefix_caching=args.prefix_caching,
            max_tokens_per_request=args.max_tokens_per_request,
            pooling=args.pooling,
            model_name=args.model_name or Path(args.model_config).parent.name,
        )
        state["status"] = "loading the model"
        engine = Engine(cfg)
        asyncio.run_coroutine_threadsafe(engine.start(), state["loop"]).result()
        state["engine"] = engine
        log.info("ready: http://%s:%d", args.host, args.port)
    except Exception as e:  # keep answering /health with the reason
        log.error("could not load the model: %s", e)
        state["status"] = f"failed to load the model: {e}"


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state: dict = {"status": "starting", "chat_template": args.chat_template}
    app = create_app(state)

    @app.on_event("startup")
    async def _startup():
        state["loop"] = asyncio.get_running_loop()
        threading.Thread(target=load_engine, args=(args, state), daemon=True).start()

    if args.grpc_port is not None:
        from .grpc_api import start_grpc_server  # (imports the generated stubs: only when asked for)

        @app.on_event("startup")
        async def _start_grpc():
            app.state.grpc_server = await start_grpc_server(state, app.state.metrics, args.host, args.grpc_port)

        @app.on_event("shutdown")
        async def _stop_grpc():
            await app.state.grpc_server.stop(grace=1.0)  # open streams are cancelled, their sequences too

    t0 = time.perf_counter()
    log.info("serving on http://%s:%d (model loading in the background)", args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    log.info("stopped after %.0f s", time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
