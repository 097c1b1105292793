"""The auxiliary (designer) term of a DPO-family stage, UPO (``pipelines.algorithms.upo``).

A stage with designer rewards mixes in ``UPOFields`` (``auxiliary`` and ``upo``) and hands the rest
of the code an ``AuxiliaryObjective``: the rewards and coefficients, with the weights and metrics
they define. Phases around the trainer's: ``score_auxiliary`` scores every training response,
chosen and rejected alike, once under each auxiliary reward (the ``reward`` group, a ``RewardSet``,
through an ``AuxiliaryScorer``) and caches the scores in the stage directory
(``auxiliary_rewards.parquet``, reused when the same rewards meet the same texts); the advantage
weights follow from the scores and the ``upo`` coefficients. During training the same group scores
the held-out greedy generations (``eval/aux/<name>_mean``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field, model_validator

from actors.modeling import last_token_states
from actors.reward import RewardSet
from orchestrator.runtime.rollout_ops import score
from orchestrator.runtime.sharding import sharded_rows
from pipelines.algorithms.upo import (
    auxiliary_advantages,
    awr_weights,
    expectile_loss,
    explained_variance,
    fit_expectile_value,
    weighted_auxiliary_reward,
)
from pipelines.data.batches import PreferenceBatch, SFTBatch
from pipelines.stages.base import Frozen
from pipelines.stages.config import RewardConfig, RewardGroupConfig
from pipelines.stages.training import RewardSpec, spawn_reward

if TYPE_CHECKING:
    from orchestrator.runtime.actor_group import ActorGroup
    from orchestrator.runtime.context import StageContext

CACHE_FILE = "auxiliary_rewards.parquet"
EVAL_CACHE_FILE = "auxiliary_rewards_eval.parquet"


class AuxiliaryRewardConfig(RewardConfig):
    """One designer reward r_k of the auxiliary term: a function or a reward-model checkpoint, with
    its weight c_k in A = Σ_k c_k·r_k − b(x). A negative weight asks for less of the reward."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=32, description="metric name: aux/<name>_mean")
    weight: float = Field(1.0, description="c_k")

    @model_validator(mode="after")
    def _function_or_model(self) -> AuxiliaryRewardConfig:
        if self.judge is not None or self.served is not None:
            raise ValueError("function: a designer reward is a function or a reward model (judge and served "
                             "rewards are for the stage reward)")
        return self


class UPOConfig(Frozen):
    """The auxiliary term's coefficients: L = L_pref + λ·L_aux, w = min(exp(A/τ), w_max)."""

    coef: float = Field(1.0, ge=0, description="λ; 0 trains on the preference loss alone (aux metrics still logged)")
    temperature: float = Field(1.0, gt=0, description="τ of the advantage weights exp(A/τ)")
    max_weight: float = Field(20.0, ge=1, description="w_max: weights are clipped here")
    baseline: Literal["group_mean", "value"] = Field(
        "group_mean", description="b(x) in A = R − b(x): group_mean, the mean R of the responses to the same prompt; "
        "value, a value V(x) fitted by expectile regression on the starting policy's state at the prompt's last "
        "token (the paper's; offline stages)")
    expectile: float = Field(0.7, gt=0, lt=1,
                             description="the value's expectile (baseline: value; 0.5 = least squares)")
    responses: Literal["all", "preferred"] = Field(
        "all", description="whose likelihood the auxiliary term weights: all, chosen and rejected alike (AWR over "
        "the data); preferred, only the chosen (DPO) or desirable (KTO) ones, so it never raises a response the "
        "preferences reject")
    ties: Literal["weight", "skip"] = Field(
        "weight", description="responses whose advantage is 0 (both sides of a pair that ties on the auxiliary reward, "
        "under group_mean): weight, w = 1 (their plain likelihood); skip, w = 0 (the auxiliary term acts only where "
        "the designer's rewards differ)")


