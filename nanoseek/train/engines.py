"""The one way training code builds an inference engine in its own process: for held-out evaluation, GRPO
rollouts and a distillation teacher.

The engine computes in the fast precision of the machine (runtime.fast_precision: bf16 where it is native,
float32 elsewhere) whatever the trainer's master weights are, and its cache is sized for the batch it serves
rather than for a server's traffic.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..engine import LLM
from ..model.transformer import Transformer
from ..model import build_model
from ..runtime import fast_precision

EVAL_CACHE = "256MiB"
CACHE = "512MiB"


def model_copy(config: ModelConfig, state: dict, device: torch.device | str = "cpu") -> Transformer:
    """A separate model holding `state` (an engine casts its model in place: never hand it the one training)."""
    model = build_model(config)
    model.load_state_dict(state)
    return model.to(device)


def engine_precision(dtype="auto", device: torch.device | str = "cpu"):
    """The precision an in-process engine computes in (runtime.fast_precision)."""
    return fast_precision(dtype, torch.device(device))


def inprocess_engine(model: Transformer | str | Path, tokenizer=None, *, dtype="auto", max_num_seqs: int = 256,
                     kv_cache_memory: int | str = CACHE, max_num_batched_tokens: int = 2048,
                     device: torch.device | str = "cpu") -> LLM:
    """An engine over `model` (a Transformer it then owns, or a checkpoint directory) at `dtype` ("auto": the
    machine's fast precision, runtime.fast_precision)."""
    precision = engine_precision(dtype, device)
    options = {"max_num_seqs": max_num_seqs, "kv_cache_memory": kv_cache_memory,
               "max_num_batched_tokens": max_num_batched_tokens}
    if isinstance(model, Transformer):
        model = model.set_precision(precision.weights, precision.compute).eval()
        return LLM(model, tokenizer=tokenizer, **options)
    return LLM(str(model), tokenizer=tokenizer, dtype=precision, **options)
