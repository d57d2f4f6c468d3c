"""Weight-only int8 and int4 engines: storage, the GGUF's own 4-bit groups, kernels, loading."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from safetensors.torch import load_file

from engine_build.backends.torch_engine import EngineFormatError, TorchEngine
from engine_build.graph import ModelGraph
from engine_build.model import NemotronModel, map_to_module_names
from engine_build.plan import plan_profile
from engine_build.profiles import Dtype, Precision, ProfileError, load_profiles, parse_profiles
from engine_build.quantize import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
    restore_compute_dtype,
    unpack_int4,
)
from engine_build.repository import EngineRepository
from engine_build.synthetic import synthetic_config, write_synthetic_checkpoint
from service.runtime.loader import load_rank_model
from service.runtime.quantized import Int4Linear, Int8Linear

QKV = "model.layers.0.self_attn.qkv_proj.weight"


def _matrix(out: int = 96, inputs: int = 128, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out, inputs, generator=generator) * inputs**-0.5


def test_int8_is_symmetric_per_output_channel_within_half_a_step():
    weight = _matrix()
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.shape == (96,)
    assert int(q.abs().max()) == 127
    error = (dequantize_int8(q, scale, torch.float32) - weight).abs()
    assert bool((error <= scale[:, None] / 2 + 1e-7).all())


def test_int4_groups_of_32_hold_min_and_max_exactly_and_pack_two_per_byte():
    weight = _matrix()
    packed, scale, low = quantize_int4(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (96, 64)
    assert scale.shape == low.shape == (96, 4)
    values = unpack_int4(packed)
    assert values.shape == (96, 128) and int(values.max()) == 15 and int(values.min()) == 0
    assert torch.equal(values[:, 0::2], packed & 0xF)  # even input column: low nibble
    back = dequantize_int4(packed, scale, low, torch.float32)
    groups = weight.reshape(96, 4, 32)
    assert torch.allclose(back.reshape(96, 4, 32).amin(-1), groups.amin(-1), atol=1e-6)
    assert torch.allclose(back.reshape(96, 4, 32).amax(-1), groups.amax(-1), atol=1e-6)
    assert bool(((back - weight).abs() <= scale.repeat_interleave(32, 1) / 2 + 1e-6).all())


@pytest.mark.parametrize(("out", "inputs"), [(96, 48), (24, 96)])
def test_int4_refuses_shapes_the_cpu_kernel_cannot_take(out, inputs):
    with pytest.raises(ValueError, match="divisible by 32 and output widths by 16"):
        quantize_int4(_matrix(out=out, inputs=inputs))


def test_the_plan_refuses_int4_shapes_and_weight_only_tensor_parallel(test_profiles_file):
    cpu = load_profiles().get("cpu")
    odd = ModelGraph.from_hf_config(synthetic_config(hidden_size=48, num_heads=4))
    plan = plan_profile(odd, cpu, cpu.precision("int4"))
    assert not plan.feasible
    assert any("int4 needs inputs divisible by 32" in reason for reason in plan.reasons)
    assert plan_profile(odd, cpu, cpu.precision("int8")).feasible
    tp2 = load_profiles([test_profiles_file]).get("cpu-tp2")
    graph = ModelGraph.from_hf_config(synthetic_config())
    precision = Precision(Dtype.INT8, Dtype.BF16)
    reasons = plan_profile(graph, replace(tp2, precisions=(precision,)), precision).reasons
    assert "int8 engines run in one process (tensor_parallel 1), not 2" in reasons


def test_the_embedded_ggufs_q4_1_blocks_come_back_exactly(embedded_gguf):
    """int4 from the import's fp32 values re-derives every Q4_1 block: values, scale, minimum."""
    reader = GGUFReader(embedded_gguf)
    checked = 0
    for tensor in reader.tensors:
        if tensor.tensor_type.name != "Q4_1":
            continue
        fp32 = np.asarray(gguf_dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        blocks = np.asarray(tensor.data).reshape(-1, 20)  # fp16 d, fp16 m, 16 bytes of nibbles
        d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32).ravel()
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32).ravel()
        weight = torch.from_numpy(fp32.reshape(-1, fp32.shape[-1]))
        packed, scale, low = quantize_int4(weight)
        assert np.array_equal(scale.numpy().ravel(), d) or np.allclose(
            scale.numpy().ravel(), d, rtol=2e-7, atol=0
        ), tensor.name
        assert np.array_equal(low.numpy().ravel(), m), tensor.name
        assert torch.equal(dequantize_int4(packed, scale, low, torch.float32), weight), tensor.name
        checked += 1
    assert checked == 210  # every attention and FFN matrix of SmolLM2-135M


@pytest.mark.parametrize("rows", [1, 5])
def test_the_cpu_kernels_multiply_like_the_dequantized_matrix(rows):
    weight = _matrix()
    x = torch.randn(2, rows, 128).to(torch.bfloat16)
    q, scale = quantize_int8(weight)
    int8 = Int8Linear(q, scale, torch.bfloat16)
    reference = F.linear(x.float(), dequantize_int8(q, scale, torch.bfloat16).float())
    assert int8(x).shape == (2, rows, 96)
    assert torch.allclose(int8(x).float(), reference, atol=0.05, rtol=0.02)
    packed, scale4, low = quantize_int4(weight)
    int4 = Int4Linear(packed, scale4, low, torch.bfloat16)
    reference = F.linear(x.float(), dequantize_int4(packed, scale4, low, torch.float32))
    assert torch.allclose(int4(x).float(), reference, atol=0.05, rtol=0.02)


