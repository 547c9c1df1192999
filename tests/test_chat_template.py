"""serve/chat_template.py: HF apply_chat_template semantics, built-ins, template choice, BOS handling."""

import json

import pytest

from serve.frontends.chat_template import (
    BUILTIN_TEMPLATES,
    ChatTemplateError,
    encode_prompt,
    render_chat,
    resolve_template,
)
from tests.tiny import char_tokenizer

# SmolLM2-135M-Instruct's template, as its GGUF stores it (the slow test checks that it still does)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
    "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Exercises trim_blocks / lstrip_blocks, namespace, loop controls, tojson, raise_exception, strftime_now
FANCY = """{%- set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}
    {% if m['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    [{{ ns.n }}] {{ m['role'] }}: {{ m['content'] | trim }}
{% endfor %}
{{ {'k': '<é>', 'a': [1, 2]} | tojson }}
{{ tools | tojson }}
{%- if add_generation_prompt %}>{{ strftime_now('%Y') | length }}{% endif %}"""

CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "  Où est Paris?  "},
    ],
]

EXPECTED = {  # chat CHATS[1], add_generation_prompt=True, bos "<s>", eos "</s>"
    "chatml": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    "Hello!<|im_end|>\n<|im_start|>user\n  Où est Paris?  <|im_end|>\n<|im_start|>assistant\n",
    "llama2": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Où est Paris? [/INST]",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
    "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nOù est Paris?<|eot_id|><|start_header_id|>assistant"
    "<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST]Hello!</s>[INST]   Où est Paris?   [/INST]",
    "vicuna": "Be brief. USER: Hi ASSISTANT: Hello!</s>USER:   Où est Paris?   ASSISTANT:",
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import PreTrainedTokenizerFast

    tok, _ = char_tokenizer()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def hf_render(hf_tokenizer, template, messages, add_generation_prompt=True, **kw):
    return hf_tokenizer.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **kw
    )


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
def test_builtin_renders_the_expected_string(name):
    assert render_chat(BUILTIN_TEMPLATES[name], CHATS[1], True, "<s>", "</s>") == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(BUILTIN_TEMPLATES))
@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("gen", [True, False])
def test_builtin_equals_hf(hf_tokenizer, name, chat, gen):
    ours = render_chat(BUILTIN_TEMPLATES[name], CHATS[chat], gen, "<s>", "</s>")
    assert ours == hf_render(hf_tokenizer, BUILTIN_TEMPLATES[name], CHATS[chat], gen)


@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("gen", [True, False])
def test_smollm2_template_equals_hf(hf_tokenizer, chat, gen):
    ours = render_chat(SMOLLM2, CHATS[chat], gen, "<s>", "</s>")
    assert ours == hf_render(hf_tokenizer, SMOLLM2, CHATS[chat], gen)
    assert ours.startswith("<|im_start|>system\n")


def test_jinja_features_equal_hf(hf_tokenizer):
    tools = [{"type": "function", "function": {"name": "f", "description": "<b>é</b>"}}]
    ours = render_chat(FANCY, CHATS[1], True, "<s>", "</s>", tools=tools)
    assert ours == hf_render(hf_tokenizer, FANCY, CHATS[1], tools=tools)
    assert '{"k": "<é>", "a": [1, 2]}' in ours and ours.endswith(">4")
    assert ours.startswith("    [1] user: Hi\n    [2] assistant: Hello!\n    [3] user: Où est Paris?\n{")


def test_template_errors_are_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="no tools here"):
        render_chat(FANCY, [{"role": "tool", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="alternate"):
        render_chat(BUILTIN_TEMPLATES["llama2"], [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render_chat("{% for %}", CHATS[0])
    with pytest.raises(ChatTemplateError, match="sandbox|unsafe|access"):
        render_chat("{{ messages.__class__.__mro__ }}", CHATS[0])


def test_resolve_template(tmp_path):
    assert resolve_template(None, None) == BUILTIN_TEMPLATES["chatml"]
    assert resolve_template(None, "{{ 'own' }}") == "{{ 'own' }}"
    assert resolve_template("llama3", "{{ 'own' }}") == BUILTIN_TEMPLATES["llama3"]
    (tmp_path / "t.jinja").write_text("{{ 'file' }}")
    assert resolve_template(str(tmp_path / "t.jinja"), None) == "{{ 'file' }}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'json' }}"}))
    assert resolve_template(str(tmp_path / "tokenizer_config.json"), None) == "{{ 'json' }}"
    with pytest.raises(ValueError, match="chatml, llama2"):
        resolve_template("nonesuch", None)


def test_encode_prompt_adds_bos_once():
    tok, info = char_tokenizer()
    text = "<s>hi"  # the char tokenizer knows <s> as a special token
    assert encode_prompt(tok, info, text) == tok.encode(text, add_special_tokens=False).ids  # add_bos is False
    info.add_bos = True
    assert encode_prompt(tok, info, text) == tok.encode(text, add_special_tokens=False).ids
    assert encode_prompt(tok, info, "hi") == [info.bos_id] + tok.encode("hi", add_special_tokens=False).ids


@pytest.mark.slow
def test_smollm2_gguf_template_equals_hf(smollm2_path):
    import transformers

    from models.gguf_tokenizer import tokenizer_from_gguf

    tok, info = tokenizer_from_gguf(smollm2_path)
    assert info.chat_template == SMOLLM2
    hf = transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    for chat in CHATS:
        ours = render_chat(resolve_template(None, info.chat_template), chat, True, info.bos_token, info.eos_token)
        assert ours == hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = hf.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        assert encode_prompt(tok, info, ours) == list(ids)
