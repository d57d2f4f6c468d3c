"""KServe v2 tensors in and out: a request's inputs as numpy arrays, outputs as raw contents.

An input's data comes either in `raw_input_contents` (one entry per input, in input order; BYTES
elements as a 4-byte little-endian length then the bytes, the way tritonclient sends them) or in
its typed `contents` field (`bytes_contents` for BYTES, `int_contents` for INT32, ...), never
both in one request. Outputs always go out as `raw_output_contents`, one entry per output, as
Triton sends them (the C++ client indexes that list for every output).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.runtime.interface import RequestError

# Protocol datatype -> (numpy dtype for raw contents, the typed `contents` field that holds it).
DATATYPES: dict[str, tuple[Any, str]] = {
    "BOOL": (np.bool_, "bool_contents"),
    "UINT8": (np.uint8, "uint_contents"),
    "UINT16": (np.uint16, "uint_contents"),
    "UINT32": (np.uint32, "uint_contents"),
    "UINT64": (np.uint64, "uint64_contents"),
    "INT8": (np.int8, "int_contents"),
    "INT16": (np.int16, "int_contents"),
    "INT32": (np.int32, "int_contents"),
    "INT64": (np.int64, "int64_contents"),
    "FP16": (np.float16, "fp32_contents"),
    "FP32": (np.float32, "fp32_contents"),
    "FP64": (np.float64, "fp64_contents"),
    "BYTES": (np.object_, "bytes_contents"),
}
_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Tensor:
    """One decoded input: its protocol datatype and its elements (shape as sent)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: np.ndarray


HeaderCheck = Callable[[str, str, tuple[int, ...]], None]


def decode_inputs(request: Any, model: str, check: HeaderCheck | None = None) -> dict[str, Tensor]:
    """Every input of a ModelInferRequest, by name; malformed ones refused with their name.

    `check(name, datatype, shape)` refuses an input before its data is read (so a shape the
    contract refuses costs nothing to decode).
    """
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise RequestError(
            f"raw_input_contents holds {len(raw)} entries for {len(request.inputs)} inputs of "
            f"model '{model}': send one per input, in input order"
        )
    tensors: dict[str, Tensor] = {}
    for index, tensor in enumerate(request.inputs):
        name = tensor.name
        if name in tensors:
            raise RequestError(f"input '{name}' is given twice for model '{model}'")
        if tensor.datatype not in DATATYPES:
            allowed = ", ".join(DATATYPES)
            raise RequestError(
                f"input '{name}': datatype '{tensor.datatype}' is not a KServe v2 datatype "
                f"({allowed})"
            )
        shape = tuple(int(d) for d in tensor.shape)
        if any(d < 0 for d in shape):
            raise RequestError(f"input '{name}': shape {list(shape)} has a negative dimension")
        if check is not None:
            check(name, tensor.datatype, shape)
        count = math.prod(shape)
        if raw:
            if tensor.HasField("contents"):
                raise RequestError(
                    f"contents field must not be specified when using raw_input_contents for "
                    f"'{name}' for model '{model}'"
                )
            values = _from_raw(name, tensor.datatype, raw[index], count)
        else:
            values = _from_contents(name, tensor.datatype, tensor.contents, count, model)
        tensors[name] = Tensor(name, tensor.datatype, shape, values)
    return tensors


def _from_raw(name: str, datatype: str, data: bytes, count: int) -> np.ndarray:
    if datatype == "BYTES":
        return np.array(_split_bytes(name, data, count), dtype=np.object_)
    dtype = np.dtype(DATATYPES[datatype][0])
    if len(data) != count * dtype.itemsize:
        raise RequestError(
            f"input byte size mismatch for input '{name}': expected {count * dtype.itemsize} "
            f"bytes ({count} x {datatype}), got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype)


def _split_bytes(name: str, data: bytes, count: int) -> list[bytes]:
    """BYTES elements of a raw buffer: each a 4-byte little-endian length, then the bytes."""
    items, offset = [], 0
    while offset < len(data):
        if offset + _LENGTH.size > len(data):
            raise RequestError(f"input '{name}': a BYTES element's 4-byte length is cut short")
        (length,) = _LENGTH.unpack_from(data, offset)
        offset += _LENGTH.size
        if offset + length > len(data):
            raise RequestError(
                f"input '{name}': a BYTES element says {length} bytes, but only "
                f"{len(data) - offset} remain"
            )
        items.append(bytes(data[offset : offset + length]))
        offset += length
        if len(items) > count:
            break
    if len(items) != count:
        raise RequestError(
            f"unexpected number of string elements {len(items)} for input '{name}': its shape "
            f"holds {count}"
        )
    return items


def _from_contents(name: str, datatype: str, contents: Any, count: int, model: str) -> np.ndarray:
    dtype, field = DATATYPES[datatype]
    values = list(getattr(contents, field))
    others = [
        f.name
        for f, _ in contents.ListFields()
        if f.name != field and len(getattr(contents, f.name))
    ]
    if others:
        raise RequestError(
            f"unexpected explicit tensor data for input tensor '{name}' for model '{model}': "
            f"{others[0]} given for datatype '{datatype}', which goes in {field}"
        )
    if not values and count:
        raise RequestError(f"unable to find data for input tensor '{name}' for model '{model}'")
    if len(values) != count:
        raise RequestError(
            f"input '{name}': {len(values)} elements in {field}, its shape holds {count}"
        )
    if datatype == "BYTES":
        return np.array([bytes(v) for v in values], dtype=np.object_)
    try:
        return np.array(values, dtype=dtype)
    except OverflowError:
        raise RequestError(f"input '{name}': a value is out of range for {datatype}") from None


def encode_bytes(items: list[bytes]) -> bytes:
    """BYTES elements as one raw buffer (a 4-byte little-endian length before each)."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def encode_output(
    response: Any, name: str, datatype: str, shape: tuple[int, ...], raw: bytes
) -> None:
    """Append one output (its metadata and its raw contents) to a ModelInferResponse."""
    output = response.outputs.add()
    output.name, output.datatype = name, datatype
    output.shape.extend(shape)
    response.raw_output_contents.append(raw)
