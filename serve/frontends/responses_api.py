"""OpenAI's Responses API: POST /v1/responses, whole or streamed as its typed events (`event: NAME` SSE lines,
each with a `sequence_number`).

Stateless: nothing is stored (`store` is accepted and ignored), so what needs a stored response or
conversation (previous_response_id, conversation, background, prompt, item_reference) is a 400 that says to
send the conversation as `input`. A request is a chat (serve/frontends/chat.py): its input items become
OpenAI chat messages, its function tools chat tools, `text.format` a constraint; the output is split by the
chat completions' parsers into a reasoning item, a message item and function_call items, in that order."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from serve.core.engine import BadRequest, QueueFull
from serve.core.guide import Constraint
from serve.core.sampling import SamplingParams
from serve.core.scheduler import Event, Sequence

from . import chat, constraints
from .chat import ChatInput
from .chat_output import ChatOutput, Parts
from .common import collect, error_status, event_stream, fan_in, field_message, sequence_events, submit
from .metrics import access_record
from .openai_protocol import OpenAIError, parse_request
from .state import NotReady, server
from .tool_calls import ToolCall

log = logging.getLogger("aotllm.responses")

ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
# Engine and chat field names as this API names them.
PARAMS = {"messages": "input", "max_tokens": "max_output_tokens"}
STATELESS = "this server keeps no responses or conversations; send the whole conversation as `input`"


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # any name: the server serves one model
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None  # (not OpenAI's: vLLM's extension, for reproducible sampling)
    stream: bool | None = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None  # {"format": {...}}: the output's constraint
    reasoning: dict[str, Any] | None = None  # accepted; the model reasons as its template makes it
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None  # (a prompt template stored on OpenAI's platform)


def add_routes(app: FastAPI) -> None:
    @app.post("/v1/responses")
    async def create_response(request: Request):
        try:
            eng = server(request).ready_engine()
        except NotReady as e:
            raise OpenAIError(503, str(e), type="server_error", headers={"Retry-After": "5"}) from e
        req: ResponsesRequest = await parse_request(request, ResponsesRequest)
        for name in ("previous_response_id", "conversation", "background", "prompt"):
            if getattr(req, name):
                raise OpenAIError(400, f"{name} is not supported: {STATELESS}", param=name)
        given = _text_format(req.text)
        chat_input = ChatInput(
            _messages(req), _tools(req.tools), _tool_choice(req.tool_choice), req.parallel_tool_calls
        )
        state = server(request)
        try:  # (the body's size measures the work of rendering)
            prompt = await chat.render(state, eng, chat_input, len(await request.body()))
            d, max_tokens = state.defaults, req.max_output_tokens  # (d: the server's --temp, --seed, -n)
            if max_tokens is None:
                rest = chat.default_max_tokens(eng, len(prompt.ids))
                max_tokens = min(rest, d.max_tokens or rest)
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=next((t for t in (req.temperature, d.temperature) if t is not None), 1.0),
                top_p=1.0 if req.top_p is None else req.top_p,
                seed=req.seed if req.seed is not None else d.seed,
            )
            output = chat.constrain(params, given, prompt.tools, state, eng)
        except chat.ChatError as e:
            raise OpenAIError.from_chat(e, PARAMS.get(e.param or "", e.param)) from e
        constraint_field = "tool_choice" if prompt.tools.forced is not None else given and given[0]
        rid = f"resp_{uuid.uuid4().hex}"
        try:
            [seq] = await submit(eng, [prompt.ids], params, rid)
        except QueueFull as e:
            raise OpenAIError(503, str(e), type="server_error", code="queue_full", headers={"Retry-After": "1"}) from e
        except BadRequest as e:
            param = constraint_field if e.field == "constraint" else PARAMS.get(e.field or "messages", e.field)
            overflow = OpenAIError.bad_request(e, param)  # (a prompt over the context: llama.cpp's error type)
            raise OpenAIError(400, field_message(e, PARAMS), overflow.type, param, extra=overflow.extra) from e
        record = access_record()
        record.id, record.model, record.user, record.stream, record.n = rid, eng.cfg.model_name, req.user, req.stream, 1
        turn = Turn(rid, eng.cfg.model_name, req, seq, output)
        if req.stream:
            return event_stream(_stream(turn, request))
        return await _collect(turn, request)


# -- the request as a chat -----------------------------------------------------------------------------------


def _messages(req: ResponsesRequest) -> list[dict[str, Any]]:
    """The input items as OpenAI chat messages, the instructions first."""
    messages: list[dict[str, Any]] = (
        [] if req.instructions is None else [{"role": "system", "content": req.instructions}]
    )
    if isinstance(req.input, str):
        return [*messages, {"role": "user", "content": req.input}]
    if not req.input:
        raise OpenAIError(400, "input is empty: give a text or a list of items", param="input")
    for i, item in enumerate(req.input):
        where, kind = f"input[{i}]", item.get("type", "message")
        if kind == "message":
            role = ROLES.get(item.get("role", ""))
            if role is None:
                raise OpenAIError(400, f"{where}.role: one of {', '.join(ROLES)}", param=f"{where}.role")
            messages.append({"role": role, "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str):
                    raise OpenAIError(400, f"{where}.{key}: a string is required", param=f"{where}.{key}")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            if messages and messages[-1]["role"] == "assistant":  # (a turn's text and its calls: one message)
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise OpenAIError(400, f"{where}.call_id: a string is required", param=f"{where}.call_id")
            output = _text(item.get("output"), f"{where}.output")
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": output})
        elif kind == "reasoning":
            continue  # (chat templates show no earlier turn's reasoning)
        elif kind == "item_reference":
            raise OpenAIError(400, f"{where}: item_reference is not supported: {STATELESS}", param=where)
        else:
            raise OpenAIError(
                400,
                f"{where}.type: {kind!r} items are not supported; message, function_call, function_call_output",
                param=f"{where}.type",
            )
    return messages


def _text(content: Any, where: str) -> str:
    """A message's content (a text, or text parts) as one text; this server takes no images or files."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise OpenAIError(400, f"{where}: give a text or a list of input_text parts", param=where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type", "") if isinstance(part, dict) else type(part).__name__
        key = {"input_text": "text", "output_text": "text", "refusal": "refusal"}.get(kind)
        if key is None or not isinstance(part.get(key), str):
            raise OpenAIError(
                400,
                f"{where}[{j}]: {kind!r} parts are not supported; this model reads text only",
                param=f"{where}[{j}]",
            )
        texts.append(part[key])
    return "\n".join(texts)


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Function tools as chat completions' tools; other kinds (the platform's own tools) are refused."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise OpenAIError(
                400,
                f"tools[{i}].type: {tool.get('type')!r} tools are not supported; this server serves function tools",
                param=f"tools[{i}].type",
            )
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise OpenAIError(400, f"tools[{i}].name: a non-empty string is required", param=f"tools[{i}].name")
        fn = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if not isinstance(choice, dict):
        return choice  # ("auto", "none", "required"; chat checks it)
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise OpenAIError(
            400, 'tool_choice: "auto", "none", "required" or {"type": "function", "name": ...}', param="tool_choice"
        )
    return {"type": "function", "function": {"name": choice["name"]}}


