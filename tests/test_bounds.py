"""Issue 28, stalls and unbounded I/O over HTTP: every body, connection, tokenization, disconnect and shutdown
is bounded, and what clients see names the problem (not a path, not Python). Raw sockets where the HTTP
client libraries would hide the behaviour; `python -m serve` in a subprocess where the measurement must not
share the server's GIL (stalls) or the process must get a signal (shutdown)."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from serve.core.engine import Engine
from serve.frontends.app import create_app
from serve.frontends.http_server import Server
from serve.frontends.options import ServerOptions, uvicorn_config
from serve.frontends.tokenizing import max_chars_per_token
from tests.server_util import ServerThread, free_port, tiny_config, wait_healthy
from tests.tiny import char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
READ_TIMEOUT, IDLE_TIMEOUT, MAX_CONNECTIONS = 1.0, 0.5, 16


def bpe_char_tokenizer() -> Tokenizer:
    """The tiny models' character tokenizer (same ids) as a BPE without merges: a tokenizer for which a
    text's length bounds its token count (`max_chars_per_token`), as for the real models' byte-level BPE."""
    tok, _ = char_tokenizer()
    bpe = Tokenizer(models.BPE(vocab=tok.get_vocab(), merges=[], unk_token="<unk>", fuse_unk=False))
    bpe.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    bpe.decoder = decoders.Fuse()
    bpe.add_special_tokens(["<unk>", "<s>", "</s>"])
    return bpe


@pytest.fixture(scope="module")
def bpe_program(tiny_program, tmp_path_factory) -> Path:
    """The tiny program's tokenizer folder with the BPE version of its tokenizer."""
    out = tmp_path_factory.mktemp("bpe-tokenizer")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_program / name, out / name)
    bpe_char_tokenizer().save(str(out / "tokenizer.json"))
    return out


class ErrorLog(logging.Handler):
    """What uvicorn logs at ERROR (an exception in the application: the 500s the tests must not cause)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def served(tiny_program, bpe_program):
    """A server in this process with short timeouts and a small connection cap (4 sequences at a time, so
    that generation lasts long enough to be interrupted)."""
    options = ServerOptions(read_timeout_s=READ_TIMEOUT, idle_timeout_s=IDLE_TIMEOUT, max_connections=MAX_CONNECTIONS)
    cfg = tiny_config(tiny_program, max_running=4, max_queue=64)
    cfg.tokenizer = bpe_program
    s = ServerThread(cfg, options)
    errors = ErrorLog()
    logging.getLogger("uvicorn.error").addHandler(errors)  # (after uvicorn configured its logging)
    s.errors = errors
    yield s
    logging.getLogger("uvicorn.error").removeHandler(errors)
    s.stop()


@pytest.fixture(autouse=True)
def _fresh_error_log(request):
    """Each test sees only the errors it caused."""
    if "served" in request.fixturenames:
        request.getfixturevalue("served").errors.records.clear()


def connect(server: ServerThread) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    return sock


def request_head(path: str, length: int | None = None, chunked: bool = False) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length}\r\n"
    return (head + "\r\n").encode()


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), headers, body


def seconds_until_closed(sock: socket.socket, limit: float) -> float:
    """How long until the server closes the socket (anything it sends first is read and dropped)."""
    t0 = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the connection was still open after {limit} s")
    return time.monotonic() - t0


def engine_idle(engine, within: float) -> float | None:
    """Seconds until no sequence is queued or running and no page is held; None if not within `within`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < within:
        if all(not s.running and not s.waiting and s.pool.stats().used == 0 for s in engine.schedulers):
            return time.monotonic() - t0
        time.sleep(0.005)
    return None


# -- 1. bodies that are not UTF-8 JSON ------------------------------------------------------------------------

JSON_ROUTES = {  # route -> its protocol's error shape
    "/generate": "generate",
    "/v1/completions": "openai",
    "/v1/chat/completions": "openai",
    "/v1/embeddings": "openai",
    "/tokenize": "openai",
    "/detokenize": "openai",
    "/v2/models/ensemble/generate": "triton",
    "/v2/models/ensemble/generate_stream": "triton",
}


