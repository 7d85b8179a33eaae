"""The trainer: learning, accumulation equivalence, exact resume after SIGKILL, NaN handling, SFT masking."""

import json
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch

from nanoseek.checkpoint import load_model
from nanoseek.train.metrics import loss_scale, plot_metrics, read_metrics
from nanoseek.train.recipe import load_recipe, stage_config
from nanoseek.train.stages import run_stage
from nanoseek.train.trainer import TrainingError, lr_factor
import procs
from recipes import policy_dtypes, write_tiny_recipe

CLI = [sys.executable, "-m", "nanoseek.cli"]
POLICY_DTYPES = policy_dtypes()


def _losses(run_dir, stage="pretrain"):
    return [r["loss"] for r in read_metrics(run_dir / stage / "metrics.jsonl") if "loss" in r and not r.get("event")]


def test_pretrain_then_sft_learns_and_writes_everything(tmp_path):
    recipe = load_recipe(write_tiny_recipe(tmp_path), ["pretrain.steps=30", "train.lr=1e-2"])
    path = run_stage(recipe, "pretrain", show_progress=False)
    run = tmp_path / "runs" / "tiny"
    losses = _losses(run)
    assert losses[-1] < 0.6 * losses[0]
    for f in ("loss.png", "lr.png", "expert_load.png", "summary.json", "metrics.jsonl"):
        assert (run / "pretrain" / f).exists(), f
    summary = json.loads((run / "pretrain" / "summary.json").read_text())
    assert summary["val_bpb"] > 0 and summary["tokens"] == 30 * 8 * 64
    model = load_model(path)
    assert len(model.mtp) == 1  # MTP trained and saved
    loads = [r["expert_load_max_over_mean"] for r in read_metrics(run / "pretrain" / "metrics.jsonl") if
             "expert_load_max_over_mean" in r]
    assert len(loads) == 30 and all(len(x) == 2 for x in loads)  # the MoE layer and the MTP block, every step
    record = read_metrics(run / "pretrain" / "metrics.jsonl")[5]
    assert {"mtp_loss", "aux_loss", "expert_load_max_over_mean", "tok_s", "mfu", "lr", "grad_norm"} <= set(record)
    sft = run_stage(recipe, "sft", show_progress=False)
    assert (sft / "tokenizer.json").exists() and (sft / "config.json").exists()


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    a = load_recipe(write_tiny_recipe(tmp_path, "a"), ["pretrain.steps=4", "train.micro_batch_size=8"])
    b = load_recipe(write_tiny_recipe(tmp_path, "b"), ["pretrain.steps=4", "train.micro_batch_size=2"])
    run_stage(a, "pretrain", show_progress=False)
    run_stage(b, "pretrain", show_progress=False)
    la, lb = _losses(tmp_path / "runs" / "a"), _losses(tmp_path / "runs" / "b")
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)


def test_balance_bias_moves_towards_the_mean_load():
    from nanoseek.model.moe import update_balance_bias

    bias = torch.zeros(4)
    update_balance_bias(bias, torch.tensor([10.0, 0.0, 5.0, 5.0]), 0.01)
    assert torch.allclose(bias, torch.tensor([-0.01, 0.01, 0.0, 0.0]))


def test_lr_schedules():
    cfg = stage_config({"train": {"steps": 100, "warmup_steps": 10, "min_lr_ratio": 0.1}}, "pretrain")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(99, cfg.replace(schedule="cosine")) == pytest.approx(0.1, abs=0.01)
    wsd = cfg.replace(schedule="wsd", decay_fraction=0.2)
    assert lr_factor(50, wsd) == 1.0 and lr_factor(79, wsd) == 1.0 and lr_factor(99, wsd) == pytest.approx(0.145, abs=0.01)


def test_loss_plots_take_a_log_axis_only_for_positive_losses(tmp_path):
    assert loss_scale([4.1, 0.3, float("nan")]) == "log"
    assert loss_scale([0.02, -0.01]) == "linear"  # a policy-gradient loss crosses zero
    assert loss_scale([]) == "linear"
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": loss, "lr": 1e-4}) + "\n"
                               for s, loss in enumerate([-0.05, -0.03, -0.01, -0.02])))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib warns when a log axis has no positive value to show
        written = plot_metrics(metrics, tmp_path, "grpo")
    assert tmp_path / "loss.png" in written and (tmp_path / "loss.png").stat().st_size > 0


def _state(path):
    return load_model(path).state_dict()