@dataclass(frozen=True)
class AuxiliaryObjective:
    """A stage's designer rewards and UPO coefficients: what the auxiliary term needs of its config."""

    rewards: tuple[AuxiliaryRewardConfig, ...]
    upo: UPOConfig

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.rewards)

    def coefficients(self) -> torch.Tensor:
        """(K,) the designer weights c_k."""
        return torch.tensor([a.weight for a in self.rewards], dtype=torch.float64)

    def specs(self, resolve: Callable[[str], str | None]) -> tuple[RewardSpec, ...]:
        """Each reward as a ``RewardSet`` spec, model references resolved (``resolve(field)``: a path)."""
        return tuple((a.name, a.function, resolve(f"auxiliary.{i}.model") if a.model is not None else None,
                      a.normalize) for i, a in enumerate(self.rewards))

    def awr(self, advantages: torch.Tensor) -> torch.Tensor:
        """(N,) weights min(exp(A/τ), w_max) of (N,) advantages, float32."""
        u = self.upo
        return awr_weights(advantages, temperature=u.temperature, max_weight=u.max_weight,
                           skip_ties=u.ties == "skip").float()

    def weights(self, rewards: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """(N,) AWR weights of responses with auxiliary rewards (N, K); ``groups`` (N,) ids the prompt."""
        return self.awr(auxiliary_advantages(rewards, self.coefficients(), groups))

    def score_metrics(self, scores: torch.Tensor, prefix: str) -> dict[str, float]:
        """``<prefix>/<name>_mean`` of (N, K) scores, and ``<prefix>/weighted_mean`` (Σ_k c_k r_k)."""
        metrics = {f"{prefix}/{name}_mean": float(scores[:, k].mean()) for k, name in enumerate(self.names)}
        metrics[f"{prefix}/weighted_mean"] = float(weighted_auxiliary_reward(scores, self.coefficients()).mean())
        return metrics

    def tie_accuracy(self, term: AuxiliaryTerm, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
                     ) -> dict[str, float]:
        """``eval/rewards/accuracies_aux_ties``: implicit-reward accuracy over the held-out pairs whose
        two sides have the same weighted auxiliary reward, where the designer has no preference and only
        the pairs' own preference should decide (on the others the auxiliary term moves the implicit
        reward on purpose). Empty when no pair ties."""
        coefs = self.coefficients()
        ties = (weighted_auxiliary_reward(term.chosen_rewards.double(), coefs)
                - weighted_auxiliary_reward(term.rejected_rewards.double(), coefs)).abs() < 1e-9
        if not ties.any():
            return {}
        right = (chosen_rewards > rejected_rewards)[ties].float().mean()
        return {"eval/rewards/accuracies_aux_ties": float(right), "eval/aux/tied_pairs": float(ties.float().mean())}


AUXILIARY_FIELD = Field((), description="designer rewards optimised beside the preferences (UPO); empty = plain DPO")


class UPOFields(Frozen):
    """The fields of a stage that optimises designer rewards beside its preferences (mixed into the
    DPO-family stages): the rewards, the coefficients (defaulted with the rewards), their inputs."""

    auxiliary: tuple[AuxiliaryRewardConfig, ...] = AUXILIARY_FIELD
    upo: UPOConfig | None = Field(None, description="λ, τ, w_max of the auxiliary term (defaults with auxiliary)")

    def auxiliary_objective(self) -> AuxiliaryObjective | None:
        """The designer rewards and their coefficients; None without auxiliary rewards."""
        return AuxiliaryObjective(self.auxiliary, self.upo) if self.auxiliary and self.upo else None

    def inputs(self) -> dict[str, tuple[str, str]]:
        """The stage's inputs plus one ``auxiliary.<i>.model`` per auxiliary reward-model checkpoint."""
        return super().inputs() | {f"auxiliary.{i}.model": ("reward_model", "reward_model")  # type: ignore[misc]
                                   for i, a in enumerate(self.auxiliary) if a.model is not None}

    def function_rewards(self) -> list[str]:
        return super().function_rewards() + [a.function for a in self.auxiliary if a.function]  # type: ignore[misc]

    @model_validator(mode="after")
    def _auxiliary_consistent(self) -> UPOFields:
        """Auxiliary reward names are unique, and ``upo`` goes with auxiliary rewards (defaulted when omitted)."""
        names = [a.name for a in self.auxiliary]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"auxiliary[{i}].name: {name!r} is used twice")
        if self.upo is not None and not self.auxiliary:
            raise ValueError("upo: set, but auxiliary lists no rewards; add auxiliary rewards or remove upo")
        if self.auxiliary and self.upo is None:
            object.__setattr__(self, "upo", UPOConfig())  # the defaults, written out in the resolved pipeline
        return self


