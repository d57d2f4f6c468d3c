"""The HTTP API in the chart: its port on the pods, Services and NetworkPolicy, its variables, and
the shutdown sequence (a preStop pause, then the drain) fitting the termination grace period.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from service.server.flags import SERVE_ARGUMENTS, build_serve_parser, parse_serve_config
from tests.deploy.helm_chart import PROFILES, by_kind, one, profile_args, refusal
from tests.deploy.test_chart_features import server_env

ALL_FEATURES = ["-f", str(Path(__file__).parent / "data" / "all-features.yaml")]
SERVE_VARIABLES = {variable for _, variable, _ in SERVE_ARGUMENTS if variable}


def server_container(objects):
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def ports_by_name(ports) -> dict[str, dict]:
    return {port["name"]: port for port in ports}


def services(objects) -> dict[str, dict]:
    return {s["metadata"]["name"]: s["spec"] for s in by_kind(objects, "Service")}


@pytest.mark.parametrize("name", PROFILES)
def test_the_server_listens_for_http_next_to_grpc_and_metrics(chart, name):
    objects = chart.objects(*profile_args(name))
    ports = ports_by_name(server_container(objects)["ports"])
    assert {n: (p["containerPort"], p["protocol"]) for n, p in ports.items()} == {
        "grpc": (50051, "TCP"),
        "http": (8000, "TCP"),
        "metrics": (8002, "TCP"),
    }
    assert server_env(objects)["NEMOTRON_HTTP_PORT"] == "8000"
    assert "NEMOTRON_SERVED_MODEL_NAME" not in server_env(objects)  # the model's own name


def test_the_service_port_and_the_pod_port_are_set_apart(chart):
    objects = chart.objects("--set", "service.httpPort=80", "--set", "server.httpPort=8080")
    assert ports_by_name(server_container(objects)["ports"])["http"]["containerPort"] == 8080
    assert server_env(objects)["NEMOTRON_HTTP_PORT"] == "8080"
    main = ports_by_name(services(objects)["nemotron"]["ports"])["http"]
    assert (main["port"], main["targetPort"], main["appProtocol"]) == (80, "http", "http")
    headless = ports_by_name(services(objects)["nemotron-headless"]["ports"])["http"]
    assert (headless["port"], headless["targetPort"]) == (8080, "http")  # clients dial the pods


def test_with_tls_the_http_port_is_https_on_both_services(chart):
    objects = chart.objects("--set", "tls.enabled=true", "--set", "tls.existingSecret=tls")
    for spec in services(objects).values():
        assert ports_by_name(spec["ports"])["http"]["appProtocol"] == "https"
    env = server_env(objects)
    assert env["NEMOTRON_TLS_CERT_FILE"] == "/etc/nemotron/tls/tls.crt"  # the same certificate


def test_http_port_zero_turns_http_off_everywhere(chart):
    objects = chart.objects("--set", "server.httpPort=0", "--set", "networkPolicy.enabled=true")
    env = server_env(objects)
    assert env["NEMOTRON_HTTP_PORT"] == "off"  # to the server 0 is "any free port"
    assert parse_serve_config(server_container(objects)["args"][1:], env).http_port is None
    assert "http" not in ports_by_name(server_container(objects)["ports"])
    for spec in services(objects).values():
        assert "http" not in ports_by_name(spec["ports"])
    rules = one(objects, "NetworkPolicy")["spec"]["ingress"]
    assert [rule["ports"][0]["port"] for rule in rules] == ["grpc", "metrics"]


def test_the_served_model_name_is_passed_when_set(chart):
    objects = chart.objects("--set", "server.servedModelName=nvidia/nemotron-super")
    assert server_env(objects)["NEMOTRON_SERVED_MODEL_NAME"] == "nvidia/nemotron-super"


def test_the_network_policy_admits_http_from_its_own_peers(chart):
    objects = chart.objects(*profile_args("a100x4", ALL_FEATURES))
    rules = {r["ports"][0]["port"]: r for r in one(objects, "NetworkPolicy")["spec"]["ingress"]}
    assert rules["http"]["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert rules["http"]["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}
    ]
    open_policy = chart.objects("--set", "networkPolicy.enabled=true")
    rules = {r["ports"][0]["port"]: r for r in one(open_policy, "NetworkPolicy")["spec"]["ingress"]}
    assert "from" not in rules["http"]  # empty httpFrom: from anywhere


@pytest.mark.parametrize("kube_version", ["1.23.0", "1.30.0"])
def test_a_pre_stop_sleep_keeps_the_pod_serving_before_sigterm(chart, kube_version):
    server = server_container(chart.objects(kube_version=kube_version))
    # exec, not the native `sleep` action (Kubernetes 1.29+): the chart supports 1.20 on.
    assert server["lifecycle"] == {"preStop": {"exec": {"command": ["sleep", "10"]}}}
    server = server_container(chart.objects(*ALL_FEATURES))
    assert server["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "15"]
    assert "lifecycle" not in server_container(chart.objects("--set", "server.preStopSeconds=0"))


def test_the_grace_period_covers_the_pause_and_the_drain(chart):
    spec = one(chart.objects(*ALL_FEATURES), "Deployment")["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] == 90  # > 15 s pause + 60 s drain
    assert server_env(chart.objects(*ALL_FEATURES))["NEMOTRON_GRACE_S"] == "60"
    chart.template("--set", "server.graceSeconds=49")  # 10 + 49 < 60 renders
    message = refusal(chart, "--set", "server.graceSeconds=50")  # 10 + 50 = 60 does not
    assert message.count("must be below") == 1
    assert (
        "server.preStopSeconds 10 + server.graceSeconds 50 = 60 s must be below "
        "server.terminationGracePeriodSeconds 60, or the kubelet kills in-flight calls" in message
    )
    message = refusal(chart, "--set", "server.preStopSeconds=45")
    assert "server.preStopSeconds 45 + server.graceSeconds 30 = 75 s" in message
    message = refusal(
        chart, "--set-json", "server.graceSeconds=49.5", "--set", "server.preStopSeconds=11"
    )
    assert "= 60.5 s must be below server.terminationGracePeriodSeconds 60" in message


def test_the_grpc_http_and_metrics_ports_must_differ(chart):
    message = refusal(chart, "--set", "server.httpPort=8002")
    assert "server.httpPort and server.metricsPort are both 8002" in message
    message = refusal(chart, "--set", "server.httpPort=50051")
    assert "server.httpPort and server.port are both 50051" in message


def test_notes_say_how_to_reach_the_http_api(chart):
    def notes(*args: str) -> str:
        result = chart.run(
            "install", "nemotron", str(chart.chart), "--dry-run=client", "--namespace",
            "inference", *args,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout.split("NOTES:", 1)[1]

    plain = notes()
    assert "http://nemotron.inference.svc:8000/v1" in plain
    assert "curl http://localhost:8000/v1/models" in plain
    secure = notes("--set", "tls.enabled=true", "--set", "tls.existingSecret=tls",
                   "--set", "auth.apiKeys.existingSecret=keys")  # fmt: skip
    assert (
        "curl --cacert ca.crt --connect-to nemotron.inference.svc:8000:localhost:8000 -H "
        '"Authorization: Bearer $KEY" https://nemotron.inference.svc:8000/v1/models' in secure
    )
    assert "HTTP API: off (server.httpPort=0)" in notes("--set", "server.httpPort=0")


def test_nemotron_serve_reads_the_http_variables_the_chart_sets(chart):
    objects = chart.objects(*profile_args("cpu", ALL_FEATURES))
    assert {"NEMOTRON_HTTP_PORT", "NEMOTRON_SERVED_MODEL_NAME"} <= SERVE_VARIABLES
    argv, env = server_container(objects)["args"][1:], server_env(objects)
    parse_serve_config(argv, env)  # exit 2 on a value the server refuses
    args = build_serve_parser(env).parse_args(argv)  # --http-port, --served-model-name
    assert args.http_port == 8000
    assert args.served_model_name == ("nvidia/llama-3.3-nemotron-super-49b-v1",)


def test_the_kserve_names_and_sampling_defaults_reach_the_server(chart):
    objects = chart.objects(
        "--set", "server.tritonModelNames=ensemble",
        "--set", "server.samplingDefaults=none",
    )  # fmt: skip
    env = server_env(objects)
    assert {"NEMOTRON_TRITON_MODEL_NAMES", "NEMOTRON_SAMPLING_DEFAULTS"} <= SERVE_VARIABLES
    config = parse_serve_config(server_container(objects)["args"][1:], env)
    assert config.triton_model_names == ("ensemble",)
    assert config.sampling_defaults == "none"
    defaults = parse_serve_config(
        server_container(chart.objects())["args"][1:], server_env(chart.objects())
    )
    assert defaults.triton_model_names == ("ensemble", "tensorrt_llm_bls")
    assert defaults.sampling_defaults == "model"
    assert "samplingDefaults" in refusal(chart, "--set", "server.samplingDefaults=random")
