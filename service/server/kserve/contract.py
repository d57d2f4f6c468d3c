"""The TensorRT-LLM backend's tensor contract (its `ensemble` and `tensorrt_llm_bls` models),
mapped onto our generation requests.

Clients of Triton with TensorRT-LLM send `text_input` (BYTES) and `max_tokens` (INT32) with a
batch dimension of one (shape [1, 1]; [1] is taken too), and optional sampling and output
switches; they read `text_output` (BYTES, shape [1]). Every input of that contract is either
honoured here or refused with an error naming it; an input outside it is refused as Triton
refuses it (`unexpected inference input`). docs/service.md ("For Triton users") lists both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.runtime.interface import RequestError
from service.runtime.options import RequestOptions
from service.server.kserve.tensors import Tensor


@dataclass(frozen=True)
class InputSpec:
    """One input of the contract: its datatype and per-request dims (after the batch dim)."""

    name: str
    datatype: str
    dims: tuple[int, ...] = (1,)
    optional: bool = True
    refused: str | None = None  # why a value other than `neutral` is refused (None: honoured)
    neutral: Any = None  # the value that asks for nothing (accepted where `refused` is set)


# Integer inputs take any integer datatype and float inputs either float width: clients build
# them from numpy arrays whose default dtypes vary; the declared one is listed first.
INTEGER_TYPES = ("INT32", "UINT32", "INT64", "UINT64", "INT16", "UINT16", "INT8", "UINT8")
FLOAT_TYPES = ("FP32", "FP64", "FP16")

_BEAMS = "beam search is not supported (one sequence per request): leave it 1 or unset"
_NOT_HERE = "is not supported by this server"
INPUTS: tuple[InputSpec, ...] = (
    InputSpec("text_input", "BYTES", optional=False),
    InputSpec("max_tokens", "INT32"),
    InputSpec("stream", "BOOL"),
    InputSpec("temperature", "FP32"),
    InputSpec("top_k", "INT32"),
    InputSpec("top_p", "FP32"),
    InputSpec("repetition_penalty", "FP32"),
    InputSpec("presence_penalty", "FP32"),
    InputSpec("frequency_penalty", "FP32"),
    InputSpec("seed", "UINT64"),
    InputSpec("random_seed", "UINT64"),  # the older backends' name for `seed`
    InputSpec("stop_words", "BYTES", dims=(-1,)),
    InputSpec("end_id", "INT32"),  # replaces the end-of-sequence token (-1: none)
    InputSpec("pad_id", "INT32"),  # outputs are never padded: accepted, nothing to do
    InputSpec("exclude_input_in_output", "BOOL"),
    InputSpec("return_log_probs", "BOOL"),
    InputSpec("return_num_input_tokens", "BOOL"),
    InputSpec("return_num_output_tokens", "BOOL"),
    InputSpec("length_penalty", "FP32"),  # a beam-search score: no effect at beam width 1
    InputSpec("beam_width", "INT32", refused=_BEAMS, neutral=1),
    InputSpec("num_return_sequences", "INT32", refused=_BEAMS, neutral=1),
    InputSpec("min_tokens", "INT32", refused=f"a minimum length {_NOT_HERE}", neutral=0),
    InputSpec("min_length", "INT32", refused=f"a minimum length {_NOT_HERE}", neutral=0),
    InputSpec("bad_words", "BYTES", dims=(-1,), refused=f"bad_words {_NOT_HERE}", neutral=b""),
    InputSpec("return_context_logits", "BOOL", refused=f"logits {_NOT_HERE}", neutral=False),
    InputSpec("return_generation_logits", "BOOL", refused=f"logits {_NOT_HERE}", neutral=False),
    InputSpec("return_perf_metrics", "BOOL", refused=f"perf metrics {_NOT_HERE}", neutral=False),
    InputSpec(
        "embedding_bias_words",
        "BYTES",
        dims=(-1,),
        refused=f"embedding bias {_NOT_HERE}",
        neutral=b"",
    ),
    InputSpec("embedding_bias_weights", "FP32", dims=(-1,), refused=f"embedding bias {_NOT_HERE}"),
    InputSpec("decoder_text_input", "BYTES", refused="the model has no encoder-decoder input"),
    InputSpec("guided_decoding_guide_type", "BYTES", refused=f"guided decoding {_NOT_HERE}"),
    InputSpec("guided_decoding_guide", "BYTES", refused=f"guided decoding {_NOT_HERE}"),
    InputSpec("prompt_embedding_table", "FP16", dims=(-1, -1), refused=f"p-tuning {_NOT_HERE}"),
    InputSpec("prompt_vocab_size", "INT32", refused=f"p-tuning {_NOT_HERE}"),
    InputSpec("prompt_table_extra_id", "UINT64", refused=f"p-tuning {_NOT_HERE}"),
    InputSpec("lora_task_id", "UINT64", refused=f"LoRA {_NOT_HERE}"),
    InputSpec("lora_weights", "FP16", dims=(-1, -1), refused=f"LoRA {_NOT_HERE}"),
    InputSpec("lora_config", "INT32", dims=(-1, 3), refused=f"LoRA {_NOT_HERE}"),
    InputSpec("num_draft_tokens", "INT32", refused=f"speculative decoding {_NOT_HERE}", neutral=0),
    InputSpec(
        "use_draft_logits", "BOOL", refused=f"speculative decoding {_NOT_HERE}", neutral=False
    ),
    InputSpec("image_input", "FP16", dims=(-1, 3, -1, -1), refused="the model takes text only"),
    InputSpec("image_bytes_input", "UINT8", dims=(-1, -1, -1), refused="the model takes text only"),
    InputSpec("image_url_input", "BYTES", refused="the model takes text only"),
    InputSpec("video_bytes_input", "UINT8", dims=(-1, -1, -1), refused="the model takes text only"),
)
INPUT_SPECS = {spec.name: spec for spec in INPUTS}
_SAMPLING_INPUTS = (
    "temperature",
    "top_k",
    "top_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)


@dataclass(frozen=True)
class OutputSpec:
    """One output: datatype and dims as ModelMetadata reports them."""

    name: str
    datatype: str
    dims: tuple[int, ...]


OUTPUTS: tuple[OutputSpec, ...] = (
    OutputSpec("text_output", "BYTES", (-1,)),
    OutputSpec("cum_log_probs", "FP32", (-1,)),
    OutputSpec("output_log_probs", "FP32", (-1, -1)),
    OutputSpec("num_input_tokens", "INT32", (1,)),
    OutputSpec("num_output_tokens", "INT32", (1,)),
)
OUTPUT_NAMES = tuple(o.name for o in OUTPUTS)


@dataclass(frozen=True)
class InferCall:
    """What one ModelInferRequest asks for, in our terms."""

    prompt: str
    options: RequestOptions
    stream: bool = False
    exclude_input: bool = False
    outputs: frozenset[str] = field(default_factory=frozenset)  # the outputs to send


MAX_ELEMENTS = 1024  # per list input (stop words): far above what the engine accepts


def check_header(model: str) -> Callable[[str, str, tuple[int, ...]], None]:
    """The check of an input's name, datatype and shape against the contract, run before its
    data is decoded."""

    def check(name: str, datatype: str, shape: tuple[int, ...]) -> None:
        spec = INPUT_SPECS.get(name)
        if spec is None:
            raise RequestError(f"unexpected inference input '{name}' for model '{model}'")
        _check_header(spec, datatype, shape, model)

    return check


def infer_call(
    tensors: dict[str, Tensor], requested: list[str], model: str, deadline: float | None
) -> InferCall:
    """Build the call from inputs `check_header` passed; the first problem raises."""
    values = {name: t.values.reshape(-1).tolist() for name, t in tensors.items()}
    if "text_input" not in values:
        raise RequestError(
            f"missing required input 'text_input' for model '{model}' (BYTES, shape [1, 1])"
        )
    for name, value in values.items():
        spec = INPUT_SPECS[name]
        if spec.refused is not None and not _is_neutral(spec, value):
            raise RequestError(f"input '{name}': {spec.refused}")
    for name in requested:
        if name not in OUTPUT_NAMES:
            raise RequestError(f"unexpected inference output '{name}' for model '{model}'")
    prompt = _text(values["text_input"][0], "text_input")
    log_probs = bool(values.get("return_log_probs", [False])[0])
    wanted = {"text_output"}
    if log_probs:
        wanted |= {"cum_log_probs", "output_log_probs"}
    for name in ("num_input_tokens", "num_output_tokens"):
        if values.get(f"return_{name}", [False])[0]:
            wanted.add(name)
    if requested:
        wanted &= set(requested)
    return InferCall(
        prompt=prompt,
        options=_options(values, log_probs, deadline),
        stream=bool(values.get("stream", [False])[0]),
        exclude_input=bool(values.get("exclude_input_in_output", [False])[0]),
        outputs=frozenset(wanted),
    )


def _check_header(spec: InputSpec, datatype: str, shape: tuple[int, ...], model: str) -> None:
    """Refuse a datatype or shape the contract does not take for `spec`."""
    allowed = _datatypes(spec)
    if datatype not in allowed:
        raise RequestError(
            f"inference input '{spec.name}' data-type is '{datatype}', but model "
            f"'{model}' expects '{spec.datatype}'"
            + (f" (or {', '.join(allowed[1:])})" if len(allowed) > 1 else "")
        )
    batch_free = shape[1:] if len(shape) == len(spec.dims) + 1 else shape
    if len(shape) == len(spec.dims) + 1 and shape[0] != 1:
        raise RequestError(
            f"input '{spec.name}': batch size {shape[0]}; this server takes one prompt per "
            "request (send a request per prompt, concurrently: they are batched in the engine)"
        )
    if len(batch_free) != len(spec.dims) or any(
        want != -1 and got != want for want, got in zip(spec.dims, batch_free, strict=True)
    ):
        expected = [1, *spec.dims]
        raise RequestError(
            f"unexpected shape for input '{spec.name}' for model '{model}': expected "
            f"{expected} (a batch of one) or {list(spec.dims)}, got {list(shape)}"
        )
    if math.prod(shape) > MAX_ELEMENTS:
        raise RequestError(
            f"input '{spec.name}': {math.prod(shape)} elements, more than the {MAX_ELEMENTS} "
            "this server reads"
        )


def _datatypes(spec: InputSpec) -> tuple[str, ...]:
    if spec.datatype in INTEGER_TYPES:
        return (spec.datatype, *(t for t in INTEGER_TYPES if t != spec.datatype))
    if spec.datatype in FLOAT_TYPES:
        return (spec.datatype, *(t for t in FLOAT_TYPES if t != spec.datatype))
    return (spec.datatype,)


def _is_neutral(spec: InputSpec, values: list[Any]) -> bool:
    """An empty input, or one holding only the value that asks for nothing."""
    return all(spec.neutral is not None and v == spec.neutral for v in values)


def _text(value: Any, name: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError as error:
        raise RequestError(f"input '{name}': not valid UTF-8 ({error.reason})") from None


def _options(
    values: dict[str, list[Any]], log_probs: bool, deadline: float | None
) -> RequestOptions:
    sampling: dict[str, Any] = {}
    for name in _SAMPLING_INPUTS:  # ranges (and NaN) are the engine's one validation's
        if name in values:
            sampling[name] = values[name][0]
    seeds = [values[n][0] for n in ("seed", "random_seed") if n in values]
    if seeds:
        sampling["seed"] = int(seeds[0])
    stop_words = tuple(_text(w, "stop_words") for w in values.get("stop_words", []) if bytes(w))
    # TensorRT-LLM's end_id replaces the model's end-of-sequence token: the request ends at
    # end_id instead, and at nothing with -1 (benchmarks ask for fixed output lengths so).
    end_id = int(values["end_id"][0]) if "end_id" in values else None
    if end_id is not None and end_id < -1:
        raise RequestError(f"input 'end_id': {end_id} is not a token id (-1: no end token)")
    stop_ids = (end_id,) if end_id is not None and end_id >= 0 else ()
    max_tokens = int(values["max_tokens"][0]) if "max_tokens" in values else None
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"input 'max_tokens': {max_tokens} is not allowed; it must be >= 1")
    return RequestOptions.asked(
        sampling,
        max_new_tokens=max_tokens,
        stop_strings=stop_words,
        stop_token_ids=stop_ids,
        ignore_eos=end_id is not None,
        logprobs=0 if log_probs else None,
        deadline=deadline,
    )
