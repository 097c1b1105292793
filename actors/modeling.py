"""Model loading and log-probability computation shared by the trainer and the reference model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from pipelines.data.batches import PreferenceBatch, TensorBatch


def pick_device() -> torch.device:
    """cuda:0 when the actor was given a GPU (Ray sets CUDA_VISIBLE_DEVICES), else CPU."""
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` means bf16 on GPU and fp32 on CPU."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def load_causal_lm(path: str, *, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """Load an HF causal LM from a local path or hub id; safetensors only."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )


def load_reward_model(path: str, *, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """A one-label sequence classifier; from a causal-LM checkpoint the score head starts fresh.

    The config's pad_token_id is filled in from the tokenizer's (HF needs one for batches), but scores
    are read at the last attended position (``sequence_scores``), not by searching for pad ids.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, num_labels=1)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = getattr(config, "eos_token_id", None)
    return AutoModelForSequenceClassification.from_pretrained(
        path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )


def load_model(path: str, kind: str, *, dtype: torch.dtype, trust_remote_code: bool = False) -> torch.nn.Module:
    """``kind`` is ``causal_lm`` (policy) or ``reward_model`` (one-label sequence classifier)."""
    if kind == "causal_lm":
        return load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)
    if kind == "reward_model":
        return load_reward_model(path, dtype=dtype, trust_remote_code=trust_remote_code)
    raise ValueError(f"unknown model kind {kind!r}; expected causal_lm or reward_model")


def classifier(model: Any) -> Any:
    """The HF sequence classifier inside ``model``: a DeepSpeed engine's module, and of a LoRA
    (PEFT) model the base model, whose layers carry the adapters (and its score head the trained copy)."""
    inner = getattr(model, "module", model)
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar score of each sequence, read at its last attended token.

    HF's own pooling looks for the last token that is not ``pad_token_id``; with pad = EOS (common
    in real tokenizers) that skips the response's EOS. Reading at the last position of the attention
    mask is right for any padding side and any pad id.

    Args:
        model: a one-label sequence classifier with a ``score`` head (Llama, Mistral, Qwen, Gemma, ...)
            or a DeepSpeed engine wrapping one.
        input_ids: (N, T) token ids.
        attention_mask: (N, T) 1 on real tokens.

    Returns:
        (N,) float32 scores.
    """
    inner = classifier(model)
    head = getattr(inner, "score", None)
    if head is None:
        raise ValueError(f"{type(inner).__name__} has no `score` head; reward models need a decoder classifier")
    trunk = getattr(inner, inner.base_model_prefix)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(-1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    return head(hidden[rows, last]).squeeze(-1).float()


def token_values(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A critic's value estimate at every position that predicts a next token.

    The critic is a one-label sequence classifier whose ``score`` head is applied to every position
    (not only the last): V(s_t) is read at the position of token t, i.e. the state from which token
    t + 1 is generated, so values line up with ``token_logprobs`` column for column.

    Args:
        model: a one-label decoder classifier (or a DeepSpeed engine wrapping one).
        input_ids: (N, T) token ids.
        attention_mask: (N, T) 1 on real tokens.

    Returns:
        (N, T-1) float32 values.
    """
    inner = classifier(model)
    trunk = getattr(inner, inner.base_model_prefix)
    hidden = trunk(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return inner.score(hidden[:, :-1]).squeeze(-1).float()


def masked_token_values(model: Any, batch: Any) -> torch.Tensor:
    """(N, T-1) ``token_values`` of an ``SFTBatch``, zeroed outside response tokens (picklable for ``evaluate``)."""
    values = token_values(model, batch.input_ids, batch.attention_mask)
    return values * batch.loss_mask[:, 1:].to(values.dtype)


def token_logprobs(model: Callable[..., Any], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of each next token under the model.

    Args:
        model: a causal LM (or DeepSpeed engine wrapping one).
        input_ids: (N, T) token ids.
        attention_mask: (N, T) 1 on real tokens.

    Returns:
        (N, T-1) float32: entry [i, t] = log p(input_ids[i, t+1] | input_ids[i, :t+1]).
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return next_token_logps(logits[:, :-1].float(), input_ids[:, 1:])


def last_token_states(model: Callable[..., Any], batch: Any) -> torch.Tensor:
    """The last layer's hidden state at each row's last real token: features of a prompt (UPO's
    value baseline reads them).

    Args:
        batch: a batch with ``input_ids`` and ``attention_mask`` (N, T), right-padded (e.g. an
            ``SFTBatch`` of prompts).

    Returns:
        (N, D) float32.
    """
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                output_hidden_states=True)
    last = batch.attention_mask.sum(-1).long().clamp(min=1) - 1
    states = out.hidden_states[-1]
    return states[torch.arange(len(last), device=states.device), last].float()


def next_token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position.

    Args:
        logits: (N, T, V) float32 logits predicting each target.
        targets: (N, T) token ids.

    Returns:
        (N, T) log-probabilities.
    """
    # log_softmax via logsumexp keeps memory at one (N, T, V) float32 tensor.
    picked = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logps(
    model: Callable[..., Any], input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Summed log-probs over completion tokens.

    Args:
        input_ids, attention_mask, loss_mask: (N, T); loss_mask is 1 on completion tokens.

    Returns:
        (N,) Σ_t loss_mask[t] · log p(x_t | x_<t).
    """
    lp = token_logprobs(model, input_ids, attention_mask)
    return (lp * loss_mask[:, 1:].to(lp.dtype)).sum(-1)


def _pad_to(x: torch.Tensor, length: int, value: int = 0) -> torch.Tensor:
    return F.pad(x, (0, length - x.shape[1]), value=value)


def preference_logps(model: Callable[..., Any], batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of both sides in one forward pass.

    Returns:
        (chosen (B,), rejected (B,)).
    """
    length = max(batch.chosen_input_ids.shape[1], batch.rejected_input_ids.shape[1])
    ids = torch.cat([_pad_to(batch.chosen_input_ids, length), _pad_to(batch.rejected_input_ids, length)])
    attn = torch.cat([_pad_to(batch.chosen_attention_mask, length), _pad_to(batch.rejected_attention_mask, length)])
    mask = torch.cat([_pad_to(batch.chosen_loss_mask, length), _pad_to(batch.rejected_loss_mask, length)])
    logps = sequence_logps(model, ids, attn, mask)
    n = batch.chosen_input_ids.shape[0]
    return logps[:n], logps[n:]


def pair_scores(model: Any, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores of both sides of each pair in one forward pass: (chosen (B,), rejected (B,))."""
    length = max(batch.chosen_input_ids.shape[1], batch.rejected_input_ids.shape[1])
    ids = torch.cat([_pad_to(batch.chosen_input_ids, length), _pad_to(batch.rejected_input_ids, length)])
    attn = torch.cat([_pad_to(batch.chosen_attention_mask, length), _pad_to(batch.rejected_attention_mask, length)])
    scores = sequence_scores(model, ids, attn)
    n = batch.chosen_input_ids.shape[0]
    return scores[:n], scores[n:]


def greedy_generate(model: Any, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int, eos_id: int,
                    device: torch.device, synced_gpus: bool = False) -> list[list[int]]:
    """Greedy continuations of token-id prompts (left-padded into one batch).

    Returns:
        Per prompt, the generated token ids up to (not including) the first EOS.
    """
    inner = getattr(model, "module", model)
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = inner.generate(
        input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=pad_id, eos_token_id=eos_id, synced_gpus=synced_gpus,
    )
    responses = []
    for row in out[:, width:].tolist():
        responses.append(row[: row.index(eos_id)] if eos_id in row else row)
    return responses


def token_groups(batch: TensorBatch, tokens: int, agree: Callable[[int], int] | None = None) -> list[torch.Tensor]:
    """Row indices of ``batch`` packed by a token budget (``TensorBatch.token_microbatches``); ``agree``
    maps the number this rank packed to the number every rank must run (a collective), and the
    largest groups are split to reach it."""
    groups = batch.token_microbatches(tokens)
    n = agree(len(groups)) if agree is not None else len(groups)
    return groups if n == len(groups) else batch.token_microbatches(tokens, n)


def evaluate_in_chunks(
    model: torch.nn.Module,
    batch: TensorBatch,
    fn: Callable[[Any, Any], Any],
    *,
    rows_per_chunk: int,
    device: torch.device,
    tokens_per_chunk: int | None = None,
    count: Callable[[int], int] | None = None,
) -> Any:
    """Run ``fn(model, chunk)`` without gradients over chunks and concatenate tensor results (on CPU),
    in the batch's row order.

    ``fn`` returns a tensor or a tuple of tensors, each with the chunk's rows as dim 0; a per-token
    result (dim 1 aligned with the batch's first attention mask, or one shorter) comes back zero-padded
    to the full width. Chunks are ``rows_per_chunk`` consecutive rows, or with ``tokens_per_chunk``
    rows sorted by length and packed by that token budget (``TensorBatch.token_microbatches``; ``count``
    maps the number of chunks this rank formed to the number it must run, for ranks that have to run
    the same number of forwards: ZeRO-3). Either way each chunk drops its all-padding columns.
    """
    if tokens_per_chunk:
        groups = token_groups(batch, tokens_per_chunk, count)
    else:
        groups = [torch.arange(i, min(i + rows_per_chunk, len(batch))) for i in range(0, len(batch), rows_per_chunk)]
    was_training = model.training
    model.eval()
    outs = []
    with torch.no_grad():
        for rows in groups:
            chunk, removed = batch.select(rows).trimmed()
            out = fn(model, chunk.to(device))
            parts = out if isinstance(out, tuple) else (out,)
            parts = tuple(_pad_columns(o.detach().float().cpu(), removed) for o in parts)
            outs.append(parts if isinstance(out, tuple) else parts[0])
    if was_training:
        model.train()
    if not outs:
        return torch.empty(0)
    order = torch.argsort(torch.cat(groups))  # chunk rows back to batch rows
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts)[order] for parts in zip(*outs))
    return torch.cat(outs)[order]


def _pad_columns(out: torch.Tensor, removed: int) -> torch.Tensor:
    """Zero-pad a per-token result (B, T) by the columns trimming removed from its chunk."""
    return F.pad(out, (0, removed)) if out.dim() == 2 and removed else out
