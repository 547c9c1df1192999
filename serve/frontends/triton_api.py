"""Triton Inference Server's HTTP API as the TensorRT-LLM backend serves it: health, server and model
metadata, and the generate extension (POST /v2/models/{name}[/versions/1]/generate and /generate_stream).

The model answers to its served name (`engine.cfg.model_name`) and to the aliases "ensemble",
"tensorrt_llm_bls" and "tensorrt_llm" (TensorRT-LLM's model repository), so its clients work unchanged.
Fields follow the ensemble's inputs, top-level or in "parameters"; one-element lists are scalars; unknown
fields are ignored. TensorRT-LLM's rules, and where we differ:
- text_output = the prompt (as given) + the generated text, unless `exclude_input_in_output`; streamed
  pieces are only the generated text.
- Greedy when none of temperature / top_k / top_p is given, or temperature 0, top_k 1 or top_p 0; else
  temperature defaults to 1, top_k to 0 (all), top_p to 1 (TensorRT-LLM's LLM API rule).
- stop_words are stop strings; the output ends before them (TensorRT-LLM matches tokens and keeps them).
- bad_words: logit bias -100 on each word's first token: exact for single-token words; a multi-token
  word bans every word that starts with its first token (TensorRT-LLM bans the exact sequence).
- end_id adds a stop token (EOS still stops); end_id -1, `ignore_eos` or min_length >= max_tokens ignore
  EOS; other min_length values and pad_id are accepted and unused.
- generate_stream streams with `stream: true`; without it, the whole answer comes as one event.
Errors are {"error": message}: 400 naming the field, 404 unknown model, 503 + Retry-After while loading
or when the queue is full. Streams end without a [DONE] marker; a failure mid-stream is an error event.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from importlib import metadata
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from serve.core.engine import BadRequest, Engine, QueueFull
from serve.core.sampling import SamplingParams
from serve.core.scheduler import Event, Sequence

from . import constraints
from .body import BodyError, parse_body
from .common import cancel, collect, error_status, event_stream, field_message, sequence_events, submit
from .generate import validation_message
from .metrics import access_record
from .state import NotReady, server
from .tokenizing import off_loop, prompt_ids

ALIASES = ("ensemble", "tensorrt_llm_bls", "tensorrt_llm")
VERSION = "1"
BAD_WORD_BIAS = -100.0
WORD_LISTS = ("bad_words", "stop_words")
# SamplingParams' names in engine errors -> the request field a Triton client sent
FIELD_NAMES = {"stop_token_ids": "end_id", "stop": "stop_words", "logit_bias": "bad_words", "seed": "random_seed"}
_TENSORS = {
    ("BYTES", 2): "text_input bad_words stop_words",
    ("INT32", 2): "max_tokens",
    ("INT32", 1): "end_id pad_id top_k min_length beam_width num_return_sequences",
    ("FP32", 1): "temperature top_p min_p repetition_penalty presence_penalty frequency_penalty",
    ("UINT64", 1): "random_seed",
    ("BOOL", 1): "stream return_log_probs exclude_input_in_output",
}
INPUTS = [
    {"name": n, "datatype": t, "shape": [-1, -1] if rank == 2 else [-1, 1]}
    for (t, rank), names in _TENSORS.items()
    for n in names.split()
]
OUTPUTS = [
    {"name": "text_output", "datatype": "BYTES", "shape": [-1, -1]},
    {"name": "cum_log_probs", "datatype": "FP32", "shape": [-1, -1]},
    {"name": "output_log_probs", "datatype": "FP32", "shape": [-1, -1, -1]},
]


class TritonError(Exception):
    """Answered as Triton's error object {"error": message}."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class TritonGenerateRequest(BaseModel):
    """The TensorRT-LLM ensemble's inputs, as the generate extension's JSON carries them."""

    model_config = ConfigDict(extra="ignore")

    text_input: str
    max_tokens: int = Field(ge=1)
    bad_words: str | list[str] | None = None
    stop_words: str | list[str] | None = None
    end_id: int | None = Field(None, ge=-1)
    pad_id: int | None = None
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0, validation_alias=AliasChoices("top_k", "runtime_top_k"))
    top_p: float | None = Field(None, ge=0, le=1, validation_alias=AliasChoices("top_p", "runtime_top_p"))
    min_p: float = Field(0.0, ge=0, le=1)
    random_seed: int | None = Field(None, validation_alias=AliasChoices("random_seed", "seed"))
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    min_length: int = Field(0, ge=0)
    beam_width: int = Field(1, ge=1, le=1)  # beam search is not implemented
    num_return_sequences: int = Field(1, ge=1, le=1)
    stream: bool = False
    return_log_probs: bool = False
    return_finish_reason: bool = False  # (the vLLM backend's flag) adds "finish_reason": "stop" | "length"
    exclude_input_in_output: bool = False
    ignore_eos: bool = False
    guided_decoding_guide_type: str | None = None  # json, json_schema, regex, ebnf_grammar (TensorRT-LLM's)
    guided_decoding_guide: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        params = data.get("parameters")
        merged = {**params, **data} if isinstance(params, dict) else dict(data)
        merged.pop("parameters", None)
        return {
            k: v[0] if isinstance(v, list) and len(v) == 1 and k not in WORD_LISTS else v for k, v in merged.items()
        }

    def sampling(self, eng: Engine) -> SamplingParams:
        greedy = (
            (self.temperature is None and self.top_k is None and self.top_p is None)
            or self.temperature == 0
            or self.top_k == 1
            or self.top_p == 0
        )
        bias: dict[int, float] = {}
        for word in _words(self.bad_words):
            ids = eng.tokenizer.encode(word, add_special_tokens=False).ids
            if ids:
                bias[ids[0]] = BAD_WORD_BIAS
        try:
            constraint = constraints.one(
                constraints.triton_guide(self.guided_decoding_guide_type, self.guided_decoding_guide)
            )
        except constraints.FieldError as e:
            raise TritonError(400, str(e)) from e
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=0.0 if greedy else (self.temperature or 1.0),
            top_k=self.top_k or 0,
            top_p=self.top_p or 1.0,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=bias,
            seed=self.random_seed,
            stop=_words(self.stop_words),
            stop_token_ids=[] if self.end_id in (None, -1) else [self.end_id],
            ignore_eos=self.ignore_eos or self.end_id == -1 or self.min_length >= self.max_tokens,
            logprobs=0 if self.return_log_probs else None,
            constraint=constraint and constraint[1],
        )


