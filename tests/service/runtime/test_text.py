"""Streaming text: incremental detokenization with stop strings held back across tokens."""

from __future__ import annotations

import pytest

from engine_build.synthetic import write_byte_tokenizer
from service.runtime.text import StopTextStream
from service.runtime.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory) -> TextTokenizer:
    directory = tmp_path_factory.mktemp("bytes")
    write_byte_tokenizer(directory, eos_id=2)
    return TextTokenizer(directory)


def _stream(tokenizer, text, stops):
    stream, emitted = StopTextStream(tokenizer, stops), []
    for token in tokenizer.encode(text):
        update = stream.push(token)
        emitted.append(update.text)
        if update.stopped:
            return emitted, True
    emitted.append(stream.finish().text)
    return emitted, False


def test_a_stop_string_spanning_tokens_is_cut_and_never_emitted(byte_tokenizer):
    emitted, stopped = _stream(byte_tokenizer, "hello world, more", ["lo w"])
    assert stopped and "".join(emitted) == "hel"


def test_text_without_stop_strings_streams_whole(byte_tokenizer):
    emitted, stopped = _stream(byte_tokenizer, "naïve 🙂 café", [])
    assert not stopped and "".join(emitted) == "naïve 🙂 café"
    assert all("\ufffd" not in text for text in emitted)  # multi-byte characters arrive whole


def test_a_prefix_of_a_stop_string_that_does_not_complete_is_released(byte_tokenizer):
    emitted, stopped = _stream(byte_tokenizer, "abc ab abd", ["abz"])
    assert not stopped and "".join(emitted) == "abc ab abd"
