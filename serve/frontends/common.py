"""What every front-end shares: queueing a request's sequences all or none, each sequence's events (the
client going away cancels it; latencies go to /metrics), the fan-in of several sequences' events, and
collecting them for a non-streamed answer. Whatever way a request ends, none of its sequences keeps pages."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable
from types import TracebackType

from fastapi import Request

from serve.core.engine import BadRequest, Engine
from serve.core.sampling import SamplingParams
from serve.core.scheduler import Event, Sequence

from .state import server

EventSource = Callable[[Sequence], AsyncIterator[Event]]
# How often a waiting stream checks that its client is still connected.
DISCONNECT_POLL_S = 0.5


def cancel(seqs: Iterable[Sequence]) -> None:
    """Cancel the sequences not finished yet; the scheduler frees their pages."""
    for seq in seqs:
        if not seq.finish_reason:
            seq.cancel()


def field_message(e: BadRequest, names: dict[str, str]) -> str:
    """The engine's message, led by the field at fault as the client's protocol names it (`names`: the
    SamplingParams names whose protocol name differs)."""
    return f"{names[e.field]}: {e}" if e.field in names else str(e)


class Submission:
    """A request's sequences, queued all or none: leaving the `with` block by an exception (a prompt
    refused, the queue full) cancels the ones already queued."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.groups: list[list[Sequence]] = []  # per prompt: its `n` sequences

    def add(self, prompt_ids: list[int], params: SamplingParams, rid: str | None) -> list[Sequence]:
        group = self.engine.submit(prompt_ids, params, rid)
        self.groups.append(group)
        return group

    def add_embedding(self, prompt_ids: list[int], rid: str) -> Sequence:
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


async def sequence_events(seq: Sequence, request: Request) -> AsyncIterator[Event]:
    """The sequence's events until its finish; a client that goes away cancels it. Latencies and the finish
    reason are recorded for /metrics (once per sequence)."""
    timer = server(request).metrics.timer(seq)
    try:
        while True:
            try:
                ev = await asyncio.wait_for(seq.events.get(), timeout=DISCONNECT_POLL_S)
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


async def collect(seqs: list[Sequence], events: EventSource, on_event: Callable[[int, Event], None]) -> None:
    """Run the sequences to their finish for a non-streamed answer, handing each event to `on_event(index,
    event)`; an exception from it stops the collection (the others are cancelled) and propagates."""
    async with contextlib.aclosing(fan_in(seqs, events)) as stream:
        async for index, ev in stream:
            on_event(index, ev)
