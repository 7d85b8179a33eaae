"""DeepSeek-V4 (`model_type: deepseek_v4`), in the names transformers' `save_pretrained` writes (DeepSeek's release
names under `model.`: `layers.N.attn.wq_a`, `ffn.experts.E.w1`, `hc_attn_fn`, `head.weight`, ...).

What differs from V3 (DeepSeek-V4 report, section 2; transformers' modeling_deepseek_v4 is the parity reference):
  * Attention is shared-KV multi-query attention: one 512-wide key per token that is also its value, normalised
    and rotated on its last `qk_rope_head_dim` dims; queries come from a low-rank latent (wq_a, q_norm, wq_b) and
    are RMS-normalised per head without a weight. Each head has a learned sink logit (a key with no value). The
    output is rotated back by the query's angle (the value carried the key's rotation), then projected by groups
    of heads (wo_a, block-diagonal) and mixed (wo_b).
  * Every layer attends to a sliding window of `sliding_window` tokens. Compressed layers also attend to
    compressed entries, one per `m` tokens: a softmax-gated pool of the window's projected tokens (plus a learned
    per-slot bias `ape`), RMS-normalised and rotated at the window's first position. HCA (m = 128) attends to all
    complete entries; CSA (m = 4) pools overlapping windows (each entry also reads the previous window through a
    second projection half) and a lightning indexer, with its own smaller compressor, keeps each query's
    `index_topk` best entries. An entry is visible from the query position that completes it.
  * Residuals are `hc_mult` streams (manifold-constrained hyper-connections): before each block a learned
    projection of the normalised streams gives pre (collapse to the block's input), post (spread its output) and
    comb (mix the streams, Sinkhorn-projected to a doubly stochastic matrix); hc_head collapses them at the end.
  * Every layer is MoE; scores are sqrt(softplus(logits)); the first `hash_moe` layers pick experts by a frozen
    token-id table (`tid2eid`) and weigh them by the learned scores; SwiGLU inputs are clipped at swiglu_limit.
The engine keeps one cache row per token and layer (V4Attention.cache_columns): the token's key, its attention
input (so a window is pooled when its last token arrives, whichever step that is), and an entry in the row of
its window's last token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..config_v4 import CSA, SLIDING
from ..errors import ConfigError
from . import ops
from .indexer import Indexer, index_scores, top_k_mask
from .layers import Linear, RMSNorm, activation
from .moe import Experts, MoE, Router
from .paged import PagedBatch
from .rope import Rope, RotaryEmbedding
from .transformer import Transformer

SCORE_FUNCTIONS = {"sqrtsoftplus": lambda x: F.softplus(x).sqrt(), "sigmoid": torch.sigmoid,
                   "softmax": lambda x: x.softmax(dim=-1)}


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class Compressor(nn.Module):
    """One entry per `ratio` tokens: norm(sum_j softmax_j(wgate(x_j) + ape_j) * wkv(x_j)), rotated at the window's
    first position. With `overlap` (CSA) the projections are twice as wide: the first half of window w-1 and the
    second half of window w pool together into entry w (window 0 has no predecessor)."""

    def __init__(self, config: ModelConfig, ratio: int, head_dim: int, overlap: bool):
        super().__init__()
        width = (2 if overlap else 1) * head_dim
        self.ratio, self.head_dim, self.overlap = ratio, head_dim, overlap
        self.wkv = Linear(config.hidden_size, width, bias=False)
        self.wgate = Linear(config.hidden_size, width, bias=False)
        self.ape = nn.Parameter(torch.empty(ratio, width, dtype=torch.float32))
        self.norm = RMSNorm(head_dim, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rotary: RotaryEmbedding, first_window: int = 0) -> torch.Tensor:
        """x [B, T, hidden], tokens from window `first_window` on -> the entries of its complete windows
        [B, T // ratio, head_dim] (with overlap, the first one lacks its predecessor unless first_window is 0)."""
        B, T, _ = x.shape
        m, d = self.ratio, self.head_dim
        n = T // m
        kv = self.wkv(x[:, : n * m]).unflatten(1, (n, m))
        gate = self.wgate(x[:, : n * m]).unflatten(1, (n, m)) + self.ape
        if self.overlap:
            previous_kv = F.pad(kv[:, :-1, :, :d], (0, 0, 0, 0, 1, 0))
            previous_gate = F.pad(gate[:, :-1, :, :d], (0, 0, 0, 0, 1, 0), value=float("-inf"))
            kv = torch.cat((previous_kv, kv[..., d:]), dim=2)
            gate = torch.cat((previous_gate, gate[..., d:]), dim=2)
        weights = gate.float().softmax(dim=2).to(kv.dtype)
        entries = self.norm((kv * weights).sum(dim=2))
        starts = (first_window + torch.arange(n, device=x.device)) * m
        return rotary(starts.expand(B, n)).rotate_tail(entries.unsqueeze(-2)).squeeze(-2)


class V4Indexer(nn.Module):
    """CSA's lightning indexer: its own compressor at index_head_dim, queries from the attention's query latent,
    score sum_h w_h relu(q_h . k) as in V3.2 (indexer.index_scores); each query keeps its top-k visible entries."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_heads, self.head_dim, self.topk = c.index_n_heads, c.index_head_dim, c.index_topk
        self.compressor = Compressor(c, c.compress_rates[CSA], c.index_head_dim, overlap=True)
        self.wq_b = Linear(c.q_lora_rank, c.index_n_heads * c.index_head_dim, bias=False)
        self.weights_proj = nn.Linear(c.hidden_size, c.index_n_heads, bias=False)  # float32 scoring, never packed
        self.dense = False  # training warm-up: every visible entry (the indexer still learns)
        self.loss: torch.Tensor | None = None  # training: this step's KL, collected by the trainer

    def scores(self, x: torch.Tensor, q_latent: torch.Tensor, rope: Rope, keys: torch.Tensor) -> torch.Tensor:
        """Queries x [B, T, hidden] (q_latent [B, T, q_lora_rank]) against entry keys [B, n, index_head_dim]
        -> index scores [B, T, n] float32."""
        q = rope.rotate_tail(self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.head_dim))).float()
        weights = F.linear(x.float(), self.weights_proj.weight.float()) * self.n_heads ** -0.5
        return index_scores(q, weights, keys, self.head_dim ** -0.5)

    def choose(self, scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """-> [B, T, n] True where a query attends to an entry: its top-k of the `visible` ones (all of them in
        the dense warm-up)."""
        return visible if self.dense else top_k_mask(scores, visible, self.topk)

    def select(self, x, q_latent, rope, keys, visible) -> torch.Tensor:
        return self.choose(self.scores(x, q_latent, rope, keys), visible)

    def learn(self, scores: torch.Tensor, entry_probs: torch.Tensor, chosen: torch.Tensor) -> None:
        """Training, as V3.2's indexer (model/indexer.py): KL from the attention's weights on the chosen entries
        (summed over heads, normalised) to softmax(scores), over queries that see an entry; `scores` come from
        detached inputs, so the loss trains the indexer alone."""
        rows = chosen.any(-1)
        if not rows.any():
            self.loss = scores.sum() * 0.0
            return
        target = entry_probs.detach().float().sum(1)  # [B, T, n]
        target = target / target.sum(-1, keepdim=True).clamp(min=1e-30)
        self.loss = Indexer.distillation_loss(scores[rows], target[rows], chosen[rows])


class GroupedLinear(nn.Module):
    """wo_a: heads split into `groups`, each group projected on its own (a block-diagonal [groups*rank, in] matrix
    stored as one weight)."""

    def __init__(self, in_features: int, rank: int, groups: int):
        super().__init__()
        self.groups, self.rank = groups, rank
        self.weight = nn.Parameter(torch.empty(groups * rank, in_features // groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., groups * rank]."""
        grouped = x.unflatten(-1, (self.groups, -1))
        w = self.weight.to(x.dtype).view(self.groups, self.rank, -1)
        return torch.einsum("...gi,gri->...gr", grouped, w).flatten(-2)


def layer_kind(config: ModelConfig, layer_idx: int) -> str:
    """Layer i's attention; MTP layers (past the list) attend to the window alone, as in DeepSeek's release."""
    return config.layer_types[layer_idx] if layer_idx < len(config.layer_types) else SLIDING


def hash_routed(config: ModelConfig, layer_idx: int) -> bool:
    return layer_idx < len(config.mlp_layer_types) and config.mlp_layer_types[layer_idx] == "hash_moe"


class V4Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        self.kind = layer_kind(c, layer_idx)
        self.n_heads, self.head_dim, self.window, self.eps = (c.num_attention_heads, c.head_dim, c.sliding_window,
                                                              c.rms_norm_eps)
        self.wq_a = Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
        self.wq_b = Linear(c.q_lora_rank, c.num_attention_heads * c.head_dim, bias=False)
        self.wkv = Linear(c.hidden_size, c.head_dim, bias=False)
        self.norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.wo_a = GroupedLinear(c.num_attention_heads * c.head_dim, c.o_lora_rank, c.o_groups)
        self.wo_b = Linear(c.o_groups * c.o_lora_rank, c.hidden_size, bias=False)
        self.attn_sink = nn.Parameter(torch.empty(c.num_attention_heads, dtype=torch.float32))
        self.compressor = self.indexer = None
        if self.kind != SLIDING:
            self.compressor = Compressor(c, c.compress_rates[self.kind], c.head_dim, overlap=self.kind == CSA)
        if self.kind == CSA:
            self.indexer = V4Indexer(c)
        self.columns = self.cache_columns(c)

    @property
    def rope_kind(self) -> str:
        """Window-only layers rotate with the main base, compressed layers with the compressed one."""
        return "main" if self.kind == SLIDING else "compress"

    def forward(self, x: torch.Tensor, positions: torch.Tensor, ropes: dict[str, Rope],
                rotary: RotaryEmbedding, keep: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        rope = ropes[self.rope_kind]
        q_latent = self.q_norm(self.wq_a(x))
        q = unweighted_rms_norm(self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.head_dim)), self.eps)
        q = rope.rotate_tail(q)
        kv = rope.rotate_tail(self.norm(self.wkv(x)).unsqueeze(-2)).squeeze(-2)  # [B, T, D]: key and value
        t = torch.arange(T, device=x.device)
        allowed = (t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < self.window)  # [T, T]
        allowed = allowed.expand(B, T, T)
        if keep is not None:
            allowed = allowed & keep[:, None, :]
        if self.compressor is not None:
            entries = self.compressor(x, rotary)
            # entry w summarises tokens [w m, (w + 1) m): visible from position (w + 1) m - 1 on
            complete = (positions + 1) // self.compressor.ratio
            visible = torch.arange(entries.shape[1], device=x.device) < complete[..., None]
            scores = None
            if self.indexer is not None:
                # Training: scores from detached inputs, so that only the indexer's own loss reaches it.
                xi, qi = (x.detach(), q_latent.detach()) if self.training else (x, q_latent)
                scores = self.indexer.scores(xi, qi, ropes["compress"], self.indexer.compressor(xi, rotary))
                visible = self.indexer.choose(scores.detach(), visible)
            kv = torch.cat((kv, entries), dim=1)
            allowed = torch.cat((allowed, visible), dim=-1)
        if self.training and self.indexer is not None:
            out, probs = sink_attention(q, kv, allowed, self.attn_sink, self.head_dim ** -0.5, return_probs=True)
            self.indexer.learn(scores, probs[..., T:], visible)
        else:
            out = sink_attention(q, kv, allowed, self.attn_sink, self.head_dim ** -0.5)
        out = rope.inverse().rotate_tail(out)
        return self.wo_b(self.wo_a(out.flatten(-2)))

    # ---- engine ----
    def cache_columns(self, config: ModelConfig) -> dict[str, slice]:
        """One cache row per token and layer: [key | attention input | entry | index entry]. The input lets a
        window be pooled once it completes (it may span steps); an entry sits in the row of its window's last
        token. Everything is a function of the token's prefix, so prefix caching and preemption by recompute
        work as for V3."""
        d, h, di = config.head_dim, config.hidden_size, config.index_head_dim
        return {"kv": slice(0, d), "x": slice(d, d + h), "entry": slice(d + h, 2 * d + h),
                "index": slice(2 * d + h, 2 * d + h + di)}

    def forward_paged(self, x: torch.Tensor, positions: torch.Tensor, ropes: dict[str, Rope],
                      rotary: RotaryEmbedding, cache: torch.Tensor, slot_mapping: torch.Tensor,
                      views: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """x [N, hidden] rows of the engine step; `views`: per sequence, (its rows, its context slots, the new
        rows' last)."""
        rope = ropes[self.rope_kind]
        col = self.columns
        q_latent = self.q_norm(self.wq_a(x))
        q = rope.rotate_tail(unweighted_rms_norm(self.wq_b(q_latent).unflatten(-1, (self.n_heads, self.head_dim)),
                                                 self.eps))
        kv = rope.rotate_tail(self.norm(self.wkv(x)).unsqueeze(-2)).squeeze(-2)
        cache[slot_mapping, col["kv"]] = kv.to(cache.dtype)
        cache[slot_mapping, col["x"]] = x.to(cache.dtype)
        out = torch.empty_like(q)
        for rows, slots in views:
            S, T = slots.shape[0], rows.shape[0]
            first = S - T  # the new rows are the context's last T positions
            lo = max(0, first - self.window + 1)
            keys = cache[slots[lo:], col["kv"]].to(q.dtype)
            p, k = torch.arange(first, S, device=x.device), torch.arange(lo, S, device=x.device)
            allowed = (k[None, :] <= p[:, None]) & (p[:, None] - k[None, :] < self.window)
            if self.compressor is not None:
                entries, visible = self._paged_entries(x[rows], q_latent[rows], ropes["compress"][rows], rotary,
                                                       cache, slots, first)
                keys, allowed = torch.cat((keys, entries)), torch.cat((allowed, visible), dim=-1)
            out[rows] = sink_attention(q[rows][None], keys[None], allowed[None], self.attn_sink,
                                       self.head_dim ** -0.5)[0]
        out = rope.inverse().rotate_tail(out)
        return self.wo_b(self.wo_a(out.flatten(-2)))

    def _paged_entries(self, x, q_latent, rope, rotary, cache, slots, first):
        """Pools the windows the new rows complete into the cache, then returns the context's entries and which
        each new row attends to ([T, n]; a CSA decode gathers only its top-k entries)."""
        m, col = self.compressor.ratio, self.columns
        S = slots.shape[0]
        n = S // m
        parts = [(self.compressor, "entry")] + ([(self.indexer.compressor, "index")] if self.indexer else [])
        w0 = first // m  # the first window whose last token is new
        for compressor, name in parts:
            if w0 < n:
                start = w0 - 1 if compressor.overlap and w0 > 0 else w0  # with overlap, the predecessor too
                xs = cache[slots[start * m: n * m], col["x"]].to(x.dtype)
                pooled = compressor(xs[None], rotary, first_window=start)[0][w0 - start:]
                cache[slots[torch.arange(w0, n, device=x.device) * m + m - 1], col[name]] = pooled.to(cache.dtype)
        ends = slots[torch.arange(n, device=x.device) * m + m - 1]
        entries = cache[ends, col["entry"]].to(x.dtype)
        p = torch.arange(first, S, device=x.device)
        visible = torch.arange(n, device=x.device)[None, :] < ((p + 1) // m)[:, None]
        if self.indexer is not None:
            keys = cache[ends, col["index"]].to(x.dtype)
            visible = self.indexer.select(x[None], q_latent[None], rope, keys[None], visible[None])[0]
            if visible.shape[0] == 1:  # a decode: attend to the chosen entries only
                chosen = visible[0].nonzero().flatten()
                return entries[chosen], visible[:, chosen]
        return entries, visible


def sink_attention(q: torch.Tensor, kv: torch.Tensor, allowed: torch.Tensor, sinks: torch.Tensor,
                   scale: float, return_probs: bool = False):
    """Multi-query attention whose one key per position is also its value, with a per-head sink logit that takes
    probability mass and adds nothing: q [B, T, H, D], kv [B, S, D], allowed [B, T, S] -> [B, T, H, D] (and the
    weights [B, H, T, S] with `return_probs`)."""
    logits = torch.matmul(q.transpose(1, 2), kv.transpose(-1, -2).unsqueeze(1)).float() * scale  # [B, H, T, S]
    logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
    probs = torch.cat((logits, sink), dim=-1).softmax(dim=-1)[..., :-1]
    out = torch.matmul(probs.to(kv.dtype), kv.unsqueeze(1)).transpose(1, 2)
    return (out, probs) if return_probs else out


class HyperConnection(nn.Module):
    """The mixing weights of one hyper-connection site (parameters `hc_{site}_fn/base/scale` live on the layer,
    as in checkpoints; this holds the arithmetic)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n, self.iters, self.eps, self.norm_eps = (config.hc_mult, config.hc_sinkhorn_iters, config.hc_eps,
                                                       config.rms_norm_eps)

    def weights(self, streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor):
        """streams [..., N, hidden] -> (pre [..., N], post [..., N], comb [..., N, N]) in float32."""
        n = self.n
        mixes = F.linear(unweighted_rms_norm(streams.flatten(-2).float(), self.norm_eps), fn.float())
        pre, post, comb = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = base.float().split([n, n, n * n])
        pre = torch.sigmoid(pre * scale[0] + pre_b) + self.eps
        post = 2 * torch.sigmoid(post * scale[1] + post_b)
        comb = (comb * scale[2] + comb_b).unflatten(-1, (n, n)).softmax(dim=-1) + self.eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)  # Sinkhorn-Knopp: columns, then rows and columns
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.eps)
        return pre, post, comb

    @staticmethod
    def collapse(streams: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        return (pre.unsqueeze(-1) * streams).sum(dim=-2).to(streams.dtype)

    @staticmethod
    def expand(streams: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """Next streams: post spreads the block's output, comb (transposed) mixes the old streams."""
        dtype = streams.dtype
        mixed = torch.matmul(comb.to(dtype).transpose(-1, -2), streams)
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + mixed


class V4Router(Router):
    """`ffn.gate`: weight [E, hidden] float32, and either `bias` (the aux-loss-free balancing bias, selection only)
    or, in hash layers, `tid2eid` [vocab, k] (each token's fixed experts). Weights are the chosen experts' scores,
    normalised, times routed_scaling_factor."""

    def __init__(self, config: ModelConfig, hashed: bool):
        nn.Module.__init__(self)
        c = config
        self.n_experts, self.top_k, self.scaling, self.normalize = (c.n_routed_experts, c.num_experts_per_tok,
                                                                    c.routed_scaling_factor, c.norm_topk_prob)
        self.score = SCORE_FUNCTIONS[c.scoring_func]
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size, dtype=torch.float32))
        self.hashed = hashed
        if hashed:
            self.register_buffer("tid2eid", torch.zeros(c.vocab_size, c.num_experts_per_tok, dtype=torch.long))
            self.bias = None
        else:
            self.register_buffer("bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))
        self.derived = False

    @property
    def e_score_correction_bias(self) -> torch.Tensor | None:  # the name the trainer's balancing update reads
        return self.bias

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None):
        scores = self.score(F.linear(x.float(), self.weight.float()))
        if self.hashed:
            if input_ids is None:
                raise ConfigError("a hash-routed MoE layer needs the tokens' ids")
            indices = self.tid2eid[input_ids]
        else:
            indices = (scores + self.bias).topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices, scores


