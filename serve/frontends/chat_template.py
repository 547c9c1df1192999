"""Chat templates: the model's own Jinja template rendered with HF `apply_chat_template` semantics,
or a built-in one (`--chat-template NAME|FILE`), and the rendered prompt tokenized without a second BOS.

The environment is what transformers builds (`utils/chat_template_utils.py`): a sandboxed Jinja env with
trim_blocks / lstrip_blocks and loop controls, `raise_exception`, `strftime_now`, a `tojson` that does not
HTML-escape, and a no-op `{% generation %}` block. Templates see `messages`, `add_generation_prompt`,
`bos_token`, `eos_token` (and `tools` / `documents`, None unless given).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizing import encode_text

_ALTERNATE = "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"

BUILTIN_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
        " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # meta-llama/Llama-2-7b-chat-hf
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + _ALTERNATE + "{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    # meta-llama/Meta-Llama-3-8B-Instruct
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}"
        "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content']"
        " | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Mistral-7B-Instruct v0.1/v0.2, with a system message folded into the first user turn
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] + '\n\n' %}"
        "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = '' %}"
        "{% set loop_messages = messages %}{% endif %}{{ bos_token }}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" + _ALTERNATE + "{% endif %}"
        "{% if message['role'] == 'user' %}{% if loop.first %}{% set content = system_message + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{{ '[INST] ' + content + ' [/INST]' }}"
        "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    # FastChat's vicuna_v1.1
    "vicuna": (
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
        '{% set loop_messages = messages[1:] %}{% else %}{{ "A chat between a curious user and an artificial '
        "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's "
        'questions. " }}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}'
        "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
        "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
}
DEFAULT_TEMPLATE = "chatml"
# Names render_chat binds itself (its `template` parameter, the variables it sets from the request's own
# fields): a request's extra template variables (chat_template_kwargs) may not set them.
RESERVED_VARIABLES = frozenset({"template", "messages", "add_generation_prompt", "bos_token", "eos_token"})


class ChatTemplateError(ValueError):
    """The template failed to render these messages (e.g. its own `raise_exception`)."""


def resolve_template(name_or_file: str | None, model_template: str | None) -> str:
    """The template text: a built-in name, a file's contents, else the model's own, else chatml."""
    if name_or_file:
        if name_or_file in BUILTIN_TEMPLATES:
            return BUILTIN_TEMPLATES[name_or_file]
        if "{{" in name_or_file or "{%" in name_or_file:  # the template itself (llama-server's --chat-template)
            return name_or_file
        path = Path(name_or_file).expanduser()
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            try:  # a tokenizer_config.json-style file is accepted too
                data = json.loads(text)
                if isinstance(data, dict) and isinstance(data.get("chat_template"), str):
                    return data["chat_template"]
            except json.JSONDecodeError:
                pass
            return text
        raise ValueError(
            f"--chat-template {name_or_file!r} is neither a built-in template "
            f"({', '.join(BUILTIN_TEMPLATES)}) nor a readable file"
        )
    return model_template if model_template else BUILTIN_TEMPLATES[DEFAULT_TEMPLATE]


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers in some templates): renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _body(caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(text: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(text)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from e


def render_chat(
    template: str,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs: Any,
) -> str:
    """The prompt text for `messages`, as transformers' `apply_chat_template(..., tokenize=False)` gives it."""
    variables = {"tools": None, "documents": None, **kwargs}
    try:
        return compile_template(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
            **variables,
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template refused these messages: {e}") from e
    except (TypeError, KeyError, IndexError, AttributeError) as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e


def encode_prompt(tokenizer: Any, info: Any, text: str, limit: int | None = None) -> list[int]:
    """Token ids of a rendered chat: the template's own special tokens as written, BOS added only when the
    tokenizer adds one and the template did not already write it. With `limit` (the context length), a
    text of that many tokens or more is refused (`BadRequest`), without tokenizing it where its length
    proves it (serve/frontends/tokenizing.py)."""
    if limit is None:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
    else:
        ids = encode_text(tokenizer, text, False, limit)
    if info.add_bos and info.bos_id is not None and not (info.bos_token and text.startswith(info.bos_token)):
        ids = [info.bos_id] + ids
    return ids