def error_message(shape: str, r: httpx.Response) -> str:
    body = r.json()
    if shape == "openai":
        assert set(body["error"]) == {"message", "type", "param", "code"}
        return body["error"]["message"]
    assert isinstance(body["error"], str) and (body.get("code") == r.status_code) == (shape == "generate"), body
    return body["error"]


@pytest.mark.parametrize("route", JSON_ROUTES)
@pytest.mark.parametrize(
    "body, needle",
    [
        (b'{"prompt": "caf\xe9", "text": "caf\xe9", "text_input": "x"}', "not valid UTF-8 (byte 0xe9 at offset 15)"),
        (b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}", "more than 200 levels deep"),
        (b"", "the body is empty"),
    ],
    ids=["latin-1", "nested-1000", "empty"],
)
def test_a_body_that_is_not_utf8_json_is_a_400_in_the_routes_protocol(served, route, body, needle):
    r = httpx.post(f"{served.url}{route}", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    message = error_message(JSON_ROUTES[route], r)
    assert needle in message and "hint:" in message
    assert not served.errors.records


# -- 2. body size; tokenization off the event loop ----------------------------------------------------------

LIMIT = ServerOptions().max_body_bytes


@pytest.mark.parametrize(
    "route, shape",
    [("/v1/completions", "openai"), ("/generate", "generate"), ("/v2/models/ensemble/generate", "triton")],
)
def test_a_declared_body_over_the_limit_is_a_413_before_it_is_sent(served, route, shape):
    with connect(served) as sock:
        sock.sendall(request_head(route, length=LIMIT + 1) + b'{"prompt": "')  # and nothing more
        status, headers, body = read_response(sock)
    assert status == 413 and "limit of 8388608 bytes" in error_message(shape, _response(status, body))


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(served):
    piece = b"a" * (1 << 20)
    with connect(served) as sock:
        sock.sendall(request_head("/v1/completions", chunked=True))
        sent = 0
        sock.settimeout(0.05)
        answer = b""
        while not answer:  # a chunk at a time until the server answers
            sock.sendall(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            sent += len(piece)
            assert sent <= LIMIT + 4 * len(piece), "no answer long after the limit"
            try:
                answer = sock.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                pass
        sock.settimeout(10)
        status, _, body = read_response(sock)
    assert status == 413 and sent > LIMIT
    assert "larger than this server's limit" in json.loads(body)["error"]["message"]
    assert httpx.get(f"{served.url}/health").status_code == 200 and not served.errors.records


def _response(status: int, body: bytes) -> httpx.Response:
    return httpx.Response(status, content=body)


def small_bpe(pre_tokenizer=None, normalizer=None, lstrip=False) -> Tokenizer:
    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "Ġ": 2, "ab": 3, "Ġab": 4}, merges=[("a", "b"), ("Ġ", "ab")]))
    tok.pre_tokenizer, tok.normalizer = pre_tokenizer, normalizer
    tok.add_special_tokens([AddedToken("<|end|>", lstrip=lstrip)])
    return tok


def test_max_chars_per_token_holds_only_where_no_step_drops_characters():
    assert max_chars_per_token(bpe_char_tokenizer()) == len("<unk>")
    assert max_chars_per_token(char_tokenizer()[0]) is None  # WordLevel: an unknown word is one token
    assert max_chars_per_token(small_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False))) == len("<|end|>")
    assert max_chars_per_token(small_bpe(pre_tokenizers.Whitespace())) is None  # drops the spaces
    assert max_chars_per_token(small_bpe(normalizer=normalizers.NFC())) is None  # composes characters
    assert max_chars_per_token(small_bpe(lstrip=True)) is None  # "<|end|>" takes the spaces before it


def test_a_prompt_that_cannot_fit_is_refused_without_tokenizing_it(served):
    """The tokenizer's longest entry is 5 characters: 7 MB of text are far more than the 512-token context
    (tokenizing them would take this tokenizer seconds)."""
    t0 = time.monotonic()
    r = httpx.post(f"{served.url}/v1/completions", json={"prompt": "a" * 7_000_000, "max_tokens": 2}, timeout=60)
    took = time.monotonic() - t0
    assert r.status_code == 400 and "so at least 1400000 tokens; the context holds 512" in r.text
    assert took < 2.0, f"{took:.1f} s to refuse it"
    ok = httpx.post(f"{served.url}/v1/completions", json={"prompt": "a" * 400, "max_tokens": 2})
    assert ok.status_code == 200, ok.text  # (under the bound: tokenized and served)


