"""Anthropic's Messages API: POST /v1/messages (whole or streamed as Anthropic's server-sent events) and POST
/v1/messages/count_tokens. The request is mapped to OpenAI-style chat messages and tools and served by the
shared chat machinery (chat.py): the same template, tool-call and reasoning parsers as /v1/chat/completions.
Every error is Anthropic's {"type": "error", "error": {"type", "message"}}; unknown request fields are ignored.

Content is text only: image and document blocks are refused. Thinking blocks come from the server's
--reasoning-parser (the request's `thinking` is accepted and does not change what the model is asked).
`output_config.format` (structured outputs) constrains the text to its JSON schema, as a forced tool call
constrains it to the call. Besides Anthropic's fields, the former sampling fields temperature, top_p and
top_k are taken (the SDK sends them as extra_body)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from serve.core.engine import BadRequest, Engine, QueueFull
from serve.core.guide import Constraint
from serve.core.sampling import SamplingParams
from serve.core.scheduler import Event, Sequence

from . import chat, constraints
from .body import BodyError, parse_body
from .chat import ChatInput
from .chat_output import ChatOutput, Parts
from .common import collect, error_status, event_stream, fan_in, field_message, sequence_events, submit
from .metrics import access_record
from .state import NotReady, RequestDefaults, server
from .tool_calls import ToolCall

log = logging.getLogger("aotllm.anthropic")

ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "request_too_large", 503: "overloaded_error"}
# SamplingParams fields the engine names in its errors, as this API names them
FIELD_NAMES = {"stop": "stop_sequences"}


class AnthropicError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers
        self.type = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"type": "error", "error": {"type": self.type, "message": self.message}}


# -- requests ------------------------------------------------------------------------------------------------


class TextBlock(BaseModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(BaseModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class OtherBlock(BaseModel):
    """A block this server does not read (image, document, ...): refused where it is met, by its type."""

    model_config = ConfigDict(extra="allow")
    type: str


def _block_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in ("text", "tool_use", "tool_result", "thinking", "redacted_thinking") else "other"


# A block of a system prompt or a tool's result: text (anything else is refused with a message that says so)
TextOnly = Annotated[
    Annotated[TextBlock, Tag("text")] | Annotated[OtherBlock, Tag("other")],
    Discriminator(lambda v: "text" if _block_kind(v) == "text" else "other"),
]


class ToolResultBlock(BaseModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextOnly] | None = None
    is_error: bool = False


class ThinkingBlock(BaseModel):
    """An earlier turn's thinking, sent back as received: not shown to the model again (as chat templates
    drop earlier reasoning)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[
    Annotated[TextBlock, Tag("text")]
    | Annotated[ToolUseBlock, Tag("tool_use")]
    | Annotated[ToolResultBlock, Tag("tool_result")]
    | Annotated[ThinkingBlock, Tag("thinking")]
    | Annotated[ThinkingBlock, Tag("redacted_thinking")]
    | Annotated[OtherBlock, Tag("other")],
    Discriminator(_block_kind),
]


class Message(BaseModel):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control
    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None  # "custom" or absent; Anthropic's server tools (web_search_..., bash_...) are refused


class ToolChoice(BaseModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class OutputFormat(BaseModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")  # effort
    format: OutputFormat | None = None

    def constraint(self) -> tuple[str, Constraint] | None:
        """Structured outputs: the text is JSON of the format's schema."""
        given = self.format and constraints.Given("output_config.format.schema", "json_schema", self.format.schema_)
        try:
            return constraints.one([given] if given else [])
        except constraints.FieldError as e:
            raise AnthropicError(400, str(e)) from e


class CountRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None  # any name: this server serves one model
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextOnly] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = None  # (thinking blocks are what --reasoning-parser finds, whatever this)
    output_config: OutputConfig | None = None


class MessagesRequest(CountRequest):
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None

    def sampling(self, defaults: RequestDefaults) -> SamplingParams:
        """`defaults`: the server's (--temp, --seed) for what the request leaves out."""
        temperature = next((t for t in (self.temperature, defaults.temperature) if t is not None), 1.0)
        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=temperature,
            seed=defaults.seed,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            stop=list(self.stop_sequences or []),
        )


