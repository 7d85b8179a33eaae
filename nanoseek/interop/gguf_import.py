"""Reading GGUF files (llama.cpp's and Ollama's downloads, or `nanoseek export gguf`'s) into nanoseek: the inverse
of gguf_export.py, written as a Hugging Face-format checkpoint directory that every nanoseek loader reads.

`load_model("x.gguf")`, `LLM("x.gguf")` and every CLI command that takes a model convert a GGUF file once into a
cache directory (`$NANOSEEK_CACHE`, default ~/.cache/nanoseek, keyed by the file's path, size and mtime) and load
that. Architectures: qwen2, llama, deepseek2 (as DeepSeek-V3 when its gating is sigmoid, else V2); tensors in
f32, f16, bf16, q8_0 or q4_0 (dequantized on the way in). The tokenizer is rebuilt from the file's own metadata:
tokens, merges, token types (3 = control -> special tokens, 4 = user-defined -> added tokens, which transformers'
own GGUF conversion loses), the pre-tokenizer llama.cpp names, BOS/EOS/pad and the chat template.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .gguf_export import QWEN2_PATTERN, llama3_rope_factors

PRE_TOKENIZERS = ("gpt-2", "smollm", "qwen2", "deepseek-r1-qwen")


def is_gguf(path: str | Path) -> bool:
    return str(path).endswith(".gguf") and Path(path).is_file()


class _Fields:
    """A GGUF file's key/value metadata as plain Python values."""

    def __init__(self, reader):
        from gguf import GGUFValueType

        self.values = {}
        for field in reader.fields.values():
            if not field.types:
                continue
            kind = field.types[0]
            if kind == GGUFValueType.ARRAY:
                sub = field.types[-1]
                items = [field.parts[i] for i in field.data]
                self.values[field.name] = [bytes(x).decode("utf-8", "replace") if sub == GGUFValueType.STRING
                                           else x[0].item() for x in items]
            elif kind == GGUFValueType.STRING:
                self.values[field.name] = bytes(field.parts[-1]).decode("utf-8", "replace")
            else:
                self.values[field.name] = field.parts[-1][0].item()

    def get(self, key, default=None):
        return self.values.get(key, default)

    def need(self, key):
        if key not in self.values:
            raise ConfigError(f"the GGUF file has no {key}: not a complete model file")
        return self.values[key]


def tokenizer_from_gguf(fields: _Fields):
    """(tokenizers.Tokenizer, tokenizer_config dict) rebuilt from the file's metadata."""
    from gguf import TokenType
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    if fields.get("tokenizer.ggml.model") != "gpt2":
        raise ConfigError(f"tokenizer model {fields.get('tokenizer.ggml.model')!r} is not read yet: nanoseek reads "
                          "GPT-2-style byte-level BPE (gpt2) tokenizers from GGUF")
    pre = fields.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ConfigError(f"pre-tokenizer {pre!r} is not read yet (known: {', '.join(PRE_TOKENIZERS)}): nanoseek "
                          "would split text differently from llama.cpp")
    tokens = fields.need("tokenizer.ggml.tokens")
    types = fields.get("tokenizer.ggml.token_type") or [TokenType.NORMAL] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt-2", "smollm"))
    if pre == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "gpt-2":
        backend.pre_tokenizer = byte_level
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False), byte_level])
    backend.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=types[i] == TokenType.CONTROL, normalized=False)
             for i, t in enumerate(tokens) if types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    backend.add_tokens(added)

    def token(key):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    config = {"bos_token": token("bos"), "eos_token": token("eos"), "pad_token": token("padding"),
              "add_bos_token": bool(fields.get("tokenizer.ggml.add_bos_token", False)),
              "chat_template": fields.get("tokenizer.chat_template")}
    if config["add_bos_token"] and config["bos_token"]:
        bos = config["bos_token"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))])
    return backend, config


