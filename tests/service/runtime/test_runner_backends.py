"""The runner keeps CUDA attention off cuDNN's per-length planning (found by the GPU check)."""

from __future__ import annotations

import pytest
import torch

from engine_build.graph import ModelGraph
from engine_build.model import NemotronModel
from engine_build.synthetic import synthetic_config
from service.runtime import runner as runner_module
from service.runtime.kv_pages import PagedKVStore
from service.runtime.runner import ModelRunner, avoid_per_shape_attention_plans


@pytest.fixture
def cudnn_switch(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record calls to torch's process-wide cuDNN SDPA switch instead of flipping it."""
    calls: list[bool] = []
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", calls.append)
    return calls


def test_cuda_switches_cudnn_attention_off(cudnn_switch: list[bool]) -> None:
    avoid_per_shape_attention_plans(torch.device("cuda", 0))
    assert cudnn_switch == [False]


def test_cpu_leaves_the_backends_alone(cudnn_switch: list[bool]) -> None:
    avoid_per_shape_attention_plans(torch.device("cpu"))
    assert cudnn_switch == []


def test_every_model_runner_applies_it(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.device] = []
    monkeypatch.setattr(runner_module, "avoid_per_shape_attention_plans", seen.append)
    graph = ModelGraph.from_hf_config(synthetic_config())
    model = NemotronModel(graph).eval()
    ModelRunner(model, PagedKVStore(graph, 4, 16, model.dtype))
    assert seen == [torch.device("cpu")]
