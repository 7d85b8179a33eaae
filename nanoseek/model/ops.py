"""The model's ops seam: every product, norm, expert layer, decode attention and loss the modules compute goes
through here, and this module picks how it runs -- eager PyTorch, the fused CPU training kernels, or the CPU
inference kernels -- for the CPU's ISA level and the dtypes at hand (the way DeepSeek-V3's inference code has
one `linear()` for bf16 and fp8 weights).

Modules import this file only; the kernels (model/kernels/) never import modules. What a module derives from
its weights for inference (packed copies, absorbed MLA projections, fusion switches) lives in one slot per
module, `module.derived`, built by the module's `derive(plan)` from the helpers below; `derive_weights(model)`
rebuilds every slot (the engine calls it at start and after `update_weights`), `derive_weights(model, None)`
drops them.

Weights and compute may differ in dtype: on a CPU without native bf16 a bf16 checkpoint keeps bf16 weights and
computes in float32 (runtime.inference_precision). Then every product widens the weight: in registers on the
decode kernel, per call for prefill-sized products.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..runtime import cpu
from . import quant
from .kernels import decode
from .kernels import training as train_ops
from .kernels.training import compute_dtype, fused_training


def eager():
    """Within this block (this thread), training runs the eager modules: the reference the fused path is
    tested and benchmarked against."""
    return train_ops.eager()


# ---- what an inference engine derives from the weights ----

@dataclass(frozen=True)
class Plan:
    """How a model's derived weights are built. compute: the activations' dtype; onednn: pack weights of the
    compute dtype for oneDNN; small: pack bf16 (and small float32) weights for the decode kernel; fused: the
    decode-time fusions (norm, routing, RoPE, cache attention) are available; quant: the model's weights are
    quantized (model/quant.py), and the decode kernel streams their integers instead."""

    compute: torch.dtype
    onednn: bool
    small: bool
    fused: bool
    quant: quant.Scheme | None = None


def inference_plan(device: torch.device, compute: torch.dtype, scheme: quant.Scheme | None = None) -> Plan | None:
    """None where nothing is derived (GPUs, or dtypes no kernel handles)."""
    if device.type != "cpu" or compute not in (torch.float32, torch.bfloat16):
        return None
    kernels = decode.decode_kernels() is not None
    return Plan(compute, decode.onednn_packs(compute), kernels, kernels, scheme)


def derive_weights(model: torch.nn.Module, plan: Plan | None | str = "auto") -> None:
    """Rebuilds (plan "auto": for the model's device and compute dtype) or drops (None) every module's
    derived weights. Call again whenever the weights change."""
    if plan == "auto":
        plan = inference_plan(model.device, model.compute_dtype, getattr(model, "quantization", None))
    # Children first: a module that stacks its children's weights (gate and up; q, k and v; q_a and kv_a) then
    # drops their own decode-kernel copies (`stack_linears`).
    for module in reversed(list(model.modules())):
        if hasattr(module, "derive"):
            module.derive(plan)


@dataclass
class LinearPack:
    """A linear weight's packed copies: for oneDNN (compute dtype) and for the decode kernel."""

    onednn: torch.Tensor | None
    small: torch.Tensor | None
    out_features: int


def pack_linear(weight: torch.Tensor, plan: Plan | None, quantized: quant.QuantizedWeight | None = None
                ) -> LinearPack | None:
    """`quantized`: the weight's integers (its values are their dequantization), for the decode kernel."""
    if plan is None:
        return None
    onednn = decode.onednn_pack(weight) if plan.onednn and weight.dtype == plan.compute else None
    small = pack_stack(weight, plan, quantized)
    return None if onednn is None and small is None else LinearPack(onednn, small, weight.shape[0])


def pack_stack(weight: torch.Tensor, plan: Plan | None, quantized: quant.QuantizedWeight | None = None,
               pad_rows: bool = True) -> torch.Tensor | decode.QuantPack | None:
    """The decode kernel's copy of a weight or of stacked weights [E, N, K] (experts, heads, gate and up):
    their integers where `quantized` holds them, else the weights (bf16, small float32; rows padded to the
    kernel's blocks unless not `pad_rows`); None where the kernel does not apply."""
    if plan is None or not plan.small:
        return None
    if quantized is not None:
        return decode.quant_pack(quantized.q, quantized.scales, quantized.bits)
    return decode.small_pack(weight, pad_rows)


def pack_each(weights: torch.Tensor, plan: Plan | None) -> list[torch.Tensor] | None:
    """oneDNN copies of each weight of a stack, or None."""
    if plan is None or not plan.onednn or weights.dtype != plan.compute:
        return None
    return [decode.onednn_pack(w) for w in weights]


# ---- products ----

def _emulated_bf16(x: torch.Tensor) -> bool:
    """bf16 arithmetic on a CPU that only emulates it (~45x slower than float32 in a GEMM)."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not cpu().bf16_native


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           derived: LinearPack | None = None) -> torch.Tensor:
    """x @ weight^T + bias, in x's dtype."""
    if derived is not None and not torch.is_grad_enabled():
        rows = x.numel() // x.shape[-1]
        if derived.small is not None and rows and decode.small_product(rows, derived.out_features, x.shape[-1]):
            y = decode.small_linear(x, derived.small, derived.out_features)
            return y if bias is None else y + bias.to(y.dtype)
        if derived.onednn is not None and x.dtype == weight.dtype:
            return decode.onednn_linear(x, derived.onednn, bias)
    if weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        # Weights kept in a narrower dtype than the compute (bf16 weights, float32 activations): widen per call.
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if _emulated_bf16(x) and weight.dtype == torch.bfloat16:
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    return F.linear(x, weight, bias)


def bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched product in a's dtype (float32 where bf16 would be emulated)."""
    if _emulated_bf16(a):
        return torch.bmm(a.float(), b.float()).to(a.dtype)
    return torch.bmm(a, b.to(a.dtype))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, training: bool = False,
             float_output: bool = False, fused: bool = False) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back before the weight, as the reference implementations do.
    `float_output`: in CPU training, hand the consumer eager RMSNorm's float32 result (the MoE router reads
    float32) rather than the compute dtype. `fused`: the decode kernel's one-pass norm (inference)."""
    if fused_training(x, training) and weight.dtype == torch.float32:
        return train_ops.rms_norm(x, weight, eps, float_output)
    if fused and not torch.is_grad_enabled() and x.dtype in (torch.bfloat16, torch.float32) and (
            x.dtype == torch.float32 or weight.dtype == torch.bfloat16):
        return decode.decode_kernels().rms_norm(x, weight, eps)
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), eps)
    # Low precision: normalise in float32 and round once, then scale (transformers' order of rounding).
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def clamped_glu(g: torch.Tensor, u: torch.Tensor, act, limit: float | None) -> torch.Tensor:
    """act(g) * u; with DeepSeek-V4's `swiglu_limit`, g is clipped above and u on both sides first."""
    if limit is not None:
        g, u = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
    return act(g) * u


