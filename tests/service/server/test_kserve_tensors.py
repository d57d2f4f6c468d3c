"""KServe v2 tensors and the TensorRT-LLM contract, without a server: every malformed input is a
RequestError naming it (INVALID_ARGUMENT), never anything else."""

from __future__ import annotations

import contextlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_proto import grpc_service_pb2 as kpb

from service.runtime.interface import RequestError
from service.server.kserve.contract import check_header, infer_call
from service.server.kserve.tensors import decode_inputs, encode_bytes

MODEL = "ensemble"


def _request(*inputs: tuple[str, str, list[int], bytes]) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=MODEL)
    for name, datatype, shape, raw in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def _call(request: kpb.ModelInferRequest):
    tensors = decode_inputs(request, MODEL, check_header(MODEL))
    return infer_call(tensors, [o.name for o in request.outputs], MODEL, None)


TEXT = ("text_input", "BYTES", [1, 1], encode_bytes([b"Hello"]))


def test_a_well_formed_request_becomes_our_options():
    call = _call(
        _request(
            TEXT,
            ("max_tokens", "INT32", [1, 1], struct.pack("<i", 7)),
            ("temperature", "FP32", [1, 1], struct.pack("<f", 0.5)),
            ("stop_words", "BYTES", [1, 2], encode_bytes([b"\n\n", b""])),
            ("end_id", "INT32", [1], struct.pack("<i", -1)),
            ("beam_width", "INT32", [1, 1], struct.pack("<i", 1)),
        )
    )
    assert call.prompt == "Hello" and call.options.max_new_tokens == 7
    assert call.options.sampling.temperature == 0.5
    assert call.options.stop_strings == ("\n\n",)  # empty words ask for nothing
    assert call.options.ignore_eos and call.options.stop_token_ids == ()
    assert call.outputs == frozenset({"text_output"})


@pytest.mark.parametrize(
    ("tensor", "words"),
    [
        (("text_input", "BYTES", [1, 1], b"\x09\x00\x00\x00Hi"), "says 9 bytes"),
        (("text_input", "BYTES", [1, 1], b"\x01\x00"), "cut short"),
        (("text_input", "BYTES", [1, 1], encode_bytes([b"a", b"b"])), "string elements"),
        (("text_input", "BYTES", [1, 1], encode_bytes([b"\xff\xfe"])), "not valid UTF-8"),
        (("text_input", "INT8", [1, 1], b"\x01"), "expects 'BYTES'"),
        (("text_input", "STRING", [1, 1], b""), "not a KServe v2 datatype"),
        (("text_input", "BYTES", [1, -1], b""), "negative dimension"),
        (("text_input", "BYTES", [1, 1, 1], b""), "unexpected shape"),
        (("max_tokens", "INT32", [1, 1], b"\x01"), "expected 4 bytes"),
        (("stop_words", "BYTES", [1, 5000], b""), "5000 elements"),
        (("lora_task_id", "UINT64", [1, 1], struct.pack("<Q", 3)), "LoRA"),
        (("colour", "INT32", [1, 1], b"\x00" * 4), "unexpected inference input 'colour'"),
    ],
)
def test_malformed_inputs_are_refused_by_name(tensor, words):
    inputs = [tensor] if tensor[0] == "text_input" else [TEXT, tensor]
    with pytest.raises(RequestError, match=words):
        _call(_request(*inputs))


def test_a_shape_is_refused_before_its_data_is_read():
    # A million empty BYTES elements would take a second of Python to split: the header check
    # refuses the shape first.
    huge = ("stop_words", "BYTES", [1, 1_000_000], b"\x00\x00\x00\x00" * 1_000_000)
    with pytest.raises(RequestError, match="more than the 1024"):
        decode_inputs(_request(TEXT, huge), MODEL, check_header(MODEL))


def test_typed_contents_of_the_wrong_kind_or_beside_raw_data_are_refused():
    request = kpb.ModelInferRequest(model_name=MODEL)
    text = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"Hi")
    limit = request.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    limit.contents.int64_contents.append(3)
    with pytest.raises(RequestError, match="int64_contents given for datatype 'INT32'"):
        _call(request)
    limit.contents.Clear()
    limit.contents.int_contents.append(3)
    assert _call(request).options.max_new_tokens == 3
    limit.contents.Clear()
    with pytest.raises(RequestError, match="unable to find data for input tensor 'max_tokens'"):
        _call(request)


@settings(max_examples=300, deadline=None)
@given(
    datatype=st.sampled_from(["BYTES", "INT32", "FP32", "BOOL", "UINT64", "FP16", "nope"]),
    shape=st.lists(st.integers(-2, 3), max_size=3),
    raw=st.binary(max_size=24),
    name=st.sampled_from(["text_input", "max_tokens", "stop_words", "temperature", "x"]),
)
def test_arbitrary_tensors_are_accepted_or_refused_with_a_request_error(datatype, shape, raw, name):
    request = (
        _request(TEXT, (name, datatype, shape, raw))
        if name != "text_input"
        else _request((name, datatype, shape, raw))
    )
    with contextlib.suppress(RequestError):
        _call(request)


def test_numbers_arrive_as_python_values_whatever_their_width():
    call = _call(
        _request(
            TEXT,
            ("max_tokens", "INT64", [1, 1], np.array([5], "<i8").tobytes()),
            ("top_p", "FP64", [1], np.array([0.9], "<f8").tobytes()),
            ("seed", "UINT64", [1, 1], np.array([2**63 + 5], "<u8").tobytes()),
        )
    )
    assert call.options.max_new_tokens == 5 and call.options.sampling.top_p == pytest.approx(0.9)
    assert call.options.sampling.seed == 2**63 + 5
