"""A prepared data folder with one split replaced by a fixed random subset of its rows
(the other files copied):
    python experiments/subset_split.py data/esnli data/esnli-test2k test 2000   # 2,000 of the 9,824 test rows
The rows are np.random.default_rng(seed).choice(N, n, replace=False), kept in file order; the split's token
file is copied whole (the index rows point into it), its .jsonl keeps the chosen lines, meta.json the new
count."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np


def main(src, dst, split, n, seed=0):
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(f"{split}."):
            shutil.copyfile(f, dst / f.name)
    rows = np.load(src / f"{split}.idx.npy")
    if n > len(rows):
        sys.exit(f"subset_split.py: {src}/{split}.idx.npy has {len(rows)} rows, fewer than {n}")
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), n, replace=False))
    np.save(dst / f"{split}.idx.npy", rows[keep])
    shutil.copyfile(src / f"{split}.bin", dst / f"{split}.bin")
    lines = (src / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()
    (dst / f"{split}.jsonl").write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    meta = json.loads((dst / "meta.json").read_text(encoding="utf-8"))
    meta["counts"][split] = n
    meta["subset"] = {"of": str(src), "split": split, "rows": n, "seed": seed}
    (dst / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"subset_split.py: {dst}/{split}: {n} of {len(rows)} rows (seed {seed})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
