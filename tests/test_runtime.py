"""The runtime module (nanoseek/runtime.py): the CPU class, the ISA ceiling, the dtype policy, the process
settings applied on import, and `nanoseek env`."""

import json
import os
import subprocess
import sys

import pytest
import torch

from nanoseek import runtime
from nanoseek.errors import ConfigError

import procs

_SETTINGS = ("THP_MEM_ALLOC_ENABLE", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "NANOSEEK_CPU_RUNTIME", "NANOSEEK_ISA",
             "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_VERBOSE")


def _run(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in _SETTINGS}
    return procs.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120)


def _probe(**env):
    code = ("import os, nanoseek; print(nanoseek.runtime.configure(), os.environ.get('THP_MEM_ALLOC_ENABLE'), "
            "os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))")
    out = _run(code, **env)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_importing_nanoseek_applies_the_settings():
    applied, thp, cache = _probe()
    assert thp == "1" and cache == "16384"
    assert applied == ("True" if sys.platform.startswith("linux") else "False")


def test_the_user_s_own_values_win_and_the_switch_turns_it_all_off():
    assert _probe(ONEDNN_PRIMITIVE_CACHE_CAPACITY="64")[2] == "64"
    assert _probe(NANOSEEK_CPU_RUNTIME="0") == ["False", "None", "None"]


def test_the_cpu_class_is_read_and_consistent():
    info = runtime.cpu()
    assert info.isa in runtime.ISAS and info.native_isa in runtime.ISAS and info.cores >= 1
    assert info.bf16_native == (info.isa in ("avx512_bf16", "amx"))
    if info.ceiling is None:
        assert info.isa == info.native_isa


@pytest.mark.skipif(runtime.cpu().native_isa not in runtime.X86_LEVELS, reason="the ceilings are x86 levels")
def test_the_avx2_ceiling_reaches_torch_and_onednn():
    """NANOSEEK_ISA=avx2 on any x86 host: nanoseek, torch's kernels and oneDNN all behave as on an AVX2 CPU
    (no native bf16, oneDNN refuses bf16 weight packing), which is what the CI's second pass relies on."""
    code = ("import json, torch, nanoseek; from nanoseek import runtime; c = runtime.cpu(); "
            "print(json.dumps([c.isa, c.bf16_native, torch.backends.cpu.get_cpu_capability(), "
            "torch.ops.mkldnn._is_mkldnn_bf16_supported()]))")
    out = _run(code, NANOSEEK_ISA="avx2")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == ["avx2", False, "AVX2", False]


@pytest.mark.skipif(runtime.cpu().native_isa not in runtime.X86_LEVELS or not torch.backends.mkl.is_available(),
                    reason="the ceilings are x86 levels; MKL runs float32 GEMMs only where torch is built with it")
def test_the_avx2_ceiling_reaches_mkl():
    """torch's float32 GEMMs run on MKL, which picks its own code path: under the ceiling it must pick AVX2's (MKL
    names the instruction set it chose in its verbose log), or the training and float32 figures measured under
    NANOSEEK_ISA=avx2 are an AVX-512 machine's."""
    code = "import torch, nanoseek; a = torch.ones(64, 64); a @ a"
    out = _run(code, NANOSEEK_ISA="avx2", MKL_VERBOSE="1")
    assert out.returncode == 0, out.stderr
    banner = next(line for line in out.stdout.splitlines() if "enabled processors" in line or "AVX" in line)
    assert "(Intel(R) AVX2)" in banner and "AVX-512" not in banner, banner


