"""Heterogeneous semantics of the PyTorch model on a synthetic checkpoint mixing every block kind.

The reference forward below is deliberately plain: a loop over layers reading the HF-named
tensors straight from the file, no fusion, no cache, explicit repeat of KV heads and its own
RoPE (with Llama-3 scaling) written from the formulas.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from engine_build.graph import AttentionKind
from engine_build.model import NemotronModel
from engine_build.synthetic import synthetic_config, write_synthetic_checkpoint


def _rms(x, weight, eps):
    return weight * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _inv_freq(config):
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    freqs = []
    scaling = config["rope_scaling"]
    for i in range(0, head_dim, 2):
        f = 1.0 / config["rope_theta"] ** (i / head_dim)
        wavelen = 2 * math.pi / f
        low = scaling["original_max_position_embeddings"] / scaling["low_freq_factor"]
        high = scaling["original_max_position_embeddings"] / scaling["high_freq_factor"]
        if wavelen > low:
            f = f / scaling["factor"]
        elif wavelen >= high:
            s = (
                scaling["original_max_position_embeddings"] / wavelen - scaling["low_freq_factor"]
            ) / (scaling["high_freq_factor"] - scaling["low_freq_factor"])
            f = (1 - s) * f / scaling["factor"] + s * f
        freqs.append(f)
    return torch.tensor(freqs, dtype=torch.float64)


def _rope(x, positions, inv_freq):  # x [seq, heads, head_dim]
    angle = positions[:, None].double() * inv_freq[None, :]  # [seq, head_dim/2]
    cos, sin = angle.cos()[:, None, :], angle.sin()[:, None, :]
    first, second = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def reference_forward(config, weights, tokens):
    """Logits [seq, vocab] for one unpadded sequence, in float64."""
    w = {k: v.double() for k, v in weights.items()}
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim, eps = hidden // heads, config["rms_norm_eps"]
    inv_freq = _inv_freq(config)
    seq = len(tokens)
    positions = torch.arange(seq)
    x = w["model.embed_tokens.weight"][tokens]
    for i, block in enumerate(config["block_configs"]):
        p = f"model.layers.{i}."
        attn, ffn = block["attention"], block["ffn"]
        if attn["replace_with_linear"]:
            x = (
                x
                + _rms(x, w[p + "input_layernorm.weight"], eps)
                @ w[p + "self_attn.linear_attn.weight"].T
            )
        elif not attn["no_op"]:
            h = _rms(x, w[p + "input_layernorm.weight"], eps)
            kv_heads = heads // attn["n_heads_in_group"]
            q = (h @ w[p + "self_attn.q_proj.weight"].T).view(seq, heads, head_dim)
            k = (h @ w[p + "self_attn.k_proj.weight"].T).view(seq, kv_heads, head_dim)
            v = (h @ w[p + "self_attn.v_proj.weight"].T).view(seq, kv_heads, head_dim)
            q, k = _rope(q, positions, inv_freq), _rope(k, positions, inv_freq)
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(head_dim)
            causal = torch.ones(seq, seq, dtype=torch.bool).tril()
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            out = torch.einsum("hqk,khd->qhd", probs, v).reshape(seq, heads * head_dim)
            x = x + out @ w[p + "self_attn.o_proj.weight"].T
        if ffn["replace_with_linear"]:
            x = (
                x
                + _rms(x, w[p + "post_attention_layernorm.weight"], eps)
                @ w[p + "mlp.linear_mlp.weight"].T
            )
        elif not ffn["no_op"]:
            h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
            gate = h @ w[p + "mlp.gate_proj.weight"].T
            up = h @ w[p + "mlp.up_proj.weight"].T
            x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    return x @ head.T


@pytest.fixture(scope="module")
def model(synthetic_checkpoint) -> NemotronModel:
    return NemotronModel.from_checkpoint(synthetic_checkpoint)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))


@torch.inference_mode()
def test_model_matches_the_plain_reference_forward_for_every_block_kind(
    synthetic_checkpoint, model, tokens
):
    config = json.loads((synthetic_checkpoint / "config.json").read_text())
    weights = load_file(synthetic_checkpoint / "model.safetensors")
    expected = reference_forward(config, weights, tokens[0])
    actual = model(tokens[:1])[0]
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers
    assert (actual.double() - expected).abs().max() < 1e-5


@torch.inference_mode()
def test_positions_past_the_original_context_use_scaled_rope(synthetic_checkpoint, model):
    # original_max_position_embeddings is 32: a 100-token sequence reaches every RoPE band.
    config = json.loads((synthetic_checkpoint / "config.json").read_text())
    weights = load_file(synthetic_checkpoint / "model.safetensors")
    sequence = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(2))
    expected = reference_forward(config, weights, sequence)
    assert (model(sequence[None])[0].double() - expected).abs().max() < 1e-5


@torch.inference_mode()
def test_incremental_decoding_matches_recomputing_the_full_sequence(model, tokens):
    full = model(tokens)
    cache = model.new_cache(batch_size=3, capacity=40)
    pieces = [model(tokens[:, :25], cache)]
    pieces += [model(tokens[:, t : t + 1], cache) for t in range(25, 40)]
    assert (torch.cat(pieces, dim=1) - full).abs().max() < 1e-5
    assert cache.lengths.tolist() == [40, 40, 40]


@torch.inference_mode()
def test_batched_inputs_of_different_lengths_match_each_run_alone(model, tokens):
    lengths = torch.tensor([40, 17, 3])
    padded = tokens.clone()
    for row, n in enumerate(lengths):
        padded[row, n:] = 0
    cache = model.new_cache(batch_size=3, capacity=48)
    batched = model(padded, cache, input_lengths=lengths)
    next_tokens = torch.tensor([[5], [6], [7]])
    batched_next = model(next_tokens, cache)
    for row, n in enumerate(lengths.tolist()):
        alone_cache = model.new_cache(batch_size=1, capacity=48)
        alone = model(tokens[row : row + 1, :n], alone_cache)
        assert (batched[row, :n] - alone[0]).abs().max() < 1e-5
        alone_next = model(next_tokens[row : row + 1], alone_cache)
        assert (batched_next[row] - alone_next[0]).abs().max() < 1e-5


@torch.inference_mode()
def test_last_only_returns_each_rows_last_real_position(model, tokens):
    lengths = torch.tensor([40, 17, 3])
    full = model(tokens, input_lengths=lengths)
    last = model(tokens, input_lengths=lengths, last_only=True)
    for row, n in enumerate(lengths.tolist()):
        # lm_head runs on fewer rows, so BLAS may block the matmul differently: equal up to
        # rounding, not bit for bit.
        assert (last[row, 0] - full[row, n - 1]).abs().max() < 1e-5


def test_kv_cache_is_allocated_for_attention_layers_only_with_their_own_kv_heads(model):
    cache = model.new_cache(batch_size=2, capacity=16)
    graph = model.graph
    gqa = [i for i, b in enumerate(graph.blocks) if b.attention.kind is AttentionKind.GQA]
    assert cache.num_tensors == 2 * len(gqa) == 8
    assert sorted(cache.keys) == gqa
    for layer in gqa:
        kv_heads = graph.blocks[layer].attention.num_kv_heads
        assert cache.keys[layer].shape == (2, 16, kv_heads, graph.head_dim)
        assert cache.values[layer].shape == (2, 16, kv_heads, graph.head_dim)
    assert [cache.keys[i].shape[2] for i in gqa] == [2, 1, 4, 2]
    per_token = sum(2 * graph.kv_heads_per_layer[i] * graph.head_dim * 4 for i in gqa)
    assert cache.nbytes == per_token * 2 * 16


def test_no_op_parts_build_no_modules(model):
    assert len(model.layers[5].parts) == 0
    assert list(model.layers[1].parts) == ["ffn"]
    assert list(model.layers[4].parts) == ["attention"]


@torch.inference_mode()
def test_tied_embeddings_share_the_embedding_matrix(tmp_path):
    config = synthetic_config(tie_word_embeddings=True)
    model = NemotronModel.from_checkpoint(write_synthetic_checkpoint(tmp_path, config))
    assert torch.equal(model.lm_head.weight, model.embed.weight)
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()


@torch.inference_mode()
def test_bfloat16_model_stays_close_to_float32_over_long_positions(synthetic_checkpoint, model):
    # 900 positions: RoPE angles or norms computed in bf16 drift far past this bound.
    low = NemotronModel.from_checkpoint(synthetic_checkpoint, dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16
    sequence = torch.randint(0, 256, (1, 900), generator=torch.Generator().manual_seed(3))
    exact = model(sequence)
    diff = (low(sequence).float() - exact).abs()
    assert diff.max() < 0.2
    assert diff.mean() < 0.02
