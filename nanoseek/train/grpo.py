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

import dataclasses
import json
import math
import random
import time
import zlib
from pathlib import Path

import torch

from ..data.sources import chat_prompt, task_problems
from ..data.tasks import Problem
from ..engine import LLM, SamplingParams
from ..errors import ConfigError
from ..model import ops
from ..model.transformer import Transformer
from ..runtime import fast_precision
from ..tokenizer import load_tokenizer
from .recipe import STAGE_EXTRA_KEYS, run_dir, stage_config
from .rewards import build_rewards, combine, score
from .distributed import Distributed
from .rollout_servers import RolloutServers
from .trainer import Trainer, lr_factor

GRPO_DEFAULTS = {
    "prompts_per_step": 16, "group_size": 8, "max_completion_tokens": 256, "temperature": 1.0, "top_p": 1.0,
    "epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.0, "mu": 1, "loss_type": "dapo", "scale_rewards": "auto",
    "dynamic_sampling": True, "max_refills": 2, "mask_truncated": True, "tis_cap": 2.0, "rewards": None,
    "levels": None, "problems": 20000, "rollout_dtype": "auto", "overlong_buffer": 0, "samples_to_log": 2,
    "ignore_eos": False,  # every completion runs to max_completion_tokens (benchmarks: equal work per step)
    # Rollouts on running `nanoseek serve --admin-key KEY` processes instead of an in-process engine.
    "rollout_servers": [], "admin_key": "", "rollout_api_key": "", "max_staleness": 0,
}
STAGE_EXTRA_KEYS["grpo"] = set(GRPO_DEFAULTS)


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


class ProblemSampler:
    """Training problems in a seeded random order; its position is its state (for exact resume)."""

    has_mask = False

    def __init__(self, problems: list[Problem], seed: int):
        if not problems:
            raise ConfigError("GRPO has no training problems: check [data] task and grpo levels")
        self.problems, self.seed = problems, seed
        self.epoch, self.cursor = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def next(self, count: int) -> list[Problem]:
        out = []
        while len(out) < count:
            order = self._order(self.epoch)
            take = min(count - len(out), len(order) - self.cursor)
            out.extend(self.problems[i] for i in order[self.cursor:self.cursor + take])
            self.cursor += take
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "size": len(self.problems)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("size") != len(self.problems):
            raise ConfigError("the GRPO problem set changed since the checkpoint: cannot resume exactly")
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]


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
    logp, entropy = ops.token_logprobs(hidden.flatten(0, 1).index_select(0, rows), model.lm_head,
                                       targets.flatten(), temperature, training=model.training)
    return logp.view(-1, T), entropy.view(-1, T), mask


