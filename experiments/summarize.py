"""Tables of the runs under one folder, from whatever has finished there
(a run counts once its test.json exists):
    python experiments/summarize.py experiments/results/esnli     # the budget experiment (esnli_budget.sh)
    python experiments/summarize.py out-real/esnli                # the 100-step grid (real_rationales.sh)
    python experiments/summarize.py experiments/results/esnli-lowdata   # the low-data experiment, per n
Each run is a folder <arm>-s<seed> with results.json, log.jsonl and test.json (the low-data experiment: one
folder n<n> of them per training-set size). Printed, as markdown:
  1. final: best val (the exported model) and test per arm, mean ± sample std over seeds, wall times;
  2. learning curves: val at every evaluation step per arm, and the paired difference to the baseline arm
     (pooled; pooled_lora for *_lora arms, pooled_mlp for *_mlp arms) at each step, seed by seed;
  3. gradient statistics (--grad_stats): backbone norms of beta L_cls and alpha L_lm and their cosine,
     averaged over the first and the last 50 steps; alpha=auto's chosen alpha;
  4. the pre-registered decision rule (README), applied to every DHRD arm that has a paired baseline; for the
     low-data experiment its own rule (experiments/README.md), on test-2k per n and arm."""
import json
import math
import statistics
import sys
from pathlib import Path


