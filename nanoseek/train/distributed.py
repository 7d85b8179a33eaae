"""Data parallelism under torchrun: DDP or FSDP2 (`fully_shard`), gloo on CPU, nccl on GPUs.

One process per device; `torchrun --nproc_per_node=N` (and --nnodes/--rdzv-endpoint for several machines)
sets RANK/WORLD_SIZE/LOCAL_RANK. Without them everything runs in one process and these helpers are no-ops.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False
    mode: str = "single"

    @classmethod
    def single(cls) -> "Distributed":
        return cls()

    @classmethod
    def from_env(cls, device_type: str = "cpu") -> "Distributed":
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        backend = "nccl" if device_type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), True)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: nn.Module, parallel: str) -> nn.Module:
        """DDP or FSDP2 around `module`; "none" leaves it alone (the caller all-reduces gradients itself)."""
        if not self.active or parallel == "none":
            return module
        if parallel == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for layer in module.model.model.layers:
                fully_shard(layer)
            fully_shard(module)
            self.mode = "fsdp"
            return module
        from torch.nn.parallel import DistributedDataParallel

        import inspect

        self.mode = "ddp"
        # Buffers (the balancing biases) are updated identically on every rank: no need to sync them.
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
            return DistributedDataParallel(module, forward_sync_buffers=False)
        return DistributedDataParallel(module, broadcast_buffers=False)

    @contextlib.contextmanager
    def no_sync(self, module: nn.Module, last: bool):
        """Skip gradient communication on all but the last micro-batch."""
        if self.mode == "ddp" and not last:
            with module.no_sync():
                yield
        elif self.mode == "fsdp":
            module.set_requires_gradient_sync(last)
            yield
        else:
            yield

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_reduce_grads(self, params) -> None:
        """Sums every parameter's gradient over the ranks (a rank that did not touch a parameter, e.g. an expert
        no token of its micro-batches was routed to, takes part with zeros: the collectives must match)."""
        if not self.active:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)

    def all_gather_json(self, value) -> list:
        """Every rank's JSON-serialisable `value`, in rank order: sent as UTF-8 JSON text in a uint8 tensor and
        parsed with json.loads (torch's all_gather_object would deserialize arbitrary objects)."""
        if not self.active:
            return [value]
        import json

        data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([data.numel()]))
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[: data.numel()] = data
        gathered = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        return [json.loads(g[: int(n)].numpy().tobytes().decode()) for g, n in zip(gathered, sizes)]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
