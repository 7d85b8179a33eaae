"""The fused CPU training path (model/kernels/training.py, csrc/train_ops.cpp) against the eager modules it
replaces.

Each op is compared with the eager computation in the same precision, in both compute dtypes the path runs in:
bf16 autocast over float32 weights (CPUs with native bf16) and plain float32 (the others) -- forward values and
every gradient within that dtype's rounding. The whole model is compared too, and the fused path is checked to
run in training mode only. .ci/run runs this file natively and under the AVX2 ceiling (NANOSEEK_ISA=avx2): each
ISA's build of the kernels is checked against eager float32.
"""

import shutil

import pytest
import torch
import torch.nn.functional as F

from nanoseek import runtime
from nanoseek.checkpoint import load_model
from nanoseek.model.kernels import training as tk
from nanoseek.train.trainer import LossModule

pytestmark = pytest.mark.skipif(not (shutil.which("c++") and runtime.cpu().isa in tk.TRAIN_KERNELS.isas),
                                reason=f"the training kernels need a C++ compiler and an x86 CPU with AVX2 or more "
                                       f"({runtime.cpu().isa} here)")

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)
# Relative tolerance per compute dtype: bf16 results rounded in different places differ by a few ulps; float32
# ones only by the order of summation.
REL = {torch.bfloat16: 0.02, torch.float32: 2e-4}


@pytest.fixture(params=[torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def compute(request):
    return request.param


def _close(a, b, rel=0.02):
    """Within `rel` of the larger magnitude."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1e-6)
    assert (a.float() - b.float()).abs().max().item() <= rel * scale, ((a.float() - b.float()).abs().max(), scale)


def _autocast(compute):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=compute == torch.bfloat16)


def _run(fn, inputs, compute=torch.bfloat16, upstream_seed=0):
    """fn(*inputs) in `compute` (bf16 autocast or float32), backward against a fixed random upstream gradient
    -> (out, grads)."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with _autocast(compute):
        out = fn(*leaves)
    # bf16-representable, as every upstream gradient in a bf16 model is: a bf16 output rounds it on the way in
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed)).bfloat16().float()
    (out.float() * g).sum().backward()
    return out.detach().float(), [t.grad for t in leaves if t.requires_grad]


def _compare(fused, eager, inputs, compute=torch.bfloat16, rel=None):
    rel = rel or REL[compute]
    out_f, grads_f = _run(fused, inputs, compute)
    with tk.eager():
        out_e, grads_e = _run(eager, inputs, compute)
    _close(out_f, out_e, rel)
    assert len(grads_f) == len(grads_e)
    for gf, ge in zip(grads_f, grads_e):
        _close(gf, ge, rel)


def test_the_kernels_build_for_this_cpu_s_isa():
    kernels = tk.train_kernels()
    assert kernels is not None and kernels.isa == ("avx2" if runtime.cpu().isa == "avx2" else "avx512")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_eager(dtype, compute):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(37, 72, generator=g).to(dtype), 1 + 0.1 * torch.randn(72, generator=g)

    def eager(x, w):
        n = F.rms_norm(x.float(), (72,), eps=1e-6)
        return w * (n if x.dtype == torch.float32 else n.to(x.dtype))

    _compare(lambda x, w: tk.rms_norm(x, w, 1e-6), eager, [x, w], compute,
             rel=0.02 if torch.bfloat16 in (dtype, compute) else None)


def test_swiglu_mlp_matches_eager(compute):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 19, 48, generator=g)
    wg, wu, wd = (torch.randn(s, generator=g) * 0.2 for s in [(40, 48), (40, 48), (48, 40)])
    _compare(tk.swiglu_mlp, lambda x, a, b, c: F.linear(F.silu(F.linear(x, a)) * F.linear(x, b), c),
             [x, wg, wu, wd], compute)


