"""What a config costs: parameters (total, active per token, MTP), KV-cache bytes and FLOPs per token.

Computed from the config alone, so a 671B model is inspected without allocating it; a test checks the
totals against an instantiated model's numel. Conventions (DeepSeek's published figures):
  * the input embedding is a lookup, not compute: counted in total, not in active;
  * the output head is compute: active;
  * MTP modules are reported separately and not included in total/active (their embedding and head are the
    main model's).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..config import ModelConfig
from ..config_v4 import DeepseekV4Config


@dataclass
class ModelCost:
    total_params: int
    active_params: int
    embedding_params: int
    mtp_params: int
    kv_cache_bytes_per_token: int
    flops_per_token: int
    flops_context: int

    def as_dict(self) -> dict:
        return asdict(self)


def _attention_params(c: ModelConfig) -> int:
    H = c.hidden_size
    if c.is_mla:
        nh, qk = c.num_attention_heads, c.qk_head_dim
        if c.q_lora_rank:
            q = H * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * nh * qk + (c.q_lora_rank if c.attention_bias else 0)
        else:
            q = H * nh * qk
        kv_a = H * (c.kv_lora_rank + c.qk_rope_head_dim) + (c.kv_lora_rank + c.qk_rope_head_dim) * c.attention_bias
        kv = kv_a + c.kv_lora_rank + c.kv_lora_rank * nh * (c.qk_nope_head_dim + c.v_head_dim)
        o = nh * c.v_head_dim * H + (H if c.attention_bias else 0)
        return q + kv + o + _indexer_params(c)
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    bias = (q_out + 2 * kv_out) if c.qkv_bias else 0
    return H * (q_out + 2 * kv_out) + bias + q_out * H + (H if c.attention_bias else 0)


def _indexer_params(c: ModelConfig) -> int:
    """V3.2's lightning indexer: wq_b, wk, k_norm (LayerNorm: weight and bias) and weights_proj."""
    if not c.has_indexer:
        return 0
    d, h = c.index_head_dim, c.index_n_heads
    return c.q_lora_rank * h * d + c.hidden_size * d + 2 * d + c.hidden_size * h


def _mlp_params(hidden: int, inter: int, bias: bool = False) -> int:
    return 3 * hidden * inter + ((2 * inter + hidden) if bias else 0)


def _layer_params(c: ModelConfig, layer_idx: int) -> tuple[int, int]:
    """(total, active) parameters of one decoder layer."""
    H = c.hidden_size
    base = 2 * H + _attention_params(c)
    if not c.is_moe_layer(layer_idx):
        mlp = _mlp_params(H, c.intermediate_size, c.mlp_bias)
        return base + mlp, base + mlp
    expert = _mlp_params(H, c.moe_intermediate_size)
    shared = (c.n_shared_experts or 0) * expert
    router = c.n_routed_experts * H
    total = base + router + shared + c.n_routed_experts * expert
    active = base + router + shared + c.num_experts_per_tok * expert
    return total, active


def attention_flops_per_token(c: ModelConfig, context: int) -> int:
    """Forward FLOPs of QK^T and PV for one query attending to `context` keys, over all layers. V3.2 attends
    to at most index_topk of them, after its indexer has scored all of them (every head, and the weighted sum)."""
    if c.is_mla:
        per_head = c.qk_head_dim + c.v_head_dim
    else:
        per_head = 2 * c.head_dim
    attended = min(context, c.index_topk) if c.has_indexer else context
    indexer = c.index_n_heads * (c.index_head_dim + 1) * context if c.has_indexer else 0
    return 2 * c.num_hidden_layers * (c.num_attention_heads * per_head * attended + indexer)


def kv_cache_bytes_per_token(c: ModelConfig, bytes_per_element: int = 2) -> int:
    """MLA caches the normed latent and the rotary key (shared by all heads), V3.2 its indexer's key too; GQA
    caches K and V per KV head."""
    per_layer = (c.kv_lora_rank + c.qk_rope_head_dim) if c.is_mla else 2 * c.num_key_value_heads * c.head_dim
    if c.has_indexer:
        per_layer += c.index_head_dim
    return per_layer * c.num_hidden_layers * bytes_per_element


def model_cost(c: ModelConfig, context: int = 4096) -> ModelCost:
    if c.is_v4:
        return v4_cost(DeepseekV4Config.from_hf_dict(c.to_hf_dict()), context)
    H, V = c.hidden_size, c.vocab_size
    embedding = V * H
    head = 0 if c.tie_word_embeddings else V * H
    total, active = embedding + head + H, head + H
    for i in range(c.num_hidden_layers):
        t, a = _layer_params(c, i)
        total += t
        active += a
    mtp = 0
    for k in range(c.num_nextn_predict_layers):
        mtp += 3 * H + 2 * H * H + _layer_params(c, c.num_hidden_layers + k)[0]
    flops = 2 * active + attention_flops_per_token(c, context)
    return ModelCost(total, active, embedding, mtp, kv_cache_bytes_per_token(c), flops, context)