def _words(words: str | list[str] | None) -> list[str]:
    """A word list as TensorRT-LLM's preprocessing reads it: each string is one word; "" is none."""
    return [w for w in ([words] if isinstance(words, str) else words or []) if w]


def check_model(eng: Engine, name: str, version: str | None) -> None:
    if name not in (eng.cfg.model_name, *ALIASES):
        raise TritonError(
            404,
            f"Request for unknown model: '{name}' is not found; this server serves "
            f"'{eng.cfg.model_name}' (also as {', '.join(ALIASES)})",
        )
    if version not in (None, VERSION):
        raise TritonError(
            404, f"Request for unknown model: '{name}' version {version} is not found; the only version is {VERSION}"
        )


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def add_routes(app: FastAPI) -> None:
    try:
        server_version = metadata.version("aotllm")
    except metadata.PackageNotFoundError:
        server_version = "unknown"

    @app.exception_handler(TritonError)
    async def _triton_error(request: Request, exc: TritonError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    def engine(request: Request) -> Engine:
        try:
            return server(request).ready_engine()
        except NotReady as e:
            raise TritonError(503, str(e), {"Retry-After": "5"}) from e

    @app.get("/v2/health/live")
    async def health_live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def health_ready(request: Request) -> Response:
        engine(request)
        return Response(status_code=200)

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "aotllm", "version": server_version, "extensions": ["generate"]}

    async def model_metadata(request: Request, name: str, version: str | None = None) -> dict[str, Any]:
        check_model(engine(request), name, version)
        return {"name": name, "versions": [VERSION], "platform": "ensemble", "inputs": INPUTS, "outputs": OUTPUTS}

    async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
        check_model(engine(request), name, version)
        return Response(status_code=200)

    async def generate(request: Request, name: str, version: str | None = None) -> Response:
        return await _generate(request, engine(request), name, version, sse=False)

    async def generate_stream(request: Request, name: str, version: str | None = None) -> Response:
        return await _generate(request, engine(request), name, version, sse=True)

    m = "/v2/models/{name:path}"  # a served name may hold "/": the more specific paths come first
    for v in ("/versions/{version}", ""):
        app.add_api_route(f"{m}{v}/generate", generate, methods=["POST"])
        app.add_api_route(f"{m}{v}/generate_stream", generate_stream, methods=["POST"])
        app.add_api_route(f"{m}{v}/ready", model_ready, methods=["GET"])
    for v in ("/versions/{version}", ""):
        app.add_api_route(f"{m}{v}", model_metadata, methods=["GET"])


