"""The OpenAI wire format: request models (pydantic), the error object, and how a request's sequences are
shaped into OpenAI responses and stream chunks. The routes are in serve/openai_api.py."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve.core.engine import BadRequest, ContextOverflow
from serve.core.guide import Constraint
from serve.core.sampling import SamplingParams
from serve.core.scheduler import Event, Sequence

from . import constraints
from .body import BodyError, parse_body
from .chat import ChatError
from .chat_output import ChatOutput, Parts
from .tokenizing import Prompt, prompt_items

LOGPROB_FLOOR = -9999.0  # JSON has no -inf
SYSTEM_FINGERPRINT = "aotllm-0.1.0"  # the server's build; the same program gives the same answers


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status,
            message,
            type,
            param,
            code,
            headers,
        )
        self.extra = extra or {}  # more fields of the error object (llama.cpp's n_prompt_tokens, n_ctx)

    @staticmethod
    def bad_request(e: BadRequest, param: str | None) -> OpenAIError:
        """The engine's refusal; a prompt over the context is llama.cpp's exceed_context_size_error."""
        if isinstance(e, ContextOverflow):
            extra = {"n_prompt_tokens": e.n_prompt_tokens, "n_ctx": e.n_ctx}
            return OpenAIError(400, str(e), "exceed_context_size_error", param, extra=extra)
        return OpenAIError(400, str(e), param=param)

    @staticmethod
    def from_chat(e: ChatError, param: str | None) -> OpenAIError:
        """A chat that cannot be rendered or served (a prompt over the context: as `bad_request`)."""
        if isinstance(e.__cause__, BadRequest):
            return OpenAIError.bad_request(e.__cause__, param)
        return OpenAIError(e.status, str(e), "server_error" if e.status >= 500 else "invalid_request_error", param)

    def response(self) -> JSONResponse:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code, **self.extra}
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers)


# -- requests ------------------------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class SamplingRequest(BaseModel):
    """The fields both endpoints share (OpenAI's, plus vLLM's extras). Nulls mean 'the default'."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    n_predict: int | None = None  # llama.cpp's max_tokens (-1: the default)
    skip_special_tokens: bool | None = None
    # the output's constraint: OpenAI's, vLLM's, llama.cpp's spellings (serve/frontends/constraints.py)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None

    def constraint(self) -> tuple[str, Constraint] | None:
        """The request's constraint and the field that gave it; OpenAIError for a malformed or second one."""
        try:
            return constraints.one(
                constraints.response_format(self.response_format),
                constraints.structured_outputs(self.structured_outputs),
                [
                    constraints.Given("guided_json", "json_schema", self.guided_json),
                    constraints.Given("guided_regex", "regex", self.guided_regex),
                    constraints.Given("guided_choice", "choice", self.guided_choice),
                    constraints.Given("guided_grammar", "grammar", self.guided_grammar),
                    constraints.Given("json_schema", "json_schema", self.json_schema),
                    constraints.Given("grammar", "grammar", self.grammar),
                ],
            )
        except constraints.FieldError as e:
            raise OpenAIError(400, str(e), param=e.field) from e

    def sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not re.fullmatch(r"-?\d+", key.strip()):
                raise OpenAIError(400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias")
            bias[int(key)] = value

        def given(value: Any, default: Any) -> Any:
            return default if value is None else value

        return SamplingParams(
            max_tokens=max_tokens,
            temperature=given(self.temperature, 1.0),
            top_k=given(self.top_k, 0),
            top_p=given(self.top_p, 1.0),
            min_p=given(self.min_p, 0.0),
            repetition_penalty=given(self.repetition_penalty, 1.0),
            presence_penalty=given(self.presence_penalty, 0.0),
            frequency_penalty=given(self.frequency_penalty, 0.0),
            logit_bias=bias,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
            skip_special_tokens=given(self.skip_special_tokens, True),
            n=given(self.n, 1),
            logprobs=logprobs,
        )


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: passed to the template as sent
    role: str
    content: str | list[dict[str, Any]] | None = None

    def for_template(self) -> dict[str, Any]:
        msg = self.model_dump()
        msg["role"] = "system" if self.role == "developer" else self.role
        if isinstance(self.content, list):
            parts = []
            for part in self.content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise OpenAIError(
                        400, f"only text content parts are supported, got {part.get('type')!r}", param="messages"
                    )
                parts.append(part["text"])
            msg["content"] = "\n".join(parts)
        return msg


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str | None = None  # llama.cpp
    text: str | None = None
    prompt: str | None = None  # vLLM
    add_special: bool | None = None
    add_special_tokens: bool | None = None
    with_pieces: bool = False


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    # OpenAI's input, and llama-server's: lists mixing texts, ids, {"prompt_string"} and {"content"} items
    input: Any = None
    content: Any = None  # llama.cpp's /embedding name for it
    model: str | None = None
    encoding_format: str = "float"  # or "base64" (little-endian float32: what the openai client asks for)
    dimensions: int | None = None
    user: str | None = None

    def prompts(self) -> list[Prompt]:
        field = "input" if self.input is not None else "content"
        try:
            return prompt_items(self.input if self.input is not None else self.content, field)
        except ValueError as e:
            raise OpenAIError(400, str(e), param=field) from e


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    tokens: list[int]


async def parse_request(request: Request, model: type[BaseModel]) -> Any:
    try:
        return await parse_body(request, model)
    except BodyError as e:
        raise OpenAIError(e.status, e.message) from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise OpenAIError(
            400,
            f"invalid request: {where}: {first.get('msg')}" if where else str(first.get("msg")),
            param=where or None,
        ) from e


# -- responses -----------------------------------------------------------------------------------------------


@dataclass
class TokenLogprob:
    text: str  # exactly the text this token added to the choice's text (pieces concatenate to it)
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Choice:
    index: int
    seq: Sequence
    end_ids: set[int]  # tokens that end the sequence (they add no text and get no logprob entry)
    text: list[str] = field(default_factory=list)
    tokens: list[TokenLogprob] = field(default_factory=list)
    offset: int = 0  # text_offset of the next token (completions logprobs)
    finish_reason: str | None = None
    error: str | None = None
    output: ChatOutput | None = None  # chat with a tool-call or reasoning parser: the message's parts

    def feed(self, ev: Event, piece: Any) -> list[TokenLogprob]:
        new: list[TokenLogprob] = []
        if self.seq.params.logprobs is not None:
            for j, (tok, s) in enumerate(zip(ev.token_ids, ev.logprobs)):
                text = ev.text if j == 0 else ""
                if tok in self.end_ids and not text:
                    continue
                top = [(text if t == tok else piece(t), max(lp, LOGPROB_FLOOR)) for t, lp in (s.top_logprobs or [])]
                new.append(
                    TokenLogprob(text, max(s.logprob if s.logprob is not None else LOGPROB_FLOOR, LOGPROB_FLOOR), top)
                )
        self.text.append(ev.text)
        self.tokens += new
        if ev.finish_reason:
            self.finish_reason, self.error = ev.finish_reason, ev.error
        return new

    def completion_logprobs(self, tokens: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.seq.params.logprobs is None:
            return None
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            out["tokens"].append(t.text)
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append({**dict(t.top), t.text: t.logprob})
            out["text_offset"].append(self.offset)
            self.offset += len(t.text)
        return out

    def chat_logprobs(self, tokens: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.seq.params.logprobs is None:
            return None

        def entry(text: str, lp: float) -> dict[str, Any]:
            return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**entry(t.text, t.logprob), "top_logprobs": [entry(s, lp) for s, lp in t.top]} for t in tokens
            ],
            "refusal": None,
        }


