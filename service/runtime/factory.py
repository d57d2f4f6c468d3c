"""Opening an engine from the repository as a running `Engine`: the manifest says which runtime.

A torch engine becomes a `TorchRuntime` (its model loaded by the engine thread, tensor-parallel
workers started for tp > 1, the KV cache sized from memory); a TensorRT-LLM engine becomes a
`TensorRTLLMRuntime`. The servers only see the `Engine` interface either way.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine_build.backends.torch_engine import TorchEngine
from engine_build.profiles import TENSORRT_LLM_BACKENDS, EngineLimits
from engine_build.repository import EngineEntry
from service.runtime.compiled import compile_decode
from service.runtime.core import Booted
from service.runtime.frontend import TorchRuntime
from service.runtime.interface import Engine, EngineError, RequestLimits
from service.runtime.kernels import apply_measured_kernels
from service.runtime.loader import load_rank_model
from service.runtime.quantized import release_sources
from service.runtime.runner import LocalExecutor, ModelRunner
from service.runtime.sizing import (
    RuntimeOptions,
    check_weights_fit,
    element_bytes,
    kv_store_and_config,
)
from service.runtime.tokenizer import TextTokenizer
from service.runtime.trtllm_runtime import (
    PYTORCH_LLM_CLASS,
    TENSORRT_LLM_CLASS,
    TensorRTLLMRuntime,
    llm_kwargs,
    pytorch_llm_kwargs,
)


def open_engine(
    entry: EngineEntry,
    limits: EngineLimits,
    options: RuntimeOptions | None = None,
    device: str = "cpu",
) -> Engine:
    """The runtime for a repository entry, chosen by the backend its manifest names."""
    options = options or RuntimeOptions()
    opener = _OPENERS.get(entry.key.backend)
    if opener is None:
        raise EngineError(
            f"engine {entry.name} ({entry.engine_id}) was built by backend "
            f"{entry.key.backend!r}, which this server cannot run; it runs: {sorted(_OPENERS)}"
        )
    if entry.key.backend in TENSORRT_LLM_BACKENDS and options.kv_cache_bytes is not None:
        raise EngineError(
            f"--kv-cache-memory (NEMOTRON_KV_CACHE_MEMORY) sizes a torch engine's KV cache; "
            f"engine {entry.name} is a {entry.key.backend} engine, whose KV cache TensorRT-LLM "
            "sizes as the profile's kv_cache_free_fraction of free GPU memory: set that instead"
        )
    if entry.key.backend in TENSORRT_LLM_BACKENDS and not trtllm_installed():
        raise EngineError(
            f"engine {entry.name} ({entry.engine_id}) was built by {entry.key.backend} "
            f"{entry.key.backend_version}, and this server cannot import the tensorrt_llm "
            "package: run it in the gpu image (built on NVIDIA's TensorRT-LLM release image, "
            "same TensorRT-LLM version), or serve a torch engine (--backend torch, "
            "NEMOTRON_BACKEND=torch; chart value engine.backend=torch)"
        )
    return opener(entry, limits, options, device)


def trtllm_installed() -> bool:
    """Whether the tensorrt_llm package can be imported here."""
    return importlib.util.find_spec("tensorrt_llm") is not None


def open_runtime(
    engine_dir: str | Path, options: RuntimeOptions | None = None, device: str = "cpu"
) -> TorchRuntime:
    """A runtime for a torch engine; `start()` loads it (tp > 1 starts worker processes)."""
    options = options or RuntimeOptions()
    engine = TorchEngine.open(engine_dir)
    if engine.tensor_parallel != 1:
        from service.runtime.workers import tensor_parallel_boot  # starts processes: only then

        return assemble_runtime(engine, tensor_parallel_boot(engine, options, device), options)

    def boot() -> Booted:
        check_weights_fit(engine, torch.device(device))
        model = load_rank_model(engine.directory, device=device)
        if device == "cpu" and options.measure_kernels:
            apply_measured_kernels(model, engine.directory, torch.get_num_threads())
        release_sources(model)
        store, config = kv_store_and_config(engine, model.dtype, options, torch.device(device))
        runner = ModelRunner(model, store)
        if options.compiled_decode:
            runner.compiled = compile_decode(
                model, store, torch.device(device), 1, options.compiled_decode
            )
        return Booted(LocalExecutor(runner), config, element_bytes(model.dtype), runner.compiled)

    return assemble_runtime(engine, boot, options)


def assemble_runtime(
    engine: TorchEngine, boot: Callable[[], Booted], options: RuntimeOptions
) -> TorchRuntime:
    """The runtime around a boot function, with the engine's tokenizer and stop ids."""
    tokenizer = TextTokenizer(engine.directory)
    eos = frozenset(tokenizer.stop_token_ids(engine.graph.eos_token_ids))
    return TorchRuntime(boot, tokenizer, engine.graph, eos, options.threads)


def _open_torch(
    entry: EngineEntry, limits: EngineLimits, options: RuntimeOptions, device: str
) -> Engine:
    return open_runtime(entry.directory, options, device)


def _open_trtllm(
    entry: EngineEntry, limits: EngineLimits, options: RuntimeOptions, device: str
) -> Engine:
    directory = entry.directory
    kwargs = llm_kwargs(directory, directory, limits.kv_cache_free_fraction)
    return _trtllm_runtime(directory, limits, options, TENSORRT_LLM_CLASS, kwargs)


def _open_trtllm_pytorch(
    entry: EngineEntry, limits: EngineLimits, options: RuntimeOptions, device: str
) -> Engine:
    key = entry.key
    max_seq_len = options.max_seq_len or limits.max_seq_len
    kwargs = pytorch_llm_kwargs(
        entry.directory, key.tensor_parallel, limits, max_seq_len, key.kv_cache_dtype
    )
    return _trtllm_runtime(entry.directory, limits, options, PYTORCH_LLM_CLASS, kwargs)


def _trtllm_runtime(
    directory: Path,
    limits: EngineLimits,
    options: RuntimeOptions,
    llm_class: str,
    llm_arguments: dict[str, Any],
) -> Engine:
    tokenizer = TextTokenizer(directory)
    max_seq_len = options.max_seq_len or limits.max_seq_len
    request_limits = RequestLimits(tokenizer.vocab_size, max_seq_len, max_seq_len)
    return TensorRTLLMRuntime(directory, tokenizer, request_limits, llm_class, llm_arguments)


# Backend name in the engine's manifest key -> how to open it.
_OPENERS: dict[str, Callable[[EngineEntry, EngineLimits, RuntimeOptions, str], Engine]] = {
    "torch": _open_torch,
    "tensorrt-llm": _open_trtllm,
    "tensorrt-llm-pytorch": _open_trtllm_pytorch,
}