async def _parse(request: Request, model: type[CountRequest]) -> Any:
    try:
        return await parse_body(request, model)
    except BodyError as e:
        raise AnthropicError(e.status, e.message) from e
    except ValidationError as e:
        # (of a union's errors, the deepest names the field at fault: not "content.str" when a block is bad)
        first = max(e.errors(), key=lambda err: len(err.get("loc", ())))
        where = ".".join(str(x) for x in first.get("loc", ()))
        raise AnthropicError(400, f"{where}: {first.get('msg')}" if where else str(first.get("msg"))) from e


def _text(blocks: str | list[Any], where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    for j, b in enumerate(blocks):
        if not isinstance(b, TextBlock):
            raise AnthropicError(400, f"{where}.{j}: {_unsupported(b)}")
    return "\n".join(b.text for b in blocks)


def _unsupported(b: BaseModel) -> str:
    kind = getattr(b, "type", "?")
    if kind in ("image", "document"):
        return f"{kind} content is not supported: this server's model reads text only; send text blocks"
    return f"a {kind!r} block is not supported here"


def chat_input(req: CountRequest) -> ChatInput:
    """The request in OpenAI's terms: tool_use blocks become an assistant message's tool_calls, tool_result
    blocks `tool` messages (in their place among the user's text)."""
    if req.messages[-1].role == "assistant":  # (chat.render cannot continue a message: it would end the turn)
        raise AnthropicError(400, "prefill is not supported: the last message must be the user's")
    messages: list[dict[str, Any]] = []
    system = _text(req.system, "system") if req.system is not None else ""
    if system:
        messages.append({"role": "system", "content": system})
    for i, m in enumerate(req.messages):
        where = f"messages.{i}.content"
        blocks = [TextBlock(type="text", text=m.content)] if isinstance(m.content, str) else m.content
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, b in enumerate(blocks):
            if isinstance(b, TextBlock):
                texts.append(b.text)
            elif isinstance(b, ThinkingBlock) and m.role == "assistant":
                continue
            elif isinstance(b, ToolUseBlock) and m.role == "assistant":
                args = json.dumps(b.input, ensure_ascii=False)
                calls.append(
                    {"id": _call_id(b.id), "type": "function", "function": {"name": b.name, "arguments": args}}
                )
            elif isinstance(b, ToolResultBlock) and m.role == "user":
                if texts:
                    _add(messages, {"role": "user", "content": "\n".join(texts)})
                    texts = []
                result = _text(b.content or "", f"{where}.{j}.content")
                # (OpenAI's tool message has no error flag: the model reads it in the result)
                content = f"Error: {result}" if b.is_error else result
                messages.append({"role": "tool", "tool_call_id": _call_id(b.tool_use_id), "content": content})
            elif isinstance(b, (ToolUseBlock, ToolResultBlock, ThinkingBlock)):
                raise AnthropicError(400, f"{where}.{j}: a {b.type} block belongs in a message of the other role")
            else:
                raise AnthropicError(400, f"{where}.{j}: {_unsupported(b)}")
        if m.role == "assistant":
            _add(messages, {"role": "assistant", "content": "\n".join(texts) or None, "tool_calls": calls})
        elif texts or isinstance(m.content, str):
            _add(messages, {"role": "user", "content": "\n".join(texts)})
    tools, choice, parallel = _tools(req)
    return ChatInput(messages, tools, choice, parallel)


def _add(messages: list[dict[str, Any]], message: dict[str, Any]) -> None:
    """Consecutive turns of one role are one turn (as Anthropic takes them): their texts joined, their calls
    in order. An assistant message without calls has no `tool_calls` (templates test for the key)."""
    calls = message.pop("tool_calls", None) or []
    last = messages[-1] if messages else None
    if last is None or last["role"] != message["role"]:
        messages.append({**message, **({"tool_calls": calls} if calls else {})})
        return
    texts = [t for t in (last["content"], message["content"]) if t]
    last["content"] = "\n".join(texts) if texts or last["role"] == "user" else None
    if calls:
        last["tool_calls"] = [*last.get("tool_calls", []), *calls]


def _tools(req: CountRequest) -> tuple[list[dict[str, Any]] | None, Any, bool | None]:
    tools = []
    for i, t in enumerate(req.tools or []):
        if t.type not in (None, "custom"):
            raise AnthropicError(400, f"tools.{i}: server tools ({t.type}) are not supported; give custom tools")
        if t.input_schema is None:
            raise AnthropicError(400, f"tools.{i}.input_schema: Field required")
        fn = {"name": t.name, "parameters": t.input_schema, **({"description": t.description} if t.description else {})}
        tools.append({"type": "function", "function": fn})
    tc = req.tool_choice
    if tc is None:
        return tools or None, None, None
    parallel = False if tc.disable_parallel_tool_use else None
    if tc.type != "tool":
        return tools or None, {"auto": "auto", "any": "required", "none": "none"}[tc.type], parallel
    if not tc.name or tc.name not in {t.name for t in req.tools or []}:
        raise AnthropicError(400, f"tool_choice.name: {tc.name!r} is not the name of one of tools")
    return tools, {"type": "function", "function": {"name": tc.name}}, parallel


def _call_id(tool_use_id: str) -> str:
    return tool_use_id.removeprefix("toolu_")


def tool_use_id(call: ToolCall) -> str:
    return "toolu_" + call.id.removeprefix("call_")


# -- responses -----------------------------------------------------------------------------------------------


def tool_input(call: ToolCall) -> dict[str, Any]:
    """A call's arguments as tool_use's `input` object (the parsers give JSON objects; anything else is
    wrapped, so that `input` is always an object)."""
    try:
        value = json.loads(call.arguments)
    except ValueError:
        return {"arguments": call.arguments}
    return value if isinstance(value, dict) else {"arguments": value}


def content_blocks(parts: Parts) -> list[dict[str, Any]]:
    """A whole output's content blocks: its thinking, its text, its tool calls."""
    blocks: list[dict[str, Any]] = []
    if parts.reasoning:
        blocks.append({"type": "thinking", "thinking": parts.reasoning, "signature": ""})
    if parts.content:
        blocks.append({"type": "text", "text": parts.content})
    for call in parts.calls:
        blocks.append({"type": "tool_use", "id": tool_use_id(call), "name": call.name, "input": tool_input(call)})
    return blocks


def sse(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"


@dataclass
class BlockStream:
    """A streamed output's parts as content block events: a part of another kind than the open block's
    closes it and opens its own (thinking comes before text, tool calls last, as the parsers give them)."""

    index: int = -1
    open: str | None = None  # the open block's type

    def feed(self, parts: Parts) -> list[str]:
        out = []
        if parts.reasoning:
            out += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": parts.reasoning}))
        if parts.content:
            out += self._start("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": parts.content}))
        for call in parts.calls:  # (each call its own block, whole: the parsers give calls only at the end)
            out += self.close()
            out += self._start(
                "tool_use", {"type": "tool_use", "id": tool_use_id(call), "name": call.name, "input": {}}
            )
            out.append(self._delta({"type": "input_json_delta", "partial_json": json.dumps(tool_input(call))}))
        return out

    def close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [sse("content_block_stop", {"index": self.index})]

    def _start(self, kind: str, block: dict[str, Any]) -> list[str]:
        if self.open == kind:
            return []
        out = self.close()
        self.index, self.open = self.index + 1, kind
        return [*out, sse("content_block_start", {"index": self.index, "content_block": block})]

    def _delta(self, delta: dict[str, Any]) -> str:
        return sse("content_block_delta", {"index": self.index, "delta": delta})


