"""CPU inference kernels: linear layers whose weights are packed once, ahead of time, for the kernel that runs
them.

Two kernels, chosen per call by the number of rows:
  * oneDNN (mkldnn) for prefill-sized batches;
  * for bf16 decoding (up to SMALL_ROWS rows), nanoseek's own AVX512-BF16 kernel (csrc/bf16_gemv.cpp),
    ~1.7x oneDNN's streaming rate on this machine's decode weights, which also runs every routed expert of a
    layer in one call. The same extension holds the decode-time fusions (norm, expert selection, MLA attention
    read in place from the paged cache). It is compiled on first use; without AVX512-BF16 or a C++ compiler,
    or with NANOSEEK_CPU_KERNELS=0, oneDNN and eager PyTorch run everything.

`F.linear` on CPU re-lays-out its weight for oneDNN on every call; for the small batches of decoding that
re-layout costs as much as the product itself. Packing each weight once into oneDNN's blocked layout (what
inductor's freezing does) measured 1.8-3.3x faster for 1-32 rows and 1.1-1.3x for 512-row prefills on this
machine, with bit-identical bf16 results (docs/LOG.md). The packed tensors are derived weights: whoever
changes the weights repacks (the engine does in update_weights). Inference only: the packed op has no
autograd, so with gradients enabled the layers fall back to the plain weights.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .attention import MLAttention
from .extension import OPENMP, CompiledKernels, cpu_flag
from .layers import MLP, RMSNorm
from .moe import Experts, Router

_BATCH_HINT = 64  # oneDNN picks a blocking for this many rows; measured best or near-best for 1..512
# Most rows (per expert, for the routed experts) that go to the bf16 decode kernel. Measured on 2 threads
# against oneDNN over 40 distinct 1024x768 weights: 1.7x faster for 1-4 rows, 1.1x for 32, even at 64; and
# 1.8x for 2 rows per expert, 1.2x for 16. Larger (prefill) batches are compute-bound: oneDNN's.
SMALL_ROWS = 32
SMALL_ROWS_PER_EXPERT = 16
# Beyond SMALL_ROWS, small weights still go to the bf16 kernel: oneDNN's fixed cost per call (~15 us) dominates
# a tiny product. Measured on 2 threads: 64 rows x 256x192 weight 9.5 vs 19.2 us, 128 rows x 384x256 30 vs
# 37 us, 128 rows x 768x256 58 vs 62 us (even), 64 rows x 4096x400 242 vs 220 us (oneDNN's).
SMALL_PRODUCT_MACS = 16 << 20
SMALL_PRODUCT_ROWS = 128

_DECODE_KERNELS = CompiledKernels("nanoseek_bf16_gemv", "bf16_gemv.cpp",
                                  [*OPENMP, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"],
                                  supported=lambda: cpu_flag("avx512_bf16"))


def bf16_kernels():
    """The compiled extension (pack, grouped_linear, moe_swiglu, rms_norm, select_experts,
    mla_decode_attention), or None where it is unavailable (no AVX512-BF16, no compiler, switched off)."""
    return _DECODE_KERNELS.get()


def _small_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The decode kernel's packed copy of a bf16 weight [N, K] or [E, N, K], or None where it does not apply."""
    kernels = bf16_kernels() if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" else None
    if kernels is None or weight.shape[-2] % 16 or weight.shape[-1] % 2:
        return None
    return kernels.pack(weight.detach())


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


def grouped_linear(x: torch.Tensor, small_packed: torch.Tensor, offsets: torch.Tensor, out_features: int):
    """Rows offsets[e]..offsets[e+1] of x [T, K] times weight e of a `_small_pack`ed stack -> [T, N]."""
    return bf16_kernels().grouped_linear(x, small_packed, offsets, out_features)


