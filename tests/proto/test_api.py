"""The gRPC API stays `buf lint` clean and compatible with the committed image of the v1 API."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tools.api_image import (
    API_IMAGE,
    FINDINGS_EXIT_CODE,
    PROTO_DIR,
    REPO_ROOT,
    BreakingChangeError,
    buf_path,
    rebuild_image,
    run_buf,
)

API_FILE = Path("nemotron") / "v1" / "generation.proto"
ENUM_WITHOUT_UNSPECIFIED = """
// Color is an enum whose zero value is a real choice.
enum Color {
  // Red.
  COLOR_RED = 0;
}
"""
# Edits of generation.proto that break clients: (text, replacement, a rule buf must report).
BREAKING_EDITS = {
    "renumbered_field": ("bool ignore_eos = 4;", "bool ignore_eos = 6;", "FIELD_NO_DELETE"),
    "renamed_field": ("int32 max_new_tokens = 1;", "int32 max_tokens = 1;", "FIELD_SAME_JSON_NAME"),
    "widened_field": ("int32 prompt_tokens = 1;", "int64 prompt_tokens = 1;", "FIELD_SAME_TYPE"),
    # Same bytes and JSON, but stubs lose HasField and 0 now means unset: FILE, not WIRE_JSON.
    "dropped_presence": (
        "optional float temperature = 1;",
        "float temperature = 1;",
        "FIELD_SAME_CARDINALITY",
    ),
}


@pytest.fixture(scope="module")
def buf_env(tmp_path_factory) -> dict[str, str]:
    """The environment for buf: its cache in a fresh directory, not the user's."""
    assert buf_path().is_file(), f"{buf_path()} is missing: the buf-bin test extra installs it"
    return {**os.environ, "BUF_CACHE_DIR": str(tmp_path_factory.mktemp("buf-cache"))}


def edited_copy(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of proto/ under tmp_path with every `old` replaced by `new` in the API's file."""
    copy = tmp_path / "proto"
    shutil.copytree(PROTO_DIR, copy)
    path = copy / API_FILE
    text = path.read_text()
    assert old in text, f"{old!r} is no longer in {API_FILE}: pick another edit for this test"
    path.write_text(text.replace(old, new))
    return copy


def reported_rules(result) -> set[str]:
    """The rule ids of buf's findings (--error-format=json: one JSON object per line)."""
    assert result.returncode == FINDINGS_EXIT_CODE, result.stdout + result.stderr
    return {json.loads(line)["type"] for line in result.stdout.splitlines()}


def test_buf_lint_reports_nothing_on_the_api(buf_env):
    result = run_buf(["lint", "proto"], buf_env)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_buf_lint_reports_an_enum_without_an_unspecified_zero_value(tmp_path, buf_env):
    copy = edited_copy(tmp_path, "// Prompt is", ENUM_WITHOUT_UNSPECIFIED + "\n// Prompt is")
    result = run_buf(["lint", str(copy), "--error-format=json"], buf_env)
    assert "ENUM_ZERO_VALUE_SUFFIX" in reported_rules(result)


def test_buf_breaking_reports_nothing_against_the_v1_image(buf_env):
    image = API_IMAGE.relative_to(REPO_ROOT)
    assert API_IMAGE.is_file(), f"{image} is missing: see proto/README.md"
    result = run_buf(["breaking", "proto", "--against", str(image)], buf_env)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@pytest.mark.parametrize("edit", BREAKING_EDITS)
def test_buf_breaking_reports_a_breaking_edit(tmp_path, buf_env, edit):
    old, new, rule = BREAKING_EDITS[edit]
    copy = edited_copy(tmp_path, old, new)
    result = run_buf(
        ["breaking", str(copy), "--against", str(API_IMAGE), "--error-format=json"], buf_env
    )
    assert rule in reported_rules(result)


def test_api_image_refuses_to_overwrite_a_baseline_the_api_breaks(tmp_path, buf_env):
    image = tmp_path / "baseline.binpb"
    shutil.copyfile(API_IMAGE, image)
    copy = edited_copy(tmp_path, "bool ignore_eos = 4;", "bool ignore_eos = 6;")
    with pytest.raises(BreakingChangeError, match="ignore_eos"):
        rebuild_image(copy, image, buf_env)
    assert image.read_bytes() == API_IMAGE.read_bytes()


def test_api_image_rebuilds_a_baseline_the_api_keeps(tmp_path, buf_env):
    image = tmp_path / "images" / "baseline.binpb"
    rebuild_image(PROTO_DIR, image, buf_env)
    result = run_buf(["breaking", "proto", "--against", str(image)], buf_env)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_readme_says_when_to_regenerate_the_image():
    readme = (PROTO_DIR / "README.md").read_text()
    assert "tools/api_image.py" in readme and API_IMAGE.name in readme
