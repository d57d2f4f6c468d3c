"""Precision conversion of engine weights: bf16/fp32 casts, FP8 e4m3 and weight-only int8/int4.

FP8 applies to the matrices of linear layers only; embeddings, lm_head and norms stay bf16.
Each FP8 matrix `X.weight` [out, in] is stored with `X.weight_scale` [out] (fp32) such that
weight ~= fp8.float() * scale[:, None].

Weight-only formats (the cpu profile's `int8` and `int4`), stored as:
- int8: `X.weight` int8 [out, in] and `X.weight_scale` fp32 [out], symmetric per output
  channel: weight ~= q * scale[:, None], q in [-127, 127].
- int4: `X.weight` uint8 [out, in / 2] (two 4-bit values per byte, the even input column in the
  low nibble), `X.weight_scale` and `X.weight_min` fp32 [out, in / 32]: per group of 32
  consecutive inputs, weight ~= q * scale + min, q in [0, 15], scale = (max - min) / 15,
  min = the group's minimum. This is GGUF's Q4_1 block exactly, so an int4 engine built from
  the embedded model's import (its fp32 dequantization) holds the GGUF's own 4-bit values,
  scales and minimums: re-deriving them from a group's minimum and maximum is lossless there
  (tests/engine_build/test_quantize.py checks it on the real file).
The embedding table and the norms stay bf16 in both; the lm_head stays bf16 in int8 engines
and is stored as int8 (per output channel, as above) in int4 engines (`stored_dtype` in
engine_build/summary.py). On the embedded model's perplexity (bench/quality.py) an int8 lm_head
added +0.54% against fp32 (int8 engine +0.75% with it, +0.21% without; int4 +0.60% with it,
+0.08% without): beyond the 0.5% int8 is allowed, inside int4's 2%; it saves a quarter of the
bytes an int4 decode step reads. A group-32 int4 lm_head added +6%.
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine_build.profiles import WEIGHT_ONLY, Dtype
from engine_build.summary import INT4_GROUP, INT4_ROWS, stored_dtype
from engine_build.weights import WeightRole, role_of

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
SCALE_SUFFIX = "_scale"
MIN_SUFFIX = "_min"
INT8_MAX = 127

TORCH_DTYPES: dict[Dtype, torch.dtype] = {
    Dtype.BF16: torch.bfloat16,
    Dtype.FP32: torch.float32,
    Dtype.FP8: FP8_DTYPE,
}


def quantize_fp8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(e4m3 weight, fp32 per-output-channel scale) for a [out, in] matrix."""
    w = weight.float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_fp8(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """Back to `dtype` for compute."""
    return (weight.float() * scale.float()[:, None]).to(dtype)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 weight, fp32 per-output-channel scale) for a [out, in] matrix, symmetric."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / INT8_MAX
    return torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_int4(weight: Tensor, group: int = INT4_GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """(packed uint8 [out, in/2], fp32 scale [out, in/group], fp32 min [out, in/group])."""
    out, inputs = weight.shape
    if inputs % group or out % INT4_ROWS:
        raise ValueError(
            f"int4 needs input widths divisible by {group} and output widths by {INT4_ROWS} (the "
            f"CPU kernel's layout); this matrix is {out} x {inputs}"
        )
    w = weight.float().reshape(out, inputs // group, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    scale = (high - low) / 15
    steps = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round((w - low[..., None]) / steps[..., None]).clamp(0, 15).to(torch.uint8)
    q = q.reshape(out, inputs)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, low


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 [out, in/2] -> the 4-bit values as uint8 [out, in]."""
    values = torch.stack((packed & 0xF, packed >> 4), dim=-1)
    return values.reshape(packed.shape[0], -1)


def dequantize_int8(weight: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The int8 matrix as `dtype`."""
    return (weight.float() * scale.float()[:, None]).to(dtype)


def dequantize_int4(packed: Tensor, scale: Tensor, low: Tensor, dtype: torch.dtype) -> Tensor:
    """The int4 matrix as `dtype`."""
    q = unpack_int4(packed).float()
    out, inputs = q.shape
    groups = scale.shape[1]
    w = q.reshape(out, groups, inputs // groups) * scale[..., None] + low[..., None]
    return w.reshape(out, inputs).to(dtype)


def _weight_only(name: str, tensor: Tensor, weights: Dtype) -> dict[str, Tensor]:
    """Storage of one tensor in an int8 or int4 engine (`stored_dtype` says which format)."""
    stored = stored_dtype(role_of(name), weights.value)
    if stored == Dtype.INT4:
        packed, scale, low = quantize_int4(tensor)
        return {name: packed, name + SCALE_SUFFIX: scale, name + MIN_SUFFIX: low}
    if stored == Dtype.INT8:
        q, scale = quantize_int8(tensor)
        return {name: q, name + SCALE_SUFFIX: scale}
    return {name: tensor.to(torch.bfloat16).contiguous()}


def convert_precision(tensors: dict[str, Tensor], weights: Dtype) -> dict[str, Tensor]:
    """Cast every tensor for storage in `weights` precision (fp8/int8/int4: linear matrices)."""
    converted: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if weights in WEIGHT_ONLY:
            converted.update(_weight_only(name, tensor, weights))
        elif weights is Dtype.FP8 and role_of(name) is WeightRole.LINEAR:
            converted[name], converted[name + SCALE_SUFFIX] = quantize_fp8(tensor)
        elif weights is Dtype.FP8:
            converted[name] = tensor.to(torch.bfloat16).contiguous()
        else:
            converted[name] = tensor.to(TORCH_DTYPES[weights]).contiguous()
    return converted


def compute_dtype(weights: Dtype) -> torch.dtype:
    """The dtype the torch runtime computes in: fp32 for fp32 engines, else bf16."""
    return torch.float32 if weights is Dtype.FP32 else torch.bfloat16


def restore_compute_dtype(tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Dequantize every quantized matrix (consuming its scales) and cast everything to `dtype`."""
    plain, quantized = split_weight_only(tensors)
    restored = {name: tensor.to(dtype) for name, tensor in plain.items()}
    for name, parts in quantized.items():
        restored[name] = dequantize(parts, dtype)
    return restored


def split_weight_only(
    tensors: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """(plain tensors, {matrix name: its stored parts}) of an engine rank's tensors.

    A matrix's parts are `weight` and `scale` (fp8, int8) plus `min` (int4).
    """
    plain: dict[str, Tensor] = {}
    quantized: dict[str, dict[str, Tensor]] = {}
    for name, tensor in tensors.items():
        if name.endswith((SCALE_SUFFIX, MIN_SUFFIX)):
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        if scale is None:
            plain[name] = tensor
            continue
        parts = {"weight": tensor, "scale": scale}
        if (low := tensors.get(name + MIN_SUFFIX)) is not None:
            parts["min"] = low
        quantized[name] = parts
    return plain, quantized


def dequantize(parts: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    """One stored matrix (fp8, int8 or int4 parts) as `dtype`."""
    weight, scale = parts["weight"], parts["scale"]
    if "min" in parts:
        return dequantize_int4(weight, scale, parts["min"], dtype)
    if weight.dtype == torch.int8:
        return dequantize_int8(weight, scale, dtype)
    return dequantize_fp8(weight, scale, dtype)