class ClampedMLP(nn.Module):
    """The shared expert in checkpoint names (w1 gate, w3 up, w2 down), SwiGLU inputs clipped at swiglu_limit."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        H, I = config.hidden_size, config.moe_intermediate_size * config.n_shared_experts
        self.w1, self.w3, self.w2 = Linear(H, I, bias=False), Linear(H, I, bias=False), Linear(I, H, bias=False)
        self.act, self.limit = activation(config.hidden_act), config.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.swiglu_mlp(x, self.w1, self.w3, self.w2, self.act, limit=self.limit)


class V4MoE(MoE):
    def __init__(self, config: ModelConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.gate = V4Router(config, hashed=hash_routed(config, layer_idx))
        self.experts = Experts(config)
        self.shared_experts = ClampedMLP(config) if config.n_shared_experts else None
        self.last_expert_load = None
        self.aux_alpha = 0.0
        self.aux_loss = None


class V4Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        c = config
        n, width = c.hc_mult, (2 + c.hc_mult) * c.hc_mult
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = V4Attention(c, layer_idx)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn_norm.float_output = True  # the router scores in float32
        self.ffn = V4MoE(c, layer_idx)
        for site in ("attn", "ffn"):
            setattr(self, f"hc_{site}_fn", nn.Parameter(torch.empty(width, n * c.hidden_size, dtype=torch.float32)))
            setattr(self, f"hc_{site}_base", nn.Parameter(torch.empty(width, dtype=torch.float32)))
            setattr(self, f"hc_{site}_scale", nn.Parameter(torch.empty(3, dtype=torch.float32)))
        self.hc = HyperConnection(c)

    def _site(self, site: str, streams: torch.Tensor, block) -> torch.Tensor:
        pre, post, comb = self.hc.weights(streams, getattr(self, f"hc_{site}_fn"), getattr(self, f"hc_{site}_base"),
                                          getattr(self, f"hc_{site}_scale"))
        return HyperConnection.expand(streams, block(HyperConnection.collapse(streams, pre)), post, comb)

    def forward(self, streams, input_ids, positions, ropes, rotary, keep):
        streams = self._site("attn", streams,
                             lambda x: self.attn(self.attn_norm(x), positions, ropes, rotary, keep))
        return self._site("ffn", streams, lambda x: self.ffn(self.ffn_norm(x), input_ids))


    def forward_paged(self, streams, input_ids, positions, ropes, rotary, cache, slot_mapping, views):
        streams = self._site("attn", streams, lambda x: self.attn.forward_paged(
            self.attn_norm(x), positions, ropes, rotary, cache, slot_mapping, views))
        return self._site("ffn", streams, lambda x: self.ffn(self.ffn_norm(x), input_ids))


def collapse_streams(streams: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                     config: ModelConfig) -> torch.Tensor:
    """The final collapse of the streams (sigmoid weights, no Sinkhorn): the model's hc_head, and each MTP
    module's own."""
    mixes = F.linear(unweighted_rms_norm(streams.flatten(-2).float(), config.rms_norm_eps), fn.float())
    pre = torch.sigmoid(mixes * scale.float() + base.float()) + config.hc_eps
    return HyperConnection.collapse(streams, pre)


