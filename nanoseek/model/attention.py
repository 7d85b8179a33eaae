"""Attention: DeepSeek's Multi-head Latent Attention (MLA) and grouped-query attention (GQA).

MLA (DeepSeek-V2 paper, section 2.1), in checkpoint names:
    q            = q_b_proj(q_a_layernorm(q_a_proj(x)))   or q_proj(x) without q LoRA   -> [nope | rope] per head
    [c_kv | k_r] = kv_a_proj_with_mqa(x);  c_kv = kv_a_layernorm(c_kv)                   latent + shared rope key
    [k_nope | v] = kv_b_proj(c_kv) per head
Two ways to compute it, which agree to float tolerance:
  * full path: expand every cached latent into per-head K and V, then ordinary attention. Cheapest when many
    queries share the keys (training, prefill).
  * absorbed path: fold kv_b's key half (W_UK) into the query and apply its value half (W_UV) after
    attention, so attention runs directly against the latent cache [c_kv | k_r]. Each decoded token then reads
    only (kv_lora_rank + qk_rope_head_dim) numbers per cached token and layer: the point of MLA.

Masks: `mask` is a bool tensor broadcastable to [B, heads, T, S] (True = may attend), or None for causal
attention over a sequence that is its own context (T == S).

DeepSeek-V3.2 adds a lightning indexer to every MLA layer (model/indexer.py): each query attends only to its
top-k context tokens by the indexer's score. Its per-token keys live in the same cache rows, after the latent:
[c_kv | k_r | index key].
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from . import ops, quant
from .indexer import Indexer
from .layers import Linear, RMSNorm
from .paged import PagedBatch
from .rope import Rope


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads = c.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_lora_rank = c.kv_lora_rank
        self.q_lora_rank = c.q_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        if c.q_lora_rank:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = Linear(c.q_lora_rank, self.n_heads * qk_dim, bias=False)
        else:
            self.q_proj = Linear(c.hidden_size, self.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = Linear(c.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(self.n_heads * self.v_dim, c.hidden_size, bias=c.attention_bias)
        self.scale = c.softmax_scale()
        self.latent_width = c.kv_lora_rank + c.qk_rope_head_dim  # one token's [c_kv | k_r]
        self.indexer = Indexer(c) if c.has_indexer else None
        self.derived: ops.AbsorbedPack | None = None  # inference: the absorbed projections (ops.pack_absorbed)

    # ---- shared first half: project and rotate ----
    def compress(self, x: torch.Tensor, rope: Rope):
        """x [B,T,hidden] -> q_nope [B,T,H,nope], q_rope [B,T,H,rope], latent [B,T,kv_lora], k_rope [B,T,rope],
        and the query's low-rank latent [B,T,q_lora] (None without q LoRA; V3.2's indexer reads it).

        latent and k_rope are exactly what the latent KV cache stores for these tokens.
        """
        B, T, _ = x.shape
        d = self.derived
        kv_width = self.kv_lora_rank + self.rope_dim
        both = None
        if d is not None and d.inputs is not None:
            both = ops.stacked_linear(x, d.inputs[0], self.q_lora_rank + kv_width, d.inputs[1])
        if both is not None:  # decode-sized: q_a and kv_a in one product
            q_a, kv_a = both.split([self.q_lora_rank, kv_width], dim=-1)
        else:
            q_a = self.q_a_proj(x) if self.q_lora_rank else None
            kv_a = self.kv_a_proj_with_mqa(x)
        q_latent = self.q_a_layernorm(q_a) if self.q_lora_rank else None
        q = self.q_b_proj(q_latent) if self.q_lora_rank else self.q_proj(x)
        q = q.view(B, T, self.n_heads, self.nope_dim + self.rope_dim)
        q_nope, q_rope = q.split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        fused = d is not None and d.kernels
        q_rope = ops.rotate_rows(q_rope, rope, fused)
        k_rope = ops.rotate_rows(k_rope.unsqueeze(-2), rope, fused).squeeze(-2)
        return q_nope, q_rope, latent, k_rope, q_latent

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, nope, L] and W_UV^T [H, L, v], the two halves of kv_b_proj per head, as views of the weight
        (training: nothing derived can go stale; inference keeps copies in `derived`)."""
        w = self.kv_b_proj.weight.view(self.n_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        return w[:, : self.nope_dim], w[:, self.nope_dim:].transpose(1, 2)

    def derive(self, plan: ops.Plan | None) -> None:
        inputs = (self.q_a_proj, self.kv_a_proj_with_mqa) if self.q_lora_rank else ()
        self.derived = None if plan is None else ops.pack_absorbed(*self.absorbed_weights(), plan, self._uv_quantized(),
                                                                   inputs)

    def _uv_quantized(self) -> quant.QuantizedWeight | None:
        """W_UV [H, v, L]: the value rows of a quantized kv_b_proj, as integers."""
        qw = quant.quantized_of(self.kv_b_proj)
        if qw is None:
            return None
        rows = (self.n_heads, self.nope_dim + self.v_dim, -1)
        return quant.QuantizedWeight(qw.q.view(rows)[:, self.nope_dim:], qw.scales.view(rows)[:, self.nope_dim:],
                                     qw.bits)

    # ---- second half, two interchangeable ways; `cached` is [B, S, kv_lora + rope] = [c_kv | k_r] ----
    def heads_full(self, q_nope, q_rope, cached, mask):
        """Expand the latents into per-head K/V, then attention. Returns per-head outputs [B, T, H * v]."""
        B, S, _ = cached.shape
        latent, k_rope = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(latent).view(B, S, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rope.unsqueeze(2).expand(B, S, self.n_heads, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        return ops.attention(q, k, v, mask, self.scale, self.training).flatten(2)

    def heads_absorbed(self, q_nope, q_rope, cached, mask):
        """Attention straight against the latent cache. Returns per-head outputs [B, T, H * v].

        score(t, s) = (q_nope W_UK) . c_kv[s] + q_rope . k_r[s] = [q_nope W_UK | q_rope] . cached[s], so this is
        multi-query attention with a single (kv_lora + rope)-wide key head shared by all query heads. Using
        `cached` itself as the value head makes the first kv_lora output columns sum_s p(t, s) c_kv[s]; W_UV
        then maps them back to each head's value space.
        """
        B, T, H, _ = q_nope.shape
        dtype = q_nope.dtype
        w_uk, w_uv_t = self.absorbed_weights()
        q_latent = ops.absorbed_query(q_nope.reshape(B * T, H, -1), self.derived, w_uk)
        q = torch.cat((q_latent.reshape(B, T, H, -1), q_rope.to(q_latent.dtype)), dim=-1)
        out_latent = self._latent_attention(q, cached, mask, dtype)
        out = ops.absorbed_output(out_latent.reshape(B * T, H, -1), self.derived, w_uv_t, dtype)
        return out.reshape(B, T, H * self.v_dim)

    def _latent_attention(self, q, cached, mask, dtype):
        """q [B, T, H, kv_lora + rope] against the latent cache -> [B, T, H, kv_lora]."""
        if q.shape[1] == 1:
            return ops.decode_attention(q[:, 0], cached, None, mask, self.scale, self.kv_lora_rank)[:, None]
        kv = cached.unsqueeze(2)  # [B, S, 1, kv_lora + rope]
        return ops.sdpa(q.to(dtype), kv, kv, mask, self.scale)[..., : self.kv_lora_rank]

    def forward(self, x, rope: Rope, mask=None, absorbed: bool = False):
        B, T, _ = x.shape
        if (mask is None and not absorbed and self.indexer is None and ops.fused_training(x, self.training)
                and ops.training_fits(B * self.n_heads, T, x)):
            return self._forward_fused(x, rope)
        q_nope, q_rope, latent, k_rope, q_latent = self.compress(x, rope)
        cached = torch.cat((latent, k_rope), dim=-1)
        if self.indexer is not None:
            allowed = torch.ones(T, T, dtype=torch.bool, device=x.device).tril() if mask is None else mask
            if self.training:
                # The indexer learns from its KL alone: detached inputs, and float32 even under bf16 autocast (a
                # KL of two rounded distributions can go below 0). The selection itself passes no gradient.
                with torch.autocast(x.device.type, enabled=False):
                    xi, qi = x.detach().float(), q_latent.detach().float()
                    scores = self.indexer.score(xi, qi, rope, self.indexer.keys(xi, rope))
                    mask = self._sparse_mask(scores.detach(), allowed)
                    target = self._attention_distribution(q_nope, q_rope, cached, mask).detach()
                    self.indexer.loss = self.indexer.distillation_loss(scores, target, mask[:, 0])
            else:
                mask = self._sparse_mask(self.indexer.score(x, q_latent, rope, self.indexer.keys(x, rope)), allowed)
        heads = self.heads_absorbed if absorbed else self.heads_full
        return self.o_proj(heads(q_nope, q_rope, cached, mask))

    def _attention_distribution(self, q_nope, q_rope, cached, mask) -> torch.Tensor:
        """The main attention's weights summed over heads and normalised -> [B, T, S]: the indexer's target."""
        B, S, _ = cached.shape
        latent, k_rope = cached.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        k_nope = self.kv_b_proj(latent).view(B, S, self.n_heads, -1)[..., : self.nope_dim]
        logits = (torch.einsum("bthd,bshd->bhts", q_nope.float(), k_nope.float())
                  + torch.einsum("bthd,bsd->bhts", q_rope.float(), k_rope.float())) * self.scale
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1).sum(1)
        return probs / probs.sum(-1, keepdim=True)

    def _sparse_mask(self, scores, allowed) -> torch.Tensor:
        """V3.2: `allowed` ([T, S], or broadcastable to [B, 1, T, S]) narrowed to each query's top-k keys by the
        index scores [B, T, S] -> [B, 1, T, S]."""
        allowed = allowed.reshape(-1, *allowed.shape[-2:]) if allowed.dim() > 2 else allowed[None]
        return self.indexer.select(scores, allowed.expand_as(scores))[:, None]

    def _forward_fused(self, x, rope: Rope):
        """Causal self-attention in CPU training (model/kernels/training.py): the same projections, then queries,
        keys and values assembled and rotated in one pass and attention as batched GEMMs."""
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent))
        heads = ops.mla_training_attention(q.view(B, T, self.n_heads, -1), kv.view(B, T, self.n_heads, -1), k_rope,
                                           rope, self.nope_dim, self.scale)
        return self.o_proj(heads)

    def forward_paged(self, x, rope: Rope, cache: torch.Tensor, batch: PagedBatch):
        """Engine path over N flattened tokens of many sequences. cache: [slots, kv_lora + rope] of this layer.

        New tokens' [c_kv | k_r] are written to their slots first, then each prefill span runs the full path over
        its gathered context and all single-token decodes run the absorbed path together.
        """
        q_nope, q_rope, latent, k_rope, q_latent = (t[0] if t is not None else None
                                                    for t in self.compress(x[None], rope[None]))
        new = [latent, k_rope] + ([self.indexer.keys(x, rope)] if self.indexer is not None else [])
        cache.index_copy_(0, batch.slot_mapping, torch.cat(new, dim=-1).to(cache.dtype))
        if self.indexer is not None:
            return self.o_proj(self._sparse_paged(x, q_nope, q_rope, q_latent, rope, cache, batch))
        if not batch.prefills:  # decoding only: every row is one sequence's token, in order (no scatter)
            return self.o_proj(self._decode(q_nope, q_rope, cache, batch))
        out = x.new_empty(x.shape[0], self.n_heads * self.v_dim)
        for span in batch.prefills:
            rows = slice(span.start, span.end)
            cached = cache[span.context_slots].to(x.dtype)[None]
            out[rows] = self.heads_full(q_nope[rows][None], q_rope[rows][None], cached, span.mask)[0]
        if batch.decode_rows is not None:
            rows = batch.decode_rows
            out[rows] = self._decode(q_nope[rows], q_rope[rows], cache, batch)
        return self.o_proj(out)

    def _sparse_paged(self, x, q_nope, q_rope, q_latent, rope: Rope, cache, batch: PagedBatch):
        """V3.2 in the engine. Prefill spans: the indexer's top-k of each query's causal context as a mask over
        the span's context. Decodes: only each sequence's top-k cached rows are gathered and attended to, so a
        decoded token reads k rows whatever its context length."""
        out = x.new_empty(x.shape[0], self.n_heads * self.v_dim)
        width = self.latent_width
        for span in batch.prefills:
            rows = slice(span.start, span.end)
            context = cache[span.context_slots].to(x.dtype)
            scores = self.indexer.score(x[rows][None], q_latent[rows][None], rope[rows][None], context[None, :, width:])
            mask = self._sparse_mask(scores, span.mask)
            out[rows] = self.heads_full(q_nope[rows][None], q_rope[rows][None], context[None, :, :width], mask)[0]
        if batch.decode_rows is not None:
            rows = batch.decode_rows
            # Only the index keys of the whole context are read; the latent rows only for the chosen k.
            keys = cache[:, width:][batch.decode_slots]  # [B, S, D_i]
            scores = self.indexer.score(x[rows][:, None], q_latent[rows][:, None], rope[rows][:, None], keys)[:, 0]
            top, valid = self.indexer.top(scores, batch.decode_mask[:, 0, 0])
            chosen = cache[:, :width][batch.decode_slots.gather(1, top)].to(x.dtype)  # [B, k, width]
            out[rows] = self.heads_absorbed(q_nope[rows][:, None], q_rope[rows][:, None], chosen,
                                            valid[:, None, None])[:, 0]
        return out

    def _decode(self, q_nope, q_rope, cache, batch: PagedBatch):
        """The absorbed path for B single-token decodes ([B, H, *] queries) -> [B, H * v]: read in place from the
        paged cache where the kernel applies, else over the gathered context rows."""
        if self._decodes_from_cache(cache, batch):
            return self._decode_from_cache(q_nope, q_rope, cache, batch)
        cached = cache[batch.decode_slots].to(q_nope.dtype)
        return self.heads_absorbed(q_nope[:, None], q_rope[:, None], cached, batch.decode_mask)[:, 0]

    def _decodes_from_cache(self, cache, batch: PagedBatch) -> bool:
        """Whether a kernel runs this step's decodes reading the cache in place (an inference plan with the decode
        extension, every ISA), with few sequences or not too many heads. It saves the gather and its float32
        copy (bf16: 2x faster at batch 1; bench/engine.py's 32 sequences of 12 heads 1,088 -> 1,188 tokens/s;
        the speedrun model's 64 of 4 heads 6.5 -> 5.9 ms a step). With very many heads per sequence (V3's 128)
        oneDNN's batched products over the gathered rows are the better kernel."""
        return (self.derived is not None and self.derived.kernels
                and cache.dtype in (torch.bfloat16, torch.float32)
                and cache.is_contiguous() and not torch.is_grad_enabled() and batch.decode_lengths is not None
                and (batch.decode_slots.shape[0] <= 4 or self.n_heads <= 32))

    def _decode_from_cache(self, q_nope, q_rope, cache, batch: PagedBatch):
        """Absorbed decode of B single tokens ([B, H, *] queries) with attention read straight from the paged
        latent cache (no gathered or float32 copy of the context). Returns [B, H * v]."""
        d = self.derived  # the absorbed weights' own copies (no views of kv_b_proj to take each step)
        q = torch.cat((ops.absorbed_query(q_nope, d, d.w_uk), q_rope), dim=-1)
        out_latent = ops.mla_cache_attention(q, cache, batch.decode_slots, batch.decode_lengths, self.scale,
                                             self.kv_lora_rank)
        return ops.absorbed_output(out_latent, d, d.w_uv_t, q_nope.dtype).flatten(1)


