#!/usr/bin/env bash
# One call on a GPU machine: the whole test suite (gpu tests first), the demo, and the benchmark.
# Logs and results go to ${OUT:-gpu_out}. Run from the repository root:
#   bash scripts/gpu_run.sh                  # everything
#   BENCH_ARGS="--seq-lens 8192 65536" bash scripts/gpu_run.sh
# If fla-core is to be compared, install its wheel first (it is pure Python): on a machine with no
# registry, carry it as a wheel and `pip install --no-deps` it into a folder on PYTHONPATH.
set -uo pipefail
out=${OUT:-gpu_out}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
# gpu tests alone first, so their summary line comes back even if time runs out later
timeout "${GPU_TEST_S:-420}" python3 -m pytest -q -p no:cacheprovider -m gpu tests/ -o log_level=WARNING 2>&1 \
  | tee "$out/gpu_tests.log" | grep -E "passed|failed|^FAILED|^E  .*Error" | tail -20
# the rest of the suite, spread over the CPU cores when pytest-xdist is there
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")
timeout "${CPU_TEST_S:-300}" python3 -m pytest -q -p no:cacheprovider -m "not gpu" $xdist tests/ -o log_level=WARNING 2>&1 \
  | tee "$out/cpu_tests.log" | grep -E "passed|failed|^FAILED" | tail -20
timeout 120 python3 -m nsa_flex 2>&1 | tee "$out/demo.log" | head -8
timeout "${BENCH_S:-900}" python3 -m nsa_flex.bench --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" | tail -45
