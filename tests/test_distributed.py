"""Data parallelism on CPU (gloo, 2 processes): the loss curve and the expert-balancing biases match one
process with the same global batch, under DDP and under FSDP2."""

import json
import subprocess
import sys

import pytest
import torch

from nanoseek.checkpoint import load_model
from nanoseek.train.metrics import read_metrics
import procs
from recipes import GRPO_SIGNAL as GRPO, SIGNAL_REWARDS, policy_dtypes, write_tiny_recipe
from serving import free_port, wait_until

CLI = ["-m", "nanoseek.cli", "train", "pretrain", "--no-progress"]


def _run(recipe, nproc, *overrides):
    if nproc == 1:
        cmd = [sys.executable, *CLI, "--recipe", str(recipe), *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
               *CLI, "--recipe", str(recipe), *overrides]
    r = procs.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def _biases(path):
    model = load_model(path)
    return torch.stack([m.gate.e_score_correction_bias for m in model.modules() if hasattr(m, "gate")])


@pytest.mark.parametrize("dtype", policy_dtypes())
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(tmp_path, parallel, dtype):
    steps = ["pretrain.steps=5", "train.micro_batch_size=2", f"train.parallel={parallel}", f"train.dtype={dtype}"]
    single, double = write_tiny_recipe(tmp_path, "one"), write_tiny_recipe(tmp_path, "two")
    _run(single, 1, *steps)
    _run(double, 2, *steps)
    runs = tmp_path / "runs"
    la = [r["loss"] for r in read_metrics(runs / "one" / "pretrain" / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(runs / "two" / "pretrain" / "metrics.jsonl") if "loss" in r]
    assert len(la) == len(lb) == 5
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)
    ba, bb = _biases(runs / "one" / "pretrain" / "model"), _biases(runs / "two" / "pretrain" / "model")
    assert ba.abs().sum() > 0 and torch.allclose(ba, bb, atol=1e-6)
    wa = load_model(runs / "one" / "pretrain" / "model").state_dict()
    wb = load_model(runs / "two" / "pretrain" / "model").state_dict()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4



def test_grpo_on_two_processes_matches_one_and_resumes_after_sigkill(tmp_path):
    """torchrun GRPO: each rank rolls out half the prompts (seeded by their global index) and trains on half the
    micro-batches, gradients summed over the ranks: the same rewards, losses and final weights as one process; and
    a 2-process run killed mid-way and resumed ends where the uninterrupted one did."""
    import shutil

    recipe = write_tiny_recipe(tmp_path, "g", extra=GRPO)
    (tmp_path / "signal_rewards.py").write_text(SIGNAL_REWARDS)  # importable from the working directory
    common = ["train.dtype=float32", "eval.during_training=false"]
    for stage, steps in (("pretrain", 3), ("sft", 2)):
        r = procs.run([sys.executable, "-m", "nanoseek.cli", "train", stage, "--no-progress", "--recipe", str(recipe),
                       f"{stage}.steps={steps}", *common], capture_output=True, text=True, timeout=280,
                      cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
    grpo = ["-m", "nanoseek.cli", "train", "grpo", "--no-progress", "--recipe", str(recipe), *common]
    r = procs.run([sys.executable, *grpo], capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = tmp_path / "runs" / "g"
    shutil.move(runs / "grpo", runs / "grpo_one")
    r = procs.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   *grpo], capture_output=True, text=True, timeout=280, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    one = [m for m in read_metrics(runs / "grpo_one" / "metrics.jsonl") if "reward_mean" in m]
    two = [m for m in read_metrics(runs / "grpo" / "metrics.jsonl") if "reward_mean" in m]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["reward_mean"] == b["reward_mean"] and a["completion_length_mean"] == b["completion_length_mean"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-4)
    assert any(a["grad_norm"] > 0 for a in one)  # it learned something: the comparison is not of no-ops
    wa = load_model(runs / "grpo_one" / "model").state_dict()
    wb = load_model(runs / "grpo" / "model").state_dict()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4  # Adam steps of lr 1e-3, sums reordered
    # SIGKILL after the step-2 checkpoint, then --resume: the same step 3 and final weights as without the kill.
    shutil.move(runs / "grpo", runs / "grpo_two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *grpo, "grpo.save_every=1"]
    with procs.spawn([*torchrun[:4], f"--master_port={free_port()}", *torchrun[4:]], cwd=tmp_path,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        assert wait_until(lambda: (runs / "grpo" / "checkpoints" / "step_000002").exists(), timeout=240)
    assert not (runs / "grpo" / "model").exists()  # killed before the end
    r = procs.run([*torchrun[:4], f"--master_port={free_port()}", *torchrun[4:], "--resume"], capture_output=True,
                  text=True, timeout=280, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = [m for m in read_metrics(runs / "grpo" / "metrics.jsonl") if "reward_mean" in m]
    assert resumed[-1]["step"] == 3 and resumed[-1]["reward_mean"] == two[-1]["reward_mean"]
    assert resumed[-1]["loss"] == pytest.approx(two[-1]["loss"], rel=1e-5, abs=1e-7)
    wc = load_model(runs / "grpo" / "model").state_dict()
    assert max((wb[k] - wc[k]).abs().max().item() for k in wb) < 1e-6


def test_distillation_on_two_processes_matches_one(chat_checkpoint, tmp_path):
    """torchrun distillation: each rank samples the teacher on half the problems, the traces are gathered in
    problem order, the student trains under DDP: the same traces, losses and student as one process."""
    directory, _ = chat_checkpoint("deepseek_v3")
    recipe = tmp_path / "distill.toml"
    recipe.write_text(f"""
[run]
name = "one"
out_dir = "{tmp_path / 'runs'}"
seed = 0

[tokenizer]
path = "{directory}"

[student]
model_type = "qwen2"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1
max_position_embeddings = 256

[distill]
teacher = "{directory}"
problems = 6
k = 2
temperature = 1.0
max_tokens = 12
eval_problems = 4
steps = 3
seq_len = 64
batch_size = 4
micro_batch_size = 2
keep = "all"
warmup_steps = 0
save_every = 0
eval_every = 0
dtype = "float32"
""")
    cli = ["-m", "nanoseek.cli", "distill", "--no-progress", "--recipe", str(recipe)]
    r = procs.run([sys.executable, *cli], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    r = procs.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                   *cli, "run.name=two"], capture_output=True, text=True, timeout=280)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = tmp_path / "runs" / "one" / "distill", tmp_path / "runs" / "two" / "distill"
    traces = (one / "traces.jsonl").read_text()
    assert traces == (two / "traces.jsonl").read_text() and traces.count("\n") >= 6
    la = [m["loss"] for m in read_metrics(one / "student" / "metrics.jsonl") if "loss" in m]
    lb = [m["loss"] for m in read_metrics(two / "student" / "metrics.jsonl") if "loss" in m]
    assert len(la) == len(lb) == 3 and la == pytest.approx(lb, rel=1e-4, abs=1e-5)
    wa, wb = load_model(one / "student" / "model").state_dict(), load_model(two / "student" / "model").state_dict()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    assert json.loads((two / "summary.json").read_text())["kept"] == json.loads((one / "summary.json").read_text())["kept"]
