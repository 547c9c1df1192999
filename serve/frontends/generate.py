"""shortfin's / SGLang's HTTP API: GET /health and POST /generate (shortfin's schema; SSE streaming
SGLang-style). Errors are JSON {"error": ..., "code": ...}; the server stays up through every one of them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from serve.core.engine import BadRequest, QueueFull
from serve.core.sampling import SamplingParams
from serve.core.scheduler import Event, Sequence

from . import constraints
from .body import BodyError, parse_body
from .common import Submission, collect, error_status, fan_in, field_message, sequence_events
from .generate_protocol import (
    Completion,
    GenerateRequest,
    GenerateResponse,
    GenerateSamplingParams,
    PromptResponses,
)
from .state import NotReady, server
from .tokenizing import encode_prompts

# SamplingParams' names in engine errors -> the request field a /generate client sent
FIELD_NAMES = {"max_tokens": "sampling_params.max_completion_tokens"}


def error(code: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=code, headers=headers)


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


def sampling_from(p: GenerateSamplingParams, cap: int | None = None) -> SamplingParams:
    """`cap` (--max-tokens-per-request) bounds the default max_completion_tokens; one given is checked.
    A malformed constraint is a FieldError."""
    stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
    given = "max_completion_tokens" in p.model_fields_set
    constraint = constraints.one(
        [
            constraints.Given("sampling_params.json_schema", "json_schema", p.json_schema),
            constraints.Given("sampling_params.regex", "regex", p.regex),
            constraints.Given("sampling_params.ebnf", "grammar", p.ebnf),
        ]
    )
    return SamplingParams(
        max_tokens=p.max_completion_tokens if given or cap is None else min(p.max_completion_tokens, cap),
        temperature=p.temperature,
        top_k=p.top_k or 0,
        top_p=1.0 if p.top_p is None else p.top_p,
        min_p=p.min_p or 0.0,
        repetition_penalty=p.repetition_penalty,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        seed=p.seed,
        stop=stop,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        n=p.n,
        constraint=constraint and constraint[1],
    )


def add_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> Response:
        state = server(request)
        try:
            state.ready_engine()
        except NotReady as e:
            body = {
                "status": "failed" if state.failed else "loading",
                "stage": str(e),
                "progress": state.progress,
                "error": str(e),
                "code": 503,
            }
            return JSONResponse(body, 503, {"Retry-After": "5"})
        return JSONResponse({"status": "ok"})

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        try:
            eng = server(request).ready_engine()
        except NotReady as e:
            return error(503, str(e), {"Retry-After": "5"})
        try:
            req = await parse_body(request, GenerateRequest)
            prompts = req.prompts()
        except BodyError as e:
            return error(e.status, e.message)
        except ValidationError as e:
            return error(400, validation_message(e))
        except ValueError as e:
            return error(400, str(e))
        rids = req.rid if isinstance(req.rid, list) else [req.rid] * len(prompts)
        if len(rids) != len(prompts):
            return error(400, f"{len(rids)} rids for {len(prompts)} prompts")
        try:
            params = sampling_from(req.sampling_params, eng.cfg.max_tokens_per_request)
            prompt_ids = await encode_prompts(eng, prompts)
            await eng.prepare(params)
            with Submission(eng) as sub:
                for ids, rid in zip(prompt_ids, rids):
                    sub.add(ids, params, rid)
        except constraints.FieldError as e:
            return error(400, str(e))
        except BadRequest as e:
            return error(400, field_message(e, FIELD_NAMES))
        except QueueFull as e:
            return error(503, str(e), {"Retry-After": "1"})
        if req.stream:
            return StreamingResponse(_stream(sub.sequences, request), media_type="text/event-stream")
        return await _collect(req, prompts, sub.groups, request)


async def _collect(
    req: GenerateRequest, prompts: list[str | list[int]], groups: list[list[Sequence]], request: Request
) -> JSONResponse:
    seqs = [s for g in groups for s in g]
    texts: list[list[str]] = [[] for _ in seqs]

    def on_event(index: int, ev: Event) -> None:
        texts[index].append(ev.text)
        if ev.error:
            raise GenerationFailed(ev.error)

    try:
        await collect(seqs, request, on_event)
    except GenerationFailed as e:
        return error(error_status(str(e)), f"generation failed: {e}")
    if any(s.finish_reason == "cancelled" for s in seqs):
        return error(499, "the client closed the request")
    results = [
        Completion(
            text="".join(t),
            finish_reason=s.finish_reason,
            token_ids=list(s.output_ids) if req.return_input_ids else None,
        )
        for s, t in zip(seqs, texts)
    ]
    out, i = [], 0
    for prompt, g in zip(prompts, groups):
        out.append(
            PromptResponses(
                prompt=prompt,
                responses=results[i : i + len(g)],
                input_ids=g[0].prompt_ids if req.return_input_ids else None,
            )
        )
        i += len(g)
    return JSONResponse(GenerateResponse(responses=out).model_dump(exclude_none=True))


class GenerationFailed(Exception):
    pass


async def _stream(seqs: list[Sequence], request: Request) -> AsyncIterator[str]:
    async for index, ev in fan_in(seqs, lambda s: sequence_events(s, request)):
        if not ev.text and not ev.finish_reason:
            continue
        seq = seqs[index]
        meta = {
            "id": seq.rid,
            "index": index,
            "finish_reason": ev.finish_reason,
            "completion_tokens": len(seq.output_ids),
            "prompt_tokens": len(seq.prompt_ids),
        }
        if ev.error:
            meta["error"] = ev.error
        yield f"data: {json.dumps({'text': ev.text, 'meta_info': meta})}\n\n"
    yield "data: [DONE]\n\n"
