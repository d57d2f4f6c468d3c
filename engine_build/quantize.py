"""Precision conversion of engine weights: bf16/fp32 casts and FP8 e4m3 with per-channel scales.

FP8 applies to the matrices of linear layers only; embeddings, lm_head and norms stay bf16.
Each FP8 matrix `X.weight` [out, in] is stored with `X.weight_scale` [out] (fp32) such that
weight ~= fp8.float() * scale[:, None].
"""

from __future__ import annotations

import torch
from torch import Tensor

from engine_build.profiles import Dtype
from engine_build.weights import WeightRole, role_of

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
SCALE_SUFFIX = "_scale"

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


def convert_precision(tensors: dict[str, Tensor], weights: Dtype) -> dict[str, Tensor]:
    """Cast every tensor for storage in `weights` precision (FP8: linear matrices only)."""
    converted: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if weights is Dtype.FP8 and role_of(name) is WeightRole.LINEAR:
            converted[name], converted[name + SCALE_SUFFIX] = quantize_fp8(tensor)
        elif weights is Dtype.FP8:
            converted[name] = tensor.to(torch.bfloat16).contiguous()
        else:
            converted[name] = tensor.to(TORCH_DTYPES[weights]).contiguous()
    return converted


def restore_compute_dtype(tensors: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """Dequantize FP8 matrices (consuming their scales) and cast everything to `dtype`."""
    restored: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        restored[name] = (
            dequantize_fp8(tensor, scale, dtype) if scale is not None else tensor.to(dtype)
        )
    return restored
