"""GRPO: reinforcement learning with verifiable rewards (DeepSeekMath / R1), with DAPO's and Dr. GRPO's fixes.

One step:
  1. rollouts: `prompts_per_step` problems, `group_size` completions each from nanoseek's engine (the group
     shares its prompt's cache blocks), with the engine's per-token log-probs;
  2. rewards (rewards.py), group-normalised advantages A = (r - mean) / std (or r - mean: `scale_rewards`);
     with `dynamic_sampling`, groups whose rewards are all equal carry no signal and are replaced by fresh
     prompts, at most `max_refills` times;
  3. the trainer recomputes log-probs itself (the engine's come from another numeric path: their gap is logged
     and corrected by truncated importance sampling, weight min(pi_old / pi_engine, tis_cap), as TRL and verl do);
  4. `mu` updates on the clipped objective min(rho A, clip(rho, 1 - eps, 1 + eps_high) A) - beta KL_k3(ref),
     aggregated per `loss_type`: grpo (mean per sequence, then over sequences), dr_grpo (sum / (sequences x
     max tokens): no length bias), dapo (mean over all tokens of the batch); completions cut by max_tokens are
     masked out when `mask_truncated`;
  5. the new weights go to the engine in memory (update_weights), never through disk.
The clip fraction is logged per step, but with mu = 1 the updated policy is the sampling one (rho = 1 for every
token), so it is 0 by construction: it measures something only when mu > 1.
No reference copy of the model exists when beta = 0.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine import SamplingParams
from ..errors import ConfigError
from ..model.transformer import Transformer
from ..model import build_model
from ..tokenizer import load_tokenizer
from .config import GRPOConfig
from .context import RunContext
from .distributed import Distributed
from .rewards import build_rewards
from .rollouts import Group, ProblemSampler, RolloutSource, score_groups
from .trainer import Trainer, lr_factor


def group_advantages(rewards: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """rewards [P, G] -> advantages [P, G]: centred per group; divided by the group's std ("group"), the
    batch's std ("batch") or not at all ("none", Dr. GRPO)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale == "group":
        return centred / (rewards.std(dim=1, keepdim=True) + eps)
    if scale == "batch":
        return centred / (rewards.std() + eps)
    if scale == "none":
        return centred
    raise ConfigError(f"scale_rewards {scale!r}: use group, batch or none")


