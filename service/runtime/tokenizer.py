"""Text <-> token ids with the checkpoint's own tokenizer and its sandboxed Jinja chat template."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

CHAT_ROLES = ("system", "user", "assistant", "tool")
# Special tokens that end an assistant turn in the chat formats we know (ChatML, Llama 3).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")
# tokenizer_config.json keys passed to chat templates, as transformers does.
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")

LONG_DECODE = 4096  # ids; shorter lists decode faster without the batch call's setup


class TokenizerError(ValueError):
    """Missing tokenizer files, a bad chat message, or a template that failed to render."""


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation; assistant turns may carry calls, tool turns the call's id."""

    role: str
    content: str
    tool_calls: tuple[dict[str, Any], ...] = ()  # {"id", "name", "arguments"} each
    tool_call_id: str | None = None

    def template_fields(self) -> dict[str, Any]:
        """The message as chat templates read it (Hugging Face's message dict)."""
        fields: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            fields["tool_calls"] = [
                {
                    "id": call.get("id", ""),
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call.get("arguments", {})},
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            fields["tool_call_id"] = self.tool_call_id
        return fields

    def __post_init__(self) -> None:
        if self.role not in CHAT_ROLES:
            raise TokenizerError(f"message role {self.role!r} is not one of {list(CHAT_ROLES)}")
        if not isinstance(self.content, str):
            raise TokenizerError(f"message content must be text, got {type(self.content).__name__}")


class ChatTemplate:
    """A checkpoint's chat template, rendered in an immutable Jinja sandbox."""

    def __init__(self, source: str) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as err:
            raise TokenizerError(f"chat template does not compile: {err}") from err

    def render(
        self,
        messages: Sequence[ChatMessage],
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str:
        """The prompt text for `messages`, ending with the assistant header when asked."""
        try:
            return self._template.render(
                messages=[m.template_fields() for m in messages],
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except Exception as err:  # a template is data: any failure in it is the template's
            raise TokenizerError(f"chat template failed to render: {err}") from err


def _tojson(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


class TextTokenizer:
    """The checkpoint's `tokenizer.json` plus the special tokens of `tokenizer_config.json`."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        tokenizer_file, config_file = (
            directory / "tokenizer.json",
            directory / "tokenizer_config.json",
        )
        for file in (tokenizer_file, config_file):
            if not file.is_file():
                raise TokenizerError(f"{directory}: missing {file.name}")
        try:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_file))
            self.config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
        except Exception as err:  # tokenizers raises a bare Exception for a malformed file
            raise TokenizerError(f"{directory}: unreadable tokenizer files ({err})") from err
        template = self.config.get("chat_template")
        self.chat_template_source = template if isinstance(template, str) else None
        self.chat_template = ChatTemplate(template) if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids, nothing is added.

        The batch encoder releases the GIL while it works (the single-text one holds it for the
        whole text, seconds for megabytes), so a large text tokenized on a worker thread leaves
        the serving loop running.
        """
        return self._tokenizer.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids` (long lists through the batch decoder, which releases the GIL)."""
        if len(ids) > LONG_DECODE:
            return self._tokenizer.decode_batch([list(ids)], skip_special_tokens)[0]
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        """The id of a token string, or None if it is not in the vocabulary."""
        return self._tokenizer.token_to_id(token)

    def special_token(self, key: str) -> str | None:
        """The text of a special token named in tokenizer_config.json (`eos_token`, ...)."""
        value = self.config.get(key)
        if isinstance(value, dict):  # serialized AddedToken
            value = value.get("content")
        return value if isinstance(value, str) else None

    def special_token_id(self, key: str) -> int | None:
        """The id of a special token named in tokenizer_config.json."""
        token = self.special_token(key)
        return None if token is None else self.token_id(token)

    def stop_token_ids(self, config_eos_ids: Sequence[int]) -> tuple[int, ...]:
        """The config's eos ids, the tokenizer's eos and any known end-of-turn token present."""
        ids = set(config_eos_ids)
        eos = self.special_token_id("eos_token")
        if eos is not None:
            ids.add(eos)
        ids.update(i for t in END_OF_TURN_TOKENS if (i := self.token_id(t)) is not None)
        return tuple(sorted(ids))

    def chat_prompt(self, messages: Sequence[ChatMessage], **variables: Any) -> str:
        """The chat prompt text for `messages`, rendered with the checkpoint's template.

        Like transformers, the template sees the special tokens (`bos_token`, `eos_token`, ...).
        """
        if self.chat_template is None:
            raise TokenizerError("this checkpoint has no chat_template in tokenizer_config.json")
        specials = {key: self.special_token(key) or "" for key in SPECIAL_TOKEN_KEYS}
        return self.chat_template.render(messages, **(specials | variables))

    def render_chat(self, messages: Sequence[ChatMessage], **variables: Any) -> list[int]:
        """Token ids of `chat_prompt`."""
        return self.encode(self.chat_prompt(messages, **variables))


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def flush(self) -> str:
        """Text still held back at the end of generation (an incomplete character as U+FFFD)."""
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :]

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""  # an incomplete multi-byte character: wait for the next token
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix) :]
