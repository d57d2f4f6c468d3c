"""Planning: per-GPU figures for the real 49B config against numbers computed here by hand."""

from __future__ import annotations

import json
import math

import pytest

from engine_build.cli import main
from engine_build.graph import ModelGraph
from engine_build.plan import plan_profile
from engine_build.profiles import load_profiles
from tests.conftest import SMOLLM2_LLAMA_CONFIG

HIDDEN, HEADS, HEAD_DIM, VOCAB = 8192, 64, 128, 128256


def _layers(config):
    """(kv_heads or 0, ffn width) per layer, straight from block_configs."""
    layers = []
    for block in config["block_configs"]:
        attention, ffn = block["attention"], block["ffn"]
        kv = 0 if attention["no_op"] else HEADS // attention["n_heads_in_group"]
        width = math.ceil(int(2 * ffn["ffn_mult"] * HIDDEN / 3) / 256) * 256
        layers.append((kv, width))
    return layers


def _hand_plan(config, tp, weights_dtype, kv_bytes, memory_gb, reserve_gb, limits):
    """Per-GPU weights, KV bytes per token and sequences, with the planner's documented rules."""
    linear_elements = scale_rows = 0
    other_elements = 2 * VOCAB * HIDDEN // tp + HIDDEN  # embeddings, lm_head, final norm
    kv_per_token = 0
    q_local = HEADS // tp * HEAD_DIM
    widest = 0
    for kv, width in _layers(config):
        if kv:
            kv_local = kv // tp if kv % tp == 0 else 1
            qkv_rows = q_local + 2 * kv_local * HEAD_DIM
            linear_elements += qkv_rows * HIDDEN + HIDDEN * q_local
            scale_rows += qkv_rows + HIDDEN
            other_elements += HIDDEN
            kv_per_token += 2 * kv_local * HEAD_DIM * kv_bytes
        linear_elements += 3 * (width // tp) * HIDDEN
        scale_rows += 2 * width // tp + HIDDEN
        other_elements += HIDDEN
        widest = max(widest, width // tp)
    if weights_dtype == "fp8":
        weights = linear_elements + 4 * scale_rows + 2 * other_elements
    else:
        weights = 2 * (linear_elements + other_elements)
    kv_local_max = 8 // tp if 8 % tp == 0 else 1
    per_token = 4 * HIDDEN + (q_local + 2 * kv_local_max * HEAD_DIM) + q_local + 3 * widest
    activations = 2 * limits.max_num_tokens * per_token + limits.max_batch_size * VOCAB // tp * 4
    free = memory_gb * 10**9 - weights - reserve_gb * 10**9 - activations
    budget = int(free * limits.kv_cache_free_fraction)
    sequences = {ctx: budget // (kv_per_token * ctx) for ctx in (8192, 32768, 131072)}
    return weights, activations, budget, kv_per_token, sequences


@pytest.fixture(scope="module")
def reference(reference_config):
    return json.loads(reference_config.read_text())


@pytest.mark.parametrize("name", ["a100x4", "a100x8", "h100x2"])
def test_gpu_plans_for_the_49b_model_match_the_hand_computation(reference, name):
    profile = load_profiles().get(name)
    precision = profile.default_precision
    plan = plan_profile(ModelGraph.from_hf_config(reference), profile)
    kv_bytes = 1 if precision.kv_cache.value == "fp8" else 2
    weights, activations, budget, kv_per_token, sequences = _hand_plan(
        reference,
        profile.tensor_parallel,
        precision.weights.value,
        kv_bytes,
        profile.memory_gb,
        profile.reserve_gb,
        profile.limits,
    )
    assert plan.feasible, plan.reasons
    assert plan.weight_bytes_per_device == weights
    assert plan.activation_bytes_per_device == activations
    assert plan.kv_budget_bytes_per_device == budget
    assert plan.kv_bytes_per_token_per_device == kv_per_token
    assert plan.sequences_at_context == sequences


def test_49b_plan_agrees_with_the_field_guide(reference):
    graph, profiles = ModelGraph.from_hf_config(reference), load_profiles()
    gb = 10**9
    a100x4 = plan_profile(graph, profiles.get("a100x4"))
    a100x8 = plan_profile(graph, profiles.get("a100x8"))
    h100 = profiles.get("h100x2")
    h100_bf16 = plan_profile(graph, h100, h100.precision("bf16"))
    h100_fp8 = plan_profile(graph, h100)
    assert round(a100x4.weight_bytes_per_device / gb, 1) == 24.9
    assert round(a100x8.weight_bytes_per_device / gb, 1) == 12.5
    assert round(h100_bf16.weight_bytes_per_device / gb, 1) == 49.9
    assert round(2 * h100_fp8.weight_bytes_per_device / gb) == 52
    assert a100x4.kv_bytes_per_token_per_device == 200_704 // 4
    assert h100_fp8.kv_bytes_per_token_per_device == 200_704 // 2 // 2
    assert a100x8.kv_layouts == ["split: 8 KV heads -> 1 per rank"]


def test_the_cpu_profile_refuses_the_49b_model_for_memory(reference):
    plan = plan_profile(ModelGraph.from_hf_config(reference), load_profiles().get("cpu"))
    assert not plan.feasible
    assert plan.weight_bytes_per_device == 49_867_145_216 * 2  # tp 1: every parameter, bf16
    assert plan.reasons == [
        "weights 99.73 GB + reserve 1.00 GB + activations 0.58 GB per device exceed 16 GB"
    ]


TP3_AND_SMALL = """
profiles:
  h100x3:
    device: gpu
    gpu: {products: ["*H100*"], count: 3, compute_capability: "9.0"}
    memory_gb: 80
    reserve_gb: 2
    tensor_parallel: 3
    precisions: [{weights: bf16, kv_cache: bf16}]
    limits: {max_batch_size: 8, max_seq_len: 8192, max_num_tokens: 4096,
             kv_cache_free_fraction: 0.9}
  a100-40gbx2:
    device: gpu
    gpu: {products: ["*A100*40GB*"], count: 2, compute_capability: "8.0"}
    memory_gb: 40
    reserve_gb: 2
    tensor_parallel: 2
    precisions: [{weights: bf16, kv_cache: bf16}]
    limits: {max_batch_size: 8, max_seq_len: 8192, max_num_tokens: 4096,
             kv_cache_free_fraction: 0.9}
"""


@pytest.fixture(scope="module")
def odd_profiles(tmp_path_factory):
    path = tmp_path_factory.mktemp("odd") / "odd.yaml"
    path.write_text(TP3_AND_SMALL)
    return load_profiles([path])


def test_tp3_is_refused_for_the_49b_model_with_every_reason(reference, odd_profiles):
    plan = plan_profile(ModelGraph.from_hf_config(reference), odd_profiles.get("h100x3"))
    assert not plan.feasible
    assert "num_attention_heads 64 is not divisible by tensor_parallel 3" in plan.reasons
    assert any("8 KV heads (layers 0-5, 8-10, 12-41, 52, 71-79)" in r for r in plan.reasons)
    assert "FFN width 2816 is not divisible by tensor_parallel 3" in plan.reasons


def test_a_gpu_too_small_is_refused_for_memory(reference, odd_profiles):
    plan = plan_profile(ModelGraph.from_hf_config(reference), odd_profiles.get("a100-40gbx2"))
    assert not plan.feasible
    assert len(plan.reasons) == 1 and "per device exceed 40 GB" in plan.reasons[0]


def test_smollm2_explains_why_tp2_is_refused_and_tp3_works(test_profiles_file):
    profiles = load_profiles([test_profiles_file])
    graph = ModelGraph.from_hf_config(SMOLLM2_LLAMA_CONFIG)
    tp2 = plan_profile(graph, profiles.get("cpu-tp2"))
    assert not tp2.feasible
    assert tp2.reasons == [
        "num_attention_heads 9 is not divisible by tensor_parallel 2",
        "3 KV heads (layers 0-29) can be neither split nor replicated over tensor_parallel 2",
    ]
    tp3 = plan_profile(graph, profiles.get("cpu-tp3"))
    assert tp3.feasible, tp3.reasons
    assert tp3.kv_layouts == ["split: 3 KV heads -> 1 per rank"]


def test_plan_cli_prints_a_table_and_json(reference_config, capsys):
    assert main(["plan", str(reference_config)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["profile", "a100x4", "a100x8", "h100x2", "cpu"]
    assert "cpu: refused: weights 99.73 GB" in out
    assert main(["plan", str(reference_config), "--profile", "a100x4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[0]["weight_bytes_per_device"] > 24.9e9 and data[0]["feasible"] is True


def test_plan_cli_exits_1_when_a_requested_profile_is_refused(reference_config, capsys):
    assert main(["plan", str(reference_config), "--profile", "cpu"]) == 1
    assert "refused" in capsys.readouterr().out


def test_plan_cli_lists_valid_profiles_for_an_unknown_one(reference_config, capsys):
    assert main(["plan", str(reference_config), "--profile", "tpu-v5"]) == 2
    assert "unknown profile 'tpu-v5'; valid profiles: ['a100x4', 'a100x8', 'h100x2', 'cpu']" in (
        capsys.readouterr().err
    )


def _gpu_profile_file(tmp_path, name, tp, memory_gb=80, max_seq_len=8192):
    body = f"""
profiles:
  {name}:
    device: gpu
    gpu: {{products: ["*H100*"], count: {tp}, compute_capability: "9.0"}}
    memory_gb: {memory_gb}
    reserve_gb: 2
    tensor_parallel: {tp}
    precisions: [{{weights: bf16, kv_cache: bf16}}]
    limits: {{max_batch_size: 8, max_seq_len: {max_seq_len}, max_num_tokens: 4096,
             kv_cache_free_fraction: 0.9}}
"""
    path = tmp_path / f"{name}.yaml"
    path.write_text(body)
    return load_profiles([path]).get(name)


def test_per_rank_widths_off_the_kernel_alignment_are_refused(tmp_path):
    graph = ModelGraph.from_hf_config(
        {
            "model_type": "llama",
            "hidden_size": 2048,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_hidden_layers": 2,
            "intermediate_size": 1280,
            "vocab_size": 32000,
        }
    )
    plan = plan_profile(graph, _gpu_profile_file(tmp_path, "h100x32", 32))
    assert plan.reasons == [
        "FFN width 1280 gives 40 per rank, not a multiple of 16 (kernel alignment)"
    ]


def test_a_kv_budget_without_room_for_one_sequence_is_refused(synthetic_checkpoint, tmp_path):
    graph = ModelGraph.from_path(synthetic_checkpoint)  # 1024-token context
    body = """
profiles:
  tiny:
    device: cpu
    memory_gb: 0.1
    reserve_gb: 0
    tensor_parallel: 1
    precisions: [{weights: fp32, kv_cache: fp32}]
    limits: {max_batch_size: 1, max_seq_len: 131072, max_num_tokens: 16,
             kv_cache_free_fraction: 0.01}
"""
    (tmp_path / "tiny.yaml").write_text(body)
    plan = plan_profile(graph, load_profiles([tmp_path / "tiny.yaml"]).get("tiny"))
    # max_seq_len is clamped to the model's 1024-token window before the check.
    assert plan.reasons == [
        f"KV budget {plan.kv_budget_bytes_per_device / 1e9:.2f} GB per device holds no full "
        "sequence of 1024 tokens"
    ]


def test_the_torch_backend_plans_fp8_engines_at_their_bf16_serving_size(reference):
    graph, h100 = ModelGraph.from_hf_config(reference), load_profiles().get("h100x2")
    tensorrt = plan_profile(graph, h100)
    torch_plan = plan_profile(graph, h100, backend="torch")
    bf16 = plan_profile(graph, h100, h100.precision("bf16"))
    assert tensorrt.backend == "tensorrt-llm" and torch_plan.backend == "torch"
    assert torch_plan.weight_bytes_per_device == bf16.weight_bytes_per_device
    assert torch_plan.kv_cache_dtype == "bf16"
    assert torch_plan.kv_bytes_per_token_per_device == 2 * tensorrt.kv_bytes_per_token_per_device


def test_plan_with_a_precision_skips_profiles_that_do_not_offer_it(reference_config, capsys):
    assert main(["plan", str(reference_config), "--precision", "fp8"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert header == ["profile", "h100x2", "cpu"]
