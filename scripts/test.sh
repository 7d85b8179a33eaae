#!/usr/bin/env bash
# The test command: set up if needed, then run the whole suite on this CPU's own ISA level and, on a CPU above
# AVX2, the ISA-sensitive tests (kernels, engine, GRPO, the smoke speedrun) a second time under the AVX2 ceiling
# (NANOSEEK_ISA=avx2: nanoseek, torch and oneDNN all behave as on an AVX2-only CPU), so AVX2 breakage is caught
# on any machine. Arguments are passed to pytest and run once, without the second pass.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The web chat page is tested in headless Chromium: Debian's package, never a browser download.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
    ($SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; the web chat test will be skipped" >&2
fi
if [ "$#" -gt 0 ]; then
    exec .venv/bin/python -m pytest "$@"
fi
.venv/bin/python -m pytest
native=$(.venv/bin/python -c "from nanoseek import runtime; print(runtime.cpu().native_isa)")
case "$native" in
    avx512|avx512_bf16|amx)
        echo "== the ISA-sensitive tests again under the AVX2 ceiling (this CPU: $native) =="
        NANOSEEK_ISA=avx2 .venv/bin/python -m pytest tests/test_runtime.py tests/test_cpu_kernels.py tests/test_quant.py tests/test_speculative.py \
            tests/test_train_kernels.py tests/test_engine.py tests/test_grpo.py tests/test_speedrun.py ;;
    *) echo "== this CPU is $native: the suite above already ran on it, no AVX2 pass needed ==" ;;
esac
