"""bench/serving.py (`python -m bench.serving`) against the tiny model's server, one run per backend."""

import asyncio
import json
import logging

import numpy as np
import pytest

from bench import serving
from bench.backends import GenerateBackend, StreamState
from bench.report import format_table
from bench.sse import sse_data
from tests.server_util import ServerThread, pause, resume, tiny_config

N, CONCURRENCY, INPUT_LEN, OUTPUT_LEN = 6, 3, 16, 8
COUNTED_BY = {"generate": "meta_info", "openai": "usage", "triton": "logprobs"}


def bench(server, tmp_path, *extra: str) -> tuple[int, dict]:
    out = tmp_path / "result.json"
    rc = serving.main(
        [
            "--url",
            server.url,
            "--num-prompts",
            str(N),
            "--input-len",
            str(INPUT_LEN),
            "--output-len",
            str(OUTPUT_LEN),
            "--ignore-eos",
            "--json",
            str(out),
            *extra,
        ]
    )
    return rc, json.loads(out.read_text())


def check_definitions(result: dict) -> None:
    """The summary recomputed from the per-request records, with vLLM's definitions."""
    s, ok = result["summary"], [r for r in result["requests"] if r["success"]]
    for r in ok:
        assert 0 < r["ttft_s"] <= r["latency_s"]
        assert len(r["itl_s"]) == r["chunks"] - 1 and all(gap >= 0 for gap in r["itl_s"])
        assert r["ttft_s"] + sum(r["itl_s"]) <= r["latency_s"] + 1e-9  # the last chunk comes before the end
        assert r["tpot_s"] == pytest.approx((r["latency_s"] - r["ttft_s"]) / (r["output_tokens"] - 1))
    ms = {
        "ttft": [r["ttft_s"] * 1000 for r in ok],
        "tpot": [r["tpot_s"] * 1000 for r in ok],
        "itl": [g * 1000 for r in ok for g in r["itl_s"]],
        "e2el": [r["latency_s"] * 1000 for r in ok],
    }
    for name, values in ms.items():
        assert s[f"mean_{name}_ms"] == pytest.approx(np.mean(values))
        assert s[f"median_{name}_ms"] == pytest.approx(np.median(values))
        assert s[f"p99_{name}_ms"] == pytest.approx(np.percentile(values, 99))
        assert s[f"median_{name}_ms"] <= s[f"p99_{name}_ms"] <= max(values) + 1e-9
    d = s["duration_s"]
    assert d >= max(r["start_s"] + r["latency_s"] for r in ok) - 1e-6
    assert s["request_throughput"] == pytest.approx(s["completed"] / d)
    assert s["total_output_tokens"] == sum(r["output_tokens"] for r in ok)
    assert s["output_throughput"] == pytest.approx(s["total_output_tokens"] / d)
    assert s["total_input_tokens"] == sum(r["prompt_tokens"] for r in ok)
    assert s["total_token_throughput"] == pytest.approx((s["total_input_tokens"] + s["total_output_tokens"]) / d)
    assert s["concurrency"] == pytest.approx(sum(r["latency_s"] for r in ok) / d)


@pytest.mark.parametrize("backend", ["generate", "openai", "triton"])
def test_each_backend(server, tmp_path, capsys, backend):
    rc, result = bench(server, tmp_path, "--backend", backend, "--concurrency", str(CONCURRENCY))
    assert rc == 0
    s = result["summary"]
    assert (s["completed"], s["failed"], s["errors"]) == (N, 0, {})
    assert s["total_output_tokens"] == N * OUTPUT_LEN  # exact: the server's own counts
    assert s["output_tokens_from"] == COUNTED_BY[backend]
    assert s["total_input_tokens"] == N * INPUT_LEN  # the prompts were calibrated with POST /tokenize
    assert all(r["output_tokens"] == OUTPUT_LEN and r["text"] for r in result["requests"])
    assert result["config"]["concurrency"] == CONCURRENCY and result["config"]["request_rate"] is None
    check_definitions(result)
    table = capsys.readouterr().out
    assert "| Successful requests" in table and f"| {backend} 127.0.0.1:{server.port}" in table


@pytest.mark.parametrize("backend", ["generate", "openai", "triton"])
def test_json_schema_workload(server, tmp_path, backend):
    """--json-schemas: every request's output is constrained, in each API's own field."""
    rc, result = bench(server, tmp_path, "--backend", backend, "--json-schemas", "3", "--ignore-eos")
    assert rc == 0 and result["config"]["json_schemas"] == 3
    assert result["summary"]["completed"] == N
    assert all(r["text"].startswith("{") for r in result["requests"])  # (a random model's output: the first key)


def test_poisson_arrivals(server, tmp_path):
    rc, result = bench(server, tmp_path, "--backend", "openai", "--request-rate", "50", "--seed", "3")
    assert rc == 0 and result["config"]["request_rate"] == 50
    s = result["summary"]
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (N, 0, N * OUTPUT_LEN)
    starts = [r["start_s"] for r in sorted(result["requests"], key=lambda r: r["index"])]
    assert starts == sorted(starts) and starts[0] >= 0  # sent in order, one after another
    check_definitions(result)


def test_same_seed_same_prompts(server):
    cfg = serving.config_from(serving.parse_args(["--url", server.url, "--num-prompts", "3", "--input-len", "12"]))

    async def prompts():
        async with serving._client(60) as client:
            from bench.tokens import find_counter

            return await serving._prompts(cfg, await find_counter(client, server.url, None))

    a, b = asyncio.run(prompts()), asyncio.run(prompts())
    assert a == b and len({p.text for p in a}) == 3 and all(p.tokens == 12 for p in a)


