"""bench/serving.py (`python -m bench.serving`) against the tiny model's server, one run per backend; its workloads
and input-length mix also against a fake server (httpx.MockTransport)."""

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


# --- workloads and the input-length mix (no model: a fake server over httpx.MockTransport) ---


class ChunkTokenizer:
    """A fake tokenizer: a token is 4 characters (the last may be fewer), each distinct chunk its own id."""

    name = "tokenize_endpoint"

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.chunks: list[str] = []

    def encode_now(self, text: str) -> list[int]:
        out = []
        for i in range(0, len(text), 4):
            piece = text[i : i + 4]
            if piece not in self.ids:
                self.ids[piece] = len(self.chunks)
                self.chunks.append(piece)
            out.append(self.ids[piece])
        return out

    async def encode(self, text: str) -> list[int]:
        return self.encode_now(text)

    async def decode(self, ids: list[int]) -> str:
        return "".join(self.chunks[i] for i in ids)


class FakeOpenAI:
    """/v1/models, /tokenize, /detokenize and a streamed /v1/completions of `max_tokens` one-letter chunks."""

    def __init__(self) -> None:
        self.tok, self.bodies = ChunkTokenizer(), []

    def __call__(self, request):
        import httpx

        path = request.url.path
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "fake"}]})
        body = json.loads(request.content)
        if path == "/tokenize":
            return httpx.Response(200, json={"tokens": self.tok.encode_now(body["content"])})
        if path == "/detokenize":
            return httpx.Response(200, json={"content": "".join(self.tok.chunks[i] for i in body["tokens"])})
        assert path == "/v1/completions"
        self.bodies.append(body)
        usage = {"prompt_tokens": len(self.tok.encode_now(body["prompt"])), "completion_tokens": body["max_tokens"]}
        events = [{"choices": [{"text": "x"}]}] * body["max_tokens"] + [{"choices": [], "usage": usage}]
        sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})


def fake_bench(monkeypatch, tmp_path, *args: str) -> tuple[FakeOpenAI, dict]:
    import httpx

    fake = FakeOpenAI()
    monkeypatch.setattr(serving, "_client", lambda timeout_s: httpx.AsyncClient(transport=httpx.MockTransport(fake)))
    out = tmp_path / "fake.json"
    argv = ["--url", "http://fake", "--backend", "openai", "--disable-tqdm", "--json", str(out), *args]
    assert serving.main(argv) == 0
    return fake, json.loads(out.read_text())


def lengths_of(*args: str) -> list[int]:
    return serving.input_lengths(serving.config_from(serving.parse_args(list(args))))


def test_input_length_mix_is_seeded():
    mix = lengths_of("--input-len", "32,1024", "--num-prompts", "64", "--seed", "5")
    assert mix == lengths_of("--input-len", "32,1024", "--num-prompts", "64", "--seed", "5")  # the same sequence
    assert mix.count(32) == mix.count(1024) == 32  # each listed length, alike often
    assert mix != lengths_of("--input-len", "32,1024", "--num-prompts", "64", "--seed", "6")
    assert mix != sorted(mix) and mix != sorted(mix, reverse=True)  # mixed, not in blocks
    three = lengths_of("--input-len", "8,16,16", "--num-prompts", "7")  # a length listed twice: twice as often
    assert sorted(set(three)) == [8, 16] and three.count(16) >= 4
    assert lengths_of("--input-len", "100", "--num-prompts", "3") == [100, 100, 100]  # one value, as before
    for bad in ("32,", "0", "32,x"):
        with pytest.raises(SystemExit):
            serving.parse_args(["--input-len", bad])


def test_input_length_mix_through_a_server(monkeypatch, tmp_path, capsys):
    """Each request's synthetic prompt has its drawn length (calibrated with /tokenize); the summary says which."""
    fake, result = fake_bench(
        monkeypatch, tmp_path, "--input-len", "24,96", "--num-prompts", "8", "--output-len", "5", "--seed", "3"
    )
    want = lengths_of("--input-len", "24,96", "--num-prompts", "8", "--seed", "3")
    got = [r["prompt_tokens"] for r in sorted(result["requests"], key=lambda r: r["index"])]
    assert got == want and sorted(set(got)) == [24, 96]
    assert result["config"]["input_len"] == [24, 96] and result["config"]["workload"] == "synthetic"
    assert result["summary"]["input_lens"] == "24 x4, 96 x4" and result["summary"]["workload"] == "synthetic"
    assert all(b["temperature"] == 0 for b in fake.bodies)  # greedy by default (warm-up included)
    assert "| Input lengths (tokens)" in capsys.readouterr().out
    _, again = fake_bench(
        monkeypatch, tmp_path, "--input-len", "24,96", "--num-prompts", "8", "--output-len", "5", "--seed", "3"
    )
    assert [r["prompt_tokens"] for r in sorted(again["requests"], key=lambda r: r["index"])] == want


@pytest.mark.parametrize("backend", ["generate", "openai", "triton"])
def test_temperature_in_each_backend(backend):
    from bench.backends import BACKENDS

    greedy = BACKENDS[backend]("http://x", "m").payload("hi", 4, True)
    warm = BACKENDS[backend]("http://x", "m", 0.7).payload("hi", 4, True)

    def temperature(p):
        return p["sampling_params"]["temperature"] if backend == "generate" else p["temperature"]

    assert (temperature(greedy), temperature(warm)) == (0, 0.7)
    assert serving.parse_args(["--temperature", "0.7"]).temperature == 0.7
    assert serving.parse_args([]).temperature == 0


