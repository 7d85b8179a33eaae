"""Numerics: nanoseek's Transformer against the installed transformers, float32, tiny random checkpoints."""

import pytest
import torch

import nanoseek

TOL = 1e-4


def _prompts(vocab: int, batch: int = 3, length: int = 19, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, length), generator=g)


@torch.no_grad()
def test_logits_match_transformers(arch, hf_checkpoint):
    directory, reference = hf_checkpoint(arch)
    model = nanoseek.load_model(directory)
    for seed in (1, 2):
        ids = _prompts(model.config.vocab_size, seed=seed)
        expected = reference(ids).logits
        got = model(ids)
        assert got.shape == expected.shape
        err = (got - expected).abs().max().item()
        assert err < TOL, f"{arch}: max |logit diff| {err:.2e}"
        # The check is meaningful only if logits are not all tiny.
        assert expected.abs().max() > 1.0


@torch.no_grad()
def test_padded_batch_matches_transformers(arch, hf_checkpoint):
    directory, reference = hf_checkpoint(arch)
    model = nanoseek.load_model(directory)
    ids = _prompts(model.config.vocab_size, batch=2, length=12)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding, as batched generation uses
    expected = reference(ids, attention_mask=mask).logits
    got = model(ids, attention_mask=mask)
    keep = mask.bool()
    assert (got[keep] - expected[keep]).abs().max().item() < TOL
    # The padded row's real tokens see exactly what the unpadded sequence sees.
    alone = model(ids[1:, 5:])
    assert (got[1, 5:] - alone[0]).abs().max().item() < TOL


@torch.no_grad()
@pytest.mark.parametrize("mla_arch", ["deepseek_v3", "deepseek_v2", "deepseek_v3_no_q_lora"])
def test_absorbed_mla_path_equals_full_path(mla_arch, hf_checkpoint):
    directory, _ = hf_checkpoint(mla_arch)
    model = nanoseek.load_model(directory)
    ids = _prompts(model.config.vocab_size)
    full = model(ids)
    absorbed = model(ids, absorbed=True)
    assert (full - absorbed).abs().max().item() < TOL


@torch.no_grad()
def test_absorbed_decode_against_latent_prefix_equals_full_attention(hf_checkpoint):
    """The decode case: one new query attending to a cached latent prefix, both paths, one layer."""
    directory, _ = hf_checkpoint("deepseek_v3")
    model = nanoseek.load_model(directory)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 9, model.config.hidden_size)
    q_nope, q_rope, latent, k_rope, _ = attn.compress(x, model.rotary(torch.arange(9).expand(2, 9)))
    mask = torch.ones(1, 9, dtype=torch.bool)  # the last token sees all 9 cached tokens
    last = slice(8, 9)
    cached = torch.cat((latent, k_rope), dim=-1)
    full = attn.heads_full(q_nope[:, last], q_rope[:, last], cached, mask)
    absorbed = attn.heads_absorbed(q_nope[:, last], q_rope[:, last], cached, mask)
    assert (full - absorbed).abs().max().item() < 1e-5


@torch.no_grad()
def test_bfloat16_model_is_close_to_float32(hf_checkpoint):
    directory, _ = hf_checkpoint("deepseek_v3")
    m32 = nanoseek.load_model(directory)
    m16 = nanoseek.load_model(directory, dtype=torch.bfloat16)
    assert m16.model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    assert m16.model.layers[1].mlp.gate.weight.dtype == torch.float32  # routing stays fp32
    ids = _prompts(m32.config.vocab_size)
    a, b = m32(ids), m16(ids).float()
    assert a.argmax(-1).eq(b.argmax(-1)).float().mean() > 0.8
    assert (a - b).abs().mean() < 0.1 * a.abs().mean()


def test_router_bias_selects_but_never_weights():
    """noaux_tc: the correction bias changes which experts win, never the weights they get."""
    from nanoseek.config import ModelConfig
    from nanoseek.model.moe import Router

    config = ModelConfig(model_type="deepseek_v3", hidden_size=8, n_routed_experts=4, num_experts_per_tok=1,
                         n_group=1, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
                         norm_topk_prob=False, routed_scaling_factor=1.0)
    router = Router(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4, 8))
        x = torch.zeros(1, 8)
        x[0, 0] = 2.0  # expert 0 scores sigmoid(2), others sigmoid(0) = 0.5
        w, idx, _ = router(x)
        assert idx.item() == 0 and abs(w.item() - torch.sigmoid(torch.tensor(2.0)).item()) < 1e-6
        router.e_score_correction_bias.copy_(torch.tensor([0.0, 0.0, 1.0, 0.0]))
        w, idx, _ = router(x)
        assert idx.item() == 2 and abs(w.item() - 0.5) < 1e-6


def test_group_limited_routing_masks_with_minus_infinity():
    """With negative biased scores, masked groups must never be chosen (older code masked with 0.0)."""
    from nanoseek.config import ModelConfig
    from nanoseek.model.moe import Router

    config = ModelConfig(model_type="deepseek_v3", hidden_size=4, n_routed_experts=4, num_experts_per_tok=2,
                         n_group=2, topk_group=1, topk_method="noaux_tc", scoring_func="sigmoid",
                         norm_topk_prob=True, routed_scaling_factor=1.0)
    router = Router(config)
    with torch.no_grad():
        router.weight.zero_()
        router.e_score_correction_bias.copy_(torch.tensor([-2.0, -2.0, -1.0, -3.0]))
        _, idx, _ = router(torch.zeros(1, 4))
    # group 0 sums -3.0, group 1 sums -3.0 + ... : group 1 = (-0.5, -2.5) -> -3.0 vs group 0 (-1.5, -1.5) -> -3.0
    # tie broken either way, but both chosen experts must come from one group
    groups = {i // 2 for i in idx[0].tolist()}
    assert len(groups) == 1
