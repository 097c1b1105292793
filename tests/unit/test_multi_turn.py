"""Multi-turn rollouts' mechanics without Ray: exact tokens, the loss mask, the append-only check,
failed environments (retry once, then the whole group masked out), and the masked PPO math.

The rollout group here is a scripted stand-in (orchestration logic only); the real vLLM path is
``tests/e2e/test_agents.py``."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from actors.environment import EnvFailure, EnvironmentWorker, call_with_deadline
from actors.rollout import RolloutSample
from pipelines.algorithms.ppo import estimate_advantages, gae, reinforce_pp_advantages, token_rewards
from pipelines.data.tokens import TokenizedPair, collate_pairs
from pipelines.environments.base import EnvironmentFactory, Step, Turn
from pipelines.environments.tokens import ChatTokens, check_append_only
from pipelines.errors import ConfigError
from pipelines.stages.multi_turn import MultiTurn, trajectory_columns
from pipelines.stages.online import EnvironmentConfig
from pipelines.tasks import calculator
from pipelines.tasks.tiny_model import build_bpe_tokenizer

QUESTION = {"question": "What is 7 * 13 + 25?", "answer": 116, "prompt": "What is 7 * 13 + 25?"}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    texts = [m["content"] for m in calculator.demonstration(QUESTION)] * 20
    return build_bpe_tokenizer(["<|im_start|>system\nTools: user assistant tool", *texts], vocab_size=400,
                               model_max_length=512)


class ScriptedRollout:
    """Stands in for the rollout group: answers each prompt with the next text of a script keyed by
    how many assistant turns the prompt holds, encoded + EOS (``RolloutWorker.generate_chunk``'s shape)."""

    num_workers = 1

    def __init__(self, tokenizer: Any, script: list[str], stop: bool = True) -> None:
        self.tokenizer, self.script, self.stop = tokenizer, script, stop
        self.assistant = tokenizer.convert_tokens_to_ids("<|im_start|>")

    def balanced(self, method: Any, chunks: list[tuple[list[list[int]], int]], sampling: Any,
                 on_result: Any = None) -> list[list[RolloutSample]]:
        out = []
        for prompts, _ in chunks:
            samples = []
            for prompt in prompts:
                turn = prompt.count(self.assistant) // 2 - 1  # user+assistant opened per turn, minus the first user
                text = self.script[min(turn, len(self.script) - 1)]
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += [self.tokenizer.eos_token_id] if self.stop else []
                samples.append(RolloutSample(list(prompt), ids, text, [-0.5] * len(ids),
                                             "stop" if self.stop else "length", 3))
            out.append(samples)
        return out


def sampler(tokenizer: Any, script: list[str], cls: str = "pipelines.tasks.calculator:CalculatorEnvironment",
            stop: bool = True, **env: Any) -> MultiTurn:
    from actors.rollout import SamplingSpec

    config = EnvironmentConfig(cls=cls, max_turns=4, max_total_tokens=400, call_timeout_s=env.pop("timeout", 5.0),
                               **env)
    return MultiTurn(config, ScriptedRollout(tokenizer, script, stop), None, tokenizer, [QUESTION],  # type: ignore[arg-type]
                     samples_per_prompt=2, sampling=SamplingSpec(max_new_tokens=40), prompts_per_chunk=4, seed=0)


SOLVE = ['<tool_call>{"name": "multiply", "arguments": {"a": 7, "b": 13}}</tool_call>',
         '<tool_call>{"name": "add", "arguments": {"a": 91, "b": 25}}</tool_call>', "116"]


def test_a_trajectory_is_the_sampled_tokens_plus_the_templates_tokens(tokenizer: Any) -> None:
    s = sampler(tokenizer, SOLVE)
    samples, metrics, _ = s.play([QUESTION], 2, 1, s.sampling)
    x = samples[0]
    assert x.reward == 1.0 and x.info["success"] == 1.0 and x.info["tool_calls"] == 2.0 and len(x.turns) == 3
    assert metrics["rollout/token_mismatch"] == 0.0 and metrics["env/success_rate"] == 1.0
    assert metrics["env/turns_mean"] == 3.0 and metrics["env/tool_calls_mean"] == 2.0
    # the trained sequence is what a whole rendering of the conversation tokenizes to (ChatML is append-only)
    conversation = calculator.demonstration(QUESTION)
    chat = ChatTokens(tokenizer, calculator.tool_schemas())
    whole = chat.prompt(conversation[:1]) + chat.encode(chat.render(conversation)[len(chat.render(conversation[:1],
                                                                                                   True)):])
    assert x.prompt_ids + x.response_ids == whole[: len(x.prompt_ids) + len(x.response_ids)]
    # the loss mask is 1 exactly on the sampled turns, whose log-probs are the sampler's
    for start, end in x.turns:
        assert x.loss_mask[start:end] == [1] * (end - start) and x.logprobs[start:end] == [-0.5] * (end - start)
    assert sum(x.loss_mask) == sum(e - s for s, e in x.turns) < len(x.response_ids)
    assert "⟦" in x.text and "91" in x.text  # the environment's tokens are marked in the sample table
    assert trajectory_columns(samples)["policy_tokens"][0] == f"{sum(x.loss_mask)}/{len(x.response_ids)}"


def test_a_turn_cut_at_max_new_tokens_ends_the_trajectory(tokenizer: Any) -> None:
    s = sampler(tokenizer, SOLVE, stop=False)
    samples, metrics, _ = s.play([QUESTION], 2, 1, s.sampling)
    assert all(x.finish_reason == "length" and len(x.turns) == 1 and x.reward == 0.0 for x in samples)
    assert metrics["env/truncated_rate"] == 1.0


class Flaky:
    """Its first ``step`` call raises, its third hangs (counted over every instance)."""

    steps = 0

    def reset(self, task: dict[str, Any]) -> list[dict[str, str]]:
        return [{"role": "user", "content": task["question"]}]

    def tools(self) -> None:
        return None

    def step(self, turn: Turn) -> Step:
        Flaky.steps += 1
        if Flaky.steps == 1:
            raise ValueError("boom")
        if Flaky.steps == 3:
            time.sleep(5)
        return Step([], 1.0, True, {"success": 1.0})


def test_a_failed_trajectory_is_retried_once_then_its_whole_group_is_masked_out(tokenizer: Any) -> None:
    Flaky.steps = 0
    s = sampler(tokenizer, ["116"], cls=f"{__name__}:Flaky", timeout=0.5)
    start = time.perf_counter()
    samples, metrics, _ = s.play([QUESTION], 2, 1, s.sampling)
    assert time.perf_counter() - start < 4  # the hung step was abandoned at its deadline
    # trajectory 1 raised; its retry hung: the group is dropped, trajectory 2 (fine) with it
    assert metrics["env/errors"] == 2.0 and metrics["env/retries"] == 1.0 and metrics["env/groups_dropped"] == 1.0
    assert all(sum(x.loss_mask) == 0 and x.reward == 0.0 and x.info["dropped"] for x in samples)
    assert trajectory_columns(samples)["trained"] == [False, False]


def test_the_environment_worker_answers_failures_per_trajectory() -> None:
    worker = EnvironmentWorker(0, 1, EnvironmentFactory("pipelines.tasks.calculator:CalculatorEnvironment"))
    worker.setup()
    assert worker.reset_chunk([("a", QUESTION)])[0] == [{"role": "user", "content": QUESTION["question"]}]
    lost = worker.step_chunk([("b", Turn("116"))])[0]
    assert isinstance(lost, EnvFailure) and "no environment for trajectory b" in lost.reason
    done = worker.step_chunk([("a", Turn("116"))])[0]
    assert isinstance(done, Step) and done.done and done.reward == 1.0 and "a" not in worker.envs
    assert isinstance(call_with_deadline(lambda: time.sleep(2), 0.1, "slow"), EnvFailure)


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer: Any) -> None:
    check_append_only(tokenizer, calculator.tool_schemas(), ("tool", "user"))  # ChatML: append-only
    import copy

    bad = copy.deepcopy(tokenizer)
    # earlier assistant turns lose their content, as templates that strip reasoning do
    bad.chat_template = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
                         "{{ '<|im_start|>assistant\\n<|im_end|>\\n' }}{% else %}"
                         "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}"
                         "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with pytest.raises(ConfigError, match=r"not append-only for tool messages.*token \d+"):
        check_append_only(bad, None, ("tool",), where="probe")
    no_eos = copy.deepcopy(tokenizer)
    no_eos.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ConfigError, match="not the EOS token"):
        check_append_only(no_eos, None, ("user",))


