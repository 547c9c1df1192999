"""serve/grpc_api.py: ppl.llm.serving's gRPC LLMService, through a generated client, against `python -m serve
--grpc-port` (a real server process over the tiny program; SmolLM2 in the slow test)."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest

from serve.proto import llm_pb2, llm_pb2_grpc
from tests.conftest import SMOL_PROMPT
from tests.server_util import wait_healthy

ROOT = Path(__file__).resolve().parents[1]
MAX_QUEUE = 8
METHOD = "/ppl.llm.proto.LLMService/Generation"


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held together while chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class Served:
    url: str
    stub: llm_pb2_grpc.LLMServiceStub
    address: str = ""


def start_server(vmfb: Path, irpa: Path, config: Path, *extra: str, verify: ssl.SSLContext | None = None):
    """`python -m serve --grpc-port` in a process; returns (process, http url, grpc address) once healthy.
    `verify`: the server serves HTTPS (extra has --ssl-*) and this context trusts its certificate."""
    port, gport = free_ports(2)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "serve",
            "--vmfb",
            str(vmfb),
            "--parameters",
            str(irpa),
            "--model-config",
            str(config),
            "--port",
            str(port),
            "--grpc-port",
            str(gport),
            "--log-level",
            "warning",
            *extra,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"{'https' if verify else 'http'}://127.0.0.1:{port}"
    wait_healthy(proc, url, 300, verify or True)
    return proc, url, f"127.0.0.1:{gport}"


@pytest.fixture(scope="module")
def served(tiny_program):
    proc, url, address = start_server(
        tiny_program / "model.vmfb",
        tiny_program / "model.irpa",
        tiny_program / "config.json",
        "--max-queue",
        str(MAX_QUEUE),
    )
    with grpc.insecure_channel(address) as channel:
        yield Served(url, llm_pb2_grpc.LLMServiceStub(channel), address)
    proc.terminate()
    proc.wait(timeout=30)


def request(
    id: int = 0, prompt: str = "", tokens: list[int] | None = None, max_new_tokens: int = 12, **kw
) -> llm_pb2.Request:
    stop = kw.pop("stop_tokens", None)
    ignore_eos = kw.pop("ignore_eos_token", False)
    return llm_pb2.Request(
        id=id,
        prompt=prompt,
        tokens=llm_pb2.Tokens(ids=tokens or []),
        choosing_parameters=llm_pb2.NextTokenChooserParameters(**kw),
        stopping_parameters=llm_pb2.StoppingCriteriaParameters(
            max_new_tokens=max_new_tokens, stop_tokens=llm_pb2.Tokens(ids=stop or []), ignore_eos_token=ignore_eos
        ),
    )


def generation(served: Served, *reqs: llm_pb2.Request) -> list[llm_pb2.Response]:
    out = []
    for batch in served.stub.Generation(llm_pb2.BatchedRequest(req=reqs), timeout=120):
        assert len(batch.rsp) == 1  # one response per message, as ppl.llm.serving sends them
        out.extend(batch.rsp)
    return out


def text(rsps: list[llm_pb2.Response]) -> str:
    return "".join(r.generated for r in rsps)


def tokens(rsps: list[llm_pb2.Response]) -> list[int]:
    return [t for r in rsps for t in r.tokens.ids]


def generate(served: Served, prompt: str, n: int, **params) -> dict:
    """/generate's answer (text, token_ids, input_ids) for the same prompt."""
    r = httpx.post(
        f"{served.url}/generate",
        timeout=120,
        json={"text": prompt, "return_input_ids": True, "sampling_params": {"max_completion_tokens": n, **params}},
    )
    assert r.status_code == 200, r.text
    body = r.json()["responses"][0]
    return {**body["responses"][0], "input_ids": body["input_ids"]}


def metric(served: Served, name: str, labels: str = "") -> float:
    """The sum over devices of aotllm_NAME{...LABELS...}."""
    body = httpx.get(f"{served.url}/metrics", timeout=10).text
    pattern = rf"^aotllm_{name}(?:{{[^}}]*}})? (\S+)$"
    return sum(float(m.group(1)) for m in re.finditer(pattern, body, re.M) if labels in m.group(0))


def wait_idle(served: Served) -> None:
    deadline = time.time() + 30
    while metric(served, "requests_running") + metric(served, "requests_waiting") > 0:
        assert time.time() < deadline, "sequences were left running"
        time.sleep(0.1)


