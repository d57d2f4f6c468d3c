"""The error table: each domain error's status code, and INTERNAL that echoes nothing."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from service.runtime.interface import (
    EngineState,
    NotReadyError,
    OverloadedError,
    RequestError,
    RequestFailedError,
    TokenEvent,
    failure_of,
)
from service.runtime.tokenizer import TokenizerError
from service.server.status import abort_with, status_for


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (RequestError("top_p 7.0 is outside (0.0, 1.0]"), "INVALID_ARGUMENT", "top_p 7.0 is"),
        (TokenizerError("token id 99999 is outside"), "INVALID_ARGUMENT", "token id 99999"),
        (
            OverloadedError("queue full", 2.5),
            "RESOURCE_EXHAUSTED",
            "queue full (retry after 2.5 s)",
        ),
        (NotReadyError("still loading"), "UNAVAILABLE", "still loading"),
    ],
)
def test_domain_errors_map_to_their_status_with_their_message(error, code, message):
    got_code, got_message = status_for(error)
    assert got_code.name == code and message in got_message


@pytest.mark.parametrize(
    "error",
    [
        RequestFailedError("sampling failed: CUDA error at /opt/secret/kernel.cu:12"),
        ValueError("boom in /srv/app/internal.py"),
        KeyError("private"),
    ],
)
def test_internal_errors_echo_nothing_but_an_incident_id_that_the_log_carries(
    error, caplog, monkeypatch
):
    caplog.set_level(logging.ERROR, logger="nemotron")
    monkeypatch.setattr(logging.getLogger("nemotron"), "propagate", True)
    code, message = status_for(error)
    assert code is grpc.StatusCode.INTERNAL
    assert message.startswith("internal error (incident ") and str(error) not in message
    incident = message.split()[3]
    assert any(r.fields.get("incident") == incident for r in caplog.records)  # type: ignore[attr-defined]


def test_an_error_event_is_the_engines_failure_or_the_requests_bug():
    event = TokenEvent("r", (), "", error="IndexError: list index out of range")
    failed = failure_of(event, EngineState.FAILED)
    assert status_for(failed)[0] is grpc.StatusCode.UNAVAILABLE
    assert "IndexError" not in str(failed)
    bug = failure_of(event, EngineState.READY)
    code, message = status_for(bug)
    assert code is grpc.StatusCode.INTERNAL and "IndexError" not in message


class _Context:
    def __init__(self) -> None:
        self.trailing: tuple = ()

    def set_trailing_metadata(self, metadata: tuple) -> None:
        self.trailing = metadata

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise grpc.aio.AbortError()


def test_overload_sets_a_retry_after_trailer_and_records_the_code():
    context, ended = _Context(), []
    with pytest.raises(grpc.aio.AbortError):
        asyncio.run(
            abort_with(context, OverloadedError("queue full", 1.5), lambda c, m: ended.append(c))
        )
    assert context.trailing == (("retry-after-ms", "1500"),)
    assert ended == [grpc.StatusCode.RESOURCE_EXHAUSTED]
