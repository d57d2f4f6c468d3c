"""engine.backend: which engine the chart builds, waits for and serves, and its cache key.

GPU profiles default to TensorRT-LLM (the gpu image is built on NVIDIA's TensorRT-LLM release
image), cpu to torch; `engine.backend=torch` overrides. One helper decides, so the build Job
(or init container), the wait and the server's NEMOTRON_BACKEND always agree. The expected
TensorRT-LLM version comes from the Dockerfile, not from the chart.
"""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.helm_chart import (
    CHART,
    GPU_PROFILES,
    PROFILES,
    by_kind,
    one,
    profile_args,
    refusal,
)
from tests.deploy.test_chart_kubernetes import validation_errors
from tests.deploy.test_chart_profiles import (
    ENGINES,
    cache_key,
    container,
    default_backend,
    pod_spec,
    trtllm_version,
)

TORCH = ["--set", "engine.backend=torch"]
TRTLLM = ["--set", "engine.backend=tensorrt-llm"]
PYTORCH_FLOW = ["--set", "engine.backend=tensorrt-llm-pytorch"]


def rendered_backends(objects) -> dict[str, str]:
    """The backend each part uses: build (Job or init container), wait, server (its env)."""
    found = {"server": one(objects, "ConfigMap")["data"]["NEMOTRON_BACKEND"]}
    deployment = pod_spec(one(objects, "Deployment"))
    builders = [pod_spec(job)["containers"][0] for job in by_kind(objects, "Job")]
    for init in deployment.get("initContainers", []):
        if init["name"] in ("build-engine", "wait-for-engine"):
            builders.append(init)
    for builder in builders:
        command = builder["command"]
        part = "wait" if command[1] == "wait" else "build"
        found[part] = command[command.index("--backend") + 1]
    return found


def repo(objects) -> str:
    return one(objects, "ConfigMap")["data"]["NEMOTRON_ENGINE_REPO"]


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_gpu_profiles_build_wait_for_and_serve_tensorrt_llm_by_default(chart, name):
    objects = chart.objects(*profile_args(name))
    assert rendered_backends(objects) == dict.fromkeys(("server", "build", "wait"), "tensorrt-llm")
    assert repo(objects) == f"{ENGINES}/{cache_key(name)}"
    assert f"/tensorrt-llm-{trtllm_version()}/" in repo(objects)
    # The server reads NEMOTRON_BACKEND from the ConfigMap, like its other settings.
    server = container(pod_spec(one(objects, "Deployment")), "server")
    assert server["envFrom"] == [{"configMapRef": {"name": "nemotron"}}]


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_engine_backend_torch_renders_torch_everywhere(chart, name):
    objects = chart.objects(*profile_args(name, TORCH))
    assert rendered_backends(objects) == dict.fromkeys(("server", "build", "wait"), "torch")
    assert repo(objects) == f"{ENGINES}/{cache_key(name, 'torch')}"
    job = one(objects, "Job")
    build = container(pod_spec(job), "build-engine")
    assert build["command"][-1] == repo(objects)
    # A CPU job, as before: the engine.build resources, no GPU, no GPU node affinity.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert build["resources"] == values["engine"]["build"]["resources"]
    assert "affinity" not in pod_spec(job) and "tolerations" not in pod_spec(job)


@pytest.mark.parametrize("backend", ["", "torch"])
def test_cpu_serves_torch(chart, backend):
    objects = chart.objects(*profile_args("cpu", ["--set", f"engine.backend={backend}"]))
    assert one(objects, "ConfigMap")["data"]["NEMOTRON_BACKEND"] == "torch"
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["nemotron-serve/engine-cache-key"] == cache_key("cpu", "torch")
    assert default_backend("cpu") == "torch"


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_the_backends_have_their_own_cache_key_repository_and_job(chart, name):
    trt, torch = chart.objects(*profile_args(name)), chart.objects(*profile_args(name, TORCH))
    explicit = chart.objects(*profile_args(name, TRTLLM))
    assert cache_key(name, "torch") != cache_key(name, "tensorrt-llm")
    assert repo(trt) != repo(torch)
    jobs = [one(objects, "Job")["metadata"]["name"] for objects in (trt, torch, explicit)]
    assert jobs[0] != jobs[1] and jobs[0] == jobs[2]  # "" on a GPU profile is tensorrt-llm
    pods = [
        one(o, "Deployment")["spec"]["template"]["metadata"]["annotations"] for o in (trt, torch)
    ]
    assert pods[0]["nemotron-serve/engine-cache-key"] != pods[1]["nemotron-serve/engine-cache-key"]
    assert pods[0]["checksum/config"] != pods[1]["checksum/config"]  # a change rolls the pods


def test_another_tensorrt_llm_release_is_another_key_and_job(chart):
    release = ["--set", "engine.tensorrtLlmVersion=1.3.0rc1"]
    base, other = (chart.objects(*profile_args("h100x2", extra)) for extra in ([], release))
    assert repo(other).endswith("/tensorrt-llm-1.3.0rc1/h100x2-sm90-fp8-tp2")
    assert one(base, "Job")["metadata"]["name"] != one(other, "Job")["metadata"]["name"]
    # torch engines do not depend on it.
    torch = [chart.objects(*profile_args("h100x2", [*TORCH, *extra])) for extra in ([], release)]
    assert repo(torch[0]) == repo(torch[1])


