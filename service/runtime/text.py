"""Streaming text of one request: incremental detokenization plus stop strings across tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.runtime.tokenizer import IncrementalDetokenizer, TextTokenizer


@dataclass
class TextUpdate:
    """What one new token adds to the visible text, and whether a stop string ended it."""

    text: str
    stopped: bool


class StopTextStream:
    """Emits text as tokens arrive, holding back what could be the start of a stop string.

    A stop string may span several tokens; the text before it is emitted, the stop string and
    anything after it are not.
    """

    def __init__(self, tokenizer: TextTokenizer, stop_strings: Sequence[str]) -> None:
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = tuple(stop_strings)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._pending = ""

    def push(self, token_id: int) -> TextUpdate:
        """Add one generated token."""
        return self._advance(self._detokenizer.push(token_id), final=False)

    def finish(self) -> TextUpdate:
        """Release the held-back text at the end of generation (a stop string may still match)."""
        return self._advance(self._detokenizer.flush(), final=True)

    def _advance(self, delta: str, final: bool) -> TextUpdate:
        self._pending += delta
        cut = min((i for s in self._stops if (i := self._pending.find(s)) >= 0), default=-1)
        if cut >= 0:
            text, self._pending = self._pending[:cut], ""
            return TextUpdate(text, stopped=True)
        keep = 0 if final else self._partial_stop_length()
        text = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(text) :]
        return TextUpdate(text, stopped=False)

    def _partial_stop_length(self) -> int:
        """Length of the longest end of the pending text that begins some stop string."""
        for length in range(min(self._hold, len(self._pending)), 0, -1):
            tail = self._pending[-length:]
            if any(stop.startswith(tail) for stop in self._stops):
                return length
        return 0