@dataclass
class Job:
    """One request's sequences and how its responses are shaped."""

    chat: bool
    rid: str
    model: str
    prompt_tokens: int
    choices: list[Choice]
    piece: Any  # token id -> its text alone (for top_logprobs alternatives)
    echo: list[str] = field(default_factory=list)  # per choice: the prompt text to echo (completions)
    include_usage: bool = False
    prompts: int = 1  # (the choices are `n` per prompt)
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict[str, Any]:
        done = sum(len(c.seq.output_ids) for c in self.choices)
        cached = sum(c.seq.cached_tokens for c in self.choices[:: max(1, len(self.choices) // self.prompts)])
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": done,
            "total_tokens": self.prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def envelope(self, choices: list[dict], stream: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {
            "id": self.rid,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }

    def chunk(
        self,
        c: Choice,
        text: str | None,
        tokens: list[TokenLogprob],
        finish: str | None = None,
        role: bool = False,
        delta: dict[str, Any] | None = None,
    ) -> str:
        """One stream chunk: `text` (chat: as the delta's content, unless `delta` is given)."""
        if self.chat:
            if delta is None:
                delta = {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            choice = {
                "index": c.index,
                "delta": delta,
                "logprobs": c.chat_logprobs(tokens) if tokens else None,
                "finish_reason": finish,
            }
        else:
            choice = {
                "index": c.index,
                "text": text or "",
                "logprobs": c.completion_logprobs(tokens) if tokens else None,
                "finish_reason": finish,
            }
        body = self.envelope([choice], stream=True)
        if self.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def part_chunks(self, c: Choice, parts: Parts, tokens: list[TokenLogprob]) -> list[str]:
        """A chat choice's streamed parts: reasoning, content (with the tokens' logprobs), each tool call."""
        out = []
        if parts.reasoning:
            out.append(self.chunk(c, None, [], delta={"reasoning_content": parts.reasoning}))
        if parts.content or tokens:
            out.append(self.chunk(c, parts.content or "", tokens))
        for i, call in enumerate(parts.calls):
            out.append(self.chunk(c, None, [], delta={"tool_calls": [{"index": i, **call.openai()}]}))
        return out

    def full(self) -> dict[str, Any]:
        out = []
        for c, echo in zip(self.choices, self.echo or [""] * len(self.choices)):
            text = echo + "".join(c.text)
            if self.chat:
                parts = c.output.parse(text) if c.output else Parts(content=text)
                message: dict[str, Any] = {"role": "assistant", "content": parts.content}
                if c.output and c.output.reasoning:
                    message["reasoning_content"] = parts.reasoning
                if parts.calls:
                    message["tool_calls"] = [call.openai() for call in parts.calls]
                out.append(
                    {
                        "index": c.index,
                        "message": message,
                        "logprobs": c.chat_logprobs(c.tokens),
                        "finish_reason": finish_reason(c.finish_reason, parts),
                    }
                )
            else:
                out.append(
                    {
                        "index": c.index,
                        "text": text,
                        "logprobs": c.completion_logprobs(c.tokens),
                        "finish_reason": c.finish_reason,
                    }
                )
        return {**self.envelope(out, stream=False), "usage": self.usage()}


def finish_reason(reason: str | None, parts: Parts) -> str | None:
    """OpenAI's "tool_calls" for an output that ended as calls."""
    return "tool_calls" if parts.calls and reason == "stop" else reason


# -- routes --------------------------------------------------------------------------------------------------