def test_the_chart_names_the_tensorrt_llm_release_of_the_dockerfile():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["engine"]["backend"] == ""
    assert values["engine"]["tensorrtLlmVersion"] == trtllm_version()


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_the_tensorrt_llm_build_job_runs_on_the_profiles_gpus(chart, name):
    objects = chart.objects(*profile_args(name))
    job, deployment = pod_spec(one(objects, "Job")), pod_spec(one(objects, "Deployment"))
    build = container(job, "build-engine")
    server = container(deployment, "server")
    # The profile's resources (those of the server's node class) and its GPU count.
    assert build["resources"] == server["resources"]
    assert job["affinity"] == deployment["affinity"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in job[
        "tolerations"
    ]


def test_tensorrt_llm_build_resources_and_calibration_data_can_be_set(chart):
    args = profile_args(
        "h100x2",
        ["--set", "engine.build.gpuResources.limits.memory=200Gi",
         "--set", "engine.build.calibrationDataset=/models/calibration/cnn_dailymail",
         "--set", "engine.build.tolerations[0].key=dedicated",
         "--set", "engine.build.tolerations[0].operator=Exists"],
    )  # fmt: skip
    job = pod_spec(one(chart.objects(*args), "Job"))
    build = container(job, "build-engine")
    assert build["resources"]["limits"] == {"memory": "200Gi", "nvidia.com/gpu": "2"}
    assert build["resources"]["requests"] == {"cpu": "16", "memory": "128Gi"}
    command = build["command"]
    assert command[command.index("--calibration-dataset") + 1] == (
        "/models/calibration/cnn_dailymail"
    )
    assert {"key": "dedicated", "operator": "Exists"} in job["tolerations"]
    # torch builds take no calibration data.
    torch = pod_spec(one(chart.objects(*args, *TORCH), "Job"))
    assert "--calibration-dataset" not in container(torch, "build-engine")["command"]


def test_the_init_container_build_uses_the_backend_too(chart):
    for extra, backend in (([], "tensorrt-llm"), (TORCH, "torch")):
        args = profile_args("a100x8", ["--set", "engine.build.mode=initContainer", *extra])
        objects = chart.objects(*args)
        assert not by_kind(objects, "Job")
        assert rendered_backends(objects) == {"server": backend, "build": backend}
        build = container(pod_spec(one(objects, "Deployment")), "build-engine", init=True)
        assert build["command"][-1] == f"{ENGINES}/{cache_key('a100x8', backend)}"
        assert ("nvidia.com/gpu" in build["resources"]["limits"]) == (backend == "tensorrt-llm")


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_the_pytorch_flow_renders_everywhere_with_its_own_key(chart, name):
    objects = chart.objects(*profile_args(name, PYTORCH_FLOW))
    backends = dict.fromkeys(("server", "build", "wait"), "tensorrt-llm-pytorch")
    assert rendered_backends(objects) == backends
    assert f"/tensorrt-llm-pytorch-{trtllm_version()}/" in repo(objects)
    assert repo(objects) != repo(chart.objects(*profile_args(name)))  # not the TensorRT flow's


def test_the_pytorch_flow_builds_fp8_on_gpus_and_bf16_on_cpus(chart):
    calibration = ["--set", "engine.build.calibrationDataset=/models/calibration"]
    fp8 = pod_spec(
        one(chart.objects(*profile_args("h100x2", [*PYTORCH_FLOW, *calibration])), "Job")
    )
    build = container(fp8, "build-engine")
    assert build["resources"]["limits"]["nvidia.com/gpu"] == "2"  # ModelOpt calibration
    assert build["command"][build["command"].index("--calibration-dataset") + 1] == (
        "/models/calibration"
    )
    assert "affinity" in fp8
    bf16 = pod_spec(one(chart.objects(*profile_args("a100x4", PYTORCH_FLOW)), "Job"))
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # The checkpoint placed as it is: a CPU job.
    assert container(bf16, "build-engine")["resources"] == values["engine"]["build"]["resources"]
    assert "affinity" not in bf16 and "tolerations" not in bf16


@pytest.mark.parametrize("backend", ["", "torch", "tensorrt-llm", "tensorrt-llm-pytorch"])
@pytest.mark.parametrize("name", PROFILES)
def test_every_backend_validates_strictly(chart, name, backend):
    if name == "cpu" and backend.startswith("tensorrt-llm"):
        return  # refused, below
    objects = chart.objects(*profile_args(name, ["--set", f"engine.backend={backend}"]))
    assert validation_errors(objects, "1.30.0") == []


@pytest.mark.parametrize("flow", [TRTLLM, PYTORCH_FLOW])
def test_tensorrt_llm_on_cpu_is_refused_naming_the_allowed_backends(any_helm_chart, flow):
    message = refusal(any_helm_chart, *profile_args("cpu", flow))
    backend = flow[1].split("=")[1]
    assert f'engine.backend "{backend}" is not allowed by profile cpu' in message
    assert "allowed: torch" in message and "NVIDIA GPUs" in message


@pytest.mark.parametrize("name", ["h100x2", "cpu"])
def test_an_unknown_backend_is_refused_with_the_allowed_values(any_helm_chart, name):
    message = refusal(any_helm_chart, *profile_args(name, ["--set", "engine.backend=trtllm"]))
    assert "backend" in message
    for allowed in ("tensorrt-llm", "tensorrt-llm-pytorch", "torch"):
        assert allowed in message


def test_a_tensorrt_llm_version_that_is_not_a_release_is_refused(any_helm_chart):
    args = profile_args("h100x2", ["--set", "engine.tensorrtLlmVersion=latest"])
    message = refusal(any_helm_chart, *args)
    assert "tensorrtLlmVersion" in message and "pattern" in message  # helm 3 omits the value
