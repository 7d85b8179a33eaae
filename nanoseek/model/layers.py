"""Small building blocks shared by every architecture: the linear layer, RMSNorm and the gated MLP. Each runs
through model/ops.py, which picks eager, CPU-training or CPU-inference kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import ops, quant

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unsupported hidden_act {name!r}: use one of {', '.join(ACTIVATIONS)}") from None


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) whose product runs through ops.linear; `derived`
    holds its packed copies for inference."""

    derived: ops.LinearPack | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, self.derived)

    def derive(self, plan: ops.Plan | None) -> None:
        self.derived = ops.pack_linear(self.weight, plan, quant.quantized_of(self))


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as the reference implementations do."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # The fused training path hands the next products its compute dtype; a consumer that reads float32
        # (the MoE router) sets this to get eager RMSNorm's float32 result instead.
        self.float_output = False
        self.derived = False  # inference: the decode kernel's one-pass norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, training=self.training, float_output=self.float_output,
                            fused=self.derived)

    def derive(self, plan: ops.Plan | None) -> None:
        self.derived = plan is not None and plan.fused


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x)). Used dense and as DeepSeek's shared experts."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)
        self.derived = None  # inference: gate and up stacked for the decode kernel (one weight stream, not two)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.swiglu_mlp(x, self.gate_proj, self.up_proj, self.down_proj, self.act, training=self.training,
                              gate_up_small=self.derived)

    def derive(self, plan: ops.Plan | None) -> None:
        no_bias = self.gate_proj.bias is None and self.up_proj.bias is None
        self.derived = ops.stack_linears((self.gate_proj, self.up_proj), plan) if no_bias else None
