"""Flags of `nemotron-serve [serve]`; each also reads an environment variable (its default).

The Helm chart configures the pod through these variables. A bad value, from a flag or from
the environment, is a usage error (exit 2) that names the flag or variable and what is allowed.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine_build.events import LOG_LEVELS
from engine_build.profiles import Dtype
from service.chat.sampling import CHOICES as SAMPLING_CHOICES
from service.observability.logs import LOG_FORMATS
from service.runtime.options import COMPILED_DECODE_SIZES as COMPILED_SIZES

if TYPE_CHECKING:
    from service.server.config import ServerConfig

SERVE_PRECISIONS = tuple(dtype.value for dtype in Dtype)  # every weights precision a profile lists
# engine_build.backends.registry.backend_names(), spelled here so parsing flags imports no torch
SERVE_BACKENDS = ("auto", "torch", "tensorrt-llm", "tensorrt-llm-pytorch")
DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8000  # NIM's
DEFAULT_METRICS_PORT = 8002  # Triton's metrics port; Prometheus text format on /metrics
DEFAULT_MAX_CONCURRENT_STREAMS = 4096  # above the queue bound (1,024 waiting) plus a batch

DESCRIPTION = """\
Serve the gRPC API: nemotron.v1.GenerationService, grpc.health.v1 (service names "",
liveness, readiness, nemotron.v1.GenerationService) and server reflection; beside it the
OpenAI- and NIM-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models,
/v1/health/live|ready, /metrics) on --http-port; Prometheus metrics also on their own port, and
OpenTelemetry tracing when OTEL_* asks for it.