def _build(checkpoint, repo, precision):
    return subprocess.run(
        [sys.executable, "-m", "engine_build", "build", "--profile", "cpu", "--checkpoint",
         str(checkpoint), "--repo", str(repo), "--precision", precision],
        capture_output=True, text=True,
    )  # fmt: skip


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_nemotron_build_builds_and_the_loader_serves_weight_only_engines(tmp_path, precision, tied):
    checkpoint = write_synthetic_checkpoint(
        tmp_path / "ckpt", synthetic_config(tie_word_embeddings=tied)
    )
    result = _build(checkpoint, tmp_path / "repo", precision)
    assert result.returncode == 0, result.stderr
    (entry,) = EngineRepository(tmp_path / "repo").entries()
    assert entry.key.precision == precision
    tensors = load_file(entry.directory / "rank0-part0000.safetensors")
    assert tensors[QKV].dtype == (torch.int8 if precision == "int8" else torch.uint8)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    # int8 engines keep the lm_head bf16 (int8 cost +0.54% perplexity): tied, it is the
    # embedding; int4 engines store an int8 lm_head, tied or not (a copy of the embedding).
    assert ("lm_head.weight" in tensors) is (precision == "int4" or not tied)
    if precision == "int4":
        assert tensors["lm_head.weight"].dtype == torch.int8
        assert "lm_head.weight_min" not in tensors
    elif not tied:
        assert tensors["lm_head.weight"].dtype == torch.bfloat16
    model = load_rank_model(entry.directory)
    kind = Int8Linear if precision == "int8" else Int4Linear
    assert isinstance(model.get_submodule("layers.0.parts.attention.body.qkv"), kind)
    assert isinstance(model.lm_head, Int8Linear) is (precision == "int4")
    # Every quantized module sits where its matrix belongs: the model agrees with a plain one
    # holding the same matrices dequantized.
    engine = TorchEngine.open(entry.directory)
    stored = restore_compute_dtype(engine.read_rank(0), torch.float32)
    state = map_to_module_names(stored, engine.graph)
    plain = NemotronModel(engine.graph)
    plain.load_state_dict(state, strict=True)
    tokens = torch.tensor([[1, 5, 9, 200, 33, 7]])
    with torch.inference_mode():
        got, want = model(tokens).float(), plain(tokens).float()
    assert got.shape == (1, 6, 256)
    # bf16 activations against fp32 ones: a few percent; a misplaced matrix is off by ~100%
    assert float((got - want).abs().max()) <= 0.05 * float(want.abs().max())


def test_weight_only_engines_are_smaller_in_the_plan():
    graph = ModelGraph.from_hf_config(synthetic_config(hidden_size=64, vocab_size=256))
    cpu = load_profiles().get("cpu")
    sizes = {p: plan_profile(graph, cpu, cpu.precision(p)).weight_bytes_per_device
             for p in ("bf16", "int8", "int4")}  # fmt: skip
    assert sizes["int4"] < sizes["int8"] < sizes["bf16"]


def test_a_weight_only_engine_refuses_a_gpu_device(tmp_path):
    checkpoint = write_synthetic_checkpoint(tmp_path / "ckpt")
    assert _build(checkpoint, tmp_path / "repo", "int4").returncode == 0
    (entry,) = EngineRepository(tmp_path / "repo").entries()
    with pytest.raises(EngineFormatError, match="int4 engines run on one CPU process only"):
        load_rank_model(entry.directory, device="cuda")


@pytest.mark.parametrize(
    ("precision", "message"),
    [
        ("{weights: bf16, kv_cache: int8}", "int8 is a weight-only format"),
        ("{weights: int4, kv_cache: bf16}", "int4 weights run on the cpu profile only"),
    ],
)
def test_profiles_refuse_weight_only_kv_caches_and_gpu_int_weights(precision, message):
    text = f"""
profiles:
  g1:
    description: one GPU
    device: gpu
    gpu: {{products: ["*H100*"], count: 1, compute_capability: "9.0"}}
    memory_gb: 80
    reserve_gb: 2
    tensor_parallel: 1
    precisions: [{precision}]
    limits:
      {{max_batch_size: 8, max_seq_len: 4096, max_num_tokens: 4096, kv_cache_free_fraction: 0.9}}
"""
    with pytest.raises(ProfileError, match=message):
        parse_profiles(text, "user.yaml")


def test_the_plan_counts_the_int8_lm_head_an_int4_engine_stores_for_a_tied_graph():
    cpu = load_profiles().get("cpu")

    def size(tied: bool, precision: str) -> int:
        graph = ModelGraph.from_hf_config(synthetic_config(tie_word_embeddings=tied))
        return plan_profile(graph, cpu, cpu.precision(precision)).weight_bytes_per_device

    assert size(True, "int4") == size(False, "int4")  # both store an int8 lm_head
    assert size(True, "int8") < size(False, "int8")  # tied: the bf16 embedding serves
