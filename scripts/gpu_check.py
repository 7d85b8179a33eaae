"""One-shot accelerator check (run on a CUDA machine): parity, engine, training throughput.

    PYTHONPATH=. python scripts/gpu_check.py [--out DIR] [--train-steps 60]

1. parity: tiny real transformers checkpoints (V3, V2, Qwen2) vs nanoseek on the GPU in float32, bfloat16 and
   float16 (max |logit error| against transformers' float32 on the same GPU);
2. engine: greedy generation on the GPU agrees token-for-token with transformers' greedy `generate` (float32),
   and batched decode throughput of a ~0.5B-total V3-architecture model (recipes/gpu.toml) in bfloat16;
3. training: `train tokenizer` + `train pretrain` with recipes/gpu.toml for a few steps: tokens/s and MFU.
Each part reports its own failure instead of stopping the others. Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def parity(tmp: Path, device: str) -> dict:
    import nanoseek
    from tiny import save_hf_checkpoint

    out = {}
    for arch in ("deepseek_v3", "deepseek_v2", "qwen2"):
        d = tmp / arch
        hf = save_hf_checkpoint(arch, d).to(device)
        ids = torch.randint(2, 160, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad():
            ref = hf(ids).logits.float()
            dtypes = [("float32", torch.float32), ("bfloat16", torch.bfloat16)]
            dtypes += [("float16", torch.float16)] if device != "cpu" else []  # float16 is refused on CPU
            for name, dtype in dtypes:
                ours = nanoseek.load_model(d, device=device, dtype=dtype).eval()
                err = (ours(ids).float() - ref).abs().max().item()
                out[f"{arch}_{name}_max_err"] = round(err, 6)
                if dtype != torch.float32:  # what the dtype itself costs: transformers in that dtype
                    theirs = (hf.to(dtype)(ids).logits.float() - ref).abs().max().item()
                    hf.to(torch.float32)
                    out[f"{arch}_{name}_transformers_max_err"] = round(theirs, 6)
                del ours
        del hf
    return out


def engine(tmp: Path, device: str, quick: bool) -> dict:
    from nanoseek.engine import LLM, SamplingParams
    from tiny import save_hf_checkpoint

    out = {}
    d = tmp / "engine_v3"
    hf = save_hf_checkpoint("deepseek_v3", d).to(device)
    prompts = [torch.randint(2, 160, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 17)]
    llm = LLM(d, device=device, dtype="float32")
    got = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    agree = total = 0
    for p, r in zip(prompts, got):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]).to(device), max_new_tokens=24, do_sample=False, min_new_tokens=24)
        ref = ref[0, len(p):].tolist()
        mine = list(r.outputs[0].token_ids)
        agree += sum(a == b for a, b in zip(ref, mine))
        total += len(ref)
    out["greedy_token_agreement"] = agree / total
    del llm, hf
    if quick:
        return out
    # Throughput: the GPU recipe's model, random weights, 64 sequences x 128 new tokens, bfloat16.
    import tomllib

    from nanoseek.checkpoint import save_model
    from nanoseek.config import ModelConfig
    from nanoseek.model.transformer import Transformer

    spec = dict(tomllib.loads((ROOT / "recipes" / "gpu.toml").read_text())["model"])
    spec.pop("init_std")
    spec.update(vocab_size=4096, bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=0)
    model = Transformer(ModelConfig.from_hf_dict(spec))
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    save_model(model, tmp / "gpu_model")
    del model
    llm = LLM(tmp / "gpu_model", device=device, dtype="bfloat16", max_num_seqs=256, kv_cache_memory="8GiB",
              max_num_batched_tokens=16384)
    prompts = [torch.randint(2, 4096, (64,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(256)]
    params = SamplingParams(temperature=1.0, max_tokens=128, ignore_eos=True, seed=0)
    llm.generate(prompts[:8], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
    for batch in (1, 64, 256):
        sync(device)
        t = time.perf_counter()
        res = llm.generate(prompts[:batch], params)
        sync(device)
        dt = time.perf_counter() - t
        out[f"decode_tok_s_batch{batch}"] = round(sum(len(r.outputs[0].token_ids) for r in res) / dt, 1)
    return out


def training(tmp: Path, steps: int) -> dict:
    env_py = [sys.executable, "-c", "import sys; from nanoseek.cli import main; sys.exit(main())"]
    common = ["--recipe", str(ROOT / "recipes" / "gpu.toml"), f"run.out_dir={tmp / 'runs'}",
              "data.train_problems=20000", "train.batch_size=64", "train.log_every=2", "eval.problems=0", "data.val_problems=200", "tokenizer.train_docs=20000"]
    for stage, extra in (("tokenizer", []), ("pretrain", [f"pretrain.steps={steps}",
                                                          "train.save_every=0", "pretrain.eval_every=0",
                                                          "train.warmup_steps=10"])):
        t = time.perf_counter()
        r = subprocess.run(env_py + ["train", stage, "--no-progress"] + common + extra, cwd=ROOT)
        if r.returncode:
            raise RuntimeError(f"train {stage} failed with exit code {r.returncode}")
        print(f"train {stage}: {time.perf_counter() - t:.1f} s", flush=True)
    rows = [json.loads(line) for line in (tmp / "runs" / "gpu" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tok_s" in r]
    last = rows[-1]
    return {"train_steps": steps, "train_tok_s": last.get("tok_s"), "train_mfu": last.get("mfu"),
            "train_loss_first": rows[0].get("loss"), "train_loss_last": last.get("loss")}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--train-steps", type=int, default=60)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="parity and greedy agreement only (a CPU smoke check)")
    ap.add_argument("--parts", default="parity,engine,training")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    result = {"device": gpu, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        parts = [("parity", lambda: parity(Path(tmp), args.device)),
                 ("engine", lambda: engine(Path(tmp), args.device, args.quick))]
        if not args.quick:
            parts.append(("training", lambda: training(Path(tmp), args.train_steps)))
        parts = [(n, f) for n, f in parts if n in args.parts.split(",")]
        for name, fn in parts:
            t = time.perf_counter()
            try:
                part = fn()
                result.update(part)
                print(name, json.dumps(part), flush=True)
            except Exception as e:  # report and go on: one broken part must not hide the others
                traceback.print_exc()
                result[f"{name}_error"] = f"{type(e).__name__}: {e}"[:500]
            result[f"{name}_seconds"] = round(time.perf_counter() - t, 1)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