def test_help_lists_grpc_port():
    out = subprocess.run(
        [sys.executable, "-m", "serve", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "--grpc-port" in out


def test_greedy_text_and_tokens_equal_generate(served):
    rsps = generation(served, request(7, "What is machine learning?", max_new_tokens=16))
    ref = generate(served, "What is machine learning?", 16)
    assert text(rsps) == ref["text"] and tokens(rsps) == ref["token_ids"]
    assert all(r.id == 7 for r in rsps)


def test_stream_one_token_per_response_and_finish_on_the_last(served):
    rsps = generation(served, request(3, "Streaming test", max_new_tokens=10, ignore_eos_token=True))
    assert len(rsps) == 10 and all(len(r.tokens.ids) == 1 for r in rsps)
    assert [r.status for r in rsps] == [llm_pb2.PROCESSING] * 9 + [llm_pb2.FINISHED]
    assert rsps[-1].detail.finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert all(r.detail.logprobs <= 0 for r in rsps) and any(r.detail.logprobs < 0 for r in rsps)
    ref = generate(served, "Streaming test", 10, ignore_eos=True)
    assert tokens(rsps) == ref["token_ids"] and text(rsps) == ref["text"]


def test_max_new_tokens_and_stop_tokens(served):
    free = tokens(generation(served, request(prompt="stop here", max_new_tokens=20, ignore_eos_token=True)))
    assert len(free) == 20
    stop = free[5]
    rsps = generation(served, request(prompt="stop here", max_new_tokens=20, ignore_eos_token=True, stop_tokens=[stop]))
    got = tokens(rsps)
    assert got == free[: free.index(stop) + 1]  # up to and including the first stop token
    assert rsps[-1].status == llm_pb2.FINISHED and rsps[-1].detail.finish_reason == llm_pb2.FINISH_REASON_STOP_SEQUENCE
    assert rsps[-1].generated == "" and not rsps[-1].detail.is_special  # the end token's text is left out
    ref = generate(served, "stop here", 20, ignore_eos=True, stop_token_ids=[stop])
    assert got == ref["token_ids"] and text(rsps) == ref["text"]


def test_token_id_prompt(served):
    ids = generate(served, "Tokens in", 1)["input_ids"]
    by_text = generation(served, request(prompt="Tokens in", max_new_tokens=8))
    by_ids = generation(served, request(tokens=ids, max_new_tokens=8))
    assert tokens(by_ids) == tokens(by_text) and text(by_ids) == text(by_text)


def test_batch_streams_every_request_under_its_id(served):
    prompts = {11: "first prompt", 12: "second", 13: "the third one"}
    rsps = generation(served, *(request(i, p, max_new_tokens=6, ignore_eos_token=True) for i, p in prompts.items()))
    for i, p in prompts.items():
        mine = [r for r in rsps if r.id == i]
        assert [r.status for r in mine] == [llm_pb2.PROCESSING] * 5 + [llm_pb2.FINISHED]
        assert text(mine) == generate(served, p, 6, ignore_eos=True)["text"]


def test_sampling_parameters_map_like_generate(served):
    kw = dict(
        prompt="Sample me",
        max_new_tokens=12,
        ignore_eos_token=True,
        do_sample=True,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        seed=1234,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=0.2,
    )
    a, b = tokens(generation(served, request(**kw))), tokens(generation(served, request(**kw)))
    ref = generate(
        served,
        "Sample me",
        12,
        ignore_eos=True,
        temperature=0.8,
        top_k=20,
        top_p=0.9,
        seed=1234,
        repetition_penalty=1.1,
        presence_penalty=0.5,
        frequency_penalty=0.2,
    )
    assert a == b == ref["token_ids"]
    # do_sample false is greedy whatever the other fields say
    greedy = tokens(generation(served, request(**{**kw, "do_sample": False})))
    assert (
        greedy
        == generate(
            served,
            "Sample me",
            12,
            ignore_eos=True,
            repetition_penalty=1.1,
            presence_penalty=0.5,
            frequency_penalty=0.2,
        )["token_ids"]
    )


@pytest.mark.parametrize(
    "reqs, code, words",
    [
        ([], grpc.StatusCode.INVALID_ARGUMENT, ["BatchedRequest.req is empty"]),
        (
            [request(5, "ok", max_new_tokens=0)],
            grpc.StatusCode.INVALID_ARGUMENT,
            ["req[0] (id 5)", "stopping_parameters.max_new_tokens"],
        ),
        ([request(1, "ok"), request(9)], grpc.StatusCode.INVALID_ARGUMENT, ["req[1] (id 9)", "prompt", "tokens.ids"]),
        ([request(2, tokens=[1, 100000])], grpc.StatusCode.INVALID_ARGUMENT, ["tokens.ids", "100000", "vocabulary"]),
        (
            [request(4, "ok", do_sample=True, top_p=1.5)],
            grpc.StatusCode.INVALID_ARGUMENT,
            ["choosing_parameters.top_p"],
        ),
        (
            [request(6, "ok", stop_tokens=[999999])],
            grpc.StatusCode.INVALID_ARGUMENT,
            ["stopping_parameters.stop_tokens"],
        ),
        (
            # more requests in one batch than the queue holds: never servable, so not a retryable error
            [request(i, "queue", max_new_tokens=50) for i in range(MAX_QUEUE + 1)],
            grpc.StatusCode.INVALID_ARGUMENT,
            ["--max-queue"],
        ),
    ],
)
def test_bad_requests_are_clear_errors_and_the_server_goes_on(served, reqs, code, words):
    with pytest.raises(grpc.RpcError) as err:
        generation(served, *reqs)
    assert err.value.code() == code, err.value.details()
    for w in words:
        assert w in err.value.details()
    wait_idle(served)  # nothing was left queued by the refused call
    assert tokens(generation(served, request(prompt="still here", max_new_tokens=3, ignore_eos_token=True)))


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"\x0a\x05abc"], ids=["bad-varint", "truncated"])
def test_malformed_message_is_invalid_argument(served, garbage):
    """Bytes that are not a BatchedRequest are the client's error (grpc's own deserializer answers UNKNOWN
    with a Python class name); the server goes on."""
    with grpc.insecure_channel(served.address) as channel:
        raw = channel.unary_stream(METHOD)  # (no serializers: the bytes go out as they are)
        with pytest.raises(grpc.RpcError) as err:
            list(raw(garbage, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "not a valid ppl.llm.proto.BatchedRequest" in err.value.details()
    assert "llm.proto" in err.value.details()
    assert tokens(generation(served, request(prompt="still here", max_new_tokens=3, ignore_eos_token=True)))


def test_client_cancel_frees_the_sequence(served):
    before = metric(served, "requests_finished_total", 'finish_reason="cancelled"')
    call = served.stub.Generation(
        llm_pb2.BatchedRequest(req=[request(1, "cancel me", max_new_tokens=400, ignore_eos_token=True)]), timeout=120
    )
    assert next(call).rsp[0].status == llm_pb2.PROCESSING
    call.cancel()
    wait_idle(served)
    deadline = time.time() + 10
    while metric(served, "requests_finished_total", 'finish_reason="cancelled"') <= before:
        assert time.time() < deadline, "the cancelled stream was not counted as cancelled"
        time.sleep(0.1)


def test_response_mapping_of_the_end_token():
    from serve.core.sampling import SamplingParams
    from serve.core.scheduler import Event, Sequence
    from serve.frontends.grpc_api import Job, response

    def job(stop_ids, out, reason):
        seq = Sequence(
            rid="r",
            prompt_ids=[1],
            params=SamplingParams(stop_token_ids=stop_ids),
            sampler=None,
            detok=None,
            stops=None,
            output_ids=out,
            finish_reason=reason,
        )
        return Job(3, seq, frozenset({2}))

    eos = response(job([], [5, 2], "stop"), Event(token_ids=[2], finish_reason="stop"))
    assert (eos.status, eos.detail.finish_reason, eos.detail.is_special) == (
        llm_pb2.FINISHED,
        llm_pb2.FINISH_REASON_EOS_TOKEN,
        True,
    )
    stop = response(job([5], [5], "stop"), Event(token_ids=[5], finish_reason="stop"))
    assert (stop.detail.finish_reason, stop.detail.is_special) == (llm_pb2.FINISH_REASON_STOP_SEQUENCE, False)
    failed = response(job([], [5], "error"), Event(finish_reason="error", error="boom"))
    assert failed.status == llm_pb2.FAILED and failed.id == 3


def test_unavailable_while_loading():
    from serve.frontends.grpc_api import CallError, LLMService
    from serve.frontends.metrics import Metrics
    from serve.frontends.state import ServerState

    with pytest.raises(CallError) as err:
        state = ServerState(Metrics(), status="loading the model")
        asyncio.run(LLMService(state)._submit(llm_pb2.BatchedRequest(req=[request()]), "r"))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "loading the model" in err.value.message


@pytest.mark.slow
def test_smollm2_answers_through_grpc(smollm2_f32_artifacts):
    art = smollm2_f32_artifacts
    proc, url, address = start_server(art.vmfb, art.irpa, art.config)
    try:
        with grpc.insecure_channel(address) as channel:
            served = Served(url, llm_pb2_grpc.LLMServiceStub(channel))
            rsps = generation(served, request(1, SMOL_PROMPT, max_new_tokens=32))
            assert "Paris" in text(rsps)
            assert rsps[-1].status == llm_pb2.FINISHED
            assert text(rsps) == generate(served, SMOL_PROMPT, 32)["text"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
