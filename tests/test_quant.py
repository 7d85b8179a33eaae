"""Weight-only quantization (model/quant.py): the integers, the decode kernels that stream them (run natively and
under the AVX2 ceiling by scripts/test.sh), the engine and the checkpoints `nanoseek quantize` writes."""

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nanoseek import LLM, SamplingParams
from nanoseek.checkpoint import load_model, save_model
from nanoseek.errors import ConfigError
from nanoseek.interop.quantize import quantize_checkpoint
from nanoseek.model import ops, quant
from nanoseek.model.kernels import decode

import procs
from test_cpu_kernels import needs_kernels  # the one rule for where the decode kernels exist

CLI = [sys.executable, "-m", "nanoseek.cli"]
SCHEMES = [(8, None), (4, 32), (4, 128)]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 9, 13, 2, 7], [40, 41, 42], [3, 1, 4, 1, 5, 9, 2, 6]]


@pytest.mark.parametrize("bits,group", SCHEMES)
def test_quantize_rounds_to_the_nearest_level_of_its_group(bits, group):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    w[3] = 0  # an all-zero row must not divide by zero
    qw = quant.quantize(w, bits, group or 256)
    low, high = (-127, 127) if bits == 8 else (-8, 7)
    assert qw.q.dtype == torch.int8 and low <= qw.q.min() and qw.q.max() <= high
    assert qw.scales.shape == (48, 256 // (group or 256))
    err = (qw.dequantize() - w).unflatten(-1, (qw.scales.shape[-1], -1))
    step = qw.scales.abs().unsqueeze(-1)
    within_half = err.abs() <= step / 2 + 1e-6  # round to nearest: half a step
    if bits == 8:
        assert within_half.all()
    else:  # q4_0's scale maps the largest magnitude to -8: a value near its opposite clamps to +7, one step off
        assert (err.abs() <= step + 1e-6).all() and within_half.float().mean() > 0.99
    assert torch.equal(qw.dequantize()[3], torch.zeros(256))
    stored = qw.stored()
    assert stored.shape[-1] == 256 * bits // 8
    assert torch.equal(quant.QuantizedWeight.from_stored(stored, qw.scales, bits).q, qw.q)


def test_scheme_names_and_bad_ones():
    assert quant.scheme("int8") == quant.Scheme(8, None)
    assert quant.scheme("int4") == quant.Scheme(4, 32) and quant.scheme("INT4-G128") == quant.Scheme(4, 128)
    assert quant.scheme(None) is None and quant.scheme("none") is None
    with pytest.raises(ConfigError, match="unknown quantization 'int3'.*int8"):
        quant.scheme("int3")
    assert quant.Scheme(4, 128).group_for(96) == 32 and quant.Scheme(4, 32).group_for(48) is None
    assert quant.Scheme(8, None).group_for(48) == 48


def int4_reference(x: torch.Tensor, qw: quant.QuantizedWeight) -> torch.Tensor:
    """The int4 kernel's arithmetic in PyTorch: each row's group of inputs quantized to int8 (scale max |x| / 127,
    round half to even), integer dot products with the weight's integers, both scales applied per group."""
    T, K = x.shape
    G = qw.scales.shape[-1]
    xg = x.float().view(T, G, K // G)
    amax = xg.abs().amax(-1, keepdim=True)
    # An IEEE division, as the kernel's (PyTorch computes scalar / tensor through a reciprocal, 1 ulp off).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    xq = (xg * inv).round()
    dots = torch.einsum("tgk,ngk->tng", xq.double(), qw.q.view(-1, G, K // G).double())
    return (dots * (amax / 127.0).double().view(T, 1, G) * qw.scales.double()[None]).sum(-1).float()


def int8_reference(x: torch.Tensor, qw: quant.QuantizedWeight, chunk: int = 256) -> torch.Tensor:
    """The int8 kernel's arithmetic in PyTorch: each row quantized to int16 in chunks of up to `chunk` inputs
    inside each weight group (scale max |x| / 32767, round half to even), integer products with the weight's
    integers, the chunk's and the group's scales applied."""
    T, K = x.shape
    G = qw.scales.shape[-1]
    group = K // G
    out = torch.zeros(T, qw.q.shape[0], dtype=torch.float64)
    for g in range(G):
        for k0 in range(g * group, (g + 1) * group, chunk):
            k1 = min(k0 + chunk, (g + 1) * group)
            xs = x[:, k0:k1].float()
            amax = xs.abs().amax(-1, keepdim=True)
            inv = torch.where(amax > 0, torch.full_like(amax, 32767.0) / amax, torch.zeros_like(amax))
            dots = (xs * inv).round().double() @ qw.q[:, k0:k1].double().T
            out += dots * (amax / 32767.0).double() * qw.scales[:, g].double()[None]
    return out.float()


@needs_kernels
@pytest.mark.parametrize("bits,group", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_its_reference_product(bits, group, dtype):
    """int8: integer products with activations quantized to int16 per chunk, within ~1e-4 of the dequantized
    product; int4: integer products with activations quantized to int8 per group (llama.cpp's q4_0 arithmetic),
    within ~1% of it."""
    torch.manual_seed(1)
    E, N, K = 3, 48, 640  # per channel: chunks of 256, 256 and 128 inputs
    qw = quant.quantize(torch.randn(E, N, K), bits, group or K)
    pack = decode.quant_pack(qw.q, qw.scales, bits)
    w = qw.dequantize()
    for rows in (1, 2, 5, 9, 40):  # every register-block size and its tails
        x = torch.randn(rows, K).to(dtype)
        offsets = torch.tensor([0, rows // 3, rows // 3, rows])  # an expert without rows
        y = decode.grouped_linear(x, pack, offsets, N)
        spans = [(offsets[e], offsets[e + 1]) for e in range(E)]
        dequantized = torch.cat([x[a:b].float() @ w[e].T for e, (a, b) in enumerate(spans)])
        reference = int8_reference if bits == 8 else int4_reference
        ref = torch.cat([reference(x[a:b], quant.QuantizedWeight(qw.q[e], qw.scales[e], bits))
                         for e, (a, b) in enumerate(spans)])
        assert (ref - dequantized).abs().max() < (1e-4 if bits == 8 else 0.02) * dequantized.abs().max()
        tol = 2e-5 if dtype == torch.float32 else 1e-2
        assert y.dtype == dtype and torch.allclose(y.float(), ref, rtol=tol, atol=tol * ref.abs().max())


@needs_kernels
@pytest.mark.parametrize("bits,group", SCHEMES)
def test_quantized_experts_layer_equals_eager(bits, group):
    torch.manual_seed(2)
    E, H, I, N, k = 8, 64, 32, 6, 2
    gate_up, down = torch.randn(E, 2 * I, H) * 0.1, torch.randn(E, H, I) * 0.1
    chosen = quant.Scheme(bits, group)  # int4-g128 falls back to groups of 32 on these widths
    q_gu, q_dn = quant.quantize(gate_up, bits, chosen.group_for(H)), quant.quantize(down, bits, chosen.group_for(I))
    x = torch.randn(N, H)
    weights, indices = torch.rand(N, k), torch.randint(0, E, (N, k))
    plan = ops.inference_plan(torch.device("cpu"), torch.float32, chosen)
    derived = ops.pack_experts(q_gu.dequantize(), q_dn.dequantize(), plan, (q_gu, q_dn))
    assert isinstance(derived.small[0], decode.QuantPack)
    fused = ops.routed_experts(x, weights, indices, q_gu.dequantize(), q_dn.dequantize(), F.silu, derived=derived)
    eager = ops.routed_experts(x, weights, indices, q_gu.dequantize(), q_dn.dequantize(), F.silu)
    if bits == 8:
        assert torch.allclose(fused, eager, rtol=1e-4, atol=1e-5)
    else:  # int4 quantizes the activations too: within ~1% of the dequantized layer
        assert (fused - eager).norm() < 0.03 * eager.norm()


@pytest.mark.parametrize("arch", ["deepseek_v3", "deepseek_v2", "qwen2"])
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_engine_kernels_compute_the_same_quantized_model_as_eager(hf_checkpoint, arch, scheme):
    """int8: the decode kernel (integers) and the eager path (dequantized weights) are one model, same greedy
    tokens. int4 decodes with quantized activations (as llama.cpp's q4_0): the same model within rounding, so
    the two agree on most tokens of these near-tied random models. Quantization changes the model."""
    directory, _ = hf_checkpoint(arch)
    packed = LLM(directory, dtype="float32", quantization=scheme)
    eager = LLM(directory, dtype="float32", quantization=scheme, pack_weights=False)
    out = [o.outputs[0].token_ids for o in packed.generate(PROMPTS, GREEDY)]
    reference = [o.outputs[0].token_ids for o in eager.generate(PROMPTS, GREEDY)]
    model = packed.engine.model
    if scheme == "int8" or decode.decode_kernels() is None:
        assert out == reference
    else:  # teacher-forced: the eager model's argmax after each prefix of the kernel's continuation
        agree = total = 0
        for prompt, tokens in zip(PROMPTS, out):
            with torch.no_grad():
                logits = eager.engine.model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1: -1]
            agree += (logits.argmax(-1) == torch.tensor(tokens)).sum().item()
            total += len(tokens)
        assert agree >= 0.85 * total, (agree, total)
    summary = quant.quantization_summary(model)
    assert summary["quantized_params"] > 0.9 * (summary["quantized_params"] + summary["float_params"])
    if decode.decode_kernels() is not None:
        kinds = {type(m.derived.small) for m in model.modules() if isinstance(getattr(m, "derived", None), ops.LinearPack)}
        assert decode.QuantPack in kinds
    ids = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        float_logits = load_model(directory).eval()(ids)
        assert not torch.allclose(model(ids), float_logits, atol=1e-6)
        relative = ((model(ids) - float_logits).norm() / float_logits.norm()).item()
        # Random Gaussian weights: int8's step is ~1% of a row's range (logits ~3-5% off), int4's 16x coarser.
        assert relative < (1.0 if scheme == "int4" else 0.1), relative


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_checkpoint_loads_back_without_requantizing(hf_checkpoint, tmp_path, monkeypatch, scheme):
    directory, _ = hf_checkpoint("deepseek_v3")
    summary = quantize_checkpoint(directory, tmp_path / "q", scheme)
    assert summary["quantized_checkpoint_bytes"] < summary["source_bytes"] / (2.5 if scheme == "int8" else 3.5)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "nanoseek"
    expected = [o.outputs[0].token_ids for o in LLM(directory, dtype="float32", quantization=scheme).generate(PROMPTS, GREEDY)]

    def refuse(*args, **kwargs):
        raise AssertionError("a quantized checkpoint must load without quantizing again")

    monkeypatch.setattr(quant, "quantize", refuse)
    llm = LLM(tmp_path / "q", dtype="float32")
    assert llm.engine.quantization == quant.scheme(scheme)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)] == expected
    with pytest.raises(ConfigError, match="already quantized"):
        LLM(tmp_path / "q", quantization="int4" if scheme == "int8" else "int8")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize_checkpoint(tmp_path / "q", tmp_path / "qq", scheme)


def test_quantize_never_writes_over_its_source_or_an_existing_directory(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("qwen2")
    before = {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}
    for dst in (directory, Path(directory).parent):  # the source itself, or a folder that holds it
        with pytest.raises(ConfigError, match="would write over its source"):
            quantize_checkpoint(directory, dst, "int8")
    assert {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()} == before
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("someone's")
    with pytest.raises(ConfigError, match="already exists.*--overwrite"):
        quantize_checkpoint(directory, taken, "int8")
    assert (taken / "notes.txt").exists()
    quantize_checkpoint(directory, taken, "int8", overwrite=True)
    assert json.loads((taken / "config.json").read_text())["quantization_config"]["quant_method"] == "nanoseek"
    (tmp_path / "empty").mkdir()
    quantize_checkpoint(directory, tmp_path / "empty", "int8")  # an empty directory is a new one


def test_weights_changed_after_quantization_are_saved_and_served_as_float(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("qwen2")
    model = quant.quantize_model(load_model(directory), "int8")
    model.config.extra["quantization_config"] = model.quantization.config()
    trained = model.model.layers[0].mlp.down_proj
    assert quant.quantized_of(trained) is not None
    with torch.no_grad():
        trained.weight.add_(0.01)  # a training step
    assert quant.quantized_of(trained) is None
    save_model(model, tmp_path / "m")
    back = load_model(tmp_path / "m")
    assert torch.equal(back.model.layers[0].mlp.down_proj.weight, trained.weight)
    assert quant.quantized_of(back.model.layers[0].mlp.down_proj) is None
    assert quant.quantized_of(back.model.layers[0].mlp.up_proj) is not None


def test_update_weights_quantizes_the_new_weights(hf_checkpoint):
    directory, _ = hf_checkpoint("deepseek_v3")
    llm = LLM(directory, dtype="float32", quantization="int8")
    before = llm.generate(PROMPTS, GREEDY)
    source = load_model(directory)
    with torch.no_grad():
        source.lm_head.weight.mul_(-1)  # new weights: the engine must serve their quantization
    llm.engine.update_weights(source.state_dict())
    head = llm.engine.model.lm_head
    assert torch.equal(quant.quantized_of(head).q, quant.quantize(source.lm_head.weight, 8, head.in_features).q)
    assert llm.generate(PROMPTS, GREEDY)[0].outputs[0].token_ids != before[0].outputs[0].token_ids


def test_cli_quantize_then_generate(chat_checkpoint, tmp_path):
    directory, _ = chat_checkpoint("deepseek_v3")
    r = procs.run(CLI + ["quantize", str(directory), str(tmp_path / "q8"), "--scheme", "int8"],
                  capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-800:]
    assert json.loads(r.stdout.splitlines()[-1])["scheme"] == "int8"
    args = ["generate", "--prompt", "The quick brown", "--max-tokens", "6", "--temperature", "0", "--json"]
    from_file = procs.run(CLI + args + ["--model", str(tmp_path / "q8")], capture_output=True, text=True)
    at_load = procs.run(CLI + args + ["--model", str(directory), "--quantization", "int8"], capture_output=True,
                        text=True)
    assert from_file.returncode == 0 and at_load.returncode == 0, from_file.stderr[-800:] + at_load.stderr[-800:]
    assert json.loads(from_file.stdout)["token_ids"] == json.loads(at_load.stdout)["token_ids"]
    r = procs.run(CLI + args + ["--model", str(directory), "--quantization", "int3"], capture_output=True, text=True)
    assert r.returncode == 2 and "int3" in r.stderr and "Traceback" not in r.stderr
