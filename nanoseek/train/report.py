"""runs/<name>/report.md: what was trained, how long it took, how well it does."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(run: str | Path) -> Path:
    from ..config import ModelConfig
    from ..eval import format_table
    from ..model.accounting import model_cost

    run = Path(run)
    lines = [f"# nanoseek run: {run.name}", ""]
    # The distillation's student is trained by the same trainer, into distill/student.
    stages = [s for s in ("pretrain", "sft", "grpo", "distill/student") if (run / s / "summary.json").exists()]
    final = next((run / s / "model" for s in ("grpo", "sft", "pretrain") if (run / s / "model" / "config.json").exists()),
                 None)
    if final is not None:
        config = ModelConfig.from_pretrained(final)
        cost = model_cost(config)
        lines += ["## Model", "", f"- architecture: {config.model_type}, {config.num_hidden_layers} layers, hidden "
                  f"{config.hidden_size}, {config.n_routed_experts or 0} routed experts "
                  f"(top-{config.num_experts_per_tok or 0}), MTP depth {config.num_nextn_predict_layers}",
                  f"- parameters: {cost.total_params:,} total, {cost.active_params:,} active per token "
                  f"(+{cost.mtp_params:,} MTP)", f"- KV cache: {cost.kv_cache_bytes_per_token} bytes per token (bf16)",
                  ""]
    dial = run / "budget.json"
    if dial.exists():
        b = json.loads(dial.read_text())
        lines += ["## Machine and budget", "",
                  f"- CPU class {b['isa']}, training in {b['dtype']}: {b['tokens_per_second']:,} training tokens/s "
                  "measured before the run",
                  f"- compute dial: every stage's steps x {b['scale']} (= min(1, {b['minutes']} min / "
                  f"{b['reference_minutes']} min x {b['tokens_per_second']:,} / {b['reference_tokens_per_second']:,} "
                  "tokens/s), train/budget.py)" if b["scale"] < 1 else
                  "- compute dial: the recipe as written (at this rate it fits in its "
                  f"{b['minutes']} minutes: the reference ran it in {b['reference_minutes']} at "
                  f"{b['reference_tokens_per_second']:,} tokens/s)", ""]
    tok_stats = run / "tokenizer" / "stats.json"
    if tok_stats.exists():
        s = json.loads(tok_stats.read_text())
        lines += [f"Tokenizer: byte-level BPE, {s['vocab_size']} tokens, {s['bytes_per_token']:.2f} bytes per token.", ""]
    if stages:
        lines += ["## Stages", "", "| stage | steps | tokens | wall time | final val loss | val bits/byte |",
                  "|---|---|---|---|---|---|"]
        total = 0.0
        for s in stages:
            sm = json.loads((run / s / "summary.json").read_text())
            total += sm.get("wall_seconds", 0)
            lines.append(f"| {s} | {sm.get('steps', '')} | {sm.get('tokens', 0):,} | {sm.get('wall_seconds', 0) / 60:.1f} min "
                         f"| {sm.get('val_loss', float('nan')):.4f} | {sm.get('val_bpb', float('nan')):.4f} |")
        lines += ["", f"Training wall time: {total / 60:.1f} min.", ""]
        timing = run / "timing.json"
        if timing.exists():
            t = json.loads(timing.read_text())
            lines += [f"Whole job wall time: {t.get('total_seconds', 0) / 60:.1f} min "
                      f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in t.items() if k != 'total_seconds')}).", ""]
        for s in stages:
            for plot in ("loss.png", "lr.png", "expert_load.png", "grpo.png"):
                if (run / s / plot).exists():
                    lines.append(f"![{s} {plot}]({s}/{plot})")
            lines.append("")
    lines += _comparison(run)
    evals = sorted(run.glob("eval_*.json"))
    if evals:
        lines += ["## Held-out accuracy", ""]
        for e in evals:
            data = json.loads(e.read_text())
            for mode, result in data.items():
                if isinstance(result, dict) and "overall" in result:
                    lines += [format_table(result, f"**{e.stem.removeprefix('eval_')}** ({mode}, task "
                                                   f"{data.get('task')})"), ""]
        first = json.loads(evals[-1].read_text())
        samples = next((r["samples"] for r in first.values() if isinstance(r, dict) and "samples" in r), [])
        if samples:
            lines += ["## Sample conversations", ""]
            for sm in samples[:3]:
                mark = "correct" if sm["correct"] else "wrong"
                lines += [f"**User:** {sm['question']}", "", "**Assistant** "
                          f"({mark}, reference {sm['answer']}):", "", "```", sm["completion"].strip(), "```", ""]
    path = run / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _comparison(run: Path) -> list[str]:
    """SFT vs GRPO vs the distilled student on the same held-out problems (greedy pass@1), with the active
    parameters each one spends per token."""
    from ..config import ModelConfig
    from ..model.accounting import model_cost

    entries = []
    for label, file, key, model_dir in (("SFT", "eval_sft.json", "greedy", run / "sft" / "model"),
                                          ("GRPO", "eval_grpo.json", "greedy", run / "grpo" / "model"),
                                          ("distilled student", "eval_distill.json", "student",
                                           run / "distill" / "student" / "model")):
        path = run / file
        if not path.exists():
            continue
        result = json.loads(path.read_text()).get(key)
        if not isinstance(result, dict) or "overall" not in result:
            continue
        active = None
        if (model_dir / "config.json").exists():
            active = model_cost(ModelConfig.from_pretrained(model_dir)).active_params
        entries.append((label, result, active))
    if len(entries) < 2:
        return []
    levels = sorted({lv for _, r, _ in entries for lv in r["levels"]}, key=str)
    lines = ["## SFT vs GRPO vs distilled student", "", "Greedy pass@1 on the same held-out problems.", "",
             "| model | active params | all (95% CI) |" + "".join(f" level {lv} |" for lv in levels),
             "|---|---|---|" + "---|" * len(levels)]
    for label, r, active in entries:
        o = r["overall"]
        lo, hi = o.get("pass@1_ci95", (0, 0))
        cells = "".join(f" {100 * r['levels'][lv]['pass@1']:.1f}% |" if lv in r["levels"] else " - |" for lv in levels)
        lines.append(f"| {label} | {f'{active:,}' if active else '?'} | {100 * o['pass@1']:.1f}% "
                     f"({100 * lo:.1f}-{100 * hi:.1f}%) |{cells}")
    return lines + [""]
