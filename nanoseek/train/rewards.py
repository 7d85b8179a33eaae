"""Rule-based rewards for reinforcement learning on verifiable problems.

A reward function takes (prompt, completion, reference answer, metadata) and returns a float; it may be async.
Several are combined with weights. Built-ins:
  * `accuracy`: 1 if the task's verifier accepts the completion's final answer (math-verify for `math`); a
    reference that cannot be parsed never earns reward;
  * `format`: 1 if the completion follows the R1 template: reasoning, exactly one `</think>` (and no second
    `<think>`), then a non-empty answer;
  * `overlong`: DAPO's soft length penalty, 0 up to `max_tokens - buffer` tokens, then linearly down to -1 at
    `max_tokens`.
A recipe names a user's own function as `package.module:function` (as TRL accepts any callable):
    rewards = [{name = "accuracy", weight = 1.0}, {name = "mypkg.rewards:digit_match", weight = 0.5}]
"""

from __future__ import annotations

import asyncio
import inspect
import os
from dataclasses import dataclass
from typing import Awaitable, Callable

from ..data.verify import verify
from ..engine.text import THINK_CLOSE, THINK_OPEN
from ..errors import ConfigError

RewardFn = Callable[[str, str, str, dict], "float | Awaitable[float]"]


def accuracy_reward(prompt: str, completion: str, reference: str, meta: dict) -> float:
    return float(verify(completion, reference, meta.get("verifier", "numeric"), meta.get("question", "")))


def format_reward(prompt: str, completion: str, reference: str, meta: dict) -> float:
    """The template already opened <think> in the prompt: expect `reasoning</think>answer`."""
    if completion.count(THINK_CLOSE) != 1 or THINK_OPEN in completion:
        return 0.0
    reasoning, answer = completion.split(THINK_CLOSE)
    return float(bool(reasoning.strip()) and bool(answer.strip()))


def overlong_reward(prompt: str, completion: str, reference: str, meta: dict) -> float:
    length, limit = meta.get("completion_tokens", 0), meta.get("max_tokens", 0)
    buffer = meta.get("overlong_buffer", max(limit // 4, 1))
    if not limit or length <= limit - buffer:
        return 0.0
    return max(-1.0, -(length - (limit - buffer)) / buffer)


BUILTIN = {"accuracy": accuracy_reward, "format": format_reward, "overlong": overlong_reward}


@dataclass
class Reward:
    name: str
    fn: RewardFn
    weight: float = 1.0


def build_rewards(spec: list[dict] | None) -> list[Reward]:
    """[{name, weight}] of built-ins or of a user's own callables named `package.module:function` (default:
    accuracy 1.0, format 0.1). A callable takes (prompt, completion, reference, meta) and returns a float, or
    an awaitable of one."""
    spec = spec or [{"name": "accuracy", "weight": 1.0}, {"name": "format", "weight": 0.1}]
    out = []
    for item in spec:
        name = item["name"]
        fn = load_reward(name) if ":" in name else BUILTIN.get(name)
        if fn is None:
            raise ConfigError(f"unknown reward {name!r}: built-ins are {', '.join(BUILTIN)}, or name your own "
                              "function as package.module:function")
        out.append(Reward(name, fn, float(item.get("weight", 1.0))))
    return out


def load_reward(name: str) -> RewardFn:
    """The function `module:attribute` names (the module importable from the working directory or sys.path)."""
    import importlib
    import sys

    module_name, _, attribute = name.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # `nanoseek train` run from a project folder
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward {name!r}: cannot import {module_name} ({e}); put it on PYTHONPATH or in the "
                          "working directory") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise ConfigError(f"reward {name!r}: {module_name} has no function {attribute!r}")
    return fn


async def _score_one(reward: Reward, prompt, completion, reference, meta) -> float:
    value = reward.fn(prompt, completion, reference, meta)
    if inspect.isawaitable(value):
        value = await value
    return float(value)


def score(rewards: list[Reward], items: list[tuple[str, str, str, dict]]) -> dict[str, list[float]]:
    """Every reward function on every (prompt, completion, reference, meta); async ones run concurrently."""

    async def run():
        results = {}
        for r in rewards:
            results[r.name] = await asyncio.gather(*(_score_one(r, *item) for item in items))
        return results

    return asyncio.run(run())


def combine(rewards: list[Reward], per_function: dict[str, list[float]]) -> list[float]:
    n = len(next(iter(per_function.values()))) if per_function else 0
    return [sum(r.weight * per_function[r.name][i] for r in rewards) for i in range(n)]
