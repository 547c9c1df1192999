"""llama-server's own routes, with its semantics (its tools/server README): POST /completion (also
/completions) and /infill with `content`, `tokens`, `stop_type`, `timings`, `generation_settings`,
`completion_probabilities`; POST /embedding (also /embeddings: its non-OpenAI shape); GET /props and
/slots; POST /apply-template. Errors use the OpenAI error object with llama-server's numeric `code`.

Sampling defaults are llama.cpp's (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05) unless the server
was started with --temp / --seed / -n. `repeat_penalty` penalises every prompt and output token (llama.cpp:
the last `repeat_last_n`); `cache_prompt`, `id_slot`, `samplers`, `n_keep` and the other knobs of
llama.cpp's sampler chain are accepted and ignored: our prefix cache is always on."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from serve.core.engine import BadRequest, Engine, QueueFull
from serve.core.sampling import MAX_LOGPROBS, Sampled, SamplingParams
from serve.core.scheduler import Event, Sequence

from . import chat, constraints
from .chat import ChatInput
from .common import collect, error_status, fan_in, sequence_events, submit
from .metrics import access_record
from .openai_api import embed, piece_fn
from .openai_protocol import ChatRequest, EmbeddingRequest, OpenAIError, parse_request
from .state import NotReady, ServerState, server
from .tokenizing import Prompt, encode_prompts, prompt_items

BUILD_INFO = "aotllm-0.1.0"
# fill-in-the-middle tokens as vocabularies spell them: (prefix, suffix, middle), and the repo-level pair
FIM_TOKENS = [
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen 2.5 Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SmolLM2
    ("<PRE>", "<SUF>", "<MID>"),  # CodeLlama
]
FIM_REPO = [("<|repo_name|>", "<|file_sep|>"), ("<repo_name>", "<file_sep>")]


def _err(status: int, message: str, kind: str = "invalid_request_error") -> OpenAIError:
    return OpenAIError(status, message, kind, code=status)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: Any = None
    n_predict: int = -1
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list[str] = []
    seed: int = -1
    ignore_eos: bool = False
    logit_bias: Any = None
    n_probs: int = 0
    stream: bool = False
    return_tokens: bool = False
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    # /infill
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[dict[str, Any]] = []

    def sampling(self, eng: Engine, state: ServerState, prompt_tokens: int) -> SamplingParams:
        given, d = self.model_fields_set, state.defaults
        temperature = self.temperature if "temperature" in given or d.temperature is None else d.temperature
        seed = self.seed if "seed" in given or d.seed is None else d.seed
        if self.n_predict == 0:
            raise _err(400, "n_predict 0 (evaluate the prompt only) is not supported; ask for 1 or more tokens")
        if self.n_predict > 0:
            max_tokens = self.n_predict
        else:  # -1: until the context ends (or -n's default)
            max_tokens = d.max_tokens or chat.default_max_tokens(eng, prompt_tokens)
        try:
            constraint = constraints.one(
                [
                    constraints.Given("grammar", "grammar", self.grammar),
                    constraints.Given("json_schema", "json_schema", self.json_schema),
                ]
            )
        except constraints.FieldError as e:
            raise _err(400, str(e)) from e
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=max(0.0, temperature),  # (llama.cpp: <= 0 is greedy)
            top_k=max(0, self.top_k),
            top_p=self.top_p if 0 < self.top_p <= 1 else 1.0,
            min_p=max(0.0, self.min_p),
            repetition_penalty=self.repeat_penalty if self.repeat_penalty > 0 else 1.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=_logit_bias(self.logit_bias, eng),
            seed=None if seed is None or seed < 0 else seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop),
            ignore_eos=self.ignore_eos,
            logprobs=min(self.n_probs, MAX_LOGPROBS) if self.n_probs > 0 else None,
            constraint=constraint and constraint[1],
        )

    def settings(self, params: SamplingParams, eng: Engine) -> dict[str, Any]:
        """generation_settings: the options as applied."""
        return {
            "n_ctx": eng.abi.max_seq_len,
            "n_predict": params.max_tokens,
            "model": eng.cfg.model_name,
            "seed": params.seed if params.seed is not None else 4294967295,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
            "min_p": params.min_p,
            "repeat_penalty": params.repetition_penalty,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "stop": params.stop,
            "ignore_eos": params.ignore_eos,
            "n_probs": self.n_probs,
            "stream": self.stream,
            "grammar": self.grammar or "",
        }


def _logit_bias(value: Any, eng: Engine) -> dict[int, float]:
    """llama.cpp's [[token or text, bias or false], ...], or OpenAI's {"token or text": bias}: a text biases
    each of its tokens; false bans the token."""
    pairs = list(value.items()) if isinstance(value, dict) else value or []
    bias: dict[int, float] = {}
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise _err(400, f"logit_bias entries are [token or text, bias]; got {pair!r}")
        key, b = pair
        value_ = -100.0 if b is False else b
        if not isinstance(value_, (int, float)) or isinstance(value_, bool):
            raise _err(400, f"logit_bias values are numbers or false; got {b!r}")
        if isinstance(key, str) and key.lstrip("-").isdigit():
            key = int(key)
        ids = [key] if isinstance(key, int) else eng.tokenizer.encode(str(key), add_special_tokens=False).ids
        for t in ids:
            bias[t] = max(-100.0, min(100.0, float(value_)))
    return bias


@dataclass
class Run:
    """One prompt's sequence and what the response reports about it."""

    index: int
    seq: Sequence
    prompt: str
    started: float
    first: float | None = None
    content: list[str] = field(default_factory=list)
    probs: list[dict[str, Any]] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None

    def feed(self, ev: Event, piece: Any) -> list[dict[str, Any]]:
        if ev.token_ids and self.first is None:
            self.first = time.perf_counter()
        new = [_prob(s, piece) for s in ev.logprobs if s.logprob is not None]
        self.content.append(ev.text)
        self.probs += new
        if ev.finish_reason:
            self.finish, self.error = ev.finish_reason, ev.error
        return new

    def stop_type(self, eos: set[int]) -> tuple[str, str]:
        """(stop_type, stopping_word): eos, word (a stop string), limit."""
        if self.finish == "stop":
            matched = self.seq.stops.matched
            if matched is not None:
                return "word", matched
            return "eos", ""
        return ("limit", "") if self.finish == "length" else ("none", "")

    def final(self, req: CompletionRequest, params: SamplingParams, eng: Engine, streamed: bool) -> dict[str, Any]:
        end = time.perf_counter()
        first = self.first or end
        n_out, n_in = len(self.seq.output_ids), len(self.seq.prompt_ids)
        prompt_ms, predicted_ms = (first - self.started) * 1e3, (end - first) * 1e3
        stop_type, word = self.stop_type(set(eng.eos_ids))
        body: dict[str, Any] = {
            "index": self.index,
            "content": "" if streamed else "".join(self.content),
            "tokens": [] if streamed or not req.return_tokens else list(self.seq.output_ids),
            "id_slot": -1,
            "stop": True,
            "model": eng.cfg.model_name,
            "tokens_predicted": n_out,
            "tokens_evaluated": n_in,
            "generation_settings": req.settings(params, eng),
            "prompt": self.prompt,
            "has_new_line": "\n" in "".join(self.content),
            "truncated": n_in + n_out >= eng.abi.max_seq_len,
            "stop_type": stop_type,
            "stopping_word": word,
            "tokens_cached": self.seq.cached_tokens,
            "timings": {
                "cache_n": self.seq.cached_tokens,
                "prompt_n": n_in - self.seq.cached_tokens,
                "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / max(1, n_in),
                "prompt_per_second": n_in / max(prompt_ms / 1e3, 1e-9),
                "predicted_n": n_out,
                "predicted_ms": predicted_ms,
                "predicted_per_token_ms": predicted_ms / max(1, n_out - 1),
                "predicted_per_second": (n_out - 1) / max(predicted_ms / 1e3, 1e-9) if n_out > 1 else 0.0,
            },
        }
        if self.probs and not streamed:
            body["completion_probabilities"] = self.probs
        return body


