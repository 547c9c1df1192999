"""`python -m bench.soak`: a long mixed load that checks the server stays correct and gives back what it took.

    python -m bench.soak --url http://127.0.0.1:8000 --minutes 10 --concurrency 8 [--disconnect-rate 0.1]
    python -m bench.soak --kv-pages 64 --minutes 2 [--serve-args="--max-running 8"]   # starts `python -m serve`
    python -m bench.soak ... --seed 1 --json soak.json

Without `--url` it starts `python -m serve` (the default SmolLM2 unless --serve-args names an export) on a
free loopback port, with `--kv-pages` pages so that the pool runs dry and sequences are preempted, and
stops it at the end. Each of `--concurrency` clients loops until `--minutes` / `--seconds` have passed:
it draws a prompt (a bank of `--prompts` synthetic prompts of `--min-input-len`..`--max-input-len` tokens,
calibrated with the server's /tokenize; prompts recur, so the prefix cache is exercised too), max tokens in
1..`--max-output-len`, streamed or not, greedy or sampled (seeded), EOS ignored or not, and a route among
/v1/completions, /v1/chat/completions and /generate; with probability `--disconnect-rate` it closes the
connection mid-answer (a streamed one after a random number of events, another after a random delay).
The same `--seed` draws the same requests in the same order per client (how many each client gets
through depends on the server's speed).

Every answer is checked: HTTP 200, the protocol's shape, a finish reason of "stop" or "length", no more
tokens than asked, a stream that ends with [DONE] and carries no error event. Anything else is an error:
another status (5xx, 4xx), a transport error, a malformed answer, no byte for `--stall-timeout` seconds,
or a request over `--request-timeout`. After the clients stop (requests in flight finish first, each
bounded by its timeout), the tool waits up to `--settle-timeout` seconds for the KV pool to drain.

Reported: requests sent, completed, intended disconnects, errors (by kind, with a sample of messages),
preemptions and peak KV pages (GET /metrics), the server's resident memory at the start and the end
(/proc/PID/status when this tool started it, else the server's process_resident_memory_bytes if it
exports it), and KV pages still used at the end. The exit status is 1 when there was an error or pages
stayed used (or could not be read), else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import json
import math
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .prompts import Prompt, synthetic_prompt
from .report import print_table, write_json
from .serving import BenchError, _client
from .sse import sse_data
from .tokens import TokenCounter, find_counter

ROUTES = ("/v1/completions", "/v1/chat/completions", "/generate")
FINISHED = ("stop", "length")  # the finish reasons of an answer that ran to its end
ERROR_SAMPLES = 20  # messages kept for the report (the counts by kind cover the rest)


@dataclass
class SoakConfig:
    url: str | None  # None: start `python -m serve` with `serve_args`
    seconds: float  # clients start no request after this
    concurrency: int
    seed: int = 0
    disconnect_rate: float = 0.1
    prompts: int = 64  # the bank clients draw prompts from
    min_input_len: int = 8
    max_input_len: int = 256
    max_output_len: int = 128
    stall_timeout: float = 60.0  # seconds without a byte from the server
    request_timeout: float = 300.0  # seconds a whole request may take
    settle_timeout: float = 15.0  # seconds the pool gets to drain after the clients stop
    scrape_interval: float = 1.0  # /metrics during the run (peak pages)
    kv_pages: int | None = None  # when starting the server: its --kv-pages
    serve_args: list[str] = field(default_factory=list)  # when starting the server: more flags
    start_timeout: float = 1800.0  # the default model may build on first start (minutes)
    server_log: str | None = None  # when starting the server: its output goes here (default: a temp file)


@dataclass(frozen=True)
class RequestPlan:
    """One request as a client drew it."""

    route: str
    prompt: str
    max_tokens: int
    stream: bool
    temperature: float
    seed: int
    ignore_eos: bool
    disconnect: bool
    cut_events: int  # streamed: close after this many events (if the stream is still open)
    cut_s: float  # not streamed: close after this many seconds (if no answer yet)


class Outcome(enum.Enum):
    COMPLETED = "completed"
    DISCONNECTED = "disconnected"  # closed by the client on purpose, before the answer ended
    ERROR = "error"


@dataclass
class RequestOutcome:
    outcome: Outcome
    error_kind: str = ""  # "HTTP 500", "stall", "timeout", "malformed", "stream error", a transport error's type
    message: str = ""
    output_tokens: int = 0  # by the server's count, when it gave one


@dataclass
class ServerSample:
    """What GET /metrics says at one moment, summed over the replicas."""

    kv_pages_used: int
    kv_pages_total: int
    requests_running: int
    requests_waiting: int
    preemptions: int
    resident_bytes: int | None  # process_resident_memory_bytes, where the server exports it


@dataclass
class SoakResult:
    date: str
    config: SoakConfig
    url: str
    duration_s: float  # first request sent -> last request done
    sent: int
    completed: int
    disconnected: int
    errors: int
    errors_by_kind: dict[str, int]
    error_samples: list[str]  # "route: kind: message", the first ERROR_SAMPLES
    sent_by_route: dict[str, int]
    streamed: int
    output_tokens: int  # completed requests, by the server's counts
    preemptions: int | None  # during the run (a counter's difference)
    kv_pages_total: int | None
    kv_pages_peak: int | None  # the most used at a scrape during the run
    kv_pages_used_end: int | None  # after the clients stopped and the pool settled
    requests_left_end: int | None  # running + waiting after the settle
    rss_start_bytes: int | None
    rss_end_bytes: int | None

    @property
    def passed(self) -> bool:
        return self.errors == 0 and self.kv_pages_used_end == 0


class Tally:
    """The clients' outcomes, counted as they come (a long soak keeps no per-request records)."""

    def __init__(self) -> None:
        self.outcomes: Counter[Outcome] = Counter()
        self.kinds: Counter[str] = Counter()
        self.routes: Counter[str] = Counter()
        self.samples: list[str] = []
        self.streamed = self.output_tokens = 0

    def sent(self, plan: RequestPlan) -> None:
        self.routes[plan.route] += 1
        self.streamed += plan.stream

    def add(self, route: str, out: RequestOutcome) -> None:
        self.outcomes[out.outcome] += 1
        self.output_tokens += out.output_tokens
        if out.outcome is Outcome.ERROR:
            self.error(route, out.error_kind, out.message)

    def error(self, route: str, kind: str, message: str) -> None:
        """An error outside a client's request (a failed /metrics scrape) counts as one too."""
        if route not in ROUTES:
            self.outcomes[Outcome.ERROR] += 1
        self.kinds[kind] += 1
        if len(self.samples) < ERROR_SAMPLES:
            self.samples.append(f"{route}: {kind}: {message[:300]}")


