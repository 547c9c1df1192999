"""python -m serve's flags: argparse, one table of other servers' spellings, and --config FILE merging."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from models.abi import QUANTIZATIONS

from .core.scheduler import PREFILL_CHUNK
from .core.speculative import SpecConfig

# Other servers' spellings of our flags -> our flag's name (its argparse dest). Each is accepted on the
# command line (--ALIAS) and as a --config key: shortfin's flags and ppl.llm.serving's config keys.
ALIASES = {
    "model_config": "model_config",
    "tokenizer_json": "tokenizer",
    "device_ids": "device_ids",
    "max_running_batch": "max_running",
}


def _parser(suppress_defaults: bool = False) -> argparse.ArgumentParser:
    """The flags; with `suppress_defaults`, a namespace holds only the flags given on the command line."""
    p = argparse.ArgumentParser(
        prog="python -m serve",
        description="The aotllm HTTP server (and, with --grpc-port, ppl.llm.serving's gRPC service).",
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
    )

    def flag(name: str, **kw: Any) -> None:
        dest = kw.setdefault("dest", name.lstrip("-").replace("-", "_"))
        aliases = [f"--{a}" for a, d in ALIASES.items() if d == dest and f"--{a}" != name]
        if suppress_defaults:
            kw.pop("default", None)
        p.add_argument(name, *aliases, **kw)

    flag("--config", type=Path, help="a JSON file of these flags (command-line flags win)")
    flag(
        "--gguf-file",
        type=Path,
        help="serve this GGUF: exported and compiled for --device on first use into ~/.cache/aotllm "
        "(/health says how far; a restart reuses it)",
    )
    flag("--hf-dir", type=Path, help="as --gguf-file, for a Hugging Face folder (config.json + safetensors)")
    flag("--irpa-file", type=Path, help="as --gguf-file, for an IRPA written by export.paged_llm")
    flag(
        "--weights",
        choices=["auto", "float32", "bfloat16", "float16", "w8a8"],
        default=None,
        help="how the built program holds the weights (export.paged_llm --weights); default: auto for "
        "--gguf-file (its quantizations kept), float32 (or --quantization) for the default model",
    )
    flag("--arch", default=None, help="GPU architecture to build for with --device hip / cuda (gfx942, sm_80)")
    flag("--vmfb", type=Path)
    flag("--parameters", type=Path, nargs="+", help="IRPA file(s): model.irpa [model.rank*.irpa]")
    flag("--model-config", type=Path, help="the export's config.json")
    flag("--tokenizer", type=Path, help="tokenizer.json or its folder (default: next to --model-config)")
    flag(
        "--quantization",
        choices=QUANTIZATIONS,
        default="none",
        help="the default model only: build it with export's --quantization (w8a8: int8 weights and "
        "activations: faster decode on CPU, slightly different text; docs/benchmarks.md)",
    )
    flag("--device", default="local-task", help="IREE driver: local-task, hip or cuda")
    flag("--device-ids", type=int, nargs="+", default=[0])
    flag("--host", default="127.0.0.1")
    flag("--port", type=int, default=8000)
    flag(
        "--grpc-port",
        type=int,
        default=None,
        help="also serve ppl.llm.serving's gRPC LLMService (llm.proto) on this port, same --host",
    )
    flag("--kv-pages", type=int, help="KV pages per device (default: the export's device_block_count)")
    flag("--max-running", type=int, default=16, help="sequences decoding at once per device")
    flag("--max-queue", type=int, default=256, help="requests queued or running before 503s")
    flag(
        "--max-tokens-per-step",
        type=int,
        default=PREFILL_CHUNK,
        help="prefill token budget per step while sequences decode: long prompts are prefilled in chunks "
        "this size (while none decodes: at least 256)",
    )
    flag(
        "--max-tokens-per-request",
        type=int,
        default=None,
        help="refuse requests asking for more completion tokens (default: the context length)",
    )
    flag("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    flag(
        "--mixed-step",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run a step's decode tokens and prefill chunks in one program call (--no-mixed-step: separate "
        "calls, every prefill chunk then stalls the decoding streams)",
    )
    flag(
        "--speculative",
        choices=["ngram", "off"],
        default="ngram",
        help="speculative decoding with prompt-lookup drafts (n-grams of the prompt and output so far), "
        f"verified in one call; only in steps that decode at most {SpecConfig.max_batch} sequences and prefill none",
    )
    flag(
        "--num-speculative-tokens",
        type=int,
        default=SpecConfig.num_tokens,
        help="drafted tokens per step at most (--speculative ngram)",
    )
    flag("--model-name", default=None, help="the name /v1/models lists (default: the export folder's)")
    flag(
        "--chat-template",
        default=None,
        help="built-in (chatml, llama2, llama3, mistral, vicuna) or a Jinja / tokenizer_config.json "
        "file; default: the model's own, else chatml",
    )
    flag(
        "--tool-call-parser",
        choices=("auto", "llama3", "hermes", "mistral"),
        default="auto",
        help="how the model writes tool calls (chat completions with tools): auto picks from the chat template "
        "(hermes, whose format the server teaches a template without tools, when it says nothing)",
    )
    flag(
        "--reasoning-parser",
        choices=("deepseek_r1", "qwen3"),
        default=None,
        help="split <think>...</think> off the chat answer into reasoning_content (default: no split)",
    )
    flag(
        "--pooling",
        choices=("mean", "last", "cls", "none", "rank"),
        default="mean",
        help="/v1/embeddings: mean of the final hidden states, or the last one (then L2-normalised)",
    )
    flag(
        "--api-key",
        dest="api_keys",
        action="append",
        default=[],
        help="require 'Authorization: Bearer KEY' on every route but the health probes (/health, "
        "/v2/health/live|ready), and in gRPC's 'authorization' metadata (repeatable)",
    )
    flag("--api-key-file", type=Path, help="a file of API keys, one per line")
    flag("--ssl-keyfile", type=Path, help="serve HTTPS (and TLS gRPC) with this private key (PEM)")
    flag("--ssl-certfile", type=Path, help="... and this certificate chain (PEM)")
    flag(
        "--cors-origins",
        nargs="+",
        default=[],
        help="browser origins (scheme://host[:port], or *) allowed cross-origin requests, with CORS headers; "
        "a browser request from any other origin but the server's own is refused (default: none)",
    )
    flag("--max-body-bytes", type=int, default=8 << 20, help="larger request bodies get a 413")
    flag("--max-connections", type=int, default=1024, help="open HTTP connections; more are refused")
    flag("--idle-timeout", type=float, default=5.0, help="seconds a kept-alive connection may sit idle")
    flag("--read-timeout", type=float, default=30.0, help="seconds a request's headers and body may take")
    flag(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM/SIGINT, seconds running requests get to finish before they end with an error",
    )
    flag("--log-level", default="info")
    _llama_server_flags(p, suppress_defaults)
    return p


def _llama_server_flags(p: argparse.ArgumentParser, suppress_defaults: bool) -> None:
    """llama-server's common flags, with its meaning, so that its command lines work with the program's name
    swapped. Those that change nothing here are accepted; parse_args warns where ours differs."""
    g = p.add_argument_group("llama-server's flags")
    default = (lambda v: argparse.SUPPRESS) if suppress_defaults else (lambda v: v)
    g.add_argument("-m", "--model", dest="gguf_file", type=Path, default=argparse.SUPPRESS, help="= --gguf-file")
    g.add_argument("--alias", "-a", dest="model_name", default=argparse.SUPPRESS, help="= --model-name")
    g.add_argument("-np", "--parallel", dest="max_running", type=int, default=argparse.SUPPRESS, help="= --max-running")
    g.add_argument("--chat-template-file", dest="chat_template", default=argparse.SUPPRESS, help="= --chat-template")
    g.add_argument(
        "-c", "--ctx-size", type=int, default=default(None), help="the context in tokens (at most the program's)"
    )
    g.add_argument("-n", "--n-predict", type=int, default=default(None), help="max tokens when a request gives none")
    g.add_argument("--temp", type=float, default=default(None), help="temperature when a request gives none")
    g.add_argument("--seed", type=int, default=default(None), help="seed when a request gives none (-1: random)")
    g.add_argument("-t", "--threads", type=int, default=default(None), help="IREE CPU worker threads")
    g.add_argument(
        "--cors",
        dest="cors_origins",
        default=argparse.SUPPRESS,
        type=lambda v: v.split(","),
        help="= --cors-origins (comma-separated)",
    )
    for flags in (("--jinja",), ("--embeddings", "--embedding"), ("--metrics",), ("-cb", "--cont-batching")):
        g.add_argument(*flags, action="store_true", default=default(False), help="accepted: always on here")
    g.add_argument("--no-jinja", action="store_true", default=default(False), help="refused: templates are Jinja")
    g.add_argument("-nocb", "--no-cont-batching", action="store_true", default=default(False), help="refused")
    g.add_argument("-fa", "--flash-attn", nargs="?", const="on", default=default(None), help="accepted (on, auto)")
    g.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", default=default(None), help="warned: see --device")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _parser()
    args = p.parse_args(argv)
    if args.config:
        given = vars(_parser(suppress_defaults=True).parse_args(argv))
        _merge_config(p, args, given)
    if args.chat_template:
        from .frontends.chat_template import resolve_template

        try:
            resolve_template(args.chat_template, None)
        except ValueError as e:
            p.error(f"--chat-template: {e}")
    model_args = [args.vmfb, args.parameters, args.model_config]
    if any(model_args) and not all(model_args):
        p.error("give --vmfb, --parameters and --model-config together (or none of them for the default model)")
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        p.error("give --ssl-keyfile and --ssl-certfile together")
    if not 1 <= args.num_speculative_tokens <= 16:
        p.error(f"--num-speculative-tokens must be in [1, 16], got {args.num_speculative_tokens}")
    if args.api_key_file:
        try:
            from_file = [k.strip() for k in args.api_key_file.read_text().splitlines() if k.strip()]
        except OSError as e:
            p.error(f"--api-key-file: {e}")
        if not from_file:  # (serving without keys is not what a key file asks for)
            p.error(f"--api-key-file {args.api_key_file}: no keys in it (one per line)")
        args.api_keys = [*args.api_keys, *from_file]
    _check_security(p, args)
    sources = [f for f in ("gguf_file", "hf_dir", "irpa_file", "vmfb") if getattr(args, f)]
    if len(sources) > 1:
        p.error(f"give one model: {' and '.join('--' + f.replace('_', '-') for f in sources)} were given")
    if args.vmfb and (args.quantization != "none" or args.weights):
        p.error(
            "--quantization / --weights build a program; for your own export give them to python -m export.paged_llm"
        )
    if args.quantization != "none" and args.weights not in (None, args.quantization):
        p.error(f"--quantization {args.quantization} and --weights {args.weights} disagree")
    for f in ("gguf_file", "hf_dir", "irpa_file"):
        if getattr(args, f) and not getattr(args, f).exists():
            p.error(f"--{f.replace('_', '-')} {getattr(args, f)}: no such file or directory")
    args.warnings = _llama_server_meaning(p, args)
    return args


def _llama_server_meaning(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """llama-server's flags checked: an error where we cannot honour one, the warnings where ours differs;
    its "unset" values (0 context, -1 n_predict or seed) become None."""
    if args.no_jinja:
        p.error("--no-jinja: chat templates are always rendered as Jinja here; drop the flag")
    if args.no_cont_batching:
        p.error("--no-cont-batching: continuous batching is how this server schedules; drop the flag")
    if args.pooling in ("cls", "none", "rank"):
        p.error(f"--pooling {args.pooling}: only mean and last are supported (pooled, L2-normalised)")
    for name in ("ctx_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            setattr(args, name, None)  # (llama-server: 0 / -1 = the model's or the machine's default)
    if args.n_predict is not None and args.n_predict < 0:
        args.n_predict = None
    if args.seed is not None and args.seed < 0:
        args.seed = None
    warnings = []
    if args.flash_attn in ("off", "0", "false"):
        warnings.append("--flash-attn off: attention is always the fused paged kernel here (the flag changes nothing)")
    if args.n_gpu_layers is not None:
        warnings.append(
            "-ngl / --n-gpu-layers: layers are not offloaded one by one here; the whole program runs on --device "
            "(local-task: the CPU; hip / cuda: the GPU)"
        )
    return warnings


def _check_security(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """API keys and CORS origins that could never match a request are errors, not silently dead entries."""
    from .frontends.security import api_key_problem, origin_problem

    for key in args.api_keys:
        if problem := api_key_problem(key):
            p.error(f"--api-key / --api-key-file: {problem}")
    for origin in args.cors_origins:
        if problem := origin_problem(origin):
            p.error(f"--cors-origins: {problem}")


def _merge_config(p: argparse.ArgumentParser, args: argparse.Namespace, given: dict[str, Any]) -> None:
    """The --config file's keys (our names, with - or _, or an alias) fill the flags not given on the
    command line, converted as the flag converts its value."""
    try:
        conf = json.loads(args.config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        p.error(f"--config {args.config}: {e}")
    if not isinstance(conf, dict):
        p.error(f"--config {args.config}: expected a JSON object of flags")
    actions: dict[str, argparse.Action] = {}
    for a in p._actions:  # (a dest's own flag first: llama-server's spellings of it come later)
        actions.setdefault(a.dest, a)
    for key, value in conf.items():
        name = key.replace("-", "_")
        dest = ALIASES.get(name, name)
        action = actions.get(dest)
        if action is None or dest in ("config", "help"):
            p.error(f"--config {args.config}: unknown key {key!r}")
        if dest in given:
            continue
        convert = action.type if callable(action.type) else (lambda v: v)
        many = action.nargs in ("+", "*") or isinstance(action, argparse._AppendAction)
        if many and not isinstance(value, list):  # (a string would be taken apart into one-character items)
            p.error(f"--config {args.config}: {key!r} takes a list (a JSON array)")
        setattr(args, dest, [convert(v) for v in value] if many else convert(value))
