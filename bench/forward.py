"""Forward tokens/s: nanoseek vs transformers on the same mid-size MoE (MLA) model, same dtype, 2 threads.

    python bench/forward.py [--dtype bfloat16] [--batch 4] [--seq 256]
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import MID_MOE, emit, hf_v3_model, timed  # noqa: E402

import nanoseek  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    hf = hf_v3_model(dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = nanoseek.load_model(tmp, dtype=dtype)
    ids = torch.randint(2, MID_MOE["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq
    with torch.inference_mode():
        err = (ours(ids).float() - hf(ids).logits.float()).abs().max().item()
        t_hf = timed(lambda: hf(ids), args.repeats)
        t_ours = timed(lambda: ours(ids), args.repeats)
        t_hf = min(t_hf, timed(lambda: hf(ids), args.repeats))  # interleave to even out machine noise
        t_ours = min(t_ours, timed(lambda: ours(ids), args.repeats))
    params = sum(p.numel() for p in ours.parameters())
    emit({"bench": "forward", "config": {**MID_MOE, "params": params}, "dtype": args.dtype, "batch": args.batch,
          "seq": args.seq, "threads": args.threads, "experts_implementation": hf.config._experts_implementation,
          "nanoseek_tok_s": round(tokens / t_ours, 1), "transformers_tok_s": round(tokens / t_hf, 1),
          "ratio": round(t_hf / t_ours, 3), "max_abs_logit_diff": err})


if __name__ == "__main__":
    main()
