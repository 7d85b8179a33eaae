"""The CPU inference kernels (model/kernels/decode.py, csrc/decode.cpp) and the ops seam that picks them, against
float32 eager products. Each test runs the kernel build of the process's ISA level; .ci/run runs this file
natively and under the AVX2 ceiling (NANOSEEK_ISA=avx2), so the AVX-512 and the AVX2 paths are both checked."""

import copy
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import _get_build_directory

from nanoseek import runtime
from nanoseek.checkpoint import load_model
from nanoseek.config import ModelConfig
from nanoseek.model import ops
from nanoseek.model.attention import MLAttention
from nanoseek.model.kernels import decode
from nanoseek.model.layers import Linear, RMSNorm
from nanoseek.model.moe import Experts, MoE, Router
import procs

ISA = runtime.cpu().isa
needs_kernels = pytest.mark.skipif(not (ISA in decode.DECODE_KERNELS.isas and shutil.which("c++")),
                                   reason=f"the decode kernels need an x86 CPU with AVX2 or more ({ISA} here) and a "
                                          "C++ compiler")
needs_native_bf16 = pytest.mark.skipif(not (runtime.cpu().bf16_native and shutil.which("c++")),
                                       reason="the MLA cache attention kernel needs AVX512-BF16 (its AVX2 "
                                              "counterpart is the float32 gathered path, tested in test_engine)")
BOTH = [torch.bfloat16, torch.float32]  # activations: bf16 models, and bf16 weights computing in float32


def plan(compute: torch.dtype) -> ops.Plan:
    p = ops.inference_plan(torch.device("cpu"), compute)
    assert p is not None and p.small
    return p


