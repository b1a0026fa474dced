#!/usr/bin/env bash
# The GPU tier in one call of the device machine (repo root there; ffchat is not
# installed, so three links stand in for the ffchat.kernels / .quantize / .profiles mapping):
#   1. the Triton backend against the reference engine (correctness first),
#   2. `ffchat bench` on the three benchmark shapes at the contexts of issue 6's bars, triton vs the
#      torch-compile baseline (the 8B against the roofline only),
#   3. every other GPU test (kernels vs their references, the baseline's correctness),
#   4. `ffchat run`'s loop with chained decode steps against one step a call (benchmarks/chain_ab.py), 1B and 0.5B.
# Each step has its own time cap so one slow step cannot eat the lease; logs and the
# bench JSON files go to $OUT (the device tool brings back at most 8 files).
# Usage: bash benchmarks/gpu_tier.sh [STEPS] with STEPS a subset of "tests bench kernels chains";
# BUDGET_S (default 540) bounds the whole script, so it ends inside one device call.
set -uo pipefail
started=$SECONDS
budget=${BUDGET_S:-540}
# cap SECONDS: the step's own cap, or what is left of the budget if that is less
cap() { local left=$((budget - (SECONDS - started))); echo $(( left < $1 ? (left > 1 ? left : 1) : $1 )); }
out=${OUT:-/tmp/ffchat-gpu}
mkdir -p "$out"
steps=${1:-tests bench kernels chains}
ln -sfn ../kernels ffchat/kernels
ln -sfn ../quantize ffchat/quantize
ln -sfn ../profiles ffchat/profiles
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 COLUMNS=160
log="$out/gpu_tier.log"

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee -a "$log"
if [[ $steps == *tests* ]]; then
  timeout "$(cap 240)" python3 -m pytest -m gpu tests/gpu/test_triton_backend_gpu.py tests/gpu/test_run_gpu.py -q -rA 2>&1 | tee -a "$log"
fi
if [[ $steps == *bench* ]]; then
  # issue 6's bars: 1B and 0.5B against the baseline at 128 / 512 / 4096 cached tokens (the 1B's latency bar
  # spans 128 to 4096), the 8B against the roofline at 512 and 4096 (its baseline is left out for time)
  for shape in llama-3.2-1b qwen2.5-0.5b llama-3.1-8b; do
    backends=triton,torch-compile contexts=128,512,4096
    [[ $shape == llama-3.1-8b ]] && backends=triton contexts=512,4096
    timeout "$(cap 150)" python3 -m ffchat bench --shape "$shape" --backends "$backends" \
      --contexts "$contexts" --json "$out/$shape.json" 2>&1 | tee -a "$log"
  done
fi
if [[ $steps == *kernels* ]]; then
  timeout "$(cap 200)" python3 -m pytest -m gpu tests/gpu -q --ignore tests/gpu/test_triton_backend_gpu.py --ignore tests/gpu/test_run_gpu.py 2>&1 \
    | tee -a "$log"
fi
if [[ $steps == *chains* ]]; then
  for shape in llama-3.2-1b qwen2.5-0.5b; do
    timeout "$(cap 120)" python3 benchmarks/chain_ab.py --shape "$shape" --json "$out/$shape.chain-ab.json" 2>&1 \
      | tee -a "$log"
  done
fi
