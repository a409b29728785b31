#!/usr/bin/env bash
# On a GPU machine: the test suite, the demo and the benchmark, with logs and results in
# ${OUT:-gpu_out}. Run from the repository root. WHAT picks the steps, so that a run can be split
# over calls with a time limit each:
#   bash scripts/gpu_run.sh                       # suite demo bench
#   WHAT="gpu demo" bash scripts/gpu_run.sh      # only the gpu-marked tests ("cpu": the others)
#   WHAT=bench BENCH_ARGS="--seq-lens 8192 65536" bash scripts/gpu_run.sh
#   WHAT=train TRAIN_ARGS="--steps 600 --selection-grad" bash scripts/gpu_run.sh   # examples/train_lm.py
# To compare with fla, put fla-core (pure Python) on PYTHONPATH first, e.g. carried as a wheel and
# installed with `pip install --no-deps --target /tmp/site`.
set -uo pipefail
out=${OUT:-gpu_out}
what=" ${WHAT:-suite demo bench} "
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
# The tests: pytest-xdist workers share the one GPU (their time is mostly Inductor compiling on
# the CPU cores; the float64 references are chunked over queries, so side by side they stay
# within its memory). "suite" is README's GPU command: every test, gpu-marked or not.
run_tests() {  # name, marker expression
  timeout "${TEST_S:-570}" python3 -m pytest -q -p no:cacheprovider ${2:+-m "$2"} -n "${WORKERS:-12}" \
    --durations=25 -o log_level=WARNING tests 2>&1 | tee "$out/$1_tests.log" | tail -40
}
[[ $what == *" suite "* ]] && run_tests suite ""
[[ $what == *" gpu "* ]] && run_tests gpu gpu
[[ $what == *" cpu "* ]] && run_tests cpu "not gpu"
if [[ $what == *" demo "* ]]; then
  timeout 120 python3 -m nsa_flex 2>&1 | tee "$out/demo.log" | head -8
fi
if [[ $what == *" bench "* ]]; then
  timeout "${BENCH_S:-500}" python3 -m nsa_flex.bench --out "$out" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" | tail -45
fi
if [[ $what == *" train "* ]]; then  # not in the default run: the training example, both models
  timeout "${TRAIN_S:-560}" python3 examples/train_lm.py --out "$out/train" ${TRAIN_ARGS:-} 2>&1 \
    | tee "$out/train.log" | grep -E "final|step/s|tok/s" | tail -10
fi