def randomized(module: torch.nn.Module, g: torch.Generator, dtype: torch.dtype):
    """(module with N(0, 0.3) weights in `dtype`, for inference; its float32 copy, the eager reference)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.3, generator=g)
    module = module.to(dtype).eval()
    return module, copy.deepcopy(module).float()


@needs_kernels
def test_kernels_build_for_this_cpu_s_isa():
    kernels = decode.decode_kernels()
    assert kernels is not None
    assert kernels.isa == ("avx2" if ISA == "avx2" else "avx512")  # the vector layer compiled in
    assert kernels.native_bf16 == runtime.cpu().bf16_native
    assert ISA in decode.DECODE_KERNELS.extension_name(ISA)  # a shared build cache never mixes ISA levels


@needs_kernels
def test_a_kernel_build_killed_midway_does_not_hang_every_later_load():
    # What a Ctrl-C during the first build leaves: torch's `lock` file in the extension's build directory, which
    # torch alone would wait on forever, even for an extension already built.
    decode.decode_kernels()  # built (or loaded) here first, so the child only loads
    build_dir = Path(_get_build_directory(decode.DECODE_KERNELS.extension_name(ISA), verbose=False))
    stale = build_dir / "lock"
    stale.touch()
    try:
        r = procs.run([sys.executable, "-c", "from nanoseek.model.kernels.decode import decode_kernels; "
                       "assert decode_kernels() is not None"], timeout=120, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "left by a kernel build that was killed" in r.stderr and not stale.exists()
    finally:
        stale.unlink(missing_ok=True)


def test_the_first_build_on_a_machine_says_why_it_pauses(tmp_path, monkeypatch, capsys):
    import torch.utils.cpp_extension as cpp_extension

    from nanoseek.model.kernels.build import CompiledKernels

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    monkeypatch.setattr(cpp_extension, "load", lambda name, **kwargs: name)  # the compiler is not what is tested
    kernels = CompiledKernels("nanoseek_probe", "decode.cpp", ("avx2",))
    name = kernels.extension_name("avx2")
    assert kernels._build("avx2") == name
    assert "building the nanoseek_probe CPU kernels for avx2, once on this machine" in capsys.readouterr().err
    (tmp_path / name / f"{name}.so").touch()  # built: later loads are quiet
    assert kernels._build("avx2") == name and capsys.readouterr().err == ""


@needs_kernels
@pytest.mark.parametrize("x_dtype", BOTH)
# bf16 weights pack in input pairs (70: an odd number of pairs, the kernel's tail); float32 ones take any width
@pytest.mark.parametrize("w_dtype, K", [(torch.bfloat16, 64), (torch.bfloat16, 70), (torch.bfloat16, 768),
                                        (torch.float32, 64), (torch.float32, 33), (torch.float32, 768)])
@pytest.mark.parametrize("N", [48, 24])  # 24: padded to the kernel's blocks of 16 outputs
def test_grouped_linear_matches_a_float32_product_per_expert(N, K, x_dtype, w_dtype):
    g = torch.Generator().manual_seed(K)
    E = 5
    counts = torch.tensor([3, 0, 1, 19, 8])  # an empty expert, and more than the kernels' 4- and 8-row blocks
    w = torch.randn(E, N, K, generator=g).to(w_dtype)
    x = torch.randn(int(counts.sum()), K, generator=g).to(x_dtype)
    offsets = F.pad(counts.cumsum(0), (1, 0))
    y = decode.grouped_linear(x, decode.small_pack(w), offsets, N)
    ref = torch.cat([x[a:b].float() @ w[e].float().T for e, (a, b) in enumerate(zip(offsets[:-1], offsets[1:]))])
    assert y.dtype == x_dtype and y.shape == ref.shape
    if x_dtype == torch.float32:  # weights widened exactly (or float32): only the float32 summation order differs
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:  # bf16 output rounding (2^-9 relative) plus a different order of float32 summation
        torch.testing.assert_close(y.float(), ref, rtol=8e-3, atol=1e-3 * ref.abs().max().item())


@needs_kernels
@pytest.mark.parametrize("rows", [1, 4, 5, 32, 33, 200])  # decode kernel up to 32 rows, then oneDNN or widened
@pytest.mark.parametrize("compute", BOTH)
def test_linear_with_bf16_weights_matches_a_float32_product(rows, compute):
    torch.manual_seed(rows)
    layer = Linear(96, 64, bias=True).bfloat16()
    x = torch.randn(rows, 96).to(compute)
    with torch.no_grad():
        ref = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        layer.derive(plan(compute))
        assert layer.derived.small is not None
        # oneDNN packs weights of the compute dtype only where it has bf16 GEMMs (never on AVX2).
        assert (layer.derived.onednn is not None) == (compute == torch.bfloat16 and ISA != "avx2")
        y = layer(x)
    assert y.dtype == compute
    tol = dict(rtol=2e-2, atol=2e-2) if compute == torch.bfloat16 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y.float(), ref, **tol)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 5, 33])
def test_small_float32_weights_decode_on_the_kernel_and_large_ones_stay_on_onednn(rows, monkeypatch):
    """float32 weights (float32 checkpoints) get a decode-kernel copy up to SMALL_FLOAT32_ELEMENTS: their small
    products skip oneDNN's fixed cost per call and match the float32 product."""
    torch.manual_seed(rows)
    layer = Linear(96, 64, bias=True)
    x = torch.randn(rows, 96)
    calls = []
    original = decode.grouped_linear
    monkeypatch.setattr(decode, "grouped_linear", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        layer.derive(plan(torch.float32))
        assert layer.derived.small is not None and layer.derived.small.dtype == torch.float32
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert calls
    monkeypatch.setattr(decode, "SMALL_FLOAT32_ELEMENTS", 96 * 64 - 1)
    layer.derive(plan(torch.float32))
    assert layer.derived is None or layer.derived.small is None


@needs_kernels
@pytest.mark.parametrize("weights_dtype, compute", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                    (torch.float32, torch.float32)])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_routed_experts_in_one_kernel_call_match_the_eager_layer(tokens, weights_dtype, compute):
    config = ModelConfig(hidden_size=64, moe_intermediate_size=48, n_routed_experts=6, num_experts_per_tok=3)
    g = torch.Generator().manual_seed(tokens)
    experts, reference = randomized(Experts(config), g, weights_dtype)
    experts.derive(plan(compute))
    assert experts.derived.small is not None
    x = torch.randn(tokens, 64, generator=g).to(compute)
    indices = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(tokens)])
    weights = torch.rand(tokens, 3, generator=g)
    with torch.inference_mode():
        ours, ref = experts(x, weights, indices), reference(x.float(), weights, indices)
    assert ours.dtype == compute
    scale = ref.abs().max().item()
    tol = dict(rtol=0.03, atol=0.03 * scale) if compute == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(ours.float(), ref, **tol)