# -- the requests -------------------------------------------------------------------------------------------


async def prompt_bank(cfg: SoakConfig, counter: TokenCounter | None) -> list[Prompt]:
    """`cfg.prompts` prompts of random lengths, the same for the same seed."""
    rng = random.Random(f"{cfg.seed}-lengths")
    lengths = [rng.randint(cfg.min_input_len, cfg.max_input_len) for _ in range(cfg.prompts)]
    limit = asyncio.Semaphore(16)

    async def one(i: int, n: int) -> Prompt:
        async with limit:
            return await synthetic_prompt(random.Random(f"{cfg.seed}-prompt-{i}"), n, counter)

    return list(await asyncio.gather(*(one(i, n) for i, n in enumerate(lengths))))


def draw(rng: random.Random, cfg: SoakConfig, bank: list[Prompt]) -> RequestPlan:
    """The next request of a client. Every field is drawn, used or not, so a plan never shifts the next."""
    max_tokens = rng.randint(1, cfg.max_output_len)
    return RequestPlan(
        route=rng.choice(ROUTES),
        prompt=rng.choice(bank).text,
        max_tokens=max_tokens,
        stream=rng.random() < 0.5,
        temperature=rng.choice((0.0, 0.8)),
        seed=rng.randrange(1 << 31),
        ignore_eos=rng.random() < 0.5,
        disconnect=rng.random() < cfg.disconnect_rate,
        cut_events=rng.randint(1, max_tokens + 1),
        cut_s=rng.uniform(0.01, 1.0),
    )


