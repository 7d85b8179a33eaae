"""Checkpoint interop: round trips through transformers, sharding, FP8, strict errors, memory."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek
from nanoseek.checkpoint import fp8_block_quantize
from nanoseek.errors import CheckpointError, ConfigError
import procs
from tiny import build_hf_model


def _ids(vocab, seed=3):
    return torch.randint(2, vocab, (2, 15), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_round_trip_through_transformers(arch, hf_checkpoint, tmp_path):
    import transformers

    directory, reference = hf_checkpoint(arch)
    model = nanoseek.load_model(directory)
    out = nanoseek.save_model(model, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = _ids(model.config.vocab_size)
    assert (reloaded(ids).logits - reference(ids).logits).abs().max().item() < 1e-6
    assert (nanoseek.load_model(out)(ids) - model(ids)).abs().max().item() == 0.0
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == model.config.eos_token_id


@torch.no_grad()
def test_sharded_save_and_load(hf_checkpoint, tmp_path):
    import transformers

    directory, reference = hf_checkpoint("deepseek_v3")
    model = nanoseek.load_model(directory)
    out = nanoseek.save_model(model, tmp_path / "sharded", max_shard_size=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    ids = _ids(model.config.vocab_size)
    assert (nanoseek.load_model(out)(ids) - model(ids)).abs().max().item() == 0.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (hf(ids).logits - reference(ids).logits).abs().max().item() < 1e-6


def test_save_replaces_an_existing_directory_atomically(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama")
    model = nanoseek.load_model(directory)
    target = tmp_path / "ckpt"
    nanoseek.save_model(model, target)
    (target / "stale.txt").write_text("from an older save")
    nanoseek.save_model(model, target)
    assert not (target / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers


def test_tokenizer_files_are_copied_on_save(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("qwen2")
    src = tmp_path / "src"
    src.mkdir()
    for f in directory.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    out = nanoseek.save_model(nanoseek.load_model(src), tmp_path / "out")
    assert (out / "tokenizer_config.json").read_text() == '{"bos_token": "<s>"}'
    assert (out / "chat_template.jinja").exists()


def _block_dequantize_reference(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Independent of nanoseek's vectorised code: block by block."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            rows, cols = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            out[rows, cols] = q[rows, cols].float() * scale[bi, bj]
    return out


@torch.no_grad()
def test_fp8_block_checkpoint_dequantizes_on_load(tmp_path):
    # hidden 160 and intermediate 200: two 128-blocks per side with partial edge blocks.
    hf = build_hf_model("deepseek_v3", hidden_size=160, intermediate_size=200, moe_intermediate_size=136)
    hf.save_pretrained(tmp_path / "bf")
    state = load_file(tmp_path / "bf" / "model.safetensors")
    fp8, reference = {}, {}
    quantized = 0
    for key, t in state.items():
        keep = (t.dim() != 2 or "embed_tokens" in key or "lm_head" in key or key.endswith("mlp.gate.weight"))
        if keep:
            fp8[key] = reference[key] = t
            continue
        q, scale = fp8_block_quantize(t)
        assert scale.shape == (math.ceil(t.shape[0] / 128), math.ceil(t.shape[1] / 128))
        fp8[key], fp8[key + "_scale_inv"] = q, scale
        reference[key] = _block_dequantize_reference(q, scale)
        quantized += 1
    assert quantized > 10
    for name, tensors in (("fp8", fp8), ("ref", reference)):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        config = json.loads((tmp_path / "bf" / "config.json").read_text())
        if name == "fp8":
            config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
                                             "activation_scheme": "dynamic"}
        (d / "config.json").write_text(json.dumps(config))
    m_fp8, m_ref = nanoseek.load_model(tmp_path / "fp8"), nanoseek.load_model(tmp_path / "ref")
    w = m_fp8.model.layers[0].mlp.down_proj.weight
    assert w.shape == (160, 200) and w.dtype == torch.float32
    for (n1, p1), (n2, p2) in zip(m_fp8.state_dict().items(), m_ref.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    ids = _ids(m_ref.config.vocab_size)
    assert torch.equal(m_fp8(ids), m_ref(ids))
    assert "quantization_config" not in m_fp8.config.to_hf_dict()
    # e4m3 keeps 3 mantissa bits: each dequantized weight is within ~6% of the original.
    original = state["model.layers.0.mlp.down_proj.weight"]
    rel = ((w - original).abs() / original.abs().clamp(min=1e-3)).median().item()
    assert 0 < rel < 0.07


# ------------------------------------------------------------------ errors
def _copy(directory: Path, target: Path) -> Path:
    target.mkdir()
    for f in directory.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    return target


def _edit_weights(directory: Path, edit) -> None:
    file = directory / "model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, str(file), metadata={"format": "pt"})


def test_missing_unexpected_and_misshaped_tensors_are_listed_in_one_error(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("deepseek_v3")
    bad = _copy(directory, tmp_path / "bad")

    def edit(state):
        del state["model.layers.0.self_attn.o_proj.weight"]
        del state["model.layers.1.mlp.experts.3.up_proj.weight"]
        state["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2, 2)
        state["model.norm.weight"] = torch.zeros(7)

    _edit_weights(bad, edit)
    with pytest.raises(CheckpointError) as e:
        nanoseek.load_model(bad)
    msg = str(e.value)
    assert "model.layers.0.self_attn.o_proj.weight" in msg
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in msg
    assert "surprise" in msg and "model.norm.weight" in msg and "[7]" in msg
    assert "\n" not in msg


def test_pickle_checkpoints_are_refused_with_a_conversion_hint(tmp_path, hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((directory / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"not loaded, never unpickled")
    with pytest.raises(CheckpointError, match="pickle.*convert"):
        nanoseek.load_model(d)


def test_truncated_safetensors_gives_a_clear_error(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama")
    bad = _copy(directory, tmp_path / "trunc")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        nanoseek.load_model(bad)


def test_corrupt_header_gives_a_clear_error(hf_checkpoint, tmp_path):
    directory, _ = hf_checkpoint("llama")
    bad = _copy(directory, tmp_path / "corrupt")
    (bad / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        nanoseek.load_model(bad)


def test_unsupported_model_type_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'"):
        nanoseek.load_model(tmp_path)


def test_cli_reports_bad_checkpoint_as_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = procs.run([sys.executable, "-m", "nanoseek.cli", "inspect", str(tmp_path)], capture_output=True,
                       text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "unsupported model_type" in r.stderr and "Traceback" not in r.stderr


_MEMORY_PROBE = r"""
import resource, sys, torch
import nanoseek
def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = rss_mib()
model = nanoseek.load_model(sys.argv[1], dtype=torch.bfloat16)
size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(base, rss_mib(), size)
"""


def test_loading_streams_so_peak_memory_stays_near_model_size(tmp_path):
    """A ~190 MiB bf16 checkpoint: peak RSS growth while loading stays under 1.3x the model's bytes."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                      num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    hf = hf.to_empty(device="cpu")
    for p in hf.parameters():
        p.data.normal_(0, 0.02)
    hf.save_pretrained(tmp_path / "big", max_shard_size="80MB")
    del hf
    r = procs.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path / "big")], capture_output=True, text=True,
                       check=True)
    base, peak, size = map(float, r.stdout.split())
    assert size > 150
    assert peak - base < 1.3 * size, f"peak grew {peak - base:.0f} MiB for a {size:.0f} MiB model"
