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
        x, suffix = ids[int(tok.bos_id is not None):x_len], ids[x_len:n - 1 if n > x_len else n]   # minus BOS/EOS
        out.append((ids, tok.decode(x), tok.decode(suffix), label, group))
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
    assert prepare.format_input("cb", _PREP_SG["CB"][0]) == [r[0]["text"]]                # dhrd.py --predict
    assert prepare.format_input("multirc", _PREP_SG["MultiRC"][0])[3].endswith("Answer: fish\nIs the answer correct Yes or No?")
    assert prepare.format_input("custom", {"text": "as is"}) == ["as is"]
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


# ---------------------------------------------------------------------------------------------------------
# custom data, rationale import, ablations

def _prep_custom(tmp_path):
    (tmp_path / "train.csv").write_text("text,label,rationale\n\"good, fine\",pos,nice words\nawful,neg,bad words\n"
                                        "great,pos,\nmeh,neg,dull\n")
    (tmp_path / "val.jsonl").write_text('{"text": "ok", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n')
    (tmp_path / "test.json").write_text('[{"text": "what"}, {"text": "so so", "label": "neg"}]')
    return dict(train_file=tmp_path / "train.csv", val_file=tmp_path / "val.jsonl", test_file=tmp_path / "test.json")


def test_custom_formats_and_labels(tmp_path):
    m = prepare.prepare(task="custom", out_dir=tmp_path / "o", model="char", quiet=True, **_prep_custom(tmp_path))
    assert m["labels"] == ["neg", "pos"] and m["counts"] == dict(train=4, val=2, test=2)
    assert set(m["sources"]) == {"train.csv", "val.jsonl", "test.json"} and m["rationale_source"] == "file"
    r = _prep_rows(tmp_path / "o", "train")
    assert [(x["text"], x["label"], x["rationale"]) for x in r] == [
        ("good, fine", "pos", "nice words"), ("awful", "neg", "bad words"), ("great", "pos", None), ("meh", "neg", "dull")]
    _, _, idx, exs = _prep_decode(tmp_path / "o", "train")
    assert exs[0][2] == "\nReasoning:\nnice words\nFinal Answer:\npos" and exs[2][2] == "\nFinal Answer:\npos"
    assert [x["label"] for x in _prep_rows(tmp_path / "o", "test")] == [None, "neg"]
    m = prepare.prepare(task="custom", out_dir=tmp_path / "o", model="char", quiet=True,
                        **{**_prep_custom(tmp_path), "test_file": None})                   # rerun without a test file
    assert m["counts"] == dict(train=4, val=2) and not list((tmp_path / "o").glob("test.*"))
    m = prepare.prepare(task="custom", out_dir=tmp_path / "clip", model="char", max_rationale=4, quiet=True, **_prep_custom(tmp_path))
    assert m["rationale_clipped"] == 2 and _prep_decode(tmp_path / "clip", "train")[3][0][2] == "\nReasoning:\nnice\nFinal Answer:\npos"
    # integer labels sort numerically; evidence-binding recipe: --text_field=sentence --filter=status=verified
    (tmp_path / "ev.csv").write_text("sentence,status,label\nA holds.,verified,10\nB maybe.,draft,2\nC holds.,verified,2\n")
    m = prepare.prepare(task="custom", train_file=tmp_path / "ev.csv", val_file=tmp_path / "ev.csv", text_field="sentence",
                        filter="status=verified", out_dir=tmp_path / "ev", model="char", quiet=True)
    assert m["labels"] == ["2", "10"] and m["counts"] == dict(train=2, val=2)
    assert m["dropped"] == {"train/filtered": 1, "val/filtered": 1}
    assert [x["text"] for x in _prep_rows(tmp_path / "ev", "train")] == ["A holds.", "C holds."]


