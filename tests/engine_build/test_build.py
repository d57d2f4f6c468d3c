"""Building into the engine repository: idempotence, locking, crashes, verification, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_build.backends.base import BackendError
from engine_build.build import BuildRequest, PlanRefusedError, build_engine, prepare_build
from engine_build.checkpoint import CheckpointError
from engine_build.profiles import load_profiles
from engine_build.repository import (
    EngineMismatchError,
    EngineRepository,
    EngineRequirement,
    RepositoryError,
    checkpoint_fingerprint,
)
from engine_build.synthetic import write_synthetic_checkpoint
from tests.conftest import REPO_ROOT


@pytest.fixture()
def checkpoint(tmp_path):
    return write_synthetic_checkpoint(tmp_path / "ckpt")


def _request(checkpoint, profile="cpu", **kwargs) -> BuildRequest:
    return BuildRequest(checkpoint=checkpoint, profile=load_profiles().get(profile), **kwargs)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine_build", *args], capture_output=True, text=True
    )


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "engine_build", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_build_writes_an_entry_with_every_file_hashed(checkpoint, tmp_path):
    repo = EngineRepository(tmp_path / "repo")
    result = build_engine(_request(checkpoint), repo)
    assert not result.skipped
    entry = result.entry
    assert entry.name == "torch-cpu-bf16-tp1"
    assert entry.key.target == "cpu" and entry.key.tensor_parallel == 1
    assert entry.key.checkpoint_fingerprint == checkpoint_fingerprint(checkpoint)
    assert set(entry.files) == {
        "engine.json",
        "rank0-part0000.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }
    assert [e.engine_id for e in repo.entries()] == [entry.engine_id]
    repo.verify_files(entry)


def test_a_second_build_of_the_same_key_is_skipped(checkpoint, tmp_path):
    repo = EngineRepository(tmp_path / "repo")
    first = build_engine(_request(checkpoint), repo)
    before = (first.entry.directory / "engine.json").stat().st_mtime_ns
    second = build_engine(_request(checkpoint), repo)
    assert second.skipped and second.entry.engine_id == first.entry.engine_id
    assert (first.entry.directory / "engine.json").stat().st_mtime_ns == before
    assert len(repo.entries()) == 1


def test_different_precisions_are_different_engines(checkpoint, tmp_path):
    repo = EngineRepository(tmp_path / "repo")
    bf16 = build_engine(_request(checkpoint), repo).entry
    fp8 = build_engine(_request(checkpoint, precision="fp8"), repo).entry
    assert bf16.engine_id != fp8.engine_id
    assert [e.name for e in repo.entries()] == ["torch-cpu-bf16-tp1", "torch-cpu-fp8-tp1"]


def test_two_concurrent_builders_leave_one_valid_engine(checkpoint, tmp_path):
    repo = tmp_path / "repo"
    args = ("build", "--profile", "cpu", "--checkpoint", str(checkpoint), "--repo", str(repo))
    builders = [_cli(*args), _cli(*args)]
    outputs = [b.communicate(timeout=120) for b in builders]
    assert [b.returncode for b in builders] == [0, 0], outputs
    verdicts = sorted("skipped" if "skipped" in out else "built" for out, _ in outputs)
    assert verdicts == ["built", "skipped"]
    entries = EngineRepository(repo).entries()
    assert len(entries) == 1
    EngineRepository(repo).verify_files(entries[0])


def test_a_second_builder_waits_for_the_lock_or_exits_with_no_wait(checkpoint, tmp_path):
    repo = EngineRepository(tmp_path / "repo")
    repo.ensure_writable()
    engine_id = prepare_build(_request(checkpoint)).key.engine_id
    args = ("build", "--profile", "cpu", "--checkpoint", str(checkpoint), "--repo", str(repo.root))
    with repo.build_lock(engine_id):
        impatient = _cli(*args, "--no-wait")
        _, err = impatient.communicate(timeout=120)
        assert impatient.returncode == 2
        assert f"another builder holds the lock on engine {engine_id}; not waiting" in err
        waiting = _cli(*args)
        with pytest.raises(subprocess.TimeoutExpired):
            waiting.communicate(timeout=4)  # blocked on our lock
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert "built" in out and len(repo.entries()) == 1


KILLED_BUILD = """
import os, sys
from engine_build.backends.torch_engine import TorchBackend
from engine_build.cli import main

