"""The decoder-only Transformer for every supported architecture, plus DeepSeek-V3's MTP modules.

Module names mirror the Hugging Face checkpoints (`model.layers.N.self_attn.kv_b_proj`, ...), so loading and
saving is a name-for-name copy except for two things checkpoint.py translates: routed experts (stored
stacked here) and MTP modules (stored as extra layers `model.layers.{L+k}` in checkpoints).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import ops
from .attention import GQAttention, MLAttention
from .layers import MLP, Linear, RMSNorm
from .moe import MoE
from .paged import PagedBatch
from .rope import RotaryEmbedding


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config) if config.is_mla else GQAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = MoE(config)
            self.post_attention_layernorm.float_output = True  # the router scores in float32
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)

    def forward(self, x, rope, mask=None, absorbed: bool = False):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, absorbed)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_paged(self, x, rope, cache, batch: PagedBatch):
        x = x + self.self_attn.forward_paged(self.input_layernorm(x), rope, cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """One Multi-Token Prediction depth (DeepSeek-V3 report, eq. 21-23).

    h' = eh_proj([enorm(embed(t_{i+k})) ; hnorm(h_i^{k-1})]) -- embedding half first, as vLLM and transformers'
    MtpModel read the checkpoints, although eq. 21 writes the other order -- then one decoder block; logits come
    from the shared head after `shared_head.norm`. Embedding and head are the main model's.
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = DecoderLayer(config, layer_idx)
        self.shared_head_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden, next_embeds, rope, mask=None):
        x = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))
        return self.block(x, rope, mask)


class Backbone(nn.Module):
    """Named `model` in checkpoints: embed_tokens, layers, norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def causal_padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] 1/0 keep-mask -> bool [B, 1, T, T] causal mask that also hides padding keys.

    A fully padded query row would softmax over nothing (NaN); such rows attend to themselves instead, their
    outputs are padding anyway.
    """
    B, T = attention_mask.shape
    keep = attention_mask.bool()
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal & keep[:, None, None, :]
    eye = torch.eye(T, dtype=torch.bool, device=attention_mask.device)
    return mask | (eye & ~mask.any(-1, keepdim=True))