def test_grounded_prompts():
    """Each prompt: a piece of a real source file, of about the asked length, and the start of its copy."""
    from bench.prompts import documents, workload_prompts

    tok = ChunkTokenizer()
    lengths = [256, 1024] * 6
    prompts = asyncio.run(workload_prompts("grounded", lengths, 0, tok))
    assert prompts == asyncio.run(workload_prompts("grounded", lengths, 0, tok))  # seeded
    assert len({p.text for p in prompts}) == len(prompts)
    sources = dict(documents())
    assert len(sources) >= 12
    paths = set()
    for want, p in zip(lengths, prompts):
        assert 0.9 * want <= p.tokens <= want and p.tokens == len(tok.encode_now(p.text))
        head, rest = p.text.split("\n```python\n", 1)
        body, tail = rest.split("\n```\n", 1)
        assert head.startswith("Here is the file ") and tail == "The same file, copied exactly:\n```python\n"
        path = head.removeprefix("Here is the file ").removesuffix(".")
        assert body in sources[path] and body.strip()  # the document itself, whole lines
        paths.add(path)
    assert len(paths) == len(prompts)  # different files
    other = asyncio.run(workload_prompts("grounded", lengths, 1, tok))
    assert {p.text for p in other}.isdisjoint(p.text for p in prompts)
    # without a token counter: cut by characters (4 a token)
    plain = asyncio.run(workload_prompts("grounded", [512], 0, None))[0]
    assert plain.tokens is None and 0.9 * 512 * 4 <= len(plain.text) <= 512 * 4


def test_chat_prompts():
    from bench.prompts import CHAT_QUESTIONS, CHAT_SYSTEMS, workload_prompts

    tok = ChunkTokenizer()
    n = len(CHAT_SYSTEMS) * len(CHAT_QUESTIONS)
    prompts = asyncio.run(workload_prompts("chat", [512] * n, 0, tok))
    assert len(CHAT_QUESTIONS) >= 30 and len({p.text for p in prompts}) == n  # distinct
    assert len({p.text.split("\nUser: ")[1] for p in prompts[: len(CHAT_QUESTIONS)]}) == len(CHAT_QUESTIONS)
    assert all(p.text.endswith("\nAssistant:") and p.tokens == len(tok.encode_now(p.text)) for p in prompts)
    assert all(p.tokens < 64 for p in prompts)  # their own lengths: --input-len is not used
    assert prompts == asyncio.run(workload_prompts("chat", [512] * n, 0, tok))
    assert [p.text for p in prompts[:5]] != [p.text for p in asyncio.run(workload_prompts("chat", [1] * 5, 1, tok))]


@pytest.mark.parametrize("workload", ["grounded", "chat"])
def test_workload_through_a_server(monkeypatch, tmp_path, workload):
    fake, result = fake_bench(
        monkeypatch,
        tmp_path,
        *("--workload", workload, "--input-len", "200", "--num-prompts", "4", "--output-len", "3"),
        *("--ignore-eos", "--temperature", "0"),
    )
    s = result["summary"]
    assert (s["completed"], s["total_output_tokens"], s["workload"]) == (4, 12, workload)
    measured = fake.bodies[1:]  # (the first: the warm-up)
    assert len({b["prompt"] for b in measured}) == 4 and all(b["ignore_eos"] for b in measured)
    if workload == "grounded":
        assert all("copied exactly" in b["prompt"] for b in measured) and s["input_lens"] == "200 x4"
        assert all(180 <= r["prompt_tokens"] <= 200 for r in result["requests"])
    else:
        assert all(b["prompt"].endswith("Assistant:") for b in measured) and s["input_lens"].endswith("(chat)")
    with pytest.raises(SystemExit):
        serving.parse_args(["--workload", workload, "--prompts-file", "p.txt"])


@pytest.mark.parametrize("workload", ["grounded", "chat"])
@pytest.mark.parametrize("backend", ["generate", "openai", "triton"])
def test_workloads_each_backend(server, tmp_path, backend, workload):
    """The grounded and chat prompts through the tiny model's server, every backend, EOS ignored."""
    rc, result = bench(
        server, tmp_path, "--backend", backend, "--workload", workload, "--input-len", "200", "--disable-tqdm"
    )
    s = result["summary"]
    assert rc == 0 and (s["completed"], s["failed"], s["workload"]) == (N, 0, workload)
    assert s["total_output_tokens"] == N * OUTPUT_LEN
    sizes = [r["prompt_tokens"] for r in result["requests"]]
    assert all(0 < n <= 200 for n in sizes) and (workload == "chat" or min(sizes) >= 120), sizes  # (whole lines)


def test_step_gaps_count_each_decoding_stream_of_consecutive_decoding_steps():
    from bench.step_gaps import gaps

    lines = [
        "x DEBUG aotllm.scheduler: step end=10.000 ms=5.0 decoding=0 drafted=0 prefill=256",
        "x DEBUG aotllm.scheduler: step end=10.050 ms=40.0 decoding=2 drafted=0 prefill=32",
        "x DEBUG aotllm.scheduler: step end=10.070 ms=20.0 decoding=2 drafted=0 prefill=0",
        "unrelated line",
        "x DEBUG aotllm.scheduler: step end=10.170 ms=90.0 decoding=3 drafted=0 prefill=32",
    ]
    # (the first decoding step follows a step that decoded nothing: no gap to measure)
    assert np.allclose(gaps(lines), [20.0, 20.0, 100.0, 100.0, 100.0])
