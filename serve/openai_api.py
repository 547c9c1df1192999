"""OpenAI-compatible API: GET /v1/models, POST /v1/completions and /v1/chat/completions (streamed as OpenAI
streams), llama.cpp-style POST /tokenize and /detokenize, and GET /metrics. Every error is OpenAI's error
object {"error": {"message", "type", "param", "code"}}; unknown request fields are ignored."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .api import cancel_groups, sequence_events
from .chat_template import ChatTemplateError, encode_prompt, render_chat, resolve_template
from .engine import BadRequest, Engine, QueueFull
from .metrics import add_metrics_routes
from .openai_protocol import (
    ChatRequest,
    Choice,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    Job,
    OpenAIError,
    SamplingRequest,
    TokenizeRequest,
    parse_request,
)
from .sampling import SamplingParams
from .scheduler import Sequence


def add_openai_routes(app: FastAPI, engine_ref: dict) -> None:
    add_metrics_routes(app, engine_ref)
    started = int(time.time())
    templates: dict[int, str] = {}  # id(engine) -> resolved chat template

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    def engine() -> Engine:
        eng = engine_ref.get("engine")
        if eng is None:
            raise OpenAIError(
                503,
                engine_ref.get("status", "the model is still loading"),
                type="server_error",
                headers={"Retry-After": "5"},
            )
        return eng

    def check_model(eng: Engine, name: str | None) -> str:
        if name is not None and name != eng.cfg.model_name:
            raise OpenAIError(
                404,
                f"The model `{name}` does not exist; this server serves `{eng.cfg.model_name}` (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        return eng.cfg.model_name

    def chat_template(eng: Engine) -> str:
        if id(eng) not in templates:
            choice = engine_ref.get("chat_template") or getattr(eng.cfg, "chat_template", None)
            try:
                templates[id(eng)] = resolve_template(choice, eng.tok_info.chat_template)
            except (ValueError, OSError) as e:
                raise OpenAIError(500, f"server misconfigured: {e}", type="server_error") from e
        return templates[id(eng)]

    def model_card(eng: Engine) -> dict[str, Any]:
        return {
            "id": eng.cfg.model_name,
            "object": "model",
            "created": started,
            "owned_by": "aotllm",
            "max_model_len": eng.abi.max_seq_len,
        }

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(engine())]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict:
        eng = engine()
        check_model(eng, name)
        return model_card(eng)

    @app.post("/v1/completions")
    async def completions(request: Request):
        eng = engine()
        req: CompletionRequest = await parse_request(request, CompletionRequest)
        model = check_model(eng, req.model)
        if req.suffix:
            raise OpenAIError(400, "suffix (insertion) is not supported", param="suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise OpenAIError(400, "best_of is not supported; use n", param="best_of")
        if req.echo and req.logprobs is not None:
            raise OpenAIError(400, "echo with logprobs needs prompt logprobs, which are not supported", param="echo")
        p = req.prompt
        prompts: list[str | list[int]] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        ids = [_call(eng.encode, prompt) for prompt in prompts]
        params = req.sampling(16 if req.max_tokens is None else req.max_tokens, req.logprobs)
        echo = [pr if isinstance(pr, str) else eng.tokenizer.decode(pr) for pr in prompts] if req.echo else []
        return await _run(request, eng, req, model, "cmpl", ids, params, echo)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        eng = engine()
        req: ChatRequest = await parse_request(request, ChatRequest)
        model = check_model(eng, req.model)
        if (req.response_format or {}).get("type", "text") != "text":
            raise OpenAIError(400, "response_format other than text is not supported", param="response_format")
        if req.top_logprobs and not req.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        info = eng.tok_info
        try:
            text = render_chat(
                chat_template(eng),
                [m.for_template() for m in req.messages],
                req.add_generation_prompt,
                info.bos_token,
                info.eos_token,
                tools=req.tools,
                **(req.chat_template_kwargs or {}),
            )
        except (ChatTemplateError, TypeError) as e:  # TypeError: chat_template_kwargs naming a reserved variable
            raise OpenAIError(400, str(e), param="messages") from e
        ids = encode_prompt(eng.tokenizer, info, text)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, eng.abi.max_seq_len - len(ids))
        params = req.sampling(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
        return await _run(request, eng, req, model, "chatcmpl", [ids], params, [], chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        eng = engine()
        req: EmbeddingRequest = await parse_request(request, EmbeddingRequest)
        model = check_model(eng, req.model)
        if req.encoding_format not in ("float", "base64"):
            raise OpenAIError(400, "encoding_format must be float or base64", param="encoding_format")
        if req.dimensions is not None and req.dimensions != eng.abi.hidden_size:
            raise OpenAIError(
                400,
                f"this model's embeddings have {eng.abi.hidden_size} dimensions; {req.dimensions} asked for",
                param="dimensions",
            )
        prompts = req.prompts()
        if not prompts:
            raise OpenAIError(400, "the input is empty", param="input")
        ids = [_call(eng.encode, p, param="input") for p in prompts]
        rid = f"embd-{uuid.uuid4().hex}"
        getattr(request.state, "access", {}).update(id=rid, model=model, user=req.user, inputs=len(ids))
        seqs: list[Sequence] = []
        try:
            for i, x in enumerate(ids):
                seqs.append(eng.embed(x, f"{rid}-{i}"))
        except (BadRequest, QueueFull) as e:
            cancel_groups([seqs])
            if isinstance(e, QueueFull):
                raise OpenAIError(
                    503, str(e), type="server_error", code="queue_full", headers={"Retry-After": "1"}
                ) from e
            raise OpenAIError(400, f"input {len(seqs)}: {e}", param="input") from e

        async def one(seq: Sequence) -> np.ndarray:
            vec, err = None, None
            async for ev in sequence_events(seq, request):
                vec, err = ev.embedding if ev.embedding is not None else vec, ev.error or err
            if vec is None:
                raise OpenAIError(500, f"embedding failed: {err or seq.finish_reason}", type="server_error")
            return vec

        try:
            vecs = await asyncio.gather(*(one(s) for s in seqs))
        finally:
            cancel_groups([seqs])  # (no-op for finished sequences)
        n_tokens = sum(len(x) for x in ids)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                if req.encoding_format == "base64"
                else v.tolist(),
            }
            for i, v in enumerate(vecs)
        ]
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        eng = engine()
        req: TokenizeRequest = await parse_request(request, TokenizeRequest)
        text = next((t for t in (req.content, req.text, req.prompt) if t is not None), None)
        if text is None:
            raise OpenAIError(400, "give the text to tokenize as 'content'", param="content")
        special = next((s for s in (req.add_special, req.add_special_tokens) if s is not None), False)
        ids = eng.tokenizer.encode(text, add_special_tokens=special).ids
        piece = _piece_fn(eng)
        tokens: list[Any] = [{"id": i, "piece": piece(i)} for i in ids] if req.with_pieces else ids
        return {"tokens": tokens, "count": len(ids), "max_model_len": eng.abi.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        eng = engine()
        req: DetokenizeRequest = await parse_request(request, DetokenizeRequest)
        _call(eng.encode, req.tokens, param="tokens")  # range check
        text = eng.tokenizer.decode(req.tokens, skip_special_tokens=False)
        return {"content": text, "prompt": text}


def _call(fn: Any, arg: Any, param: str = "prompt") -> Any:
    try:
        return fn(arg)
    except BadRequest as e:
        raise OpenAIError(400, str(e), param=param) from e


def _bad_param(message: str) -> str | None:
    m = re.match(r"(\w+)", message)
    return m.group(1) if m and m.group(1) in SamplingParams.__dataclass_fields__ else None


async def _run(
    request: Request,
    eng: Engine,
    req: SamplingRequest,
    model: str,
    prefix: str,
    prompts: list[list[int]],
    params: SamplingParams,
    echo: list[str],
    chat: bool = False,
):
    try:
        params.validate(eng.abi.vocab_size)
    except ValueError as e:
        raise OpenAIError(400, str(e), param=_bad_param(str(e))) from e
    rid = f"{prefix}-{uuid.uuid4().hex}"
    access = getattr(request.state, "access", {})
    access.update(id=rid, model=model, user=req.user, stream=bool(req.stream), n=params.n)
    groups: list[list[Sequence]] = []
    try:
        for i, ids in enumerate(prompts):
            groups.append(eng.submit(ids, params, rid if len(prompts) == 1 else f"{rid}-{i}"))
    except (BadRequest, QueueFull) as e:
        cancel_groups(groups)
        if isinstance(e, QueueFull):
            raise OpenAIError(503, str(e), type="server_error", code="queue_full", headers={"Retry-After": "1"}) from e
        raise OpenAIError(400, str(e), param=_bad_param(str(e)) or ("messages" if chat else "prompt")) from e
    end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eng.eos_ids))
    seqs = [s for g in groups for s in g]
    piece = _piece_fn(eng)
    job = Job(
        chat=chat,
        rid=rid,
        model=model,
        prompt_tokens=sum(len(p) for p in prompts),
        choices=[Choice(i, s, end_ids) for i, s in enumerate(seqs)],
        piece=piece,
        echo=[e for e in echo for _ in range(params.n)],
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
    )
    for c, e in zip(job.choices, job.echo):
        c.offset = len(e)
    if req.stream:
        return StreamingResponse(
            _stream(job, request, access),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return await _collect(job, request, access)


def _piece_fn(eng: Engine) -> Any:
    """token id -> its text inside a sequence: decode([t, t]) minus decode([t]) keeps the leading space that
    SentencePiece drops at the start of a text (" Paris", not "Paris")."""
    cache: dict[int, str] = {}

    def piece(t: int) -> str:
        if t not in cache:
            decode = eng.tokenizer.decode
            one, two = decode([t], skip_special_tokens=False), decode([t, t], skip_special_tokens=False)
            cache[t] = two[len(one) :] if two.startswith(one) and len(two) > len(one) else one
        return cache[t]

    return piece


def _log_usage(job: Job, access: dict) -> None:
    access.update(job.usage(), finish_reasons=[c.finish_reason for c in job.choices])


async def _collect(job: Job, request: Request, access: dict) -> JSONResponse:
    async def one(c: Choice) -> None:
        async for ev in sequence_events(c.seq, request):
            c.feed(ev, job.piece)

    try:
        await asyncio.gather(*(one(c) for c in job.choices))
    finally:
        cancel_groups([[c.seq for c in job.choices if not c.finish_reason]])
        _log_usage(job, access)
    failed = next((c for c in job.choices if c.finish_reason == "error"), None)
    if failed:
        raise OpenAIError(500, f"generation failed: {failed.error}", type="server_error")
    if any(c.finish_reason != "stop" and c.finish_reason != "length" for c in job.choices):
        raise OpenAIError(499, "the client closed the request", type="invalid_request_error")
    return JSONResponse(job.full())


async def _stream(job: Job, request: Request, access: dict) -> AsyncIterator[str]:
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
        try:
            async for ev in sequence_events(c.seq, request):
                await queue.put((c, ev))
        finally:
            queue.put_nowait((c, None))

    tasks = [asyncio.create_task(pump(c)) for c in job.choices]
    try:
        for c in job.choices:
            if job.chat:
                yield job.chunk(c, None, [], role=True)
            if job.echo and job.echo[c.index]:
                yield job.chunk(c, job.echo[c.index], [])
        left = len(job.choices)
        while left:
            c, ev = await queue.get()
            if ev is None:
                left -= 1
                continue
            tokens = c.feed(ev, job.piece)
            if ev.text or tokens:
                yield job.chunk(c, ev.text, tokens)
            if ev.finish_reason in ("stop", "length"):
                yield job.chunk(c, None if job.chat else "", [], finish=ev.finish_reason)
            elif ev.finish_reason == "error":
                err = {"message": f"generation failed: {ev.error}", "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
                break
        else:
            if job.include_usage:
                yield f"data: {json.dumps({**job.envelope([], stream=True), 'usage': job.usage()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): nothing keeps pages past this point
        cancel_groups([[c.seq for c in job.choices if not c.seq.finish_reason]])
        for t in tasks:
            t.cancel()
        _log_usage(job, access)
