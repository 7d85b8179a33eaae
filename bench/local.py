"""Local inference, nanoseek vs llama.cpp on the same weights (llama-cpp-python, the `llama` extra, built from source).

    python bench/local.py [--quick] [--tokens 64] [--prompt 512]

For each model -- (a) a Qwen2 student with DeepSeek-R1-Distill-Qwen-1.5B's shapes and (b) a DeepSeek-V2-Lite-shaped
MoE slice (random weights, a trained tokenizer) -- the checkpoint is saved in bf16 (as published), exported with
`nanoseek export gguf` at bf16 (the same bytes nanoseek streams), f16, q8_0 and q4_0, and run:
- correctness: llama.cpp's greedy continuation of the f32 export against nanoseek's float32 engine on the
  checkpoint (64 tokens, identical or not), nanoseek's engine on the f32 GGUF file itself against the same, and
  for each llama.cpp type the teacher-forced top-1 agreement of
  llama.cpp's run with that f32 continuation;
- speed: batch-1 decode tokens/s (median of per-token times after the first) and prefill tokens/s of a `--prompt`
  token prompt, both sides with 2 threads. The headline pair is nanoseek on its bf16 checkpoint against llama.cpp
  on the bf16 export (the same bytes per token), both loaded and run in alternation `--rounds` times, the median
  per-round ratio reported (this host swings between fast and slow memory states from one run to the next);
  llama.cpp's f16/q8_0/q4_0 files and a lone nanoseek run follow once each, with bytes streamed per token / time
  against the 1 GiB sum-read bandwidth measured around each. The quantized pairs run the same way: nanoseek's
  int8 (per output channel) against llama.cpp's q8_0 and its int4 (groups of 32) against q4_0, each side on its
  own quantization of the same bf16 weights, with the bytes each side streams per token.
Prints one JSON line last, with the CPU class.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).parent))
from common import emit, machine  # noqa: E402
from engine import read_bandwidth  # noqa: E402

from nanoseek import LLM, SamplingParams, runtime  # noqa: E402
from nanoseek.interop.gguf_export import export_gguf  # noqa: E402

QWEN_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=0, eos_token_id=1)
V2_LITE_SLICE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                     num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
                     kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                     num_experts_per_tok=6, n_shared_experts=2, first_k_dense_replace=1, topk_method="greedy",
                     norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=4096,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=0, eos_token_id=1)


def build(kind: str, shapes: dict, directory: Path) -> int:
    """A bf16 checkpoint with random O(1) weights (routing that varies) and a trained tokenizer; its parameters."""
    import transformers
    from tiny import build_tokenizer

    cls = transformers.Qwen2Config if kind == "qwen2" else transformers.DeepseekV2Config
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cls(**shapes), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, p.shape[-1] ** -0.5)
            elif "norm" in name:
                p.fill_(1.0)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    del model
    build_tokenizer(directory, vocab_size=300)
    return params


def release() -> None:
    """Hands freed memory back to the system between phases: a 1.5B model's copies left in the allocator would
    otherwise push llama.cpp's memory-mapped weights out of the page cache (decode then reads the disk)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass


def llama(path: Path, n_ctx: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=2, logits_all=True,
                           verbose=False, type_k=0, type_v=0)


def llama_decode(llm, prompt: list[int], tokens: int) -> dict:
    """Greedy continuation, prefill seconds and median per-token decode seconds of a loaded llama.cpp model."""
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t
    out, times = [], []
    for _ in range(tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        t = time.perf_counter()
        llm.eval([token])
        times.append(time.perf_counter() - t)
    return {"ids": out, "prefill_s": prefill, "decode_s": statistics.median(times[1:])}


def llama_run(path: Path, prompt: list[int], tokens: int) -> dict:
    llm = llama(path, len(prompt) + tokens + 8)
    result = llama_decode(llm, prompt, tokens)
    del llm
    release()
    return result


def llama_agreement(path: Path, prompt: list[int], reference: list[int]) -> float:
    """Teacher-forced top-1 agreement: the share of positions of `reference` (the f32 greedy continuation) where
    llama.cpp's argmax on this file is the reference token, given the reference prefix (one divergence does not
    decide every later position, as it would comparing two free runs)."""
    llm = llama(path, len(prompt) + len(reference) + 8)
    llm.eval(prompt + reference[:-1])
    picks = np.argmax(np.array(llm.scores[len(prompt) - 1: len(prompt) - 1 + len(reference)]), axis=-1)
    del llm
    return float(np.mean(picks == np.array(reference)))


def nanoseek_engine(directory: Path, prompt_len: int, dtype: str = "auto", quantization: str | None = None) -> LLM:
    """nanoseek's engine, warmed up, without prefix caching (a repeated prompt must be computed again)."""
    llm = LLM(directory, dtype=dtype, kv_cache_memory="512MiB", max_num_batched_tokens=max(2048, prompt_len),
              enable_prefix_caching=False, quantization=quantization)
    llm.generate([[5] * 16], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    return llm


def nanoseek_decode(llm: LLM, prompt: list[int], tokens: int) -> dict:
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))[0]
    m = out.metrics
    gaps = [b - a for a, b in zip(m.token_times[1:], m.token_times[2:])]
    return {"ids": out.outputs[0].token_ids, "prefill_s": m.first_token_time - m.first_scheduled_time,
            "decode_s": statistics.median(gaps), "dtype": str(llm.engine.model.compute_dtype).removeprefix("torch.")}


