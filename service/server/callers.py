"""Who made a call, and the namespace its request ids live in.

A request belongs to the identity that made it: the API key it presented (when the server
checks keys) and the client certificate's subject and alternative names (under mutual TLS).
Request ids are the client's own names, so two tenants may both call theirs `req-1`: the
engine knows a request as `<caller tag>/<request id>`, and a by-id operation (`Abort`)
reaches only the caller's own requests. Someone else's id neither collides with nor reveals
anything about another tenant's.

The tag is an HMAC of the identity under a secret made at startup: stable for the process's
life, the same for every replica's logs of one key only by chance, and it says nothing about
the key. Without API keys and without mutual TLS every caller is the same (anonymous) tenant
and the engine sees the client's ids unchanged.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping

from service.server.api_keys import presented_digest

_SECRET = secrets.token_bytes(32)
MAX_REQUEST_ID_CHARS = 128
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]+")


def request_id_problem(request_id: str, field: str = "request_id") -> str | None:
    """Why a client's request id cannot be used (None: it can), the same rule for both APIs.

    Ids go into every log line, span and metric exemplar of their call: at most 128 characters
    of letters, digits and `. _ : -` (a UUID, a ULID and a gateway's ids all fit).
    """
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        return f"{field} has {len(request_id)} characters; allowed: 1 to {MAX_REQUEST_ID_CHARS}"
    if not _REQUEST_ID.fullmatch(request_id):
        return f"{field} may hold only letters, digits and . _ : - (at most {MAX_REQUEST_ID_CHARS})"
    return None


class Callers:
    """Turns what a call presented (key, certificate) into its tag."""

    def __init__(self, keys_checked: bool) -> None:
        self.keys_checked = keys_checked

    def tag(self, authorization: str, certificate_subject: bytes = b"") -> str:
        """The caller's tag ("" for the anonymous tenant)."""
        key = (presented_digest(authorization) or b"") if self.keys_checked else b""
        if not key and not certificate_subject:
            return ""
        mac = hmac.new(_SECRET, b"key\0" + key + b"\0subject\0" + certificate_subject, "sha256")
        return mac.hexdigest()[:16]

    def grpc_tag(self, metadata: Mapping[str, str | bytes], auth_context: Mapping) -> str:
        """The tag of a gRPC call, from its metadata and its TLS peer certificate.

        The certificate's identity is its subject and its subject alternative names (SPIFFE
        SVIDs carry only a URI SAN); a certificate with neither is known by its own digest.
        """
        authorization = metadata.get("authorization", "")
        parts = [
            value if isinstance(value, bytes) else str(value).encode()
            for key in ("x509_subject", "x509_subject_alternative_name")
            for value in auth_context.get(key) or ()
        ]
        certificate = b"\0".join(parts)
        if not certificate and auth_context.get("x509_pem_cert"):
            pem = auth_context["x509_pem_cert"][0]
            certificate = hashlib.sha256(pem if isinstance(pem, bytes) else pem.encode()).digest()
        return self.tag(str(authorization), certificate)


def engine_request_id(tag: str, request_id: str) -> str:
    """The id the engine knows a caller's request by."""
    return f"{tag}/{request_id}" if tag else request_id
