"""Training metrics: JSON lines on disk and PNG plots (loss, learning rate, expert load balance; GRPO's reward,
completion length and diagnostics)."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def event(self, record: dict) -> None:
        self.log({"event": True, **record})

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines from steps the resumed run will redo."""
        if not (self.enabled and self.path.exists()):
            return
        keep = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in keep))


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_scale(values: list[float]) -> str:
    """A cross-entropy falls over decades and reads best on a log axis; a policy-gradient loss (GRPO) crosses zero,
    where a log axis would drop every point at or below it."""
    finite = [v for v in values if math.isfinite(v)]
    return "log" if finite and min(finite) > 0 else "linear"


def plot_metrics(metrics_path: Path, out_dir: Path, title: str = "") -> list[Path]:
    """loss.png (train and validation), lr.png, expert_load.png; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if not r.get("event")]
    steps = [r for r in records if "loss" in r]
    out_dir = Path(out_dir)
    written = []
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        plotted = [r["loss"] for r in steps]
        ax.plot([r["step"] for r in steps], plotted, label="train", lw=1)
        if any("mtp_loss" in r for r in steps):
            mtp = [r for r in steps if "mtp_loss" in r]
            plotted += [r["mtp_loss"] for r in mtp]
            ax.plot([r["step"] for r in mtp], [r["mtp_loss"] for r in mtp], label="MTP (depth 1)", lw=1, alpha=0.7)
        val = [r for r in records if "val_loss" in r]
        if val:
            plotted += [r["val_loss"] for r in val]
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
        ax.set_xlabel("step")
        scale = loss_scale(plotted)
        ax.set_ylabel("loss (nats/token)" if scale == "log" else "loss")  # a cross-entropy, or a policy loss
        ax.set_yscale(scale)
        ax.set_title(f"{title} loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "loss.png")

        fig, ax = plt.subplots(figsize=(6, 2.5))
        ax.plot([r["step"] for r in steps], [r["lr"] for r in steps])
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        fig.tight_layout()
        fig.savefig(out_dir / "lr.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "lr.png")

    loads = [r for r in steps if "expert_load_max_over_mean" in r]
    if loads:
        fig, ax = plt.subplots(figsize=(6, 3))
        per_layer = list(zip(*[r["expert_load_max_over_mean"] for r in loads]))
        for i, series in enumerate(per_layer):
            ax.plot([r["step"] for r in loads], series, lw=1, label=f"MoE layer {i}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("max / mean expert load")
        ax.set_title("expert load balance (1 = perfect)")
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(out_dir / "expert_load.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "expert_load.png")
    return written


def plot_grpo(metrics_path: Path, out_dir: Path) -> Path | None:
    """reward / accuracy, completion length, KL / clip fraction / entropy over steps: grpo.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
