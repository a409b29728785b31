#!/usr/bin/env bash
# On a GPU machine: the test suite (gpu tests first), the demo and the benchmark, with logs and
# results in ${OUT:-gpu_out}. Run from the repository root. WHAT picks the steps, so that a run
# can be split over calls with a time limit each:
#   bash scripts/gpu_run.sh                       # gpu cpu demo bench
#   WHAT="gpu demo" bash scripts/gpu_run.sh      # gpu tests in parallel groups (GPU_TEST_S each)
#   WHAT=bench BENCH_ARGS="--seq-lens 8192 65536" bash scripts/gpu_run.sh
#   WHAT=train TRAIN_ARGS="--steps 600 --selection-grad" bash scripts/gpu_run.sh   # examples/train_lm.py
# To compare with fla, put fla-core (pure Python) on PYTHONPATH first, e.g. carried as a wheel and
# installed with `pip install --no-deps --target /tmp/site`.
set -uo pipefail
out=${OUT:-gpu_out}
what=" ${WHAT:-gpu cpu demo bench} "
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
if [[ $what == *" gpu "* ]]; then
  # The gpu tests in parallel processes on the one GPU (their time is mostly Inductor compiling
  # on the CPU cores), in two waves so that the float64 references of the largest tests never
  # run side by side (together they once ran out of the H200's memory). Each group logs to
  # gpu_tests_N.log and prints its summary line.
  wave1=(
    "tests/test_gpu.py -k flex_forward_backward and fp32"
    "tests/test_gpu.py -k flex_forward_backward and bf16"
    "tests/test_gpu_triton.py"
  )
  wave2=("tests/test_gpu.py -k not flex_forward_backward")
  for f in tests/test_gpu_*.py; do [[ $f == tests/test_gpu_triton.py ]] || wave2+=("$f"); done
  n=0
  run_group() {
    local g=$1 n=$2 file=${1%% -k *} filter=""
    [[ $g == *" -k "* ]] && filter=${g#* -k }
    timeout "${GPU_TEST_S:-400}" python3 -m pytest -q -p no:cacheprovider -m gpu -o log_level=WARNING \
      "$file" ${filter:+-k "$filter"} > "$out/gpu_tests_$n.log" 2>&1
    echo "[$g] $(grep -E "passed|failed|error" "$out/gpu_tests_$n.log" | tail -1)"
  }
  for g in "${wave1[@]}"; do n=$((n + 1)); run_group "$g" $n & done
  wait
  for g in "${wave2[@]}"; do n=$((n + 1)); run_group "$g" $n & done
  wait
  grep -h -E "^FAILED|^ERROR" "$out"/gpu_tests_*.log | head -20
fi
if [[ $what == *" cpu "* ]]; then  # the rest of the suite, over the CPU cores when pytest-xdist is there
  xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 12")
  timeout "${CPU_TEST_S:-300}" python3 -m pytest -q -p no:cacheprovider -m "not gpu" $xdist tests/ -o log_level=WARNING 2>&1 \
    | tee "$out/cpu_tests.log" | grep -E "passed|failed|^FAILED" | tail -20
fi
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
