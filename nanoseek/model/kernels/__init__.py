"""nanoseek's compiled CPU kernels, one build per ISA level (build.py): `decode` for inference (small-batch
products over bf16 weights, routed experts in one call, fused norms, MLA cache attention), `training` for the
fused training path. model/ops.py is their only caller."""

from __future__ import annotations

from .decode import DECODE_KERNELS
from .training import TRAIN_KERNELS


def status() -> dict:
    """Which kernel sets apply here and for which ISA level (built or not yet)."""
    return {"decode": DECODE_KERNELS.status(), "training": TRAIN_KERNELS.status()}
