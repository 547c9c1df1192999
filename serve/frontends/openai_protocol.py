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
from tokenizers import Tokenizer

from serve.core.detokenizer import IncrementalDetokenizer
from serve.core.engine import BadRequest, ContextOverflow
from serve.core.guide import Constraint
from serve.core.sampling import Sampled, SamplingParams
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
    # vLLM's: the prompt tokens' logprobs, each with the k most likely tokens at its position (0: only its own)
    prompt_logprobs: int | None = None

    def prompt_logprobs_asked(self) -> int | None:
        """vLLM's `prompt_logprobs` as this request's answer shows it: not with a stream (vLLM refuses k > 0
        there, and a stream of k = 0 shows none), else as given (the engine checks the range)."""
        k = self.prompt_logprobs
        if k is not None and self.stream:
            if k != 0:
                message = "`prompt_logprobs` are not available when `stream=True`"
                raise OpenAIError(400, message, param="prompt_logprobs")
            return None
        return k

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
    logprob: float | None  # None: the first prompt token (echo), which nothing predicts
    top: list[tuple[str, float]] | None


def floor(lp: float | None) -> float:
    return LOGPROB_FLOOR if lp is None else max(lp, LOGPROB_FLOOR)


def token_logprob(s: Sampled, text: str, piece: Any, k: int | None = None) -> TokenLogprob:
    """`s` as an entry whose token added `text` to the choice's text, with its first `k` alternatives (None:
    all), each named by `piece` (the token itself by `text`)."""
    top = [(text if t == s.token_id else piece(t), floor(lp)) for t, lp in (s.top_logprobs or [])[:k]]
    return TokenLogprob(text, floor(s.logprob), top)


