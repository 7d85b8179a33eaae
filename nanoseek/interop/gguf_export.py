"""`nanoseek export gguf`: a Hugging Face-format checkpoint (what nanoseek saves and loads) as one GGUF file for
llama.cpp and Ollama, written through gguf-py (llama.cpp's own GGUF library).

What llama.cpp expects, and why each step is here (learnt from llama.cpp's converter; the code is ours):
- DeepSeek-V3 and V2 are llama.cpp's `deepseek2` architecture: MLA as MQA over the latent (head_count_kv 1),
  `kv_b_proj` split into `attn_k_b` (transposed, [heads, latent, nope]) and `attn_v_b`, the routed experts
  stacked into one tensor per projection, the router's balancing bias as `exp_probs_b`, MTP layers dropped
  (llama.cpp does not run them). The gating function is written explicitly: V3 configs saved by transformers
  carry no `scoring_func`, and llama.cpp then silently assumes softmax. llama.cpp ranks expert groups by the
  sum of their two best scores (V3's rule); a V2 checkpoint whose groups rank by their best score is refused.
- Qwen2 keeps its half-split rotary layout; Llama's q/k rows are permuted to llama.cpp's interleaved one, and
  Llama-3 rope scaling becomes a `rope_freqs` tensor.
- The tokenizer goes in as GPT-2-style byte-level BPE with the pre-tokenizer llama.cpp must use to split text
  the same way (`tokenizer.ggml.pre`); a pre-tokenizer with no llama.cpp equivalent is refused, since the model
  would then see different tokens there.
Norms, biases and routers stay float32; q8_0/q4_0 fall back to f16 for a matrix whose rows are not whole 32-value
blocks (as llama.cpp's converter does). The file is written beside its target and renamed into place.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import find_checkpoint_files
from ..errors import ConfigError
from ..tokenizer import ASSISTANT, USER

TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")
ARCHITECTURES = {"deepseek_v3": "deepseek2", "deepseek_v2": "deepseek2", "qwen2": "qwen2", "llama": "llama"}

# Pre-tokenizers llama.cpp knows, by what the tokenizer.json says. "gpt-2": GPT-2's pattern; "smollm": every
# digit alone, then GPT-2's pattern (nanoseek's own tokenizers); "qwen2": Qwen2's pattern (Qwen2 and the
# R1-Distill-Qwen students).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")


def llama_cpp_pre_tokenizer(tokenizer_json: dict) -> str:
    """The `tokenizer.ggml.pre` under which llama.cpp splits text as this tokenizer does, or ConfigError."""
    pre, normalizer = tokenizer_json.get("pre_tokenizer"), tokenizer_json.get("normalizer")
    model = tokenizer_json.get("model", {})
    if model.get("type") != "BPE" or normalizer not in (None, {}) and normalizer.get("type") != "NFC":
        raise ConfigError("only byte-level BPE tokenizers without a normalizer export to GGUF; this one has model "
                          f"{model.get('type')!r} and normalizer {normalizer!r}")
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space", False):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True) \
            and not steps[1].get("add_prefix_space", False):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == QWEN2_PATTERN \
            and not steps[1].get("use_regex", True):
        return "qwen2"
    raise ConfigError(f"the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no llama.cpp "
                      "equivalent nanoseek knows, so llama.cpp would split text differently: not exported")


def _tokenizer_metadata(writer, gguf, directory: Path, vocab_size: int) -> dict:
    """Tokens, types, merges, special ids, chat template. Returns what the Modelfile needs."""
    path = directory / "tokenizer.json"
    if not path.exists():
        raise ConfigError(f"{directory} has no tokenizer.json: a GGUF file carries its tokenizer, so export needs one")
    tj = json.loads(path.read_text())
    pre = llama_cpp_pre_tokenizer(tj)
    vocab = dict(tj["model"]["vocab"])
    added = {t["content"]: t for t in tj.get("added_tokens", [])}
    for content, t in added.items():
        vocab[content] = t["id"]
    by_id = {i: tok for tok, i in vocab.items()}
    if max(by_id) >= vocab_size:
        raise ConfigError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary is {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif tok in added:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if added[tok].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    config = json.loads((directory / "tokenizer_config.json").read_text()) \
        if (directory / "tokenizer_config.json").exists() else {}

    def token_id(key):
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return vocab.get(value) if value else None

    special = {k: token_id(f"{k}_token") for k in ("bos", "eos", "pad")}
    if special["bos"] is not None:
        writer.add_bos_token_id(special["bos"])
    if special["eos"] is not None:
        writer.add_eos_token_id(special["eos"])
    if special["pad"] is not None:
        writer.add_pad_token_id(special["pad"])
    writer.add_add_bos_token(adds_bos(tj, config))
    writer.add_add_eos_token(False)
    template = config.get("chat_template")
    if template is None and (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text()
    if template:
        writer.add_chat_template(template)
    return {"tokens": tokens, "template": template, "eos": tokens[special["eos"]] if special["eos"] is not None
            else None, "bos": tokens[special["bos"]] if special["bos"] is not None else None}


def adds_bos(tokenizer_json: dict, config: dict) -> bool:
    """Whether encoding puts BOS first: tokenizer_config's add_bos_token, else the tokenizer.json post-processor."""
    if "add_bos_token" in config:
        return bool(config["add_bos_token"])
    post = tokenizer_json.get("post_processor") or {}
    steps = post.get("processors", []) if post.get("type") == "Sequence" else [post]
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    for step in steps:
        first = (step.get("single") or [{}])[0] if step.get("type") == "TemplateProcessing" else {}
        if "SpecialToken" in first and first["SpecialToken"]["id"] == bos:
            return True
    return False