def test_rationale_import_and_ablations(tmp_path):
    files = _prep_custom(tmp_path)
    lines = [dict(task="custom", split="train", idx=0, rationale="  first reason ", label="pos"),
             dict(task="custom", split="train", idx=1, rationale="second reason", label="neg"),
             dict(task="custom", split="train", idx=2, rationale="wrong side", label="neg"),     # disagrees
             dict(task="custom", split="train", idx=3, rationale="", label="neg"),               # empty
             dict(task="custom", split="val", idx=0, rationale="no answer given"),              # answer-less
             dict(task="custom", split="val", idx=1, rationale="says so", label="Neg. Clearly"),  # agrees
             dict(task="custom", split="test", idx=1, rationale="says not", label="negative"),    # disagrees
             dict(task="other", split="train", idx=0, rationale="ignored", label="x")]
    rf = tmp_path / "r.jsonl"
    rf.write_text("".join(json.dumps(l) + "\n" for l in lines))
    m = prepare.prepare(task="custom", out_dir=tmp_path / "o", model="char", rationales=rf, quiet=True, **files)
    assert m["dropped"] == {"rationales/disagree": 2, "rationales/empty": 1, "rationales/no_answer": 1}
    assert [x["rationale"] for x in _prep_rows(tmp_path / "o", "val")] == [None, "says so"]
    assert m["rationale_source"] == "file:r.jsonl" and "r.jsonl" in m["sources"]
    r = _prep_rows(tmp_path / "o", "train")
    assert [x["rationale"] for x in r] == ["first reason", "second reason", None, "dull"]  # CSV rationale kept for 3
    _, _, _, exs = _prep_decode(tmp_path / "o", "train")
    assert exs[1][2] == "\nReasoning:\nsecond reason\nFinal Answer:\nneg"
    m = prepare.prepare(task="custom", out_dir=tmp_path / "a", model="char", rationales=rf, ablation="only_label",
                        quiet=True, **files)
    assert m["ablation"] == "only_label"
    _, _, _, exs = _prep_decode(tmp_path / "a", "train")
    assert [e[2] for e in exs] == ["\nFinal Answer:\npos", "\nFinal Answer:\nneg", "\nFinal Answer:\npos", "\nFinal Answer:\nneg"]
    outs = {}
    for abl in ("shuffle_reasoning", "shuffle_reasoning_label"):
        for seed in (1, 1, 5):
            prepare.prepare(task="custom", out_dir=tmp_path / abl, model="char", rationales=rf, ablation=abl,
                            seed=seed, quiet=True, **files)
            outs.setdefault(abl, []).append(_prep_files(tmp_path / abl))
            _, _, idx, exs = _prep_decode(tmp_path / abl, "train")
            assert idx[:, 3].tolist() == [1, 0, 1, 0]                                      # class labels stay gold
            suffixes = [e[2].split("\nFinal Answer:\n") for e in exs if "Reasoning" in e[2]]
            assert sorted(s[0] for s in suffixes) == sorted("\nReasoning:\n" + r for r in ("first reason", "second reason", "dull"))
            pairs = {("\nReasoning:\nfirst reason", "pos"), ("\nReasoning:\nsecond reason", "neg"), ("\nReasoning:\ndull", "neg")}
            if abl == "shuffle_reasoning_label":
                assert {tuple(s) for s in suffixes} == pairs                               # answer moves with its rationale
        assert outs[abl][0] == outs[abl][1]                                                # seeded
    assert outs["shuffle_reasoning"][0] != outs["shuffle_reasoning"][2]                   # a different seed shuffles differently


# ---------------------------------------------------------------------------------------------------------
# teacher over an OpenAI-compatible API: a fake /v1/chat/completions on 127.0.0.1

