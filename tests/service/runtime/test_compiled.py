"""The compiled decode step: the eager step's logits and KV writes, padded sizes, no recompiles.

Compiled on the synthetic Nemotron-NAS graph (no-op, linear and GQA attention with different KV
heads, different FFN widths) in fp32, so the comparison with the eager step is tight; engines
compile bf16/int8/int4 models, fp32 ones are served eagerly (`can_compile`).
"""

from __future__ import annotations

import pytest
import torch
from nemotron.v1 import generation_pb2 as pb
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import default_cache_dir as torch_default_cache_dir

from engine_build.model import NemotronModel
from service.runtime import compiled as compiled_module
from service.runtime import native
from service.runtime.compiled import CompiledDecode, can_compile, inductor_cache_dir
from service.runtime.kv_pages import PagedKVStore
from service.runtime.runner import ModelRunner, StepPlan
from service.server.flags import parse_serve_config
from tests.service.server_process import start_server, stop_server, wait_ready

BLOCK = 16
# Compiling one size of the synthetic model took ~20 s on an idle 2-core machine; a busy one
# takes several times that (the compiler's own processes compete for the cores).
COMPILE_WAIT_S = 600.0


@pytest.fixture(scope="module")
def model(synthetic_checkpoint) -> NemotronModel:
    return NemotronModel.from_checkpoint(synthetic_checkpoint, dtype=torch.float32)


def _decode_plan(rows: list[tuple[int, int, list[int]]]) -> StepPlan:
    """rows: (token, context, blocks) per sequence, one new token each."""
    segments = [(i, 1, context, blocks) for i, (_, context, blocks) in enumerate(rows)]
    positions = [context for _, context, _ in rows]
    return StepPlan([t for t, _, _ in rows], positions, segments, list(range(len(rows))))


@pytest.mark.parametrize("attention", ["native", "sdpa"])
def test_compiled_steps_give_the_eager_logits_and_kv_writes(
    model, tmp_path, monkeypatch, attention
):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    # Either attention, whichever timed faster here (the native one needs its library built).
    assert attention == "sdpa" or native.load()
    monkeypatch.setattr(CompiledDecode, "choose_attention", lambda self, size: attention)
    graph = model.graph
    eager = ModelRunner(model, PagedKVStore(graph, 4, BLOCK, torch.float32))
    compiled = ModelRunner(model, PagedKVStore(graph, 4, BLOCK, torch.float32))
    # Two sizes (compiling takes tens of seconds each on two cores): each batch runs its own
    # size's graph, told apart by the arguments' guards alone (the model's are dropped).
    compiled.compiled = CompiledDecode(model, compiled.store, sizes=(2, 4))
    compiled.compiled.compile_all()
    assert compiled.compiled.failed is None
    assert compiled.compiled.attention == {2: attention, 4: attention}
    compiled.compiled.ready = (2, 4)  # whether or not they timed faster than eager here
    graphs = counters["stats"]["unique_graphs"]

    prompt = [7, 3, 9, 1, 4]  # sequence A (blocks 0, 1) prefills eagerly in both runners
    prefill = StepPlan(prompt, list(range(5)), [(0, 5, 0, [0, 1])], [4])
    assert torch.equal(eager.execute(prefill), compiled.execute(prefill))
    steps = [
        # A decodes beside B, whose one-token prompt is its first decode row (context 0):
        # 2 rows, the context padded to the dynamic dimension's minimum for B
        _decode_plan([(5, 5, [0, 1]), (8, 0, [2])]),
        _decode_plan([(2, 6, [0, 1]), (6, 1, [2])]),
        _decode_plan([(11, 7, [0, 1])]),  # one row, padded to 2
        _decode_plan([(12, 8, [0, 1]), (13, 2, [2]), (14, 0, [3])]),  # 3 rows, padded to 4
        _decode_plan([(15, 9, [0, 1]), (16, 3, [2])]),  # back to size 2
    ]
    for plan in steps:
        expected = eager.execute(plan)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as trace:
            got = compiled.execute(plan)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        # This object's own graph: the other parameter's CompiledDecode, made earlier in this
        # process over the same model, chose the other attention.
        ran = {event.name for event in trace.events()}
        assert ("nemotron::decode_attention" in ran) == (attention == "native")
    slots = eager.store.scratch_slot  # the scratch slot holds padding rows' writes only
    for layer in graph.attention_layers:
        for kind in ("keys", "values"):
            written = getattr(compiled.store, kind)[layer][:slots]
            torch.testing.assert_close(written, getattr(eager.store, kind)[layer][:slots])
    assert counters["stats"]["unique_graphs"] == graphs  # new contexts and batches: no compile
    assert compiled.compiled.ready == (2, 4)  # no compiled step failed over to eager meanwhile