@pytest.mark.parametrize("tokens", [5, 70])  # 5 tokens leave experts empty; 70 pad most experts' rows
def test_routed_experts_match_the_eager_experts(tokens, compute):
    g = torch.Generator().manual_seed(tokens)
    E, H, I, k = 6, 32, 24, 2
    x = torch.randn(tokens, H, generator=g)
    logits = torch.randn(tokens, E, generator=g)
    indices = logits.topk(k, dim=-1).indices
    w_gate_up = torch.randn(E, 2 * I, H, generator=g) * 0.2
    w_down = torch.randn(E, H, I, generator=g) * 0.2
    scores = torch.rand(tokens, k, generator=g)

    def eager(x, weights, w_gate_up, w_down):
        out = torch.zeros(tokens, H)
        for n in range(tokens):
            for j in range(k):
                e = indices[n, j]
                gate, up = F.linear(x[n], w_gate_up[e]).chunk(2)
                out[n] += weights[n, j] * F.linear(F.silu(gate) * up, w_down[e]).float()
        return out

    fused = lambda x, weights, a, b: tk.routed_experts(x, weights, indices, a, b)  # noqa: E731
    _compare(fused, eager, [x, scores, w_gate_up, w_down], compute)
    if tokens == 5:  # an expert no token chose gets a zero gradient, not garbage
        unused = sorted(set(range(E)) - set(indices.flatten().tolist()))
        _, grads = _run(fused, [x, scores, w_gate_up, w_down], compute)
        assert unused and all(grads[2][e].abs().max() == 0 for e in unused)


def test_causal_attention_matches_sdpa(compute):
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 33, 3, 24, generator=g), torch.randn(2, 33, 3, 24, generator=g)
    v = torch.randn(2, 33, 3, 16, generator=g)

    def eager(q, k, v):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True, scale=0.3).transpose(1, 2)

    _compare(lambda q, k, v: tk.causal_attention(q, k, v, 0.3), eager, [q, k, v], compute,
             rel=0.03 if compute == torch.bfloat16 else None)


