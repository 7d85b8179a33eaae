"""The CPU inference kernels: oneDNN packing and nanoseek's small-batch bf16 kernel (model/csrc/bf16_gemv.cpp)."""

import copy
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanoseek.checkpoint import load_model
from nanoseek.model import cpu_kernels
from nanoseek.model.cpu_kernels import FusedRMSNorm, PackedLinear, bf16_kernels, grouped_linear, pack_model
from nanoseek.model.layers import RMSNorm

HAS_AVX512_BF16 = Path("/proc/cpuinfo").exists() and "avx512_bf16" in Path("/proc/cpuinfo").read_text()
needs_kernels = pytest.mark.skipif(not (HAS_AVX512_BF16 and shutil.which("c++")),
                                   reason="the bf16 decode kernel needs AVX512-BF16 and a C++ compiler")


@needs_kernels
def test_kernels_build_where_the_cpu_supports_them():
    assert bf16_kernels() is not None


@needs_kernels
@pytest.mark.parametrize("K", [64, 70, 768])  # 70: an odd number of input pairs (the kernel's tail)
def test_grouped_linear_matches_a_float32_product_per_expert(K):
    g = torch.Generator().manual_seed(K)
    E, N = 5, 48
    counts = torch.tensor([3, 0, 1, 19, 8])  # an empty expert, and more than the kernel's 8-row block
    w = torch.randn(E, N, K, generator=g).bfloat16()
    x = torch.randn(int(counts.sum()), K, generator=g).bfloat16()
    offsets = F.pad(counts.cumsum(0), (1, 0))
    y = grouped_linear(x, bf16_kernels().pack(w), offsets, N)
    ref = torch.cat([x[a:b].float() @ w[e].float().T for e, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))])
    assert y.dtype == torch.bfloat16 and y.shape == ref.shape
    # bf16 output rounding (2^-9 relative) plus a different order of float32 summation.
    torch.testing.assert_close(y.float(), ref, rtol=8e-3, atol=1e-3 * ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("rows", [1, 4, 32, 33])  # up to SMALL_ROWS (32) on the decode kernel, then oneDNN
def test_packed_linear_matches_f_linear_in_bf16(rows):
    torch.manual_seed(rows)
    layer = torch.nn.Linear(96, 64, bias=True).bfloat16()
    x = torch.randn(rows, 96).bfloat16()
    with torch.no_grad():
        ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        pack_model(layer)
        assert isinstance(layer, PackedLinear) and layer.small_packed is not None
        y = layer(x)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


@needs_kernels
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_routed_experts_in_one_kernel_call_match_the_eager_layer(tokens):
    from nanoseek.config import ModelConfig

    config = ModelConfig(hidden_size=64, moe_intermediate_size=48, n_routed_experts=6, num_experts_per_tok=3)
    experts = cpu_kernels.Experts(config)
    g = torch.Generator().manual_seed(tokens)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.3, generator=g)
    experts = experts.bfloat16()
    reference = copy.deepcopy(experts)
    pack_model(experts)
    assert experts.small_packed is not None
    x = torch.randn(tokens, 64, generator=g).bfloat16()
    indices = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3, generator=g)
    with torch.inference_mode():
        ours, ref = experts(x, weights, indices).float(), reference(x, weights, indices).float()
    torch.testing.assert_close(ours, ref, rtol=0.03, atol=0.03 * ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("method,n_group,topk_group", [("noaux_tc", 4, 2), ("group_limited_greedy", 4, 3),
                                                       ("greedy", 1, 1), ("noaux_tc", 1, 1)])
def test_fused_expert_selection_picks_the_eager_routers_experts(method, n_group, topk_group):
    from nanoseek.config import ModelConfig
    from nanoseek.model.moe import Router

    config = ModelConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=3, n_group=n_group,
                         topk_group=topk_group, topk_method=method,
                         scoring_func="sigmoid" if method == "noaux_tc" else "softmax")
    router = Router(config)
    g = torch.Generator().manual_seed(n_group + topk_group)
    with torch.no_grad():
        router.weight.normal_(0, 1, generator=g)
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.normal_(0, 0.3, generator=g)
    x = torch.randn(50, 32, generator=g)
    with torch.no_grad():
        w_ref, i_ref, _ = router(x)
        router.fused_select = True
        w, i, _ = router(x)
    assert torch.equal(i, i_ref) and torch.equal(w, w_ref)


@needs_kernels
def test_fused_rms_norm_rounds_like_the_reference_norm():
    torch.manual_seed(0)
    norm = RMSNorm(96, eps=1e-6).bfloat16()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = (torch.randn(5, 96) * 3).bfloat16()
    with torch.no_grad():
        ref = norm(x)
        pack_model(norm)
        assert isinstance(norm, FusedRMSNorm)
        y = norm(x)
    # Same two roundings; only the float32 summation order differs, so nearly every element is identical.
    assert (y == ref).float().mean() > 0.98
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)


@needs_kernels
def test_packed_bf16_model_matches_the_unpacked_model_and_follows_weight_changes(hf_checkpoint):
    directory, _ = hf_checkpoint("deepseek_v3")
    model = load_model(directory, dtype=torch.bfloat16).eval()
    reference = copy.deepcopy(model)
    pack_model(model)
    experts = [m for m in model.modules() if isinstance(m, cpu_kernels.Experts)]
    assert experts and all(e.small_packed is not None for e in experts)
    attention = [m for m in model.modules() if isinstance(m, cpu_kernels.MLAttention)]
    assert attention and all(a.absorbed_small is not None for a in attention)
    ids = torch.tensor([[3, 17, 42]])  # 3 rows: every linear and the routed experts take the decode kernel
    with torch.inference_mode():
        ref = reference(ids).float()
        tol = dict(rtol=0.05, atol=0.05 * ref.abs().max().item())
        torch.testing.assert_close(model(ids).float(), ref, **tol)
        # The absorbed MLA path's per-head products run on the kernel too, for a prefill and a decode shape.
        torch.testing.assert_close(model(ids, absorbed=True).float(), ref, **tol)
        torch.testing.assert_close(model(ids[:, :1], absorbed=True).float(), ref[:, :1], **tol)
        # Derived weights are rebuilt by pack_model after a weight change (what update_weights does).
        for p in model.parameters():
            p.mul_(-1)
        pack_model(model)
        for p in reference.parameters():
            p.mul_(-1)
        torch.testing.assert_close(model(ids, absorbed=True).float(), reference(ids).float(), **tol)


