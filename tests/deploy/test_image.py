"""The cpu image, built for real with buildah, inspected and run as `docker run IMAGE` runs it.

Opt-in (`make test-image`, or NEMOTRON_IMAGE_TESTS=1 after `tools/container_image.sh build cpu`
and `build gpu-standin`; needs root): tools/container_image.sh makes a Debian bookworm base with
Debian's Python 3.11 standing in for python:3.11-slim (no registry is reachable here) and builds
the Dockerfile's cpu target on it. The server here is the image's entrypoint with no arguments,
as the image's user, on the host's network (ports moved to free ones through their NEMOTRON_*
variables); clients are the host's `nemotron-healthcheck` and `nemotron-chat`. The tests of one
server run in file order; the last one stops it with SIGTERM.

tests/deploy/test_image_pod.py runs the same image with the chart's cpu pod settings.
"""

from __future__ import annotations

import tomllib
import urllib.request
from collections.abc import Iterator

import pytest

from tests.deploy.helm_chart import REPO_ROOT
from tests.deploy.image_container import (
    IMAGE_TESTS,
    QUESTION,
    RUNTIME_UID,
    Container,
    ContainerServer,
    RunAs,
    Sandbox,
    built_image,
    inspect_image,
)
from tests.service.server_process import free_port

pytestmark = IMAGE_TESTS

PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def image() -> str:
    return built_image("cpu")


@pytest.fixture(scope="module")
def config(image) -> dict:
    """The image's Docker-format configuration (the OCI one has no Healthcheck)."""
    return inspect_image(image)["Docker"]["config"]


@pytest.fixture(scope="module")
def container(image) -> Iterator[Container]:
    container = Container.create(image)
    yield container
    container.remove()


@pytest.fixture(scope="module")
def ports() -> dict[str, int]:
    return {"NEMOTRON_PORT": free_port(), "NEMOTRON_HTTP_PORT": free_port(),
            "NEMOTRON_METRICS_PORT": free_port()}  # fmt: skip


@pytest.fixture(scope="module")
def served(container, config, ports, tmp_path_factory) -> Iterator[ContainerServer]:
    """The entrypoint with no arguments; only the ports, loopback and JSON logs are set."""
    env = {name: str(port) for name, port in ports.items()}
    sandbox = Sandbox(env={**env, "NEMOTRON_HOST": "127.0.0.1", "NEMOTRON_LOG_FORMAT": "json"})
    log_path = tmp_path_factory.mktemp("image-run") / "server.log"
    address = f"127.0.0.1:{ports['NEMOTRON_PORT']}"
    with container.serve(config["Entrypoint"], sandbox, log_path, address) as server:
        yield server


# --- the image as built ---------------------------------------------------------------------


def test_the_image_runs_as_10001_and_serves_with_the_entrypoint_and_ports_of_the_dockerfile(
    config,
):
    assert config["User"] == f"{RUNTIME_UID}:{RUNTIME_UID}"
    assert config["Entrypoint"] == ["nemotron-serve"] and not config.get("Cmd")
    assert set(config["ExposedPorts"]) == {"50051/tcp", "8000/tcp", "8002/tcp"}
    assert config["StopSignal"] == "SIGTERM"
    assert config["WorkingDir"] == "/opt/nemotron"
    assert "NEMOTRON_CACHE_DIR=/opt/nemotron/cache" in config["Env"]


