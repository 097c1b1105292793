"""The placement plan: bundles per role, colocation sets, peak demand, and the check against nodes."""

from pathlib import Path

import pytest
import yaml

from orchestrator.config import load_pipeline, validate_pipeline
from orchestrator.plan import plan_pipeline
from orchestrator.runtime.placement import (
    BundleGroup,
    RolePlan,
    StagePlan,
    bundle_groups,
    check_plan,
    format_plan,
    format_resources,
    placeable,
)
from pipelines.errors import ConfigError, UserError

SHIPPED = Path(__file__).resolve().parents[2] / "pipelines" / "offline_dpo.yaml"
REFERENCE_GROUP = "stages.offline_dpo.reference_group.from_trainer=false"  # a reference role to place


def _dpo_plan(*overrides: str) -> StagePlan:
    return plan_pipeline(load_pipeline(SHIPPED, list(overrides)))[1]


def test_separate_roles_get_one_placement_group_each_and_peak_is_the_largest_phase():
    plan = _dpo_plan(REFERENCE_GROUP, "stages.offline_dpo.trainer.num_workers=2",
                     "stages.offline_dpo.schedule.pairs_per_microbatch=8",
                     "stages.offline_dpo.trainer.cpus_per_worker=1.5",
                     "stages.offline_dpo.reference_group.cpus_per_worker=0.5")
    assert [g.roles for g in plan.groups] == [("reference",), ("policy_trainer",)]
    assert plan.group_of("policy_trainer").bundles == ({"CPU": 1.5, "GPU": 0.0}, {"CPU": 1.5, "GPU": 0.0})
    # reference runs first and is released before the trainer starts: the peak is the trainer's 3 CPUs
    assert plan.peak() == {"CPU": 3.0, "GPU": 0.0}
    assert plan.as_params()["plan.placement.1"] == "policy_trainer: 2x{CPU: 1.5, GPU: 0} PACK"


def test_colocated_roles_share_bundles_whose_size_is_the_sum():
    roles = (RolePlan("policy_trainer", 2, 1.0, 0.5), RolePlan("reference", 2, 0.5, 0.25),
             RolePlan("rollout", 1, 2.0, 1.0))
    groups = bundle_groups(roles, (("reference", "policy_trainer"),), "PACK")
    assert [g.roles for g in groups] == [("reference", "policy_trainer"), ("rollout",)]
    assert groups[0].bundles == ({"CPU": 1.5, "GPU": 0.75}, {"CPU": 1.5, "GPU": 0.75})
    # ranks beyond a smaller member's count only carry the larger member
    uneven = bundle_groups((RolePlan("a", 2, 1.0, 0.0), RolePlan("b", 1, 1.0, 0.0)), (("a", "b"),), "PACK")
    assert uneven[0].bundles == ({"CPU": 2.0, "GPU": 0.0}, {"CPU": 1.0, "GPU": 0.0})


def test_colocation_is_config_and_printed():
    plan = _dpo_plan(REFERENCE_GROUP, "stages.offline_dpo.placement.colocate=[[reference, policy_trainer]]")
    assert [g.roles for g in plan.groups] == [("reference", "policy_trainer")]
    # the shipped trainer has 2 CPUs and the reference 1: one group holds all 3 for the whole stage
    assert plan.peak() == {"CPU": 3.0, "GPU": 0.0}
    assert "placement group reference+policy_trainer (colocated): {CPU: 3, GPU: 0} PACK" in format_plan([plan])


@pytest.mark.parametrize("colocate, message", [
    ([["reference", "critic"]], "placement.colocate[0]: offline_dpo has no role 'critic'"),
    ([["reference"]], "placement.colocate[0]: a colocation set needs at least two roles"),
])
def test_bad_colocation_names_the_field(colocate, message):
    raw = yaml.safe_load(SHIPPED.read_text())
    raw["stages"][1]["placement"] = {"colocate": colocate}
    with pytest.raises(ConfigError, match=r"stages\[1\]"):
        validate_pipeline(raw)
    with pytest.raises(ConfigError) as exc:
        validate_pipeline(raw)
    assert message in str(exc.value)


def _plan(groups: tuple[BundleGroup, ...], phases) -> StagePlan:
    return StagePlan("s", "k", groups=groups, phases=phases)


def test_check_plan_packs_bundles_onto_nodes():
    trainer = BundleGroup(("policy_trainer",), ({"CPU": 2, "GPU": 1},) * 2, "PACK")
    rollout = BundleGroup(("rollout",), ({"CPU": 1, "GPU": 1},) * 2, "PACK")
    plan = _plan((trainer, rollout), (("policy_trainer", "rollout"),))
    two_nodes = [{"CPU": 4, "GPU": 2}, {"CPU": 4, "GPU": 2}]
    check_plan([plan], two_nodes)  # 6 CPU / 4 GPU over two 4-CPU/2-GPU nodes fits

    with pytest.raises(UserError) as exc:
        check_plan([plan], [{"CPU": 16, "GPU": 3}], available={"CPU": 10.0, "GPU": 1.0})
    message = str(exc.value)
    assert "stage 's' cannot be placed: policy_trainer+rollout need {CPU: 6, GPU: 4} at once" in message
    assert "1 node(s) with {CPU: 16, GPU: 3}" in message and "free now: {CPU: 10, GPU: 1}" in message