class GQAttention(nn.Module):
    """Grouped-query attention of Llama / Qwen2 (q/k/v bias for Qwen2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(c.hidden_size, self.n_heads * self.head_dim, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, self.n_kv_heads * self.head_dim, bias=c.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, c.hidden_size, bias=c.attention_bias)
        self.scale = c.softmax_scale()
        # Inference: q, k and v stacked for the decode kernel (one weight stream, one call) with their biases,
        # and whether the decode kernels (RoPE, attention read from the paged cache) are there.
        self.derived: tuple[object, torch.Tensor | None] | None = None
        self.fused = False

    def derive(self, plan: ops.Plan | None) -> None:
        parts = (self.q_proj, self.k_proj, self.v_proj)
        stacked = ops.stack_linears(parts, plan)
        bias = None if self.q_proj.bias is None else torch.cat([m.bias for m in parts]).detach()
        self.derived = None if stacked is None else (stacked, bias)
        self.fused = plan is not None and plan.fused

    def project(self, x, rope: Rope):
        """x [B,T,hidden] -> q [B,T,H,D], k [B,T,Hkv,D], v [B,T,Hkv,D] (rotated): what a paged K/V cache stores."""
        B, T, _ = x.shape
        q = rope.rotate(self.q_proj(x).view(B, T, self.n_heads, self.head_dim))
        k = rope.rotate(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        return q, k, v

    def _project_rows(self, x, rope: Rope):
        """The engine's projection of N flattened rows: x [N, hidden] -> q [N, H, D], k and v [N, Hkv, D]
        (rotated); decode-sized batches of bf16 or quantized weights in one stacked product, the rotation on the
        decode kernel wherever it is built."""
        widths = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim)
        qkv = None if self.derived is None else ops.stacked_linear(x, self.derived[0], sum(widths), self.derived[1])
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if qkv is None else qkv.split(widths, dim=-1)
        q = ops.rotate_rows(q.view(-1, self.n_heads, self.head_dim), rope, self.fused)
        k = ops.rotate_rows(k.view(-1, self.n_kv_heads, self.head_dim), rope, self.fused)
        return q, k, v.view(-1, self.n_kv_heads, self.head_dim)

    def attend(self, q, k, v, mask):
        return self.o_proj(ops.attention(q, k, v, mask, self.scale, self.training).flatten(2))

    def forward(self, x, rope: Rope, mask=None, absorbed: bool = False):
        q, k, v = self.project(x, rope)
        return self.attend(q, k, v, mask)

    def forward_paged(self, x, rope: Rope, cache: torch.Tensor, batch: PagedBatch):
        """Engine path; cache: [slots, 2, kv_heads, head_dim] (K and V) of this layer."""
        q, k, v = self._project_rows(x, rope)
        cache.index_copy_(0, batch.slot_mapping, torch.stack((k, v), dim=1).to(cache.dtype))
        if not batch.prefills:  # decoding only: every row is one sequence's token, in order (no scatter)
            return self.o_proj(self._decode(q, cache, batch))
        out = x.new_empty(x.shape[0], self.n_heads * self.head_dim)
        for span in batch.prefills:
            rows = slice(span.start, span.end)
            kv = cache[span.context_slots].to(x.dtype)
            out[rows] = ops.sdpa(q[rows][None], kv[None, :, 0], kv[None, :, 1], span.mask, self.scale)[0].flatten(1)
        if batch.decode_rows is not None:
            out[batch.decode_rows] = self._decode(q[batch.decode_rows], cache, batch)
        return self.o_proj(out)

    def _decode(self, q, cache, batch: PagedBatch):
        """B single-token decodes ([B, H, D] queries) -> [B, H * D] in q's dtype: read in place from the paged
        cache where the kernel applies, else over the gathered context."""
        if self._decodes_from_cache(cache, batch):
            heads = ops.gqa_cache_attention(q, cache, batch.decode_slots, batch.decode_lengths, self.scale)
        else:
            kv = cache[batch.decode_slots].to(q.dtype)  # [B, S, 2, kv_heads, head_dim]
            heads = ops.decode_attention(q, kv[:, :, 0], kv[:, :, 1], batch.decode_mask, self.scale)
        return heads.flatten(1).to(q.dtype)

    def _decodes_from_cache(self, cache, batch: PagedBatch) -> bool:
        """Whether the decode kernel reads this step's decodes' K/V in place from the paged cache (inference with
        the kernels, a float32 or bf16 cache): no gathered copy of each context, one call instead of ~10 ops."""
        return (self.fused and cache.dtype in (torch.bfloat16, torch.float32) and cache.is_contiguous()
                and not torch.is_grad_enabled() and batch.decode_lengths is not None)
