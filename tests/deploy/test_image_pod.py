"""The cpu image run with the settings of the chart's cpu pod (k8s/cpu.yaml, rendered from it).

Opt-in with tests/deploy/test_image.py (`make test-image`). Everything is read from the rendered
manifest: the seed-cache init container's command, memory limit and mounts; the server's command,
arguments, ConfigMap and env variables, mounts, user, groups and memory limit. As in the pod:

- the root file system is read-only; the cache volume and /tmp are the only writable places
  (host directories owned by the fsGroup, as the kubelet prepares an emptyDir);
- each container has its memory limit as a real memory cgroup;
- the server has a network namespace of its own with loopback only: nothing can be fetched
  at run time, and clients (the host's nemotron-healthcheck and nemotron-chat) enter it;
- no capabilities, no_new_privs, user 10001, group 10001, fsGroup 10001.

Not as in the pod: there is no seccomp profile, the probes are run by the test and not by a
kubelet, and the CPU limit is only passed as NEMOTRON_COMPUTE_THREADS (the chart's
resourceFieldRef), not enforced as a CFS quota.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.image_container import (
    IMAGE_TESTS,
    QUESTION,
    RUNTIME_UID,
    Container,
    ContainerServer,
    RunAs,
    Sandbox,
    built_image,
)
from tools.render_k8s import K8S_DIR

pytestmark = IMAGE_TESTS

MANIFEST = K8S_DIR / "cpu.yaml"
NODE_NAME = "image-test-node"
QUANTITY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6,
                  "G": 10**9, "m": 10**-3, "": 1}  # fmt: skip


def quantity(text: str) -> float:
    """A Kubernetes quantity (`4Gi`, `256Mi`, `100m`, `2`) as a number."""
    number = text.rstrip("KMGTikm")
    return float(number) * QUANTITY_UNITS[text[len(number) :]]


@dataclass(frozen=True)
class PodContainer:
    """One container of the pod spec, as the image run needs it."""

    argv: list[str]
    env: dict[str, str]
    mounts: dict[str, str]  # mount path -> volume name
    memory_limit: int
    read_only_root: bool
    run_as: RunAs


def pod_containers(manifest: Path) -> dict[str, PodContainer]:
    """The Deployment's containers and init containers by name, env resolved as the kubelet."""
    objects = [doc for doc in yaml.safe_load_all(manifest.read_text()) if doc]
    config_maps = {o["metadata"]["name"]: o["data"] for o in objects if o["kind"] == "ConfigMap"}
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    security = pod["securityContext"]
    found = {}
    for spec in [*pod.get("initContainers", []), *pod["containers"]]:
        context = {**security, **spec.get("securityContext", {})}
        env: dict[str, str] = {}
        for source in spec.get("envFrom", []):
            env |= config_maps[source["configMapRef"]["name"]]
        env |= {item["name"]: _env_value(item, spec) for item in spec.get("env", [])}
        found[spec["name"]] = PodContainer(
            argv=[*spec.get("command", []), *spec.get("args", [])],
            env=env,
            mounts={m["mountPath"]: m["name"] for m in spec.get("volumeMounts", [])},
            memory_limit=int(quantity(spec["resources"]["limits"]["memory"])),
            read_only_root=context.get("readOnlyRootFilesystem", False),
            run_as=RunAs(context["runAsUser"], context["runAsGroup"], (security["fsGroup"],)),
        )
    return found


def _env_value(item: dict[str, Any], spec: dict[str, Any]) -> str:
    """An env entry's value: literal, the node's name, or a resource limit (rounded up)."""
    if "value" in item:
        return str(item["value"])
    source = item["valueFrom"]
    if source.get("fieldRef", {}).get("fieldPath") == "spec.nodeName":
        return NODE_NAME
    resource = source["resourceFieldRef"]
    limit = quantity(str(spec["resources"]["limits"][resource["resource"].split(".", 1)[1]]))
    return str(math.ceil(limit / quantity(str(resource.get("divisor", "1")))))


@pytest.fixture(scope="module")
def pod() -> dict[str, PodContainer]:
    return pod_containers(MANIFEST)


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    container = Container.create(built_image("cpu"))
    yield container
    container.remove()


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> dict[str, Path]:
    """The pod's emptyDir volumes: host directories group-owned by the fsGroup, setgid, 2777."""
    made = {}
    for name in ("cache", "tmp"):
        directory = tmp_path_factory.mktemp(f"volume-{name}")
        os.chown(directory, 0, RUNTIME_UID)
        directory.chmod(0o2777)
        made[name] = directory
    return made


def sandbox(spec: PodContainer, volumes: dict[str, Path], private_network: bool) -> Sandbox:
    return Sandbox(
        env=spec.env,
        binds={path: volumes[name] for path, name in spec.mounts.items()},
        read_only_root=spec.read_only_root,
        run_as=spec.run_as,
        memory_limit=spec.memory_limit,
        private_network=private_network,
    )


