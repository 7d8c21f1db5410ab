"""Mean +- std over seeds of the runs made by experiments/real_rationales.sh -> a markdown table.
    python experiments/summarize.py out-real/cqa"""
import json, statistics, sys
from pathlib import Path

rows = {}
root = Path(sys.argv[1] if len(sys.argv) > 1 else "out-real/cqa")
for d in sorted(root.glob("*-s*")):
    if not (d / "test.json").is_file():
        continue
    name, seed = d.name.rsplit("-s", 1)
    res, t = json.loads((d / "results.json").read_text()), json.loads((d / "test.json").read_text())
    metric = res["metric"]
    test = t["test"]["test"][metric] if t["test"] else float("nan")  # TEST=0: not evaluated
    rows.setdefault(name, []).append((int(seed), res["val"][metric], test, t["train_s"], t["test_s"]))
ms = lambda xs: "–" if any(x != x for x in xs) else f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}" if len(xs) > 1 \
    else f"{xs[0]:.3f}"  # x != x: NaN, a test split that was not evaluated (TEST=0)
print(f"| setting | seeds | val {metric} | test {metric} | per seed (val / test) | train s / test-eval s per run |")
print("|---|---|---|---|---|---|")
for name, rs in rows.items():
    per = ", ".join(f"s{s}: {v:.3f}" + (f" / {t:.3f}" if t == t else "") for s, v, t, *_ in sorted(rs))
    print(f"| {name} | {len(rs)} | {ms([r[1] for r in rs])} | {ms([r[2] for r in rs])} | {per} | "
          f"{statistics.mean(r[3] for r in rs):.0f} / {statistics.mean(r[4] for r in rs):.0f} |")
for name, rs in rows.items():  # paired by seed: same data order and head init for every setting of one seed
    ref = "pooled_lora" if name.endswith("_lora") else "pooled"  # LoRA runs against the LoRA baseline
    base = {s: (v, t) for s, v, t, *_ in rows.get(ref, [])}
    if name != ref and (pairs := [(v - base[s][0], t - base[s][1]) for s, v, t, *_ in rs if s in base]):
        print(f"\n{name} - {ref}, paired by seed (n={len(pairs)}): val {ms([p[0] for p in pairs])}, test {ms([p[1] for p in pairs])}",
              end="")
print()
t = {n: json.loads((root / f"{n}-s1" / "val_timing.json").read_text()) for n in ("pooled", "cot_only")
     if (root / f"{n}-s1" / "val_timing.json").is_file()}
if len(t) == 2:
    print(f"\nval evaluation wall time (model load included): pooled {t['pooled']['eval_s']} s, CoT decoding "
          f"{t['cot_only']['eval_s']} s -> {t['cot_only']['eval_s'] / max(t['pooled']['eval_s'], 1):.1f}x")