async def _generate(request: Request, eng: Engine, name: str, version: str | None, sse: bool) -> Response:
    check_model(eng, name, version)
    try:
        req = await parse_body(request, TritonGenerateRequest)
    except BodyError as e:
        raise TritonError(e.status, e.message) from e
    except ValidationError as e:
        raise TritonError(400, validation_message(e)) from e
    if not req.text_input:
        raise TritonError(400, "text_input is empty")
    rid = f"triton-{uuid.uuid4().hex}"
    size = len(req.text_input) + sum(len(w) for w in _words(req.bad_words))
    try:
        params, ids = await off_loop(lambda: (req.sampling(eng), prompt_ids(eng, req.text_input)), size)
        [seq] = await submit(eng, [ids], params, rid)
    except QueueFull as e:
        raise TritonError(503, str(e), {"Retry-After": "1"}) from e
    except BadRequest as e:
        raise TritonError(400, field_message(e, FIELD_NAMES)) from e
    streaming = sse and req.stream
    record = access_record()
    record.id, record.model, record.stream = rid, name, streaming
    head = {
        "model_name": name,
        "model_version": VERSION,
        "sequence_end": False,
        "sequence_id": 0,
        "sequence_start": False,
    }
    if streaming:
        return event_stream(_stream(seq, request, head, req))
    body = await _collect(seq, request, head, req)
    if sse:
        return StreamingResponse(iter([_data(body)]), media_type="text/event-stream")
    return JSONResponse(body)


async def _collect(seq: Sequence, request: Request, head: dict[str, Any], req: TritonGenerateRequest) -> dict:
    pieces: list[str] = []
    logprobs: list[float] = []
    error: str | None = None

    def on_event(_: int, ev: Event) -> None:
        nonlocal error
        pieces.append(ev.text)
        logprobs.extend(s.logprob or 0.0 for s in ev.logprobs)
        error = ev.error or error

    await collect([seq], request, on_event)
    if error is not None or seq.finish_reason == "error":
        raise TritonError(error_status(error), f"generation failed: {error}")
    if seq.finish_reason not in ("stop", "length"):
        raise TritonError(499, "the client closed the request")
    text = "".join(pieces)
    body = {**head, "text_output": text if req.exclude_input_in_output else req.text_input + text}
    if req.return_log_probs:
        body.update(output_log_probs=logprobs, cum_log_probs=sum(logprobs))
    if req.return_finish_reason:
        body["finish_reason"] = seq.finish_reason
    return body


async def _stream(
    seq: Sequence, request: Request, head: dict[str, Any], req: TritonGenerateRequest
) -> AsyncIterator[str]:
    cum = 0.0
    try:
        async for ev in sequence_events(seq, request):
            if ev.error:
                yield _data({"error": f"generation failed: {ev.error}"})
                return
            chunk = {**head, "text_output": ev.text}
            if req.return_log_probs:
                logprobs = [s.logprob or 0.0 for s in ev.logprobs]
                cum += sum(logprobs)
                chunk.update(output_log_probs=logprobs, cum_log_probs=cum)
            if req.return_finish_reason and ev.finish_reason:
                chunk["finish_reason"] = ev.finish_reason
            if ev.text or (req.return_log_probs and ev.logprobs) or "finish_reason" in chunk:
                yield _data(chunk)
    finally:  # the client went away (or we are done): nothing keeps pages past this point
        cancel([seq])
