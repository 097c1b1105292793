"""Generative judges: how a (prompt, response) becomes the text a judge model reads, and how the
verdict it generates becomes a score.

**The prompt**: ``template`` with ``{prompt}`` and ``{response}`` replaced by the prompt's text (a
conversation's last user turn) and the response's text, tokenized by the judge's tokenizer as is.

**The verdict parser** (``parse_verdict``), one of:

- ``choices``: {label: score}. The verdict (the judge's greedy text, whitespace stripped, lower-cased
  unless ``case_sensitive``) matches the label it **starts with** (the longest label first, so ``no``
  and ``not sure`` are told apart); its score is that label's.
- ``regex``: the first match of the pattern in the verdict; its first group (or the whole match) read
  as a number, then mapped linearly from ``scale`` [low, high] to [0, 1] when ``scale`` is given.
- ``regex`` and ``choices`` together: the regex finds the verdict in a longer answer (a judge that
  reasons first), and its first group (or match) is scored by the choices as above.

A verdict that matches nothing, or whose number does not parse, is **unparsable**: it scores
``unparsable_score`` (default 0.0, the score of a wrong answer under a yes/no judge) and is counted
(``judge/unparsable``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pipelines.errors import ConfigError


@dataclass(frozen=True)
class VerdictSpec:
    """A verdict parser (picklable: it travels to the reward role). Exactly one of ``choices`` and ``regex``."""

    choices: tuple[tuple[str, float], ...] = ()
    regex: str | None = None
    scale: tuple[float, float] | None = None
    case_sensitive: bool = False
    unparsable_score: float = 0.0

    def __post_init__(self) -> None:
        if not self.choices and self.regex is None:
            raise ConfigError("verdict: give choices ({label: score}), a regex, or both (the regex finds the label)")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ConfigError(f"verdict.regex: {self.regex!r} does not compile ({exc})") from None
        if self.scale is not None and self.scale[0] == self.scale[1]:
            raise ConfigError(f"verdict.scale: low and high must differ, got {list(self.scale)}")


@dataclass(frozen=True)
class JudgeSpec:
    """A judge model and how to ask it (what the reward role needs to score with it)."""

    model_path: str
    template: str
    verdict: VerdictSpec
    max_new_tokens: int = 8
    max_model_len: int = 256
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.3
    dtype: str = "auto"

    def render(self, prompt: str, response: str) -> str:
        return self.template.replace("{prompt}", prompt).replace("{response}", response)


def check_template(template: str) -> None:
    """A judge template must show the judge the response (``{response}``); ``{prompt}`` is optional."""
    if "{response}" not in template:
        raise ConfigError("template: must contain {response} (and usually {prompt}): the judge reads them")


def parse_verdict(text: str, spec: VerdictSpec) -> float | None:
    """The score of one verdict, or None when it is unparsable (see the module doc)."""
    verdict = text.strip() if spec.case_sensitive else text.strip().lower()
    if spec.choices and spec.regex is not None:  # the regex finds the label in a longer answer
        found = re.search(spec.regex, text.strip(), 0 if spec.case_sensitive else re.IGNORECASE)
        if found is None:
            return None
        verdict = found.group(1) if found.groups() else found.group(0)
        verdict = verdict if spec.case_sensitive else verdict.lower()
    if spec.choices:
        labels = sorted(spec.choices, key=lambda c: -len(c[0]))
        for label, score in labels:
            key = label if spec.case_sensitive else label.lower()
            if verdict.startswith(key):
                return score
        return None
    assert spec.regex is not None
    match = re.search(spec.regex, text.strip())
    if match is None:
        return None
    try:
        value = float(match.group(1) if match.groups() else match.group(0))
    except (TypeError, ValueError):
        return None
    if spec.scale is not None:
        low, high = spec.scale
        value = (value - low) / (high - low)
    return value
