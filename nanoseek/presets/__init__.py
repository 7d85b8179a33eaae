"""Published configs shipped with nanoseek, usable wherever a model config is expected (`nanoseek inspect`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from ..errors import ConfigError

_HERE = Path(__file__).parent
ALIASES = {"deepseek-r1": "deepseek-v3"}


def preset_names() -> list[str]:
    return sorted(p.stem for p in _HERE.glob("*.json"))


def load_preset(name: str) -> ModelConfig:
    name = ALIASES.get(name.lower(), name.lower())
    file = _HERE / f"{name}.json"
    if not file.exists():
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())}")
    return ModelConfig.from_hf_dict(json.loads(file.read_text()))


def resolve_config(path_or_name: str) -> ModelConfig:
    """A preset name, a model directory or a config.json file -> ModelConfig."""
    path = Path(path_or_name)
    if path.exists():
        return ModelConfig.from_pretrained(path)
    if ALIASES.get(path_or_name.lower(), path_or_name.lower()) in preset_names():
        return load_preset(path_or_name)
    raise ConfigError(f"{path_or_name!r} is neither a model directory, a config.json nor a preset "
                      f"({', '.join(preset_names())})")
