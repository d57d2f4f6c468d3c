"""The test double's classes, every argument checked against the contract fixture.

The "model": every prompt is answered with ANSWER, tokenized by the tokenizer directory the
`LLM` was given (`tokenizer.json`, as the engine builder copies it there), one token per
streamed chunk, TOKEN_DELAY_S apart (env TRTLLM_DOUBLE_TOKEN_DELAY_S). It finishes with
"length" at `max_tokens`, else "stop" after the last token of ANSWER; `abort()` ends it with
"cancelled" at the next chunk. While the file named by env TRTLLM_DOUBLE_HOLD exists, a stream
that has given its first token gives no more (an abort or shutdown still ends it): a test holds
a request in flight by creating the file, and lets it finish by removing it. With `logprobs=k`
each position gets k entries {token: Logprob}, the chosen token's logprob CHOSEN_LOGPROB.
Iteration stats are queued as JSON, one per decoding step, with the keys the fixture lists, and
handed out by `get_stats` as TensorRT-LLM's `IterationResult.get_results` does (read at the
fixture's commit): it drains the queue, waiting `timeout` once, and then returns nothing until
the next `generate_async`.

What the double saw (the LLM's arguments, each request's sampling params, aborts, shutdown)
is appended to EVENTS and, as JSON lines, to the file named by env TRTLLM_DOUBLE_EVENTS.

Real behaviour it mirrors beyond the signatures, each from TensorRT-LLM's source:
- `LLM._check_arguments`: a request with `logprobs` needs `gather_generation_logits=True`.
- `GenerationResult`: iterating yields the result itself; `finished` turns true with the final
  chunk; `CompletionOutput.*_diff` are the parts since the previous chunk.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from tokenizers import Tokenizer


def _held() -> bool:
    hold = os.environ.get(HOLD_ENV)
    return bool(hold) and Path(hold).exists()


ANSWER = "Hello from the TensorRT-LLM test double."
CHOSEN_LOGPROB = -0.25
TOKEN_DELAY_S = float(os.environ.get("TRTLLM_DOUBLE_TOKEN_DELAY_S", "0.02"))
EVENTS_ENV = "TRTLLM_DOUBLE_EVENTS"
HOLD_ENV = "TRTLLM_DOUBLE_HOLD"
HOLD_POLL_S = 0.01
EVENTS: list[dict[str, Any]] = []

_TESTS = Path(__file__).resolve().parents[3]
FIXTURE = _TESTS / "data" / "trtllm_contract.json"
CONTRACT: dict[str, Any] = json.loads(FIXTURE.read_text())

LLM_NAME = "tensorrt_llm._tensorrt_engine.LLM"
LLM_ARGS = "tensorrt_llm.llmapi.llm_args.TrtLlmArgs"
TORCH_LLM_NAME = "tensorrt_llm.llmapi.llm.LLM"
TORCH_LLM_ARGS = "tensorrt_llm.llmapi.llm_args.TorchLlmArgs"
COMPLETION_OUTPUT = "tensorrt_llm.executor.result.CompletionOutput"
GENERATION_RESULT = "tensorrt_llm.executor.result.GenerationResult"
LOGPROB = "tensorrt_llm.executor.result.Logprob"


def _contract_rules() -> Any:
    """tools/trtllm_contract.py, loaded by path: the contract test's own check functions."""
    name = "_trtllm_double_contract_rules"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, _TESTS.parent / "tools" / "trtllm_contract.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_RULES = _contract_rules()


def _refuse(problems: list[str]) -> None:
    if problems:
        raise TypeError("; ".join(problems) + " (TensorRT-LLM test double, checked against "
                        f"{FIXTURE.name})")  # fmt: skip


def check_fields(cls: str, kwargs: dict[str, Any]) -> None:
    """`cls(**kwargs)` as the real dataclass/pydantic model would take it, or TypeError."""
    _refuse(_RULES.check_fields(CONTRACT, cls, set(kwargs)))


def check_call(
    function: str,
    args: tuple,
    kwargs: dict[str, Any],
    kwargs_fields: str | None = None,
    llm: str = "llm",
) -> dict[str, Any]:
    """All arguments by name, after checking them against the real signature, or TypeError."""
    _refuse(
        _RULES.check_call(
            CONTRACT,
            function,
            set(kwargs),
            n_positional=len(args),
            kwargs_fields=kwargs_fields,
            llm=llm,
        )
    )
    positional = CONTRACT["functions"][_RULES.canonical(CONTRACT, function)]["positional"]
    named = dict(zip(positional, args, strict=False))
    if set(named) & set(kwargs):
        raise TypeError(f"{function}: got multiple values for {sorted(set(named) & set(kwargs))}")
    return named | kwargs


