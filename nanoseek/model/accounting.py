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
