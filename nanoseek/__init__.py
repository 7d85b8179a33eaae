"""nanoseek: the DeepSeek system as one small, fast Python package."""

from . import runtime

runtime.configure()  # the ISA ceiling and process settings, before any tensor exists (runtime.py says why)

from .checkpoint import load_model, save_model  # noqa: E402
from .config import ModelConfig  # noqa: E402
from .engine import LLM, SamplingParams  # noqa: E402
from .errors import CheckpointError, ConfigError, NanoseekError  # noqa: E402
from .model.transformer import Transformer  # noqa: E402
from .tokenizer import Tokenizer, load_tokenizer  # noqa: E402

__all__ = ["load_model", "save_model", "ModelConfig", "Transformer", "NanoseekError", "ConfigError",
           "CheckpointError", "Tokenizer", "load_tokenizer", "LLM", "SamplingParams"]
__version__ = "0.1.0"