@dataclass
class AuxiliaryTerm:
    """Per training pair, the auxiliary rewards and advantage weights of both responses.

    Fields:
        names: the K auxiliary rewards, in config order.
        chosen_rewards: (N, K) r_k(x, y_w).
        rejected_rewards: (N, K) r_k(x, y_l).
        chosen_weights: (N,) w of y_w.
        rejected_weights: (N,) w of y_l.
    """

    names: tuple[str, ...]
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_weights: torch.Tensor
    rejected_weights: torch.Tensor

    def attach(self, batch: PreferenceBatch, idx: list[int]) -> PreferenceBatch:
        """``batch`` (the pairs at ``idx``) with their auxiliary rewards and weights."""
        return dataclasses.replace(batch, aux_chosen_rewards=self.chosen_rewards[idx],
                                   aux_rejected_rewards=self.rejected_rewards[idx],
                                   aux_chosen_weights=self.chosen_weights[idx],
                                   aux_rejected_weights=self.rejected_weights[idx])

    def data_metrics(self) -> dict[str, float]:
        """Statistics of the whole training set (``data_metrics``), both sides of every pair."""
        return data_metrics(self.names, torch.cat([self.chosen_rewards, self.rejected_rewards]),
                            torch.cat([self.chosen_weights, self.rejected_weights]))


def data_metrics(names: tuple[str, ...], rewards: torch.Tensor, weights: torch.Tensor) -> dict[str, float]:
    """``aux/data_<name>_mean`` of the training responses' (N, K) auxiliary rewards and
    ``aux/data_weight_{mean,max,min}`` of their (N,) weights."""
    metrics = {f"aux/data_{name}_mean": float(rewards[:, k].mean()) for k, name in enumerate(names)}
    return metrics | {"aux/data_weight_mean": float(weights.mean()), "aux/data_weight_max": float(weights.max()),
                      "aux/data_weight_min": float(weights.min())}


def prompt_groups(prompts: list[str]) -> torch.Tensor:
    """(N,) one integer id per distinct prompt text."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(p, len(ids)) for p in prompts])


def advantage_weights(objective: AuxiliaryObjective, prompts: list[str], chosen: torch.Tensor,
                      rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """AWR weights (chosen (N,), rejected (N,)) with the baseline over every response to the same prompt
    in the training set (both sides of every pair that has it)."""
    w = objective.weights(torch.cat([chosen, rejected]), prompt_groups(prompts * 2))
    return w[: len(prompts)], w[len(prompts):]


class AuxiliaryScorer:
    """The reward group holding every auxiliary reward, and the stage directory's cache of its scores."""

    def __init__(self, objective: AuxiliaryObjective, group: ActorGroup, items_per_chunk: int, stage_dir: Path,
                 specs: tuple[RewardSpec, ...]) -> None:
        self.objective, self.group, self.items_per_chunk = objective, group, items_per_chunk
        self.stage_dir, self.specs = stage_dir, specs

    def texts(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """(N, K) scores of each (prompt, response) under each auxiliary reward."""
        rows = score(self.group, prompts, responses, self.items_per_chunk, method=RewardSet.score_chunk)
        return torch.tensor(rows, dtype=torch.float64).reshape(len(prompts), -1)

    def responses(self, prompts: list[str], responses: list[str], cache_file: str = CACHE_FILE) -> torch.Tensor:
        """(N, K) auxiliary rewards of (prompt, response) texts, scored once and cached in the stage
        directory (reused when the same rewards meet the same texts)."""
        cache = self.stage_dir / cache_file
        digest = hashlib.sha256(json.dumps(self.specs).encode())
        for column in (prompts, responses):
            digest.update(json.dumps(column).encode())
        key = digest.hexdigest()
        names = [name for name, *_ in self.specs]
        if cache.exists():
            table = pq.read_table(cache)
            if table.schema.metadata and table.schema.metadata.get(b"key") == key.encode():
                return torch.tensor([table.column(name).to_pylist() for name in names], dtype=torch.float64).T
        scores = self.texts(prompts, responses)
        table = pa.table({"prompt": prompts, "response": responses,
                          **dict(zip(names, scores.T.tolist(), strict=True))})
        tmp = cache.with_suffix(".tmp")
        pq.write_table(table.replace_schema_metadata({"key": key}), tmp)
        os.replace(tmp, cache)
        return scores

    def term(self, rows: dict[str, list[str]], cache_file: str = CACHE_FILE) -> AuxiliaryTerm:
        """Phase ``score_auxiliary``: the pairs' auxiliary rewards (both sides, cached) and their weights."""
        n = len(rows["prompt"])
        scores = self.responses(rows["prompt"] * 2, rows["chosen"] + rows["rejected"], cache_file)
        chosen, rejected = scores[:n], scores[n:]
        w_chosen, w_rejected = advantage_weights(self.objective, rows["prompt"], chosen, rejected)
        return AuxiliaryTerm(self.objective.names, chosen.float(), rejected.float(), w_chosen, w_rejected)

    def of_generations(self, prompts: list[str], texts: list[str]
                       ) -> tuple[dict[str, list[float]], dict[str, float]]:
        """Each auxiliary reward of held-out generations: columns ``aux_<name>`` and metrics
        ``eval/aux/<name>_mean`` (and ``eval/aux/weighted_mean``, Σ c_k r_k)."""
        scores = self.texts(prompts, texts)
        columns = {f"aux_{name}": scores[:, k].tolist() for k, name in enumerate(self.objective.names)}
        return columns, self.objective.score_metrics(scores, "eval/aux")


def spawn_scorer(ctx: StageContext, objective: AuxiliaryObjective, rg: RewardGroupConfig, *,
                 trust_remote_code: bool) -> AuxiliaryScorer:
    """The ``reward`` group holding every auxiliary reward, set up (a bad function or checkpoint fails here)."""
    specs = objective.specs(ctx.input)
    group = spawn_reward(ctx, rg, specs, trust_remote_code=trust_remote_code)
    group.setup(RewardSet.setup)
    return AuxiliaryScorer(objective, group, rg.items_per_chunk, ctx.stage_dir, specs)


PROMPTS_PER_PASS = 1024


def prompt_features(group: ActorGroup, method: Any, prompts: list[list[int]], pad_id: int) -> torch.Tensor:
    """(P, D) the last-layer state at each prompt's last token under a model group (``method``:
    ``PolicyTrainer.evaluate`` before the first step, or a reference group's), rows split over the ranks."""
    out = []
    for start in range(0, len(prompts), PROMPTS_PER_PASS):
        block = prompts[start : start + PROMPTS_PER_PASS]
        shards, _ = sharded_rows(block, group.num_workers)
        batches = []
        for shard in shards:
            width = max(len(p) for p in shard)
            ids = torch.tensor([p + [pad_id] * (width - len(p)) for p in shard], dtype=torch.long)
            attn = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in shard], dtype=torch.long)
            batches.append(SFTBatch(ids, attn, torch.zeros_like(attn)))
        out.append(torch.cat(group.shard(method, batches, last_token_states))[: len(block)])
    return torch.cat(out)


