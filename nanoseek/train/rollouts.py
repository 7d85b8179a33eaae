"""GRPO's rollouts: which problems a step asks, where the completions come from, and how they are scored.

A `Group` is one problem's prompt and its `group_size` completions (`Rollout`s): the tokens the engine sampled,
their log-probs under the engine's numerics, whether the length cap cut them, and, once scored, their rewards.
Completions come from a `RolloutSource`: an in-process engine holding a copy of the policy (weights pushed in
memory after every update), or running `nanoseek serve` processes (weights pushed through their admin route).
Groups cross process boundaries (torchrun ranks) as JSON.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field

import torch

from ..data.sources import chat_prompt
from ..data.tasks import Problem
from ..engine import SamplingParams
from ..errors import ConfigError
from .config import GRPOConfig
from .rewards import Reward, combine, score


@dataclass
class Rollout:
    tokens: list[int]
    text: str
    engine_logp: list[float]  # per token, under the sampling engine's numerics
    truncated: bool  # cut by max_completion_tokens
    reward: float = 0.0
    rewards: dict[str, float] = field(default_factory=dict)  # per reward function, before weighting


@dataclass
class Group:
    problem: Problem
    prompt_ids: list[int]
    rollouts: list[Rollout]

    @property
    def has_signal(self) -> bool:
        """Whether the rewards differ: a group whose completions all score the same has zero advantages."""
        return len({r.reward for r in self.rollouts}) > 1

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Group":
        return cls(Problem(**data["problem"]), data["prompt_ids"], [Rollout(**r) for r in data["rollouts"]])


class ProblemSampler:
    """Training problems in a seeded random order; its position is its state (for exact resume)."""

    has_mask = False

    def __init__(self, problems: list[Problem], seed: int):
        if not problems:
            raise ConfigError("GRPO has no training problems: check [data] task and grpo levels")
        self.problems, self.seed = problems, seed
        self.epoch, self.cursor = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def next(self, count: int) -> list[Problem]:
        out = []
        while len(out) < count:
            order = self._order(self.epoch)
            take = min(count - len(out), len(order) - self.cursor)
            out.extend(self.problems[i] for i in order[self.cursor:self.cursor + take])
            self.cursor += take
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "size": len(self.problems)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("size") != len(self.problems):
            raise ConfigError("the GRPO problem set changed since the checkpoint: cannot resume exactly")
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]


class RolloutSource:
    """Completions of the current policy: from an in-process engine, or from `cfg.rollout_servers`."""

    def __init__(self, model, cfg: GRPOConfig, tokenizer, device: torch.device):
        from .engines import inprocess_engine, model_copy

        self.cfg, self.tokenizer = cfg, tokenizer
        self.llm = self.servers = None
        if cfg.rollout_servers:
            from .rollout_servers import RolloutServers

            self.servers = RolloutServers(list(cfg.rollout_servers),
                                          cfg.admin_key or os.environ.get("NANOSEEK_ADMIN_KEY", ""),
                                          cfg.max_staleness,
                                          api_key=cfg.rollout_api_key or os.environ.get("NANOSEEK_API_KEY", ""))
        else:
            # Room for every completion of a step, refills included, in one batch.
            self.llm = inprocess_engine(model_copy(model.config, model.state_dict()), tokenizer,
                                        dtype=cfg.rollout_dtype, device=device,
                                        max_num_seqs=cfg.prompts_per_step * cfg.group_size * (1 + cfg.max_refills),
                                        max_num_batched_tokens=4096)

    def push(self, state: dict, version: int, is_main: bool = True) -> None:
        """New weights: into the engine (in memory), or by rank 0 into every server (`version` = the number of
        updates they hold)."""
        if self.servers is None:
            self.llm.update_weights(state)
        elif is_main:
            self.servers.push(state, version)

    def generate(self, problems: list[Problem], params: list[SamplingParams], step: int) -> list[Group]:
        if not problems:
            return []
        if self.servers is not None:
            # The prompt as the token ids the local engine would build from the chat.
            prompts = [self.tokenizer.apply_chat_template(chat_prompt(p), add_generation_prompt=True)
                       for p in problems]
            bodies = [{"n": sp.n, "temperature": sp.temperature, "top_p": sp.top_p, "max_tokens": sp.max_tokens,
                       "ignore_eos": sp.ignore_eos, "seed": sp.seed} for sp in params]
            outs = self.servers.generate(prompts, bodies, step)
            return [Group(p, ids, rollouts) for p, ids, rollouts in zip(problems, prompts, outs)]
        outs = self.llm.generate([chat_prompt(p) for p in problems], params)
        return [Group(p, out.prompt_token_ids,
                      [Rollout(list(o.token_ids), o.text, [e["logprob"] for e in o.logprobs],
                               o.finish_reason == "length") for o in out.outputs])
                for p, out in zip(problems, outs)]


def score_groups(groups: list[Group], rewards: list[Reward], cfg: GRPOConfig) -> None:
    """Every rollout's rewards (per function, and their weighted total), in place."""
    if not groups:
        return
    flat = []
    for g in groups:
        p = g.problem
        for r in g.rollouts:
            meta = {"verifier": p.verifier, "question": p.question, "completion_tokens": len(r.tokens),
                    "max_tokens": cfg.max_completion_tokens,
                    "overlong_buffer": cfg.overlong_buffer or max(cfg.max_completion_tokens // 4, 1)}
            flat.append((p.question, r.text, p.answer, meta))
    per_fn = score(rewards, flat)
    total = combine(rewards, per_fn)
    rollouts = [r for g in groups for r in g.rollouts]
    for k, r in enumerate(rollouts):
        r.reward = total[k]
        r.rewards = {name: values[k] for name, values in per_fn.items()}
