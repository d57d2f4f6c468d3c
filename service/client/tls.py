"""The TLS side of our gRPC clients (`nemotron-chat`, `nemotron-healthcheck`): flags and channel.

It imports only argparse and grpc, so the health probe that uses it still starts fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc


class ClientFlagError(ValueError):
    """A client flag, or the file it names, that cannot be used; each client reports it its way."""


@dataclass(frozen=True)
class ClientTls:
    """TLS material for a channel; key material never appears in a repr."""

    enabled: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    server_name: str | None = None


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """`--tls`, `--tls-ca`, `--tls-cert`, `--tls-key`, `--tls-server-name`."""
    add = parser.add_argument
    add("--tls", action="store_true", help="use TLS with the system's CA certificates")
    add("--tls-ca", type=Path, metavar="FILE", help="CA certificates (PEM); implies --tls")
    add("--tls-cert", type=Path, metavar="FILE", help="client certificate (PEM) for mTLS")
    add("--tls-key", type=Path, metavar="FILE", help="client private key (PEM) for mTLS")
    add("--tls-server-name", metavar="NAME", help="name the server's certificate must carry")


def read_flag_file(flag: str, path: Path) -> bytes:
    """The bytes of a file named by `flag`, or a ClientFlagError saying why not."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise ClientFlagError(f"{flag}: cannot read {path}: {err.strerror or err}") from None


def tls_from_args(args: argparse.Namespace) -> ClientTls:
    """The TLS settings the flags ask for (any `--tls-*` flag turns TLS on)."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ClientFlagError("--tls-cert and --tls-key go together (mutual TLS needs both)")

    def optional(flag: str, path: Path | None) -> bytes | None:
        return None if path is None else read_flag_file(flag, path)

    return ClientTls(
        enabled=bool(args.tls or args.tls_ca or args.tls_cert or args.tls_server_name),
        root_certificates=optional("--tls-ca", args.tls_ca),
        private_key=optional("--tls-key", args.tls_key),
        certificate_chain=optional("--tls-cert", args.tls_cert),
        server_name=args.tls_server_name,
    )


def open_channel(
    address: str, tls: ClientTls, options: Sequence[tuple[str, str]] = ()
) -> grpc.Channel:
    """A channel to `address`, with TLS (and a client certificate) when configured."""
    options = list(options)
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    if not tls.enabled:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates,
        private_key=tls.private_key,
        certificate_chain=tls.certificate_chain,
    )
    return grpc.secure_channel(address, credentials, options=options)
