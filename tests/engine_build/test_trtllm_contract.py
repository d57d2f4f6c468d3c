"""Every call the TensorRT-LLM adapters make, checked against TensorRT-LLM's own signatures.

The fixture (tests/data/trtllm_contract.json) is made by tools/trtllm_contract.py from
TensorRT-LLM's source files (which commit and version each came from is in its `source`); these
tests need no TensorRT-LLM. How each planned `Call` is executed mirrors `_execute` in
engine_build/backends/trtllm.py (see EXECUTION below): change one, change the other.
"""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

import pytest

from engine_build.backends.base import BuildJob
from engine_build.backends.trtllm import build_config_kwargs, plan_calls, plugin_settings
from engine_build.checkpoint import Checkpoint
from engine_build.profiles import DeviceKind, load_profiles
from service.runtime import trtllm_runtime
from service.runtime.interface import GenerationRequest
from service.runtime.options import RequestOptions, SamplingParams
from service.runtime.trtllm_runtime import (
    FINISH_REASONS,
    generate_kwargs,
    llm_kwargs,
    sampling_kwargs,
)
from tools.trtllm_contract import FILES, build_contract, check_attributes, check_call, check_fields

REPO = Path(__file__).resolve().parents[2]
FIXTURE = REPO / "tests" / "data" / "trtllm_contract.json"
SCRATCH, ENGINE_OUT = Path("/scratch/trtllm-build-1"), Path("/work/engine")

BUILD_CONFIG = "tensorrt_llm.builder.BuildConfig"
PLUGIN_CONFIG = "tensorrt_llm.plugin.plugin.PluginConfig"
LLM_ARGS = "tensorrt_llm.llmapi.llm_args.TrtLlmArgs"
LLM = "tensorrt_llm._tensorrt_engine.LLM"


@pytest.fixture(scope="module")
def contract() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def checkpoint(synthetic_checkpoint) -> Checkpoint:
    return Checkpoint.open(synthetic_checkpoint)


def gpu_jobs(checkpoint) -> list[tuple[str, BuildJob]]:
    """Every GPU profile x precision (fp8 with a calibration dataset)."""
    profiles = load_profiles()
    jobs = []
    for name in profiles.names:
        profile = profiles.get(name)
        if profile.device is DeviceKind.CPU:
            continue
        for precision in profile.precision_names:
            job = BuildJob(checkpoint, profile, profile.precision(precision), "/data/calib")
            jobs.append((f"{name}-{precision}", job))
    return jobs


def execution_problems(contract: dict, function: str, kwargs: dict) -> list[str]:
    """What `_execute` would call for one planned Call, checked against the contract."""
    kwargs = dict(kwargs)
    if function.endswith("quantize_and_export"):
        return check_call(contract, function, kwargs)
    if function.endswith("from_hugging_face"):
        save = kwargs.pop("save_checkpoint")
        # mapping is passed as a dict and built as tensorrt_llm.Mapping(**mapping)
        problems = check_call(contract, "tensorrt_llm.Mapping.__init__", set(kwargs["mapping"]))
        problems += check_call(contract, function, kwargs)
        # model.save_checkpoint(save["output_dir"], save_config=...)
        problems += check_call(
            contract,
            "tensorrt_llm.models.DeciLMForCausalLM.save_checkpoint",
            set(save) - {"output_dir"},
            n_positional=1,
        )
        return problems
    if function == "tensorrt_llm.builder.build":
        # DeciLMForCausalLM.from_checkpoint(checkpoint_dir, rank=rank)
        problems = check_call(
            contract,
            "tensorrt_llm.models.DeciLMForCausalLM.from_checkpoint",
            {"rank"},
            n_positional=1,
        )
        problems += check_fields(contract, BUILD_CONFIG, set(kwargs["build_config"]))
        problems += check_attributes(contract, PLUGIN_CONFIG, set(kwargs["plugin_config"]))
        problems += check_attributes(contract, BUILD_CONFIG, {"plugin_config"})
        problems += check_call(contract, function, (), n_positional=2)  # build(model, config)
        problems += check_call(contract, "tensorrt_llm.builder.Engine.save", (), n_positional=1)
        return problems
    return [f"{function}: the test does not know how _execute runs it"]


def test_the_fixture_names_the_release_the_dockerfile_uses(contract):
    tag = re.search(r"tensorrt-llm/release:(\S+)", (REPO / "Dockerfile").read_text()).group(1)
    assert contract["tensorrt_llm_release_named"] == tag
    assert all(info["commit"] for info in contract["source"].values())


def test_every_planned_build_call_matches_tensorrt_llm(contract, checkpoint):
    jobs = gpu_jobs(checkpoint)
    assert {name for name, _ in jobs} >= {"a100x4-bf16", "a100x8-bf16", "h100x2-fp8", "h100x2-bf16"}
    problems = []
    for name, job in jobs:
        for call in plan_calls(job, SCRATCH, ENGINE_OUT):
            problems += [
                f"{name}: {p}" for p in execution_problems(contract, call.function, call.kwargs)
            ]
    assert problems == []


