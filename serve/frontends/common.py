"""What every front-end shares: queueing a request's sequences all or none, each sequence's events (latencies
to /metrics; the end the server's shutdown gives them), the fan-in of several sequences' events, and
collecting them for a non-streamed answer while watching for the client to leave. Whatever way a request
ends, none of its sequences keeps pages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from dataclasses import replace
from types import TracebackType

from fastapi import Request
from fastapi.responses import StreamingResponse

from serve.core.engine import BadRequest, Engine
from serve.core.sampling import SamplingParams
from serve.core.scheduler import Event, Sequence

from .state import SHUTDOWN_ERROR, public_message, server

EventSource = Callable[[Sequence], AsyncIterator[Event]]


# An SSE response's headers: no cache, and no buffering in a proxy (nginx), so tokens reach the client as made.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


def cancel(seqs: Iterable[Sequence]) -> None:
    """Cancel the sequences not finished yet; the scheduler frees their pages."""
    for seq in seqs:
        if not seq.finish_reason:
            seq.cancel()


def field_message(e: BadRequest, names: dict[str, str]) -> str:
    """The engine's message, led by the field at fault as the client's protocol names it (`names`: the
    SamplingParams names whose protocol name differs)."""
    return f"{names[e.field]}: {e}" if e.field in names else str(e)


def error_status(error: str | None) -> int:
    """The HTTP status of a generation that failed with `error`: 503 when the server's shutdown ended it (the
    client may retry, elsewhere), else 500."""
    return 503 if error == SHUTDOWN_ERROR else 500


class Submission:
    """A request's sequences, queued all or none: leaving the `with` block by an exception (a prompt
    refused, the queue full) cancels the ones already queued. A request of more sequences than the queue
    holds could never be served: a BadRequest, not the QueueFull that tells the client to retry."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.groups: list[list[Sequence]] = []  # per prompt: its `n` sequences

    def _check_size(self, n: int) -> None:
        limit = self.engine.cfg.max_queue
        if len(self.sequences) + n > limit:
            raise BadRequest(
                f"the request needs more than {limit} sequences (prompts x n); this server queues at most "
                f"{limit} (--max-queue): send fewer prompts or a smaller n per request"
            )

    def add(self, prompt_ids: list[int], params: SamplingParams, rid: str | None) -> list[Sequence]:
        self._check_size(params.n)
        group = self.engine.submit(prompt_ids, params, rid)
        self.groups.append(group)
        return group

    def add_embedding(self, prompt_ids: list[int], rid: str) -> Sequence:
        self._check_size(1)
        seq = self.engine.embed(prompt_ids, rid)
        self.groups.append([seq])
        return seq

    @property
    def sequences(self) -> list[Sequence]:
        return [s for g in self.groups for s in g]

    def __enter__(self) -> Submission:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None:
            cancel(self.sequences)


async def submit(engine: Engine, prompts: list[list[int]], params: SamplingParams, rid: str) -> list[Sequence]:
    """Compile the request's constraint (off the loop: `Engine.prepare`), then queue every prompt's
    sequences, all or none (several prompts are `rid-0`, `rid-1`, ...). BadRequest, QueueFull."""
    await engine.prepare(params)
    with Submission(engine) as sub:
        for i, ids in enumerate(prompts):
            sub.add(ids, params, rid if len(prompts) == 1 else f"{rid}-{i}")
    return sub.sequences


async def sequence_events(seq: Sequence, request: Request) -> AsyncIterator[Event]:
    """The sequence's events until its finish. One the server's shutdown cancelled ends with an error event
    (SHUTDOWN_ERROR); error texts reach the client without file paths. Latencies and the finish reason
    are recorded for /metrics (once per sequence). Whoever consumes this watches for the client leaving:
    `collect` does, and Starlette's StreamingResponse does for streams."""
    state = server(request)
    timer = state.metrics.timer(seq)
    try:
        if state.stopping:  # (submitted after the shutdown grace ended)
            seq.cancel()
        while True:
            ev = await seq.events.get()
            if ev.finish_reason == "cancelled" and state.stopping:
                ev = replace(ev, finish_reason="error", error=SHUTDOWN_ERROR)
            elif ev.error:
                ev = replace(ev, error=public_message(ev.error))
            timer(ev)
            yield ev
            if ev.finish_reason:
                return
    finally:
        timer.close()


async def fan_in(seqs: list[Sequence], events: EventSource) -> AsyncGenerator[tuple[int, Event], None]:
    """(index, event) for every sequence's events as they come, until all have ended. However it ends (all
    finished, a client gone, the consumer closing it early), the sequences not finished are cancelled."""
    queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()

    async def pump(index: int, seq: Sequence) -> None:
        try:
            async for ev in events(seq):
                await queue.put((index, ev))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(seqs)]
    try:
        left = len(seqs)
        while left:
            index, ev = await queue.get()
            if ev is None:
                left -= 1
            else:
                yield index, ev
    finally:
        cancel(seqs)
        for t in tasks:
            t.cancel()


async def until_disconnected(request: Request) -> None:
    """Returns when the client has closed the connection (ASGI's http.disconnect). Only for a request whose
    body has been read and whose answer has not started: then nothing else reads `receive`."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(seqs: list[Sequence], request: Request, on_event: Callable[[int, Event], None]) -> None:
    """Run the sequences to their finish for a non-streamed answer, handing each event to `on_event(index,
    event)`; an exception from it stops the collection (the others are cancelled) and propagates. The client
    leaving cancels the sequences at once (they finish "cancelled" at the scheduler's next step)."""

    async def cancel_on_disconnect() -> None:
        await until_disconnected(request)
        cancel(seqs)

    watcher = asyncio.create_task(cancel_on_disconnect())
    try:
        async with contextlib.aclosing(fan_in(seqs, lambda s: sequence_events(s, request))) as stream:
            async for index, ev in stream:
                on_event(index, ev)
    finally:
        watcher.cancel()
