"""Recipes: TOML files with `key=value` overrides, resolved into one nested dict per stage.

Sections: [run] (name, out_dir, seed), [tokenizer], [model] (HF config fields or `preset`), [data], [eval],
[train] (defaults for every stage) and one section per stage ([pretrain], [sft], [grpo]) whose keys override
[train]. Overrides address any key with dots: `pretrain.steps=50`, `run.name=smoke`, `model.hidden_size=128`;
values are TOML literals (`levels=[1,2]`, `lr=1e-3`, `name="x"`), bare words are strings.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path

from ..errors import ConfigError
from .budget import budget, scale_stage

STAGES = ("pretrain", "sft", "grpo", "distill")

TRAIN_DEFAULTS = {
    "steps": 100, "batch_size": 32, "micro_batch_size": 16, "seq_len": 256,
    "lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 20, "schedule": "cosine", "decay_fraction": 0.2,
    "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "grad_clip": 1.0,
    "dtype": "auto", "bias_update_gamma": 0.001, "seq_aux_alpha": 0.0001, "mtp_lambda": 0.3,
    "log_every": 10, "save_every": 0, "eval_every": 0, "max_bad_steps": 5, "parallel": "ddp",
    "init_from": "", "keep_checkpoints": 2, "max_seconds": 0,
}


def parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(recipe: dict, overrides: list[str]) -> dict:
    recipe = copy.deepcopy(recipe)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. pretrain.steps=50)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = recipe
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {p} is not a section")
        node[parts[-1]] = parse_value(value.strip())
    return recipe


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"recipe {path} does not exist (see recipes/ for examples)")
    try:
        recipe = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe {path} is not valid TOML: {e}") from None
    recipe = apply_overrides(recipe, overrides or [])
    recipe.setdefault("run", {}).setdefault("name", path.stem)
    recipe["run"].setdefault("out_dir", "runs")
    recipe["run"].setdefault("seed", 0)
    recipe["_source"] = str(path)
    return recipe


def stage_config(recipe: dict, stage: str) -> dict:
    """[train] defaults overlaid by the stage's own section."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)}")
    cfg = {**TRAIN_DEFAULTS, **recipe.get("train", {}), **recipe.get(stage, {})}
    unknown = set(cfg) - set(TRAIN_DEFAULTS) - STAGE_EXTRA_KEYS.get(stage, set())
    if unknown:
        raise ConfigError(f"unknown [{stage}] / [train] key(s) {', '.join(sorted(unknown))}: "
                          f"known keys are {', '.join(sorted(set(TRAIN_DEFAULTS) | STAGE_EXTRA_KEYS.get(stage, set())))}")
    if cfg["batch_size"] % cfg["micro_batch_size"]:
        raise ConfigError(f"batch_size ({cfg['batch_size']}) must be a multiple of micro_batch_size "
                          f"({cfg['micro_batch_size']})")
    if cfg["schedule"] not in ("cosine", "wsd", "constant"):
        raise ConfigError(f"schedule {cfg['schedule']!r}: use cosine, wsd or constant")
    record = budget(recipe)  # the compute dial (train/budget.py), when the recipe has one
    return scale_stage(cfg, record["scale"]) if record else cfg


# Keys only some stages understand (GRPO's and distillation's are added by their modules).
STAGE_EXTRA_KEYS: dict[str, set[str]] = {"sft": {"with_reasoning"}, "pretrain": set(), "grpo": set(),
                                          "distill": set()}


def run_dir(recipe: dict) -> Path:
    return Path(recipe["run"]["out_dir"]) / recipe["run"]["name"]