@pytest.mark.parametrize(("eager_s", "compiled_s", "used"), [(2.0, 1.0, True), (1.0, 2.0, False)])
def test_a_size_is_used_only_when_its_compiled_step_timed_faster(
    model, monkeypatch, eager_s, compiled_s, used, caplog
):
    decode = CompiledDecode(model, PagedKVStore(model.graph, 4, BLOCK, torch.float32), sizes=(2,))
    monkeypatch.setattr(decode, "run", lambda size, rows: None)  # compiling: tested above
    monkeypatch.setattr(decode, "_time", lambda size: (eager_s, compiled_s))
    with caplog.at_level("INFO", logger="nemotron"):
        decode.compile_all()
    assert decode.ready == ((2,) if used else ())
    (line,) = [r for r in caplog.records if r.getMessage() == "decode_compiled"]
    assert line.fields["used"] is used and line.fields["eager_ms"] == eager_s * 1e3


def test_batches_beyond_the_compiled_sizes_and_prefills_run_eagerly(model):
    runner = ModelRunner(model, PagedKVStore(model.graph, 4, BLOCK, torch.float32))
    runner.compiled = CompiledDecode(model, runner.store, sizes=(1,))
    runner.compiled.ready = (1,)  # as if compiled; never called for these plans
    calls: list[int] = []
    runner.compiled.run = lambda size, rows: calls.append(size)  # type: ignore[method-assign]
    runner.execute(StepPlan([1, 2, 3], [0, 1, 2], [(0, 3, 0, [0])], [2]))
    runner.execute(_decode_plan([(4, 3, [0]), (5, 0, [1])]))  # 2 rows: no size holds them
    assert calls == [] and runner.compiled.ready == (1,)


def test_a_batch_runs_its_own_sizes_graph_only_when_that_one_is_ready(model):
    decode = CompiledDecode(model, PagedKVStore(model.graph, 4, BLOCK, torch.float32), (1, 4, 16))
    decode.ready = (1, 16)  # 4 timed slower than eager (or not compiled yet)
    assert [decode.size_for(b) for b in (1, 3, 4, 10, 16, 20)] == [1, None, None, 16, 16, None]


def test_a_compiled_step_that_fails_while_serving_falls_back_to_eager(model, caplog):
    eager = ModelRunner(model, PagedKVStore(model.graph, 4, BLOCK, torch.float32))
    runner = ModelRunner(model, PagedKVStore(model.graph, 4, BLOCK, torch.float32))
    runner.compiled = CompiledDecode(model, runner.store, sizes=(1,))
    runner.compiled.ready = (1,)

    def broken(size, rows):
        raise RuntimeError("a guard failed")

    runner.compiled.run = broken  # type: ignore[method-assign]
    plan = _decode_plan([(4, 0, [0])])
    with caplog.at_level("ERROR", logger="nemotron"):
        torch.testing.assert_close(runner.execute(plan), eager.execute(plan))
    assert runner.compiled.ready == ()  # eager from now on
    assert [r.getMessage() for r in caplog.records] == ["decode_compiled_failed"]


def test_stopping_compiles_no_further_size(model):
    decode = CompiledDecode(model, PagedKVStore(model.graph, 4, BLOCK, torch.float32), (1, 2))
    decode.stop()
    decode.compile_all()
    assert decode.ready == () and decode.failed is None


def test_without_a_cxx_compiler_nothing_is_compiled(model, monkeypatch):
    bf16 = NemotronModel(model.graph).to(torch.bfloat16)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "no C++ compiler" in can_compile(bf16, torch.device("cpu"), 1)


