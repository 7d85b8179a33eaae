"""The main job in its smoke configuration: the whole pipeline, end to end, exactly as the README runs it."""

import json
import os
import shutil
from pathlib import Path

import pytest

import procs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)  # the whole pipeline, and on a fresh machine the first build of the CPU kernels
def test_speedrun_smoke_runs_every_stage_and_writes_the_report(tmp_path):
    run = ROOT / "runs" / "speedrun_smoke"
    shutil.rmtree(run, ignore_errors=True)
    r = procs.run(["bash", "scripts/speedrun.sh", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                       timeout=880, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "nanoseek chat --model" in r.stdout
    for path in ("tokenizer/tokenizer.json", "pretrain/model/config.json", "sft/model/config.json",
                 "pretrain/loss.png", "sft/expert_load.png", "eval_sft.json", "timing.json", "report.md",
                 "grpo/model/config.json", "grpo/grpo.png", "eval_grpo.json", "distill/student/model/config.json",
                 "eval_distill.json"):
        assert (run / path).exists(), path
    report = (run / "report.md").read_text()
    for section in ("## Model", "## Stages", "## Held-out accuracy", "## Sample conversations", "active per token",
                    "## SFT vs GRPO vs distilled student", "| distilled student |"):
        assert section in report, section
    timing = json.loads((run / "timing.json").read_text())
    assert timing["total_seconds"] >= timing["through_sft_eval"] and timing["grpo"] >= 0
    for stage in ("pretrain", "sft", "grpo", "distill/student"):  # the report's stage table shows each wall time
        assert json.loads((run / stage / "summary.json").read_text())["wall_seconds"] > 0, stage
    student = json.loads((run / "distill" / "student" / "model" / "config.json").read_text())
    assert student["model_type"] == "qwen2"  # a dense student, from the recipe's [student] section
    for stage in ("pretrain", "sft", "grpo"):  # the in-training evaluator ran on its 4 held-out problems
        summary = json.loads((run / stage / "summary.json").read_text())
        assert 0 <= summary["task_pass@1"] <= 1 and any(k.startswith("task_pass@1_level") for k in summary), stage
    # Rejection sampling judged the recorded smoke teacher: its 10 wrong traces of 40 were dropped.
    traces = [json.loads(line) for line in (ROOT / "recipes" / "smoke_teacher_traces.jsonl").read_text().splitlines()]
    distill = json.loads((run / "distill" / "summary.json").read_text())
    assert (distill["traces"], distill["kept"], distill["acceptance"]) == (40, 30, 0.75)
    kept = [json.loads(line) for line in (run / "distill" / "traces.jsonl").read_text().splitlines()]
    assert all(t["messages"][-1]["content"].endswith(f"The answer is {r['answer']}.")
               for t, r in zip(kept, [r for i, r in enumerate(traces) if i % 4 != 3]))
    result = json.loads((run / "eval_sft.json").read_text())["greedy"]
    assert result["overall"]["problems"] == 20 and set(result["levels"]) == {"1", "2", "3"}
    shutil.rmtree(run, ignore_errors=True)
