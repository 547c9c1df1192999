"""HTTP: /health and /generate (shortfin's schema; SSE streaming SGLang-style). Errors are JSON
{"error": ..., "code": ...}; the server stays up through every one of them."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from .engine import BadRequest, Engine, QueueFull
from .protocol import Completion, GenerateRequest, GenerateResponse, GenerateSamplingParams, PromptResponses
from .sampling import SamplingParams
from .scheduler import Event, Sequence

log = logging.getLogger("aotllm.api")


def error(code: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=code, headers=headers)


def validation_message(exc: ValidationError | RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "invalid request: " + "; ".join(parts)


def sampling_from(p: GenerateSamplingParams) -> SamplingParams:
    stop = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
    return SamplingParams(
        max_tokens=p.max_completion_tokens,
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
    )


async def sequence_events(seq: Sequence, request: Request) -> AsyncIterator[Event]:
    """The sequence's events until its finish; a client that goes away cancels it (pages are freed).
    Latencies and the finish reason are recorded for /metrics (once per sequence)."""
    timer = request.app.state.metrics.timer(seq)
    try:
        while True:
            try:
                ev = await asyncio.wait_for(seq.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    seq.cancel()
                    return
                continue
            timer(ev)
            yield ev
            if ev.finish_reason:
                return
    finally:
        timer.close()


def create_app(engine_ref: dict) -> FastAPI:
    """`engine_ref["engine"]` is set once the model is loaded; until then /health says 503."""
    app = FastAPI(title="aotllm")

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        return error(400, validation_message(exc))

    def engine() -> Engine | None:
        return engine_ref.get("engine")

    @app.get("/health")
    async def health():
        if engine() is None:
            return error(503, engine_ref.get("status", "loading the model"), {"Retry-After": "5"})
        return {"status": "ok"}

    @app.post("/generate")
    async def generate(request: Request):
        eng = engine()
        if eng is None:
            return error(503, engine_ref.get("status", "the model is still loading"), {"Retry-After": "5"})
        try:
            req = GenerateRequest.model_validate(json.loads(await request.body()))
            prompts = req.prompts()
        except json.JSONDecodeError as e:
            return error(400, f"malformed JSON: {e}")
        except ValidationError as e:
            return error(400, validation_message(e))
        except ValueError as e:
            return error(400, str(e))
        rids = req.rid if isinstance(req.rid, list) else [req.rid] * len(prompts)
        if len(rids) != len(prompts):
            return error(400, f"{len(rids)} rids for {len(prompts)} prompts")
        params = sampling_from(req.sampling_params)
        groups: list[list[Sequence]] = []
        try:
            for prompt, rid in zip(prompts, rids):
                groups.append(eng.submit(eng.encode(prompt), params, rid))
        except BadRequest as e:
            cancel_groups(groups)
            return error(400, str(e))
        except QueueFull as e:
            cancel_groups(groups)
            return error(503, str(e), {"Retry-After": "1"})
        if req.stream:
            return StreamingResponse(_stream(groups, request), media_type="text/event-stream")
        return await _collect(req, prompts, groups, request)

    from .openai_api import add_openai_routes  # the OpenAI-compatible API (/v1/...), /tokenize, /metrics

    add_openai_routes(app, engine_ref)
    from .triton_api import add_triton_routes  # Triton / TensorRT-LLM backend style (/v2/...)

    add_triton_routes(app, engine_ref)
    return app


def cancel_groups(groups: list[list[Sequence]]) -> None:
    for g in groups:
        for seq in g:
            seq.cancel()


async def _collect(req: GenerateRequest, prompts, groups, request: Request):
    async def one(seq: Sequence) -> Completion:
        text = []
        err = None
        async for ev in sequence_events(seq, request):
            text.append(ev.text)
            err = ev.error or err
        if err:
            raise RuntimeError(err)
        return Completion(
            text="".join(text),
            finish_reason=seq.finish_reason,
            token_ids=list(seq.output_ids) if req.return_input_ids else None,
        )

    try:
        results = await asyncio.gather(*(one(s) for g in groups for s in g))
    except RuntimeError as e:
        cancel_groups(groups)
        return error(500, f"generation failed: {e}")
    if any(s.finish_reason == "cancelled" for g in groups for s in g):
        return error(499, "the client closed the request")
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


async def _stream(groups: list[list[Sequence]], request: Request) -> AsyncIterator[str]:
    seqs = [s for g in groups for s in g]
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, seq: Sequence):
        async for ev in sequence_events(seq, request):
            await queue.put((index, seq, ev))
        await queue.put((index, seq, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(seqs)]
    try:
        left = len(seqs)
        while left:
            index, seq, ev = await queue.get()
            if ev is None:
                left -= 1
                continue
            if not ev.text and not ev.finish_reason:
                continue
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
    finally:  # the client went away (or we are done): nothing keeps pages past this point
        for seq in seqs:
            if not seq.finish_reason:
                seq.cancel()
        for t in tasks:
            t.cancel()
