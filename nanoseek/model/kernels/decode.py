"""CPU inference kernels: weights packed once, ahead of time, for the kernel that runs them.

Two kernels, chosen per call by the number of rows:
  * oneDNN (mkldnn) for prefill-sized batches, with each weight packed once into its blocked layout;
  * nanoseek's own small-batch kernel (csrc/decode.cpp) for decoding: bf16 weights packed in column pairs,
    multiplied on vdpbf16ps with AVX512-BF16 or widened to float32 in registers elsewhere (AVX2, AVX-512), so a
    bf16 weight streams half the bytes of a float32 one on every x86 CPU; int8 and int4 weights in integer
    products; small float32 weights (where oneDNN's fixed cost per call is most of the product). The same
    extension holds the decode-time fusions (routed and shared experts in one call, norm, RoPE, routing, MLA and
    GQA attention read in place from the paged cache).

`F.linear` on CPU re-lays-out its weight for oneDNN on every call; for the small batches of decoding that
re-layout costs as much as the product itself. Packing each weight once (what inductor's freezing does)
measured 1.8-3.3x faster for 1-32 rows and 1.1-1.3x for 512-row prefills, with bit-identical bf16 results
(docs/LOG.md). oneDNN packs bf16 weights only where it has bf16 GEMMs (AVX-512 and up); on AVX2 it would
refuse, so there bf16 weights are widened per call for prefill instead.

Nothing here knows the model's modules: model/ops.py asks for packed copies and runs products on them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .build import CompiledKernels

_BATCH_HINT = 64  # oneDNN picks a blocking for this many rows; measured best or near-best for 1..512
# Most rows (per expert, for the routed experts) that go to the decode kernel. Measured on 2 threads against
# oneDNN over 40 distinct 1024x768 bf16 weights (AVX512-BF16): 1.7x faster for 1-4 rows, 1.1x for 32, even at
# 64; and 1.8x for 2 rows per expert, 1.2x for 16. Larger (prefill) batches are compute-bound: oneDNN's.
SMALL_ROWS = 32
SMALL_ROWS_PER_EXPERT = 16
# Beyond SMALL_ROWS, small weights still go to the kernel: oneDNN's fixed cost per call (~15 us) dominates a
# tiny product. Measured on 2 threads: 64 rows x 256x192 weight 9.5 vs 19.2 us, 128 rows x 384x256 30 vs 37 us,
# 128 rows x 768x256 58 vs 62 us (even), 64 rows x 4096x400 242 vs 220 us (oneDNN's).
SMALL_PRODUCT_MACS = 16 << 20
SMALL_PRODUCT_ROWS = 128

DECODE_KERNELS = CompiledKernels("nanoseek_decode", "decode.cpp", ("avx2", "avx512", "avx512_bf16", "amx"))


def decode_kernels():
    """The compiled extension (pack, grouped_linear, moe_swiglu, rms_norm, select_experts and, with
    AVX512-BF16, mla_decode_attention), or None where it is unavailable."""
    return DECODE_KERNELS.get()


# float32 weights get a decode-kernel copy only up to this many elements per matrix: what it saves is oneDNN's
# fixed ~25 us a call, which matters for small products (the speedrun model's, a routed expert's); a large
# float32 matrix streams as fast through oneDNN, and a third copy of it would cost memory for nothing.
SMALL_FLOAT32_ELEMENTS = 1 << 22


def small_pack(weight: torch.Tensor, pad_rows: bool = True) -> torch.Tensor | None:
    """The decode kernel's packed copy of a bf16 weight [N, K] or [E, N, K] (or of a small float32 one), or None
    where it does not apply. The kernel works in blocks of 16 outputs: with `pad_rows` a weight of any N is
    padded with zero rows to the next multiple (a product's extra outputs are dropped), else N must be one."""
    if weight.device.type != "cpu" or (weight.shape[-2] % 16 and not pad_rows):
        return None
    if weight.dtype == torch.float32:
        if weight.shape[-2] * weight.shape[-1] > SMALL_FLOAT32_ELEMENTS:
            return None
    elif weight.dtype != torch.bfloat16 or weight.shape[-1] % 2:
        return None
    kernels = decode_kernels()
    if kernels is None:
        return None
    weight = weight.detach()
    return kernels.pack(F.pad(weight, (0, 0, 0, -weight.shape[-2] % 16)))


def packed_rows(packed: torch.Tensor) -> int:
    """N of a `small_pack`ed weight, padding included."""
    return packed.shape[1] * 16


@dataclass(frozen=True)
class QuantPack:
    """The decode kernel's copy of a quantized weight [E, N, K] (model/quant.py): integers packed [E, N/16, K/2,
    16, 2] (int8) or [E, N/16, K/8, 16, 4] (int4, two to a byte; see csrc/decode.cpp), scales [E, N/16, K/group, 16]
    float32."""

    packed: torch.Tensor
    scales: torch.Tensor
    bits: int


def quant_pack(q: torch.Tensor, scales: torch.Tensor, bits: int) -> QuantPack | None:
    """Packs integers q [N, K] or [E, N, K] (int8; int4 values in [-8, 7]) with scales [..., N, K / group] for
    the decode kernel, or None where it does not apply (no kernels, N not a multiple of 16)."""
    if decode_kernels() is None or q.device.type != "cpu" or q.shape[-2] % 16 or q.shape[-1] % (8 if bits == 4 else 2):
        return None
    if q.dim() == 2:
        q, scales = q.unsqueeze(0), scales.unsqueeze(0)
    E, N, K = q.shape
    G = scales.shape[-1]
    if bits == 8:
        packed = q.view(torch.uint8).reshape(E, N // 16, 16, K // 2, 2).permute(0, 1, 3, 2, 4)
    else:  # inputs 8b + i and 8b + 4 + i share byte i of an output's 4 (the kernel's integer-dot layout)
        u = (q + 8).to(torch.uint8).reshape(E, N // 16, 16, K // 8, 2, 4)
        packed = (u[..., 0, :] | (u[..., 1, :] << 4)).permute(0, 1, 3, 2, 4)
    blocked = scales.float().reshape(E, N // 16, 16, G).permute(0, 1, 3, 2)
    return QuantPack(packed.contiguous(), blocked.contiguous(), bits)


def moe_swiglu(x, weights, indices, gate_up, down, intermediate: int, shared=None) -> torch.Tensor:
    """A routed-expert SwiGLU layer in one call over `small_pack`ed (bf16, float32) or `quant_pack`ed expert
    stacks. `shared`: (gate_up, down, intermediate) of the layer's shared expert, `small_pack`ed without padding
    (`shared_expert_packs`), added in the same call; only beside unquantized experts."""
    kernels = decode_kernels()
    if isinstance(gate_up, QuantPack):
        assert shared is None, "the shared expert joins unquantized experts only"
        return kernels.moe_swiglu_q(x, weights, indices, gate_up.packed, gate_up.scales, down.packed, down.scales,
                                    intermediate, gate_up.bits)
    shared_gate_up, shared_down, shared_intermediate = shared or (None, None, 0)
    return kernels.moe_swiglu(x, weights, indices, gate_up, down, intermediate, shared_gate_up, shared_down,
                              shared_intermediate)


def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack (and run) weights of `dtype` on this CPU: float32 anywhere it exists, bf16 only
    where it has bf16 GEMMs (it refuses the reorder on AVX2)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _BATCH_HINT)


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    shape = x.shape
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), packed, bias, "none", [], "")
    return y.view(*shape[:-1], y.shape[-1])


def grouped_linear(x: torch.Tensor, packed: torch.Tensor | QuantPack, offsets: torch.Tensor, out_features: int):
    """Rows offsets[e]..offsets[e+1] of x [T, K] (bf16 or float32) times weight e of a `small_pack`ed or
    `quant_pack`ed stack -> [T, N] in x's dtype."""
    if isinstance(packed, QuantPack):
        return decode_kernels().grouped_linear_q(x, packed.packed, packed.scales, offsets, out_features, packed.bits)
    y = decode_kernels().grouped_linear(x, packed, offsets, packed_rows(packed))
    return y if y.shape[1] == out_features else y[:, :out_features]


@functools.lru_cache(maxsize=1024)
def _offsets(groups: int, rows: int) -> torch.Tensor:
    """[0, rows, 2 rows, ...]: group boundaries of equal groups (cached: a fresh tensor per call costs more
    than a small decode product)."""
    return torch.arange(0, (groups + 1) * rows, rows)


def per_head_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [R, H, K] -> [R, H, N]: each head's rows times that head's weight, in one grouped call."""
    R, H, K = x.shape
    y = grouped_linear(x.transpose(0, 1).reshape(H * R, K), packed, _offsets(H, R), out_features)
    return y.view(H, R, out_features).transpose(0, 1)


def small_product(rows: int, out_features: int, in_features: int) -> bool:
    """Whether a product of this size belongs to the decode kernel rather than oneDNN."""
    return rows <= SMALL_ROWS or (rows <= SMALL_PRODUCT_ROWS
                                  and rows * out_features * in_features <= SMALL_PRODUCT_MACS)


def small_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x [..., K] times a `small_pack`ed weight on the decode kernel."""
    rows = x.numel() // x.shape[-1]
    y = grouped_linear(x.reshape(rows, -1), packed, _offsets(1, rows), out_features)
    return y.view(*x.shape[:-1], out_features)
