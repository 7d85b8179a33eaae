"""ModelConfig <-> config.json, analytic accounting, presets and `nanoseek inspect`."""

import json
import sys

import pytest

from nanoseek.config import ModelConfig
from nanoseek.errors import ConfigError
from nanoseek.model.accounting import model_cost
from nanoseek.model.transformer import Transformer
from nanoseek.presets import load_preset

import procs


def test_hf_config_round_trip_keeps_every_key(hf_checkpoint, arch):
    directory, _ = hf_checkpoint(arch)
    raw = json.loads((directory / "config.json").read_text())
    config = ModelConfig.from_hf_dict(raw)
    again = ModelConfig.from_hf_dict(config.to_hf_dict())
    assert again == config
    assert config.rope_type == raw["rope_parameters"]["rope_type"]


def test_legacy_rope_scaling_spelling_is_read():
    config = load_preset("deepseek-v3")  # hub files use rope_scaling {"type": "yarn"} + top-level rope_theta
    assert config.rope_type == "yarn" and config.rope_scaling["factor"] == 40 and config.rope_theta == 10000


def test_unsupported_rope_type_is_rejected():
    with pytest.raises(ConfigError, match="longrope"):
        ModelConfig.from_hf_dict({"model_type": "llama", "rope_scaling": {"rope_type": "longrope"}})


@pytest.mark.parametrize("arch_name", ["deepseek_v3", "deepseek_v2", "llama", "qwen2", "deepseek_v3_no_q_lora"])
def test_analytic_parameter_count_equals_instantiated_model(arch_name, hf_checkpoint):
    directory, hf = hf_checkpoint(arch_name)
    config = ModelConfig.from_pretrained(directory).replace(num_nextn_predict_layers=1 if "deepseek" in arch_name
                                                            else 0)
    model = Transformer(config)
    cost = model_cost(config)
    mtp = sum(p.numel() for p in model.mtp.parameters())
    assert cost.mtp_params == mtp
    assert cost.total_params == sum(p.numel() for p in model.parameters()) - mtp
    assert cost.total_params == sum(p.numel() for p in hf.parameters())


def test_deepseek_v3_preset_matches_published_figures():
    cost = model_cost(load_preset("deepseek-v3"))
    assert abs(cost.total_params / 671e9 - 1) < 0.01
    assert abs(cost.active_params / 37e9 - 1) < 0.03
    assert cost.kv_cache_bytes_per_token == 70_272
    assert 10e9 < cost.mtp_params < 15e9


def test_deepseek_v2_lite_preset_matches_published_figures():
    cost = model_cost(load_preset("deepseek-v2-lite"))
    assert abs(cost.total_params / 15.7e9 - 1) < 0.03
    assert abs(cost.active_params / 2.4e9 - 1) < 0.03


def test_r1_distill_qwen_preset():
    config = load_preset("deepseek-r1-distill-qwen-1.5b")
    cost = model_cost(config)
    assert config.model_type == "qwen2" and config.qkv_bias
    assert abs(cost.total_params / 1.777e9 - 1) < 0.01
    assert cost.kv_cache_bytes_per_token == 2 * 2 * 128 * 28 * 2


def test_inspect_cli_json_for_v3():
    r = procs.run([sys.executable, "-m", "nanoseek.cli", "inspect", "deepseek-v3", "--json"],
                       capture_output=True, text=True, check=True)
    info = json.loads(r.stdout)
    assert info["kv_cache_bytes_per_token"] == 70_272 and info["flops_context"] == 4096
    assert info["mtp_params"] > 0 and info["total_params"] > 6e11


def test_inspect_cli_text_on_a_checkpoint(hf_checkpoint):
    directory, _ = hf_checkpoint("llama")
    r = procs.run([sys.executable, "-m", "nanoseek.cli", "inspect", str(directory)], capture_output=True,
                       text=True, check=True)
    assert "active per token" in r.stdout and "bytes per token" in r.stdout and "at context 4,096" in r.stdout


def test_inspect_cli_unknown_model_exits_2():
    r = procs.run([sys.executable, "-m", "nanoseek.cli", "inspect", "no-such-model"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "preset" in r.stderr and "Traceback" not in r.stderr