def value_weights(objective: AuxiliaryObjective, rewards: torch.Tensor, prompts: list[list[int]],
                  group: ActorGroup, method: Any, pad_id: int) -> tuple[torch.Tensor, dict[str, float]]:
    """``upo.baseline: value``: AWR weights (N,) of responses with auxiliary rewards (N, K) against
    a value V(x) of their prompts (token ids, one per response) fitted by expectile regression
    (``upo.expectile``) on the starting policy's prompt states; with its ``upo/value_*`` metrics."""
    totals = weighted_auxiliary_reward(rewards, objective.coefficients())
    ids: dict[tuple[int, ...], int] = {}
    row_prompt = torch.tensor([ids.setdefault(tuple(p), len(ids)) for p in prompts])
    features = prompt_features(group, method, [list(p) for p in ids], pad_id)
    expectile = objective.upo.expectile
    values = fit_expectile_value(features[row_prompt].double(), totals, expectile=expectile)
    advantages = totals - values
    metrics = {"upo/value_loss": float(expectile_loss(values, totals, expectile=expectile)),
               "upo/value_explained_variance": explained_variance(values, totals),
               "upo/advantage_mean": float(advantages.mean()), "upo/value_prompts": float(len(ids))}
    return objective.awr(advantages), metrics


def with_value_baseline(objective: AuxiliaryObjective, term: AuxiliaryTerm, prompts: list[list[int]],
                        group: ActorGroup, method: Any, pad_id: int) -> dict[str, float]:
    """Replace a pair term's group-mean weights by ``value_weights`` (both sides share the pair's
    prompt); returns the value's metrics."""
    n = len(prompts)
    w, metrics = value_weights(objective, torch.cat([term.chosen_rewards, term.rejected_rewards]).double(),
                               prompts * 2, group, method, pad_id)
    term.chosen_weights, term.rejected_weights = w[:n], w[n:]
    return metrics