def ms(xs):
    """'mean ± std' over seeds ('–' when nothing, the value alone for one seed)."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"


def load(root):
    """{arm: {seed: run}};
    run = dict(metric, best, test, train_s, test_s, curve {iter: val}, train [lines])."""
    arms = {}
    for d in sorted(Path(root).glob("*-s*")):
        if not (d / "test.json").is_file():
            continue  # unfinished: not counted
        arm, seed = d.name.rsplit("-s", 1)
        res = json.loads((d / "results.json").read_text())
        t = json.loads((d / "test.json").read_text())
        metric = res["metric"]
        lines = [json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()]
        test = None
        if t["test"]:
            test = t["test"][next(k for k in t["test"] if k not in ("task", "split", "model"))]
        arms.setdefault(arm, {})[int(seed)] = dict(
            metric=metric, best=res["val"][metric], test=None if test is None else test[metric],
            train_s=t["train_s"], test_s=t["test_s"], cpu=t.get("cpu"),
            curve={line["iter"]: line["val"][metric] for line in lines if "val" in line},
            train=[line for line in lines if "loss" in line],
            auto=[line for line in lines if "alpha_auto" in line])
    # baselines first
    return dict(sorted(arms.items(), key=lambda kv: (not kv[0].startswith("pooled"), kv[0])))


def baseline_of(arm):
    for suffix in ("_lora", "_mlp"):
        if arm.endswith(suffix):
            return "pooled" + suffix
    return "pooled"


def final_table(arms):
    metric = next(iter(next(iter(arms.values())).values()))["metric"]
    print(f"| arm | seeds | best val {metric} | test {metric} | per seed (val / test) | train s / test s |")
    print("|---|---|---|---|---|---|")
    for arm, runs in arms.items():
        per = ", ".join(f"s{s}: {r['best']:.3f}" + (f" / {r['test']:.3f}" if r["test"] is not None else "")
                        for s, r in sorted(runs.items()))
        walls = f"{statistics.mean(r['train_s'] for r in runs.values()):.0f} / " \
                f"{statistics.mean(r['test_s'] for r in runs.values()):.0f}"
        print(f"| {arm} | {len(runs)} | {ms([r['best'] for r in runs.values()])} | "
              f"{ms([r['test'] for r in runs.values()])} | {per} | {walls} |")
    for arm, runs in arms.items():
        base = arms.get(baseline_of(arm))
        if arm == baseline_of(arm) or not base:
            continue
        seeds = sorted(set(runs) & set(base))
        if seeds:
            dv = [runs[s]["best"] - base[s]["best"] for s in seeds]
            dt = [runs[s]["test"] - base[s]["test"] for s in seeds if runs[s]["test"] is not None
                  and base[s]["test"] is not None]
            print(f"\n{arm} − {baseline_of(arm)}, paired by seed (n={len(seeds)}): "
                  f"best val {ms(dv)}, test {ms(dt)}", end="")
    print()


def curve_table(arms):
    steps = sorted({i for runs in arms.values() for r in runs.values() for i in r["curve"]})
    print("\n| arm | " + " | ".join(f"val @ {i}" for i in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for arm, runs in arms.items():
        cells = [ms([r["curve"].get(i) for r in runs.values()]) for i in steps]
        print(f"| {arm} | " + " | ".join(cells) + " |")
    for arm, runs in arms.items():
        base = arms.get(baseline_of(arm))
        if arm == baseline_of(arm) or not base:
            continue
        cells = []
        for i in steps:
            d = [runs[s]["curve"][i] - base[s]["curve"][i] for s in runs
                 if s in base and i in runs[s]["curve"] and i in base[s]["curve"]]
            cells.append(ms(d))
        print(f"| {arm} − {baseline_of(arm)} (paired) | " + " | ".join(cells) + " |")


def grad_table(arms, windows=(("1–50", 0, 50), ("351–400", 351, 400))):
    have = {arm: runs for arm, runs in arms.items()
            if any("grad_cls" in l for r in runs.values() for l in r["train"])}
    if not have:
        return
    print("\n| arm | alpha | steps | beta·‖∇L_cls‖ | alpha·‖∇L_lm‖ | ratio lm/cls | cosine |")
    print("|---|---|---|---|---|---|---|")
    for arm, runs in have.items():
        alphas = [r["auto"][0]["alpha_auto"] if r["auto"] else r["train"][0]["alpha"] for r in runs.values()]
        for name, lo, hi in windows:
            rows = [l for r in runs.values() for l in r["train"] if lo <= l["iter"] <= hi and "grad_cls" in l]
            if not rows:
                continue
            mean = lambda k: statistics.mean(l[k] for l in rows) if all(k in l for l in rows) else None
            g_cls, g_lm, cos = mean("grad_cls"), mean("grad_lm"), mean("grad_cos")
            ratio = "–"
            if g_lm is not None:
                ratio = f"{statistics.mean(l['grad_lm'] / l['grad_cls'] for l in rows):.2f}"
            g_lm_cell = "–" if g_lm is None else f"{g_lm:.2f}"
            cos_cell = "–" if cos is None else f"{cos:+.3f}"
            print(f"| {arm} | {ms(alphas)} | {name} | {g_cls:.2f} | {g_lm_cell} | {ratio} | {cos_cell} |")


def decision(arms):
    """The pre-registered rule (README, the budget experiment), on the val curves at steps 100, 300, 400: DHRD
    against its baseline, for the two pre-registered DHRD arms and, applied the same way afterwards, the MLP
    head's pair (dhrd_mlp against pooled_mlp)."""
    pairs = [(a, baseline_of(a)) for a in ("dhrd", "dhrd_auto", "dhrd_mlp")]
    pairs = [(a, b) for a, b in pairs if a in arms and b in arms]
    plateaued = {}
    for arm, base_arm in pairs:
        runs, base = arms[arm], arms[base_arm]
        if base_arm not in plateaued:  # once per baseline
            curves = [r["curve"] for r in base.values() if {300, 400} <= set(r["curve"])]
            gains = [c[400] - c[300] for c in curves]
            plateaued[base_arm] = bool(gains) and statistics.mean(gains) < 0.01
            trend = "plateaued" if plateaued[base_arm] else "still improving"
            print(f"\n{base_arm}: gain from step 300 to 400: {ms(gains)} -> {trend}")
        plateau = plateaued[base_arm]
        seeds = [s for s in runs if s in base and {100, 400} <= set(runs[s]["curve"]) & set(base[s]["curve"])]
        if len(seeds) < 3:
            print(f"{arm}: {len(seeds)} paired seed(s) of the 3 the rule needs: undecided")
            continue
        gap = {s: {i: base[s]["curve"][i] - runs[s]["curve"][i] for i in (100, 400)} for s in seeds}
        real = plateau and all(g[400] >= 0.03 for g in gap.values())
        artifact = all(g[400] < g[100] and g[400] < 0.03 for g in gap.values())
        verdict = "undecided"
        if real:
            verdict = "real finding of this regime"
        elif artifact:
            verdict = "budget artifact"
        per = ", ".join(f"s{s}: {g[100]:+.3f} -> {g[400]:+.3f}" for s, g in sorted(gap.items()))
        print(f"{arm}: gap ({base_arm} − {arm}) at step 100 -> 400: {per} => {verdict}")


