"""Data parallelism on CPU (gloo, 2 processes): the loss curve and the expert-balancing biases match one
process with the same global batch, under DDP and under FSDP2."""

import sys

import pytest
import torch

from nanoseek.checkpoint import load_model
from nanoseek.train.metrics import read_metrics
import procs
from recipes import policy_dtypes, write_tiny_recipe
from serving import free_port

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
