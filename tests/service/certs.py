"""Test certificates made with the openssl command: a private CA, a server and a client."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SERVER_NAME = "nemotron.test"  # the name in the server certificate; clients override to it
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(directory: Path) -> dict[str, bytes]:
    """A private CA, a server certificate for nemotron.test and a client certificate."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=nemotron-test-ca", cwd=directory)  # fmt: skip
    for name, extension in (("server", "subjectAltName=DNS:nemotron.test"), ("client", None)):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
        extra = []
        if extension:
            (directory / f"{name}.ext").write_text(extension + "\n")
            extra = ["-extfile", f"{name}.ext"]
        signing = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "1"]
        _openssl("x509", "-req", "-in", f"{name}.csr", *signing, "-out", f"{name}.pem", *extra,
                 cwd=directory)  # fmt: skip
    return {p.name: p.read_bytes() for p in directory.iterdir()}
