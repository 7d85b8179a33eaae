"""Recipes: TOML files with `key=value` overrides, resolved into one typed config per stage (config.py).

Sections: [run] (name, out_dir, seed), [tokenizer], [model] (HF config fields or `preset`), [data], [eval],
[train] (defaults for every stage) and one section per stage ([pretrain], [sft], [grpo]) whose keys override
[train]. Overrides address any key with dots: `pretrain.steps=50`, `run.name=smoke`, `model.hidden_size=128`;
values are TOML literals (`levels=[1,2]`, `lr=1e-3`, `name="x"`), bare words are strings.
"""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from pathlib import Path

from ..errors import ConfigError
from .budget import budget, scale_stage
from .config import STAGE_CONFIGS, TrainConfig, build_config

STAGES = tuple(STAGE_CONFIGS)

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


def stage_config(recipe: dict, stage: str) -> TrainConfig:
    """[train] overlaid by the stage's own section, scaled by the compute dial, as the stage's typed config."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)}")
    values = {**recipe.get("train", {}), **recipe.get(stage, {})}
    build_config(stage, values)  # a bad key or value is reported before the dial measures anything
    record = budget(recipe)  # the compute dial (train/budget.py), when the recipe has one
    if record:
        defaults = dataclasses.asdict(STAGE_CONFIGS[stage]())
        values = scale_stage({**defaults, **values}, record["scale"])
    return build_config(stage, values)


def run_dir(recipe: dict) -> Path:
    return Path(recipe["run"]["out_dir"]) / recipe["run"]["name"]
