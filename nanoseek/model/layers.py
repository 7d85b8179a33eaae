"""Small building blocks shared by every architecture: RMSNorm and the gated MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from . import train_kernels
from .train_kernels import fused_training

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"unsupported hidden_act {name!r}: use one of {', '.join(ACTIVATIONS)}") from None


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as the reference implementations do."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        # The fused training path hands the next products a bf16 result; a consumer that reads float32 (the MoE
        # router) sets this to get eager RMSNorm's float32 result instead.
        self.float_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_training(x, self.training) and self.weight.dtype == torch.float32:
            return train_kernels.rms_norm(x, self.weight, self.eps, self.float_output)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Low precision: normalise in float32 and round once, then scale (transformers' order of rounding).
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x)). Used dense and as DeepSeek's shared experts."""

    def __init__(self, hidden: int, intermediate: int, act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)
        # gate_proj and up_proj stacked and packed for the small-batch CPU kernel, set by an inference engine
        # (model/cpu_kernels.py): one weight stream instead of two at decode batch sizes.
        self.small_gate_up = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_training(x, self.training) and self.act is F.silu and self.gate_proj.bias is None and self.up_proj.bias is None \
                and self.down_proj.bias is None:
            return train_kernels.swiglu_mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
        if self.small_gate_up is not None and not torch.is_grad_enabled() and x.dtype == torch.bfloat16:
            from .cpu_kernels import small_linear  # (imported late: it imports this module)

            gate_up = small_linear(x, self.small_gate_up, 2 * self.gate_proj.out_features)
            if gate_up is not None:
                gate, up = gate_up.chunk(2, dim=-1)
                return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
