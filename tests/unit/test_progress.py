"""The progress line keeps a stage's whole name at any terminal width; the metrics are what gets cut."""

import io

import pytest
from rich.console import Console

from orchestrator.progress import StageProgress
from pipelines.stages.onpolicy_dpo import OnPolicyDPOStage


@pytest.mark.parametrize("width", [60, 80, 120])
def test_the_stage_name_is_never_cut(width):
    buf = io.StringIO()
    headline = {m.name: m.label for m in OnPolicyDPOStage.HEADLINE}  # the kind's own metrics and labels
    with StageProgress("onpolicy_dpo_rejection", headline, console=Console(file=buf, width=width)) as progress:
        progress.update(5, 30, {"loss": 0.5, "objective/scores": 0.7, "objective/kl": 0.1, "eval/exact_match": 0.8,
                                "rewards/accuracies": 0.6, "unrelated/metric": 9.0})
    lines = [line for line in buf.getvalue().splitlines() if line.strip()]
    assert len(lines) == 1, lines  # one line per stage
    assert lines[0].startswith("onpolicy_dpo_rejection ")
    assert "5/30" in lines[0] and "unrelated" not in lines[0]
    if width >= 120:  # room for the first four headline metrics, in order
        assert "score=0.700  kl=0.100  loss=0.500  acc=0.600" in lines[0]
