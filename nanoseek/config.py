"""ModelConfig: one dataclass for the DeepSeek family and its dense students, <-> HF config.json.

Supported `model_type`s: deepseek_v3, deepseek_v2 (MLA + DeepSeekMoE), deepseek_v32 (V3 + DeepSeek Sparse
Attention's lightning indexer), deepseek_v4 (compressed shared-KV attention, hyper-connections, hash routing:
model/v4.py) and llama, qwen2 (GQA + dense MLP, the students of the R1-Distill family). Field names are the HF ones, so a config round-trips; keys we do not
model are kept in `extra` and written back unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

MLA_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "deepseek_v32")
DENSE_MODEL_TYPES = ("llama", "qwen2")
V4_MODEL_TYPE = "deepseek_v4"
SUPPORTED_MODEL_TYPES = MLA_MODEL_TYPES + (V4_MODEL_TYPE,) + DENSE_MODEL_TYPES
V4_SCORING = ("sqrtsoftplus", "sigmoid", "softmax")
V4_FIELDS = {"o_groups", "o_lora_rank", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "sliding_window", "compress_rates",
             "compress_rope_theta", "layer_types", "mlp_layer_types", "swiglu_limit"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

_ARCHITECTURES = {
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v32": "DeepseekV32ForCausalLM",
    "deepseek_v4": "DeepseekV4ForCausalLM",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}

# HF keys that describe the file, not the model; never copied into `extra`.
_DERIVED_KEYS = {"architectures", "transformers_version", "qk_head_dim", "_name_or_path", "rope_parameters", "rope_scaling", "rope_theta"}


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None  # GQA only; defaults to hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "yarn"|"llama3"|"linear", ...}; None = plain rotary
    rope_interleave: bool = True  # DeepSeek pairs rotary dims (x[2i], x[2i+1]); llama/qwen2 split halves
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2 always has q/k/v bias, see `qkv_bias`
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # --- MLA ---
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # --- DeepSeekMoE ---
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int = 1407
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str = "greedy"  # V2: greedy | group_limited_greedy; V3: noaux_tc
    scoring_func: str = "softmax"  # V2: softmax; V3: sigmoid
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0
    # --- MTP ---
    num_nextn_predict_layers: int = 0
    # --- DeepSeek Sparse Attention (V3.2): the lightning indexer picks each query's top-k context tokens ---
    index_topk: int = 2048
    index_head_dim: int = 128
    index_n_heads: int = 64
    # --- DeepSeek-V4 (head_dim, q_lora_rank, qk_rope_head_dim and the index_* fields above are shared) ---
    o_groups: int = 8  # grouped low-rank output projection: head groups ...
    o_lora_rank: int = 1024  # ... and each group's rank
    hc_mult: int = 4  # hyper-connection residual streams
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    sliding_window: int = 128
    compress_rates: dict | None = None  # {layer type: tokens per compressed entry}
    compress_rope_theta: float = 160000.0  # the compressed layers' rotary base (rope_scaling applies to it)
    layer_types: list | None = None  # per layer: sliding_attention | compressed_sparse_attention | heavily_...
    mlp_layer_types: list | None = None  # per layer: hash_moe | moe
    swiglu_limit: float = 10.0
    # Unmodelled HF keys, written back unchanged.
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {self.model_type!r}: nanoseek supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.model_type in DENSE_MODEL_TYPES:
            self.rope_interleave = False
            if self.head_dim is None:
                self.head_dim = self.hidden_size // self.num_attention_heads
            if self.num_attention_heads % self.num_key_value_heads:
                raise ConfigError(
                    f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                    f"num_key_value_heads ({self.num_key_value_heads})"
                )
        if self.is_v4:
            self._check_v4()
        if self.model_type in ("deepseek_v2", "deepseek_v32"):
            self.rope_interleave = True  # V2 and V3.2 checkpoints are always interleaved
        if self.has_indexer:
            if not self.q_lora_rank:
                raise ConfigError("deepseek_v32 needs q_lora_rank: its indexer reads the query's low-rank latent")
            if not self.qk_rope_head_dim <= self.index_head_dim:
                raise ConfigError(f"index_head_dim ({self.index_head_dim}) must hold the rotary dims "
                                  f"(qk_rope_head_dim {self.qk_rope_head_dim})")
            if self.index_topk < 1 or self.index_n_heads < 1:
                raise ConfigError("index_topk and index_n_heads must be at least 1")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ConfigError(
                    f"unsupported rope scaling {rope_type!r}: supported are {', '.join(SUPPORTED_ROPE_TYPES)}"
                )
        if self.is_moe:
            if not self.num_experts_per_tok:
                raise ConfigError("n_routed_experts is set but num_experts_per_tok is not: set both")
            if self.topk_method in ("noaux_tc", "group_limited_greedy"):
                groups = self.n_group or 1
                if self.n_routed_experts % groups:
                    raise ConfigError(f"n_routed_experts ({self.n_routed_experts}) must divide into n_group ({groups})")
                if (self.topk_group or 1) > groups:
                    raise ConfigError(f"topk_group ({self.topk_group}) cannot exceed n_group ({groups})")
            if self.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
                raise ConfigError(
                    f"unsupported topk_method {self.topk_method!r}: use greedy, group_limited_greedy or noaux_tc"
                )
            scorings = V4_SCORING if self.is_v4 else ("softmax", "sigmoid")
            if self.scoring_func not in scorings:
                raise ConfigError(f"unsupported scoring_func {self.scoring_func!r}: use {' or '.join(scorings)}")

    def _check_v4(self) -> None:
        from .config_v4 import CSA, HCA, SLIDING, default_layer_types, default_mlp_layer_types

        n = self.num_hidden_layers
        self.num_key_value_heads = 1
        self.rope_interleave = True
        if self.head_dim is None or not self.q_lora_rank or not self.n_routed_experts:
            raise ConfigError("deepseek_v4 needs head_dim, q_lora_rank and n_routed_experts")
        self.compress_rates = {CSA: 4, HCA: 128, **(self.compress_rates or {})}
        self.layer_types = list((self.layer_types or default_layer_types(n))[:n])
        self.mlp_layer_types = list((self.mlp_layer_types or default_mlp_layer_types(n))[:n])
        if len(self.layer_types) != n or set(self.layer_types) - {SLIDING, CSA, HCA}:
            raise ConfigError(f"layer_types must name {n} layers, each {SLIDING}, {CSA} or {HCA}")
        if len(self.mlp_layer_types) != n or set(self.mlp_layer_types) - {"hash_moe", "moe"}:
            raise ConfigError(f"mlp_layer_types must name {n} layers, each hash_moe or moe")
        if (self.num_attention_heads * self.head_dim) % self.o_groups:
            raise ConfigError(f"o_groups ({self.o_groups}) must divide num_attention_heads * head_dim")
        if not 0 < self.qk_rope_head_dim <= min(self.head_dim, self.index_head_dim) or self.qk_rope_head_dim % 2:
            raise ConfigError("qk_rope_head_dim must be even and at most head_dim and index_head_dim")

    # ---- derived properties ----
    @property
    def is_mla(self) -> bool:
        return self.model_type in MLA_MODEL_TYPES

    @property
    def is_v4(self) -> bool:
        return self.model_type == V4_MODEL_TYPE

    @property
    def has_indexer(self) -> bool:
        """DeepSeek-V3.2: every MLA layer carries a lightning indexer (sparse attention over its top-k keys)."""
        return self.model_type == "deepseek_v32"

    @property
    def is_moe(self) -> bool:
        return (self.is_mla or self.is_v4) and bool(self.n_routed_experts)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        """How many dimensions per head are rotated."""
        return self.qk_rope_head_dim if self.is_mla or self.is_v4 else self.head_dim

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: dense for the first `first_k_dense_replace` layers, then MoE every `moe_layer_freq`."""
        return (
            self.is_moe
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % max(self.moe_layer_freq, 1) == 0
        )

    def softmax_scale(self) -> float:
        """Attention softmax scale; with YaRN it is multiplied by mscale(factor, mscale_all_dim)^2 (DeepSeek)."""
        scale = self.qk_head_dim ** -0.5
        if self.is_mla and self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim", 0)
            factor = self.rope_scaling.get("factor") or 1.0
            if mscale_all_dim and factor > 1:
                m = 0.1 * mscale_all_dim * math.log(factor) + 1.0
                scale *= m * m
        return scale

    # ---- HF config.json ----
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        model_type = d.get("model_type")
        if model_type is None:
            raise ConfigError("config.json has no model_type: is this a Hugging Face model directory?")
        if model_type == V4_MODEL_TYPE:
            return _v4_from_hf(cls, d)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"unsupported model_type {model_type!r}: nanoseek supports {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        # transformers 5 writes `rope_parameters` (theta inside); older files and the hub use rope_scaling + rope_theta.
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        rope = dict(rope)
        theta = rope.pop("rope_theta", None) or d.get("rope_theta") or 10000.0
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope scaling {rope_type!r}: supported are {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        rope_scaling = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        if rope_scaling is not None:
            rope_scaling.pop("type", None)
        # V4's fields mean nothing here (Qwen2's `sliding_window`, say, is its own key): they stay in `extra`.
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta", "rope_scaling"} - V4_FIELDS
        kwargs: dict[str, Any] = {k: d[k] for k in names if k in d}
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            kwargs["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if "dtype" in d and "torch_dtype" not in d:
            kwargs["torch_dtype"] = d["dtype"]
        if model_type == "deepseek_v32":
            _dense_prefix(d, kwargs)
        if model_type in ("deepseek_v3", "deepseek_v32"):
            # The V3 format implies these where older transformers-saved files omit them (V3.2's never has them:
            # its router is V3's).
            kwargs.setdefault("topk_method", "noaux_tc")
            kwargs.setdefault("scoring_func", "sigmoid")
            kwargs.setdefault("n_group", d.get("n_group", 1))
        if model_type in MLA_MODEL_TYPES:
            # The head_dim transformers writes for MLA is the rope dim; ours means the GQA head size.
            kwargs.pop("head_dim", None)
        for k in ("n_group", "topk_group"):
            if kwargs.get(k) is None:
                kwargs.pop(k, None)
        extra = {k: v for k, v in d.items() if k not in names and k not in _DERIVED_KEYS
                 and k not in ("num_mtp_layers", "dtype", "mlp_layer_types", "layer_types")}
        try:
            return cls(rope_theta=float(theta), rope_scaling=rope_scaling, extra=extra, **kwargs)
        except TypeError as e:  # a wrongly typed field
            raise ConfigError(f"invalid config.json: {e}") from None

    def to_hf_dict(self) -> dict:
        d: dict[str, Any] = dict(self.extra)
        d["architectures"] = [_ARCHITECTURES[self.model_type]]
        common = [
            "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings",
            "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id",
        ]
        for k in common:
            d[k] = getattr(self, k)
        if self.torch_dtype:
            d["torch_dtype"] = self.torch_dtype
        if self.is_mla:
            for k in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                      "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size",
                      "first_k_dense_replace", "moe_layer_freq", "n_group", "topk_group", "topk_method",
                      "scoring_func", "norm_topk_prob", "routed_scaling_factor", "num_nextn_predict_layers"):
                d[k] = getattr(self, k)
            if self.model_type == "deepseek_v3":
                d["rope_interleave"] = self.rope_interleave
            if self.has_indexer:
                for k in ("index_topk", "index_head_dim", "index_n_heads"):
                    d[k] = getattr(self, k)
                d["mlp_layer_types"] = ["sparse" if self.is_moe_layer(i) else "dense"
                                        for i in range(self.num_hidden_layers)]
        elif self.is_v4:
            return self._v4_to_hf(d)
        else:
            d["head_dim"] = self.head_dim
            d["mlp_bias"] = self.mlp_bias
        # Both spellings: transformers 5 reads rope_parameters, older readers (vLLM, llama.cpp) rope_scaling.
        d["rope_theta"] = self.rope_theta
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        if self.rope_scaling:
            d["rope_scaling"]["type"] = self.rope_type
        d["rope_parameters"] = {"rope_type": self.rope_type, "rope_theta": self.rope_theta, **(self.rope_scaling or {})}
        return d

    def _v4_to_hf(self, d: dict) -> dict:
        for k in ("head_dim", "q_lora_rank", "qk_rope_head_dim", "n_routed_experts", "n_shared_experts",
                  "num_experts_per_tok", "moe_intermediate_size", "scoring_func", "norm_topk_prob",
                  "routed_scaling_factor", "num_nextn_predict_layers", "index_topk", "index_head_dim", "index_n_heads",
                  "o_groups", "o_lora_rank", "hc_mult", "hc_sinkhorn_iters", "hc_eps", "sliding_window",
                  "compress_rope_theta", "swiglu_limit", "rope_theta"):
            d[k] = getattr(self, k)
        d["num_key_value_heads"] = 1
        d["partial_rotary_factor"] = self.qk_rope_head_dim / self.head_dim
        d["compress_rates"] = dict(self.compress_rates)
        d["layer_types"], d["mlp_layer_types"] = list(self.layer_types), list(self.mlp_layer_types)
        d.pop("intermediate_size", None)
        factor = {"partial_rotary_factor": d["partial_rotary_factor"]}
        d["rope_parameters"] = {
            "main": {"rope_type": "default", "rope_theta": self.rope_theta, **factor},
            "compress": {"rope_type": self.rope_type, **(self.rope_scaling or {}),
                         "rope_theta": self.compress_rope_theta, **factor}}
        return d

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        if str(path).endswith(".gguf"):
            from .checkpoint import model_directory

            path = model_directory(path)
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise ConfigError(f"no config.json at {path}: pass a Hugging Face model directory or a config.json file")
        try:
            d = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{file} is not valid JSON ({e})") from None
        return cls.from_hf_dict(d)

    def save(self, directory: str | Path) -> None:
        Path(directory, "config.json").write_text(json.dumps(self.to_hf_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _v4_from_hf(cls, d: dict) -> ModelConfig:
    """DeepSeek-V4's config.json in either spelling (transformers': layer_types, rope_parameters {main, compress};
    DeepSeek's release: compress_ratios, num_hash_layers, rope_scaling for the compressed layers)."""
    from .config_v4 import DeepseekV4Config

    spelled = DeepseekV4Config.from_hf_dict(d)
    rope = d.get("rope_parameters") or {}
    compress = dict(rope.get("compress") or d.get("rope_scaling") or {})
    main_theta = (rope.get("main") or {}).get("rope_theta") or d.get("rope_theta") or 10000.0
    compress_theta = compress.pop("rope_theta", None) or d.get("compress_rope_theta") or 160000.0
    rope_type = compress.pop("rope_type", None) or compress.pop("type", None) or "default"
    compress.pop("partial_rotary_factor", None)
    compress.pop("type", None)
    compress["rope_type"] = rope_type
    if rope_type == "yarn":  # V4 scales no amplitude into cos/sin (transformers' default for it)
        compress.setdefault("attention_factor", 1.0)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"unsupported rope scaling {rope_type!r}: supported are {', '.join(SUPPORTED_ROPE_TYPES)}")
    head_dim = d.get("head_dim", 512)
    rope_dim = d.get("qk_rope_head_dim") or int(head_dim * (d.get("partial_rotary_factor") or 64 / 512))
    names = {f.name for f in dataclasses.fields(cls)} - {"extra", "rope_theta", "rope_scaling", "layer_types",
                                                         "mlp_layer_types", "compress_rates", "qk_rope_head_dim",
                                                         "intermediate_size", "compress_rope_theta"}
    kwargs: dict[str, Any] = {k: d[k] for k in names if k in d}
    if "dtype" in d and "torch_dtype" not in d:
        kwargs["torch_dtype"] = d["dtype"]
    kwargs.setdefault("scoring_func", "sqrtsoftplus")
    kwargs.setdefault("norm_topk_prob", True)
    kwargs.setdefault("routed_scaling_factor", 1.5)
    consumed = set(names) | {"rope_parameters", "rope_scaling", "layer_types", "mlp_layer_types", "compress_rates",
                             "compress_ratios", "num_hash_layers", "compress_rate_csa", "compress_rate_hca",
                             "partial_rotary_factor", "dtype", "qk_rope_head_dim", "intermediate_size"}
    extra = {k: v for k, v in d.items() if k not in consumed and k not in _DERIVED_KEYS}
    try:
        return cls(rope_theta=float(main_theta), compress_rope_theta=float(compress_theta),
                   rope_scaling=None if rope_type == "default" else compress, qk_rope_head_dim=rope_dim,
                   layer_types=spelled.layer_types[:spelled.num_hidden_layers], mlp_layer_types=spelled.mlp_layer_types,
                   compress_rates=dict(spelled.compress_rates), extra=extra, **kwargs)
    except TypeError as e:
        raise ConfigError(f"invalid config.json: {e}") from None


def _dense_prefix(d: dict, kwargs: dict) -> None:
    """V3.2 names each layer's MLP (`mlp_layer_types`); nanoseek's rule is DeepSeek's: a dense prefix of
    `first_k_dense_replace` layers, then MoE in every layer."""
    types = d.get("mlp_layer_types")
    if types is None:
        return
    dense = types.index("sparse") if "sparse" in types else len(types)
    if any(t != "sparse" for t in types[dense:]) or any(t != "dense" for t in types[:dense]):
        raise ConfigError(f"mlp_layer_types {types}: nanoseek supports a dense prefix followed by MoE layers only")
    kwargs["first_k_dense_replace"] = dense
    kwargs["moe_layer_freq"] = 1
