"""Sampling defaults as data: the request's fields, then the family's per reasoning mode, then
the checkpoint's generation_config.json, then greedy; `--sampling-defaults none` is greedy."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from nemotron.v1 import generation_pb2 as pb

from service.chat.formats import Reasoning, family_of, load_families
from service.chat.sampling import checkpoint_defaults, model_defaults
from service.chat.turns import ChatContext, ChatTurn, prepare_chat_turn
from service.runtime.options import RequestOptions, SamplingParams
from service.runtime.tokenizer import ChatMessage
from tests.service.chat.chat_templates import (
    NEMOTRON_V1_5_TEMPLATE,
    NEMOTRON_V1_TEMPLATE,
    byte_tokenizer,
)
from tests.service.scripted_engine import ScriptedEngine
from tests.service.server_process import start_server, stop_server, wait_ready

HELLO = (ChatMessage(role="user", content="Write a haiku about Kubernetes."),)
UNSET = RequestOptions(sampling_set=frozenset())  # a request that set no sampling field


def _context(tmp_path, template: str, choice: str = "model") -> ChatContext:
    tokenizer = byte_tokenizer(tmp_path, template)
    family = family_of(template, load_families())
    defaults = model_defaults(choice, family.sampling_on, family.sampling_off, tmp_path)
    return ChatContext(ScriptedEngine(tokenizer, []), family, defaults)


def _ran(context: ChatContext, reasoning: Reasoning, options: RequestOptions) -> SamplingParams:
    turn = ChatTurn("t", HELLO, reasoning=reasoning, options=options)
    return prepare_chat_turn(context, turn).turn.options.sampling


@pytest.mark.parametrize(
    ("template", "family"),
    [(NEMOTRON_V1_TEMPLATE, "nemotron-v1"), (NEMOTRON_V1_5_TEMPLATE, "nemotron-v1.5")],
)
def test_nemotron_families_follow_their_cards_per_reasoning_mode(tmp_path, template, family):
    context = _context(tmp_path, template)
    assert context.family.name == family
    on = _ran(context, Reasoning.ON, UNSET)
    assert (on.temperature, on.top_p) == (0.6, 0.95)
    off = _ran(context, Reasoning.OFF, UNSET)
    assert off.greedy and off.top_p == 1.0
    # The family's default mode decides when the request does not: v1 off, v1.5 on.
    default = _ran(context, Reasoning.DEFAULT, UNSET)
    assert default.greedy is (family == "nemotron-v1")


def test_the_requests_own_fields_win_and_none_means_greedy(tmp_path):
    context = _context(tmp_path, NEMOTRON_V1_5_TEMPLATE)
    own = RequestOptions(SamplingParams(temperature=0.3), sampling_set=frozenset({"temperature"}))
    ran = _ran(context, Reasoning.ON, own)
    assert (ran.temperature, ran.top_p) == (0.3, 0.95)  # top_p still the family's
    greedy = RequestOptions(
        SamplingParams(temperature=0.0), sampling_set=frozenset({"temperature"})
    )
    assert _ran(context, Reasoning.ON, greedy).greedy
    assert _ran(_context(tmp_path, NEMOTRON_V1_5_TEMPLATE, "none"), Reasoning.ON, UNSET).greedy
    # In-process callers that build options themselves run exactly what they built.
    assert _ran(context, Reasoning.ON, RequestOptions()).greedy


def test_generation_config_values_and_their_precedence(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        json.dumps({"do_sample": True, "temperature": 0.7, "top_k": 40.0, "max_length": 9})
    )
    assert checkpoint_defaults(tmp_path) == (
        {"temperature": 0.7, "top_k": 40},
        ("generation_config.json of the checkpoint"),
    )
    context = _context(tmp_path, NEMOTRON_V1_TEMPLATE)
    on = _ran(context, Reasoning.ON, UNSET)
    assert (on.temperature, on.top_p, on.top_k) == (0.6, 0.95, 40)  # family over checkpoint
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert checkpoint_defaults(tmp_path)[0] == {}  # greedy
    with pytest.raises(ValueError, match="use one of model, none"):
        model_defaults("random", {}, {}, tmp_path)


@pytest.mark.slow
def test_the_embedded_models_card_defaults_survive_import_and_build_and_are_applied(
    cache_dir, cached_embedded_checkpoint
):
    config = json.loads((cached_embedded_checkpoint / "generation_config.json").read_text())
    assert (config["temperature"], config["top_p"]) == (0.2, 0.9)
    assert "model card" in config["nemotron_source"]
    server = start_server(cache_dir, "--sampling-defaults", "model")
    try:
        wait_ready(server)
        (line,) = server.wait_for_log(lambda r: r.get("event") == "sampling_defaults", "defaults")
        assert line["without_reasoning"] == {"temperature": 0.2, "top_p": 0.9}
        assert "model card" in line["checkpoint_source"]
        info = server.api.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).sampling_defaults
        assert info.without_reasoning.temperature == pytest.approx(0.2)
        assert info.without_reasoning.top_p == pytest.approx(0.9)
        assert not info.HasField("reasoning_on")  # SmolLM2 has no reasoning switch
        assert "model card" in info.checkpoint_source
        started = server.wait_for_log(lambda r: r.get("event") == "engine_started", "engine")[0]
        engine_dir = Path(started["engine"])
        assert json.loads((engine_dir / "generation_config.json").read_text()) == config

        def ran(request_id: str, sampling: pb.SamplingParams) -> tuple[dict, dict]:
            response = server.api.Generate(
                pb.GenerateRequest(
                    request_id=request_id,
                    prompt=pb.Prompt(text="Kubernetes is"),
                    sampling=sampling,
                    limits=pb.GenerationLimits(max_new_tokens=4),
                ),
                timeout=60,
            )
            record = server.wait_for_log(
                lambda r: r.get("event") == "rpc_finished" and r.get("request_id") == request_id,
                "the call's record",
            )[0]
            return record, _reported(response.sampling_defaults_applied)

        unset, reported = ran("defaults", pb.SamplingParams())
        assert (unset["temperature"], unset["top_p"]) == (0.2, 0.9)
        assert reported == {"temperature": 0.2, "top_p": 0.9}
        own, reported = ran("own", pb.SamplingParams(temperature=0.0))
        assert (own["temperature"], own["top_p"]) == (0.0, 0.9)
        assert reported == {"top_p": 0.9}  # the request's own temperature is not a default
        # The HTTP API and the KServe API report them too, in their own way.
        with urllib.request.urlopen(server.http_url + "/v1/models", timeout=30) as models:
            model = json.loads(models.read())["data"][0]["id"]
        chat = _post(
            server.http_url + "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        )
        assert chat["sampling_defaults_applied"] == pytest.approx(
            {"temperature": 0.2, "top_p": 0.9}
        )
        own_top_p = {"model": model, "prompt": "Hi", "max_tokens": 2, "top_p": 0.5}
        completion = _post(server.http_url + "/v1/completions", own_top_p)
        assert completion["sampling_defaults_applied"] == pytest.approx({"temperature": 0.2})
        greedy = {"model": model, "prompt": "Hi", "max_tokens": 2, "temperature": 0, "top_p": 1}
        assert "sampling_defaults_applied" not in _post(server.http_url + "/v1/completions", greedy)
        infer = _kserve_infer(server.address)
        assert json.loads(infer.parameters["sampling_defaults_applied"].string_param) == (
            pytest.approx({"temperature": 0.2, "top_p": 0.9})
        )
    finally:
        assert stop_server(server) == 0


def _reported(applied: pb.SamplingParams) -> dict[str, float]:
    """A response's sampling_defaults_applied, rounded from float32."""
    values = json_format.MessageToDict(applied, preserving_proto_field_name=True)
    return {name: round(value, 6) for name, value in values.items()}


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def _kserve_infer(address: str) -> Any:
    """A TensorRT-LLM-style ModelInfer with a prompt and a token limit, nothing else."""
    import numpy as np
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(address)
    try:
        inputs = []
        for name, value, dtype in (
            ("text_input", [["Hi"]], "BYTES"),
            ("max_tokens", [[2]], "INT32"),
        ):
            tensor = triton.InferInput(name, [1, 1], dtype)
            tensor.set_data_from_numpy(
                np.array(value, dtype=object if dtype == "BYTES" else np.int32)
            )
            inputs.append(tensor)
        return client.infer("ensemble", inputs).get_response()
    finally:
        client.close()
