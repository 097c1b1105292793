"""Token-budget micro-batches and column trimming (TensorBatch): what they keep, drop and reorder."""

import pytest
import torch

from actors.modeling import evaluate_in_chunks
from pipelines.data.batches import PPOBatch, SFTBatch


def sft_batch(lengths: list[int], width: int) -> SFTBatch:
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.arange(1, n + 1) + 100 * i
        attn[i, :n] = 1
    return SFTBatch(ids, attn, attn.clone())


def test_token_microbatches_pack_by_length_within_the_budget():
    batch = sft_batch([3, 9, 4, 8, 2, 9], width=12)
    groups = batch.token_microbatches(20)
    assert sorted(torch.cat(groups).tolist()) == list(range(6))  # every row once
    lengths = batch.row_lengths()[:, 0]
    # Longest first: the two 9s (2 x 9 = 18), then 8 and 4 (2 x 8 = 16; 3 x 8 = 24 is over), then 3 and 2.
    assert [g.tolist() for g in groups] == [[1, 5], [3, 2], [0, 4]]
    for g in groups:
        assert len(g) * int(lengths[g].max()) <= 20
    # A row over the budget is a micro-batch of its own.
    assert [g.tolist() for g in batch.token_microbatches(5)] == [[1], [5], [3], [2], [0], [4]]


def test_token_microbatches_split_up_to_a_count():
    batch = sft_batch([3, 9, 4, 8, 2, 9], width=12)
    groups = batch.token_microbatches(100, count=3)  # [1, 5, 3, 2, 0, 4] halved, then its larger half
    assert [g.tolist() for g in groups] == [[1], [5, 3], [2, 0, 4]]
    with pytest.raises(ValueError, match="cannot form 7 micro-batches from 6 rows"):
        batch.token_microbatches(100, count=7)


def test_trimming_drops_only_all_padding_columns_of_each_width():
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 0, 0, 0, 0]])
    attn = (ids > 0).long()
    per_token = torch.arange(10.0).reshape(2, 5)  # (B, T-1) fields follow their mask, one shorter
    ppo = PPOBatch(ids, attn, attn[:, 1:], per_token, per_token.clone())
    trimmed, removed = ppo.trimmed()
    assert removed == 3
    assert trimmed.input_ids.tolist() == [[5, 6, 7], [5, 6, 0]]
    assert trimmed.old_logps.tolist() == [[0.0, 1.0], [5.0, 6.0]]
    assert trimmed.ref_logps is None and trimmed.num_tokens() == ppo.num_tokens() == 5
    assert (ppo.positions(), trimmed.positions()) == (12, 6)


def test_token_budget_chunks_give_the_same_numbers_in_batch_order(tiny_model_dir):
    from actors.modeling import load_causal_lm
    from orchestrator.runtime.weight_sync import probe_token_logps

    model = load_causal_lm(str(tiny_model_dir), dtype=torch.float32)
    lengths = [4, 15, 7, 11, 3, 15, 9, 5]
    batch = sft_batch(lengths, width=20)
    batch.input_ids = batch.input_ids % 30 + 3  # ids the tiny vocabulary holds; padding stays masked
    whole = evaluate_in_chunks(model, batch, probe_token_logps, rows_per_chunk=64, device=torch.device("cpu"))
    packed = evaluate_in_chunks(model, batch, probe_token_logps, rows_per_chunk=64, device=torch.device("cpu"),
                                tokens_per_chunk=32)
    assert packed.shape == whole.shape == (8, 19)
    torch.testing.assert_close(packed, whole, atol=1e-5, rtol=1e-5)
    assert whole[1].abs().sum() > 0 and whole[0, 3:].abs().sum() == 0  # real values, zero past the response