def test_check_plan_respects_strict_strategies_and_per_node_capacity():
    # enough in total (4 GPUs) but a STRICT_PACK group of 4 GPUs cannot sit on 2-GPU nodes
    strict = BundleGroup(("policy_trainer",), ({"CPU": 1, "GPU": 1},) * 4, "STRICT_PACK")
    with pytest.raises(UserError,
                       match=r"no node can hold a \{CPU: 4, GPU: 4\} bundle of policy_trainer \(STRICT_PACK\)"):
        check_plan([_plan((strict,), (("policy_trainer",),))], [{"CPU": 8, "GPU": 2}] * 2)
    # STRICT_SPREAD needs a node per bundle
    spread = BundleGroup(("rollout",), ({"CPU": 1, "GPU": 0},) * 3, "STRICT_SPREAD")
    check_plan([_plan((spread,), (("rollout",),))], [{"CPU": 1}] * 3)
    with pytest.raises(UserError, match="STRICT_SPREAD"):
        check_plan([_plan((spread,), (("rollout",),))], [{"CPU": 8}] * 2)
    # a single bundle larger than every node fails even when the cluster total is enough
    big = BundleGroup(("reference",), ({"CPU": 6, "GPU": 0},), "PACK")
    with pytest.raises(UserError, match="no node can hold"):
        check_plan([_plan((big,), (("reference",),))], [{"CPU": 4}, {"CPU": 4}])


def test_sequential_phases_are_checked_separately():
    ref = BundleGroup(("reference",), ({"CPU": 2, "GPU": 0},), "PACK")
    trainer = BundleGroup(("policy_trainer",), ({"CPU": 2, "GPU": 0},), "PACK")
    check_plan([_plan((ref, trainer), (("reference",), ("policy_trainer",)))], [{"CPU": 2}])
    with pytest.raises(UserError, match=r"need \{CPU: 4, GPU: 0\} at once"):
        check_plan([_plan((ref, trainer), (("reference", "policy_trainer"),))], [{"CPU": 2}])


def test_rollout_tensor_parallel_needs_whole_gpus():
    from pydantic import ValidationError

    from pipelines.stages.online import RolloutConfig

    assert RolloutConfig(tensor_parallel_size=2, gpus_per_worker=2).tensor_parallel_size == 2
    with pytest.raises(ValidationError, match="tensor_parallel_size 2 needs 2 whole GPUs per rollout worker, got 0.5"):
        RolloutConfig(tensor_parallel_size=2, gpus_per_worker=0.5)


def test_the_resources_a_plan_can_use_exclude_rays_own_markers_and_placement_group_resources():
    pg = "f933136d0c1452c6b538626ef65b06000000"
    free = {"CPU": 0.5, "GPU": 0.0, "node_a": 1.0, "memory": 5e9, "object_store_memory": 1e9, "node:127.0.0.1": 1.0,
            f"bundle_group_{pg}": 1000.0, f"bundle_group_0_{pg}": 1000.0, f"CPU_group_{pg}": 1.0,
            f"node_a_group_0_{pg}": 0.001, "accelerator_type:H200": 1.0}
    assert placeable(free) == {"CPU": 0.5, "GPU": 0.0, "node_a": 1.0}
    assert format_resources(placeable(free)) == "{CPU: 0.5, GPU: 0} @node_a"


LORA = "stages.offline_dpo.trainer.lora={rank: 4}"


def test_a_lora_trainer_is_its_own_reference_and_no_reference_group_is_planned():
    """With LoRA and the starting policy as the reference, the trainer's model with its adapters off
    gives the reference log-probs: no reference role, bundle or phase; a reference group comes back
    with from_trainer: false or a different reference model."""
    plan = _dpo_plan(LORA)
    assert [r.role for r in plan.roles] == ["policy_trainer"] and plan.phases == (("policy_trainer",),)
    assert plan.peak() == {"CPU": 2.0, "GPU": 0.0}
    for override in ("stages.offline_dpo.reference_group.from_trainer=false",
                     "stages.offline_dpo.reference=other/model"):
        assert [r.role for r in _dpo_plan(LORA, override).roles] == ["reference", "policy_trainer"]
    # A full fine-tune computes the reference log-probs before its first step: no reference group either.
    assert [r.role for r in _dpo_plan().roles] == ["policy_trainer"]
    assert [r.role for r in _dpo_plan(REFERENCE_GROUP).roles] == ["reference", "policy_trainer"]