def record(event: str, **fields: Any) -> None:
    """Note what the double saw (in memory, and in $TRTLLM_DOUBLE_EVENTS as a JSON line)."""
    entry = {"event": event, **fields}
    EVENTS.append(entry)
    path = os.environ.get(EVENTS_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps(entry, default=repr) + "\n")


class _Checked:
    """Keyword-only construction checked against a contract class; defaults are None."""

    _contract_class = ""
    _defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **kwargs: Any) -> None:
        check_fields(self._contract_class, kwargs)
        self.__dict__.update(self._defaults | kwargs)

    def as_dict(self) -> dict[str, Any]:
        """What was set (for the events log)."""
        return dict(self.__dict__)

    def __getattr__(self, name: str) -> Any:
        entry = CONTRACT["classes"][_RULES.canonical(CONTRACT, self._contract_class)]
        if name in entry["fields"]:
            return None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


class SamplingParams(_Checked):
    """`tensorrt_llm.SamplingParams` (a keyword-only dataclass in TensorRT-LLM)."""

    _contract_class = "tensorrt_llm.SamplingParams"
    _defaults: ClassVar[dict[str, Any]] = {"max_tokens": 32, "detokenize": True}


class KvCacheConfig(_Checked):
    """`tensorrt_llm.llmapi.KvCacheConfig` (a pydantic model with extra="forbid")."""

    _contract_class = "tensorrt_llm.llmapi.KvCacheConfig"
    _defaults: ClassVar[dict[str, Any]] = {
        "free_gpu_memory_fraction": 0.9,
        "enable_block_reuse": True,
    }


class Logprob:
    """`executor.result.Logprob`."""

    __slots__ = tuple(CONTRACT["classes"][LOGPROB]["fields"])

    def __init__(self, logprob: float, rank: int | None = None) -> None:
        self.logprob, self.rank = logprob, rank


class _CompletionOutputBase:
    """The properties of `executor.result.CompletionOutput` (its fields come from the contract)."""

    __slots__ = ()

    @property
    def length(self) -> int:
        return len(self.token_ids)

    @property
    def text_diff(self) -> str:
        return self.text[self._last_text_len :]

    @property
    def token_ids_diff(self) -> list[int]:
        return self.token_ids[self._last_token_ids_len :]

    @property
    def logprobs_diff(self) -> list:
        return self.logprobs[self._last_logprobs_len :]


def _completion_output_class() -> type:
    entry = CONTRACT["classes"][COMPLETION_OUTPUT]
    slots = tuple(entry["fields"]) + tuple(entry["non_init_fields"])

    def __init__(self: Any, index: int) -> None:
        for name in slots:
            setattr(self, name, None)
        self.index, self.text, self.token_ids = index, "", []
        self.logprobs, self.prompt_logprobs = [], []
        self._last_text_len = self._last_token_ids_len = self._last_logprobs_len = 0

    return type(
        "CompletionOutput", (_CompletionOutputBase,), {"__slots__": slots, "__init__": __init__}
    )


# Exactly the fields and hidden fields TensorRT-LLM's dataclass has: reading anything else fails.
CompletionOutput = _completion_output_class()


