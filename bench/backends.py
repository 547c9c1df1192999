"""One streamed request per backend, timed the way vLLM's and SGLang's serving benchmarks time them.

Backends (always streaming; greedy unless `temperature` is given):
- generate: POST /generate {"text", "sampling_params": {"max_completion_tokens", "temperature": 0,
  "ignore_eos"}, "stream": true}. Our server answers `data: {"text": <new text>, "meta_info":
  {"completion_tokens", "prompt_tokens", ...}}` events (exact counts); shortfin answers
  `data(<rid>): <raw text of one token>` events (one event per token). Both end with `data: [DONE]`.
  (SGLang's /generate streams the text so far, not the new text: use its openai backend.)
- openai: POST /v1/completions {"model", "prompt", "max_tokens", "temperature": 0, "stream": true,
  "stream_options": {"include_usage": true}, "ignore_eos"?}: our server, llama.cpp's llama-server, vLLM.
- triton: POST /v2/models/{model}/generate_stream {"text_input", "max_tokens", "stream": true,
  "return_log_probs": true, "min_length"?}: our server, TensorRT-LLM. The log-probabilities are asked
  for only to count the tokens of each chunk (Triton reports no token counts).

Timing (per request, client side, time.perf_counter): a *chunk* is an event that carries output,
i.e. non-empty text or new tokens by the server's count (OpenAI's closing event with an empty text and
the usage-only event are not chunks). TTFT = first chunk - request sent; ITL = the gaps between
successive chunks (as vLLM: one gap per chunk, whatever the tokens in it); latency (end-to-end) =
stream closed - request sent. A request without any chunk has failed (vLLM's rule).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .sse import sse_data


@dataclass
class StreamState:
    """What a request's stream has said so far."""

    text: str = ""
    output_tokens: int | None = None  # reported by the server: exact
    output_tokens_from: str = ""  # which report ("usage", "meta_info", "logprobs", "events")
    prompt_tokens: int | None = None  # reported by the server
    error: str = ""


@dataclass
class RequestResult:
    """One request of the benchmark. Times are in seconds; `start_s` is from the benchmark's start."""

    index: int
    success: bool = False
    error: str = ""
    start_s: float = 0.0
    ttft_s: float | None = None
    latency_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    tpot_s: float | None = None  # (latency - ttft) / (output_tokens - 1), when output_tokens > 1
    chunks: int = 0
    prompt_tokens: int | None = None
    prompt_tokens_from: str = ""  # "server", "tokenizer", "tokenize_endpoint" or "" (unknown)
    output_tokens: int | None = None
    # "usage", "meta_info", "logprobs", "events" (the server's); "tokenizer", "tokenize_endpoint", "chunks"
    output_tokens_from: str = ""
    text: str = ""


class Backend:
    """A serving API: the request to send, and how to read its stream's events."""

    name = ""

    def __init__(self, base_url: str, model: str | None = None, temperature: float = 0.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.temperature = temperature  # 0: greedy

    async def prepare(self, client: httpx.AsyncClient) -> None:
        """Once before the run (the OpenAI backend asks /v1/models for the model name)."""

    def url(self) -> str:
        raise NotImplementedError

    def payload(self, prompt: str, max_tokens: int, ignore_eos: bool, schema: dict | None = None) -> dict[str, Any]:
        """The request; `schema`: its output constrained to this JSON schema, in the API's own field."""
        raise NotImplementedError

    def parse(self, data: str, state: StreamState) -> bool:
        """Take one event's data into `state`; True when it carried output (a chunk)."""
        raise NotImplementedError

    def check(self, state: StreamState, max_tokens: int, chunks: int) -> None:
        """At the end of the stream: drop a server count that cannot be right."""


def _json(data: str) -> Any:
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return None


def _error_text(err: Any) -> str:
    return str(err.get("message", err)) if isinstance(err, dict) else str(err)


def _event_object(data: str, state: StreamState) -> dict | None:
    """An event's JSON object, or None with `state.error` set (not JSON, or the server's error event)."""
    obj = _json(data)
    if not isinstance(obj, dict):
        state.error = f"not JSON: {data[:100]!r}"
        return None
    if obj.get("error"):
        state.error = _error_text(obj["error"])
        return None
    return obj


class GenerateBackend(Backend):
    """shortfin's /generate: our server's JSON events, or shortfin's raw text events."""

    name = "generate"

    def url(self) -> str:
        return f"{self.base_url}/generate"

    def payload(self, prompt: str, max_tokens: int, ignore_eos: bool, schema: dict | None = None) -> dict[str, Any]:
        params = {"max_completion_tokens": max_tokens, "temperature": self.temperature, "ignore_eos": ignore_eos}
        if schema is not None:
            params["json_schema"] = json.dumps(schema)
        return {"text": prompt, "stream": True, "sampling_params": params}

    def parse(self, data: str, state: StreamState) -> bool:
        obj = _json(data)
        if isinstance(obj, dict) and ("text" in obj or "meta_info" in obj or "error" in obj):
            meta = obj.get("meta_info") or {}
            if obj.get("error") or meta.get("error"):
                state.error = _error_text(obj.get("error") or meta.get("error"))
                return False
            text = obj.get("text") or ""
            state.text += text
            before = state.output_tokens or 0
            if isinstance(meta.get("completion_tokens"), int):
                state.output_tokens, state.output_tokens_from = meta["completion_tokens"], "meta_info"
            if isinstance(meta.get("prompt_tokens"), int):
                state.prompt_tokens = meta["prompt_tokens"]
            return bool(text) or (state.output_tokens or 0) > before
        # shortfin: the raw text of one token per event
        state.text += data
        state.output_tokens = (state.output_tokens or 0) + 1
        state.output_tokens_from = "events"
        return True


class OpenAIBackend(Backend):
    """POST /v1/completions, streamed, with the usage chunk."""

    name = "openai"

    async def prepare(self, client: httpx.AsyncClient) -> None:
        if self.model is None:
            r = await client.get(f"{self.base_url}/v1/models")
            r.raise_for_status()
            self.model = r.json()["data"][0]["id"]

    def url(self) -> str:
        return f"{self.base_url}/v1/completions"

    def payload(self, prompt: str, max_tokens: int, ignore_eos: bool, schema: dict | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if ignore_eos:
            body["ignore_eos"] = True
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "record", "schema": schema}}
        return body

    def parse(self, data: str, state: StreamState) -> bool:
        obj = _event_object(data, state)
        if obj is None:
            return False
        usage = obj.get("usage") or {}
        if isinstance(usage.get("completion_tokens"), int):
            state.output_tokens, state.output_tokens_from = usage["completion_tokens"], "usage"
        if isinstance(usage.get("prompt_tokens"), int):
            state.prompt_tokens = usage["prompt_tokens"]
        choices = obj.get("choices") or []
        text = (choices[0].get("text") or "") if choices else ""
        state.text += text
        return bool(text)