def test_placing_the_reference_of_a_lora_trainer_is_an_error_naming_the_field():
    with pytest.raises(ConfigError) as exc:
        load_pipeline(SHIPPED, [LORA, "stages.offline_dpo.placement.colocate=[[reference, policy_trainer]]"])
    assert "placement.colocate[0]: no reference group starts" in str(exc.value)
    assert "reference_group.from_trainer: false" in str(exc.value)


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_a_reference_free_loss_plans_no_reference_and_says_so(loss_type):
    """SimPO and ORPO: no reference role, bundle or phase, even where one would be placed, and the plan
    prints where the reference log-probs come from; giving them a reference is an error naming the field."""
    override = f"stages.offline_dpo.dpo.loss_type={loss_type}"
    for extra in ((), (REFERENCE_GROUP,), (LORA,)):
        plan = _dpo_plan(override, *extra)
        assert [r.role for r in plan.roles] == ["policy_trainer"]
        assert plan.numbers["reference_logprobs"] == f"none (dpo.loss_type {loss_type} is reference-free)"
    assert "reference_logprobs = none" in format_plan([plan])
    assert _dpo_plan().numbers["reference_logprobs"] == "policy_trainer (the starting policy)"
    assert _dpo_plan(REFERENCE_GROUP).numbers["reference_logprobs"] == "reference group"
    for bad, message in ((["stages.offline_dpo.reference=other/model"], "stages[1].reference: dpo.loss_type"),
                         (["stages.offline_dpo.placement.colocate=[[reference, policy_trainer]]"],
                          "placement.colocate[0]: no reference group starts")):
        with pytest.raises(ConfigError) as exc:
            load_pipeline(SHIPPED, [override, *bad])
        assert message in str(exc.value)


def test_the_brief_plan_is_one_line_per_stage():
    from orchestrator.config import load_pipeline
    from orchestrator.plan import plan_pipeline
    from orchestrator.runtime.placement import format_plan_brief

    plans = plan_pipeline(load_pipeline(Path(__file__).resolve().parents[2] / "pipelines/quickstart.yaml"))
    lines = format_plan_brief(plans).splitlines()
    assert len(lines) == len(plans) == 7
    assert lines[0] == "[0] task (synthetic_task)"
    assert lines[4].startswith("[4] onpolicy_dpo (onpolicy_dpo): policy_trainer 1x{CPU: 0.5, GPU: 0}, reference ")
    assert lines[4].endswith("; peak {CPU: 2, GPU: 0}")


def test_cpus_the_yaml_left_unset_are_fitted_to_the_machine_and_set_ones_kept():
    """Two rollout workers at the default 1 CPU (0.75, and the reward role's 0.25: they score) make
    PPO's roles need 3 CPUs: on a 2-CPU machine the unset roles shrink to fit; a role the YAML sets
    keeps its CPUs; on 4 CPUs nothing moves."""
    from orchestrator.config import load_pipeline
    from orchestrator.plan import fit_to_machine, plan_pipeline

    sets = ["stages.ppo.rollout.num_workers=2", "ray.num_cpus=2"]
    config, notes = fit_to_machine(load_pipeline(str(SHIPPED.with_name("quickstart.yaml")), sets))
    assert notes == ["stage 'ppo': CPUs the YAML left unset, fitted to this machine's 2: critic 0.25 -> 0.15, "
                     "policy_trainer 0.5 -> 0.3, reference 0.25 -> 0.15, rollout 1 -> 0.65"]
    ppo = next(p for p in plan_pipeline(config) if p.name == "ppo")
    assert ppo.peak()["CPU"] <= 2.0
    config, notes = fit_to_machine(load_pipeline(str(SHIPPED.with_name("quickstart.yaml")),
                                                 [*sets, "stages.ppo.trainer.cpus_per_worker=1"]))
    assert "policy_trainer" not in notes[0] and "rollout 1 -> 0.4" in notes[0]
    assert next(p for p in plan_pipeline(config) if p.name == "ppo").role("policy_trainer").cpus_per_worker == 1
    assert fit_to_machine(load_pipeline(str(SHIPPED.with_name("quickstart.yaml")),
                                        ["stages.ppo.rollout.num_workers=2", "ray.num_cpus=4"]))[1] == []


def test_every_role_names_the_field_its_resources_live_in():
    """``ROLE_FIELDS`` is what the plan replaces a role's resources through (``with_role_resources``):
    for every stage of every shipped pipeline, each role's config is that field's value."""
    for path in sorted(SHIPPED.parent.glob("*.yaml")):
        for stage in load_pipeline(str(path), []).stages:
            for role, config in stage.role_configs().items():
                assert getattr(stage, stage.ROLE_FIELDS[role]) is config, (path.name, stage.name, role)
