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
from engine_build.backends.trtllm_pytorch import fp8_calls
from engine_build.checkpoint import Checkpoint
from engine_build.profiles import DeviceKind, load_profiles
from service.runtime import trtllm_runtime
from service.runtime.interface import GenerationRequest
from service.runtime.options import RequestOptions, SamplingParams
from service.runtime.trtllm_runtime import (
    FINISH_REASONS,
    PYTORCH_LLM_CLASS,
    generate_kwargs,
    llm_kwargs,
    pytorch_llm_kwargs,
    sampling_kwargs,
)
from tools.trtllm_contract import (
    FILES,
    MODELOPT_FILES,
    ContractError,
    build_contract,
    check_attributes,
    check_call,
    check_constants,
    check_fields,
    root_version,
)

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


TORCH_LLM_ARGS = "tensorrt_llm.llmapi.llm_args.TorchLlmArgs"
KV_CACHE_CONFIG = "tensorrt_llm.llmapi.KvCacheConfig"


@pytest.mark.parametrize("kv_cache", ["bf16", "fp8"])
def test_the_pytorch_flow_llm_is_made_with_arguments_it_accepts(contract, kv_cache):
    limits = load_profiles().get("h100x2").limits
    kwargs = pytorch_llm_kwargs(Path("/engines/x"), 2, limits, limits.max_seq_len, kv_cache)
    problems = check_call(
        contract, PYTORCH_LLM_CLASS + ".__init__", set(kwargs),
        kwargs_fields=TORCH_LLM_ARGS, llm="llm_pytorch",
    )  # fmt: skip
    assert problems == []
    assert check_fields(contract, KV_CACHE_CONFIG, kwargs["kv_cache_config"]) == []
    assert contract["llm_pytorch"]["kwargs_checked_against"] == TORCH_LLM_ARGS
    # Not the TensorRT flow's: the PyTorch LLM refuses TensorRT-only arguments.
    trt_only = set(llm_kwargs(Path("/e"), Path("/e"), 0.9)) - set(kwargs)
    assert trt_only == {"gather_generation_logits"}
    refused = check_call(
        contract, PYTORCH_LLM_CLASS + ".__init__", {"model", "quant_config"},
        kwargs_fields=TORCH_LLM_ARGS, llm="llm_pytorch",
    )  # fmt: skip
    assert len(refused) == 1 and "refused by the PyTorch backend" in refused[0]


def test_removing_a_pytorch_flow_keyword_fails_the_check(contract):
    edited = copy.deepcopy(contract)
    edited["classes"][TORCH_LLM_ARGS]["fields"].remove("enable_iter_perf_stats")
    limits = load_profiles().get("h100x2").limits
    kwargs = pytorch_llm_kwargs(Path("/engines/x"), 2, limits, limits.max_seq_len, "fp8")
    problems = check_call(
        edited, PYTORCH_LLM_CLASS + ".__init__", set(kwargs),
        kwargs_fields=TORCH_LLM_ARGS, llm="llm_pytorch",
    )  # fmt: skip
    defined = "tensorrt_llm.llmapi.llm.LLM"  # where tensorrt_llm.LLM is defined
    assert problems == [f"{defined}.__init__: unknown keyword 'enable_iter_perf_stats'"]


def test_the_pytorch_flow_fp8_build_calls_modelopt_as_it_is_defined(contract, checkpoint):
    profile = load_profiles().get("h100x2")
    job = BuildJob(checkpoint, profile, profile.precision("fp8"), "/data/calibration")
    _, quantize, export = fp8_calls(job, ENGINE_OUT)
    for call in (quantize, export):
        assert check_call(contract, call.function, set(call.kwargs)) == [], call.function
    names = set(quantize.kwargs["config"])
    assert check_constants(contract, "modelopt.torch.quantization", names) == []
    assert contract["modelopt"]["version"] == "0.37.0"


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
class _TorchLLM(BaseLLM):
    def __init__(self, model, tokenizer=None, **kwargs):
        backend = kwargs.pop("backend", "pytorch")
        self._validate_args_for_torch_backend(kwargs)
        super().__init__(model, tokenizer, backend=backend, **kwargs)
    def _validate_args_for_torch_backend(self, kwargs):
        trtllm_fields = set(TrtLlmArgs.model_fields.keys())
        torchllm_fields = set(TorchLlmArgs.model_fields.keys())
        trtllm_specific_fields = trtllm_fields - torchllm_fields
        if [key for key in kwargs if key in trtllm_specific_fields]:
            raise ValueError("specific to TensorRT backend")
