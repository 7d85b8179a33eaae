"""nanoseek: the DeepSeek system as one small, fast Python package."""

from .checkpoint import load_model, save_model
from .config import ModelConfig
from .engine import LLM, SamplingParams
from .errors import CheckpointError, ConfigError, NanoseekError
from .model.transformer import Transformer
from .tokenizer import Tokenizer, load_tokenizer

__all__ = ["load_model", "save_model", "ModelConfig", "Transformer", "NanoseekError", "ConfigError",
           "CheckpointError", "Tokenizer", "load_tokenizer", "LLM", "SamplingParams"]
__version__ = "0.1.0"
