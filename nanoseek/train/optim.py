"""The optimizers: AdamW everywhere (the default), or Muon for the hidden matrices with AdamW for the rest
(`optimizer = "muon"`, as DeepSeek trained V4).

Muon is PyTorch's own (torch.optim.Muon: momentum, Newton-Schulz orthogonalisation in bf16, decoupled weight
decay) with `adjust_lr_fn = "match_rms_adamw"`, Moonshot's scaling, so that it reuses AdamW's learning rate and
weight decay. It takes 2-D parameters only: every 2-D weight except the embedding and the LM head goes to Muon;
the embedding, the head, vectors (norms, biases, sinks, hyper-connection biases and scales) and the stacked
routed experts ([E, out, in], 3-D) stay with AdamW.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TrainConfig

OPTIMIZERS = ("adamw", "muon")


class Optimizers:
    """One or more torch optimizers stepped as one (the trainer sets every group's lr)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> Optimizers:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if cfg.optimizer == "muon" and _muon_param(n, p)]
    taken = {id(p) for p in muon}
    decay = [p for n, p in named if p.dim() >= 2 and id(p) not in taken]
    no_decay = [p for n, p in named if p.dim() < 2]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                              fused=fused_adamw_applies([*decay, *no_decay]))
    if not muon:
        return Optimizers([adamw])
    return Optimizers([torch.optim.Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        adjust_lr_fn="match_rms_adamw"), adamw])


def _muon_param(name: str, p: torch.Tensor) -> bool:
    return p.dim() == 2 and not name.endswith(("embed_tokens.weight", "lm_head.weight"))


def fused_adamw_applies(params: list[torch.Tensor]) -> bool:
    """torch's single-kernel AdamW (3x the per-parameter loop's speed on CPU) for plain CPU or CUDA tensors;
    sharded (DTensor) parameters keep the default implementation."""
    return bool(params) and all(type(p) is nn.Parameter and p.device.type in ("cpu", "cuda") for p in params)
