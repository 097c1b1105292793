"""Test tiers by directory: unit (no Ray), ray (real local Ray), e2e (real pipelines), sanity."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        if tier in ("unit", "ray", "e2e", "sanity"):
            item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pipelines.tasks.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model") / "model", size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward-model checkpoint (sequence classifier, seeded score head) on the tiny model's trunk."""
    import shutil

    import torch

    from actors.modeling import load_reward_model

    out = tmp_path_factory.mktemp("tiny_rm") / "model"
    torch.manual_seed(0)
    load_reward_model(str(tiny_model_dir), dtype=torch.float32).save_pretrained(out, safe_serialization=True)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def task_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from pipelines.tasks.arithmetic import write_datasets

    return write_datasets(tmp_path_factory.mktemp("task_data"), max_operand=99, num_sft=256, num_pairs=512,
                          num_prompts=64, num_eval=64, eval_fraction=0.1, seed=0)


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray instance (2 CPUs), shut down after the module."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


PAIR_ROWS = {
    "prompt": [f"{a}+{b}=" for a, b in [(1, 2), (13, 4), (22, 31), (7, 7), (40, 9), (3, 30), (11, 11), (5, 45)]],
    "chosen": ["3", "17", "53", "14", "49", "33", "22", "50"],
    "rejected": ["4", "27", "52", "41", "59", "3", "21", "60"],
}


@pytest.fixture(scope="session")
def trainers(tiny_model_dir):
    """Build single-rank PolicyTrainers (no Ray) on the tiny model: ``trainers(micro, lr, **spec)``.
    One process group for the whole session (DeepSpeed keeps process-group state), so every trainer
    is made here; the env vars ``setup`` sets are removed again right away."""
    from actors.net import free_port
    from actors.policy_trainer import PolicyTrainer, TrainerSpec

    port = free_port()
    made = []

    def make(micro: int, lr: float = 1e-3, **spec_args) -> PolicyTrainer:
        spec = TrainerSpec(model_path=str(tiny_model_dir), examples_per_step=8, examples_per_microbatch=micro, lr=lr,
                           **({"total_steps": 4, "schedule": "constant", "zero_stage": 2} | spec_args))
        trainer = PolicyTrainer(0, 1, spec)
        saved_env = dict(os.environ)
        trainer.setup("127.0.0.1", port)
        os.environ.clear()
        os.environ.update(saved_env)
        made.append(trainer)
        return trainer

    yield make
    if made:
        made[0].shutdown()


@pytest.fixture(scope="session")
def batch(tiny_model_dir):
    """Eight preference pairs of the arithmetic task with reference log-probs of the tiny model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.modeling import preference_logps
    from pipelines.data.tokens import collate_pairs, tokenize_pairs

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    b = collate_pairs(tokenize_pairs(PAIR_ROWS, tok, max_length=16, source="rows"), tok.pad_token_id)
    with torch.no_grad():
        b.ref_chosen_logps, b.ref_rejected_logps = preference_logps(
            AutoModelForCausalLM.from_pretrained(tiny_model_dir), b)
    return b
