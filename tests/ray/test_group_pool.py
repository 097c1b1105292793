"""Stateless groups kept alive between consecutive stages, on real Ray: taken over when the next
stage starts the same role with the same class, arguments and resources; otherwise (or when a later
phase starts first) shut down with their placement groups, so nothing holds resources it should not."""

import ray
from ray.util import placement_group_table

from orchestrator.runtime.placement import RolePlan, StagePlan, bundle_groups
from orchestrator.runtime.placement_groups import StagePlacement
from orchestrator.runtime.stage_roles import GroupPool, StageRoles


class Frozen:  # a stand-in stateless role that counts its setups and reports its actor id
    STATELESS = True

    def __init__(self, rank, world_size, model):
        self.model = model
        self.setups = 0

    def setup(self):
        self.setups += 1
        return self.setups

    def ident(self):
        return ray.get_runtime_context().get_actor_id(), self.model, self.setups


def _plan(name, *roles, phases=None):
    plans = tuple(RolePlan(role, 1, 0.25, 0.0) for role in roles)
    return StagePlan(name, "toy", roles=plans, groups=bundle_groups(plans, (), "PACK"),
                     phases=phases or (tuple(roles),))


def _ctx(tmp_path, plan, pool, next_plan=None):
    return StageRoles(StagePlacement(plan, timeout_s=30), pool=pool, next_plan=next_plan)


def _live_pgs():
    return sum(1 for pg in placement_group_table().values() if pg["state"] == "CREATED")


def test_same_stateless_group_is_taken_over_by_the_next_stage(ray_local, tmp_path):
    pool = GroupPool()
    second_plan = _plan("b", "reward", "rollout")
    first = _ctx(tmp_path, _plan("a", "reward", "reference"), pool, next_plan=second_plan)
    reward = first.spawn("reward", Frozen, "fn:score")
    reference = first.spawn("reference", Frozen, "m")
    reward.broadcast(Frozen.setup)
    (before,) = reward.broadcast(Frozen.ident)
    first.close(succeeded=True)  # reference: not in the next plan, shut down; reward parked
    assert "reward" in pool and "reference" not in pool and not reference.actors
    assert _live_pgs() == 1

    second = _ctx(tmp_path, second_plan, pool)
    again = second.spawn("reward", Frozen, "fn:score")
    assert second.reused == ["reward"]
    assert again.broadcast(Frozen.ident) == [before]  # the same actor, set up once
    second.close(succeeded=False)  # a failed stage parks nothing
    assert "reward" not in pool and _live_pgs() == 0


def test_different_arguments_or_a_later_phase_release_the_parked_group(ray_local, tmp_path):
    pool = GroupPool()
    nxt = _plan("b", "reference", "policy_trainer", phases=(("reference",), ("policy_trainer",)))
    first = _ctx(tmp_path, _plan("a", "reference"), pool, next_plan=nxt)
    old = first.spawn("reference", Frozen, "sft-model")
    first.close(succeeded=True)
    assert "reference" in pool

    second = _ctx(tmp_path, nxt, pool)
    new = second.spawn("reference", Frozen, "another-model")  # another checkpoint: a fresh group
    assert second.reused == [] and not old.actors
    assert new.broadcast(Frozen.ident)[0][1] == "another-model"
    second.close(succeeded=True)

    first = _ctx(tmp_path, _plan("c", "reference"), pool, next_plan=nxt)
    first.spawn("reference", Frozen, "m")
    first.close(succeeded=True)
    second = _ctx(tmp_path, nxt, pool)
    second.spawn("policy_trainer", Frozen, "p")  # the stage skipped its first phase: parked group freed
    assert "reference" not in pool and _live_pgs() == 1
    second.close()
    assert _live_pgs() == 0