def _count(values: Any) -> int:
    """How many numbers a (nested) list holds."""
    if isinstance(values, list):
        return sum(_count(v) for v in values)
    return 1 if isinstance(values, (int, float)) else 0


class TritonBackend(Backend):
    """Triton's generate extension (TensorRT-LLM's ensemble), streamed."""

    name = "triton"

    def url(self) -> str:
        return f"{self.base_url}/v2/models/{self.model or 'ensemble'}/generate_stream"

    def payload(self, prompt: str, max_tokens: int, ignore_eos: bool, schema: dict | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "text_input": prompt,
            "max_tokens": max_tokens,
            "temperature": float(self.temperature),
            "stream": True,
            "bad_words": "",
            "stop_words": "",
            "return_log_probs": True,
        }
        if ignore_eos:
            body["min_length"] = max_tokens  # TensorRT-LLM's way (and vLLM's trt backend's)
        if schema is not None:
            body["guided_decoding_guide_type"], body["guided_decoding_guide"] = "json_schema", json.dumps(schema)
        return body

    def parse(self, data: str, state: StreamState) -> bool:
        obj = _event_object(data, state)
        if obj is None:
            return False
        text = obj.get("text_output") or ""
        state.text += text
        new = _count(obj.get("output_log_probs"))
        if new:
            state.output_tokens, state.output_tokens_from = (state.output_tokens or 0) + new, "logprobs"
        return bool(text) or new > 0

    def check(self, state: StreamState, max_tokens: int, chunks: int) -> None:
        # padded log-probabilities (more than asked for, or fewer than the chunks) are no count
        if state.output_tokens is not None and not chunks <= state.output_tokens <= max_tokens:
            state.output_tokens, state.output_tokens_from = None, ""


BACKENDS: dict[str, type[Backend]] = {"generate": GenerateBackend, "openai": OpenAIBackend, "triton": TritonBackend}


async def send(
    client: httpx.AsyncClient,
    backend: Backend,
    index: int,
    prompt: str,
    max_tokens: int,
    ignore_eos: bool,
    t0: float,
    schema: dict | None = None,
) -> RequestResult:
    """One streamed request; failures (HTTP errors, broken streams, error events) are results, not raises."""
    out = RequestResult(index=index)
    state = StreamState()
    st = time.perf_counter()
    out.start_s = st - t0
    last = st
    try:
        async with client.stream(
            "POST", backend.url(), json=backend.payload(prompt, max_tokens, ignore_eos, schema)
        ) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode("utf-8", "replace")
                out.error = f"HTTP {r.status_code}: {body[:300]}"
                return out
            async for data in sse_data(r.aiter_lines()):
                if data.strip() == "[DONE]":
                    continue
                now = time.perf_counter()
                chunk = backend.parse(data, state)
                if chunk:
                    if out.ttft_s is None:
                        out.ttft_s = now - st
                    else:
                        out.itl_s.append(now - last)
                    last = now
                    out.chunks += 1
                if state.error:
                    break
        out.latency_s = time.perf_counter() - st
    except Exception as e:  # noqa: BLE001 - HTTP errors, or whatever else broke a request: reported, and on
        out.error = f"{type(e).__name__}: {e}"
        return out
    backend.check(state, max_tokens, out.chunks)
    out.text, out.prompt_tokens = state.text, state.prompt_tokens
    out.prompt_tokens_from = "server" if state.prompt_tokens is not None else ""
    out.output_tokens, out.output_tokens_from = state.output_tokens, state.output_tokens_from
    if state.error:
        out.error = f"stream error: {state.error}"
    elif out.ttft_s is None:
        out.error = "no output: the stream carried no text"
    else:
        out.success = True
    return out
