"""DeepSeek-V4 as a model nanoseek runs: logit parity with transformers' DeepseekV4ForCausalLM (every layer kind:
window only, CSA with its indexer cutting the entries, HCA; hash-routed and learned-routed MoE layers), both
checkpoint spellings, the engine against transformers' generate, and training through the same trainer."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek import LLM, SamplingParams
from nanoseek.checkpoint import save_model
from nanoseek.config import ModelConfig
from nanoseek.errors import CheckpointError, ConfigError

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SEQ = 40  # > window (8), 10 CSA entries (> index_topk 3), 5 HCA entries


def _ids(batch=2, length=SEQ, seed=0):
    return torch.randint(2, 160, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_logits_match_transformers_on_every_layer_kind(hf_checkpoint):
    directory, hf = hf_checkpoint("deepseek_v4")
    model = nanoseek.load_model(directory)
    kinds = {layer.attn.kind for layer in model.model.layers}
    hashed = [layer.ffn.gate.hashed for layer in model.model.layers]
    assert kinds == {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}
    assert hashed == [True, True, False, False, False]
    ids = _ids()
    reference = hf(ids).logits
    assert (model(ids) - reference).abs().max() < 1e-4
    # The indexer's top-3 of up to 10 entries is a real cut: attending to every entry changes the logits.
    for layer in model.model.layers:
        if layer.attn.indexer is not None:
            layer.attn.indexer.topk = 100
    assert (model(ids) - reference).abs().max() > 1e-3


@torch.no_grad()
def test_saved_checkpoints_load_in_transformers_and_the_release_names_load_here(hf_checkpoint, tmp_path):
    directory, hf = hf_checkpoint("deepseek_v4")
    model = nanoseek.load_model(directory)
    ids = _ids(1)
    save_model(model, tmp_path / "ours", dtype=torch.bfloat16)
    stored = load_file(tmp_path / "ours" / "model.safetensors")
    # transformers' float32 modules stay float32 on disk; the hash table stays integer
    assert stored["model.layers.0.hc_attn_fn"].dtype == torch.float32
    assert stored["model.layers.1.attn.compressor.ape"].dtype == torch.float32
    assert stored["model.layers.0.ffn.gate.tid2eid"].dtype == torch.int64
    assert stored["model.layers.0.attn.wq_a.weight"].dtype == torch.bfloat16
    save_model(model, tmp_path / "ours32")
    import transformers

    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours32", dtype=torch.float32).eval()
    assert torch.equal(again(ids).logits, hf(ids).logits)
    # DeepSeek's release spelling: no `model.` prefix, `embed`, `hc_head_fn`, the attention's `kv_norm`
    release = tmp_path / "release"
    release.mkdir()
    tensors = load_file(tmp_path / "ours32" / "model.safetensors")
    renamed = {}
    for key, t in tensors.items():
        key = key.removeprefix("model.").replace("embed_tokens.", "embed.").replace("hc_head.hc_", "hc_head_")
        renamed[key.replace(".attn.norm.", ".attn.kv_norm.")] = t
    assert "layers.0.attn.kv_norm.weight" in renamed
    save_file(renamed, str(release / "model.safetensors"))
    (release / "config.json").write_text((tmp_path / "ours32" / "config.json").read_text())
    assert torch.equal(nanoseek.load_model(release)(ids), model(ids))


E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def test_the_releases_fp4_experts_and_fp8_weights_load_dequantized(hf_checkpoint, tmp_path):
    """DeepSeek-V4's release layout: routed experts as FP4 (two e2m1 codes per byte, low nibble first, a ue8m0
    scale per 32 inputs) and other matrices as FP8 with a `scale` per 128x128 block; both load as the floats
    they encode."""
    from nanoseek.checkpoint import fp8_block_quantize

    directory, _ = hf_checkpoint("deepseek_v4")
    tensors = load_file(directory / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    expected = {}
    for key in [k for k in tensors if ".experts." in k]:
        rows, cols = tensors[key].shape
        codes = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.uint8)
        exponents = torch.randint(-6, -1, (rows, cols // 32), generator=g).float()
        expected[key] = E2M1[codes.long()] * exponents.exp2().repeat_interleave(32, dim=1)
        tensors[key] = (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(torch.int8)
        tensors[key[: -len("weight")] + "scale"] = exponents.exp2().to(torch.float8_e8m0fnu)
    fp8_key = "model.layers.1.attn.wq_b.weight"
    q, scale = fp8_block_quantize(tensors[fp8_key])
    blocks = scale.repeat_interleave(128, 0)[: q.shape[0]].repeat_interleave(128, 1)[:, : q.shape[1]]
    expected[fp8_key] = q.float() * blocks
    tensors[fp8_key], tensors[fp8_key[: -len("weight")] + "scale"] = q, scale
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    model = nanoseek.load_model(tmp_path)
    experts = model.model.layers[2].ffn.experts
    I = experts.intermediate
    assert torch.equal(experts.gate_up_proj[3, :I], expected["model.layers.2.ffn.experts.3.w1.weight"])
    assert torch.equal(experts.gate_up_proj[3, I:], expected["model.layers.2.ffn.experts.3.w3.weight"])
    assert torch.equal(experts.down_proj[5], expected["model.layers.2.ffn.experts.5.w2.weight"])
    assert torch.equal(model.model.layers[1].attn.wq_b.weight, expected[fp8_key])
    bad = dict(tensors)
    bad["model.layers.2.ffn.experts.3.w1.scale"] = torch.ones(2, 2)
    save_file(bad, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="FP4 scale shape"):
        nanoseek.load_model(tmp_path)


def _reference(hf, prompts):
    out = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), max_new_tokens=GREEDY.max_tokens, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def _prompts(lengths=(5, 13, 22, 3, 41)):
    return [_ids(1, n, seed=n)[0].tolist() for n in lengths]


@pytest.mark.parametrize("regime", ["plain", "chunked_prefill", "preemption"])
def test_greedy_engine_output_equals_transformers_generate(hf_checkpoint, regime):
    """Prompts shorter and longer than the window and than top-k entries; windows completed inside prefills,
    across chunk boundaries and by decodes."""
    directory, hf = hf_checkpoint("deepseek_v4")
    options = {"plain": {}, "chunked_prefill": {"max_num_batched_tokens": 6}}.get(regime, {})
    if regime == "preemption":
        per_token = LLM(directory, block_size=4, kv_cache_memory=1 << 20).engine.kv_bytes_per_token
        options = {"block_size": 4, "kv_cache_memory": per_token * 64}
    llm = LLM(directory, dtype="float32", **options)
    prompts = _prompts()
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == _reference(hf, prompts)
    if regime == "preemption":
        assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_prefix_cache_hits_keep_greedy_output(hf_checkpoint):
    directory, hf = hf_checkpoint("deepseek_v4")
    llm = LLM(directory, dtype="float32", block_size=4)
    shared = _prompts((27,))[0]
    prompts = [shared + [7, 8, 9], shared + [11], shared[:9] + [3, 4, 5, 6, 7]]
    first = llm.generate(prompts[:1], GREEDY)[0]
    outs = llm.generate(prompts[1:], GREEDY)
    assert [o.metrics.prompt_cache_hit_tokens for o in outs] == [24, 8]
    assert [o.outputs[0].token_ids for o in [first, *outs]] == _reference(hf, prompts)


def test_v4_configs_are_checked():
    base = dict(model_type="deepseek_v4", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=16,
                q_lora_rank=8, qk_rope_head_dim=4, o_groups=2, o_lora_rank=8, n_routed_experts=4,
                num_experts_per_tok=2, index_head_dim=8)
    assert ModelConfig(**base).layer_types == ["heavily_compressed_attention"] * 2
    with pytest.raises(ConfigError, match="layer_types must name 2 layers"):
        ModelConfig(**base, layer_types=["sliding_attention"])
    with pytest.raises(ConfigError, match="o_groups"):
        ModelConfig(**{**base, "o_groups": 3})
    model = nanoseek.model.build_model(ModelConfig(**base))
    model.init_weights(generator=torch.Generator().manual_seed(0))
    with pytest.raises(ConfigError, match="left-padded"):
        model(torch.ones(2, 6, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6]))
    for layer in model.model.layers:  # a fresh hash table gives each token k distinct experts
        assert all(len(set(row.tolist())) == 2 for row in layer.ffn.gate.tid2eid)


V4_RECIPE = ["model.model_type=deepseek_v4", "model.head_dim=16", "model.o_groups=2", "model.o_lora_rank=8",
             "model.hc_mult=2", "model.sliding_window=16", "model.index_topk=4", "model.index_head_dim=16",
             "model.index_n_heads=8", "model.num_nextn_predict_layers=1",
             'model.layer_types=["compressed_sparse_attention","heavily_compressed_attention"]',
             'model.mlp_layer_types=["hash_moe","moe"]',
             'model.compress_rates={"compressed_sparse_attention"=4, "heavily_compressed_attention"=16}']


def test_a_v4_recipe_trains_and_transformers_runs_the_result(tmp_path):
    """model.model_type = "deepseek_v4" trains through the same trainer: hyper-connections, compressors and the
    indexer learn, the hash table stays fixed, the balancing bias of learned routers moves, and transformers'
    DeepseekV4ForCausalLM computes the same logits from the saved checkpoint."""
    import transformers

    from nanoseek.train.recipe import load_recipe
    from nanoseek.train.stages import run_stage
    from recipes import write_tiny_recipe

    recipe = load_recipe(write_tiny_recipe(tmp_path), V4_RECIPE)
    path = run_stage(recipe, "pretrain", show_progress=False)
    rows = [json.loads(line) for line in (path.parent / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r and not r.get("event")]
    assert len(losses) == 6 and losses[-1] < losses[0]
    trained = nanoseek.load_model(path)
    fresh = nanoseek.load_model(path)
    fresh.init_weights(std=0.02, generator=torch.Generator().manual_seed(0))  # the run's own seed and init
    layer, start = trained.model.layers[0], fresh.model.layers[0]
    for name in ("hc_attn_fn", "attn.compressor.wkv.weight", "attn.indexer.wq_b.weight", "attn.attn_sink"):
        assert not torch.equal(layer.get_parameter(name), start.get_parameter(name)), name
    assert torch.equal(layer.ffn.gate.tid2eid, start.ffn.gate.tid2eid)
    assert trained.model.layers[1].ffn.gate.bias.abs().sum() > 0
    mtp = trained.mtp[0]  # the MTP depth trained too (`mtp.0.*`, DeepSeek's names; transformers skips them)
    assert not torch.equal(mtp.e_proj.weight, fresh.mtp[0].e_proj.weight)
    assert "mtp.0.hc_head_fn" in load_file(path / "model.safetensors")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(2, trained.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (trained.eval()(ids) - hf(ids).logits).abs().max() < 1e-4
    # MTP drafts for speculative decoding; greedy output stays the plain decode's, token for token
    prompts = [ids[0].tolist(), ids[1, :11].tolist()]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in LLM(path, dtype="float32").generate(prompts, greedy)]
    spec = LLM(path, dtype="float32", speculative="mtp", num_speculative_tokens=2)
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, greedy)] == plain
    assert spec.engine.stats()["spec_draft_tokens"] > 0


def test_the_indexer_learns_from_its_own_loss_only(hf_checkpoint):
    """Top-k selection passes no gradient: the LM loss never reaches the indexer, and its KL to the attention's
    weights on the chosen entries reaches nothing else."""
    directory, _ = hf_checkpoint("deepseek_v4")
    model = nanoseek.load_model(directory).train()
    ids = _ids()
    model.summed_loss(model.hidden_states(ids), ids, None).backward()
    indexers = [layer.attn.indexer for layer in model.model.layers if layer.attn.indexer is not None]
    assert all(p.grad is None or not p.grad.any() for ix in indexers for p in ix.parameters())
    model.zero_grad(set_to_none=True)
    sum(ix.loss for ix in indexers).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
    assert with_grad and all(".attn.indexer." in n for n in with_grad)
    assert {n.split(".attn.indexer.")[1] for n in with_grad} >= {"wq_b.weight", "weights_proj.weight",
                                                                  "compressor.wkv.weight"}


def test_the_accounting_counts_the_model_nanoseek_builds(hf_checkpoint):
    from nanoseek.model.accounting import model_cost

    directory, _ = hf_checkpoint("deepseek_v4")
    model = nanoseek.load_model(directory)
    assert model_cost(model.config).total_params == sum(p.numel() for p in model.parameters())


def test_muon_trains_the_hidden_matrices_and_resumes_exactly(tmp_path):
    """optimizer = "muon": torch's Muon for 2-D hidden weights, AdamW for the embedding, head, vectors and
    stacked experts; a run resumed from a checkpoint ends bit-identical to the uninterrupted one."""
    import shutil

    from nanoseek.train.optim import build_optimizer
    from nanoseek.train.recipe import load_recipe, stage_config
    from nanoseek.train.stages import run_stage
    from recipes import write_tiny_recipe

    recipe = load_recipe(write_tiny_recipe(tmp_path), V4_RECIPE + [
        "train.optimizer=muon", "pretrain.save_every=3", "train.keep_checkpoints=5"])
    model = nanoseek.model.build_model(ModelConfig(**{k: v for k, v in _tiny_v4().items()}))
    muon, adamw = build_optimizer(model, stage_config(recipe, "pretrain")).optimizers
    assert type(muon).__name__ == "Muon"
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in in_muon}
    assert "model.layers.0.attn.wq_a.weight" in names and "model.layers.0.hc_attn_fn" in names
    assert not any(k in n for n in names for k in ("embed_tokens", "lm_head", "experts.gate_up_proj", "norm"))
    path = run_stage(recipe, "pretrain", show_progress=False)
    final = {k: v.clone() for k, v in nanoseek.load_model(path).state_dict().items()}
    shutil.rmtree(path)  # as if killed after the step-3 checkpoint: the resumed run redoes steps 4-6
    assert [p.name for p in (path.parent / "checkpoints").iterdir()] == ["step_000003"]
    run_stage(recipe, "pretrain", resume=True, show_progress=False)
    resumed = nanoseek.load_model(path).state_dict()
    assert all(torch.equal(final[k], resumed[k]) for k in final)


def _tiny_v4() -> dict:
    return dict(model_type="deepseek_v4", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                head_dim=16, q_lora_rank=8, qk_rope_head_dim=4, o_groups=2, o_lora_rank=8, n_routed_experts=4,
                num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16, index_head_dim=8, hc_mult=2)


def test_a_decode_reads_the_window_and_its_chosen_entries_only(hf_checkpoint, monkeypatch):
    """At 41+ tokens of context a decoded token's CSA attention reads its 8 window keys and its top-3 of 10
    entries; HCA all 5 complete entries; a window-only layer its 8 keys."""
    from nanoseek.model import v4

    directory, _ = hf_checkpoint("deepseek_v4")
    llm = LLM(directory, dtype="float32")
    widths = []
    original = v4.sink_attention

    def spy(q, kv, allowed, sinks, scale, return_probs=False):
        if q.shape[1] == 1:  # a decode row
            widths.append(kv.shape[1])
        return original(q, kv, allowed, sinks, scale, return_probs)

    monkeypatch.setattr(v4, "sink_attention", spy)
    llm.generate([_prompts((41,))[0]], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    # one decode step (the second token), five layers: window, CSA, HCA, CSA, window
    assert widths == [8, 8 + 3, 8 + 5, 8 + 3, 8]