class HyperHead(nn.Module):
    """`model.hc_head`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n = config.hc_mult
        self.config = config
        self.hc_fn = nn.Parameter(torch.empty(n, n * config.hidden_size, dtype=torch.float32))
        self.hc_base = nn.Parameter(torch.empty(n, dtype=torch.float32))
        self.hc_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return collapse_streams(streams, self.hc_fn, self.hc_base, self.hc_scale, self.config)


class V4MTPBlock(V4Block):
    """One MTP depth of DeepSeek-V4 (`mtp.{k}.*` in the release; transformers does not build it): a V4 block
    (window-only attention, learned routing) over streams x = e_proj(enorm(embed(t_{i+k}))) + h_proj(hnorm(h_i)),
    h_i being the main model's streams before its hc_head; its output is collapsed by its own hc_head and norm,
    then the shared LM head."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        c, n = config, config.hc_mult
        self.config = c
        self.e_proj = Linear(c.hidden_size, c.hidden_size, bias=False)
        self.h_proj = Linear(c.hidden_size, c.hidden_size, bias=False)
        self.enorm, self.hnorm, self.norm = (RMSNorm(c.hidden_size, c.rms_norm_eps) for _ in range(3))
        self.hc_head_fn = nn.Parameter(torch.empty(n, n * c.hidden_size, dtype=torch.float32))
        self.hc_head_base = nn.Parameter(torch.empty(n, dtype=torch.float32))
        self.hc_head_scale = nn.Parameter(torch.empty(1, dtype=torch.float32))

    def inputs(self, streams: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        """streams [..., N, hidden] of positions i, embeddings [..., hidden] of tokens i + 1 -> the block's input."""
        return self.e_proj(self.enorm(next_embeds)).unsqueeze(-2) + self.h_proj(self.hnorm(streams))

    def shared_head_norm(self, streams: torch.Tensor) -> torch.Tensor:
        """The state the shared LM head reads (named as V3's MTP norm, which the trainer calls)."""
        return self.norm(collapse_streams(streams, self.hc_head_fn, self.hc_head_base, self.hc_head_scale,
                                          self.config))


class V4Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(V4Block(config, i) for i in range(config.num_hidden_layers))
        self.hc_head = HyperHead(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekV4Transformer(Transformer):
    """The V4 model behind the Transformer interface (loss heads, precision, init and the rest are inherited);
    `lm_head` is `head.weight` in checkpoints; MTP depths are `mtp.{k}` (V4MTPBlock)."""

    backbone_class = V4Backbone
    mtp_class = V4MTPBlock

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        # Training: the main model's last streams, for the MTP depths (mtp_hidden_states) of the same forward.
        self._streams: torch.Tensor | None = None

    def make_rotary(self) -> None:
        """Window-only layers rotate with rope_theta, unscaled; compressed layers (their queries, keys, entries
        and indexer) with compress_rope_theta and the config's rope scaling."""
        self.rotary = RotaryEmbedding(self.config.replace(rope_scaling=None))
        self.compress_rotary = RotaryEmbedding(self.config.replace(rope_theta=self.config.compress_rope_theta))

    def hidden_states(self, input_ids, positions=None, attention_mask=None, absorbed: bool = False,
                      pre_norm: bool = False) -> torch.Tensor:
        keep = None
        if attention_mask is not None:
            keep = attention_mask.bool()
            if not keep[:, 0].all():  # compression windows count from each row's first token
                raise ConfigError("deepseek_v4 batches must not be left-padded: pad on the right")
        if positions is None:
            positions = self.positions_for(input_ids, None)
        ropes = self._ropes(positions)
        x = self.embed(input_ids)
        streams = x.unsqueeze(-2).expand(*x.shape[:-1], self.config.hc_mult, x.shape[-1])
        for layer in self.model.layers:
            streams = layer(streams, input_ids, positions, ropes, self.compress_rotary, keep)
        self._streams = (streams, positions, keep) if len(self.mtp) else None
        x = self.model.hc_head(streams)
        return x if pre_norm else self.model.norm(x)

    def mtp_hidden_states(self, hidden, input_ids, positions=None) -> list[torch.Tensor]:
        """Every MTP depth over the sequence of the last `hidden_states` call (V4's depths read the main model's
        streams, which that call kept; `hidden` is unused). Depth k's rows are positions 0..T-k-1 and predict
        token i+k+1. Returns each depth's output streams (its `shared_head_norm` gives what the head reads)."""
        if self._streams is None:
            raise RuntimeError("mtp_hidden_states follows a hidden_states call of the same batch")
        streams, main_positions, keep = self._streams
        self._streams = None
        T = input_ids.shape[1]
        outs = []
        for k, module in enumerate(self.mtp, start=1):
            pos = main_positions[:, : T - k]
            ropes = {"main": self.rotary(pos), "compress": self.compress_rotary(pos)}
            streams = module(module.inputs(streams[:, : T - k], self.embed(input_ids[:, k:])), input_ids[:, k:],
                             pos, ropes, self.compress_rotary, None if keep is None else keep[:, k:])
            outs.append(streams)
        return outs

    def mtp_logits(self, hidden, input_ids, positions=None) -> list[torch.Tensor]:
        states = self.mtp_hidden_states(hidden, input_ids, positions)
        return [self.lm_head(m.shared_head_norm(s)) for m, s in zip(self.mtp, states)]

    def forward_paged(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list[torch.Tensor],
                      batch: PagedBatch, return_hidden: bool = False):
        """The engine's forward (Transformer.forward_paged's contract). Attention runs per sequence over the
        window's keys and the compressed entries read from the cache (V4Attention.forward_paged)."""
        views, ropes = self._paged_views(batch, input_ids.device), self._ropes(positions)
        x = self.embed(input_ids)
        streams = x.unsqueeze(-2).expand(*x.shape[:-1], self.config.hc_mult, x.shape[-1])
        for layer, cache in zip(self.model.layers, caches):
            streams = layer.forward_paged(streams, input_ids, positions, ropes, self.compress_rotary, cache,
                                          batch.slot_mapping, views)
        logits = self.lm_head(self.model.norm(self.model.hc_head(streams[batch.logits_rows])))
        return (logits, streams) if return_hidden else logits  # what MTP drafts from: the streams

    def mtp_forward_paged(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
                          cache: torch.Tensor, batch: PagedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformer.mtp_forward_paged's contract, with streams [N, hc_mult, hidden] for hidden states."""
        module = self.mtp[0]
        x = module.inputs(hidden, self.embed(next_ids))
        streams = module.forward_paged(x, next_ids, positions, self._ropes(positions), self.compress_rotary, cache,
                                       batch.slot_mapping, self._paged_views(batch, next_ids.device))
        return streams, self.lm_head(module.shared_head_norm(streams[batch.logits_rows]))

    def _ropes(self, positions: torch.Tensor) -> dict[str, Rope]:
        return {"main": self.rotary(positions), "compress": self.compress_rotary(positions)}

    @staticmethod
    def _paged_views(batch: PagedBatch, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sequence of the step: (its rows, its context slots), the new rows last in the context."""
        views = [(torch.arange(span.start, span.end, device=device), span.context_slots) for span in batch.prefills]
        if batch.decode_rows is not None:
            for row, slots, length in zip(batch.decode_rows, batch.decode_slots, batch.decode_lengths.tolist()):
                views.append((row.view(1), slots[:length]))
        return views

    def kv_cache_shape(self) -> tuple[int, ...]:
        """Per-slot width: the widest layer's row (V4Attention.cache_columns)."""
        columns = self.model.layers[0].attn.columns
        width = columns["index"].stop if CSA in self.config.layer_types else columns["entry"].stop
        return (width,)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Transformer.init_weights, then V4's own: unit hyper-connection scales, zero compressor slot biases
        (`ape`), and a random hash table giving each token `k` distinct experts."""
        super().init_weights(std, generator)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("_scale"):
                    p.fill_(1.0)
                elif name.endswith(".ape"):
                    p.zero_()
            for module in self.modules():
                if isinstance(module, V4Router) and not module.hashed:
                    module.bias.zero_()
                elif isinstance(module, V4Router):
                    E, k = module.n_experts, module.top_k
                    table = torch.rand(module.tid2eid.shape[0], E, generator=generator).argsort(dim=-1)[:, :k]
                    module.tid2eid.copy_(table)