class GenerationResult:
    """`executor.result.GenerationResult` for one streamed request of the double's model."""

    _ids = itertools.count(1)

    def __init__(
        self, llm: LLM, prompt_token_ids: list[int], sampling_params: SamplingParams
    ) -> None:
        self._llm, self._prompt = llm, list(prompt_token_ids)
        self._params = sampling_params
        self._id = next(self._ids)
        self._outputs = [CompletionOutput(0)]
        self._answer = llm.tokenizer.encode(ANSWER, add_special_tokens=False).ids
        self._done = self._aborted = False

    @property
    def request_id(self) -> int:
        return self._id

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._prompt

    @property
    def outputs(self) -> list:
        return self._outputs[:1]

    @property
    def context_logits(self) -> None:
        return None

    @property
    def finished(self) -> bool:
        return self._done

    def abort(self) -> None:
        """Ask the executor to cancel; the next chunk is the final, 'cancelled' one."""
        record("abort", request_id=self._id, finished=self._done)
        self._aborted = True
        self._llm._cancel(self)  # the executor cancels it whether or not it is read on

    def aborted(self) -> bool:
        return self._aborted

    def _stopping(self) -> bool:
        return self._aborted or self._llm._shut_down

    def __aiter__(self) -> GenerationResult:
        return self

    async def __anext__(self) -> GenerationResult:
        if self._done:
            raise StopAsyncIteration
        await asyncio.sleep(TOKEN_DELAY_S)
        while self._outputs[0].token_ids and _held() and not self._stopping():
            await asyncio.sleep(HOLD_POLL_S)
        self._step()
        return self

    async def aresult(self) -> GenerationResult:
        while not self._done:
            await self.__anext__()
        return self

    def _step(self) -> None:
        output = self._outputs[0]
        output._last_token_ids_len = len(output.token_ids)
        output._last_text_len = len(output.text)
        output._last_logprobs_len = len(output.logprobs)
        if self._aborted:
            output.finish_reason, self._done = "cancelled", True
        else:
            token = self._answer[len(output.token_ids)]
            output.token_ids.append(token)
            if self._params.logprobs:
                output.logprobs.append(self._logprobs(token, self._params.logprobs))
            if self._params.detokenize:
                output.text = self._llm.tokenizer.decode(output.token_ids)
            if len(output.token_ids) >= self._params.max_tokens:
                output.finish_reason, self._done = "length", True
            elif len(output.token_ids) == len(self._answer):
                output.finish_reason, self._done = "stop", True
        self._llm._iteration(self)

    def _logprobs(self, token: int, k: int) -> dict[int, Logprob]:
        entries = {token: Logprob(CHOSEN_LOGPROB, 1)}
        for rank, other in enumerate((t for t in range(k + 1) if t != token), start=2):
            if len(entries) == k:
                break
            entries[other] = Logprob(CHOSEN_LOGPROB - rank, rank)
        return entries