With no arguments on a machine without GPUs it fetches and imports the embedded SmolLM2
default (cached), builds its cpu engine once and serves it. `nemotron-serve chat` chats in the
terminal without a server (see `nemotron-serve chat --help`).
"""


def http_port(text: str) -> int | None:
    """A port number, or None for `off`."""
    if text.strip().lower() == "off":
        return None
    return int(text)


http_port.__name__ = "port number or 'off'"


def model_names(text: str) -> tuple[str, ...]:
    """Comma-separated model names."""
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError("no model name")
    return names


model_names.__name__ = "comma-separated list of model names"


def alias_names(text: str) -> tuple[str, ...]:
    """Comma-separated model names, or 'none'."""
    return () if text.strip().lower() == "none" else model_names(text)


alias_names.__name__ = "comma-separated list of model names, or 'none'"


SIZE_UNITS = {
    "": 1,
    "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mi": 2**20, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "ti": 2**40, "tib": 2**40,
}  # fmt: skip


def byte_size(text: str) -> int:
    """Bytes from `4GiB`, `4Gi`, `512MB`, `2e9` or a plain number."""
    stripped = text.strip()
    number = stripped.rstrip("KMGTBikmgtb ")
    unit = stripped[len(number) :].strip().lower()
    if unit not in SIZE_UNITS:
        raise ValueError(f"unknown unit {unit!r}")
    value = float(number) * SIZE_UNITS[unit]
    if not (math.isfinite(value) and value >= 1):
        raise ValueError("not a positive size")
    return int(value)


byte_size.__name__ = "size in bytes (e.g. 4GiB, 4Gi, 512MB)"

MAX_COMPILED_BATCH = 256
MAX_COMPILED_SIZES = 8  # torch.compile keeps at most 8 graphs of one function (recompile_limit)


def batch_sizes(text: str) -> tuple[int, ...]:
    """`off` (nothing compiled), or up to MAX_COMPILED_SIZES comma-separated batch sizes."""
    if text.strip().lower() == "off":
        return ()
    sizes = sorted({int(part) for part in text.split(",")})
    if not sizes or sizes[0] < 1 or sizes[-1] > MAX_COMPILED_BATCH:
        raise ValueError(f"batch sizes must be 1 to {MAX_COMPILED_BATCH}")
    if len(sizes) > MAX_COMPILED_SIZES:
        raise ValueError(f"at most {MAX_COMPILED_SIZES} sizes")
    return tuple(sizes)


batch_sizes.__name__ = (
    f"'off' or up to {MAX_COMPILED_SIZES} batch sizes 1-{MAX_COMPILED_BATCH} (e.g. 1,2,4,8,16,32)"
)


# (flag, environment variable, argparse options). The variable, when set, is the default.
SERVE_ARGUMENTS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--host", "NEMOTRON_HOST", {"default": "0.0.0.0", "help": "address to listen on"}),
    (
        "--port",
        "NEMOTRON_PORT",
        {"type": int, "default": DEFAULT_PORT, "help": "gRPC port (0: any free port)"},
    ),
    (
        "--http-port",
        "NEMOTRON_HTTP_PORT",
        {
            "type": http_port,
            "default": DEFAULT_HTTP_PORT,
            "help": "port of the OpenAI- and NIM-compatible HTTP API (0: any free port; off: "
            "no HTTP API)",
        },
    ),
    (
        "--served-model-name",
        "NEMOTRON_SERVED_MODEL_NAME",
        {
            "type": model_names,
            "default": (),
            "help": "name(s) the HTTP API answers to as `model`, comma-separated (default: the "
            "checkpoint's own name)",
        },
    ),
    (
        "--triton-model-names",
        "NEMOTRON_TRITON_MODEL_NAMES",
        {
            "type": alias_names,
            "default": ("ensemble", "tensorrt_llm_bls"),
            "help": "more names the KServe v2 / Triton gRPC API answers to, beside the served "
            "name(s): the model names of Triton's TensorRT-LLM deployments, so their clients "
            "work unchanged (comma-separated; 'none': no more names; default: "
            "ensemble,tensorrt_llm_bls)",
        },
    ),
    (
        "--checkpoint",
        "NEMOTRON_CHECKPOINT",
        {
            "type": Path,
            "default": None,
            "help": "Nemotron-NAS checkpoint the engine is built from (default: the embedded "
            "SmolLM2-135M-Instruct)",
        },
    ),
    (
        "--gguf",
        "NEMOTRON_GGUF",
        {"type": Path, "default": None, "help": "local copy of the embedded model's GGUF"},
    ),
    (
        "--cache-dir",
        "NEMOTRON_CACHE_DIR",
        {
            "type": Path,
            "default": None,
            "help": "downloads, imports and engines (default ~/.cache/nemotron-serve)",
        },
    ),
    (
        "--precision",
        "NEMOTRON_PRECISION",
        {
            "choices": SERVE_PRECISIONS,
            "default": None,
            "help": "weights precision (default: any the profile allows; a build uses the "
            "profile's first)",
        },
    ),
    (
        "--backend",
        "NEMOTRON_BACKEND",
        {
            "choices": SERVE_BACKENDS,
            "default": "auto",
            "help": "which engines to serve: auto (as `nemotron-build --backend auto`: the "
            "profile's TensorRT-LLM flow on GPU profiles where tensorrt_llm is installed, else "
            "torch), torch, tensorrt-llm (TensorRT engines), tensorrt-llm-pytorch (TensorRT-LLM's "
            "PyTorch flow)",
        },
    ),
    (
        "--profile",
        "",  # NEMOTRON_PROFILE is read by the profile selection itself, which logs the source
        {
            "default": None,
            "help": "engine profile to serve (a100x4, a100x8, h100x2, cpu, or one from "
            "--profiles); default: $NEMOTRON_PROFILE, else detected from the Kubernetes node's "
            "GPU labels, then NVML, else cpu",
        },
    ),
    (
        "--engine-repo",
        "NEMOTRON_ENGINE_REPO",
        {"type": Path, "default": None, "help": "engine repository (default CACHE_DIR/engines)"},
    ),
    (
        "--build-if-missing",
        "NEMOTRON_BUILD_IF_MISSING",
        {
            "action": "store_true",
            "default": False,
            "help": "build the selected GPU profile's engine from --checkpoint when the "
            "repository has none (cpu engines are always built)",
        },
    ),
    (
        "--profiles",
        "",  # NEMOTRON_PROFILES is read by the profile selection itself
        {
            "type": Path,
            "action": "append",
            "default": [],
            "help": "extra profile YAML file (repeatable; also NEMOTRON_PROFILES=FILE[:FILE])",
        },
    ),
    (
        "--compute-threads",
        "NEMOTRON_COMPUTE_THREADS",
        {
            "type": int,
            "default": None,
            "help": "CPU threads of the engine's tensor work (default: the CPUs this process may "
            "use: its affinity, lowered to the container's cgroup CPU quota; fewer leaves cores "
            "for the network path on a CPU deployment)",
        },
    ),
    (
        "--kernel-choice",
        "NEMOTRON_KERNEL_CHOICE",
        {
            "choices": ["measure", "fixed"],
            "default": "measure",
            "help": "CPU engines: measure: time the candidate kernels of every weight matrix on "
            "this machine at first start (cached in the engine repository) and use the fastest "
            "per row count; fixed: the kernels as loaded (int8/int4: their own; bf16: torch.mv for "
            "one row, else F.linear; fp32: F.linear)",
        },
    ),
    (
        "--compiled-decode",
        "NEMOTRON_COMPILED_DECODE",
        {
            "type": batch_sizes,
            "default": ",".join(map(str, COMPILED_SIZES)),
            "help": "CPU engines (bf16, int8, int4; tp 1): batch sizes whose decode step is "
            "compiled with torch.compile, in the background once the engine is ready (cached "
            "in the cache directory's inductor/); a decode step of B sequences runs the smallest "
            "listed size >= B, padded, once it is compiled and timed faster than eager. 'off': "
            "every step eager",
        },
    ),
    (
        "--kv-cache-memory",
        "NEMOTRON_KV_CACHE_MEMORY",
        {
            "type": byte_size,
            "default": None,
            "help": "bytes of KV cache per device of a torch engine (e.g. 2GiB; default: the "
            "profile's kv_cache_free_fraction of the memory left after loading, within the "
            "container's cgroup memory limit on a CPU, of free GPU memory on a GPU)",
        },
    ),
    (
        "--sampling-defaults",
        "NEMOTRON_SAMPLING_DEFAULTS",
        {
            "choices": SAMPLING_CHOICES,
            "default": "model",
            "help": "what sampling fields a request leaves unset become: 'model' (the family's "
            "defaults for the turn's reasoning mode, as the model card recommends, then the "
            "checkpoint's generation_config.json, then greedy) or 'none' (greedy)",
        },
    ),
    (
        "--grace-s",
        "NEMOTRON_GRACE_S",
        {
            "type": float,
            "default": 30.0,
            "help": "seconds in-flight calls get to finish after SIGTERM",
        },
    ),
    (
        "--metrics-host",
        "NEMOTRON_METRICS_HOST",
        {"default": "0.0.0.0", "help": "address of the Prometheus endpoint"},
    ),
    (
        "--metrics-port",
        "NEMOTRON_METRICS_PORT",
        {"type": int, "default": DEFAULT_METRICS_PORT, "help": "/metrics port (0: off)"},
    ),
    (
        "--api-keys-file",
        "NEMOTRON_API_KEYS_FILE",
        {
            "type": Path,
            "default": None,
            "help": "require 'authorization: Bearer KEY' on the API; the file holds one KEY "
            "per line, optionally followed by the methods it may call (KEY Chat,ChatStream)",
        },
    ),
    (
        "--tls-cert-file",
        "NEMOTRON_TLS_CERT_FILE",
        {"type": Path, "default": None, "help": "server certificate chain (PEM)"},
    ),
    (
        "--tls-key-file",
        "NEMOTRON_TLS_KEY_FILE",
        {"type": Path, "default": None, "help": "server private key (PEM)"},
    ),
    (
        "--tls-client-ca-file",
        "NEMOTRON_TLS_CLIENT_CA_FILE",
        {
            "type": Path,
            "default": None,
            "help": "CA bundle that client certificates must chain to: turns on mutual TLS",
        },
    ),
    (
        "--max-message-bytes",
        "NEMOTRON_MAX_MESSAGE_BYTES",
        {"type": int, "default": 4 * 1024 * 1024, "help": "largest request or response"},
    ),
    (
        "--max-concurrent-streams",
        "NEMOTRON_MAX_CONCURRENT_STREAMS",
        {
            "type": int,
            "default": DEFAULT_MAX_CONCURRENT_STREAMS,
            "help": "concurrent calls per HTTP/2 connection; keep it above the engine's queue "
            "(1,024 waiting) plus its batch, so that one connection's overload is refused with "
            "RESOURCE_EXHAUSTED and a retry hint, not with a bare REFUSED_STREAM",
        },
    ),
    (
        "--keepalive-time-s",
        "NEMOTRON_KEEPALIVE_TIME_S",
        {"type": float, "default": 30.0, "help": "ping idle connections this often"},
    ),
    (
        "--keepalive-timeout-s",
        "NEMOTRON_KEEPALIVE_TIMEOUT_S",
        {"type": float, "default": 10.0, "help": "drop a connection whose ping goes unanswered"},
    ),
    (
        "--max-connection-age-s",
        "NEMOTRON_MAX_CONNECTION_AGE_S",
        {
            "type": float,
            "default": 0.0,
            "help": "close connections after this long so clients rebalance (0: never)",
        },
    ),
    ("--log-level", "NEMOTRON_LOG_LEVEL", {"choices": LOG_LEVELS, "default": "info"}),
    (
        "--log-format",
        "NEMOTRON_LOG_FORMAT",
        {
            "choices": LOG_FORMATS,
            "default": "auto",
            "help": "auto: console lines on a terminal, JSON lines otherwise",
        },
    ),
    (
        "--log-prompts",
        "NEMOTRON_LOG_PROMPTS",
        {
            "action": "store_true",
            "default": False,
            "help": "log request and response bodies (off by default: prompts may be private)",
        },
    ),
)


def build_serve_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """The parser of `nemotron-serve [serve]`, its defaults taken from `environ`."""
    parser = argparse.ArgumentParser(
        prog="nemotron-serve",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for flag, env, options in SERVE_ARGUMENTS:
        options = dict(options)
        if env:
            options["help"] = f"{options.get('help', '')} [env {env}]".strip()
        if env and environ.get(env, "") != "":
            options["default"] = _from_env(parser, env, environ[env], options)
        parser.add_argument(flag, **options)
    return parser


def _from_env(parser: argparse.ArgumentParser, env: str, raw: str, options: dict[str, Any]) -> Any:
    """An environment variable's value as the flag's type; a usage error names the variable."""
    if options.get("action") == "store_true":
        word = raw.strip().lower()
        if word in ("1", "true", "yes", "on"):
            return True
        if word in ("0", "false", "no", "off"):
            return False
        parser.error(f"{env}={raw!r} is not a boolean (use true or false)")
    convert: Callable[[str], Any] = options.get("type", str)
    try:
        value = convert(raw)
    except ValueError:
        parser.error(f"{env}={raw!r} is not a valid {getattr(convert, '__name__', 'value')}")
    choices = options.get("choices")
    if choices and value not in choices:
        parser.error(f"{env}={raw!r} is not one of {', '.join(choices)}")
    return value


def parse_serve_config(argv: Sequence[str], environ: Mapping[str, str]) -> ServerConfig:
    """Parse serve flags (environment as defaults) into the server's `ServerConfig`."""
    parser = build_serve_parser(environ)
    args = parser.parse_args(argv)  # --help and refused flags exit here, before torch is imported

    from engine_build.embedded import default_cache_dir
    from service.server.config import ServerConfig, TlsConfig
    from service.startup.selection import StartupOptions

    _check_ranges(parser, args)
    tls = None
    if args.tls_cert_file or args.tls_key_file:
        if not (args.tls_cert_file and args.tls_key_file):
            parser.error("TLS needs both --tls-cert-file and --tls-key-file")
        tls = TlsConfig(args.tls_cert_file, args.tls_key_file, args.tls_client_ca_file)
    elif args.tls_client_ca_file:
        parser.error("--tls-client-ca-file (mutual TLS) needs --tls-cert-file and --tls-key-file")
    return ServerConfig(
        host=args.host,
        port=args.port,
        http_port=args.http_port,
        served_model_names=args.served_model_name,
        triton_model_names=args.triton_model_names,
        startup=StartupOptions(
            cache_dir=args.cache_dir or default_cache_dir(environ),
            profile=args.profile,
            engine_repo=args.engine_repo,
            checkpoint=args.checkpoint,
            gguf=args.gguf,
            precision=args.precision,
            backend=args.backend,
            build_if_missing=args.build_if_missing,
            profile_files=tuple(args.profiles),
        ),
        compute_threads=args.compute_threads,
        measure_kernels=args.kernel_choice == "measure",
        compiled_decode=args.compiled_decode,
        sampling_defaults=args.sampling_defaults,
        kv_cache_memory=args.kv_cache_memory,
        grace_s=args.grace_s,
        max_message_bytes=args.max_message_bytes,
        max_concurrent_streams=args.max_concurrent_streams,
        keepalive_time_s=args.keepalive_time_s,
        keepalive_timeout_s=args.keepalive_timeout_s,
        max_connection_age_s=args.max_connection_age_s,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        api_keys_file=args.api_keys_file,
        tls=tls,
        log_prompts=args.log_prompts,
        log_level=args.log_level,
        log_format=args.log_format,
    )


