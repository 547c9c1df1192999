"""ppl.llm.serving's gRPC service (serve/proto/llm.proto: ppl.llm.proto.LLMService/Generation) on the
engine, served by grpc.aio in the HTTP server's event loop (`python -m serve --grpc-port P`).

Each Request of a BatchedRequest becomes one sequence, as /generate makes it; the stream carries one
BatchedResponse per generated token, holding that request's Response (status PROCESSING, then FINISHED on
the last token, or FAILED), as ppl.llm.serving sends them. How the fields map (proto3 cannot tell 0 from
unset, so 0 means "default"), following ppl.llm.serving's own reading of them:
- `prompt` is text (tokenized with the model's BOS, as /generate does); when empty, `tokens.ids` is the prompt.
- do_sample false: greedy. do_sample true: temperature (0 -> 1), top_k (0 -> off), top_p (0 -> off),
  seed (0 -> unseeded). repetition_penalty 0 -> off; presence/frequency penalties as given. typical_p and
  watermark are accepted and unused (ppl.llm.serving does not use them either).
- stopping_parameters: max_new_tokens (required, >= 1), stop_tokens end generation as EOS does (in text and
  token mode alike), ignore_eos_token.
- Responses set both `generated` (the token's text piece) and `tokens` (its id): ppl.llm.serving sets only
  the one matching the request's kind; clients read the one they asked for. The end token comes with
  FINISHED, as an id with empty text and is_special set. detail.logprobs is the token's log-probability.
Errors: a bad request rejects the whole call before anything is generated, with INVALID_ARGUMENT naming the
request (`req[i] (id N)`) and the field; UNAVAILABLE while the model loads; RESOURCE_EXHAUSTED when the queue
is full. A failure during generation answers FAILED for that request (its reason is in the trailing metadata
`aotllm-error`); the others go on. A client that cancels the call cancels its sequences.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import grpc

from serve.core.engine import BadRequest, Engine, QueueFull
from serve.core.sampling import SamplingParams
from serve.core.scheduler import Event, Sequence

from .common import Submission, cancel, fan_in, field_message
from .metrics import Metrics, access_log
from .state import NotReady, ServerState

try:
    from serve.proto import llm_pb2, llm_pb2_grpc
except ImportError as e:  # the stubs are build outputs, not sources
    raise ImportError(
        "serve/proto/llm_pb2*.py are generated from llm.proto when the package is built: "
        "run `pip install -e .` (or install the wheel)"
    ) from e

log = logging.getLogger("aotllm.grpc")
METHOD = "/ppl.llm.proto.LLMService/Generation"
# SamplingParams' names in engine errors -> the proto field a ppl client sent
FIELD_NAMES = {
    "max_tokens": "stopping_parameters.max_new_tokens",
    "stop_token_ids": "stopping_parameters.stop_tokens",
    **{
        f: f"choosing_parameters.{f}"
        for f in (
            "temperature",
            "top_k",
            "top_p",
            "seed",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        )
    },
}


class CallError(Exception):
    """Ends the call with a gRPC status code and a message saying what to change."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class Job:
    """One Request of the batch, submitted: its sequence and what its responses need to say."""

    id: int
    seq: Sequence
    special_ids: frozenset[int]
    error: str | None = None  # why generation failed


def sampling_params(req: llm_pb2.Request) -> SamplingParams:
    cp, sp = req.choosing_parameters, req.stopping_parameters
    sample = cp.do_sample
    return SamplingParams(
        max_tokens=sp.max_new_tokens,
        temperature=(cp.temperature or 1.0) if sample else 0.0,
        top_k=cp.top_k if sample else 0,
        top_p=(cp.top_p or 1.0) if sample else 1.0,
        repetition_penalty=cp.repetition_penalty or 1.0,
        presence_penalty=cp.presence_penalty,
        frequency_penalty=cp.frequency_penalty,
        seed=(cp.seed or None) if sample else None,
        stop_token_ids=list(sp.stop_tokens.ids),
        ignore_eos=sp.ignore_eos_token,
        logprobs=0,
    )


def prompt_ids(eng: Engine, req: llm_pb2.Request) -> list[int]:
    if req.prompt:
        return eng.encode(req.prompt)
    if not req.tokens.ids:
        raise BadRequest("the request is empty: give a prompt (text) or tokens.ids")
    try:
        return eng.encode(list(req.tokens.ids))
    except BadRequest as e:
        raise BadRequest(f"tokens.ids: {e}") from e


def finish_reason(job: Job) -> llm_pb2.FinishReason:
    seq = job.seq
    if seq.finish_reason == "length" or not seq.output_ids:
        return llm_pb2.FINISH_REASON_LENGTH
    if seq.output_ids[-1] in seq.params.stop_token_ids:
        return llm_pb2.FINISH_REASON_STOP_SEQUENCE
    return llm_pb2.FINISH_REASON_EOS_TOKEN


