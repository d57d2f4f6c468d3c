"""The Nemotron-NAS decoder in PyTorch, built layer by layer from a `ModelGraph`.

Reads top-down: model -> block -> residual parts (attention or FFN) -> norm -> RoPE. A layer's
kind is decided when it is built: a no-op part simply does not exist, a linear replacement is
one matrix, and only GQA parts touch the KV cache. The module holds no scheduling and no
distributed code; it runs one forward step over a (possibly padded) batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine_build.checkpoint import Checkpoint
from engine_build.graph import AttentionKind, BlockSpec, FFNKind, ModelGraph
from engine_build.kv_cache import KVCache, StepAttention
from engine_build.weights import EMBEDDING, LM_HEAD, module_name


@dataclass(frozen=True)
class StepContext:
    """What every part of one forward step shares: rotary angles and the step's attention."""

    cos: Tensor  # [batch, seq, 1, head_dim]
    sin: Tensor  # [batch, seq, 1, head_dim]
    attention: StepAttention


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in fp32 like the reference implementation."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """Normalize the last dimension and scale."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """RoPE angles for absolute positions, with optional Llama-3 frequency scaling."""

    def __init__(self, graph: ModelGraph) -> None:
        super().__init__()
        # Explicit device: this buffer is computed, never loaded, even when params are on meta.
        self.register_buffer("inv_freq", rope_inv_freq(graph), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin of shape [batch, seq, 1, head_dim] for integer `positions` [batch, seq]."""
        freqs = positions[..., None].float() * self.inv_freq  # [batch, seq, head_dim / 2]
        angles = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_inv_freq(graph: ModelGraph) -> Tensor:
    """Inverse frequencies per rotary pair, Llama-3 scaled when the graph says so."""
    dim = graph.head_dim
    inv_freq = 1.0 / (
        graph.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    )
    scaling = graph.rope_scaling
    if scaling is None:
        return inv_freq
    old_context = scaling.original_max_position_embeddings
    low_wavelen = old_context / scaling.low_freq_factor
    high_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate `x` [batch, seq, heads, head_dim] by the angles (half-split pairing, HF layout)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Linear(nn.Linear):
    """A bias-free linear layer whose one-row bf16 products use the matrix-vector kernel.

    Decoding one token multiplies a single row; bf16 rows go through `torch.mv` (on an Intel
    Xeon with AMX about a third faster than the matrix-matrix path, on an AMD EPYC about twice
    slower). This is the default only: on CPU the runtime times the candidates on the machine
    it runs on and installs the fastest per row count (service/runtime/kernels.py).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x @ weight.T."""
        if x.numel() == self.in_features and x.dtype == torch.bfloat16:
            return torch.mv(self.weight, x.reshape(-1)).reshape(*x.shape[:-1], -1)
        return F.linear(x, self.weight)


