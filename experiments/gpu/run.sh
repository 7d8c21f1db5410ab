#!/usr/bin/env bash
# The one prepared GPU session (README, bench.py section "On a GPU"), in order, under one budget of 9.5 minutes:
#   1. the machine: nvidia-smi, python, torch, transformers, peft versions;
#   2. python -m pytest -q test_dhrd.py -k cuda (test_dhrd.py's cuda section);
#   3. bench.py on each shape, at the paper's CoT protocol (App. E.6: 500 new tokens, T=0.1, top_p=0.7); gpt2
#      and llama-3.1-8b decode through the compiled step (--cot_compile=True: CUDA graphs), the others eager;
#   4. experiments/bench_hf.py (transformers) on the same shapes and settings;
#   5. experiments/gpu/summarize.py: the README tables (summary.md).
# Each step runs under its own `timeout`, capped by what is left of the budget; a failed or timed-out step
# is logged and the next one runs. The device tool returns at most 8 files from $OUT, so $OUT holds three:
# run.log (this log), results.tar.gz (every JSON and step log, repacked after each step), summary.md.
#   bash experiments/gpu/run.sh                              # on the GPU machine, in the repo root
#   DEVICE=cpu PY_HF=path/to/venv/bin/python bash experiments/gpu/run.sh     # CPU dry run, tiny shapes
# Settings (environment): OUT (./gpu-out), DEVICE (cuda | cpu), SHAPES (cuda: the five below; cpu: tiny ones),
# PY (python3), PY_HF (the python with transformers and peft: $PY), TEST_DEVICE (DHRD_TEST_DEVICE: $DEVICE),
# BUDGET (seconds for the whole script: 560; the device tool stops a command at 600).
#
# Settings of the measurements (the paper states no batch sizes or input lengths, Table 5):
#   pooled: batch 32 x 256 tokens; CoT: batch 8, a 128-token prompt + 500 new tokens; bf16.
#   gpt2: full fine-tuning step 16 x 1024 tokens (llm.c's sequence length; its GPT-2 124M reaches ~60 % MFU
#     on an H100), --compile=True for dhrd and transformers alike (12 small layers: launch-bound eager).
#   3B-8B: LoRA r=16 step (App. E.4; an 8B model's full fine-tuning needs ~128 GB for fp32 weights + AdamW),
#     8 x 512 tokens, eager: compiling a 28-36-layer model takes longer than its whole step here, and its
#     large matmuls leave little for fusion; --repeats=1 after one warm-up (a 500-token decode is itself an
#     average over 500 steps); --greedy=False for transformers (one decode per figure, as bench.py).
# Time (estimates for an H200: ~790 TFLOP/s bf16 measured on this workplace's, 4.8 TB/s HBM, 67 TFLOP/s fp32):
#   pytest -k cuda ~140 s: parity, decoding, loss ~15 s; the torchrun run and the recompilation test are
#     mostly inductor compiles of the tiny model (~40 s each); the compiled generate on two tiny models ~40 s;
#     bench.py on a tiny Llama ~10 s.
#   bench.py, 8B: start + build on the GPU ~10 s; fp32 agreement batch 2N x 8192 tokens = 0.13 PFLOP at
#     ~60 TFLOP/s ~2 s; pooled call 0.13 PFLOP at ~600 TFLOP/s ~0.2 s; CoT: each token reads the 16 GB of
#     weights (3.4 ms at 4.8 TB/s) and launches ~800 kernels (~5 ms eager) -> ~4 s per 500 tokens, ~5 s with
#     the warm-up, as much again at batch 1; LoRA step 4N x 4096 tokens = 0.13 PFLOP ~0.4 s; the limits (4 GiB
#     read and copy, the GEMM shapes) ~2 s; in all ~30 s (3B/4B: ~25 s). The compiled decode step of the 8B
#     (one graph of 32 layers, then CUDA graphs; batch 1 skipped) ~60-90 s more. gpt2: two compiled graphs
#     ~40 s, two compiled decode steps (batch 8, batch 1) ~40 s, the rest ~15 s.
#   bench_hf.py, 8B: import ~10 s, two models built ~5 s, generate ~20 ms a token eager -> ~10 s per 500
#     tokens (+ warm-up); in all ~35 s (3B/4B ~30 s); gpt2 compiled ~50 s.
#   Sum ~550 s; each step's cap below is ~1.5-2x its estimate (the compiled ones less), and the budget bounds
#   the whole: the shapes run by priority, so what a slow compile costs is a late transformers figure.
set -u
cd "$(dirname "$0")/../.." || exit 1
OUT=${OUT:-./gpu-out}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
PY_HF=${PY_HF:-$PY}
TEST_DEVICE=${TEST_DEVICE:-$DEVICE}
BUDGET=${BUDGET:-560}
if [[ $DEVICE == cuda* ]]; then
    SHAPES=${SHAPES:-"gpt2 llama-3.1-8b llama-3.2-3b qwen3-4b qwen3-8b"}  # by priority: a late step may be skipped
else
    SHAPES=${SHAPES:-"gpt2-tiny llama-tiny qwen3-tiny"}
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET - 15))  # 15 s kept for the summary and the last archive
mkdir -p "$OUT"
WORK=$(mktemp -d)
LOG="$OUT/run.log"
: > "$LOG"
export PYTHONUNBUFFERED=1

