"""Tokenizer wrapper, sandboxed chat templates and incremental detokenization."""

from __future__ import annotations

import json

import pytest

from service.runtime.tokenizer import (
    ChatMessage,
    ChatTemplate,
    IncrementalDetokenizer,
    TextTokenizer,
    TokenizerError,
)


def test_chat_template_cannot_reach_python_internals():
    template = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TokenizerError, match="failed to render"):
        template.render([ChatMessage("user", "hi")])


def test_chat_template_cannot_mutate_its_inputs():
    template = ChatTemplate("{% set _ = messages.append(1) %}{{ messages | length }}")
    with pytest.raises(TokenizerError, match="failed to render"):
        template.render([ChatMessage("user", "hi")])


def test_raise_exception_in_a_template_becomes_a_clear_error():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(TokenizerError, match="roles must alternate"):
        template.render([ChatMessage("user", "hi")])


def test_a_template_that_does_not_compile_is_refused():
    with pytest.raises(TokenizerError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")


def test_unknown_roles_are_refused_with_the_allowed_ones():
    with pytest.raises(
        TokenizerError,
        match=r"role 'robot' is not one of \['system', 'user', 'assistant', 'tool'\]",
    ):
        ChatMessage("robot", "beep")


def test_tojson_keeps_non_ascii_text():
    template = ChatTemplate("{{ tools | tojson }}")
    assert template.render([], tools=[{"name": "météo"}]) == '[{"name": "météo"}]'


def test_missing_tokenizer_files_are_named(tmp_path):
    with pytest.raises(TokenizerError, match=r"missing tokenizer\.json"):
        TextTokenizer(tmp_path)


@pytest.mark.slow
def test_incremental_detokenizer_never_emits_half_a_character(embedded_checkpoint):
    tokenizer = TextTokenizer(embedded_checkpoint)
    text = "Emoji 👨‍👩‍👧‍👦🇫🇷 and 中文字符, done."
    ids = tokenizer.encode(text)
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(i) for i in ids]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas  # some tokens were held back until their character completed


LLAMA3_TEMPLATE = (
    "{{- bos_token }}{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _tiny_tokenizer_dir(tmp_path, template: str):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<|begin_of_text|>", "<|eot_id|>", "hi", "there", "[UNK]"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {
        "chat_template": template,
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_templates_see_the_special_tokens_like_transformers_passes_them(tmp_path):
    tokenizer = TextTokenizer(_tiny_tokenizer_dir(tmp_path, LLAMA3_TEMPLATE))
    prompt = tokenizer.chat_prompt([ChatMessage("user", "  hi  ")])
    assert prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi")
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@pytest.mark.parametrize("body", ["{{ 1 / 0 }}", "{{ 1 + 'a' }}", "{{ range(10**9) | list }}"])
def test_template_runtime_failures_become_tokenizer_errors(body):
    with pytest.raises(TokenizerError, match="failed to render"):
        ChatTemplate(body).render([ChatMessage("user", "hi")])


def test_a_malformed_tokenizer_json_is_a_tokenizer_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{broken")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="unreadable tokenizer files"):
        TextTokenizer(tmp_path)


@pytest.mark.slow
def test_detokenizer_flush_returns_held_back_text(embedded_checkpoint):
    tokenizer = TextTokenizer(embedded_checkpoint)
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push(ids[0]) == ""
    assert detokenizer.flush() == "\ufffd"  # half an emoji: shown, not silently dropped
    assert detokenizer.flush() == ""
