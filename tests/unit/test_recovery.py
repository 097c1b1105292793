"""The recovery supervisor's decisions, with stand-in groups (no Ray; the real actors are killed by pid
in tests/ray/test_faults.py and tests/e2e/test_fault_recovery.py): what a dead rank of each kind of
role leads to, the budget, the order of a replacement's steps, a rollback's checks, what the stage
logs of each event, and that each recovery is one line in the stage's log and on the console."""

from __future__ import annotations

import logging

import pytest

from actors.policy_trainer import PolicyTrainer
from actors.reference import ReferenceModel
from actors.reward import RewardSet, RewardWorker
from actors.rollout import RolloutWorker
from orchestrator.console import RunConsole
from orchestrator.runtime import faults
from orchestrator.runtime.faults import FaultError, FaultEvent, FaultPolicy, RankLost
from orchestrator.runtime.recovery import Supervisor, replaceable, stateless


class Group:
    """Stands in for an ActorGroup: records what the supervisor asks of it, in order."""

    def __init__(self, role: str, cls: type) -> None:
        self.role, self.cls, self.calls = role, cls, []

    def node_of(self, rank: int) -> str:
        return "n1"

    def respawn(self, rank: int) -> None:
        self.calls.append(("respawn", rank))

    def replay_setup(self, rank: int) -> None:
        self.calls.append(("setup", rank))

    def rebuild(self) -> None:
        self.calls.append(("rebuild",))


def test_the_role_classes_declare_their_traits():
    assert [replaceable(c) for c in (RolloutWorker, RewardSet, RewardWorker, ReferenceModel, PolicyTrainer)] == [
        True, True, True, True, False]
    assert [stateless(c) for c in (RolloutWorker, RewardSet, RewardWorker, ReferenceModel, PolicyTrainer)] == [
        False, True, True, True, False]
    assert not replaceable(object) and not stateless(object)  # a class that declares nothing: neither


def test_a_replaceable_rank_is_respawned_set_up_and_caught_up_in_that_order_within_its_budget():
    supervisor = Supervisor(FaultPolicy(max_restarts=1))
    rollout = Group("rollout", RolloutWorker)
    supervisor.after_replace(rollout).append(lambda group, rank: group.calls.append(("catch_up", rank)))
    with faults.at(phase="rollout", iteration=4):
        supervisor.rank_died(rollout, 1, RuntimeError("gone"))
    assert rollout.calls == [("respawn", 1), ("setup", 1), ("catch_up", 1)]
    (event,) = supervisor.events.events
    assert (event.role, event.rank, event.node, event.where) == ("rollout", 1, "n1", {"phase": "rollout",
                                                                                      "iteration": 4})
    metrics, tags = supervisor.unreported()
    assert metrics["faults/restarts/rollout"] == 1.0 and metrics["faults/recovery_s"] >= 0
    assert list(tags) == ["rlhf.fault.0"] and "role=rollout rank=1" in tags["rlhf.fault.0"]
    assert supervisor.unreported() == ({}, {})  # each event is logged once
    with pytest.raises(FaultError, match="after 1 replacement"):
        supervisor.rank_died(rollout, 1, RuntimeError("again"))
    assert rollout.calls[3:] == []  # a spent budget replaces nothing


def test_a_trainer_rank_is_rolled_back_only_with_checkpoints():
    supervisor = Supervisor()
    trainer = Group("policy_trainer", PolicyTrainer)
    with pytest.raises(RankLost, match="rolls back") as lost:
        supervisor.rank_died(trainer, 0, RuntimeError("gone"))
    assert trainer.calls == []
    with pytest.raises(FaultError, match="keeps no in-stage checkpoints"):
        supervisor.rollback(lost.value, [trainer], lambda: None, checkpoints=False)
    set_up = []
    supervisor.set_up_with(trainer, lambda group: set_up.append(group.role))
    assert supervisor.rollback(lost.value, [trainer], lambda: (3, {"version": 2}), checkpoints=True) == (
        3, {"version": 2})
    assert trainer.calls == [("rebuild",)] and set_up == ["policy_trainer"]
    assert supervisor.restarts("policy_trainer") == 1


def test_each_recovery_is_one_line_in_the_stage_log_and_on_the_console(tmp_path, capfd):
    console = RunConsole(tmp_path / "pipeline.log")
    console.attach()
    try:
        with console.stage(tmp_path / "stage.log"):
            Supervisor()._record(FaultEvent("reward", 0, "n1", "ActorDiedError", {"phase": "score"}), 0.5,
                                 lambda: "reward rank 0 died; replaced")
    finally:
        console.detach()
    assert "fault: reward rank 0 died; replaced" in (tmp_path / "stage.log").read_text()
    assert capfd.readouterr().err.count("fault: reward rank 0 died; replaced") == 1
    assert logging.getLogger("rlhf").handlers == []  # detached: nothing left behind