def _prob(s: Sampled, piece: Any) -> dict[str, Any]:
    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = piece(token)
        return {"id": token, "token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode())}

    return {**entry(s.token_id, s.logprob or 0.0), "top_logprobs": [entry(t, lp) for t, lp in s.top_logprobs or []]}


def _engine(request: Request) -> Engine:
    try:
        return server(request).ready_engine()
    except NotReady as e:
        raise OpenAIError(503, str(e), "unavailable_error", code=503, headers={"Retry-After": "5"}) from e


def _infill_prompt(eng: Engine, req: CompletionRequest) -> str:
    """llama-server's FIM layout: [repo-level extra context] PRE prefix SUF suffix MID prompt."""
    vocab = eng.tokenizer.get_vocab(with_added_tokens=True)
    fim = next((t for t in FIM_TOKENS if all(x in vocab for x in t)), None)
    if fim is None:
        raise _err(400, "this model has no fill-in-the-middle tokens (<fim_prefix>, <fim_suffix>, <fim_middle>)")
    extra = ""
    repo = next((r for r in FIM_REPO if all(x in vocab for x in r)), None)
    for chunk in req.input_extra:
        name, text = str(chunk.get("filename", "")), str(chunk.get("text", ""))
        extra += f"{repo[1]}{name}\n{text}" if repo else text
    if repo and extra:
        extra = f"{repo[0]}myproject\n{extra}"
    prompt = req.prompt if isinstance(req.prompt, str) else ""
    return f"{extra}{fim[0]}{req.input_prefix}{fim[1]}{req.input_suffix}{fim[2]}{prompt}"


def add_routes(app: FastAPI) -> None:
    async def complete(request: Request, infill: bool) -> Any:
        eng, state = _engine(request), server(request)
        req: CompletionRequest = await parse_request(request, CompletionRequest)
        try:
            prompts: list[Prompt] = [_infill_prompt(eng, req)] if infill else prompt_items(req.prompt, "prompt")
        except ValueError as e:
            raise _err(400, str(e)) from e
        try:
            ids = await encode_prompts(eng, prompts)
        except BadRequest as e:
            raise _overflow(OpenAIError.bad_request(e, "prompt")) from e
        params = req.sampling(eng, state, max(len(x) for x in ids))
        rid = f"cmpl-{uuid.uuid4().hex}"
        try:
            seqs = await submit(eng, ids, params, rid)
        except QueueFull as e:
            raise OpenAIError(503, str(e), "unavailable_error", code=503, headers={"Retry-After": "1"}) from e
        except BadRequest as e:
            raise _overflow(OpenAIError.bad_request(e, "prompt")) from e
        record = access_record()
        record.id, record.model, record.stream = rid, eng.cfg.model_name, req.stream
        now = time.perf_counter()
        texts = [p if isinstance(p, str) else eng.tokenizer.decode(x) for p, x in zip(prompts, ids)]
        runs = [Run(i, s, t, now) for i, (s, t) in enumerate(zip(seqs, texts))]
        if req.stream:
            return StreamingResponse(_stream(runs, req, params, eng, request), media_type="text/event-stream")
        piece = piece_fn(eng)

        def on_event(i: int, ev: Event) -> None:
            runs[i].feed(ev, piece)

        await collect([r.seq for r in runs], request, on_event)
        failed = next((r for r in runs if r.finish not in ("stop", "length")), None)
        if failed is not None:
            if failed.finish == "error":
                raise OpenAIError(error_status(failed.error), f"generation failed: {failed.error}", "server_error")
            raise _err(499, "the client closed the request")
        bodies = [r.final(req, params, eng, streamed=False) for r in runs]
        return JSONResponse(bodies[0] if len(bodies) == 1 else bodies)

    @app.post("/completion")
    @app.post("/completions")
    async def completion(request: Request) -> Any:
        return await complete(request, infill=False)

    @app.post("/infill")
    async def infill(request: Request) -> Any:
        return await complete(request, infill=True)

    @app.post("/embedding")
    @app.post("/embeddings")
    async def embedding(request: Request) -> JSONResponse:
        """llama-server's non-OpenAI embeddings: [{"index", "embedding": [[pooled vector]]}, ...] (the input
        shapes of /v1/embeddings)."""
        eng = _engine(request)
        req: EmbeddingRequest = await parse_request(request, EmbeddingRequest)
        try:
            ids = await encode_prompts(eng, req.prompts())
        except BadRequest as e:
            raise _overflow(OpenAIError.bad_request(e, "content")) from e
        vecs = await embed(request, eng, ids, eng.cfg.model_name, None)
        return JSONResponse([{"index": i, "embedding": [v.tolist()]} for i, v in enumerate(vecs)])

    @app.get("/props")
    async def props(request: Request) -> dict[str, Any]:
        eng, state = _engine(request), server(request)
        defaults = CompletionRequest().sampling(eng, state, 1)
        return {
            "default_generation_settings": {
                "id": 0,
                "id_task": -1,
                "n_ctx": eng.abi.max_seq_len,
                "is_processing": False,
                "params": CompletionRequest().settings(defaults, eng),
                "prompt": "",
            },
            "total_slots": _slots(eng),
            "model_path": eng.cfg.model_name,
            "chat_template": chat.chat_template(state, eng),
            "modalities": {"vision": False, "audio": False},
            "build_info": BUILD_INFO,
            "is_sleeping": False,
        }

    @app.get("/slots")
    async def slots(request: Request, fail_on_no_slot: int = 0) -> Any:
        """One entry per slot (--max-running per replica): the running sequences, then idle slots."""
        eng = _engine(request)
        running = [s for sched in eng.schedulers for s in sched.running]
        if fail_on_no_slot and len(running) >= _slots(eng):
            raise OpenAIError(503, "no slot available", "unavailable_error", code=503)
        out = []
        for i in range(_slots(eng)):
            seq = running[i] if i < len(running) else None
            p = seq.params if seq else SamplingParams()
            out.append(
                {
                    "id": i,
                    "id_task": seq.rid if seq else -1,
                    "n_ctx": eng.abi.max_seq_len,
                    "is_processing": seq is not None,
                    "params": {
                        "n_predict": p.max_tokens,
                        "temperature": p.temperature,
                        "top_k": p.top_k,
                        "top_p": p.top_p,
                        "min_p": p.min_p,
                        "seed": p.seed,
                        "stop": p.stop,
                    },
                    "next_token": {
                        "has_next_token": seq is not None,
                        "n_remain": p.max_tokens - len(seq.output_ids) if seq else -1,
                        "n_decoded": len(seq.output_ids) if seq else 0,
                    },
                }
            )
        return out

    @app.post("/apply-template")
    async def apply_template(request: Request) -> dict[str, str]:
        """The chat rendered as /v1/chat/completions would render it, not run."""
        eng, state = _engine(request), server(request)
        req: ChatRequest = await parse_request(request, ChatRequest)
        messages = [m.for_template() for m in req.messages]
        chat_input = ChatInput(messages, req.tools, req.tool_choice, req.parallel_tool_calls)
        try:
            prompt = await chat.render(state, eng, chat_input, len(await request.body()), tokenize=False)
        except chat.ChatError as e:
            raise OpenAIError(e.status, str(e), param=e.param, code=e.status) from e
        return {"prompt": prompt.text}


def _slots(eng: Engine) -> int:
    return eng.cfg.max_running * len(eng.schedulers)


def _overflow(e: OpenAIError) -> OpenAIError:
    e.code = e.status  # (llama-server's errors carry the HTTP status as their code)
    return e


async def _stream(
    runs: list[Run], req: CompletionRequest, params: SamplingParams, eng: Engine, request: Request
) -> AsyncIterator[str]:
    """llama-server's stream: one event per new text (`content`, `tokens`, `stop: false`), then the final
    object with `stop: true`; no [DONE]."""
    piece = piece_fn(eng)
    events = fan_in([r.seq for r in runs], lambda s: sequence_events(s, request))
    try:
        async for index, ev in events:
            run = runs[index]
            probs = run.feed(ev, piece)
            if ev.text or ev.token_ids:
                chunk: dict[str, Any] = {
                    "index": index,
                    "content": ev.text,
                    "tokens": ev.token_ids,
                    "stop": False,
                    "id_slot": -1,
                    "tokens_predicted": len(run.seq.output_ids),
                    "tokens_evaluated": len(run.seq.prompt_ids),
                }
                if probs:
                    chunk["completion_probabilities"] = probs
                yield f"data: {json.dumps(chunk)}\n\n"
            if ev.finish_reason in ("stop", "length"):
                yield f"data: {json.dumps(run.final(req, params, eng, streamed=True))}\n\n"
            elif ev.finish_reason == "error":
                err = {
                    "code": error_status(ev.error),
                    "message": f"generation failed: {ev.error}",
                    "type": "server_error",
                }
                yield f"data: {json.dumps({'error': err})}\n\n"
                break
    finally:
        await events.aclose()
