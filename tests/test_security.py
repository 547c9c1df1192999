"""serve/frontends/security.py and its gRPC side: API keys (HTTP Bearer, gRPC metadata), HTTPS and gRPC over
TLS with one self-signed certificate, CORS only for --cors-origins, and browser requests from other origins
refused. The end-to-end tests run `python -m serve` with every security flag over the tiny program."""

from __future__ import annotations

import contextlib
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient

from serve.core.engine import Engine
from serve.flags import parse_args
from serve.frontends.app import create_app
from serve.frontends.options import ServerOptions
from serve.frontends.security import (
    ApiKeys,
    Refusal,
    api_key_problem,
    exposure_warnings,
    origin_problem,
    same_origin,
)
from serve.proto import llm_pb2, llm_pb2_grpc
from tests.test_grpc import METHOD, request, start_server, tokens

KEY_FLAG, KEY_FILE = "flag-key-0123", "file-key-4567"  # one given with --api-key, one in --api-key-file
ALLOWED = "https://app.example"  # --cors-origins
FOREIGN = "https://evil.example"


@dataclass
class Secure:
    url: str
    address: str  # gRPC
    cert: Path
    verify: ssl.SSLContext

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, verify=self.verify, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """(key, certificate) PEM files: a self-signed P-256 certificate for 127.0.0.1 and localhost."""
    d = tmp_path_factory.mktemp("tls")
    key, cert = d / "key.pem", d / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        + ["-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return key, cert


@pytest.fixture(scope="module")
def secure(tiny_program, certificate, tmp_path_factory) -> Iterator[Secure]:
    """python -m serve with two API keys (flag and file), HTTPS and gRPC TLS on one certificate, one CORS origin."""
    key, cert = certificate
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text(f"\n{KEY_FILE}\n\n")
    verify = ssl.create_default_context(cafile=str(cert))
    proc, url, address = start_server(
        tiny_program / "model.vmfb",
        tiny_program / "model.irpa",
        tiny_program / "config.json",
        *("--api-key", KEY_FLAG, "--api-key-file", str(key_file)),
        *("--ssl-keyfile", str(key), "--ssl-certfile", str(cert), "--cors-origins", ALLOWED),
        verify=verify,
    )
    try:
        yield Secure(url, address, cert, verify)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- API keys over HTTP -------------------------------------------------------------------------------------


def openai_shape(body: dict) -> str:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]["message"]


def anthropic_shape(body: dict) -> str:
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    return body["error"]["message"]


def triton_shape(body: dict) -> str:
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    return body["error"]


def generate_shape(body: dict) -> str:
    assert set(body) == {"error", "code"} and isinstance(body["error"], str), body
    return body["error"]


# One route of each kind, each with a request it answers with 200, and the error shape its protocol uses.
ROUTES: list[tuple[str, str, dict | None, Callable[[dict], str]]] = [
    ("GET", "/v1/models", None, openai_shape),
    ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2}, openai_shape),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, openai_shape),
    ("POST", "/tokenize", {"content": "hi"}, openai_shape),  # (openai_api.py's route: its errors are OpenAI's)
    ("POST", "/detokenize", {"tokens": [1, 2]}, openai_shape),
    ("POST", "/generate", {"text": "hi", "sampling_params": {"max_completion_tokens": 2}}, generate_shape),
    ("GET", "/metrics", None, generate_shape),
    ("GET", "/openapi.json", None, generate_shape),
    ("POST", "/completion", {"prompt": "hi", "n_predict": 2}, openai_shape),  # (llama-server's own routes)
    ("GET", "/props", None, openai_shape),
    ("POST", "/v1/responses", {"input": "hi", "max_output_tokens": 2}, openai_shape),
    ("POST", "/v1/messages", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, anthropic_shape),
    ("GET", "/v2", None, triton_shape),
    ("GET", "/v2/models/ensemble/ready", None, triton_shape),
    ("POST", "/v2/models/ensemble/generate", {"text_input": "hi", "max_tokens": 2}, triton_shape),
]


