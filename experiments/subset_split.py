"""A prepared data folder with one split replaced by a fixed random subset of its rows
(the other files copied):
    python experiments/subset_split.py data/esnli data/esnli-test2k test 2000           # 2,000 of 9,824 test rows
    python experiments/subset_split.py data/esnli data/esnli-n256 train 256 --nested    # the low-data subsets
Plain: the rows are np.random.default_rng(seed).choice(N, n, replace=False). --nested: the first n of
np.random.default_rng(seed).permutation(N), so the subset of a smaller n lies inside that of a larger one.
Either way they are kept in file order; the split's token file is copied whole (the index rows point into
it), its .jsonl keeps the chosen lines, meta.json the new count and the chosen row ids."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np


def subset_rows(N, n, seed, nested):
    """The chosen row ids, sorted."""
    rng = np.random.default_rng(seed)
    if nested:
        return np.sort(rng.permutation(N)[:n])
    return np.sort(rng.choice(N, n, replace=False))


def main(src, dst, split, n, seed=0, nested=False):
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(f"{split}."):
            shutil.copyfile(f, dst / f.name)
    rows = np.load(src / f"{split}.idx.npy")
    if n > len(rows):
        sys.exit(f"subset_split.py: {src}/{split}.idx.npy has {len(rows)} rows, fewer than {n}")
    keep = subset_rows(len(rows), n, seed, nested)
    np.save(dst / f"{split}.idx.npy", rows[keep])
    shutil.copyfile(src / f"{split}.bin", dst / f"{split}.bin")
    lines = (src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    (dst / f"{split}.jsonl").write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    meta = json.loads((dst / "meta.json").read_text(encoding="utf-8"))
    meta["counts"][split] = n
    meta["subset"] = {"of": str(src), "split": split, "rows": n, "seed": seed}
    if nested:
        meta["subset"]["nested"] = True
        meta["subset"]["ids"] = keep.tolist()
    (dst / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"subset_split.py: {dst}/{split}: {n} of {len(rows)} rows (seed {seed}{', nested' if nested else ''})")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--nested"]
    main(args[0], args[1], args[2], int(args[3]), nested="--nested" in sys.argv[1:])
