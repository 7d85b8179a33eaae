"""DeepSeek-V3.2's sparse attention: the lightning indexer's selection, in the model and in the engine.

Logit parity with transformers' DeepseekV32ForCausalLM (with index_topk smaller than the sequences), greedy
engine output against its `generate` (plain, chunked prefill, preemption, prefix-cache hits) and the checkpoint
round trip run for the `deepseek_v32` tiny checkpoint with every other architecture (conftest `arch`).
"""

import json
import sys

import pytest
import torch

import nanoseek
from nanoseek.config import ModelConfig
from nanoseek.engine import LLM, SamplingParams
from nanoseek.errors import ConfigError
from nanoseek.model.accounting import model_cost
from nanoseek.model.attention import MLAttention
from nanoseek.model.indexer import Indexer
from nanoseek.presets import load_preset

import procs


def test_each_query_keeps_its_top_k_allowed_keys():
    config = ModelConfig(model_type="deepseek_v32", q_lora_rank=8, qk_rope_head_dim=4, index_head_dim=8,
                         index_n_heads=2, index_topk=3)
    indexer = Indexer(config)
    g = torch.Generator().manual_seed(0)
    T = 7
    scores = torch.randn(2, T, T, generator=g)
    allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(2, T, T)
    chosen = indexer.select(scores, allowed)
    assert not (chosen & ~allowed).any()  # never a future token
    assert chosen.sum(-1).tolist() == [[min(3, t + 1) for t in range(T)]] * 2
    for b in range(2):
        for t in range(T):
            kept = scores[b, t, : t + 1][chosen[b, t, : t + 1]]
            dropped = scores[b, t, : t + 1][~chosen[b, t, : t + 1]]
            assert dropped.numel() == 0 or kept.min() > dropped.max()


def test_tied_scores_go_to_the_earlier_token_in_every_path():
    """A score every head's ReLU zeroes is exactly 0, so ties happen; the pick must not depend on whether the
    row is a prefill's, a decode's or a longer sequence's."""
    config = ModelConfig(model_type="deepseek_v32", q_lora_rank=8, qk_rope_head_dim=4, index_head_dim=8,
                         index_n_heads=2, index_topk=2)
    indexer = Indexer(config)
    scores = torch.tensor([[[0.5, 0.0, 0.0, 0.0, -1.0, 0.0]]])
    for width in (4, 5, 6):  # the same query, rows of different lengths
        row, allowed = scores[..., :width], torch.ones(1, 1, width, dtype=torch.bool)
        assert indexer.select(row, allowed)[0, 0].nonzero().flatten().tolist() == [0, 1]
        assert indexer.top(row[:, 0], allowed[:, 0])[0].tolist() == [[0, 1]]


@torch.no_grad()
def test_the_indexer_cuts_the_context(hf_checkpoint):
    """With index_topk 4 the tiny model is not the dense model: the selection changes every later logit."""
    directory, _ = hf_checkpoint("deepseek_v32")
    sparse = nanoseek.load_model(directory)
    dense = nanoseek.load_model(directory)
    for layer in dense.model.layers:
        layer.self_attn.indexer.topk = 10 ** 6
    ids = torch.randint(2, sparse.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    a, b = sparse(ids), dense(ids)
    assert torch.allclose(a[0, :4], b[0, :4], atol=1e-5)  # up to 4 tokens of context nothing is cut
    assert (a[0, 4:] - b[0, 4:]).abs().max() > 1e-2


def test_decode_attends_to_top_k_cached_rows_only(hf_checkpoint, monkeypatch):
    """Once a context is longer than index_topk, each decoded token's attention reads k latent rows."""
    directory, _ = hf_checkpoint("deepseek_v32")
    llm = LLM(directory, dtype="float32")
    widths = []
    original = MLAttention.heads_absorbed

    def spy(self, q_nope, q_rope, cached, mask):
        widths.append(cached.shape[1])
        return original(self, q_nope, q_rope, cached, mask)

    monkeypatch.setattr(MLAttention, "heads_absorbed", spy)
    out = llm.generate([list(range(2, 22))], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 6
    assert widths and max(widths) == 4  # 20+ tokens of context, 4 rows read


def test_v32_configs_need_q_lora_and_a_dense_prefix():
    with pytest.raises(ConfigError, match="q_lora_rank"):
        ModelConfig(model_type="deepseek_v32", q_lora_rank=None)
    hf = {**load_preset("deepseek-v3.2").to_hf_dict(), "mlp_layer_types": ["dense", "sparse", "dense"],
          "num_hidden_layers": 3}
    with pytest.raises(ConfigError, match="dense prefix"):
        ModelConfig.from_hf_dict(hf)


def test_deepseek_v32_preset_is_v3_plus_the_indexer():
    v3, v32 = model_cost(load_preset("deepseek-v3")), model_cost(load_preset("deepseek-v3.2"))
    indexer = 61 * (1536 * 64 * 128 + 7168 * 128 + 2 * 128 + 7168 * 64)
    assert v32.total_params == v3.total_params + indexer and v32.active_params == v3.active_params + indexer
    assert abs(v32.total_params / 671.9e9 - 1) < 0.01 and abs(v32.active_params / 37.9e9 - 1) < 0.03
    assert v32.kv_cache_bytes_per_token == 61 * (512 + 64 + 128) * 2  # latent + rope key + index key, bf16
    # At 128K context the main attention reads 2,048 keys; only the indexer scans them all.
    long_v3, long_v32 = model_cost(load_preset("deepseek-v3"), 131072), model_cost(load_preset("deepseek-v3.2"), 131072)
    assert long_v32.flops_per_token < 0.5 * long_v3.flops_per_token


def test_inspect_names_the_v32_preset():
    r = procs.run([sys.executable, "-m", "nanoseek.cli", "inspect", "deepseek-v3.2", "--json"],
                  capture_output=True, text=True, check=True)
    info = json.loads(r.stdout)
    assert info["kv_cache_bytes_per_token"] == 85_888 and info["total_params"] > 6.7e11
