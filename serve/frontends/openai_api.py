"""OpenAI-compatible API: GET /v1/models, POST /v1/completions and /v1/chat/completions (streamed as OpenAI
streams), POST /v1/embeddings, and llama.cpp-style POST /tokenize and /detokenize. Every error is OpenAI's error
object {"error": {"message", "type", "param", "code"}}; unknown request fields are ignored."""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from functools import partial
from typing import Any, cast

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from serve.core.engine import BadRequest, Engine, QueueFull
from serve.core.sampling import MAX_TOKENS_LIMIT, SamplingParams
from serve.core.scheduler import Event

from . import chat
from .chat import ChatInput
from .chat_output import ChatOutput
from .common import Submission, collect, error_status, event_stream, fan_in, sequence_events, submit
from .metrics import access_record
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
    finish_reason,
    parse_request,
    token_texts,
)
from .state import NotReady, RequestDefaults, ServerState, server
from .tokenizing import Prompt, decode_ids, encode_prompts, encode_text, off_loop

log = logging.getLogger("aotllm.openai")
# /tokenize takes texts of up to this many contexts (or this many tokens, if more).
TOKENIZE_CONTEXTS = 8
TOKENIZE_MIN_LIMIT = 65536


def add_routes(app: FastAPI) -> None:
    started = int(time.time())

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    def engine(request: Request) -> Engine:
        try:
            return server(request).ready_engine()
        except NotReady as e:
            raise OpenAIError(503, str(e), type="server_error", headers={"Retry-After": "5"}) from e

    def check_model(eng: Engine, name: str | None) -> str:
        """The served model's name, whatever name the request gives: one model is served, and clients send
        the names they were written for (gpt-3.5-turbo, text-embedding-3-small), as llama-server allows."""
        return eng.cfg.model_name

    def model_card(eng: Engine) -> dict[str, Any]:
        return {
            "id": eng.cfg.model_name,
            "object": "model",
            "created": started,
            "owned_by": "aotllm",
            "max_model_len": eng.abi.max_seq_len,
        }

    @app.get("/v1/models")
    @app.get("/models")  # (llama-server's spelling)
    async def list_models(request: Request) -> dict:
        return {"object": "list", "data": [model_card(engine(request))]}

    @app.get("/v1/models/{name:path}")
    async def get_model(request: Request, name: str) -> dict:
        eng = engine(request)
        if name != eng.cfg.model_name:
            raise OpenAIError(
                404,
                f"The model `{name}` does not exist; this server serves `{eng.cfg.model_name}` (see GET /v1/models)",
                param="model",
                code="model_not_found",
            )
        return model_card(eng)

    @app.post("/v1/completions")
    async def completions(request: Request):
        eng = engine(request)
        req: CompletionRequest = await parse_request(request, CompletionRequest)
        model = check_model(eng, req.model)
        if req.suffix:
            raise OpenAIError(400, "suffix (insertion) is not supported", param="suffix")
        if req.best_of is not None and req.best_of != (req.n or 1):
            raise OpenAIError(400, "best_of is not supported; use n", param="best_of")
        p = req.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            prompts = [cast(str | list[int], p)]
        else:
            prompts = list(cast(list[str] | list[list[int]], p))
        if not prompts:
            raise OpenAIError(400, "the prompt is empty", param="prompt")
        ids = await _encode(eng, prompts, "prompt")
        defaults = _apply_defaults(req, server(request))
        if req.max_tokens is not None:
            max_tokens = req.max_tokens
        elif req.n_predict is not None and req.n_predict >= 0:
            max_tokens = req.n_predict
        elif req.n_predict is not None:  # (-1: llama.cpp's "until the end", within the server's cap)
            max_tokens = chat.default_max_tokens(eng, max(len(x) for x in ids))
        else:  # OpenAI's default (or -n's), within the server's cap
            max_tokens = min(defaults.max_tokens or 16, eng.cfg.max_tokens_per_request or MAX_TOKENS_LIMIT)
        # echo with max_tokens 0 (vLLM's, for scoring a prompt): the prompt alone, of one token generated
        hidden = bool(req.echo) and max_tokens == 0
        params = req.sampling(1 if hidden else max_tokens, req.logprobs)
        shown = req.prompt_logprobs_asked()
        params.prompt_logprobs = shown
        echo_logprobs = bool(req.echo) and req.logprobs is not None
        if req.echo and req.logprobs is not None and (shown is None or 0 <= shown < req.logprobs):
            params.prompt_logprobs = req.logprobs  # (the engine refuses a `shown` out of range)
        given = req.constraint()
        if given:
            params.constraint = given[1]
        echo = [pr if isinstance(pr, str) else eng.tokenizer.decode(pr) for pr in prompts] if req.echo else []
        texts = None
        if echo_logprobs:
            texts = await off_loop(lambda: [token_texts(eng.tokenizer, x) for x in ids], sum(len(x) for x in ids))
        return await _run(
            request,
            eng,
            req,
            model,
            "cmpl",
            ids,
            params,
            echo,
            given and given[0],
            echo_texts=texts,
            hidden=hidden,
            prompt_logprobs=shown,
            # (echo's prompt logprobs: a program without them refuses the echo)
            field_names={} if shown is not None else {"prompt_logprobs": "echo"},
        )

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request):
        eng = engine(request)
        req: ChatRequest = await parse_request(request, ChatRequest)
        model = check_model(eng, req.model)
        if req.top_logprobs and not req.logprobs:
            raise OpenAIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        chat_input = ChatInput(
            [m.for_template() for m in req.messages],
            req.tools,
            req.tool_choice,
            req.parallel_tool_calls,
            dict(req.chat_template_kwargs or {}),
            req.add_generation_prompt,
        )
        state = server(request)
        try:  # (the body's size measures the work: messages, tools, extra variables)
            prompt = await chat.render(state, eng, chat_input, len(await request.body()))
            defaults = _apply_defaults(req, state)
            max_tokens = next(
                (m for m in (req.max_completion_tokens, req.max_tokens, req.n_predict) if m is not None and m >= 0),
                None,
            )
            if max_tokens is None:  # the rest of the context (or -n's default), within the server's cap
                rest = chat.default_max_tokens(eng, len(prompt.ids))
                max_tokens = min(rest, defaults.max_tokens or rest)
            params = req.sampling(max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
            params.prompt_logprobs = req.prompt_logprobs_asked()
            given = req.constraint()
            output = chat.constrain(params, given, prompt.tools, state, eng)
        except chat.ChatError as e:
            raise OpenAIError.from_chat(e, e.param) from e
        field = "tool_choice" if prompt.tools.forced is not None else given and given[0]
        return await _run(
            request,
            eng,
            req,
            model,
            "chatcmpl",
            [prompt.ids],
            params,
            [],
            field,
            chat=True,
            output=output,
            prompt_logprobs=params.prompt_logprobs,
        )

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict:
        eng = engine(request)
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
        ids = await _encode(eng, prompts, "input")
        done = await embed(request, eng, ids, model, req.user)
        n_tokens = sum(len(x) for x in ids)
        data = [
            {
                "object": "embedding",
                "index": i,
                "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()
                if req.encoding_format == "base64"
                else v.tolist(),
            }
            for i, v in enumerate(done)
        ]
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        eng = engine(request)
        req: TokenizeRequest = await parse_request(request, TokenizeRequest)
        text = next((t for t in (req.content, req.text, req.prompt) if t is not None), None)
        if text is None:
            raise OpenAIError(400, "give the text to tokenize as 'content'", param="content")
        special = next((s for s in (req.add_special, req.add_special_tokens) if s is not None), False)
        # Clients measure texts longer than the context too (to cut them to it), so the bound is several
        # contexts: enough for that, and the ids and pieces of the answer stay bounded work.
        limit = max(TOKENIZE_CONTEXTS * eng.abi.max_seq_len, TOKENIZE_MIN_LIMIT)
        try:
            ids = await off_loop(lambda: encode_text(eng.tokenizer, text, special, limit, what="text"), len(text))
        except BadRequest as e:
            raise OpenAIError(400, str(e), param="content") from e
        piece = piece_fn(eng)
        tokens: list[Any] = [{"id": i, "piece": piece(i)} for i in ids] if req.with_pieces else ids
        return {"tokens": tokens, "count": len(ids), "max_model_len": eng.abi.max_seq_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict:
        eng = engine(request)
        req: DetokenizeRequest = await parse_request(request, DetokenizeRequest)

        def checked_decode() -> str:
            eng.check_ids(req.tokens)
            return decode_ids(eng.tokenizer, req.tokens, skip_special_tokens=False)

        try:
            text = await off_loop(checked_decode, len(req.tokens))
        except BadRequest as e:
            raise OpenAIError(400, str(e), param="tokens") from e
        return {"content": text, "prompt": text}


def _apply_defaults(req: SamplingRequest, state: ServerState) -> RequestDefaults:
    """The server's defaults (llama-server's --temp, --seed) for the fields the request leaves out."""
    d = state.defaults
    if req.temperature is None:
        req.temperature = d.temperature
    if req.seed is None:
        req.seed = d.seed
    return d


async def _encode(eng: Engine, prompts: Sequence[Prompt], param: str) -> list[list[int]]:
    try:
        return await encode_prompts(eng, prompts)
    except BadRequest as e:
        raise OpenAIError.bad_request(e, param) from e


async def embed(request: Request, eng: Engine, ids: list[list[int]], model: str, user: str | None) -> list[np.ndarray]:
    """Each prompt's pooled embedding (OpenAIError when one cannot be served or fails)."""
    rid = f"embd-{uuid.uuid4().hex}"
    record = access_record()
    record.id, record.model, record.user, record.inputs = rid, model, user, len(ids)
    try:
        with Submission(eng) as sub:
            for x in ids:
                sub.add_embedding(x, f"{rid}-{len(sub.groups)}")
    except QueueFull as e:
        raise _queue_full(e) from e
    except BadRequest as e:
        raise OpenAIError(400, f"input {len(sub.groups)}: {e}", param="input") from e
    seqs = sub.sequences
    vecs: list[np.ndarray | None] = [None] * len(seqs)
    errors: list[str | None] = [None] * len(seqs)

    def on_event(i: int, ev: Event) -> None:
        if ev.embedding is not None:
            vecs[i] = ev.embedding
        errors[i] = ev.error or errors[i]

    await collect(seqs, request, on_event)
    done: list[np.ndarray] = []
    for i, v in enumerate(vecs):
        if v is None:  # failed, or the client went away first
            raise OpenAIError(
                error_status(errors[i]), f"embedding failed: {errors[i] or seqs[i].finish_reason}", type="server_error"
            )
        done.append(v)
    return done


def _queue_full(e: QueueFull) -> OpenAIError:
    return OpenAIError(503, str(e), type="server_error", code="queue_full", headers={"Retry-After": "1"})


async def _run(
    request: Request,
    eng: Engine,
    req: SamplingRequest,
    model: str,
    prefix: str,
    prompts: list[list[int]],
    params: SamplingParams,
    echo: list[str],
    constraint_field: str | None,
    chat: bool = False,
    output: ChatOutput | None = None,
    echo_texts: list[list[str]] | None = None,
    hidden: bool = False,
    prompt_logprobs: int | None = None,
    field_names: dict[str, str] | None = None,
):
    """`constraint_field`: the request field that gave `params.constraint` (errors name it); `field_names`: the
    request's names of other SamplingParams fields, where they differ. `echo_texts`: per prompt, its tokens'
    texts (echo with logprobs); `hidden`: the choices show no generated token (echo with max_tokens 0);
    `prompt_logprobs`: vLLM's field, to show with that many alternatives."""
    rid = f"{prefix}-{uuid.uuid4().hex}"
    try:
        seqs = await submit(eng, prompts, params, rid)
    except QueueFull as e:
        raise _queue_full(e) from e
    except BadRequest as e:
        field = constraint_field if e.field == "constraint" else (field_names or {}).get(e.field or "", e.field)
        raise OpenAIError.bad_request(e, field or ("messages" if chat else "prompt")) from e
    record = access_record()
    record.id, record.model, record.user, record.stream, record.n = rid, model, req.user, bool(req.stream), params.n
    end_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eng.eos_ids))
    piece = piece_fn(eng)
    job = Job(
        chat=chat,
        rid=rid,
        model=model,
        prompt_tokens=sum(len(p) for p in prompts),
        choices=[
            Choice(
                i,
                s,
                end_ids,
                output=output and ChatOutput(output.tools, output.reasoning),
                echo_texts=echo_texts[i // params.n] if echo_texts is not None else None,
                hidden=hidden,
            )
            for i, s in enumerate(seqs)
        ],
        piece=piece,
        echo=[e for e in echo for _ in range(params.n)],
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
        prompts=len(prompts),
        prompt_logprobs=prompt_logprobs,
    )
    for c, text in zip(job.choices, job.echo):
        c.offset = len(text)
    if req.stream:
        return event_stream(_stream(job, request))
    return await _collect(job, request)


def piece_fn(eng: Engine) -> Any:
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


def _log_usage(job: Job) -> None:
    usage, record = job.usage(), access_record()
    record.prompt_tokens, record.completion_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    record.total_tokens, record.finish_reasons = usage["total_tokens"], [c.finish_reason for c in job.choices]


async def _collect(job: Job, request: Request) -> JSONResponse:
    try:

        def on_event(index: int, ev: Event) -> None:
            job.choices[index].feed(ev, job.piece)

        await collect([c.seq for c in job.choices], request, on_event)
    finally:
        _log_usage(job)
    failed = next((c for c in job.choices if c.finish_reason == "error"), None)
    if failed:
        raise OpenAIError(error_status(failed.error), f"generation failed: {failed.error}", type="server_error")
    if any(c.finish_reason != "stop" and c.finish_reason != "length" for c in job.choices):
        raise OpenAIError(499, "the client closed the request", type="invalid_request_error")
    # (prompt logprobs: shaped and serialised off the loop when long)
    return await off_loop(lambda: JSONResponse(job.full()), job.size())


async def _stream(job: Job, request: Request) -> AsyncIterator[str]:
    events = fan_in([c.seq for c in job.choices], lambda s: sequence_events(s, request))
    try:
        for c in job.choices:
            if job.chat:
                yield job.chunk(c, None, [], role=True)
            if job.echo and job.echo[c.index] and c.echo_texts is None:
                yield job.chunk(c, job.echo[c.index], [])
        async for index, ev in events:
            c = job.choices[index]
            tokens = c.feed(ev, job.piece)
            if ev.prompt_logprobs is not None and c.echo_texts is not None:  # the echo, with the prompt's logprobs
                size = len(ev.prompt_logprobs) * ((c.seq.params.logprobs or 0) + 1)
                yield await off_loop(partial(job.echo_chunk, c), size)
            finish = c.finish(ev.finish_reason)
            if c.output is None:
                text = "" if c.hidden else ev.text
                if text or tokens:
                    yield job.chunk(c, text, tokens)
            else:  # (reasoning and tool calls: the parsers hold back what may still change its part)
                for chunk in job.part_chunks(c, c.output.feed(ev.text), tokens):
                    yield chunk
                if finish in ("stop", "length"):
                    parts = c.output.finish()
                    for chunk in job.part_chunks(c, parts, []):
                        yield chunk
                    finish = finish_reason(finish, parts)
            if finish in ("stop", "length", "tool_calls"):
                yield job.chunk(c, None if job.chat else "", [], finish=finish)
            elif ev.finish_reason == "error":
                err = {"message": f"generation failed: {ev.error}", "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
                break
        else:
            if job.include_usage:
                yield f"data: {json.dumps({**job.envelope([], stream=True), 'usage': job.usage()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # the client went away (or we are done): nothing keeps pages past this point
        await events.aclose()
        _log_usage(job)
