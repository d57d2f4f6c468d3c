"""The chart's other promises: commands our CLIs accept, security, Services, scaling, secrets, OTEL.

Rendered commands and environment are parsed with the real argument parsers of nemotron-serve,
nemotron-build, nemotron-healthcheck and nemotron-chat, so a flag the chart invents fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_build.cli import build_parser as build_cli_parser
from service.client.chat_cli import build_parser as chat_parser
from service.client.healthcheck import build_parser as healthcheck_parser
from service.server.flags import SERVE_ARGUMENTS, parse_serve_config
from tests.deploy.helm_chart import GPU_PROFILES, PROFILES, by_kind, one, profile_args

ALL_FEATURES = ["-f", str(Path(__file__).parent / "data" / "all-features.yaml")]
WORKLOADS = ("Deployment", "Job")
PARSERS = {
    "nemotron-build": build_cli_parser,
    "nemotron-healthcheck": healthcheck_parser,
    "nemotron-chat": chat_parser,
}


def pod_specs(objects):
    """Every pod spec: the Deployment's, the build Job's and the test Pod's."""
    specs = [o["spec"]["template"]["spec"] for o in objects if o["kind"] in WORKLOADS]
    return specs + [o["spec"] for o in by_kind(objects, "Pod")]


def containers(objects):
    for spec in pod_specs(objects):
        yield from spec.get("initContainers", [])
        yield from spec["containers"]


def server_env(objects) -> dict[str, str]:
    """The server's environment: the ConfigMap plus the container's literal values."""
    deployment = one(objects, "Deployment")
    server = deployment["spec"]["template"]["spec"]["containers"][0]
    env = dict(one(objects, "ConfigMap")["data"])
    env.update({e["name"]: e["value"] for e in server.get("env", []) if "value" in e})
    return env


@pytest.mark.parametrize("values", [[], ALL_FEATURES], ids=["defaults", "all-features"])
@pytest.mark.parametrize("name", PROFILES)
def test_every_command_is_accepted_by_our_own_parsers(chart, name, values):
    objects = chart.objects(*profile_args(name, values))
    checked = set()
    for container in containers(objects):
        command = container.get("command", [])
        program = command[0] if command else None
        if program in PARSERS:
            PARSERS[program]().parse_args(command[1:])  # SystemExit(2) on an unknown flag
            checked.add(program)
    assert {"nemotron-healthcheck", "nemotron-chat"} <= checked
    if name in GPU_PROFILES:
        assert "nemotron-build" in checked


@pytest.mark.parametrize("values", [[], ALL_FEATURES], ids=["defaults", "all-features"])
@pytest.mark.parametrize("name", PROFILES)
def test_the_server_environment_is_what_nemotron_serve_reads(chart, name, values):
    objects = chart.objects(*profile_args(name, values))
    env = server_env(objects)
    known = {variable for _, variable, _ in SERVE_ARGUMENTS if variable}
    known |= {"NEMOTRON_PROFILE", "NEMOTRON_PROFILES"}  # read by the profile selection
    assert {key for key in env if key.startswith("NEMOTRON_")} <= known
    server = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert server["command"] == ["nemotron-serve"] and server["args"][0] == "serve"
    config = parse_serve_config(server["args"][1:], env)  # exit 2 on a bad value
    assert config.port == 50051 and config.metrics_port == 8002
    assert config.startup.cache_dir == Path("/var/cache/nemotron")
    assert config.startup.backend == ("torch" if name == "cpu" else "tensorrt-llm")
    if values:
        assert config.tls is not None and config.tls.client_ca_file is not None
        assert config.api_keys_file == Path("/etc/nemotron/api-keys/api-keys")
        assert config.keepalive_time_s == 20 and config.max_connection_age_s == 300
        assert config.kv_cache_memory == 3 * 2**30
    else:
        assert config.kv_cache_memory is None  # sized from the pod's memory limit


@pytest.mark.parametrize("name", PROFILES)
def test_every_container_runs_non_root_read_only_without_capabilities(chart, name):
    objects = chart.objects(*profile_args(name, ALL_FEATURES))
    for spec in pod_specs(objects):
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["automountServiceAccountToken"] in (True, False)
    for container in containers(objects):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts or container["name"] == "seed-cache", container["name"]


def test_the_service_account_token_is_mounted_only_for_profile_detection(chart):
    spec = one(chart.objects(*profile_args("a100x4")), "Deployment")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    objects = chart.objects(*profile_args("a100x4", ["--set", "server.detectProfile=true"]))
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is True
    assert "NEMOTRON_PROFILE" not in one(objects, "ConfigMap")["data"]
    server = spec["containers"][0]
    node_name = next(e for e in server["env"] if e["name"] == "NODE_NAME")
    assert node_name["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}


def test_the_cluster_role_only_reads_nodes_and_can_be_switched_off(chart):
    objects = chart.objects()
    role = one(objects, "ClusterRole")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    binding = one(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "nemotron", "namespace": "inference"}
    ]
    off = chart.objects("--set", "rbac.create=false")
    assert not by_kind(off, "ClusterRole") and not by_kind(off, "ClusterRoleBinding")