# ---------------------------------------------------------------- DeepSeek-V4 (config_v4.py)
KV_CURVE_CONTEXTS = (4096, 32768, 131072, 1048576)


def _v4_attention_params(c: DeepseekV4Config, kind: str) -> int:
    from ..config_v4 import CSA, HCA

    H, nh, hd, q = c.hidden_size, c.num_attention_heads, c.head_dim, c.q_lora_rank
    # q_a + q_a_norm + q_b, the shared K=V projection + its norm, grouped o_a + o_b, per-head sinks
    p = H * q + q + q * nh * hd + H * hd + hd + nh * hd * c.o_lora_rank + c.o_groups * c.o_lora_rank * H + nh
    if kind == HCA:  # compressor: kv and gate projections, a position bias per window slot, a norm
        p += 2 * H * hd + c.compress_rates[HCA] * hd + hd
    elif kind == CSA:  # two overlapping series (2 x head_dim), plus the lightning indexer's own compressor
        m, ih, ihd = c.compress_rates[CSA], c.index_n_heads, c.index_head_dim
        p += 4 * H * hd + 2 * m * hd + hd
        p += 4 * H * ihd + 2 * m * ihd + ihd + q * ih * ihd + H * ih
    return p


def _v4_layer_params(c: DeepseekV4Config, i: int) -> tuple[int, int]:
    """(total, active) of V4 layer i: attention, MoE (router, shared and routed experts), two norms and the
    attention's and the FFN's hyper-connections (4 streams mixed by a (2 + n) x n map of the n streams)."""
    H, E, inter, n = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size, c.hc_mult
    base = _v4_attention_params(c, c.layer_type(i)) + 2 * H
    base += 2 * ((2 + n) * n * n * H + (2 + n) * n + 3)
    expert = _mlp_params(H, inter)
    shared = E * H + c.n_shared_experts * expert  # the router's weight is read by hash layers too
    return base + shared + E * expert, base + shared + c.num_experts_per_tok * expert


def v4_kv_cache_bytes(c: DeepseekV4Config, context: int, bytes_per_element: int = 2) -> int:
    """One sequence's cache at `context` tokens: every layer's window (up to sliding_window tokens of the
    shared K=V head), plus the compressed entries of CSA layers (with their indexer keys) and HCA layers.
    The few tokens of a compression window not yet closed are left out."""
    from ..config_v4 import CSA, HCA

    total = 0
    for i in range(c.num_hidden_layers):
        kind = c.layer_type(i)
        total += min(context, c.sliding_window) * c.head_dim
        if kind in (CSA, HCA):
            entries = context // c.compress_rates[kind]
            total += entries * (c.head_dim + (c.index_head_dim if kind == CSA else 0))
    return total * bytes_per_element


def v4_attention_flops_per_token(c: DeepseekV4Config, context: int) -> int:
    """Forward attention FLOPs of one query at `context`: q.k and p.v over the 512-wide shared K=V heads for
    the window and the attended compressed entries (CSA: the indexer's top-k of them, after it scored all;
    HCA: all of them)."""
    from ..config_v4 import CSA, HCA

    flops = 0
    for i in range(c.num_hidden_layers):
        kind = c.layer_type(i)
        keys = min(context, c.sliding_window)
        if kind == CSA:
            entries = context // c.compress_rates[CSA]
            keys += min(entries, c.index_topk)
            flops += 2 * c.index_n_heads * (c.index_head_dim + 1) * entries
        elif kind == HCA:
            keys += context // c.compress_rates[HCA]
        flops += 4 * c.num_attention_heads * c.head_dim * keys
    return flops


def v4_cost(c: DeepseekV4Config, context: int = 4096) -> ModelCost:
    """What V4 costs, with DeepSeek's conventions (input embedding in total, not active; MTP apart). The MTP
    layer is counted as V3's layout around a V4 block (the window alone): eh_proj, enorm, hnorm, a norm and its
    own hyper-connection head."""
    H, V, n = c.hidden_size, c.vocab_size, c.hc_mult
    hc_head = n * n * H + n + 1  # mixes the streams back into one before the final norm
    head = 0 if c.tie_word_embeddings else V * H
    total, active = V * H + head + H + hc_head, head + H + hc_head
    for i in range(c.num_hidden_layers):
        t, a = _v4_layer_params(c, i)
        total += t
        active += a
    mtp = sum(_v4_layer_params(c, c.num_hidden_layers + k)[0] + 2 * H * H + 3 * H + hc_head
              for k in range(c.num_nextn_predict_layers))
    flops = 2 * active + v4_attention_flops_per_token(c, context)
    per_token = -(-v4_kv_cache_bytes(c, context) // max(context, 1))
    return ModelCost(total, active, V * H, mtp, per_token, flops, context)
