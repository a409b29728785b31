#!/usr/bin/env bash
# One call on a machine of 4 GPUs: tests, training runs, benchmarks and profiles side by side,
# one lane of work per GPU (timings never share a GPU with other work), logs in ${LOGS:-x4_out}
# and, packed, in $OUT/x4.tgz. Run from the repository root, with fla-core on PYTHONPATH for
# the fla rows. Each lane's steps run in turn with their own time limits.
set -uo pipefail
logs=${LOGS:-x4_out}
mkdir -p "$logs"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
TRAIN_COMMON=${TRAIN_COMMON:-"--seq-len 8192 --batch 4 --steps 600 --eval-every 100"}
lane() {  # lane GPU NAME COMMAND...: run on that GPU, log to $logs/NAME.log
  local gpu=$1 name=$2
  shift 2
  echo "[gpu $gpu] $name: start $(date +%T)"
  CUDA_VISIBLE_DEVICES=$gpu "$@" > "$logs/$name.log" 2>&1
  echo "[gpu $gpu] $name: rc=$? end $(date +%T)"
}
(
  lane 0 tests env OUT="$logs/tests" WHAT=gpu GPU_TEST_S=${GPU_TEST_S:-200} bash scripts/gpu_run.sh
  lane 0 decode timeout 150 python3 -m nsa_flex.bench --parts decode --seq-lens 8192 65536 --out "$logs/decode"
) &
(
  lane 1 train_nsa timeout 440 python3 examples/train_lm.py --attention nsa --time-limit 380 $TRAIN_COMMON --out "$logs/train_nsa"
  lane 1 profile timeout 130 python3 scripts/profile_selected.py 65536 --sweep --layer
) &
(
  lane 2 train_sdpa timeout 140 python3 examples/train_lm.py --attention sdpa --time-limit 100 $TRAIN_COMMON --out "$logs/train_sdpa"
  lane 2 train_sg timeout 360 python3 examples/train_lm.py --attention nsa --selection-grad --time-limit 300 $TRAIN_COMMON --out "$logs/train_sg"
) &
(
  lane 3 bench timeout 380 python3 -m nsa_flex.bench --parts selected layer full --seq-lens 8192 16384 32768 65536 --out "$logs/bench"
  lane 3 varlen timeout 150 python3 -m nsa_flex.bench --parts varlen --seq-lens 65536 --out "$logs/varlen"
) &
wait
logs_json=()
for r in train_nsa train_sdpa train_sg; do [[ -f $logs/$r/log.json ]] && logs_json+=("$logs/$r/log.json"); done
((${#logs_json[@]})) && python3 examples/train_lm.py --plot "${logs_json[@]}" --out "$logs/train" > "$logs/train_merged.log" 2>&1
grep -h -E "^\[|passed|failed" "$logs"/tests/gpu_tests_*.log | grep -E "passed|failed|error" | tail -12
grep -h -E "final val loss" "$logs/train_merged.log"
[[ -n ${OUT:-} ]] && tar czf "$OUT/x4.tgz" "$logs"