def test_masked_advantages_skip_the_environments_tokens() -> None:
    # policy tokens at 0, 1 and 4; the environment's at 2, 3; padding at 5
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0]])
    rewards = token_rewards(torch.tensor([1.0]), torch.zeros(1, 6), mask, kl_coef=0.0)
    assert rewards.tolist() == [[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]]  # the score on the last policy token
    compact = torch.tensor([[1.0, 1.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 9.0, 9.0, 0.7, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    want, want_ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.4, 0.7]]), compact, gamma=0.9, lam=0.8)
    assert torch.allclose(adv[:, [0, 1, 4]], want) and torch.allclose(ret[:, [0, 1, 4]], want_ret)
    assert adv[0, 2:4].abs().sum() == 0
    returns = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    assert returns[0, 2:4].abs().sum() == 0
    grpo, _ = estimate_advantages("grpo", torch.cat([rewards, 0 * rewards]), torch.cat([mask, mask]), group_size=2)
    assert (grpo[:, 2:4] == 0).all() and grpo[0, 0] > 0 > grpo[1, 0]


def test_pairs_of_trajectories_train_only_the_policy_tokens() -> None:
    pair = TokenizedPair([5, 6], [7, 8, 9], [7, 3], chosen_mask=[1, 0, 1], rejected_mask=None)
    batch = collate_pairs([pair], pad_id=0)
    assert batch.chosen_loss_mask.tolist() == [[0, 0, 1, 0, 1]]
    assert batch.rejected_loss_mask.tolist() == [[0, 0, 1, 1]]
