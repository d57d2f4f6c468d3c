"""Runtime parts in isolation: stop strings across tokens, sampling filters, the scheduler."""

from __future__ import annotations

import pytest
import torch

from engine_build.synthetic import write_byte_tokenizer
from service.runtime.block_pool import BlockPool, block_hashes
from service.runtime.interface import GenerationRequest
from service.runtime.kv_manager import KVCacheManager
from service.runtime.options import RequestOptions, SamplingParams
from service.runtime.sampler import SampleInput, sample_batch
from service.runtime.scheduler import Scheduler
from service.runtime.sequence import Sequence
from service.runtime.text import StopTextStream
from service.runtime.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> TextTokenizer:
    directory = tmp_path_factory.mktemp("bytes")
    write_byte_tokenizer(directory, eos_id=2)
    return TextTokenizer(directory)


def _stream(tokenizer, text, stops):
    stream, emitted = StopTextStream(tokenizer, stops), []
    for token in tokenizer.encode(text):
        update = stream.push(token)
        emitted.append(update.text)
        if update.stopped:
            return emitted, True
    emitted.append(stream.finish().text)
    return emitted, False


def test_a_stop_string_spanning_tokens_is_cut_and_never_emitted(byte_tokenizer):
    emitted, stopped = _stream(byte_tokenizer, "hello world, more", ["lo w"])
    assert stopped and "".join(emitted) == "hel"


def test_text_without_stop_strings_streams_whole(byte_tokenizer):
    emitted, stopped = _stream(byte_tokenizer, "naïve 🙂 café", [])
    assert not stopped and "".join(emitted) == "naïve 🙂 café"
    assert all("\ufffd" not in text for text in emitted)  # multi-byte characters arrive whole


def test_a_prefix_of_a_stop_string_that_does_not_complete_is_released(byte_tokenizer):
    emitted, stopped = _stream(byte_tokenizer, "abc ab abd", ["abz"])
    assert not stopped and "".join(emitted) == "abc ab abd"


def _row(**params) -> SampleInput:
    return SampleInput(SamplingParams(**params), prompt_ids=(), output_ids=())


def _draws(logits, count=300, **params):
    rng = torch.Generator().manual_seed(0)
    rows = [_row(**params)] * count
    return {token for token, _ in sample_batch(logits.expand(count, -1), rows, rng)}


PROBS = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))


def test_top_k_top_p_and_min_p_each_restrict_the_choices():
    assert _draws(PROBS, temperature=1.0) == {0, 1, 2, 3}
    assert _draws(PROBS, temperature=1.0, top_k=2) == {0, 1}
    assert _draws(PROBS, temperature=1.0, top_p=0.7) == {0, 1}
    assert _draws(PROBS, temperature=1.0, min_p=0.25) == {0, 1, 2}  # 0.15 >= 0.25 * 0.5


def test_penalties_steer_away_from_repeated_tokens():
    logits = torch.tensor([[2.0, 1.9, 0.0, -1.0]])
    rng = torch.Generator()
    plain = SampleInput(SamplingParams(), prompt_ids=(), output_ids=(0, 0))
    repeat = SampleInput(SamplingParams(repetition_penalty=1.5), prompt_ids=(0,), output_ids=())
    frequency = SampleInput(SamplingParams(frequency_penalty=0.1), prompt_ids=(), output_ids=(0, 0))
    presence = SampleInput(SamplingParams(presence_penalty=0.2), prompt_ids=(), output_ids=(0,))
    chosen = [
        t for t, _ in sample_batch(logits.expand(4, -1), [plain, repeat, frequency, presence], rng)
    ]
    assert chosen == [0, 1, 1, 1]


def test_seeded_rows_do_not_depend_on_their_neighbours():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1))
    seeded = SampleInput(SamplingParams(temperature=1.0, seed=42), (), (5, 6, 7))
    alone = sample_batch(logits[:1], [seeded], torch.Generator().manual_seed(0))
    noise = [_row(temperature=1.0)] * 5
    busy = torch.cat([logits[1:4], logits[:1], logits[4:]])  # the seeded row in 4th place
    mixed = sample_batch(busy, [*noise[:3], seeded, *noise[3:]], torch.Generator().manual_seed(123))
    assert mixed[3] == alone[0]