def serve_subprocess(program: Path, *flags: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    model = ["--vmfb", program / "model.vmfb", "--parameters", program / "model.irpa"]
    cmd = [sys.executable, "-m", "serve", *model, "--model-config", program / "config.json", "--port", str(port)]
    proc = subprocess.Popen(
        [str(c) for c in [*cmd, *flags]], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    wait_healthy(proc, url, 60)
    return proc, url


def test_a_long_tokenization_does_not_stall_other_clients(tiny_program):
    """A 2 MB prompt this tokenizer cannot bound by length (tokenizing it takes seconds) while a stream runs
    and /health is probed: both go on as before. The server is another process: a GIL held by the
    tokenizer would stop this process's clients too, hiding the stall."""
    proc, url = serve_subprocess(tiny_program, "--max-running", "1", "--log-level", "warning")
    try:
        gaps: list[tuple[float, float]] = []  # (time, gap since the previous event)
        probes: list[tuple[float, float]] = []  # (time, /health latency)
        stop = threading.Event()

        def stream() -> None:  # 16 sequences of 500 tokens, one at a time: seconds of events
            body = {
                "text": "hi",
                "stream": True,
                "sampling_params": {"max_completion_tokens": 500, "ignore_eos": True, "n": 16},
            }
            with httpx.stream("POST", f"{url}/generate", json=body, timeout=60) as r:
                last = None
                for line in r.iter_lines():
                    now = time.monotonic()
                    if line.startswith("data:") and last is not None:
                        gaps.append((now, now - last))
                    last = now if line.startswith("data:") else last
                    if stop.is_set():
                        return

        def probe() -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    t0 = time.monotonic()
                    assert client.get(f"{url}/health").status_code == 200
                    probes.append((t0, time.monotonic() - t0))
                    time.sleep(0.01)

        threads = [threading.Thread(target=stream), threading.Thread(target=probe)]
        for t in threads:
            t.start()
        while len(gaps) < 50:
            time.sleep(0.01)
        time.sleep(0.3)  # a baseline
        start = time.monotonic()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a" * 2_000_000, "max_tokens": 2}, timeout=120)
        end = time.monotonic()
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert r.status_code == 400 and "tokens; the context holds 512" in r.text, r.text
        assert end - start > 0.5, "the prompt was refused too fast to tell anything"
        # (the gaps and probes overlapping the tokenization: a stalled loop's gap ends after it)
        during_gap = max(g for t, g in gaps if t >= start and t - g <= end)
        during_probe = max(lat for t, lat in probes if t <= end and t + lat >= start)
        before_gap = max(g for t, g in gaps if t < start)
        before_probe = max(lat for t, lat in probes if t < start)
        print(
            f"tokenizing {end - start:.2f} s: stream gap max {before_gap * 1000:.0f} ms before, "
            f"{during_gap * 1000:.0f} ms during; /health max {before_probe * 1000:.0f} ms before, "
            f"{during_probe * 1000:.0f} ms during"
        )
        assert during_gap < 0.5 and during_probe < 0.5
    finally:
        proc.kill()
        proc.wait()


# -- 3. graceful shutdown, bounded -----------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_shutdown_ends_what_is_left_after_the_timeout_and_exits_0(tiny_program, sig):
    timeout = 1.0
    proc, url = serve_subprocess(
        tiny_program, "--shutdown-timeout", str(timeout), "--max-running", "1", "--log-level", "warning"
    )
    port = int(url.rsplit(":", 1)[1])
    try:
        half_sent = socket.create_connection(("127.0.0.1", port), timeout=30)
        half_sent.sendall(request_head("/v1/completions", length=100) + b'{"prompt": ')
        idle = socket.create_connection(("127.0.0.1", port), timeout=30)
        chunks: list[str] = []
        collected: list[httpx.Response] = []
        streaming = threading.Event()

        def stream() -> None:  # 16 x 500 tokens, one sequence at a time: far longer than the timeout
            body = {"prompt": "hi", "max_tokens": 500, "n": 16, "ignore_eos": True, "stream": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line:
                        chunks.append(line)
                        streaming.set()

        def collect() -> None:  # queued behind the stream
            body = {"text": "hi", "sampling_params": {"max_completion_tokens": 500, "ignore_eos": True}}
            collected.append(httpx.post(f"{url}/generate", json=body, timeout=60))

        threads = [threading.Thread(target=stream), threading.Thread(target=collect)]
        threads[0].start()
        assert streaming.wait(30)
        threads[1].start()
        time.sleep(0.5)  # (queued behind the stream's sequences by then)
        t0 = time.monotonic()
        proc.send_signal(sig)
        seconds_until_closed(idle, 5)
        assert time.monotonic() - t0 < 1.0  # idle connections go at once
        seconds_until_closed(half_sent, timeout + 5)
        assert timeout <= time.monotonic() - t0 < timeout + 3  # a body still arriving: at the timeout (+ flush)
        output, _ = proc.communicate(timeout=timeout + 10)
        took = time.monotonic() - t0
        for t in threads:
            t.join(timeout=10)
        assert proc.returncode == 0, output
        print(f"{sig.name}: exited {took:.2f} s after the signal (--shutdown-timeout {timeout})")
        assert took < timeout + 4, f"exited {took:.1f} s after the signal"
        assert chunks[-1] == "data: [DONE]" and "the server is shutting down" in chunks[-2], chunks[-3:]
        assert collected[0].status_code == 503 and "shutting down" in collected[0].json()["error"], collected[0].text
        assert "Traceback" not in output and "Exception in ASGI application" not in output, output
    finally:
        proc.kill()
        proc.wait()


def test_shutdown_ends_running_sequences_and_returns_their_pages(tiny_program):
    """The same shutdown in this process (no signal: `should_exit`, as the signal handler sets it), to look
    at the engine afterwards: nothing queued or running, no page held."""
    engines: list[Engine] = []

    def load(report) -> Engine:
        engines.append(Engine(tiny_config(tiny_program, max_running=1)))
        return engines[0]

    options = ServerOptions(shutdown_timeout_s=0.5)
    port = free_port()
    server = Server(uvicorn_config(create_app(load, options=options), "127.0.0.1", port, options, "warning"), 0.5)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started or httpx.get(f"{url}/health", timeout=5).status_code != 200:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    body = {"prompt": "hi", "max_tokens": 500, "n": 8, "ignore_eos": True}
    answers: list[httpx.Response] = []
    client = threading.Thread(target=lambda: answers.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60)))
    client.start()
    while not engines or not engines[0].schedulers[0].running:
        time.sleep(0.01)
    server.should_exit = True
    thread.join(timeout=10)
    client.join(timeout=10)
    assert not thread.is_alive() and answers[0].status_code == 503, answers
    assert all(not s.running and not s.waiting and s.pool.stats().used == 0 for s in engines[0].schedulers)


# -- 4. idle, slow and too many connections ----------------------------------------------------------------------


def test_a_connection_that_sends_nothing_is_closed_after_the_read_timeout(served):
    with connect(served) as sock:
        assert READ_TIMEOUT - 0.1 < seconds_until_closed(sock, READ_TIMEOUT + 5) < READ_TIMEOUT + 1


def test_headers_sent_a_byte_at_a_time_are_cut_at_the_read_timeout(served):
    head = b"GET /health HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"p" * 1000
    with connect(served) as sock:
        t0 = time.monotonic()
        try:
            for byte in head:
                sock.send(bytes([byte]))
                time.sleep(0.05)
        except (BrokenPipeError, ConnectionResetError):
            pass
        took = time.monotonic() - t0 + seconds_until_closed(sock, READ_TIMEOUT + 5)
    assert READ_TIMEOUT - 0.1 < took < READ_TIMEOUT + 1


def test_a_half_sent_body_is_cut_at_the_read_timeout_without_an_error(served):
    with connect(served) as sock:
        sock.sendall(request_head("/v1/completions", length=1000) + b'{"prompt": "')
        assert READ_TIMEOUT - 0.1 < seconds_until_closed(sock, READ_TIMEOUT + 5) < READ_TIMEOUT + 1
    time.sleep(0.1)
    assert not served.errors.records, [r.getMessage() for r in served.errors.records]


def test_a_client_leaving_while_sending_its_body_is_no_error(served):
    with connect(served) as sock:
        sock.sendall(request_head("/generate", length=1000) + b'{"text": "')
        time.sleep(0.1)
    time.sleep(0.2)
    assert httpx.get(f"{served.url}/health").status_code == 200
    assert not served.errors.records, [r.getMessage() for r in served.errors.records]


def test_a_kept_alive_connection_is_closed_after_the_idle_timeout(served):
    with connect(served) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(sock)[0] == 200
        assert IDLE_TIMEOUT - 0.1 < seconds_until_closed(sock, IDLE_TIMEOUT + 5) < IDLE_TIMEOUT + 1


def test_idle_connections_give_way_at_the_cap_and_are_all_closed(served):
    """200 sockets that send nothing (the cap is 16): each new connection closes the longest-idle one, so a
    client is still served while they are open; after the read timeout none is left."""
    socks = [connect(served) for _ in range(200)]
    try:
        assert httpx.get(f"{served.url}/health", timeout=5).status_code == 200
        t0 = time.monotonic()
        for sock in socks:
            seconds_until_closed(sock, max(0.1, t0 + READ_TIMEOUT + 2 - time.monotonic()))
        assert time.monotonic() - t0 < READ_TIMEOUT + 2
    finally:
        for sock in socks:
            sock.close()


def test_a_connection_over_the_cap_of_requests_under_way_is_refused(served):
    """16 requests whose bodies are still arriving hold the cap: a 17th connection is answered 503 at once;
    after the read timeout they are gone and the server answers again."""
    half_sent = [connect(served) for _ in range(MAX_CONNECTIONS)]
    try:
        for sock in half_sent:
            sock.sendall(request_head("/v1/completions", length=100) + b'{"prompt": ')
        time.sleep(0.1)
        with connect(served) as refused:
            status, headers, body = read_response(refused)
        assert status == 503 and headers["retry-after"] == "1" and "too many connections" in json.loads(body)["error"]
        for sock in half_sent:
            seconds_until_closed(sock, READ_TIMEOUT + 2)
    finally:
        for sock in half_sent:
            sock.close()
    assert httpx.get(f"{served.url}/health").status_code == 200


# -- 5. a client leaving cancels its sequences at once ---------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["collected", "streamed"])
def test_clients_leaving_cancel_their_sequences_within_a_step(served, stream):
    """8 requests of 2 x 480 tokens on 4 sequence slots (seconds of work, tokens flowing all the time); their
    clients close the connection: every sequence is cancelled and its pages are back in a few steps."""
    body = json.dumps({"prompt": "hi", "max_tokens": 480, "n": 2, "ignore_eos": True, "stream": stream}).encode()
    engine = served.engine
    socks = []
    for _ in range(8):
        sock = connect(served)
        sock.sendall(request_head("/v1/completions", length=len(body)) + body)
        socks.append(sock)
    deadline = time.monotonic() + 30
    while (
        sum(len(s.running) for s in engine.schedulers) < 4
        or min(len(q.output_ids) for s in engine.schedulers for q in s.running) < 20
    ):
        assert time.monotonic() < deadline, "generation did not start"
        time.sleep(0.005)
    for sock in socks:
        sock.close()
    took = engine_idle(engine, 5.0)
    assert took is not None and took < 0.3, f"{took} s to cancel"
    assert not served.errors.records


# -- 6. what clients are told -----------------------------------------------------------------------------------


def test_a_load_failure_shows_the_reason_without_the_servers_paths():
    def load(report):
        raise FileNotFoundError(2, "No such file or directory", "/srv/secret/models/llama/model.irpa")

    with TestClient(create_app(load)) as client:
        deadline = time.monotonic() + 10
        while "failed" not in (r := client.get("/health")).text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    message = r.json()["error"]
    assert r.status_code == 503 and "model.irpa" in message and "/srv" not in message and "server log" in message


@pytest.mark.parametrize("name", ["messages", "template", "add_generation_prompt"])
def test_chat_template_kwargs_naming_a_request_field_is_a_clear_400(served, name):
    r = httpx.post(
        f"{served.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "chat_template_kwargs": {name: 1}},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "chat_template_kwargs" and f"may not set {name}" in error["message"]
    assert "render_chat" not in error["message"] and "argument" not in error["message"]
