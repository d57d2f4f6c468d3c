"""Loading a built engine for one tensor-parallel rank: find, verify, build the model, load."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from engine_build.backends.torch_engine import EngineFormatError, TorchEngine
from engine_build.model import NemotronModel, map_to_module_names
from engine_build.plan import runtime_dtypes
from engine_build.quantize import TORCH_DTYPES, restore_compute_dtype
from engine_build.repository import EngineEntry, EngineRepository, EngineRequirement
from engine_build.sharding import rank_graph
from engine_build.tensor_parallel import parallelize


def select_engine(repository: str | Path, need: EngineRequirement) -> EngineEntry:
    """The verified engine that fits `need` (raises with every rejection reason otherwise)."""
    return EngineRepository(repository).select(need)


def load_rank_model(
    engine_dir: str | Path,
    rank: int = 0,
    world_size: int = 1,
    device: str = "cpu",
    group: dist.ProcessGroup | None = None,
) -> NemotronModel:
    """The PyTorch model of one rank of a torch engine (tp > 1 needs torch.distributed set up)."""
    engine = TorchEngine.open(engine_dir)
    tp = engine.tensor_parallel
    if world_size != tp:
        raise EngineFormatError(
            f"{engine_dir}: engine has tensor_parallel {tp}; it cannot be loaded by {world_size} "
            "process(es)"
        )
    graph = engine.graph
    local = rank_graph(graph, tp)
    with torch.device("meta"):
        model = NemotronModel(local)
        if tp > 1:
            parallelize(model, graph, rank, tp, group)
    dtype = TORCH_DTYPES[runtime_dtypes(engine.precision, "torch")[0]]  # FP8 computes in bf16
    tensors = restore_compute_dtype(engine.read_rank(rank), dtype)
    model.load_state_dict(map_to_module_names(tensors, local), strict=True, assign=True)
    return model.to(device).eval().requires_grad_(False)
