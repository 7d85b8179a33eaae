"""Tiny real checkpoints, written by transformers' own `save_pretrained`, for every supported architecture.

Weights are re-randomised with a larger spread than transformers' 0.02 init so logits are O(1) and routing
actually varies between tokens: a parity test on near-zero logits would prove nothing.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

MLA_COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                  num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_rope_head_dim=8,
                  qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=256, bos_token_id=0,
                  eos_token_id=1)

# name -> (transformers config class name, kwargs)
ARCHITECTURES = {
    # V3: q LoRA, YaRN, noaux_tc with group-limited routing over 4 groups.
    "deepseek_v3": ("DeepseekV3Config", dict(MLA_COMMON, num_hidden_layers=3, n_routed_experts=8, n_group=4,
                                             topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
                                             n_shared_experts=1, q_lora_rank=32, rope_parameters=YARN)),
    # V3.2: V3 plus DeepSeek Sparse Attention; index_topk 4 cuts every context longer than 4 tokens. 16 indexer
    # heads make exact ties between index scores rare (a score is exactly 0 when every head's ReLU zeroes it,
    # and transformers breaks such ties by torch.topk's order, which differs between its cached and uncached
    # paths).
    "deepseek_v32": ("DeepseekV32Config", dict(MLA_COMMON, num_hidden_layers=3, n_routed_experts=8, n_group=4,
                                               topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
                                               n_shared_experts=1, q_lora_rank=32, rope_parameters=YARN,
                                               index_topk=4, index_head_dim=16, index_n_heads=16)),
    # V3 without q LoRA and without rope scaling.
    "deepseek_v3_no_q_lora": ("DeepseekV3Config", dict(MLA_COMMON, num_hidden_layers=2, n_routed_experts=4,
                                                       n_group=1, topk_group=1, num_experts_per_tok=2,
                                                       first_k_dense_replace=0, q_lora_rank=None,
                                                       rope_parameters={"rope_type": "default",
                                                                        "rope_theta": 10000.0})),
    # V2: softmax greedy routing, two shared experts, YaRN with mscale 0.707 like V2-Lite.
    "deepseek_v2": ("DeepseekV2Config", dict(MLA_COMMON, num_hidden_layers=3, n_routed_experts=8,
                                             num_experts_per_tok=3, first_k_dense_replace=1, n_shared_experts=2,
                                             q_lora_rank=None, topk_method="greedy", norm_topk_prob=False,
                                             routed_scaling_factor=1.0,
                                             rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
    # V2 with group-limited greedy routing and q LoRA.
    "deepseek_v2_group_limited": ("DeepseekV2Config", dict(MLA_COMMON, num_hidden_layers=2, n_routed_experts=8,
                                                           num_experts_per_tok=2, first_k_dense_replace=0,
                                                           n_shared_experts=1, q_lora_rank=24,
                                                           topk_method="group_limited_greedy", n_group=4,
                                                           topk_group=2, norm_topk_prob=False,
                                                           routed_scaling_factor=1.5,
                                                           rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 10000.0})),
    # Llama 3: GQA with Llama-3 rope scaling.
    "llama": ("LlamaConfig", dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  bos_token_id=0, eos_token_id=1,
                                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 32})),
    # Qwen2: GQA with q/k/v bias and tied embeddings.
    "qwen2": ("Qwen2Config", dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                             "rope_theta": 1000000.0},
                                  bos_token_id=0, eos_token_id=1)),
}


# DeepSeek-V4 runs only as a full forward (the engine does not run it), so it is kept out of the `arch` matrix.
# Every layer kind: window only, CSA (m 4, indexer top-3 of up to 10 entries at 40 tokens), HCA (m 8); two hash
# layers; a window of 8; YaRN on the compressed layers' rotary; 16 indexer heads make exact score ties rare.
V4_LAYERS = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention",
             "compressed_sparse_attention", "sliding_attention"]
FULL_FORWARD_ARCHITECTURES = {
    "deepseek_v4": ("DeepseekV4Config", dict(
        vocab_size=160, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=5, num_attention_heads=4,
        head_dim=32, qk_rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=16, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, hc_mult=4, index_n_heads=16, index_head_dim=16, index_topk=3,
        sliding_window=8, compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        layer_types=V4_LAYERS, mlp_layer_types=["hash_moe", "hash_moe", "moe", "moe", "moe"],
        num_nextn_predict_layers=0, max_position_embeddings=256, bos_token_id=0, eos_token_id=1,
        rope_theta=10000.0, compress_rope_theta=40000.0,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1})),
}


def randomize_(model, seed: int = 0) -> None:
    """O(1)-scale random weights: matrices ~ N(0, 1/sqrt(fan_in)), norms ~ 1 + N(0, 0.1), biases ~ N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 * 1.5)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("tid2eid"):  # each token's k distinct experts
                experts = model.config.n_routed_experts
                b.copy_(torch.rand(b.shape[0], experts, generator=g).argsort(-1)[:, : b.shape[1]])


def build_hf_model(arch: str, seed: int = 0, **overrides):
    import transformers

    cls_name, kwargs = {**ARCHITECTURES, **FULL_FORWARD_ARCHITECTURES}[arch]
    config = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_(model, seed)
    return model.eval()


def save_hf_checkpoint(arch: str, directory: Path, seed: int = 0, **overrides):
    model = build_hf_model(arch, seed, **overrides)
    model.save_pretrained(directory)
    return model


# The package's own R1-style template (system first, reasoning dropped from past turns, <think> opened).
from nanoseek.tokenizer import CHAT_TEMPLATE as R1_TEMPLATE  # noqa: E402

SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
                  "</think>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "What is 12 + 30? Let me think step by step.",
          "def add(a, b):\n    return a + b\n", "Ünïcödé text, emoji 🙂 and 数字 42."] * 20


TOOL_TOKENS = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
               "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
               "<｜tool▁output▁end｜>"]
R1_FIXTURE = Path(__file__).parent / "data" / "r1_distill_qwen_tokenizer.gguf"  # shared/fixtures, copied


@functools.cache
def published_tool_template() -> str:
    """The real chat template of the published DeepSeek-R1-Distill-Qwen GGUF (shared/fixtures): DeepSeek-V3's
    tool-call tokens and layout, a generation prompt without <think>."""
    import gguf

    field = gguf.GGUFReader(str(R1_FIXTURE)).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode()


def build_tool_tokenizer(directory: Path, vocab_size: int = 300):
    """build_tokenizer with DeepSeek's tool-call tokens and the published template that writes them."""
    return build_tokenizer(directory, vocab_size, extra_special=TOOL_TOKENS, template=published_tool_template())


def build_tokenizer(directory: Path, vocab_size: int = 160, extra_special: list[str] = (), template: str | None = None):
    """A byte-level BPE tokenizer saved by transformers, with DeepSeek's special tokens and the R1 template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + list(extra_special),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    bos = SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=SPECIAL_TOKENS[1])
    fast.chat_template = template or R1_TEMPLATE
    fast.save_pretrained(directory)
    return fast