@needs_kernels
@pytest.mark.parametrize("weights_dtype, compute", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                    (torch.float32, torch.float32)])
@pytest.mark.parametrize("shared_experts", [1, 2])
def test_the_shared_expert_joins_the_routed_experts_kernel_call(shared_experts, weights_dtype, compute, monkeypatch):
    """Decoding a DeepSeekMoE layer runs its shared expert inside the routed experts' kernel call, bit for bit
    what the layer computes with the two halves apart (routed sum rounded, then the shared expert added)."""
    config = ModelConfig(hidden_size=64, moe_intermediate_size=48, n_routed_experts=6, num_experts_per_tok=2,
                         n_shared_experts=shared_experts, n_group=1, topk_group=1)
    g = torch.Generator().manual_seed(shared_experts)
    layer, reference = randomized(MoE(config), g, weights_dtype)
    ops.derive_weights(layer, plan(compute))
    calls = []
    original = decode.moe_swiglu
    monkeypatch.setattr(decode, "moe_swiglu", lambda *a: calls.append(a[-1] is not None) or original(*a))
    x = torch.randn(2, 64, generator=g).to(compute)
    with torch.inference_mode():
        fused = layer(x)
        monkeypatch.setattr(ops, "shared_expert_packs", lambda mlp: None)
        apart = layer(x)
        eager = reference(x.float())
    assert calls == [True, False]
    assert fused.dtype == compute and torch.equal(fused, apart)
    scale = eager.abs().max().item()
    tol = dict(rtol=0.03, atol=0.03 * scale) if compute == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(fused.float(), eager, **tol)


@needs_kernels
@pytest.mark.parametrize("method,n_group,topk_group", [("noaux_tc", 4, 2), ("group_limited_greedy", 4, 3),
                                                       ("greedy", 1, 1), ("noaux_tc", 1, 1)])
