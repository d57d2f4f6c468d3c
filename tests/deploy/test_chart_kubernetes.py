"""Every rendered object validates against Kubernetes' own schemas, strictly (unknown fields fail).

kubernetes-validate holds the OpenAPI schemas of Kubernetes 1.25-1.37 offline. Custom
resources are left out here: the ServiceMonitor (Prometheus Operator) is checked by hand below,
the InferencePool and the KEDA ScaledObject against their upstream CRDs in test_chart_gateway.
Renders for Kubernetes 1.23 (exec probes) are validated against 1.25, the oldest schema it has.
"""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest

from tests.deploy.helm_chart import PROFILES, by_kind, one, profile_args

KUBERNETES = ("1.27.0", "1.30.0", "1.35.0")
DATA = Path(__file__).parent / "data"
ALL_KUBERNETES = tuple(f"1.{minor}.0" for minor in range(25, 38))  # what kubernetes-validate has
VALUE_SETS = {
    "defaults": [],
    "all-features": ["-f", str(DATA / "all-features.yaml")],
    "all-features-keda": ["-f", str(DATA / "all-features.yaml"), "-f", str(DATA / "keda.yaml")],
    "init-container-build": [
        "--set", "engine.build.mode=initContainer", "--set", "model.pvc.existingClaim=models",
        "--set", "engine.cache.existingClaim=engines", "--set", "rbac.create=false",
        "--set", "serviceAccount.create=false", "--set", "service.headless.enabled=false",
        "--set", "podDisruptionBudget.enabled=false",
    ],
}  # fmt: skip
NOT_IN_KUBERNETES = {"ServiceMonitor", "InferencePool", "ScaledObject"}  # CRDs: own tests


def validation_errors(objects, version: str) -> list[str]:
    """One line per object that does not validate against `version` (empty when all do)."""
    errors = []
    for obj in objects:
        if obj["kind"] in NOT_IN_KUBERNETES:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.absolute_path)
            errors.append(f"{obj['kind']}/{obj['metadata']['name']} {path}: {error.message}")
    return errors


CASES = [
    pytest.param(version, name, values, id=f"{version}-{name}-{values}")
    for version in KUBERNETES
    for name in PROFILES
    for values in VALUE_SETS
    if not (name == "cpu" and values == "init-container-build")  # cpu builds nothing
]


@pytest.mark.parametrize(("version", "name", "values"), CASES)
def test_every_object_validates_strictly(chart, version, name, values):
    objects = chart.objects(*profile_args(name, VALUE_SETS[values]), kube_version=version)
    assert {"Deployment", "ConfigMap", "Service"} <= {o["kind"] for o in objects}
    assert validation_errors(objects, version) == []


@pytest.mark.parametrize("values", ["all-features", "all-features-keda"])
@pytest.mark.parametrize("version", ALL_KUBERNETES)
def test_every_option_on_validates_for_every_kubernetes_from_1_25_to_1_37(chart, version, values):
    objects = chart.objects(*profile_args("h100x2", VALUE_SETS[values]), kube_version=version)
    kinds = {o["kind"] for o in objects}
    assert {"InferencePool", "NetworkPolicy"} <= kinds
    assert ("ScaledObject" in kinds) == (values == "all-features-keda")
    assert validation_errors(objects, version) == []


@pytest.mark.parametrize("name", PROFILES)
def test_renders_for_kubernetes_1_23_validate_against_the_oldest_schema(chart, name):
    objects = chart.objects(*profile_args(name), kube_version="1.23.0")
    assert validation_errors(objects, "1.25.0") == []


def test_the_validation_is_strict_enough_to_catch_a_misplaced_field(chart):
    objects = chart.objects(*profile_args("a100x4"))
    deployment = one(objects, "Deployment")
    server = deployment["spec"]["template"]["spec"]["containers"][0]
    server["startupProbe"]["grpc"]["service_name"] = "readiness"  # the field is `service`
    errors = validation_errors([deployment], "1.30.0")
    assert len(errors) == 1 and "service_name" in errors[0]


def test_the_service_monitor_scrapes_the_metrics_port_of_the_main_service(chart):
    objects = chart.objects(*profile_args("a100x4", ["--set", "serviceMonitor.enabled=true"]))
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s"}
    ]
    selected = [
        service["metadata"]["name"]
        for service in by_kind(objects, "Service")
        if monitor["spec"]["selector"]["matchLabels"].items()
        <= service["metadata"]["labels"].items()
        and any(port["name"] == "metrics" for port in service["spec"]["ports"])
    ]
    assert selected == ["nemotron"]
