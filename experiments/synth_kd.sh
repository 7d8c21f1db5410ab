#!/usr/bin/env bash
# Does soft-target distillation of the reasoning head (--kd_teacher, paper App. F future work) help a small
# student on synth? A larger scratch teacher is trained with DHRD once; then the same small student, seeds 1-3,
# without and with the teacher's soft targets (one setting, fixed before the runs: kd_coef 1, T 2); everything
# else equal. Every finished run leaves config.json, log.jsonl, results.json and test.json (the exported
# best-on-val model on the test split, and the wall time) in
#   experiments/results/synth-kd/<run>/        (small; committed)
# and its model in out-kd/ (never committed). Finished runs are skipped, so the script can be re-run.
# OMP_NUM_THREADS=1: on the shared 2-core VM (other jobs running), two OpenMP threads per process oversubscribe
# the cores; the teacher's step went 2716 -> 456 ms/it with one thread.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SEEDS=${SEEDS:-"1 2 3"}
RES=experiments/results/synth-kd
OUT=${OUT:-out-kd}
TEACHER=(--n_layer=4 --n_embd=256 --lm_targets=rationale --seed=1337)
STUDENT=(--n_layer=2 --n_embd=128 --lm_targets=rationale)
KD=(--kd_teacher="$OUT/teacher" --kd_coef=1 --kd_temperature=2)
run() {  # name, then dhrd.py flags: train, then evaluate the exported (best-on-val) model on the test split
  local name=$1 out="$OUT/$1" res="$RES/$1"
  shift
  [ -f "$res/test.json" ] && return
  mkdir -p "$res"
  local t0=$SECONDS
  python dhrd.py "$@" --out_dir="$out" > "$res/train.out" 2>&1
  local train_s=$((SECONDS - t0))
  python dhrd.py --init_from="$out" --eval_only=True --eval_split=test > "$res/test.out" 2>> "$res/train.out"
  cp "$out/config.json" "$out/log.jsonl" "$out/results.json" "$res/"
  echo "{\"train_s\": $train_s, \"cpu\": \"$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)\"," \
       "\"test\": $(tail -1 "$res/test.out")}" > "$res/test.json"
  rm "$res/train.out" "$res/test.out"
  echo "finished $name in $((SECONDS - t0)) s"
}
run teacher "${TEACHER[@]}"
for seed in $SEEDS; do
  run "student-s$seed" "${STUDENT[@]}" --seed="$seed"
  run "student-kd-s$seed" "${STUDENT[@]}" "${KD[@]}" --seed="$seed"
done