def die_halfway(self, job, out_dir):
    (out_dir / "rank0-part0000.safetensors").write_bytes(b"half a file")
    os._exit(137)  # like SIGKILL: no cleanup code runs

TorchBackend.build = die_halfway
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_build_leaves_no_entry_and_the_next_build_succeeds(checkpoint, tmp_path):
    repo = EngineRepository(tmp_path / "repo")
    args = ["build", "--profile", "cpu", "--checkpoint", str(checkpoint), "--repo", str(repo.root)]
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, *args], capture_output=True)
    assert killed.returncode == 137
    assert repo.entries() == []
    assert list((repo.root / "engines").iterdir()) == []
    assert len(list((repo.root / ".staging").iterdir())) == 1  # the dead build's leftovers
    with pytest.raises(EngineMismatchError, match="the repository has no engines"):
        repo.select(EngineRequirement("cpu", "cpu"))
    result = build_engine(_request(checkpoint), repo)
    assert not result.skipped
    assert list((repo.root / ".staging").iterdir()) == []  # stale staging of that id cleaned
    repo.verify_files(result.entry)


def test_a_flipped_byte_in_a_shard_is_caught_at_load_with_the_file_named(checkpoint, tmp_path):
    repo = EngineRepository(tmp_path / "repo")
    entry = build_engine(_request(checkpoint), repo).entry
    shard = entry.directory / "rank0-part0000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(EngineMismatchError, match=r"file rank0-part0000\.safetensors is corrupted"):
        repo.select(EngineRequirement("cpu", "cpu"))


def test_an_engine_for_compute_capability_9_is_refused_on_an_8_0_gpu(checkpoint, tmp_path):
    repo = EngineRepository(tmp_path / "repo")
    build_engine(_request(checkpoint, profile="h100x2"), repo)  # torch backend: runs anywhere
    with pytest.raises(EngineMismatchError) as error:
        repo.select(EngineRequirement("h100x2", "sm80"))
    message = str(error.value)
    assert "torch-h100x2-fp8-tp2" in message
    assert "built for compute capability 9.0; this device has compute capability 8.0" in message
    assert "nemotron-build build --profile h100x2" in message


def test_a_changed_checkpoint_is_refused_at_load(checkpoint, tmp_path):
    repo = EngineRepository(tmp_path / "repo")
    build_engine(_request(checkpoint), repo)
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"] * 2
    save_file(tensors, checkpoint / "model.safetensors")
    need = EngineRequirement(
        "cpu", "cpu", checkpoint_fingerprint=checkpoint_fingerprint(checkpoint)
    )
    with pytest.raises(EngineMismatchError, match="built from a different checkpoint"):
        repo.select(need)


def test_an_unknown_profile_on_the_cli_lists_the_valid_ones(checkpoint, tmp_path):
    result = _run(
        "build",
        "--profile",
        "h100x9",
        "--checkpoint",
        str(checkpoint),
        "--repo",
        str(tmp_path / "repo"),
    )
    assert result.returncode == 2
    assert "unknown profile 'h100x9'; valid profiles: ['a100x4', 'a100x8', 'h100x2', 'cpu']" in (
        result.stderr
    )


