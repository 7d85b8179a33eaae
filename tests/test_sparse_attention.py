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


def test_the_indexer_learns_from_its_own_loss_only(hf_checkpoint):
    """The top-k selection passes no gradient: the indexer's KL to the main attention is its only teacher, and
    that loss reaches no other weight (its inputs are detached)."""
    from nanoseek.train.trainer import LossModule

    directory, _ = hf_checkpoint("deepseek_v32")
    model = nanoseek.load_model(directory).train()
    ids = torch.randint(2, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    main, _, aux = LossModule(model)(ids[:, :-1], ids[:, 1:], None, 0.0)
    assert aux > 0
    aux.backward()
    for name, p in model.named_parameters():
        if ".indexer." in name and "k_norm" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        elif ".indexer." not in name:
            assert p.grad is None or not p.grad.any(), name
    model.zero_grad(set_to_none=True)
    main.backward()  # the language-model loss: through attention, never into the indexer
    assert all(p.grad is None or not p.grad.any() for n, p in model.named_parameters() if ".indexer." in n)


def test_a_v32_recipe_trains_and_transformers_runs_the_result(tmp_path):
    """model.model_type = "deepseek_v32" trains through the same trainer (a dense warm-up, then sparse, MTP
    included), the saved checkpoint is transformers' DeepseekV32ForCausalLM logit for logit, and its MTP layer
    drafts for speculative decoding without changing greedy output."""
    import transformers

    from nanoseek.train.recipe import load_recipe
    from nanoseek.train.stages import run_stage
    from recipes import write_tiny_recipe

    overrides = ["model.model_type=deepseek_v32", "model.index_topk=8", "model.index_head_dim=16",
                 "model.index_n_heads=16", "pretrain.indexer_warmup_steps=3"]
    recipe = load_recipe(write_tiny_recipe(tmp_path), overrides)
    path = run_stage(recipe, "pretrain", show_progress=False)
    rows = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and not r.get("event")]
    assert len(steps) == 6 and all(r["aux_loss"] > 0 for r in steps)
    start = nanoseek.load_model(path)  # the indexer moved away from its initialisation
    fresh = nanoseek.load_model(path)
    fresh.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(start.model.layers[0].self_attn.indexer.wq_b.weight,
                           fresh.model.layers[0].self_attn.indexer.wq_b.weight)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV32ForCausalLM"
    ids = torch.randint(2, start.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # 20 tokens: the top-8 selection cuts. (16 indexer heads: with 4, a few index scores are exactly 0 and
        # tie at the cut, and transformers' torch.topk breaks ties its own way.)
        assert (start.eval()(ids) - hf(ids).logits).abs().max() < 1e-4
    # A live indexer: its keys are not all zero (a zero LayerNorm scale at init would kill every score).
    assert start.model.layers[0].self_attn.indexer.k_norm.weight.abs().min() > 0.5
    prompts = [ids[0].tolist(), ids[1, :11].tolist()]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in LLM(path, dtype="float32").generate(prompts, greedy)]
    spec = LLM(path, dtype="float32", speculative="mtp", num_speculative_tokens=2)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, greedy)] == plain