class GRPOTrainer(Trainer):
    def __init__(self, model: Transformer, cfg: dict, sampler: ProblemSampler, out_dir: Path, *, tokenizer_dir,
                 evaluator=None, seed: int = 0, show_progress: bool = True, dist: Distributed | None = None):
        # Under torchrun each rank rolls out its share of the prompts with its own engine, every rank sees every
        # group (gathered), and each trains on its share of the micro-batches; gradients are summed over the ranks
        # (the all-reduce DDP does, by hand: the log-prob passes do not go through a DDP forward).
        if dist is not None and dist.active and cfg["parallel"] == "fsdp":
            raise ConfigError("grpo under torchrun is data-parallel with replicated weights: set train.parallel=ddp")
        super().__init__(model, {**cfg, "parallel": "none"}, sampler, out_dir, stage="grpo", evaluator=evaluator,
                         tokenizer_dir=tokenizer_dir, seed=seed, show_progress=show_progress, dist=dist)
        self.sampler = sampler
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.rewards = build_rewards(cfg["rewards"])
        self.scale = cfg["scale_rewards"] if cfg["scale_rewards"] != "auto" else (
            "none" if cfg["loss_type"] == "dr_grpo" else "group")
        self.ref = None
        if cfg["beta"] > 0:  # a frozen copy only when the KL term is on
            self.ref = Transformer(model.config).to(self.device)
            self.ref.load_state_dict(model.state_dict())
            # Training mode (nothing in the model behaves differently in it but the numeric path): the reference's
            # log-probs come from the same fused kernels as the policy's, so identical weights give a zero KL.
            self.ref.train().requires_grad_(False)
        self.llm = self.servers = None
        if cfg["rollout_servers"]:
            import os

            self.servers = RolloutServers(list(cfg["rollout_servers"]),
                                          cfg["admin_key"] or os.environ.get("NANOSEEK_ADMIN_KEY", ""),
                                          cfg["max_staleness"], api_key=cfg["rollout_api_key"] or
                                          os.environ.get("NANOSEEK_API_KEY", ""))
            self.push_weights(0)  # the servers may have started from any checkpoint of this architecture
        else:
            rollout = Transformer(model.config)
            rollout.load_state_dict(model.state_dict())
            # bf16 rollouts where bf16 is native, float32 elsewhere ("auto"; runtime.fast_precision).
            precision = fast_precision(cfg["rollout_dtype"], self.device)
            rollout.set_precision(precision.weights, precision.compute)
            self.llm = LLM(rollout.eval(), tokenizer=self.tokenizer, kv_cache_memory="512MiB",
                           max_num_seqs=cfg["prompts_per_step"] * cfg["group_size"] * (1 + cfg["max_refills"]),
                           max_num_batched_tokens=4096)
        self.samples_logged = []

    def push_weights(self, version: int) -> None:
        """The trainer's weights into the rollout engine (in memory) or every rollout server (version = the
        number of updates they hold; rank 0 pushes, the others wait for it)."""
        if self.servers is None:
            self.llm.update_weights(self.model.state_dict())
            return
        if self.dist.is_main:
            self.servers.push(self.model.state_dict(), version)
        self.dist.barrier()

    def resume(self) -> bool:
        resumed = super().resume()
        if resumed:
            self.push_weights(self.step)
        return resumed

    # ---- rollouts ----
    def rollout(self, problems: list[Problem], indices: list[int] | None = None) -> list[dict]:
        """Groups of completions for `problems`; each prompt's sampling seed depends on its index in the step's
        global list (`indices`), so a rank's share samples exactly what one process would."""
        cfg = self.cfg
        indices = list(range(len(problems))) if indices is None else indices
        params = [SamplingParams(n=cfg["group_size"], temperature=cfg["temperature"], top_p=cfg["top_p"],
                                 max_tokens=cfg["max_completion_tokens"], ignore_eos=cfg["ignore_eos"], logprobs=0,
                                 logprobs_mode="processed",
                                 seed=zlib.crc32(f"{self.seed}/{self.step}/{i}/{p.key}".encode()))
                  for i, p in zip(indices, problems)]
        if not problems:
            return []
        if self.servers is not None:
            return self._remote_rollout(problems, params)
        outs = self.llm.generate([chat_prompt(p) for p in problems], params)
        groups = []
        for p, out in zip(problems, outs):
            items = []
            for o in out.outputs:
                items.append({"tokens": list(o.token_ids), "text": o.text,
                              "engine_logp": [e["logprob"] for e in o.logprobs],
                              "truncated": o.finish_reason == "length"})
            groups.append({"problem": p, "prompt_ids": out.prompt_token_ids, "items": items})
        return groups

    def _remote_rollout(self, problems: list[Problem], params: list[SamplingParams]) -> list[dict]:
        """The same requests on the rollout servers: the prompt as the token ids the local engine would build."""
        prompts = [self.tokenizer.apply_chat_template(chat_prompt(p), add_generation_prompt=True) for p in problems]
        bodies = [{"n": sp.n, "temperature": sp.temperature, "top_p": sp.top_p, "max_tokens": sp.max_tokens,
                   "ignore_eos": sp.ignore_eos, "seed": sp.seed} for sp in params]
        outs = self.servers.generate(prompts, bodies, self.step)
        return [{"problem": p, "prompt_ids": ids, "items": items} for p, ids, items in zip(problems, prompts, outs)]

    def scored_rollouts(self, problems: list[Problem]) -> list[dict]:
        """Rolled out and scored, in `problems` order: by this process alone, or each rank its share (every
        world_size-th prompt) and then every group to every rank."""
        world, rank = self.dist.world_size, self.dist.rank
        mine = list(range(rank, len(problems), world))
        groups = self.rollout([problems[i] for i in mine], mine)
        if groups:
            self.score_groups(groups)
        if not self.dist.active:
            return groups
        shared = self.dist.all_gather_json([[i, _group_json(g)] for i, g in zip(mine, groups)])
        by_index = {i: g for part in shared for i, g in part}
        return [_group_from_json(by_index[i]) for i in range(len(problems))]

    def score_groups(self, groups: list[dict]) -> dict[str, list[float]]:
        cfg = self.cfg
        flat = []
        for g in groups:
            p = g["problem"]
            for it in g["items"]:
                meta = {"verifier": p.verifier, "question": p.question, "completion_tokens": len(it["tokens"]),
                        "max_tokens": cfg["max_completion_tokens"],
                        "overlong_buffer": cfg["overlong_buffer"] or max(cfg["max_completion_tokens"] // 4, 1)}
                flat.append((p.question, it["text"], p.answer, meta))
        per_fn = score(self.rewards, flat)
        total = combine(self.rewards, per_fn)
        k = 0
        for g in groups:
            for it in g["items"]:
                it["reward"] = total[k]
                it["rewards"] = {name: vals[k] for name, vals in per_fn.items()}
                k += 1
        return per_fn

    # ---- one step ----
    def train_step(self) -> dict:
        cfg = self.cfg
        start = time.perf_counter()
        groups, all_groups, refills = [], [], 0
        need = cfg["prompts_per_step"]
        while True:
            new = self.scored_rollouts(self.sampler.next(need))
            all_groups.extend(new)
            keep = [g for g in new if not cfg["dynamic_sampling"]
                    or len({it["reward"] for it in g["items"]}) > 1]
            groups.extend(keep)
            if len(groups) >= cfg["prompts_per_step"] or not cfg["dynamic_sampling"] or refills >= cfg["max_refills"]:
                break
            refills += 1
            need = cfg["prompts_per_step"] - len(groups)
        groups = groups[: cfg["prompts_per_step"]]
        rollout_s = time.perf_counter() - start
        rollout_tokens = sum(len(it["tokens"]) for g in all_groups for it in g["items"])
        record = self._rollout_stats(all_groups, refills, rollout_tokens / max(rollout_s, 1e-9))
        lr = cfg["lr"] * lr_factor(self.step, cfg)
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

    def _rollout_stats(self, groups, refills: int, tok_s: float) -> dict:
        items = [it for g in groups for it in g["items"]]
        rewards = torch.tensor([it["reward"] for it in items])
        lengths = [len(it["tokens"]) for it in items]
        record = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(items) > 1 else 0.0,
                  "zero_spread_fraction": sum(len({it["reward"] for it in g["items"]}) == 1 for g in groups)
                  / max(len(groups), 1),
                  "completion_length_mean": sum(lengths) / max(len(lengths), 1), "completion_length_max": max(lengths),
                  "truncated_fraction": sum(it["truncated"] for it in items) / max(len(items), 1),
                  "refills": refills, "rollout_tok_s": tok_s}
        for name in items[0]["rewards"]:
            vals = torch.tensor([it["rewards"][name] for it in items])
            record[f"reward_{name}_mean"] = float(vals.mean())
            record[f"reward_{name}_std"] = float(vals.std()) if len(items) > 1 else 0.0
        if "accuracy" in items[0]["rewards"]:
            record["accuracy"] = record["reward_accuracy_mean"]
        if len(self.samples_logged) < self.cfg["samples_to_log"] or self.step % max(self.cfg["log_every"], 1) == 0:
            it = items[0]
            record["sample"] = {"question": groups[0]["problem"].question, "completion": it["text"][:600],
                                "reward": it["reward"]}
            self.samples_logged.append(self.step)
        return record

    def _update(self, groups: list[dict], record: dict) -> int:
        cfg = self.cfg
        rewards = torch.tensor([[it["reward"] for it in g["items"]] for g in groups])
        adv = group_advantages(rewards, self.scale).flatten()
        seqs, starts, lengths, engine_lp, trunc = [], [], [], [], []
        for g in groups:
            for it in g["items"]:
                seqs.append(g["prompt_ids"] + it["tokens"])
                starts.append(len(g["prompt_ids"]))
                lengths.append(max(len(it["tokens"]), 1))
                engine_lp.append(it["engine_logp"])
                trunc.append(it["truncated"])
        micro = cfg["micro_batch_size"]
        chunks = [list(range(i, min(i + micro, len(seqs)))) for i in range(0, len(seqs), micro)]
        # Under torchrun a rank takes every world_size-th micro-batch; weights stay those of the global batch.
        mine = chunks[self.dist.rank::self.dist.world_size]
        T = max(lengths)
        masks = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
        eng = torch.zeros(len(seqs), T)
        for i, lp in enumerate(engine_lp):
            eng[i, : len(lp)] = torch.tensor(lp)
        loss_mask = masks.clone()
        if cfg["mask_truncated"]:
            loss_mask[torch.tensor(trunc)] = False
        # With mu = 1 the policy being updated is the one that sampled: pi_old is the first pass's own log-probs,
        # detached (the same numbers a separate no-grad pass would give), so that pass is skipped, as TRL does.
        # With mu > 1 the old log-probs must be frozen before the first update.
        old_pass = self._old_policy_pass()
        old, ref = torch.zeros(len(seqs), T), torch.zeros(len(seqs), T)
        if old_pass or self.ref is not None:
            with torch.no_grad(), self._autocast():
                for idx in mine:
                    args = ([seqs[i] for i in idx], [starts[i] for i in idx], [lengths[i] for i in idx],
                            cfg["temperature"], self.device)
                    if old_pass:
                        lp, _, _ = sequence_logprobs(self.model, *args)
                        old[idx, : lp.shape[1]] = lp.float().cpu()
                    if self.ref is not None:
                        rlp, _, _ = sequence_logprobs(self.ref, *args)
                        ref[idx, : rlp.shape[1]] = rlp.float().cpu()
        entropies, stats_acc, loss_total = [], {"clip_fraction": 0.0, "kl": 0.0}, 0.0
        for it in range(cfg["mu"]):
            for idx in mine:
                with self._autocast():
                    lp, ent, m = sequence_logprobs(self.model, [seqs[i] for i in idx], [starts[i] for i in idx],
                                                   [lengths[i] for i in idx], cfg["temperature"], self.device)
                    t = lp.shape[1]
                    if not old_pass and it == 0:
                        old[idx, :t] = lp.detach().float().cpu()
                    old_chunk = old[idx, :t].to(self.device)
                    # Truncated importance sampling: the engine sampled, the trainer's numerics define pi_old.
                    tis = torch.exp(old_chunk - eng[idx, :t].to(self.device)).clamp(max=cfg["tis_cap"])
                    loss, stats = policy_loss(
                        lp.float(), old_chunk, adv[idx].to(self.device),
                        loss_mask[idx, :t].to(self.device), eps_low=cfg["epsilon"], eps_high=cfg["epsilon_high"],
                        loss_type=cfg["loss_type"], max_tokens=cfg["max_completion_tokens"],
                        tis=tis, beta=cfg["beta"], ref=ref[idx, :t].to(self.device) if self.ref is not None else None)
                    # Each micro-batch's aggregate is rescaled so the sum over micro-batches is the batch aggregate.
                    weight = self._chunk_weight(loss_mask, idx, cfg["loss_type"])
                (loss * weight).backward()
                loss_total += float(loss.detach()) * weight
                entropies.append(float((ent * m).sum() / m.sum().clamp(min=1)))
                for k in stats_acc:
                    stats_acc[k] += stats[k] / (len(chunks) * cfg["mu"])
            self.dist.all_reduce_grads(self.model.parameters())
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["grad_clip"]))
            if math.isfinite(grad_norm) and math.isfinite(loss_total):
                self.optimizer.step()
                self.bad_streak = 0
            else:
                self.bad_streak += 1
            self.optimizer.zero_grad(set_to_none=True)
        rows = torch.tensor(sorted(i for idx in mine for i in idx), dtype=torch.long)
        gap = (old[rows] - eng[rows]).abs()[masks[rows]] if len(rows) else torch.zeros(0)
        # Sums over this rank's micro-batches, then over the ranks: the figures one process would log.
        totals = self.dist.all_reduce_sum(torch.tensor(
            [float(gap.sum()), gap.numel(), loss_total, sum(entropies), len(entropies), *stats_acc.values()],
            dtype=torch.float64))
        gap_sum, gap_n, loss_total, ent_sum, ent_n = totals[:5].tolist()
        stats_acc = dict(zip(stats_acc, totals[5:].tolist()))
        record["engine_logprob_gap"] = gap_sum / gap_n if gap_n else 0.0
        record.update({"loss": loss_total / cfg["mu"], "grad_norm": grad_norm, "entropy": ent_sum / max(ent_n, 1),
                       "skipped": not math.isfinite(grad_norm), **stats_acc})
        return int(sum(len(s) for s in seqs) * cfg["mu"])

    def _old_policy_pass(self) -> bool:
        """Whether pi_old needs its own no-grad forward before the updates (only when one rollout feeds several)."""
        return self.cfg["mu"] > 1

    @staticmethod
    def _chunk_weight(mask: torch.Tensor, idx: list[int], loss_type: str) -> float:
        if loss_type in ("grpo", "dr_grpo"):  # per-sequence normalisers: the chunk's share of sequences
            return len(idx) / mask.shape[0]
        return float(mask[idx].sum()) / max(float(mask.sum()), 1.0)  # dapo: token share

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)


