"""The chart's engine pipeline, run for real on this machine with the rendered commands.

The build Job's container, the server's wait-for-engine init container and the server's
environment are taken from `helm template` and run with our CLIs (volume paths mapped to
temporary directories, a synthetic checkpoint standing in for the 49B one): the wait blocks
until the Job's engine is committed, and the server's startup then selects exactly that engine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engine_build.repository import EngineRepository
from engine_build.synthetic import write_synthetic_checkpoint
from service.server.flags import parse_serve_config
from service.startup.selection import resolve_engine
from tests.deploy.helm_chart import one, profile_args

MODELS, ENGINES = "/models", "/var/lib/nemotron/engines"
PVC_SOURCE = ["--set", "model.source=pvc", "--set", "model.pvc.existingClaim=models",
              "--set", "model.subPath=checkpoints/nemotron"]  # fmt: skip
# GPU profiles default to TensorRT-LLM, which cannot be installed here: the flows that run for
# real use the torch backend; the TensorRT-LLM commands are run up to their refusal below.
TORCH = ["--set", "engine.backend=torch"]


class Volumes:
    """The pod's volume paths mapped onto temporary directories."""

    def __init__(self, root: Path) -> None:
        self.models, self.engines = root / "models", root / "engines"
        write_synthetic_checkpoint(self.models / "checkpoints" / "nemotron")

    def path(self, value: str) -> str:
        for mount, local in ((MODELS, self.models), (ENGINES, self.engines)):
            if value == mount or value.startswith(mount + "/"):
                return str(local) + value[len(mount) :]
        return value

    def command(self, container) -> list[str]:
        program, *args = container["command"]
        assert program == "nemotron-build"
        return [sys.executable, "-m", "engine_build", *(self.path(a) for a in args)]


def spawn(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pod_spec(objects, kind: str):
    return one(objects, kind)["spec"]["template"]["spec"]


def test_the_server_waits_for_the_jobs_engine_and_then_selects_exactly_it(chart, tmp_path):
    name = "h100x2"  # fp8 at tp 2 (the test below builds a100x4's bf16 at tp 4)
    objects = chart.objects(*profile_args(name, [*PVC_SOURCE, *TORCH]))
    volumes = Volumes(tmp_path)
    build = pod_spec(objects, "Job")["containers"][0]
    wait = pod_spec(objects, "Deployment")["initContainers"][0]
    # Checking often and saying so each time: the first report means it found no engine.
    waiting = spawn([*volumes.command(wait), "--interval", "0.5", "--report-every", "0"])
    first = waiting.stderr.readline()
    assert "engine_wait" in first and waiting.poll() is None, first
    built = subprocess.run(volumes.command(build), capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    (entry,) = EngineRepository(volumes.path(build["command"][-1])).entries()
    assert out.strip().startswith(f"{entry.name} ({entry.engine_id}) ready")

    env = {k: volumes.path(v) for k, v in one(objects, "ConfigMap")["data"].items()}
    env["NEMOTRON_CACHE_DIR"] = str(tmp_path / "cache")
    config = parse_serve_config([], env)
    choice = resolve_engine(config.startup, env)
    assert (choice.entry.engine_id, choice.profile.name, choice.built) == (
        entry.engine_id,
        name,
        False,
    )
    assert choice.device == "cuda"


def test_replicas_building_in_init_containers_build_once(chart, tmp_path):
    args = profile_args("a100x4", [*PVC_SOURCE, *TORCH, "--set", "engine.build.mode=initContainer"])
    spec = pod_spec(chart.objects(*args), "Deployment")
    build = next(c for c in spec["initContainers"] if c["name"] == "build-engine")
    volumes = Volumes(tmp_path)
    replicas = [spawn(volumes.command(build)) for _ in range(2)]
    outputs = [replica.communicate(timeout=300) for replica in replicas]
    assert [replica.returncode for replica in replicas] == [0, 0], [err for _, err in outputs]
    verdicts = sorted("skipped" if "skipped" in out else "built" for out, _ in outputs)
    assert verdicts == ["built", "skipped"]  # the second waited on the lock, then found it
    repo = Path(volumes.path(build["command"][-1]))
    assert len(EngineRepository(repo).entries()) == 1


def test_the_rendered_tensorrt_llm_commands_are_accepted_and_refuse_clearly_here(chart, tmp_path):
    # TensorRT-LLM is not installed on this machine: the build parses the chart's arguments and
    # refuses by name; the wait looks only for a TensorRT-LLM engine, so a torch engine, even in
    # the TensorRT-LLM repository, does not end it.
    quick = ["--set", "engine.build.waitTimeoutSeconds=1"]
    objects = chart.objects(*profile_args("a100x4", [*PVC_SOURCE, *quick]))
    volumes = Volumes(tmp_path)
    build = pod_spec(objects, "Job")["containers"][0]
    assert build["command"][build["command"].index("--backend") + 1] == "tensorrt-llm"
    refused = subprocess.run(volumes.command(build), capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "'tensorrt-llm' was requested but is not installed here" in refused.stderr, (
        refused.stderr[-2000:]
    )
    torch = pod_spec(chart.objects(*profile_args("a100x4", [*PVC_SOURCE, *TORCH])), "Job")
    torch_build = torch["containers"][0]
    assert torch_build["command"][-1] != build["command"][-1]  # its own repository
    wait = pod_spec(objects, "Deployment")["initContainers"][0]
    # The torch engine, built into the TensorRT-LLM repository, still does not satisfy the wait.
    misplaced = [*volumes.command(torch_build)[:-1], volumes.path(build["command"][-1])]
    built = subprocess.run(misplaced, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    waited = subprocess.run(volumes.command(wait), capture_output=True, text=True, timeout=120)
    assert waited.returncode != 0
    message = waited.stderr[-2000:]
    assert "backend tensorrt-llm" in message and "within 1 s" in message, message


def test_the_download_script_runs_with_the_installed_hub_client(chart, tmp_path):
    job = pod_spec(chart.objects(*profile_args("h100x2")), "Job")
    download = job["initContainers"][0]
    program, flag, script, repository, revision, directory, *patterns = download["command"]
    assert (program, flag, directory, patterns) == (
        "python3",
        "-c",
        MODELS,
        ["*.json", "*.safetensors"],
    )
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script, repository, revision, str(tmp_path / "models"), *patterns],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    # Offline, the client gets as far as looking for the files: the arguments were accepted.
    assert result.returncode == 1
    assert "LocalEntryNotFoundError" in result.stderr, result.stderr[-2000:]