def test_a_malformed_ceiling_is_one_clear_error():
    out = _run("import nanoseek; from nanoseek import runtime; runtime.cpu()", NANOSEEK_ISA="avx9000")
    assert out.returncode != 0 and "NANOSEEK_ISA='avx9000' is not an ISA level" in out.stderr
    env = {k: v for k, v in os.environ.items() if k not in _SETTINGS}
    cli = procs.run([sys.executable, "-m", "nanoseek.cli", "env"], env={**env, "NANOSEEK_ISA": "avx9000"},
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "NANOSEEK_ISA" in cli.stderr


def test_capping_follows_the_x86_order_and_ignores_other_architectures():
    assert runtime._capped("amx", "avx2") == "avx2"
    assert runtime._capped("avx2", "avx512_bf16") == "avx2"  # a ceiling never adds instructions
    assert runtime._capped("neon", "avx2") == "neon"
    assert runtime._capped("avx512", "scalar") == "scalar"
    assert runtime._native_isa("x86_64", {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                                          "avx512dq"}) == "avx512"
    assert runtime._native_isa("x86_64", {"avx2", "fma", "f16c", "avx512_bf16"}) == "avx2"  # levels nest
    assert runtime._native_isa("arm64", set()) == "neon"


def test_the_dtype_policy_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(runtime, "bf16_native", lambda device, native=native: native)
        auto_bf16 = runtime.inference_precision("auto", cpu, "bfloat16")
        assert auto_bf16.weights == torch.bfloat16 and auto_bf16.note is None
        assert auto_bf16.compute == (torch.bfloat16 if native else torch.float32)
        explicit = runtime.inference_precision("bfloat16", cpu, "float32")
        assert explicit.weights == torch.bfloat16 and (explicit.note is None) == native
        assert runtime.inference_precision("auto", cpu, "float32") == runtime.Precision(torch.float32, torch.float32)
        assert runtime.inference_precision("auto", cpu, "float16").weights == torch.bfloat16
        fast = runtime.fast_precision("auto", cpu)
        assert fast.compute == (torch.bfloat16 if native else torch.float32) and fast.weights == torch.bfloat16
        autocast, note = runtime.training_autocast("auto", cpu)
        assert autocast == (torch.bfloat16 if native else None) and note is None
        autocast, note = runtime.training_autocast("bfloat16", cpu)
        assert autocast == torch.bfloat16 and (note is None) == native  # honoured, with its cost named
        assert runtime.training_autocast("float32", cpu) == (None, None)
    with pytest.raises(ConfigError, match="float16 on a CPU"):
        runtime.inference_precision("float16", cpu)
    with pytest.raises(ConfigError, match="unknown dtype"):
        runtime.inference_precision("bf17", cpu)


def test_the_peak_probe_is_bounded_in_time_even_for_emulated_bf16():
    import time

    runtime._PEAK_CACHE.clear()
    start = time.perf_counter()
    rate = runtime.peak_flops(torch.bfloat16, torch.device("cpu"), seconds=0.2)
    assert rate > 0 and time.perf_counter() - start < 5


def test_nanoseek_env_prints_the_machine_and_its_choices():
    out = procs.run([sys.executable, "-m", "nanoseek.cli", "env", "--json"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["cpu"]["isa"] == runtime.cpu().isa
    assert set(report["kernels"]) == {"decode", "training"}
    assert report["cpu_policy"]["training"]
    text = procs.run([sys.executable, "-m", "nanoseek.cli", "env"], capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and "ISA" in text.stdout and "bf16" in text.stdout


def test_a_cpu_without_x86_kernels_runs_everything_eager(hf_checkpoint):
    """What an arm64 laptop gets (NANOSEEK_ISA=scalar stands in): no kernel build is attempted, a bf16 checkpoint
    loads as bf16 weights computed in float32, the engine generates and a training step runs on eager PyTorch."""
    directory, _ = hf_checkpoint("deepseek_v3")
    code = f"""
import json, torch, nanoseek
from nanoseek import LLM, SamplingParams, runtime
from nanoseek.model import kernels
from nanoseek.train.trainer import LossModule
llm = LLM({str(directory)!r}, dtype="bfloat16", kv_cache_memory="4MiB")
out = llm.generate([[5, 9, 13]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
model = nanoseek.load_model({str(directory)!r}).train()
ids = torch.randint(0, model.config.vocab_size, (2, 9))
main, _, _ = LossModule(model)(ids[:, :-1], ids[:, 1:], None, 0.0)
main.backward()
print(json.dumps([runtime.cpu().isa, kernels.status(), len(out.outputs[0].token_ids), str(llm.engine.model.dtype),
                  str(llm.engine.model.compute_dtype), bool(torch.isfinite(main))]))
"""
    out = _run(code, NANOSEEK_ISA="scalar")
    assert out.returncode == 0, out.stderr[-3000:]
    isa, status, tokens, weights, compute, finite = json.loads(out.stdout.splitlines()[-1])
    assert isa == "scalar" and all(s.startswith("not for this CPU") for s in status.values())
    assert (tokens, weights, compute, finite) == (4, "torch.bfloat16", "torch.float32", True)
    assert "nanoseek: --dtype bfloat16 on this CPU (scalar, no native bf16)" in out.stderr  # its one line
