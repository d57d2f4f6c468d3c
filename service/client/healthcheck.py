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

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.client.tls import (
    ClientFlagError,
    ClientTls,
    add_tls_arguments,
    open_channel,
    tls_from_args,
)

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
    tls: ClientTls = field(default_factory=ClientTls)


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
    add_tls_arguments(parser)
    return parser


def parse_config(args: argparse.Namespace, environ: Mapping[str, str]) -> ProbeConfig:
    """The check to make, from parsed flags and the environment."""
    try:
        tls = tls_from_args(args)
    except ClientFlagError as error:
        raise UsageError(str(error)) from None
    return ProbeConfig(
        address=args.address or environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS,
        service=args.service,
        timeout_s=args.timeout,
        tls=tls,
    )


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
    with open_channel(config.address, config.tls) as channel:
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
