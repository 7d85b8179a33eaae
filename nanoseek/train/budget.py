"""The compute dial: a recipe written for one machine, sized for the machine at hand.

A recipe whose [run] section sets `minutes` (the wall time the whole job should take) together with
`reference_minutes` and `reference_gflops` (what it took on the machine it was tuned on, and that machine's
measured GEMM rate in its training dtype) is scaled by

    scale = min(1, minutes / reference_minutes x this machine's measured rate / reference_gflops)

in the training dtype the dtype policy picks here (runtime.training_autocast): every stage's step counts,
warm-up, checkpoint and evaluation intervals, GRPO's wall-time cap and distillation's problem count are
multiplied by it. A machine as fast as the reference runs the recipe as written; an AVX2 laptop computing in
float32 at a tenth of the rate runs a smaller budget within the same wall time. The scale is measured once per
run and kept in `runs/NAME/budget.json`, so every stage -- and a resumed stage -- uses the same one; the
report shows it. `run.minutes=0` turns the dial off.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..runtime import cpu, dtype_name, peak_flops, resolve_device, training_autocast

SCALED_KEYS = ("steps", "warmup_steps", "save_every", "eval_every", "max_seconds", "problems")


def budget(recipe: dict) -> dict | None:
    """The run's scale record ({"scale", "measured_gflops", "dtype", "isa", ...}), measured on first use; None
    when the recipe has no dial."""
    spec = recipe.get("run", {})
    if not spec.get("minutes") or not spec.get("reference_minutes") or not spec.get("reference_gflops"):
        return None
    run = Path(spec.get("out_dir", "runs")) / spec["name"]
    path = run / "budget.json"
    if path.exists():
        return json.loads(path.read_text())
    device = resolve_device(recipe.get("train", {}).get("device", "cpu"))
    autocast, _ = training_autocast(recipe.get("train", {}).get("dtype", "auto"), device)
    dtype = autocast or torch.float32
    measured = peak_flops(dtype, device) / 1e9
    raw = spec["minutes"] / spec["reference_minutes"] * measured / spec["reference_gflops"]
    record = {"scale": round(min(1.0, raw), 2), "measured_gflops": round(measured, 1), "dtype": dtype_name(dtype),
              "isa": cpu().isa if device.type == "cpu" else str(device), "minutes": spec["minutes"],
              "reference_minutes": spec["reference_minutes"], "reference_gflops": spec["reference_gflops"]}
    run.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)
    return record


def scale_stage(cfg: dict, scale: float) -> dict:
    """cfg with its size keys multiplied by scale (at least 1 where they were set)."""
    out = dict(cfg)
    for key in SCALED_KEYS:
        if isinstance(out.get(key), (int, float)) and not isinstance(out[key], bool) and out[key] > 0:
            out[key] = max(1, round(out[key] * scale))
    return out
