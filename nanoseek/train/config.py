"""Typed stage configurations: a recipe's [train] section overlaid by the stage's own, validated once.

Every stage trains through the same loop (trainer.py), so every stage's config is a `TrainConfig`; the stages
that do more add their own fields (SFT: whether traces keep their reasoning; GRPO: rollouts, rewards, the
clipped objective; distillation: the teacher, K, rejection). A key no field names, a value of the wrong type or
a setting outside its choices is one `ConfigError` naming the key and the fix, raised before anything runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    batch_size: int = 32
    micro_batch_size: int = 16
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    decay_fraction: float = 0.2  # wsd: the share of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    optimizer: str = "adamw"  # adamw | muon (Muon for hidden matrices, AdamW for the rest: train/optim.py)
    grad_clip: float = 1.0
    dtype: str = "auto"  # runtime.training_autocast: bf16 autocast where bf16 is native, float32 elsewhere
    bias_update_gamma: float = 0.001  # aux-loss-free balancing step
    seq_aux_alpha: float = 0.0001  # DeepSeek-V3's sequence-wise balance loss
    mtp_lambda: float = 0.3
    indexer_lambda: float = 1.0  # V3.2: weight of the indexer's KL to the main attention
    indexer_warmup_steps: int = 0  # V3.2: steps of dense attention first, the indexer learning to rank all keys
    log_every: int = 10
    save_every: int = 0
    eval_every: int = 0
    max_bad_steps: int = 5
    parallel: str = "ddp"  # under torchrun: ddp | fsdp | none
    init_from: str = ""  # a stage of this run (its final model) or a checkpoint directory
    keep_checkpoints: int = 2
    max_seconds: float = 0  # wall-time cap of the stage (0: none)

    CHOICES: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "schedule": ("cosine", "wsd", "constant"), "parallel": ("ddp", "fsdp", "none"), "optimizer": ("adamw", "muon")}

    def __post_init__(self):
        for key, allowed in self.CHOICES.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key} {getattr(self, key)!r}: use {', '.join(allowed)}")
        for key in ("steps", "batch_size", "micro_batch_size", "seq_len", "log_every"):
            if getattr(self, key) < (0 if key == "steps" else 1):
                raise ConfigError(f"{key} must be {'>= 0' if key == 'steps' else 'at least 1'}, "
                                  f"not {getattr(self, key)}")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                              f"({self.micro_batch_size})")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class PretrainConfig(TrainConfig):
    pass


@dataclass(frozen=True)
class SFTConfig(TrainConfig):
    with_reasoning: bool = True  # keep the <think> trace in the target (R1-style SFT)


@dataclass(frozen=True)
class GRPOConfig(TrainConfig):
    prompts_per_step: int = 16
    group_size: int = 8
    max_completion_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    epsilon: float = 0.2
    epsilon_high: float = 0.28  # DAPO's clip-higher
    beta: float = 0.0  # k3 KL to the reference; 0 keeps no reference copy
    mu: int = 1  # updates per rollout batch
    loss_type: str = "dapo"  # grpo | dr_grpo | dapo
    scale_rewards: str = "auto"  # group | batch | none; auto: none for dr_grpo, else group
    dynamic_sampling: bool = True
    max_refills: int = 2
    mask_truncated: bool = True
    tis_cap: float = 2.0  # truncated importance sampling against the engine's log-probs
    rewards: list[dict] | None = None  # [{name, weight}]: rewards.build_rewards
    levels: list[int] | None = None
    problems: int = 20000
    rollout_dtype: str = "auto"
    overlong_buffer: int = 0
    samples_to_log: int = 2
    ignore_eos: bool = False  # every completion runs to max_completion_tokens (benchmarks: equal work per step)
    # Rollouts on running `nanoseek serve --admin-key KEY` processes instead of an in-process engine.
    rollout_servers: list[str] = field(default_factory=list)
    admin_key: str = ""
    rollout_api_key: str = ""
    max_staleness: int = 0

    CHOICES: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        **TrainConfig.CHOICES, "loss_type": ("grpo", "dr_grpo", "dapo"),
        "scale_rewards": ("auto", "group", "batch", "none")}

    @property
    def reward_scaling(self) -> str:
        """The advantage normaliser "auto" resolves to: none for Dr. GRPO (no length or difficulty bias)."""
        if self.scale_rewards != "auto":
            return self.scale_rewards
        return "none" if self.loss_type == "dr_grpo" else "group"


@dataclass(frozen=True)
class DistillConfig(TrainConfig):
    k: int = 4  # teacher samples per problem
    temperature: float = 0.8
    problems: int = 2000
    max_tokens: int = 256
    levels: list[int] | None = None
    student: str = ""
    teacher: str = ""
    eval_problems: int = 500
    with_reasoning: bool = True
    # correct: rejection sampling (the verifier keeps correct traces only); all: sequence-level distillation of
    # every non-empty trace (tasks without a usable verifier).
    keep: str = "correct"

    CHOICES: typing.ClassVar[dict[str, tuple[str, ...]]] = {**TrainConfig.CHOICES, "keep": ("correct", "all")}


STAGE_CONFIGS: dict[str, type[TrainConfig]] = {
    "pretrain": PretrainConfig, "sft": SFTConfig, "grpo": GRPOConfig, "distill": DistillConfig}


def build_config(stage: str, values: dict) -> TrainConfig:
    """The stage's config from merged [train] + [stage] values: unknown keys and wrong types refused."""
    cls = STAGE_CONFIGS[stage]
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown [{stage}] / [train] key(s) {', '.join(unknown)}: known keys are "
                          f"{', '.join(sorted(known))}")
    checked = {}
    for key, value in values.items():
        ok, value = _coerce(value, hints[key])
        if not ok:
            raise ConfigError(f"[{stage}] {key} = {value!r}: expected {_describe(hints[key])}")
        checked[key] = value
    try:
        return cls(**checked)
    except ConfigError as e:
        raise ConfigError(f"[{stage}] {e}") from None


def _coerce(value, annotation) -> tuple[bool, object]:
    """(whether value fits the annotation, the value as the field stores it: ints widen to float)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, out = _coerce(value, arg)
            if ok:
                return True, out
        return False, value
    if annotation is type(None):
        return value is None, value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        items = [_coerce(v, args[0]) if args else (True, v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict:
        return isinstance(value, dict), value
    if annotation is bool:
        return isinstance(value, bool), value
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    return isinstance(value, annotation), value


def _describe(annotation) -> str:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is list:
        return f"a list of {_describe(args[0])}" if args else "a list"
    if args:
        return " or ".join(_describe(a) for a in args if a is not type(None)) + (
            " (or leave it unset)" if type(None) in args else "")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "a table"}.get(annotation, getattr(annotation, "__name__", str(annotation)))