@pytest.fixture(scope="module")
def seeded(pod, container, volumes) -> Path:
    """The seed-cache init container, run to its end; the cache volume it filled."""
    seed = pod["seed-cache"]
    done = container.run(seed.argv, sandbox(seed, volumes, private_network=True))
    assert done.returncode == 0, done.stdout + done.stderr
    return volumes["cache"]


@pytest.fixture(scope="module")
def served(pod, container, volumes, seeded, tmp_path_factory) -> Iterator[ContainerServer]:
    server = pod["server"]
    port = server.env["NEMOTRON_PORT"]  # the pod's own network: the chart's ports as they are
    log_path = tmp_path_factory.mktemp("image-pod") / "server.log"
    with container.serve(server.argv, sandbox(server, volumes, private_network=True), log_path,
                         f"127.0.0.1:{port}") as running:  # fmt: skip
        yield running


def test_the_manifest_asks_for_what_this_run_applies(pod):
    server = pod["server"]
    assert server.read_only_root and pod["seed-cache"].read_only_root
    assert set(server.mounts.values()) == {"cache", "tmp"} and "/tmp" in server.mounts
    assert server.env["NEMOTRON_CACHE_DIR"] in server.mounts
    assert server.memory_limit == 4 * 2**30
    assert server.run_as == RunAs(RUNTIME_UID, RUNTIME_UID, (RUNTIME_UID,))


def test_the_seed_init_container_copies_the_baked_cache_under_its_memory_limit(seeded, pod):
    assert pod["seed-cache"].memory_limit == 256 * 2**20
    manifest = seeded / "engines" / "manifest.json"
    assert manifest.is_file() and manifest.stat().st_uid == RUNTIME_UID
    assert any((seeded / "imports").iterdir()) and any((seeded / "downloads").iterdir())


def test_the_server_becomes_ready_on_the_seeded_engine_without_network_or_build(served, pod):
    served.wait_ready()
    events = [line["event"] for line in served.log_lines()]
    assert served.wait_for_log("engine_selected")["built"] is False
    assert "engine_built" not in events and "engine_missing_building" not in events
    cache = pod["server"].env["NEMOTRON_CACHE_DIR"]
    assert served.wait_for_log("engine_started")["engine"].startswith(f"{cache}/engines/")


def test_the_kv_cache_is_sized_inside_the_4_gib_limit(served):
    served.wait_ready()
    sized = served.wait_for_log("kv_cache_sized")
    assert "cgroup limit" in sized["source"] and "(4.00 GiB," in sized["source"], sized
    assert sized["bytes"] < 4 * 2**30


def test_the_server_runs_as_10001_without_capabilities(served):
    served.wait_ready()
    ids = served.ids()
    assert set(ids["Uid"]) == {RUNTIME_UID} and set(ids["Gid"]) == {RUNTIME_UID}
    assert ids["Groups"] == [RUNTIME_UID]
    status = Path(f"/proc/{served.server_pid()}/status").read_text()
    effective = next(line for line in status.splitlines() if line.startswith("CapEff:"))
    assert int(effective.split()[1], 16) == 0
    assert "NoNewPrivs:\t1" in status


def test_a_chat_says_paris(served):
    served.wait_ready()
    done = served.chat(QUESTION)
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_the_exec_probe_passes_inside_the_pod(served, pod, volumes):
    """What the chart runs where the cluster has no gRPC probes: its default address."""
    served.wait_ready()
    done = served.exec_in_container(
        ["nemotron-healthcheck", "--service", "readiness"],
        sandbox(pod["server"], volumes, private_network=False),  # it joins the server's
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_root_file_system_is_read_only_for_the_server(served, pod, volumes):
    served.wait_ready()
    probe = 'touch /opt/nemotron/cache/x; touch /tmp/x && touch "$NEMOTRON_CACHE_DIR/x"'
    done = served.exec_in_container(
        ["sh", "-c", probe], sandbox(pod["server"], volumes, private_network=False)
    )
    assert "Read-only file system" in done.stderr and done.returncode == 0, done.stderr
    assert (volumes["tmp"] / "x").exists() and (volumes["cache"] / "x").exists()


def test_the_decode_step_compiles_with_the_images_compiler_under_the_read_only_root(served):
    """torch.compile's CPU backend writes C++ and builds it with g++ at run time, as 10001."""
    served.wait_ready()
    outcome = served.wait_for_log("decode_compiled", "decode_compile_failed",
                                  "decode_compiled_failed", timeout_s=900)  # fmt: skip
    assert outcome["event"] == "decode_compiled", outcome


def test_sigterm_stops_the_server_with_exit_code_0(served):
    served.wait_ready()
    assert served.terminate() == 0, served.log_text()[-4000:]
    assert served.wait_for_log("server_stopped")["exit_code"] == 0
    assert "Traceback" not in served.log_text()
