"""bench/compare_llamacpp.py without llama.cpp: its arguments and the missing-binaries path.

The benchmark itself is not in the test suite (it needs binaries built by
tools/build_llamacpp.sh, ~15 minutes); docs/benchmarks.md records its runs.
"""

from __future__ import annotations

import pytest

from bench import compare_llamacpp


def test_the_defaults_match_the_issues_workload():
    settings, directory = compare_llamacpp.parse_args([])
    assert settings.threads == 2 and settings.precision == "int4"
    assert settings.levels == (1, 4, 16, 32) and directory is None
    assert settings.repack is False  # llama.cpp's AMX repacking crashes batched Q4_1 here


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--new-tokens", "1"], ["--levels", "0"]])
def test_impossible_counts_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare_llamacpp.parse_args(argv)
    assert exit_info.value.code == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_missing_binaries_exit_2_with_how_to_build_them(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        compare_llamacpp.main(["--llamacpp-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "bash tools/build_llamacpp.sh" in capsys.readouterr().err