@pytest.mark.parametrize("dtype", POLICY_DTYPES)
def test_resume_after_sigkill_is_bitwise_identical(tmp_path, dtype):
    steps = ["pretrain.steps=14", "pretrain.save_every=3", "train.keep_checkpoints=5", f"train.dtype={dtype}"]
    ref_recipe = write_tiny_recipe(tmp_path, "ref")
    procs.run(CLI + ["train", "pretrain", "--recipe", str(ref_recipe), "--no-progress", *steps], check=True,
                   capture_output=True)
    killed_recipe = write_tiny_recipe(tmp_path, "killed")
    run = tmp_path / "runs" / "killed" / "pretrain"
    with procs.spawn(CLI + ["train", "pretrain", "--recipe", str(killed_recipe), "--no-progress", *steps,
                            "train.lr=3e-3"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as proc:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "checkpoints" / "step_000006").exists():
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model").exists()  # it really died mid-run
    procs.run(CLI + ["train", "pretrain", "--recipe", str(killed_recipe), "--no-progress", "--resume", *steps],
                   check=True, capture_output=True)
    a, b = _state(tmp_path / "runs" / "ref" / "pretrain" / "model"), _state(run / "model")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps_logged = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps_logged == list(range(1, 15))  # no duplicated or missing steps after the resume


def test_ctrl_c_checkpoints_the_step_it_stopped_at_and_the_resume_is_bitwise_identical(tmp_path):
    steps = ["pretrain.steps=40", "pretrain.save_every=0", "pretrain.eval_every=0"]  # no checkpoint but the stop's
    procs.run(CLI + ["train", "pretrain", "--recipe", str(write_tiny_recipe(tmp_path, "ref")), "--no-progress",
                     *steps], check=True, capture_output=True)
    recipe = write_tiny_recipe(tmp_path, "stopped")
    run = tmp_path / "runs" / "stopped" / "pretrain"
    # A terminal's foreground run: SIGINT at its default, whatever this test process inherited (CI started in the
    # background ignores it, and a process started ignoring SIGINT keeps ignoring it).
    with procs.spawn(CLI + ["train", "pretrain", "--recipe", str(recipe), "--no-progress", *steps],
                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as proc:
        deadline = time.time() + 120
        while time.time() < deadline and len(read_metrics(run / "metrics.jsonl")) < 5:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        err = proc.stderr.read()
        proc.wait()
    assert proc.returncode == 130, err[-2000:]
    stopped_at = max(r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r)
    assert 5 <= stopped_at < 40 and not (run / "model").exists()
    checkpoint = run / "checkpoints" / f"step_{stopped_at:06d}"
    assert f"stopped by SIGINT after step {stopped_at}; checkpoint {checkpoint}; continue with --resume" in err
    assert [p.name for p in (run / "checkpoints").iterdir()] == [checkpoint.name]
    procs.run(CLI + ["train", "pretrain", "--recipe", str(recipe), "--no-progress", "--resume", *steps], check=True,
              capture_output=True)
    a, b = _state(tmp_path / "runs" / "ref" / "pretrain" / "model"), _state(run / "model")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_stop_requests_leave_an_ignored_sigint_ignored_and_restore_the_handlers():
    from nanoseek.train.trainer import StopRequests

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # how a background or nohup job starts
        stop = StopRequests(enabled=True)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == stop._ask
        stop._ask(signal.SIGTERM, None)  # a SIGTERM arrives: the ignored SIGINT is not armed by it
        assert stop.signal == signal.SIGTERM and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        stop.restore()
        assert signal.getsignal(signal.SIGTERM) == before[1]
        assert StopRequests(enabled=False)._previous == {}  # several ranks: nothing installed
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])


def test_repeated_nan_losses_stop_the_run_and_keep_the_last_good_checkpoint(tmp_path, monkeypatch):
    from nanoseek.train import trainer as trainer_module

    original = trainer_module.Trainer.train_step

    def poisoned(self):
        if self.step == 4:  # simulate a divergence: a weight becomes NaN
            with torch.no_grad():
                self.model.lm_head.weight[0, 0] = float("nan")
        return original(self)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", poisoned)
    recipe = load_recipe(write_tiny_recipe(tmp_path), ["pretrain.steps=20", "pretrain.save_every=2",
                                                       "train.max_bad_steps=3"])
    with pytest.raises(TrainingError, match="NaN/Inf for 3 steps"):
        run_stage(recipe, "pretrain", show_progress=False)
    run = tmp_path / "runs" / "tiny" / "pretrain"
    events = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event")]
    assert len(events) == 3 and all("skipped" in e["event"] for e in events)
    good = load_model(run / "checkpoints" / "step_000004")
    assert all(torch.isfinite(t).all() for t in good.state_dict().values())


def test_sft_trains_only_on_assistant_tokens(tmp_path):
    """Changing the prompt tokens' targets must not change the SFT loss: they are masked out."""
    from nanoseek.data.shards import PackedLoader
    from nanoseek.train.trainer import LossModule

    recipe = load_recipe(write_tiny_recipe(tmp_path), ["pretrain.steps=2", "sft.steps=1"])
    run_stage(recipe, "pretrain", show_progress=False)
    run_stage(recipe, "sft", show_progress=False)
    loader = PackedLoader(tmp_path / "runs" / "tiny" / "data" / "sft" / "train", 64)
    x, y, mask = loader.batch([0, 1])
    assert 0 < mask.float().mean() < 1
    module = LossModule(load_model(tmp_path / "runs" / "tiny" / "sft" / "model"))
    main, _, _ = module(x, y, mask, 0.0)
    y2 = torch.where(mask, y, torch.zeros_like(y))
    main2, _, _ = module(x, y2, mask, 0.0)
    assert torch.equal(main, main2)


def test_bad_recipe_keys_and_overrides_are_clear_errors(tmp_path):
    r = procs.run(CLI + ["train", "pretrain", "--recipe", str(write_tiny_recipe(tmp_path)), "pretrain.stepz=3"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "stepz" in r.stderr and "Traceback" not in r.stderr
    r = procs.run(CLI + ["train", "pretrain", "--recipe", str(tmp_path / "missing.toml")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr
