"""A real `helm install`, `upgrade` and `uninstall` against a real kube-apiserver on loopback.

Opt-in (`make test-apiserver`, or NEMOTRON_APISERVER_TESTS=1): the first run installs
etcd-server and Go from Debian and builds kube-apiserver v1.20 from Debian's source package
(tools/kube_apiserver.sh, a few minutes, cached afterwards). The apiserver stores and validates
what helm sends (names, port ranges, required fields, which API versions exist) but there is no
kubelet, scheduler or controller manager: no Pod runs, no PVC binds, nothing is waited for. 1.20
knows no gRPC probes, policy/v1 or autoscaling/v2, so this also proves the chart's `.Capabilities`
fallbacks (exec probes, policy/v1beta1, autoscaling/v2beta2) against a server that really lacks
them.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.helm_chart import REPO_ROOT, HelmChart

pytestmark = [
    pytest.mark.apiserver,
    pytest.mark.skipif(
        os.environ.get("NEMOTRON_APISERVER_TESTS") != "1",
        reason="needs a real kube-apiserver: `make test-apiserver` (NEMOTRON_APISERVER_TESTS=1)",
    ),
]

SCRIPT = REPO_ROOT / "tools" / "kube_apiserver.sh"
RELEASE = "nemotron"
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding", "Namespace"}
PLURALS = {"NetworkPolicy": "networkpolicies"}


@dataclass(frozen=True)
class Apiserver:
    """The loopback kube-apiserver: its kubeconfig and a tiny REST client."""

    kubeconfig: Path

    def _config(self) -> tuple[str, str, str]:
        config = yaml.safe_load(self.kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        token = config["users"][0]["user"]["token"]
        return cluster["server"], cluster["certificate-authority"], token

    def get(self, path: str) -> tuple[int, dict[str, Any]]:
        """GET path; (status, body) with 404 and friends returned, not raised."""
        server, ca, token = self._config()
        headers = {"Authorization": f"Bearer {token}"}
        request = urllib.request.Request(server + path, headers=headers)
        context = ssl.create_default_context(cafile=ca)
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def object_path(self, obj: dict[str, Any], namespace: str) -> str:
        """The REST path of a manifest object."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        plural = PLURALS.get(kind, kind.lower() + "s")
        name = obj["metadata"]["name"]
        if kind in CLUSTER_SCOPED:
            return f"{prefix}/{plural}/{name}"
        return f"{prefix}/namespaces/{namespace}/{plural}/{name}"


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory) -> Iterator[Apiserver]:
    """etcd + kube-apiserver v1.20 on loopback for the session (built once, cached)."""
    run_dir = tmp_path_factory.mktemp("kube-apiserver")
    started = subprocess.run(
        [str(SCRIPT), "start", str(run_dir)], capture_output=True, text=True, timeout=1800
    )
    if started.returncode != 0:
        pytest.fail(f"kube-apiserver did not start:\n{started.stderr[-4000:]}")
    try:
        yield Apiserver(kubeconfig=run_dir / "kubeconfig")
    finally:
        subprocess.run([str(SCRIPT), "stop", str(run_dir)], timeout=60)


def helm(chart: HelmChart, apiserver: Apiserver, *args: str) -> str:
    """helm ARGS against the apiserver; its stdout (fails the test with stderr on error)."""
    result = chart.run(*args, "--kubeconfig", str(apiserver.kubeconfig))
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stderr}"
    return result.stdout


def manifest(chart: HelmChart, apiserver: Apiserver, namespace: str) -> list[dict[str, Any]]:
    """The objects of the release's current revision, as helm recorded them."""
    text = helm(chart, apiserver, "get", "manifest", RELEASE, "--namespace", namespace)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def test_the_server_is_an_old_one(apiserver):
    """What the fallbacks are for: 1.20 serves none of policy/v1, autoscaling/v2."""
    status, version = apiserver.get("/version")
    assert status == 200 and (version["major"], version["minor"]) == ("1", "20")
    assert apiserver.get("/apis/policy/v1")[0] == 404
    assert apiserver.get("/apis/autoscaling/v2")[0] == 404
    assert apiserver.get("/apis/policy/v1beta1")[0] == 200


PROFILES = {
    # profile: extra values at install (PDB and HPA on, to exercise their fallback API versions)
    "cpu": ("--set", "podDisruptionBudget.enabled=true", "--set", "networkPolicy.enabled=true"),
    "a100x4": ("--set", "autoscaling.enabled=true"),
}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_install_upgrade_uninstall(any_helm_chart, apiserver, profile):
    """Helm 4 (server-side apply) and helm 3 (client-side), each in its own namespace."""
    chart = any_helm_chart
    helm_major = chart.helm.parent.name.removeprefix("helm-").split(".")[0]  # helm-4.3.1/helm
    namespace = f"apiserver-{profile}-helm{helm_major}"
    common = ("--namespace", namespace)
    helm(
        chart,
        apiserver,
        "install",
        RELEASE,
        str(chart.chart),
        *common,
        "--create-namespace",
        "--set",
        f"profile={profile}",
        *PROFILES[profile],
    )

    # Every object helm sent is stored by the apiserver.
    objects = manifest(chart, apiserver, namespace)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "ConfigMap", "Service", "ServiceAccount"} <= kinds
    stored = {}
    for obj in objects:
        status, body = apiserver.get(apiserver.object_path(obj, namespace))
        assert status == 200, f"{obj['kind']}/{obj['metadata']['name']} missing: {body}"
        stored[obj["kind"], obj["metadata"]["name"]] = body

    # The fallbacks the 1.20 server needs, chosen from its real discovery.
    by_kind = {o["kind"]: o for o in objects}
    if "PodDisruptionBudget" in by_kind:
        assert by_kind["PodDisruptionBudget"]["apiVersion"] == "policy/v1beta1"
    if "HorizontalPodAutoscaler" in by_kind:
        assert by_kind["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2beta2"
    assert ("HorizontalPodAutoscaler" in by_kind) == (profile == "a100x4")
    (deployment,) = [v for (k, _), v in stored.items() if k == "Deployment"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert "exec" in container[probe] and "grpc" not in container[probe]
    # The server, not the chart, filled these in: the objects went through real defaulting.
    services = [v for (k, _), v in stored.items() if k == "Service"]
    assert any(s["spec"].get("clusterIP", "None") not in ("", "None") for s in services)
    assert deployment["spec"]["strategy"]["type"]

    # upgrade: a value change reaches the stored objects.
    configmap = next(v for (k, _), v in stored.items() if k == "ConfigMap")
    assert configmap["data"]["NEMOTRON_LOG_LEVEL"] != "debug"
    upgrade = ["--set", "server.logLevel=debug"]
    if profile == "cpu":
        upgrade += ["--set", "replicaCount=2"]
    helm(
        chart, apiserver, "upgrade", RELEASE, str(chart.chart), *common, "--reuse-values", *upgrade
    )
    status, configmap = apiserver.get(apiserver.object_path(by_kind["ConfigMap"], namespace))
    assert status == 200 and configmap["data"]["NEMOTRON_LOG_LEVEL"] == "debug"
    status, deployment = apiserver.get(apiserver.object_path(by_kind["Deployment"], namespace))
    assert status == 200
    if profile == "cpu":
        assert deployment["spec"]["replicas"] == 2
    else:  # the HPA owns the replica count: the chart leaves spec.replicas out
        assert deployment["spec"]["replicas"] == 1  # the server's default
    history = json.loads(helm(chart, apiserver, "history", RELEASE, *common, "-o", "json"))
    assert [h["revision"] for h in history] == [1, 2]

    # uninstall: everything is gone but the PVCs the chart marks helm.sh/resource-policy: keep.
    upgraded = manifest(chart, apiserver, namespace)
    helm(chart, apiserver, "uninstall", RELEASE, *common)
    for obj in upgraded:
        keep = obj["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep"
        status, _ = apiserver.get(apiserver.object_path(obj, namespace))
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        assert status == (200 if keep else 404), f"{name}: {status} after uninstall"
    kept = [o["kind"] for o in upgraded if o["kind"] == "PersistentVolumeClaim"]
    assert bool(kept) == (profile == "a100x4")
    listed = helm(chart, apiserver, "list", *common, "-q")
    assert RELEASE not in listed.split()