def test_the_image_keeps_its_healthcheck_and_oci_labels(config):
    # Built in Docker's format: buildah's default (OCI) drops HEALTHCHECK with a warning.
    assert config["Healthcheck"]["Test"][:2] == ["CMD", "nemotron-healthcheck"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"]
    assert labels["org.opencontainers.image.title"] == "nemotron-serve"
    assert labels["org.opencontainers.image.base.name"].startswith("localhost/nemotron-serve-base")


def test_the_baked_cache_holds_one_cpu_engine_owned_by_the_runtime_user(container):
    cache = "/opt/nemotron/cache"
    script = f"id -u; stat -c '%u %n' {cache} {cache}/engines/manifest.json; ls {cache}/engines/*/"
    done = container.run(["sh", "-c", script])
    assert done.returncode == 0, done.stderr
    uid, *owners, engine_ids = done.stdout.split("\n")[:-1]
    assert uid == str(RUNTIME_UID)
    assert all(line.startswith(f"{RUNTIME_UID} ") for line in owners), owners
    assert len(engine_ids.split()) == 1


def test_chat_in_the_terminal_answers_without_a_server(container):
    """`docker run --rm -it IMAGE chat` (docs/container.md): arguments go to nemotron-serve."""
    done = container.run(["nemotron-serve", "chat", "--temperature", "0", "--prompt", QUESTION])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Paris" in done.stdout


def test_a_read_only_root_without_a_writable_cache_refuses_to_start_saying_why(container, tmp_path):
    """`docker run --read-only` with only /tmp writable: the cpu profile's startup takes the
    engine's build lock in the cache, so the cache must be a writable volume."""
    tmp_path.chmod(0o1777)
    sandbox = Sandbox(binds={"/tmp": tmp_path}, read_only_root=True,
                      run_as=RunAs(RUNTIME_UID, RUNTIME_UID), private_network=True)  # fmt: skip
    done = container.run(["nemotron-serve", "--http-port", "off", "--metrics-port", "0"], sandbox)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "engine repository /opt/nemotron/cache/engines is not writable" in done.stderr
    assert "Traceback" not in done.stderr


# --- the entrypoint, served (in file order) ---------------------------------------------------


def test_the_entrypoint_becomes_ready_on_the_baked_engine_without_building(served):
    served.wait_ready()
    events = [line["event"] for line in served.log_lines()]
    skipped = served.wait_for_log("engine_build_skipped")
    assert skipped["reason"] == "already built"
    selected = served.wait_for_log("engine_selected")
    assert selected["built"] is False and selected["engine"] == "torch-cpu-bf16-tp1"
    assert "engine_built" not in events and "engine_missing_building" not in events
    started = served.wait_for_log("engine_started")
    assert started["engine"].startswith("/opt/nemotron/cache/engines/")


def test_the_server_process_runs_as_the_images_user(served):
    served.wait_ready()
    ids = served.ids()
    assert set(ids["Uid"]) == {RUNTIME_UID} and set(ids["Gid"]) == {RUNTIME_UID}


def test_a_chat_from_the_host_says_paris(served):
    served.wait_ready()
    done = served.chat(QUESTION)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_the_http_api_and_metrics_answer_from_the_host(served, ports):
    served.wait_ready()
    http = f"http://127.0.0.1:{ports['NEMOTRON_HTTP_PORT']}"
    with urllib.request.urlopen(f"{http}/v1/health/ready", timeout=30) as response:
        assert response.status == 200
    metrics = f"http://127.0.0.1:{ports['NEMOTRON_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(metrics, timeout=30) as response:
        assert response.status == 200 and b"# TYPE" in response.read()


def test_the_images_healthcheck_command_passes_inside_the_container(served, config, ports):
    """The Docker HEALTHCHECK, and the exec probe of clusters without gRPC probes."""
    served.wait_ready()
    command = config["Healthcheck"]["Test"][1:]
    address = {"NEMOTRON_HEALTH_ADDRESS": f"127.0.0.1:{ports['NEMOTRON_PORT']}"}
    done = served.exec_in_container(command, Sandbox(env=address))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SERVING" in done.stdout


def test_sigterm_stops_the_server_with_exit_code_0(served):
    served.wait_ready()
    assert served.terminate() == 0, served.log_text()[-4000:]
    stopped = served.wait_for_log("server_stopped")
    assert stopped["exit_code"] == 0
    assert "Traceback" not in served.log_text()


# --- the gpu target's RUN lines on a stand-in base ---------------------------------------------
# NVIDIA's TensorRT-LLM image cannot be pulled here: its stand-in is the same Debian base with
# the CPU torch installed, as that image brings its own torch (tools/container_image.sh).


@pytest.fixture(scope="module")
def gpu_stand_in() -> Iterator[Container]:
    container = Container.create(built_image("gpu-standin"))
    yield container
    container.remove()


def _torch_of(container: Container) -> str:
    script = "import torch; print(torch.__version__, torch.__file__)"
    done = container.run(["python3", "-c", script])
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def test_the_gpu_stages_install_keeps_the_bases_torch(gpu_stand_in):
    base = Container.create(inspect_image(gpu_stand_in.image)["Docker"]["config"]["Labels"][
        "org.opencontainers.image.base.name"])  # fmt: skip
    try:
        assert _torch_of(gpu_stand_in) == _torch_of(base)
    finally:
        base.remove()
    done = gpu_stand_in.run(["python3", "-m", "pip", "check"])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    "script", ["nemotron-serve", "nemotron-build", "nemotron-chat", "nemotron-healthcheck"]
)
def test_the_gpu_stages_console_scripts_run_as_10001(gpu_stand_in, script):
    done = gpu_stand_in.run(["sh", "-c", f"id -u && exec {script} --help"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith(f"{RUNTIME_UID}\n") and "usage:" in done.stdout


def test_the_gpu_stages_server_imports_without_cuda(gpu_stand_in):
    script = ("import torch, service.server.process, engine_build.backends.registry; "
              "print(torch.cuda.is_available())")  # fmt: skip
    done = gpu_stand_in.run(["python3", "-c", script])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "False"
