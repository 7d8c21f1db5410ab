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


# ---------------------------------------------------------------------------------------------------------
# SuperGLUE: tiny files in the official jsonl layout

_PREP_SG = {
    "CB": [dict(premise="It rained all day.", hypothesis="The ground is wet.", label="entailment", idx=0),
           dict(premise="He left early.", hypothesis="He stayed late.", label="contradiction", idx=1),
           dict(premise="She bought a car.", hypothesis="The car is red.", label="neutral", idx=2)],
    "RTE": [dict(premise="Paris is in France.", hypothesis="Paris is French.", label="entailment", idx=0),
            dict(premise="Cats meow.", hypothesis="Dogs meow.", label="not_entailment", idx=1)],
    "BoolQ": [dict(question="is the sky blue", passage="Sky -- The sky is blue.", label=True, idx=0),
              dict(question="is grass red", passage="Grass -- Grass is green.", label=False, idx=1)],
    "COPA": [dict(premise="The man turned on the faucet.", choice1="The toilet filled.", choice2="Water flowed.",
                  question="effect", label=1, idx=0),
             dict(premise="I was cold.", choice1="I wore a coat.", choice2="I ate soup.", question="cause",
                  label=0, idx=1)],
    "MultiRC": [dict(idx=0, version=1.1, passage=dict(text="Tom has two cats. He feeds them fish.", questions=[
        dict(question="How many cats?", idx=0, answers=[dict(text="two", idx=0, label=1), dict(text="three", idx=1, label=0),
                                                        dict(text="2", idx=2, label=1)]),
        dict(question="What do they eat?", idx=1, answers=[dict(text="fish", idx=3, label=1), dict(text="rice", idx=4, label=0)])]))],
    "WiC": [dict(word="bank", sentence1="He sat on the bank.", sentence2="The bank raised rates.", idx=0, label=False,
                 start1=14, end1=18, start2=4, end2=8, version=1.1)],
    "WSC": [dict(text="Mark told Pete he was late.", target=dict(span1_index=0, span1_text="Mark", span2_index=3,
                                                                 span2_text="he"), idx=0, label=True)],
}


