"""The PyTorch runtime under load, on a synthetic engine: batching, sampling, aborts, memory."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace

import pytest

from engine_build.graph import ModelGraph
from service.runtime.interface import (
    IN_FLIGHT,
    FinishReason,
    GenerationRequest,
    OverloadedError,
    RequestError,
)
from service.runtime.options import RequestOptions, SamplingParams
from tests.service.runtime.conftest import collect, run_with_runtime, tokens_of, wait_until


def _requests(count: int, seed: int = 0, **kwargs) -> list[GenerationRequest]:
    """Mixed prompt (1-120) and output (1-40) lengths, unless `kwargs` fixes them."""
    rng = random.Random(seed)
    return [
        GenerationRequest(
            f"r{i}",
            tuple(rng.randrange(3, 256) for _ in range(rng.randint(1, 120))),
            RequestOptions(**{"max_new_tokens": rng.randint(1, 40), **kwargs}),
        )
        for i in range(count)
    ]


def test_100_concurrent_greedy_requests_give_the_tokens_each_gives_alone(synthetic_engine):
    requests = _requests(100, ignore_eos=True)

    async def body(runtime):
        alone = [tokens_of(await collect(runtime, r)) for r in requests]
        together = await asyncio.gather(*(collect(runtime, r) for r in requests))
        return alone, [tokens_of(events) for events in together], runtime.stats()

    alone, together, stats = run_with_runtime(synthetic_engine, body)
    assert [len(t) for t in alone] == [r.options.max_new_tokens for r in requests]
    assert together == alone
    assert stats.kv_blocks_used == 0  # everything released


def test_a_seeded_sampled_request_is_reproducible_inside_a_busy_batch(synthetic_engine):
    sampling = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    probe = GenerationRequest(
        "probe", (10, 20, 30, 40), RequestOptions(sampling, max_new_tokens=30, ignore_eos=True)
    )
    noise = _requests(30, seed=7, ignore_eos=True)

    async def body(runtime):
        alone = tokens_of(await collect(runtime, probe))
        results = await asyncio.gather(  # the probe joins in the middle of the batch
            *(collect(runtime, r) for r in noise[:15]),
            collect(runtime, probe),
            *(collect(runtime, r) for r in noise[15:]),
        )
        other_seed = GenerationRequest(
            "other",
            probe.prompt_ids,
            RequestOptions(
                SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99),
                max_new_tokens=30,
                ignore_eos=True,
            ),
        )
        return alone, tokens_of(results[15]), tokens_of(await collect(runtime, other_seed))

    alone, busy, other = run_with_runtime(synthetic_engine, body)
    assert busy == alone
    assert other != alone


async def _blocks_after_abort(runtime, stop):
    request = GenerationRequest(
        "long", (5,) * 100, RequestOptions(max_new_tokens=300, ignore_eos=True)
    )
    stream = runtime.generate(request)
    seen = 0
    async for _event in stream:
        seen += 1
        if seen == 5:
            break
    used_while_running = runtime.stats().kv_blocks_used
    await stop(stream)
    # Read after the abort is posted: at most the step already running may finish before it.
    steps_at_abort = runtime.stats().steps
    await wait_until(lambda: runtime.stats().kv_blocks_used == 0, "freeing the blocks")
    return used_while_running, runtime.stats().steps - steps_at_abort


def test_abort_mid_stream_frees_kv_blocks_within_one_step(synthetic_engine):
    async def body(runtime):
        async def stop(stream):
            assert runtime.abort("long")
            await stream.aclose()

        return await _blocks_after_abort(runtime, stop)

    used, steps = run_with_runtime(synthetic_engine, body)
    assert used > 0
    assert steps <= 1


def test_a_client_that_goes_away_frees_its_blocks(synthetic_engine):
    async def body(runtime):
        async def stop(stream):
            await stream.aclose()  # the consumer disappears without calling abort

        return await _blocks_after_abort(runtime, stop)

    used, steps = run_with_runtime(synthetic_engine, body)
    assert used > 0 and steps <= 1


def test_a_deadline_ends_the_request_and_frees_its_blocks(synthetic_engine):
    async def body(runtime):
        request = GenerationRequest(
            "late",
            (7,) * 50,
            RequestOptions(max_new_tokens=970, ignore_eos=True, deadline=time.monotonic() + 0.1),
        )
        events = await collect(runtime, request)
        return events[-1], runtime.stats()

    last, stats = run_with_runtime(synthetic_engine, body)
    assert last.finish_reason is FinishReason.DEADLINE
    assert last.usage is not None and 0 < last.usage.completion_tokens < 970
    assert stats.kv_blocks_used == 0


def test_kv_exhaustion_queues_and_preempts_and_every_request_completes(synthetic_engine):
    requests = _requests(50, seed=3, ignore_eos=True, max_new_tokens=60)

    async def body(runtime):
        results = await asyncio.wait_for(
            asyncio.gather(*(collect(runtime, r) for r in requests)), timeout=300
        )
        return results, runtime.stats()

    # 24 blocks x 16 tokens = 384 tokens of KV for 50 requests of up to 180 tokens each.
    results, stats = run_with_runtime(synthetic_engine, body, kv_cache_bytes=24 * 16 * 1152)
    assert stats.kv_blocks_total == 24
    assert all(events[-1].finish_reason is FinishReason.LENGTH for events in results)
    assert all(len(tokens_of(events)) == 60 for events in results)
    assert stats.preemptions > 0
    assert stats.kv_blocks_used == 0


def test_beyond_the_queue_bound_requests_get_the_overload_error(synthetic_engine):
    async def body(runtime):
        busy = runtime.generate(
            GenerationRequest("busy", (3,), RequestOptions(max_new_tokens=900, ignore_eos=True))
        )
        await busy.__anext__()  # running: with a batch of one, everything else waits
        streams = [runtime.generate(r) for r in _requests(4, max_new_tokens=5)]
        with pytest.raises(OverloadedError, match=r"requests are waiting \(limit 4\); retry later"):
            runtime.generate(
                GenerationRequest("one-too-many", (3, 4), RequestOptions(max_new_tokens=2))
            )
        await busy.aclose()
        for stream in streams:
            async for _ in stream:
                pass
        return runtime.stats()

    stats = run_with_runtime(synthetic_engine, body, max_waiting=4, max_batch_size=1)
    assert stats.kv_blocks_used == 0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sampling": SamplingParams(top_p=0.0)}, r"top_p 0.0 is outside \(0.0, 1.0\]"),
        ({"sampling": SamplingParams(top_p=7.0)}, r"top_p 7.0 is outside \(0.0, 1.0\]"),
        ({"max_new_tokens": -1}, r"max_new_tokens -1 is outside \[1, 1021\]"),
        ({"max_new_tokens": 10**9}, r"max_new_tokens 1000000000 is outside \[1, 1021\]"),
        ({"prompt_ids": (1,) * 1024}, "prompt has 1024 tokens; allowed: 1 to 1023"),
        ({"prompt_ids": ()}, "prompt has 0 tokens; allowed: 1 to 1023"),
        ({"prompt_ids": (1, 256)}, r"prompt token id 256 is outside \[0, 256\)"),
        ({"stop_token_ids": (99999,)}, r"stop token id 99999 is outside \[0, 256\)"),
        ({"sampling": SamplingParams(temperature=-1)}, r"temperature -1 is outside \[0.0, 100.0\]"),
        ({"sampling": SamplingParams(top_k=-3)}, r"top_k -3 is outside \[0, 256\]"),
        ({"sampling": SamplingParams(seed=-1)}, r"seed -1 is outside \[0, 2\*\*64\)"),
        ({"logprobs": 50}, r"logprobs 50 is outside \[0, 20\]"),
    ],
)
def test_bad_parameters_are_typed_errors_with_the_allowed_range(synthetic_engine, changes, message):
    fields = {"request_id": "bad", "prompt_ids": (1, 2, 3), "max_new_tokens": 5, **changes}
    request = GenerationRequest(
        fields.pop("request_id"),
        fields.pop("prompt_ids"),
        RequestOptions(**fields),
    )

    async def body(runtime):
        with pytest.raises(RequestError, match=message):
            runtime.generate(request)
        return runtime.stats()

    assert run_with_runtime(synthetic_engine, body).kv_blocks_used == 0


def test_kv_pages_exist_for_attention_layers_only(synthetic_engine):
    async def body(runtime):
        return runtime.core.executor.runner.store, runtime.stats()

    store, stats = run_with_runtime(synthetic_engine, body)
    assert store.num_tensors == 2 * 4  # the synthetic graph has 4 GQA layers out of 8
    assert [store.keys[i].shape[1] for i in sorted(store.keys)] == [2, 1, 4, 2]
    assert stats.kv_bytes_per_token == 2 * (2 + 1 + 4 + 2) * 16 * 4
    assert stats.uniform_kv_bytes_per_token == 8 * 2 * 4 * 16 * 4


def test_the_49b_graph_needs_39_percent_less_kv_than_a_uniform_one(reference_config):
    graph = ModelGraph.from_path(reference_config)
    actual, uniform = graph.kv_bytes_per_token(2), graph.uniform_kv_bytes_per_token(2)
    assert (actual, uniform) == (200_704, 327_680)
    assert round(1 - actual / uniform, 2) == 0.39


def test_logprobs_come_with_the_chosen_token_and_alternatives(synthetic_engine):
    async def body(runtime):
        request = GenerationRequest(
            "lp", (4, 5, 6), RequestOptions(max_new_tokens=3, logprobs=2, ignore_eos=True)
        )
        return await collect(runtime, request)

    events = run_with_runtime(synthetic_engine, body)
    logprobs = [lp for e in events for lp in e.logprobs]
    assert [lp.token_id for lp in logprobs] == tokens_of(events)
    for lp in logprobs:
        assert len(lp.top) == 2 and lp.top[0][1] >= lp.top[1][1]
        assert lp.logprob <= 0 and lp.top[0][0] == lp.token_id  # greedy: the top choice


def test_a_finished_request_reports_usage_and_timings(synthetic_engine):
    async def body(runtime):
        request = GenerationRequest(
            "u", (9,) * 40, RequestOptions(max_new_tokens=7, ignore_eos=True)
        )
        return await collect(runtime, request)

    last = run_with_runtime(synthetic_engine, body)[-1]
    assert last.finish_reason is FinishReason.LENGTH
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        40,
        7,
    )
    assert last.timings is not None
    assert 0 <= last.timings.queue_s <= last.timings.time_to_first_token_s <= last.timings.total_s


@pytest.mark.slow
def test_a_shared_system_prompt_hits_the_prefix_cache_and_cuts_time_to_first_token(
    embedded_checkpoint, tmp_path
):
    from engine_build.build import BuildRequest, build_engine
    from engine_build.profiles import load_profiles
    from engine_build.repository import EngineRepository
    from service.runtime.tokenizer import ChatMessage

    request = BuildRequest(embedded_checkpoint, load_profiles().get("cpu"))
    engine = build_engine(request, EngineRepository(tmp_path / "repo")).entry.directory
    system = "You are a careful assistant. " + " ".join(
        f"Rule {i}: be concise." for i in range(120)
    )

    async def body(runtime):
        results = []
        for name, question in (("first", "What is 2+2?"), ("second", "Name a colour.")):
            messages = [ChatMessage("system", system), ChatMessage("user", question)]
            prompt = tuple(runtime.tokenizer.render_chat(messages))
            events = await collect(
                runtime, GenerationRequest(name, prompt, RequestOptions(max_new_tokens=4))
            )
            results.append(events[-1])
        return results, runtime.stats()

    (first, second), stats = run_with_runtime(engine, body, kv_cache_bytes=200_000_000)
    assert first.usage.prompt_tokens > 900
    assert first.usage.cached_prompt_tokens == 0
    assert second.usage.cached_prompt_tokens >= first.usage.prompt_tokens - 32
    assert stats.prefix_cache_hit_rate > 0.45
    assert second.timings.time_to_first_token_s < first.timings.time_to_first_token_s / 2


def test_greedy_tokens_are_the_argmax_of_a_plain_forward(synthetic_engine):
    import torch

    from engine_build.model import NemotronModel
    from service.runtime.loader import load_rank_model

    prompt = (3, 14, 15, 92, 65)

    async def body(runtime):
        request = GenerationRequest("g", prompt, RequestOptions(max_new_tokens=8, ignore_eos=True))
        return tokens_of(await collect(runtime, request))

    generated = run_with_runtime(synthetic_engine, body)
    model: NemotronModel = load_rank_model(synthetic_engine)
    sequence = list(prompt)
    with torch.inference_mode():
        for _ in range(8):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    assert generated == sequence[len(prompt) :]


def test_a_stop_token_ends_the_request_and_is_not_emitted(synthetic_engine):
    prompt = (3, 14, 15, 92, 65)

    async def body(runtime):
        free = tokens_of(
            await collect(
                runtime,
                GenerationRequest(
                    "free", prompt, RequestOptions(max_new_tokens=8, ignore_eos=True)
                ),
            )
        )
        stop = free[3]
        stopped = await collect(
            runtime,
            GenerationRequest(
                "stopped",
                prompt,
                RequestOptions(max_new_tokens=8, ignore_eos=True, stop_token_ids=(stop,)),
            ),
        )
        return free, stop, stopped

    free, stop, stopped = run_with_runtime(synthetic_engine, body)
    assert tokens_of(stopped) == free[: free.index(stop)]
    assert stopped[-1].finish_reason is FinishReason.STOP


def test_a_stop_string_ends_the_request_before_it_and_text_matches_tokens(synthetic_engine):
    prompt = (72, 101, 108, 108, 111)

    async def body(runtime):
        free = await collect(
            runtime,
            GenerationRequest("free", prompt, RequestOptions(max_new_tokens=40, ignore_eos=True)),
        )
        text = "".join(e.text for e in free)
        stop = text[10:13]
        stopped = await collect(
            runtime,
            GenerationRequest(
                "stopped",
                prompt,
                RequestOptions(max_new_tokens=40, ignore_eos=True, stop_strings=(stop,)),
            ),
        )
        return text, stop, stopped, runtime.tokenizer.decode(tokens_of(free))

    text, stop, stopped, decoded = run_with_runtime(synthetic_engine, body)
    assert text == decoded  # without stops, streamed text is the decoded tokens
    assert "".join(e.text for e in stopped) == text[: text.index(stop)]
    assert stopped[-1].finish_reason is FinishReason.STOP


def test_held_back_text_is_released_when_the_length_limit_ends_a_request(synthetic_engine):
    async def body(runtime):
        request = GenerationRequest(
            "held",
            (65, 66),
            RequestOptions(max_new_tokens=30, ignore_eos=True, stop_strings=("\u2603" * 40,)),
        )  # never matches, holds back
        events = await collect(runtime, request)
        return events, runtime.tokenizer.decode(tokens_of(events))

    events, decoded = run_with_runtime(synthetic_engine, body)
    assert events[-1].finish_reason is FinishReason.LENGTH
    assert "".join(e.text for e in events) == decoded


def test_aborting_a_waiting_request_finishes_it_without_running_it(synthetic_engine):
    async def body(runtime):
        busy = runtime.generate(
            GenerationRequest("busy", (3,), RequestOptions(max_new_tokens=900, ignore_eos=True))
        )
        await busy.__anext__()
        waiting = runtime.generate(
            GenerationRequest("queued", (4, 5), RequestOptions(max_new_tokens=5))
        )
        assert runtime.abort("queued")
        events = [e async for e in waiting]
        await busy.aclose()
        return events

    events = run_with_runtime(synthetic_engine, body, max_batch_size=1)
    assert [e.finish_reason for e in events] == [FinishReason.ABORTED]
    assert events[0].usage.completion_tokens == 0


def test_a_dropped_stream_frees_its_request_even_if_never_read(synthetic_engine):
    async def body(runtime):
        stream = runtime.generate(
            GenerationRequest(
                "dropped", (5,) * 60, RequestOptions(max_new_tokens=900, ignore_eos=True)
            )
        )
        del stream

        def idle() -> bool:
            stats = runtime.stats()
            return stats.running == 0 and stats.waiting == 0

        await wait_until(idle, "ending the dropped request")
        return runtime.stats()

    stats = run_with_runtime(synthetic_engine, body)
    assert stats.kv_blocks_used == 0 and stats.generated_tokens < 900


def test_a_duplicate_request_id_is_refused_while_the_first_runs(synthetic_engine):
    async def body(runtime):
        first = runtime.generate(GenerationRequest("same", (3,), RequestOptions(max_new_tokens=50)))
        with pytest.raises(RequestError, match=IN_FLIGHT):
            runtime.generate(GenerationRequest("same", (4,), RequestOptions(max_new_tokens=5)))
        await first.aclose()

    run_with_runtime(synthetic_engine, body)


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (SamplingParams(top_k=2.5), "top_k must be an integer"),
        (SamplingParams(seed=1.5), "seed must be an integer"),
        (SamplingParams(temperature="hot"), "temperature must be a number"),
    ],
)
def test_wrong_types_are_refused_up_front(synthetic_engine, sampling, field):
    async def body(runtime):
        with pytest.raises(RequestError, match=field):
            runtime.generate(
                GenerationRequest("typed", (3,), RequestOptions(sampling, max_new_tokens=2))
            )
        return await collect(
            runtime, GenerationRequest("after", (3,), RequestOptions(max_new_tokens=2))
        )

    assert run_with_runtime(synthetic_engine, body)[-1].finish_reason is FinishReason.LENGTH


def test_a_request_submitted_during_shutdown_is_refused(synthetic_engine):
    from service.runtime.interface import NotReadyError

    async def body(runtime):
        running = runtime.generate(
            GenerationRequest("r", (3,), RequestOptions(max_new_tokens=900, ignore_eos=True))
        )
        await running.__anext__()
        stopping = asyncio.create_task(runtime.shutdown())
        await asyncio.sleep(0)
        with pytest.raises(NotReadyError):
            runtime.generate(GenerationRequest("late", (3,), RequestOptions(max_new_tokens=2)))
        events = [e async for e in running]
        await stopping
        return events[-1]

    assert run_with_runtime(synthetic_engine, body).finish_reason is FinishReason.ABORTED


def test_a_consumer_that_falls_behind_gets_merged_deltas_with_nothing_lost(synthetic_engine):
    request = GenerationRequest(
        "slow", (5, 6, 7), RequestOptions(max_new_tokens=24, ignore_eos=True)
    )

    async def body(runtime):
        alone = await collect(runtime, replace(request, request_id="fast"))
        events = []
        async for event in runtime.generate(request):
            events.append(event)
            lagging_until = runtime.stats().generated_tokens + 2  # the consumer falls behind

            def two_more_tokens_or_done(target: int = lagging_until) -> bool:
                stats = runtime.stats()
                return stats.generated_tokens >= target or stats.running == 0

            await wait_until(two_more_tokens_or_done, "two more tokens")
        return alone, events

    alone, events = run_with_runtime(synthetic_engine, body)
    merged = [e for e in events if len(e.token_ids) > 1]
    assert merged, "a consumer that lags should get several tokens per event"
    assert tokens_of(events) == tokens_of(alone)
    assert "".join(e.text for e in events) == "".join(e.text for e in alone)
    assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].usage is not None
    assert sum(e.finish_reason is not None for e in events) == 1


@pytest.mark.parametrize("max_num_tokens", [None, 7])  # whole prefill; chunks of 7 tokens
def test_prompt_logprobs_equal_a_plain_forwards_and_skip_the_prefix_cache(
    synthetic_engine, max_num_tokens
):
    import torch

    from engine_build.model import NemotronModel
    from service.runtime.loader import load_rank_model

    prompt = tuple(range(3, 43))  # 40 tokens: several KV blocks, several chunks of 7

    async def body(runtime):
        plain = GenerationRequest("warm", prompt, RequestOptions(max_new_tokens=2))
        await collect(runtime, plain)  # its full blocks are now in the prefix cache
        options = RequestOptions(max_new_tokens=2, prompt_logprobs=3)
        return await collect(runtime, GenerationRequest("scored", prompt, options))

    options = {"max_num_tokens": max_num_tokens} if max_num_tokens else {}
    events = run_with_runtime(synthetic_engine, body, **options)
    (scored,) = [e for e in events if e.prompt_logprobs]
    # Before any token: in an event of its own, or merged with the first tokens' when the
    # consumer fell behind (a busy machine; a loaded CI run merged both tokens into it).
    assert events.index(scored) == 0
    assert sum(len(event.token_ids) for event in events) == 2  # the 2 asked for, once each
    assert events[-1].usage.cached_prompt_tokens == 0
    model: NemotronModel = load_rank_model(synthetic_engine)
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([prompt]))[0].float(), dim=-1)
    got = scored.prompt_logprobs
    assert [lp.token_id for lp in got] == list(prompt[1:])
    for position, lp in enumerate(got):
        assert lp.logprob == pytest.approx(
            float(expected[position, prompt[position + 1]]), abs=1e-4
        )
        top_ids = [t for t, _ in lp.top]
        assert top_ids == expected[position].topk(3).indices.tolist()
