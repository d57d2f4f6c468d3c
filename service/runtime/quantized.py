"""Linear layers over weight-only int8 and int4 matrices, multiplied as stored (CPU).

The matrices come from an int8 or int4 engine (engine_build/quantize.py has the storage
format). PyTorch's CPU kernels multiply bf16 activations by them without a bf16 copy of the
weights: `_weight_int8pack_mm` (per-channel scales) and `_weight_int4pack_mm_for_cpu` (groups
with a scale and a zero point each, on a weight layout packed at load for this CPU).

Where rounding enters (besides the quantization itself): for torch's kernels, the stored fp32
scales (and, for int4, minimums) become bf16, because they take them in the activations' dtype;
the native kernels (service/runtime/native) take them as stored, in fp32. For an
int4 engine built from the embedded GGUF the stored values are the GGUF's fp16 scales and
minimums exactly; for torch's kernels this bf16 conversion is their only rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from engine_build.quantize import dequantize_int4, unpack_int4
from service.runtime import native

INT4_INNER_K_TILES = 1  # the CPU packing ignores tiling; the argument is required


class Int8Linear(nn.Module):
    """x @ (q * scale).T with q int8 [out, in] and a scale per output channel."""

    def __init__(self, weight: Tensor, scale: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        # A fresh (64-byte aligned) copy: a tensor read from safetensors can start at any byte
        # offset of the file's buffer, and the kernel's vector loads then crash (seen: an int8
        # lm_head after the odd-sized int4 tensors of an int4 engine, SIGSEGV).
        aligned = torch.empty_like(weight, memory_format=torch.contiguous_format)
        self.register_buffer("weight_int8", aligned.copy_(weight), persistent=False)
        self.register_buffer("scale", scale.to(dtype).contiguous(), persistent=False)
        # The stored fp32 scales, for the native kernel (which takes them unrounded).
        self.register_buffer("scale_fp32", scale.float().contiguous(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]."""
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.scale)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The matrix as `dtype` (q * scale, the scale as the kernel holds it)."""
        return (self.weight_int8.float() * self.scale.float()[:, None]).to(dtype)

    def release_sources(self) -> None:
        """Nothing beyond the kernel's own tensors is held."""

    def native_operands(self) -> tuple[Tensor, Tensor] | None:
        """`torch.ops.nemotron.int8_matmul`'s weight and fp32 scales."""
        return self.weight_int8, self.scale_fp32

    def drop_kernel_layout(self) -> None:
        """torch's kernel will not be called: its bf16 scales go (the weights are shared)."""
        self.scale = torch.empty(0)


class Int4Linear(nn.Module):
    """x @ (q * scale + min).T with q 4-bit [out, in] and a scale and minimum per input group."""

    def __init__(self, packed: Tensor, scale: Tensor, low: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        values = unpack_int4(packed)
        self.out_features, self.in_features = values.shape
        self.group = self.in_features // scale.shape[1]
        kernel_layout = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            values.to(torch.int32).contiguous(), INT4_INNER_K_TILES
        )
        # The kernel computes (q - 8) * scale + zero: zero = min + 8 * scale, in fp32, then
        # [groups, out, 2] in the activations' dtype.
        scale32, low32 = scale.float(), low.float()
        scales_and_zeros = torch.stack((scale32, low32 + 8 * scale32), dim=-1).transpose(0, 1)
        self.register_buffer("weight_int4", kernel_layout, persistent=False)
        # The stored values, for a dequantized copy (service/runtime/kernels.py) until released:
        # the kernel's packed layout is its own.
        self.sources: tuple[Tensor, Tensor, Tensor] | None = (packed, scale, low)
        self.register_buffer(
            "scales_and_zeros", scales_and_zeros.to(dtype).contiguous(), persistent=False
        )

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The matrix as `dtype`, from the stored values (before `release_sources`)."""
        if self.sources is None:
            raise RuntimeError("the int4 matrix's stored values were released")
        return dequantize_int4(*self.sources, dtype)

    def release_sources(self) -> None:
        """Drop the stored values once no copy will be made (they double the int4 memory)."""
        self.sources = None

    def native_operands(self) -> tuple[Tensor, Tensor, Tensor] | None:
        """`torch.ops.nemotron.int4_matmul`'s layout of the stored values (before
        `release_sources`): the GGUF's own scales and minimums, exactly, as fp32. None: the
        groups are not the kernel's 32 values."""
        if self.group != native.GROUP:
            return None
        if self.sources is None:
            raise RuntimeError("the int4 matrix's stored values were released")
        packed, scale, low = self.sources
        return native.int4_layout(unpack_int4(packed), scale, low)

    def drop_kernel_layout(self) -> None:
        """torch's kernel will not be called: free its packed copy of the weights."""
        self.weight_int4 = torch.empty(0, dtype=torch.int32)
        self.scales_and_zeros = torch.empty(0)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out]."""
        rows = x.reshape(-1, self.in_features)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.weight_int4, self.group, self.scales_and_zeros
        )
        return out.reshape(*x.shape[:-1], self.out_features)


def release_sources(model: nn.Module) -> None:
    """Free what int4 modules keep for dequantized copies (after kernel choice, if any)."""
    for module in model.modules():
        if isinstance(module, (Int8Linear, Int4Linear)):
            module.release_sources()


def quantized_linear(parts: dict[str, Tensor], dtype: torch.dtype) -> nn.Module:
    """The module for one stored int8 or int4 matrix (`split_weight_only`'s parts)."""
    if "min" in parts:
        return Int4Linear(parts["weight"], parts["scale"], parts["min"], dtype)
    if parts["weight"].dtype != torch.int8:
        raise ValueError(f"not a weight-only matrix: stored as {parts['weight'].dtype}")
    return Int8Linear(parts["weight"], parts["scale"], dtype)
