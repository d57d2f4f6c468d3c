"""What each profile renders: GPUs, node affinity, /dev/shm, probes, engine cache key, build.

The expected figures come from engine_build/profiles.yaml (load_profiles), not from the chart,
so a chart that drifts from the profiles the server knows fails here.
"""

from __future__ import annotations

import fnmatch
import re

import pytest
import yaml

from engine_build.profiles import DeviceKind, load_profiles
from tests.deploy.helm_chart import (
    CHART,
    GPU_PROFILES,
    PROFILES,
    REPO_ROOT,
    by_kind,
    one,
    profile_args,
    refusal,
)

SHM = {"a100x4": "16Gi", "a100x8": "32Gi", "h100x2": "8Gi"}
MODEL = "llama-3.3-nemotron-super-49b-v1"
ENGINES = "/var/lib/nemotron/engines"


def chart_table() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())["profiles"]


def trtllm_version() -> str:
    """The TensorRT-LLM release of the Dockerfile's gpu base image (its ARG TRTLLM_IMAGE tag)."""
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    (image,) = re.findall(r"^ARG TRTLLM_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    return image.rsplit(":", 1)[1]


def default_backend(name: str) -> str:
    """What the chart builds and serves by default: TensorRT-LLM on GPUs, torch on cpu."""
    return "tensorrt-llm" if load_profiles().get(name).device is DeviceKind.GPU else "torch"


def cache_key(name: str, backend: str | None = None) -> str:
    profile = load_profiles().get(name)
    model = MODEL if profile.device is DeviceKind.GPU else "smollm2-135m-instruct"
    backend = backend or default_backend(name)
    slug = f"tensorrt-llm-{trtllm_version()}" if backend == "tensorrt-llm" else backend
    precision = profile.default_precision.name
    return f"{model}/{slug}/{name}-{profile.target}-{precision}-tp{profile.tensor_parallel}"


def pod_spec(workload) -> dict:
    return workload["spec"]["template"]["spec"]


def container(spec, name: str, init: bool = False) -> dict:
    containers = spec.get("initContainers" if init else "containers", [])
    return next(c for c in containers if c["name"] == name)


@pytest.mark.parametrize("name", PROFILES)
def test_the_chart_profile_table_agrees_with_profiles_yaml(name):
    entry, profile = chart_table()[name], load_profiles().get(name)
    assert entry["tensorParallel"] == profile.tensor_parallel
    assert entry["precisions"] == profile.precision_names
    if profile.device is DeviceKind.CPU:
        assert "gpu" not in entry
        return
    assert profile.gpu_count == profile.tensor_parallel
    assert entry["gpu"]["architecture"] == profile.target
    for product in entry["gpu"]["products"]:  # every label value the affinity accepts...
        assert profile.matches_gpu(product), f"{product} does not match {profile.gpu_products}"
    for pattern in profile.gpu_products:  # ...and every pattern has a label value
        assert any(fnmatch.fnmatch(p.lower(), pattern.lower()) for p in entry["gpu"]["products"])


def test_the_chart_offers_exactly_the_built_in_profiles():
    assert set(chart_table()) == set(load_profiles().names) == set(PROFILES)


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_a_gpu_profile_asks_for_tp_gpus_on_a_matching_node(chart, name):
    profile = load_profiles().get(name)
    deployment = one(chart.objects(*profile_args(name)), "Deployment")
    spec = pod_spec(deployment)
    server = container(spec, "server")
    assert server["resources"]["limits"]["nvidia.com/gpu"] == str(profile.tensor_parallel)
    terms = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    expressions = {e["key"]: e for e in terms["nodeSelectorTerms"][0]["matchExpressions"]}
    product = expressions["nvidia.com/gpu.product"]
    assert (
        product["operator"] == "In" and product["values"] == chart_table()[name]["gpu"]["products"]
    )
    assert all(profile.matches_gpu(value) for value in product["values"])
    count = expressions["nvidia.com/gpu.count"]
    assert count["operator"] == "Gt" and count["values"] == [str(profile.tensor_parallel - 1)]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_a_gpu_profile_mounts_a_ram_backed_shm_with_its_size_limit(chart, name):
    spec = pod_spec(one(chart.objects(*profile_args(name)), "Deployment"))
    shm = next(v for v in spec["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": SHM[name]}
    mounts = {m["name"]: m["mountPath"] for m in container(spec, "server")["volumeMounts"]}
    assert mounts["shm"] == "/dev/shm"


@pytest.mark.parametrize("name", PROFILES)
def test_probes_are_native_grpc_with_the_health_service_names(chart, name):
    profile_entry = chart_table()[name]
    server = container(pod_spec(one(chart.objects(*profile_args(name)), "Deployment")), "server")
    assert server["livenessProbe"]["grpc"] == {"port": 50051, "service": "liveness"}
    assert server["readinessProbe"]["grpc"] == {"port": 50051, "service": "readiness"}
    startup = server["startupProbe"]
    assert startup["grpc"] == {"port": 50051, "service": "readiness"}
    budget = startup["failureThreshold"] * startup["periodSeconds"]
    assert (
        profile_entry["startupBudgetSeconds"] <= budget < profile_entry["startupBudgetSeconds"] + 10
    )


def test_the_startup_budget_can_be_overridden(chart):
    args = profile_args("a100x8", ["--set", "probes.startup.budgetSeconds=3600"])
    server = container(pod_spec(one(chart.objects(*args), "Deployment")), "server")
    assert server["startupProbe"]["failureThreshold"] * 10 == 3600


@pytest.mark.parametrize("name", PROFILES)
def test_before_kubernetes_1_24_probes_run_the_healthcheck_command(chart, name):
    objects = chart.objects(*profile_args(name), kube_version="1.23.0")
    server = container(pod_spec(one(objects, "Deployment")), "server")
    for probe, service in (
        ("startupProbe", "readiness"),
        ("livenessProbe", "liveness"),
        ("readinessProbe", "readiness"),
    ):
        assert "grpc" not in server[probe]
        command = server[probe]["exec"]["command"]
        assert command[:5] == [
            "nemotron-healthcheck",
            "--address",
            "localhost:50051",
            "--service",
            service,
        ]


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_the_build_job_builds_the_profile_engine_under_its_cache_key(chart, name):
    profile = load_profiles().get(name)
    objects = chart.objects(*profile_args(name))
    job = one(objects, "Job")
    key = cache_key(name)
    assert job["metadata"]["annotations"]["nemotron-serve/engine-cache-key"] == key
    build = container(pod_spec(job), "build-engine")
    assert build["command"] == [
        "nemotron-build", "build", "--profile", name,
        "--precision", profile.default_precision.name, "--backend", "tensorrt-llm",
        "--checkpoint", "/models", "--repo", f"{ENGINES}/{key}",
    ]  # fmt: skip
    # TensorRT-LLM builds on the profile's GPUs (test_chart_backend.py has the details).
    assert build["resources"]["limits"]["nvidia.com/gpu"] == str(profile.tensor_parallel)
    download = container(pod_spec(job), "download-model", init=True)
    assert download["command"][3:6] == ["nvidia/Llama-3_3-Nemotron-Super-49B-v1", "main", "/models"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod_spec(job)["volumes"]
              if "persistentVolumeClaim" in v}  # fmt: skip
    assert claims == {"model": "nemotron-model", "engines": "nemotron-engines"}
    assert {p["metadata"]["name"] for p in by_kind(objects, "PersistentVolumeClaim")} == set(
        claims.values()
    )


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_the_server_waits_for_that_engine_then_serves_it(chart, name):
    profile = load_profiles().get(name)
    objects = chart.objects(*profile_args(name))
    deployment = one(objects, "Deployment")
    spec, key = pod_spec(deployment), cache_key(name)
    assert (
        deployment["spec"]["template"]["metadata"]["annotations"]["nemotron-serve/engine-cache-key"]
        == key
    )
    wait = container(spec, "wait-for-engine", init=True)
    assert wait["command"] == [
        "nemotron-build", "wait", "--profile", name,
        "--precision", profile.default_precision.name, "--backend", "tensorrt-llm",
        "--repo", f"{ENGINES}/{key}",
    ]  # fmt: skip
    job_claim = next(
        v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(one(objects, "Job"))["volumes"]
        if v["name"] == "engines"
    )
    engines = next(v for v in spec["volumes"] if v["name"] == "engines")
    assert engines["persistentVolumeClaim"]["claimName"] == job_claim
    config = one(objects, "ConfigMap")["data"]
    assert config["NEMOTRON_ENGINE_REPO"] == f"{ENGINES}/{key}"
    assert config["NEMOTRON_PROFILE"] == name
    assert config["NEMOTRON_PRECISION"] == profile.default_precision.name
    assert config["NEMOTRON_BACKEND"] == "tensorrt-llm"
    assert "NEMOTRON_CHECKPOINT" not in config  # the engine carries the tokenizer
    mounts = {m["name"]: m for m in container(spec, "server")["volumeMounts"]}
    assert mounts["engines"]["readOnly"] is True and "model" not in mounts


def test_cpu_renders_no_gpu_no_persistent_volume_and_no_build(chart):
    objects = chart.objects(*profile_args("cpu"))
    text = chart.template(*profile_args("cpu"))
    assert "nvidia.com/gpu" not in text
    assert not by_kind(objects, "PersistentVolumeClaim") and not by_kind(objects, "Job")
    spec = pod_spec(one(objects, "Deployment"))
    assert "affinity" not in spec and "tolerations" not in spec
    assert all(set(volume) == {"name", "emptyDir"} for volume in spec["volumes"])
    assert {v["name"] for v in spec["volumes"]} == {"cache", "tmp"}  # no model, no shm
    assert [c["name"] for c in spec["initContainers"]] == ["seed-cache"]
    config = one(objects, "ConfigMap")["data"]
    assert config["NEMOTRON_PROFILE"] == "cpu" and "NEMOTRON_CHECKPOINT" not in config
    assert "NEMOTRON_ENGINE_REPO" not in config  # the baked engine in the pod's cache
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["nemotron-serve/engine-cache-key"] == cache_key("cpu")
    assert container(spec, "server")["image"].endswith(":0.1.0-cpu")


def test_overrides_of_one_profile_entry_reach_the_pod(chart):
    args = profile_args(
        "h100x2",
        ["--set", "profiles.h100x2.shmSize=24Gi", "--set", "engine.precision=bf16",
         "--set", "server.resources.requests.cpu=24"],
    )  # fmt: skip
    objects = chart.objects(*args)
    spec = pod_spec(one(objects, "Deployment"))
    assert next(v for v in spec["volumes"] if v["name"] == "shm")["emptyDir"]["sizeLimit"] == "24Gi"
    resources = container(spec, "server")["resources"]
    assert resources["requests"] == {"cpu": 24, "memory": "128Gi"}
    assert resources["limits"]["nvidia.com/gpu"] == "2"
    assert one(objects, "ConfigMap")["data"]["NEMOTRON_ENGINE_REPO"].endswith(
        "h100x2-sm90-bf16-tp2"
    )


def test_init_container_mode_builds_in_each_pod_and_renders_no_job(chart):
    args = profile_args("a100x4", ["--set", "engine.build.mode=initContainer"])
    objects = chart.objects(*args)
    assert not by_kind(objects, "Job")
    spec = pod_spec(one(objects, "Deployment"))
    assert [c["name"] for c in spec["initContainers"]] == ["download-model", "build-engine"]
    build = container(spec, "build-engine", init=True)
    assert build["command"][-1] == f"{ENGINES}/{cache_key('a100x4')}"
    mounts = {m["name"]: m for m in build["volumeMounts"]}
    assert "readOnly" not in mounts["engines"]  # the builder writes; the server only reads
    server_mounts = {m["name"]: m for m in container(spec, "server")["volumeMounts"]}
    assert server_mounts["engines"]["readOnly"] is True


def test_a_checkpoint_from_an_existing_claim_is_mounted_read_only(chart):
    args = profile_args(
        "a100x8",
        ["--set", "model.source=pvc", "--set", "model.pvc.existingClaim=models",
         "--set", "model.subPath=nemotron/super-49b-v1"],
    )  # fmt: skip
    objects = chart.objects(*args)
    assert [p["metadata"]["name"] for p in by_kind(objects, "PersistentVolumeClaim")] == [
        "nemotron-engines"
    ]
    spec = pod_spec(one(objects, "Job"))
    assert "initContainers" not in spec  # nothing to download
    model = next(v for v in spec["volumes"] if v["name"] == "model")
    assert model["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    build = container(spec, "build-engine")
    assert build["command"][build["command"].index("--checkpoint") + 1] == (
        "/models/nemotron/super-49b-v1"
    )


def test_the_download_reads_its_token_from_a_secret(chart):
    args = profile_args(
        "h100x2",
        ["--set", "model.download.tokenSecret.name=hf", "--set", "model.download.revision=abc123"],
    )
    download = container(pod_spec(one(chart.objects(*args), "Job")), "download-model", init=True)
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in (
        download["env"]
    )
    assert download["command"][4] == "abc123"


def test_a_new_precision_is_a_new_job(chart):
    bf16 = one(chart.objects(*profile_args("h100x2", ["--set", "engine.precision=bf16"])), "Job")
    fp8 = one(chart.objects(*profile_args("h100x2")), "Job")
    assert bf16["metadata"]["name"] != fp8["metadata"]["name"]
    assert fp8["metadata"]["name"].startswith("nemotron-build-")


def test_with_engines_built_elsewhere_pods_only_wait(chart):
    objects = chart.objects(*profile_args("a100x4", ["--set", "engine.build.mode=none"]))
    assert not by_kind(objects, "Job")
    assert [p["metadata"]["name"] for p in by_kind(objects, "PersistentVolumeClaim")] == [
        "nemotron-engines"
    ]
    spec = pod_spec(one(objects, "Deployment"))
    assert [c["name"] for c in spec["initContainers"]] == ["wait-for-engine"]


def image_profiles() -> dict:
    """The chart's copy of what the image's profiles.yaml builds (nemotron.imageProfiles)."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    (body,) = re.findall(
        r'define "nemotron\.imageProfiles" -}}\n(.*?)\n{{- end -}}', helpers, re.DOTALL
    )
    return yaml.safe_load(body)


def test_the_charts_image_profiles_agree_with_profiles_yaml():
    profiles = load_profiles()
    assert image_profiles() == {
        name: {
            "tensorParallel": profiles.get(name).tensor_parallel,
            "precisions": profiles.get(name).precision_names,
            "target": profiles.get(name).target,
        }
        for name in profiles.names
    }


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("profiles.a100x4.tensorParallel=2", "profiles.a100x4.tensorParallel 2"),
        ("profiles.a100x4.precisions={fp8}", "profiles.a100x4.precisions: fp8 is not"),
        ("profiles.cpu.tensorParallel=2", "profiles.cpu.tensorParallel 2"),
        ("profiles.a100x4.gpu.architecture=sm90", "profiles.a100x4.gpu: the image's a100x4"),
        ("profiles.a100x4.gpu=null", "for sm80, and this entry says no GPU"),
    ],
)
def test_an_override_the_image_cannot_honour_is_refused_at_render_time(chart, override, named):
    """Before, --set profiles.a100x4.tensorParallel=2 gave the pod 2 GPUs and a ...-tp2 cache
    key while the Job built, and the server served, the image's tp4 engine."""
    profile = override.split(".")[1]
    message = refusal(chart, *profile_args(profile, ["--set", override]))
    assert named in message
    assert "only gpu.products, shmSize, resources" in message


@pytest.mark.parametrize(
    "override",
    [
        ["--set", "profiles.a100x4.shmSize=32Gi"],
        ["--set", "profiles.a100x4.startupBudgetSeconds=3600"],
        ["--set", "profiles.h100x2.precisions={bf16}", "--set", "engine.precision=bf16"],
        ["--set", "profiles.a100x8.tensorParallel=2"],  # not the selected profile: unused
    ],
)
def test_overrides_of_the_pod_alone_render(chart, override):
    profile = "h100x2" if "h100x2" in override[1] else "a100x4"
    assert one(chart.objects(*profile_args(profile, override)), "Deployment")


def test_the_cpu_profile_requests_its_cpu_limit_and_passes_it_as_the_thread_count(chart):
    """requests = limits (a guaranteed share, no throttling below the quota the team is sized for),
    and the limit reaches the server as NEMOTRON_COMPUTE_THREADS, rounded up to whole cores."""
    server = container(pod_spec(one(chart.objects(*profile_args("cpu")), "Deployment")), "server")
    resources = server["resources"]
    assert resources["requests"]["cpu"] == resources["limits"]["cpu"] == "2"
    threads = next(e for e in server["env"] if e["name"] == "NEMOTRON_COMPUTE_THREADS")
    field = threads["valueFrom"]["resourceFieldRef"]
    assert field == {"containerName": "server", "resource": "limits.cpu", "divisor": "1"}


def test_no_thread_count_is_passed_without_a_cpu_limit(chart):
    args = (*profile_args("cpu"), "--set", "profiles.cpu.resources.limits.cpu=null")
    server = container(pod_spec(one(chart.objects(*args), "Deployment")), "server")
    assert "cpu" not in server["resources"].get("limits", {})
    assert all(e["name"] != "NEMOTRON_COMPUTE_THREADS" for e in server["env"])


def test_an_explicit_compute_threads_value_is_not_overridden_by_the_cpu_limit(chart):
    args = (*profile_args("cpu"), "--set", "server.computeThreads=1")
    objects = chart.objects(*args)
    server = container(pod_spec(one(objects, "Deployment")), "server")
    assert all(e["name"] != "NEMOTRON_COMPUTE_THREADS" for e in server["env"])
    assert one(objects, "ConfigMap")["data"]["NEMOTRON_COMPUTE_THREADS"] == "1"