def payload(plan: RequestPlan, model: str | None) -> dict[str, Any]:
    sampling = {"temperature": plan.temperature, "seed": plan.seed, "ignore_eos": plan.ignore_eos}
    if plan.route == "/generate":
        return {
            "text": plan.prompt,
            "stream": plan.stream,
            "return_input_ids": True,  # (a whole answer's token ids: its only token count)
            "sampling_params": {"max_completion_tokens": plan.max_tokens, **sampling},
        }
    body: dict[str, Any] = {"model": model, "max_tokens": plan.max_tokens, "stream": plan.stream, **sampling}
    if plan.stream:
        body["stream_options"] = {"include_usage": True}
    if plan.route == "/v1/chat/completions":
        return {**body, "messages": [{"role": "user", "content": plan.prompt}]}
    return {**body, "prompt": plan.prompt}


class Malformed(Exception):
    """The answer breaks its protocol."""


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise Malformed(what)


def check_answer(plan: RequestPlan, body: Any) -> int:
    """A whole (not streamed) answer; returns its completion tokens."""
    _check(isinstance(body, dict), f"not a JSON object: {str(body)[:100]}")
    if plan.route == "/generate":
        groups = body.get("responses")
        _check(isinstance(groups, list) and len(groups) == 1, "responses: not one prompt's")
        answers = groups[0].get("responses") if isinstance(groups[0], dict) else None
        _check(isinstance(answers, list) and len(answers) == 1, "responses[0].responses: not one answer")
        answer = answers[0]
        _check(isinstance(answer.get("text"), str), "no text")
        _check(answer.get("finish_reason") in FINISHED, f"finish_reason {answer.get('finish_reason')!r}")
        ids = answer.get("token_ids")
        _check(isinstance(ids, list) and len(ids) <= plan.max_tokens, f"token_ids {str(ids)[:100]}")
        return len(ids)
    choices = body.get("choices")
    _check(isinstance(choices, list) and len(choices) == 1, "choices: not one")
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") if plan.route == "/v1/chat/completions" else choice.get("text")
    _check(isinstance(text, str), "no text")
    _check(choice.get("finish_reason") in FINISHED, f"finish_reason {choice.get('finish_reason')!r}")
    return _usage_tokens(plan, body.get("usage"))


def _usage_tokens(plan: RequestPlan, usage: Any) -> int:
    _check(isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int), "no usage")
    n = usage["completion_tokens"]
    _check(0 <= n <= plan.max_tokens, f"{n} completion tokens, {plan.max_tokens} asked for")
    return n


