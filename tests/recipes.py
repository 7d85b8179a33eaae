"""A tiny recipe for trainer tests: the real pipeline (tokenizer, shards, V3 model with MoE and MTP) at toy size."""

from pathlib import Path

TINY_RECIPE = """
[run]
name = "{name}"
out_dir = "{out}"
seed = 0

[tokenizer]
vocab_size = 300
train_docs = 600

[model]
model_type = "deepseek_v3"
hidden_size = 32
intermediate_size = 64
num_hidden_layers = 2
num_attention_heads = 2
num_key_value_heads = 2
q_lora_rank = 16
kv_lora_rank = 16
qk_nope_head_dim = 8
qk_rope_head_dim = 8
v_head_dim = 8
n_routed_experts = 4
num_experts_per_tok = 2
n_shared_experts = 1
moe_intermediate_size = 16
first_k_dense_replace = 1
n_group = 2
topk_group = 1
topk_method = "noaux_tc"
scoring_func = "sigmoid"
norm_topk_prob = true
routed_scaling_factor = 1.0
num_nextn_predict_layers = 1
max_position_embeddings = 256

[data]
task = "arithmetic"
levels = [1, 2]
train_problems = 600
val_problems = 20

[train]
seq_len = 64
batch_size = 8
micro_batch_size = 4
dtype = "float32"
warmup_steps = 2
lr = 3e-3
log_every = 1
save_every = 0
bias_update_gamma = 0.01
seq_aux_alpha = 0.001

[pretrain]
steps = 6

[sft]
init_from = "pretrain"
steps = 4

[eval]
problems = 4
max_tokens = 24
during_training = false
"""


def write_tiny_recipe(directory: Path, name: str = "tiny", extra: str = "") -> Path:
    path = Path(directory) / f"{name}.toml"
    path.write_text(TINY_RECIPE.format(name=name, out=str(Path(directory) / "runs")) + extra)
    return path


def policy_dtypes() -> list[str]:
    """train.dtype values to test: float32 (exact numerics), plus "auto" where the runtime policy picks something
    else on this machine (bf16 where it is native): what users' runs compute in."""
    import torch

    from nanoseek.runtime import training_autocast

    autocast, _ = training_autocast("auto", torch.device("cpu"))
    return ["float32"] + (["auto"] if autocast is not None else [])


# A small GRPO stage with a learning signal on a barely trained model: a reward that varies with the output
# (accuracy would be 0 everywhere) and truncated completions kept in the loss (16 tokens rarely finish). The
# reward's module, written as signal_rewards.py next to the run, has a name no other test imports.
GRPO_SIGNAL = """
[grpo]
init_from = "sft"
steps = 3
prompts_per_step = 4
group_size = 4
max_completion_tokens = 16
micro_batch_size = 4
lr = 1e-3
dynamic_sampling = false
log_every = 1
rollout_dtype = "float32"
mask_truncated = false
rewards = [{name = "signal_rewards:digits", weight = 1.0}]
"""
SIGNAL_REWARDS = "def digits(prompt, completion, reference, meta):\n    return sum(c.isdigit() for c in completion) / 8\n"
