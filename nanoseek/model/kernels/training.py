"""The fused CPU training path: hand-written forward/backward pairs for the model's hot spots in training.

Each is a torch.autograd.Function whose two halves are a few large GEMMs (oneDNN through torch.mm / torch.bmm)
in the compute dtype -- bf16 where the CPU has native bf16 (autocast), float32 elsewhere -- and one fused pass
of csrc/train_ops.cpp in between, instead of eager autograd's chain of small ops, dtype round trips and fresh
zero-filled buffers:
  * `rms_norm`: one pass forward (float32 statistics, the reference's rounding), one backward;
  * `swiglu_mlp`: gate and up as one GEMM, SwiGLU in one pass; dense MLPs and shared experts;
  * `routed_experts`: tokens sorted by expert once, each expert's three products written into shared buffers
    (eager autograd's per-expert slices each cost a zero-filled copy of the whole stacked weight and of the
    sorted activations in backward), weighted combine as one batched product;
  * `causal_attention`: scores, fused causal softmax and the value product as batched GEMMs (PyTorch's CPU
    flash kernel runs at a tenth of the GEMM rate for these small heads, backward especially);
  * `linear_cross_entropy`: LM head and cross-entropy in one pass per row chunk, the gradient formed in the
    forward, so the float32 logits of the whole batch never exist;
  * `token_logprobs`: the LM head on the rows whose tokens are scored only, then each chosen token's
    log-probability and the entropy in one pass (policy-gradient training), the softmax redone in backward.

The path applies when `fused_training(x, module.training)` holds: a module in training mode, a CPU tensor, bf16
or float32 compute and the compiled kernels available for this CPU. Everything else (eval mode: inference, the
engine, validation; CUDA; a failed build; NANOSEEK_CPU_KERNELS=0) runs the eager modules, which stay the
reference the tests compare to.
Numerics follow eager autocast in bf16: bf16 GEMM inputs and outputs with float32 accumulation, float32
softmax, norm and loss statistics, weight gradients as bf16 products cast to the float32 master weights. In
float32 everything is float32.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from .build import CompiledKernels

TRAIN_KERNELS = CompiledKernels("nanoseek_train", "train_ops.cpp", ("avx2", "avx512", "avx512_bf16", "amx"))
COMPUTE_DTYPES = (torch.bfloat16, torch.float32)

# Largest score tensor (batch x heads x T x T in the compute dtype) the batched attention keeps per layer for backward;
# longer sequences use PyTorch's flash kernel, whose memory does not grow with T^2.
ATTENTION_SCORE_BYTES = 64 << 20
# Routed experts' rows are padded to a multiple of this (zero rows; see _RoutedExperts.forward).
EXPERT_ROW_BUCKET = 32
# Rows of logits formed at once by linear_cross_entropy: about 16 MiB of logits per chunk.
CE_CHUNK_BYTES = 16 << 20


def train_kernels():
    return TRAIN_KERNELS.get()


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype products run in for x: autocast's when it is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_state = threading.local()


@contextlib.contextmanager
def eager():
    """Within this block (this thread), training runs the eager modules: the reference the fused path is
    tested and benchmarked against."""
    previous = getattr(_state, "eager", False)
    _state.eager = True
    try:
        yield
    finally:
        _state.eager = previous


def fused_training(x: torch.Tensor, training: bool) -> bool:
    """Whether a module in `training` mode runs its fused path on x. The mode, not whether gradients are on,
    decides: a no-grad pass of a training-mode model (GRPO's old policy and reference) must give the numbers
    the training pass gives."""
    return (training and x.device.type == "cpu" and compute_dtype(x) in COMPUTE_DTYPES
            and not getattr(_state, "eager", False) and train_kernels() is not None)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


# ---- RMSNorm ----

class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, bf16_out):
        x = x.contiguous()
        y, rstd = train_kernels().rms_norm_forward(x, weight.detach(), eps, bf16_out)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = train_kernels().rms_norm_backward(dy, x, weight.detach(), rstd)
        return dx, dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, float_out: bool = False) -> torch.Tensor:
    """RMSNorm of x (float32 or bf16) with a float32 weight, in the compute dtype (under bf16 compute: what
    eager RMSNorm then the next product's bf16 cast give) or, with `float_out`, in float32 as eager RMSNorm
    returns it."""
    return _RMSNorm.apply(x, weight, eps, compute_dtype(x) == torch.bfloat16 and not float_out)


# ---- SwiGLU MLP (dense layers and shared experts) ----

class _SwiGLUMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down, dtype):
        k = train_kernels()
        shape = x.shape
        xb = _as(x, dtype).reshape(-1, shape[-1])
        w_gu = _as(torch.cat((w_gate.detach(), w_up.detach())), dtype)  # [2I, H]: one GEMM for gate and up
        w_d = _as(w_down.detach(), dtype)
        h = torch.mm(xb, w_gu.t())
        act = k.swiglu_forward(h)
        y = torch.mm(act, w_d.t())
        ctx.save_for_backward(xb, w_gu, w_d, h, act)
        ctx.shape = shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xb, w_gu, w_d, h, act = ctx.saved_tensors
        dy = _as(dy, xb.dtype).reshape(-1, dy.shape[-1])
        d_down = torch.mm(dy.t(), act)
        dh = train_kernels().swiglu_backward(h, torch.mm(dy, w_d))
        d_gu = torch.mm(dh.t(), xb)
        dx = torch.mm(dh, w_gu).view(ctx.shape)
        I = act.shape[-1]
        return dx, d_gu[:I], d_gu[I:], d_down, None


def swiglu_mlp(x, w_gate, w_up, w_down) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) without biases, in the compute dtype."""
    return _SwiGLUMLP.apply(x, w_gate, w_up, w_down, compute_dtype(x))


# ---- routed experts ----

class _RoutedExperts(torch.autograd.Function):
    """x [N, H], routing weights [N, k] (float32, differentiable), expert indices [N, k], stacked weights
    gate_up [E, 2I, H] and down [E, H, I] -> float32 [N, H] = sum_j weight[n, j] * expert_{idx[n, j]}(x[n])."""

    @staticmethod
    def forward(ctx, x, weights, indices, w_gate_up, w_down, dtype):
        k = train_kernels()
        N, topk = indices.shape
        E = w_gate_up.shape[0]
        flat = indices.flatten()
        order = flat.argsort(stable=True)  # copies sorted by expert: each expert's rows are contiguous
        counts = torch.bincount(flat, minlength=E)
        # Each expert's rows padded to a multiple of EXPERT_ROW_BUCKET: oneDNN JIT-compiles a kernel for every
        # new GEMM shape (~0.4 ms each), and unpadded expert loads give new shapes every step.
        padded = (counts + EXPERT_ROW_BUCKET - 1) // EXPERT_ROW_BUCKET * EXPERT_ROW_BUCKET
        starts, padded_starts = counts.cumsum(0) - counts, padded.cumsum(0) - padded
        sorted_expert = flat[order]
        rows = torch.arange(N * topk, device=flat.device) - starts[sorted_expert] + padded_starts[sorted_expert]
        total = int(padded.sum())
        source = torch.full((total,), -1, dtype=torch.long, device=flat.device)  # -1: a zero padding row
        source[rows] = order // topk
        xs = k.gather_rows(x.contiguous(), source, dtype == torch.bfloat16)  # [rows, H], compute dtype
        w_gu, w_d = _as(w_gate_up.detach(), dtype), _as(w_down.detach(), dtype)
        h = xs.new_empty(total, w_gu.shape[1])
        spans = _expert_spans(padded.tolist())
        for e, s, t in spans:
            torch.mm(xs[s:t], w_gu[e].t(), out=h[s:t])
        act = k.swiglu_forward(h)
        y = xs.new_empty(total, w_d.shape[1])
        for e, s, t in spans:
            torch.mm(act[s:t], w_d[e].t(), out=y[s:t])
        slot = torch.empty_like(order)
        slot[order] = rows
        slot = slot.view(N, topk)  # the row of copy (n, j)
        weights = weights.float().contiguous()
        out = k.gather_sum(y, slot, weights, True)
        ctx.save_for_backward(xs, h, act, y, weights, slot, w_gu, w_d)
        ctx.spans = spans
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        xs, h, act, y, weights, slot, w_gu, w_d = ctx.saved_tensors
        k = train_kernels()
        dy, d_weights = k.scatter_weighted(dout, y, slot, weights)
        d_down = torch.zeros_like(w_d)  # experts that got no token keep a zero gradient
        d_act = torch.empty_like(act)
        for e, s, t in ctx.spans:
            torch.mm(dy[s:t].t(), act[s:t], out=d_down[e])
            torch.mm(dy[s:t], w_d[e], out=d_act[s:t])
        dh = k.swiglu_backward(h, d_act)
        d_gate_up = torch.zeros_like(w_gu)
        dxs = torch.empty_like(xs)
        for e, s, t in ctx.spans:
            torch.mm(dh[s:t].t(), xs[s:t], out=d_gate_up[e])
            torch.mm(dh[s:t], w_gu[e], out=dxs[s:t])
        dx = k.gather_sum(dxs, slot, None, ctx.x_dtype == torch.float32)
        return dx, d_weights, None, d_gate_up, d_down, None


def _expert_spans(counts: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first sorted row, end) for every expert that received tokens."""
    spans, start = [], 0
    for e, n in enumerate(counts):
        if n:
            spans.append((e, start, start + n))
        start += n
    return spans


def routed_experts(x, weights, indices, w_gate_up, w_down) -> torch.Tensor:
    return _RoutedExperts.apply(x, weights, indices, w_gate_up, w_down, compute_dtype(x))


# ---- causal attention ----

class _CausalAttention(torch.autograd.Function):
    """q, k [G, T, D], v [G, T, Dv] (G = batch x heads) -> [G, T, Dv], causal, in the compute dtype."""

    @staticmethod
    def forward(ctx, q, k, v, scale, dtype):
        q, k, v = _as(q, dtype).contiguous(), _as(k, dtype).contiguous(), _as(v, dtype).contiguous()
        probs = train_kernels().causal_softmax_forward(torch.bmm(q, k.transpose(1, 2)), scale)
        ctx.save_for_backward(q, k, v, probs)
        ctx.scale = scale
        return torch.bmm(probs, v)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, probs = ctx.saved_tensors
        dout = _as(dout, q.dtype).contiguous()
        dv = torch.bmm(probs.transpose(1, 2), dout)
        dscores = train_kernels().softmax_backward(probs, torch.bmm(dout, v.transpose(1, 2)), ctx.scale)
        dq = torch.bmm(dscores, k)
        dk = torch.bmm(dscores.transpose(1, 2), q)
        return dq, dk, dv, None, None


class _MLAQueryKeyValue(torch.autograd.Function):
    """MLA's per-head attention inputs in one pass: q [B, T, H, Dn + Dr] (q_b_proj's output), kv [B, T, H, Dn + Dv]
    (kv_b_proj's), k_rope [B, T, Dr] -> Q, K [B H, T, Dn + Dr], V [B H, T, Dv], the rotary parts rotated (the
    shared key copied to every head), heads first as the batched products want them."""

    @staticmethod
    def forward(ctx, q, kv, k_rope, cos, sin, nope_dim, interleaved, dtype):
        Q, K, V = train_kernels().mla_qkv_forward(_as(q, dtype).contiguous(), _as(kv, dtype).contiguous(),
                                                  _as(k_rope, dtype).contiguous(), cos, sin, nope_dim, interleaved)
        ctx.save_for_backward(cos, sin)
        ctx.args = (q.shape[0], nope_dim, interleaved)
        ctx.dtype = dtype
        return Q, K, V

    @staticmethod
    def backward(ctx, dQ, dK, dV):
        cos, sin = ctx.saved_tensors
        dt = ctx.dtype
        dq, dkv, dk_rope = train_kernels().mla_qkv_backward(_as(dQ, dt).contiguous(), _as(dK, dt).contiguous(),
                                                            _as(dV, dt).contiguous(), cos, sin, *ctx.args)
        return dq, dkv, dk_rope, None, None, None, None, None


def mla_attention(q, kv, k_rope, rope, nope_dim: int, scale: float) -> torch.Tensor:
    """Causal MLA self-attention from the projections' outputs: q [B, T, H, Dn + Dr], kv [B, T, H, Dn + Dv],
    k_rope [B, T, Dr] (before rotation) -> per-head outputs [B, T, H * Dv]."""
    B, T, H, _ = q.shape
    cos, sin = (t.expand(B, T, -1).contiguous() for t in (rope.cos, rope.sin))
    dtype = compute_dtype(q)
    Q, K, V = _MLAQueryKeyValue.apply(q, kv, k_rope, cos, sin, nope_dim, rope.interleaved, dtype)
    out = _CausalAttention.apply(Q, K, V, scale, dtype)  # [B H, T, Dv]
    return out.view(B, H, T, -1).transpose(1, 2).reshape(B, T, -1)


def batched_attention_fits(batch_heads: int, T: int, dtype: torch.dtype) -> bool:
    return batch_heads * T * T * dtype.itemsize <= ATTENTION_SCORE_BYTES


def causal_attention(q, k, v, scale: float) -> torch.Tensor:
    """q, k [B, T, H, D], v [B, T, H, Dv] -> [B, T, H, Dv]: causal self-attention over each sequence."""
    B, T, H, _ = q.shape
    def heads_first(t):
        return t.transpose(1, 2).reshape(B * H, T, t.shape[-1])
    out = _CausalAttention.apply(heads_first(q), heads_first(k), heads_first(v), scale, compute_dtype(q))
    return out.view(B, H, T, -1).transpose(1, 2)


# ---- LM head + cross-entropy ----

class _LinearCrossEntropy(torch.autograd.Function):
    """sum_r w_r * CE(hidden_r @ W^T, y_r) with the gradient formed in the forward, chunk by chunk of rows.

    The gradients are kept for the backward, which only scales them (in place: one backward per forward)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weight, dtype):
        k = train_kernels()
        shape = hidden.shape
        hb = _as(hidden, dtype).reshape(-1, shape[-1])
        wb = _as(weight.detach(), dtype)
        R, V = hb.shape[0], wb.shape[0]
        y = targets.reshape(-1)
        rw = row_weight.reshape(-1).float() if row_weight is not None else None
        d_hidden = torch.empty_like(hb)
        d_weight = None
        total = torch.zeros((), dtype=torch.float32)
        rows = max(1, CE_CHUNK_BYTES // (hb.element_size() * V))
        for r0 in range(0, R, rows):
            r1 = min(R, r0 + rows)
            logits = torch.mm(hb[r0:r1], wb.t())  # compute dtype, as autocast's lm_head gives; becomes its gradient
            total += k.cross_entropy_forward_backward(logits, y[r0:r1], None if rw is None else rw[r0:r1]).sum()
            torch.mm(logits, wb, out=d_hidden[r0:r1])
            part = torch.mm(logits.t(), hb[r0:r1])
            # One chunk: the product in the compute dtype, as autocast's weight gradient is; several: summed in
            # float32.
            d_weight = part if d_weight is None else (d_weight.float() if d_weight.dtype != torch.float32
                                                      else d_weight).add_(part)
        if d_weight is None:  # no rows
            d_weight = torch.zeros_like(wb)
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.shape = shape
        ctx.consumed = False
        return total

    @staticmethod
    def backward(ctx, grad):
        if ctx.consumed:
            raise RuntimeError("linear_cross_entropy: one backward per forward (retain_graph is not supported)")
        ctx.consumed = True
        d_hidden, d_weight = ctx.saved_tensors
        return d_hidden.mul_(grad).view(ctx.shape), d_weight.mul_(grad), None, None, None


def linear_cross_entropy(hidden, weight, targets, row_weight=None) -> torch.Tensor:
    """Summed (row-weighted) cross-entropy of the logits hidden @ weight^T against targets; targets < 0 count
    as ignored. hidden [..., H], targets and row_weight [...]."""
    return _LinearCrossEntropy.apply(hidden, weight, targets, row_weight, compute_dtype(hidden))


# ---- log-probabilities of chosen tokens ----

class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, dtype):
        hb, wb = _as(hidden, dtype).contiguous(), _as(weight.detach(), dtype)
        logits = torch.mm(hb, wb.t())  # compute dtype, as autocast's lm_head gives
        logp, entropy, lse = train_kernels().token_logprobs_forward(logits, targets, 1.0 / temperature)
        ctx.save_for_backward(hb, wb, logits, lse, targets)
        ctx.inv_temperature = 1.0 / temperature
        ctx.mark_non_differentiable(entropy)
        ctx.consumed = False
        return logp, entropy

    @staticmethod
    def backward(ctx, dlogp, _dentropy):
        if ctx.consumed:
            raise RuntimeError("token_logprobs: one backward per forward (retain_graph is not supported)")
        ctx.consumed = True
        hb, wb, logits, lse, targets = ctx.saved_tensors
        dlogits = train_kernels().token_logprobs_backward(logits, lse, targets, dlogp, ctx.inv_temperature)
        return torch.mm(dlogits, wb), torch.mm(dlogits.t(), hb), None, None, None


def token_logprobs(hidden, weight, targets, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden [R, H] rows, LM head weight [V, H], targets [R] -> (log p(target) [R], entropy [R], both float32) of
    softmax(hidden @ weight^T / temperature); the entropy carries no gradient."""
    return _TokenLogprobs.apply(hidden, weight, targets, temperature, compute_dtype(hidden))