def t_sf2(t, df):
    """Two-sided p of Student's t with df degrees of freedom: I_x(df/2, 1/2), x = df / (df + t^2), the
    regularized incomplete beta by its continued fraction (Lentz's method)."""
    x = df / (df + t * t)
    a, b = df / 2, 0.5
    if x >= 1:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below this: I_x(a,b) = 1 - I_1-x(b,a)
        return 1.0 - _beta_fraction(1 - x, b, a) * front / b
    return _beta_fraction(x, a, b) * front / a


def _beta_fraction(x, a, b, tiny=1e-300):
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return f


def t_quantile(q, df):
    """The q-quantile (q > 0.5) of Student's t, by bisection on t_sf2."""
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_sf2(mid, df) / 2 > 1 - q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


LOWDATA_SEEDS = 5  # the pre-registered number of seeds per arm and n


def lowdata_decision(arms, baseline="pooled"):
    """The low-data rule (experiments/README.md), on test-2k paired over the seeds: gain if mean d > 0 and a
    two-sided paired t-test gives p < 0.05, or every d > 0; loss symmetrically; else no difference at this
    resolution, with the smallest difference the design detects (80% power, alpha 0.05)."""
    base = arms.get(baseline)
    for arm, runs in arms.items():
        if arm == baseline or base is None:
            continue
        seeds = sorted(s for s in runs
                       if s in base and runs[s]["test"] is not None and base[s]["test"] is not None)
        d = [runs[s]["test"] - base[s]["test"] for s in seeds]
        per = ", ".join(f"s{s}: {x:+.4f}" for s, x in zip(seeds, d))
        if len(d) < LOWDATA_SEEDS:
            print(f"{arm} − {baseline}: {len(d)} of the {LOWDATA_SEEDS} paired seeds ({per}): "
                  "undecided so far")
            continue
        k = len(d)
        mean = statistics.mean(d)
        sd = statistics.stdev(d)
        t = mean / (sd / math.sqrt(k)) if sd > 0 else math.copysign(math.inf, mean)
        p = t_sf2(t, k - 1) if math.isfinite(t) else 0.0
        mde = (t_quantile(0.975, k - 1) + t_quantile(0.80, k - 1)) * sd / math.sqrt(k)
        verdict = f"no difference at this resolution (the design detects {mde:.3f} and larger)"
        if mean > 0 and (p < 0.05 or all(x > 0 for x in d)):
            verdict = "gain"
        if mean < 0 and (p < 0.05 or all(x < 0 for x in d)):
            verdict = "loss"
        print(f"{arm} − {baseline} on test-2k, paired ({per}): mean {mean:+.4f} ± {sd:.4f}, t = {t:+.2f}, "
              f"p = {p:.3f} => {verdict}")


def lowdata(root):
    """The low-data experiment: per n, the tables and the rule; the pilot that fixed the epochs first."""
    for folder in sorted(Path(root).glob("n*"), key=lambda p: int(p.name[1:])):
        print(f"\n## n = {folder.name[1:]}\n")
        epochs = folder / "pilot" / "epochs.json"
        if epochs.exists():
            e = json.loads(epochs.read_text())
            print(f"pilot (pooled, seed 101, {e['P']} epochs of {e['steps_per_epoch']} steps): val per epoch "
                  + ", ".join(f"{v:.3f}" for v in e["val"]) + f" -> E = {e['E']} epochs\n")
        arms = load(folder)
        if not arms:
            print("no finished run yet")
            continue
        final_table(arms)
        curve_table(arms)
        last = max(l["iter"] for runs in arms.values() for r in runs.values() for l in r["train"])
        grad_table(arms, (("1–50", 0, 50), (f"{last - 49}–{last}", last - 49, last)))
        print()
        lowdata_decision(arms)
        if {"dhrd_human", "dhrd_palm"} <= set(arms):  # beside the rule, not part of it
            human, palm = arms["dhrd_human"], arms["dhrd_palm"]
            d = [human[s]["test"] - palm[s]["test"] for s in sorted(set(human) & set(palm))]
            if len(d) > 1:
                t = statistics.mean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
                print(f"(not part of the rule) dhrd_human − dhrd_palm on test-2k, {len(d)} paired seeds: "
                      f"{ms(d)}, t = {t:+.2f}, p = {t_sf2(t, len(d) - 1):.3f}")


def main(root):
    if any(Path(root).glob("n*/")):
        return lowdata(root)
    arms = load(root)
    if not arms:
        sys.exit(f"summarize.py: no finished run (a folder <arm>-s<seed> with test.json) under {root}")
    final_table(arms)
    curve_table(arms)
    grad_table(arms)
    decision(arms)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/esnli")