@dataclass
class Job:
    rid: str
    model: str
    eng: Engine
    seq: Sequence
    prompt_tokens: int
    output: ChatOutput
    text: list[str] = field(default_factory=list)
    error: str | None = None  # why generation failed

    def usage(self, output_tokens: int | None = None) -> dict[str, int]:
        return {
            "input_tokens": self.prompt_tokens,
            "output_tokens": len(self.seq.output_ids) if output_tokens is None else output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }

    def message(
        self, content: list[dict[str, Any]], stop: tuple[str | None, str | None], output_tokens: int | None = None
    ) -> dict[str, Any]:
        return {
            "id": self.rid,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop[0],
            "stop_sequence": stop[1],
            "usage": self.usage(output_tokens),
        }

    async def stop_reason(self, calls: list[ToolCall]) -> tuple[str, str | None]:
        """Anthropic's stop_reason (and stop_sequence) of a sequence that finished "stop" or "length"."""
        seq, params = self.seq, self.seq.params
        if seq.finish_reason == "length":
            full = len(seq.output_ids) < params.max_tokens  # (else the context ran out first)
            return ("model_context_window_exceeded" if full else "max_tokens"), None
        if calls:
            return "tool_use", None
        if not seq.stops.stopped:  # the end token, or a grammar that allows nothing more
            return "end_turn", None
        return "stop_sequence", seq.stops.matched

    def log(self) -> None:
        record, usage = access_record(), self.usage()
        record.prompt_tokens, record.completion_tokens = usage["input_tokens"], usage["output_tokens"]
        record.total_tokens = usage["input_tokens"] + usage["output_tokens"]
        record.finish_reasons = [self.seq.finish_reason]