def test_services_offer_grpc_http_and_metrics_and_a_headless_one_for_client_balancing(chart):
    services = {s["metadata"]["name"]: s["spec"] for s in by_kind(chart.objects(), "Service")}
    main, headless = services["nemotron"], services["nemotron-headless"]
    assert main["type"] == "ClusterIP"
    assert {(p["name"], p["port"], p["targetPort"]) for p in main["ports"]} == {
        ("grpc", 50051, "grpc"),
        ("http", 8000, "http"),
        ("metrics", 8002, "metrics"),
    }
    assert headless["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in headless["ports"]] == [("grpc", 50051), ("http", 8000)]
    assert main["selector"] == headless["selector"]


def test_autoscaling_scales_on_waiting_requests_and_leaves_replicas_to_the_hpa(chart):
    objects = chart.objects(*profile_args("a100x4", ALL_FEATURES))
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "nemotron",
    }
    assert hpa["spec"]["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "nemotron_requests_waiting"},
                "target": {"type": "AverageValue", "averageValue": "4"},
            },
        }
    ]
    assert "replicas" not in one(objects, "Deployment")["spec"]
    assert one(chart.objects(), "Deployment")["spec"]["replicas"] == 1
    assert not by_kind(chart.objects(), "HorizontalPodAutoscaler")


def test_the_disruption_budget_and_network_policy_select_the_server_pods(chart):
    objects = chart.objects(*profile_args("h100x2", ALL_FEATURES))
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = one(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    grpc_rule, http_rule, metrics_rule = policy["spec"]["ingress"]
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    test_labels = one(objects, "Pod")["metadata"]["labels"]
    assert any(
        "podSelector" in peer and peer["podSelector"]["matchLabels"].items() <= test_labels.items()
        for peer in grpc_rule["from"]
    ), "the helm test pod must be allowed in"
    assert http_rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert metrics_rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]


def test_api_keys_and_tls_come_from_secrets_and_probes_speak_tls(chart):
    objects = chart.objects(*profile_args("a100x4", ALL_FEATURES))
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets == {
        "api-keys": "nemotron-api-keys",
        "tls": "nemotron-tls",
        "client-tls": "nemotron-probe-tls",
    }
    server = spec["containers"][0]
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert all(mounts[name]["readOnly"] for name in secrets)
    assert all("subPath" not in mounts[name] for name in secrets)  # rotation reaches the pod
    readiness = server["readinessProbe"]["exec"]["command"]  # the kubelet's gRPC probe has no TLS
    assert readiness[readiness.index("--tls-ca") + 1] == "/etc/nemotron/tls/ca.crt"
    assert readiness[readiness.index("--tls-server-name") + 1] == "nemotron.inference.svc"
    assert "--tls-cert" in readiness and "--tls-key" in readiness
    test_pod = one(objects, "Pod")
    ca_only = next(v for v in test_pod["spec"]["volumes"] if v["name"] == "tls")
    assert ca_only["secret"]["items"] == [{"key": "ca.crt", "path": "ca.crt"}]
    chat = test_pod["spec"]["containers"][0]
    key = next(e for e in chat["env"] if e["name"] == "NEMOTRON_API_KEY")
    assert key["valueFrom"]["secretKeyRef"] == {"name": "nemotron-test-key", "key": "api-key"}


def test_opentelemetry_values_become_otel_variables(chart):
    objects = chart.objects(*profile_args("cpu", ALL_FEATURES))
    env = one(objects, "ConfigMap")["data"]
    assert env["OTEL_TRACES_EXPORTER"] == "otlp"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert env["OTEL_SERVICE_NAME"] == "nemotron-serve"
    assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
    assert env["OTEL_RESOURCE_ATTRIBUTES"] == (
        "deployment.environment=prod,k8s.namespace.name=inference"
    )
    server = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    headers = next(e for e in server["env"] if e["name"] == "OTEL_EXPORTER_OTLP_HEADERS")
    assert headers["valueFrom"]["secretKeyRef"] == {"name": "otel-headers", "key": "headers"}
    assert not [key for key in one(chart.objects(), "ConfigMap")["data"] if key.startswith("OTEL")]


def test_a_config_change_changes_the_checksum_that_rolls_the_pods(chart):
    def checksum(*args):
        deployment = one(chart.objects(*args), "Deployment")
        return deployment["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum() == checksum()
    assert checksum() != checksum("--set", "server.logLevel=debug")


def test_helm_test_checks_readiness_then_completes_a_short_chat(chart):
    pod = one(chart.objects(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    readiness = pod["spec"]["initContainers"][0]["command"]
    assert readiness[:5] == [
        "nemotron-healthcheck",
        "--address",
        "nemotron:50051",
        "--service",
        "readiness",
    ]
    chat = pod["spec"]["containers"][0]["command"]
    assert chat[:5] == [
        "nemotron-chat",
        "--address",
        "nemotron:50051",
        "--prompt",
        "What is the capital of France?",
    ]
    assert pod["spec"]["restartPolicy"] == "Never"


@pytest.mark.parametrize("name", PROFILES)
def test_every_object_carries_the_standard_labels(chart, name):
    for obj in chart.objects(*profile_args(name, ALL_FEATURES)):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "nemotron"
        assert labels["app.kubernetes.io/instance"] == "nemotron"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["team"] == "inference"  # commonLabels


def test_notes_say_how_to_reach_the_service_and_check_health(chart):
    result = chart.run(
        "install", "nemotron", str(chart.chart), "--dry-run=client", "--namespace", "inference",
        "--set", "profile=a100x4",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "nemotron.inference.svc:50051" in notes
    assert "dns:///nemotron-headless.inference.svc:50051" in notes
    assert "--service readiness" in notes and "helm test nemotron" in notes
    assert "engine-build" in notes
