"""KServe v2 / Triton gRPC end to end: `tritonclient.grpc` against a real `nemotron-serve` process.

tritonclient is Triton's own client (pinned in the test extras); its requests are the ones
services built on Triton with TensorRT-LLM send (`text_input`, `max_tokens`, ...). nemotron.v1
on the same port and engine is the reference: greedy text must agree exactly.
"""

from __future__ import annotations

import queue
import subprocess
import threading

import numpy as np
import pytest
import tritonclient.grpc as triton
from nemotron.v1 import generation_pb2 as pb
from tritonclient.utils import InferenceServerException

from bench.prompts import GREEDY_TEXT_PROMPTS
from tests.service.server_process import wait_until

pytestmark = pytest.mark.slow

MODEL = "ensemble"  # the name Triton's TensorRT-LLM deployments give the model


@pytest.fixture(scope="module")
def client(server) -> triton.InferenceServerClient:
    with triton.InferenceServerClient(server.address) as c:
        yield c


def _inputs(prompt: str, max_tokens: int, **extra: tuple[str, np.ndarray]) -> list:
    """Tensors as Triton's TensorRT-LLM clients build them: batch of one, shape [1, 1]."""
    arrays = {
        "text_input": ("BYTES", np.array([[prompt.encode()]], dtype=object)),
        "max_tokens": ("INT32", np.array([[max_tokens]], dtype=np.int32)),
        **extra,
    }
    tensors = []
    for name, (datatype, array) in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _flag(value: bool) -> tuple[str, np.ndarray]:
    return "BOOL", np.array([[value]], dtype=bool)


def _generate(server, prompt: str, max_tokens: int) -> pb.GenerateResponse:
    request = pb.GenerateRequest(
        prompt=pb.Prompt(text=prompt), limits=pb.GenerationLimits(max_new_tokens=max_tokens)
    )
    return server.api.Generate(request, timeout=60)


def test_our_protocol_files_are_tritonclients_byte_for_byte():
    from triton_proto import grpc_service_pb2, model_config_pb2

    assert grpc_service_pb2.DESCRIPTOR.serialized_pb == triton.service_pb2.DESCRIPTOR.serialized_pb
    assert (
        model_config_pb2.DESCRIPTOR.serialized_pb
        == triton.model_config_pb2.DESCRIPTOR.serialized_pb
    )


def test_health_metadata_and_config_as_triton_clients_read_them(server, client):
    assert client.is_server_live() and client.is_server_ready()
    own = server.api.GetModelInfo(pb.GetModelInfoRequest(), timeout=30).model
    for name in (MODEL, "tensorrt_llm_bls", own):
        assert client.is_model_ready(name), name
    assert client.is_model_ready(MODEL, model_version="1")
    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert metadata["name"] == MODEL and metadata["versions"] == ["1"]
    inputs = {t["name"]: (t["datatype"], t["shape"]) for t in metadata["inputs"]}
    assert inputs["text_input"] == ("BYTES", ["-1", "1"])
    assert inputs["max_tokens"] == ("INT32", ["-1", "1"])
    assert {t["name"] for t in metadata["outputs"]} >= {"text_output", "cum_log_probs"}
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert config["model_transaction_policy"]["decoupled"] is True
    assert config["max_batch_size"] == 1
    text_input = next(i for i in config["input"] if i["name"] == "text_input")
    assert text_input["data_type"] == "TYPE_STRING" and not text_input.get("optional")
    assert client.get_server_metadata(as_json=True)["name"] == "nemotron-serve"


def test_unknown_models_and_versions_get_the_protocols_errors(client):
    cases = [
        (lambda: client.is_model_ready("llama"), "StatusCode.NOT_FOUND", "unknown model: 'llama'"),
        (lambda: client.get_model_metadata(MODEL, "2"), "StatusCode.NOT_FOUND", "version 2"),
        (lambda: client.get_model_config(MODEL, "x"), "StatusCode.INVALID_ARGUMENT", "'x'"),
        (lambda: client.infer("llama", _inputs("Hi", 2)), "StatusCode.NOT_FOUND", "'llama'"),
    ]
    for call, status, words in cases:
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() == status, raised.value
        assert words in raised.value.message()