def token_texts(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """What each of `ids` adds to their decoded text (`decode(ids)`, special tokens skipped, as echo decodes a
    prompt of ids): a character split over several tokens comes with its last one, so the texts concatenate to
    the decoded text. Blocking: O(len(ids)) small decodes."""
    detok = IncrementalDetokenizer(tokenizer)
    texts = [detok.add(t) for t in ids]
    if texts:
        texts[-1] += detok.flush()
    return texts


def vllm_prompt_logprobs(prompt: list[Sampled | None], k: int, piece: Any) -> list[dict[str, Any] | None]:
    """vLLM's `prompt_logprobs`: null for the first prompt token, then per position {token id (a string key):
    {"logprob", "rank", "decoded_token"}} for the prompt token (first) and the k most likely tokens. The prompt
    token's rank is known when it is among those k (1 + how many are more likely), else null."""
    out: list[dict[str, Any] | None] = []
    for s in prompt:
        if s is None:
            out.append(None)
            continue
        top = (s.top_logprobs or [])[:k]
        lp = floor(s.logprob)
        rank = 1 + sum(floor(x) > lp for _, x in top) if any(t == s.token_id for t, _ in top) else None
        entry = {str(s.token_id): {"logprob": lp, "rank": rank, "decoded_token": piece(s.token_id)}}
        for i, (t, x) in enumerate(top):
            entry.setdefault(str(t), {"logprob": floor(x), "rank": i + 1, "decoded_token": piece(t)})
        out.append(entry)
    return out


@dataclass
class Choice:
    index: int
    seq: Sequence
    end_ids: set[int]  # tokens that end the sequence (they add no text and get no logprob entry, but with echo)
    text: list[str] = field(default_factory=list)
    tokens: list[TokenLogprob] = field(default_factory=list)
    offset: int = 0  # text_offset of the next token (completions logprobs)
    finish_reason: str | None = None
    error: str | None = None
    output: ChatOutput | None = None  # chat with a tool-call or reasoning parser: the message's parts
    # echo with logprobs: the prompt tokens' texts (token_texts); their entries lead the choice's logprobs, and
    # an end token generated gets an entry too (as vLLM's: harnesses count on one entry per generated token)
    echo_texts: list[str] | None = None
    hidden: bool = False  # echo with max_tokens 0: the token generated (one) is not shown
    prompt: list[Sampled | None] | None = None  # the prompt's logprobs, when asked (with the first token)

    def feed(self, ev: Event, piece: Any) -> list[TokenLogprob]:
        new: list[TokenLogprob] = []
        if ev.prompt_logprobs is not None:
            self.prompt = ev.prompt_logprobs
        if ev.finish_reason:
            # (max_tokens 0: the one token asked for ends it, whatever it is)
            self.finish_reason, self.error = self.finish(ev.finish_reason), ev.error
        if self.hidden:
            return new
        if self.seq.params.logprobs is not None:
            for j, (tok, s) in enumerate(zip(ev.token_ids, ev.logprobs)):
                text = ev.text if j == 0 else ""
                if tok in self.end_ids and not text and self.echo_texts is None:
                    continue
                new.append(token_logprob(s, text, piece))
        self.text.append(ev.text)
        self.tokens += new
        return new

    def finish(self, reason: str | None) -> str | None:
        return "length" if self.hidden and reason == "stop" else reason

    def prompt_tokens(self, piece: Any) -> list[TokenLogprob]:
        """Echo with logprobs: the prompt's entries, each with the `logprobs` most likely tokens (the first
        token's logprob and alternatives null, as vLLM's); none before the prompt's logprobs came."""
        if self.echo_texts is None or self.prompt is None:
            return []
        k = self.seq.params.logprobs or 0
        return [
            TokenLogprob(text, None, None) if s is None else token_logprob(s, text, piece, k)
            for s, text in zip(self.prompt, self.echo_texts)
        ]

    def completion_logprobs(
        self, tokens: list[TokenLogprob], prompt: list[TokenLogprob] | None = None
    ) -> dict[str, Any] | None:
        """The logprobs object of `tokens` (generated; text_offset from `offset` on), after the echoed prompt's
        `prompt` entries (text_offset from 0)."""
        if self.seq.params.logprobs is None:
            return None
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

        def add(t: TokenLogprob, offset: int) -> None:
            out["tokens"].append(t.text)
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append(None if t.top is None else {**dict(t.top), t.text: t.logprob})
            out["text_offset"].append(offset)

        at = 0
        for t in prompt or []:
            add(t, at)
            at += len(t.text)
        for t in tokens:
            add(t, self.offset)
            self.offset += len(t.text)
        return out

    def chat_logprobs(self, tokens: list[TokenLogprob]) -> dict[str, Any] | None:
        if self.seq.params.logprobs is None:
            return None

        def entry(text: str, lp: float | None) -> dict[str, Any]:
            return {"token": text, "logprob": floor(lp), "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**entry(t.text, t.logprob), "top_logprobs": [entry(s, lp) for s, lp in t.top or []]} for t in tokens
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
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs to show (k alternatives): on each choice, chat's once
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict[str, Any]:
        done = sum(len(c.seq.output_ids) for c in self.choices if not c.hidden)
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
        prompt: list[TokenLogprob] | None = None,
    ) -> str:
        """One stream chunk: `text` (chat: as the delta's content, unless `delta` is given); `prompt`: the echoed
        prompt's logprobs entries (completions)."""
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
                "logprobs": c.completion_logprobs(tokens, prompt) if tokens or prompt else None,
                "finish_reason": finish,
            }
        body = self.envelope([choice], stream=True)
        if self.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def echo_chunk(self, c: Choice) -> str:
        """Echo with logprobs: the chunk of the echoed prompt and its logprobs (once they came). Blocking: in
        proportion to the prompt."""
        return self.chunk(c, self.echo[c.index], [], prompt=c.prompt_tokens(self.piece))

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
        """The whole response. Blocking: with prompt logprobs, work in proportion to the prompt (`size`)."""
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
                choice = {
                    "index": c.index,
                    "text": text,
                    "logprobs": c.completion_logprobs(c.tokens, c.prompt_tokens(self.piece)),
                    "finish_reason": c.finish_reason,
                }
                if self.prompt_logprobs is not None:  # (vLLM's, on the choice)
                    choice["prompt_logprobs"] = self.vllm_prompt_logprobs(c)
                out.append(choice)
        body = {**self.envelope(out, stream=False), "usage": self.usage()}
        if self.chat and self.prompt_logprobs is not None:  # (vLLM's, once: the choices share the prompt)
            body["prompt_logprobs"] = self.vllm_prompt_logprobs(self.choices[0])
        return body

    def vllm_prompt_logprobs(self, c: Choice) -> list[dict[str, Any] | None] | None:
        if c.prompt is None or self.prompt_logprobs is None:
            return None
        return vllm_prompt_logprobs(c.prompt, self.prompt_logprobs, self.piece)

    def size(self) -> int:
        """The prompt logprobs' entries to shape (for `off_loop`)."""
        k = max(c.seq.params.prompt_logprobs or 0 for c in self.choices)
        return sum(len(c.prompt or ()) for c in self.choices) * (k + 1)


def finish_reason(reason: str | None, parts: Parts) -> str | None:
    """OpenAI's "tool_calls" for an output that ended as calls."""
    return "tool_calls" if parts.calls and reason == "stop" else reason


# -- routes --------------------------------------------------------------------------------------------------
