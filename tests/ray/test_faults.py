"""Deadlines and in-place replacement on real Ray actors: a hung call becomes an error naming the role,
rank, phase, iteration and weight version within its deadline; a stateless rank killed by pid (SIGKILL)
is replaced in its bundle, set up again, and the items it held run again; a lost trainer rank is
reported for the stage to roll back, and a spent budget stops with a clear error."""

import os
import signal
import time

import pytest
import ray

from orchestrator.runtime import faults
from orchestrator.runtime.actor_group import ActorGroup
from orchestrator.runtime.faults import FaultError, FaultLog, FaultPolicy, RankLost
from orchestrator.runtime.resources import WorkerResources


class Worker:  # a stand-in stateless role: set up once, doubles numbers, reports its pid, or naps
    REPLACEABLE = True  # like the rollout, reward and reference roles

    def __init__(self, rank, world_size):
        self.rank = rank
        self.ready = False

    def setup(self):
        self.ready = True
        return os.getpid()

    def double(self, x):
        assert self.ready, "called before setup"
        time.sleep(0.05)
        return 2 * x

    def pid(self):
        return os.getpid()

    def nap(self, seconds):
        time.sleep(seconds)


class Trainer(Worker):  # a stand-in for a role that holds training state
    REPLACEABLE = False


def _group(role, workers=2, **policy):
    cls = Trainer if role == "policy_trainer" else Worker
    return ActorGroup(role, cls, workers, WorkerResources(0.25), policy=FaultPolicy(**policy), faults=FaultLog())


def _kill(group, rank):
    pid = group.on_ranks([rank], Worker.pid)[0]
    os.kill(pid, signal.SIGKILL)  # a process this test's Ray instance started, by pid
    return pid


def test_a_hung_call_fails_within_its_deadline_naming_where(ray_local):
    group = _group("rollout", workers=1, call_timeout_s=2.0)
    start = time.monotonic()
    with faults.at(phase="rollout", iteration=3, version=2), pytest.raises(FaultError) as err:
        group.broadcast(Worker.nap, 60)
    waited = time.monotonic() - start
    group.shutdown()
    assert waited < 10, waited
    message = str(err.value)
    for part in ("rollout rank(s) [0]", "nap", "within 2s", "phase rollout", "iteration 3", "weight version 2",
                 "fault_tolerance.call_timeout_s"):
        assert part in message, message
    print(f"hung call: failed after {waited:.2f}s: {message}")


def test_a_killed_stateless_rank_is_replaced_and_its_items_run_again(ray_local):
    group = _group("reward")
    first_pids = group.setup(Worker.setup)
    replaced = []
    group.on_replace.append(lambda g, rank: replaced.append(rank))
    killed = _kill(group, 0)
    with faults.at(phase="score", iteration=2):
        results = group.balanced(Worker.double, list(range(12)))
    assert results == [2 * x for x in range(12)]
    (event,) = group.faults.events
    assert (event.role, event.rank, event.error) == ("reward", 0, "ActorDiedError")
    assert event.where == {"phase": "score", "iteration": 2} and event.recovery_s > 0
    assert replaced == [0]
    new_pids = group.broadcast(Worker.pid)
    assert new_pids[0] != killed and new_pids[1] == first_pids[1]
    assert "role=reward rank=0" in event.tag() and "phase=score iteration=2" in event.tag()
    # broadcast and shard replace a dead rank too, and run its call again
    _kill(group, 1)
    assert group.shard(Worker.double, [10, 20]) == [20, 40]
    assert group.faults.restarts("reward") == 2
    group.shutdown()


def test_a_trainer_rank_or_a_spent_budget_stops_with_a_clear_error(ray_local):
    trainer = _group("policy_trainer", workers=1)
    trainer.setup(Worker.setup)
    _kill(trainer, 0)
    with faults.at(phase="update", step=7), pytest.raises(RankLost, match=r"policy_trainer rank 0 died \(phase "
                                                                           r"update, step 7\).*rolls back") as lost:
        trainer.broadcast(Worker.double, 1)
    assert (lost.value.event.role, lost.value.event.rank) == ("policy_trainer", 0)  # for the stage's rollback
    trainer.shutdown()

    reward = _group("reward", workers=1, max_restarts=1)
    reward.setup(Worker.setup)
    _kill(reward, 0)
    assert reward.broadcast(Worker.double, 2) == [4]
    _kill(reward, 0)
    with pytest.raises(FaultError, match=r"after 1 replacement\(s\): fault_tolerance.max_restarts = 1 is spent"):
        reward.broadcast(Worker.double, 2)
    reward.shutdown()
    assert ray.is_initialized()
