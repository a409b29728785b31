#!/usr/bin/env bash
# On a GPU machine: the benchmark rows of issue 16 (speed: the layer and full attention at each
# shape) and issue 19 (varlen: packed documents, three mixes), with flash_nsa and fla as
# contenders when importable. One process per stage, shape and length, each timing every
# contender of its parts on the same inputs; the processes are spread over the GPUs (one at a
# time on each), then each stage's results are merged into one table and plot. Run from the
# repository root; results under ${OUT:-gpu_bench_out}:
#   $OUT/<stage>/<shape>_<T>/{results.json,times.png,bench.log}, merged in $OUT/<stage>_all/
#   (table.txt, results.json, times.png).
#
#   bash scripts/gpu_bench.sh                                  # both stages, every shape
#   WHAT=speed SHAPES="reference small" bash scripts/gpu_bench.sh
#   WHAT=varlen SHAPES=gqa4-d128 MIXES="short long" bash scripts/gpu_bench.sh
#
# flash_nsa: nothing is copied here. PEERS names a folder holding flash_nsa/ (default peers/ in
# the checkout: a copy of ../shared/peers, which .gitignore ignores, carried to the GPU
# machine); it goes on PYTHONPATH. Without it the flash_nsa rows say "skipped". The bench
# replaces its window branch (flash-attn, absent there) by a compiled FlexAttention window and
# brings its own pkg_resources shim if setuptools lacks one.
# fla: put fla-core (pure Python) on PYTHONPATH first, e.g. installed with
# `pip install --no-deps --target /tmp/site` from a carried wheel.
#
# Settings (environment):
#   WHAT         stages, "speed varlen" by default
#   SHAPES       "reference gqa4-d128 gqa4-d64 small" by default
#   LENS         the speed stage's lengths for every shape (default per shape, below)
#   VARLEN_LENS  the varlen stage's row lengths for every shape (default per shape, below)
#   SPEED_PARTS  "layer full" by default (add "selected" for the selected branch alone)
#   MIXES        the varlen stage's document mixes, "short mix long" by default
#   GPUS         GPU indices to use, e.g. "0 1" (default: every GPU nvidia-smi lists)
#   BENCH_S      time limit of each process in seconds (default 540)
set -uo pipefail
out=${OUT:-gpu_bench_out}
what=" ${WHAT:-speed varlen} "
shapes=${SHAPES:-reference gqa4-d128 gqa4-d64 small}
bench_s=${BENCH_S:-540}
mkdir -p "$out"
peers=${PEERS:-peers}
if [[ -d $peers/flash_nsa ]]; then
  peers=$(cd "$peers" && pwd)
  export PYTHONPATH=.:$peers${PYTHONPATH:+:$PYTHONPATH}
else
  echo "no $peers/flash_nsa: the flash_nsa rows will be skipped"
  export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
python3 -c "
from nsa_flex.bench.peers import import_flash_nsa
from nsa_flex.bench.timing import _fla
module, why = import_flash_nsa()
print('flash_nsa:', module.__file__ if module else why)
print('fla:', 'importable' if _fla() else 'not importable')" | tee -a "$out/versions.txt"

# The lengths of the issues' tables: issue 16 times the reference shape at 8k..64k, the GQA-4
# shapes at its targets' 32k and 64k, the small shape at 8k and 32k; issue 19 packs 64k tokens
# (the small shape: 4 rows of 16k).
speed_lens() {
  case $1 in
    reference) echo "8192 16384 32768 65536" ;;
    small) echo "8192 32768" ;;
    *) echo "32768 65536" ;;
  esac
}
varlen_lens() {
  case $1 in
    small) echo 16384 ;;
    *) echo 65536 ;;
  esac
}

jobs=()  # stage/shape/T, longest first within each stage so the lanes end together
for shape in $shapes; do
  if [[ $what == *" speed "* ]]; then
    for T in ${LENS:-$(speed_lens "$shape")}; do jobs+=("speed/$shape/$T"); done
  fi
  if [[ $what == *" varlen "* ]]; then
    for T in ${VARLEN_LENS:-$(varlen_lens "$shape")}; do jobs+=("varlen/$shape/$T"); done
  fi
done
((${#jobs[@]})) || { echo "nothing to run: WHAT=$what SHAPES=$shapes"; exit 2; }
mapfile -t jobs < <(printf '%s\n' "${jobs[@]}" | sort -t/ -k1,1r -k3,3nr)
gpus=(${GPUS:-$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || echo 0)})
echo "${#jobs[@]} runs on GPUs ${gpus[*]}: ${jobs[*]}"

run() {  # run GPU STAGE/SHAPE/T: one bench process on that GPU, with a time limit
  local gpu=$1 stage shape T dir parts
  IFS=/ read -r stage shape T <<< "$2"
  dir=$out/$stage/${shape}_$T
  mkdir -p "$dir"
  if [[ $stage == speed ]]; then
    parts=(--parts ${SPEED_PARTS:-layer full})
  else
    parts=(--parts varlen --doc-mix ${MIXES:-short mix long})
  fi
  echo "[gpu $gpu] $stage $shape T=$T: start $(date +%T)"
  # USR1 first: the bench prints where it is (faulthandler); results.json holds every finished part
  CUDA_VISIBLE_DEVICES=$gpu timeout -s USR1 -k 15 "$bench_s" \
    python3 -m nsa_flex.bench --shapes "$shape" --seq-lens "$T" "${parts[@]}" --out "$dir" > "$dir/bench.log" 2>&1
  echo "[gpu $gpu] $stage $shape T=$T: rc=$? end $(date +%T)"
}
lane() {  # lane GPU JOB...: the jobs one after another on that GPU
  local gpu=$1
  shift
  for job in "$@"; do run "$gpu" "$job"; done
}
for i in "${!gpus[@]}"; do
  mine=()
  for j in "${!jobs[@]}"; do ((j % ${#gpus[@]} == i)) && mine+=("${jobs[j]}"); done
  ((${#mine[@]})) && lane "${gpus[i]}" "${mine[@]}" &
done
wait

for stage in speed varlen; do
  files=("$out/$stage"/*/results.json)
  [[ -f ${files[0]} ]] || continue
  mkdir -p "$out/${stage}_all"
  python3 -m nsa_flex.bench --merge "${files[@]}" --out "$out/${stage}_all" > "$out/${stage}_all/table.txt" 2>&1
  echo "== $stage"
  cat "$out/${stage}_all/table.txt"
done
grep -l Traceback "$out"/*/*/bench.log 2>/dev/null | sed 's/^/a traceback in: /'
