"""Training throughput: nanoseek's trainer step vs a plain training loop over transformers'
DeepseekV3ForCausalLM, same config, batch, dtype (what the dtype policy picks for this CPU: bf16 autocast over
float32 weights where bf16 is native, plain float32 elsewhere -- `--dtype` overrides), optimizer (torch's fused
AdamW, as nanoseek's trainer builds it), threads and process (so the same host-memory settings,
nanoseek/runtime.py). nanoseek's step runs its fused CPU training kernels (model/kernels/training.py); the same
step on its eager modules is reported alongside.

    python bench/train.py [--dtype auto|bfloat16|float32]
MFU = tokens/s x (6 x active non-embedding parameters + attention FLOPs per token) / peak matmul FLOP/s of the
dtype the matmuls run in, the peak measured in the same run. Prints one JSON line last (with the ISA level).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, hf_v3_model  # noqa: E402

import nanoseek  # noqa: E402
from nanoseek import runtime  # noqa: E402
from nanoseek.model import ops  # noqa: E402
from nanoseek.model.kernels import training as train_kernels  # noqa: E402
from nanoseek.train.trainer import LossModule, training_flops_per_token  # noqa: E402

# >= 20M parameters, MLA + DeepSeekMoE (no MTP: transformers' model has none to compare against).
TRAIN_MODEL = dict(vocab_size=4096, hidden_size=400, intermediate_size=1024, moe_intermediate_size=256,
                   num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=6, q_lora_rank=192,
                   kv_lora_rank=96, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=48, n_routed_experts=8,
                   num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
                   max_position_embeddings=1024, num_nextn_predict_layers=0)


def time_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto", help="auto (the policy's choice for this CPU), bfloat16 or float32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    autocast_dtype, _ = runtime.training_autocast(args.dtype, torch.device("cpu"))
    compute = autocast_dtype or torch.float32
    hf = hf_v3_model(TRAIN_MODEL, dtype=torch.float32).train()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = nanoseek.load_model(tmp).train()
    x = torch.randint(0, TRAIN_MODEL["vocab_size"], (args.batch, args.seq + 1),
                      generator=torch.Generator().manual_seed(0))
    inputs, targets = x[:, :-1], x[:, 1:]
    tokens = inputs.numel()

    module = LossModule(ours)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_dtype is not None)

    def ours_step():
        with autocast():
            main, _, _ = module(inputs, targets, None, 0.0)
            loss = main / tokens
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def ours_eager_step():
        with ops.eager():
            ours_step()

    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-4, fused=True)

    def hf_step():
        with autocast():
            logits = hf(inputs).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    t_ours = time_steps(ours_step, 2, args.steps)
    t_hf = time_steps(hf_step, 2, args.steps)
    t_eager = time_steps(ours_eager_step, 2, args.steps)
    t_ours = min(t_ours, time_steps(ours_step, 0, args.steps))  # interleaved: even out machine noise
    t_hf = min(t_hf, time_steps(hf_step, 0, args.steps))
    t_eager = min(t_eager, time_steps(ours_eager_step, 0, args.steps))
    peak = runtime.peak_flops(compute, torch.device("cpu"))
    flops = training_flops_per_token(ours, args.seq, with_mtp=False)
    ours_tok_s, hf_tok_s = tokens / t_ours, tokens / t_hf
    emit({"bench": "train", "params": sum(p.numel() for p in ours.parameters()), "dtype": "bf16 autocast" if autocast_dtype else "float32",
          "batch": args.batch, "seq": args.seq, "threads": args.threads,
          "nanoseek_tok_s": round(ours_tok_s, 1), "transformers_tok_s": round(hf_tok_s, 1),
          "ratio": round(ours_tok_s / hf_tok_s, 2), "nanoseek_eager_tok_s": round(tokens / t_eager, 1),
          "fused_kernels": train_kernels.train_kernels() is not None, "flops_per_token": flops, "peak_gflops": round(peak / 1e9, 1),
          "nanoseek_mfu": round(ours_tok_s * flops / peak, 3), "transformers_mfu": round(hf_tok_s * flops / peak, 3)})


if __name__ == "__main__":
    main()
