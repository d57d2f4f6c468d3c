"""API keys: `authorization: Bearer <key>` checked in constant time against a key file.

The file is what a Kubernetes Secret mounts: one key per line, optionally followed by the RPC
methods that key may call (`KEY Chat,ChatStream`; without a list it may call every method).
Blank lines and `#` comments are skipped. The file is re-read when it changes, so a rotated
Secret takes effect without a restart. Only the API is protected: health (kubelet probes send
no metadata) and reflection stay open. Keys never reach the logs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from engine_build.events import log_event

RELOAD_CHECK_S = 1.0
BEARER = "bearer "


def presented_digest(authorization: str) -> bytes | None:
    """SHA-256 of the key in `Bearer <key>` (None: not that scheme); keys are only compared so."""
    if authorization[: len(BEARER)].lower() != BEARER:
        return None
    return hashlib.sha256(authorization[len(BEARER) :].strip().encode()).digest()


class ApiKeyFileError(ValueError):
    """The key file cannot be used; the message says why (never what a key is)."""


class UnauthenticatedError(Exception):
    """A call without a valid API key."""


class PermissionDeniedError(Exception):
    """A valid API key that may not call this method."""


@dataclass(frozen=True)
class _Key:
    digest: bytes
    methods: frozenset[str] | None  # None: every method


def parse_key_file(text: str, path: Path) -> tuple[_Key, ...]:
    """The keys of a key file's text."""
    keys = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ApiKeyFileError(
                f"{path} line {number}: expected 'KEY' or 'KEY Method,Method', got "
                f"{len(parts)} words"
            )
        methods = frozenset(m for m in parts[1].split(",") if m) if len(parts) == 2 else None
        keys.append(_Key(hashlib.sha256(parts[0].encode()).digest(), methods))
    if not keys:
        raise ApiKeyFileError(f"{path} holds no API keys")
    return tuple(keys)


class ApiKeys:
    """The keys of a file, re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = self._file_stamp()
        self._keys = self._load()
        self._checked = time.monotonic()
        self._last_error = ""

    def _file_stamp(self) -> tuple[int, int, int]:
        try:
            stat = os.stat(self.path)
        except OSError as err:
            message = f"cannot read the API key file {self.path}: {err.strerror}"
            raise ApiKeyFileError(message) from None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _load(self) -> tuple[_Key, ...]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ApiKeyFileError(f"cannot read the API key file {self.path}: {err}") from None
        return parse_key_file(text, self.path)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        with self._lock:
            self._checked = now
            try:
                stamp = self._file_stamp()
                if stamp != self._stamp:
                    self._keys, self._stamp = self._load(), stamp
                    log_event("api_keys_reloaded", path=str(self.path), keys=len(self._keys))
            except ApiKeyFileError as err:  # keep serving with the keys we have
                if str(err) != self._last_error:  # once per new problem, not every second
                    log_event("api_keys_reload_failed", error=str(err))
                self._last_error = str(err)
            else:
                self._last_error = ""

    def check(self, authorization: str, method: str) -> Exception | None:
        """None when `authorization` may call `method`; else the error that refuses the call."""
        self._refresh()
        if not authorization:
            return UnauthenticatedError(
                "missing API key: send the metadata 'authorization: Bearer <key>'"
            )
        presented = presented_digest(authorization)
        if presented is None:
            return UnauthenticatedError("the authorization metadata must be 'Bearer <key>'")
        found: _Key | None = None
        for key in self._keys:  # compare with every key: the time does not tell which matched
            if hmac.compare_digest(presented, key.digest):
                found = key
        if found is None:
            return UnauthenticatedError("invalid API key")
        if found.methods is not None and method not in found.methods:
            return PermissionDeniedError(
                f"this API key may not call {method}; it may call "
                f"{', '.join(sorted(found.methods))}"
            )
        return None
