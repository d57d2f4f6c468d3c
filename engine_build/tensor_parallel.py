"""Tensor parallelism as a transform of a finished rank-local model (no changes to the model).

Which layers turn row-parallel comes from the weight table's sharding rules, as do the slices
each rank loads (`engine_build.sharding`).

Row-parallel layers (o_proj, down_proj, linear replacements) all-reduce their partial sums; the
embedding looks up only its vocabulary slice and all-reduces; the LM head all-gathers the
vocabulary slices of the logits. Works with any torch.distributed backend: gloo on CPU, NCCL
on GPU.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from engine_build.graph import ModelGraph
from engine_build.model import NemotronModel
from engine_build.weights import ShardRule, module_names


class RowParallelLinear(nn.Linear):
    """A linear layer holding an input-column slice; outputs are summed over ranks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group: dist.ProcessGroup | None,
        input_slice: slice | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.group, self.input_slice = group, input_slice

    def forward(self, x: Tensor) -> Tensor:
        """Partial product of this rank's columns, all-reduced."""
        if self.input_slice is not None:  # the input is replicated: take this rank's columns
            x = x[..., self.input_slice]
        return _all_reduce(F.linear(x, self.weight), self.group)


class VocabParallelEmbedding(nn.Embedding):
    """An embedding holding rows [start, start + rows); other ids contribute zeros."""

    def __init__(self, rows: int, dim: int, start: int, group: dist.ProcessGroup | None) -> None:
        super().__init__(rows, dim)
        self.start, self.group = start, group

    def forward(self, ids: Tensor) -> Tensor:
        """Look up local ids, zero the rest, all-reduce."""
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return _all_reduce(out.masked_fill(outside[..., None], 0.0), self.group)


class GatheredLMHead(nn.Linear):
    """The LM head for this rank's vocabulary slice; logits are gathered over ranks."""

    def __init__(
        self, in_features: int, out_features: int, group: dist.ProcessGroup | None
    ) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        """Local logits [..., vocab / tp] -> all logits [..., vocab]."""
        local = F.linear(x, self.weight).contiguous()
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)


def _all_reduce(tensor: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    dist.all_reduce(tensor, group=group)
    return tensor


def parallelize(
    model: NemotronModel,
    graph: ModelGraph,
    rank: int,
    tp: int,
    group: dist.ProcessGroup | None = None,
) -> NemotronModel:
    """Swap a rank-local model's layers for their parallel forms (call before loading weights).

    `graph` is the whole model's graph; `model` was built from its rank-local graph. Which
    layers become row-parallel is the weight table's `ShardRule` of their weights.
    """
    hidden, device = graph.hidden_size, model.embed.weight.device
    width = hidden // tp
    with torch.device(device):
        for name in module_names(graph, ShardRule.COLUMNS):  # their input arrives split
            local = model.get_submodule(name)
            _replace(model, name, RowParallelLinear(local.in_features, hidden, group))
        for name in module_names(graph, ShardRule.COLUMNS_OF_FULL_INPUT):
            columns = slice(rank * width, (rank + 1) * width)
            _replace(model, name, RowParallelLinear(width, hidden, group, columns))
        rows = graph.vocab_size // tp
        model.embed = VocabParallelEmbedding(rows, hidden, rank * rows, group)
        model.lm_head = GatheredLMHead(hidden, rows, group)
    return model


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent), attribute, module)