# -- routes --------------------------------------------------------------------------------------------------


def add_routes(app: FastAPI) -> None:
    @app.exception_handler(AnthropicError)
    async def _anthropic_error(request: Request, exc: AnthropicError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.post("/v1/messages")
    async def messages(request: Request):
        eng = _engine(request)
        req: MessagesRequest = await _parse(request, MessagesRequest)
        state = server(request)
        try:
            prompt = await chat.render(state, eng, chat_input(req), len(await request.body()))
            params = req.sampling(state.defaults)
            given = req.output_config.constraint() if req.output_config else None
            output = chat.constrain(params, given, prompt.tools, state, eng)
        except chat.ChatError as e:
            raise AnthropicError(e.status, str(e)) from e
        rid = f"msg_{uuid.uuid4().hex}"
        try:
            [seq] = await submit(eng, [prompt.ids], params, rid)  # (compiles a forced call's grammar off the loop)
        except QueueFull as e:
            raise AnthropicError(503, str(e), {"Retry-After": "1"}) from e
        except BadRequest as e:
            constraint = "tool_choice" if prompt.tools.forced is not None else "output_config.format"
            raise AnthropicError(400, field_message(e, {**FIELD_NAMES, "constraint": constraint})) from e
        record = access_record()
        record.id, record.model, record.stream, record.n = rid, eng.cfg.model_name, req.stream, 1
        job = Job(rid, req.model or eng.cfg.model_name, eng, seq, len(prompt.ids), output)
        if req.stream:
            return event_stream(_stream(job, request))
        return await _collect(job, request)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict:
        eng = _engine(request)
        req: CountRequest = await _parse(request, CountRequest)
        try:
            prompt = await chat.render(server(request), eng, chat_input(req), len(await request.body()))
        except chat.ChatError as e:
            raise AnthropicError(e.status, str(e)) from e
        return {"input_tokens": len(prompt.ids)}


def _engine(request: Request) -> Engine:
    try:
        return server(request).ready_engine()
    except NotReady as e:
        raise AnthropicError(503, str(e), {"Retry-After": "5"}) from e


async def _collect(job: Job, request: Request) -> JSONResponse:
    def on_event(index: int, ev: Event) -> None:
        job.text.append(ev.text)
        job.error = ev.error or job.error

    try:
        await collect([job.seq], request, on_event)
    finally:
        job.log()
    finish = job.seq.finish_reason
    if finish == "error":
        raise AnthropicError(error_status(job.error), f"generation failed: {job.error}")
    if finish not in ("stop", "length"):
        raise AnthropicError(499, "the client closed the request")
    parts = job.output.parse("".join(job.text))
    return JSONResponse(job.message(content_blocks(parts), await job.stop_reason(parts.calls)))


async def _stream(job: Job, request: Request) -> AsyncIterator[str]:
    """message_start, ping, the content blocks' events, message_delta, message_stop; a failure is an `error`
    event that ends the stream. A client gone ends it too (the sequence is cancelled)."""
    events = fan_in([job.seq], lambda s: sequence_events(s, request))
    blocks = BlockStream()
    try:
        yield sse("message_start", {"message": job.message([], (None, None), output_tokens=0)})
        yield sse("ping", {})
        async for _, ev in events:
            for out in blocks.feed(job.output.feed(ev.text)):
                yield out
            if ev.finish_reason in ("stop", "length"):
                parts = job.output.finish()
                for out in [*blocks.feed(parts), *blocks.close()]:
                    yield out
                reason, sequence = await job.stop_reason(parts.calls)
                usage = {"input_tokens": job.prompt_tokens, "output_tokens": len(job.seq.output_ids)}
                yield sse(
                    "message_delta", {"delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage}
                )
                yield sse("message_stop", {})
            elif ev.finish_reason == "error":
                err = AnthropicError(error_status(ev.error), f"generation failed: {ev.error}")
                yield sse("error", {"error": err.body()["error"]})
    except Exception as e:  # (a bug of ours: the client still gets an end it can read)
        log.exception("the message stream failed")
        yield sse("error", {"error": AnthropicError(500, f"the stream failed: {type(e).__name__}").body()["error"]})
    finally:  # the client went away (or we are done): nothing keeps pages past this point
        await events.aclose()
        job.log()
