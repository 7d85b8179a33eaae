"""The compute dial: a recipe written for one machine, sized for the machine at hand.

A recipe whose [run] section sets `minutes` (the wall time the whole job should take) together with
`reference_minutes` and `reference_tokens_per_second` (what the job took on the machine it was tuned on, and how
fast that machine trains the recipe's model) is scaled by

    scale = min(1, minutes / reference_minutes x this machine's training rate / reference_tokens_per_second)

where the training rate is measured, not assumed: a few forward+backward passes of the recipe's own model on a
micro-batch of random tokens, in the dtype the policy picks here (runtime.training_autocast). That captures what
a GEMM peak alone would not -- a float32 step runs its GEMMs at a higher share of the peak than a bf16 one, and
the model's shapes decide how much of the step is GEMM at all. Every stage's step counts, warm-up, checkpoint and
evaluation intervals, GRPO's wall-time cap and distillation's problem count are multiplied by the scale. A
machine as fast as the reference runs the recipe as written. The scale is measured once per run and kept in
`runs/NAME/budget.json`, so every stage -- and a resumed stage -- uses the same one; the report shows it.
`run.minutes=0` turns the dial off.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..runtime import autocast, cpu, dtype_name, resolve_device, training_autocast

SCALED_KEYS = ("steps", "warmup_steps", "save_every", "eval_every", "max_seconds", "problems")
PROBE_STEPS = 3


def budget(recipe: dict) -> dict | None:
    """The run's scale record ({"scale", "tokens_per_second", "dtype", "isa", ...}), measured on first use; None
    when the recipe has no dial."""
    spec = recipe.get("run", {})
    if not spec.get("minutes") or not spec.get("reference_minutes") or not spec.get("reference_tokens_per_second"):
        return None
    path = Path(spec.get("out_dir", "runs")) / spec["name"] / "budget.json"
    if path.exists():
        return json.loads(path.read_text())
    device = resolve_device(recipe.get("train", {}).get("device", "cpu"))
    train_dtype, _ = training_autocast(recipe.get("train", {}).get("dtype", "auto"), device)
    rate = training_rate(recipe, device, train_dtype)
    raw = spec["minutes"] / spec["reference_minutes"] * rate / spec["reference_tokens_per_second"]
    record = {"scale": round(min(1.0, raw), 2), "tokens_per_second": round(rate), "dtype": dtype_name(train_dtype),
              "isa": cpu().isa if device.type == "cpu" else str(device), "minutes": spec["minutes"],
              "reference_minutes": spec["reference_minutes"],
              "reference_tokens_per_second": spec["reference_tokens_per_second"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return record


def training_rate(recipe: dict, device: torch.device, train_dtype: torch.dtype | None) -> float:
    """Training tokens per second of the recipe's model here: forward and backward of one pretraining
    micro-batch of random tokens, after one warm-up pass (kernel builds, oneDNN's JIT)."""
    from ..config import ModelConfig
    from ..model import build_model
    from ..presets import load_preset
    from .config import build_config
    from .trainer import LossModule

    spec = dict(recipe.get("model", {}))
    spec.pop("init_std", None)
    preset = spec.pop("preset", None)
    hf = {**(load_preset(preset).to_hf_dict() if preset else {}), **spec}
    hf.setdefault("model_type", "deepseek_v3")
    vocab = recipe.get("tokenizer", {}).get("vocab_size", 384)
    hf["vocab_size"] = max(hf.get("vocab_size", 0), -(-vocab // 32) * 32)
    cfg = build_config("pretrain", {**recipe.get("train", {}), **recipe.get("pretrain", {})})
    model = build_model(ModelConfig.from_hf_dict(hf))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    module = LossModule(model.to(device).train())
    ids = torch.randint(0, hf["vocab_size"], (cfg.micro_batch_size, cfg.seq_len + 1),
                        generator=torch.Generator().manual_seed(0)).to(device)

    def step():
        with autocast(train_dtype, device):
            main, mtp, aux = module(ids[:, :-1], ids[:, 1:], None, cfg.mtp_lambda)
        (main + mtp + aux).backward()
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    start = time.perf_counter()
    for _ in range(PROBE_STEPS):
        step()
    return PROBE_STEPS * cfg.micro_batch_size * cfg.seq_len / (time.perf_counter() - start)


def scale_stage(cfg: dict, scale: float) -> dict:
    """cfg with its size keys multiplied by scale (at least 1 where they were set)."""
    out = dict(cfg)
    for key in SCALED_KEYS:
        if isinstance(out.get(key), (int, float)) and not isinstance(out[key], bool) and out[key] > 0:
            out[key] = max(1, round(out[key] * scale))
    return out
