"""DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2), in checkpoint names.

Each MLA layer scores every query against every context token cheaply, and attention then runs over the
query's `index_topk` best tokens only:
    q_i  = wq_b(q_latent)                  [H_i, D_i]   (q_latent: MLA's q_a_layernorm(q_a_proj(x)))
    k    = k_norm(wk(x))                   [D_i]        (one key per token, shared by the indexer's heads)
    w    = weights_proj(x) / sqrt(H_i)     [H_i]
    score(t, s) = sum_h w[t, h] * relu(q_i[t, h] . k[s] / sqrt(D_i))
The first qk_rope_head_dim dims of q_i and k are rotated in the half-split layout (MLA itself rotates
interleaved pairs). DeepSeek's kernels quantize q_i and k to FP8 after a Hadamard rotation; the rotation
preserves dot products and the quantization is a speed measure, so this computes the scores in float32, as
transformers' reference does. The keys are what a cache keeps per token besides MLA's latent.

Training (DeepSeek-V3.2 report, section 2.1): the top-k selection passes no gradient, so the indexer learns from
its own loss, KL(p || softmax(score)), where p is the main attention's distribution over the same keys (summed
over heads, normalised) and the indexer's inputs are detached: the loss trains the indexer only, the language
model loss everything else. In a dense warm-up (`dense`) attention sees every allowed key and the indexer learns
to rank all of them; afterwards it learns over the keys it selected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import Linear
from .rope import Rope


class Indexer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.rope_dim = c.index_n_heads, c.index_head_dim, c.qk_rope_head_dim
        self.topk = c.index_topk
        self.wq_b = Linear(c.q_lora_rank, self.n_heads * self.head_dim, bias=False)
        self.wk = Linear(c.hidden_size, self.head_dim, bias=False)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        # A plain nn.Linear: it weighs the heads' votes, so quantization leaves it alone (transformers keeps it
        # in float32 as well), and it is computed in float32.
        self.weights_proj = nn.Linear(c.hidden_size, self.n_heads, bias=False)
        self.scale = self.head_dim ** -0.5
        self.dense = False  # training warm-up: select every allowed key (the indexer still learns)
        self.loss: torch.Tensor | None = None  # training: this step's KL, collected by the trainer

    def _rotate(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        rot, rest = x.split([self.rope_dim, self.head_dim - self.rope_dim], dim=-1)
        return torch.cat((rope.half_split().rotate(rot), rest), dim=-1)

    def keys(self, x: torch.Tensor, rope: Rope) -> torch.Tensor:
        """x [..., T, hidden] -> the tokens' index keys [..., T, D_i] (what the cache stores)."""
        k = self.wk(x)
        # In float32 whatever the weights are stored in: bf16 weights under float32 compute (the policy on a CPU
        # without native bf16) would otherwise meet float32 activations in nn.LayerNorm, which refuses mixed dtypes.
        norm = self.k_norm
        k = F.layer_norm(k.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).to(k.dtype)
        return self._rotate(k.unsqueeze(-2), rope).squeeze(-2)

    def query(self, x: torch.Tensor, q_latent: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (queries [..., T, H_i, D_i] float32, head weights [..., T, H_i] float32)."""
        q = self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.head_dim))
        q = self._rotate(q, rope).float()
        weights = F.linear(x.float(), self.weights_proj.weight.float()) * self.n_heads ** -0.5
        return q, weights

    def scores(self, q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """q [B, T, H, D], weights [B, T, H], keys [B, S, D] -> index scores [B, T, S] float32."""
        return index_scores(q, weights, keys, self.scale)

    def score(self, x: torch.Tensor, q_latent: torch.Tensor, rope: Rope, keys: torch.Tensor) -> torch.Tensor:
        """The queries' rows (x, q_latent) against keys [B, S, D_i] -> index scores [B, T, S] float32."""
        return self.scores(*self.query(x, q_latent, rope), keys)

    @staticmethod
    def distillation_loss(scores: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over queries of KL(target || softmax(scores)) over the keys in `mask` ([B, T, S]). The scores
        must come from detached inputs, so that only the indexer's weights get gradients."""
        log_q = scores.masked_fill(~mask, float("-inf")).log_softmax(-1)
        kl = torch.where(mask & (target > 0), target * (target.clamp(min=1e-30).log() - log_q), 0.0)
        return kl.sum(-1).mean()

    def select(self, scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """The attention mask [B, T, S] (True = attend): each query's top-k allowed keys. A query with at
        most k allowed keys keeps all of them."""
        return allowed if self.dense else top_k_mask(scores, allowed, self.topk)

    def top(self, scores: torch.Tensor, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode: (the indices [B, k] of each row's top-k keys, whether each is allowed [B, k]), k = min(topk, S),
        for attention that reads only those keys. scores and allowed are [B, S]."""
        top = best_keys(scores, allowed, self.topk)
        return top, allowed.gather(-1, top)


def index_scores(q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """The lightning indexer's score sum_h w[t, h] * relu(q[t, h] . k[s] * scale), in float32: q [B, T, H, D],
    weights [B, T, H], keys [B, S, D] -> [B, T, S]. V3.2 scores tokens, V4 compressed entries."""
    per_head = torch.matmul(q, keys.float().transpose(-1, -2).unsqueeze(1)) * scale  # [B, T, H, S]
    return torch.matmul(weights.unsqueeze(-2), F.relu(per_head)).squeeze(-2)


def best_keys(scores: torch.Tensor, allowed: torch.Tensor, topk: int) -> torch.Tensor:
    """Indices of each row's min(topk, S) best allowed keys. Equal scores (a key every head's ReLU zeroes scores
    exactly 0) go to the earlier key: a stable sort, so a query picks the same keys whether its row is part of a
    prefill, a decode or a longer sequence (torch.topk's tie order depends on the row)."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    S = scores.shape[-1]
    k = min(topk, S)
    if k < S:  # topk is linear in S where a sort is not; a tie across the cut falls back to the sort
        values, top = scores.topk(k + 1, dim=-1)
        if not (values[..., k - 1] == values[..., k]).any():
            return top[..., :k]
    return scores.sort(dim=-1, descending=True, stable=True).indices[..., :k]


def top_k_mask(scores: torch.Tensor, allowed: torch.Tensor, topk: int) -> torch.Tensor:
    """[B, T, S] True where a key is among its query's top-k allowed keys."""
    if scores.shape[-1] == 0:
        return allowed
    chosen = torch.zeros_like(allowed).scatter_(-1, best_keys(scores, allowed, topk), True)
    return chosen & allowed