@functools.lru_cache(maxsize=1024)
def _offsets(groups: int, rows: int) -> torch.Tensor:
    """[0, rows, 2 rows, ...]: group boundaries of equal groups (cached: a fresh tensor per call costs more
    than a small decode product)."""
    return torch.arange(0, (groups + 1) * rows, rows)


def per_head_linear(x: torch.Tensor, small_packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [R, H, K] -> [R, H, N]: each head's rows times that head's weight, in one grouped call."""
    R, H, K = x.shape
    y = grouped_linear(x.transpose(0, 1).reshape(H * R, K), small_packed, _offsets(H, R), out_features)
    return y.view(H, R, out_features).transpose(0, 1)


def small_linear(x: torch.Tensor, small_packed: torch.Tensor | None, out_features: int) -> torch.Tensor | None:
    """x [..., K] times a `_small_pack`ed weight on the decode kernel, or None when it does not apply (no packed
    copy, or a product large enough for oneDNN)."""
    rows = x.numel() // x.shape[-1]
    if small_packed is None or rows > SMALL_ROWS and (
            rows > SMALL_PRODUCT_ROWS or rows * out_features * x.shape[-1] > SMALL_PRODUCT_MACS):
        return None
    y = grouped_linear(x.reshape(rows, -1), small_packed, _offsets(1, rows), out_features)
    return y.view(*x.shape[:-1], out_features)


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward uses its packed copies; the weight Parameter stays the source of truth."""

    packed: torch.Tensor
    small_packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        y = small_linear(x, self.small_packed, self.out_features)
        if y is not None:
            return y if self.bias is None else y + self.bias
        return packed_linear(x, self.packed, self.bias)


class FusedRMSNorm(RMSNorm):
    """An RMSNorm that runs bf16 inference through the fused kernel (same rounding as RMSNorm.forward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != torch.bfloat16 or self.weight.dtype != torch.bfloat16:
            return super().forward(x)
        return bf16_kernels().rms_norm(x, self.weight, self.eps)


def pack_model(model: nn.Module) -> int:
    """Packs (or repacks, after a weight change) every linear layer, routed expert and MLA absorbed projection,
    and, for a bf16 model on a CPU with the compiled kernels, turns on its fused norms, expert selection
    and stacked gate/up products. Returns how many weights were packed for oneDNN."""
    count = 0
    first = next(model.parameters())
    kernels = first.dtype == torch.bfloat16 and first.device.type == "cpu" and bf16_kernels() is not None
    for module in model.modules():
        if isinstance(module, Router):
            module.fused_select = kernels
        elif isinstance(module, MLP):
            no_bias = module.gate_proj.bias is None and module.up_proj.bias is None
            module.small_gate_up = (_small_pack(torch.cat((module.gate_proj.weight, module.up_proj.weight)))
                                    if kernels and no_bias else None)
        elif isinstance(module, RMSNorm):
            if kernels and module.weight.dtype == torch.bfloat16:
                module.__class__ = FusedRMSNorm
        elif isinstance(module, nn.Linear):
            module.__class__ = PackedLinear
            module.packed = _pack(module.weight)
            module.small_packed = _small_pack(module.weight)
            count += 1
        elif isinstance(module, MLAttention):
            # MLA's absorbed projections, per head as linear weights: W_UK^T [H, L, nope], W_UV [H, v, L].
            w = module.kv_b_proj.weight.view(module.n_heads, module.nope_dim + module.v_dim, module.kv_lora_rank)
            small = (_small_pack(w[:, : module.nope_dim].transpose(1, 2)), _small_pack(w[:, module.nope_dim:]))
            module.absorbed_small = None if any(p is None for p in small) else small
        elif isinstance(module, Experts):
            module.packed = ([_pack(w) for w in module.gate_up_proj], [_pack(w) for w in module.down_proj])
            small = (_small_pack(module.gate_up_proj), _small_pack(module.down_proj))
            module.small_packed = None if any(p is None for p in small) else small
            count += 2 * module.n_experts
    return count