def swiglu_mlp(x: torch.Tensor, gate, up, down, act, *, training: bool = False,
               gate_up_small: torch.Tensor | None = None, limit: float | None = None) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for the Linear modules gate, up, down; `gate_up_small` is the decode kernel's
    stacked copy of gate and up (one weight stream instead of two at decode batch sizes). `limit`: V4's clipped
    SwiGLU, computed eagerly (the fused kernels do not clip)."""
    if limit is not None:
        return down(clamped_glu(gate(x), up(x), act, limit))
    no_bias = gate.bias is None and up.bias is None and down.bias is None
    if fused_training(x, training) and act is F.silu and no_bias:
        return train_ops.swiglu_mlp(x, gate.weight, up.weight, down.weight)
    gate_up = stacked_linear(x, gate_up_small, 2 * gate.out_features)
    if gate_up is not None:
        g, u = gate_up.chunk(2, dim=-1)
        return down(act(g) * u)
    return down(act(gate(x)) * up(x))


def stack_linears(linears, plan: Plan | None) -> torch.Tensor | decode.QuantPack | None:
    """The decode kernel's copy of several Linear modules' weights stacked along their outputs (gate and up;
    q, k and v): one weight stream per decode step instead of one per module. Quantized modules stack their
    integers (where all share one group size). The modules' own decode-kernel copies are dropped once the stack
    exists (it serves their decode-sized products; their oneDNN copies stay, for prefill): a 1.5B Qwen2's engine
    in bf16 measured 11.7 -> 10.5 GB resident."""
    if plan is None or not plan.small:
        return None
    parts = [quant.quantized_of(m) for m in linears]
    integers = None
    if None not in parts and len({p.group for p in parts}) == 1:
        integers = quant.QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]),
                                         parts[0].bits)
    stacked = pack_stack(torch.cat([m.weight for m in linears]), plan, integers)
    if stacked is not None:
        for m in linears:
            if m.derived is not None and m.derived.small is not None:
                m.derived = None if m.derived.onednn is None else replace(m.derived, small=None)
    return stacked


def stacked_linear(x: torch.Tensor, stacked, out_features: int, bias: torch.Tensor | None = None
                   ) -> torch.Tensor | None:
    """x times a `stack_linears` copy (+ the stacked bias) where the product is decode-sized; None where the
    caller runs its modules one by one (prefill, training, no stacked copy)."""
    if stacked is None or torch.is_grad_enabled():
        return None
    if not decode.small_product(x.numel() // x.shape[-1], out_features, x.shape[-1]):
        return None
    y = decode.small_linear(x, stacked, out_features)
    return y if bias is None else y + bias.to(y.dtype)


# ---- routed experts ----

@dataclass
class ExpertsPack:
    """Routed experts' packed copies: per expert for oneDNN (gate_up list, down list), and every expert stacked
    for the decode kernel (gate_up, down), which runs the whole layer in one call."""

    onednn: tuple[list[torch.Tensor], list[torch.Tensor]] | None
    small: tuple[torch.Tensor, torch.Tensor] | None


def pack_experts(gate_up: torch.Tensor, down: torch.Tensor, plan: Plan | None,
                 quantized: tuple[quant.QuantizedWeight | None, quant.QuantizedWeight | None] = (None, None)
                 ) -> ExpertsPack | None:
    if plan is None:
        return None
    onednn = pack_each(gate_up, plan), pack_each(down, plan)
    if (quantized[0] is None) != (quantized[1] is None):
        quantized = (None, None)  # the kernel runs both stacks in one format
    # The expert kernel splits gate_up's rows in halves: its stacks take no padding.
    small = pack_stack(gate_up, plan, quantized[0], False), pack_stack(down, plan, quantized[1], False)
    if None not in small and type(small[0]) is not type(small[1]):
        small = (None, None)
    return ExpertsPack(None if None in onednn else onednn, None if None in small else small)


def shared_expert_packs(mlp) -> tuple | None:
    """(gate_up, down, intermediate) of a shared-expert MLP for `decode.moe_swiglu`, where its decode-kernel
    copies are unquantized, unpadded and bias-free SwiGLU; else None."""
    if getattr(mlp, "act", None) is not F.silu or not hasattr(mlp, "down_proj") or mlp.down_proj.bias is not None:
        return None  # no shared expert, or not the SwiGLU MLP the kernel runs (V4's clipped one)
    gate_up, down = mlp.derived, mlp.down_proj.derived.small if mlp.down_proj.derived is not None else None
    intermediate, hidden = mlp.down_proj.in_features, mlp.down_proj.out_features
    if not isinstance(gate_up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return None
    if decode.packed_rows(gate_up) != 2 * intermediate or decode.packed_rows(down) != hidden:
        return None
    return gate_up, down, intermediate


def routed_experts(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, gate_up: torch.Tensor,
                   down: torch.Tensor, act, *, training: bool = False, derived: ExpertsPack | None = None,
                   limit: float | None = None, shared=None) -> torch.Tensor:
    """sum_j weights[n, j] * expert_{indices[n, j]}(x[n]) for SwiGLU experts stored stacked: gate_up
    [E, 2I, H], down [E, H, I], plus shared(x) where a shared-expert module is given. Grouped: token copies
    sorted by expert, one product per expert. `limit`: V4's clipped SwiGLU (the fused kernels do not clip, so it
    runs the grouped products)."""
    if limit is not None:
        training, derived = False, None
    inference = derived is not None and not torch.is_grad_enabled()
    if inference and derived.small is not None and act is F.silu and x.dtype in (torch.bfloat16, torch.float32) \
            and indices.numel() <= decode.SMALL_ROWS_PER_EXPERT * min(indices.numel(), gate_up.shape[0]):
        # Decoding (few rows per expert, were every routed copy spread evenly; no host sync to count them):
        # the whole layer in one kernel call, the shared expert included where its copies allow.
        packs = None if isinstance(derived.small[0], decode.QuantPack) else shared_expert_packs(shared)
        out = decode.moe_swiglu(x, weights, indices, *derived.small, down.shape[-1], packs)
        return out if shared is None or packs is not None else out + shared(x)
    out = _routed_experts(x, weights, indices, gate_up, down, act, training, derived if inference else None, limit)
    return out if shared is None else out + shared(x)


def _routed_experts(x, weights, indices, gate_up, down, act, training, derived, limit) -> torch.Tensor:
    if fused_training(x, training) and act is F.silu:
        return train_ops.routed_experts(x, weights, indices, gate_up, down)
    onednn = derived.onednn if derived is not None and x.dtype == gate_up.dtype else None

    def expert(rows: torch.Tensor, e: int) -> torch.Tensor:
        if onednn is not None:
            g, u = decode.onednn_linear(rows, onednn[0][e]).chunk(2, dim=-1)
            return decode.onednn_linear(act(g) * u, onednn[1][e])
        g, u = linear(rows, gate_up[e]).chunk(2, dim=-1)
        return linear(clamped_glu(g, u, act, limit), down[e])

    N, k = indices.shape
    if N <= 2:  # batch-1 decoding (or a draft being verified): no sorting to do, just each row's k experts
        rows = []
        for n in range(N):
            out = None
            for e, w in zip(indices[n].tolist(), weights[n].to(x.dtype)):
                y = expert(x[n:n + 1], e) * w
                out = y if out is None else out + y
            rows.append(out)
        return rows[0] if N == 1 else torch.cat(rows)
    flat = indices.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    token_of = order // k
    xs = x[token_of]
    outputs, start = [], 0
    for e, n in enumerate(counts):
        if n:
            outputs.append(expert(xs[start:start + n], e))
            start += n
    ys = torch.cat(outputs) * weights.flatten()[order].unsqueeze(-1).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token_of, ys)


def route(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sigmoid: bool, n_group: int,
          topk_group: int, top_k: int, rule: int, normalize: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A DeepSeek router's (weights [N, k] float32, expert indices [N, k]) in one decode-kernel call: the eager
    Router's ops one for one (see Router.forward)."""
    return decode.decode_kernels().route(x, weight, bias, sigmoid, n_group, topk_group, top_k, rule, normalize,
                                         scaling)


