"""What a trainer sends the rollout engines is named as the checkpoint they loaded: for every family
``init_model`` builds, ``export_names`` of the live module equals the tensor names ``save_pretrained``
wrote (a tied output layer once, GPT-NeoX's ``lm_head`` as ``embed_out``), with and without LoRA."""

from __future__ import annotations

import pytest

from actors.rollout import checkpoint_shapes
from actors.weight_names import export_names
from pipelines.tasks.architectures import ARCHITECTURES, build_model
from pipelines.tasks.tiny_model import build_bpe_tokenizer


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_export_names_are_the_checkpoints(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from actors import lora

    build_model(tmp_path, architecture=arch, size="tiny", positions=64, tokenizer=build_bpe_tokenizer())
    saved = checkpoint_shapes(str(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    state = model.state_dict()
    names = export_names(model, state)
    assert set(names) == set(saved)
    assert all(tuple(state[own].shape) == saved[name] for name, own in names.items())
    spec = {"rank": 2, "alpha": 4.0, "dropout": 0.0, "target_modules": ARCHITECTURES[arch].lora_targets}
    wrapped = lora.wrap(model, spec, "causal_lm")
    base = lora.base_state_dict(wrapped)
    assert set(export_names(wrapped.get_base_model(), base)) == set(saved)