def test_the_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("NANOSEEK_CPU_KERNELS", "0")
    cpu_kernels._DECODE_KERNELS.reset()
    try:
        assert bf16_kernels() is None
        layer = torch.nn.Linear(32, 16).bfloat16()
        pack_model(layer)
        assert layer.small_packed is None
    finally:
        monkeypatch.undo()
        cpu_kernels._DECODE_KERNELS.reset()


@needs_kernels
def test_mla_decode_attention_from_the_paged_cache_matches_the_gathered_path(hf_checkpoint):
    from nanoseek.model.paged import PagedBatch

    directory, _ = hf_checkpoint("deepseek_v3")
    model = load_model(directory, dtype=torch.bfloat16).eval()
    model.cache_derived_weights()
    pack_model(model)
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    H, width = attn.n_heads, attn.kv_lora_rank + attn.rope_dim
    cache = torch.randn(64, width, generator=g).bfloat16()
    lengths = torch.tensor([5, 17, 1])
    slots = torch.zeros(3, 17, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        slots[b, :n] = torch.randperm(64, generator=g)[:n]  # scattered blocks, as a paged cache holds them
    mask = (torch.arange(17)[None, :] < lengths[:, None])[:, None, None, :]
    batch = PagedBatch(slot_mapping=torch.zeros(3, dtype=torch.long), prefills=[], decode_rows=torch.arange(3),
                       decode_slots=slots, decode_mask=mask, logits_rows=torch.arange(3), decode_lengths=lengths)
    q_nope = torch.randn(3, H, attn.nope_dim, generator=g).bfloat16()
    q_rope = torch.randn(3, H, attn.rope_dim, generator=g).bfloat16()
    with torch.inference_mode():
        assert attn._decodes_from_cache(cache, batch)
        ours = attn._decode_from_cache(q_nope, q_rope, cache, batch).float()
        small, attn.absorbed_small = attn.absorbed_small, None  # the float32 absorbed path on gathered rows
        ref = attn.heads_absorbed(q_nope[:, None], q_rope[:, None], cache[slots], mask)[:, 0].float()
        attn.absorbed_small = small
    torch.testing.assert_close(ours, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


@needs_kernels
def test_a_bf16_engine_decodes_through_the_kernels(hf_checkpoint, monkeypatch):
    from nanoseek import LLM, SamplingParams

    calls = []
    original = cpu_kernels.MLAttention._decode_from_cache
    monkeypatch.setattr(cpu_kernels.MLAttention, "_decode_from_cache",
                        lambda self, *a: calls.append(1) or original(self, *a))
    directory, _ = hf_checkpoint("deepseek_v3")
    llm = LLM(directory, dtype="bfloat16", kv_cache_memory="4MiB")
    out = llm.generate([[5, 9, 13, 2, 7], [40, 41, 42]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                                         logprobs=0))
    assert calls and all(len(o.outputs[0].token_ids) == 6 for o in out)
    assert all(torch.isfinite(torch.tensor([t["logprob"] for t in o.outputs[0].logprobs])).all() for o in out)


@needs_kernels
@pytest.mark.parametrize("heads, latent, rope", [(9, 40, 16), (4, 64, 32), (16, 512, 64)])
def test_mla_decode_attention_kernel_matches_float32_attention(heads, latent, rope):
    """Head groups of 8 and 4 with remainders, latent widths off the 16-column chunks, contexts spanning
    several 16-row blocks with a partial last one, one-token contexts."""
    g = torch.Generator().manual_seed(heads)
    width, slots_total, S = latent + rope, 500, 40
    cache = torch.randn(slots_total, width, generator=g).bfloat16()
    lengths = torch.tensor([37, 1, 16])
    slots = torch.zeros(3, S, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        slots[b, :n] = torch.randperm(slots_total, generator=g)[:n]
    q = torch.randn(3, heads, width, generator=g).bfloat16()
    out = bf16_kernels().mla_decode_attention(q, cache, slots, lengths, 0.1, latent)
    for b, n in enumerate(lengths.tolist()):
        keys = cache[slots[b, :n]].float()
        ref = (q[b].float() @ keys.T * 0.1).softmax(-1) @ keys[:, :latent]
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_small_products_beyond_the_decode_row_limit_run_on_the_kernel():
    from nanoseek.model.cpu_kernels import SMALL_ROWS, small_linear

    layer = torch.nn.Linear(192, 256, bias=False).bfloat16()
    pack_model(layer)
    x = torch.randn(64, 192).bfloat16()
    assert 64 > SMALL_ROWS
    y = small_linear(x, layer.small_packed, 256)
    assert y is not None  # 64 x 256 x 192: oneDNN's fixed cost would dominate
    torch.testing.assert_close(y.float(), (x.float() @ layer.weight.float().T), rtol=0.02, atol=0.02)
    big = torch.nn.Linear(400, 4096, bias=False).bfloat16()
    pack_model(big)
    assert small_linear(torch.randn(64, 400).bfloat16(), big.small_packed, 4096) is None  # oneDNN's