def test_build_config_and_plugin_settings_are_real_fields(contract):
    for name in load_profiles().names:
        profile = load_profiles().get(name)
        assert (
            check_fields(contract, BUILD_CONFIG, set(build_config_kwargs(profile, SCRATCH))) == []
        )
        for precision in profile.precisions:
            assert check_attributes(contract, PLUGIN_CONFIG, set(plugin_settings(precision))) == []


def test_the_llm_is_made_with_arguments_it_accepts(contract):
    kwargs = llm_kwargs(Path("/engines/x"), Path("/engines/x"), 0.9)
    assert check_call(contract, LLM + ".__init__", set(kwargs), kwargs_fields=LLM_ARGS) == []
    assert (
        check_fields(contract, "tensorrt_llm.llmapi.KvCacheConfig", kwargs["kv_cache_config"]) == []
    )
    # the LLM's **kwargs are checked against these fields by TensorRT-LLM itself
    assert contract["llm"]["kwargs_checked_against"] == LLM_ARGS
    assert contract["classes"][LLM_ARGS]["extra"] == "forbid"
    assert contract["classes"]["tensorrt_llm.llmapi.llm_args.KvCacheConfig"]["extra"] == "forbid"


REQUESTS = {
    "greedy": RequestOptions(max_new_tokens=64, stop_strings=("</s>",)),
    "sampled": RequestOptions(
        SamplingParams(
            temperature=0.6,
            top_p=0.95,
            top_k=40,
            min_p=0.05,
            repetition_penalty=1.1,
            frequency_penalty=0.2,
            presence_penalty=0.3,
            seed=7,
        ),
        max_new_tokens=9,
        stop_token_ids=(128009,),
        ignore_eos=True,
    ),
    "logprobs": RequestOptions(max_new_tokens=4, logprobs=0),
    "top-logprobs": RequestOptions(SamplingParams(temperature=0.7), max_new_tokens=4, logprobs=5),
}


@pytest.mark.parametrize("kind", sorted(REQUESTS))
def test_requests_become_sampling_params_and_generate_async_arguments(contract, kind):
    request = GenerationRequest("r", (1, 2, 3), REQUESTS[kind])
    kwargs = sampling_kwargs(request)
    assert check_fields(contract, "tensorrt_llm.SamplingParams", set(kwargs)) == []
    call = generate_kwargs(request)
    assert check_call(contract, LLM + ".generate_async", set(call)) == []


def _runtime_source() -> ast.Module:
    return ast.parse(Path(trtllm_runtime.__file__).read_text())


def _function(tree: ast.Module, name: str) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{name} not found in trtllm_runtime.py")


def attributes_read(node: ast.AST, variable: str) -> set[str]:
    """`variable.x` and `getattr(variable, "x", ...)` in the runtime's own source."""
    names = set()
    for sub in ast.walk(node):
        if (
            isinstance(sub, ast.Attribute)
            and isinstance(sub.value, ast.Name)
            and sub.value.id == variable
        ):
            names.add(sub.attr)
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Name)
            and sub.func.id == "getattr"
            and isinstance(sub.args[0], ast.Name)
            and sub.args[0].id == variable
            and isinstance(sub.args[1], ast.Constant)
        ):
            names.add(sub.args[1].value)
    return names


def test_the_outputs_and_results_the_runtime_reads_exist(contract):
    tree = _runtime_source()
    outputs = attributes_read(_function(tree, "event_from_output"), "output")
    outputs |= attributes_read(_function(tree, "_stream"), "output")
    results = attributes_read(_function(tree, "_stream"), "chunk")
    results |= attributes_read(_function(tree, "_stream"), "result")
    results |= attributes_read(_function(tree, "abort"), "result")
    assert outputs >= {"token_ids_diff", "text_diff", "logprobs_diff", "token_ids", "finish_reason"}
    assert results >= {"outputs", "finished", "abort"}
    completion, result = (
        "tensorrt_llm.executor.result.CompletionOutput",
        ("tensorrt_llm.executor.result.GenerationResult"),
    )
    assert check_attributes(contract, completion, outputs) == []
    assert check_attributes(contract, result, results | {"__aiter__", "__anext__"}) == []
    logprob = attributes_read(_function(tree, "_chosen_logprob"), "value")
    assert check_attributes(contract, "tensorrt_llm.executor.result.Logprob", logprob) == []
    # self._llm.get_stats(timeout=...), self._llm.shutdown()
    assert check_call(contract, LLM + ".get_stats", {"timeout"}) == []
    assert check_call(contract, LLM + ".shutdown", ()) == []