INT32_MAX = 2**31 - 1  # gRPC channel arguments are C ints
MAX_SECONDS = INT32_MAX // 1000  # seconds that still fit in a millisecond channel argument


def _check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    def fail(name: str, problem: str) -> None:
        flag = "--" + name.replace("_", "-")
        env = next(e for f, e, _ in SERVE_ARGUMENTS if f == flag)
        parser.error(f"{flag} {getattr(args, name)} (flag or {env}) {problem}")

    for name in ("port", "metrics_port", "http_port"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) <= 65535:
            fail(name, "is outside [0, 65535]")
    for name in ("grace_s", "keepalive_time_s", "keepalive_timeout_s", "max_connection_age_s"):
        value = getattr(args, name)
        if not (math.isfinite(value) and 0 <= value <= MAX_SECONDS):
            fail(name, f"is outside [0, {MAX_SECONDS}] seconds")
    if args.keepalive_time_s < 1:
        fail("keepalive_time_s", "must be >= 1")
    for name in ("max_message_bytes", "max_concurrent_streams"):
        if not 1 <= getattr(args, name) <= INT32_MAX:
            fail(name, f"is outside [1, {INT32_MAX}]")
    if args.compute_threads is not None and not 1 <= args.compute_threads <= 4096:
        fail("compute_threads", "is outside [1, 4096]")
