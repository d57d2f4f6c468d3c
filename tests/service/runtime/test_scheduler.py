"""The scheduler: chunked prefill beside decoding, and prefix blocks reused and counted."""

from __future__ import annotations

from service.runtime.block_pool import BlockPool
from service.runtime.interface import GenerationRequest
from service.runtime.kv_manager import KVCacheManager
from service.runtime.options import RequestOptions
from service.runtime.scheduler import Scheduler
from service.runtime.sequence import Sequence


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


def test_a_prompt_being_scored_is_computed_in_chunks_of_bounded_logits():
    from service.runtime.scheduler import SCORED_PROMPT_CHUNK

    scheduler = Scheduler(KVCacheManager(BlockPool(256, 16)), max_batch_size=4, max_num_tokens=2048)
    options = RequestOptions(max_new_tokens=2, prompt_logprobs=0)
    scored = Sequence(GenerationRequest("scored", tuple(range(1, 1301)), options), 0.0)
    scheduler.add(scored)
    chunks = []
    while scored.num_computed < scored.num_prompt:
        ((seq, count),) = scheduler.schedule().items
        chunks.append(count)
        scheduler.computed(seq, count)
    assert chunks == [SCORED_PROMPT_CHUNK, SCORED_PROMPT_CHUNK, 1300 - 2 * SCORED_PROMPT_CHUNK]
    other_prompt = tuple(range(2, 1302))  # not the scored one's: no prefix-cache hit
    plain = Sequence(GenerationRequest("plain", other_prompt, RequestOptions()), 0.0)
    scheduler.add(plain)
    ((_, count),) = [item for item in scheduler.schedule().items if item[0] is plain]
    assert count == 1300  # only scored prompts are held to the bound
