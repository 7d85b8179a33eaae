"""What constrained decoding (JSON Schema through llguidance) costs per decode step, on the bench model.

    python bench/structured.py [--requests 8 --rounds 3]

The model is bench/engine.py's (186M-class MLA + DeepSeekMoE, random bf16 weights) with the vocabulary of the real
DeepSeek-R1-Distill tokenizer (152,064 tokens, from the GGUF fixture in tests/data): the mask llguidance computes
and the engine applies is as large as a real model's. Requests ask for one JSON object of a fixed schema (strings,
integers, enums, an array, a nested object), sampled at temperature 1, batch 1 and batch --requests at once.
Measured per round, in alternating order: the same requests with and without the schema (plain decoding runs as
many tokens), and the processors' own time. Reported: the constrained step's share of the decode step (processor
seconds / decode seconds, median over rounds) and the per-token slowdown against plain decoding. One JSON line last
with the CPU class and dtype.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import emit, hf_v3_model  # noqa: E402
from engine import ENGINE_MODEL  # noqa: E402

from nanoseek import LLM, SamplingParams  # noqa: E402
from nanoseek.interop.gguf_import import _Fields, tokenizer_from_gguf  # noqa: E402
from nanoseek.serve.grammar import Grammars  # noqa: E402

FIXTURE = Path(__file__).parent.parent / "tests" / "data" / "r1_distill_qwen_tokenizer.gguf"
SCHEMA = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "role", "skills", "address"],
          "properties": {"name": {"type": "string", "maxLength": 40},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "role": {"enum": ["admin", "editor", "viewer"]},
                         "skills": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
                         "address": {"type": "object", "additionalProperties": False, "required": ["city", "zip"],
                                     "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}


def build(directory: Path) -> None:
    import gguf

    backend, config = tokenizer_from_gguf(_Fields(gguf.GGUFReader(str(FIXTURE))))
    vocab = backend.get_vocab_size(with_added_tokens=True)
    model = hf_v3_model(dict(ENGINE_MODEL, vocab_size=vocab, bos_token_id=151646, eos_token_id=151643),
                        dtype=torch.bfloat16)
    model.save_pretrained(directory)
    backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def run(llm: LLM, grammars: Grammars, prompts, lengths: list[int] | None, seed: int):
    """(decode seconds, tokens, processor seconds, outputs): constrained when `lengths` is None, else plain
    decoding of exactly those numbers of tokens (the constrained run's, request by request, so the batch empties
    the same way)."""
    processors, params = [], []
    for i in range(len(prompts)):
        procs = [grammars.processor(grammars.json_schema(SCHEMA))] if lengths is None else []
        processors += procs
        params.append(SamplingParams(temperature=1.0, seed=seed + i, max_tokens=400 if lengths is None else
                                     lengths[i], logits_processors=procs, ignore_eos=lengths is not None))
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return seconds, tokens, sum(p.seconds for p in processors), outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    directory = Path(tmp.name)
    build(directory)
    llm = LLM(str(directory), kv_cache_memory="1GiB")
    grammars = Grammars(llm.tokenizer, llm.engine.config.vocab_size, llm.engine.eos_ids)
    grammars.ll_tokenizer  # built once (~1 s), not part of any request
    chat = [{"role": "user", "content": "Describe a user of our service as JSON."}]
    prompt = llm.tokenizer.apply_chat_template(chat, add_generation_prompt=True)
    result = {"bench": "structured", "model": "bench/engine.py ENGINE_MODEL, R1-Distill vocabulary (152,064)",
              "dtype": str(llm.engine.model.compute_dtype).replace("torch.", "")}
    for batch in (1, args.requests):
        prompts = [prompt] * batch
        shares, slowdowns, valid, total = [], [], 0, 0
        for r in range(args.rounds):
            c_s, c_tok, proc_s, outs = run(llm, grammars, prompts, None, seed=100 * r)
            lengths = [len(o.outputs[0].token_ids) for o in outs]
            p_s, p_tok, _, _ = run(llm, grammars, prompts, lengths, seed=100 * r)
            shares.append(proc_s / c_s)
            slowdowns.append((c_s / c_tok) / (p_s / p_tok))
            for o in outs:
                total += 1
                try:
                    json.loads(o.outputs[0].text)
                    valid += 1
                except ValueError:
                    pass
        result[f"batch{batch}"] = {"constrained_share_of_step": round(statistics.median(shares), 4),
                                   "per_token_slowdown": round(statistics.median(slowdowns), 3),
                                   "valid_json": f"{valid}/{total}"}
        print(f"batch {batch}: share {statistics.median(shares):.3f}, slowdown {statistics.median(slowdowns):.3f}, "
              f"valid {valid}/{total}", flush=True)
    emit(result)


if __name__ == "__main__":
    main()
