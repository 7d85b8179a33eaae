"""DeepSeek-V4 in `nanoseek inspect`: parameters, KV cache by context and FLOPs from the config alone, checked
against transformers' own DeepseekV4ForCausalLM (instantiated on the meta device: no memory) and DeepSeek's
published figures."""

import json
import sys
from pathlib import Path

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.config_v4 import CSA, HCA, SLIDING, DeepseekV4Config
from nanoseek.errors import ConfigError
from nanoseek.model.accounting import model_cost, v4_cost, v4_kv_cache_bytes
from nanoseek.presets import load_preset

import procs

PRESETS = Path(__file__).resolve().parent.parent / "nanoseek" / "presets"


def _release(name: str) -> dict:
    return json.loads((PRESETS / f"{name}.json").read_text())


def _hf_param_count(d: dict) -> int:
    import transformers

    # transformers reads the release's fields; the quantization block would ask for FP8 kernels.
    d = {k: v for k, v in d.items() if k not in ("quantization_config", "expert_dtype", "rope_scaling",
                                                  "torch_dtype", "topk_method", "architectures")}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV4Config(**d))
    return sum(p.numel() for p in model.parameters())


TINY = {"model_type": "deepseek_v4", "vocab_size": 300, "hidden_size": 64, "moe_intermediate_size": 32,
        "num_hidden_layers": 5, "num_attention_heads": 4, "head_dim": 32, "q_lora_rank": 24, "qk_rope_head_dim": 8,
        "o_groups": 2, "o_lora_rank": 16, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2,
        "hc_mult": 3, "index_n_heads": 4, "index_head_dim": 16, "index_topk": 4, "sliding_window": 8,
        "num_hash_layers": 2, "compress_ratios": [0, 4, 128, 4, 0, 0], "num_nextn_predict_layers": 1}


@pytest.mark.parametrize("name", ["tiny", "deepseek-v4-flash", "deepseek-v4-pro"])
def test_parameter_count_equals_transformers_model(name):
    d = TINY if name == "tiny" else _release(name)
    assert v4_cost(DeepseekV4Config.from_hf_dict(d)).total_params == _hf_param_count(d)


def test_presets_round_to_the_published_sizes():
    flash, pro = (v4_cost(DeepseekV4Config.from_hf_dict(_release(n))) for n in ("deepseek-v4-flash", "deepseek-v4-pro"))
    assert round(flash.total_params / 1e9) == 284 and round(flash.active_params / 1e9) == 13
    assert round(pro.total_params / 1e12, 1) == 1.6 and round(pro.active_params / 1e9) == 49
    assert 0 < flash.mtp_params < 0.05 * flash.total_params and 0 < pro.mtp_params < 0.05 * pro.total_params


def test_both_config_spellings_read_the_same():
    release = DeepseekV4Config.from_hf_dict(TINY)
    assert release.layer_types[:5] == [SLIDING, CSA, HCA, CSA, SLIDING]
    assert release.mlp_layer_types == ["hash_moe", "hash_moe", "moe", "moe", "moe"]
    hf_spelling = {k: v for k, v in TINY.items() if k not in ("compress_ratios", "num_hash_layers")}
    hf_spelling.update(layer_types=release.layer_types[:5], mlp_layer_types=release.mlp_layer_types)
    assert v4_cost(DeepseekV4Config.from_hf_dict(hf_spelling)).total_params == v4_cost(release).total_params
    with pytest.raises(ConfigError, match="compress_ratios"):
        DeepseekV4Config.from_hf_dict({**TINY, "compress_ratios": [0, 8, 4, 4, 4]})


def test_the_kv_cache_per_token_falls_with_context_and_v4_pro_meets_deepseeks_claims():
    pro = DeepseekV4Config.from_hf_dict(_release("deepseek-v4-pro"))
    per_token = [v4_cost(pro, n).kv_cache_bytes_per_token for n in (128, 4096, 32768, 1 << 20)]
    assert per_token == sorted(per_token, reverse=True) and per_token[0] > 2 * per_token[-1]
    # One sequence at 1M tokens: every layer's window, plus 1 entry per 4 tokens (with its index key) in the 30
    # CSA layers and 1 per 128 in the 31 HCA layers.
    assert v4_kv_cache_bytes(pro, 1 << 20) == 2 * (61 * 128 * 512 + 30 * (1 << 18) * (512 + 128) + 31 * 8192 * 512)
    v32 = model_cost(load_preset("deepseek-v3.2"), 1 << 20)
    v4 = v4_cost(pro, 1 << 20)
    assert 0.24 < v4.flops_per_token / v32.flops_per_token < 0.30  # DeepSeek: 27%
    assert 0.08 < v4.kv_cache_bytes_per_token / v32.kv_cache_bytes_per_token < 0.13  # DeepSeek: 10%


def test_inspect_cli_on_v4_presets():
    r = procs.run([sys.executable, "-m", "nanoseek.cli", "inspect", "deepseek-v4-pro", "--json"],
                  capture_output=True, text=True, check=True)
    info = json.loads(r.stdout)
    assert info["layer_kinds"] == {SLIDING: 0, CSA: 30, HCA: 31} and info["hash_routed_layers"] == 3
    assert set(info["kv_cache_bytes_per_token_by_context"]) == {"4096", "32768", "131072", "1048576"}
    assert 0.24 < info["vs_deepseek_v32_at_1m_context"]["flops"] < 0.30
    r = procs.run([sys.executable, "-m", "nanoseek.cli", "inspect", "deepseek-v4-flash"], capture_output=True,
                  text=True, check=True)
    assert "284.33B total" in r.stdout and "DeepSeek reports 27% and 10%" in r.stdout


def test_release_configs_load_as_model_configs_and_a_config_alone_is_refused_clearly(tmp_path):
    """DeepSeek's release config.json reads into the same layer schedule and its MTP depth; a directory without
    weights is refused with one line, exit code 2."""
    config = ModelConfig.from_hf_dict(_release("deepseek-v4-flash"))
    release = DeepseekV4Config.from_hf_dict(_release("deepseek-v4-flash"))
    assert config.is_v4 and config.layer_types == release.layer_types[:config.num_hidden_layers]
    assert config.mlp_layer_types == release.mlp_layer_types and config.num_nextn_predict_layers == 1
    assert config.scoring_func == "sqrtsoftplus" and config.rope_type == "yarn"  # on the compressed layers
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    r = procs.run([sys.executable, "-m", "nanoseek.cli", "generate", "--model", str(tmp_path), "--prompt", "hi"],
                  capture_output=True, text=True)
    assert r.returncode == 2 and "safetensors" in r.stderr and "Traceback" not in r.stderr
