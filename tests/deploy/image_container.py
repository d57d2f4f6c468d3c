"""The built image run as a container runtime would run it, with buildah and no daemon.

`buildah run --isolation chroot` runs a command in a container of the image with the image's
user, environment and working directory, in its own mount, PID, IPC and UTS namespaces and on
the host's network. What a runtime (or a pod spec) adds beside that, this module adds around it:

- a memory limit: a memory cgroup made for the run (v1 `memory.limit_in_bytes`, v2
  `memory.max`), which the command enters before buildah starts;
- a network namespace of its own with loopback only (`unshare --net`), so that nothing can be
  fetched at run time; clients on the host reach the server by entering it (`nsenter --net`),
  as the kubelet's probes reach a pod's own address;
- a read-only root file system: `buildah run` has no flag for it, and a container root mounted
  read-only beforehand makes buildah 1.28 crash while it cleans up. So the command starts as
  root with CAP_SYS_ADMIN, remounts `/` read-only inside its own mount namespace (the host's
  view stays writable) and drops with `setpriv` to the pod's user and groups, no capabilities
  and no_new_privs before the entrypoint runs;
- SIGTERM: `buildah run` does not forward signals (a SIGTERM to it kills the command), so the
  entrypoint's own process gets it, as a runtime signals a container's first process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.helm_chart import REPO_ROOT
from tests.service.server_process import json_log_lines, wait_for_log_lines, wait_until

BUILDAH_RUN = ("buildah", "run", "--isolation", "chroot", "--network", "host")
CGROUP_ROOT = Path("/sys/fs/cgroup")
HOST_SCRIPTS = Path(sys.executable).parent  # the venv's nemotron-chat and nemotron-healthcheck
SCRIPT = REPO_ROOT / "tools" / "container_image.sh"
RUNTIME_UID = 10001  # the Dockerfile's UID
QUESTION = "What is the capital of France?"  # greedy answer: "The capital of France is Paris."
# The marks of every image test: opt-in, after `make test-image` has built the images.
IMAGE_TESTS = [
    pytest.mark.image,
    pytest.mark.skipif(
        os.environ.get("NEMOTRON_IMAGE_TESTS") != "1",
        reason="needs the built image: `make test-image` (NEMOTRON_IMAGE_TESTS=1)",
    ),
]


def built_image(target: str) -> str:
    """The name `tools/container_image.sh build TARGET` tagged; fails if it is not built."""
    if os.geteuid() != 0:
        pytest.fail("buildah, cgroups and namespaces here need root")
    name = subprocess.run(
        [str(SCRIPT), "name", target], capture_output=True, text=True, check=True
    ).stdout.strip()
    done = subprocess.run(["buildah", "inspect", "--type", "image", name], capture_output=True)
    if done.returncode != 0:
        pytest.fail(f"{name} is not built: run `tools/container_image.sh build {target}`")
    return name


@dataclass(frozen=True)
class RunAs:
    """A pod's user: runAsUser, runAsGroup and fsGroup (a supplementary group)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class Sandbox:
    """How a command runs: what `docker run` flags or a pod spec would say."""

    env: Mapping[str, str] = field(default_factory=dict)
    binds: Mapping[str, Path] = field(default_factory=dict)  # container path -> host directory
    read_only_root: bool = False
    run_as: RunAs | None = None  # None: the image's USER (needed with read_only_root)
    memory_limit: int | None = None
    private_network: bool = False


def inspect_image(image: str) -> dict[str, Any]:
    """`buildah inspect` of an image in the local store."""
    done = subprocess.run(
        ["buildah", "inspect", "--type", "image", image], capture_output=True, text=True
    )
    assert done.returncode == 0, f"no image {image}: {done.stderr}"
    return json.loads(done.stdout)


