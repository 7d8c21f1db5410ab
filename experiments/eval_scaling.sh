#!/usr/bin/env bash
# The evaluation shared by the ranks, timed: the seconds --eval_only reports for its evaluation ("N val
# examples evaluated in S s"), 1 process vs torchrun with 2, 5 runs each, one thread a process.
#   python dhrd.py --out_dir=out-synth && bash experiments/eval_scaling.sh out-synth            # pooled
#   python dhrd.py --beta=0 --out_dir=out-cot && bash experiments/eval_scaling.sh out-cot --beta=0 --cot_tokens=64
set -uo pipefail
cd "$(dirname "$0")/.."
RUN=$1
shift
export OMP_NUM_THREADS=1
for n in 1 2; do
  launch=(python)
  [ "$n" = 2 ] && launch=(torchrun --standalone --nproc_per_node=2)
  ts=()
  for r in 1 2 3 4 5; do
    t=$("${launch[@]}" dhrd.py --init_from="$RUN" --eval_only=True --dtype=float32 "$@" 2>&1 >/dev/null |
        grep -o "evaluated in [0-9.]*" | grep -o "[0-9.]*$")
    ts+=("$t")
  done
  echo "procs=$n times=${ts[*]} median=$(printf '%s\n' "${ts[@]}" | sort -n | sed -n 3p)"
done
