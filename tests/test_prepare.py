"""prepare.py: synth determinism, record layout, templates, truncation, custom data, rationales, teacher API, errors."""
import json, pathlib, sys
import numpy as np
import pytest

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "prepare.py").exists())
sys.path.insert(0, str(ROOT))
import prepare  # noqa: E402


def _prep_files(d):
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(d).iterdir())}


def _prep_decode(d, split):
    """Round trip: the memory-mapped record layout back to (x text, suffix text, label, group) per example."""
    meta = json.loads((pathlib.Path(d) / "meta.json").read_text())
    tok = prepare.tokenizer_from_meta(meta)
    b = np.memmap(pathlib.Path(d) / f"{split}.bin", dtype=meta["token_dtype"], mode="r")
    idx = np.load(pathlib.Path(d) / f"{split}.idx.npy")
    out = []
    for start, x_len, n, label, group in idx.tolist():
        ids = b[start:start + n].tolist()
        out.append((ids, tok.decode(ids[:x_len]), tok.decode(ids[x_len:]), label, group))
    return meta, tok, idx, out


def test_synth_deterministic_and_layout(tmp_path):
    m1 = prepare.prepare(task="synth", out_dir=tmp_path / "a", quiet=True)
    prepare.prepare(task="synth", out_dir=tmp_path / "b", quiet=True)
    assert _prep_files(tmp_path / "a") == _prep_files(tmp_path / "b")          # byte-identical
    assert set(_prep_files(tmp_path / "a")) == {f"{s}.{e}" for s in ("train", "val", "test")
                                                for e in ("bin", "idx.npy", "jsonl")} | {"meta.json"}
    assert m1["counts"] == {"train": prepare.SYNTH["n_train"], "val": prepare.SYNTH["n_val"], "test": prepare.SYNTH["n_test"]}
    texts = {}
    for split in ("train", "val", "test"):
        meta, tok, idx, exs = _prep_decode(tmp_path / "a", split)
        rows = [json.loads(l) for l in (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()]
        assert idx.dtype == np.int64 and idx.shape == (len(rows), 5)
        assert (idx[1:, 0] == idx[:-1, 0] + idx[:-1, 2]).all()                   # contiguous, in order
        for (ids, x, suffix, label, group), r in zip(exs, rows):
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            assert x == r["text"] and meta["labels"][label] == r["label"] and group == r["idx"]
            assert suffix == f"\nReasoning:\n{r['rationale']}\nFinal Answer:\n{r['label']}"
            # the label follows from the last value the rationale computes
            last = int(r["rationale"].rsplit("=", 1)[1])
            assert r["label"] == ("Yes" if last > prepare.SYNTH["mod"] // 2 - 1 else "No")
        assert abs(np.bincount(idx[:, 3]).tolist()[0] - len(rows) / 2) <= 1        # balanced labels
        texts[split] = {r["text"] for r in rows}
    assert not (texts["train"] & texts["val"]) and not (texts["train"] & texts["test"])


def test_synth_rationale_values_are_correct(tmp_path):
    prepare.prepare(task="synth", out_dir=tmp_path, quiet=True)
    for line in (tmp_path / "val.jsonl").read_text().splitlines()[:200]:
        r = json.loads(line)
        env, mod = {}, prepare.SYNTH["mod"]
        stmts = r["text"].split(";")[0].split(",")
        for s in stmts:
            v, expr = s.split("=")
            env[v] = eval(expr, {}, dict(env)) % mod
        assert r["rationale"] == ",".join(f"{s.split('=')[0]}={env[s.split('=')[1][0]]}{s.split('=')[1][1]}"
                                          f"{env.get(s.split('=')[1][2:], s.split('=')[1][2:])}={env[s.split('=')[0]]}"
                                          for s in stmts[1:])