def test_finish_reasons_we_map_are_tensorrt_llms(contract):
    theirs = set(contract["finish_reasons"]["annotated"]) | set(
        contract["finish_reasons"]["assigned"]
    )
    assert set(FINISH_REASONS) <= theirs
    # 'not_finished' (disaggregated context-only requests, which we never send) is the one
    # we do not map; event_from_output treats an unmapped reason as STOP.
    assert theirs - set(FINISH_REASONS) == {"not_finished"}


def stats_keys_read() -> tuple[set[str], set[str]]:
    """`stats.get("k")` and `kv.get("k")` in stats_from_iteration."""
    top, kv = set(), set()
    for sub in ast.walk(_function(_runtime_source(), "stats_from_iteration")):
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Attribute)
            and sub.func.attr == "get"
            and isinstance(sub.func.value, ast.Name)
            and isinstance(sub.args[0], ast.Constant)
        ):
            {"stats": top, "kv": kv}[sub.func.value.id].add(sub.args[0].value)
    return top, kv


def test_the_stats_keys_the_runtime_reads_exist(contract):
    top, kv = stats_keys_read()
    assert {"iter", "numActiveRequests", "kvCacheStats"} <= top
    assert {"maxNumBlocks", "freeNumBlocks", "reusedBlocks"} <= kv
    assert top - set(contract["stats"]["IterationStats"]) == set()
    assert kv - set(contract["stats"]["KvCacheStats"]) == set()


def _without(contract: dict, path: tuple[str, ...], name: str) -> dict:
    edited = copy.deepcopy(contract)
    entry = edited
    for key in path:
        entry = entry[key]
    for key in ("params", "positional", "keyword_only", "required", "fields"):
        if key in entry and name in entry[key]:
            entry[key].remove(name)
    return edited


@pytest.mark.parametrize(
    ("path", "name", "check"),
    [
        (
            ("functions", "tensorrt_llm.quantization.quantize_by_modelopt.quantize_and_export"),
            "calib_max_seq_length",
            "build",
        ),
        (("classes", BUILD_CONFIG), "output_timing_cache", "build"),
        (("classes", LLM_ARGS), "gather_generation_logits", "llm"),
        (("classes", "tensorrt_llm.sampling_params.SamplingParams"), "top_k", "sampling"),
    ],
)
def test_removing_a_keyword_the_adapters_use_fails_the_check(
    contract, checkpoint, path, name, check
):
    edited = _without(contract, path, name)
    if check == "build":
        problems = []
        for _, job in gpu_jobs(checkpoint):
            for call in plan_calls(job, SCRATCH, ENGINE_OUT):
                problems += execution_problems(edited, call.function, call.kwargs)
    elif check == "llm":
        kwargs = llm_kwargs(Path("/e"), Path("/e"), 0.9)
        problems = check_call(edited, LLM + ".__init__", set(kwargs), kwargs_fields=LLM_ARGS)
    else:
        request = GenerationRequest("r", (1,), REQUESTS["greedy"])
        problems = check_fields(
            edited, "tensorrt_llm.SamplingParams", set(sampling_kwargs(request))
        )
    assert problems, f"removing {name!r} went unnoticed"
    assert all(repr(name) in p for p in problems)
    assert all(
        p.endswith((f"unknown keyword {name!r}", f"unknown field {name!r}")) for p in problems
    )


