"""Load test of `nanoseek serve`: 500 chat requests at 32 concurrency, 10% of clients disconnecting at a random
moment (mid-request or mid-stream), half of the requests streaming.

    python bench/load.py [--requests 500] [--concurrency 32]
Reports throughput, p50/p99 latency and time to first token, responses by status, and KV-cache blocks leaked
after the run (must be 0, as must 5xx responses). Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))


def build_checkpoint(directory: Path) -> Path:
    """A small V3-architecture model with a real tokenizer (random weights: the load, not the answers, matters)."""
    from nanoseek import save_model
    from nanoseek.config import ModelConfig
    from nanoseek.data.sources import doc_text
    from nanoseek.data.tasks import generate
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer([doc_text(p) for p in generate("arithmetic", [1, 2, 3], 2000, 0, distinct=False)], 384,
                          directory / "tok")
    config = ModelConfig(model_type="deepseek_v3", vocab_size=416, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
                         qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=8,
                         num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=96,
                         first_k_dense_replace=1, n_group=2, topk_group=1, topk_method="noaux_tc",
                         scoring_func="sigmoid", norm_topk_prob=True, max_position_embeddings=2048,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Transformer(config)
    model.init_weights(std=0.3, generator=torch.Generator().manual_seed(0))
    return save_model(model, directory / "model", tokenizer_from=directory / "tok")


async def one_request(client: httpx.AsyncClient, i: int, rng: random.Random, results: list):
    stream = i % 2 == 0
    disconnect = rng.random() < 0.10
    body = {"model": "model", "messages": [{"role": "user", "content": f"What is {rng.randint(1, 999)} + "
                                                                       f"{rng.randint(1, 999)}?"}],
            "max_tokens": rng.randint(16, 96), "temperature": 0.8, "stream": stream}
    start = time.perf_counter()
    record = {"stream": stream, "disconnect": disconnect}
    try:
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                record["status"] = r.status_code
                cut_after = rng.randint(1, 8) if disconnect else None
                n = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"delta": {"role"' not in line:
                        record.setdefault("ttft", time.perf_counter() - start)
                    n += 1
                    if cut_after is not None and n >= cut_after:
                        break  # client goes away mid-stream
        else:
            task = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
            if disconnect:
                await asyncio.sleep(rng.uniform(0.01, 0.3))
                task.cancel()  # client goes away mid-request
                await asyncio.gather(task, return_exceptions=True)
                record["status"] = "disconnected"
            else:
                r = await task
                record["status"] = r.status_code
    except httpx.HTTPError as e:
        record["status"] = f"error:{type(e).__name__}"
    record["latency"] = time.perf_counter() - start
    results.append(record)


async def run_load(base: str, requests: int, concurrency: int, seed: int) -> list:
    rng = random.Random(seed)
    results: list = []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        async def guarded(i):
            async with sem:
                await one_request(client, i, rng, results)

        await asyncio.gather(*(guarded(i) for i in range(requests)))
    return results


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from nanoseek.serve.app import ServeConfig
    from serving import live_server, wait_until

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_checkpoint(Path(tmp))
        with live_server(model_dir, ServeConfig(model_name="model", max_queue=1024), max_num_seqs=32,
                         kv_cache_memory="128MiB") as (base, llm, _):
            t = time.perf_counter()
            results = asyncio.run(run_load(base, args.requests, args.concurrency, args.seed))
            wall = time.perf_counter() - t
            engine = llm.engine
            wait_until(lambda: not engine.requests and engine.blocks.num_free == engine.blocks.num_blocks, 30)
            leaked = engine.blocks.num_blocks - engine.blocks.num_free
            stats = engine.stats()
    by_status = Counter(str(r["status"]) for r in results)
    done = [r for r in results if r["status"] == 200 and not r["disconnect"]]
    latencies = [r["latency"] for r in done]
    ttfts = [r["ttft"] for r in done if r.get("ttft")]  # streaming requests: the first content chunk
    five_xx = sum(v for k, v in by_status.items() if k.isdigit() and int(k) >= 500)
    out = {"bench": "load", "requests": args.requests, "concurrency": args.concurrency,
           "disconnects": sum(r["disconnect"] for r in results), "wall_s": round(wall, 2),
           "throughput_req_s": round(len(results) / wall, 2), "generated_tokens": stats["generation_tokens"],
           "throughput_tok_s": round(stats["generation_tokens"] / wall, 1),
           "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p99_s": round(percentile(latencies, 0.99), 3),
           "ttft_p50_s": round(percentile(ttfts, 0.5), 3) if ttfts else None,
           "ttft_p99_s": round(percentile(ttfts, 0.99), 3) if ttfts else None,
           "by_status": dict(by_status), "responses_5xx": five_xx, "blocks_leaked": leaked}
    print(json.dumps(out), flush=True)
    sys.exit(0 if five_xx == 0 and leaked == 0 else 1)


if __name__ == "__main__":
    main()
