"""Rendering the Helm chart with the real helm binary, for the deploy tests and tools/render_k8s.py.

`HelmChart` runs `helm` with its own temporary HELM_*_HOME directories, so nothing of the user's
helm configuration leaks in; renders are cached because most tests look at the same few.
"""

from __future__ import annotations

import functools
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tools.render_k8s import run_helm

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART = REPO_ROOT / "helm" / "nemotron"
PROFILES = ("a100x4", "a100x8", "h100x2", "cpu")
GPU_PROFILES = tuple(p for p in PROFILES if p != "cpu")
RELEASE = "nemotron"
NAMESPACE = "inference"


class HelmError(RuntimeError):
    """helm exited with an error; the message is its stderr."""


@dataclass(frozen=True)
class HelmChart:
    """The chart and a helm binary with isolated configuration directories."""

    helm: Path
    home: Path
    chart: Path = CHART

    def run(self, *args: str) -> subprocess.CompletedProcess:
        """helm ARGS..., returning the completed process (not raising on failure)."""
        return run_helm(self.helm, args, self.home)

    def template(self, *args: str, kube_version: str = "1.30.0") -> str:
        """The manifest `helm template` renders (raises HelmError with helm's message)."""
        return _template(self, tuple(args), kube_version)

    def objects(self, *args: str, kube_version: str = "1.30.0") -> list[dict[str, Any]]:
        """The rendered objects, parsed."""
        text = self.template(*args, kube_version=kube_version)
        return [doc for doc in yaml.safe_load_all(text) if doc]

    def lint(self, *args: str) -> subprocess.CompletedProcess:
        """helm lint --strict on the chart."""
        return self.run("lint", "--strict", str(self.chart), *args)


@functools.lru_cache(maxsize=256)
def _template(chart: HelmChart, args: tuple[str, ...], kube_version: str) -> str:
    result = chart.run(
        "template",
        RELEASE,
        str(chart.chart),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        kube_version,
        *args,
    )
    if result.returncode != 0:
        raise HelmError(result.stderr.strip())
    return result.stdout


def profile_args(profile: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """`--set profile=P` plus extra helm arguments."""
    return ("--set", f"profile={profile}", *extra)


def by_kind(objects: Sequence[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    """The objects of one kind."""
    return [o for o in objects if o["kind"] == kind]


def one(objects: Sequence[Mapping[str, Any]], kind: str) -> Mapping[str, Any]:
    """The only object of `kind` (fails when there are none or several)."""
    found = by_kind(objects, kind)
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def refusal(chart: Any, *args: str) -> str:
    """helm template's error message for these values (fails the test if it renders)."""
    import pytest

    with pytest.raises(HelmError) as error:
        chart.template(*args)
    return str(error.value)
