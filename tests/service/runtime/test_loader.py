"""Loading built engines: round trips against the unbuilt model, tensor parallelism, FP8."""

from __future__ import annotations

import faulthandler
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine_build.backends.torch_engine import EngineFormatError
from engine_build.build import BuildRequest, build_engine
from engine_build.model import NemotronModel
from engine_build.profiles import load_profiles
from engine_build.repository import EngineRepository, EngineRequirement
from engine_build.synthetic import LayerRecipe, synthetic_config, write_synthetic_checkpoint
from service.chat.formats import family_of, load_families
from service.chat.terminal import ChatSession
from service.chat.turns import ChatContext
from service.runtime.loader import load_rank_model, select_engine
from service.runtime.options import RequestOptions
from service.runtime.tokenizer import TextTokenizer
from tests.service.runtime.conftest import run_with_runtime

TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


def _build(checkpoint, repo, profile="cpu", precision=None, profiles_file=None):
    profiles = load_profiles([profiles_file] if profiles_file else [])
    request = BuildRequest(
        checkpoint=checkpoint, profile=profiles.get(profile), precision=precision
    )
    return build_engine(request, EngineRepository(repo)).entry


@torch.inference_mode()
def test_synthetic_round_trip_bf16_engine_equals_the_unbuilt_model(synthetic_checkpoint, tmp_path):
    entry = _build(synthetic_checkpoint, tmp_path / "repo")
    selected = select_engine(tmp_path / "repo", EngineRequirement("cpu", "cpu"))
    assert selected.engine_id == entry.engine_id
    engine_model = load_rank_model(selected.directory)
    unbuilt_bf16 = NemotronModel.from_checkpoint(synthetic_checkpoint, dtype=torch.bfloat16)
    unbuilt_fp32 = NemotronModel.from_checkpoint(synthetic_checkpoint)
    logits = engine_model(TOKENS)
    # Same bf16 weights, same arithmetic: identical. Against fp32: bf16 rounding only.
    assert torch.equal(logits, unbuilt_bf16(TOKENS))
    assert (logits.float() - unbuilt_fp32(TOKENS)).abs().max() < 0.1


@torch.inference_mode()
def test_fp32_engine_equals_the_unbuilt_fp32_model(synthetic_checkpoint, tmp_path):
    entry = _build(synthetic_checkpoint, tmp_path / "repo", precision="fp32")
    unbuilt = NemotronModel.from_checkpoint(synthetic_checkpoint)
    assert torch.equal(load_rank_model(entry.directory)(TOKENS), unbuilt(TOKENS))


@torch.inference_mode()
def test_fp8_engine_loads_on_cpu_within_a_stated_relative_error(synthetic_checkpoint, tmp_path):
    bf16 = load_rank_model(_build(synthetic_checkpoint, tmp_path / "r").directory)
    fp8 = load_rank_model(_build(synthetic_checkpoint, tmp_path / "r", precision="fp8").directory)
    assert fp8.dtype == torch.bfloat16  # dequantized for compute
    reference, quantized = bf16(TOKENS).float(), fp8(TOKENS).float()
    relative = ((quantized - reference).norm() / reference.norm()).item()
    # e4m3 keeps 3 mantissa bits (~3% per weight); over 8 random layers 15% is the bound.
    assert relative < 0.15


def test_loading_with_the_wrong_number_of_processes_is_refused(synthetic_checkpoint, tmp_path):
    entry = _build(synthetic_checkpoint, tmp_path / "repo")
    with pytest.raises(EngineFormatError, match="cannot be loaded by 2 process"):
        load_rank_model(entry.directory, rank=0, world_size=2)


def _tp_worker(rank, world, engine_dir, out, rendezvous):
    # A native crash (gloo aborting, once, in a loaded CI run) leaves every thread's stack here.
    trace = open(f"{out}.rank{rank}.trace", "w")  # noqa: SIM115 - open until the process exits
    faulthandler.enable(trace, all_threads=True)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    try:
        model = load_rank_model(engine_dir, rank, world)
        with torch.inference_mode():
            full = model(TOKENS)
            cache = model.new_cache(2, 32)
            pieces = [model(TOKENS[:, :17], cache)]
            pieces += [model(TOKENS[:, t : t + 1], cache) for t in range(17, 24)]
        if rank == 0:
            torch.save({"full": full, "incremental": torch.cat(pieces, 1)}, out)
        dist.barrier()  # leave together: an early destroy aborts the peers
    finally:
        dist.destroy_process_group()


