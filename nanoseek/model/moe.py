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
from . import ops, quant
from .layers import MLP, activation


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
        self.derived = False  # inference: route on the decode kernel, one call instead of ~10 ops

    def _apply(self, fn, recurse=True):
        # Routing parameters keep their float32 values when the model is cast (model.to(bfloat16)): a bf16 round
        # trip would move the scores, and with them which experts win. Moves to another device still apply.
        names = ["weight"] + (["e_score_correction_bias"] if self.e_score_correction_bias is not None else [])
        originals = {name: getattr(self, name).data for name in names}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            current = getattr(self, name)
            if current.dtype != torch.float32:
                current.data = original.to(current.device)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> (weights [N, k] fp32, expert indices [N, k], scores [N, E] fp32; inference on the
        decode kernel: no scores, which only training's balancing statistics read)."""
        rule = {"noaux_tc": 1, "group_limited_greedy": 2}.get(self.method, 0) if self.n_group > 1 else 0
        if self.derived and not torch.is_grad_enabled() and x.device.type == "cpu":
            weights, indices = ops.route(x, self.weight, self.e_score_correction_bias, self.scoring == "sigmoid",
                                         self.n_group, self.topk_group, self.top_k, rule,
                                         self.normalize and self.top_k > 1, self.scaling)
            return weights, indices, None
        logits = F.linear(x.float(), self.weight)
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        indices = ops.select_experts(choice, self.n_group, self.topk_group, self.top_k, rule)
        weights = scores.gather(1, indices)
        if self.normalize and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices, scores

    def derive(self, plan: ops.Plan | None) -> None:
        self.derived = plan is not None and plan.fused


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
        self.limit = config.swiglu_limit if config.is_v4 else None  # V4 clips the SwiGLU's inputs
        self.derived: ops.ExpertsPack | None = None  # inference: packed copies (ops.pack_experts)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, shared=None) -> torch.Tensor:
        """The routed experts' weighted sum over x [N, hidden], plus shared(x) where the layer's shared-expert
        module is given (in one kernel call when decoding)."""
        return ops.routed_experts(x, weights, indices, self.gate_up_proj, self.down_proj, self.act,
                                  training=self.training, derived=self.derived, limit=self.limit, shared=shared)

    def derive(self, plan: ops.Plan | None) -> None:
        self.derived = ops.pack_experts(self.gate_up_proj, self.down_proj, plan,
                                        (quant.quantized_of(self, "gate_up_proj"), quant.quantized_of(self, "down_proj")))


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

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """x [..., hidden]; `input_ids` (x's tokens) only for routers that hash them (DeepSeek-V4)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, indices, scores = self.gate(flat) if input_ids is None else self.gate(flat, input_ids.reshape(-1))
        if self.training:  # the trainer's balancing statistics; inference has no use for them
            self.last_expert_load = torch.bincount(indices.flatten(), minlength=self.experts.n_experts)
        if self.training and self.aux_alpha > 0 and x.dim() == 3:
            self.aux_loss = self._sequence_balance_loss(scores, indices, shape[0])
        return self.experts(flat, weights, indices, self.shared_experts).view(shape)