class StreamCheck:
    """A streamed answer's events, one at a time; `end()` checks the whole."""

    def __init__(self, plan: RequestPlan) -> None:
        self.plan = plan
        self.finish: str | None = None
        self.tokens = 0
        self.done = False

    def event(self, data: str) -> None:
        _check(not self.done, "an event after [DONE]")
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            raise Malformed(f"not JSON: {data[:100]!r}") from None
        _check(isinstance(obj, dict), f"not a JSON object: {data[:100]!r}")
        if obj.get("error"):
            raise StreamError(str(obj["error"])[:300])
        if self.plan.route == "/generate":
            meta = obj.get("meta_info")
            _check(isinstance(meta, dict) and isinstance(obj.get("text"), str), "no text or meta_info")
            if meta.get("error"):
                raise StreamError(str(meta["error"])[:300])
            if isinstance(meta.get("completion_tokens"), int):
                self.tokens = meta["completion_tokens"]
                _check(self.tokens <= self.plan.max_tokens, f"{self.tokens} tokens, {self.plan.max_tokens} asked for")
            self._finish(meta.get("finish_reason"))
            return
        if obj.get("usage"):
            self.tokens = _usage_tokens(self.plan, obj["usage"])
        for choice in obj.get("choices") or []:
            self._finish(choice.get("finish_reason"))

    def _finish(self, reason: Any) -> None:
        if reason is None:
            return
        _check(self.finish is None, f"a second finish_reason {reason!r}")
        _check(reason in FINISHED, f"finish_reason {reason!r}")
        self.finish = reason

    def end(self) -> int:
        _check(self.done, "the stream ended without [DONE]")
        _check(self.finish is not None, "no finish_reason")
        return self.tokens


class StreamError(Exception):
    """The server's error event inside a stream."""


async def send(client: httpx.AsyncClient, url: str, model: str | None, plan: RequestPlan) -> RequestOutcome:
    """One request; never raises (a client's loop goes on whatever happens)."""
    try:
        if plan.stream:
            return await _streamed(client, url, model, plan)
        return await _whole(client, url, model, plan)
    except httpx.TimeoutException as e:  # the read timeout is the stall timeout (bench.serving._client)
        return RequestOutcome(Outcome.ERROR, "stall", f"{type(e).__name__}: no byte for the stall timeout")
    except httpx.HTTPError as e:
        return RequestOutcome(Outcome.ERROR, type(e).__name__, str(e) or repr(e))
    except Malformed as e:
        return RequestOutcome(Outcome.ERROR, "malformed", str(e))
    except (AttributeError, TypeError, KeyError) as e:  # a field of an unexpected type deep in the answer
        return RequestOutcome(Outcome.ERROR, "malformed", f"{type(e).__name__}: {e}")
    except StreamError as e:
        return RequestOutcome(Outcome.ERROR, "stream error", str(e))


async def _status_error(r: httpx.Response) -> RequestOutcome:
    body = (await r.aread()).decode("utf-8", "replace")
    return RequestOutcome(Outcome.ERROR, f"HTTP {r.status_code}", body[:300])


async def _streamed(client: httpx.AsyncClient, url: str, model: str | None, plan: RequestPlan) -> RequestOutcome:
    check = StreamCheck(plan)
    events = 0
    async with client.stream("POST", url + plan.route, json=payload(plan, model)) as r:
        if r.status_code != 200:
            return await _status_error(r)
        async for data in sse_data(r.aiter_lines()):
            check.event(data)
            events += 1
            if plan.disconnect and events >= plan.cut_events and not check.done:
                # leaving the block closes the connection (no keep-alive): the server sees the client go
                return RequestOutcome(Outcome.DISCONNECTED)
    return RequestOutcome(Outcome.COMPLETED, output_tokens=check.end())


async def _whole(client: httpx.AsyncClient, url: str, model: str | None, plan: RequestPlan) -> RequestOutcome:
    post = client.post(url + plan.route, json=payload(plan, model))
    if plan.disconnect:
        try:  # the cancelled request closes its connection
            r = await asyncio.wait_for(post, plan.cut_s)
        except asyncio.TimeoutError:
            return RequestOutcome(Outcome.DISCONNECTED)
    else:
        r = await post
    if r.status_code != 200:
        return await _status_error(r)
    try:
        body = r.json()
    except json.JSONDecodeError:
        raise Malformed(f"not JSON: {r.text[:100]!r}") from None
    return RequestOutcome(Outcome.COMPLETED, output_tokens=check_answer(plan, body))


# -- the server's side --------------------------------------------------------------------------------------


