"""DeepSeek-V4's config (`model_type: deepseek_v4`), read from its config.json for `nanoseek inspect`.

V4 is not MLA: every layer is shared-KV multi-query attention over 512-wide heads (partial RoPE, per-head sinks,
a grouped low-rank output projection) with one of three caches: a 128-token sliding window alone, or the window
plus compressed entries, one per 4 tokens (CSA: compressed sparse attention, a lightning indexer picks the top-k
entries) or per 128 tokens (HCA: heavily compressed attention, all entries attended). Residuals are 4
manifold-constrained hyper-connection streams; the first MoE layers route by a token-id hash. nanoseek reads the
config in both spellings, DeepSeek's release (`compress_ratios` per layer, `num_hash_layers`) and transformers'
(`layer_types`, `mlp_layer_types`, `compress_rates`), and computes what it costs (model/accounting.py); the model
itself is built from a ModelConfig (config.py, model/v4.py), which reads the layer schedule through this.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import ConfigError

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
_RATIO_TO_TYPE = {0: SLIDING, 4: CSA, 128: HCA}


def default_layer_types(n: int) -> list[str]:
    """transformers' default schedule: two HCA layers, then CSA and HCA alternating."""
    return [HCA] * min(n, 2) + [CSA if i % 2 else HCA for i in range(max(n - 2, 0))]


def default_mlp_layer_types(n: int, hashed: int = 3) -> list[str]:
    """The first `hashed` layers route by token-id hash, the rest by learned scores."""
    return ["hash_moe"] * min(n, hashed) + ["moe"] * max(0, n - hashed)


@dataclass
class DeepseekV4Config:
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 43
    num_attention_heads: int = 64
    head_dim: int = 512
    q_lora_rank: int = 1024
    qk_rope_head_dim: int = 64
    o_groups: int = 8
    o_lora_rank: int = 1024
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 6
    hc_mult: int = 4
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    sliding_window: int = 128
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    compress_rates: dict = field(default_factory=lambda: {CSA: 4, HCA: 128})
    layer_types: list = field(default_factory=list)  # one per layer, then one per MTP layer where known
    mlp_layer_types: list = field(default_factory=list)  # "hash_moe" | "moe" per layer
    model_type: str = "deepseek_v4"

    @classmethod
    def from_hf_dict(cls, d: dict) -> "DeepseekV4Config":
        names = {f for f in cls.__dataclass_fields__} - {"layer_types", "mlp_layer_types", "compress_rates"}
        kwargs = {k: d[k] for k in names if k in d}
        config = cls(**kwargs)
        n = config.num_hidden_layers
        rates = dict(config.compress_rates)
        rates.update(d.get("compress_rates") or {})
        if "compress_rate_csa" in d:
            rates[CSA] = d["compress_rate_csa"]
        if "compress_rate_hca" in d:
            rates[HCA] = d["compress_rate_hca"]
        config.compress_rates = rates
        if d.get("layer_types"):
            types = list(d["layer_types"])
        elif d.get("compress_ratios"):
            by_rate = {0: SLIDING, rates[CSA]: CSA, rates[HCA]: HCA}
            unknown = sorted({r for r in d["compress_ratios"] if r not in by_rate})
            if unknown:
                raise ConfigError(f"compress_ratios {unknown}: V4 layers compress by 0 (window only), "
                                  f"{rates[CSA]} (CSA) or {rates[HCA]} (HCA)")
            types = [by_rate[r] for r in d["compress_ratios"]]
        else:
            types = default_layer_types(n)
        if len(types) < n or any(t not in (SLIDING, CSA, HCA) for t in types):
            raise ConfigError(f"layer_types must name {n} layers from {SLIDING}, {CSA}, {HCA}")
        config.layer_types = types
        mlp_types = d.get("mlp_layer_types") or default_mlp_layer_types(n, d.get("num_hash_layers", 3))
        config.mlp_layer_types = list(mlp_types)[:n]
        return config

    def layer_type(self, i: int) -> str:
        """Layer i's attention (MTP layers past the list: the window alone, as DeepSeek's release has them)."""
        return self.layer_types[i] if i < len(self.layer_types) else SLIDING