def _seq(name: str, prompt: int, new: int = 4) -> Sequence:
    return Sequence(
        GenerationRequest(name, tuple(range(1, prompt + 1)), RequestOptions(max_new_tokens=new)),
        0.0,
    )


def test_a_long_prompt_is_chunked_and_never_stalls_a_decoding_sequence():
    scheduler = Scheduler(KVCacheManager(BlockPool(64, 16)), max_batch_size=8, max_num_tokens=64)
    short = _seq("short", 5)
    scheduler.add(short)
    first = scheduler.schedule()
    scheduler.computed(short, 5)
    short.token_ids.append(9)  # it sampled a token: now it decodes
    scheduler.add(_seq("long", 300))
    chunks = []
    for _ in range(5):
        step = scheduler.schedule()
        counts = {seq.request.request_id: n for seq, n in step.items}
        assert counts["short"] == 1  # one decode token every step
        assert step.num_tokens <= 64
        chunks.append(counts.get("long", 0))
        for seq, n in step.items:
            scheduler.computed(seq, n)
        short.token_ids.append(9)
    assert first.items[0][1] == 5
    assert chunks == [63, 63, 63, 63, 48]


def test_shared_prefix_blocks_are_reused_and_counted():
    kv = KVCacheManager(BlockPool(32, 4))
    scheduler = Scheduler(kv, max_batch_size=4, max_num_tokens=64)
    first = _seq("a", 13)
    scheduler.add(first)
    scheduler.schedule()
    scheduler.computed(first, 13)
    scheduler.finish(first, reason=None)  # type: ignore[arg-type]
    second = _seq("b", 13)
    scheduler.add(second)
    step = scheduler.schedule()
    assert step.items[0][1] == 1  # 12 of 13 tokens came from the cache
    assert second.cached_prompt_tokens == 12
    assert (kv.prefix_queries, kv.prefix_hits) == (26, 12)


def test_block_hashes_chain_over_the_prefix():
    assert block_hashes([1, 2, 3, 4, 5], 2)[1] != block_hashes([9, 9, 3, 4], 2)[1]
    assert block_hashes([1, 2, 3, 4], 2) == block_hashes([1, 2, 3, 4, 7], 2)


def test_the_repetition_penalty_lowers_seen_tokens_whatever_their_sign():
    row = SampleInput(SamplingParams(repetition_penalty=2.0), prompt_ids=(0,), output_ids=())
    positive = torch.tensor([[1.0, 0.6, -3.0]])  # token 0 seen: 1.0 / 2 = 0.5 < 0.6
    negative = torch.tensor([[-1.0, -1.5, -3.0]])  # token 0 seen: -1.0 * 2 = -2.0 < -1.5
    assert sample_batch(positive, [row], torch.Generator())[0][0] == 1
    assert sample_batch(negative, [row], torch.Generator())[0][0] == 1


def test_frequency_and_presence_penalties_count_generated_tokens_only():
    logits = torch.tensor([[1.0, 0.9]])
    in_prompt = SampleInput(
        SamplingParams(frequency_penalty=2.0, presence_penalty=2.0),
        prompt_ids=(0, 0, 0),
        output_ids=(),
    )
    generated = SampleInput(SamplingParams(frequency_penalty=2.0), prompt_ids=(), output_ids=(0,))
    assert sample_batch(logits, [in_prompt], torch.Generator())[0][0] == 0
    assert sample_batch(logits, [generated], torch.Generator())[0][0] == 1


def test_temperature_changes_the_distribution_sampled_from():
    logits = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    cold = _draws(logits, temperature=0.05)
    hot = _draws(logits, temperature=50.0)
    assert cold == {0}
    assert hot == {0, 1, 2, 3}


def test_logprobs_describe_the_raw_distribution_before_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    row = SampleInput(SamplingParams(temperature=5.0, seed=3), (), (), logprobs=1)
    token, logprob = sample_batch(logits, [row], torch.Generator())[0]
    expected = torch.log_softmax(logits[0], -1)
    assert logprob.logprob == pytest.approx(float(expected[token]))
    assert logprob.top[0][0] == 0 and logprob.top[0][1] == pytest.approx(float(expected[0]))
