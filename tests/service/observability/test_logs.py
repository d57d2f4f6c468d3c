"""Log lines: a logged traceback never carries the variables of its frames (prompts, keys)."""

from __future__ import annotations

import logging

import pytest

from service.observability.logs import configure_service_logging

SECRET = "-".join(["sk", "do", "not", "log", "0123456789"])  # no source line shows it whole
PROMPT = " ".join(["a", "private", "prompt"])


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_a_logged_traceback_leaves_the_frames_variables_out(fmt, capsys):
    configure_service_logging("info", fmt)

    def fail(api_key: str, prompt: str) -> None:
        raise ValueError("boom")

    try:
        fail(SECRET, PROMPT)
    except ValueError as error:
        logging.getLogger("nemotron.api").error("internal_error", exc_info=error)
    err = capsys.readouterr().err
    assert "boom" in err and "fail" in err  # the traceback itself is there
    assert SECRET not in err and PROMPT not in err
