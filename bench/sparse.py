"""DeepSeek Sparse Attention in the engine: batch-1 decode speed against context length, one run.

    python bench/sparse.py [--quick] [--contexts 1024,4096]
Three engines on the same random weights (4 layers, hidden 512, 8 heads, latent 128 + rope 32, dense MLPs, so
that attention is a large share of a decode step): DeepSeek-V3.2 with index_topk 256 (each decoded token attends
to 256 cached rows after the indexer scored them all), the same V3.2 with a top-k larger than any context (the
indexer runs, attention reads everything), and V3 (the same model without the indexer: absorbed MLA over every
cached latent). For each context length a prompt of that many tokens is prefilled, then 64 tokens are decoded;
the decode rate is (tokens - 1) / (finish - first token). Prints one JSON line last, naming the ISA and dtype.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit  # noqa: E402

from nanoseek import LLM, SamplingParams  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.model.transformer import Transformer  # noqa: E402

SHAPE = dict(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
             index_n_heads=8, index_head_dim=64, max_position_embeddings=1 << 15, bos_token_id=0, eos_token_id=1)
DECODE = 64


def build(model_type: str, topk: int, state: dict | None) -> Transformer:
    config = ModelConfig(model_type=model_type, index_topk=topk, **SHAPE)
    model = Transformer(config)
    if state is None:
        model.init_weights(std=0.05, generator=torch.Generator().manual_seed(0))
    else:  # V3 takes the V3.2 weights it has (all but the indexers)
        model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()})
    return model.eval()


def decode_rate(llm: LLM, context: int, rounds: int) -> float:
    prompt = torch.randint(2, SHAPE["vocab_size"], (context,), generator=torch.Generator().manual_seed(context))
    params = SamplingParams(max_tokens=DECODE, temperature=0.0, ignore_eos=True)
    rates = []
    for _ in range(rounds):
        m = llm.generate([prompt.tolist()], params)[0].metrics
        rates.append((DECODE - 1) / (m.finished_time - m.first_token_time))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--contexts", type=lambda t: [int(x) for x in t.split(",")], default=None)
    args = parser.parse_args()
    contexts = args.contexts or ([1024, 4096] if args.quick else [1024, 4096, 16384])
    sparse = build("deepseek_v32", 256, None)
    state = sparse.state_dict()
    engines = {"v32_top256": sparse, "v32_dense": build("deepseek_v32", 1 << 20, state),
               "v3": build("deepseek_v3", 256, state)}
    result = {"bench": "sparse", "dtype": "float32", "decode_tokens": DECODE, "index_topk": 256, "contexts": {}}
    llms = {name: LLM(model, dtype="float32", max_num_seqs=1, max_num_batched_tokens=1024,
                      kv_cache_memory="1GiB", enable_prefix_caching=False, max_model_len=max(contexts) + DECODE)
            for name, model in engines.items()}
    for context in contexts:
        row = {}
        for name, llm in llms.items():
            start = time.perf_counter()
            row[f"{name}_decode_tok_s"] = round(decode_rate(llm, context, rounds=2), 1)
            row[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
        row["v32_over_v3"] = round(row["v32_top256_decode_tok_s"] / row["v3_decode_tok_s"], 2)
        row["v32_over_dense_selection"] = round(row["v32_top256_decode_tok_s"] / row["v32_dense_decode_tok_s"], 2)
        result["contexts"][context] = row
        print(context, row, flush=True)
    emit(result)


if __name__ == "__main__":
    main()
