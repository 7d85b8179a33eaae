"""Rejection sampling's teachers: a local model, an OpenAI-compatible endpoint, recorded traces."""

import json

import pytest

from nanoseek.data.sources import completion_text, task_problems
from nanoseek.data.verify import verify
from nanoseek.errors import ConfigError
from nanoseek.train.distill import recorded_traces, run_distill, teacher_traces
from nanoseek.train.engines import engine_precision
from serving import live_server


def test_a_served_teacher_writes_the_traces_its_local_engine_writes(chat_checkpoint):
    directory, _ = chat_checkpoint("deepseek_v3")
    problems = task_problems("arithmetic", [1, 2], 3, 0, "train")
    local = teacher_traces(str(directory), problems, k=2, temperature=0.0, max_tokens=12)
    assert [m for m, _, _ in local] == [[{"role": "user", "content": p.question}] for p in problems for _ in range(2)]
    with live_server(directory, dtype=engine_precision()) as (base, _, _):  # the local teacher's precision
        served = teacher_traces(base, problems, k=2, temperature=0.0, max_tokens=12)
    # Greedy, so both samples agree, and the API's reasoning/content split is undone exactly.
    assert [t for _, t, _ in served] == [t for _, t, _ in local]
    assert all(ok is False for _, _, ok in local)  # an untrained model finishes no correct trace


def test_recorded_traces_are_judged_by_the_verifier(tmp_path):
    right, wrong = task_problems("arithmetic", [2], 2, 0, "train")
    rows = [{"question": right.question, "answer": right.answer, "completion": completion_text(right)},
            {"question": wrong.question, "answer": wrong.answer,
             "completion": completion_text(wrong).replace(f"is {wrong.answer}.", f"is {int(wrong.answer) + 1}.")},
            {"question": "Say hi.", "answer": "hi", "completion": "</think>\n\nHi", "verifier": "exact"}]
    path = tmp_path / "traces.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    traces = recorded_traces(path, "numeric")
    assert [ok for _, _, ok in traces] == [True, False, True]
    assert traces[0][0] == [{"role": "user", "content": right.question}] and traces[1][1] == rows[1]["completion"]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "q", "completion": "c"}) + "\n")
    with pytest.raises(ConfigError, match=r"traces\.jsonl line 2: need a JSON object with question, answer"):
        recorded_traces(path, "numeric")


def test_distilling_from_a_url_reports_the_teachers_accuracy(chat_checkpoint, tmp_path):
    directory, _ = chat_checkpoint("deepseek_v3")
    student = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
               "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256}
    recipe = {"run": {"name": "url", "out_dir": str(tmp_path), "seed": 0}, "tokenizer": {"path": str(directory)},
              "student": student,
              "distill": {"problems": 4, "k": 1, "max_tokens": 8, "eval_problems": 5, "steps": 2, "seq_len": 64,
                          "batch_size": 2, "micro_batch_size": 2, "keep": "all", "warmup_steps": 0,
                          "save_every": 0, "eval_every": 0, "dtype": "float32"}}
    with live_server(directory) as (base, _, _):
        summary = run_distill(recipe, teacher=base, show_progress=False)
    result = json.loads((tmp_path / "url" / "eval_distill.json").read_text())
    assert result["teacher"]["overall"]["problems"] == 5 and summary["teacher_pass@1"] == 0.0
    assert result["student"]["overall"]["problems"] == 5 and summary["traces"] == 4


def test_distill_names_missing_recorded_traces(tmp_path):
    recipe = {"run": {"name": "x", "out_dir": str(tmp_path), "seed": 0}}
    with pytest.raises(ConfigError, match="teacher traces .*nope.jsonl do not exist"):
        run_distill(recipe, teacher=str(tmp_path / "nope.jsonl"))


def test_the_shipped_smoke_teacher_is_right_on_three_in_four():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "smoke_teacher_traces.jsonl"
    flags = [ok for _, _, ok in recorded_traces(path, "numeric")]
    assert len(flags) == 40 and flags == [i % 4 != 3 for i in range(40)]
    assert verify("The answer is 3.", "3")
