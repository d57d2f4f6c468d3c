"""`nemotron-healthcheck`: one `grpc.health.v1.Health/Check` call, answered by the exit code.

For exec probes on Kubernetes versions without native gRPC probes and for the image's Docker
`HEALTHCHECK`. Exit 0 when the service is SERVING; 1 when it is NOT_SERVING, UNKNOWN or unknown
to the server (the status is printed), or when the server cannot be reached in time (one line
saying why); 2 on a usage error. It imports only grpc and the health stubs, so it starts fast
enough to run every few seconds.
"""

from __future__ import annotations

import argparse
import enum
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

PROG = "nemotron-healthcheck"
DEFAULT_ADDRESS = "localhost:50051"
ADDRESS_ENV = "NEMOTRON_HEALTH_ADDRESS"
# The names nemotron-serve registers (docs/service.md); any other name is asked as given.
KNOWN_SERVICES = ("readiness", "liveness", "", "nemotron.v1.GenerationService")


class Outcome(enum.IntEnum):
    """The exit codes, which are the command's whole answer."""

    SERVING = 0
    UNHEALTHY = 1
    USAGE = 2


class UsageError(ValueError):
    """A flag combination or file that cannot make a check; exit code 2."""


@dataclass(frozen=True)
class ProbeConfig:
    """One check: where, which service, how long, and TLS material when the server has TLS."""

    address: str
    service: str
    timeout_s: float
    tls: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    server_name: str | None = None


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (argparse exits 2 on a bad flag)."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--address", help=f"server host:port (env {ADDRESS_ENV}; default {DEFAULT_ADDRESS})")
    add(
        "--service",
        default="readiness",
        help="health service name: readiness (default), liveness, '' (the server), "
        "nemotron.v1.GenerationService",
    )
    add("--timeout", type=_positive, default=3.0, metavar="S", help="seconds (default 3)")
    add("--tls", action="store_true", help="TLS with the system's roots (implied by --tls-*)")
    add("--tls-ca", type=Path, metavar="FILE", help="CA bundle that signed the server certificate")
    add("--tls-cert", type=Path, metavar="FILE", help="client certificate (mutual TLS)")
    add("--tls-key", type=Path, metavar="FILE", help="client private key (mutual TLS)")
    add("--tls-server-name", metavar="NAME", help="name to expect in the server certificate")
    return parser


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as error:
        raise UsageError(f"{flag} {path}: {error.strerror or error}") from None


def parse_config(args: argparse.Namespace, environ: Mapping[str, str]) -> ProbeConfig:
    """The check to make, from parsed flags and the environment."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together (mutual TLS needs both)")
    tls = args.tls or any(
        value is not None for value in (args.tls_ca, args.tls_cert, args.tls_server_name)
    )
    return ProbeConfig(
        address=args.address or environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS,
        service=args.service,
        timeout_s=args.timeout,
        tls=tls,
        root_certificates=_read(args.tls_ca, "--tls-ca"),
        private_key=_read(args.tls_key, "--tls-key"),
        certificate_chain=_read(args.tls_cert, "--tls-cert"),
        server_name=args.tls_server_name,
    )


def open_channel(config: ProbeConfig) -> grpc.Channel:
    """A channel to the server, with TLS (and a client certificate) when configured."""
    options = [("grpc.ssl_target_name_override", config.server_name)] if config.server_name else []
    if not config.tls:
        return grpc.insecure_channel(config.address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=config.root_certificates,
        private_key=config.private_key,
        certificate_chain=config.certificate_chain,
    )
    return grpc.secure_channel(config.address, credentials, options=options)


@dataclass(frozen=True)
class ProbeResult:
    """What one check found: the exit code and the line to print."""

    outcome: Outcome
    line: str
    answered: bool  # the server answered with a status (stdout), rather than failing (stderr)


def check(config: ProbeConfig) -> ProbeResult:
    """Ask the server once."""
    label = f"{config.service!r} at {config.address}"
    request = health_pb2.HealthCheckRequest(service=config.service)
    with open_channel(config) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=config.timeout_s)
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND:  # how Check says SERVICE_UNKNOWN
                return ProbeResult(Outcome.UNHEALTHY, f"{label}: SERVICE_UNKNOWN", answered=True)
            details = " ".join((error.details() or "").split())  # one line
            line = f"cannot check {label}: {error.code().name}: {details}"
            return ProbeResult(Outcome.UNHEALTHY, line, answered=False)
    serving = response.status == health_pb2.HealthCheckResponse.SERVING
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    return ProbeResult(
        Outcome.SERVING if serving else Outcome.UNHEALTHY, f"{label}: {status}", answered=True
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nemotron-healthcheck` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = parse_config(args, os.environ)
    except UsageError as error:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return int(Outcome.USAGE)
    result = check(config)
    print(result.line, file=sys.stdout if result.answered else sys.stderr)
    return int(result.outcome)


if __name__ == "__main__":
    sys.exit(main())