def response(job: Job, ev: Event) -> llm_pb2.Response:
    ids = ev.token_ids
    detail = llm_pb2.Detail(
        logprobs=sum(s.logprob or 0.0 for s in ev.logprobs),
        is_special=bool(ids) and all(t in job.special_ids for t in ids),
    )
    status = llm_pb2.PROCESSING
    if ev.finish_reason in ("stop", "length"):
        status, detail.finish_reason = llm_pb2.FINISHED, finish_reason(job)
    elif ev.finish_reason:  # "error", or "cancelled" by anything but this call's client
        status = llm_pb2.FAILED
    return llm_pb2.Response(status=status, id=job.id, generated=ev.text, tokens=llm_pb2.Tokens(ids=ids), detail=detail)


async def merged_events(seq: Sequence, metrics: Metrics) -> AsyncGenerator[Event, None]:
    """The sequence's events until its finish, a token's event and the finish that follows it at once merged
    into one (ppl.llm.serving's last response carries the last token). Latencies go to /metrics."""
    timer = metrics.timer(seq)
    pending: Event | None = None
    try:
        while True:
            ev, pending = pending or await seq.events.get(), None
            timer(ev)
            if not ev.finish_reason and not seq.events.empty():
                nxt = seq.events.get_nowait()
                if nxt.finish_reason and not nxt.token_ids:
                    timer(nxt)
                    ev = Event(
                        text=ev.text,
                        token_ids=ev.token_ids,
                        logprobs=ev.logprobs,
                        finish_reason=nxt.finish_reason,
                        error=nxt.error,
                    )
                else:
                    pending = nxt
            yield ev
            if ev.finish_reason:
                return
    finally:
        timer.close()


class LLMService(llm_pb2_grpc.LLMServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self._special: tuple[Engine, frozenset[int]] | None = None  # the engine's special token ids

    def _engine(self) -> Engine:
        try:
            return self.state.ready_engine()
        except NotReady as e:
            raise CallError(grpc.StatusCode.UNAVAILABLE, f"{e}; retry in a few seconds") from e

    def _special_ids(self, eng: Engine) -> frozenset[int]:
        if self._special is None or self._special[0] is not eng:
            added = eng.tokenizer.get_added_tokens_decoder()
            self._special = (eng, frozenset(i for i, t in added.items() if t.special))
        return self._special[1]

    def _submit(self, batch: llm_pb2.BatchedRequest, rid: str) -> list[Job]:
        """Every request submitted (as sequences rid-0, rid-1, ...), or none (CallError naming the first bad one)."""
        eng = self._engine()
        if not batch.req:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "BatchedRequest.req is empty: add a Request")
        special = self._special_ids(eng)
        jobs: list[Job] = []
        with Submission(eng) as sub:
            for i, req in enumerate(batch.req):
                try:
                    seq = sub.add(prompt_ids(eng, req), sampling_params(req), f"{rid}-{i}")[0]
                except BadRequest as e:
                    raise CallError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"req[{i}] (id {req.id}): {field_message(e, FIELD_NAMES)}"
                    ) from e
                except QueueFull as e:
                    raise CallError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from e
                jobs.append(Job(req.id, seq, special))
        return jobs

    async def Generation(
        self, request: llm_pb2.BatchedRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[llm_pb2.BatchedResponse, None]:
        t0, status, jobs, rid = time.monotonic(), grpc.StatusCode.OK, [], f"ppl-{uuid.uuid4().hex}"
        peer = context.peer()  # (read now: grpcio 1.85 segfaults on peer() once a cancelled call is gone)
        try:
            try:
                jobs = self._submit(request, rid)
            except CallError as e:
                status = e.code
                await context.abort(e.code, e.message)
            async with contextlib.aclosing(self._stream(jobs)) as stream:
                async for rsp in stream:
                    yield llm_pb2.BatchedResponse(rsp=[rsp])
            failed = [f"id {j.id}: {j.error}" for j in jobs if j.error]
            if failed:
                context.set_trailing_metadata((("aotllm-error", _ascii("; ".join(failed))),))
        except (asyncio.CancelledError, GeneratorExit):  # the client went away (or the server stops)
            status = grpc.StatusCode.CANCELLED
            raise
        finally:
            cancel(j.seq for j in jobs)
            line = {
                "request_id": rid,
                "method": "gRPC",
                "path": METHOD,
                "status": status.name,
                "duration_s": round(time.monotonic() - t0, 4),
                "client": peer,
                "n": len(request.req),
            }
            access_log.info(json.dumps(line), extra={"access": line})

    async def _stream(self, jobs: list[Job]) -> AsyncGenerator[llm_pb2.Response, None]:
        """Every job's responses as they are produced."""
        events = fan_in([j.seq for j in jobs], lambda s: merged_events(s, self.state.metrics))
        async with contextlib.aclosing(events):
            async for index, ev in events:
                job = jobs[index]
                if ev.error:
                    job.error = ev.error
                    log.error("request id %d failed: %s", job.id, ev.error)
                if ev.token_ids or ev.text or ev.finish_reason:
                    yield response(job, ev)


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")


async def start_grpc_server(state: ServerState, host: str, port: int) -> grpc.aio.Server:
    """LLMService listening on host:port, in the running event loop (the engine's); stop it with `.stop()`."""
    server = grpc.aio.server()
    llm_pb2_grpc.add_LLMServiceServicer_to_server(LLMService(state), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"--grpc-port: cannot listen on {address} ({e}); is the port in use?") from e
    await server.start()
    log.info("gRPC: ppl.llm.proto.LLMService on %s", address)
    return server
