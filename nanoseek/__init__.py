"""nanoseek: the DeepSeek system as one small, fast Python package."""

from .checkpoint import load_model, save_model
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, NanoseekError
from .model.transformer import Transformer

__all__ = ["load_model", "save_model", "ModelConfig", "Transformer", "NanoseekError", "ConfigError",
           "CheckpointError"]
__version__ = "0.1.0"
