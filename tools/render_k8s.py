"""Render k8s/<profile>.yaml, the plain manifests for users without Helm, from helm/nemotron.

Each file is `helm template` of the chart with `--set profile=<profile>` and otherwise the
chart's defaults, for Kubernetes 1.30 (native gRPC probes), without the `helm test` pod, for a
release called `nemotron` in the namespace `nemotron`. A test re-renders them and compares.

    .venv/bin/python tools/render_k8s.py            # rewrite k8s/*.yaml
    .venv/bin/python tools/render_k8s.py --check    # exit 1 if any file differs from the chart
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tools.fetch_helm import HelmFetchError, ensure_helm

REPO_ROOT = Path(__file__).resolve().parent.parent
CHART = REPO_ROOT / "helm" / "nemotron"
K8S_DIR = REPO_ROOT / "k8s"
PROFILES = ("a100x4", "a100x8", "h100x2", "cpu")
RELEASE = "nemotron"
NAMESPACE = "nemotron"
KUBE_VERSION = "1.30.0"
HEADER = """\
# Generated from helm/nemotron by tools/render_k8s.py: do not edit; change the chart and run
#   .venv/bin/python tools/render_k8s.py
# Profile {profile}, chart defaults otherwise, Kubernetes >= 1.24, namespace {namespace}:
#   kubectl create namespace {namespace}
#   kubectl apply -n {namespace} -f k8s/{profile}.yaml
"""


def run_helm(
    helm: Path, args: Sequence[str], home: Path, environ: Mapping[str, str] = os.environ
) -> subprocess.CompletedProcess:
    """helm ARGS with HELM_{CACHE,CONFIG,DATA}_HOME under `home` (none of the user's settings)."""
    env = {key: value for key, value in environ.items() if not key.startswith("HELM_")}
    for name in ("CACHE", "CONFIG", "DATA"):
        env[f"HELM_{name}_HOME"] = str(home / name.lower())
    return subprocess.run([str(helm), *args], capture_output=True, text=True, env=env, timeout=120)


def render_profile(helm: Path, profile: str, home: Path) -> str:
    """The content of k8s/<profile>.yaml."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    args += ["--kube-version", KUBE_VERSION, "--skip-tests", "--set", f"profile={profile}"]
    result = run_helm(helm, args, home)
    if result.returncode != 0:
        raise RuntimeError(f"helm template for {profile} failed: {result.stderr.strip()}")
    return HEADER.format(profile=profile, namespace=NAMESPACE) + result.stdout


def main(argv: Sequence[str] | None = None) -> int:
    """Write (or with --check, compare) every profile's manifest; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    try:
        helm = ensure_helm()
    except HelmFetchError as error:
        print(f"render_k8s: error: {error}", file=sys.stderr)
        return 1
    stale = []
    with tempfile.TemporaryDirectory() as home:
        for profile in PROFILES:
            path = K8S_DIR / f"{profile}.yaml"
            text = render_profile(helm, profile, Path(home))
            if args.check:
                if not path.is_file() or path.read_text() != text:
                    stale.append(path.relative_to(REPO_ROOT))
            else:
                path.parent.mkdir(exist_ok=True)
                path.write_text(text)
                print(path.relative_to(REPO_ROOT))
    if stale:
        names = ", ".join(map(str, stale))
        print(
            f"render_k8s: {names} differ from the chart; run tools/render_k8s.py", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
