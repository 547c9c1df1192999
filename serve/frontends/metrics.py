"""Observability: Prometheus metrics (served at GET /metrics) and a structured access log ("aotllm.access").

Each app gets its own `CollectorRegistry` (several apps may live in one process). Engine state (queue
lengths, KV pages, token and prefix-cache counters) is read from the schedulers at scrape time; request
latencies and finish reasons are recorded from the API layer as a sequence's events arrive, through a
`SequenceTimer` per sequence.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from serve.core.engine import Engine

access_log = logging.getLogger("aotllm.access")
PREFIX = "aotllm"

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


# Probes: logged only when they fail.
QUIET_PATHS = ("/health", "/metrics", "/v2/health/ready", "/v2/health/live")


class EngineCollector(Collector):
    """Gauges and counters read from the engine's schedulers and page pools when scraped."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.engine = engine  # the engine, or None while it loads

    def collect(self) -> Iterator[Metric]:
        engine = self.engine()
        scheds = list(engine.schedulers) if engine is not None else []

        def family(kind: type, name: str, doc: str, value: Any) -> Metric:
            m = kind(f"{PREFIX}_{name}", doc, labels=["device"])
            for s in scheds:
                m.add_metric([str(s.device_index)], float(value(s)))
            return m

        g, c = GaugeMetricFamily, CounterMetricFamily
        yield family(g, "requests_running", "Sequences decoding or prefilling.", lambda s: len(s.running))
        yield family(g, "requests_waiting", "Sequences waiting for a slot or for KV pages.", lambda s: len(s.waiting))
        yield family(g, "kv_pages_total", "KV-cache pages usable by sequences.", lambda s: s.pool.stats().total)
        yield family(g, "kv_pages_used", "KV-cache pages referenced by a sequence.", lambda s: s.pool.stats().used)
        yield family(
            g, "kv_pages_cached", "Unreferenced KV pages kept for prefix reuse.", lambda s: s.pool.stats().cached
        )
        yield family(
            c,
            "prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache.",
            lambda s: s.pool.stats().prefix_hit_tokens,
        )
        yield family(c, "prefix_cache_queries", "Prefix-cache lookups.", lambda s: s.pool.stats().prefix_queries)
        yield family(
            c, "prefix_cache_hits", "Prefix-cache lookups that reused a page.", lambda s: s.pool.stats().prefix_hits
        )
        yield family(
            c, "prompt_tokens", "Prompt tokens queued (once per sequence).", lambda s: s.counters.prompt_tokens
        )
        yield family(c, "generation_tokens", "Tokens generated.", lambda s: s.counters.generated_tokens)
        yield family(c, "preemptions", "Sequences preempted to free KV pages.", lambda s: s.counters.preemptions)
        yield family(c, "scheduler_steps", "Scheduler steps run.", lambda s: s.counters.steps)
        yield family(
            c,
            "step_seconds",
            "Wall time of the scheduler steps that ran the program.",
            lambda s: s.counters.step_seconds,
        )
        yield family(
            c,
            "device_seconds",
            "Time inside the program's calls (device time plus the result copy); "
            "step_seconds minus this is the host's share.",
            lambda s: s.counters.device_seconds,
        )


class Metrics:
    def __init__(self, engine: Callable[[], Engine | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        r = self.registry
        self.finished = Counter(
            f"{PREFIX}_requests_finished", "Sequences finished, by finish reason.", ["finish_reason"], registry=r
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from submission to the first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            f"{PREFIX}_inter_token_latency_seconds",
            "Time between two tokens of a sequence.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Time from submission to the finish.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self._timed: set[int] = set()  # ids of the sequences a timer observes now

    def timer(self, seq: Any) -> SequenceTimer:
        """A timer for `seq`; a second one while the first is open is a no-op (layers may both observe)."""
        if id(seq) in self._timed:
            return SequenceTimer(None, seq.arrival)
        self._timed.add(id(seq))
        return SequenceTimer(self, seq.arrival, lambda: self._timed.discard(id(seq)))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class SequenceTimer:
    """Feed it every event of one sequence (`timer(event)`), then `close()` (a sequence that never saw its
    finish event, e.g. because the client went away, counts as cancelled)."""

    def __init__(self, metrics: Metrics | None, arrival: float, on_close: Callable[[], None] | None = None) -> None:
        self.metrics, self.arrival, self.on_close = metrics, arrival, on_close  # arrival: monotonic, at submission
        self.last: float | None = None
        self.finish_reason: str | None = None

    def __call__(self, ev: Any) -> None:
        if self.metrics is None:
            return
        now = time.monotonic()
        if ev.token_ids:
            if self.last is None:
                self.metrics.ttft.observe(now - self.arrival)
            else:
                self.metrics.itl.observe((now - self.last) / len(ev.token_ids))
            self.last = now
        if ev.finish_reason and self.finish_reason is None:
            self.finish_reason = ev.finish_reason
            self.metrics.finished.labels(ev.finish_reason).inc()
            if ev.finish_reason in ("stop", "length"):
                self.metrics.e2e.observe(now - self.arrival)

    def close(self) -> None:
        if self.metrics is not None and self.finish_reason is None:
            self.finish_reason = "cancelled"
            self.metrics.finished.labels("cancelled").inc()
        if self.on_close is not None:
            self.on_close()
            self.on_close = None


@dataclass
class AccessRecord:
    """What a handler adds to its request's access-log line; fields left None are not logged."""

    id: str | None = None  # the request id the handler answered with (when the client sent no X-Request-Id)
    model: str | None = None
    user: str | None = None
    stream: bool | None = None
    n: int | None = None
    inputs: int | None = None  # embeddings: how many inputs
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    finish_reasons: list[str | None] | None = None


_access: ContextVar[AccessRecord] = ContextVar("aotllm_access")


def access_record() -> AccessRecord:
    """The access-log record of the request being handled (a throwaway one outside the access log)."""
    try:
        return _access.get()
    except LookupError:
        return AccessRecord()


class AccessLog:
    """ASGI middleware: one structured line per HTTP request, logged when the response body is complete
    (after the last chunk of a stream). Handlers add fields to `access_record()`; the request id is the
    X-Request-Id header, else the handler's id, else a fresh one; it is echoed back."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")[:128]
        record = AccessRecord()
        token = _access.set(record)  # (tasks the handler starts copy this context: they share `record`)
        status = {"code": 500}

        async def send_logged(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                if given:
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (b"x-request-id", given.encode("latin-1"))],
                    }
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            _access.reset(token)
            client = scope.get("client")
            fields = {k: v for k, v in asdict(record).items() if v is not None and k != "id"}
            line = {
                "request_id": given or record.id or uuid.uuid4().hex,
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status["code"],
                "duration_s": round(time.monotonic() - t0, 4),
                "client": client[0] if client else None,
                **fields,
            }
            if scope.get("path") not in QUIET_PATHS or status["code"] >= 400:
                access_log.info(json.dumps(line, default=str), extra={"access": line})
