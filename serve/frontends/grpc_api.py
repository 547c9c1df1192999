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
request (`req[i] (id N)`) and the field (or, for bytes that are not a BatchedRequest, saying so); UNAVAILABLE
while the model loads; RESOURCE_EXHAUSTED when the queue is full; UNAUTHENTICATED without one of the server's
API keys (--api-key) in the `authorization` metadata ("Bearer KEY"). A failure during generation answers
FAILED for that request (its reason is in the trailing metadata `aotllm-error`); the others go on. A client
that cancels the call cancels its sequences.
With --ssl-keyfile / --ssl-certfile the service listens with TLS on the same key and certificate as HTTPS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from serve.core.engine import BadRequest, Engine, QueueFull
from serve.core.sampling import SamplingParams
from serve.core.scheduler import Event, Sequence

from . import tokenizing
from .common import Submission, cancel, fan_in, field_message
from .metrics import Metrics, access_log
from .options import ServerOptions
from .security import ApiKeys, refusal_message
from .state import NotReady, ServerState

try:
    from serve.proto import llm_pb2
except ImportError as e:  # the stubs are build outputs, not sources
    raise ImportError(
        "serve/proto/llm_pb2*.py are generated from llm.proto when the package is built: "
        "run `pip install -e .` (or install the wheel)"
    ) from e

log = logging.getLogger("aotllm.grpc")
SERVICE = "ppl.llm.proto.LLMService"
METHOD = f"/{SERVICE}/Generation"
GRPC_KEY_HINT = "'authorization' metadata entry 'Bearer KEY'"
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
    """The request's prompt as token ids (blocking for a long text: see tokenizing.off_loop)."""
    if req.prompt:
        return tokenizing.prompt_ids(eng, req.prompt)
    if not req.tokens.ids:
        raise BadRequest("the request is empty: give a prompt (text) or tokens.ids")
    try:
        return tokenizing.prompt_ids(eng, list(req.tokens.ids))
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


class LLMService:
    """LLMService's one method. It takes the request's bytes (see `add_service`) and parses them itself."""

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

    async def _submit(self, batch: llm_pb2.BatchedRequest, rid: str) -> list[Job]:
        """Every request submitted (as sequences rid-0, rid-1, ...), or none (CallError naming the first bad one)."""
        eng = self._engine()
        if not batch.req:
            raise CallError(grpc.StatusCode.INVALID_ARGUMENT, "BatchedRequest.req is empty: add a Request")
        special = self._special_ids(eng)
        jobs: list[Job] = []

        def tokenize(req: llm_pb2.Request) -> list[int] | BadRequest:  # (reported below, with its index)
            try:
                return prompt_ids(eng, req)
            except BadRequest as e:
                return e

        size = sum(len(r.prompt) + len(r.tokens.ids) for r in batch.req)
        prompts = await tokenizing.off_loop(lambda: [tokenize(r) for r in batch.req], size)
        with Submission(eng) as sub:
            for i, (req, ids) in enumerate(zip(batch.req, prompts)):
                try:
                    if isinstance(ids, BadRequest):
                        raise ids
                    seq = sub.add(ids, sampling_params(req), f"{rid}-{i}")[0]
                except BadRequest as e:
                    raise CallError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"req[{i}] (id {req.id}): {field_message(e, FIELD_NAMES)}"
                    ) from e
                except QueueFull as e:
                    raise CallError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from e
                jobs.append(Job(req.id, seq, special))
        return jobs

    async def Generation(
        self, raw: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[llm_pb2.BatchedResponse, None]:
        t0, status, jobs, rid = time.monotonic(), grpc.StatusCode.OK, [], f"ppl-{uuid.uuid4().hex}"
        peer = context.peer()  # (read now: grpcio 1.85 segfaults on peer() once a cancelled call is gone)
        request = llm_pb2.BatchedRequest()
        try:
            try:
                request = parse_request(raw)
                jobs = await self._submit(request, rid)
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


def parse_request(raw: bytes) -> llm_pb2.BatchedRequest:
    """The call's message. Parsed here rather than by grpc's deserializer: grpc answers a deserializer's
    exception with UNKNOWN and the exception's class name; a malformed message is the client's error."""
    try:
        return llm_pb2.BatchedRequest.FromString(raw)
    except DecodeError as e:
        raise CallError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid ppl.llm.proto.BatchedRequest message ({e}): "
            "build it from serve/proto/llm.proto (ppl.llm.serving's)",
        ) from e


def add_service(server: grpc.aio.Server, service: LLMService) -> None:
    """LLMService's handlers on `server`, as llm_pb2_grpc.add_LLMServiceServicer_to_server makes them but
    without the request deserializer: Generation gets the bytes (`parse_request`)."""
    handlers = {
        "Generation": grpc.unary_stream_rpc_method_handler(
            service.Generation, response_serializer=llm_pb2.BatchedResponse.SerializeToString
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class ApiKeyCheck(grpc.aio.ServerInterceptor):
    """Every call needs one of the server's API keys in its `authorization` metadata ("Bearer KEY", as HTTP's
    header); else UNAUTHENTICATED before the request is read."""

    def __init__(self, keys: ApiKeys) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        given = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        refusal = self.keys.check(given[0] if given else None)
        if refusal is None:
            return await continuation(details)
        message = refusal_message(refusal, GRPC_KEY_HINT)

        async def refuse(request: bytes, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        # (streaming like Generation; no deserializer: a refused call's message is not parsed)
        return grpc.unary_stream_rpc_method_handler(refuse)


def _credentials(options: ServerOptions) -> grpc.ServerCredentials:
    """TLS credentials from the HTTPS key and certificate files."""
    assert options.ssl_keyfile is not None and options.ssl_certfile is not None
    try:
        key, cert = options.ssl_keyfile.read_bytes(), options.ssl_certfile.read_bytes()
    except OSError as e:
        raise RuntimeError(f"--ssl-keyfile / --ssl-certfile: cannot read {e.filename} ({e.strerror})") from e
    return grpc.ssl_server_credentials([(key, cert)])


async def start_grpc_server(
    state: ServerState, host: str, port: int, options: ServerOptions | None = None
) -> grpc.aio.Server:
    """LLMService listening on host:port, in the running event loop (the engine's); stop it with `.stop()`.
    `options`: API keys (checked by ApiKeyCheck) and TLS (the HTTPS files), as on HTTP."""
    options = options or ServerOptions()
    server = grpc.aio.server(interceptors=[ApiKeyCheck(ApiKeys(options.api_keys))] if options.api_keys else None)
    add_service(server, LLMService(state))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    credentials = _credentials(options) if options.tls else None
    try:
        if credentials is not None:
            server.add_secure_port(address, credentials)
        else:
            server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"--grpc-port: cannot listen on {address} ({e}); is the port in use?") from e
    await server.start()
    log.info("gRPC: %s on %s%s", SERVICE, address, " (TLS)" if options.tls else "")
    return server
