"""Process-wide CPU runtime settings applied when nanoseek is imported (nanoseek/cpu_runtime.py)."""

import os
import subprocess
import sys

PROBE = ("import os, nanoseek; print(nanoseek.cpu_runtime.configure(), os.environ.get('THP_MEM_ALLOC_ENABLE'), "
         "os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))")


def _probe(**env):
    clean = {k: v for k, v in os.environ.items()
             if k not in ("THP_MEM_ALLOC_ENABLE", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "NANOSEEK_CPU_RUNTIME")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True)
    return out.stdout.split()


def test_importing_nanoseek_applies_the_settings():
    applied, thp, cache = _probe()
    assert thp == "1" and cache == "16384"
    assert applied == ("True" if sys.platform.startswith("linux") else "False")


def test_the_user_s_own_values_win_and_the_switch_turns_it_all_off():
    assert _probe(ONEDNN_PRIMITIVE_CACHE_CAPACITY="64")[2] == "64"
    assert _probe(NANOSEEK_CPU_RUNTIME="0") == ["False", "None", "None"]
