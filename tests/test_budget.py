"""The compute dial (nanoseek/train/budget.py): a recipe tuned on one machine, sized for this one."""

import json

import pytest

from nanoseek.train import budget as dial
from nanoseek.train import distill  # noqa: F401  (registers the [distill] keys)
from nanoseek.train.recipe import stage_config


def _recipe(tmp_path, **run):
    return {"run": {"name": "r", "out_dir": str(tmp_path), **run},
            "pretrain": {"steps": 900, "warmup_steps": 50, "save_every": 250},
            "distill": {"steps": 2400, "problems": 16000}}


def test_a_slower_machine_scales_every_stage_and_keeps_the_scale_for_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(dial, "peak_flops", lambda dtype, device: 100e9)
    recipe = _recipe(tmp_path, minutes=60, reference_minutes=15, reference_gflops=800)
    cfg = stage_config(recipe, "pretrain")  # 60/15 x 100/800 = 0.5
    assert (cfg["steps"], cfg["warmup_steps"], cfg["save_every"]) == (450, 25, 125)
    assert cfg["batch_size"] == stage_config({"run": {"name": "x"}}, "pretrain")["batch_size"]  # sizes, not shapes
    record = json.loads((tmp_path / "r" / "budget.json").read_text())
    assert record["scale"] == 0.5 and record["measured_gflops"] == 100.0
    # Later stages (and resumes) read the recorded scale, whatever the machine measures now.
    monkeypatch.setattr(dial, "peak_flops", lambda dtype, device: 1e9)
    distill = stage_config(recipe, "distill")
    assert (distill["steps"], distill["problems"]) == (1200, 8000)


def test_a_machine_as_fast_as_the_reference_runs_the_recipe_as_written(tmp_path, monkeypatch):
    monkeypatch.setattr(dial, "peak_flops", lambda dtype, device: 900e9)
    cfg = stage_config(_recipe(tmp_path, minutes=60, reference_minutes=15, reference_gflops=800), "pretrain")
    assert cfg["steps"] == 900


@pytest.mark.parametrize("run", [{}, {"minutes": 0, "reference_minutes": 15, "reference_gflops": 800}])
def test_no_dial_leaves_the_recipe_alone(tmp_path, run):
    assert stage_config(_recipe(tmp_path, **run), "pretrain")["steps"] == 900
    assert not (tmp_path / "r" / "budget.json").exists()
