"""What a resume reuses (config hashes), the run state file, and atomic checkpoints: a write
interrupted before or between its renames leaves the previous checkpoint in place and loadable."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from actors.fsutil import atomic_directory, recover_directory
from orchestrator.config import validate_pipeline
from orchestrator.run_state import RunState, StageRecord, find_run_dir, stage_hashes
from pipelines.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def _quickstart(overrides: dict | None = None) -> dict:
    raw = yaml.safe_load((ROOT / "pipelines" / "quickstart.yaml").read_text())
    for (stage, key), value in (overrides or {}).items():
        next(s for s in raw["stages"] if s["name"] == stage)[key] = value
    return raw


def _changed(overrides: dict | None = None) -> set[str]:
    before = stage_hashes(validate_pipeline(_quickstart()))
    after = stage_hashes(validate_pipeline(_quickstart(overrides)))
    return {name for name in before if before[name] != after[name]}


def test_changing_a_stage_invalidates_it_and_everything_downstream():
    steps = {"steps": 300, "pairs_per_step": 32, "pairs_per_microbatch": 32}
    # the quickstart's evaluate stage reads every policy stage: it is downstream of each
    assert _changed({("offline_dpo", "schedule"): steps}) == {"offline_dpo", "onpolicy_dpo", "ppo", "evaluate"}
    assert _changed({("rm", "loss"): {"centering_coef": 0.1}}) == {"rm", "ppo", "evaluate"}  # ppo's critic reads rm
    assert _changed({("ppo", "sampling"): {"samples_per_prompt": 2, "max_new_tokens": 6}}) == {"ppo", "evaluate"}
    assert _changed({("evaluate", "sampling"): {"samples_per_prompt": 2, "max_new_tokens": 6}}) == {"evaluate"}


def test_same_config_same_hashes_and_checkpoint_interval_is_not_part_of_them():
    assert _changed() == set()
    assert _changed({("sft", "checkpoint"): {"every": 7}}) == set()


def test_state_file_round_trip_and_latest_run(tmp_path):
    config = validate_pipeline(_quickstart() | {"run_dir": str(tmp_path)})
    with pytest.raises(UserError, match="no earlier run of pipeline 'quickstart'"):
        find_run_dir(config, None)
    for run_id in ("20261101-000000-aaaaaa", "20261102-000000-bbbbbb"):
        (tmp_path / "quickstart" / run_id).mkdir(parents=True)
        RunState(run_id, "quickstart", "p" + run_id[-1], "sqlite:///x.db",
                 {"sft": StageRecord("h", "completed", "c", {"model": "/m"})}).save(tmp_path / "quickstart" / run_id)
    latest = find_run_dir(config, None)
    assert latest.name == "20261102-000000-bbbbbb"
    assert RunState.load(latest).stages["sft"] == StageRecord("h", "completed", "c", {"model": "/m"})
    with pytest.raises(UserError, match="no run 'nope'"):
        find_run_dir(config, "nope")


def test_exception_inside_the_write_keeps_the_previous_directory(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_directory(target) as tmp:
        (tmp / "step").write_text("20")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "step").write_text("4")
        raise RuntimeError("crash while writing")
    assert (target / "step").read_text() == "20"
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]


def _killed_writer(target: Path, between_renames: bool) -> None:
    """A process that starts replacing ``target`` and is SIGKILLed before the rename (or between
    moving the old directory aside and moving the new one in)."""
    code = textwrap.dedent(f"""
        import os, signal, shutil
        from pathlib import Path
        from actors.fsutil import atomic_directory
        target = Path({str(target)!r})
        with atomic_directory(target) as tmp:
            shutil.copytree(target, tmp, dirs_exist_ok=True)
            (tmp / "half").write_bytes(b"x" * 1000)
            if {between_renames}:
                target.rename(target.with_name("." + target.name + ".old-deadbeef"))
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("between_renames", [False, True])
def test_sigkill_during_a_checkpoint_write_leaves_the_last_good_one_loadable(trainer_state, tmp_path,
                                                                            between_renames):
    trainer, target, digest = trainer_state
    _killed_writer(target, between_renames)
    assert target.exists() != between_renames  # between the renames only the moved-aside copy is left
    assert recover_directory(target) == target
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoint"]  # leftovers cleaned
    assert not (target / "half").exists()
    trainer.train_step_for_test()
    assert trainer.weights_digest() != digest
    trainer.load_state(str(target / "policy_trainer"))
    assert trainer.weights_digest() == digest


@pytest.fixture
def trainer_state(trainers, batch, tmp_path):
    """A trainer after one step, checkpointed into ``checkpoint/policy_trainer``."""
    from pipelines.losses import DPOLoss

    trainer = trainers(8, lr=1e-2)
    trainer.train_step_for_test = lambda: trainer.train_step(batch, DPOLoss(beta=0.1))
    trainer.train_step_for_test()
    target = tmp_path / "ckpt" / "checkpoint"
    with atomic_directory(target) as tmp:
        trainer.save_state(str(tmp / "policy_trainer"))
    return trainer, target, trainer.weights_digest()