@pytest.mark.parametrize("method, path, body, shape", ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_every_route_needs_one_of_the_keys(secure, method, path, body, shape):
    for key, words in [(None, ["needs an API key", "Authorization: Bearer KEY"]), ("wrong-key", ["invalid API key"])]:
        with secure.client(key) as c:
            r = c.request(method, path, json=body)
        assert r.status_code == 401, r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
        message = shape(r.json())
        assert all(w in message for w in words), message
        assert "--api-key" in message
    if shape is openai_shape:  # a wrong key: OpenAI's code for it
        assert r.json()["error"]["code"] == "invalid_api_key"
    for key in (KEY_FLAG, KEY_FILE):
        with secure.client(key) as c:
            r = c.request(method, path, json=body)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("header", ["Basic Zm9vOmJhcg==", "Bearer", KEY_FLAG, f"Token {KEY_FLAG}"])
def test_an_authorization_that_is_not_bearer_is_refused(secure, header):
    with httpx.Client(verify=secure.verify) as c:
        r = c.get(f"{secure.url}/v1/models", headers={"Authorization": header})
    assert r.status_code == 401 and "not 'Bearer KEY'" in openai_shape(r.json())


def test_anthropic_clients_send_the_key_as_x_api_key(secure):
    with httpx.Client(verify=secure.verify) as c:
        assert c.get(f"{secure.url}/v1/models", headers={"x-api-key": KEY_FLAG}).status_code == 200
        assert c.get(f"{secure.url}/v1/models", headers={"x-api-key": "wrong"}).status_code == 401


def test_the_bearer_scheme_is_case_insensitive(secure):
    with httpx.Client(verify=secure.verify) as c:
        assert c.get(f"{secure.url}/v1/models", headers={"Authorization": f"bearer {KEY_FLAG}"}).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/v2/health/live", "/v2/health/ready"])
def test_health_probes_need_no_key(secure, path):
    with secure.client() as c:
        assert c.get(path).status_code == 200


# -- TLS ------------------------------------------------------------------------------------------------------


def test_https_with_the_given_certificate_and_no_plain_http(secure):
    with secure.client(KEY_FLAG) as c:  # (verifies the chain to our certificate and the name 127.0.0.1)
        assert c.get("/v1/models").json()["data"][0]["id"]
    with pytest.raises(httpx.ConnectError):  # a client that does not trust it: the server presents it
        httpx.get(f"{secure.url}/health", timeout=10)
    with pytest.raises(httpx.TransportError):
        httpx.get(secure.url.replace("https://", "http://") + "/health", timeout=10)


# -- gRPC: TLS and API keys ----------------------------------------------------------------------------------


@contextlib.contextmanager
def tls_channel(secure: Secure) -> Iterator[grpc.Channel]:
    credentials = grpc.ssl_channel_credentials(root_certificates=secure.cert.read_bytes())
    with grpc.secure_channel(secure.address, credentials) as channel:
        yield channel


def call(channel: grpc.Channel, key: str | None) -> list[llm_pb2.Response]:
    stub = llm_pb2_grpc.LLMServiceStub(channel)
    metadata = (("authorization", f"Bearer {key}"),) if key else None
    req = llm_pb2.BatchedRequest(req=[request(1, "over TLS", max_new_tokens=3, ignore_eos_token=True)])
    return [r for b in stub.Generation(req, timeout=60, metadata=metadata) for r in b.rsp]


def test_grpc_over_tls_with_a_key(secure):
    with tls_channel(secure) as channel:
        for key in (KEY_FLAG, KEY_FILE):
            rsps = call(channel, key)
            assert len(tokens(rsps)) == 3 and rsps[-1].status == llm_pb2.FINISHED


@pytest.mark.parametrize(
    "key, words", [(None, ["needs an API key", "'authorization' metadata"]), ("wrong", ["invalid API key"])]
)
def test_grpc_without_the_key_is_unauthenticated(secure, key, words):
    with tls_channel(secure) as channel, pytest.raises(grpc.RpcError) as err:
        call(channel, key)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert all(w in err.value.details() for w in words), err.value.details()


def test_grpc_refuses_before_reading_the_message(secure):
    """Without a key even a malformed message is UNAUTHENTICATED: the key is checked before the body is parsed."""
    with tls_channel(secure) as channel, pytest.raises(grpc.RpcError) as err:
        list(channel.unary_stream(METHOD)(b"\xff\xff\xff", timeout=30))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_plaintext_to_the_tls_port_fails(secure):
    with grpc.insecure_channel(secure.address) as channel, pytest.raises(grpc.RpcError) as err:
        call(channel, KEY_FLAG)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


# -- CORS and the origin check, with --cors-origins ---------------------------------------------------------


def test_preflight_of_a_listed_origin_is_answered_without_a_key(secure):
    with secure.client() as c:
        r = c.options(
            "/v1/chat/completions",
            headers={
                "Origin": ALLOWED,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == ALLOWED
    assert "authorization" in r.headers["access-control-allow-headers"].lower()


def test_a_listed_origin_gets_cors_headers_on_answers_and_refusals(secure):
    with secure.client(KEY_FLAG) as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers={"Origin": ALLOWED})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    with secure.client() as c:  # no key: the page can read why
        r = c.get("/v1/models", headers={"Origin": ALLOWED})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ALLOWED


@pytest.mark.parametrize(
    "path, shape",
    [("/generate", generate_shape), ("/v1/completions", openai_shape), ("/v2/models/ensemble/generate", triton_shape)],
)
def test_a_foreign_origin_is_refused_even_with_the_key(secure, path, shape):
    """The cross-site simple request: text/plain, no preflight. Refused before the route (and with no CORS
    headers, so the page could not read an answer anyway)."""
    with secure.client(KEY_FLAG) as c:
        r = c.post(path, content='{"text": "hi"}', headers={"Origin": FOREIGN, "Content-Type": "text/plain"})
        assert r.status_code == 403, r.text
        assert f"--cors-origins {FOREIGN}" in shape(r.json())
        assert "access-control-allow-origin" not in r.headers
        preflight = c.options(path, headers={"Origin": FOREIGN, "Access-Control-Request-Method": "POST"})
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers


def test_the_servers_own_origin_is_allowed(secure):
    with secure.client(KEY_FLAG) as c:
        assert c.get("/v1/models", headers={"Origin": secure.url}).status_code == 200


# -- the defaults: no key, no CORS, foreign origins refused -------------------------------------------------


@contextlib.contextmanager
def loading_app(options: ServerOptions | None = None) -> Iterator[TestClient]:
    """An in-process app whose engine stays loading (its routes answer 503): what answers first shows
    whether a request got past the middleware."""
    release = threading.Event()

    def load(report) -> Engine:
        release.wait()
        raise RuntimeError("the test ended before the model loaded")

    try:
        with TestClient(create_app(load, options=options)) as client:  # (Host: testserver, http)
            yield client
    finally:
        release.set()


def test_by_default_no_key_is_needed_and_no_cors_is_answered():
    with loading_app() as c:
        assert c.get("/v1/models").status_code == 503  # the route answered: no key needed
        assert c.post("/generate", json={"text": "hi"}).status_code == 503
        preflight = c.options(
            "/generate", headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
        assert "--cors-origins http://localhost:3000" in generate_shape(preflight.json())


def test_by_default_a_cross_site_text_plain_post_is_refused_and_same_origin_is_not():
    with loading_app() as c:
        headers = {"Content-Type": "text/plain"}
        r = c.post("/generate", content='{"text": "hi"}', headers={**headers, "Origin": FOREIGN})
        assert r.status_code == 403 and "--cors-origins" in generate_shape(r.json())
        r = c.post("/v1/completions", content="{}", headers={**headers, "Origin": "null"})  # sandboxed / file://
        assert r.status_code == 403 and openai_shape(r.json())
        same = c.post("/generate", content='{"text": "hi"}', headers={**headers, "Origin": "http://testserver"})
        assert same.status_code == 503  # reached the route


def test_api_keys_in_process_and_the_loading_503_behind_them(caplog):
    with loading_app(ServerOptions(api_keys=("k1",))) as c, caplog.at_level("INFO", logger="aotllm.access"):
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 503
        assert c.get("/health").status_code == 503  # (unprotected: it says the model is loading)
    # refusals are access-logged like any answer (the access log is the outermost middleware)
    statuses = [r.access["status"] for r in caplog.records if hasattr(r, "access")]
    assert statuses == [401, 503, 503]


# -- the pieces -----------------------------------------------------------------------------------------------


def test_api_keys_check():
    keys = ApiKeys(["alpha", "beta"])
    assert keys.check(b"Bearer alpha") is None and keys.check("Bearer beta") is None
    assert keys.check(None) is Refusal.MISSING
    assert keys.check("Bearer alph") is Refusal.WRONG and keys.check("Bearer alphaa") is Refusal.WRONG
    assert keys.check("Basic alpha") is Refusal.MALFORMED and keys.check("alpha") is Refusal.MALFORMED
    with pytest.raises(ValueError):
        ApiKeys([])


@pytest.mark.parametrize(
    "origin, host, scheme, same",
    [
        ("http://127.0.0.1:8000", "127.0.0.1:8000", "http", True),
        ("http://LOCALHOST:8000", "localhost:8000", "http", True),
        ("http://localhost", "localhost:80", "http", True),
        ("https://example.com", "example.com", "https", True),
        ("http://[::1]:8000", "[::1]:8000", "http", True),
        ("http://127.0.0.1:8001", "127.0.0.1:8000", "http", False),
        ("http://evil.example:8000", "127.0.0.1:8000", "http", False),
        ("https://example.com", "example.com", "http", False),  # port 443 vs 80
        ("null", "127.0.0.1:8000", "http", False),
        ("http://127.0.0.1:8000", None, "http", False),
        ("http://127.0.0.1:99999", "127.0.0.1:99999", "http", False),
    ],
)
def test_same_origin(origin, host, scheme, same):
    assert same_origin(origin, host, scheme) is same


def test_origin_and_key_problems():
    for ok in ("*", "http://localhost:3000", "https://app.example", "http://[::1]:8080", "chrome-extension://abc"):
        assert origin_problem(ok) is None, ok
    assert "http://localhost:3000" in (origin_problem("http://localhost:3000/") or "")
    assert "'https://app.example'" in (origin_problem("https://App.example:443") or "")
    assert origin_problem("localhost:3000") and origin_problem("null") and origin_problem("http://a:bad")
    assert api_key_problem("sk-abc_123") is None
    assert api_key_problem("") and api_key_problem("has space") and api_key_problem("naïve")


def test_flags(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    conf = tmp_path / "conf.json"
    for argv, words in [
        (["--api-key-file", str(empty)], "no keys in it"),
        (["--api-key", "with space"], "printable ASCII"),
        (["--cors-origins", "http://localhost:3000/"], "write it as browsers send it"),
        (["--ssl-keyfile", "k.pem"], "together"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert words in capsys.readouterr().err, argv
    conf.write_text('{"api_keys": "secret"}')  # (a string would have made each character a key)
    with pytest.raises(SystemExit):
        parse_args(["--config", str(conf)])
    err = capsys.readouterr().err
    assert "takes a list" in err and "secret" not in err
    conf.write_text('{"api_keys": ["k1", "k2"], "cors_origins": ["http://localhost:3000"]}')
    args = parse_args(["--config", str(conf)])
    assert args.api_keys == ["k1", "k2"] and args.cors_origins == ["http://localhost:3000"]
    keys = tmp_path / "keys.txt"
    keys.write_text("k3\n\nk4\n")
    assert parse_args(["--api-key", "k1", "--api-key-file", str(keys)]).api_keys == ["k1", "k3", "k4"]


def test_exposure_warnings():
    keys, tls = ("k",), {"ssl_keyfile": Path("k.pem"), "ssl_certfile": Path("c.pem")}
    assert exposure_warnings(ServerOptions(), "127.0.0.1") == exposure_warnings(ServerOptions(), "::1") == []
    assert "without --api-key" in exposure_warnings(ServerOptions(), "0.0.0.0")[0]
    assert "clear text" in exposure_warnings(ServerOptions(api_keys=keys), "0.0.0.0")[0]
    assert exposure_warnings(ServerOptions(api_keys=keys, **tls), "0.0.0.0") == []