class LLM(_TorchLLM):
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
    quant_config: object = Field(default=None)
class TorchLlmArgs(BaseLlmArgs):
    build_config: object = Field(default=None)
    cuda_graph_config: object = Field(default=None)
    _quant_config: object = PrivateAttr(default=None)
    @property
    def quant_config(self): ...
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


METADATA = "nvidia_modelopt-8.8.8.dist-info/METADATA"
# A made-up miniature of the ModelOpt files (an unpacked wheel: no commit, a .dist-info).
MODELOPT_MINIATURE = {
    METADATA: "Metadata-Version: 2.4\nName: nvidia-modelopt\nVersion: 8.8.8\n\nVersion: 0\n",
    "modelopt/torch/quantization/__init__.py": """
from . import mode, utils
from .compress import *
from .config import *
from .model_quant import *
""",
    "modelopt/torch/quantization/model_quant.py": """
import modelopt.torch.quantization as mtq
from .config import QuantizeConfig
__all__ = ["calibrate", "quantize"]
def calibrate(model, algorithm="max", forward_loop=None): ...
def quantize(model, config, forward_loop=None): ...
def _helper(): ...
""",
    "modelopt/torch/quantization/config.py": """
from pydantic import Field
_default_disabled_quantizer_cfg = {"default": {"enable": False}}
FP8_DEFAULT_CFG = {"quant_cfg": {**_default_disabled_quantizer_cfg}, "algorithm": "max"}
choices: set[str] = set()
QuantizeQuantCfgType = dict
FP8_KV_CFG: dict = {"quant_cfg": {}, "algorithm": "max"}
class QuantizeConfig: ...
""",
    "modelopt/torch/export/__init__.py": (
        "from .model_config import *\nfrom .unified_export_hf import *\n"
    ),
    "modelopt/torch/export/unified_export_hf.py": """
__all__ = ["export_hf_checkpoint"]
def export_hf_checkpoint(model, dtype=None, export_dir="/tmp", save_modelopt_state=False): ...
""",
}
TORCH_ARGS = "tensorrt_llm.llmapi.llm_args.TorchLlmArgs"


def write_sources(tmp_path: Path, trtllm: dict, modelopt: dict) -> list[Path]:
    """The two miniatures as source roots: one named by a commit, one like an unpacked wheel."""
    roots = {tmp_path / ("0" * 40): trtllm, tmp_path / "modelopt-8.8.8": modelopt}
    for root, files in roots.items():
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
    return list(roots)


def _edited(files: dict, rel: str, old: str, new: str) -> dict:
    assert old in files[rel], old
    return {**files, rel: files[rel].replace(old, new)}


def test_the_tool_extracts_signatures_fields_reasons_and_stats(tmp_path):
    assert set(MINIATURE) == set(FILES)
    assert set(MODELOPT_MINIATURE) == {*MODELOPT_FILES, METADATA}
    commit = "0" * 40
    made = build_contract(write_sources(tmp_path, MINIATURE, MODELOPT_MINIATURE), "9.9.9")
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
        ["model", "mpi_session", "build_config", "quant_config"],
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


