"""The one trainer loop every stage shares: stages differ only in their data (masks) and extra loss terms.

Per optimizer step: `batch_size` windows split into micro-batches (and across data-parallel ranks), bf16
autocast over float32 master weights, next-token loss normalised by the global number of target tokens (so
accumulation and data parallelism give the same gradient as one big batch), MTP loss (lambda), DeepSeek-V3's
sequence-wise balance loss (alpha), gradient clipping, AdamW with warmup + cosine / warmup-stable-decay, then the
auxiliary-loss-free balancing update: every MoE layer's correction bias moves by gamma towards balance, from
expert loads summed over micro-batches and ranks.

A non-finite loss or gradient skips the step (logged); `max_bad_steps` in a row stop the run with a clear error,
leaving the last good checkpoint untouched. Checkpoints are written atomically with everything needed to resume
exactly (see checkpointing.py).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

from ..errors import NanoseekError
from ..model.accounting import model_cost
from ..model.indexer import Indexer
from ..model.moe import MoE, update_balance_bias
from ..model.transformer import Transformer
from ..model.v4 import V4Indexer
from ..runtime import autocast, notify, peak_flops, training_autocast
from . import checkpointing
from .config import TrainConfig
from .distributed import Distributed
from .metrics import MetricsLog
from .optim import build_optimizer

log_ln2 = math.log(2)
INDEXERS = (Indexer, V4Indexer)  # V3.2's and V4's lightning indexers: each learns from its own KL


class TrainingError(NanoseekError):
    """Training cannot continue (repeated non-finite losses, ...)."""


class LossModule(nn.Module):
    """Wraps the model so data-parallel wrappers see one forward that returns every loss term."""

    def __init__(self, model: Transformer, indexer_lambda: float = 1.0):
        super().__init__()
        self.model = model
        self.indexer_lambda = indexer_lambda

    def forward(self, x, y, mask, mtp_lambda: float):
        model = self.model
        hidden = model.hidden_states(x)
        main = model.summed_loss(hidden, y, mask)
        mtp = hidden.new_zeros((), dtype=torch.float32)
        if mtp_lambda > 0 and len(model.mtp):
            for k, states in enumerate(model.mtp_hidden_states(hidden, x), start=1):
                normed = model.mtp[k - 1].shared_head_norm(states)
                mtp = mtp + model.summed_loss(normed, y[:, k:], mask[:, k:] if mask is not None else None)
        aux = hidden.new_zeros((), dtype=torch.float32)
        for m in model.modules():  # auxiliary terms: sequence balance (MoE), V3.2's indexer KL (its only teacher)
            if isinstance(m, MoE) and m.aux_loss is not None:
                aux = aux + m.aux_loss
                m.aux_loss = None  # do not keep the graph alive past this step
            elif isinstance(m, INDEXERS) and m.loss is not None:
                aux = aux + self.indexer_lambda * m.loss
                m.loss = None
        return main, mtp, aux


def lr_factor(step: int, cfg: TrainConfig) -> float:
    warmup, total = cfg.warmup_steps, cfg.steps
    if step < warmup:
        return (step + 1) / warmup
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        decay_start = total - int(cfg.decay_fraction * total)
        if step < decay_start:
            return 1.0
        return 1.0 - (1.0 - floor) * (step - decay_start) / max(total - decay_start, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def training_flops_per_token(model: Transformer, seq_len: int, with_mtp: bool) -> float:
    """6 x active non-embedding parameters (MTP's too when trained) + causal attention at the mean context."""
    config = model.config
    cost = model_cost(config, context=seq_len // 2)
    params = cost.active_params + (cost.mtp_params if with_mtp else 0)
    attn_forward = cost.flops_per_token - 2 * cost.active_params
    return 6 * params + 3 * attn_forward


class StopRequests:
    """Ctrl-C (SIGINT) or SIGTERM during a run asks the loop to stop after the step in flight, with a checkpoint
    there, instead of losing every step since the last one; a second Ctrl-C interrupts at once. Installed only in
    the main thread (signal handlers cannot be elsewhere), only when `enabled`, and never over a signal the
    process was started to ignore (a `nohup` or background job's SIGINT); `restore` puts the previous handlers
    back."""

    def __init__(self, enabled: bool):
        self.signal: int | None = None
        self._previous = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    self._previous[sig] = signal.signal(sig, self._ask)

    def _ask(self, signum, frame) -> None:
        self.signal = signum
        if signal.SIGINT in self._previous:  # an ignored SIGINT stays ignored
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class Trainer:
    def __init__(self, model: Transformer, cfg: TrainConfig, train_loader, out_dir: Path, *, stage: str,
                 val_loader=None, evaluator=None, tokenizer_dir: Path | None = None, dist: Distributed | None = None,
                 seed: int = 0, show_progress: bool = True):
        self.model = model
        self.cfg = cfg
        self.stage = stage
        self.loader = train_loader
        self.val_loader = val_loader
        self.evaluator = evaluator  # callable(model) -> dict of task metrics, rank 0 only
        self.out_dir = Path(out_dir)
        self.tokenizer_dir = tokenizer_dir
        self.dist = dist or Distributed.single()
        self.seed = seed
        self.show_progress = show_progress and self.dist.is_main
        self.device = model.device
        # bf16 autocast over float32 weights where bf16 is native (train.dtype = "auto"), float32 elsewhere.
        self.autocast_dtype, note = training_autocast(cfg.dtype, self.device)
        if note and self.dist.is_main:
            notify(note)
        self.moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
        for m in self.moe_layers:
            m.aux_alpha = cfg.seq_aux_alpha
        model.train()  # the training numerics (model/kernels/training.py) follow the module's mode
        self.indexers = [m for m in model.modules() if isinstance(m, INDEXERS)]
        self.module = self.dist.wrap(LossModule(model, cfg.indexer_lambda), cfg.parallel)
        self.optimizer = build_optimizer(self.module, cfg)
        self.step = 0
        self.bad_streak = 0
        self.tokens_seen = 0
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", enabled=self.dist.is_main)
        self.with_mtp = cfg.mtp_lambda > 0 and len(model.mtp) > 0
        self.flops_per_token = training_flops_per_token(model, cfg.seq_len, self.with_mtp)
        self.peak_flops = peak_flops(self.autocast_dtype or torch.float32, self.device)

    def autocast(self):
        """The training precision's context: bf16 autocast over the float32 weights, or plain float32."""
        return autocast(self.autocast_dtype, self.device)

    # ---- checkpoints ----
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save(self, final: bool = False) -> Path | None:
        target = self.out_dir / "model" if final else self.checkpoint_dir() / f"step_{self.step:06d}"
        state = {"step": self.step, "stage": self.stage, "bad_streak": self.bad_streak,
                 "tokens_seen": self.tokens_seen, "loader": self.loader.state_dict()}
        path = checkpointing.save_checkpoint(self, target, state)
        if not final and self.dist.is_main:
            checkpointing.prune(self.checkpoint_dir(), keep=self.cfg.keep_checkpoints)
        return path

    def resume(self) -> bool:
        latest = checkpointing.latest(self.checkpoint_dir())
        if latest is None:
            return False
        state = checkpointing.load_checkpoint(self, latest)
        self.step, self.bad_streak = state["step"], state["bad_streak"]
        self.tokens_seen = state["tokens_seen"]
        self.loader.load_state_dict(state["loader"])
        self.metrics.truncate_after(self.step)
        return True

    # ---- one optimizer step ----
    def _global_counts(self, indices: list[int]) -> tuple[int, list[int]]:
        """Target tokens of the whole global batch, for the main loss and each MTP depth (every rank computes
        the same numbers from the same window indices: no communication)."""
        T = self.cfg.seq_len
        depths = len(self.model.mtp) if self.with_mtp else 0
        if not self.loader.has_mask:
            return len(indices) * T, [len(indices) * (T - k) for k in range(1, depths + 1)]
        _, _, mask = self.loader.batch(indices)
        return int(mask.sum()), [int(mask[:, k:].sum()) for k in range(1, depths + 1)]

    def train_step(self) -> dict:
        cfg = self.cfg
        world, rank = self.dist.world_size, self.dist.rank
        global_indices = self.loader.next_indices(cfg.batch_size)
        n_main, n_mtp = self._global_counts(global_indices)
        per_rank = cfg.batch_size // world
        mine = global_indices[rank * per_rank:(rank + 1) * per_rank]
        micro = cfg.micro_batch_size
        chunks = [mine[i:i + micro] for i in range(0, len(mine), micro)]
        lr = cfg.lr * lr_factor(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for indexer in self.indexers:  # V3.2: dense attention while the indexer warms up
            indexer.dense = self.step < cfg.indexer_warmup_steps
        loads = torch.zeros(len(self.moe_layers), self.moe_layers[0].experts.n_experts) if self.moe_layers else None
        main_sum = mtp_sum = aux_sum = 0.0
        for i, chunk in enumerate(chunks):
            x, y, mask = self.loader.batch(chunk)
            x, y = x.to(self.device), y.to(self.device)
            mask = mask.to(self.device) if mask is not None else None
            with self.dist.no_sync(self.module, last=i == len(chunks) - 1), self.autocast():
                main, mtp, aux = self.module(x, y, mask, cfg.mtp_lambda if self.with_mtp else 0.0)
                # Sums over this micro-batch divided by global counts: accumulated over micro-batches and
                # averaged by data parallelism (hence * world) this is exactly the global-batch mean.
                loss = main / max(n_main, 1)
                if self.with_mtp:
                    loss = loss + cfg.mtp_lambda * mtp / max(sum(n_mtp), 1)
                loss = (loss + aux * len(chunk) / cfg.batch_size) * world
            loss.backward()
            main_sum += float(main.detach())
            mtp_sum += float(mtp.detach())
            aux_sum += float(aux.detach()) * len(chunk) / cfg.batch_size
            if loads is not None:
                loads += torch.stack([m.last_expert_load.float().cpu() for m in self.moe_layers])
        sums = self.dist.all_reduce_sum(torch.tensor([main_sum, mtp_sum, aux_sum]))
        if loads is not None:
            loads = self.dist.all_reduce_sum(loads)
        main_loss = float(sums[0]) / max(n_main, 1)
        mtp_loss = float(sums[1]) / max(sum(n_mtp), 1) if n_mtp else 0.0
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip))
        finite = math.isfinite(main_loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.bad_streak = 0
            if loads is not None:
                self._update_expert_bias(loads)
        else:
            self.bad_streak += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += cfg.batch_size * cfg.seq_len
        record = {"step": self.step, "loss": main_loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": self.tokens_seen, "skipped": not finite}
        if self.with_mtp:
            record["mtp_loss"] = mtp_loss
        if (cfg.seq_aux_alpha > 0 and loads is not None) or self.indexers:
            record["aux_loss"] = float(sums[2])
        if loads is not None:
            per_layer = loads / loads.sum(-1, keepdim=True).clamp(min=1)
            record["expert_load_max_over_mean"] = (per_layer.max(-1).values * per_layer.shape[-1]).tolist()
        return record

    @torch.no_grad()
    def _update_expert_bias(self, loads: torch.Tensor) -> None:
        """Aux-loss-free balancing (DeepSeek-V3 report, section 2.1.2): b_i += gamma * sign(mean load - load_i)."""
        gamma = self.cfg.bias_update_gamma
        if gamma <= 0:
            return
        for layer, load in zip(self.moe_layers, loads):
            if layer.gate.e_score_correction_bias is not None:
                update_balance_bias(layer.gate.e_score_correction_bias, load, gamma)

    # ---- evaluation ----
    @torch.no_grad()
    def validation_loss(self, max_windows: int = 256) -> dict:
        """Every rank runs the same validation batches through the (possibly sharded) training module."""
        if self.val_loader is None:
            return {}
        from ..data.shards import iter_eval_batches

        self.module.eval()
        total, count = 0.0, 0
        for x, y, mask in iter_eval_batches(self.val_loader, self.cfg.micro_batch_size, max_windows):
            mask = mask.to(self.device) if mask is not None else None
            with self.autocast():
                main, _, _ = self.module(x.to(self.device), y.to(self.device), mask, 0.0)
            total += float(main)
            count += int(mask.sum()) if mask is not None else y.numel()
        self.module.train()
        loss = total / max(count, 1)
        bytes_per_token = self.val_loader.meta.get("bytes_per_token") or 1.0
        return {"val_loss": loss, "val_bpb": loss / log_ln2 / bytes_per_token}

    def evaluate(self) -> dict:
        out = self.validation_loss()
        if self.evaluator is not None:
            from .checkpointing import full_model_state

            state = full_model_state(self.module)  # collective under FSDP: every rank takes part
            if self.dist.is_main:
                out.update(self.evaluator(self.model.config, state))
        self.dist.barrier()
        return out if self.dist.is_main else {}

    # ---- the loop ----
    def fit(self, resume: bool = False) -> Path:
        cfg = self.cfg
        if resume and self.resume() and self.dist.is_main:
            print(f"resumed {self.stage} from step {self.step}")
        self.model.train()
        bar = None
        if self.show_progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=self.stage, unit="step", dynamic_ncols=True)
        last_time, last_tokens = time.perf_counter(), self.tokens_seen
        deadline = time.perf_counter() + cfg.max_seconds if cfg.max_seconds else None
        # One process alone: a checkpoint taken on several ranks is collective, and they may see a signal in
        # different steps.
        stop, interrupted = StopRequests(enabled=self.dist.world_size == 1), None
        try:
            while self.step < cfg.steps:
                if deadline is not None and time.perf_counter() > deadline:
                    self.metrics.event({"step": self.step, "event": f"wall-time budget of {cfg.max_seconds} s "
                                                                    "reached: stopping"})
                    break
                record = self.train_step()
                if record["skipped"]:
                    self.metrics.event({"step": self.step, "event": "non-finite loss or gradient: step skipped",
                                        "loss": record["loss"], "grad_norm": record["grad_norm"]})
                    if self.bad_streak >= cfg.max_bad_steps:
                        raise TrainingError(
                            f"{self.stage}: loss or gradient was NaN/Inf for {self.bad_streak} steps in a row (step "
                            f"{self.step}); stopped. The last good checkpoint is in {self.checkpoint_dir()}; "
                            "lower the learning rate or check the data, then resume with --resume")
                now = time.perf_counter()
                elapsed = now - last_time
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    tok_s = (self.tokens_seen - last_tokens) / max(elapsed, 1e-9)
                    record["tok_s"] = tok_s
                    record["mfu"] = tok_s * self.flops_per_token / self.peak_flops
                    last_time, last_tokens = now, self.tokens_seen
                    if bar is not None:
                        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tok_s:,.0f}",
                                        mfu=f"{100 * record['mfu']:.1f}%")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                    record.update(self.evaluate())
                    last_time = time.perf_counter()
                self.metrics.log(record)
                if bar is not None:
                    bar.update(1)
                saved = None
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    saved = self.save()
                    last_time = time.perf_counter()
                if stop.signal is not None and self.step < cfg.steps:
                    interrupted = saved or self.save()
                    break
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
        if interrupted is not None:
            print(f"{self.stage}: stopped by {signal.Signals(stop.signal).name} after step {self.step}; checkpoint "
                  f"{interrupted}; continue with --resume", file=sys.stderr, flush=True)
            raise KeyboardInterrupt
        final_eval = self.evaluate()
        if final_eval:
            self.metrics.log({"step": self.step, "final": True, **final_eval})
        path = self.save(final=True)
        if self.dist.is_main:
            (self.out_dir / "summary.json").write_text(json.dumps(
                {"stage": self.stage, "steps": self.step, "tokens": self.tokens_seen, **final_eval}, indent=2) + "\n")
        return path
