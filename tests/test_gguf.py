"""GGUF export: the file's own structure everywhere, and llama.cpp running it where llama-cpp-python is installed
(the `llama` extra, built from source): same token ids in, logits within tolerance at f32, greedy continuations
identical to nanoseek's engine, tokenization identical on a test corpus."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from nanoseek import LLM, SamplingParams
from nanoseek.errors import ConfigError
from nanoseek.interop.gguf_export import export_gguf, llama_cpp_pre_tokenizer
from nanoseek.interop.gguf_import import _Fields, tokenizer_from_gguf
from nanoseek.tokenizer import load_tokenizer
from tiny import CORPUS, build_tokenizer, save_hf_checkpoint

try:
    import llama_cpp
except ImportError:  # the opt-in `llama` extra
    llama_cpp = None
needs_llama_cpp = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python is not installed (the llama extra)")

from tiny import R1_FIXTURE  # noqa: E402
EXPORTED = ["deepseek_v3", "deepseek_v3_no_q_lora", "deepseek_v2", "qwen2", "llama"]


@pytest.fixture
def checkpoint(chat_checkpoint):
    """arch -> (directory, transformers model): conftest's tiny checkpoints with a real tokenizer."""
    return chat_checkpoint


def prompt_ids(n: int = 24, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


def test_the_file_holds_the_architecture_tensors_and_tokenizer(checkpoint, tmp_path):
    directory, _ = checkpoint("deepseek_v3")
    out = export_gguf(directory, tmp_path / "m.gguf", "f32")
    reader = gguf.GGUFReader(str(out))
    fields = {f.name: f for f in reader.fields.values()}
    arch = bytes(fields["general.architecture"].parts[-1]).decode()
    assert arch == "deepseek2"
    config = json.loads((directory / "config.json").read_text())
    value = lambda key: fields[key].parts[-1][0]  # noqa: E731
    assert value("deepseek2.expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID  # written, never assumed
    assert value("deepseek2.attention.head_count_kv") == 1
    assert value("deepseek2.expert_group_count") == config["n_group"]
    names = {t.name: t for t in reader.tensors}
    heads, nope, latent = config["num_attention_heads"], config["qk_nope_head_dim"], config["kv_lora_rank"]
    assert list(names["blk.0.attn_k_b.weight"].shape) == [nope, latent, heads]  # GGUF lists ne0 first
    assert list(names["blk.1.ffn_gate_exps.weight"].shape) == [config["hidden_size"], config["moe_intermediate_size"],
                                                              config["n_routed_experts"]]
    assert "blk.1.exp_probs_b.bias" in names and not any(n.startswith(f"blk.{config['num_hidden_layers']}.")
                                                         for n in names)
    assert bytes(fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"
    assert (tmp_path / "Modelfile").read_text().startswith("FROM ./m.gguf\nTEMPLATE")


def test_quantized_types_and_their_fallback(checkpoint, tmp_path):
    directory, _ = checkpoint("qwen2")
    for kind, qtype in [("q8_0", gguf.GGMLQuantizationType.Q8_0), ("q4_0", gguf.GGMLQuantizationType.Q4_0),
                        ("bf16", gguf.GGMLQuantizationType.BF16)]:
        reader = gguf.GGUFReader(str(export_gguf(directory, tmp_path / f"{kind}.gguf", kind)))
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert types["blk.0.ffn_up.weight"] == qtype and types["blk.0.attn_norm.weight"] == \
            gguf.GGMLQuantizationType.F32


def test_what_llama_cpp_would_run_differently_is_refused(tmp_path):
    directory = tmp_path / "v2g"
    save_hf_checkpoint("deepseek_v2_group_limited", directory, vocab_size=320)
    build_tokenizer(directory, vocab_size=300)
    with pytest.raises(ConfigError, match="group_limited_greedy.*route tokens differently"):
        export_gguf(directory, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.partial").exists()
    with pytest.raises(ConfigError, match="pre-tokenizer .*Whitespace.* no llama.cpp equivalent"):
        llama_cpp_pre_tokenizer({"model": {"type": "BPE"}, "pre_tokenizer": {"type": "Whitespace"}})


def llama(path, **kw):
    """llama.cpp over the file, with a float32 KV cache (llama.cpp's default f16 cache would cost ~1e-3)."""
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                           verbose=False, type_k=0, type_v=0, **kw)


def llama_logits(path, ids: list[int]) -> np.ndarray:
    llm = llama(path)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def llama_greedy(path, ids: list[int], n: int) -> list[int]:
    llm = llama(path)
    llm.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(token)
        llm.eval([token])
    return out


@needs_llama_cpp
@pytest.mark.parametrize("arch", EXPORTED)
def test_llama_cpp_runs_the_export_as_transformers_and_nanoseek_do(arch, checkpoint, tmp_path):
    directory, hf = checkpoint(arch)
    path = export_gguf(directory, tmp_path / f"{arch}.gguf", "f32")
    ids = prompt_ids()
    ours = llama_logits(path, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(ours - ref).max() < 1e-3 * max(1.0, np.abs(ref).max()), np.abs(ours - ref).max()
    engine = LLM(directory, dtype="float32", kv_cache_memory="16MiB")
    expected = engine.generate([ids], SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))[0]
    assert llama_greedy(path, ids, 64) == expected.outputs[0].token_ids


TEXTS = sorted(set(CORPUS)) + ["  two  spaces\n\n\tand tabs", "12345 + 678 = 7023", "<think>x</think> ok",
                               "<｜User｜>What is 2+2?<｜Assistant｜><think>\n4</think>4<｜end▁of▁sentence｜>",
                               "Don't stop; it's 3.14159 km/h — ünïcödé 数字 🙂\r\n"]


@needs_llama_cpp
def test_llama_cpp_tokenizes_text_as_nanoseek_does(checkpoint, tmp_path):
    directory, _ = checkpoint("qwen2")
    path = export_gguf(directory, tmp_path / "t.gguf", "f32")
    tok = load_tokenizer(directory)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, vocab_only=True, verbose=False)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text, add_special_tokens=False)


def test_the_r1_distill_tokenizer_is_read_from_its_gguf_with_its_special_tokens():
    """The published DeepSeek-R1-Distill-Qwen GGUF's metadata (shared/fixtures): control and user-defined tokens
    stay single tokens (transformers' own GGUF conversion splits <｜User｜> into five), ids are the file's."""
    reader = gguf.GGUFReader(str(R1_FIXTURE))
    backend, config = tokenizer_from_gguf(_Fields(reader))
    assert (config["bos_token"], config["eos_token"]) == ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>")
    assert backend.token_to_id(config["bos_token"]) == 151646 and backend.token_to_id("<｜User｜>") is not None
    ids = backend.encode("<｜User｜>Hello world<think>", add_special_tokens=False).ids
    assert ids == [backend.token_to_id("<｜User｜>"), 9707, 1879, backend.token_to_id("<think>")]
    assert backend.encode("hi").ids[0] == 151646  # add_bos_token is true in this file
    assert len(config["chat_template"]) == 2081
    # ... and exports back under the llama.cpp pre-tokenizer with the same splitting rule.
    assert llama_cpp_pre_tokenizer(json.loads(backend.to_str())) == "qwen2"


@needs_llama_cpp
def test_llama_cpp_and_nanoseek_tokenize_the_real_r1_distill_vocabulary_alike():
    backend, _ = tokenizer_from_gguf(_Fields(gguf.GGUFReader(str(R1_FIXTURE))))
    llm = llama_cpp.Llama(model_path=str(R1_FIXTURE), vocab_only=True, verbose=False)
    for text in TEXTS + ["def f(x):\n    return x ** 2  # 1234567", "naïve café ÆØÅ ß 한국어 ひらがな"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            backend.encode(text, add_special_tokens=False).ids, text


@needs_llama_cpp
@pytest.mark.parametrize("kind", ["bf16", "q8_0", "q4_0"])
def test_quantized_exports_run_in_llama_cpp(kind, checkpoint, tmp_path):
    """Lower precisions run; how closely they follow the float model is reported by bench/local.py."""
    directory, hf = checkpoint("deepseek_v3")
    path = export_gguf(directory, tmp_path / f"{kind}.gguf", kind)
    logits = llama_logits(path, prompt_ids())
    assert np.isfinite(logits).all() and logits.shape == (24, 320)


def test_export_needs_a_tokenizer_and_a_known_architecture(tmp_path):
    directory = tmp_path / "bare"
    save_hf_checkpoint("qwen2", directory)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        export_gguf(directory, tmp_path / "x.gguf")
    with pytest.raises(ConfigError, match="--type 'q3'"):
        export_gguf(directory, tmp_path / "x.gguf", "q3")


def test_a_nanoseek_quantized_checkpoint_is_refused_with_the_way_to_a_quantized_gguf(checkpoint, tmp_path):
    from nanoseek.interop.quantize import quantize_checkpoint

    directory, _ = checkpoint("qwen2")
    quantize_checkpoint(directory, tmp_path / "int8", "int8")
    with pytest.raises(ConfigError, match="nanoseek-quantized weights.*float checkpoint.*q8_0 or q4_0"):
        export_gguf(tmp_path / "int8", tmp_path / "x.gguf", "q8_0")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("arch", EXPORTED)
def test_nanoseek_reads_a_gguf_file_back_exactly(arch, checkpoint, tmp_path, monkeypatch):
    """GGUF -> nanoseek: an f32 export loads to the very same weights, routing and rope as its source checkpoint,
    and the engine runs the file (its tokenizer included) with the same greedy output."""
    from nanoseek import load_model

    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    directory, _ = checkpoint(arch)
    path = export_gguf(directory, tmp_path / f"{arch}.gguf", "f32")
    source, read = load_model(directory), load_model(path)
    theirs = dict(read.named_parameters())
    for name, p in source.named_parameters():
        assert torch.equal(p, theirs[name]), name
    ids = prompt_ids()
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    want = LLM(directory, dtype="float32", kv_cache_memory="16MiB").generate([ids], params)[0].outputs[0]
    llm = LLM(str(path), dtype="float32", kv_cache_memory="16MiB")
    assert llm.generate([ids], params)[0].outputs[0].token_ids == want.token_ids
    text = "What is 12 + 30? <think>"
    assert llm.engine.tokenizer.encode(text) == load_tokenizer(directory).encode(text)


def test_a_quantized_gguf_loads_dequantized(checkpoint, tmp_path, monkeypatch):
    from nanoseek import load_model

    monkeypatch.setenv("NANOSEEK_CACHE", str(tmp_path / "cache"))
    directory, _ = checkpoint("deepseek_v3")
    source = dict(load_model(directory).named_parameters())
    for kind, tolerance in [("q8_0", 0.01), ("q4_0", 0.15)]:
        read = dict(load_model(export_gguf(directory, tmp_path / f"{kind}.gguf", kind)).named_parameters())
        w = "model.layers.1.mlp.experts.gate_up_proj" if "model.layers.1.mlp.experts.gate_up_proj" in read else \
            next(n for n in read if "experts" in n)
        relative = (read[w] - source[w]).norm() / source[w].norm()
        assert 0 < relative < tolerance, (kind, relative)


def test_the_export_command(checkpoint, tmp_path, capsys):
    from nanoseek.cli import main

    directory, _ = checkpoint("qwen2")
    assert main(["export", "gguf", str(directory), str(tmp_path / "out" / "m.gguf"), "--type", "q8_0"]) == 0
    assert "m.gguf" in capsys.readouterr().out and (tmp_path / "out" / "Modelfile").exists()
    bare = tmp_path / "bare"
    save_hf_checkpoint("qwen2", bare)
    capsys.readouterr()
    assert main(["export", "gguf", str(bare), str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no tokenizer.json" in err