def _text_format(text: dict[str, Any] | None) -> tuple[str, Constraint] | None:
    """`text.format` as the request's constraint and the field that gave it."""
    fmt = (text or {}).get("format") or {"type": "text"}
    try:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            kind = fmt.get("type") if isinstance(fmt, dict) else fmt
            raise constraints.FieldError(
                "text.format.type", f"{kind!r} is not supported; text, json_object or json_schema"
            )
        if fmt["type"] == "json_object":
            return constraints.one([constraints.Given("text.format", "json_object", True)])
        if fmt["type"] == "json_schema":
            if "schema" not in fmt:
                raise constraints.FieldError("text.format.schema", "give the JSON schema")
            return constraints.one([constraints.Given("text.format.schema", "json_schema", fmt["schema"])])
        return None
    except constraints.FieldError as e:
        raise OpenAIError(400, str(e), param=e.field) from e


# -- the response --------------------------------------------------------------------------------------------


@dataclass
class _TextItem:
    """The output item receiving text now: the message, or the reasoning before it."""

    kind: str  # "message" | "reasoning"
    id: str
    index: int  # its output_index
    text: list[str] = field(default_factory=list)

    def part(self, text: str = "") -> dict[str, Any]:
        if self.kind == "message":
            return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        return {"type": "reasoning_text", "text": text}

    def body(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        if self.kind == "message":
            return {"id": self.id, "type": "message", "role": "assistant", "status": status, "content": content}
        return {"id": self.id, "type": "reasoning", "summary": [], "content": content, "status": status}


class Turn:
    """One response as its sequence's events come: the output items opened and closed as the parsed parts
    arrive, the stream events that tell it, and the Response object. Streamed or not, a response is built
    the same way (a whole response drops the events), so both give the same output. Every stream ends with
    response.completed, response.incomplete or response.failed."""

    def __init__(self, rid: str, model: str, req: ResponsesRequest, seq: Sequence, output: ChatOutput) -> None:
        self.rid, self.model, self.req, self.seq, self.output = rid, model, req, seq, output
        self.created = int(time.time())
        self.items: list[dict[str, Any]] = []  # the finished output items
        self.open: _TextItem | None = None  # (its output_index is len(items))
        self.status = "in_progress"  # -> completed | incomplete | failed
        self.error: str | None = None
        self.tokens = self.reasoning_tokens = 0  # output tokens so far; those up to the last reasoning text
        self.finish_reason: str | None = None
        self.finish_error: str | None = None  # the error of a generation that failed
        self.seqno = 0

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        self.seqno += 1
        return {"type": kind, "sequence_number": self.seqno - 1, **fields}

    def start(self) -> list[dict[str, Any]]:
        return [self._event(f"response.{k}", response=self.response()) for k in ("created", "in_progress")]

    def feed(self, ev: Event) -> list[dict[str, Any]]:
        self.tokens += len(ev.token_ids)
        if ev.finish_reason:
            self.finish_reason, self.finish_error = ev.finish_reason, ev.error
        out = self._parts(self.output.feed(ev.text)) if ev.text else []
        if ev.finish_reason in ("stop", "length"):
            parts = self.output.finish()
            status = "incomplete" if ev.finish_reason == "length" else "completed"
            out += self._parts(parts) + self._close(status)
            for call in parts.calls:
                out += self._call(call)
            if not self.items:  # (nothing came: an empty message, so that output_text is "")
                out += self._open("message") + self._close(status)
            self.status = status
            out.append(self._event(f"response.{status}", response=self.response()))
        elif ev.finish_reason == "error":
            out += self.fail(f"generation failed: {ev.error}")
        elif ev.finish_reason:  # (cancelled: the client left, or the engine dropped it)
            out += self.fail("the request was cancelled")
        return out

    def fail(self, message: str) -> list[dict[str, Any]]:
        self.status, self.error = "failed", message
        error = self._event("error", code="server_error", message=message, param=None)
        return [error, self._event("response.failed", response=self.response())]

    def _parts(self, parts: Parts) -> list[dict[str, Any]]:
        out = []
        for kind, text in (("reasoning", parts.reasoning), ("message", parts.content)):
            if not text:
                continue
            if kind == "reasoning":
                self.reasoning_tokens = self.tokens
            if self.open is None or self.open.kind != kind:
                out += self._close("completed") + self._open(kind)
            assert self.open is not None
            self.open.text.append(text)
            delta: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
            out.append(self._event(self._text_event(".delta"), **self._where(), delta=text, **delta))
        return out

    def _text_event(self, suffix: str) -> str:
        assert self.open is not None
        return ("response.output_text" if self.open.kind == "message" else "response.reasoning_text") + suffix

    def _where(self) -> dict[str, Any]:
        assert self.open is not None
        return {"item_id": self.open.id, "output_index": self.open.index, "content_index": 0}

    def _open(self, kind: str) -> list[dict[str, Any]]:
        prefix = "msg" if kind == "message" else "rs"
        item = self.open = _TextItem(kind, f"{prefix}_{uuid.uuid4().hex}", len(self.items))
        return [
            self._event("response.output_item.added", output_index=item.index, item=item.body("in_progress", [])),
            self._event("response.content_part.added", **self._where(), part=item.part()),
        ]

    def _close(self, status: str) -> list[dict[str, Any]]:
        item = self.open
        if item is None:
            return []
        text = "".join(item.text)
        done: dict[str, Any] = {"logprobs": []} if item.kind == "message" else {}
        out = [
            self._event(self._text_event(".done"), **self._where(), text=text, **done),
            self._event("response.content_part.done", **self._where(), part=item.part(text)),
        ]
        self.items.append(item.body(status, [item.part(text)]))
        self.open = None
        out.append(self._event("response.output_item.done", output_index=item.index, item=self.items[-1]))
        return out

    def _call(self, call: ToolCall) -> list[dict[str, Any]]:
        index, item_id = len(self.items), f"fc_{uuid.uuid4().hex}"
        item = {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name, "arguments": ""}
        where = {"item_id": item_id, "output_index": index}
        added = self._event("response.output_item.added", output_index=index, item={**item, "status": "in_progress"})
        self.items.append({**item, "arguments": call.arguments, "status": "completed"})
        return [
            added,
            self._event("response.function_call_arguments.delta", **where, delta=call.arguments),
            self._event("response.function_call_arguments.done", **where, arguments=call.arguments),
            self._event("response.output_item.done", output_index=index, item=self.items[-1]),
        ]

    def usage(self) -> dict[str, Any]:
        prompt, done = len(self.seq.prompt_ids), len(self.seq.output_ids)
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": self.seq.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": done,
            "output_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
            "total_tokens": prompt + done,
        }

    def response(self) -> dict[str, Any]:
        req, ended = self.req, self.status != "in_progress"
        return {
            "id": self.rid,
            "object": "response",
            "created_at": self.created,
            "status": self.status,
            "error": {"code": "server_error", "message": self.error} if self.error else None,
            "incomplete_details": {"reason": "max_output_tokens"} if self.status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": list(self.items) if ended else [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None,
            "reasoning": req.reasoning or {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled",
            "usage": self.usage() if ended else None,
            "user": req.user,
            "metadata": req.metadata or {},
        }


def _log_usage(turn: Turn) -> None:
    usage, record = turn.usage(), access_record()
    record.prompt_tokens, record.completion_tokens = usage["input_tokens"], usage["output_tokens"]
    record.total_tokens, record.finish_reasons = usage["total_tokens"], [turn.finish_reason]


async def _collect(turn: Turn, request: Request) -> JSONResponse:
    def on_event(_: int, ev: Event) -> None:
        turn.feed(ev)

    try:
        await collect([turn.seq], request, on_event)
    finally:
        _log_usage(turn)
    if turn.finish_reason == "error":
        raise OpenAIError(error_status(turn.finish_error), turn.error or "generation failed", type="server_error")
    if turn.status not in ("completed", "incomplete"):
        raise OpenAIError(499, "the client closed the request", type="invalid_request_error")
    return JSONResponse(turn.response())


def _sse(event: dict[str, Any]) -> str:
    return f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def _stream(turn: Turn, request: Request) -> AsyncIterator[str]:
    events = fan_in([turn.seq], lambda s: sequence_events(s, request))
    try:
        for e in turn.start():
            yield _sse(e)
        try:
            async for _, ev in events:
                for e in turn.feed(ev):
                    yield _sse(e)
        except Exception:  # (a bug, not the client leaving: that is a GeneratorExit or a cancellation)
            log.exception("response %s: the stream failed", turn.rid)
        if turn.status == "in_progress":  # (no finish came)
            for e in turn.fail("generation failed: the stream ended early"):
                yield _sse(e)
    finally:  # the client went away (or we are done): nothing keeps pages past this point
        await events.aclose()
        _log_usage(turn)
