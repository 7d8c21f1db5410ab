"""The experiments' plots, from the committed runs (needs matplotlib; never imported by the project):
    python experiments/plot.py            # writes the PNGs next to the runs, under experiments/results/
- esnli/curves.png, esnli/test.png: the budget experiment's val curves (mean ± sd over seeds per arm) and its
  test-2k accuracy per arm with every seed as a point;
- esnli-lowdata/curves-n<n>.png: the low-data experiment's val curves per n, against epochs;
- esnli-lowdata/efficiency.png: test-2k vs n per arm (mean ± sd and every seed), the data-efficiency curve.
Runs come from summarize.load, so a run counts once its test.json exists."""
import statistics
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import summarize  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COLORS = {"pooled": "tab:gray", "dhrd": "tab:blue", "dhrd_auto": "tab:cyan", "dhrd_palm": "tab:blue",
          "dhrd_human": "tab:orange", "dhrd_rationale": "tab:green", "pooled_mlp": "black",
          "dhrd_mlp": "tab:purple"}


def band(ax, arm, runs, scale=1.0):
    """Mean ± sd over seeds of the val curve, x = step / scale; the seeds' count in the legend."""
    steps = sorted({i for r in runs.values() for i in r["curve"]})
    mean = []
    sd = []
    for i in steps:
        vals = [r["curve"][i] for r in runs.values() if i in r["curve"]]
        mean.append(statistics.mean(vals))
        sd.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
    x = [i / scale for i in steps]
    color = COLORS.get(arm)
    ax.plot(x, mean, marker="o", ms=3, color=color, label=f"{arm} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    ax.fill_between(x, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], color=color,
                    alpha=0.2, lw=0)


def curves(arms, path, title, xlabel="optimizer step", scale=1.0, panels=None):
    """Val curves; panels: lists of arms, one panel each (default: every arm in one)."""
    panels = panels or [list(arms)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, names in zip(axes[0], panels):
        for arm in names:
            if arm in arms:
                band(ax, arm, arms[arm], scale)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("val accuracy (985 rows)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot.py: {path}")


def strip(arms, path, title):
    """test-2k per arm: every seed a point, the mean a bar."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for k, (arm, runs) in enumerate(arms.items()):
        tests = [r["test"] for r in runs.values() if r["test"] is not None]
        ax.scatter([k] * len(tests), tests, color=COLORS.get(arm), s=18, zorder=3)
        ax.hlines(statistics.mean(tests), k - 0.25, k + 0.25, color=COLORS.get(arm), lw=2)
    ax.set_xticks(range(len(arms)), list(arms), fontsize=8)
    ax.set_ylabel("test-2k accuracy")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot.py: {path}")


def efficiency(by_n, path):
    """test-2k vs n per arm: mean ± sd, and every seed as a faint point (slightly apart, to be seen)."""
    fig, ax = plt.subplots(figsize=(6, 4.2))
    arms = sorted({a for arms in by_n.values() for a in arms}, key=lambda a: (a != "pooled", a))
    for j, arm in enumerate(arms):
        ns = [n for n in sorted(by_n) if arm in by_n[n]]
        color = COLORS.get(arm)
        means = []
        sds = []
        for n in ns:
            tests = [r["test"] for r in by_n[n][arm].values()]
            means.append(statistics.mean(tests))
            sds.append(statistics.stdev(tests) if len(tests) > 1 else 0.0)
            ax.scatter([n * 1.03 ** (j - 1)] * len(tests), tests, color=color, s=10, alpha=0.5)
        ax.errorbar(ns, means, yerr=sds, color=color, marker="o", capsize=3, label=arm)
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(by_n) / 1.5, max(by_n) * 1.5)  # room for the seeds' points, also with one n
    ax.set_xticks(sorted(by_n), [str(n) for n in sorted(by_n)])
    ax.set_xlabel("training rows n (nested e-SNLI subsets)")
    ax.set_ylabel("test-2k accuracy (best-on-val model)")
    ax.set_title("SmolLM2-135M, e-SNLI: data efficiency (mean ± sd over seeds, points = seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot.py: {path}")


def main():
    budget = summarize.load(RESULTS / "esnli")
    title = "budget experiment: SmolLM2-135M, e-SNLI 8,857 rows, batch 8, 400 steps"
    panels = [["pooled", "dhrd", "dhrd_auto", "dhrd_rationale"], ["pooled_mlp", "dhrd_mlp"]]
    curves(budget, RESULTS / "esnli" / "curves.png", title, panels=panels)
    strip(budget, RESULTS / "esnli" / "test.png", title)
    low = RESULTS / "esnli-lowdata"
    by_n = {}
    for folder in sorted(low.glob("n*"), key=lambda p: int(p.name[1:])):
        arms = summarize.load(folder)
        if not arms:
            continue
        n = int(folder.name[1:])
        by_n[n] = arms
        steps_per_epoch = n // 8
        curves(arms, low / f"curves-n{n}.png", f"low-data experiment, n = {n}: val accuracy per epoch",
               xlabel="epoch", scale=steps_per_epoch)
    if by_n:
        efficiency(by_n, low / "efficiency.png")


if __name__ == "__main__":
    main()