def test_the_tool_records_the_pytorch_llm_its_kwargs_and_what_it_refuses(tmp_path):
    made = build_contract(write_sources(tmp_path, MINIATURE, MODELOPT_MINIATURE), "9.9.9")
    assert made["exports"]["tensorrt_llm.LLM"] == "tensorrt_llm.llmapi.llm.LLM"
    init = made["functions"]["tensorrt_llm.llmapi.llm.LLM.__init__"]
    assert (init["defined_in"], init["params"], init["var_keyword"]) == (
        "tensorrt_llm.llmapi.llm.LLM.__init__",
        ["model", "tokenizer"],
        True,
    )
    assert made["functions"]["tensorrt_llm.llmapi.llm.LLM.get_stats"]["defined_in"] == (
        "tensorrt_llm.llmapi.llm.BaseLLM.get_stats"
    )
    # quant_config: a TrtLlmArgs field, only a property (PrivateAttr) of TorchLlmArgs
    torch_args = made["classes"][TORCH_ARGS]
    assert torch_args["fields"] == ["model", "mpi_session", "build_config", "cuda_graph_config"]
    assert torch_args["properties"] == ["quant_config"]
    assert made["llm_pytorch"] == {
        "class": "tensorrt_llm.llmapi.llm.LLM",
        "kwargs_checked_against": TORCH_ARGS,
        "extra_kwargs": ["_mpi_session"],
        "refused_by": "tensorrt_llm.llmapi.llm._TorchLLM._validate_args_for_torch_backend",
        "refused_kwargs_from": {"fields_of": LLM_ARGS, "minus_fields_of": TORCH_ARGS},
        "refused_kwargs": ["quant_config"],
    }
    # the TensorRT-engine LLM's section is as before: nothing refused
    assert made["llm"] == {
        "class": "tensorrt_llm.llmapi.llm._TrtLLM",
        "kwargs_checked_against": LLM_ARGS,
        "extra_kwargs": ["_mpi_session"],
    }


def test_check_call_reports_keywords_the_pytorch_llm_refuses_or_does_not_know(tmp_path):
    made = build_contract(write_sources(tmp_path, MINIATURE, MODELOPT_MINIATURE), "9.9.9")
    init = "tensorrt_llm.LLM.__init__"
    ok = {"tokenizer", "cuda_graph_config", "build_config", "_mpi_session", "model"}
    assert check_call(made, init, ok, kwargs_fields=TORCH_ARGS, llm="llm_pytorch") == []
    problems = check_call(
        made,
        init,
        ok | {"quant_config", "no_such_arg"},
        kwargs_fields=TORCH_ARGS,
        llm="llm_pytorch",
    )
    assert problems == [
        "tensorrt_llm.llmapi.llm.LLM.__init__: unknown keyword 'no_such_arg'",
        "tensorrt_llm.llmapi.llm.LLM.__init__: keyword 'quant_config' refused by the PyTorch "
        f"backend (a {LLM_ARGS} field that "
        "tensorrt_llm.llmapi.llm._TorchLLM._validate_args_for_torch_backend rejects)",
    ]
    # the TensorRT-engine LLM takes quant_config, and knows no cuda_graph_config
    assert (
        check_call(made, LLM + ".__init__", {"model", "quant_config"}, kwargs_fields=LLM_ARGS) == []
    )
    assert check_call(
        made, LLM + ".__init__", {"model", "cuda_graph_config"}, kwargs_fields=LLM_ARGS
    ) == [f"{LLM}.__init__: unknown keyword 'cuda_graph_config'"]
    # the section and the fields class must agree; an unknown section is a problem, not a crash
    assert check_call(made, init, {"model"}, kwargs_fields=LLM_ARGS, llm="llm_pytorch") == [
        f"tensorrt_llm.llmapi.llm.LLM.__init__: llm_pytorch checks **kwargs against {TORCH_ARGS}, "
        f"not {LLM_ARGS}"
    ]
    assert check_call(made, init, {"model"}, kwargs_fields=TORCH_ARGS, llm="llm_jax") == [
        "tensorrt_llm.llmapi.llm.LLM.__init__: no LLM section 'llm_jax' in the contract"
    ]
    # without kwargs_fields a **kwargs takes nothing beyond the named parameters
    assert check_call(made, init, {"model", "cuda_graph_config"}) == [
        "tensorrt_llm.llmapi.llm.LLM.__init__: unknown keyword 'cuda_graph_config'"
    ]