@pytest.mark.parametrize("x_dtype", BOTH)
@pytest.mark.parametrize("normalize", [True, False])
def test_the_routing_kernel_picks_and_weighs_the_eager_routers_experts(method, n_group, topk_group, x_dtype,
                                                                        normalize, monkeypatch):
    """Routing in one decode-kernel call: the eager Router's experts and weights, bit for bit."""
    config = ModelConfig(hidden_size=32, n_routed_experts=16, num_experts_per_tok=3, n_group=n_group,
                         topk_group=topk_group, topk_method=method, norm_topk_prob=normalize,
                         routed_scaling_factor=2.5, scoring_func="sigmoid" if method == "noaux_tc" else "softmax")
    router = Router(config).eval()
    g = torch.Generator().manual_seed(n_group + topk_group)
    with torch.no_grad():
        router.weight.normal_(0, 1, generator=g)
        if router.e_score_correction_bias is not None:
            router.e_score_correction_bias.normal_(0, 0.3, generator=g)
    x = torch.randn(50, 32, generator=g).to(x_dtype)
    calls = []
    original = ops.route
    monkeypatch.setattr(ops, "route", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        w_ref, i_ref, _ = router(x)
        router.derive(plan(torch.float32))
        assert router.derived
        w, i, _ = router(x)
    assert calls and torch.equal(i, i_ref) and torch.equal(w, w_ref)


@needs_kernels
def test_fused_rms_norm_rounds_like_the_reference_norm():
    torch.manual_seed(0)
    norm = RMSNorm(96, eps=1e-6).bfloat16().eval()
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = (torch.randn(5, 96) * 3).bfloat16()
    with torch.no_grad():
        ref = norm(x)
        ref32 = F.rms_norm(x.float(), (96,), norm.weight.float(), 1e-6)
        norm.derive(plan(torch.bfloat16))
        assert norm.derived
        y = norm(x)
        y32 = norm(x.float())  # bf16 weight, float32 activations
    # Same two roundings; only the float32 summation order differs, so nearly every element is identical.
    assert (y == ref).float().mean() > 0.98
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32, ref32, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("compute", BOTH)
def test_derived_bf16_model_matches_a_float32_model_and_follows_weight_changes(hf_checkpoint, compute):
    """The whole model on the kernels: bf16 weights computing in bf16 (native) or float32 (the AVX2 policy)."""
    directory, _ = hf_checkpoint("deepseek_v3")
    model = load_model(directory, dtype=torch.bfloat16).set_precision(torch.bfloat16, compute).eval()
    reference = load_model(directory, dtype=torch.bfloat16).float().eval()  # the same bf16 values, in float32
    ops.derive_weights(model)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(e.derived.small is not None for e in experts)
    attention = [m for m in model.modules() if isinstance(m, MLAttention)]
    assert attention and all(a.derived.small is not None for a in attention)
    ids = torch.tensor([[3, 17, 42]])  # 3 rows: every linear and the routed experts take the decode kernel
    with torch.inference_mode():
        ref = reference(ids)
        scale = ref.abs().max().item()
        tol = dict(rtol=0.05, atol=0.05 * scale) if compute == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4 * scale)

        def check(out, expected):
            assert out.dtype == compute
            torch.testing.assert_close(out.float(), expected, **tol)

        check(model(ids), ref)
        # The absorbed MLA path's per-head products run on the kernel too, for a prefill and a decode shape.
        check(model(ids, absorbed=True), ref)
        check(model(ids[:, :1], absorbed=True), ref[:, :1])
        # Derived weights are rebuilt by derive_weights after a weight change (what update_weights does).
        for p in [*model.parameters(), *reference.parameters()]:
            p.mul_(-1)
        ops.derive_weights(model)
        check(model(ids, absorbed=True), reference(ids))


def test_the_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("NANOSEEK_CPU_KERNELS", "0")
    decode.DECODE_KERNELS.reset()
    try:
        assert decode.decode_kernels() is None
        assert "off" in decode.DECODE_KERNELS.status()
        layer = Linear(32, 16).bfloat16()
        p = ops.inference_plan(torch.device("cpu"), torch.bfloat16)
        layer.derive(p)
        assert p is not None and not p.small and (layer.derived is None or layer.derived.small is None)
        x = torch.randn(3, 32).bfloat16()
        with torch.no_grad():  # still runs (oneDNN, or widened where bf16 is emulated)
            torch.testing.assert_close(layer(x).float(), F.linear(x.float(), layer.weight.float(),
                                                                   layer.bias.float()), rtol=2e-2, atol=2e-2)
    finally:
        monkeypatch.undo()
        decode.DECODE_KERNELS.reset()


@needs_native_bf16
def test_mla_decode_attention_from_the_paged_cache_matches_the_gathered_path(hf_checkpoint):
    from nanoseek.model.paged import PagedBatch

    directory, _ = hf_checkpoint("deepseek_v3")
    model = load_model(directory, dtype=torch.bfloat16).eval()
    ops.derive_weights(model)
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
        derived, attn.derived = attn.derived, None  # the absorbed path on gathered rows, no kernel
        ref = attn.heads_absorbed(q_nope[:, None], q_rope[:, None], cache[slots], mask)[:, 0].float()
        attn.derived = derived
    torch.testing.assert_close(ours, ref, rtol=0.02, atol=0.02 * ref.abs().max().item())