def _rope(config: dict) -> dict:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope


def _common_metadata(writer, config: dict, layers: int) -> None:
    writer.add_block_count(layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(_rope(config)["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])


def _deepseek_metadata(writer, gguf, config: dict) -> None:
    mt = config["model_type"]
    rope = _rope(config)
    writer.add_head_count_kv(1)  # MLA runs as MQA over the latent
    writer.add_leading_dense_block_count(config.get("first_k_dense_replace", 0))
    writer.add_q_lora_rank(config.get("q_lora_rank") or 0)  # llama.cpp requires the key; 0 = plain q_proj
    latent, rope_dim = config["kv_lora_rank"], config["qk_rope_head_dim"]
    writer.add_kv_lora_rank(latent)
    writer.add_key_length(latent + rope_dim)
    writer.add_value_length(latent)
    writer.add_key_length_mla(config["qk_nope_head_dim"] + rope_dim)
    writer.add_value_length_mla(config["v_head_dim"])
    writer.add_rope_dimension_count(rope_dim)
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_expert_count(config["n_routed_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_shared_count(config.get("n_shared_experts") or 0)
    writer.add_expert_weights_scale(float(config.get("routed_scaling_factor", 1.0)))
    writer.add_expert_weights_norm(bool(config.get("norm_topk_prob", False)))
    scoring = config.get("scoring_func") or ("sigmoid" if mt == "deepseek_v3" else "softmax")
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if scoring == "sigmoid"
                                  else gguf.ExpertGatingFuncType.SOFTMAX)
    topk_method = config.get("topk_method") or ("noaux_tc" if mt == "deepseek_v3" else "greedy")
    groups = config.get("n_group") or 1
    if topk_method in ("noaux_tc", "group_limited_greedy") and groups > 1:
        if topk_method == "group_limited_greedy":
            raise ConfigError("this V2 checkpoint ranks expert groups by their best score (group_limited_greedy); "
                              "llama.cpp ranks them by the sum of their two best (V3's rule), so it would route "
                              "tokens differently: not exported")
        writer.add_expert_group_count(groups)
        writer.add_expert_group_used_count(config["topk_group"])
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
        if rope.get("mscale") != rope.get("mscale_all_dim"):
            raise ConfigError("YaRN with mscale != mscale_all_dim has no llama.cpp equivalent: not exported")
        if rope.get("mscale_all_dim"):
            writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])  # llama.cpp's deepseek2 convention
    elif rope.get("rope_type") not in (None, "default"):
        raise ConfigError(f"rope scaling {rope.get('rope_type')!r} on a DeepSeek model has no llama.cpp equivalent")


def _dense_metadata(writer, gguf, config: dict) -> None:
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_rope_dimension_count(head_dim)
    rope = _rope(config)
    kind = rope.get("rope_type")
    if kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    elif kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind not in (None, "default", "llama3"):
        raise ConfigError(f"rope scaling {kind!r} has no llama.cpp equivalent nanoseek writes")


def llama3_rope_factors(config: dict) -> torch.Tensor:
    """Llama-3 rope scaling as llama.cpp reads it: one divisor per rotary frequency."""
    rope = _rope(config)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def _permute_rotary(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Llama q/k rows from the half-split rotary layout to llama.cpp's interleaved one."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# HF tensor name (after "model.layers.N.") -> gguf-py tensor kind.
def _layer_names(gguf) -> dict:
    T = gguf.MODEL_TENSOR
    return {
        "input_layernorm.weight": T.ATTN_NORM, "post_attention_layernorm.weight": T.FFN_NORM,
        "self_attn.q_proj.weight": T.ATTN_Q, "self_attn.q_proj.bias": T.ATTN_Q,
        "self_attn.k_proj.weight": T.ATTN_K, "self_attn.k_proj.bias": T.ATTN_K,
        "self_attn.v_proj.weight": T.ATTN_V, "self_attn.v_proj.bias": T.ATTN_V,
        "self_attn.o_proj.weight": T.ATTN_OUT,
        "self_attn.q_a_proj.weight": T.ATTN_Q_A, "self_attn.q_a_layernorm.weight": T.ATTN_Q_A_NORM,
        "self_attn.q_b_proj.weight": T.ATTN_Q_B, "self_attn.kv_a_proj_with_mqa.weight": T.ATTN_KV_A_MQA,
        "self_attn.kv_a_layernorm.weight": T.ATTN_KV_A_NORM,
        "mlp.gate_proj.weight": T.FFN_GATE, "mlp.up_proj.weight": T.FFN_UP, "mlp.down_proj.weight": T.FFN_DOWN,
        "mlp.gate.weight": T.FFN_GATE_INP, "mlp.gate.e_score_correction_bias": T.FFN_EXP_PROBS_B,
        "mlp.shared_experts.gate_proj.weight": T.FFN_GATE_SHEXP, "mlp.shared_experts.up_proj.weight": T.FFN_UP_SHEXP,
        "mlp.shared_experts.down_proj.weight": T.FFN_DOWN_SHEXP,
    }


def _gguf_tensors(config: dict, tensors: dict[str, torch.Tensor], gguf):
    """(gguf name, float32 tensor) pairs in llama.cpp's layout."""
    T, names = gguf.MODEL_TENSOR, gguf.TENSOR_NAMES
    mt, layers = config["model_type"], config["num_hidden_layers"]
    per_layer = _layer_names(gguf)
    yield names[T.TOKEN_EMBD] + ".weight", tensors["model.embed_tokens.weight"]
    yield names[T.OUTPUT_NORM] + ".weight", tensors["model.norm.weight"]
    if "lm_head.weight" in tensors and not config.get("tie_word_embeddings", False):
        yield names[T.OUTPUT] + ".weight", tensors["lm_head.weight"]
    if mt == "llama" and _rope(config).get("rope_type") == "llama3":
        yield names[T.ROPE_FREQS] + ".weight", llama3_rope_factors(config)
    heads = config["num_attention_heads"]
    for i in range(layers):
        prefix = f"model.layers.{i}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        experts = {}
        for key, w in own.items():
            if m := re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", key):
                experts.setdefault(m.group(2), {})[int(m.group(1))] = w
                continue
            if key == "self_attn.kv_b_proj.weight":  # -> attn_k_b [H, latent, nope] and attn_v_b [H, v, latent]
                nope, v = config["qk_nope_head_dim"], config["v_head_dim"]
                kv_b = w.view(heads, nope + v, w.shape[-1])
                yield names[T.ATTN_K_B].format(bid=i) + ".weight", kv_b[:, :nope].transpose(1, 2).contiguous()
                yield names[T.ATTN_V_B].format(bid=i) + ".weight", kv_b[:, nope:].contiguous()
                continue
            if key not in per_layer:
                raise ConfigError(f"tensor {prefix}{key} has no GGUF counterpart nanoseek knows: not exported")
            if mt == "llama" and key == "self_attn.q_proj.weight":
                w = _permute_rotary(w, heads)
            elif mt == "llama" and key == "self_attn.k_proj.weight":
                w = _permute_rotary(w, config.get("num_key_value_heads") or heads)
            suffix = ".bias" if key.endswith("bias") else ".weight"
            yield names[per_layer[key]].format(bid=i) + suffix, w
        kinds = {"gate": T.FFN_GATE_EXP, "up": T.FFN_UP_EXP, "down": T.FFN_DOWN_EXP}
        for proj, by_expert in experts.items():
            stacked = torch.stack([by_expert[e] for e in range(len(by_expert))])
            yield names[kinds[proj]].format(bid=i) + ".weight", stacked


def _encode(gguf, name: str, w: torch.Tensor, kind: str):
    """The array and GGML type a tensor is stored as."""
    Q = gguf.GGMLQuantizationType
    data = w.detach().to(torch.float32).numpy()
    if data.ndim <= 1 or name.endswith("ffn_gate_inp.weight") or kind == "f32":
        return data, Q.F32
    if kind in ("q8_0", "q4_0") and data.shape[-1] % 32:
        kind = "f16"  # rows that are not whole quantization blocks (llama.cpp's converter does the same)
    if kind == "f16":
        return data.astype(np.float16), Q.F16
    qtype = {"bf16": Q.BF16, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[kind]
    return gguf.quants.quantize(data, qtype), qtype


def export_gguf(model: str | Path, out: str | Path, kind: str = "f16", modelfile: bool = True) -> Path:
    """Writes `out` (GGUF) from the checkpoint directory `model`, and an Ollama Modelfile beside it."""
    import gguf

    if kind not in TYPES:
        raise ConfigError(f"--type {kind!r} is not one of {', '.join(TYPES)}")
    directory, out = Path(model), Path(out)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ConfigError(f"{directory} is not a checkpoint directory (no config.json)")
    config = json.loads(config_path.read_text())
    mt = config.get("model_type")
    if mt not in ARCHITECTURES:
        raise ConfigError(f"model_type {mt!r} does not export to GGUF; supported: {', '.join(ARCHITECTURES)}")
    if (config.get("quantization_config") or {}).get("quant_method") == "nanoseek":
        raise ConfigError(f"{directory} holds nanoseek-quantized weights, which GGUF has no type for: export its "
                          "float checkpoint, with --type q8_0 or q4_0 for a quantized GGUF")
    files = find_checkpoint_files(directory)
    tensors = {}
    for key in files.key_to_file:
        layer = re.match(r"model\.layers\.(\d+)\.", key)
        if layer and int(layer.group(1)) >= config["num_hidden_layers"]:
            continue  # MTP modules: llama.cpp does not run them
        if key.endswith("weight_scale_inv"):
            raise ConfigError("FP8 checkpoints are not exported directly: load and save it with nanoseek first "
                              "(nanoseek dequantizes FP8 on load)")
        tensors[key] = files.tensor(key)
    arch = ARCHITECTURES[mt]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_name(directory.resolve().name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _common_metadata(writer, config, config["num_hidden_layers"])
    (_deepseek_metadata if arch == "deepseek2" else _dense_metadata)(writer, gguf, config)
    vocab = _tokenizer_metadata(writer, gguf, directory, config["vocab_size"])
    for name, w in _gguf_tensors(config, tensors, gguf):
        data, qtype = _encode(gguf, name, w, kind)
        writer.add_tensor(name, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, out)
    if modelfile:
        write_modelfile(out, vocab)
    return out


def write_modelfile(gguf_path: Path, vocab: dict) -> Path:
    """An Ollama Modelfile beside the GGUF: `ollama create NAME -f Modelfile` then `ollama run NAME`. The template
    is the R1 chat format (what nanoseek's tokenizers and the R1-Distill models use) when the vocabulary has its
    role tokens, with the end-of-sentence token as the stop."""
    lines = [f"FROM ./{gguf_path.name}"]
    tokens = set(vocab["tokens"])
    user, assistant = USER, ASSISTANT
    if user in tokens and assistant in tokens:
        bos = vocab["bos"] or ""
        lines += ['TEMPLATE """' + bos + "{{ if .System }}{{ .System }}{{ end }}"
                  "{{ range .Messages }}{{ if eq .Role \"user\" }}" + user + "{{ .Content }}"
                  "{{ else if eq .Role \"assistant\" }}" + assistant + "{{ .Content }}" + (vocab["eos"] or "")
                  + "{{ end }}{{ end }}" + assistant + '<think>\n"""']
    if vocab["eos"]:
        lines.append(f'PARAMETER stop "{vocab["eos"]}"')
    path = gguf_path.with_name("Modelfile")
    path.write_text("\n".join(lines) + "\n")
    return path