def policy_loss(logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *, eps_low: float,
                eps_high: float, loss_type: str, max_tokens: int, tis: torch.Tensor | None = None, beta: float = 0.0,
                ref: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Per-token clipped surrogate (+ k3 KL), aggregated per loss_type. Shapes [N, T]; adv [N]."""
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    unclipped, clipped = ratio * a, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * a
    per_token = -torch.minimum(unclipped, clipped)
    if tis is not None:
        per_token = per_token * tis
    kl = torch.zeros_like(logp)
    if beta > 0 and ref is not None:
        kl = torch.exp(ref - logp) - (ref - logp) - 1  # k3 estimator of KL(pi || ref)
        per_token = per_token + beta * kl
    m = mask.float()
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * m).sum() / (m.shape[0] * max_tokens)
    elif loss_type == "dapo":
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    else:
        raise ConfigError(f"loss_type {loss_type!r}: use grpo, dr_grpo or dapo")
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        clip_frac = (((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))).float()
        stats = {"clip_fraction": float((clip_frac * m).sum() / n), "kl": float((kl * m).sum() / n)}
    return loss, stats


def sequence_logprobs(model: Transformer, sequences: list[list[int]], starts: list[int], lengths: list[int],
                      temperature: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per completion token: log-prob under `model` at `temperature`, and entropy. Sequences are right-padded
    (causal attention never looks at the padding). Returns (logp [N, T], entropy [N, T], mask [N, T]) over the
    completion positions, T = longest completion."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
    ids = ids.to(device)
    T = max(lengths)
    index = torch.tensor([[st - 1 + t for t in range(T)] for st in starts], device=device).clamp(max=width - 2)
    targets = ids.gather(1, (index + 1).clamp(max=width - 1))
    mask = torch.arange(T, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
    hidden = model.hidden_states(ids[:, :-1])
    # The LM head on the scored rows only (fused with log-softmax and entropy in CPU training).
    rows = (index + torch.arange(len(sequences), device=device)[:, None] * (width - 1)).flatten()
    logp, entropy = model.token_logprobs(hidden.flatten(0, 1).index_select(0, rows), targets.flatten(), temperature)
    return logp.view(-1, T), entropy.view(-1, T), mask


@dataclass
class UpdateBatch:
    """A step's groups flattened into sequences (prompt + completion), what every update pass reads. Tensors
    are [N, T] over completion positions, T = the longest completion."""
    sequences: list[list[int]]
    starts: list[int]  # where each completion begins
    lengths: list[int]  # completion tokens (at least 1)
    advantages: torch.Tensor  # [N]
    engine_logp: torch.Tensor  # the sampling engine's log-probs, 0 past each completion
    token_mask: torch.Tensor  # completion positions
    loss_mask: torch.Tensor  # the positions the loss counts (truncated completions out when masked)

    @classmethod
    def from_groups(cls, groups: list[Group], scaling: str, mask_truncated: bool) -> "UpdateBatch":
        rewards = torch.tensor([[r.reward for r in g.rollouts] for g in groups])
        rollouts = [(g, r) for g in groups for r in g.rollouts]
        lengths = [max(len(r.tokens), 1) for _, r in rollouts]
        T = max(lengths)
        token_mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
        engine = torch.zeros(len(rollouts), T)
        for i, (_, r) in enumerate(rollouts):
            engine[i, : len(r.engine_logp)] = torch.tensor(r.engine_logp)
        loss_mask = token_mask.clone()
        if mask_truncated:
            loss_mask[torch.tensor([r.truncated for _, r in rollouts])] = False
        return cls([g.prompt_ids + r.tokens for g, r in rollouts], [len(g.prompt_ids) for g, _ in rollouts],
                   lengths, group_advantages(rewards, scaling).flatten(), engine, token_mask, loss_mask)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def width(self) -> int:
        return self.token_mask.shape[1]

    def micro_batches(self, size: int) -> list[list[int]]:
        return [list(range(i, min(i + size, len(self)))) for i in range(0, len(self), size)]

    def rows(self, idx: list[int]) -> tuple[list[list[int]], list[int], list[int]]:
        return [self.sequences[i] for i in idx], [self.starts[i] for i in idx], [self.lengths[i] for i in idx]

    def chunk_weight(self, idx: list[int], loss_type: str) -> float:
        """A micro-batch's share of the batch aggregate, so the weighted sum over micro-batches is the batch's."""
        if loss_type in ("grpo", "dr_grpo"):  # per-sequence normalisers: the chunk's share of sequences
            return len(idx) / len(self)
        return float(self.loss_mask[idx].sum()) / max(float(self.loss_mask.sum()), 1.0)  # dapo: token share


class GRPOTrainer(Trainer):
    def __init__(self, model: Transformer, cfg: GRPOConfig, sampler: ProblemSampler, out_dir: Path, *,
                 tokenizer_dir, evaluator=None, seed: int = 0, show_progress: bool = True,
                 dist: Distributed | None = None):
        # Under torchrun each rank rolls out its share of the prompts with its own engine, every rank sees every
        # group (gathered), and each trains on its share of the micro-batches; gradients are summed over the ranks
        # (the all-reduce DDP does, by hand: the log-prob passes do not go through a DDP forward).
        if dist is not None and dist.active and cfg.parallel == "fsdp":
            raise ConfigError("grpo under torchrun is data-parallel with replicated weights: set train.parallel=ddp")
        super().__init__(model, cfg.replace(parallel="none"), sampler, out_dir, stage="grpo", evaluator=evaluator,
                         tokenizer_dir=tokenizer_dir, seed=seed, show_progress=show_progress, dist=dist)
        self.sampler = sampler
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.rewards = build_rewards(cfg.rewards)
        self.ref = None
        if cfg.beta > 0:  # a frozen copy only when the KL term is on
            self.ref = build_model(model.config).to(self.device)
            self.ref.load_state_dict(model.state_dict())
            # Training mode (nothing in the model behaves differently in it but the numeric path): the reference's
            # log-probs come from the same fused kernels as the policy's, so identical weights give a zero KL.
            self.ref.train().requires_grad_(False)
        self.source = RolloutSource(model, cfg, self.tokenizer, self.device)
        if self.source.servers is not None:
            self.push_weights(0)  # the servers may have started from any checkpoint of this architecture
        self.samples_logged = []

    def push_weights(self, version: int) -> None:
        """The trainer's weights to the rollouts (version = the number of updates they hold)."""
        self.source.push(self.model.state_dict(), version, self.dist.is_main)
        if self.source.servers is not None:
            self.dist.barrier()  # rank 0 pushed; nobody samples before the servers hold the new weights

    def resume(self) -> bool:
        resumed = super().resume()
        if resumed:
            self.push_weights(self.step)
        return resumed

    # ---- rollouts ----
    def rollout(self, problems: list, indices: list[int] | None = None) -> list[Group]:
        """Groups of completions for `problems`; each prompt's sampling seed depends on its index in the step's
        global list (`indices`), so a rank's share samples exactly what one process would."""
        cfg = self.cfg
        indices = list(range(len(problems))) if indices is None else indices
        params = [SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_tokens=cfg.max_completion_tokens, ignore_eos=cfg.ignore_eos, logprobs=0,
                                 logprobs_mode="processed",
                                 seed=zlib.crc32(f"{self.seed}/{self.step}/{i}/{p.key}".encode()))
                  for i, p in zip(indices, problems)]
        return self.source.generate(problems, params, self.step)

    def scored_rollouts(self, problems: list) -> list[Group]:
        """Rolled out and scored, in `problems` order: by this process alone, or each rank its share (every
        world_size-th prompt) and then every group to every rank."""
        world, rank = self.dist.world_size, self.dist.rank
        mine = list(range(rank, len(problems), world))
        groups = self.rollout([problems[i] for i in mine], mine)
        score_groups(groups, self.rewards, self.cfg)
        if not self.dist.active:
            return groups
        shared = self.dist.all_gather_json([[i, g.to_json()] for i, g in zip(mine, groups)])
        by_index = {i: g for part in shared for i, g in part}
        return [Group.from_json(by_index[i]) for i in range(len(problems))]

    # ---- one step ----
    def train_step(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        groups, all_groups, refills = [], [], 0
        need = cfg.prompts_per_step
        while True:
            new = self.scored_rollouts(self.sampler.next(need))
            all_groups.extend(new)
            groups.extend(g for g in new if not cfg.dynamic_sampling or g.has_signal)
            if len(groups) >= cfg.prompts_per_step or not cfg.dynamic_sampling or refills >= cfg.max_refills:
                break
            refills += 1
            need = cfg.prompts_per_step - len(groups)
        groups = groups[: cfg.prompts_per_step]
        rollout_s = time.perf_counter() - start
        rollout_tokens = sum(len(r.tokens) for g in all_groups for r in g.rollouts)
        record = self._rollout_stats(all_groups, refills, rollout_tokens / max(rollout_s, 1e-9))
        lr = cfg.lr * lr_factor(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        record.update({"lr": lr, "grad_norm": 0.0, "loss": 0.0})
        if not groups:  # every group had equal rewards: nothing to learn from this step
            self.step += 1
            record.update({"step": self.step, "skipped": False, "tokens": self.tokens_seen, "no_signal": True})
            return record
        t_train = time.perf_counter()
        train_tokens = self._update(groups, record)
        record["train_tok_s"] = train_tokens / max(time.perf_counter() - t_train, 1e-9)
        self.push_weights(self.step + 1)
        self.step += 1
        self.tokens_seen += train_tokens
        record.update({"step": self.step, "tokens": self.tokens_seen})
        return record

    def _rollout_stats(self, groups: list[Group], refills: int, tok_s: float) -> dict:
        rollouts = [r for g in groups for r in g.rollouts]
        rewards = torch.tensor([r.reward for r in rollouts])
        lengths = [len(r.tokens) for r in rollouts]
        record = {"reward_mean": float(rewards.mean()),
                  "reward_std": float(rewards.std()) if len(rollouts) > 1 else 0.0,
                  "zero_spread_fraction": sum(not g.has_signal for g in groups) / max(len(groups), 1),
                  "completion_length_mean": sum(lengths) / max(len(lengths), 1), "completion_length_max": max(lengths),
                  "truncated_fraction": sum(r.truncated for r in rollouts) / max(len(rollouts), 1),
                  "refills": refills, "rollout_tok_s": tok_s}
        for name in rollouts[0].rewards:
            values = torch.tensor([r.rewards[name] for r in rollouts])
            record[f"reward_{name}_mean"] = float(values.mean())
            record[f"reward_{name}_std"] = float(values.std()) if len(rollouts) > 1 else 0.0
        if "accuracy" in rollouts[0].rewards:
            record["accuracy"] = record["reward_accuracy_mean"]
        if len(self.samples_logged) < self.cfg.samples_to_log or self.step % max(self.cfg.log_every, 1) == 0:
            first = rollouts[0]
            record["sample"] = {"question": groups[0].problem.question, "completion": first.text[:600],
                                "reward": first.reward}
            self.samples_logged.append(self.step)
        return record

    # ---- the update: frozen log-probs, then mu policy passes ----
    def _update(self, groups: list[Group], record: dict) -> int:
        """Trains on the groups; adds loss, gradient norm, entropy, clip fraction, KL and the engine gap to
        `record`; returns the tokens trained on."""
        cfg = self.cfg
        batch = UpdateBatch.from_groups(groups, cfg.reward_scaling, cfg.mask_truncated)
        chunks = batch.micro_batches(cfg.micro_batch_size)
        # Under torchrun a rank takes every world_size-th micro-batch; weights stay those of the global batch.
        mine = chunks[self.dist.rank::self.dist.world_size]
        old, ref = self._frozen_logprobs(batch, mine)
        sums, grad_norm = self._policy_passes(batch, mine, old, ref, len(chunks))
        rows = torch.tensor(sorted(i for idx in mine for i in idx), dtype=torch.long)
        gap = (old[rows] - batch.engine_logp[rows]).abs()[batch.token_mask[rows]] if len(rows) else torch.zeros(0)
        # Sums over this rank's micro-batches, then over the ranks: the figures one process would log.
        totals = self.dist.all_reduce_sum(torch.tensor(
            [float(gap.sum()), gap.numel(), *sums.values()], dtype=torch.float64)).tolist()
        gap_sum, gap_n, totals = totals[0], totals[1], dict(zip(sums, totals[2:]))
        record["engine_logprob_gap"] = gap_sum / gap_n if gap_n else 0.0
        record.update({"loss": totals["loss"] / cfg.mu, "grad_norm": grad_norm,
                       "entropy": totals["entropy_sum"] / max(totals["entropy_n"], 1),
                       "skipped": not math.isfinite(grad_norm),
                       "clip_fraction": totals["clip_fraction"], "kl": totals["kl"]})
        return int(sum(len(s) for s in batch.sequences) * cfg.mu)

    def _old_policy_pass(self) -> bool:
        """Whether pi_old needs its own no-grad forward before the updates (only when one rollout feeds several)."""
        return self.cfg.mu > 1

    @torch.no_grad()
    def _frozen_logprobs(self, batch: UpdateBatch, mine: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(pi_old, reference) log-probs [N, T] of this rank's rows. With mu = 1 the policy being updated is the
        one that sampled: pi_old is the first policy pass's own log-probs, detached (the same numbers a separate
        no-grad pass would give), so this pass is skipped, as TRL does; with mu > 1 they must be frozen before
        the first update. The reference pass runs only with the KL term on."""
        old, ref = torch.zeros(len(batch), batch.width), torch.zeros(len(batch), batch.width)
        if not self._old_policy_pass() and self.ref is None:
            return old, ref
        with self.autocast():
            for idx in mine:
                args = (*batch.rows(idx), self.cfg.temperature, self.device)
                if self._old_policy_pass():
                    lp, _, _ = sequence_logprobs(self.model, *args)
                    old[idx, : lp.shape[1]] = lp.float().cpu()
                if self.ref is not None:
                    rlp, _, _ = sequence_logprobs(self.ref, *args)
                    ref[idx, : rlp.shape[1]] = rlp.float().cpu()
        return old, ref

    def _policy_passes(self, batch: UpdateBatch, mine: list[list[int]], old: torch.Tensor, ref: torch.Tensor,
                       n_chunks: int) -> tuple[dict[str, float], float]:
        """mu optimizer steps on the clipped objective over this rank's micro-batches (gradients summed over
        the ranks). Returns this rank's sums (loss, entropy, clip fraction, KL) and the last gradient norm.
        Fills `old` on the first pass when no frozen pass ran."""
        cfg = self.cfg
        sums = {"loss": 0.0, "entropy_sum": 0.0, "entropy_n": 0, "clip_fraction": 0.0, "kl": 0.0}
        grad_norm = 0.0
        for it in range(cfg.mu):
            for idx in mine:
                with self.autocast():
                    lp, ent, m = sequence_logprobs(self.model, *batch.rows(idx), cfg.temperature, self.device)
                    t = lp.shape[1]
                    if not self._old_policy_pass() and it == 0:
                        old[idx, :t] = lp.detach().float().cpu()
                    old_chunk = old[idx, :t].to(self.device)
                    # Truncated importance sampling: the engine sampled, the trainer's numerics define pi_old.
                    tis = torch.exp(old_chunk - batch.engine_logp[idx, :t].to(self.device)).clamp(max=cfg.tis_cap)
                    loss, stats = policy_loss(
                        lp.float(), old_chunk, batch.advantages[idx].to(self.device),
                        batch.loss_mask[idx, :t].to(self.device), eps_low=cfg.epsilon, eps_high=cfg.epsilon_high,
                        loss_type=cfg.loss_type, max_tokens=cfg.max_completion_tokens, tis=tis, beta=cfg.beta,
                        ref=ref[idx, :t].to(self.device) if self.ref is not None else None)
                    weight = batch.chunk_weight(idx, cfg.loss_type)
                (loss * weight).backward()
                sums["loss"] += float(loss.detach()) * weight
                sums["entropy_sum"] += float((ent * m).sum() / m.sum().clamp(min=1))
                sums["entropy_n"] += 1
                for k in ("clip_fraction", "kl"):
                    sums[k] += stats[k] / (n_chunks * cfg.mu)
            self.dist.all_reduce_grads(self.model.parameters())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
            if math.isfinite(grad_norm) and math.isfinite(sums["loss"]):
                self.optimizer.step()
                self.bad_streak = 0
            else:
                self.bad_streak += 1
            self.optimizer.zero_grad(set_to_none=True)
        return sums, grad_norm


def run_grpo(recipe: dict, resume: bool = False, show_progress: bool = True) -> Path:
    from ..checkpoint import load_model
    from ..data.sources import task_problems

    with RunContext.open(recipe, "grpo", resume=resume, show_progress=show_progress) as run:
        cfg = run.cfg
        # R1 starts from the SFT model; R1-Zero from the pretrained one (grpo.init_from = "pretrain").
        model = load_model(run.init_path(cfg.init_from or "sft"), device=run.device, dtype=torch.float32)
        data = recipe.get("data", {})
        levels = cfg.levels or data.get("grpo_levels") or data.get("levels", [1, 2, 3])
        problems = task_problems(data.get("task", "arithmetic"), levels, cfg.problems, run.seed, "train")
        evaluator = run.evaluator(levels=recipe.get("eval", {}).get("grpo_levels", levels))
        trainer = GRPOTrainer(model, cfg, ProblemSampler(problems, run.seed), run.out_dir,
                              tokenizer_dir=run.tokenizer_dir, evaluator=evaluator, seed=run.seed,
                              show_progress=show_progress, dist=run.dist)
        return run.fit(trainer, resume=resume)
