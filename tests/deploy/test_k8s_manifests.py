"""k8s/: the plain manifests are what the chart renders today, and valid Kubernetes objects."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.helm_chart import PROFILES
from tests.deploy.test_chart_kubernetes import validation_errors
from tools.render_k8s import K8S_DIR, render_profile


@pytest.mark.parametrize("name", PROFILES)
def test_the_manifest_is_the_chart_rendered_for_its_profile(chart, name):
    expected = render_profile(chart.helm, name, chart.home)
    path = K8S_DIR / f"{name}.yaml"
    assert path.is_file(), f"{path} is missing: run .venv/bin/python tools/render_k8s.py"
    assert path.read_text() == expected, "k8s/ is stale: run .venv/bin/python tools/render_k8s.py"


@pytest.mark.parametrize("version", ["1.27.0", "1.30.0", "1.35.0"])
@pytest.mark.parametrize("name", PROFILES)
def test_the_manifest_validates_strictly(name, version):
    objects = [o for o in yaml.safe_load_all((K8S_DIR / f"{name}.yaml").read_text()) if o]
    assert not [o for o in objects if o["kind"] == "Pod"]  # the helm test pod is left out
    assert validation_errors(objects, version) == []


def test_the_readme_says_how_to_regenerate():
    readme = (K8S_DIR / "README.md").read_text()
    assert "tools/render_k8s.py" in readme
    for name in PROFILES:
        assert f"`{name}.yaml`" in readme


def test_the_kubernetes_validate_command_accepts_every_file():
    command = Path(sys.executable).parent / "kubernetes-validate"
    files = [str(K8S_DIR / f"{name}.yaml") for name in PROFILES]
    result = subprocess.run(
        [str(command), "--strict", "--quiet", "-k", "1.30.0", *files],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
