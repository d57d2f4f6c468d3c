"""Parity with an independent implementation: Hugging Face transformers loading the same GGUF."""

from __future__ import annotations

import pytest
import torch

from engine_build.build import BuildRequest, build_engine
from engine_build.model import NemotronModel
from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository
from service.runtime.interface import GenerationRequest
from service.runtime.options import RequestOptions
from service.runtime.tokenizer import ChatMessage, ChatTemplate, TextTokenizer
from tests.service.runtime.conftest import collect, run_with_runtime, tokens_of

pytestmark = pytest.mark.slow

PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Explain photosynthesis to a ten-year-old.",
    "List three prime numbers greater than 100.",
    "Translate 'good morning' into German and Spanish.",
    "Why is the sky blue? Answer in one sentence.",
)

MULTILINGUAL = (
    "The quick brown fox jumps over the lazy dog. 1234567890",
    "Größenwahn, naïve café, façade — déjà vu!",
    "Привет, мир! Как дела?",
    "東京は日本の首都です。中文也可以。",
    "مرحبا بالعالم",
    "emoji: 🙂🚀👨‍👩‍👧‍👦 🇫🇷 ❤️",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }  // C\n\t\ttabs  and   spaces',
    "<|im_start|>user\nhi<|im_end|>\n",
)


@pytest.fixture(scope="module")
def reference(embedded_gguf):
    transformers = pytest.importorskip("transformers")
    kwargs = {"gguf_file": embedded_gguf.name}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        embedded_gguf.parent, dtype=torch.float32, **kwargs
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(embedded_gguf.parent, **kwargs)
    return model, tokenizer


@pytest.fixture(scope="module")
def ours(embedded_checkpoint) -> NemotronModel:
    return NemotronModel.from_checkpoint(embedded_checkpoint, dtype=torch.float32)


@pytest.fixture(scope="module")
def prompts(embedded_checkpoint) -> list[list[int]]:
    tokenizer = TextTokenizer(embedded_checkpoint)
    return [tokenizer.render_chat([ChatMessage("user", text)]) for text in PROMPTS]


@torch.inference_mode()
def test_logits_match_transformers_within_1e_3_on_every_prompt(reference, ours, prompts):
    model, _ = reference
    for text, prompt in zip(PROMPTS, prompts, strict=True):
        ids = torch.tensor([prompt])
        expected = model(ids).logits[0]
        actual = ours(ids)[0]
        assert (actual - expected).abs().max().item() < 1e-3, text


@torch.inference_mode()
def test_greedy_continuations_of_32_tokens_are_identical(
    reference, prompts, embedded_checkpoint, tmp_path
):
    model, _ = reference
    expected = []
    for prompt in prompts:
        # 32 greedy steps past any end of turn. The loop is ours (transformers' generate insists
        # on stopping at EOS); forward and KV cache are theirs.
        tokens, past, step = [], None, torch.tensor([prompt])
        for _ in range(32):
            out = model(input_ids=step, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            step = torch.tensor([[tokens[-1]]])
        expected.append(tokens)
    # Ours: the whole stack, an fp32 engine built from the import, served by the runtime.
    build = BuildRequest(embedded_checkpoint, load_profiles().get("cpu"), precision="fp32")
    engine = build_engine(build, EngineRepository(tmp_path / "repo")).entry.directory

    async def body(runtime):
        return [
            tokens_of(
                await collect(
                    runtime,
                    GenerationRequest(
                        f"p{i}", tuple(prompt), RequestOptions(max_new_tokens=32, ignore_eos=True)
                    ),
                )
            )
            for i, prompt in enumerate(prompts)
        ]

    actual = run_with_runtime(engine, body, kv_cache_bytes=100_000_000)
    assert [len(t) for t in expected] == [32] * len(PROMPTS)
    assert actual == expected


def test_tokenizer_ids_match_on_a_multilingual_emoji_and_code_sample(
    reference, embedded_checkpoint
):
    _, hf_tokenizer = reference
    tokenizer = TextTokenizer(embedded_checkpoint)
    for text in MULTILINGUAL:
        expected = hf_tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.encode(text) == expected, text
        assert tokenizer.decode(expected, skip_special_tokens=False) == text


def test_chat_template_renders_like_transformers(reference, embedded_checkpoint):
    _, hf_tokenizer = reference
    tokenizer = TextTokenizer(embedded_checkpoint)
    messages = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi there")]
    expected = hf_tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer.chat_template is not None
    assert tokenizer.chat_template.render(messages) == expected


@torch.inference_mode()
def test_loading_twice_gives_identical_weights(embedded_checkpoint, ours):
    again = NemotronModel.from_checkpoint(embedded_checkpoint)
    assert torch.equal(
        again.layers[3].parts["attention"].body.qkv.weight,
        ours.layers[3].parts["attention"].body.qkv.weight,
    )


WHITESPACE_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
    {%- if message['role'] == 'system' %}
        <<SYS>>{{ message['content'] | trim }}<</SYS>>
    {%- else %}
  [{{ message['role'] | upper }}] {{ message['content'] }}{{ eos_token }}
    {% endif %}
{%- endfor %}
{%- if add_generation_prompt %}[ASSISTANT]{% endif %}"""


def test_whitespace_control_and_special_tokens_render_like_transformers(
    reference, embedded_checkpoint
):
    _, hf_tokenizer = reference
    tokenizer = TextTokenizer(embedded_checkpoint)
    messages = [ChatMessage("system", "  Be brief. "), ChatMessage("user", "Hi\nthere")]
    expected = hf_tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        chat_template=WHITESPACE_TEMPLATE,
        tokenize=False,
        add_generation_prompt=True,
    )
    tokenizer.chat_template = ChatTemplate(WHITESPACE_TEMPLATE)
    assert tokenizer.chat_prompt(messages) == expected
    assert expected.count("<|im_end|>") == 1  # eos_token really reached the template
