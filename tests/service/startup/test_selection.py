"""Startup profile selection: node labels, NVML, the CPU; the repository's engines; refusals."""

from __future__ import annotations

import copy
import json
import shutil
import threading
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from kubernetes import client

from engine_build.build import BuildRequest, build_engine
from engine_build.profiles import DeviceKind, ProfileError, load_profiles
from engine_build.repository import EngineRepository
from engine_build.synthetic import LayerRecipe, synthetic_config, write_synthetic_checkpoint
from service.startup.hardware import Hardware, detect_hardware, visible_gpu_count
from service.startup.selection import (
    EngineSelectionError,
    StartupOptions,
    ensure_cpu_engine,
    match_profiles,
    resolve_engine,
)
from tests.conftest import REPO_ROOT

RECORDED_NODE = REPO_ROOT / "tests" / "data" / "node-dgx-a100-80gb.json"
NODE = "dgx-a100-07"
IN_CLUSTER = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "NODE_NAME": NODE}


class NodeAPIServer(ThreadingHTTPServer):
    """A loopback stand-in for the API server's `GET /api/v1/nodes/<name>`."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _NodeHandler)
        self.nodes: dict[str, dict] = {}
        self.forbidden = False
        self.requests: list[str] = []

    def core_api(self) -> client.CoreV1Api:
        configuration = client.Configuration(host=f"http://127.0.0.1:{self.server_address[1]}")
        return client.CoreV1Api(client.ApiClient(configuration))


class _NodeHandler(BaseHTTPRequestHandler):
    server: NodeAPIServer

    def do_GET(self) -> None:
        self.server.requests.append(self.path)
        name = self.path.split("?")[0].removeprefix("/api/v1/nodes/")
        if self.server.forbidden:
            self._reply(
                403,
                _status(
                    403,
                    "Forbidden",
                    f'nodes "{name}" is forbidden: User "system:serviceaccount:default:nemotron" '
                    'cannot get resource "nodes" in API group "" at the cluster scope',
                ),
            )
        elif name in self.server.nodes:
            self._reply(200, self.server.nodes[name])
        else:
            self._reply(404, _status(404, "NotFound", f'nodes "{name}" not found'))

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class FakeNVML:
    """The functions of `pynvml` that detection calls, for a machine with `names` GPUs."""

    class NVMLError(Exception):
        pass

    def __init__(self, names: list[str], capability: tuple[int, int], fail_query: bool = False):
        self.names, self.capability, self.fail_query = names, capability, fail_query
        self.initialized = 0

    def nvmlInit(self) -> None:
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self.initialized -= 1

    def nvmlDeviceGetCount(self) -> int:
        if self.fail_query:
            raise self.NVMLError("GPU is lost")
        return len(self.names)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self.names[handle]

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return self.capability


@pytest.fixture()
def apiserver():
    server = NodeAPIServer()
    server.nodes[NODE] = json.loads(RECORDED_NODE.read_text())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tp8_checkpoint(tmp_path_factory) -> Path:
    """A tiny checkpoint every built-in profile can shard (8 heads, 16 hidden units per rank)."""
    layers = (LayerRecipe("gqa", "swiglu", n_heads_in_group=2), LayerRecipe("none", "swiglu"))
    config = synthetic_config(layers, hidden_size=128, num_heads=8)
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("tp8") / "ckpt", config)


def _build(checkpoint: Path, repo: Path, profile: str) -> str:
    request = BuildRequest(checkpoint, load_profiles().get(profile), backend="torch")
    return build_engine(request, EngineRepository(repo)).entry.engine_id


@pytest.fixture(scope="module")
def other_hardware_repo(tmp_path_factory, tp8_checkpoint) -> Path:
    """A repository with engines for H100 NVL x2 and for the CPU only."""
    repo = tmp_path_factory.mktemp("other") / "engines"
    for profile in ("h100x2", "cpu"):
        _build(tp8_checkpoint, repo, profile)
    return repo


@pytest.fixture(scope="module")
def full_repo(tmp_path_factory, other_hardware_repo, tp8_checkpoint) -> Path:
    """The same, plus an A100 80GB x8 engine."""
    repo = tmp_path_factory.mktemp("full") / "engines"
    shutil.copytree(other_hardware_repo, repo)
    _build(tp8_checkpoint, repo, "a100x8")
    return repo


def _options(tmp_path: Path, repo: Path, **kwargs: object) -> StartupOptions:
    return StartupOptions(cache_dir=tmp_path / "cache", engine_repo=repo, **kwargs)


def test_the_recorded_nodes_gfd_labels_are_read_through_the_kubernetes_client(apiserver):
    hardware = detect_hardware(IN_CLUSTER, apiserver.core_api())
    assert hardware == Hardware(
        DeviceKind.GPU, "NVIDIA-A100-SXM4-80GB", 8, "8.0", f"node labels of {NODE}"
    )
    assert apiserver.requests == [f"/api/v1/nodes/{NODE}"]


def test_a100x8_labels_with_only_other_hardware_engines_refuse_listing_each_engine(
    apiserver, other_hardware_repo, tmp_path
):
    with pytest.raises(EngineSelectionError) as error:
        resolve_engine(
            _options(tmp_path, other_hardware_repo), IN_CLUSTER, node_api=apiserver.core_api()
        )
    message = str(error.value)
    assert message.startswith(
        f"cannot start: no engine in {other_hardware_repo} fits profile a100x8 or a100x4 on "
        "compute capability 8.0:\n"
    )
    assert (
        "Profile choice: 8 x NVIDIA-A100-SXM4-80GB (compute capability 8.0) from node labels of "
        f"{NODE}: profile a100x8 (also runnable here: a100x4)." in message
    )
    h100, cpu = EngineRepository(other_hardware_repo).entries()
    assert (
        f"  torch-h100x2-fp8-tp2 ({h100.engine_id}): built for profile h100x2, not a100x8; "
        "built for compute capability 9.0; this device has compute capability 8.0" in message
    )
    assert (
        f"  torch-cpu-bf16-tp1 ({cpu.engine_id}): built for profile cpu, not a100x8; built for "
        "cpu; this device has compute capability 8.0" in message
    )
    assert (
        f"Build one with: nemotron-build build --profile a100x8 --backend torch "
        f"--checkpoint CHECKPOINT --repo "
        f"{other_hardware_repo}" in message
    )
    assert "--checkpoint CHECKPOINT --build-if-missing" in message
    assert "--profile NAME or NEMOTRON_PROFILE=NAME (known here: a100x4, a100x8, h100x2, cpu)" in (
        message
    )


def test_a100x8_labels_select_the_a100x8_engine_when_the_repository_has_it(
    apiserver, full_repo, tmp_path
):
    choice = resolve_engine(
        _options(tmp_path, full_repo), IN_CLUSTER, node_api=apiserver.core_api()
    )
    assert choice.entry.name == "torch-a100x8-bf16-tp8"
    assert choice.profile.name == "a100x8" and choice.device == "cuda" and not choice.built
    assert choice.hardware.source == f"node labels of {NODE}"
    assert (choice.directory / "engine.json").is_file()


def test_the_profile_flag_wins_over_node_labels_and_detects_nothing(apiserver, full_repo, tmp_path):
    environ = {**IN_CLUSTER, "NEMOTRON_PROFILE": "a100x8"}
    choice = resolve_engine(
        _options(tmp_path, full_repo, profile="h100x2"), environ, node_api=apiserver.core_api()
    )
    assert choice.entry.name == "torch-h100x2-fp8-tp2"
    assert choice.hardware.source == "flag"
    assert choice.reason == "profile h100x2 chosen by flag (hardware not detected)"
    assert apiserver.requests == []


def test_the_profile_environment_variable_wins_over_node_labels(apiserver, full_repo, tmp_path):
    environ = {**IN_CLUSTER, "NEMOTRON_PROFILE": "h100x2"}
    choice = resolve_engine(_options(tmp_path, full_repo), environ, node_api=apiserver.core_api())
    assert choice.entry.name == "torch-h100x2-fp8-tp2"
    assert choice.hardware.source == "env NEMOTRON_PROFILE"
    assert apiserver.requests == []


def test_an_unknown_profile_name_is_refused_listing_the_known_ones(full_repo, tmp_path):
    with pytest.raises(EngineSelectionError) as error:
        resolve_engine(_options(tmp_path, full_repo), {"NEMOTRON_PROFILE": "h100x9"})
    assert str(error.value).startswith(
        "cannot start: unknown profile 'h100x9'; valid profiles: ['a100x4', 'a100x8', 'h100x2', "
        "'cpu'] (given by env NEMOTRON_PROFILE)"
    )


def test_forbidden_node_read_falls_through_to_nvml_and_the_refusal_says_why(
    apiserver, other_hardware_repo, tmp_path
):
    apiserver.forbidden = True
    nvml = FakeNVML(["NVIDIA A100-SXM4-80GB"] * 8, (8, 0))
    with pytest.raises(EngineSelectionError) as error:
        resolve_engine(
            _options(tmp_path, other_hardware_repo),
            IN_CLUSTER,
            node_api=apiserver.core_api(),
            nvml=nvml,
        )
    message = str(error.value)
    assert "8 x NVIDIA A100-SXM4-80GB (compute capability 8.0) from nvml: profile a100x8" in message
    assert (
        f'Detection: reading node {NODE} failed: HTTP 403: nodes "{NODE}" is forbidden: User '
        '"system:serviceaccount:default:nemotron" cannot get resource "nodes"' in message
    )
    assert "enable the chart's RBAC, or choose the profile with --profile" in message
    assert nvml.initialized == 0  # shut down again


def test_a_node_without_gpu_labels_falls_through_with_the_reason(apiserver):
    node = copy.deepcopy(apiserver.nodes[NODE])
    node["metadata"]["labels"] = {
        k: v for k, v in node["metadata"]["labels"].items() if not k.startswith("nvidia.com/")
    }
    apiserver.nodes[NODE] = node
    hardware = detect_hardware(IN_CLUSTER, apiserver.core_api(), FakeNVML([], (0, 0)))
    assert hardware.device is DeviceKind.CPU and hardware.source == "no GPU found"
    assert hardware.notes == (
        f"node {NODE} has no nvidia.com/gpu.product label (is GPU Feature Discovery running "
        "there?)",
        "NVML: the driver reports no GPU",
    )


def test_a_missing_node_is_a_reason_not_a_crash(apiserver):
    environ = {**IN_CLUSTER, "NODE_NAME": "gone"}
    hardware = detect_hardware(environ, apiserver.core_api(), FakeNVML([], (0, 0)))
    assert hardware.notes[0] == (
        'reading node gone failed: HTTP 404: nodes "gone" not found (is NODE_NAME the node this '
        "pod runs on?)"
    )


def test_in_a_cluster_without_node_name_the_labels_are_skipped_with_the_reason():
    hardware = detect_hardware({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, None, FakeNVML([], (0, 0)))
    assert (
        "NODE_NAME is not set (set it from the downward API, fieldRef spec.nodeName)"
        in (hardware.notes[0])
    )


def test_in_cluster_configuration_without_a_service_account_is_a_reason(monkeypatch):
    # The real loader: this machine has no service-account token.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    hardware = detect_hardware(IN_CLUSTER, None, FakeNVML([], (0, 0)))
    assert hardware.notes[0] == (
        "in-cluster Kubernetes configuration failed: Service token file does not exist."
    )


def test_without_nvml_the_answer_is_the_cpu_and_says_why():
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has NVML")
    hardware = detect_hardware({})  # the real pynvml, whose library is absent here
    assert hardware == Hardware(
        DeviceKind.CPU, None, 0, None, "no GPU found", ("NVML: NVML Shared Library Not Found",)
    )


def test_nvml_gpus_are_matched_to_their_profile_and_nvml_is_shut_down():
    nvml = FakeNVML(["NVIDIA H100 NVL", "NVIDIA H100 NVL"], (9, 0))
    hardware = detect_hardware({}, nvml=nvml)
    assert hardware == Hardware(DeviceKind.GPU, "NVIDIA H100 NVL", 2, "9.0", "nvml")
    assert match_profiles(hardware, load_profiles()).preferred.name == "h100x2"
    assert nvml.initialized == 0


def test_a_failing_nvml_query_is_a_reason_and_nvml_is_still_shut_down():
    nvml = FakeNVML(["NVIDIA H100 NVL"], (9, 0), fail_query=True)
    hardware = detect_hardware({}, nvml=nvml)
    assert hardware.notes == ("NVML: querying the GPUs failed: GPU is lost",)
    assert nvml.initialized == 0


def test_unknown_gpus_are_refused_listing_every_profile_and_why(tmp_path):
    nvml = FakeNVML(["NVIDIA L40S"] * 4, (8, 9))
    with pytest.raises(EngineSelectionError) as error:
        resolve_engine(_options(tmp_path, tmp_path / "repo"), {}, nvml=nvml)
    assert str(error.value).splitlines()[:5] == [
        "cannot start: no profile fits 4 x NVIDIA L40S (compute capability 8.9) (from nvml):",
        "  a100x4: GPU NVIDIA L40S does not match *A100*80GB*; compute capability 8.9; the "
        "profile needs 8.0",
        "  a100x8: GPU NVIDIA L40S does not match *A100*80GB*; compute capability 8.9; the "
        "profile needs 8.0; needs 8 GPUs; this machine has 4",
        "  h100x2: GPU NVIDIA L40S does not match *H100*NVL*; compute capability 8.9; the "
        "profile needs 9.0",
        "  cpu: a cpu profile, and this machine has GPUs (force it with --profile to use the CPU)",
    ]


def test_eight_gpus_prefer_the_eight_gpu_profile_then_the_four_gpu_one():
    hardware = Hardware(DeviceKind.GPU, "NVIDIA-A100-SXM4-80GB", 8, "8.0", "nvml")
    decision = match_profiles(hardware, load_profiles())
    assert [p.name for p in decision.candidates] == ["a100x8", "a100x4"]
    four = match_profiles(replace(hardware, count=4), load_profiles())
    assert [p.name for p in four.candidates] == ["a100x4"]


def test_eight_gpus_with_only_a_four_gpu_engine_serve_it(tmp_path, tp8_checkpoint):
    repo = tmp_path / "repo"
    _build(tp8_checkpoint, repo, "a100x4")
    nvml = FakeNVML(["NVIDIA A100-SXM4-80GB"] * 8, (8, 0))
    choice = resolve_engine(_options(tmp_path, repo), {}, nvml=nvml)
    assert choice.entry.name == "torch-a100x4-bf16-tp4" and choice.profile.name == "a100x4"
    assert choice.reason.endswith(
        "from nvml: profile a100x8; the repository has no a100x8 engine, so a100x4 (4 of the 8 "
        "GPUs)"
    )


def test_the_containers_visible_gpus_bound_the_node_label_count(apiserver):
    uuids = ",".join(f"GPU-{i}" for i in range(4))
    hardware = detect_hardware(
        {**IN_CLUSTER, "NVIDIA_VISIBLE_DEVICES": uuids}, apiserver.core_api()
    )
    assert hardware.count == 4
    assert hardware.notes == (
        f"node {NODE} has 8 GPUs; NVIDIA_VISIBLE_DEVICES gives this container 4",
    )
    assert match_profiles(hardware, load_profiles()).preferred.name == "a100x4"
    assert visible_gpu_count({"NVIDIA_VISIBLE_DEVICES": "all"}) is None


def test_a_container_without_gpus_on_a_gpu_node_is_not_a_gpu_machine(apiserver):
    environ = {**IN_CLUSTER, "NVIDIA_VISIBLE_DEVICES": "void"}
    hardware = detect_hardware(environ, apiserver.core_api(), FakeNVML([], (0, 0)))
    assert hardware.device is DeviceKind.CPU
    assert "gives this container none" in hardware.notes[0]


def test_a_mig_slice_matches_no_whole_gpu_profile():
    hardware = Hardware(DeviceKind.GPU, "NVIDIA-A100-SXM4-80GB-MIG-1g.10gb", 8, "8.0", "nvml")
    with pytest.raises(EngineSelectionError, match="is a MIG slice; the profile needs whole GPUs"):
        match_profiles(hardware, load_profiles())


def test_build_if_missing_builds_the_detected_gpu_profile_then_selects_it(
    apiserver, tp8_checkpoint, tmp_path
):
    options = _options(
        tmp_path, tmp_path / "repo", checkpoint=tp8_checkpoint, build_if_missing=True
    )
    first = resolve_engine(options, IN_CLUSTER, node_api=apiserver.core_api())
    assert first.built and first.entry.name == "torch-a100x8-bf16-tp8"
    again = resolve_engine(options, IN_CLUSTER, node_api=apiserver.core_api())
    assert not again.built and again.entry.engine_id == first.entry.engine_id


def test_build_if_missing_without_a_checkpoint_for_a_gpu_profile_is_refused(tmp_path):
    options = _options(tmp_path, tmp_path / "repo", profile="a100x8", build_if_missing=True)
    with pytest.raises(EngineSelectionError) as error:
        resolve_engine(options, {})
    message = str(error.value)
    assert "(the repository has no engines)" in message
    assert "--build-if-missing needs --checkpoint for the a100x8 profile" in message


def test_an_engine_of_another_checkpoint_is_not_served(full_repo, tmp_path):
    other = write_synthetic_checkpoint(tmp_path / "other", seed=1)
    options = _options(tmp_path, full_repo, profile="h100x2", checkpoint=other)
    with pytest.raises(EngineSelectionError, match="built from a different checkpoint") as error:
        resolve_engine(options, {})
    assert (
        f"nemotron-build build --profile h100x2 --backend torch --checkpoint {other} --repo"
        in str(error.value)
    )


def test_a_precision_the_profile_does_not_allow_is_refused(full_repo, tmp_path):
    with pytest.raises(ProfileError, match="allowed: \\['bf16'\\]"):
        resolve_engine(_options(tmp_path, full_repo, profile="a100x8", precision="fp8"), {})


def test_without_gpus_a_checkpoint_is_built_for_the_cpu_profile_once(tp8_checkpoint, tmp_path):
    options = _options(tmp_path, tmp_path / "repo", checkpoint=tp8_checkpoint)
    first = resolve_engine(options, {}, nvml=FakeNVML([], (0, 0)))
    assert first.built and first.entry.name == "torch-cpu-bf16-tp1" and first.device == "cpu"
    assert first.reason == "no GPU found: profile cpu"
    again = resolve_engine(options, {}, nvml=FakeNVML([], (0, 0)))
    assert not again.built and again.directory == first.directory


@pytest.mark.slow
def test_no_arguments_without_gpus_serve_the_embedded_default(
    cache_dir, cached_embedded_checkpoint
):
    choice = resolve_engine(StartupOptions(cache_dir=cache_dir), {})
    assert choice.profile.name == "cpu" and choice.entry.name == "torch-cpu-bf16-tp1"
    assert choice.directory == ensure_cpu_engine(cache_dir)


def test_a_user_profile_file_from_flag_and_env_is_read_once(tp8_checkpoint, tmp_path):
    extra = tmp_path / "mine.yaml"
    extra.write_text(
        "profiles:\n"
        "  my-cpu:\n"
        "    device: cpu\n"
        "    memory_gb: 8\n"
        "    reserve_gb: 1\n"
        "    tensor_parallel: 1\n"
        "    precisions: [{weights: bf16, kv_cache: bf16}]\n"
        "    limits: {max_batch_size: 4, max_seq_len: 1024, max_num_tokens: 256, "
        "kv_cache_free_fraction: 0.1}\n"
    )
    options = _options(
        tmp_path,
        tmp_path / "repo",
        profile="my-cpu",
        checkpoint=tp8_checkpoint,
        profile_files=(extra,),
    )
    choice = resolve_engine(options, {"NEMOTRON_PROFILES": str(extra)})
    assert choice.entry.name == "torch-my-cpu-bf16-tp1"
