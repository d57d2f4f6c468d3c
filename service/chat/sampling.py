"""Sampling defaults as data: what a request that sets no sampling fields runs with.

In this order of precedence, per field:
1. the request's own fields;
2. the model family's defaults for the turn's reasoning mode (families.yaml: the Nemotron cards
   say temperature 0.6 and top-p 0.95 with reasoning on, greedy with it off);
3. the checkpoint's `generation_config.json` (kept through import and engine build);
4. greedy (`SamplingParams`' own defaults).

`nemotron-serve --sampling-defaults none` switches 2 and 3 off. Requests from front ends carry
the names of the fields they set (`RequestOptions.sampling_set`); a request without that record
(in-process callers, benchmarks) runs exactly as given.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from service.runtime.options import RequestOptions, SamplingParams

GENERATION_CONFIG = "generation_config.json"
# generation_config.json keys that are sampling options of ours (same names).
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class SamplingDefaults:
    """The model's defaults: the family's per reasoning mode, and the checkpoint's."""

    reasoning_on: Mapping[str, Any] = field(default_factory=dict)
    reasoning_off: Mapping[str, Any] = field(default_factory=dict)
    checkpoint: Mapping[str, Any] = field(default_factory=dict)
    checkpoint_source: str = ""  # where the checkpoint's values come from

    def values(self, thinking: bool | None) -> dict[str, Any]:
        """The defaults of a turn with reasoning on (True), off (False) or without a reasoning
        mode (None: a plain completion, or a family without a switch)."""
        merged = dict(self.checkpoint)
        if thinking is not None:
            merged.update(self.reasoning_on if thinking else self.reasoning_off)
        return merged

    def apply(self, options: RequestOptions, thinking: bool | None) -> RequestOptions:
        """`options` with every sampling field the request left unset taken from the defaults."""
        if options.sampling_set is None:
            return options
        unset = {
            name: value
            for name, value in self.values(thinking).items()
            if name not in options.sampling_set
        }
        if not unset:
            return options
        sampling = replace(options.sampling, **unset)
        return replace(options, sampling=sampling, sampling_applied=unset)

    def report(self, has_reasoning: bool) -> dict[str, Any]:
        """The defaults as GetModelInfo and the HTTP model list report them."""
        modes = {"without_reasoning": self.values(None)}
        if has_reasoning:
            modes |= {"reasoning_on": self.values(True), "reasoning_off": self.values(False)}
        return {**modes, "checkpoint_source": self.checkpoint_source}


NO_DEFAULTS = SamplingDefaults()
CHOICES = ("model", "none")  # nemotron-serve --sampling-defaults


def model_defaults(
    choice: str, on: Mapping[str, Any], off: Mapping[str, Any], engine_dir: Path
) -> SamplingDefaults:
    """The defaults a server runs with: the family's (`on`, `off`) and the engine's
    generation_config.json for `choice` "model", none for "none"."""
    if choice not in CHOICES:
        raise ValueError(f"sampling defaults {choice!r}: use one of {', '.join(CHOICES)}")
    if choice == "none":
        return NO_DEFAULTS
    checkpoint, source = checkpoint_defaults(engine_dir)
    return SamplingDefaults(on, off, checkpoint, source)


def family_defaults(entry: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(reasoning on, reasoning off) defaults of a families.yaml `sampling` entry."""
    entry = entry or {}
    on, off = dict(entry.get("reasoning_on") or {}), dict(entry.get("reasoning_off") or {})
    for values in (on, off):
        _check_names(values, "families.yaml sampling")
    return on, off


def checkpoint_defaults(directory: Path) -> tuple[dict[str, Any], str]:
    """The sampling values of a checkpoint's or engine's `generation_config.json`, and where they
    come from ("" and {} without the file; {} when it says `do_sample: false`, i.e. greedy)."""
    path = directory / GENERATION_CONFIG
    if not path.is_file():
        return {}, ""
    data = json.loads(path.read_text())
    source = str(data.get("nemotron_source") or f"{GENERATION_CONFIG} of the checkpoint")
    if data.get("do_sample") is False:
        return {}, source
    values = {k: data[k] for k in _GENERATION_KEYS if data.get(k) is not None}
    if "top_k" in values:
        values["top_k"] = int(values["top_k"])
    return values, source


def _check_names(values: Mapping[str, Any], where: str) -> None:
    unknown = set(values) - set(SamplingParams.option_names())
    if unknown:
        raise ValueError(f"{where}: unknown sampling options {sorted(unknown)}")