def nanoseek_run(directory: Path, prompt: list[int], tokens: int, dtype: str = "auto") -> dict:
    llm = nanoseek_engine(directory, len(prompt), dtype)
    result = nanoseek_decode(llm, prompt, tokens)
    del llm
    release()
    return result


def nanoseek_bytes(llm: LLM) -> int:
    """Bytes nanoseek's engine reads per decoded token: every quantizable weight as it streams (integers and
    scales, or its float dtype), the routed experts at their active share, routers, and one embedding row."""
    from nanoseek.model import quant
    from nanoseek.model.moe import Experts, Router

    model, config = llm.engine.model, llm.engine.model.config
    share = config.num_experts_per_tok / config.n_routed_experts if config.n_routed_experts else 1.0
    total = 0
    for module, name in quant.quantizable(model):
        param, qw = getattr(module, name), quant.quantized_of(module, name)
        size = qw.q.numel() * qw.bits // 8 + qw.scales.numel() * 4 if qw else param.numel() * param.element_size()
        total += int(size * share) if isinstance(module, Experts) else size
    embedding = model.model.embed_tokens.weight
    total += embedding.numel() * embedding.element_size() if model.lm_head.weight is embedding \
        else embedding[0].numel() * embedding.element_size()
    total += sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, Router))
    return total


def paired(directory: Path, path: Path, prompt: list[int], tokens: int, rounds: int,
           quantization: str | None = None) -> dict:
    """nanoseek on the bf16 checkpoint (quantized at load as asked) and llama.cpp on its export of the same
    precision, loaded side by side and run in alternation `rounds` times: the median of the per-round ratios is
    robust to this host's swings between its fast and slow memory states, which sequential single runs are not."""
    ours = nanoseek_engine(directory, len(prompt), quantization=quantization)
    theirs = llama(path, len(prompt) + tokens + 8)
    ours_bytes = nanoseek_bytes(ours)
    per_round = []
    for _ in range(rounds):
        a, b = nanoseek_decode(ours, prompt, tokens), llama_decode(theirs, prompt, tokens)
        per_round.append((a, b))
    dtype = per_round[0][0]["dtype"]
    del ours, theirs
    release()
    med = lambda xs: round(statistics.median(xs), 2)  # noqa: E731
    return {"rounds": rounds, "nanoseek_dtype": dtype, "nanoseek_quantization": quantization or "none",
            "nanoseek_bytes_per_token": ours_bytes, "llama_cpp_bytes_per_token": streamed_bytes(path),
            "nanoseek_decode_gb_s": round(ours_bytes * med([1 / a["decode_s"] for a, _ in per_round]) / 1e9, 2),
            "nanoseek_decode_tok_s": med([1 / a["decode_s"] for a, _ in per_round]),
            "llama_cpp_decode_tok_s": med([1 / b["decode_s"] for _, b in per_round]),
            "decode_ratio": med([b["decode_s"] / a["decode_s"] for a, b in per_round]),
            "decode_ratios": [round(b["decode_s"] / a["decode_s"], 2) for a, b in per_round],
            "nanoseek_prefill_tok_s": med([len(prompt) / a["prefill_s"] for a, _ in per_round]),
            "llama_cpp_prefill_tok_s": med([len(prompt) / b["prefill_s"] for _, b in per_round]),
            "prefill_ratio": med([b["prefill_s"] / a["prefill_s"] for a, b in per_round])}


