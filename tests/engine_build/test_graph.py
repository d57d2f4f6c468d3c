"""The graph description: exact figures for the real 49B config and refusals of bad configs."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest

from engine_build.graph import AttentionKind, FFNKind, GraphConfigError, ModelGraph, ffn_width
from engine_build.summary import summarize
from engine_build.synthetic import synthetic_config
from tests.conftest import SMOLLM2_LLAMA_CONFIG


@pytest.fixture(scope="module")
def reference(reference_config) -> dict:
    return json.loads(reference_config.read_text())


def test_reference_49b_summary_matches_the_field_guide(reference):
    summary = summarize(ModelGraph.from_hf_config(reference))
    assert summary.parameters == 49_867_145_216
    assert summary.attention_layers == 49
    assert summary.no_attention_layers == 31
    assert summary.kv_bytes_per_token["bf16"] == 200_704
    assert summary.uniform_kv_bytes_per_token_bf16 == 327_680
    assert round(summary.weight_bytes["bf16"] / 1e9, 2) == 99.73
    assert 51e9 < summary.weight_bytes["fp8"] < 53e9


def test_reference_49b_layers_without_attention_are_the_known_ones(reference):
    graph = ModelGraph.from_hf_config(reference)
    no_attention = [i for i, b in enumerate(graph.blocks) if b.attention.kind is AttentionKind.NONE]
    assert no_attention == [6, 7, 11, *range(42, 52), *range(53, 71)]
    assert set(graph.kv_heads_per_layer) == {0, 8}
    widths = {b.ffn.intermediate_size for b in graph.blocks}
    assert widths == {28672, 17920, 14336, 7168, 5632, 2816}


def test_width_rule_rounds_up_to_a_multiple_of_256():
    assert ffn_width(5.25, 8192) == 28672
    assert ffn_width(2.625, 8192) == 14336
    assert ffn_width(2.0, 64) == 256
    assert ffn_width(7.0, 64) == 512


def test_llama_config_is_the_all_regular_special_case():
    graph = ModelGraph.from_hf_config(SMOLLM2_LLAMA_CONFIG)
    assert graph.num_layers == 30
    assert {b.attention.kind for b in graph.blocks} == {AttentionKind.GQA}
    assert set(graph.kv_heads_per_layer) == {3}
    assert {(b.ffn.kind, b.ffn.intermediate_size) for b in graph.blocks} == {(FFNKind.SWIGLU, 1536)}
    assert summarize(graph).parameters == 134_515_008  # SmolLM2-135M, tied embeddings


def test_graph_is_immutable(reference):
    graph = ModelGraph.from_hf_config(reference)
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.hidden_size = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        graph.blocks[0].attention.num_kv_heads = 1  # type: ignore[misc]


def test_synthetic_config_mixes_every_block_kind():
    graph = ModelGraph.from_hf_config(synthetic_config())
    kinds = {(b.attention.kind, b.ffn.kind) for b in graph.blocks}
    assert {k for k, _ in kinds} == set(AttentionKind)
    assert {k for _, k in kinds} == set(FFNKind)
    assert len({kv for kv in graph.kv_heads_per_layer if kv}) >= 3
    assert len({b.ffn.intermediate_size for b in graph.blocks if b.ffn.intermediate_size}) == 2


def _edited(reference: dict, layer: int, part: str, **fields) -> dict:
    config = copy.deepcopy(reference)
    config["block_configs"][layer][part].update(fields)
    return config


@pytest.mark.parametrize(
    ("layer", "part", "fields", "expected"),
    [
        (3, "attention", {"sparsify": ["attn"]}, r"block_configs\[3\]\.attention\.sparsify"),
        (5, "attention", {"window_length": 4096}, r"block_configs\[5\]\.attention\.window_length"),
        (9, "attention", {"num_sink_tokens": 4}, r"block_configs\[9\]\.attention\.num_sink_tokens"),
        (
            2,
            "attention",
            {"unshifted_sink": True},
            r"block_configs\[2\]\.attention\.unshifted_sink",
        ),
        (4, "ffn", {"sparsify": ["ffn"]}, r"block_configs\[4\]\.ffn\.sparsify"),
        (
            1,
            "attention",
            {"n_heads_in_group": None},
            r"block_configs\[1\]\.attention\.n_heads_in_group",
        ),
        (
            1,
            "attention",
            {"n_heads_in_group": 7},
            r"block_configs\[1\]\.attention\.n_heads_in_group",
        ),
        (8, "ffn", {"ffn_mult": None}, r"block_configs\[8\]\.ffn\.ffn_mult"),
        (
            0,
            "attention",
            {"replace_with_linear": True, "no_op": True},
            r"block_configs\[0\]\.attention: no_op",
        ),
        (0, "ffn", {"gated": False}, r"block_configs\[0\]\.ffn\.gated: unknown field"),
    ],
)
def test_unsupported_or_inconsistent_block_fields_name_layer_and_field(
    reference, layer, part, fields, expected
):
    with pytest.raises(GraphConfigError, match=expected):
        ModelGraph.from_hf_config(_edited(reference, layer, part, **fields))


def test_wrong_block_configs_length_is_refused(reference):
    config = copy.deepcopy(reference)
    config["block_configs"] = config["block_configs"][:79]
    with pytest.raises(GraphConfigError, match="has 79 entries but num_hidden_layers is 80"):
        ModelGraph.from_hf_config(config)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("hidden_size", None, "hidden_size: missing"),
        ("model_type", "mistral", "model_type: 'mistral' is not supported"),
        ("hidden_act", "gelu", "hidden_act: 'gelu' is not supported"),
        ("sliding_window", 4096, "sliding_window: 4096 is not supported"),
        (
            "rope_scaling",
            {"rope_type": "yarn", "factor": 4.0},
            "rope_type: 'yarn' is not supported",
        ),
        ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope_scaling.low_freq_factor"),
        ("block_configs", None, "block_configs: missing"),
    ],
)
def test_bad_global_fields_are_refused_with_the_field_name(reference, key, value, expected):
    config = copy.deepcopy(reference)
    config[key] = value
    with pytest.raises(GraphConfigError, match=expected):
        ModelGraph.from_hf_config(config)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(GraphConfigError, match="no such config file"):
        ModelGraph.from_path(tmp_path)


def test_transformers_5_rope_parameters_are_read(reference):
    config = copy.deepcopy(reference)
    scaling = config.pop("rope_scaling")
    theta = config.pop("rope_theta")
    config["rope_parameters"] = {**scaling, "rope_theta": theta}
    graph = ModelGraph.from_hf_config(config)
    assert graph.rope_theta == 500000.0
    assert graph.rope_scaling is not None and graph.rope_scaling.factor == 8.0


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("attn_logit_softcapping", 50.0, "attn_logit_softcapping: 50.0 is not supported"),
        ("partial_rotary_factor", 0.5, "partial_rotary_factor: 0.5 is not supported"),
        ("quantization_config", {"quant_method": "fp8"}, "quantization_config: .* not supported"),
        ("head_dim", 127, "head_dim: 127 must be even"),
        ("head_dim", 16.7, "head_dim: 16.7 must be a positive integer"),
        ("tie_word_embeddings", "false", "tie_word_embeddings: 'false' must be true or false"),
        ("eos_token_id", "2", "eos_token_id: '2' must be a token id"),
        ("eos_token_id", True, "eos_token_id: True must be a token id"),
        ("rms_norm_eps", float("nan"), "rms_norm_eps: nan must be a finite positive number"),
        ("max_position_embeddings", 0, "max_position_embeddings: 0 must be a positive integer"),
        ("rope_scaling", "llama3", "rope_scaling: 'llama3' must be an object or null"),
    ],
)
def test_malformed_values_are_refused_with_the_field_name(reference, key, value, expected):
    config = copy.deepcopy(reference)
    config[key] = value
    with pytest.raises(GraphConfigError, match=expected):
        ModelGraph.from_hf_config(config)


def test_a_config_that_is_not_an_object_is_refused():
    with pytest.raises(GraphConfigError, match="expected a JSON object, got list"):
        ModelGraph.from_hf_config([])  # type: ignore[arg-type]


def test_strings_are_not_booleans_in_block_configs(reference):
    with pytest.raises(GraphConfigError, match=r"block_configs\[4\]\.attention\.no_op: 'false'"):
        ModelGraph.from_hf_config(_edited(reference, 4, "attention", no_op="false"))


def test_an_infinite_ffn_mult_is_refused(reference):
    with pytest.raises(GraphConfigError, match=r"block_configs\[2\]\.ffn\.ffn_mult: inf"):
        ModelGraph.from_hf_config(_edited(reference, 2, "ffn", ffn_mult=float("inf")))
