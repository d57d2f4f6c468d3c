"""Parity with an independent implementation: Hugging Face transformers loading the same GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.prompts import CHAT_PARITY_PROMPTS
from engine_build.build import BuildRequest, build_engine
from engine_build.model import NemotronModel
from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository
from service.runtime.factory import open_runtime
from service.runtime.interface import GenerationRequest
from service.runtime.options import RequestOptions
from service.runtime.sizing import RuntimeOptions
from service.runtime.tokenizer import ChatMessage, ChatTemplate, TextTokenizer
from tests.service.runtime.conftest import collect, run_with_runtime, tokens_of
from tests.service.server.http_in_process import MODEL, http_in_process

pytestmark = pytest.mark.slow

PROMPTS = CHAT_PARITY_PROMPTS  # bench/prompts.py: the GPU check uses the same set

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
def fp32_engine(embedded_checkpoint, tmp_path_factory) -> Path:
    """The whole stack's engine: fp32, built from the import."""
    build = BuildRequest(embedded_checkpoint, load_profiles().get("cpu"), precision="fp32")
    repository = EngineRepository(tmp_path_factory.mktemp("repo"))
    return build_engine(build, repository).entry.directory


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
def test_greedy_continuations_of_32_tokens_are_identical(reference, prompts, fp32_engine):
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
    engine = fp32_engine

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


# (context, continuation) as lm-evaluation-harness scores multiple-choice answers.
SCORED = (
    ("Question: What is the capital of France?\nAnswer:", " Paris"),
    ("Question: What is the capital of France?\nAnswer:", " Berlin"),
    ("The largest planet in the solar system is", " Jupiter, a gas giant."),
    ("def add(a, b):\n    return", " a + b"),
    ("Water freezes at", " 0 degrees Celsius."),
    # The model's next token here is its end of text: the stop token must still be listed, or
    # lm-eval's [ctxlen:-1] would cut the continuation's last token instead.
    ("Question: What is the square root of 81?\nAnswer:", " 9"),
)


@torch.inference_mode()
def test_prompt_logprobs_through_http_match_transformers_within_1e_3(
    reference, fp32_engine, embedded_checkpoint
):
    """What lm-eval's local-completions sends for a loglikelihood: token ids, echo, logprobs."""
    openai = pytest.importorskip("openai")
    model, _ = reference
    tokenizer = TextTokenizer(embedded_checkpoint)
    runtime = open_runtime(fp32_engine, RuntimeOptions(kv_cache_bytes=100_000_000))
    with http_in_process(runtime) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0)
        for context, continuation in SCORED:
            context_ids = tokenizer.encode(context)  # encoded apart, as lm-eval does
            ids = context_ids + tokenizer.encode(continuation)
            answer = client.completions.create(
                model=MODEL, prompt=ids, max_tokens=1, logprobs=1, echo=True, temperature=0
            )
            logprobs = answer.choices[0].logprobs
            assert len(logprobs.token_logprobs) == len(ids) + 1  # the prompt and one token
            assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
            got = torch.tensor(logprobs.token_logprobs[len(context_ids) : -1])
            expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            rows = torch.arange(len(context_ids) - 1, len(ids) - 1)
            wanted = expected[rows, torch.tensor(ids[len(context_ids) :])]
            assert (got - wanted).abs().max().item() < 1e-3, (context, continuation)
            assert answer.usage.prompt_tokens == len(ids)
