"""The stages' pictures: drawn from what a stage logged, as PNG files; nothing for what it did not log."""

import struct

from orchestrator.plots import learning_curves, reward_vs_kl, stage_plots, win_rates
from pipelines.stages.ppo import PPOStage


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


def test_an_online_stage_gets_learning_curves_and_reward_vs_kl(tmp_path):
    history = {"objective/scores": [(i, 0.1 * i) for i in range(1, 9)],
               "objective/kl": [(i, 0.02 * i) for i in range(1, 9)],
               "eval/exact_match": [(0, 0.7), (8, 0.8)], "unrelated": [(1, 3.0)]}
    curves = [m.name for m in PPOStage.HEADLINE]  # the kind's headline metrics are its panels
    made = stage_plots("ppo", curves, history, {"model": "/m"}, tmp_path / "plots")
    assert [p.name for p in made] == ["learning_curves.png", "reward_vs_kl.png"]
    width, height = _png_size(made[0])
    assert width > height > 200  # three panels side by side


def test_an_offline_stage_has_no_reward_vs_kl_and_a_stage_with_no_curves_no_picture(tmp_path):
    assert reward_vs_kl("dpo", {"loss": [(1, 0.7), (2, 0.6)]}, tmp_path / "x.png") is None
    assert learning_curves("task", (), {"loss": [(1, 0.5)]}, tmp_path / "y.png") is None  # a kind without curves
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_win_rates_with_their_intervals(tmp_path):
    comparison = {"baseline": "sft", "judge": "reward", "confidence": 0.95, "policies": [
        {"policy": "sft", "win_rate": 0.5, "win_rate_low": 0.5, "win_rate_high": 0.5},
        {"policy": "ppo", "win_rate": 0.7, "win_rate_low": 0.62, "win_rate_high": 0.78}]}
    path = win_rates("evaluate", comparison, tmp_path / "w.png")
    assert path is not None and _png_size(path)[0] > 300