def _group_json(group: dict) -> dict:
    return {**group, "problem": dataclasses.asdict(group["problem"])}


def _group_from_json(data: dict) -> dict:
    return {**data, "problem": Problem(**data["problem"])}


def grpo_config(recipe: dict) -> dict:
    cfg = {**GRPO_DEFAULTS, **stage_config(recipe, "grpo")}
    if cfg["loss_type"] not in ("grpo", "dr_grpo", "dapo"):
        raise ConfigError(f"grpo.loss_type {cfg['loss_type']!r}: use grpo, dr_grpo or dapo")
    return cfg


def run_grpo(recipe: dict, resume: bool = False, show_progress: bool = True) -> Path:
    from ..checkpoint import load_model
    from .metrics import plot_metrics
    from .stages import make_evaluator, prepare_tokenizer, resolve_init, tokenizer_dir

    cfg = grpo_config(recipe)
    device = torch.device(recipe.get("run", {}).get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    dist = Distributed.from_env(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    torch.manual_seed(recipe["run"]["seed"])
    if dist.is_main:
        prepare_tokenizer(recipe)
    dist.barrier()
    tok_dir = tokenizer_dir(recipe)
    init = resolve_init(recipe, cfg["init_from"] or "sft")
    if init is None:
        raise ConfigError("grpo needs a starting model: set grpo.init_from (sft for R1, pretrain for R1-Zero)")
    model = load_model(init, device=device, dtype=torch.float32)
    data = recipe.get("data", {})
    levels = cfg["levels"] or data.get("grpo_levels") or data.get("levels", [1, 2, 3])
    problems = task_problems(data.get("task", "arithmetic"), levels, cfg["problems"], recipe["run"]["seed"], "train")
    sampler = ProblemSampler(problems, recipe["run"]["seed"])
    out_dir = run_dir(recipe) / "grpo"
    if not resume and out_dir.exists() and dist.is_main:
        import shutil

        shutil.rmtree(out_dir)
    dist.barrier()
    eval_recipe = {**recipe, "eval": {**recipe.get("eval", {}), "levels": recipe.get("eval", {}).get("grpo_levels", levels)}}
    evaluator = make_evaluator(eval_recipe, tok_dir) if recipe.get("eval", {}).get("during_training", True) else None
    trainer = GRPOTrainer(model, cfg, sampler, out_dir, tokenizer_dir=tok_dir, evaluator=evaluator,
                          seed=recipe["run"]["seed"], show_progress=show_progress, dist=dist)
    start = time.time()
    try:
        path = trainer.fit(resume=resume)
        if dist.is_main:
            plot_metrics(out_dir / "metrics.jsonl", out_dir, title="grpo")
            plot_grpo(out_dir / "metrics.jsonl", out_dir)
            summary = json.loads((out_dir / "summary.json").read_text())
            summary["wall_seconds"] = time.time() - start
            summary["world_size"] = dist.world_size
            (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        dist.barrier()
    finally:
        dist.close()
    return path


def plot_grpo(metrics_path: Path, out_dir: Path) -> Path | None:
    """reward / accuracy, completion length, KL / clip fraction / entropy over steps: grpo.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .metrics import read_metrics

    rows = [r for r in read_metrics(metrics_path) if "reward_mean" in r]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(steps, [r["reward_mean"] for r in rows], label="reward")
    if "accuracy" in rows[0]:
        axes[0].plot(steps, [r["accuracy"] for r in rows], label="accuracy (rollouts)")
    evals = [r for r in read_metrics(metrics_path) if "task_pass@1" in r]
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["task_pass@1"] for r in evals], "o-", label="held-out pass@1")
    axes[0].legend(fontsize=7)
    axes[0].set_title("reward")
    axes[1].plot(steps, [r["completion_length_mean"] for r in rows], label="mean")
    axes[1].plot(steps, [r["completion_length_max"] for r in rows], label="max", alpha=0.6)
    axes[1].legend(fontsize=7)
    axes[1].set_title("completion length")
    for key in ("kl", "clip_fraction", "entropy", "zero_spread_fraction"):
        if key in rows[0]:
            axes[2].plot(steps, [r.get(key, 0) for r in rows], label=key)
    axes[2].legend(fontsize=7)
    axes[2].set_title("diagnostics")
    for ax in axes:
        ax.set_xlabel("step")
    fig.tight_layout()
    path = out_dir / "grpo.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
