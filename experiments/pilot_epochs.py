"""E, the number of epochs of the low-data experiment, from its pooled pilot (the rule pre-registered in
experiments/README.md): m(e) = mean val accuracy over epochs e-1, e, e+1 (two at the ends); E = the smallest
e with m(e) >= max m - 0.01. Writes <pilot>/epochs.json and prints it; says so when the pilot must be rerun
with twice its epochs (max m at the last epoch and val up by more than 0.01 over the last quarter).
    python experiments/pilot_epochs.py experiments/results/esnli-lowdata/n256/pilot
"""
import json
import sys
from pathlib import Path

TOLERANCE = 0.01


def choose_epochs(vals):
    """vals: val accuracy at epochs 1..P -> (E, the smoothed curve m, whether the pilot must be longer)."""
    P = len(vals)
    m = []
    for e in range(P):
        window = vals[max(e - 1, 0):e + 2]
        m.append(sum(window) / len(window))
    best = max(m)
    E = next(e + 1 for e in range(P) if m[e] >= best - TOLERANCE)
    quarter = max(P // 4, 1)
    longer = m.index(best) == P - 1 and vals[-1] - vals[P - 1 - quarter] > TOLERANCE
    return E, m, longer


def main(pilot):
    pilot = Path(pilot)
    config = json.loads((pilot / "config.json").read_text())
    lines = [json.loads(l) for l in (pilot / "log.jsonl").read_text().splitlines()]
    evals = [l for l in lines if "val" in l]
    steps = config["eval_interval"]
    assert [l["iter"] for l in evals] == [steps * (e + 1) for e in range(len(evals))], "one eval per epoch"
    vals = [l["val"]["accuracy"] for l in evals]
    E, m, longer = choose_epochs(vals)
    out = {"E": E, "P": len(vals), "steps_per_epoch": steps, "val": vals, "smoothed": m, "rerun_longer": longer}
    (pilot / "epochs.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    if longer:
        sys.exit(f"{pilot}: val still rising at the pilot's end: rerun it with {2 * len(vals)} epochs")


if __name__ == "__main__":
    main(sys.argv[1])