def test_infer_returns_the_same_greedy_text_as_generate(server, client):
    for prompt in GREEDY_TEXT_PROMPTS:
        expected = _generate(server, prompt, 8).text
        result = client.infer(MODEL, _inputs(prompt, 8, exclude_input_in_output=_flag(True)))
        (text,) = result.as_numpy("text_output")
        assert text.decode() == expected, prompt
    # Without exclude_input_in_output the text starts with the prompt, as TensorRT-LLM's does.
    prompt = GREEDY_TEXT_PROMPTS[0]
    (text,) = client.infer(MODEL, _inputs(prompt, 8)).as_numpy("text_output")
    assert text.decode() == prompt + _generate(server, prompt, 8).text


def test_log_probs_and_token_counts_when_asked(server, client):
    prompt = GREEDY_TEXT_PROMPTS[1]
    expected = server.api.Generate(
        pb.GenerateRequest(
            prompt=pb.Prompt(text=prompt),
            limits=pb.GenerationLimits(max_new_tokens=6, logprobs=0),
        ),
        timeout=60,
    )
    result = client.infer(
        MODEL,
        _inputs(
            prompt,
            6,
            return_log_probs=_flag(True),
            return_num_input_tokens=_flag(True),
            return_num_output_tokens=_flag(True),
        ),
    )
    chosen = [lp.logprob for lp in expected.logprobs]
    assert result.as_numpy("output_log_probs").reshape(-1) == pytest.approx(chosen, abs=1e-4)
    assert float(result.as_numpy("cum_log_probs").reshape(-1)[0]) == pytest.approx(
        sum(chosen), abs=1e-3
    )
    assert int(result.as_numpy("num_input_tokens").reshape(-1)[0]) == expected.usage.prompt_tokens
    assert int(result.as_numpy("num_output_tokens").reshape(-1)[0]) == len(expected.token_ids)


def _stream(client, requests: list[tuple[str, list]], empty_final: bool = False) -> dict:
    """Send every request on one stream; each request id's (result, error) pairs in order."""
    got: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: got.put((result, error)))
    try:
        for request_id, inputs in requests:
            client.async_stream_infer(
                MODEL, inputs, request_id=request_id, enable_empty_final_response=empty_final
            )
        by_id: dict[str, list] = {request_id: [] for request_id, _ in requests}
        by_id["errors"] = []
        finished = 0
        while finished < len(requests):  # each request ends with a final response or an error
            result, error = got.get(timeout=120)
            if error is not None:  # tritonclient gives errors without the response's id
                by_id["errors"].append(error)
                finished += 1
                continue
            response = result.get_response()
            by_id[response.id].append(result)
            finished += response.parameters["triton_final_response"].bool_param
        return by_id
    finally:
        client.stop_stream()


def test_a_stream_yields_the_deltas_in_order_and_flags_the_last(server, client):
    prompts = GREEDY_TEXT_PROMPTS[:3]
    requests = [
        (f"r{i}", _inputs(p, 16, stream=_flag(True), exclude_input_in_output=_flag(True)))
        for i, p in enumerate(prompts)
    ]
    by_id = _stream(client, requests)
    for index, prompt in enumerate(prompts):
        results = by_id[f"r{index}"]
        assert len(results) > 1  # one response per new text, not one in all
        deltas = [r.as_numpy("text_output")[0].decode() for r in results]
        assert "".join(deltas) == _generate(server, prompt, 16).text, prompt
        finals = [r.get_response().parameters["triton_final_response"].bool_param for r in results]
        assert finals == [False] * (len(results) - 1) + [True]


