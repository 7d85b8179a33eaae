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
    monkeypatch.setattr(dial, "training_rate", lambda recipe, device, autocast: 100.0)
    recipe = _recipe(tmp_path, minutes=60, reference_minutes=15, reference_tokens_per_second=800)
    cfg = stage_config(recipe, "pretrain")  # 60/15 x 100/800 = 0.5
    assert (cfg.steps, cfg.warmup_steps, cfg.save_every) == (450, 25, 125)
    assert cfg.batch_size == stage_config({"run": {"name": "x"}}, "pretrain").batch_size  # sizes, not shapes
    record = json.loads((tmp_path / "r" / "budget.json").read_text())
    assert record["scale"] == 0.5 and record["tokens_per_second"] == 100
    # Later stages (and resumes) read the recorded scale, whatever the machine measures now.
    monkeypatch.setattr(dial, "training_rate", lambda recipe, device, autocast: 1.0)
    later = stage_config(recipe, "distill")
    assert (later.steps, later.problems) == (1200, 8000)


def test_a_machine_as_fast_as_the_reference_runs_the_recipe_as_written(tmp_path, monkeypatch):
    monkeypatch.setattr(dial, "training_rate", lambda recipe, device, autocast: 900.0)
    cfg = stage_config(_recipe(tmp_path, minutes=60, reference_minutes=15, reference_tokens_per_second=800), "pretrain")
    assert cfg.steps == 900


@pytest.mark.parametrize("run", [{}, {"minutes": 0, "reference_minutes": 15, "reference_tokens_per_second": 800}])
def test_no_dial_leaves_the_recipe_alone(tmp_path, run):
    assert stage_config(_recipe(tmp_path, **run), "pretrain").steps == 900
    assert not (tmp_path / "r" / "budget.json").exists()


def test_the_training_rate_probe_trains_the_recipe_s_own_model(tmp_path):
    import torch

    recipe = {"model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "num_key_value_heads": 2, "n_routed_experts": 4, "num_experts_per_tok": 2,
                        "moe_intermediate_size": 32, "kv_lora_rank": 16, "q_lora_rank": 32, "qk_nope_head_dim": 16,
                        "qk_rope_head_dim": 8, "v_head_dim": 16, "first_k_dense_replace": 1},
              "tokenizer": {"vocab_size": 100}, "train": {"micro_batch_size": 2, "seq_len": 32}}
    assert dial.training_rate(recipe, torch.device("cpu"), None) > 0


@pytest.mark.parametrize("rate,expected", [
    (100.0, "every stage's steps x 0.5 (= min(1, 60 min / 15 min x 100 / 800 tokens/s)"),
    (900.0, "the recipe as written (at this rate it fits in its 60 minutes: the reference ran it in 15 at 800"),
])
def test_the_report_states_the_dial_s_decision(tmp_path, monkeypatch, rate, expected):
    from nanoseek.train.report import write_report

    monkeypatch.setattr(dial, "training_rate", lambda recipe, device, autocast: rate)
    stage_config(_recipe(tmp_path, minutes=60, reference_minutes=15, reference_tokens_per_second=800), "pretrain")
    report = write_report(tmp_path / "r").read_text()
    assert expected in report and f"{int(rate)} training tokens/s measured before the run" in report
