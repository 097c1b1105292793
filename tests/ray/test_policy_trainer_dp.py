"""Two data-parallel DeepSpeed ZeRO-2 ranks on real Ray over gloo stay identical and learn."""

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from actors.modeling import preference_logps
from actors.policy_trainer import PolicyTrainer, TrainerSpec
from actors.reference import ReferenceModel
from orchestrator.runtime.actor_group import ActorGroup
from orchestrator.runtime.resources import WorkerResources
from pipelines.data.formats import PAIR_FIELDS
from pipelines.data.sources import read_columns
from pipelines.data.tokens import collate_pairs, tokenize_pairs
from pipelines.errors import UserError
from pipelines.losses import DPOLoss

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pair_batch(tiny_model_dir, task_data):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = read_columns(str(task_data["pairs_train"]), list(PAIR_FIELDS), "preference pairs")
    pairs = tokenize_pairs({k: v[:16] for k, v in rows.items()}, tok, max_length=32, source="train")
    return collate_pairs(pairs, tok.pad_token_id)


def test_two_ranks_identical_weights_and_loss_decreases(ray_local, tiny_model_dir, pair_batch):
    ref = ActorGroup("reference", ReferenceModel, 1, WorkerResources(1.0), str(tiny_model_dir), precision="fp32")
    ref.broadcast(ReferenceModel.setup)
    ref_chosen, ref_rejected = ref.rank0(ReferenceModel.evaluate, pair_batch, preference_logps)
    ref.shutdown()
    batch = pair_batch
    batch.ref_chosen_logps, batch.ref_rejected_logps = ref_chosen, ref_rejected

    spec = TrainerSpec(model_path=str(tiny_model_dir), total_steps=8, examples_per_step=16,
                       examples_per_microbatch=4, lr=1e-3, zero_stage=2, schedule="constant", seed=0)
    group = ActorGroup("policy_trainer", PolicyTrainer, 2, WorkerResources(1.0), spec)
    try:
        addr, port = group.rank0(PolicyTrainer.open_rendezvous)
        infos = group.broadcast(PolicyTrainer.setup, addr, port)
        assert [i["backend"] for i in infos] == ["gloo", "gloo"]
        loss_fn = DPOLoss(beta=0.1)
        losses = []
        for _ in range(8):
            per_rank = group.shard(PolicyTrainer.train_step, batch.split(2), loss_fn)
            losses.append(sum(r["loss"] for r in per_rank) / 2)
            assert all(r["grad_norm"] > 0 for r in per_rank)
        digests = group.broadcast(PolicyTrainer.weights_digest)
    finally:
        group.shutdown()
    assert digests[0] == digests[1], "data-parallel ranks diverged"
    assert losses[0] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-4)  # policy = reference
    assert losses[-1] < losses[0] - 0.05, losses


def test_unplaceable_group_is_a_clear_error(ray_local):
    with pytest.raises(UserError, match=r"cannot place policy_trainer: 3 bundle\(s\) .* not ready within 2s; "
                                        r"cluster resources available"):
        ActorGroup("policy_trainer", PolicyTrainer, 3, WorkerResources(1.0), None, placement_timeout_s=2)


def test_plan_over_capacity_fails_before_actors_start(ray_local):
    from orchestrator.config import load_pipeline
    from orchestrator.plan import plan_pipeline
    from orchestrator.runner import check_capacity

    config = load_pipeline(ROOT / "pipelines" / "offline_dpo.yaml", ["stages.offline_dpo.trainer.cpus_per_worker=3"])
    with pytest.raises(UserError, match=r"stage .offline_dpo. cannot be placed: policy_trainer need "
                                        r"\{CPU: 3, GPU: 0\} at once .*the Ray cluster has 1 node\(s\) "
                                        r"with \{CPU: 2, GPU: 0\}"):
        check_capacity(plan_pipeline(config))