def _config(fields: _Fields, arch: str, names: set[str]) -> dict:
    p = lambda key, default=None: fields.get(f"{arch}.{key}", default)  # noqa: E731
    vocab = p("vocab_size") or len(fields.need("tokenizer.ggml.tokens"))
    config = {"vocab_size": vocab, "hidden_size": fields.need(f"{arch}.embedding_length"),
              "intermediate_size": fields.need(f"{arch}.feed_forward_length"),
              "num_hidden_layers": fields.need(f"{arch}.block_count"),
              "num_attention_heads": fields.need(f"{arch}.attention.head_count"),
              "max_position_embeddings": p("context_length", 4096),
              "rms_norm_eps": p("attention.layer_norm_rms_epsilon", 1e-6),
              "tie_word_embeddings": "output.weight" not in names,
              "bos_token_id": fields.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": fields.get("tokenizer.ggml.eos_token_id")}
    rope = {"rope_type": "default", "rope_theta": p("rope.freq_base", 10000.0)}
    if p("rope.scaling.type") == "yarn":
        rope.update(rope_type="yarn", factor=p("rope.scaling.factor"),
                    original_max_position_embeddings=p("rope.scaling.original_context_length"))
        for key in ("beta_fast", "beta_slow"):
            if p(f"rope.scaling.yarn_{key}") is not None:
                rope[key] = p(f"rope.scaling.yarn_{key}")
    elif p("rope.scaling.type") == "linear":
        rope.update(rope_type="linear", factor=p("rope.scaling.factor"))
    if arch == "deepseek2":
        config.update(_deepseek_config(fields, names))
        if rope["rope_type"] == "yarn" and p("rope.scaling.yarn_log_multiplier") is not None:
            mscale = p("rope.scaling.yarn_log_multiplier") / 0.1  # the exporter's (llama.cpp's) convention
            rope.update(mscale=mscale, mscale_all_dim=mscale)
    else:
        config.update(model_type=arch, num_key_value_heads=p("attention.head_count_kv", config["num_attention_heads"]))
    config["rope_parameters"] = rope
    return config


def _deepseek_config(fields: _Fields, names: set[str]) -> dict:
    from gguf import ExpertGatingFuncType

    p = lambda key, default=None: fields.get(f"deepseek2.{key}", default)  # noqa: E731
    sigmoid = p("expert_gating_func") == ExpertGatingFuncType.SIGMOID
    rope_dim = fields.need("deepseek2.rope.dimension_count")
    groups = p("expert_group_count", 1)
    if groups > 1 and not sigmoid:
        raise ConfigError("a softmax-gated deepseek2 file with expert groups: llama.cpp ranks the groups by V3's rule, "
                          "which nanoseek runs only with V3's sigmoid gating; not read")
    return {"model_type": "deepseek_v3" if sigmoid else "deepseek_v2",
            "num_key_value_heads": fields.need("deepseek2.attention.head_count"),
            "q_lora_rank": p("attention.q_lora_rank") or None, "kv_lora_rank": fields.need("deepseek2.attention.kv_lora_rank"),
            "qk_rope_head_dim": rope_dim, "qk_nope_head_dim": fields.need("deepseek2.attention.key_length_mla") - rope_dim,
            "v_head_dim": fields.need("deepseek2.attention.value_length_mla"),
            "moe_intermediate_size": fields.need("deepseek2.expert_feed_forward_length"),
            "n_routed_experts": fields.need("deepseek2.expert_count"),
            "num_experts_per_tok": fields.need("deepseek2.expert_used_count"),
            "n_shared_experts": p("expert_shared_count", 0) or None,
            "routed_scaling_factor": p("expert_weights_scale", 1.0), "norm_topk_prob": bool(p("expert_weights_norm", 0)),
            "first_k_dense_replace": p("leading_dense_block_count", 0), "n_group": groups,
            "topk_group": p("expert_group_used_count", 1),
            "topk_method": "noaux_tc" if sigmoid else "greedy", "scoring_func": "sigmoid" if sigmoid else "softmax",
            "num_nextn_predict_layers": 0, "rope_interleave": True}


def _tensor(t) -> torch.Tensor:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    data = t.data
    if t.tensor_type not in (Q.F32, Q.F16):
        if t.tensor_type not in (Q.BF16, Q.Q8_0, Q.Q4_0):
            raise ConfigError(f"tensor {t.name} is {t.tensor_type.name}: nanoseek reads f32, f16, bf16, q8_0 and "
                              "q4_0 GGUF tensors")
        data = quants.dequantize(data, t.tensor_type)
    shape = [int(n) for n in reversed(t.shape)]
    return torch.from_numpy(np.array(data, dtype=np.float32)).reshape(shape)  # a copy: the reader maps the file


def _hf_tensors(config: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GGUF tensors back to Hugging Face names and layouts."""
    import gguf
    from gguf import MODEL_TENSOR, TENSOR_NAMES

    from .gguf_export import _layer_names

    mt, heads = config["model_type"], config["num_attention_heads"]
    out = {"model.embed_tokens.weight": tensors["token_embd.weight"], "model.norm.weight": tensors["output_norm.weight"]}
    if "output.weight" in tensors:
        out["lm_head.weight"] = tensors["output.weight"]
    per_layer = _layer_names(gguf)
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for hf, kind in per_layer.items():
            name = TENSOR_NAMES[kind].format(bid=i) + (".bias" if hf.endswith("bias") else ".weight")
            if name in tensors:
                w = tensors[name]
                if mt == "llama" and hf == "self_attn.q_proj.weight":
                    w = _unpermute_rotary(w, heads)
                elif mt == "llama" and hf == "self_attn.k_proj.weight":
                    w = _unpermute_rotary(w, config["num_key_value_heads"])
                out[prefix + hf] = w
        k_b = tensors.get(TENSOR_NAMES[MODEL_TENSOR.ATTN_K_B].format(bid=i) + ".weight")
        if k_b is not None:  # [H, latent, nope] and [H, v, latent] -> kv_b_proj [H * (nope + v), latent]
            v_b = tensors[TENSOR_NAMES[MODEL_TENSOR.ATTN_V_B].format(bid=i) + ".weight"]
            kv_b = torch.cat((k_b.transpose(1, 2), v_b), dim=1)
            out[prefix + "self_attn.kv_b_proj.weight"] = kv_b.reshape(-1, kv_b.shape[-1]).contiguous()
        for proj, kind in (("gate", MODEL_TENSOR.FFN_GATE_EXP), ("up", MODEL_TENSOR.FFN_UP_EXP),
                           ("down", MODEL_TENSOR.FFN_DOWN_EXP)):
            stacked = tensors.get(TENSOR_NAMES[kind].format(bid=i) + ".weight")
            for e in range(0 if stacked is None else stacked.shape[0]):
                out[f"{prefix}mlp.experts.{e}.{proj}_proj.weight"] = stacked[e].contiguous()
    return out


def _unpermute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's interleaved q/k rows back to the half-split layout (the inverse of the exporter's permutation)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope(config: dict, factors: torch.Tensor) -> dict:
    """Llama-3 rope parameters whose per-frequency factors are `factors` (GGUF keeps only the factors)."""
    factor = float(factors.max())
    for old in [2 ** k for k in range(4, 21)]:
        candidate = dict(config, rope_parameters=dict(config["rope_parameters"], rope_type="llama3", factor=factor,
                                                      low_freq_factor=1.0, high_freq_factor=4.0,
                                                      original_max_position_embeddings=old))
        if torch.allclose(llama3_rope_factors(candidate), factors, rtol=1e-4):
            return candidate["rope_parameters"]
    raise ConfigError("the file's rope_freqs are not Llama-3 scaling with low/high frequency factors 1 and 4: not read")


def gguf_to_checkpoint(path: str | Path, directory: str | Path) -> Path:
    """Writes the GGUF model at `path` as a Hugging Face-format checkpoint directory (atomically)."""
    import gguf
    from safetensors.torch import save_file

    path, directory = Path(path), Path(directory)
    reader = gguf.GGUFReader(str(path))
    fields = _Fields(reader)
    arch = fields.need("general.architecture")
    if arch not in ("qwen2", "llama", "deepseek2"):
        raise ConfigError(f"GGUF architecture {arch!r} is not read yet: nanoseek reads qwen2, llama and deepseek2")
    tensors = {t.name: _tensor(t) for t in reader.tensors}
    config = _config(fields, arch, set(tensors))
    if "rope_freqs.weight" in tensors:
        config["rope_parameters"] = _llama3_rope(config, tensors.pop("rope_freqs.weight"))
    backend, tok_config = tokenizer_from_gguf(fields)
    tmp = directory.with_name(directory.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    weights = {k: v.contiguous() for k, v in _hf_tensors(config, tensors).items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({**config, "architectures": [_ARCH_CLASS[config["model_type"]]],
                                                 "torch_dtype": "float32"}, indent=1))
    backend.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1, ensure_ascii=False))
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


_ARCH_CLASS = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
               "deepseek_v2": "DeepseekV2ForCausalLM"}


def cached_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory of a GGUF file, converted on first use and reused while the file is unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.blake2b(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode(), digest_size=8).hexdigest()
    root = Path(os.environ.get("NANOSEEK_CACHE", Path.home() / ".cache" / "nanoseek")) / "gguf"
    directory = root / f"{path.stem}-{key}"
    if not (directory / "config.json").exists():
        gguf_to_checkpoint(path, directory)
    return directory
