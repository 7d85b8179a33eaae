"""DeepSeekMoE: fine-grained routed experts plus always-on shared experts.

Routers, as the checkpoints define them:
  * V3 `noaux_tc`: sigmoid scores; selection on scores + e_score_correction_bias (the aux-loss-free balancing
    bias, used for selection only), limited to the `topk_group` groups whose top-2 biased scores sum highest;
    weights are the unbiased scores of the chosen experts, normalised when `norm_topk_prob`, times
    `routed_scaling_factor`.
  * V2 `greedy` / `group_limited_greedy` (group score = max): softmax scores, normalised only when
    `norm_topk_prob` (transformers ignores that flag; DeepSeek's code honours it).
Experts are computed grouped: token copies are sorted by expert and each expert runs one matmul over its
contiguous slice, never token by token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from . import train_kernels
from .layers import MLP, activation
from .train_kernels import fused_training


@torch.no_grad()
def update_balance_bias(bias: torch.Tensor, load: torch.Tensor, gamma: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing (report, section 2.1.2): after a step, each expert's
    selection bias moves by gamma towards balance, b_i += gamma * sign(mean load - load_i). Overloaded experts
    become less likely to be chosen; the bias never enters the gating weights."""
    bias += gamma * torch.sign(load.float().mean() - load.float()).to(bias.device)


class Router(nn.Module):
    """Named `gate` in checkpoints: `mlp.gate.weight` [E, hidden] (+ `e_score_correction_bias` [E] for V3)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_experts, self.top_k = c.n_routed_experts, c.num_experts_per_tok
        self.n_group, self.topk_group = c.n_group or 1, c.topk_group or 1
        self.method, self.scoring = c.topk_method, c.scoring_func
        self.normalize, self.scaling = c.norm_topk_prob, c.routed_scaling_factor
        # Routing runs in float32 whatever the model dtype (transformers keeps these weights fp32 too).
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size, dtype=torch.float32))
        if self.method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_routed_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        # Set by an inference engine (model/cpu_kernels.py): select experts with the compiled CPU kernel, one
        # call instead of ~10 small ops.
        self.fused_select = False

    def _apply(self, fn, recurse=True):
        # Keep routing parameters in float32 when the model is cast (model.to(bfloat16)).
        super()._apply(fn, recurse)
        self.weight.data = self.weight.data.float()
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.data = self.e_score_correction_bias.data.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, k] fp32, expert indices [N, k], scores [N, E] fp32)."""
        logits = F.linear(x.float(), self.weight)
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        grouped_rule = {"noaux_tc": 1, "group_limited_greedy": 2}.get(self.method, 0) if self.n_group > 1 else 0
        if self.fused_select and not torch.is_grad_enabled() and choice.device.type == "cpu":
            from .cpu_kernels import bf16_kernels  # (imported late: cpu_kernels imports this module)

            indices = bf16_kernels().select_experts(choice, self.n_group, self.topk_group, self.top_k, grouped_rule)
        else:
            if grouped_rule:
                grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)
                if grouped_rule == 1:
                    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
                else:
                    group_scores = grouped.amax(dim=-1)
                keep = group_scores.topk(self.topk_group, dim=-1).indices
                group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
                # -inf, not 0: biased sigmoid scores can be negative, and a masked expert must never win.
                choice = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).flatten(1)
            indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.normalize and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices, scores


class Experts(nn.Module):
    """Routed experts stored stacked: gate_up_proj [E, 2I, hidden], down_proj [E, hidden, I].

    Checkpoints hold them per expert (`experts.{i}.{gate,up,down}_proj.weight`); checkpoint.py maps between.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        E, H, I = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.n_experts, self.intermediate = E, I
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))
        self.down_proj = nn.Parameter(torch.empty(E, H, I))
        self.act = activation(config.hidden_act)
        # Optional weights in kernel-specific layouts, set by an inference engine (model/cpu_kernels.py):
        # per expert (gate_up list, down list) for `packed_linear`; and all experts stacked (gate_up, down) for
        # `grouped_linear`, the small-batch bf16 kernel that runs every expert of the layer in one call.
        self.packed = None
        self.small_packed = None

    def expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """One expert's SwiGLU on its tokens."""
        if self.packed is not None and not torch.is_grad_enabled() and x.dtype == self.gate_up_proj.dtype:
            from .cpu_kernels import packed_linear  # (imported late: cpu_kernels imports this module)

            gate, up = packed_linear(x, self.packed[0][e]).chunk(2, dim=-1)
            return packed_linear(self.act(gate) * up, self.packed[1][e])
        gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, self.down_proj[e])

    def _small_batch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor | None:
        """The whole layer in one call of the small-batch kernel when it applies: inference, its dtype, a SwiGLU,
        and few rows per expert (decoding). None otherwise."""
        if (self.small_packed is None or torch.is_grad_enabled() or x.dtype != self.gate_up_proj.dtype
                or self.act is not F.silu):
            return None
        from .cpu_kernels import SMALL_ROWS_PER_EXPERT, bf16_kernels

        # Rows per expert, were every routed copy spread evenly (no host sync to count the experts in use).
        if indices.numel() > SMALL_ROWS_PER_EXPERT * min(indices.numel(), self.n_experts):
            return None
        return bf16_kernels().moe_swiglu(x, weights, indices, *self.small_packed, self.intermediate)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if fused_training(x, self.training) and self.act is F.silu:
            return train_kernels.routed_experts(x, weights, indices, self.gate_up_proj, self.down_proj)
        fused = self._small_batch(x, weights, indices)
        if fused is not None:
            return fused
        N, k = indices.shape
        if N == 1:  # batch-1 decoding: no sorting to do, just the k chosen experts
            out = None
            for e, w in zip(indices[0].tolist(), weights[0].to(x.dtype)):
                y = self.expert(x, e) * w
                out = y if out is None else out + y
            return out
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        token_of = order // k
        xs = x[token_of]
        outputs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            outputs.append(self.expert(xs[start:start + n], e))
            start += n
        ys = torch.cat(outputs) * weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token_of, ys)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.hidden_act)
            if config.n_shared_experts else None
        )
        # Per-expert token counts of the last training-mode forward, for load-balancing statistics (aux-loss-free
        # bias updates read this); None until one has run.
        self.last_expert_load: torch.Tensor | None = None
        # DeepSeek-V3's complementary sequence-wise balance loss (eq. 17-20), computed in training when
        # aux_alpha > 0; the trainer adds `aux_loss` of every MoE layer to its objective.
        self.aux_alpha = 0.0
        self.aux_loss: torch.Tensor | None = None

    def _sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, batch: int) -> torch.Tensor:
        """alpha * sum_i f_i P_i per sequence, averaged: f_i = E/(K T) * tokens routed to i, P_i = mean over the
        sequence of i's normalised affinity."""
        E, K = self.experts.n_experts, indices.shape[-1]
        probs = (scores / scores.sum(-1, keepdim=True)).view(batch, -1, E)
        T = probs.shape[1]
        counts = torch.zeros(batch, E, device=scores.device).scatter_add_(
            1, indices.view(batch, -1), torch.ones(batch, T * K, device=scores.device))
        f = counts * E / (K * T)
        return self.aux_alpha * (f * probs.mean(1)).sum(-1).mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(flat)
        if self.training:  # the trainer's balancing statistics; inference has no use for them
            self.last_expert_load = torch.bincount(indices.flatten(), minlength=self.experts.n_experts)
        if self.training and self.aux_alpha > 0 and x.dim() == 3:
            self.aux_loss = self._sequence_balance_loss(scores, indices, shape[0])
        out = self.experts(flat, weights, indices).view(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
