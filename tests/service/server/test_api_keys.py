"""The API-key file format and the bearer check, without a server."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from service.server.api_keys import ApiKeyFileError, ApiKeys, parse_key_file
from service.server.status import status_for


def _code(refusal: Exception | None) -> grpc.StatusCode:
    """The status a refusal gets from the error table."""
    assert refusal is not None
    return status_for(refusal)[0]


def test_key_file_format_errors_name_the_line_and_never_the_key(tmp_path):
    with pytest.raises(ApiKeyFileError, match="line 2: expected 'KEY' or 'KEY Method,Method'"):
        parse_key_file("good\nsecret-one Chat extra\n", Path("keys"))
    with pytest.raises(ApiKeyFileError, match="holds no API keys"):
        parse_key_file("# only a comment\n\n", Path("keys"))
    with pytest.raises(ApiKeyFileError) as error:
        parse_key_file("a b c\n", Path("keys"))
    assert "a b c" not in str(error.value)


def test_bearer_checks(tmp_path):
    path = tmp_path / "keys"
    path.write_text("alpha\nbeta Chat\n")
    keys = ApiKeys(path)
    assert keys.check("Bearer alpha", "Generate") is None
    assert keys.check("bearer alpha", "Generate") is None  # the scheme is case-insensitive
    assert keys.check("Bearer beta", "Chat") is None
    assert _code(keys.check("Bearer beta", "Generate")) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(keys.check("Bearer gamma", "Chat")) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(keys.check("Basic alpha", "Chat")) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(keys.check("", "Chat")) == grpc.StatusCode.UNAUTHENTICATED
