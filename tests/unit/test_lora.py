"""LoRA on the trainer's model: merged weights equal PEFT's own merge, under the base model's names,
without touching the trained model; only the adapters are trainable and checkpointed."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors import lora

SPEC = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.fixture()
def adapted(tiny_model_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    names = set(base.state_dict())
    model = lora.wrap(base, SPEC)
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: B starts at zero, which would make every delta zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    return model, names


def test_merged_weights_equal_peft_merge_under_the_base_names(adapted):
    model, names = adapted
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lora.merged_state_dict(model)
    assert set(merged) == names
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    for name in names:
        torch.testing.assert_close(merged[name], reference[name], rtol=0, atol=1e-6)
    frozen = {n.replace(".base_layer.", "."): v for n, v in model.get_base_model().state_dict().items()
              if ".lora_" not in n}
    assert max((merged[n] - frozen[n]).abs().max().item() for n in names if "q_proj" in n) > 1e-4  # adapters moved it
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing merged in place
    # merged one weight-sync bucket at a time: the same tensors, under the same names
    layout = lora.base_state_dict(model)
    assert set(layout) == names and all(layout[n].shape == merged[n].shape for n in names)
    bucket = {n for n in names if ".layers.0." in n}
    part = lora.merged_state_dict(model, bucket)
    assert set(part) == bucket and all(torch.equal(part[n], merged[n]) for n in bucket)


def test_only_adapters_train_and_are_saved(adapted):
    model, names = adapted
    counts = lora.parameter_counts(model)
    assert 0 < counts["trainable_params"] < counts["params"] / 5
    saved = lora.adapter_state_dict(model)
    assert saved and all(".lora_A." in n or ".lora_B." in n for n in saved)
    assert sum(t.numel() for t in saved.values()) == counts["trainable_params"]


def test_reward_model_lora_trains_the_head_and_merges_to_a_plain_classifier(tiny_reward_model_dir):
    """A reward model (or critic) with LoRA: adapters plus its score head train; the merged weights
    load into a plain sequence classifier that scores exactly as the adapted model does."""
    from actors.modeling import load_reward_model, sequence_scores

    base = load_reward_model(str(tiny_reward_model_dir), dtype=torch.float32)
    names = set(base.state_dict())
    model = lora.wrap(base, SPEC, "reward_model")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".lora_A." in n for n in trainable) and any(n.endswith("score.modules_to_save.default.weight")
                                                           for n in trainable)
    torch.manual_seed(0)
    with torch.no_grad():  # as if trained: adapters and head moved
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    merged = lora.merged_state_dict(model)
    assert set(merged) == names
    plain = load_reward_model(str(tiny_reward_model_dir), dtype=torch.float32)
    plain.load_state_dict(merged)
    ids = torch.randint(3, 40, (3, 9))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want, got = sequence_scores(model, ids, mask), sequence_scores(plain, ids, mask)
        start = sequence_scores(load_reward_model(str(tiny_reward_model_dir), dtype=torch.float32), ids, mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - start).abs().max() > 1e-3  # the merge carries the training
