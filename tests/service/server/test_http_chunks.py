"""Stream chunks written from a template are the bytes the pydantic models write."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.server.openai import protocol as api
from service.server.openai.app import TextChunk, openai_json


def completion(text: str) -> api.Completion:
    choice = api.CompletionChoice(index=2, text=text)
    return api.Completion(id="cmpl-1", created=7, model="m", choices=[choice])


def chat_content(text: str) -> api.ChatCompletion:
    choice = api.ChatChoice(index=0, delta=api.AssistantMessage(content=text))
    return api.ChatCompletion(
        id="chatcmpl-1", object="chat.completion.chunk", created=7, model="m", choices=[choice]
    )


def chat_reasoning(text: str) -> api.ChatCompletion:
    delta = api.AssistantMessage(reasoning_content=text, reasoning=text)
    choice = api.ChatChoice(index=0, delta=delta)
    return api.ChatCompletion(
        id="chatcmpl-1", object="chat.completion.chunk", created=7, model="m", choices=[choice]
    )


TEXTS = st.one_of(
    st.text(),
    st.sampled_from(['"', "\\", "\x00text\x00", "\\u0000text\\u0000", "\n\r\t", "é漢🙂", "\ud800"]),
)


@pytest.mark.parametrize("make", [completion, chat_content, chat_reasoning])
@given(text=TEXTS)
def test_a_templated_chunk_is_what_the_model_writes(make, text: str) -> None:
    written = TextChunk(make)(text)
    assert written == openai_json(make(text))
    assert json.loads(written)["choices"][0]["finish_reason"] is None


def test_a_chunk_without_the_text_is_refused() -> None:
    with pytest.raises(ValueError, match="does not carry its text"):
        TextChunk(lambda text: completion("fixed"))
