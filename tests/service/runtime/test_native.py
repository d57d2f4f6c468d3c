"""The native CPU kernels (service/runtime/native): built here, checked against torch."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F

from engine_build.quantize import dequantize_int4, quantize_int4, unpack_int4
from service.runtime import native
from service.runtime.compiled import gathered_attention


@pytest.fixture(scope="module")
def ops():
    """The operators, built into the test run's cache (once per machine kind and source)."""
    if not native.load():
        pytest.fail("the native kernels did not build: is g++ missing? (see the log)")
    return torch.ops.nemotron


def _close(actual: torch.Tensor, expected: torch.Tensor, share: float) -> None:
    scale = float(expected.abs().max())
    assert float((actual.float() - expected.float()).abs().max()) <= share * scale


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_matmul_is_the_dequantized_product(ops, rows, dtype):
    weight = torch.randn(96, 160)
    packed, scale, low = quantize_int4(weight)
    operands = native.int4_layout(unpack_int4(packed), scale, low)
    x = torch.randn(rows, 160).to(dtype)
    expected = F.linear(x.float(), dequantize_int4(packed, scale, low, torch.float32))
    out = ops.int4_matmul(x, *operands)
    assert out.dtype == dtype and out.shape == (rows, 96)
    # the activations enter as int16 per group of 32 (a step of max|x| / 32767): ~5e-5 of the
    # largest output here, far under the bf16 rounding of the activations the engines use
    _close(out, expected, 1e-4 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("rows", [1, 4, 6])
@pytest.mark.parametrize("in_features", [96, 100])  # groups of 32, and a last short one
def test_int8_matmul_is_the_scaled_product(ops, rows, in_features):
    weight = torch.randint(-128, 128, (64, in_features), dtype=torch.int8)
    scale = torch.rand(64) / 100
    x = torch.randn(rows, in_features).to(torch.bfloat16)
    expected = F.linear(x.float(), weight.float() * scale[:, None])
    _close(ops.int8_matmul(x, weight, scale), expected, 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
# query heads per KV head 3 (the embedded model), 8 (the 49B: two blocks of 4) and 5 (4 + 1);
# head dims with and without a remainder past the 16-lane loops
@pytest.mark.parametrize(("heads", "dim"), [(6, 64), (16, 72), (10, 36)])
def test_decode_attention_is_sdpa_over_each_rows_slots(ops, dtype, heads, dim):
    slots, kv_heads, width = 50, 2, 21
    keys = torch.randn(slots, kv_heads, dim).to(dtype) * 3  # a wide spread of scores
    values = torch.randn(slots, kv_heads, dim).to(dtype)
    q = torch.randn(3, heads, dim).to(dtype)
    lengths = torch.tensor([1, 7, 21])  # softmax: the scalar tail only, and 8-lane blocks + tail
    read = torch.randint(0, slots, (3, width))
    bias = torch.full((3, 1, 1, width), float("-inf"), dtype=dtype)
    for row, length in enumerate(lengths.tolist()):
        bias[row, ..., :length] = 0
    expected = gathered_attention(q.float(), keys.float(), values.float(), read, bias.float())
    out = ops.decode_attention(q, keys, values, read, lengths, dim**-0.5)
    assert out.dtype == dtype and out.shape == q.shape
    _close(out, expected, 1e-5 if dtype == torch.float32 else 2e-2)


def test_non_finite_activations_stay_non_finite_and_tiny_ones_stay_finite(ops):
    """The products round activations to int16 per group: a NaN or inf must not vanish in the
    rounding (fp32 arithmetic would carry it), nor may a group of tiny values overflow it."""
    x = torch.randn(3, 96)
    x[0, 5] = float("nan")
    x[1, 40] = float("inf")
    x[2] *= 1e-35  # a scale of 32767 / max|x| past float's range
    int8_weight, int8_scale = torch.randint(-128, 128, (16, 96), dtype=torch.int8), torch.rand(16)
    packed, scale, low = quantize_int4(torch.randn(16, 96))
    operands = native.int4_layout(unpack_int4(packed), scale, low)
    for out in (ops.int8_matmul(x, int8_weight, int8_scale), ops.int4_matmul(x, *operands)):
        assert not torch.isfinite(out[:2]).any()
        assert torch.isfinite(out[2]).all() and float(out[2].abs().max()) < 1e-30


def test_bad_operands_are_named_in_the_error(ops):
    values, ones = torch.zeros(8, 64, dtype=torch.uint8), torch.ones(8, 2)
    packed, scale, low = native.int4_layout(values, ones, ones)
    with pytest.raises(RuntimeError, match="x has 32 columns, the matrix 64"):
        ops.int4_matmul(torch.randn(1, 32), packed, scale, low)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.int4_matmul(torch.randn(1, 64).half(), packed, scale, low)
    with pytest.raises(RuntimeError, match="scale and low must be"):
        ops.int4_matmul(torch.randn(1, 64), packed, scale.bfloat16(), low)
    with pytest.raises(RuntimeError, match="scale must be contiguous float32"):
        ops.int8_matmul(torch.randn(1, 4), torch.zeros(2, 4, dtype=torch.int8), torch.ones(3))
    keys = torch.randn(4, 1, 8)
    q, lengths = torch.randn(1, 2, 8), torch.tensor([2])
    with pytest.raises(RuntimeError, match="slot 9 is outside the store"):
        ops.decode_attention(q, keys, keys, torch.tensor([[0, 9]]), lengths, 1.0)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        ops.decode_attention(
            torch.randn(1, 3, 8),
            torch.randn(4, 2, 8),
            torch.randn(4, 2, 8),
            torch.tensor([[0, 1]]),
            lengths,
            1.0,
        )
    with pytest.raises(ValueError, match="not a multiple of 32"):
        native.int4_layout(values[:, :48], ones[:, :1], ones[:, :1])


def test_the_operators_compile_into_a_graph(ops):
    weight = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    scale = torch.rand(16)

    def step(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(ops.int8_matmul(x * 2, weight, scale))

    x = torch.randn(2, 32)
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(x), step(x))


def test_a_second_build_reuses_the_library(ops, monkeypatch):
    root = native.default_cache_dir(os.environ) / "native"

    def no_compile(*args):
        raise AssertionError("compiled again")

    monkeypatch.setattr(native, "_command", no_compile)
    library = native._build(native.cxx_compiler(), root)
    assert library.is_file() and library.name == native.LIBRARY


def test_a_failed_build_leaves_torchs_kernels_and_says_why(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(native, "_state", {})  # this process's attempt, undone after the test
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("NEMOTRON_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="nemotron"):
        assert native.load() is False
    assert native.available() is False
    events = [r for r in caplog.records if r.getMessage() == "native_kernels_unavailable"]
    assert events and "failed" in events[0].fields["reason"]
    assert not list((tmp_path / "native").glob("*/" + native.LIBRARY))
