"""TensorRT-LLM's API contract for our adapters, read from its source files (no import of it).

    python tools/trtllm_contract.py ROOT [ROOT ...] [--release 1.2.1] \
        [-o tests/data/trtllm_contract.json]

Each ROOT is a TensorRT-LLM checkout, or a directory holding some of the files below at their
repository paths; for each file the first ROOT that has it is read. A ROOT's commit is
`git rev-parse HEAD` in a checkout, else the ROOT's directory name when that is 40 hex digits
(e.g. /tmp/trtllm_src/<commit>/...); a ROOT with neither (an unpacked wheel) has commit None and
its directory name recorded as `root`. Its version is `__version__` in the ROOT's own
`tensorrt_llm/version.py`, else the `Version:` of a `*.dist-info/METADATA` at the ROOT, else a
literal `__version__` in its `modelopt/__init__.py`. So files read at different commits can be
given as one ROOT per commit, and the fixture records per file which commit (or root) and
version it came from. The ModelOpt files (MODELOPT_FILES, under `modelopt/`) are required too,
typically from one unpacked nvidia-modelopt wheel (e.g. /tmp/trtllm_src/modelopt-0.37.0/, its
`.dist-info/METADATA` beside `modelopt/`); they are parsed apart from TensorRT-LLM's files.

What is extracted, with `ast` (and a regular expression for the one C++ file):
  functions  parameter names in order, which are required, which keyword-only, and whether the
             function takes *args / **kwargs (methods without self/cls; inherited methods are
             found through base classes defined in the files read);
  classes    dataclass / pydantic fields (what `Class(**kwargs)` accepts; inherited fields
             included, `init=False`, ClassVar and PrivateAttr excluded), which are required,
             pydantic aliases and `extra` setting, and the properties and methods instances have;
  LLM        one section per LLM class (LLMS): `llm`, the TensorRT-engine `LLM`
             (tensorrt_llm._tensorrt_engine.LLM, an alias the tool follows), and `llm_pytorch`,
             the PyTorch-flow `tensorrt_llm.LLM` (tensorrt_llm.llmapi.llm.LLM). Both take
             **kwargs and `BaseLLM.__init__` checks each against the LLM-args model's fields
             (TrtLlmArgs, TorchLlmArgs) plus a few extra names: recorded as
             `kwargs_checked_against` and `extra_kwargs` (the extra names read from that
             `valid_keys` check). The PyTorch LLM's `__init__` first calls
             `_TorchLLM._validate_args_for_torch_backend(kwargs)`, which raises for any field of
             TrtLlmArgs that is not a field of TorchLlmArgs: the tool reads which two classes that
             method subtracts (and that an `__init__` calls it) and records the difference of
             their extracted fields as `refused_kwargs`, with `refused_by` and
             `refused_kwargs_from`; it fails if the method or that subtraction is gone;
  finish reasons  the `Literal` of `CompletionOutput.finish_reason` and every string assigned
             to a `.finish_reason` in executor/result.py;
  stats      the JSON keys of the executor's iteration stats (`LLM.get_stats()`), i.e. the
             fields of `NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(...)` in jsonSerialization.cpp;
  modelopt   for our PyTorch-flow FP8 build: the ModelOpt `version`, per-file `source`, the
             signatures of `quantize` and `export_hf_checkpoint` (as `functions` above, keyed by
             their defining modules), `exports` (the public names -> defining modules; each is
             checked against the package `__init__.py`: an explicit import of the name, or a
             `from .module import *` of the defining module whose `__all__`, if any, lists it),
             `constants` (the upper-case module-level names of quantization/config.py that
             `modelopt.torch.quantization` re-exports that way, e.g. FP8_DEFAULT_CFG,
             FP8_KV_CFG) and `optional` (public names that only some versions have, e.g.
             `update_quant_cfg_with_kv_cache_quant`: where the package `__init__` binds it, or
             null where neither an import of it nor a star import of a module read provides it;
             a star import of a module not read is not looked into, nor whether one imported
             after the name would rebind it).

The output is deterministic JSON (sorted keys; lists in source order).
`check_call` is how the contract is applied: no unknown keyword (unless the function takes
**kwargs, reported separately so callers can decide), every required parameter given; with
`kwargs_fields=` and `llm=` (which LLM section) the **kwargs are checked against that LLM-args
model, and for `llm="llm_pytorch"` a TensorRT-backend-only keyword is reported as refused by the
PyTorch backend. `check_fields`, `check_attributes` and `check_constants` check class fields,
instance attributes and module constants the same way.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The files read, at their repository paths.
FILES = (
    "tensorrt_llm/version.py",
    "tensorrt_llm/_tensorrt_engine/__init__.py",
    "tensorrt_llm/llmapi/llm.py",
    "tensorrt_llm/llmapi/llm_args.py",
    "tensorrt_llm/sampling_params.py",
    "tensorrt_llm/executor/result.py",
    "tensorrt_llm/builder.py",
    "tensorrt_llm/plugin/plugin.py",
    "tensorrt_llm/models/nemotron_nas/model.py",
    "tensorrt_llm/models/modeling_utils.py",
    "tensorrt_llm/quantization/quantize_by_modelopt.py",
    "tensorrt_llm/mapping.py",
    "cpp/tensorrt_llm/executor/jsonSerialization.cpp",
)
# ModelOpt (nvidia-modelopt), for the PyTorch-flow FP8 build; parsed apart from TensorRT-LLM.
MODELOPT_FILES = (
    "modelopt/torch/quantization/__init__.py",
    "modelopt/torch/quantization/model_quant.py",
    "modelopt/torch/quantization/config.py",
    "modelopt/torch/export/__init__.py",
    "modelopt/torch/export/unified_export_hf.py",
)
STATS_FILE = "cpp/tensorrt_llm/executor/jsonSerialization.cpp"
RESULT_FILE = "tensorrt_llm/executor/result.py"

# Functions and classes the adapters use, by the module that defines them.
FUNCTIONS = (
    "tensorrt_llm._tensorrt_engine.LLM.__init__",
    "tensorrt_llm._tensorrt_engine.LLM.generate_async",
    "tensorrt_llm._tensorrt_engine.LLM.get_stats",
    "tensorrt_llm._tensorrt_engine.LLM.shutdown",
    "tensorrt_llm.llmapi.llm.LLM.__init__",
    "tensorrt_llm.llmapi.llm.LLM.generate_async",
    "tensorrt_llm.llmapi.llm.LLM.get_stats",
    "tensorrt_llm.llmapi.llm.LLM.shutdown",
    "tensorrt_llm.builder.build",
    "tensorrt_llm.builder.Engine.save",
    "tensorrt_llm.mapping.Mapping.__init__",
    "tensorrt_llm.models.modeling_utils.PretrainedModel.save_checkpoint",
    "tensorrt_llm.models.nemotron_nas.model.DeciLMForCausalLM.from_hugging_face",
    "tensorrt_llm.models.nemotron_nas.model.DeciLMForCausalLM.from_checkpoint",
    "tensorrt_llm.models.nemotron_nas.model.DeciLMForCausalLM.save_checkpoint",
    "tensorrt_llm.quantization.quantize_by_modelopt.quantize_and_export",
)
CLASSES = (
    "tensorrt_llm.builder.BuildConfig",
    "tensorrt_llm.executor.result.CompletionOutput",
    "tensorrt_llm.executor.result.GenerationResult",
    "tensorrt_llm.executor.result.Logprob",
    "tensorrt_llm.llmapi.llm_args.KvCacheConfig",
    "tensorrt_llm.llmapi.llm_args.TrtLlmArgs",
    "tensorrt_llm.llmapi.llm_args.TorchLlmArgs",
    "tensorrt_llm.plugin.plugin.PluginConfig",
    "tensorrt_llm.sampling_params.SamplingParams",
)


@dataclass(frozen=True)
class LlmSpec:
    """One LLM class the adapters make, and how its **kwargs are checked."""

    cls: str  # as the adapters name it (aliases followed)
    args: str  # the LLM-args model BaseLLM.__init__ checks the **kwargs against
    refused_by: str | None = None  # a method of the class refusing some kwargs before that


# The fixture's section for each LLM.
LLMS = {
    "llm": LlmSpec("tensorrt_llm._tensorrt_engine.LLM", "tensorrt_llm.llmapi.llm_args.TrtLlmArgs"),
    "llm_pytorch": LlmSpec(
        "tensorrt_llm.llmapi.llm.LLM",
        "tensorrt_llm.llmapi.llm_args.TorchLlmArgs",
        refused_by="_validate_args_for_torch_backend",
    ),
}
LLM = LLMS["llm"].cls
LLM_ARGS = LLMS["llm"].args  # what the TensorRT backend validates against
# Public names the adapters import -> the module defining them (package __init__ re-exports,
# which this tool does not read).
EXPORTS = {
    "tensorrt_llm.Mapping": "tensorrt_llm.mapping.Mapping",
    "tensorrt_llm.SamplingParams": "tensorrt_llm.sampling_params.SamplingParams",
    "tensorrt_llm.llmapi.KvCacheConfig": "tensorrt_llm.llmapi.llm_args.KvCacheConfig",
    "tensorrt_llm.LLM": "tensorrt_llm.llmapi.llm.LLM",
    "tensorrt_llm.models.DeciLMForCausalLM": (
        "tensorrt_llm.models.nemotron_nas.model.DeciLMForCausalLM"
    ),
}
# ModelOpt: public names the FP8 build uses -> the module defining them (checked against the
# package __init__.py files read), the module whose constants the package re-exports, and
# public names only some ModelOpt versions have.
MODELOPT_EXPORTS = {
    "modelopt.torch.quantization.quantize": "modelopt.torch.quantization.model_quant.quantize",
    "modelopt.torch.export.export_hf_checkpoint": (
        "modelopt.torch.export.unified_export_hf.export_hf_checkpoint"
    ),
}
MODELOPT_CONSTANTS = {"modelopt.torch.quantization": "modelopt.torch.quantization.config"}
MODELOPT_OPTIONAL = ("modelopt.torch.quantization.update_quant_cfg_with_kv_cache_quant",)
KWARGS_POLICY = (
    "A function with **kwargs accepts any keyword at call time; the contract does not treat "
    "that as acceptance. check_call reports keywords outside the named parameters as "
    "'unknown' unless told where the **kwargs go: for the LLM they are checked against the "
    "LLM-args model's fields (what BaseLLM.__init__ itself enforces); for "
    "DeciLMForCausalLM.from_hugging_face they go on to DeciConfig.from_hugging_face, which is "
    "not read, so any keyword outside the named parameters counts as unknown."
)
PYDANTIC_BASES = {"BaseModel", "StrictBaseModel"}


class ContractError(RuntimeError):
    """A needed file or definition is missing from the sources given."""


@dataclass
class Module:
    """One parsed Python file."""

    name: str
    path: str
    tree: ast.Module
    classes: dict[str, ast.ClassDef] = field(default_factory=dict)
    functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)  # local name -> dotted target


def module_name(path: str) -> str:
    """`tensorrt_llm/llmapi/llm.py` -> `tensorrt_llm.llmapi.llm` (packages drop __init__)."""
    parts = path.removesuffix(".py").split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse_module(path: str, text: str) -> Module:
    """Top-level classes, functions and `from X import Y as Z` aliases of one file."""
    tree = ast.parse(text)
    module = Module(module_name(path), path, tree)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            module.classes[node.name] = node
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            module.functions[node.name] = node
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                module.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return module


# ---------------------------------------------------------------------------- sources


def root_version(root: Path) -> str | None:
    """`__version__` in tensorrt_llm/version.py, else a .dist-info/METADATA `Version:`, else a
    literal `__version__` in modelopt/__init__.py (None when none of these says)."""
    version_file = root / "tensorrt_llm" / "version.py"
    if version_file.is_file():
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", version_file.read_text())
        return match.group(1) if match else None
    metadata = sorted(root.glob("*.dist-info/METADATA"))
    if len(metadata) == 1:
        headers = metadata[0].read_text().split("\n\n", 1)[0]  # the body may quote anything
        match = re.search(r"^Version:\s*(\S+)\s*$", headers, re.MULTILINE)
        return match.group(1) if match else None
    init = root / "modelopt" / "__init__.py"
    if init.is_file():
        match = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", init.read_text(), re.MULTILINE)
        return match.group(1) if match else None
    return None


def root_provenance(root: Path) -> dict[str, Any]:
    """The commit and version of one source root (either may be None; without a commit the
    root's directory name is recorded as `root`)."""
    commit = None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        if out.returncode == 0 and (root / ".git").exists():
            commit = out.stdout.strip()
    except OSError:
        pass
    if commit is None and re.fullmatch(r"[0-9a-f]{40}", root.name):
        commit = root.name
    info: dict[str, Any] = {"commit": commit, "version": root_version(root)}
    if commit is None:
        info["root"] = root.resolve().name
    return info


def find_sources(roots: list[Path]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Each needed file -> (the file, its provenance); the first root holding it wins."""
    found = {}
    for rel in (*FILES, *MODELOPT_FILES):
        for root in roots:
            if (root / rel).is_file():
                info = root_provenance(root)
                text = (root / rel).read_text()
                info["excerpt"] = text.lstrip().startswith(("# EXCERPT", "// EXCERPT"))
                found[rel] = (root / rel, info)
                break
    missing = [
        rel
        for rel in (*FILES, *MODELOPT_FILES)
        if rel not in found and rel != "tensorrt_llm/version.py"
    ]
    if missing:
        raise ContractError(f"not found under any source root: {', '.join(missing)}")
    return found


# ---------------------------------------------------------------------------- extraction


class Index:
    """All parsed modules, with name resolution across them."""

    def __init__(self, modules: list[Module]) -> None:
        self.modules = {m.name: m for m in modules}

    def resolve(self, dotted: str) -> tuple[Module, list[str]]:
        """A dotted name -> (defining module, attribute path), following import aliases."""
        for _ in range(8):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):
                module = self.modules.get(".".join(parts[:cut]))
                if module is None:
                    continue
                rest = parts[cut:]
                if rest and rest[0] in module.aliases:
                    dotted = ".".join([module.aliases[rest[0]], *rest[1:]])
                    break
                return module, rest
            else:
                raise ContractError(f"{dotted}: no file read defines it")
        raise ContractError(f"{dotted}: too many aliases")

    def find_class(self, name: str, prefer: Module | None = None) -> tuple[Module, ast.ClassDef]:
        """A class by simple name, in `prefer` first, then in any module read."""
        if prefer is not None and name in prefer.classes:
            return prefer, prefer.classes[name]
        if prefer is not None and name in prefer.aliases:
            try:
                module, rest = self.resolve(prefer.aliases[name])
            except ContractError:
                raise KeyError(name) from None  # defined outside the files read
            if len(rest) == 1 and rest[0] in module.classes:
                return module, module.classes[rest[0]]
        for module in sorted(self.modules.values(), key=lambda m: m.name):
            if name in module.classes:
                return module, module.classes[name]
        raise KeyError(name)

    def mro(self, module: Module, cls: ast.ClassDef) -> list[tuple[Module, ast.ClassDef]]:
        """The class and its bases defined in the files read (depth first, as Python's for
        single inheritance chains; unknown bases are skipped)."""
        order, seen = [], set()

        def visit(mod: Module, node: ast.ClassDef) -> None:
            if (mod.name, node.name) in seen:
                return
            seen.add((mod.name, node.name))
            order.append((mod, node))
            for base in node.bases:
                name = _base_name(base)
                try:
                    visit(*self.find_class(name, mod))
                except KeyError:
                    continue

        visit(module, cls)
        return order

    def base_names(self, module: Module, cls: ast.ClassDef) -> set[str]:
        """Every base class name, including those not defined in the files read."""
        return {_base_name(b) for _, node in self.mro(module, cls) for b in node.bases}


def _base_name(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Subscript):
        return _base_name(node.value)
    return ast.unparse(node)


def signature(fn: ast.FunctionDef | ast.AsyncFunctionDef, drop_first: bool) -> dict[str, Any]:
    """Parameter names, required ones, keyword-only ones, *args/**kwargs."""
    args = fn.args
    positional = [*args.posonlyargs, *args.args]
    required = [a.arg for a in positional[: len(positional) - len(args.defaults)]]
    if drop_first and positional:
        first = positional.pop(0).arg
        required = [name for name in required if name != first]
    required += [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
    return {
        "params": [a.arg for a in positional] + [a.arg for a in args.kwonlyargs],
        "positional": [a.arg for a in positional],
        "keyword_only": [a.arg for a in args.kwonlyargs],
        "required": required,
        "var_positional": args.vararg is not None,
        "var_keyword": args.kwarg is not None,
    }


def _is_method(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    return not any(_base_name(d) == "staticmethod" for d in fn.decorator_list)


def extract_function(index: Index, dotted: str) -> dict[str, Any]:
    """The signature of a module function or of a (possibly inherited) method."""
    module, rest = index.resolve(dotted)
    if len(rest) == 1 and rest[0] in module.functions:
        fn = module.functions[rest[0]]
        return {"defined_in": f"{module.name}.{fn.name}", **signature(fn, drop_first=False)}
    if len(rest) == 2 and rest[0] in module.classes:
        for mod, cls in index.mro(module, module.classes[rest[0]]):
            for node in cls.body:
                if (
                    isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    and node.name == rest[1]
                ):
                    return {
                        "defined_in": f"{mod.name}.{cls.name}.{node.name}",
                        **signature(node, drop_first=_is_method(node)),
                    }
    raise ContractError(f"{dotted}: not found in the files read")


def _call_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call):
        return _base_name(node.func)
    return None


def _field_info(value: ast.expr | None) -> dict[str, Any]:
    """init / required / alias of one class-level field from its assigned value."""
    if value is None:
        return {"init": True, "required": True}
    name = _call_name(value)
    if name == "PrivateAttr":
        return {"private": True}
    if name in {"field", "Field"}:
        call = value  # type: ignore[assignment]
        assert isinstance(call, ast.Call)
        keywords = {k.arg: k.value for k in call.keywords if k.arg}
        info: dict[str, Any] = {"init": True}
        init = keywords.get("init")
        if isinstance(init, ast.Constant) and init.value is False:
            info["init"] = False
        has_default = "default" in keywords or "default_factory" in keywords
        if call.args:
            first = call.args[0]
            has_default = not (isinstance(first, ast.Constant) and first.value is Ellipsis)
        if isinstance(keywords.get("default"), ast.Constant):
            has_default = keywords["default"].value is not Ellipsis  # type: ignore[union-attr]
        info["required"] = not has_default
        alias = keywords.get("alias")
        if isinstance(alias, ast.Constant):
            info["alias"] = alias.value
        return info
    return {"init": True, "required": False}


def _class_kind(index: Index, module: Module, cls: ast.ClassDef) -> str:
    for mod, node in index.mro(module, cls):
        for deco in node.decorator_list:
            target = deco.func if isinstance(deco, ast.Call) else deco
            if _base_name(target) == "dataclass":
                return "dataclass"
        del mod
    if index.base_names(module, cls) & PYDANTIC_BASES:
        return "pydantic"
    return "class"


def _extra_setting(index: Index, module: Module, cls: ast.ClassDef) -> str | None:
    """pydantic `extra`: model_config dict / ConfigDict(...) / inner class Config."""
    for _, node in index.mro(module, cls):
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "model_config" for t in stmt.targets
            ):
                value = stmt.value
                if isinstance(value, ast.Dict):
                    for k, v in zip(value.keys, value.values, strict=True):
                        if isinstance(k, ast.Constant) and k.value == "extra":
                            return v.value if isinstance(v, ast.Constant) else None
                if isinstance(value, ast.Call):
                    for kw in value.keywords:
                        if kw.arg == "extra" and isinstance(kw.value, ast.Constant):
                            return kw.value.value
            if isinstance(stmt, ast.ClassDef) and stmt.name == "Config":
                for inner in stmt.body:
                    if (
                        isinstance(inner, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == "extra" for t in inner.targets)
                        and isinstance(inner.value, ast.Constant)
                    ):
                        return inner.value.value
    return None


def extract_class(index: Index, dotted: str) -> dict[str, Any]:
    """Fields (inherited included, base first), properties and methods of a class."""
    module, rest = index.resolve(dotted)
    if len(rest) != 1 or rest[0] not in module.classes:
        raise ContractError(f"{dotted}: no such class in the files read")
    cls = module.classes[rest[0]]
    kind = _class_kind(index, module, cls)
    fields: dict[str, dict[str, Any]] = {}
    properties: set[str] = set()
    methods: set[str] = set()
    for mod, node in reversed(index.mro(module, cls)):
        del mod
        for stmt in node.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name = stmt.target.id
                if "ClassVar" in ast.unparse(stmt.annotation) or name == "model_config":
                    continue
                info = _field_info(stmt.value)
                if info.get("private") or (kind == "pydantic" and name.startswith("_")):
                    fields.pop(name, None)
                    continue
                if kind == "class":
                    continue  # annotations on a plain class are not constructor fields
                info["annotation"] = ast.unparse(stmt.annotation)
                fields[name] = info
            elif isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef):
                decorators = {_base_name(d) for d in stmt.decorator_list}
                if "property" in decorators:
                    properties.add(stmt.name)
                else:
                    methods.add(stmt.name)
    init_fields = [name for name, info in fields.items() if info.get("init", True)]
    entry: dict[str, Any] = {
        "kind": kind,
        "fields": init_fields,
        "required": [n for n in init_fields if fields[n].get("required")],
        "non_init_fields": [n for n, info in fields.items() if not info.get("init", True)],
        "properties": sorted(properties),
        "methods": sorted(methods),
    }
    aliases = {n: fields[n]["alias"] for n in init_fields if "alias" in fields[n]}
    if aliases:
        entry["aliases"] = aliases
    if kind == "pydantic":
        entry["extra"] = _extra_setting(index, module, cls)
    return entry


def extract_llm(index: Index, spec: LlmSpec) -> dict[str, Any]:
    """How one LLM class treats its **kwargs: BaseLLM.__init__'s own `valid_keys` check and,
    where `spec.refused_by` names one, the method refusing other-backend arguments before it."""
    module, rest = index.resolve(spec.cls)
    if len(rest) != 1 or rest[0] not in module.classes:
        raise ContractError(f"{spec.cls}: no such class in the files read")
    cls_module, cls = module, module.classes[rest[0]]
    extra: list[str] = []
    for mod, node in index.mro(cls_module, cls):
        del mod
        for stmt in ast.walk(node):
            if not isinstance(stmt, ast.FunctionDef) or stmt.name != "__init__":
                continue
            for inner in ast.walk(stmt):
                if (
                    isinstance(inner, ast.Assign)
                    and any(isinstance(t, ast.Name) and t.id == "valid_keys" for t in inner.targets)
                    and "model_fields" in ast.unparse(inner.value)
                ):
                    extra += [
                        c.value
                        for c in ast.walk(inner.value)
                        if isinstance(c, ast.Constant) and isinstance(c.value, str)
                    ]
    if not extra:
        raise ContractError(
            f"{spec.cls}: no `valid_keys = ... model_fields ...` check found in an __init__"
        )
    entry: dict[str, Any] = {
        "class": f"{cls_module.name}.{cls.name}",
        "kwargs_checked_against": spec.args,
        "extra_kwargs": sorted(set(extra)),
    }
    if spec.refused_by is not None:
        entry.update(extract_refused(index, cls_module, cls, spec))
    return entry


def _model_fields_of(node: ast.AST, names: dict[str, str]) -> str | None:
    """The class whose `model_fields` an expression reads (directly or through a local name
    assigned from one), else None."""
    for sub in ast.walk(node):
        if (
            isinstance(sub, ast.Attribute)
            and sub.attr == "model_fields"
            and isinstance(sub.value, ast.Name)
        ):
            return sub.value.id
        if isinstance(sub, ast.Name) and sub.id in names:
            return names[sub.id]
    return None


def extract_refused(
    index: Index, module: Module, cls: ast.ClassDef, spec: LlmSpec
) -> dict[str, Any]:
    """The keywords `spec.refused_by` refuses: it must exist on the class (or a base), be called
    as `self.<it>(...)` from an `__init__`, raise, and compute `A.model_fields - B.model_fields`
    (through local names or directly); the refused keywords are A's fields that are not B's."""
    name = spec.refused_by
    assert name is not None
    found = None
    calls = False
    for mod, node in index.mro(module, cls):
        for stmt in node.body:
            if not isinstance(stmt, ast.FunctionDef):
                continue
            if stmt.name == name and found is None:
                found = (mod, node, stmt)
            if stmt.name == "__init__":
                calls = calls or any(
                    isinstance(sub, ast.Call)
                    and isinstance(sub.func, ast.Attribute)
                    and sub.func.attr == name
                    and isinstance(sub.func.value, ast.Name)
                    and sub.func.value.id == "self"
                    for sub in ast.walk(stmt)
                )
    if found is None:
        raise ContractError(f"{spec.cls}: no method {name} in the files read")
    mod, owner, method = found
    where = f"{mod.name}.{owner.name}.{name}"
    if not calls:
        raise ContractError(f"{where}: no __init__ of {spec.cls} calls self.{name}(...)")
    if not any(isinstance(sub, ast.Raise) for sub in ast.walk(method)):
        raise ContractError(f"{where}: raises nothing")
    names: dict[str, str] = {}  # local name -> class whose model_fields it holds
    for sub in ast.walk(method):
        if isinstance(sub, ast.Assign) and len(sub.targets) == 1:
            target = sub.targets[0]
            source = _model_fields_of(sub.value, {})
            if isinstance(target, ast.Name) and source is not None:
                names[target.id] = source
    differences = {
        (left, right)
        for sub in ast.walk(method)
        if isinstance(sub, ast.BinOp) and isinstance(sub.op, ast.Sub)
        for left, right in [(_model_fields_of(sub.left, names), _model_fields_of(sub.right, names))]
        if left is not None and right is not None
    }
    if len(differences) != 1:
        raise ContractError(
            f"{where}: expected one `A.model_fields - B.model_fields`, found {sorted(differences)}"
        )
    (left, right) = differences.pop()
    classes = []
    for simple in (left, right):
        try:
            defining, node = index.find_class(simple, mod)
        except KeyError:
            raise ContractError(f"{where}: class {simple} not in the files read") from None
        dotted = f"{defining.name}.{node.name}"
        entry = extract_class(index, dotted)
        classes.append((dotted, set(entry["fields"]) | set(entry["non_init_fields"])))
    (minuend, minuend_fields), (subtrahend, subtrahend_fields) = classes
    return {
        "refused_by": where,
        "refused_kwargs_from": {"fields_of": minuend, "minus_fields_of": subtrahend},
        "refused_kwargs": sorted(minuend_fields - subtrahend_fields),
    }


def extract_finish_reasons(module: Module) -> dict[str, list[str]]:
    """The Literal of CompletionOutput.finish_reason and every string assigned to one."""
    annotated: list[str] = []
    for stmt in module.classes["CompletionOutput"].body:
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and stmt.target.id == "finish_reason"
        ):
            annotated = [
                c.value
                for c in ast.walk(stmt.annotation)
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            ]
    assigned = set()
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr == "finish_reason":
                    assigned.add(node.value.value)
    return {"annotated": annotated, "assigned": sorted(assigned)}


def extract_stats(text: str) -> dict[str, list[str]]:
    """JSON keys per stats type, from `NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(Type, a, b, ...)`."""
    stats = {}
    for match in re.finditer(r"NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE\s*\(([^;]*?)\)\s*;", text):
        names = [n.strip() for n in match.group(1).split(",") if n.strip()]
        stats[names[0]] = names[1:]
    if "IterationStats" not in stats:
        raise ContractError(f"{STATS_FILE}: no IterationStats serialisation found")
    return stats


# ---------------------------------------------------------------------------- ModelOpt


def _import_source(module: Module, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom reads from (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    package = module.name.split(".")
    if not module.path.endswith("__init__.py"):
        package = package[:-1]
    package = package[: len(package) - (node.level - 1)]
    return ".".join([*package, *([node.module] if node.module else [])])


def _bound_names(body: list[ast.stmt]) -> list[str]:
    """Names these top-level statements bind (definitions, assignments, imports), in order."""
    names: list[str] = []
    for node in body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            names.append(node.name)
        elif isinstance(node, ast.Assign):
            names += [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.append(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name != "*":
                    names.append(alias.asname or alias.name.split(".")[0])
    return names


def public_names(module: Module) -> set[str]:
    """What `from module import *` binds: its literal `__all__`, else its names without `_`."""
    exported: set[str] | None = None
    for node in module.tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target: ast.expr | None = node.targets[0]
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            target = node.target
        else:
            continue
        if not (isinstance(target, ast.Name) and target.id == "__all__"):
            continue
        try:
            value = set(ast.literal_eval(node.value))  # type: ignore[arg-type]
        except ValueError:
            raise ContractError(f"{module.path}: __all__ is not a literal") from None
        exported = (exported or set()) | value if isinstance(node, ast.AugAssign) else value
    if exported is not None:
        return exported
    return {name for name in _bound_names(module.tree.body) if not name.startswith("_")}


def _statements(body: list[ast.stmt]) -> list[ast.stmt]:
    """Top-level statements in order, those inside top-level if / try blocks included (every
    branch: which one runs is not known here)."""
    flat: list[ast.stmt] = []
    for node in body:
        if isinstance(node, ast.If):
            flat += _statements(node.body) + _statements(node.orelse)
        elif isinstance(node, ast.Try):
            flat += _statements(node.body)
            for handler in node.handlers:
                flat += _statements(handler.body)
            flat += _statements(node.orelse) + _statements(node.finalbody)
        else:
            flat.append(node)
    return flat


def package_binding(index: Index, public: str) -> str | None:
    """What `package.name` is in the package's __init__.py read: the dotted name it is imported
    from (an explicit import, or a star import of a module read that exports it; the last such
    statement wins; statements in if / try blocks count), `public` itself if the __init__
    defines it otherwise, else None."""
    package, name = public.rsplit(".", 1)
    module = index.modules.get(package)
    if module is None or not module.path.endswith("__init__.py"):
        raise ContractError(f"{public}: {package}/__init__.py is not among the files read")
    bound = None
    for node in _statements(module.tree.body):
        if isinstance(node, ast.ImportFrom):
            source = _import_source(module, node)
            for alias in node.names:
                if alias.name == "*":
                    exporter = index.modules.get(source)
                    if exporter is not None and name in public_names(exporter):
                        bound = f"{source}.{name}"
                elif (alias.asname or alias.name) == name:
                    bound = f"{source}.{alias.name}"
        elif name in _bound_names([node]):
            bound = public
    return bound


def reexport_target(index: Index, public: str) -> str | None:
    """Where `package.name` really comes from: package_binding, followed on through the
    __init__.py of each further package read (None where a package read does not bind it)."""
    for _ in range(8):
        bound = package_binding(index, public)
        if bound is None or bound == public:
            return bound
        module = index.modules.get(bound.rsplit(".", 1)[0])
        if module is None or not module.path.endswith("__init__.py"):
            return bound
        public = bound
    raise ContractError(f"{public}: too many re-exports")


def module_constants(module: Module) -> list[str]:
    """Upper-case names assigned at a module's top level, in source order."""
    names = []
    for node in module.tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        for target in targets:
            if (
                isinstance(target, ast.Name)
                and re.fullmatch(r"[A-Z][A-Z0-9_]*", target.id)
                and target.id not in names
            ):
                names.append(target.id)
    return names


def extract_modelopt(index: Index, source: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """ModelOpt's version, the FP8 build's functions, their exports, the quantization config
    constants and the optional names (see the module docstring)."""
    versions = {info["version"] for info in source.values()}
    if len(versions) != 1 or None in versions:
        raise ContractError(
            f"ModelOpt files of no single known version: {sorted(map(str, versions))}"
        )
    exports = {}
    for public, defined in MODELOPT_EXPORTS.items():
        bound = reexport_target(index, public)
        if bound != defined:
            raise ContractError(
                f"{public}: the package __init__ binds it to {bound}, not {defined}"
            )
        exports[public] = defined
    constants = {}
    for package, defining in MODELOPT_CONSTANTS.items():
        if defining not in index.modules:
            raise ContractError(f"{defining}: not among the files read")
        names = [
            name
            for name in module_constants(index.modules[defining])
            if reexport_target(index, f"{package}.{name}") == f"{defining}.{name}"
        ]
        if not names:
            raise ContractError(f"{package}: re-exports no constant of {defining}")
        constants[package] = {"defined_in": defining, "names": names}
    functions = {defined: extract_function(index, defined) for defined in exports.values()}
    optional: dict[str, str | None] = {}
    for public in MODELOPT_OPTIONAL:
        bound = reexport_target(index, public)
        if bound is not None:
            try:
                functions[bound] = extract_function(index, bound)
            except ContractError:
                raise ContractError(
                    f"{public}: the package binds it to {bound}, whose definition is not "
                    "among the files read: add its file to MODELOPT_FILES"
                ) from None
            exports[public] = bound
        optional[public] = bound
    return {
        "version": versions.pop(),
        "source": source,
        "exports": exports,
        "functions": functions,
        "constants": constants,
        "optional": optional,
    }


def build_contract(roots: list[Path], release: str | None) -> dict[str, Any]:
    """The whole fixture from source roots."""
    found = find_sources(roots)
    modules = [
        parse_module(rel, path.read_text())
        for rel, (path, _) in found.items()
        if rel.endswith(".py") and rel not in MODELOPT_FILES
    ]
    index = Index(modules)
    modelopt = Index(
        [
            parse_module(rel, path.read_text())
            for rel, (path, _) in found.items()
            if rel in MODELOPT_FILES
        ]
    )
    return {
        "tensorrt_llm_release_named": release,
        "source": {
            rel: info for rel, (_, info) in sorted(found.items()) if rel not in MODELOPT_FILES
        },
        "kwargs_policy": KWARGS_POLICY,
        "exports": EXPORTS,
        "functions": {name: extract_function(index, name) for name in FUNCTIONS},
        "classes": {name: extract_class(index, name) for name in CLASSES},
        **{section: extract_llm(index, spec) for section, spec in LLMS.items()},
        "finish_reasons": extract_finish_reasons(index.modules[module_name(RESULT_FILE)]),
        "stats": extract_stats(found[STATS_FILE][0].read_text()),
        "modelopt": extract_modelopt(
            modelopt,
            {rel: info for rel, (_, info) in sorted(found.items()) if rel in MODELOPT_FILES},
        ),
    }


# ---------------------------------------------------------------------------- checking


def canonical(contract: dict[str, Any], name: str) -> str:
    """A public name (`tensorrt_llm.Mapping`) -> the defining module's name, if exported."""
    exports = {**contract["exports"], **contract.get("modelopt", {}).get("exports", {})}
    for public, defined in exports.items():
        if name == public or name.startswith(public + "."):
            return defined + name[len(public) :]
    return name


def function_entry(contract: dict[str, Any], function: str) -> dict[str, Any] | None:
    """A function's recorded signature (TensorRT-LLM's or ModelOpt's), by public or defining
    name; None when the contract does not have it."""
    function = canonical(contract, function)
    entry = contract["functions"].get(function)
    if entry is None:
        entry = contract.get("modelopt", {}).get("functions", {}).get(function)
    return entry


def check_call(
    contract: dict[str, Any],
    function: str,
    kwargs: list[str] | tuple[str, ...] | set[str],
    n_positional: int = 0,
    kwargs_fields: str | None = None,
    llm: str = "llm",
) -> list[str]:
    """Problems with calling `function` with that many positional arguments and these keywords.

    `kwargs_fields`: a class whose fields the function's **kwargs are checked against (as the
    LLM does; it must be the LLM section's `kwargs_checked_against`), with that section's
    `extra_kwargs` (`llm`: the section, "llm" for the TensorRT-engine LLM, "llm_pytorch" for the
    PyTorch-flow LLM, whose `refused_kwargs` are reported as refused by the PyTorch backend);
    otherwise a keyword outside the named parameters is unknown even where the function takes
    **kwargs (see KWARGS_POLICY).
    """
    function = canonical(contract, function)
    sig = function_entry(contract, function)
    if sig is None:
        return [f"{function}: not in the contract"]
    problems = []
    if n_positional > len(sig["positional"]) and not sig["var_positional"]:
        problems.append(
            f"{function}: {n_positional} positional arguments, takes {sig['positional']}"
        )
    given = set(sig["positional"][:n_positional]) | set(kwargs)
    allowed = set(sig["params"])
    refused: set[str] = set()
    if kwargs_fields is not None:
        section = contract.get(llm)
        fields_cls = canonical(contract, kwargs_fields)
        if not isinstance(section, dict) or "kwargs_checked_against" not in section:
            return [*problems, f"{function}: no LLM section {llm!r} in the contract"]
        if fields_cls != section["kwargs_checked_against"]:
            problems.append(
                f"{function}: {llm} checks **kwargs against "
                f"{section['kwargs_checked_against']}, not {fields_cls}"
            )
        if fields_cls not in contract["classes"]:
            return [*problems, f"{fields_cls}: not in the contract"]
        allowed |= set(contract["classes"][fields_cls]["fields"])
        allowed |= set(section["extra_kwargs"])
        refused = set(section.get("refused_kwargs", ()))
    for key in sorted(set(kwargs)):
        if key in refused:
            problems.append(
                f"{function}: keyword {key!r} refused by the PyTorch backend (a "
                f"{section['refused_kwargs_from']['fields_of']} field that "
                f"{section['refused_by']} rejects)"
            )
        elif key not in allowed:
            problems.append(f"{function}: unknown keyword {key!r}")
    for key in sig["required"]:
        if key not in given:
            problems.append(f"{function}: required parameter {key!r} missing")
    return problems


def check_constants(
    contract: dict[str, Any], module: str, names: list[str] | set[str]
) -> list[str]:
    """Problems with reading these module-level constants from `module` (the package that
    re-exports them, e.g. `modelopt.torch.quantization`, or their defining module)."""
    for package, entry in contract.get("modelopt", {}).get("constants", {}).items():
        if module in (package, entry["defined_in"]):
            known = set(entry["names"])
            return [f"{module}: no constant {name!r}" for name in sorted(set(names) - known)]
    return [f"{module}: not in the contract"]


def check_fields(contract: dict[str, Any], cls: str, names: list[str] | set[str]) -> list[str]:
    """Problems with `cls(**{name: ...})` for these names (unknown and missing required)."""
    cls = canonical(contract, cls)
    entry = contract["classes"].get(cls)
    if entry is None:
        return [f"{cls}: not in the contract"]
    accepted = set(entry["fields"]) | set(entry.get("aliases", {}).values())
    problems = [f"{cls}: unknown field {name!r}" for name in sorted(set(names) - accepted)]
    problems += [
        f"{cls}: required field {name!r} missing" for name in entry["required"] if name not in names
    ]
    return problems


def check_attributes(contract: dict[str, Any], cls: str, names: list[str] | set[str]) -> list[str]:
    """Problems with reading these attributes of an instance of `cls`."""
    cls = canonical(contract, cls)
    entry = contract["classes"].get(cls)
    if entry is None:
        return [f"{cls}: not in the contract"]
    known = (
        set(entry["fields"])
        | set(entry["non_init_fields"])
        | set(entry["properties"])
        | set(entry["methods"])
    )
    return [f"{cls}: no attribute {name!r}" for name in sorted(set(names) - known)]


def main(argv: list[str] | None = None) -> int:
    """Write the contract fixture."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("roots", nargs="+", type=Path, help="TensorRT-LLM source roots")
    parser.add_argument("-o", "--output", type=Path, help="fixture path (default: stdout)")
    parser.add_argument(
        "--release",
        default="1.2.1",
        help="the TensorRT-LLM release the Dockerfile names (recorded, not checked here)",
    )
    args = parser.parse_args(argv)
    try:
        contract = build_contract(args.roots, args.release)
    except ContractError as error:
        print(f"trtllm_contract: {error}", file=sys.stderr)
        return 1
    text = json.dumps(contract, indent=2, sort_keys=True) + "\n"
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