@needs_kernels
def test_a_bf16_engine_decodes_through_the_kernels(hf_checkpoint, monkeypatch):
    """dtype=bfloat16 works on every CPU class: the kernels run the decode products either way (and with
    AVX512-BF16 the MLA attention reads the paged cache in place)."""
    from nanoseek import LLM, SamplingParams

    calls = []
    original = decode.grouped_linear
    monkeypatch.setattr(decode, "grouped_linear", lambda *a: calls.append(1) or original(*a))
    directory, _ = hf_checkpoint("deepseek_v3")
    llm = LLM(directory, dtype="bfloat16", kv_cache_memory="4MiB")
    compute = torch.bfloat16 if runtime.cpu().bf16_native else torch.float32
    assert llm.engine.model.dtype == torch.bfloat16 and llm.engine.model.compute_dtype == compute
    out = llm.generate([[5, 9, 13, 2, 7], [40, 41, 42]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                                         logprobs=0))
    assert calls and all(len(o.outputs[0].token_ids) == 6 for o in out)
    assert all(torch.isfinite(torch.tensor([t["logprob"] for t in o.outputs[0].logprobs])).all() for o in out)


@needs_native_bf16
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
    out = ops.mla_cache_attention(q, cache, slots, lengths, 0.1, latent)
    for b, n in enumerate(lengths.tolist()):
        keys = cache[slots[b, :n]].float()
        ref = (q[b].float() @ keys.T * 0.1).softmax(-1) @ keys[:, :latent]
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, latent, rope", [(9, 40, 16), (4, 64, 32), (12, 256, 32)])
def test_float32_mla_decode_attention_kernel_matches_float32_attention(heads, latent, rope, cache_dtype):
    """The kernel every ISA builds (float32 queries, float32 or bf16 cache read in place): head groups with
    remainders, latent widths off the vector width, one-token contexts, padded slot rows."""
    g = torch.Generator().manual_seed(heads)
    width, slots_total, S = latent + rope, 500, 40
    cache = torch.randn(slots_total, width, generator=g).to(cache_dtype)
    lengths = torch.tensor([37, 1, 16])
    slots = torch.zeros(3, S, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        slots[b, :n] = torch.randperm(slots_total, generator=g)[:n]
    q = torch.randn(3, heads, width, generator=g)
    out = ops.mla_cache_attention(q, cache, slots, lengths, 0.1, latent)
    assert out.shape == (3, heads, latent) and out.dtype == torch.float32
    for b, n in enumerate(lengths.tolist()):
        keys = cache[slots[b, :n]].float()
        ref = (q[b] @ keys.T * 0.1).softmax(-1) @ keys[:, :latent]
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_mla_engine_decodes_through_the_stacked_input_projection_rope_and_cache_kernels(tmp_path, monkeypatch,
                                                                                          dtype):
    """An MLA engine whose W_UV has no decode-kernel pack (v_head_dim 24, as the speedrun model's) still reads
    decode attention from the paged cache; q_a and kv_a run as one stacked product and RoPE on the kernel; its
    greedy output is that of the module-by-module, eager, gathered path."""
    from tiny import save_hf_checkpoint

    from nanoseek import LLM, SamplingParams

    save_hf_checkpoint("deepseek_v3", tmp_path, v_head_dim=24)
    prompts, params = [[5, 9, 13, 2, 7], [40, 41, 42]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    calls = []
    for name in ("mla_cache_attention", "stacked_linear", "rotate_rows"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    llm = LLM(tmp_path, dtype=dtype, kv_cache_memory="4MiB")
    attention = llm.engine.model.model.layers[0].self_attn
    assert attention.derived.inputs is not None and attention.derived.kernels
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert {"mla_cache_attention", "stacked_linear", "rotate_rows"} <= set(calls)
    for layer in llm.engine.model.model.layers:
        layer.self_attn.derived = None
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == ours


@needs_kernels
def test_a_float32_engine_decodes_mla_attention_from_the_cache_in_place(hf_checkpoint, monkeypatch):
    """float32 inference (what every CPU without native bf16 runs) reads decode attention from the paged cache
    through the kernel, and greedy output stays that of the gathered path."""
    from nanoseek import LLM, SamplingParams

    directory, _ = hf_checkpoint("deepseek_v3")
    prompts, params = [[5, 9, 13, 2, 7], [40, 41, 42]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    calls = []
    original = ops.mla_cache_attention
    monkeypatch.setattr(ops, "mla_cache_attention", lambda *a: calls.append(a[0].dtype) or original(*a))
    llm = LLM(directory, dtype="float32", kv_cache_memory="4MiB")
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert calls and set(calls) == {torch.float32}
    monkeypatch.setattr(type(llm.engine.model.model.layers[0].self_attn), "_decodes_from_cache", lambda *a: False)
    gathered = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert ours == gathered


@needs_kernels
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(12, 2, 128), (4, 4, 24), (10, 1, 40), (18, 2, 16)])
def test_gqa_decode_attention_kernel_matches_float32_attention(heads, kv_heads, head_dim, cache_dtype):
    """Llama / Qwen2 decode attention read in place from the paged [slots, 2, kv_heads, D] cache: each query
    head reads its own KV head (query groups of 6, 1, 10 and 9 heads: one head group, remainders, MHA), head
    widths off the vector width, one-token contexts, padded slot rows."""
    g = torch.Generator().manual_seed(heads * head_dim)
    slots_total, S = 300, 40
    cache = torch.randn(slots_total, 2, kv_heads, head_dim, generator=g).to(cache_dtype)
    lengths = torch.tensor([37, 1, 16])
    slots = torch.zeros(3, S, dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        slots[b, :n] = torch.randperm(slots_total, generator=g)[:n]
    q = torch.randn(3, heads, head_dim, generator=g)
    out = ops.gqa_cache_attention(q, cache, slots, lengths, 0.1)
    assert out.shape == (3, heads, head_dim) and out.dtype == torch.float32
    for b, n in enumerate(lengths.tolist()):
        kv = cache[slots[b, :n]].float()  # [n, 2, kv_heads, D]
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1).transpose(0, 1) for t in (kv[:, 0], kv[:, 1]))
        ref = (q[b][:, None] @ k.transpose(1, 2) * 0.1).softmax(-1) @ v  # [heads, 1, D]
        torch.testing.assert_close(out[b], ref[:, 0], rtol=1e-5, atol=1e-5)


@needs_kernels
def test_gqa_decode_attention_kernel_refuses_slots_outside_the_cache():
    cache = torch.zeros(10, 2, 2, 16)
    q = torch.zeros(1, 4, 16)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.gqa_cache_attention(q, cache, torch.tensor([[3, 10]]), torch.tensor([2]), 0.1)
    with pytest.raises(RuntimeError, match="lengths"):
        ops.gqa_cache_attention(q, cache, torch.tensor([[3, 4]]), torch.tensor([3]), 0.1)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [128, 24, 6])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_kernel_rotates_like_the_eager_rotation(dtype, head_dim, interleaved):
    """The decode kernel's RoPE in both layouts: half-split in bf16 bit for bit with the eager rotation's
    roundings; interleaved (one float32 complex product, rounded once) to bf16's rounding; float32 to 1e-6. It
    also takes the [T, 1, D] shared rope key of MLA and leading batch dims."""
    from nanoseek.model.rope import Rope

    g = torch.Generator().manual_seed(head_dim)
    positions = torch.tensor([0, 7, 300, 4095])
    inv_freq = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    rope = Rope(positions[:, None].float() * inv_freq, 1.0, interleaved=interleaved)
    for shape in ((4, 3, head_dim), (4, 1, head_dim)):
        x = torch.randn(*shape, generator=g).to(dtype)
        ours = ops.rotate_rows(x, rope, fused=True)
        eager = rope.rotate(x)
        assert ours.dtype == dtype and ours.shape == x.shape
        assert not torch.equal(ours, x)
        if dtype == torch.bfloat16 and not interleaved:
            assert torch.equal(ours, eager)
        elif dtype == torch.bfloat16:
            torch.testing.assert_close(ours.float(), eager.float(), rtol=2 ** -8, atol=1e-6)
        else:
            torch.testing.assert_close(ours, eager, rtol=1e-6, atol=1e-6)
    batched = torch.randn(1, 4, 3, head_dim, generator=g).to(dtype)  # MLA's compress: [B = 1, T, heads, D]
    torch.testing.assert_close(ops.rotate_rows(batched, rope[None], fused=True).float(),
                               rope[None].rotate(batched).float(), rtol=2 ** -8, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_gqa_engine_decodes_through_the_stacked_projection_and_the_cache_kernel(hf_checkpoint, monkeypatch,
                                                                                  dtype):
    """A Qwen2 engine (q/k/v with biases, GQA) decodes with q, k and v in one stacked product (bf16 weights),
    the RoPE kernel and attention read in place from the cache, and its greedy output is that of the
    module-by-module, eager, gathered path."""
    from nanoseek import LLM, SamplingParams
    from nanoseek.model.attention import GQAttention

    directory, _ = hf_checkpoint("qwen2")
    prompts, params = [[5, 9, 13, 2, 7], [40, 41, 42]], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    calls = []
    original = ops.gqa_cache_attention
    monkeypatch.setattr(ops, "gqa_cache_attention", lambda *a: calls.append(a[0].shape) or original(*a))
    llm = LLM(directory, dtype=dtype, kv_cache_memory="4MiB")
    attention = llm.engine.model.model.layers[0].self_attn
    # q, k and v (and their biases) stacked for the decode kernel: bf16 weights, and small float32 ones
    assert attention.derived is not None and attention.derived[1] is not None
    ours = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert calls
    monkeypatch.setattr(GQAttention, "_decodes_from_cache", lambda *a: False)
    for layer in llm.engine.model.model.layers:
        layer.self_attn.derived, layer.self_attn.fused = None, False
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == ours


@needs_kernels
@pytest.mark.parametrize("arch", ["qwen2", "deepseek_v3"])
def test_stacked_weights_replace_their_parts_decode_copies(hf_checkpoint, arch):
    """gate/up, q/k/v and q_a/kv_a keep one decode-kernel copy, their stack's; each part keeps only what prefill
    uses."""
    directory, _ = hf_checkpoint(arch)
    model = load_model(directory, dtype=torch.bfloat16).eval()
    ops.derive_weights(model)
    stacks = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if arch == "qwen2":
            stacks.append((attention.derived[0], (attention.q_proj, attention.k_proj, attention.v_proj)))
        else:
            stacks.append((attention.derived.inputs[0], (attention.q_a_proj, attention.kv_a_proj_with_mqa)))
        mlp = getattr(mlp, "shared_experts", None) or mlp
        stacks.append((mlp.derived, (mlp.gate_proj, mlp.up_proj)))
    for stacked, parts in stacks:
        assert stacked is not None
        assert all(m.derived is None or m.derived.small is None for m in parts)
    assert model.model.layers[0].self_attn.o_proj.derived.small is not None  # a weight no stack holds keeps its own


def test_small_products_beyond_the_decode_row_limit_go_to_the_kernel():
    # 64 x 256 x 192: oneDNN's fixed cost would dominate; 64 x 4096 x 400: oneDNN's.
    assert 64 > decode.SMALL_ROWS and decode.small_product(64, 256, 192)
    assert not decode.small_product(64, 4096, 400)
    assert not decode.small_product(decode.SMALL_PRODUCT_ROWS + 1, 16, 16)


def test_bf16_products_are_widened_where_bf16_is_emulated(monkeypatch):
    """On a CPU without native bf16 a bf16 product runs in float32 (else ~45x slower); the result is the float32
    product rounded once."""
    x, w = torch.randn(7, 48).bfloat16(), torch.randn(24, 48).bfloat16()
    calls = []
    original = F.linear
    monkeypatch.setattr(F, "linear", lambda a, b, c=None: calls.append(a.dtype) or original(a, b, c))
    y = ops.linear(x, w)
    assert calls == ([torch.bfloat16] if runtime.cpu().bf16_native else [torch.float32])
    if not runtime.cpu().bf16_native:
        assert torch.equal(y, (x.float() @ w.float().T).bfloat16())