def select_experts(choice: torch.Tensor, n_group: int, topk_group: int, top_k: int, rule: int) -> torch.Tensor:
    """DeepSeek's expert selection on float32 choice scores [N, E]: keep the `topk_group` best of `n_group`
    groups (rule 1: group score = sum of its top 2, V3's noaux_tc; 2: its max, V2's group_limited_greedy;
    0: no groups), then the `top_k` best experts in them (inference: inside `route`'s one kernel call)."""
    if rule:
        grouped = choice.view(choice.shape[0], n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1) if rule == 1 else grouped.amax(dim=-1)
        keep = group_scores.topk(topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        # -inf, not 0: biased sigmoid scores can be negative, and a masked expert must never win.
        choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).flatten(1)
    return choice.topk(top_k, dim=-1).indices


# ---- attention ----

def sdpa(q, k, v, mask, scale):
    """q [B,T,H,D], k/v [B,S,Hkv,D] -> [B,T,H,Dv]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = k.shape[1] != q.shape[1]
    dv = v.shape[-1]
    if dv != q.shape[-1]:
        # MLA's value heads are narrower than its query/key heads; PyTorch's fused (flash) kernels need equal
        # widths and otherwise fall back to the unfused math path, ~1.7x slower here in bf16. Zero columns
        # cost little and leave the result unchanged.
        v = F.pad(v, (0, q.shape[-1] - dv))
    if mask is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out[..., :dv].transpose(1, 2)


def attention(q, k, v, mask, scale, training: bool):
    """Self-attention of a batch of sequences, q [B,T,H,D], k/v [B,T,Hkv,D] -> [B,T,H,Dv]: in CPU training the
    fused batched kernel (causal, no padding, scores small enough to keep), else SDPA."""
    B, T, H, _ = q.shape
    if (mask is None and k.shape[1] == T and fused_training(q, training)
            and training_fits(B * H, T, q)):
        if k.shape[2] != H:  # GQA: each KV head serves H / Hkv query heads (autograd sums their gradients)
            k, v = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (k, v))
        return train_ops.causal_attention(q, k, v, scale)
    return sdpa(q, k, v, mask, scale)


def training_fits(batch_heads: int, T: int, x: torch.Tensor) -> bool:
    """Whether the fused training attention keeps this many scores (else the flash kernel runs)."""
    return train_ops.batched_attention_fits(batch_heads, T, compute_dtype(x))


def mla_training_attention(q, kv, k_rope, rope, nope_dim: int, scale: float) -> torch.Tensor:
    """Causal MLA self-attention in CPU training from the projections' outputs (kernels/training.py)."""
    return train_ops.mla_attention(q, kv, k_rope, rope, nope_dim, scale)