@pytest.mark.parametrize("chunked", [False, True])
def test_linear_cross_entropy_matches_eager_with_mask_and_ignored_targets(chunked, compute, monkeypatch):
    if chunked:  # several row chunks: the weight gradient summed across them
        monkeypatch.setattr(tk, "CE_CHUNK_BYTES", compute.itemsize * 50 * 7)
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(3, 20, 32, generator=g), torch.randn(50, 32, generator=g) * 0.3
    targets = torch.randint(0, 50, (3, 20), generator=g)
    targets[0, :4] = -100
    mask = (torch.rand(3, 20, generator=g) > 0.3).float()

    def eager(h, w):
        ce = F.cross_entropy(F.linear(h, w).float().flatten(0, 1), targets.flatten(), reduction="none")
        return (ce * mask.flatten()).sum()

    def run(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with _autocast(compute):
            loss = fn(h, w)
        (loss * 0.37).backward()
        return loss.detach(), h.grad, w.grad

    fused = run(lambda h, w: tk.linear_cross_entropy(h, w, targets, mask))
    with tk.eager():
        ref = run(eager)
    for a, b in zip(fused, ref):
        _close(a, b, REL[compute])


def test_linear_cross_entropy_refuses_a_second_backward():
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    with torch.autocast(**BF16):
        loss = tk.linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_log_softmax(temperature, compute):
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(30, 32, generator=g), torch.randn(45, 32, generator=g) * 0.4
    targets = torch.randint(0, 45, (30,), generator=g)

    def eager(h, w):
        logsm = (F.linear(h, w).float() / temperature).log_softmax(-1)
        return logsm.gather(1, targets[:, None])[:, 0], -(logsm.exp() * logsm).sum(-1)

    def run(fn):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with _autocast(compute):
            logp, entropy = fn(h, w)
        (logp * torch.linspace(-1, 1, 30)).sum().backward()
        return logp.detach(), entropy.detach(), h.grad, w.grad

    fused = run(lambda h, w: tk.token_logprobs(h, w, targets, temperature))
    with tk.eager():
        ref = run(eager)
    for a, b in zip(fused, ref):
        _close(a, b, REL[compute])


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2", "qwen2"])
def test_a_whole_training_step_is_as_accurate_as_eager_autocast(arch, hf_checkpoint):
    """Loss and gradients of LossModule against the float32 eager model: the fused bf16 path is as close as the
    eager bf16 path is. (Layer by layer the two bf16 paths agree to a few ulps, tested above; through a whole
    random model a rounding difference can flip a routing decision, so the whole-model yardstick is float32.)"""
    directory, _ = hf_checkpoint(arch)
    model = load_model(directory).train()
    module = LossModule(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 32)
    mask[0, :10] = 0

    def step(bf16: bool):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            main, _, _ = module(ids[:, :-1], ids[:, 1:], mask, 0.0)
        main.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return float(main.detach()), grads

    fused = step(True)
    fused32 = step(False)  # the float32 fused path (CPUs without native bf16)
    with tk.eager():
        eager, reference = step(True), step(False)
    assert fused[1].shape == eager[1].shape == reference[1].shape == fused32[1].shape
    assert abs(fused32[0] - reference[0]) <= 1e-4 * reference[0]
    assert F.cosine_similarity(fused32[1], reference[1], dim=0).item() > 0.9999
    loss_error = {name: abs(run[0] - reference[0]) / reference[0] for name, run in [("fused", fused), ("eager", eager)]}
    assert loss_error["fused"] <= 2 * loss_error["eager"] + 2e-3, loss_error
    cos = {name: F.cosine_similarity(run[1], reference[1], dim=0).item() for name, run in [("fused", fused),
                                                                                          ("eager", eager)]}
    assert cos["fused"] >= cos["eager"] - 0.02 and cos["fused"] > 0.8, cos


def test_the_fused_path_runs_in_training_mode_only(hf_checkpoint, monkeypatch):
    directory, _ = hf_checkpoint("deepseek_v3")
    model = load_model(directory)
    calls = []
    for name in ("rms_norm", "swiglu_mlp", "routed_experts", "mla_attention"):
        original = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.autocast(**BF16):
        model.eval()(ids)
        assert calls == []
        model.train()(ids)
    assert {"rms_norm", "swiglu_mlp", "routed_experts", "mla_attention"} <= set(calls)


def test_grpo_log_probs_are_the_same_with_and_without_gradients(hf_checkpoint):
    """GRPO's old-policy and reference passes run without gradients; in training mode they take the fused path
    too, so pi_old / pi_theta is exactly 1 before any update (and matches the eager numbers to bf16)."""
    from nanoseek.train.grpo import sequence_logprobs

    directory, _ = hf_checkpoint("deepseek_v3")
    model = load_model(directory).train()
    g = torch.Generator().manual_seed(6)
    seqs = [torch.randint(2, model.config.vocab_size, (n,), generator=g).tolist() for n in (12, 20, 9)]
    starts, lengths = [5, 8, 4], [7, 12, 5]
    with torch.autocast(**BF16):
        with torch.no_grad():
            old, _, _ = sequence_logprobs(model, seqs, starts, lengths, 0.8, "cpu")
        new, entropy, mask = sequence_logprobs(model, seqs, starts, lengths, 0.8, "cpu")
        with tk.eager(), torch.no_grad():
            eager, _, _ = sequence_logprobs(model, seqs, starts, lengths, 0.8, "cpu")
    with tk.eager(), torch.no_grad():
        reference, reference_entropy, _ = sequence_logprobs(model, seqs, starts, lengths, 0.8, "cpu")  # float32
    assert new.requires_grad and not entropy.requires_grad
    assert torch.equal(old, new.detach())
    # As close to float32 as eager bf16 is (a whole random model: the float32 yardstick, as above).
    fused_error = (new.detach() - reference)[mask].abs().mean()
    eager_error = (eager - reference)[mask].abs().mean()
    assert fused_error <= 1.5 * eager_error + 1e-3, (fused_error, eager_error)
    assert (entropy - reference_entropy)[mask].abs().mean() <= 0.05 * reference_entropy[mask].abs().mean()
    (new * mask).sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.layers[0].self_attn.q_a_proj.weight.grad.abs().sum() > 0