@dataclass(frozen=True)
class Container:
    """A buildah working container of an image; each `run` is one command in it."""

    name: str
    image: str

    @classmethod
    def create(cls, image: str, prefix: str = "nemotron-image-test") -> Container:
        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        done = subprocess.run(
            ["buildah", "from", "--pull=never", "--name", name, image],
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return cls(name, image)

    def remove(self) -> None:
        subprocess.run(["buildah", "rm", self.name], capture_output=True, check=False)

    def command(self, argv: Sequence[str], sandbox: Sandbox) -> list[str]:
        """The host command that runs `argv` in this container (the cgroup is entered apart)."""
        flags = [arg for name, value in sandbox.env.items() for arg in ("-e", f"{name}={value}")]
        for target, source in sandbox.binds.items():
            flags += ["--mount", f"type=bind,source={source},destination={target},rw"]
        if sandbox.read_only_root:
            assert sandbox.run_as is not None, "a read-only root needs the pod's user"
            flags += ["--user", "0:0", "--cap-add", "CAP_SYS_ADMIN"]
            argv = [*_read_only_then_drop(sandbox.run_as), *argv]
        elif sandbox.run_as is not None:
            flags += ["--user", f"{sandbox.run_as.uid}:{sandbox.run_as.gid}"]
        command = [*BUILDAH_RUN, *flags, self.name, "--", *argv]
        if sandbox.private_network:
            command = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                       *command]  # fmt: skip
        return command

    def run(
        self, argv: Sequence[str], sandbox: Sandbox = Sandbox(), timeout_s: float = 600
    ) -> subprocess.CompletedProcess:
        """Run `argv` to its end; the completed process, output captured."""
        with memory_cgroup(sandbox.memory_limit) as enter:
            return subprocess.run(
                [*enter, *self.command(argv, sandbox)],
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )

    @contextmanager
    def serve(
        self, argv: Sequence[str], sandbox: Sandbox, log_path: Path, address: str
    ) -> Iterator[ContainerServer]:
        """The server `argv` starts, running until the block ends (then killed if still up)."""
        with memory_cgroup(sandbox.memory_limit) as enter, log_path.open("w") as log:
            process = subprocess.Popen(
                [*enter, *self.command(argv, sandbox)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            server = ContainerServer(self, process, log_path, address, sandbox.private_network)
            try:
                yield server
            finally:
                if process.poll() is None:  # killing buildah run alone would orphan the server
                    for pid in [*reversed(_descendants(process.pid)), process.pid]:
                        with suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    process.wait(timeout=60)


def _read_only_then_drop(run_as: RunAs) -> list[str]:
    """A prefix that remounts / read-only, then runs the rest as `run_as` with nothing more."""
    groups = ",".join(str(g) for g in run_as.groups) or str(run_as.gid)
    return [
        "sh", "-c", 'mount -o remount,bind,ro / && exec "$@"', "sh",
        "setpriv", f"--reuid={run_as.uid}", f"--regid={run_as.gid}", f"--groups={groups}",
        "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
    ]  # fmt: skip


@contextmanager
def memory_cgroup(limit: int | None) -> Iterator[list[str]]:
    """A memory cgroup limited to `limit` bytes, as the command prefix that enters it."""
    if limit is None:
        yield []
        return
    directory, limit_file = _new_memory_cgroup()
    try:
        (directory / limit_file).write_text(f"{limit}\n")
        yield ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(directory)]
    finally:
        wait_until(lambda: not (directory / "cgroup.procs").read_text().strip(),
                   f"the processes in {directory} to end")  # fmt: skip
        directory.rmdir()


def _new_memory_cgroup() -> tuple[Path, str]:
    """A new memory cgroup below this process's own, and the name of its limit file."""
    own_v1 = own_v2 = None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            own_v1 = CGROUP_ROOT / "memory" / path.lstrip("/")
        elif controllers == "":
            own_v2 = path.lstrip("/")
    name = f"nemotron-image-test-{uuid.uuid4().hex[:8]}"
    if own_v1 is not None and own_v1.is_dir():
        directory = own_v1 / name
        directory.mkdir()
        return directory, "memory.limit_in_bytes"
    assert own_v2 is not None and (CGROUP_ROOT / "cgroup.controllers").exists(), (
        "no memory cgroup controller found"
    )
    # cgroup v2 lets a cgroup with processes hand no controller down, so the new group goes
    # beside this process's own, in its parent, whose subtree already has the memory controller.
    parent = (CGROUP_ROOT / own_v2).parent
    assert "memory" in (parent / "cgroup.subtree_control").read_text().split(), (
        f"the memory controller is not enabled below {parent}"
    )
    directory = parent / name
    directory.mkdir()
    return directory, "memory.max"


@dataclass
class ContainerServer:
    """The entrypoint's server in a container, the log it writes and its clients on the host."""

    container: Container
    process: subprocess.Popen  # buildah run (or the wrappers that exec into it)
    log_path: Path
    address: str  # host:port, as clients in the server's network see it
    private_network: bool

    def server_pid(self) -> int:
        """The entrypoint's own process (`python3 /usr/local/bin/nemotron-serve ...`)."""

        def find() -> int | None:
            for pid in _descendants(self.process.pid):
                # Not buildah-chroot-exec, whose arguments are the same command.
                argv = [*_cmdline(pid), "", ""]
                if Path(argv[0]).name.startswith("python") and argv[1].endswith("/nemotron-serve"):
                    return pid
            return None

        return wait_until(find, "the entrypoint's process")

    def ids(self) -> dict[str, list[int]]:
        """The server process's Uid, Gid and Groups lines (real, effective, ... ids)."""
        status = Path(f"/proc/{self.server_pid()}/status").read_text().splitlines()
        return {
            name: [int(v) for v in rest.split()]
            for name, _, rest in (line.partition(":") for line in status)
            if name in ("Uid", "Gid", "Groups")
        }

    def in_network(self, argv: Sequence[str]) -> list[str]:
        """`argv` run in the server's network namespace (as is, on the host's network)."""
        if not self.private_network:
            return list(argv)
        return ["nsenter", f"--net=/proc/{self.server_pid()}/ns/net", *argv]

    def healthcheck(self, service: str = "readiness") -> subprocess.CompletedProcess:
        """One `nemotron-healthcheck` from the host: exit code 0 when SERVING."""
        argv = [str(HOST_SCRIPTS / "nemotron-healthcheck"), "--address", self.address,
                "--service", service, "--timeout", "5"]  # fmt: skip
        return subprocess.run(self.in_network(argv), capture_output=True, text=True, timeout=60)

    def wait_ready(self, timeout_s: float = 300) -> None:
        """Poll readiness from the host until SERVING (fail early if the server exited)."""

        def ready() -> bool:
            assert self.process.poll() is None, (
                f"the container exited {self.process.returncode}:\n{self.log_text()[-4000:]}"
            )
            return self.healthcheck().returncode == 0

        wait_until(ready, "readiness SERVING", timeout_s, interval_s=0.5)

    def chat(self, prompt: str) -> subprocess.CompletedProcess:
        """One greedy turn with `nemotron-chat` from the host."""
        argv = [str(HOST_SCRIPTS / "nemotron-chat"), "--address", self.address,
                "--temperature", "0", "--timeout", "300", "--prompt", prompt]  # fmt: skip
        return subprocess.run(self.in_network(argv), capture_output=True, text=True, timeout=360)

    def exec_in_container(
        self, argv: Sequence[str], sandbox: Sandbox
    ) -> subprocess.CompletedProcess:
        """Another command in the same container and network (`docker exec`, an exec probe)."""
        command = self.in_network(self.container.command(argv, sandbox))
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[dict]:
        """The server's JSON log lines (buildah's own lines are the `<not json>` ones)."""
        return json_log_lines(self.log_path)

    def wait_for_log(self, *events: str, timeout_s: float = 60) -> dict:
        """The first log line of any of `events`, once written."""
        lines = wait_for_log_lines(self.log_path, lambda line: line["event"] in events,
                                   " or ".join(events), timeout_s=timeout_s)  # fmt: skip
        return lines[0]

    def terminate(self, timeout_s: float = 120) -> int:
        """SIGTERM to the entrypoint's process; the container's exit code (buildah run's)."""
        os.kill(self.server_pid(), signal.SIGTERM)  # as `docker stop` and a pod's deletion
        return self.process.wait(timeout=timeout_s)


def _descendants(pid: int) -> list[int]:
    """Every process below `pid`, breadth first."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in children[queue.pop(0)]:
            found.append(child)
            queue.append(child)
    return found


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []
