"""python -m serve: the aotllm HTTP server (and, with --grpc-port, ppl.llm.serving's gRPC service).

With no model arguments it serves the embedded default, SmolLM2-135M-Instruct: exported and compiled
into ~/.cache/aotllm on first use (minutes, with progress), reused afterwards.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .core.engine import Engine, EngineConfig
from .core.speculative import SpecConfig
from .flags import parse_args
from .frontends.app import Report, create_app
from .frontends.http_server import Server
from .frontends.options import ServerOptions, uvicorn_config
from .frontends.security import exposure_warnings
from .frontends.state import RequestDefaults

log = logging.getLogger("aotllm")


TARGETS = {"local-task": "llvm-cpu", "local-sync": "llvm-cpu", "hip": "hip", "cuda": "cuda"}


def engine_loader(args: argparse.Namespace) -> Callable[[Report], Engine]:
    """Builds the engine from the flags (runs in the app's loader thread while /health says 503)."""

    def load(report: Report) -> Engine:
        vmfb, parameters, model_config = args.vmfb, args.parameters, args.model_config
        source = args.gguf_file or args.hf_dir or args.irpa_file
        if not vmfb:
            # The exporter runs in a subprocess: this process stays torch-free.
            from export.artifacts import build
            from models.default_model import export_args, smollm2_gguf

            weights = args.weights or ("auto" if source else "float32")
            if args.quantization == "w8a8":
                weights = "w8a8"
            if source is None:
                report("exporting and compiling the default model (first start only)", None)
            target = TARGETS.get(args.device.split("://")[0], "llvm-cpu")
            kind = {"auto": "gguf", "float32": "none"}.get(weights, weights)
            art = build(source or smollm2_gguf(), export_args(kind, target), target, args.arch, report)
            vmfb, parameters, model_config = art.vmfb, art.parameters, art.config
        cfg = EngineConfig(
            vmfb=vmfb,
            parameters=parameters,
            model_config=model_config,
            tokenizer=args.tokenizer or model_config.parent,
            device=args.device,
            device_ids=args.device_ids,
            kv_pages=args.kv_pages,
            max_running=args.max_running,
            max_queue=args.max_queue,
            max_tokens_per_step=args.max_tokens_per_step,
            prefix_caching=args.prefix_caching,
            max_tokens_per_request=args.max_tokens_per_request,
            pooling=args.pooling,
            max_context=args.ctx_size,
            threads=args.threads,
            mixed_step=args.mixed_step,
            speculative=SpecConfig(num_tokens=args.num_speculative_tokens) if args.speculative == "ngram" else None,
            model_name=args.model_name or (Path(source).stem if source else Path(model_config).parent.name),
        )
        report("loading the model", None)
        engine = Engine(cfg)
        log.info("ready: %s://%s:%d", "https" if args.ssl_certfile else "http", args.host, args.port)
        return engine

    return load


def server_options(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        api_keys=tuple(args.api_keys),
        cors_origins=tuple(args.cors_origins),
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        max_body_bytes=args.max_body_bytes,
        max_connections=args.max_connections,
        idle_timeout_s=args.idle_timeout,
        read_timeout_s=args.read_timeout,
        shutdown_timeout_s=args.shutdown_timeout,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    grpc_address = None if args.grpc_port is None else (args.host, args.grpc_port)
    options = server_options(args)
    for warning in args.warnings:
        log.warning(warning)
    defaults = RequestDefaults(temperature=args.temp, seed=args.seed, max_tokens=args.n_predict)
    app = create_app(
        engine_loader(args),
        args.chat_template,
        grpc_address,
        options,
        args.tool_call_parser,
        args.reasoning_parser,
        defaults,
    )
    t0 = time.perf_counter()
    scheme = "https" if options.tls else "http"
    log.info("serving on %s://%s:%d (model loading in the background)", scheme, args.host, args.port)
    for warning in exposure_warnings(options, args.host):
        log.warning(warning)
    Server(uvicorn_config(app, args.host, args.port, options, args.log_level), options.shutdown_timeout_s).run()
    log.info("stopped after %.0f s", time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