class Transformer(nn.Module):
    # The architecture's parts (DeepSeek-V4's model class swaps in its own: model/v4.py).
    backbone_class = Backbone
    mtp_class = MTPModule

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = self.backbone_class(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        L = config.num_hidden_layers
        self.mtp = nn.ModuleList(self.mtp_class(config, L + k) for k in range(config.num_nextn_predict_layers))
        self.make_rotary()
        # Activations' dtype when it differs from the weights' (bf16 weights computed in float32 on a CPU
        # without native bf16: runtime.inference_precision); None: the weights' own.
        self.activation_dtype: torch.dtype | None = None

    def make_rotary(self) -> None:
        """(Re)builds the rotary tables, which checkpoints do not hold."""
        self.rotary = RotaryEmbedding(self.config)

    # ---- helpers ----
    def positions_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        # Left padding shifts positions so each sequence's first real token is position 0.
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def hidden_states(self, input_ids, positions=None, attention_mask=None, absorbed: bool = False,
                      pre_norm: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> final hidden states [B, T, hidden] (after the final norm unless pre_norm)."""
        if positions is None:
            positions = self.positions_for(input_ids, attention_mask)
        mask = None if attention_mask is None else causal_padding_mask(attention_mask)
        rope = self.rotary(positions)
        x = self.embed(input_ids)
        for layer in self.model.layers:
            x = layer(x, rope, mask, absorbed)
        return x if pre_norm else self.model.norm(x)

    def forward(self, input_ids, positions=None, attention_mask=None, absorbed: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, vocab]."""
        return self.lm_head(self.hidden_states(input_ids, positions, attention_mask, absorbed))

    def forward_paged(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[torch.Tensor],
                      batch: PagedBatch, return_hidden: bool = False):
        """Engine forward over N flattened tokens ([N] ids and positions) with a paged cache per layer.
        Returns logits [M, vocab] for `batch.logits_rows` only (a prefill needs just its last row's); with
        `return_hidden`, also every row's final (normed) hidden state [N, hidden], what MTP drafts from."""
        rope = self.rotary(positions)
        x = self.embed(input_ids)
        for layer, cache in zip(self.model.layers, caches):
            x = layer.forward_paged(x, rope, cache, batch)
        if return_hidden:
            hidden = self.model.norm(x)
            return self.lm_head(hidden[batch.logits_rows]), hidden
        return self.lm_head(self.model.norm(x[batch.logits_rows]))

    def mtp_forward_paged(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                          cache: torch.Tensor, batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The first MTP depth as a draft model in the engine: row i combines the hidden state of position i
        (the main model's, or this module's own output when drafting further ahead) with the embedding of the
        token at i + 1, writes its K/V at position i of its own paged cache layer, and predicts the token at
        i + 2. Returns (its output states [N, hidden], the pre-norm input of a further draft step; logits
        [M, vocab] for `batch.logits_rows`)."""
        module = self.mtp[0]
        x = module.eh_proj(torch.cat((module.enorm(self.embed(next_ids)), module.hnorm(hidden)), dim=-1))
        h = module.block.forward_paged(x, self.rotary(positions), cache, batch)
        return h, self.lm_head(module.shared_head_norm(h[batch.logits_rows]))

    # ---- training heads (fused with the LM head in CPU training: model/kernels/training.py) ----
    def summed_loss(self, hidden: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Next-token cross-entropy of the LM head over hidden [B, T, H], summed over (masked) positions."""
        return ops.summed_cross_entropy(hidden, self.lm_head, targets, mask, training=self.training)

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor,
                       temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [R, H] rows, targets [R] -> (log p(target), entropy) under softmax(LM head / temperature)."""
        return ops.token_logprobs(hidden, self.lm_head, targets, temperature, training=self.training)

    def set_precision(self, weights: torch.dtype, compute: torch.dtype | None = None) -> "Transformer":
        """Stores the weights in `weights` and computes in `compute` (default: the same); returns self."""
        self.to(weights)
        self.activation_dtype = None if compute in (None, weights) else compute
        return self

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        return x if self.activation_dtype is None else x.to(self.activation_dtype)

    def kv_cache_shape(self) -> tuple[int, ...]:
        """Per-slot shape of one layer's cache: MLA holds [c_kv | k_r] (V3.2: [c_kv | k_r | index key]); GQA
        holds K and V per KV head."""
        c = self.config
        if c.is_mla:  # V3.2: the indexer's key after the latent
            return (c.kv_lora_rank + c.qk_rope_head_dim + (c.index_head_dim if c.has_indexer else 0),)
        return (2, c.num_key_value_heads, c.head_dim)

    def mtp_hidden_states(self, hidden, input_ids, positions=None) -> list[torch.Tensor]:
        """Runs every MTP depth over a full sequence.

        hidden [B, T, hidden] are the main model's final (normed) hidden states. Depth k combines h_i with the
        embedding of token i+k and predicts token i+k+1, so its output is [B, T-k, hidden] aligned with
        positions 0..T-k-1. Returns the pre-`shared_head.norm` states of every depth.
        """
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        outs = []
        h = hidden
        for k, module in enumerate(self.mtp, start=1):
            h = h[:, : T - k]
            embeds = self.embed(input_ids[:, k:])
            h = module(h, embeds, self.rotary(positions[:, : T - k]))
            outs.append(h)
        return outs

    def mtp_logits(self, hidden, input_ids, positions=None) -> list[torch.Tensor]:
        """Logits of every MTP depth; depth k's row i predicts token i+k+1."""
        states = self.mtp_hidden_states(hidden, input_ids, positions)
        return [self.lm_head(m.shared_head_norm(h)) for m, h in zip(self.mtp, states)]

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self.model.embed_tokens.weight.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' dtype."""
        return self.activation_dtype or self.dtype

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Fresh random weights for training from scratch: normal(0, std) matrices, unit norms (RMSNorm, and
        V3.2's indexer LayerNorm: a zero scale would make every index key 0 and the indexer's ReLU dead), zero
        biases."""
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std, generator=generator)
                else:
                    p.zero_()
            for module in self.modules():
                if isinstance(module, (RMSNorm, nn.LayerNorm)):
                    module.weight.fill_(1.0)
        for buf_name, buf in self.named_buffers():
            if buf_name.endswith("e_score_correction_bias"):
                buf.zero_()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=ignore_index)
