"""Small realistic chat templates (Llama 3 and ChatML) and a byte tokenizer that renders them."""

from __future__ import annotations

import json
from pathlib import Path

from engine_build.synthetic import write_byte_tokenizer
from service.runtime.tokenizer import TextTokenizer

BOS = "<|begin_of_text|>"
EOS_BYTE = 0  # the byte tokenizer's eos id (never written by the scripted replies)

_LLAMA3_TURNS = (
    "{{- bos_token }}"
    "{% for m in messages %}"
    "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
)
_LLAMA3_ANSWER = "<|start_header_id|>assistant<|end_header_id|>\n\n"

# Llama-3.3-Nemotron-Super-49B-v1: the system prompt is only the switch.
NEMOTRON_V1_TEMPLATE = (
    "{#- The system prompt is 'detailed thinking on' or 'detailed thinking off'. #}"
    + _LLAMA3_TURNS
    + "{% if add_generation_prompt %}"
    + _LLAMA3_ANSWER
    + "{% endif %}"
)

# Llama-3.3-Nemotron-Super-49B-v1.5: with /no_think the answer starts after an empty think block.
NEMOTRON_V1_5_TEMPLATE = (
    "{%- set system = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
    + _LLAMA3_TURNS
    + "{% if add_generation_prompt %}"
    + _LLAMA3_ANSWER
    + "{% if '/no_think' in system %}<think>\n\n</think>\n\n{% endif %}"
    + "{% endif %}"
)

# A ChatML model without a reasoning switch (like the embedded SmolLM2) that lists tools itself.
CHATML_TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>tools\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(directory: Path, chat_template: str) -> TextTokenizer:
    """A real byte-level tokenizer (one token per UTF-8 byte) with `chat_template`."""
    directory.mkdir(parents=True, exist_ok=True)
    write_byte_tokenizer(directory, eos_id=EOS_BYTE)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config |= {"chat_template": chat_template, "bos_token": BOS}
    config_file.write_text(json.dumps(config))
    return TextTokenizer(directory)
