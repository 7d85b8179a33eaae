"""Training checkpoints that lose nothing: an HF model directory plus `trainer_state/` with the optimizer
(safetensors), RNG states (safetensors) and step / data position / counters (JSON). No pickle anywhere.

Written atomically (temporary directory, then rename) by rank 0 after gathering full tensors, so a kill at any
moment leaves either the previous checkpoint or the new one, never half of one. Under FSDP2 the full state is
gathered with torch.distributed.checkpoint's state-dict helpers, so resuming works under any parallelism with
the same world size.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..checkpoint import save_model

STATE_DIR = "trainer_state"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _full(options_broadcast: bool = False) -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, cpu_offload=True, broadcast_from_rank0=options_broadcast)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {}
    for fqn, fields in state["state"].items():
        for field, value in fields.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{fqn}::{field}"] = t.detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: list) -> dict:
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        fqn, field = key.rsplit("::", 1)
        state.setdefault(fqn, {})[field] = value
    return {"state": state, "param_groups": groups}


def full_model_state(module) -> dict[str, torch.Tensor]:
    """The Transformer's full tensors from the (possibly sharded) training module, on CPU, under the
    Transformer's own names."""
    state = get_model_state_dict(module, options=_full())
    return {k.removeprefix("model."): v for k, v in state.items()}


def save_checkpoint(trainer, target: Path, state: dict) -> Path:
    """Every rank calls this (FSDP gathers collectively); rank 0 writes."""
    module, optimizer = trainer.module, trainer.optimizer
    own = full_model_state(module)
    with_optimizer = target.parent.name == "checkpoints"
    optim_state = (get_optimizer_state_dict(module, optimizer.optimizers, options=_full()) if with_optimizer
                   else None)
    if trainer.dist.is_main:
        model = trainer.model

        def write_state(tmp: Path) -> None:
            if optim_state is None:
                return
            d = tmp / STATE_DIR
            d.mkdir()
            tensors, groups = _flatten_optimizer(optim_state)
            save_file(tensors, str(d / "optimizer.safetensors"))
            rng = {"torch_cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["torch_cuda"] = torch.cuda.get_rng_state()
            save_file(rng, str(d / "rng.safetensors"))
            py_version, py_state, py_gauss = random.getstate()
            payload = {**state, "param_groups": groups, "python_random": [py_version, list(py_state), py_gauss]}
            (d / "state.json").write_text(json.dumps(payload, indent=2) + "\n")

        snapshot = _ModelView(model, own)
        save_model(snapshot, target, tokenizer_from=trainer.tokenizer_dir, extra=write_state)
    trainer.dist.barrier()
    return target


class _ModelView:
    """Duck-typed stand-in for save_model: the trainer model's config and structure with gathered tensors."""

    def __init__(self, model, state: dict[str, torch.Tensor]):
        self.model_ref, self.state = model, state
        self.config = model.config
        self.mtp = model.mtp
        self.dtype = torch.float32

    def named_parameters(self, remove_duplicate: bool = True):
        for name, _ in self.model_ref.named_parameters(remove_duplicate=remove_duplicate):
            yield name, self.state[name]

    def named_buffers(self):
        for name, _ in self.model_ref.named_buffers():
            if name in self.state:
                yield name, self.state[name]


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint (atomic renames mean every step_* directory is complete)."""
    if not directory.exists():
        return None
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name))
                   and (p / STATE_DIR / "state.json").exists())
    return found[-1][1] if found else None


def prune(directory: Path, keep: int) -> None:
    if keep <= 0:
        return
    found = sorted((int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)))
    for _, path in found[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(trainer, path: Path) -> dict:
    """Restores model, optimizer and RNG from `path`; returns the saved trainer state dict."""
    from ..checkpoint import load_model

    # Read the HF tensors back under the trainer model's own names (experts stacked, MTP renamed).
    loaded = load_model(path, dtype=torch.float32)
    own_names = set(dict(trainer.model.named_parameters())) | set(dict(trainer.model.named_buffers()))
    model_state = {f"model.{k}": v for k, v in loaded.state_dict().items() if k in own_names}
    set_model_state_dict(trainer.module, model_state, options=_full(trainer.dist.active))
    d = path / STATE_DIR
    state = json.loads((d / "state.json").read_text())
    optim = _unflatten_optimizer(load_file(str(d / "optimizer.safetensors")), state["param_groups"])
    set_optimizer_state_dict(trainer.module, trainer.optimizer.optimizers, optim, options=_full(trainer.dist.active))
    rng = load_file(str(d / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])
    version, py_state, gauss = state["python_random"]
    random.setstate((version, tuple(py_state), gauss))
    return state