def _prep_write_sg(root, drop=()):
    for folder, rows in _PREP_SG.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for split in ("train", "val", "test"):
            if (folder, split) in drop:
                continue
            rs = [{k: v for k, v in r.items() if k != "label"} for r in rows] if split == "test" else rows
            if folder == "MultiRC" and split == "test":
                rs = [json.loads(json.dumps(rows[0]).replace(', "label": 1', "").replace(', "label": 0', ""))]
            (root / folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return root


def _prep_rows(d, split):
    return [json.loads(l) for l in (pathlib.Path(d) / f"{split}.jsonl").read_text().splitlines()]


def test_superglue_templates_and_mappings(tmp_path):
    sg = _prep_write_sg(tmp_path / "sg")
    m = prepare.prepare(task="cb", data_dir=sg, out_dir=tmp_path / "cb", model="char", quiet=True)
    assert m["labels"] == ["No", "Yes"] and m["metric"] == "cb" and m["counts"] == dict(train=3, val=3, test=3)
    r = _prep_rows(tmp_path / "cb", "train")
    assert r[0]["text"] == ("Passage: It rained all day.\nQuestion: " + prepare.NLI_Q +
                            "\nAnswer: The ground is wet.\nIs the answer correct Yes or No?")
    assert [x["label"] for x in r] == ["Yes", "No", "No"] and [x["label"] for x in _prep_rows(tmp_path / "cb", "test")] == [None] * 3
    meta, tok, idx, exs = _prep_decode(tmp_path / "cb", "train")
    assert exs[0][2] == "\nFinal Answer:\nYes" and exs[0][1] == r[0]["text"]      # label-only suffix, no rationale
    _, _, tidx, texs = _prep_decode(tmp_path / "cb", "test")
    assert (tidx[:, 1] == tidx[:, 2]).all() and (tidx[:, 3] == -1).all()          # test: x only, label unknown
    m = prepare.prepare(task="cb", fmt="native", data_dir=sg, out_dir=tmp_path / "cbn", model="char", quiet=True)
    assert m["labels"] == ["entailment", "contradiction", "neutral"] and m["verbalizers"]["neutral"] == "Maybe"
    assert [x["label"] for x in _prep_rows(tmp_path / "cbn", "train")] == ["entailment", "contradiction", "neutral"]
    assert _prep_rows(tmp_path / "cbn", "train")[0]["text"].endswith("Is the answer correct Yes, No or Maybe?")
    # COPA: one example per alternative, grouped by pair; native: one example per pair
    m = prepare.prepare(task="copa", data_dir=sg, out_dir=tmp_path / "copa", model="char", quiet=True)
    r = _prep_rows(tmp_path / "copa", "train")
    assert m["metric"] == "copa" and [(x["group"], x["label"]) for x in r] == [(0, "No"), (0, "Yes"), (1, "Yes"), (1, "No")]
    assert "Question: What happened as a result?\nAnswer: Water flowed." in r[1]["text"]
    assert np.load(tmp_path / "copa" / "train.idx.npy")[:, 4].tolist() == [0, 0, 1, 1]
    m = prepare.prepare(task="copa", fmt="native", data_dir=sg, out_dir=tmp_path / "copan", model="char", quiet=True)
    assert m["metric"] == "accuracy" and [x["label"] for x in _prep_rows(tmp_path / "copan", "train")] == ["choice2", "choice1"]
    # MultiRC: one example per candidate answer, group = question
    prepare.prepare(task="multirc", data_dir=sg, out_dir=tmp_path / "mrc", model="char", quiet=True)
    r = _prep_rows(tmp_path / "mrc", "train")
    assert [(x["group"], x["label"]) for x in r] == [(0, "Yes"), (0, "No"), (0, "Yes"), (1, "Yes"), (1, "No")]
    assert r[3]["text"].endswith("Question: What do they eat?\nAnswer: fish\nIs the answer correct Yes or No?")
    assert [x["label"] for x in _prep_rows(tmp_path / "mrc", "test")] == [None] * 5
    for task, label, frag in [("rte", "No", "Answer: Dogs meow."), ("boolq", "No", "Question: is grass red?"),
                              ("wsc", "Yes", 'Who or what does "he" refer to?\nAnswer: Mark'),
                              ("wic", "No", 'Is the word "bank" used with the same meaning')]:
        prepare.prepare(task=task, data_dir=sg, out_dir=tmp_path / task, model="char", quiet=True)
        r = _prep_rows(tmp_path / task, "val")
        assert r[-1]["label"] == label and frag in r[-1]["text"], (task, r[-1])


def test_boolq_without_train_splits_val(tmp_path):
    rows = [dict(question=f"q{i}", passage=f"P -- text {i}", label=i % 3 == 0, idx=i) for i in range(10)]
    (tmp_path / "BoolQ").mkdir()
    (tmp_path / "BoolQ" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = prepare.prepare(task="boolq", data_dir=tmp_path, out_dir=tmp_path / "o", model="char", quiet=True)
    assert m["counts"] == dict(train=8, val=2) and "train" in m["split_note"]
    assert [r["text"].split("\n")[1] for r in _prep_rows(tmp_path / "o", "val")] == ["Question: q0?", "Question: q5?"]


def test_truncation_shortens_passage_keeps_question(tmp_path):
    rows = [dict(premise="word " * 200, hypothesis="The final hypothesis stays.", label="entailment", idx=0),
            dict(premise="short.", hypothesis="Also kept.", label="not_entailment", idx=1)]
    (tmp_path / "RTE").mkdir()
    for s in ("train", "val"):
        (tmp_path / "RTE" / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = prepare.prepare(task="rte", data_dir=tmp_path, out_dir=tmp_path / "o", model="char", max_len=300, quiet=True)
    assert m["shortened"] == 2 and m["max_len"]["train"]["x"] == 300                   # 1 per split
    meta, tok, idx, exs = _prep_decode(tmp_path / "o", "train")
    assert idx[0, 1] == 300 and exs[0][1].endswith("Answer: The final hypothesis stays.\nIs the answer correct Yes or No?")
    assert exs[0][1].startswith("Passage: word word") and exs[1][1] == _prep_rows(tmp_path / "o", "train")[1]["text"]
    with pytest.raises(prepare.PrepareError, match="raise --max_len"):
        prepare.prepare(task="rte", data_dir=tmp_path, out_dir=tmp_path / "o2", model="char", max_len=40, quiet=True)