def decode_attention(q, k, v, mask, scale, latent_width: int = 0, out_dtype=None):
    """One query per sequence: q [B, H, D]; GQA k/v [B, S, Hkv, D]; or MLA k [B, S, D] with v None, the value
    being the first `latent_width` columns of k -> [B, H, Dv].

    A few float32 batched matmuls: for a single query PyTorch's fused SDPA costs ~10x more in fixed overhead
    on CPU, and float32 keeps the scores exact for bf16 caches. The mask enters as an additive bias of the
    score product (one kernel instead of scale + masked_fill).
    """
    B, H, _ = q.shape
    if v is None:  # MLA: one key head shared by all query heads; the value is the key's latent prefix
        keys = values = k.float()  # [B, S, D]
        hkv = 1
    else:  # GQA: fold the KV heads into the batch, [B * Hkv, S, D]
        hkv = k.shape[2]
        keys, values = (t.transpose(1, 2).flatten(0, 1).float() for t in (k, v))
    qf = q.float().reshape(B * hkv, H // hkv, -1)
    if mask is None:
        scores = torch.bmm(qf, keys.transpose(1, 2)).mul_(scale)
    else:
        bias = torch.zeros(mask.shape[0], 1, keys.shape[1], device=q.device)
        bias.masked_fill_(~mask.reshape(mask.shape[0], 1, -1), float("-inf"))
        scores = torch.baddbmm(bias.repeat_interleave(hkv, 0) if hkv > 1 else bias, qf, keys.transpose(1, 2),
                               alpha=scale)
    # MLA: the product with the whole contiguous [c_kv | k_r] row, then the latent columns: ~1.8x faster
    # than multiplying by the strided latent view, for 12% more arithmetic.
    out = torch.bmm(scores.softmax(-1), values)
    if v is None:
        out = out[..., :latent_width]
    return out.reshape(B, H, -1).to(out_dtype or q.dtype)


@dataclass
class AbsorbedPack:
    """MLA's derived weights for inference: W_UK [H, nope, L] and W_UV^T [H, L, v] as contiguous float32 copies
    (tiny per-head products are several times faster in float32 on CPU, and decode attention runs in float32
    anyway); for bf16 or quantized weights with the decode kernel, both per head packed for it, and q_a_proj and
    kv_a_proj_with_mqa stacked (one product of the layer's input, with their stacked bias)."""

    w_uk: torch.Tensor
    w_uv_t: torch.Tensor
    small: tuple[torch.Tensor | None, torch.Tensor | decode.QuantPack | None] | None
    inputs: tuple[torch.Tensor | decode.QuantPack, torch.Tensor | None] | None
    # The decode extension runs this layer's decode attention in place from the paged cache and its RoPE.
    kernels: bool


def pack_absorbed(w_uk: torch.Tensor, w_uv_t: torch.Tensor, plan: Plan | None,
                  uv_quantized: quant.QuantizedWeight | None = None, input_linears=()) -> AbsorbedPack:
    """`uv_quantized`: W_UV [H, v, L] as integers, where kv_b_proj is quantized (its value rows, whose groups run
    along the latent as the product's do). W_UK reads kv_b_proj's key rows across their groups, so it keeps
    their dequantized values: the same model on every path. `input_linears`: the projections of the layer's
    input to stack (q_a_proj and kv_a_proj_with_mqa; none without q LoRA)."""
    small = None
    if plan is not None and plan.small:
        small = (pack_stack(w_uk.transpose(1, 2), plan), pack_stack(w_uv_t.transpose(1, 2), plan, uv_quantized))
    stacked = stack_linears(input_linears, plan) if input_linears else None
    inputs = None
    if stacked is not None:
        biases = [m.bias for m in input_linears]
        inputs = (stacked, None if biases[0] is None else torch.cat(biases).detach())
    # Decode attention reads the paged cache in place wherever the decode extension is built: in bf16 on the
    # AVX512-BF16 kernel when the latent query comes out of its packed W_UK in bf16, otherwise in float32 (a bf16
    # cache widened as it is read).
    kernels = plan is not None and plan.fused and decode.decode_kernels() is not None
    return AbsorbedPack(w_uk.detach().float().contiguous(), w_uv_t.detach().float().contiguous(), small, inputs,
                        kernels)


def absorbed_query(q_nope: torch.Tensor, derived: AbsorbedPack | None, w_uk: torch.Tensor) -> torch.Tensor:
    """q_nope [R, H, nope] -> the latent query q_nope W_UK [R, H, L] (float32 unless the kernel ran it)."""
    if derived is not None and derived.small is not None and derived.small[0] is not None \
            and not torch.is_grad_enabled() and q_nope.dtype in (torch.bfloat16, torch.float32) \
            and q_nope.shape[0] <= 64:
        return decode.per_head_linear(q_nope, derived.small[0], w_uk.shape[-1])
    w = derived.w_uk if derived is not None else w_uk
    return bmm(q_nope.transpose(0, 1).to(w.dtype), w).transpose(0, 1)


def absorbed_output(out_latent: torch.Tensor, derived: AbsorbedPack | None, w_uv_t: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """Per-head latent outputs [R, H, L] -> value outputs [R, H, v] in `dtype`."""
    if derived is not None and derived.small is not None and derived.small[1] is not None \
            and not torch.is_grad_enabled() and dtype in (torch.bfloat16, torch.float32) \
            and out_latent.shape[0] <= 64:
        return decode.per_head_linear(out_latent.to(dtype), derived.small[1], w_uv_t.shape[-1])
    w = derived.w_uv_t if derived is not None else w_uv_t
    return bmm(out_latent.transpose(0, 1).to(w.dtype), w).transpose(0, 1).to(dtype)


def gqa_cache_attention(q: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """GQA decode attention read in place from the paged K/V cache: q [B, H, D], cache [slots, 2, Hkv, D]
    (float32 or bf16) -> [B, H, D] float32, on the kernel every ISA builds."""
    return decode.decode_kernels().gqa_decode_attention(q.float(), cache, slots, lengths, scale)


def rotate_rows(x: torch.Tensor, rope, fused: bool) -> torch.Tensor:
    """RoPE of x [..., T, heads, D] by the table of its positions: one call on the decode kernel (half-split or
    interleaved) where `fused` (an inference plan with kernels), no gradient is wanted and the table has a row
    per position of x, else the eager rotation."""
    half = x.shape[-1] // 2
    rows = x.numel() // (x.shape[-2] * x.shape[-1])
    if (fused and not torch.is_grad_enabled() and x.dtype in (torch.float32, torch.bfloat16)
            and rope.cos.numel() == rows * half):
        kernels = decode.decode_kernels()
        rotate = kernels.rope_interleaved if rope.interleaved else kernels.rope_half
        return rotate(x.reshape(rows, x.shape[-2], -1), rope.cos, rope.sin).view(x.shape)
    return rope.rotate(x)


def mla_cache_attention(q: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
                        scale: float, latent_width: int) -> torch.Tensor:
    """Absorbed MLA decode attention read in place from the paged latent cache: q [B, H, L + rope], cache
    [slots, L + rope] -> [B, H, L] float32. bf16 q and cache: the AVX512-BF16 kernel where it is built; otherwise
    the float32 kernel every ISA builds (a bf16 cache widened as it is read)."""
    kernels = decode.decode_kernels()
    if q.dtype == torch.bfloat16 and cache.dtype == torch.bfloat16 and hasattr(kernels, "mla_decode_attention"):
        return kernels.mla_decode_attention(q, cache, slots, lengths, scale, latent_width)
    return kernels.mla_decode_attention_f32(q.float(), cache, slots, lengths, scale, latent_width)


# ---- losses ----

def summed_cross_entropy(hidden: torch.Tensor, head, y: torch.Tensor, mask: torch.Tensor | None, *,
                         training: bool = False) -> torch.Tensor:
    """Next-token cross-entropy of the LM head (a Linear module) over hidden [B, T, H], summed over (masked)
    positions. In CPU training the head and the loss run in one chunked pass (the logits never exist whole)."""
    if fused_training(hidden, training) and head.bias is None:
        return train_ops.linear_cross_entropy(hidden, head.weight, y, mask)
    ce = F.cross_entropy(head(hidden).float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
    return (ce * mask).sum() if mask is not None else ce.sum()


def token_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor, temperature: float, *,
                   training: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [R, H] rows, the LM head, targets [R] -> (log p(target) [R], entropy [R], both float32) of
    softmax(head(hidden) / temperature); the entropy carries no gradient."""
    if fused_training(hidden, training) and head.bias is None:
        return train_ops.token_logprobs(hidden, head.weight, targets, temperature)
    logsm = (head(hidden).float() / temperature).log_softmax(-1)
    logp = logsm.gather(-1, targets[:, None]).squeeze(-1)
    return logp, -(logsm.exp() * logsm).sum(-1).detach()
