"""Per-GPU plans: will this graph fit this profile, and how many sequences of what length.

Computed from config.json alone. Per device: weight bytes of one rank's shard, a fixed reserve,
an activation/workspace estimate, and the KV budget = fraction x what is left. Feasibility
lists every reason a profile cannot work (tensor-parallel splits, precision, memory).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from engine_build.graph import ModelGraph
from engine_build.profiles import (
    TENSORRT_LLM_BACKENDS,
    WEIGHT_ONLY,
    DeviceKind,
    Dtype,
    Precision,
    Profile,
)
from engine_build.sharding import GPU_ALIGNMENT, kv_layout, rank_graph, shard_shapes, tp_issues
from engine_build.summary import (
    INT4_GROUP,
    INT4_ROWS,
    kv_bytes_per_token,
    stores_own_lm_head,
    tensor_bytes,
)
from engine_build.weights import EMBEDDING, WeightRole, role_of

GB = 10**9
CONTEXTS = (8192, 32768, 131072)
# Activation bytes per element while a step runs (bf16 compute, also for FP8 engines).
ACTIVATION_BYTES = 2
LOGIT_BYTES = 4


@dataclass(frozen=True)
class ProfilePlan:
    """The plan of one (graph, profile, precision)."""

    profile: str
    backend: str
    precision: str
    kv_cache_dtype: str
    tensor_parallel: int
    device: str
    memory_bytes_per_device: int
    weight_bytes_per_device: int
    reserve_bytes_per_device: int
    activation_bytes_per_device: int
    kv_budget_bytes_per_device: int
    kv_bytes_per_token_per_device: int
    kv_layouts: list[str]
    sequences_at_context: dict[int, int | None]
    feasible: bool
    reasons: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (context keys as strings)."""
        data = asdict(self)
        data["sequences_at_context"] = {str(k): v for k, v in self.sequences_at_context.items()}
        return data


def target_backend(profile: Profile) -> str:
    """The backend a profile runs by default (its `backend:`; TensorRT-LLM on GPUs, torch on
    CPUs unless it says otherwise)."""
    return profile.backend


def runtime_dtypes(precision: Precision, backend: str) -> tuple[Dtype, Dtype]:
    """(weights, KV cache) dtypes in device memory while serving.

    The torch runtime dequantizes FP8 weights to bf16 for compute and keeps its KV cache in
    the compute dtype; TensorRT-LLM keeps both as built.
    """
    if backend != "torch":
        return precision.weights, precision.kv_cache
    if precision.weights in WEIGHT_ONLY:  # multiplied as stored; activations and KV in bf16
        return precision.weights, Dtype.BF16
    compute = Dtype.BF16 if precision.weights is Dtype.FP8 else precision.weights
    return compute, compute


def weight_only_issues(shapes: dict[str, tuple[int, ...]], weights: Dtype, tp: int) -> list[str]:
    """Why int8/int4 weights cannot serve these shapes: one process, int4 kernel shapes."""
    issues = (
        [f"{weights} engines run in one process (tensor_parallel 1), not {tp}"] if tp > 1 else []
    )
    if weights is Dtype.INT4:
        issues += [
            f"{name} {shape[0]} x {shape[1]}: int4 needs inputs divisible by {INT4_GROUP} and "
            f"outputs by {INT4_ROWS}"
            for name, shape in shapes.items()
            if role_of(name) is WeightRole.LINEAR
            and (shape[1] % INT4_GROUP or shape[0] % INT4_ROWS)
        ]
    return issues


def plan_profile(
    graph: ModelGraph,
    profile: Profile,
    precision: Precision | None = None,
    backend: str | None = None,
) -> ProfilePlan:
    """Plan `graph` on `profile` (default precision; default backend of the target)."""
    precision = precision or profile.default_precision
    backend = backend or target_backend(profile)
    weights_dtype, kv_dtype = runtime_dtypes(precision, backend)
    tp = profile.tensor_parallel
    alignment = GPU_ALIGNMENT if profile.device is DeviceKind.GPU else 1
    reasons = tp_issues(graph, tp, alignment)
    if backend in TENSORRT_LLM_BACKENDS and profile.device is DeviceKind.CPU:
        reasons.append(f"backend {backend} needs NVIDIA GPUs; a cpu profile is served by torch")
    memory = int(profile.memory_gb * GB)
    reserve = int(profile.reserve_gb * GB)
    if reasons:  # no shard exists; report the reasons with whole-model figures
        return _infeasible(graph, profile, precision, backend, memory, reserve, reasons)
    local = rank_graph(graph, tp)
    shapes = shard_shapes(graph, tp)
    weights = sum(
        tensor_bytes(role_of(name), shape, weights_dtype) for name, shape in shapes.items()
    )
    if graph.tie_word_embeddings and stores_own_lm_head(graph, weights_dtype):
        weights += tensor_bytes(WeightRole.LM_HEAD, shapes[EMBEDDING.name], weights_dtype)
    if weights_dtype in WEIGHT_ONLY:
        reasons += weight_only_issues(shapes, weights_dtype, tp)
    activations = activation_bytes(local, profile)
    free = memory - weights - reserve - activations
    budget = max(0, int(free * profile.limits.kv_cache_free_fraction))
    per_token = kv_bytes_per_token(local, kv_dtype.value)
    longest = min(profile.limits.max_seq_len, graph.max_position_embeddings)
    if free <= 0:
        reasons.append(
            f"weights {weights / GB:.2f} GB + reserve {reserve / GB:.2f} GB + activations "
            f"{activations / GB:.2f} GB per device exceed {profile.memory_gb:g} GB"
        )
    elif per_token and budget < per_token * longest:
        reasons.append(
            f"KV budget {budget / GB:.2f} GB per device holds no full sequence of {longest} tokens"
        )
    return ProfilePlan(
        profile=profile.name,
        backend=backend,
        precision=precision.name,
        kv_cache_dtype=kv_dtype.value,
        tensor_parallel=tp,
        device=profile.target,
        memory_bytes_per_device=memory,
        weight_bytes_per_device=weights,
        reserve_bytes_per_device=reserve,
        activation_bytes_per_device=activations,
        kv_budget_bytes_per_device=budget,
        kv_bytes_per_token_per_device=per_token,
        kv_layouts=sorted({kv_layout(kv, tp) for kv in graph.kv_heads_per_layer if kv}),
        sequences_at_context=_sequences(graph, budget, per_token),
        feasible=not reasons,
        reasons=reasons,
    )