def run_tensor_parallel(engine_dir, world, tmp_path) -> dict:
    """Load `engine_dir` in `world` gloo processes; rank 0's logits."""
    out = tmp_path / "logits.pt"
    rendezvous = f"file://{tmp_path / 'rendezvous'}"
    try:
        mp.spawn(_tp_worker, args=(world, str(engine_dir), str(out), rendezvous), nprocs=world)
    except mp.ProcessExitedException as err:
        traces = "\n".join(
            f"--- rank {rank}:\n{Path(f'{out}.rank{rank}.trace').read_text()}"
            for rank in range(world)
            if Path(f"{out}.rank{rank}.trace").is_file()
        )
        raise AssertionError(f"{err}; the workers' stacks at the crash:\n{traces}") from err
    return torch.load(out)


def test_tp2_engine_in_two_gloo_processes_matches_tp1(
    synthetic_checkpoint, test_profiles_file, tmp_path
):
    # The synthetic graph has no-op and linear layers and a layer with 1 KV head (< tp 2).
    graph = NemotronModel.from_checkpoint(synthetic_checkpoint).graph
    assert min(kv for kv in graph.kv_heads_per_layer if kv) < 2
    entry = _build(
        synthetic_checkpoint, tmp_path / "repo", "cpu-tp2", profiles_file=test_profiles_file
    )
    assert entry.name == "torch-cpu-tp2-fp32-tp2"
    result = run_tensor_parallel(entry.directory, 2, tmp_path)
    with torch.inference_mode():
        expected = NemotronModel.from_checkpoint(synthetic_checkpoint)(TOKENS)
    assert (result["full"] - expected).abs().max() < 1e-5
    assert (result["incremental"] - expected).abs().max() < 1e-5


def test_tp4_with_replicated_kv_heads_matches_tp1(test_profiles_file, tmp_path):
    # 8 heads: KV heads 2 and 1 are replicated over 4 ranks, 4 and 8 are split; tied embeddings.
    layers = (
        LayerRecipe("gqa", "swiglu", n_heads_in_group=4),
        LayerRecipe("gqa", "linear", n_heads_in_group=8),
        LayerRecipe("linear", "swiglu", ffn_mult=7.0),
        LayerRecipe("gqa", "none", n_heads_in_group=2),
        LayerRecipe("none", "swiglu"),
        LayerRecipe("gqa", "swiglu", n_heads_in_group=1),
    )
    config = synthetic_config(layers, num_heads=8, tie_word_embeddings=True)
    checkpoint = write_synthetic_checkpoint(tmp_path / "ckpt", config)
    entry = _build(checkpoint, tmp_path / "repo", "cpu-tp4", profiles_file=test_profiles_file)
    result = run_tensor_parallel(entry.directory, 4, tmp_path)
    with torch.inference_mode():
        expected = NemotronModel.from_checkpoint(checkpoint)(TOKENS)
    # fp32 sums in another order over 4 ranks: about 1e-6 of logits of size ~10.
    assert (result["full"] - expected).abs().max() < 1e-4
    assert (result["incremental"] - expected).abs().max() < 1e-4


@pytest.mark.slow
def test_smollm2_tp3_engine_matches_the_unbuilt_model(
    embedded_checkpoint, test_profiles_file, tmp_path
):
    entry = _build(
        embedded_checkpoint, tmp_path / "repo", "cpu-tp3", profiles_file=test_profiles_file
    )
    result = run_tensor_parallel(entry.directory, 3, tmp_path)
    with torch.inference_mode():
        expected = NemotronModel.from_checkpoint(embedded_checkpoint)(TOKENS)
    assert (result["full"] - expected).abs().max() < 1e-3
    assert (result["incremental"] - expected).abs().max() < 1e-3


@pytest.mark.slow
def test_smollm2_round_trip_and_fp8_engine(embedded_checkpoint, tmp_path):
    bf16_entry = _build(embedded_checkpoint, tmp_path / "repo")
    fp8_entry = _build(embedded_checkpoint, tmp_path / "repo", precision="fp8")
    tokenizer = TextTokenizer(bf16_entry.directory)
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of"
    ids = torch.tensor([tokenizer.encode(text)])
    with torch.inference_mode():
        reference = load_rank_model(bf16_entry.directory)(ids)
        unbuilt = NemotronModel.from_checkpoint(embedded_checkpoint, dtype=torch.bfloat16)
        assert torch.equal(reference, unbuilt(ids))  # bf16 engine == unbuilt bf16 model
        quantized = load_rank_model(fp8_entry.directory)(ids).float()
    relative = ((quantized - reference.float()).norm() / reference.float().norm()).item()
    agree = (quantized.argmax(-1) == reference.argmax(-1)).float().mean().item()
    # Measured: 11.9% relative, 100% top-1 agreement on this text; the bounds leave margin.
    assert relative < 0.2
    assert agree >= 0.8

    async def ask(runtime):
        family = family_of(runtime.tokenizer.chat_template_source, load_families())
        session = ChatSession(ChatContext(runtime, family), RequestOptions(max_new_tokens=20))
        return "".join([delta async for delta in session.reply("What is the capital of France?")])

    assert "Paris" in run_with_runtime(fp8_entry.directory, ask, kv_cache_bytes=50_000_000)