class LLM:
    """`tensorrt_llm._tensorrt_engine.LLM` (TensorRT-LLM's `_TrtLLM`) over an engine directory."""

    _name, _args, _section = LLM_NAME, LLM_ARGS, "llm"
    # `_check_arguments`: on the TensorRT backend, logprobs need gather_generation_logits.
    _logprobs_need_gathered_logits = True
    _stats_need = ""  # an LLM argument without which get_stats returns nothing

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments = check_call(
            self._name + ".__init__", args, kwargs, kwargs_fields=self._args, llm=self._section
        )
        kv = arguments.get("kv_cache_config")
        if kv is not None and not isinstance(kv, KvCacheConfig | dict):
            raise TypeError(f"kv_cache_config must be a KvCacheConfig, got {type(kv).__name__}")
        if isinstance(kv, dict):
            kv = KvCacheConfig(**kv)  # pydantic validates a dict into the model
        self.args = arguments
        self.engine_dir = Path(arguments["model"])
        self.tokenizer_dir = Path(arguments.get("tokenizer") or arguments["model"])
        self._check_engine_dir()
        self.tokenizer = Tokenizer.from_file(str(self.tokenizer_dir / "tokenizer.json"))
        self._lock = threading.Lock()
        self._active: dict[int, GenerationResult] = {}
        self._stats: list[str] = []
        self._stats_done = True
        self._iter = self._missed = 0
        self._shut_down = False
        record(
            "llm",
            kwargs={**arguments, "kv_cache_config": kv.as_dict() if kv else None},
            world_size=self.world_size,
        )

    def _check_engine_dir(self) -> None:
        """What TensorRT-LLM reads first: config.json and one engine file per rank."""
        config_file = self.engine_dir / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{self.engine_dir} has no config.json: not a TensorRT-LLM engine")
        config = json.loads(config_file.read_text())
        mapping = config.get("pretrained_config", {}).get("mapping", {})
        self.world_size = int(mapping.get("world_size", 1))
        for rank in range(self.world_size):
            if not (self.engine_dir / f"rank{rank}.engine").is_file():
                raise FileNotFoundError(f"{self.engine_dir / f'rank{rank}.engine'} is missing")

    def generate_async(self, *args: Any, **kwargs: Any) -> GenerationResult:
        """Submit one request; returns its streamed result."""
        if self._shut_down:
            raise RuntimeError("the LLM is shut down")
        arguments = check_call(self._name + ".generate_async", args, kwargs)
        params = arguments.get("sampling_params") or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(params)}")
        needs_gathered = self._logprobs_need_gathered_logits
        if params.logprobs and needs_gathered and not self.args.get("gather_generation_logits"):
            raise ValueError(  # TensorRT-LLM's LLM._check_arguments
                f"`sampling_params.logprobs={params.logprobs}` requires "
                "gather_generation_logits=True to be passed explicitly to the LLM() constructor"
            )
        inputs = arguments["inputs"]
        if not (isinstance(inputs, list) and all(isinstance(t, int) for t in inputs)):
            raise TypeError("the double takes prompts as token ids (a list of int)")
        result = GenerationResult(self, inputs, params)
        with self._lock:
            self._active[result.request_id] = result
            self._stats_done = False  # IterationResult.mark_undone on every submission
        record(
            "generate_async",
            request_id=result.request_id,
            prompt_tokens=len(inputs),
            streaming=arguments.get("streaming", False),
            sampling_params=params.as_dict(),
        )
        return result

    def _cancel(self, result: GenerationResult) -> None:
        with self._lock:
            self._active.pop(result.request_id, None)

    def _iteration(self, result: GenerationResult) -> None:
        """One decoding step: queue iteration stats (as the executor's JSON)."""
        with self._lock:
            self._iter += 1
            if result.finished:
                self._active.pop(result.request_id, None)
            if len(result.outputs[0].token_ids) == 1:
                self._missed += 1
            self._stats.append(json.dumps(self._iteration_stats()))

    def _iteration_stats(self) -> dict[str, Any]:
        keys = CONTRACT["stats"]
        blocks = 1024
        used = sum(1 + len(r.outputs[0].token_ids) // 32 for r in self._active.values())
        values: dict[str, Any] = dict.fromkeys(keys["IterationStats"], 0)
        values |= {
            "timestamp": time.strftime("%m-%d-%Y %H:%M:%S"),
            "iter": self._iter,
            "iterLatencyMS": TOKEN_DELAY_S * 1000,
            "numActiveRequests": len(self._active),
            "numQueuedRequests": 0,
            "maxNumActiveRequests": 8,
            "kvCacheStats": dict.fromkeys(keys["KvCacheStats"], 0)
            | {
                "maxNumBlocks": blocks,
                "freeNumBlocks": blocks - used,
                "usedNumBlocks": used,
                "tokensPerBlock": 32,
                "reusedBlocks": 0,
                "missedBlocks": self._missed,
            },
            "inflightBatchingStats": dict.fromkeys(keys["InflightBatchingStats"], 0)
            | {"numScheduledRequests": len(self._active), "numGenRequests": len(self._active)},
            "staticBatchingStats": dict.fromkeys(keys["StaticBatchingStats"], 0),
            "specDecodingStats": dict.fromkeys(keys["SpecDecodingStats"], 0),
        }
        return values

    def get_stats(self, *args: Any, **kwargs: Any) -> list[dict]:
        """The iteration stats queued since the last call (IterationResult.get_results)."""
        timeout = check_call(self._name + ".get_stats", args, kwargs).get("timeout", 2)
        with self._lock:
            if self._stats_need and not self.args.get(self._stats_need):
                return []  # the PyTorch executor keeps no iteration stats unless asked
            if self._stats_done:
                return []
            queued, self._stats = self._stats, []
            self._stats_done = True
        time.sleep(timeout or 0)  # its queue.get(timeout=...) that finds the queue empty
        return [json.loads(entry) for entry in queued]

    def shutdown(self, *args: Any, **kwargs: Any) -> None:
        """Stop the executor; results still streaming are cut off."""
        check_call(self._name + ".shutdown", args, kwargs)
        self._shut_down = True
        record("shutdown", active=len(self._active))


class TorchLLM(LLM):
    """`tensorrt_llm.LLM`, the PyTorch flow, over a Hugging Face checkpoint directory."""

    _name, _args, _section = TORCH_LLM_NAME, TORCH_LLM_ARGS, "llm_pytorch"
    _logprobs_need_gathered_logits = False  # `_check_arguments` returns early for pytorch
    _stats_need = "enable_iter_perf_stats"  # PyExecutor.get_latest_iteration_stats

    def _check_engine_dir(self) -> None:
        """What the PyTorch flow reads first: config.json (architecture, the remote-code
        config module under trust_remote_code) and safetensors weights."""
        config_file = self.engine_dir / "config.json"
        if not config_file.is_file():
            raise ValueError(f"{self.engine_dir} has no config.json: not a checkpoint")
        config = json.loads(config_file.read_text())
        if "DeciLMForCausalLM" not in config.get("architectures", []):
            raise ValueError(f"{self.engine_dir}: not a DeciLMForCausalLM checkpoint")
        module = config.get("auto_map", {}).get("AutoConfig", "").rsplit(".", 1)[0]
        if not self.args.get("trust_remote_code"):
            raise ValueError("the Nemotron-NAS config needs trust_remote_code=True")
        if not (self.engine_dir / f"{module}.py").is_file():
            raise FileNotFoundError(f"{self.engine_dir / f'{module}.py'} is missing")
        if not list(self.engine_dir.glob("*.safetensors")):
            raise FileNotFoundError(f"{self.engine_dir} holds no safetensors weights")
        self.world_size = int(self.args.get("tensor_parallel_size", 1))