def activation_bytes(local: ModelGraph, profile: Profile) -> int:
    """Estimate of one step's live activations on a device, plus the logits of a full batch.

    Per token of `max_num_tokens`: the residual stream and norm outputs (4 x hidden), fused
    q/k/v and attention output of the widest attention layer, and gate/up plus the product of
    the widest FFN, all in bf16. Logits are fp32 for `max_batch_size` rows of this rank's vocab.
    """
    head_dim = local.head_dim
    q = local.num_attention_heads * head_dim
    kv = max(local.kv_heads_per_layer, default=0) * head_dim
    width = max((b.ffn.intermediate_size for b in local.blocks), default=0)
    per_token = 4 * local.hidden_size + (q + 2 * kv) + q + 3 * width
    tokens = profile.limits.max_num_tokens * per_token * ACTIVATION_BYTES
    logits = profile.limits.max_batch_size * local.vocab_size * LOGIT_BYTES
    return tokens + logits


def _sequences(graph: ModelGraph, budget: int, per_token: int) -> dict[int, int | None]:
    """How many sequences of each context fit; None beyond the model's context window."""
    return {
        ctx: (budget // (per_token * ctx) if per_token else None)
        if ctx <= graph.max_position_embeddings
        else None
        for ctx in CONTEXTS
    }


def _infeasible(
    graph: ModelGraph,
    profile: Profile,
    precision: Precision,
    backend: str,
    memory: int,
    reserve: int,
    reasons: list[str],
) -> ProfilePlan:
    return ProfilePlan(
        profile=profile.name,
        backend=backend,
        precision=precision.name,
        kv_cache_dtype=runtime_dtypes(precision, backend)[1].value,
        tensor_parallel=profile.tensor_parallel,
        device=profile.target,
        memory_bytes_per_device=memory,
        weight_bytes_per_device=0,
        reserve_bytes_per_device=reserve,
        activation_bytes_per_device=0,
        kv_budget_bytes_per_device=0,
        kv_bytes_per_token_per_device=0,
        kv_layouts=[],
        sequences_at_context=dict.fromkeys(CONTEXTS),
        feasible=False,
        reasons=reasons,
    )


def format_plans(plans: list[ProfilePlan]) -> str:
    """The human table of `nemotron-build plan`, one column per profile, reasons below."""

    def gb(value: int) -> str:
        return f"{value / GB:.2f}"

    rows = [
        ("profile", [p.profile for p in plans]),
        ("backend", [p.backend for p in plans]),
        ("precision (built / kv)", [f"{p.precision}/{p.kv_cache_dtype}" for p in plans]),
        ("tensor parallel", [str(p.tensor_parallel) for p in plans]),
        ("device", [p.device for p in plans]),
        ("memory GB/device", [gb(p.memory_bytes_per_device) for p in plans]),
        ("weights GB/device", [gb(p.weight_bytes_per_device) for p in plans]),
        ("reserve GB/device", [gb(p.reserve_bytes_per_device) for p in plans]),
        ("activations GB/device", [gb(p.activation_bytes_per_device) for p in plans]),
        ("KV budget GB/device", [gb(p.kv_budget_bytes_per_device) for p in plans]),
        ("KV bytes/token/device", [f"{p.kv_bytes_per_token_per_device:,}" for p in plans]),
    ]
    rows += [
        (f"sequences at {ctx // 1024}k", [_fmt_count(p.sequences_at_context[ctx]) for p in plans])
        for ctx in CONTEXTS
    ]
    rows.append(("feasible", ["yes" if p.feasible else "NO" for p in plans]))
    width = max(len(label) for label, _ in rows)
    columns = [max(len(row[1][i]) for row in rows) for i in range(len(plans))]
    lines = [
        label.ljust(width) + "  " + "  ".join(v.rjust(columns[i]) for i, v in enumerate(values))
        for label, values in rows
    ]
    for plan in plans:
        lines += [f"{plan.profile}: {layout}" for layout in plan.kv_layouts]
        lines += [f"{plan.profile}: refused: {reason}" for reason in plan.reasons]
    return "\n".join(lines)


def _fmt_count(count: int | None) -> str:
    return "-" if count is None else f"{count:,}"
