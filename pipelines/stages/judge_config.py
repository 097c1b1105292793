"""The config of a generative judge reward (``reward.judge``): the judge model, the template it
reads and the verdict parser (``pipelines.data.judges``)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from pipelines.data.judges import JudgeSpec, VerdictSpec, check_template
from pipelines.errors import ConfigError
from pipelines.stages.base import Frozen, PathOrRef


class VerdictConfig(Frozen):
    """How a judge's verdict becomes a score (``pipelines.data.judges``): a choice set, a regex, or a
    regex that finds the label a choice set scores."""

    choices: dict[str, float] | None = Field(None, description="label -> score; the verdict matches the label it "
                                             "starts with (longest first), e.g. {yes: 1.0, no: 0.0}")
    regex: str | None = Field(None, description="the first match's first group (or the match) read as a number; with "
                              "choices: the label it finds, scored by them")
    scale: tuple[float, float] | None = Field(None, description="regex: map [low, high] linearly onto [0, 1]")
    case_sensitive: bool = False
    unparsable_score: float = Field(0.0, description="the score of a verdict that matches nothing (counted as "
                                    "judge/unparsable)")

    def spec(self) -> VerdictSpec:
        return VerdictSpec(tuple((self.choices or {}).items()), self.regex, self.scale, self.case_sensitive,
                           self.unparsable_score)

    @model_validator(mode="after")
    def _parses(self) -> VerdictConfig:
        try:
            self.spec()
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("verdict: ")) from None
        return self


class JudgeConfig(Frozen):
    """A generative judge: a causal LM that reads ``template`` (with ``{prompt}`` and ``{response}``)
    and generates a verdict, greedily, on a vLLM engine in the reward role."""

    model: PathOrRef = Field(description="the judge model (a path, hub id or a stage's model)")
    template: str = Field(description="the text the judge reads; {prompt} and {response} are replaced")
    verdict: VerdictConfig
    max_new_tokens: int = Field(8, ge=1, description="tokens of the verdict")
    max_model_len: int = Field(256, ge=8, description="the judge engine's context: template + verdict")
    kv_cache_gib: float = Field(1.0, gt=0, description="CPU engines: KV-cache size")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)

    @field_validator("template")
    @classmethod
    def _shows_the_response(cls, value: str) -> str:
        try:
            check_template(value)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("template: ")) from None
        return value

    def spec(self, model_path: str, *, gpu: bool) -> JudgeSpec:
        return JudgeSpec(model_path, self.template, self.verdict.spec(), self.max_new_tokens, self.max_model_len,
                         self.kv_cache_gib, self.gpu_memory_utilization, "auto" if gpu else "float32")
