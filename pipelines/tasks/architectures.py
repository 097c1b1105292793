"""Small, randomly initialised causal LMs of the architectures users bring, built locally.

``init_model`` (the stage kind and ``rlhf init-model``) builds one of these from an ``architecture``
name, a size of ``tiny_model.SIZES`` and the positions it needs; ``tests/e2e/test_architectures.py``
runs each through the trainer, PEFT and vLLM. Each entry keeps what its family does differently,
since each is a place where the trainer and vLLM can disagree:

| name | transformers config | tied embeddings | what differs |
|---|---|---|---|
| llama | ``LlamaConfig`` | no | the reference: RMSNorm, SwiGLU, full rotary |
| qwen2 | ``Qwen2Config`` | yes (as Qwen2.5-0.5B) | biases on q, k, v |
| qwen3 | ``Qwen3Config`` | yes (as Qwen3-0.6B) | RMSNorm on q and k |
| mistral | ``MistralConfig`` | no | a sliding attention window |
| gemma2 | ``Gemma2Config`` | yes | soft-capped attention and logits, alternating sliding layers, scaled embeddings |
| gemma3 | ``Gemma3TextConfig`` | yes | q/k norms, sliding layers with their own rotary base |
| phi3 | ``Phi3Config`` | no | fused ``qkv_proj`` and ``gate_up_proj`` (LoRA targets by those names) |
| gpt_neox | ``GPTNeoXConfig`` | no | partial rotary (25% of head dims), parallel residual, fused ``query_key_value`` |
| gpt2 | ``GPT2Config`` | yes | learned positions, ``Conv1D`` layers, biases, LayerNorm |

Every size keeps head_dim 64 (vLLM's CPU attention rejects 16). Sliding windows are set to half the
positions, so a long sequence crosses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # tiny_model imports transformers (seconds): the CLI reads ARCHITECTURES without it
    from pipelines.tasks.tiny_model import ModelSize


@dataclass(frozen=True)
class Architecture:
    """How to build one family's config, and what LoRA adapts in it (PEFT's module names)."""

    build: Callable[[ModelSize, int, int, dict[str, int | None]], Any]
    tied: bool
    lora_targets: tuple[str, ...]


def _common(size: ModelSize, vocab: int, positions: int, ids: dict[str, int | None]) -> dict[str, Any]:
    heads = size.num_attention_heads
    return dict(vocab_size=vocab, hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
                num_hidden_layers=size.num_hidden_layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=positions, dtype="float32", **ids)


def _llama(size: ModelSize, vocab: int, positions: int, ids: dict[str, int | None]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_common(size, vocab, positions, ids), head_dim=64, tie_word_embeddings=False)


def _qwen2(size: ModelSize, vocab: int, positions: int, ids: dict[str, int | None]) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**_common(size, vocab, positions, ids), tie_word_embeddings=True)


def _qwen3(size: ModelSize, vocab: int, positions: int, ids: dict[str, int | None]) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**_common(size, vocab, positions, ids), head_dim=64, tie_word_embeddings=True)


def _mistral(size: ModelSize, vocab: int, positions: int, ids: dict[str, int | None]) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**_common(size, vocab, positions, ids), head_dim=64, sliding_window=positions // 2,
                         tie_word_embeddings=False)


def _gemma2(size: ModelSize, vocab: int, positions: int, ids: dict[str, int | None]) -> Any:
    from transformers import Gemma2Config

    return Gemma2Config(**_common(size, vocab, positions, ids), head_dim=64, query_pre_attn_scalar=64,
                        sliding_window=positions // 2, tie_word_embeddings=True)


def _gemma3(size: ModelSize, vocab: int, positions: int, ids: dict[str, int | None]) -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(**_common(size, vocab, positions, ids), head_dim=64, query_pre_attn_scalar=64,
                            sliding_window=positions // 2, tie_word_embeddings=True)


def _phi3(size: ModelSize, vocab: int, positions: int, ids: dict[str, int | None]) -> Any:
    from transformers import Phi3Config

    return Phi3Config(**_common(size, vocab, positions, ids), original_max_position_embeddings=positions,
                      tie_word_embeddings=False)


def _gpt_neox(size: ModelSize, vocab: int, positions: int, ids: dict[str, int | None]) -> Any:
    from transformers import GPTNeoXConfig

    common = _common(size, vocab, positions, ids)
    common.pop("num_key_value_heads")
    return GPTNeoXConfig(**common, tie_word_embeddings=False)


def _gpt2(size: ModelSize, vocab: int, positions: int, ids: dict[str, int | None]) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_embd=size.hidden_size, n_inner=size.intermediate_size,
                      n_layer=size.num_hidden_layers, n_head=size.num_attention_heads, n_positions=positions,
                      tie_word_embeddings=True, dtype="float32", **ids)


ATTENTION_MLP = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(_llama, False, ATTENTION_MLP),
    "qwen2": Architecture(_qwen2, True, ATTENTION_MLP),
    "qwen3": Architecture(_qwen3, True, ATTENTION_MLP),
    "mistral": Architecture(_mistral, False, ATTENTION_MLP),
    "gemma2": Architecture(_gemma2, True, ATTENTION_MLP),
    "gemma3": Architecture(_gemma3, True, ATTENTION_MLP),
    "phi3": Architecture(_phi3, False, ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
    "gpt_neox": Architecture(_gpt_neox, False, ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
    "gpt2": Architecture(_gpt2, True, ("c_attn", "c_proj", "c_fc")),
}


def build_config(architecture: str, size: str, vocab_size: int, positions: int, ids: dict[str, int | None]) -> Any:
    """The transformers config of ``architecture`` at ``size`` (``ids``: pad/bos/eos token ids)."""
    from pipelines.tasks.tiny_model import SIZES

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture: {architecture!r} is not one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture].build(SIZES[size], vocab_size, positions, ids)


def build_model(out_dir: str | Path, *, architecture: str, size: str, positions: int, tokenizer: Any,
                seed: int = 0) -> dict[str, Any]:
    """Write a randomly initialised ``architecture`` model of ``size`` with ``tokenizer`` to ``out_dir``
    (HF format, safetensors); returns what was built (the summary ``rlhf init-model`` prints)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards": a bar on the console of a one-file save
    vocab_size = 64 * ((len(tokenizer) + 63) // 64)  # round up: friendlier matmul shapes
    ids = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
           "eos_token_id": tokenizer.eos_token_id}
    config = build_config(architecture, size, vocab_size, positions, ids)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"architecture": architecture, "class": type(model).__name__,
            "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": vocab_size,
            "positions": positions, "tied_embeddings": ARCHITECTURES[architecture].tied}
