"""A chat request made ready for the engine, whatever API it came through (OpenAI chat completions,
Anthropic Messages, OpenAI Responses, llama.cpp's /apply-template): the messages rendered with the chat
template and tokenized, the tools shown and parsed, a forced call's grammar, and the output's parser.

Every API maps its request to OpenAI-style message dicts and `tools` first; errors are `ChatError`s that
name the request field at fault (each front-end answers them in its own shape, 400)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from serve.core.engine import BadRequest, Engine
from serve.core.guide import Constraint
from serve.core.sampling import SamplingParams

from .chat_output import ChatOutput
from .chat_template import RESERVED_VARIABLES, ChatTemplateError, encode_prompt, render_chat, resolve_template
from .chat_tools import ChatTools, ToolRequestError
from .state import ServerState
from .tokenizing import off_loop

log = logging.getLogger("aotllm.chat")


class ChatError(ValueError):
    """The chat request cannot be rendered or served as asked: `param` names the field; `status` is 400, or
    500 for the server's own misconfiguration."""

    def __init__(self, param: str | None, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status


@dataclass
class ChatInput:
    """An API's chat request in OpenAI's terms."""

    messages: list[dict[str, Any]]  # role, content (text), and tool_calls / tool_call_id as OpenAI's
    tools: list[Any] | None = None  # OpenAI function tools
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    variables: dict[str, Any] = field(default_factory=dict)  # extra template variables (chat_template_kwargs)
    add_generation_prompt: bool = True


@dataclass
class ChatPrompt:
    ids: list[int]
    text: str  # the rendered prompt
    tools: ChatTools


def chat_template(state: ServerState, eng: Engine) -> str:
    """The template this server renders chats with (--chat-template, else the model's own), resolved once."""
    if state.resolved_template is None:
        try:
            state.resolved_template = resolve_template(state.chat_template, eng.tok_info.chat_template)
        except (ValueError, OSError) as e:  # (its text names server files: for the log only)
            log.error("the chat template could not be loaded: %s", e)
            raise ChatError(
                None, "server misconfigured: its chat template could not be loaded (details in the server log)", 500
            ) from e
    return state.resolved_template


async def render(state: ServerState, eng: Engine, chat: ChatInput, work: int, tokenize: bool = True) -> ChatPrompt:
    """The chat rendered (off the event loop; `work` measures it: the body's size) and tokenized."""
    taken = sorted(chat.variables.keys() & (RESERVED_VARIABLES | ({"tools"} if chat.tools is not None else set())))
    if taken:
        them = "it" if len(taken) == 1 else "them"
        raise ChatError(
            "chat_template_kwargs",
            f"chat_template_kwargs may not set {', '.join(taken)}: the request's own fields set {them}; "
            f"hint: remove {them} from chat_template_kwargs",
        )
    template, info, variables = chat_template(state, eng), eng.tok_info, dict(chat.variables)
    try:
        tools = ChatTools.of(
            chat.tools,
            chat.tool_choice,
            chat.parallel_tool_calls,
            chat.messages,
            template,
            state.tool_call_parser,
            eng.tokenizer.token_to_id,
        )
        messages = tools.show(chat.messages, variables)
    except ToolRequestError as e:
        raise ChatError(e.param, str(e)) from e

    def render_and_encode() -> tuple[str, list[int]]:
        text = render_chat(template, messages, chat.add_generation_prompt, info.bos_token, info.eos_token, **variables)
        return text, encode_prompt(eng.tokenizer, info, text, eng.abi.max_seq_len) if tokenize else []

    try:
        text, ids = await off_loop(render_and_encode, work)
    except (ChatTemplateError, BadRequest) as e:
        raise ChatError("messages", str(e)) from e
    return ChatPrompt(ids, text, tools)


def constrain(
    params: SamplingParams, given: tuple[str, Constraint] | None, tools: ChatTools, state: ServerState, eng: Engine
) -> ChatOutput:
    """Set the request's constraint (its own, or a forced tool call's: not both) and what the output needs
    from the detokenizer; returns the parser of the output's reasoning and calls. `given`: the request's
    constraint and the field that gave it."""
    if tools.forced is not None:
        if given:
            raise ChatError(given[0], f"{given[0]}: give it or a tool_choice that forces a call, not both")
        given = "tool_choice", tools.forced
    if given:
        params.constraint = given[1]
    parser = tools.parser if tools.active else None
    if parser is not None and any(eng.tokenizer.token_to_id(m) is not None for m in parser.markers):
        params.skip_special_tokens = False  # (a call marker that is one special token must reach the parser)
    return ChatOutput(parser, state.reasoning_parser)


def default_max_tokens(eng: Engine, prompt_tokens: int) -> int:
    """A chat's max_tokens when the request gives none: the rest of the context, within the server's cap."""
    cap = eng.cfg.max_tokens_per_request
    return max(1, min(eng.abi.max_seq_len - prompt_tokens, cap or eng.abi.max_seq_len))
