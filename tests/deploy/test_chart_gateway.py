"""The custom resources around the HTTP API: the Gateway API Inference Extension's InferencePool
and KEDA's ScaledObject, validated against the upstream CRDs in data/crds (strictly: an unknown
field fails) and checked against the objects they refer to.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy.crd_schema import CustomResourceSchema
from tests.deploy.helm_chart import (
    PROFILES,
    REPO_ROOT,
    by_kind,
    one,
    profile_args,
    refusal,
)

DATA = Path(__file__).parent / "data"
ALL_FEATURES = ["-f", str(DATA / "all-features.yaml")]
KEDA = [*ALL_FEATURES, "-f", str(DATA / "keda.yaml")]
POOL = ["--set", "inferencePool.enabled=true"]
KEDA_MINIMAL = ["--set", "keda.enabled=true", "--set", "keda.serverAddress=http://prometheus:9090"]
POOL_CRDS = {
    "v1.0.0": "inference.networking.k8s.io_inferencepools-v1.0.0.yaml",
    "v1.6.0": "inference.networking.k8s.io_inferencepools-v1.6.0.yaml",
}


@functools.cache
def pool_schema(release: str) -> CustomResourceSchema:
    return CustomResourceSchema.load(POOL_CRDS[release], "v1")


@functools.cache
def scaled_object_schema() -> CustomResourceSchema:
    return CustomResourceSchema.load("keda.sh_scaledobjects-v2.20.2.yaml", "v1alpha1")


def test_neither_custom_resource_is_rendered_by_default(chart):
    kinds = {o["kind"] for o in chart.objects()}
    assert not kinds & {"InferencePool", "ScaledObject"}


@pytest.mark.parametrize("release", POOL_CRDS)
@pytest.mark.parametrize("values", [POOL, ALL_FEATURES], ids=["pool", "all-features"])
@pytest.mark.parametrize("name", PROFILES)
def test_the_inference_pool_validates_against_the_extension_crd(chart, name, values, release):
    pool = one(chart.objects(*profile_args(name, values)), "InferencePool")
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool_schema(release).errors(pool) == []
    # The CRD's CEL rules, by hand: one port, so unique; a Service reference names its port.
    numbers = [port["number"] for port in pool["spec"]["targetPorts"]]
    assert len(set(numbers)) == len(numbers) == 1
    ref = pool["spec"]["endpointPickerRef"]
    assert ref.get("kind", "Service") != "Service" or "port" in ref


@pytest.mark.parametrize("values", [POOL, ALL_FEATURES], ids=["pool", "all-features"])
def test_the_pool_selects_exactly_the_server_pods_on_their_http_port(chart, values):
    objects = chart.objects(*profile_args("a100x4", values))
    pool = one(objects, "InferencePool")["spec"]
    deployment = one(objects, "Deployment")["spec"]
    assert pool["selector"]["matchLabels"] == deployment["selector"]["matchLabels"]
    assert (
        pool["selector"]["matchLabels"].items()
        <= deployment["template"]["metadata"]["labels"].items()
    )
    others = [o["spec"]["template"]["metadata"]["labels"] for o in by_kind(objects, "Job")]
    others += [o["metadata"]["labels"] for o in by_kind(objects, "Pod")]  # the helm test pod
    assert others and not any(pool["selector"]["matchLabels"].items() <= o.items() for o in others)
    server = deployment["template"]["spec"]["containers"][0]
    http = next(port for port in server["ports"] if port["name"] == "http")
    assert pool["targetPorts"] == [{"number": http["containerPort"]}] == [{"number": 8000}]


def test_the_pool_follows_the_http_port(chart):
    pool = one(chart.objects(*POOL, "--set", "server.httpPort=8080"), "InferencePool")
    assert pool["spec"]["targetPorts"] == [{"number": 8080}]
    message = refusal(chart, *POOL, "--set", "server.httpPort=0")
    assert "inferencePool.enabled needs the HTTP API" in message


def test_the_pool_names_its_endpoint_picker(chart):
    pool = one(chart.objects(*POOL), "InferencePool")
    assert pool["metadata"]["name"] == "nemotron"
    assert pool["spec"]["endpointPickerRef"] == {
        "kind": "Service",
        "name": "nemotron-epp",
        "port": {"number": 9002},
        "failureMode": "FailOpen",
    }
    pool = one(chart.objects(*ALL_FEATURES), "InferencePool")
    assert pool["spec"]["endpointPickerRef"]["name"] == "nemotron-router-epp"
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"


def test_the_pool_docs_deploy_md_shows_is_the_one_the_chart_renders(chart):
    text = (REPO_ROOT / "docs" / "deploy.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, re.S)
    shown = next(d for b in blocks for d in yaml.safe_load_all(b) if d["kind"] == "InferencePool")
    pool = one(chart.objects(*POOL), "InferencePool")
    assert shown["spec"] == pool["spec"]
    assert shown["metadata"]["name"] == pool["metadata"]["name"]


def test_the_crd_validation_is_strict_enough_to_catch_a_misplaced_field(chart):
    pool = one(chart.objects(*POOL), "InferencePool")
    pool["spec"]["targetPorts"] = [{"port": 8000}]  # the field is `number`
    pool["spec"]["endpointPickerRef"]["failureMode"] = "FailClosed"  # the value is FailClose
    errors = pool_schema("v1.6.0").errors(pool)
    assert len(errors) == 3, errors
    assert any("'port' was unexpected" in e for e in errors)
    assert any("'number' is a required property" in e for e in errors)
    assert any("'FailClosed' is not one of" in e for e in errors)
    scaled = one(chart.objects(*KEDA_MINIMAL), "ScaledObject")
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 4  # metadata values are strings
    assert len(scaled_object_schema().errors(scaled)) == 1


@pytest.mark.parametrize("values", [KEDA_MINIMAL, KEDA], ids=["minimal", "all-features"])
@pytest.mark.parametrize("name", PROFILES)
def test_the_scaled_object_validates_against_the_keda_crd(chart, name, values):
    scaled = one(chart.objects(*profile_args(name, values)), "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled_object_schema().errors(scaled) == []


def test_keda_scales_the_deployment_on_the_waiting_requests_per_pod(chart):
    objects = chart.objects(*KEDA_MINIMAL)
    spec = one(objects, "ScaledObject")["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "nemotron",
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 4)
    assert spec["triggers"] == [
        {
            "type": "prometheus",
            "metricType": "AverageValue",
            "metadata": {
                "serverAddress": "http://prometheus:9090",
                "query": 'sum(vllm:num_requests_waiting{namespace="inference",service="nemotron"})',
                "threshold": "4",
            },
        }
    ]
    assert "replicas" not in one(objects, "Deployment")["spec"]  # KEDA's HPA owns them
    assert not by_kind(objects, "HorizontalPodAutoscaler")


def test_every_keda_option_reaches_the_scaled_object(chart):
    spec = one(chart.objects(*KEDA), "ScaledObject")["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 6)
    assert (spec["pollingInterval"], spec["cooldownPeriod"]) == (15, 600)
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == {"scaleDown": {"stabilizationWindowSeconds": 600}}
    trigger = spec["triggers"][0]
    assert trigger["metadata"]["threshold"] == "2.5"
    assert trigger["metadata"]["activationThreshold"] == "1"
    assert trigger["authenticationRef"] == {"name": "prometheus-auth"}
    query = 'sum(rate(vllm:num_requests_waiting{model_name="x"}[1m]))'
    spec = one(chart.objects(*KEDA_MINIMAL, "--set-string", f"keda.query={query}"), "ScaledObject")
    assert spec["spec"]["triggers"][0]["metadata"]["query"] == query


def test_the_default_query_counts_the_series_the_service_monitor_scrapes(chart):
    objects = chart.objects(*KEDA_MINIMAL, "--set", "serviceMonitor.enabled=true")
    monitor = one(objects, "ServiceMonitor")["spec"]
    scraped = [
        s["metadata"]["name"]
        for s in by_kind(objects, "Service")
        if monitor["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        and {"metrics"} & {p["name"] for p in s["spec"]["ports"]}
    ]
    query = one(objects, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    assert scraped == ["nemotron"]
    assert f'service="{scraped[0]}"' in query
    assert f'namespace="{monitor["namespaceSelector"]["matchNames"][0]}"' in query


def test_keda_and_the_hpa_exclude_each_other(chart):
    message = refusal(chart, *KEDA_MINIMAL, "--set", "autoscaling.enabled=true")
    assert "autoscaling.enabled and keda.enabled both scale the Deployment" in message
    message = refusal(chart, *KEDA_MINIMAL, "--set", "keda.minReplicas=5")
    assert "keda.minReplicas 5 is above keda.maxReplicas 4" in message


def test_keda_needs_a_prometheus_address(any_helm_chart):
    message = refusal(any_helm_chart, "--set", "keda.enabled=true")
    assert "keda" in message and "serverAddress" in message
    message = refusal(
        any_helm_chart, "--set", "keda.enabled=true", "--set", "keda.serverAddress=prometheus:9090"
    )
    assert "serverAddress" in message and "http" in message