def test_only_cpu_tp1_low_precision_engines_compile(model):
    assert "fp32 engines" in can_compile(model, torch.device("cpu"), 1)
    bf16 = NemotronModel(model.graph).to(torch.bfloat16)
    assert can_compile(bf16, torch.device("cpu"), 1) is None
    assert "tensor parallel" in can_compile(bf16, torch.device("cpu"), 2)
    assert "cuda" in can_compile(bf16, torch.device("cuda"), 1)


def test_the_flag_takes_sizes_or_off_and_names_the_allowed_values(capsys):
    assert parse_serve_config([], {}).compiled_decode == (1, 2, 4, 8, 16, 32)
    assert parse_serve_config(["--compiled-decode", "4,1"], {}).compiled_decode == (1, 4)
    assert parse_serve_config([], {"NEMOTRON_COMPILED_DECODE": "off"}).compiled_decode == ()
    for bad in ("0", "1,x", "512", "1,2,3,4,5,6,7,8,9"):
        with pytest.raises(SystemExit):
            parse_serve_config(["--compiled-decode", bad], {})
        assert "'off' or up to 8 batch sizes 1-256" in capsys.readouterr().err


def test_nemotron_serve_compiles_after_ready_serves_with_it_and_stops_cleanly_mid_compile(
    synthetic_checkpoint, tmp_path
):
    server = start_server(
        tmp_path / "cache",
        "--checkpoint",
        str(synthetic_checkpoint),
        "--precision",
        "bf16",
        "--compiled-decode",
        "1,2",
        # What importing torch._dynamo writes when the variable is unset: not a user's choice.
        env={
            "TORCHINDUCTOR_CACHE_DIR": torch_default_cache_dir(),
            "NEMOTRON_CACHE_DIR": str(tmp_path / "cache"),
        },
    )
    try:
        wait_ready(server)
        compiled = server.wait_for_log(
            lambda line: line.get("event") == "decode_compiled",
            "the compiled batch-1 step",
            timeout_s=COMPILE_WAIT_S,
        )
        assert compiled[0]["batch_size"] == 1
        # Compiled into NEMOTRON_CACHE_DIR, which survives a restart (torch's is under /tmp).
        assert compiled[0]["cache"] == str(tmp_path / "cache" / "inductor")
        assert any((tmp_path / "cache" / "inductor").iterdir())
        request = pb.GenerateRequest(
            prompt=pb.Prompt(token_ids=pb.TokenIds(ids=[5, 6, 7])),
            limits=pb.GenerationLimits(max_new_tokens=8, ignore_eos=True),
        )
        reply = server.api.Generate(request, timeout=60)
        assert len(reply.token_ids) == 8
        server.wait_for_log(
            lambda line: line.get("event") == "decode_compiling" and line["batch_size"] == 2,
            "the batch-2 compile starting",
        )
    finally:
        # SIGTERM while batch 2 compiles (or just after): a clean stop, not an abort (134).
        code = stop_server(server)
    assert code == 0, server.log_path.read_text()[-2000:]


def test_inductor_cache_is_the_users_choice_else_the_product_cache(tmp_path):
    product = {"NEMOTRON_CACHE_DIR": str(tmp_path)}
    assert inductor_cache_dir(product) == tmp_path / "inductor"
    # torch._dynamo's import writes torch's default into the variable when it is unset
    dynamo_default = {**product, "TORCHINDUCTOR_CACHE_DIR": torch_default_cache_dir()}
    assert inductor_cache_dir(dynamo_default) == tmp_path / "inductor"
    chosen = {**product, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine")}
    assert inductor_cache_dir(chosen) == tmp_path / "mine"


def test_the_attention_of_a_size_is_whichever_timed_faster(model, monkeypatch):
    decode = CompiledDecode(model, PagedKVStore(model.graph, 4, BLOCK, torch.float32), (2,))
    if not native.load():
        assert decode.choose_attention(2) == "sdpa"
        return
    for fast in ("native", "sdpa"):
        times = {fast: 1.0, ("sdpa" if fast == "native" else "native"): 2.0}
        monkeypatch.setattr(compiled_module, "best_seconds", lambda calls, *a, t=times, **k: t)
        assert decode.choose_attention(2) == fast