class Attention(nn.Module):
    """Grouped-query self-attention with this layer's own KV-head count."""

    def __init__(self, graph: ModelGraph, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads = graph.num_attention_heads
        self.kv_heads = graph.blocks[layer].attention.num_kv_heads
        self.head_dim = graph.head_dim
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.qkv = Linear(graph.hidden_size, q_dim + 2 * kv_dim)
        self.o = Linear(q_dim, graph.hidden_size)
        self.split = (q_dim, kv_dim, kv_dim)

    def forward(self, x: Tensor, step: StepContext) -> Tensor:
        """Attend over the cached keys of this layer plus the new ones."""
        batch, seq, _ = x.shape
        q_dim, kv_dim, _ = self.split
        qk, v = self.qkv(x).split((q_dim + kv_dim, kv_dim), dim=-1)
        # q and k heads rotate together: one RoPE application per layer.
        qk = apply_rope(
            qk.view(batch, seq, self.heads + self.kv_heads, self.head_dim), step.cos, step.sin
        )
        q, k = qk.split((self.heads, self.kv_heads), dim=2)
        v = v.view(batch, seq, self.kv_heads, self.head_dim)
        out = step.attention.attend(self.layer, q, k, v)  # [batch, seq, heads, head_dim]
        return self.o(out.reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    """The gated feed-forward network with this layer's own width."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.gate_up = Linear(hidden, 2 * width)
        self.down = Linear(width, hidden)

    def forward(self, x: Tensor, step: StepContext) -> Tensor:
        """down(silu(gate(x)) * up(x))."""
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class LinearMap(nn.Module):
    """One hidden x hidden matrix: the NAS replacement for attention or for an FFN."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = Linear(hidden, hidden)

    def forward(self, x: Tensor, step: StepContext) -> Tensor:
        """proj(x)."""
        return self.proj(x)


class Residual(nn.Module):
    """x + body(norm(x)): the pre-norm residual wrapper shared by every present part."""

    def __init__(self, hidden: int, eps: float, body: nn.Module) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden, eps)
        self.body = body

    def forward(self, x: Tensor, step: StepContext) -> Tensor:
        """Apply the part and add the residual."""
        return x + self.body(self.norm(x), step)


class Block(nn.Module):
    """One decoder layer: an ordered set of present parts (attention, then FFN)."""

    def __init__(self, graph: ModelGraph, layer: int) -> None:
        super().__init__()
        self.parts = nn.ModuleDict(_build_parts(graph, layer, graph.blocks[layer]))

    def forward(self, x: Tensor, step: StepContext) -> Tensor:
        """Run the present parts in order; a layer with none passes x through."""
        for part in self.parts.values():
            x = part(x, step)
        return x


def _build_parts(graph: ModelGraph, layer: int, spec: BlockSpec) -> dict[str, nn.Module]:
    hidden, eps = graph.hidden_size, graph.rms_norm_eps
    attention = {
        AttentionKind.GQA: lambda: Attention(graph, layer),
        AttentionKind.LINEAR: lambda: LinearMap(hidden),
    }
    ffn = {
        FFNKind.SWIGLU: lambda: SwiGLU(hidden, spec.ffn.intermediate_size),
        FFNKind.LINEAR: lambda: LinearMap(hidden),
    }
    parts: dict[str, nn.Module] = {}
    if spec.attention.kind in attention:
        parts["attention"] = Residual(hidden, eps, attention[spec.attention.kind]())
    if spec.ffn.kind in ffn:
        parts["ffn"] = Residual(hidden, eps, ffn[spec.ffn.kind]())
    return parts


class NemotronModel(nn.Module):
    """The whole decoder: embeddings, heterogeneous blocks, final norm and LM head."""

    def __init__(self, graph: ModelGraph) -> None:
        super().__init__()
        self.graph = graph
        self.embed = nn.Embedding(graph.vocab_size, graph.hidden_size)
        self.rotary = RotaryEmbedding(graph)
        self.layers = nn.ModuleList(Block(graph, i) for i in range(graph.num_layers))
        self.norm = RMSNorm(graph.hidden_size, graph.rms_norm_eps)
        self.lm_head = Linear(graph.hidden_size, graph.vocab_size)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (and of the KV cache this model allocates)."""
        return self.embed.weight.dtype

    def new_cache(self, batch_size: int, capacity: int) -> KVCache:
        """A KV cache for `batch_size` sequences of `capacity` tokens, attention layers only."""
        return KVCache(self.graph, batch_size, capacity, self.dtype, self.embed.weight.device)

    def forward(
        self,
        tokens: Tensor,
        cache: KVCache | None = None,
        input_lengths: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Logits for `tokens` [batch, seq] (right-padded to `input_lengths`), appended to `cache`.

        Returns [batch, seq, vocab], or [batch, 1, vocab] at each row's last real token when
        `last_only` is set.
        """
        batch, seq = tokens.shape
        cache = cache if cache is not None else self.new_cache(batch, seq)
        if input_lengths is None:
            input_lengths = torch.full((batch,), seq, dtype=torch.long, device=tokens.device)
        select = None
        if last_only:
            rows = torch.arange(batch, device=tokens.device)
            select = rows * seq + input_lengths - 1
        logits = self.forward_step(tokens, cache.step(seq, input_lengths), select)
        cache.commit(input_lengths)
        return logits.view(batch, 1, -1) if last_only else logits

    def forward_step(
        self, tokens: Tensor, attention: StepAttention, select: Tensor | None = None
    ) -> Tensor:
        """One step over `tokens` [batch, seq] with a prepared attention (any KV-cache layout).

        Returns logits [batch, seq, vocab], or [len(select), vocab] for the flattened
        (batch * seq) token rows in `select` (the only rows that need the LM head).
        """
        cos, sin = self.rotary(attention.positions, self.dtype)
        step = StepContext(cos, sin, attention)
        hidden = self.embed(tokens)  # [batch, seq, hidden]
        for layer in self.layers:
            hidden = layer(hidden, step)
        if select is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])[select]  # [rows, hidden]
        return self.lm_head(self.norm(hidden))

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
    ) -> NemotronModel:
        """Load a validated HF-named safetensors checkpoint, fusing q/k/v and gate/up."""
        checkpoint = Checkpoint.open(directory)
        with torch.device("meta"):
            model = cls(checkpoint.graph)
        state = map_to_module_names(checkpoint.read_fused(dtype), checkpoint.graph)
        model.load_state_dict(state, strict=True, assign=True)
        return model.to(device).eval().requires_grad_(False)


def map_to_module_names(tensors: dict[str, Tensor], graph: ModelGraph) -> dict[str, Tensor]:
    """Rename fused HF tensors to this module's parameter names.

    A tied graph's lm_head is the embedding, unless the engine stores one of its own (an int4
    engine's int8 copy, engine_build/summary.py `stores_own_lm_head`).
    """
    state = {module_name(name): tensor for name, tensor in tensors.items()}
    if graph.tie_word_embeddings:
        state.setdefault(LM_HEAD.module, state[EMBEDDING.module])
    return state
