"""Fixtures: the real helm binaries (fetched once into the cache), each with temporary homes."""

from __future__ import annotations

import os

import pytest

from tests.deploy.helm_chart import HelmChart
from tools.fetch_helm import HELM3, HELM4, HelmFetchError, HelmRelease, ensure_helm


def _chart(release: HelmRelease, tmp_path_factory) -> HelmChart:
    try:
        helm = ensure_helm(os.environ, release)
    except HelmFetchError as error:  # no registry access: say so, loudly
        pytest.fail(f"cannot fetch helm {release.version}: {error}")
    return HelmChart(helm=helm, home=tmp_path_factory.mktemp(f"helm-{release.version}-home"))


@pytest.fixture(scope="session")
def chart(tmp_path_factory) -> HelmChart:
    """The chart with helm 4 (what the rendering tests use)."""
    return _chart(HELM4, tmp_path_factory)


@pytest.fixture(scope="session", params=[HELM4, HELM3], ids=lambda r: f"helm{r.version}")
def any_helm_chart(request, tmp_path_factory) -> HelmChart:
    """The chart with helm 4 and with helm 3 (lint and schema behaviour on both)."""
    return _chart(request.param, tmp_path_factory)