def _prep_server(handler_fn):
    import http.server, threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            code, payload = handler_fn(self.path, self.headers, body)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(payload if isinstance(payload, bytes) else json.dumps(payload).encode())

        def do_GET(self):
            code, payload = handler_fn(self.path, self.headers, None)
            self.send_response(code)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def test_teacher_api_retries_drops_and_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "RETRY_BASE", 0.01)
    monkeypatch.setenv("PREP_TEST_KEY", "sk-secret-123")
    rows = [dict(text=f"item {k}", label="pos" if k % 2 == 0 else "neg") for k in range(8)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls, broken = {}, {7}

    def handle(path, headers, body):
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-secret-123"
        assert body["model"] == "tiny-teacher"
        prompt = body["messages"][0]["content"]
        assert "[END OF REASONING]" in prompt and "2 to 5 sentences" in prompt
        k = int(prompt.split("item ")[1].split()[0])
        gold = prompt.split("Correct answer: ")[1].strip()
        calls[k] = calls.get(k, 0) + 1
        other = "neg" if gold == "pos" else "pos"
        ok = lambda txt: (200, {"choices": [{"message": {"content": txt}}]})
        if k in broken:
            return 500, {"error": "down"}
        if k in (3, 4, 5) and calls[k] == 1:                      # transient: 429, 500, garbage body
            return {3: (429, {"error": "slow down"}), 4: (500, {"error": "oops"}), 5: (200, b"not json")}[k]
        return ok({1: f"Reasoning for {k}.\n[END OF REASONING]\nAnswer: {other}",          # disagrees with gold
                   2: "I forgot the marker. Answer: pos",                                    # answer-less
                   6: "[END OF REASONING]\nAnswer: pos"}.get(k, f"Step one for {k}. Step two.\n[END OF REASONING]\nAnswer: {gold}."))

    srv, url = _prep_server(handle)
    kw = dict(task="custom", train_file=tmp_path / "t.jsonl", val_file=tmp_path / "t.jsonl", model="char",
              teacher_url=url + "/v1", teacher_model="tiny-teacher", api_key_env="PREP_TEST_KEY", teacher_workers=3,
              out_dir=tmp_path / "o", quiet=True)
    try:
        m = prepare.prepare(**kw)                                          # item 7 fails for good: not written
        rf = tmp_path / "o" / "rationales.jsonl"
        assert sorted(json.loads(l)["idx"] for l in rf.read_text().splitlines()) == list(range(7))
        assert m["dropped"] == {"rationales/disagree": 1, "rationales/no_answer": 1, "rationales/empty": 1}
        assert m["rationale_source"] == "teacher:tiny-teacher"
        assert calls[3] == calls[4] == calls[5] == 2 and calls[0] == 1 and calls[7] == 6
        r = _prep_rows(tmp_path / "o", "train")
        assert r[0]["rationale"] == "Step one for 0. Step two." and r[5]["rationale"] == "Step one for 5. Step two."
        assert [x["rationale"] is None for x in r] == [False, True, True, False, False, False, True, True]
        for p in (tmp_path / "o").iterdir():
            assert b"sk-secret-123" not in p.read_bytes()
        # resume after a kill mid-line: the partial line goes, existing ids are skipped, only the rest is asked for
        lines = rf.read_text().splitlines(keepends=True)
        rf.write_text("".join(lines[:4]) + lines[4][:10])
        broken.clear(); before = dict(calls)
        m = prepare.prepare(**kw)
        got = [json.loads(l)["idx"] for l in rf.read_text().splitlines()]
        assert sorted(got) == list(range(8)) and len(got) == 8
        done_first = {json.loads(l)["idx"] for l in lines[:4]}
        assert {k for k in calls if calls[k] != before.get(k)} == set(range(8)) - done_first
        assert _prep_rows(tmp_path / "o", "train")[7]["rationale"] == "Step one for 7. Step two."
        before = dict(calls)
        prepare.prepare(**kw)
        assert calls == before                                             # nothing generated twice
    finally:
        srv.shutdown()


# ---------------------------------------------------------------------------------------------------------
# bad input: one clean message naming file, line and field

def test_bad_input_messages(tmp_path):
    sg = _prep_write_sg(tmp_path / "sg")
    cb = sg / "CB" / "train.jsonl"
    good = cb.read_text()
    run = lambda **kw: prepare.prepare(**{**dict(task="cb", data_dir=sg, out_dir=tmp_path / "o", model="char", quiet=True), **kw})
    cb.write_text(good + '{"premise": "x", "hypothesis": \n')
    with pytest.raises(prepare.PrepareError, match=r"CB/train.jsonl:4: malformed JSON"):
        run()
    cb.write_text(good + '{"premise": "x", "label": "neutral", "idx": 3}\n')
    with pytest.raises(prepare.PrepareError, match=r"CB/train.jsonl:4: missing field 'hypothesis'"):
        run()
    cb.write_text(good + '{"premise": "x", "hypothesis": "y", "label": "maybe", "idx": 3}\n')
    with pytest.raises(prepare.PrepareError, match=r"CB/train.jsonl:4: unknown label 'maybe'.*known labels: entailment, contradiction, neutral"):
        run()
    cb.write_text("\n")
    with pytest.raises(prepare.PrepareError, match=r"CB/train.jsonl: no examples"):
        run()
    cb.write_text(good)
    files = _prep_custom(tmp_path)
    (tmp_path / "bad.csv").write_text("text,label\nfine,pos\nnope,weird\n")
    with pytest.raises(prepare.PrepareError, match=r"bad.csv:3: unknown label 'weird'.*known labels \(from train\): neg, pos"):
        prepare.prepare(task="custom", out_dir=tmp_path / "c", model="char", **{**files, "val_file": tmp_path / "bad.csv"})
    (tmp_path / "nolabel.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "b"}\n')
    with pytest.raises(prepare.PrepareError, match=r"nolabel.jsonl:2: missing field 'label'"):
        prepare.prepare(task="custom", out_dir=tmp_path / "c", model="char", **{**files, "train_file": tmp_path / "nolabel.jsonl"})
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(prepare.PrepareError, match=r"empty.csv: split 'val' is empty"):
        prepare.prepare(task="custom", out_dir=tmp_path / "c", model="char", **{**files, "val_file": tmp_path / "empty.csv"})
    (tmp_path / "r.jsonl").write_text('{"task": "custom", "split": "train", "idx": 0, "rationale": "a", "label": "pos"}\n'
                                      '{"task": "custom", "split": "train", "rationale": "b"}\n')
    with pytest.raises(prepare.PrepareError, match=r"r.jsonl:2: missing field 'idx'"):
        prepare.prepare(task="custom", out_dir=tmp_path / "c", model="char", rationales=tmp_path / "r.jsonl", **files)
    (tmp_path / "r.jsonl").write_text('{"task": "custom", "split": "train", "idx": 99, "rationale": "b", "label": "pos"}\n')
    with pytest.raises(prepare.PrepareError, match=r"r.jsonl:1: no example split='train' idx=99"):
        prepare.prepare(task="custom", out_dir=tmp_path / "c", model="char", rationales=tmp_path / "r.jsonl", **files)
    # the CLI turns every one of these into one line on stderr and exit status 1, never a traceback
    for argv, msg in [(["--task=nope"], "unknown --task=nope"), (["--bogus=1"], "bad option '--bogus=1'"),
                      (["cb"], "bad option 'cb'"), (["--task=synth", "--max_len=big"], "--max_len=big"),
                      ([f"--task=cb", f"--data_dir={sg}", "--model=char", "--format=weird"], "unknown --format=weird")]:
        with pytest.raises(SystemExit) as e:
            prepare.main(argv)
        assert isinstance(e.value.code, str) and e.value.code.startswith("prepare.py: ") and msg in e.value.code, e.value.code


# ---------------------------------------------------------------------------------------------------------
# BPE tokenizers (H2's tiny fixture folders) and the SuperGLUE download on loopback

def test_bpe_tokenizers_bos_and_truncation(tmp_path):
    sg = _prep_write_sg(tmp_path / "sg")
    long = dict(premise="The committee discussed the budget at length. " * 60, hypothesis="The budget was discussed.",
                label="entailment", idx=9)
    (sg / "RTE" / "train.jsonl").write_text((sg / "RTE" / "train.jsonl").read_text() + json.dumps(long) + "\n")
    for name, has_bos in (("tok_gpt2", False), ("tok_opt", True)):
        folder = ROOT / "tests" / "fixtures" / name
        m = prepare.prepare(task="rte", data_dir=sg, out_dir=tmp_path / name, model=str(folder), max_len=128, quiet=True)
        assert m["tokenizer"] == {"type": "bpe", "name": str(folder)} and m["token_dtype"] == "uint16"
        meta, tok, idx, exs = _prep_decode(tmp_path / name, "train")
        assert (m["bos_id"] is not None) == has_bos and m["shortened"] == 1 and idx[2, 1] == 128
        for (ids, x, suffix, label, group), r, x_len in zip(exs, _prep_rows(tmp_path / name, "train"), idx[:, 1]):
            assert (ids[0] == tok.bos_id) == has_bos and ids[-1] == tok.eos_id
            assert x == r["text"] and suffix == "\nFinal Answer:\n" + r["label"]
            assert ids[:x_len] == ([tok.bos_id] if has_bos else []) + tok.encode(r["text"])
        assert exs[2][1].endswith("\nAnswer: The budget was discussed.\nIs the answer correct Yes or No?")


def test_superglue_download_from_loopback(tmp_path, monkeypatch):
    import io, zipfile
    src = _prep_write_sg(tmp_path / "src")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted((src / "CB").iterdir()):
            z.writestr(f"CB/{f.name}", f.read_bytes())
        z.writestr("__MACOSX/CB/._train.jsonl", b"junk")
    served = []

    def handle(path, headers, body):
        served.append(path)
        return (200, buf.getvalue()) if path == "/CB.zip" else (404, b"no")

    srv, url = _prep_server(handle)
    try:
        monkeypatch.setattr(prepare, "SUPERGLUE_URL", url)
        m = prepare.prepare(task="cb", data_dir=tmp_path / "dl", out_dir=tmp_path / "o", model="char", quiet=True)
        assert m["counts"] == dict(train=3, val=3, test=3) and served == ["/CB.zip"]
        assert sorted(p.name for p in (tmp_path / "dl").rglob("*")) == ["CB", "test.jsonl", "train.jsonl", "val.jsonl"]
        assert m["sources"]["CB/train.jsonl"] == prepare.sha256(src / "CB" / "train.jsonl")
        prepare.prepare(task="cb", data_dir=tmp_path / "dl", out_dir=tmp_path / "o", model="char", quiet=True)
        assert served == ["/CB.zip"]                                                   # present now: no second fetch
        with pytest.raises(prepare.PrepareError, match=r"RTE/val.jsonl not found and downloading .*/RTE.zip failed"):
            prepare.prepare(task="rte", data_dir=tmp_path / "dl", out_dir=tmp_path / "o", model="char", quiet=True)
    finally:
        srv.shutdown()


def test_local_teacher_batched_generate_and_resume(tmp_path, monkeypatch):
    """--teacher=DIR: gpt.py's batched, left-padded generate; one line per train example; a rerun generates nothing."""
    monkeypatch.setattr(prepare, "TEACHER_PROMPT", "{x} => {y}:")      # short: the tiny model has 64 positions
    rows = [dict(text=t, label=l) for t, l in (("a cat", "pos"), ("the long dog ran", "neg"), ("x", "pos"))]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    real = prepare.GPT.generate
    monkeypatch.setattr(prepare.GPT, "generate", lambda self, idx, *a, **k: calls.append(idx.shape) or real(self, idx, *a, **k))
    kw = dict(task="custom", train_file=tmp_path / "t.jsonl", val_file=tmp_path / "t.jsonl", model="char",
              teacher=str(ROOT / "tests" / "fixtures" / "gpt2"), teacher_max_new_tokens=6, quiet=True)
    texts = {}
    for batch in (3, 1):
        m = prepare.prepare(out_dir=tmp_path / f"b{batch}", teacher_batch=batch, **kw)
        lines = [json.loads(l) for l in (tmp_path / f"b{batch}" / "rationales.jsonl").read_text().splitlines()]
        assert [l["idx"] for l in lines] == [0, 1, 2] and m["rationale_source"].startswith("teacher:")
        assert sum(m["dropped"].values()) == 3                   # a random tiny model never writes the marker
        texts[batch] = [l["rationale"] for l in lines]
        assert all(texts[batch])                                # it did generate text
    assert len(calls) == 4 and calls[0][0] == 3 and texts[3] == texts[1]   # left-padded batch == one at a time
    prepare.prepare(out_dir=tmp_path / "b3", teacher_batch=3, **kw)
    assert len(calls) == 4                                                  # resume: nothing generated twice
    with pytest.raises(prepare.PrepareError, match=r"needs \d+ \+ 60 tokens, more than its 64 positions"):
        prepare.prepare(out_dir=tmp_path / "long", **{**kw, "teacher_max_new_tokens": 60})
