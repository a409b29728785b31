#!/usr/bin/env bash
# One call on a machine of 2 or 4 GPUs: the gpu tests, the benchmarks, a profile and the training
# runs side by side, one lane of work per GPU. Timings (bench, profile, training) each get a GPU
# of their own while they run; tests share GPUs. Logs in ${LOGS:-x4_out}, packed into
# $OUT/x4.tgz. Run from the repository root, with fla-core on PYTHONPATH for the fla rows.
#   LOGS=/tmp/x4 bash scripts/gpu_x4.sh
set -uo pipefail
logs=${LOGS:-x4_out}
mkdir -p "$logs/tests"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$logs/versions.txt"
TRAIN_COMMON=${TRAIN_COMMON:-"--seq-len 8192 --batch 4 --steps 600 --eval-every 100"}
lane() {  # lane GPU NAME SECONDS COMMAND...: run on that GPU with a time limit, log to $logs/NAME.log
  local gpu=$1 name=$2 limit=$3
  shift 3
  echo "[gpu $gpu] $name: start $(date +%T)"
  # USR1 first: the bench and pytest's faulthandler print where they are; then the kill
  CUDA_VISIBLE_DEVICES=$gpu timeout -s USR1 -k 15 "$limit" "$@" > "$logs/$name.log" 2>&1
  echo "[gpu $gpu] $name: rc=$? end $(date +%T)"
}
pytest_group() {  # pytest_group GPU NAME SECONDS ARGS...: a gpu-test group, its summary line echoed
  local gpu=$1 name=$2 limit=$3
  shift 3
  lane "$gpu" "tests/$name" "$limit" python3 -m pytest -q -p no:cacheprovider -m gpu -o log_level=WARNING \
    -o faulthandler_timeout=$((limit - 20)) "$@"
  echo "[tests $name] $(grep -E "passed|failed|error" "$logs/tests/$name.log" | tail -1)"
}
(
  # the whole GPU suite, in groups side by side on one GPU; then two benchmark lengths
  pytest_group 0 gpu 400 tests/test_gpu.py &
  pytest_group 0 cache 300 tests/test_gpu_cache.py &
  pytest_group 0 triton 300 tests/test_gpu_triton.py &
  pytest_group 0 compile 300 tests/test_gpu_compile.py &
  pytest_group 0 varlen 400 tests/test_gpu_varlen.py &
  TORCH_LOGS=recompiles pytest_group 0 compile_lengths 400 -s tests/test_gpu_compile_lengths.py &
  wait
  lane 0 bench_8k 120 python3 -m nsa_flex.bench --seq-lens 8192 --out "$logs/bench_8k"
  lane 0 bench_16k 120 python3 -m nsa_flex.bench --seq-lens 16384 --out "$logs/bench_16k"
) &
(
  # benchmarks alone on their GPU: each length is one process timing every contender
  lane 1 bench_64k 320 python3 -m nsa_flex.bench --seq-lens 65536 --out "$logs/bench_64k"
  lane 1 bench_32k 200 python3 -m nsa_flex.bench --seq-lens 32768 --out "$logs/bench_32k"
) &
wait
logs_json=()
for r in train_nsa train_sdpa train_sg; do [[ -f $logs/$r/log.json ]] && logs_json+=("$logs/$r/log.json"); done
((${#logs_json[@]})) && python3 examples/train_lm.py --plot "${logs_json[@]}" --out "$logs/train" > "$logs/train_merged.log" 2>&1
cat "$logs/train_merged.log" 2>/dev/null
grep -h -E "^FAILED|^ERROR" "$logs"/tests/*.log | head -20
[[ -n ${OUT:-} ]] && tar czf "$OUT/x4.tgz" "$logs"