log() {
    echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"
}

pack() {  # every result so far in one archive, replaced whole (a kill mid-way leaves the previous one)
    cp "$LOG" "$WORK/run.log"
    tar -czf "$OUT/results.tar.gz.part" -C "$WORK" . && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}

step() {  # step NAME CAP CMD...: CMD under `timeout`, min(CAP, seconds left); its output in NAME.log
    local name=$1
    local cap=$2
    shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    if (( left < 20 )); then
        log "$name: skipped, ${left}s of the budget left"
        return
    fi
    local limit=$(( cap < left ? cap : left ))
    local t0
    t0=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    local note=""
    if (( rc == 124 || rc == 137 )); then
        note=" (timed out)"
    fi
    log "$name: rc=$rc$note in $(( $(date +%s) - t0 ))s (limit ${limit}s)"
    if (( rc != 0 )); then
        tail -n 8 "$WORK/$name.log" | sed 's/^/    /' | tee -a "$LOG"
    fi
    pack
}

environment() {  # each probe under its own timeout: a missing or hung tool costs seconds, not the run
    timeout 20 nvidia-smi || echo "nvidia-smi: not available"
    timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    timeout 60 $PY -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "available", torch.cuda.is_available())'
    timeout 60 $PY_HF -c 'import transformers, peft; print("transformers", transformers.__version__,
"peft", peft.__version__)'
    timeout 60 $PY -c 'import tiktoken, numpy, pytest; print("tiktoken", tiktoken.__version__,
"numpy", numpy.__version__, "pytest", pytest.__version__)'
    echo "cpus $(nproc)"
}

flags() {  # flags SHAPE: the settings of both scripts for that shape (header above)
    local shape=$1
    local lora=16
    if [[ $DEVICE == cuda* ]]; then
        echo -n "--device=$DEVICE --dtype=bfloat16 --batch_size=32 --seq_len=256"
        echo -n " --cot_batch_size=8 --cot_prompt_len=128 --cot_tokens=500"
        if [[ $shape == gpt2* ]]; then
            echo -n " --train_batch_size=16 --train_seq_len=1024 --compile=True --cot_compile=True"
            echo " --agree_batches=2 --repeats=3"
            return
        fi
        echo -n " --train_batch_size=8 --train_seq_len=512 --agree_batches=1 --repeats=1"
        if [[ $shape == llama-3.1-8b ]]; then
            echo -n " --cot_compile=True --cot_batch1=False"
        fi
    else  # the dry run: tiny sizes, the same code paths
        lora=4
        echo -n "--device=$DEVICE --batch_size=4 --seq_len=16 --cot_batch_size=2 --cot_prompt_len=8"
        echo -n " --cot_tokens=8 --train_batch_size=2 --train_seq_len=32 --agree_batches=1 --warmup=1"
        echo -n " --repeats=1 --mem_vocab=512 --mem_seq_len=64"
        if [[ $shape == gpt2* ]]; then
            echo " --cot_compile=True"  # the compiled decode step on the CPU (inductor, no CUDA graphs)
            return
        fi
    fi
    echo " --train_lora_rank=$lora"
}

cap() {  # cap SCRIPT SHAPE: seconds for one run (the estimates above, with room)
    if [[ $DEVICE != cuda* ]]; then
        echo 120
        return
    fi
    case "$1:$2" in
        bench:gpt2) echo 130 ;;
        hf:gpt2) echo 90 ;;
        bench:llama-3.1-8b) echo 130 ;;
        bench:*8b) echo 60 ;;
        bench:*) echo 50 ;;
        hf:*8b) echo 80 ;;
        hf:*) echo 70 ;;
    esac
}

log "run.sh: DEVICE=$DEVICE SHAPES='$SHAPES' BUDGET=${BUDGET}s OUT=$OUT"
environment > "$WORK/environment.log" 2>&1
cat "$WORK/environment.log" >> "$LOG"
log "environment: done"
step pytest_cuda 200 env DHRD_TEST_DEVICE="$TEST_DEVICE" \
    $PY -m pytest -q -p no:cacheprovider test_dhrd.py -k cuda -rs
tail -n 3 "$WORK/pytest_cuda.log" >> "$LOG"
for shape in $SHAPES; do
    name=${shape//\//_}  # facebook/opt-125m -> facebook_opt-125m
    # shellcheck disable=SC2046  # the flags are words
    step "bench_$name" "$(cap bench "$shape")" $PY bench.py --init_from="$shape" $(flags "$shape") \
        --out="$WORK/bench_$name.json"
done
for shape in $SHAPES; do
    name=${shape//\//_}
    # shellcheck disable=SC2046
    step "hf_$name" "$(cap hf "$shape")" $PY_HF experiments/bench_hf.py --init_from="$shape" \
        $(flags "$shape") --greedy=False --out="$WORK/hf_$name.json"
done
$PY experiments/gpu/summarize.py "$WORK" > "$OUT/summary.md" 2>> "$LOG"
cp "$OUT/summary.md" "$WORK/summary.md"
cat "$OUT/summary.md" >> "$LOG"
log "run.sh: done"
pack
rm -rf "$WORK"
