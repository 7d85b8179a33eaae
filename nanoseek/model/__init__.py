"""The models: model/transformer.py (DeepSeek-V3/V2/V3.2 and the dense students) and model/v4.py (DeepSeek-V4)."""

from ..config import ModelConfig
from .transformer import Transformer
from .v4 import DeepseekV4Transformer


def build_model(config: ModelConfig) -> Transformer:
    """The module for `config`'s architecture (uninitialised weights: load or init_weights next)."""
    return DeepseekV4Transformer(config) if config.is_v4 else Transformer(config)