def test_a_checkpoint_that_does_not_match_its_config_is_refused(tmp_path):
    ckpt = write_synthetic_checkpoint(tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    config["block_configs"][5]["attention"] = {"n_heads_in_group": 2}  # weights say no-op
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.5\.input_layernorm"):
        build_engine(_request(ckpt), EngineRepository(tmp_path / "repo"))


def test_a_repository_path_that_is_not_writable_is_refused(checkpoint, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(RepositoryError, match=r"engine repository .* is not writable"):
        build_engine(_request(checkpoint), EngineRepository(blocker / "repo"))


# Root writes through directory permissions only by CAP_DAC_OVERRIDE. A child without it (and
# without CAP_DAC_READ_SEARCH) meets the permission bits as any user does, still as uid 0, so it
# reaches the checkpoint, the checkout and the interpreter wherever they are. setpriv (util-linux,
# in every Debian) needs only CAP_SETPCAP, which a container's root keeps by default; a mount
# namespace or `chattr +i` would need CAP_SYS_ADMIN or CAP_LINUX_IMMUTABLE, which it does not.
_WITHOUT_DAC_OVERRIDE = (
    "setpriv",
    "--inh-caps=-dac_override,-dac_read_search",
    "--bounding-set=-dac_override,-dac_read_search",
)


def _refuse_read_only_repository(checkpoint: Path, repo: Path) -> None:
    with pytest.raises(RepositoryError, match="is not writable"):
        build_engine(_request(checkpoint), EngineRepository(repo))


def test_a_read_only_repository_is_refused(checkpoint, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    repo.chmod(0o500)
    try:
        if os.geteuid() != 0:
            _refuse_read_only_repository(checkpoint, repo)
            return
        if shutil.which("setpriv") is None:
            pytest.skip("root ignores directory permissions, and setpriv is not installed")
        child = (
            "import sys; from pathlib import Path; "
            "from tests.engine_build.test_build import _refuse_read_only_repository as refuse; "
            "refuse(Path(sys.argv[1]), Path(sys.argv[2]))"
        )
        done = subprocess.run(
            [*_WITHOUT_DAC_OVERRIDE, sys.executable, "-c", child, str(checkpoint), str(repo)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
    finally:
        repo.chmod(0o700)


def test_tensorrt_llm_requested_where_it_is_not_installed_is_a_clear_error(checkpoint, tmp_path):
    with pytest.raises(
        BackendError, match="backend 'tensorrt-llm' was requested but is not installed"
    ):
        build_engine(_request(checkpoint, backend="tensorrt-llm"), EngineRepository(tmp_path / "r"))


def test_an_infeasible_profile_is_refused_before_building(tmp_path, test_profiles_file):
    config_dir = write_synthetic_checkpoint(tmp_path / "ckpt")
    profile = load_profiles([test_profiles_file]).get("cpu-tp3")  # 4 heads do not split in 3
    request = BuildRequest(checkpoint=config_dir, profile=profile)
    with pytest.raises(
        PlanRefusedError, match="num_attention_heads 4 is not divisible by tensor_parallel 3"
    ):
        build_engine(request, EngineRepository(tmp_path / "repo"))
    assert not (tmp_path / "repo" / "manifest.json").exists()


def test_list_shows_the_nim_style_names(checkpoint, tmp_path):
    repo = tmp_path / "repo"
    build_engine(_request(checkpoint, profile="h100x2"), EngineRepository(repo))
    result = _run("list", str(repo))
    assert result.returncode == 0
    assert "torch-h100x2-fp8-tp2" in result.stdout and "compute capability 9.0" in result.stdout


def test_fp8_shards_store_e4m3_matrices_with_scales_and_bf16_elsewhere(checkpoint, tmp_path):
    entry = build_engine(
        _request(checkpoint, precision="fp8"), EngineRepository(tmp_path / "r")
    ).entry
    tensors = load_file(entry.directory / "rank0-part0000.safetensors")
    assert tensors["model.layers.0.self_attn.qkv_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.qkv_proj.weight_scale"].shape == (128,)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16


def test_progress_is_logged_as_events_when_not_on_a_terminal(checkpoint, tmp_path):
    result = _run(
        "build",
        "--profile",
        "cpu",
        "--checkpoint",
        str(checkpoint),
        "--repo",
        str(tmp_path / "repo"),
    )
    assert result.returncode == 0
    assert 'build_progress job="build cpu"' in result.stderr
    assert "engine_built" in result.stderr


def test_the_scripts_entry_point_and_module_agree():
    help_text = _run("--help").stdout
    assert all(command in help_text for command in ("plan", "build", "list", "inspect"))


def test_a_damaged_engine_is_rebuilt_instead_of_skipped(checkpoint, tmp_path):
    repo = EngineRepository(tmp_path / "repo")
    first = build_engine(_request(checkpoint), repo).entry
    (first.directory / "rank0-part0000.safetensors").unlink()
    with pytest.raises(EngineMismatchError, match="is missing; rebuild it with .* --force"):
        repo.select(EngineRequirement("cpu", "cpu"))
    second = build_engine(_request(checkpoint), repo)
    assert not second.skipped and second.entry.engine_id == first.engine_id
    repo.verify_files(second.entry)


def test_force_rebuilds_a_present_engine(checkpoint, tmp_path):
    repo = EngineRepository(tmp_path / "repo")
    first = build_engine(_request(checkpoint), repo).entry
    forced = build_engine(_request(checkpoint, force=True), repo)
    assert not forced.skipped and forced.entry.created > first.created
    assert len(repo.entries()) == 1


def test_select_takes_the_newest_fitting_engine_and_checks_precision(checkpoint, tmp_path):
    repo = EngineRepository(tmp_path / "repo")
    build_engine(_request(checkpoint), repo)
    newest = build_engine(_request(checkpoint, precision="fp32"), repo).entry
    assert repo.select(EngineRequirement("cpu", "cpu")).engine_id == newest.engine_id
    with pytest.raises(EngineMismatchError, match="precision fp32, not fp8"):
        repo.select(EngineRequirement("cpu", "cpu", precision="fp8"))


def test_select_refuses_engines_of_another_backend(checkpoint, tmp_path):
    repo = EngineRepository(tmp_path / "repo")
    build_engine(_request(checkpoint), repo)
    need = EngineRequirement("cpu", "cpu", backend="tensorrt-llm")
    with pytest.raises(
        EngineMismatchError, match="built by the torch backend; this loader runs tensorrt-llm"
    ):
        repo.select(need)


def test_the_engine_id_covers_build_options_but_not_the_runtime_kv_share(checkpoint):
    from dataclasses import replace

    from engine_build.build import engine_build_options

    key = prepare_build(_request(checkpoint)).key
    assert replace(key, build_options={**key.build_options, "max_batch_size": 1}).engine_id != (
        key.engine_id
    )
    profile = load_profiles().get("cpu")
    shared = replace(profile, limits=replace(profile.limits, kv_cache_free_fraction=0.99))
    precision = profile.default_precision
    assert engine_build_options(shared, precision) == engine_build_options(profile, precision)


def test_an_int4_engine_key_records_its_int8_lm_head(checkpoint):
    from engine_build.build import engine_build_options

    cpu = load_profiles().get("cpu")
    assert engine_build_options(cpu, cpu.precision("int4"))["lm_head"] == "int8"
    assert engine_build_options(cpu, cpu.precision("int8"))["lm_head"] == "bf16"
    assert "lm_head" not in engine_build_options(cpu, cpu.precision("bf16"))


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        ("[]", "format_version"),
        ('{"format_version": 2}', "'engines' must be an object"),
        ('{"format_version": 2, "engines": []}', "'engines' must be an object"),
        ('{"format_version": 2, "engines": {"x": {"id": "x"}}}', "entry 'x' is malformed"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_a_malformed_manifest_is_a_repository_error(tmp_path, manifest, message, capsys):
    (tmp_path / "manifest.json").write_bytes(
        manifest if isinstance(manifest, bytes) else manifest.encode()
    )
    with pytest.raises(RepositoryError, match=message):
        EngineRepository(tmp_path).entries()
    from engine_build.cli import main

    assert main(["list", str(tmp_path)]) == 2
    assert "nemotron-build: error:" in capsys.readouterr().err


def _commit_one(root: str, index: int) -> None:
    from engine_build.repository import EngineKey

    repo = EngineRepository(root)
    key = EngineKey(f"fp{index}", "cpu", "torch", "v1", "bf16", "bf16", 1, "cpu")
    staging = repo.staging_dir(key.engine_id)
    (staging / "engine.json").write_text(str(index))
    repo.commit(key, staging)


def test_concurrent_commits_of_different_engines_keep_every_entry(tmp_path):
    import multiprocessing

    repo = EngineRepository(tmp_path / "repo")
    repo.ensure_writable()
    context = multiprocessing.get_context("fork")
    processes = [context.Process(target=_commit_one, args=(str(repo.root), i)) for i in range(16)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert [p.exitcode for p in processes] == [0] * 16
    assert len(repo.entries()) == 16


def test_fp8_scales_are_per_output_channel_amax_over_448(checkpoint, tmp_path):
    from safetensors.torch import load_file as load

    entry = build_engine(
        _request(checkpoint, precision="fp8"), EngineRepository(tmp_path / "r")
    ).entry
    stored = load(entry.directory / "rank0-part0000.safetensors")
    source = load(checkpoint / "model.safetensors")["model.layers.7.mlp.down_proj.weight"]
    expected = source.to(torch.bfloat16).float().abs().amax(dim=1) / 448.0
    scale = stored["model.layers.7.mlp.down_proj.weight_scale"]
    assert torch.allclose(scale, expected)
    restored = stored["model.layers.7.mlp.down_proj.weight"].float() * scale[:, None]
    relative = (restored - source).norm() / source.norm()
    assert relative < 0.05
