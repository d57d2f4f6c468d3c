"""The decode step's own CPU kernels (kernels.cpp), compiled on the machine that runs them.

PyTorch has no fast path for a few rows times a 4-bit grouped matrix on a CPU without AMX
(`_weight_int4pack_mm_for_cpu` read at about a quarter of the copy bandwidth on an AMD EPYC,
docs/benchmarks.md), and its attention for one query per sequence costs a library call and a
gathered copy of every key and value it reads. kernels.cpp holds three operators for those:
`torch.ops.nemotron.int4_matmul`, `int8_matmul` (activations as int16 per group of 32, products
summed in integers, scales applied in fp32) and `decode_attention` (fp32 arithmetic).

They are built at first use with the C++ compiler the compiled decode step needs anyway (g++ in
the image), `-O3 -march=native` against this torch, into
`$NEMOTRON_CACHE_DIR/native/<key>/`, the key a digest of the source, the compiler's version,
torch's version and build flags, and the CPU's model and flags: a restart loads the library
without compiling (milliseconds); another machine kind or torch builds its own. No compiler, or a
failed build: the operators are absent and the kernels that torch has serve alone (logged as
`native_kernels_unavailable`). Whether an operator is used at all is measured: they are
candidates in service/runtime/kernels.py and service/runtime/compiled.py, not defaults.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from engine_build.embedded import default_cache_dir
from engine_build.events import log_event

SOURCE = Path(__file__).with_name("kernels.cpp")
LIBRARY = "nemotron_kernels.so"
BUILD_TIMEOUT_S = 600
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++20")
GROUP = 32  # int4 values per group (kernels.cpp: kGroup)

_lock = threading.Lock()
# "loaded": the outcome of this process's one attempt; "library": the loaded library's key
_state: dict[str, bool | str] = {}


def cxx_compiler() -> str | None:
    """The C++ compiler on PATH ($CXX, g++, c++, clang++), as inductor finds it."""
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return next((found for name in names if name and (found := shutil.which(name))), None)


def cpu_model_and_flags() -> tuple[str, str]:
    """The CPU's model name and its sorted instruction-set flags (from /proc/cpuinfo)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = " ".join(sorted(value.split()))
    except OSError:
        pass
    return model, flags


def available() -> bool:
    """Whether the operators are loaded in this process (without trying to build them)."""
    return _state.get("loaded") is True


def library_key() -> str | None:
    """The loaded library's key (a digest of its source, compiler, torch and CPU), else None:
    what was measured with one library says nothing about another."""
    key = _state.get("library")
    return key if available() and isinstance(key, str) else None


def load(environ: Mapping[str, str] = os.environ) -> bool:
    """Build (or find) the library and load it, once per process; whether the operators exist."""
    with _lock:
        if "loaded" not in _state:
            _state["loaded"] = _load(environ)
        return available()


def _load(environ: Mapping[str, str]) -> bool:
    compiler = cxx_compiler()
    if compiler is None:
        log_event("native_kernels_unavailable", logging.INFO, reason="no C++ compiler on PATH")
        return False
    try:
        library = _build(compiler, default_cache_dir(environ) / "native")
        torch.ops.load_library(str(library))
        _register_fakes()
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log_event("native_kernels_unavailable", logging.WARNING, reason=str(err)[-2000:])
        return False
    log_event("native_kernels_loaded", logging.INFO, library=str(library))
    _state["library"] = library.parent.name
    return True


def _command(compiler: str, output: Path) -> list[str]:
    from torch.utils import cpp_extension  # imported here: only a build needs it

    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    libraries = cpp_extension.library_paths()
    return [
        compiler,
        *FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *includes,
        str(SOURCE),
        *[f"-L{path}" for path in libraries],
        "-ltorch_cpu",
        "-lc10",
        *[f"-Wl,-rpath,{path}" for path in libraries],
        "-o",
        str(output),
    ]


def _build(compiler: str, root: Path) -> Path:
    """The library for this source, compiler, torch and CPU under `root`, built if missing."""
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    cpu, flags = cpu_model_and_flags()
    identity = "\n".join(
        [
            hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
            compiler,
            version,
            torch.__version__,
            " ".join(FLAGS),
            cpu,
            flags,
        ]
    )
    directory = root / hashlib.sha256(identity.encode()).hexdigest()[:16]
    library = directory / LIBRARY
    if library.is_file():
        return library
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        log_event("native_kernels_building", logging.INFO, directory=str(directory))
        result = subprocess.run(
            _command(compiler, staging / LIBRARY),
            capture_output=True,
            text=True,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({result.returncode}): {result.stderr}")
        try:
            staging.rename(directory)  # atomic: a concurrent build that won is used instead
        except OSError:
            if not library.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return library


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (the operators are opaque calls in its graph)."""

    def matmul_fake(x: Tensor, weight: Tensor, *_: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    def attention_fake(
        q: Tensor, keys: Tensor, values: Tensor, read: Tensor, lengths: Tensor, scale: float
    ) -> Tensor:
        return q.new_empty(q.shape)

    torch.library.register_fake("nemotron::int4_matmul", matmul_fake)
    torch.library.register_fake("nemotron::int8_matmul", matmul_fake)
    torch.library.register_fake("nemotron::decode_attention", attention_fake)


def int4_layout(values: Tensor, scale: Tensor, low: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`int4_matmul`'s operands from 4-bit values [out, in] (0..15) and fp32 [out, in / 32]
    scales and minimums: within each group of 32, byte j holds value j (low nibble) and value
    j + 16 (high nibble), so one 16-byte load and two masks give the group in order."""
    out_features, in_features = values.shape
    if in_features % GROUP:
        raise ValueError(f"int4 in features {in_features} are not a multiple of {GROUP}")
    halves = values.to(torch.uint8).reshape(out_features, in_features // GROUP, 2, GROUP // 2)
    packed = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(out_features, in_features // 2)
    return packed.contiguous(), scale.float().contiguous(), low.float().contiguous()