def test_an_empty_final_response_when_the_client_asks_for_one(server, client):
    prompt = GREEDY_TEXT_PROMPTS[2]
    counts = {"return_num_input_tokens": _flag(True), "return_num_output_tokens": _flag(True)}
    inputs = _inputs(prompt, 8, stream=_flag(True), **counts)
    results = _stream(client, [("e", inputs)], empty_final=True)["e"]
    last = results[-1]
    assert last.as_numpy("text_output") is None  # no outputs at all
    assert last.get_response().parameters["triton_final_response"].bool_param
    text = "".join(r.as_numpy("text_output")[0].decode() for r in results[:-1])
    expected = _generate(server, prompt, 8)
    assert text == expected.text
    # The finished request's counts still come, on the response before the empty one.
    assert int(results[-2].as_numpy("num_input_tokens")[0][0]) == expected.usage.prompt_tokens
    assert int(results[-2].as_numpy("num_output_tokens")[0][0]) == len(expected.token_ids)


def _bad_requests() -> list[tuple[str, object, str]]:
    """(what, inputs or a model name, words the error must hold)."""
    two = np.array([[b"a"], [b"b"]], dtype=object)
    text = triton.InferInput("text_input", [1, 1], "BYTES")
    text.set_data_from_numpy(np.array([[b"Hi"]], dtype=object))
    wrong_type = triton.InferInput("max_tokens", [1, 1], "FP32")
    wrong_type.set_data_from_numpy(np.array([[4.0]], dtype=np.float32))
    return [
        ("wrong datatype", [text, wrong_type], "'max_tokens' data-type is 'FP32'"),
        ("no text_input", _inputs("Hi", 4)[1:], "missing required input 'text_input'"),
        (
            "beam width 2",
            _inputs("Hi", 4, beam_width=("INT32", np.array([[2]], np.int32))),
            "beam search is not supported",
        ),
        ("a batch of two", _inputs("Hi", 4, text_input=("BYTES", two)), "batch size 2"),
        (
            "wrong shape",
            _inputs("Hi", 4, text_input=("BYTES", np.array([[[b"x"]]], object))),
            "unexpected shape for input 'text_input'",
        ),
        (
            "unknown input",
            _inputs("Hi", 4, colour=("INT32", np.array([[1]], np.int32))),
            "unexpected inference input 'colour'",
        ),
        ("max_tokens 0", _inputs("Hi", 0), "'max_tokens': 0"),
        ("unknown model", "llama", "unknown model: 'llama'"),
    ]


def test_bad_tensors_get_clear_errors_and_the_server_keeps_serving(server, client):
    for what, inputs, words in _bad_requests():
        model, tensors = (inputs, _inputs("Hi", 2)) if isinstance(inputs, str) else (MODEL, inputs)
        with pytest.raises(InferenceServerException) as raised:
            client.infer(model, tensors)
        assert words in raised.value.message(), what
    # In a stream the refusal comes back as the request's error and the stream goes on.
    by_id = _stream(
        client,
        [
            ("bad", _inputs("Hi", 4, beam_width=("INT32", np.array([[2]], np.int32)))),
            ("good", _inputs("Hi", 4, stream=_flag(True))),
        ],
    )
    (error,) = by_id["errors"]
    assert "beam search is not supported" in str(error)
    assert (
        by_id["good"]
        and by_id["good"][-1].get_response().parameters["triton_final_response"].bool_param
    )
    (text,) = client.infer(MODEL, _inputs("Hi", 2)).as_numpy("text_output")
    assert text.decode().startswith("Hi")


def _engine_stats(server) -> pb.GetEngineStatsResponse:
    return server.api.GetEngineStats(pb.GetEngineStatsRequest(), timeout=10)


