"""`nemotron-serve`: serve flags, the terminal chat with the embedded default, and errors."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import pytest

from service.cli import main
from tests.service.trtllm_engine import commit_trtllm_engine, double_env


def _exe() -> str:
    return shutil.which("nemotron-serve") or f"{sys.prefix}/bin/nemotron-serve"


@pytest.mark.slow
def test_embedded_model_answers_the_capital_of_france_from_stdin(
    cached_embedded_checkpoint, cache_dir
):
    result = subprocess.run(
        [_exe(), "chat", "--cache-dir", str(cache_dir)],
        input="What is the capital of France?\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert result.stdout.strip().endswith(".")  # a sentence, not a fragment


@pytest.mark.slow
def test_multi_turn_prompts_are_answered_in_order(embedded_checkpoint, capsys):
    code = main(
        [
            "chat",
            "--checkpoint",
            str(embedded_checkpoint),
            "--max-new-tokens",
            "40",
            "--prompt",
            "What is the capital of France?",
            "--prompt",
            "And of Italy?",
        ]
    )
    assert code == 0
    answers = capsys.readouterr().out.strip().splitlines()
    assert "Paris" in answers[0]
    assert "Rome" in "\n".join(answers[1:])


def test_a_bad_precision_is_refused_with_the_allowed_values(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--precision", "fp16"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --precision: invalid choice: 'fp16'" in err
    assert "bf16" in err and "fp32" in err


def test_out_of_range_sampling_is_a_cli_error(synthetic_checkpoint, tmp_path, capsys):
    args = ["--checkpoint", str(synthetic_checkpoint), "--cache-dir", str(tmp_path)]
    assert main(["chat", *args, "--temperature", "-1", "--prompt", "x"]) == 2
    assert "temperature -1.0 is outside [0.0, 100.0]" in capsys.readouterr().err


def test_a_checkpoint_without_config_is_a_cli_error(tmp_path, capsys):
    args = ["--checkpoint", str(tmp_path), "--cache-dir", str(tmp_path / "cache")]
    assert main(["chat", *args, "--prompt", "hi"]) == 2
    assert "no such config file" in capsys.readouterr().err


def test_a_checkpoint_without_tokenizer_is_a_cli_error(tmp_path, capsys):
    from engine_build.synthetic import write_synthetic_checkpoint

    checkpoint = write_synthetic_checkpoint(tmp_path / "ckpt", with_tokenizer=False)
    args = ["--checkpoint", str(checkpoint), "--cache-dir", str(tmp_path / "cache")]
    assert main(["chat", *args, "--prompt", "hi"]) == 2
    assert "missing tokenizer.json" in capsys.readouterr().err


def test_serve_flags_default_to_their_environment_variables(tmp_path):
    from service.server.flags import parse_serve_config

    environ = {"NEMOTRON_PORT": "6000", "NEMOTRON_LOG_PROMPTS": "true", "NEMOTRON_GRACE_S": "5"}
    config = parse_serve_config(["--cache-dir", str(tmp_path)], environ)
    assert (config.port, config.log_prompts, config.grace_s) == (6000, True, 5.0)
    assert parse_serve_config(["--cache-dir", str(tmp_path), "--port", "7"], environ).port == 7


@pytest.mark.parametrize(
    ("text", "size"),
    [("2Gi", 2 * 2**30), ("2GiB", 2 * 2**30), ("512MB", 512 * 10**6), ("1.5G", 1_500_000_000),
     ("123456", 123456)],
)  # fmt: skip
def test_kv_cache_memory_takes_kubernetes_and_plain_sizes(tmp_path, text, size):
    from service.server.flags import parse_serve_config

    config = parse_serve_config(["--cache-dir", str(tmp_path)], {"NEMOTRON_KV_CACHE_MEMORY": text})
    assert config.kv_cache_memory == size
    assert parse_serve_config(["--cache-dir", str(tmp_path)], {}).kv_cache_memory is None


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ([], {"NEMOTRON_PORT": "http"}, "NEMOTRON_PORT='http' is not a valid int"),
        ([], {"NEMOTRON_LOG_FORMAT": "xml"}, "NEMOTRON_LOG_FORMAT='xml' is not one of auto,"),
        ([], {"NEMOTRON_LOG_PROMPTS": "maybe"}, "is not a boolean (use true or false)"),
        (["--port", "70000"], {}, "--port 70000 (flag or NEMOTRON_PORT) is outside [0, 65535]"),
        (["--grace-s", "inf"], {}, "--grace-s inf (flag or NEMOTRON_GRACE_S) is outside [0,"),
        ([], {"NEMOTRON_KEEPALIVE_TIMEOUT_S": "nan"}, "--keepalive-timeout-s nan (flag or NEMO"),
        (["--max-message-bytes", "3000000000"], {}, "is outside [1, 2147483647]"),
        (["--log-format", "xml"], {}, "argument --log-format: invalid choice: 'xml'"),
        (["--backend", "onnx"], {}, "argument --backend: invalid choice: 'onnx' (choose from"),
        ([], {"NEMOTRON_BACKEND": "onnx"}, "NEMOTRON_BACKEND='onnx' is not one of auto, torch,"),
        (["--tls-cert-file", "c.pem"], {}, "TLS needs both --tls-cert-file and --tls-key-file"),
        (["--tls-client-ca-file", "ca.pem"], {}, "mutual TLS) needs --tls-cert-file"),
        (["--keepalive-time-s", "0"], {}, "--keepalive-time-s 0.0 (flag or NEMOTRON_KEEPALIVE_T"),
        (["--kv-cache-memory", "lots"], {}, "invalid size in bytes (e.g. 4GiB, 4Gi, 512MB) value"),
        (
            [],
            {"NEMOTRON_KV_CACHE_MEMORY": "-1Gi"},
            "NEMOTRON_KV_CACHE_MEMORY='-1Gi' is not a valid",
        ),
    ],
)
def test_bad_serve_settings_are_usage_errors_naming_the_flag(argv, environ, message, capsys):
    from service.server.flags import parse_serve_config

    with pytest.raises(SystemExit) as exit_:
        parse_serve_config(argv, environ)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_seed_out_of_range_is_a_cli_error(synthetic_checkpoint, tmp_path, capsys):
    args = ["--checkpoint", str(synthetic_checkpoint), "--cache-dir", str(tmp_path)]
    code = main(["chat", *args, "--seed", str(10**23), "--prompt", "x"])
    assert code == 2
    assert "seed 100000000000000000000000 is outside [0, 2**64)" in capsys.readouterr().err


def test_a_cache_dir_that_is_a_file_is_a_cli_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert (
        main(
            [
                "chat",
                "--cache-dir",
                str(blocker),
                "--gguf",
                str(tmp_path / "x.gguf"),
                "--prompt",
                "hi",
            ]
        )
        == 2
    )
    assert "nemotron-serve: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_a_bad_turn_on_stdin_does_not_end_the_conversation(embedded_checkpoint):
    too_long = "word " * 9000  # more tokens than the 8192-token context
    result = subprocess.run(
        [_exe(), "chat", "--checkpoint", str(embedded_checkpoint), "--max-new-tokens", "30"],
        input=f"{too_long}\nWhat is the capital of France?\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2  # one turn failed
    assert "prompt has" in result.stderr and "allowed: 1 to 8191" in result.stderr
    assert "Paris" in result.stdout


def test_serve_refuses_to_start_listing_engines_and_the_build_command(tmp_path):
    result = subprocess.run(
        [
            _exe(), "--profile", "a100x8", "--engine-repo", str(tmp_path / "repo"),
            "--cache-dir", str(tmp_path), "--port", "0", "--metrics-port", "0",
            "--http-port", "off",
            "--log-format", "json",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "no engine in" in result.stderr and "fits profile a100x8" in result.stderr
    command = "nemotron-build build --profile a100x8 --backend torch --checkpoint CHECKPOINT"
    assert f"{command} --repo {tmp_path}" in result.stderr
    assert '"event": "startup_refused"' in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("how", [["--backend", "tensorrt-llm"], []])
def test_serve_refuses_a_tensorrt_llm_engine_without_the_package_naming_the_way_out(tmp_path, how):
    entry = commit_trtllm_engine(tmp_path / "repo")
    environ = {**os.environ, "NEMOTRON_BACKEND": "tensorrt-llm"} if not how else None
    result = subprocess.run(
        [
            _exe(), "--profile", "h100x2", *how, "--engine-repo", str(tmp_path / "repo"),
            "--cache-dir", str(tmp_path), "--port", "0", "--metrics-port", "0",
            "--http-port", "off", "--log-format", "json",
        ],
        capture_output=True, text=True, timeout=120, env=environ,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"engine {entry.name} ({entry.engine_id}) was built by tensorrt-llm 1.2.1" in (
        result.stderr
    )
    assert "cannot import the tensorrt_llm package" in result.stderr
    assert "--backend torch" in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_an_engine_of_another_tensorrt_llm_release(tmp_path):
    entry = commit_trtllm_engine(tmp_path / "repo", version="1.2.0")  # the double is 1.2.1
    result = subprocess.run(
        [
            _exe(), "--profile", "h100x2", "--backend", "tensorrt-llm",
            "--engine-repo", str(tmp_path / "repo"), "--cache-dir", str(tmp_path), "--port", "0",
            "--metrics-port", "0", "--http-port", "off", "--log-format", "json",
        ],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, **double_env(tmp_path / "events.jsonl")},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert entry.engine_id in result.stderr
    assert "built with 1.2.0; this runtime has 1.2.1" in result.stderr
    assert "nemotron-build build --profile h100x2" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "events.jsonl").exists()  # refused before the LLM was made


def test_serve_with_backend_auto_here_serves_torch_engines_not_tensorrt_llm_ones(tmp_path):
    commit_trtllm_engine(tmp_path / "repo")  # the only engine: auto means torch without the package
    result = subprocess.run(
        [
            _exe(), "--profile", "h100x2", "--engine-repo", str(tmp_path / "repo"),
            "--cache-dir", str(tmp_path), "--port", "0", "--metrics-port", "0",
            "--http-port", "off", "--log-format", "json",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "built by the tensorrt-llm backend; this loader runs torch" in result.stderr


def test_the_cpu_profile_has_no_tensorrt_llm_engines(tmp_path):
    result = subprocess.run(
        [
            _exe(), "--profile", "cpu", "--backend", "tensorrt-llm",
            "--cache-dir", str(tmp_path), "--port", "0", "--metrics-port", "0",
            "--http-port", "off",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "backend tensorrt-llm has no engines for the cpu profile" in result.stderr


def test_kv_cache_memory_is_refused_for_a_tensorrt_llm_engine_naming_what_sizes_it(tmp_path):
    entry = commit_trtllm_engine(tmp_path / "repo")
    result = subprocess.run(
        [
            _exe(), "--profile", "h100x2", "--backend", "tensorrt-llm", "--engine-repo",
            str(tmp_path / "repo"), "--cache-dir", str(tmp_path), "--port", "0",
            "--metrics-port", "0", "--http-port", "off", "--kv-cache-memory", "8Gi",
        ],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"engine {entry.name} is a tensorrt-llm engine" in result.stderr
    assert "kv_cache_free_fraction" in result.stderr and "Traceback" not in result.stderr


def test_the_terminal_chat_takes_the_checkpoints_sampling_defaults(
    synthetic_checkpoint, tmp_path, capsys
):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(synthetic_checkpoint, checkpoint)
    config = {"do_sample": True, "temperature": 0.7, "top_p": 0.8}
    (checkpoint / "generation_config.json").write_text(json.dumps(config))
    common = ["--checkpoint", str(checkpoint), "--cache-dir", str(tmp_path / "cache")]
    common += ["--log-json", "--log-level", "info", "--max-new-tokens", "2", "--prompt", "x"]

    def defaults(*flags: str) -> dict:
        assert main(["chat", *common, *flags]) == 0
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
        (line,) = [x for x in lines if x.get("event") == "sampling_defaults"]
        return line["without_reasoning"]

    # The engine built from the checkpoint kept its generation_config.json; the chat uses it.
    assert defaults("--sampling-defaults", "model", "--seed", "1") == {
        "temperature": 0.7,
        "top_p": 0.8,
    }
    assert defaults() == {}  # NEMOTRON_SAMPLING_DEFAULTS=none (tests/conftest.py)


def test_a_bad_sampling_defaults_value_is_refused_with_the_allowed_values(
    monkeypatch, tmp_path, capsys
):
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--sampling-defaults", "greedy"])
    assert exit_.value.code == 2
    assert "invalid choice: 'greedy' (choose from 'model', 'none')" in capsys.readouterr().err
    monkeypatch.setenv("NEMOTRON_SAMPLING_DEFAULTS", "sometimes")
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--cache-dir", str(tmp_path), "--prompt", "x"])
    assert exit_.value.code == 2
    assert "NEMOTRON_SAMPLING_DEFAULTS='sometimes': use one of model, none" in (
        capsys.readouterr().err
    )


def test_help_and_refused_flags_answer_without_importing_torch():
    # `--help` (and a flag error) should answer at once: torch's import takes seconds.
    probe = (
        "import sys\n"
        "from service.cli import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as done:\n"
        "    print('torch' in sys.modules, done.code)\n"
    )
    for args in (["--help"], ["--precision", "fp16"], ["chat", "--help"]):
        result = subprocess.run(
            [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120
        )
        assert result.stdout.splitlines()[-1] in ("False 0", "False 2"), (args, result.stdout)


def test_the_terminal_chats_flags_are_the_requests_own_and_the_defaults_fill_the_rest(
    tmp_path,
):
    from service.chat.terminal import chat_session, parse_chat_config
    from tests.service.chat.chat_templates import NEMOTRON_V1_5_TEMPLATE, byte_tokenizer
    from tests.service.scripted_engine import Reply, ScriptedEngine

    engine = ScriptedEngine(
        byte_tokenizer(tmp_path / "tok", NEMOTRON_V1_5_TEMPLATE), [Reply("Hi.")] * 3
    )

    def ran(*flags: str) -> tuple[float, float]:
        config = parse_chat_config([*flags, "--cache-dir", str(tmp_path)], {})
        session = chat_session(engine, tmp_path, config)

        async def answer() -> None:
            async for _ in session.reply("Write a haiku."):
                pass

        asyncio.run(answer())
        sampling = engine.requests[-1].options.sampling
        return round(sampling.temperature, 6), round(sampling.top_p, 6)

    # v1.5 thinks by default: its card's reasoning-on values, unless the flags say otherwise.
    assert ran() == (0.6, 0.95)
    assert ran("--temperature", "0.3") == (0.3, 0.95)
    assert ran("--sampling-defaults", "none") == (0.0, 1.0)
