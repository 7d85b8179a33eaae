"""Running a recipe's stages: tokenizer -> pretrain -> sft (GRPO and distillation live in their own modules).

Layout of a run (`runs/<name>/`): tokenizer/, data/<stage>/{train,val}/ (token shards), <stage>/ (metrics.jsonl,
plots, checkpoints/step_N/, model/ = the stage's final HF checkpoint, summary.json), eval_*.json, report.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..data import shards
from ..errors import ConfigError
from ..model.transformer import Transformer
from ..model import build_model as new_model
from ..presets import load_preset
from ..tokenizer import Tokenizer
from .context import RunContext
from .corpus import prepare_data


# ------------------------------------------------------------------ model
def model_config(spec: dict, tokenizer: Tokenizer) -> ModelConfig:
    """A recipe's [model] (or [student]) section -- HF config fields, or a `preset` they override -- with the
    vocabulary and special tokens of the run's tokenizer."""
    spec = dict(spec)
    spec.pop("init_std", None)
    preset = spec.pop("preset", None)
    base = load_preset(preset).to_hf_dict() if preset else {}
    hf = {**base, **spec}
    hf.setdefault("model_type", "deepseek_v3")
    vocab = tokenizer.vocab_size
    hf["vocab_size"] = max(hf.get("vocab_size", 0), -(-vocab // 32) * 32)
    hf["bos_token_id"], hf["eos_token_id"] = tokenizer.bos_token_id, tokenizer.eos_token_id
    hf["pad_token_id"] = tokenizer.token_to_id(tokenizer.pad_token) if tokenizer.pad_token else None
    return ModelConfig.from_hf_dict(hf)


def fresh_model(spec: dict, tokenizer: Tokenizer, seed: int, device: torch.device) -> Transformer:
    """A newly initialised model from a [model]-style section (std `init_std`, default 0.02), seeded."""
    model = new_model(model_config(spec, tokenizer))
    model.init_weights(std=spec.get("init_std", 0.02), generator=torch.Generator().manual_seed(seed))
    return model.to(device)


def starting_model(run: RunContext) -> Transformer:
    """The stage's starting point: `init_from`'s model in float32 master weights, or a fresh [model]."""
    from ..checkpoint import load_model

    source = run.init_path(run.cfg.init_from)
    if source is not None:
        return load_model(source, device=run.device, dtype=torch.float32)
    return fresh_model(run.recipe.get("model", {}), run.tokenizer, run.seed, run.device)


# ------------------------------------------------------------------ a stage
def run_stage(recipe: dict, stage: str, resume: bool = False, show_progress: bool = True) -> Path:
    from .trainer import Trainer

    if stage not in ("pretrain", "sft"):
        raise ConfigError(f"`train {stage}` has its own command; this runs pretrain and sft")
    with RunContext.open(recipe, stage, resume=resume, show_progress=show_progress) as run:
        cfg, dist = run.cfg, run.dist
        if cfg.batch_size % (cfg.micro_batch_size * dist.world_size):
            raise ConfigError(f"batch_size {cfg.batch_size} must split into micro-batches of "
                              f"{cfg.micro_batch_size} on each of {dist.world_size} processes")
        run.on_main(lambda: prepare_data(recipe, stage, run.tokenizer, cfg))
        train_dir, val_dir = prepare_data(recipe, stage, run.tokenizer, cfg)  # present now: returns their paths
        train = shards.PackedLoader(train_dir, cfg.seq_len, seed=run.seed)
        val = shards.PackedLoader(val_dir, cfg.seq_len, seed=run.seed)
        model = starting_model(run)
        trainer = Trainer(model, cfg, train, run.out_dir, stage=stage, val_loader=val, evaluator=run.evaluator(),
                          tokenizer_dir=run.tokenizer_dir, dist=dist, seed=run.seed, show_progress=show_progress)
        return run.fit(trainer, resume=resume, train_tokens_meta=train.meta["total_tokens"])