LLM_PY = "tensorrt_llm/llmapi/llm.py"


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("def _validate_args_for_torch_backend(", "def _check(", "no method"),
        ("self._validate_args_for_torch_backend(kwargs)", "pass", "calls self."),
        ('raise ValueError("specific to TensorRT backend")', "pass", "raises nothing"),
        ("trtllm_fields - torchllm_fields", "trtllm_fields", "expected one"),
        ("set(TorchLlmArgs.model_fields.keys())", "set(NoSuchArgs.model_fields)", "NoSuchArgs"),
    ],
)
def test_the_tool_fails_when_the_pytorch_llms_refusal_is_not_as_read(tmp_path, old, new, message):
    edited = _edited(MINIATURE, LLM_PY, old, new)
    with pytest.raises(ContractError, match=message):
        build_contract(write_sources(tmp_path, edited, MODELOPT_MINIATURE), "9.9.9")


@pytest.mark.parametrize(
    "difference",
    [
        "set(TrtLlmArgs.model_fields) - set(TorchLlmArgs.model_fields)",
        "set(trtllm_fields) - set(torchllm_fields)",
    ],
)
def test_the_refusal_may_subtract_the_model_fields_directly_or_wrapped(tmp_path, difference):
    edited = _edited(MINIATURE, LLM_PY, "trtllm_fields - torchllm_fields", difference)
    made = build_contract(write_sources(tmp_path, edited, MODELOPT_MINIATURE), "9.9.9")
    assert made["llm_pytorch"]["refused_kwargs"] == ["quant_config"]


def test_the_tool_records_modelopts_functions_exports_constants_and_version(tmp_path):
    made = build_contract(write_sources(tmp_path, MINIATURE, MODELOPT_MINIATURE), "9.9.9")
    modelopt = made["modelopt"]
    assert modelopt["version"] == "8.8.8"
    assert set(modelopt["source"]) == set(MODELOPT_FILES)
    assert modelopt["source"]["modelopt/torch/quantization/config.py"] == {
        "commit": None,
        "root": "modelopt-8.8.8",
        "version": "8.8.8",
        "excerpt": False,
    }
    assert not set(MODELOPT_FILES) & set(made["source"])  # TensorRT-LLM's files only there
    assert modelopt["exports"] == {
        "modelopt.torch.quantization.quantize": "modelopt.torch.quantization.model_quant.quantize",
        "modelopt.torch.export.export_hf_checkpoint": (
            "modelopt.torch.export.unified_export_hf.export_hf_checkpoint"
        ),
    }
    quantize = modelopt["functions"]["modelopt.torch.quantization.model_quant.quantize"]
    assert (quantize["params"], quantize["required"]) == (
        ["model", "config", "forward_loop"],
        ["model", "config"],
    )
    assert modelopt["constants"] == {
        "modelopt.torch.quantization": {
            "defined_in": "modelopt.torch.quantization.config",
            "names": ["FP8_DEFAULT_CFG", "FP8_KV_CFG"],
        }
    }
    assert modelopt["optional"] == {
        "modelopt.torch.quantization.update_quant_cfg_with_kv_cache_quant": None
    }
    # the checks, by the public names the build uses
    assert check_call(made, "modelopt.torch.quantization.quantize", (), n_positional=3) == []
    export = "modelopt.torch.export.export_hf_checkpoint"
    assert check_call(made, export, {"export_dir"}, n_positional=1) == []
    assert check_call(made, export, {"export_dir", "components"}, n_positional=1) == [
        "modelopt.torch.export.unified_export_hf.export_hf_checkpoint: unknown keyword 'components'"
    ]
    assert check_call(made, "modelopt.torch.quantization.quantize", {"model"}) == [
        "modelopt.torch.quantization.model_quant.quantize: required parameter 'config' missing"
    ]
    assert check_call(
        made, "modelopt.torch.quantization.update_quant_cfg_with_kv_cache_quant", ()
    ) == ["modelopt.torch.quantization.update_quant_cfg_with_kv_cache_quant: not in the contract"]
    quantization = "modelopt.torch.quantization"
    assert check_constants(made, quantization, {"FP8_DEFAULT_CFG", "FP8_KV_CFG"}) == []
    assert check_constants(made, quantization + ".config", {"FP8_KV_CFG"}) == []
    assert check_constants(made, quantization, {"FP8_KV_CFG", "NVFP4_DEFAULT_CFG"}) == [
        "modelopt.torch.quantization: no constant 'NVFP4_DEFAULT_CFG'"
    ]
    assert check_constants(made, "modelopt.torch.export", {"X"}) == [
        "modelopt.torch.export: not in the contract"
    ]