def test_failures_are_counted_not_raised(server, tmp_path, capsys):
    # an unknown Triton model: every request is a 404 (no warm-up, which would stop the run)
    rc, result = bench(server, tmp_path, "--backend", "triton", "--model", "nope", "--warmup", "0")
    s = result["summary"]
    assert rc == 1 and (s["completed"], s["failed"], s["errors"]) == (0, N, {"HTTP 404": N})
    assert all(r["error"].startswith("HTTP 404") for r in result["requests"])
    assert s["mean_ttft_ms"] is None and s["total_output_tokens"] == 0
    assert "HTTP 404 x6" in capsys.readouterr().out


def test_warmup_failure_stops_the_run(server, tmp_path, capsys):
    rc = serving.main(
        [
            "--url",
            server.url,
            "--backend",
            "triton",
            "--model",
            "nope",
            "--num-prompts",
            "2",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert rc == 1 and "warm-up request failed" in capsys.readouterr().err and not (tmp_path / "r.json").exists()


class _ResumeAfterRefusals(logging.Handler):
    """Resumes the paused engine once the access log has shown `refusals` 503 answers."""

    def __init__(self, engine, refusals: int) -> None:
        super().__init__()
        self.engine, self.refusals, self.seen = engine, refusals, 0

    def emit(self, record: logging.LogRecord) -> None:
        self.seen += json.loads(record.getMessage())["status"] == 503
        if self.seen == self.refusals:
            resume(self.engine)


def test_queue_full_503s_are_failures(tiny_program, tmp_path):
    """All N requests at once into a queue of 2 while the engine is paused: 2 are queued, N - 2 refused."""
    s = ServerThread(tiny_config(tiny_program, max_queue=2))
    logger, old_level = logging.getLogger("aotllm.access"), logging.getLogger("aotllm.access").level
    handler = _ResumeAfterRefusals(s.engine, N - 2)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    pause(s.engine)
    try:
        rc, result = bench(
            s, tmp_path, "--backend", "generate", "--output-len", "40", "--disable-tqdm", "--warmup", "0"
        )
    finally:
        resume(s.engine)
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        s.stop()
    summary = result["summary"]
    assert (summary["completed"], summary["failed"]) == (2, N - 2)
    assert rc == 0 and summary["completed"] >= 1 and summary["failed"] >= 1
    assert summary["completed"] + summary["failed"] == N and set(summary["errors"]) == {"HTTP 503"}
    assert summary["total_output_tokens"] == summary["completed"] * 40
    check_definitions(result)


def test_compare_prints_one_table(server, tmp_path, capsys):
    paths = []
    for backend in ("generate", "openai"):
        out = tmp_path / f"{backend}.json"
        assert (
            serving.main(
                [
                    "--url",
                    server.url,
                    "--backend",
                    backend,
                    "--num-prompts",
                    "2",
                    "--input-len",
                    "8",
                    "--output-len",
                    "4",
                    "--ignore-eos",
                    "--json",
                    str(out),
                    "--disable-tqdm",
                ]
            )
            == 0
        )
        paths.append(str(out))
    capsys.readouterr()
    assert serving.main(["--compare", *paths]) == 0
    header = capsys.readouterr().out.strip().splitlines()[2]
    assert "generate 127.0.0.1" in header and "openai 127.0.0.1" in header


def test_shortfin_stream():
    """shortfin's events: `data(<rid>): <raw token text>`, newlines and all, then `data: [DONE]`."""
    raw = "data(r1): Hello\n\ndata(r1): a\nb\n\ndata(r1): \n\n\n\ndata(r1): {\n\n: ping\n\ndata: [DONE]\n\n"

    async def events():
        async def lines():
            for line in raw.split("\n"):
                yield line

        return [d async for d in sse_data(lines())]

    data = asyncio.run(events())
    assert data == ["Hello", "a\nb", "", "{", "[DONE]"]
    state, backend = StreamState(), GenerateBackend("http://x")
    assert all(backend.parse(d, state) for d in data[:-1])
    assert (state.text, state.output_tokens, state.output_tokens_from) == ("Helloa\nb{", 4, "events")


def test_our_generate_events():
    state, backend = StreamState(), GenerateBackend("http://x")

    def ev(text, n, **meta):
        return json.dumps({"text": text, "meta_info": {"completion_tokens": n, "prompt_tokens": 5, **meta}})

    assert backend.parse(ev("a", 1), state) and backend.parse(ev("", 3, finish_reason="length"), state)
    assert not backend.parse(ev("", 3, finish_reason="length"), state)  # neither text nor new tokens
    assert (state.text, state.output_tokens, state.prompt_tokens) == ("a", 3, 5)
    assert not backend.parse(ev("", 3, error="boom"), state) and state.error == "boom"


def test_table_format():
    table = format_table(
        [{"metric": "TTFT (ms)", "a": 1.234, "b": None}, {"metric": "n", "a": 2, "b": 3}],
        ["metric", "a", ("b", "run b")],
    )
    assert table.splitlines() == [
        "| metric    |    a | run b |",
        "|-----------|-----:|------:|",
        "| TTFT (ms) | 1.23 |     - |",
        "| n         |    2 |     3 |",
    ]
