"""CPU inference kernels: oneDNN (mkldnn) linear layers with weights packed once, ahead of time.

`F.linear` on CPU re-lays-out its weight for oneDNN on every call; for the small batches of decoding that
re-layout costs as much as the product itself. Packing each weight once into oneDNN's blocked layout (what
inductor's freezing does) measured 1.8-3.3x faster for 1-32 rows and 1.1-1.3x for 512-row prefills on this
machine, with bit-identical bf16 results (docs/LOG.md). The packed tensors are derived weights: whoever
changes the weights repacks (the engine does in update_weights). Inference only: the packed op has no
autograd, so with gradients enabled the layers fall back to the plain weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .moe import Experts

_BATCH_HINT = 64  # oneDNN picks a blocking for this many rows; measured best or near-best for 1..512


def packing_available(model: nn.Module) -> bool:
    return (model.device.type == "cpu" and model.dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _BATCH_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    shape = x.shape
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), packed, bias, "none", [], "")
    return y.view(*shape[:-1], y.shape[-1])


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward uses its packed copy; the weight Parameter stays the source of truth."""

    packed: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.packed, self.bias)


def pack_model(model: nn.Module) -> int:
    """Packs (or repacks, after a weight change) every linear layer and routed expert. Returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.__class__ = PackedLinear
            module.packed = _pack(module.weight)
            count += 1
        elif isinstance(module, Experts):
            module.packed = ([_pack(w) for w in module.gate_up_proj], [_pack(w) for w in module.down_proj])
            count += 2 * module.n_experts
    return count