def test_cancelling_a_stream_frees_its_kv_blocks(server, client):
    first: threading.Event = threading.Event()
    client.start_stream(callback=lambda result, error: first.set())
    long_count = _inputs("Count from 1 to 500: 1, 2, 3,", 400, stream=_flag(True))
    client.async_stream_infer(MODEL, long_count, request_id="long")
    assert first.wait(120)
    wait_until(lambda: _engine_stats(server).kv_blocks_used > 0, "the request to hold KV", 60)
    client.stop_stream(cancel_requests=True)
    wait_until(
        lambda: (s := _engine_stats(server)).kv_blocks_used == 0 and s.running_requests == 0,
        "the cancelled request's KV blocks freed",
        60,
    )
    line = server.wait_for_log(
        lambda r: (
            r.get("event") == "rpc_finished"
            and r.get("method") == "ModelStreamInfer"
            and r.get("request_id") == "long"
        ),
        "the cancelled request's record",
    )[0]
    assert line["code"] == "CANCELLED"


def test_reflection_lists_the_kserve_service(server, grpcurl):
    listed = subprocess.run(
        [grpcurl, "-plaintext", server.address, "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert "inference.GRPCInferenceService" in listed


def test_end_id_replaces_the_end_token_and_minus_one_means_none(server, client):
    prompt = GREEDY_TEXT_PROMPTS[3]
    expected = _generate(server, prompt, 8)
    end = expected.token_ids[3]
    first = list(expected.token_ids).index(end)  # it ends before end_id first appears
    counted = {"return_num_output_tokens": _flag(True), "exclude_input_in_output": _flag(True)}

    def infer(end_id: int, max_tokens: int) -> tuple[str, int]:
        result = client.infer(
            MODEL,
            _inputs(
                prompt, max_tokens, end_id=("INT32", np.array([[end_id]], np.int32)), **counted
            ),
        )
        (text,) = result.as_numpy("text_output")
        return text.decode(), int(result.as_numpy("num_output_tokens").reshape(-1)[0])

    text, count = infer(end, 8)
    assert count == first and expected.text.startswith(text)
    assert infer(-1, 40)[1] == 40  # no end token: exactly max_tokens, as benchmarks ask


def test_bytes_and_numbers_in_typed_contents_as_other_clients_send_them(server):
    import grpc
    from triton_proto import grpc_service_pb2 as kpb
    from triton_proto import grpc_service_pb2_grpc as kpb_grpc

    prompt = GREEDY_TEXT_PROMPTS[4]
    request = kpb.ModelInferRequest(model_name=MODEL, id="typed")
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    text.contents.bytes_contents.append(prompt.encode())
    limit = request.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
    limit.contents.int_contents.append(10)
    exclude = request.inputs.add(name="exclude_input_in_output", datatype="BOOL", shape=[1])
    exclude.contents.bool_contents.append(True)
    stub = kpb_grpc.GRPCInferenceServiceStub(server.channel)
    response = stub.ModelInfer(request, timeout=60)
    assert response.id == "typed" and response.outputs[0].name == "text_output"
    raw = response.raw_output_contents[0]
    assert raw[4:].decode() == _generate(server, prompt, 10).text
    # Typed contents of the wrong kind, and raw and typed data in one request, are refused.
    limit.contents.Clear()
    limit.contents.fp32_contents.append(10.0)
    with pytest.raises(grpc.RpcError) as wrong:
        stub.ModelInfer(request, timeout=60)
    assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "fp32_contents given for datatype 'INT32'" in wrong.value.details()
    limit.contents.Clear()
    limit.contents.int_contents.append(10)
    request.raw_input_contents.extend([b"", b"", b""])
    with pytest.raises(grpc.RpcError) as mixed:
        stub.ModelInfer(request, timeout=60)
    assert "must not be specified when using raw_input_contents" in mixed.value.details()


def test_calls_are_counted_and_logged_under_their_kserve_method(server, client):
    import httpx

    client.infer(MODEL, _inputs("Hi", 2), request_id="counted-1")
    line = server.wait_for_log(
        lambda r: r.get("event") == "rpc_finished" and r.get("request_id") == "counted-1",
        "the ModelInfer record",
    )[0]
    assert line["method"] == "ModelInfer" and line["code"] == "OK"
    assert line["completion_tokens"] == 2
    metrics = httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30).text
    assert 'nemotron_requests_total{code="OK",method="ModelInfer"}' in metrics
