"""Shared helpers for the side-by-side benchmarks: a mid-size MoE config, timing, one JSON line out."""

from __future__ import annotations

import json
import statistics
import time

import torch

# The mid-size DeepSeek-V3-architecture config the benchmarks compare on (MLA + DeepSeekMoE).
MID_MOE = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, moe_intermediate_size=256,
               num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=256,
               kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16,
               num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
               max_position_embeddings=4096, num_nextn_predict_layers=0, bos_token_id=0, eos_token_id=1)


def hf_v3_model(overrides: dict | None = None, dtype=torch.float32, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**{**MID_MOE, **(overrides or {})})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # routing must vary between tokens, as in a trained model
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def machine() -> dict:
    """The CPU class every benchmark line names: ISA level (under any NANOSEEK_ISA ceiling) and native bf16."""
    from nanoseek import runtime

    info = runtime.cpu()
    return {"isa": info.isa, "native_isa": info.native_isa, "bf16_native": info.bf16_native, "cores": info.cores}


def emit(result: dict) -> None:
    print(json.dumps({**result, **machine()}), flush=True)
