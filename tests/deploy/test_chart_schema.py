"""helm lint --strict for every profile, and values the schema (or the chart) refuses, saying why.

Lint and the refusals run on helm 4.3.1 and on helm 3.17.2, whose schema validators differ
(Helm 3.18 changed library), so the messages are checked for what both say.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.helm_chart import PROFILES, profile_args, refusal

ALL_FEATURES = Path(__file__).parent / "data" / "all-features.yaml"


@pytest.mark.parametrize("name", PROFILES)
def test_lint_strict_passes_for_every_profile(any_helm_chart, name):
    result = any_helm_chart.lint(*profile_args(name))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("name", PROFILES)
def test_lint_strict_passes_with_every_option_on(any_helm_chart, name):
    result = any_helm_chart.lint(*profile_args(name, ["-f", str(ALL_FEATURES)]))
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_strict_passes_with_defaults_and_for_kubernetes_1_23(chart):
    assert chart.lint().returncode == 0
    result = chart.lint("--kube-version", "1.23.0", "--set", "profile=a100x4")
    assert result.returncode == 0, result.stdout + result.stderr


def test_an_unknown_profile_is_refused_with_the_valid_ones(any_helm_chart):
    message = refusal(any_helm_chart, "--set", "profile=h200x3")
    assert "profile" in message
    for name in PROFILES:
        assert name in message


def test_a_negative_replica_count_is_refused_naming_the_minimum(any_helm_chart):
    message = refusal(any_helm_chart, "--set", "replicaCount=-1")
    assert "replicaCount" in message and "0" in message
    assert "minimum" in message or "greater than or equal to 0" in message


def test_an_unknown_top_level_key_is_refused_by_name(any_helm_chart):
    message = refusal(any_helm_chart, "--set", "replicas=2")  # a typo of replicaCount
    assert "replicas" in message
    assert "additional propert" in message.lower()


def test_a_wrong_type_is_refused_with_the_expected_one(any_helm_chart):
    message = refusal(any_helm_chart, "--set-string", "replicaCount=two")
    assert "replicaCount" in message and "integer" in message


def test_a_kv_cache_size_that_is_not_a_quantity_is_refused(any_helm_chart):
    message = refusal(any_helm_chart, "--set", "server.kvCacheMemory=lots")
    assert "kvCacheMemory" in message and "pattern" in message.lower()


IMPOSSIBLE = [
    pytest.param(
        "profile=a100x4,model.source=embedded", "model", ["pvc", "download"], id="embedded-gpu"
    ),
    pytest.param("profile=cpu,model.source=download", "model", ["embedded"], id="download-cpu"),
    pytest.param("profile=a100x8,engine.precision=fp8", "engine", ["bf16"], id="fp8-a100"),
    pytest.param("profile=h100x2,engine.precision=fp32", "engine", ["fp8", "bf16"], id="fp32-h100"),
    pytest.param("tls.mutual=true", "tls", ["probeClientSecret"], id="mtls-without-tls"),
    pytest.param("tls.enabled=true", "tls", ["existingSecret"], id="tls-without-secret"),
    pytest.param(
        "tls.enabled=true,tls.existingSecret=t,probes.mode=grpc", "probes", ["exec"], id="grpc-tls"
    ),
    pytest.param("profile=h100x2,model.source=pvc", "existingClaim", [], id="pvc-without-claim"),
    pytest.param("otel.enabled=true", "otel", ["endpoint"], id="otel-without-endpoint"),
    pytest.param("keda.enabled=true", "keda", ["serverAddress"], id="keda-without-prometheus"),
    pytest.param(
        "inferencePool.endpointPicker.failureMode=FailClosed",
        "failureMode",
        ["FailOpen", "FailClose"],
        id="failure-mode-typo",
    ),
    pytest.param("server.httpPort=70000", "httpPort", [], id="http-port-range"),
]


@pytest.mark.parametrize(("values", "field", "allowed"), IMPOSSIBLE)
def test_impossible_combinations_are_refused_naming_the_field(
    any_helm_chart, values, field, allowed
):
    message = refusal(any_helm_chart, "--set", values)
    assert field in message
    for word in allowed:
        assert word in message


def test_combinations_the_schema_cannot_compare_fail_with_a_sentence(chart):
    message = refusal(
        chart, "--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=5"
    )
    assert "autoscaling.minReplicas 5 is above autoscaling.maxReplicas 4" in message
    message = refusal(chart, "--set", "server.graceSeconds=90")
    assert (
        "server.preStopSeconds 10 + server.graceSeconds 90 = 100 s must be below "
        "server.terminationGracePeriodSeconds 60" in message
    )