QUANT_INIT = "modelopt/torch/quantization/__init__.py"
MODEL_QUANT = "modelopt/torch/quantization/model_quant.py"


def test_an_optional_modelopt_name_is_recorded_where_the_package_has_it(tmp_path):
    defined = _edited(
        _edited(MODELOPT_MINIATURE, MODEL_QUANT, '"quantize"]', '"quantize", "update_quant_cfg"]'),
        MODEL_QUANT,
        "def _helper(): ...",
        "def update_quant_cfg(quant_cfg, kv_cache_quant_cfg): ...",
    )
    imported = _edited(
        defined,
        QUANT_INIT,
        "from .model_quant import *",
        "from .model_quant import *\n"
        "try:\n"
        "    from .model_quant import update_quant_cfg as update_quant_cfg_with_kv_cache_quant\n"
        "except ImportError:\n"
        "    pass\n",
    )
    made = build_contract(write_sources(tmp_path, MINIATURE, imported), "9.9.9")
    public = "modelopt.torch.quantization.update_quant_cfg_with_kv_cache_quant"
    target = "modelopt.torch.quantization.model_quant.update_quant_cfg"
    assert made["modelopt"]["optional"] == {public: target}
    assert made["modelopt"]["exports"][public] == target
    assert check_call(made, public, (), n_positional=2) == []


def test_an_optional_modelopt_name_from_a_file_not_read_fails_the_tool(tmp_path):
    # as in later ModelOpt: `from .utils import update_quant_cfg_with_kv_cache_quant`
    edited = _edited(
        MODELOPT_MINIATURE,
        QUANT_INIT,
        "from .model_quant import *",
        "from .model_quant import *\nfrom .utils import update_quant_cfg_with_kv_cache_quant",
    )
    with pytest.raises(ContractError, match="add its file to MODELOPT_FILES"):
        build_contract(write_sources(tmp_path, MINIATURE, edited), "9.9.9")


@pytest.mark.parametrize(
    ("rel", "old", "new", "message"),
    [
        # the package no longer re-exports quantize from model_quant
        (QUANT_INIT, "from .model_quant import *", "", "binds it to None"),
        (MODEL_QUANT, '"calibrate", "quantize"', '"calibrate"', "binds it to None"),
        # a later explicit import rebinds it
        (QUANT_INIT, "from .model_quant import *", "from .model_quant import *\n"
         "from .compress import quantize", "binds it to modelopt.torch.quantization.compress"),
        # the constants are no longer re-exported by the package
        (QUANT_INIT, "from .config import *", "", "re-exports no constant"),
        ("modelopt/torch/quantization/config.py", "class QuantizeConfig",
         "__all__ = ['QuantizeConfig']\nclass QuantizeConfig", "re-exports no constant"),
        (METADATA, "Version: 8.8.8", "Summary: -", "no single known version"),
    ],
)  # fmt: skip
def test_the_tool_fails_when_modelopts_exports_are_not_as_recorded(
    tmp_path, rel, old, new, message
):
    edited = _edited(MODELOPT_MINIATURE, rel, old, new)
    with pytest.raises(ContractError, match=message):
        build_contract(write_sources(tmp_path, MINIATURE, edited), "9.9.9")


def test_a_roots_version_comes_from_version_py_metadata_or_modelopts_init(tmp_path):
    (tmp_path / "trt" / "tensorrt_llm").mkdir(parents=True)
    (tmp_path / "trt" / "tensorrt_llm" / "version.py").write_text('__version__ = "1.2.1"\n')
    (tmp_path / "init" / "modelopt").mkdir(parents=True)
    (tmp_path / "init" / "modelopt" / "__init__.py").write_text('__version__ = "0.37.0"\n')
    (tmp_path / "neither" / "modelopt").mkdir(parents=True)
    (tmp_path / "neither" / "modelopt" / "__init__.py").write_text(
        '__version__ = _version("nvidia-modelopt")\n'
    )
    assert root_version(tmp_path / "trt") == "1.2.1"
    assert root_version(tmp_path / "init") == "0.37.0"
    assert root_version(tmp_path / "neither") is None
