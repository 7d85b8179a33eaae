"""`nanoseek quantize SRC DST`: a weight-only quantized copy of a checkpoint (model/quant.py) that loads back as
is -- integers and scales in safetensors, `quantization_config` {"quant_method": "nanoseek", ...} in config.json
-- so `LLM(DST)`, `generate`, `chat` and `serve` run it without re-quantizing. The format is nanoseek's own:
transformers does not read it (export to GGUF q8_0/q4_0 for llama.cpp and Ollama instead).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_model, model_directory, save_model
from ..config import ModelConfig
from ..errors import ConfigError
from ..model import quant


def _bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.glob("*.safetensors"))


def quantize_checkpoint(src: str | Path, dst: str | Path, scheme: str = "int8", overwrite: bool = False) -> dict:
    """Quantizes the float checkpoint `src` into `dst` (written atomically; an existing `dst` only with
    `overwrite`, and never the source itself or a folder holding it). Returns a summary: the scheme, parameters
    quantized and left in float, and the weight files' bytes before and after."""
    chosen = quant.scheme(scheme)
    if chosen is None:
        raise ConfigError("quantize needs a scheme: int8, int4 or int4-g128")
    directory = model_directory(src)
    source, target = Path(directory).resolve(), Path(dst).resolve()
    if target == source or target in source.parents:
        raise ConfigError(f"quantize would write over its source {src}: pass a new directory as DST")
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ConfigError(f"{dst} already exists: pass a new directory, or --overwrite to replace it")
    config = ModelConfig.from_pretrained(directory)
    if quant.scheme_from_config(config.extra.get("quantization_config")) is not None:
        raise ConfigError(f"{src} is already quantized: quantize its float checkpoint instead")
    stored = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(config.torch_dtype), torch.float32)
    # Quantized from float32 values (an FP8 or bf16 checkpoint widens exactly); the rest is written back in the
    # checkpoint's own dtype.
    model = load_model(directory, "cpu", torch.float32)
    quant.quantize_model(model, chosen)
    model.config.extra["quantization_config"] = chosen.config()
    out = save_model(model, dst, tokenizer_from=directory, dtype=stored)
    return {"scheme": chosen.name, **quant.quantization_summary(model),
            "source_bytes": _bytes(directory), "quantized_checkpoint_bytes": _bytes(out)}
