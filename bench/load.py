"""Load test of `nanoseek serve` under attack: chat requests at high concurrency, half streaming, some clients
disconnecting at a random moment (mid-request or mid-stream), some requests malformed, and one fault injected
into an engine step halfway through; then the same load without the bad traffic, for the TTFT comparison.

    python bench/load.py [--requests 1000] [--concurrency 64] [--disconnect 0.2] [--malformed 0.05]
Reports throughput, p50/p99 latency and time to first token, responses by status, unexpected 5xx (the injected
fault's own 500 engine_fault answers are counted apart), and leaks sampled *during* the run between engine steps:
cache blocks in use that no live sequence holds, and engine requests beyond those the clients still wait for.
Prints one JSON line last.
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
sys.path.insert(0, str(Path(__file__).parent))


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


MALFORMED = [b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 123}]}]}', b'{"messages": ',
             b'{"messages": [{"role": "user", "content": "hi"}], "seed": 18446744073709551616}',
             b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', b"[" * 5000 + b"]" * 5000,
             b'{"messages": [{"role": "user", "content": "a\\ud800"}]}', b'{"prompt": [-1]}']


async def one_request(client: httpx.AsyncClient, i: int, rng: random.Random, results: list, mix: dict,
                      active: list):
    stream = i % 2 == 0
    disconnect = rng.random() < mix["disconnect"]
    malformed = not disconnect and rng.random() < mix["malformed"]
    body = {"model": "model", "messages": [{"role": "user", "content": f"What is {rng.randint(1, 999)} + "
                                                                       f"{rng.randint(1, 999)}?"}],
            "max_tokens": rng.randint(16, 96), "temperature": 0.8, "stream": stream}
    start = time.perf_counter()
    record = {"stream": stream, "disconnect": disconnect, "malformed": malformed}
    active[0] += 1
    try:
        if malformed:
            r = await client.post("/v1/chat/completions", content=rng.choice(MALFORMED),
                                  headers={"Content-Type": "application/json"})
            record["status"], record["code"] = r.status_code, _code(r)
        elif stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                record["status"] = r.status_code
                cut_after = rng.randint(1, 8) if disconnect else None
                n = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"delta": {"role"' not in line:
                        record.setdefault("ttft", time.perf_counter() - start)
                    if line.startswith('data: {"error"'):
                        record["code"] = json.loads(line[6:])["error"]["code"]
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
                record["status"], record["code"] = r.status_code, _code(r)
    except httpx.HTTPError as e:
        record["status"] = f"error:{type(e).__name__}"
    finally:
        active[0] -= 1
    record["latency"] = time.perf_counter() - start
    results.append(record)


def _code(r: httpx.Response):
    try:
        return r.json()["error"]["code"] if r.status_code >= 400 else None
    except (ValueError, KeyError, TypeError):
        return "not-the-error-shape"


def engine_snapshot(llm) -> dict:
    """Taken between two engine steps: blocks in use that no live sequence holds, and the requests it serves."""
    out = {}

    def take():
        engine = llm.engine
        held = {b for r in engine.requests.values() for seq in r.seqs if not seq.finished for b in seq.block_table}
        in_use = sum(1 for b in engine.blocks.blocks if b.ref_count > 0)
        out.update(orphan_blocks=in_use - len(held), requests=len(engine.requests))

    llm.call_in_engine_thread(take, timeout=10)
    return out


async def run_load(base: str, llm, requests: int, concurrency: int, seed: int, mix: dict) -> tuple[list, dict]:
    rng = random.Random(seed)
    results, active, samples = [], [0], []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    loop = asyncio.get_running_loop()

    async def sampler():  # leaks measured while the load runs, not only after it
        while True:
            await asyncio.sleep(0.5)
            waiting_clients = active[0]
            snap = await loop.run_in_executor(None, engine_snapshot, llm)
            samples.append({**snap, "excess_requests": max(0, snap["requests"] - waiting_clients)})

    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        async def guarded(i):
            async with sem:
                if mix["fault"] and i == requests // 2:
                    inject_fault(llm)
                await one_request(client, i, rng, results, mix, active)

        watch = asyncio.create_task(sampler())
        await asyncio.gather(*(guarded(i) for i in range(requests)))
        watch.cancel()
    # A leak persists; a request just hung up on is gone within a step. Count excess seen twice in a row.
    persistent = sum(1 for a, b in zip(samples, samples[1:]) if a["excess_requests"] and b["excess_requests"])
    return results, {"samples": len(samples), "orphan_blocks_max": max((x["orphan_blocks"] for x in samples), default=0),
                     "excess_requests_persistent": persistent}


def inject_fault(llm) -> None:
    """The next engine step raises, once (a fault inside the step, as a kernel or a bug would)."""
    runner, real = llm.engine.runner, llm.engine.runner.run
    armed = [True]

    def faulty(plan):
        if armed and armed.pop():
            raise RuntimeError("injected fault")
        return real(plan)

    runner.run = faulty


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def summarize(results: list, wall: float, stats: dict) -> dict:
    good = [r for r in results if r["status"] == 200 and not r["disconnect"] and not r["malformed"]]
    latencies = [r["latency"] for r in good if r.get("code") is None]
    ttfts = [r["ttft"] for r in good if r.get("ttft")]  # streaming requests: the first content chunk
    fault = sum(r.get("code") == "engine_fault" for r in results)
    unexpected = sum(1 for r in results if isinstance(r["status"], int) and r["status"] >= 500
                     and r.get("code") != "engine_fault")
    return {"wall_s": round(wall, 2), "throughput_req_s": round(len(results) / wall, 2),
            "throughput_tok_s": round(stats["generation_tokens"] / wall, 1),
            "latency_p50_s": round(percentile(latencies, 0.5), 3), "latency_p99_s": round(percentile(latencies, 0.99), 3),
            "ttft_p50_s": round(percentile(ttfts, 0.5), 3) if ttfts else None,
            "ttft_p99_s": round(percentile(ttfts, 0.99), 3) if ttfts else None,
            "by_status": dict(Counter(str(r["status"]) for r in results)), "unexpected_5xx": unexpected,
            "engine_fault_answers": fault,
            "malformed_not_4xx": sum(1 for r in results if r["malformed"] and not 400 <= r["status"] < 500),
            "error_shape_violations": sum(r.get("code") == "not-the-error-shape" for r in results)}


def one_run(model_dir: Path, args, mix: dict) -> dict:
    from nanoseek.serve.app import ServeConfig
    from serving import live_server, wait_until

    with live_server(model_dir, ServeConfig(model_name="model", max_queue=4096), max_num_seqs=32,
                     kv_cache_memory="128MiB") as (base, llm, _):
        t = time.perf_counter()
        results, leaks = asyncio.run(run_load(base, llm, args.requests, args.concurrency, args.seed, mix))
        wall = time.perf_counter() - t
        engine = llm.engine
        wait_until(lambda: not engine.requests and engine.blocks.num_free == engine.blocks.num_blocks, 30)
        return {**summarize(results, wall, engine.stats()), **leaks,
                "blocks_leaked_after": engine.blocks.num_blocks - engine.blocks.num_free}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--disconnect", type=float, default=0.2)
    ap.add_argument("--malformed", type=float, default=0.05)
    ap.add_argument("--no-fault", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from common import machine

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_checkpoint(Path(tmp))
        clean = one_run(model_dir, args, {"disconnect": 0.0, "malformed": 0.0, "fault": False})
        attacked = one_run(model_dir, args, {"disconnect": args.disconnect, "malformed": args.malformed,
                                             "fault": not args.no_fault})
    ratio = (attacked["ttft_p99_s"] / clean["ttft_p99_s"]) if clean["ttft_p99_s"] and attacked["ttft_p99_s"] else None
    ok = (attacked["unexpected_5xx"] == 0 and attacked["orphan_blocks_max"] == 0
          and attacked["excess_requests_persistent"] == 0 and attacked["blocks_leaked_after"] == 0)
    print(json.dumps({"bench": "load", **machine(), "requests": args.requests, "concurrency": args.concurrency,
                      "disconnect": args.disconnect, "malformed": args.malformed, "fault": not args.no_fault,
                      "attacked": attacked, "clean": clean,
                      "ttft_p99_attacked_over_clean": round(ratio, 2) if ratio else None}), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
