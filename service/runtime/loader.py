"""Loading a built engine for one tensor-parallel rank: find, verify, build the model, load."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from engine_build.backends.torch_engine import EngineFormatError, TorchEngine
from engine_build.model import NemotronModel, map_to_module_names
from engine_build.profiles import WEIGHT_ONLY
from engine_build.quantize import compute_dtype, restore_compute_dtype, split_weight_only
from engine_build.repository import EngineEntry, EngineRepository, EngineRequirement
from engine_build.sharding import rank_graph
from engine_build.tensor_parallel import parallelize
from engine_build.weights import LM_HEAD, module_name
from service.runtime.quantized import quantized_linear


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
    dtype = compute_dtype(engine.precision.weights)  # FP8 is dequantized to bf16 here
    if engine.precision.weights not in WEIGHT_ONLY:
        tensors = restore_compute_dtype(engine.read_rank(rank), dtype)
        model.load_state_dict(map_to_module_names(tensors, local), strict=True, assign=True)
        return model.to(device).eval().requires_grad_(False)
    if device != "cpu" or tp > 1:
        raise EngineFormatError(
            f"{engine_dir}: {engine.precision.weights} engines run on one CPU process only (CPU "
            f"kernels, no tensor-parallel split); this one has device {device}, "
            f"tensor_parallel {tp}"
        )
    plain, quantized = split_weight_only(engine.read_rank(rank))
    state = map_to_module_names({name: t.to(dtype) for name, t in plain.items()}, local)
    if LM_HEAD.name in quantized:  # a tied graph's lm_head stored quantized: not the embedding
        state.pop(LM_HEAD.module, None)
    while quantized:  # each matrix's stored parts are dropped once its module holds them
        name, parts = quantized.popitem()
        path = module_name(name).removesuffix(".weight")
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized_linear(parts, dtype))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