# A made-up miniature of the files the tool reads (not TensorRT-LLM's code): the extraction
# rules on constructs the real files use.
MINIATURE = {
    "tensorrt_llm/version.py": '__version__ = "9.9.9"\n',
    "tensorrt_llm/_tensorrt_engine/__init__.py": (
        "from tensorrt_llm.llmapi.llm import _TrtLLM as LLM\n"
    ),
    "tensorrt_llm/llmapi/llm.py": """
class BaseLLM:
    def __init__(self, model, tokenizer=None, **kwargs):
        valid_keys = set(list(llm_args_cls.model_fields.keys()) + ['_mpi_session'])
    def generate_async(self, inputs, sampling_params=None, streaming=False): ...
    def get_stats(self, timeout=2): ...
    def shutdown(self): ...
class _TrtLLM(BaseLLM):
    def __init__(self, model, tokenizer=None, **kwargs): ...
""",
    "tensorrt_llm/llmapi/llm_args.py": """
from pydantic import BaseModel, PrivateAttr
class StrictBaseModel(BaseModel):
    class Config:
        extra = "forbid"
class KvCacheConfig(StrictBaseModel):
    enable_block_reuse: bool = Field(default=True)
class BaseLlmArgs(StrictBaseModel):
    model: str = Field(description="required: no default")
    mpi_session: object = Field(default=None, alias="_mpi_session")
    _private: int = PrivateAttr(default=0)
class TrtLlmArgs(BaseLlmArgs):
    build_config: object = Field(default=None)
""",
    "tensorrt_llm/sampling_params.py": """
@dataclass(slots=True, kw_only=True)
class SamplingParams:
    max_tokens: int = 32
    _hidden: int = field(default=None, init=False)
""",
    "tensorrt_llm/executor/result.py": """
@dataclass(slots=True)
class Logprob:
    logprob: float
@dataclass(slots=True)
class CompletionOutput:
    index: int
    finish_reason: Optional[Literal['stop', 'length']] = None
    @property
    def text_diff(self): ...
class GenerationResultBase:
    @property
    def outputs(self): ...
class GenerationResult(GenerationResultBase):
    def abort(self):
        output.finish_reason = 'cancelled'
""",
    "tensorrt_llm/builder.py": """
@dataclass
class BuildConfig:
    max_batch_size: int = 8
class Engine:
    def save(self, engine_dir): ...
def build(model, build_config): ...
""",
    "tensorrt_llm/plugin/plugin.py": """
class PluginConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    gemm_plugin: Optional[str] = Field(default=None)
""",
    "tensorrt_llm/models/nemotron_nas/model.py": """
class DeciLMForCausalLM(DecoderModelForCausalLM):
    @classmethod
    def from_hugging_face(cls, hf_model_or_dir, dtype='auto', **kwargs): ...
    @classmethod
    def from_checkpoint(cls, ckpt_dir, rank=None): ...
""",
    "tensorrt_llm/models/modeling_utils.py": """
class PretrainedModel(Module):
    def save_checkpoint(self, output_dir, save_config=True): ...
class DecoderModelForCausalLM(PretrainedModel): ...
""",
    "tensorrt_llm/quantization/quantize_by_modelopt.py": (
        "def quantize_and_export(*, model_dir, seed, device_map='auto'): ...\n"
    ),
    "tensorrt_llm/mapping.py": """
class Mapping:
    def __init__(self, world_size=1, rank=0, *, tp_size=1): ...
""",
    "cpp/tensorrt_llm/executor/jsonSerialization.cpp": (
        "NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(KvCacheStats, maxNumBlocks);\n"
        "NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(IterationStats, iter,\n    kvCacheStats);\n"
    ),
}


def test_the_tool_extracts_signatures_fields_reasons_and_stats(tmp_path):
    assert set(MINIATURE) == set(FILES)
    commit = "0" * 40
    for rel, text in MINIATURE.items():
        (tmp_path / commit / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / commit / rel).write_text(text)
    made = build_contract([tmp_path / commit], "9.9.9")
    assert made["source"]["tensorrt_llm/builder.py"] == {
        "commit": commit,
        "version": "9.9.9",
        "excerpt": False,
    }
    init = made["functions"][LLM + ".__init__"]
    assert (init["params"], init["required"], init["var_keyword"]) == (
        ["model", "tokenizer"],
        ["model"],
        True,
    )
    assert made["functions"][LLM + ".generate_async"]["defined_in"].endswith(
        "BaseLLM.generate_async"
    )
    quantize = made["functions"][
        "tensorrt_llm.quantization.quantize_by_modelopt.quantize_and_export"
    ]
    assert (quantize["keyword_only"], quantize["required"]) == (
        ["model_dir", "seed", "device_map"],
        ["model_dir", "seed"],
    )
    hf = made["functions"][
        "tensorrt_llm.models.nemotron_nas.model.DeciLMForCausalLM.from_hugging_face"
    ]
    assert hf["params"] == ["hf_model_or_dir", "dtype"]  # cls dropped
    saved = made["functions"][
        "tensorrt_llm.models.nemotron_nas.model.DeciLMForCausalLM.save_checkpoint"
    ]
    assert (
        saved["defined_in"] == "tensorrt_llm.models.modeling_utils.PretrainedModel.save_checkpoint"
    )
    args = made["classes"][LLM_ARGS]
    assert (args["fields"], args["required"], args["extra"]) == (
        ["model", "mpi_session", "build_config"],
        ["model"],
        "forbid",
    )
    assert args["aliases"] == {"mpi_session": "_mpi_session"}
    sampling = made["classes"]["tensorrt_llm.sampling_params.SamplingParams"]
    assert (sampling["fields"], sampling["non_init_fields"]) == (["max_tokens"], ["_hidden"])
    result = made["classes"]["tensorrt_llm.executor.result.GenerationResult"]
    assert (result["properties"], result["methods"]) == (["outputs"], ["abort"])
    assert made["llm"]["extra_kwargs"] == ["_mpi_session"]
    assert made["finish_reasons"] == {
        "annotated": ["stop", "length"],
        "assigned": ["cancelled"],
    }
    assert made["stats"] == {
        "IterationStats": ["iter", "kvCacheStats"],
        "KvCacheStats": ["maxNumBlocks"],
    }
