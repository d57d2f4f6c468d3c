"""Profiles as data: the shipped file, users' own files, and validation errors."""

from __future__ import annotations

import pytest

from engine_build.profiles import DeviceKind, Dtype, ProfileError, load_profiles


@pytest.fixture(scope="module")
def profiles():
    return load_profiles()


def test_builtin_profiles_follow_the_hardware_table(profiles):
    assert profiles.names == ["a100x4", "a100x8", "h100x2", "cpu"]
    a100x4, a100x8, h100x2 = (profiles.get(n) for n in ("a100x4", "a100x8", "h100x2"))
    assert (a100x4.gpu_count * a100x4.memory_gb, a100x4.tensor_parallel) == (320, 4)
    assert (a100x8.gpu_count * a100x8.memory_gb, a100x8.tensor_parallel) == (640, 8)
    assert (h100x2.gpu_count * h100x2.memory_gb, h100x2.tensor_parallel) == (188, 2)
    assert [p.name for p in a100x4.precisions] == ["bf16"]
    assert h100x2.default_precision.weights is Dtype.FP8
    assert h100x2.default_precision.kv_cache is Dtype.FP8
    assert (a100x4.target, h100x2.target) == ("sm80", "sm90")
    cpu = profiles.get("cpu")
    assert cpu.device is DeviceKind.CPU and cpu.target == "cpu"
    assert {p.name for p in cpu.precisions} >= {"bf16", "fp32"}


@pytest.mark.parametrize(
    ("product", "expected"),
    [
        ("NVIDIA-A100-SXM4-80GB", {"a100x4", "a100x8"}),
        ("NVIDIA A100 80GB PCIe", {"a100x4", "a100x8"}),
        ("NVIDIA-H100-NVL", {"h100x2"}),
        ("NVIDIA H100 NVL", {"h100x2"}),
        ("NVIDIA-A100-SXM4-40GB", set()),
        ("NVIDIA-L4", set()),
    ],
)
def test_gpu_products_match_gfd_labels_and_nvml_names_by_pattern(profiles, product, expected):
    assert {p.name for p in profiles.profiles.values() if p.matches_gpu(product)} == expected


def test_an_unknown_profile_lists_the_valid_ones(profiles):
    with pytest.raises(ProfileError, match=r"unknown profile 'h200x1'; valid profiles: \['a100x4'"):
        profiles.get("h200x1")


def test_a_precision_the_profile_does_not_allow_is_refused(profiles):
    with pytest.raises(ProfileError, match=r"does not allow precision 'fp8'; allowed: \['bf16'\]"):
        profiles.get("a100x4").precision("fp8")


def test_users_add_profiles_in_their_own_file(test_profiles_file):
    profiles = load_profiles([test_profiles_file])
    assert profiles.get("cpu-tp3").tensor_parallel == 3
    assert "a100x4" in profiles.names


def _write(tmp_path, body: str):
    path = tmp_path / "mine.yaml"
    path.write_text(body)
    return path


GOOD = """
profiles:
  l40sx2:
    device: gpu
    gpu: {products: ["*L40S*"], count: 2, compute_capability: "8.9"}
    memory_gb: 48
    reserve_gb: 2
    tensor_parallel: 2
    precisions: [{weights: fp8, kv_cache: fp8}]
    limits: {max_batch_size: 8, max_seq_len: 8192, max_num_tokens: 4096,
             kv_cache_free_fraction: 0.9}
"""


def test_a_valid_user_gpu_profile_loads(tmp_path):
    profile = load_profiles([_write(tmp_path, GOOD)]).get("l40sx2")
    assert profile.target == "sm89" and profile.matches_gpu("NVIDIA-L40S")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("l40sx2:", "a100x4:"), "profile 'a100x4' is already defined in built-in profiles.yaml"),
        (("memory_gb: 48", "memory_gb: -4"), r"profiles\.l40sx2\.memory_gb: -4 must be a number"),
        (
            ("reserve_gb: 2", "reserve_gb: 2\n    color: blue"),
            r"profiles\.l40sx2\.color: unknown field",
        ),
        (("tensor_parallel: 2", "tensor_parallel: 4"), "4 must equal gpu.count 2"),
        (('"8.9"', '"8.0"'), "FP8 needs compute capability 8.9 or newer; this GPU is 8.0"),
        (("device: gpu", "device: tpu"), r"device: 'tpu' is not one of \['gpu', 'cpu'\]"),
        (("weights: fp8", "weights: int3"), r"weights: 'int3' is not one of"),
        (("max_batch_size: 8, ", ""), r"limits\.max_batch_size: missing"),
        (("profiles:", "profiles: [oops]\nx:"), "not valid YAML|expected a mapping"),
    ],
)
def test_invalid_user_profiles_name_the_file_and_field(tmp_path, edit, message):
    path = _write(tmp_path, GOOD.replace(*edit))
    with pytest.raises(ProfileError, match=message):
        load_profiles([path])


def test_a_missing_profile_file_is_named(tmp_path):
    with pytest.raises(ProfileError, match="profile file not found"):
        load_profiles([tmp_path / "absent.yaml"])
