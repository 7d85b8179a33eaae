"""Published configs shipped with nanoseek, usable wherever a model config is expected (`nanoseek inspect`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..config import ModelConfig
from ..config_v4 import DeepseekV4Config
from ..errors import ConfigError

_HERE = Path(__file__).parent
ALIASES = {"deepseek-r1": "deepseek-v3"}


def preset_names() -> list[str]:
    return sorted(p.stem for p in _HERE.glob("*.json"))


def load_preset(name: str) -> ModelConfig:
    """A preset as the ModelConfig nanoseek builds models from."""
    return ModelConfig.from_hf_dict(_preset_dict(name))


def _preset_dict(name: str) -> dict:
    name = ALIASES.get(name.lower(), name.lower())
    file = _HERE / f"{name}.json"
    if not file.exists():
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(preset_names())}")
    return json.loads(file.read_text())


def inspect_config(d: dict) -> ModelConfig | DeepseekV4Config:
    """A config.json's contents as what `inspect` costs: DeepSeek-V4's config (the layer schedule, KV cache by
    context), or a ModelConfig."""
    return DeepseekV4Config.from_hf_dict(d) if d.get("model_type") == "deepseek_v4" else ModelConfig.from_hf_dict(d)


def resolve_config(path_or_name: str) -> ModelConfig | DeepseekV4Config:
    """A preset name, a model directory or a config.json file -> its config for `inspect` (inspect_config)."""
    path = Path(path_or_name)
    if path.exists():
        file = path / "config.json" if path.is_dir() else path
        if file.suffix == ".json" and file.exists():
            try:
                d = json.loads(file.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file} is not valid JSON ({e})") from None
            if d.get("model_type") == "deepseek_v4":
                return DeepseekV4Config.from_hf_dict(d)
        return ModelConfig.from_pretrained(path)
    if ALIASES.get(path_or_name.lower(), path_or_name.lower()) in preset_names():
        return inspect_config(_preset_dict(path_or_name))
    raise ConfigError(f"{path_or_name!r} is neither a model directory, a config.json nor a preset "
                      f"({', '.join(preset_names())})")
