"""TensorRT-LLM's API contract for our adapters, read from its source files (no import of it).

    python tools/trtllm_contract.py ROOT [ROOT ...] [-o tests/data/trtllm_contract.json]

Each ROOT is a TensorRT-LLM checkout, or a directory holding some of the files below at their
repository paths; for each file the first ROOT that has it is read. A ROOT's commit is
`git rev-parse HEAD` in a checkout, else the ROOT's directory name when that is 40 hex digits
(e.g. /tmp/trtllm_src/<commit>/...), and its version is `__version__` in the ROOT's own
`tensorrt_llm/version.py` when it has one. So files read at different commits can be given as
one ROOT per commit, and the fixture records per file which commit and version it came from.

What is extracted, with `ast` (and a regular expression for the one C++ file):
  functions  parameter names in order, which are required, which keyword-only, and whether the
             function takes *args / **kwargs (methods without self/cls; inherited methods are
             found through base classes defined in the files read);
  classes    dataclass / pydantic fields (what `Class(**kwargs)` accepts; inherited fields
             included, `init=False`, ClassVar and PrivateAttr excluded), which are required,
             pydantic aliases and `extra` setting, and the properties and methods instances have;
  LLM        the TensorRT-engine `LLM` (tensorrt_llm._tensorrt_engine.LLM, an alias the tool
             follows) takes **kwargs and `BaseLLM.__init__` checks each against the LLM-args
             model's fields plus a few extra names: recorded as `llm.kwargs_checked_against` and
             `llm.extra_kwargs` (the extra names read from that check);
  finish reasons  the `Literal` of `CompletionOutput.finish_reason` and every string assigned
             to a `.finish_reason` in executor/result.py;
  stats      the JSON keys of the executor's iteration stats (`LLM.get_stats()`), i.e. the
             fields of `NLOHMANN_DEFINE_TYPE_NON_INTRUSIVE(...)` in jsonSerialization.cpp.

The output is deterministic JSON (sorted keys; lists in source order).
`check_call` is how the contract is applied: no unknown keyword (unless the function takes
**kwargs, reported separately so callers can decide), every required parameter given.
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
STATS_FILE = "cpp/tensorrt_llm/executor/jsonSerialization.cpp"
RESULT_FILE = "tensorrt_llm/executor/result.py"

# Functions and classes the adapters use, by the module that defines them.
FUNCTIONS = (
    "tensorrt_llm._tensorrt_engine.LLM.__init__",
    "tensorrt_llm._tensorrt_engine.LLM.generate_async",
    "tensorrt_llm._tensorrt_engine.LLM.get_stats",
    "tensorrt_llm._tensorrt_engine.LLM.shutdown",
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
    "tensorrt_llm.plugin.plugin.PluginConfig",
    "tensorrt_llm.sampling_params.SamplingParams",
)
LLM = "tensorrt_llm._tensorrt_engine.LLM"
LLM_ARGS = "tensorrt_llm.llmapi.llm_args.TrtLlmArgs"  # what the TensorRT backend validates against
# Public names the adapters import -> the module defining them (package __init__ re-exports,
# which this tool does not read).
EXPORTS = {
    "tensorrt_llm.Mapping": "tensorrt_llm.mapping.Mapping",
    "tensorrt_llm.SamplingParams": "tensorrt_llm.sampling_params.SamplingParams",
    "tensorrt_llm.llmapi.KvCacheConfig": "tensorrt_llm.llmapi.llm_args.KvCacheConfig",
    "tensorrt_llm.models.DeciLMForCausalLM": (
        "tensorrt_llm.models.nemotron_nas.model.DeciLMForCausalLM"
    ),
}
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


def root_provenance(root: Path) -> dict[str, Any]:
    """The commit and version of one source root (either may be None)."""
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
    version = None
    version_file = root / "tensorrt_llm" / "version.py"
    if version_file.is_file():
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", version_file.read_text())
        version = match.group(1) if match else None
    return {"commit": commit, "version": version}


def find_sources(roots: list[Path]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Each needed file -> (the file, its provenance); the first root holding it wins."""
    found = {}
    for rel in FILES:
        for root in roots:
            if (root / rel).is_file():
                info = root_provenance(root)
                text = (root / rel).read_text()
                info["excerpt"] = text.lstrip().startswith(("# EXCERPT", "// EXCERPT"))
                found[rel] = (root / rel, info)
                break
    missing = [rel for rel in FILES if rel not in found and rel != "tensorrt_llm/version.py"]
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


def extract_llm(index: Index) -> dict[str, Any]:
    """How the TensorRT-engine LLM treats its **kwargs (BaseLLM.__init__'s own check)."""
    module, rest = index.resolve(LLM)
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
        raise ContractError("BaseLLM.__init__: no `valid_keys = ... model_fields ...` check found")
    return {
        "class": f"{cls_module.name}.{cls.name}",
        "kwargs_checked_against": LLM_ARGS,
        "extra_kwargs": sorted(set(extra)),
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


def build_contract(roots: list[Path], release: str | None) -> dict[str, Any]:
    """The whole fixture from source roots."""
    found = find_sources(roots)
    modules = [
        parse_module(rel, path.read_text())
        for rel, (path, _) in found.items()
        if rel.endswith(".py")
    ]
    index = Index(modules)
    return {
        "tensorrt_llm_release_named": release,
        "source": {rel: info for rel, (_, info) in sorted(found.items())},
        "kwargs_policy": KWARGS_POLICY,
        "exports": EXPORTS,
        "functions": {name: extract_function(index, name) for name in FUNCTIONS},
        "classes": {name: extract_class(index, name) for name in CLASSES},
        "llm": extract_llm(index),
        "finish_reasons": extract_finish_reasons(index.modules[module_name(RESULT_FILE)]),
        "stats": extract_stats(found[STATS_FILE][0].read_text()),
    }


# ---------------------------------------------------------------------------- checking


def canonical(contract: dict[str, Any], name: str) -> str:
    """A public name (`tensorrt_llm.Mapping`) -> the defining module's name, if exported."""
    for public, defined in contract["exports"].items():
        if name == public or name.startswith(public + "."):
            return defined + name[len(public) :]
    return name


def check_call(
    contract: dict[str, Any],
    function: str,
    kwargs: list[str] | tuple[str, ...] | set[str],
    n_positional: int = 0,
    kwargs_fields: str | None = None,
) -> list[str]:
    """Problems with calling `function` with that many positional arguments and these keywords.

    `kwargs_fields`: a class whose fields the function's **kwargs are checked against (as the
    LLM does); otherwise a keyword outside the named parameters is unknown even where the
    function takes **kwargs (see KWARGS_POLICY).
    """
    function = canonical(contract, function)
    sig = contract["functions"].get(function)
    if sig is None:
        return [f"{function}: not in the contract"]
    problems = []
    if n_positional > len(sig["positional"]) and not sig["var_positional"]:
        problems.append(
            f"{function}: {n_positional} positional arguments, takes {sig['positional']}"
        )
    given = set(sig["positional"][:n_positional]) | set(kwargs)
    allowed = set(sig["params"])
    if kwargs_fields is not None:
        allowed |= set(contract["classes"][kwargs_fields]["fields"])
        allowed |= set(contract["llm"]["extra_kwargs"])
    for key in sorted(set(kwargs) - allowed):
        problems.append(f"{function}: unknown keyword {key!r}")
    for key in sig["required"]:
        if key not in given:
            problems.append(f"{function}: required parameter {key!r} missing")
    return problems


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
