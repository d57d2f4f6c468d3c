"""`nemotron-build inspect` and the CLI's error reporting."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from engine_build.cli import main


def test_inspect_prints_the_reference_figures_and_a_row_per_layer(reference_config, capsys):
    assert main(["inspect", str(reference_config)]) == 0
    out = capsys.readouterr().out
    assert "parameters:        49,867,145,216" in out
    assert "attention layers:  49 GQA, 0 linear, 31 none" in out
    assert "bf16 200,704" in out
    table = out.split("parameters\n", 1)[1].strip().splitlines()
    assert len(table) == 80
    assert table[6].split()[:3] == ["6", "none", "0"]


def test_inspect_json_carries_the_exact_figures(reference_config, capsys):
    assert main(["inspect", str(reference_config), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"] == 49_867_145_216
    assert data["attention_layers"] == 49
    assert data["no_attention_layers"] == 31
    assert data["kv_bytes_per_token"]["bf16"] == 200_704
    assert len(data["per_layer"]) == 80
    assert sum(row["parameters"] for row in data["per_layer"]) < data["parameters"]


def test_inspect_accepts_a_checkpoint_directory(synthetic_checkpoint, capsys):
    assert main(["inspect", str(synthetic_checkpoint), "--no-layers"]) == 0
    assert "attention layers:  4 GQA, 2 linear, 2 none" in capsys.readouterr().out


def test_inspect_refuses_an_unsupported_config_with_exit_code_2(reference_config, tmp_path, capsys):
    config = json.loads(reference_config.read_text())
    config["block_configs"][12]["attention"]["sparsify"] = ["attn"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert main(["inspect", str(path)]) == 2
    assert "block_configs[12].attention.sparsify" in capsys.readouterr().err


def test_console_script_is_installed_and_runs(reference_config):
    exe = shutil.which("nemotron-build") or f"{sys.prefix}/bin/nemotron-build"
    result = subprocess.run(
        [exe, "inspect", str(reference_config), "--no-layers"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "49,867,145,216" in result.stdout


def test_unknown_subcommand_lists_the_allowed_ones(capsys):
    try:
        main(["compile"])
    except SystemExit as exit_:
        assert exit_.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'compile'" in err and "inspect" in err