async def scrape(client: httpx.AsyncClient, url: str) -> ServerSample:
    r = await client.get(f"{url}/metrics")
    r.raise_for_status()
    total: Counter[str] = Counter()
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            total[s.name] += s.value  # summed over the replicas' `device` labels
    if "aotllm_kv_pages_used" not in total:
        raise ValueError(f"{url}/metrics has no aotllm_kv_pages_used: not an aotllm server?")
    rss = total.get("process_resident_memory_bytes")
    return ServerSample(
        kv_pages_used=int(total["aotllm_kv_pages_used"]),
        kv_pages_total=int(total["aotllm_kv_pages_total"]),
        requests_running=int(total["aotllm_requests_running"]),
        requests_waiting=int(total["aotllm_requests_waiting"]),
        preemptions=int(total["aotllm_preemptions_total"]),
        resident_bytes=None if rss is None else int(rss),
    )


def rss_bytes(pid: int) -> int | None:
    """VmRSS of a process (Linux), None where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _rss(pid: int | None, sample: ServerSample | None) -> int | None:
    if pid is not None:
        return rss_bytes(pid)
    return sample.resident_bytes if sample else None


async def settle(client: httpx.AsyncClient, url: str, timeout_s: float) -> ServerSample:
    """/metrics once no sequence is left and no page used, or when `timeout_s` has passed. (A cancelled
    sequence gives its pages back at the scheduler's next step, so the pool drains a moment after the
    last answer.)"""
    deadline = time.monotonic() + timeout_s
    while True:
        s = await scrape(client, url)
        idle = s.kv_pages_used == 0 and s.requests_running == 0 and s.requests_waiting == 0
        if idle or time.monotonic() >= deadline:
            return s
        await asyncio.sleep(0.2)


# -- the run ------------------------------------------------------------------------------------------------


async def run(cfg: SoakConfig, url: str, server_pid: int | None = None, progress: bool = True) -> SoakResult:
    """The soak against a running server at `url`; `server_pid` (when known) is read for its memory."""
    url = url.rstrip("/")
    tally = Tally()
    async with _client(cfg.stall_timeout) as client:
        try:
            before = await scrape(client, url)
            model = await _model_name(client, url)
            bank = await prompt_bank(cfg, await find_counter(client, url, None))
        except (httpx.HTTPError, ValueError, KeyError) as e:
            raise BenchError(f"{url}: {type(e).__name__}: {e}") from e
        rss_start = _rss(server_pid, before)
        date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        t0 = time.monotonic()
        deadline = t0 + cfg.seconds
        stop_monitor = asyncio.Event()
        peak = before.kv_pages_used

        async def client_loop(i: int) -> None:
            rng = random.Random(f"{cfg.seed}-client-{i}")
            while time.monotonic() < deadline:
                plan = draw(rng, cfg, bank)
                tally.sent(plan)
                try:
                    out = await asyncio.wait_for(send(client, url, model, plan), cfg.request_timeout)
                except asyncio.TimeoutError:
                    out = RequestOutcome(Outcome.ERROR, "timeout", f"over {cfg.request_timeout:g} s")
                tally.add(plan.route, out)

        async def monitor() -> None:
            nonlocal peak
            while not stop_monitor.is_set():
                try:
                    peak = max(peak, (await scrape(client, url)).kv_pages_used)
                except (httpx.HTTPError, ValueError) as e:
                    tally.error("/metrics", f"scrape {type(e).__name__}", str(e))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop_monitor.wait(), cfg.scrape_interval)

        async def report_progress() -> None:
            while not stop_monitor.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop_monitor.wait(), 10.0)
                o = tally.outcomes
                print(
                    f"[soak] {time.monotonic() - t0:.0f}s: sent {sum(tally.routes.values())}, completed "
                    f"{o[Outcome.COMPLETED]}, disconnected {o[Outcome.DISCONNECTED]}, errors {o[Outcome.ERROR]}",
                    file=sys.stderr,
                )

        watchers = [asyncio.create_task(monitor())] + ([asyncio.create_task(report_progress())] if progress else [])
        await asyncio.gather(*(client_loop(i) for i in range(cfg.concurrency)))
        duration = time.monotonic() - t0
        stop_monitor.set()
        await asyncio.gather(*watchers)
        try:
            end: ServerSample | None = await settle(client, url, cfg.settle_timeout)
        except (httpx.HTTPError, ValueError) as e:
            tally.error("/metrics", f"scrape {type(e).__name__}", str(e))
            end = None
    o = tally.outcomes
    return SoakResult(
        date=date,
        config=cfg,
        url=url,
        duration_s=duration,
        sent=sum(tally.routes.values()),
        completed=o[Outcome.COMPLETED],
        disconnected=o[Outcome.DISCONNECTED],
        errors=o[Outcome.ERROR],
        errors_by_kind=dict(tally.kinds.most_common()),
        error_samples=tally.samples,
        sent_by_route={route: tally.routes[route] for route in ROUTES},
        streamed=tally.streamed,
        output_tokens=tally.output_tokens,
        preemptions=end.preemptions - before.preemptions if end else None,
        kv_pages_total=end.kv_pages_total if end else before.kv_pages_total,
        kv_pages_peak=max(peak, end.kv_pages_used) if end else peak,
        kv_pages_used_end=end.kv_pages_used if end else None,
        requests_left_end=end.requests_running + end.requests_waiting if end else None,
        rss_start_bytes=rss_start,
        rss_end_bytes=_rss(server_pid, end),
    )


async def _model_name(client: httpx.AsyncClient, url: str) -> str | None:
    r = await client.get(f"{url}/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


@dataclass
class StartedServer:
    url: str
    pid: int
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@contextlib.contextmanager
def started_server(cfg: SoakConfig) -> Iterator[StartedServer]:
    """`python -m serve` on a free loopback port until the block ends (SIGTERM: it drains, then exits)."""
    port = _free_port()
    args = [*(["--kv-pages", str(cfg.kv_pages)] if cfg.kv_pages else []), *cfg.serve_args]
    cmd = [sys.executable, "-m", "serve", "--host", "127.0.0.1", "--port", str(port), *args]
    log = Path(cfg.server_log or tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
    url = f"http://127.0.0.1:{port}"
    print(f"[soak] starting {shlex.join(cmd[1:])} (log: {log})", file=sys.stderr)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + cfg.start_timeout
        while not _healthy(url):
            if proc.poll() is not None:
                raise BenchError(f"the server exited ({proc.returncode}) before it was ready:\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise BenchError(f"the server was not ready in {cfg.start_timeout:g} s:\n{_tail(log)}")
            time.sleep(0.5)
        yield StartedServer(url, proc.pid, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def soak(cfg: SoakConfig, progress: bool = True) -> SoakResult:
    """The whole soak: against `cfg.url`, or a server started (and stopped) for it."""
    if cfg.url:
        return asyncio.run(run(cfg, cfg.url, progress=progress))
    with started_server(cfg) as server:
        return asyncio.run(run(cfg, server.url, server.pid, progress))


# -- output and the command line ----------------------------------------------------------------------------


def _mib(n: int | None) -> float | None:
    return None if n is None else n / (1 << 20)


def table_rows(r: SoakResult) -> list[tuple[str, Any]]:
    return [
        ("Duration (s)", r.duration_s),
        ("Requests sent", r.sent),
        *((f"  {route}", n) for route, n in r.sent_by_route.items()),
        ("  streamed", r.streamed),
        ("Completed", r.completed),
        ("Intended disconnects", r.disconnected),
        ("Errors", r.errors),
        *((f"  {kind}", n) for kind, n in r.errors_by_kind.items()),
        ("Output tokens (completed)", r.output_tokens),
        ("Preemptions", r.preemptions),
        ("KV pages total", r.kv_pages_total),
        ("KV pages peak", r.kv_pages_peak),
        ("KV pages used at the end", r.kv_pages_used_end),
        ("Requests left at the end", r.requests_left_end),
        ("Server RSS at start (MiB)", _mib(r.rss_start_bytes)),
        ("Server RSS at end (MiB)", _mib(r.rss_end_bytes)),
        ("Passed", r.passed),
    ]


def print_result(r: SoakResult) -> None:
    print_table([{"metric": k, "value": v} for k, v in table_rows(r)], ["metric", "value"], title="Soak")
    if r.error_samples:
        print("\nError samples:")
        for s in r.error_samples:
            print(f"  {s}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", help="the server's base URL (default: start `python -m serve` for the run)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long clients send requests (default 10)")
    length.add_argument("--seconds", type=float, help="the same in seconds")
    p.add_argument("--concurrency", type=int, default=8, help="clients, each with one request in flight")
    p.add_argument("--disconnect-rate", type=float, default=0.1, help="probability a client leaves mid-answer")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts and every client's draws")
    p.add_argument("--prompts", type=int, default=64, help="distinct prompts the clients draw from")
    p.add_argument("--min-input-len", type=int, default=8, help="prompt tokens, at least")
    p.add_argument("--max-input-len", type=int, default=256, help="prompt tokens, at most")
    p.add_argument("--max-output-len", type=int, default=128, help="max tokens per request, drawn in 1..this")
    p.add_argument("--stall-timeout", type=float, default=60.0, help="seconds without a byte: an error")
    p.add_argument("--request-timeout", type=float, default=300.0, help="seconds per request: more is an error")
    p.add_argument("--settle-timeout", type=float, default=15.0, help="seconds the KV pool gets to drain at the end")
    p.add_argument("--kv-pages", type=int, help="started server: its --kv-pages (small: preemptions)")
    p.add_argument(
        "--serve-args",
        default="",
        help='started server: more `python -m serve` flags, one string (--serve-args="--max-running 8")',
    )
    p.add_argument("--start-timeout", type=float, default=1800.0, help="seconds the started server may take")
    p.add_argument("--server-log", help="started server: write its output here (default: a temporary file)")
    p.add_argument("--json", help="write the result here")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.url and (args.kv_pages or args.serve_args):
        p.error("--kv-pages and --serve-args are for a server the tool starts, not with --url")
    if args.concurrency < 1 or args.prompts < 1 or args.max_output_len < 1:
        p.error("--concurrency, --prompts and --max-output-len must be positive")
    if not 1 <= args.min_input_len <= args.max_input_len:
        p.error("need 1 <= --min-input-len <= --max-input-len")
    if not 0 <= args.disconnect_rate <= 1:
        p.error("--disconnect-rate is a probability")
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 10)
    if not (math.isfinite(seconds) and seconds > 0):
        p.error("--minutes / --seconds must be positive")
    args.duration_s = seconds
    return args


def config_from(args: argparse.Namespace) -> SoakConfig:
    return SoakConfig(
        url=args.url.rstrip("/") if args.url else None,
        seconds=args.duration_s,
        concurrency=args.concurrency,
        seed=args.seed,
        disconnect_rate=args.disconnect_rate,
        prompts=args.prompts,
        min_input_len=args.min_input_len,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
        stall_timeout=args.stall_timeout,
        request_timeout=args.request_timeout,
        settle_timeout=args.settle_timeout,
        kv_pages=args.kv_pages,
        serve_args=shlex.split(args.serve_args),
        start_timeout=args.start_timeout,
        server_log=args.server_log,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = config_from(args)
    print(
        f"[soak] {cfg.url or 'a started server'}: {cfg.seconds:g} s, {cfg.concurrency} clients, "
        f"disconnect rate {cfg.disconnect_rate:g}, seed {cfg.seed}",
        file=sys.stderr,
    )
    try:
        result = soak(cfg, progress=not args.quiet)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print_result(result)
    if args.json:
        write_json(args.json, result)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
