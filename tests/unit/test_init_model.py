"""``init_model`` and ``rlhf init-model``: a model of each family with a BPE tokenizer trained on the
user's files (ChatML, EOS and pad set, no <unk>); the HH-style sample read as SFT rows and as prompts;
the shipped sample is what its generator writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.data.formats import read_prompts, read_sft
from pipelines.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "pipelines" / "samples" / "hh_style"


def test_init_model_cli_builds_a_model_and_a_tokenizer_from_the_users_files(tmp_path, capsys):
    from transformers import AutoConfig, AutoTokenizer

    from orchestrator import cli

    out = tmp_path / "model"
    code = cli.main(["init-model", str(out), "--architecture", "qwen2", "--positions", "512",
                     "--train-files", str(SAMPLE / "eval.jsonl"), "--vocab-size", "640"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Qwen2ForCausalLM (qwen2," in printed and "512 positions, tied embeddings: yes" in printed
    config, tok = AutoConfig.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert config.model_type == "qwen2" and config.max_position_embeddings == 512 and config.tie_word_embeddings
    assert config.vocab_size % 64 == 0 and config.vocab_size >= len(tok)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert config.eos_token_id == tok.eos_token_id
    text = "\n\nHuman: It’s “fine” 🙂\n\nAssistant: Sure! For sourdough bread"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: every character round-trips
    assert len(tok(text)["input_ids"]) < len(text) / 2  # merges learned from the files' words
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert json.loads((out / "init_model.json").read_text())["tokenizer"]["train_files"] == [str(SAMPLE / "eval.jsonl")]


def test_init_model_refuses_an_unknown_architecture_and_a_missing_file(tmp_path, capsys):
    from orchestrator import cli

    assert cli.main(["init-model", str(tmp_path / "m"), "--train-files", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: tokenizer.train_files file not found" in capsys.readouterr().err
    from pydantic import ValidationError

    from pipelines.stages.init_model import InitModelStage

    with pytest.raises(ValidationError, match="'bert' is not one of"):
        InitModelStage.model_validate({"name": "b", "kind": "init_model", "architecture": "bert",
                                       "tokenizer": {"train_files": ["x.jsonl"]}})
    assert not (tmp_path / "m").exists()


def test_a_preference_file_is_sft_rows_and_prompts():
    rows = read_sft(str(SAMPLE / "eval.jsonl"))
    prompt, chosen = rows[0]
    assert prompt.startswith("\n\nHuman: ") and prompt.endswith("\n\nAssistant:") and chosen.startswith(" ")
    prompts = read_prompts(str(SAMPLE / "eval.jsonl"))
    assert [p for p, _ in rows] == prompts and len(prompts) == 80
    assert read_prompts(str(SAMPLE / "eval.jsonl"), check_only=True) == []
    with pytest.raises(DataError, match="missing 'question'"):
        read_prompts(str(SAMPLE / "eval.jsonl"), field="question")


def test_the_shipped_sample_is_what_its_generator_writes(tmp_path):
    from pipelines.tasks.hh_style import write_sample

    write_sample(tmp_path)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (SAMPLE / name).read_bytes()
