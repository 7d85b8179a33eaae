"""Typed stage configs (train/config.py) and the shape of the training package's imports."""

import ast
import dataclasses
from pathlib import Path

import pytest

from nanoseek.errors import ConfigError
from nanoseek.train.config import DistillConfig, GRPOConfig, PretrainConfig, SFTConfig
from nanoseek.train.recipe import stage_config

RUN = {"run": {"name": "x", "out_dir": "unused", "seed": 0}}


def config(stage: str, **sections):
    return stage_config({**RUN, **sections}, stage)


def test_each_stage_gets_its_own_typed_config_with_train_defaults_overlaid():
    cfg = config("grpo", train={"lr": 1, "steps": 7}, grpo={"steps": 3, "group_size": 4})
    assert type(cfg) is GRPOConfig
    assert (cfg.steps, cfg.group_size, cfg.lr) == (3, 4, 1.0)  # the stage wins over [train]
    assert isinstance(cfg.lr, float)  # an integer widens where a number is expected
    assert type(config("pretrain")) is PretrainConfig and type(config("sft")) is SFTConfig
    assert type(config("distill")) is DistillConfig
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 5
    assert cfg.replace(mu=2).mu == 2 and cfg.mu == 1


@pytest.mark.parametrize("stage, sections, message", [
    ("grpo", {"grpo": {"group_sizes": 4}}, r"unknown \[grpo\] / \[train\] key\(s\) group_sizes: known keys are"),
    # A key of another stage is unknown here: no stage's keys leak into another's.
    ("pretrain", {"pretrain": {"group_size": 4}}, r"unknown \[pretrain\] / \[train\] key\(s\) group_size"),
    ("sft", {"train": {"steps": "ten"}}, r"\[sft\] steps = 'ten': expected an integer"),
    ("pretrain", {"train": {"steps": True}}, r"\[pretrain\] steps = True: expected an integer"),
    ("grpo", {"grpo": {"rollout_servers": "http://127.0.0.1:8000"}},
     r"\[grpo\] rollout_servers = 'http://127.0.0.1:8000': expected a list of a string"),
    ("grpo", {"grpo": {"levels": [1, "two"]}}, r"\[grpo\] levels = \[1, 'two'\]: expected a list of an integer"),
    ("grpo", {"grpo": {"loss_type": "ppo"}}, r"\[grpo\] loss_type 'ppo': use grpo, dr_grpo, dapo"),
    ("pretrain", {"train": {"schedule": "linear"}}, r"\[pretrain\] schedule 'linear': use cosine, wsd, constant"),
    ("pretrain", {"train": {"batch_size": 10, "micro_batch_size": 4}},
     r"batch_size \(10\) must be a multiple of micro_batch_size \(4\)"),
    ("distill", {"distill": {"keep": "some"}}, r"\[distill\] keep 'some': use correct, all"),
])
def test_a_bad_setting_is_one_clear_error(stage, sections, message):
    with pytest.raises(ConfigError, match=message):
        config(stage, **sections)


def test_optional_settings_take_their_type_or_stay_unset():
    assert config("grpo", grpo={"levels": None}).levels is None
    assert config("grpo", grpo={"levels": [1, 2]}).levels == [1, 2]
    assert config("grpo", grpo={"rewards": [{"name": "accuracy", "weight": 1.0}]}).rewards[0]["name"] == "accuracy"


def _imports(path: Path) -> set[str]:
    """The absolute module names `path` imports (relative imports resolved against nanoseek.train)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ["nanoseek", "train"][: 2 - (node.level - 1)] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
    return names


def test_training_code_reaches_the_kernels_only_through_the_model():
    """train/ uses the model's own training heads (Transformer.summed_loss, token_logprobs): it imports neither
    the kernels nor the model's op dispatch."""
    package = Path(__file__).resolve().parent.parent / "nanoseek" / "train"
    for path in sorted(package.glob("*.py")):
        imported = _imports(path)
        assert not {m for m in imported if m.startswith(("nanoseek.model.kernels", "nanoseek.model.ops"))}, path.name