def streamed_bytes(path: Path) -> int:
    """Bytes a decoded token reads from a GGUF file: every tensor, the routed experts at their active share."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    used = {f.name: f.parts[-1][0] for f in reader.fields.values() if f.name.endswith("expert_used_count")}
    share = next(iter(used.values()), 0) / max(1, next((f.parts[-1][0] for f in reader.fields.values()
                                                         if f.name.endswith(".expert_count")), 1))
    total = 0
    for t in reader.tensors:
        if t.name == "token_embd.weight" and any(x.name == "output.weight" for x in reader.tensors):
            total += int(t.n_bytes) // int(t.shape[-1])  # a lookup: one row
        elif "_exps" in t.name:
            total += int(int(t.n_bytes) * share)
        else:
            total += int(t.n_bytes)
    return total


def one_model(kind: str, shapes: dict, tokens: int, prompt_len: int, work: Path, x: torch.Tensor,
              rounds: int) -> dict:
    directory = work / kind
    params = build(kind, shapes, directory)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, 300, (prompt_len,), generator=g).tolist()
    short = prompt[:32]
    # Correctness: llama.cpp on the f32 export against nanoseek's float32 engine on the checkpoint.
    f32_path = export_gguf(directory, work / f"{kind}-f32.gguf", "f32", modelfile=False)
    f32 = llama_run(f32_path, short, tokens)["ids"]
    ours_f32 = nanoseek_run(directory, short, tokens, "float32")["ids"]
    # GGUF -> nanoseek: the engine on the f32 file itself (converted into a cache directory under `work`).
    os.environ["NANOSEEK_CACHE"] = str(work / "cache")
    from_gguf = nanoseek_run(f32_path, short, tokens, "float32")["ids"]
    f32_path.unlink()
    shutil.rmtree(work / "cache")
    # Speed: nanoseek against llama.cpp's bf16 file in alternation; llama.cpp's other types once each.
    rows, moved, pairs = {}, {}, {}
    ours_for = {"bf16": None, "q8_0": "int8", "q4_0": "int4"}
    for qtype in ("bf16", "f16", "q8_0", "q4_0"):
        path = export_gguf(directory, work / f"{kind}-{qtype}.gguf", qtype, modelfile=False)
        moved[qtype] = streamed_bytes(path)
        if qtype in ours_for:
            before = read_bandwidth(x)
            pairs[qtype] = paired(directory, path, prompt, tokens, rounds, ours_for[qtype])
            bw = max(before, read_bandwidth(x))
            pairs[qtype]["nanoseek_bandwidth_utilization"] = round(pairs[qtype]["nanoseek_decode_gb_s"] / bw, 3)
        before = read_bandwidth(x)
        run = llama_run(path, prompt, tokens)
        bw = max(before, read_bandwidth(x))
        rows[qtype] = {"decode_tok_s": round(1 / run["decode_s"], 2),
                       "prefill_tok_s": round(prompt_len / run["prefill_s"], 1),
                       "bandwidth_utilization": round(moved[qtype] / run["decode_s"] / 1e9 / bw, 3),
                       "top1_agreement_with_f32": round(llama_agreement(path, short, f32), 3)}
        path.unlink()
    before = read_bandwidth(x)
    ours = nanoseek_run(directory, prompt, tokens)
    ours_bw = max(before, read_bandwidth(x))
    # nanoseek's bf16 weights stream as many bytes as llama.cpp's bf16 file.
    nanoseek = {"dtype": ours["dtype"], "decode_tok_s": round(1 / ours["decode_s"], 2),
                "prefill_tok_s": round(prompt_len / ours["prefill_s"], 1),
                "bandwidth_utilization": round(moved["bf16"] / ours["decode_s"] / 1e9 / ours_bw, 3)}
    return {"params": params, "f32_greedy_identical": f32 == ours_f32, "gguf_to_nanoseek_identical": from_gguf == ours_f32,
            "f32_greedy_agreement": round(sum(a == b for a, b in zip(f32, ours_f32)) / tokens, 3),
            "paired_with_llama_cpp_bf16": pairs["bf16"], "paired_int8_vs_q8_0": pairs["q8_0"],
            "paired_int4_vs_q4_0": pairs["q4_0"], "nanoseek": nanoseek, "llama_cpp": rows,
            "single_run_decode_ratio_vs_llama_cpp": {q: round(nanoseek["decode_tok_s"] / r["decode_tok_s"], 2)
                                          for q, r in rows.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3, help="alternating nanoseek / llama.cpp bf16 rounds")
    args = ap.parse_args()
    torch.set_num_threads(2)
    qwen, v2 = QWEN_1_5B, V2_LITE_SLICE
    if args.quick:
        qwen = dict(qwen, vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
        v2 = dict(v2, vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                  num_hidden_layers=2, n_routed_experts=8, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                  v_head_dim=32, num_attention_heads=4, num_key_value_heads=4)
    x = torch.ones(2 ** 28, dtype=torch.float32)
    import llama_cpp

    out = {"bench": "local", **machine(), "threads": 2, "tokens": args.tokens, "prompt_tokens": args.prompt,
           "bf16_native": runtime.cpu().bf16_native,
           "llama_cpp": {"version": llama_cpp.__version__,
                         "system_info": llama_cpp.llama_print_system_info().decode().strip(" |")}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, shapes in (("qwen2_1.5b_shapes", "qwen2", qwen), ("v2_lite_slice", "deepseek_v2", v2)):
            out[name] = one_model(kind, shapes, args.tokens, args.prompt, Path(tmp), x, args.rounds)
    emit(out)


if __name__ == "__main__":
    main()
