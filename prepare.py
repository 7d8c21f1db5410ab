"""
Turn raw data into what dhrd.py trains on (paper arXiv 2509.21487, App. E.2/E.3).

    python prepare.py                                   # synth: embedded, offline, char tokenizer
    python prepare.py --task=cb --model=gpt2 --data_dir=data/superglue
    python prepare.py --task=rte --model=gpt2 --teacher_url=http://localhost:8000/v1 --teacher_model=NAME
    python prepare.py --task=custom --train_file=a.csv --val_file=b.jsonl --model=gpt2

Output in out_dir (default data/<task>): meta.json and per split S: S.bin (flat token ids), S.idx.npy
(int64 [N,5]: start, x_len, n, label, group) and S.jsonl (idx, group, text, label, rationale). Example i is
bin[start:start+n]; its first x_len tokens are the input x (BOS first where the tokenizer has one); when the
label is known a suffix "\\nReasoning:\\n{r}\\nFinal Answer:\\n{y}" + EOS follows (paper App. E.2; without a
rationale just "\\nFinal Answer:\\n{y}" + EOS). Same inputs -> byte-identical outputs. They are written to
out_dir.tmp (with links to the other files of out_dir, such as a teacher's rationales.jsonl) and swapped in
whole: a kill leaves the old outputs or the new ones, never a mix (the next run completes a cut swap).
"""
import csv
import email.utils
import hashlib
import http.client
import inspect
import io
import ipaddress
import json
import operator
import os
import random
import shutil
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

from gpt import GPT, CheckpointError, download, load_tokenizer, native_dtype
from hf import Tokenizer, hub_commit, resolve_model_dir
from plumbing import (ConfigError, Progress, WriteError, begin_dir, disk_error, parse_flags, recover_dir,
                      replace_dir)

# synth, the embedded default: modular arithmetic, "a=79,b=a-74;b>49?" -> No, rationale "b=79-74=5". The
# label needs the intermediate value the rationale spells out, so rationales (alpha>0) can help a pooled head
# trained on 1000 examples. Measured (README): steps >= 2 (mod 10) leave the default model at chance either
# way. Tune here only.
SYNTH = dict(seed=1337, n_train=1000, n_val=500, n_test=500, steps=1, mod=100, ops="+-", p_const=0.5)
SYNTH_OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}

# paper App. E.2: s = [x, <REASON>, r, <ANS>, y]
SUFFIX_R = "\nReasoning:\n"
SUFFIX_Y = "\nFinal Answer:\n"
SPLITS = ("train", "val", "test")

# S.idx.npy holds one int64 row of 5 per example (the file format dhrd.py reads); its columns:
# the example is bin[START:START + N], its first X_LEN tokens are x; LABEL = index into meta["labels"], -1
# when unknown (test); GROUP = the question (MultiRC) or pair (COPA) it belongs to, else its own index.
START, X_LEN, N, LABEL, GROUP = range(5)


class PrepareError(ValueError):
    """Bad input: the message names the file, line and field, and says how to fix it."""


def fail(msg):
    raise PrepareError(msg)


# ----------------------------------------------------------------------------------------------------------
# tokenizers: BPE from gpt.py, or a char tokenizer for synth (ids: the chars, then BOS, EOS, PAD)

class CharTokenizer:
    def __init__(self, chars):
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.bos_id = len(chars)
        self.eos_id = len(chars) + 1
        self.pad_id = len(chars) + 2
        self.vocab_size = len(chars) + 3
        self.name = "char"

    def encode(self, s):
        if bad := sorted(set(s) - set(self.stoi)):
            fail(f"characters {bad} are not in the char vocabulary {self.chars!r}")
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i < len(self.chars))


def tokenizer_from_meta(meta):
    """The tokenizer a prepared folder was made with (meta = the parsed meta.json)."""
    t = meta["tokenizer"]
    if t["type"] == "char":
        return CharTokenizer(t["chars"])
    return load_tokenizer(t["name"], revision=t.get("revision") or "main")


# ----------------------------------------------------------------------------------------------------------
# synth: seeded generator, train/val/test disjoint, labels balanced by rejection

def synth_example(rng, steps, mod, ops, p_const):
    """One random program "a=..,b=a-..;b>49?" -> (x, label, rationale). Draws from rng in a fixed order."""
    names = "abcdefghijklmnopqrstuvwxyz"[:steps + 1]
    vals = {"a": rng.randrange(mod)}
    stmts = [f"a={vals['a']}"]
    steps_r = []
    for j in range(1, steps + 1):
        prev = names[j - 1]
        v = names[j]
        op = rng.choice(ops)
        if j == 1 or rng.random() < p_const:   # a constant operand (always for the first step)
            argv = rng.randrange(1, mod)
            arg = str(argv)
        else:   # an earlier variable
            arg = rng.choice(names[:j - 1])
            argv = vals[arg]
        vals[v] = SYNTH_OPS[op](vals[prev], argv) % mod
        stmts.append(f"{v}={prev}{op}{arg}")
        steps_r.append(f"{v}={vals[prev]}{op}{argv}={vals[v]}")
    x = ",".join(stmts) + f";{names[steps]}>{mod // 2 - 1}?"
    label = "Yes" if vals[names[steps]] >= mod // 2 else "No"
    return x, label, ",".join(steps_r)


def synth_data(seed, n_train, n_val, n_test, steps, mod, ops, p_const):
    rng = random.Random(seed)
    seen = set()
    out = {}
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        rows = []
        per_label = {"No": 0, "Yes": 0}
        while len(rows) < n:
            x, label, rationale = synth_example(rng, steps, mod, ops, p_const)
            if x in seen or per_label[label] >= (n + 1) // 2:
                continue
            seen.add(x)
            per_label[label] += 1
            rows.append(dict(parts=("", "", x), label=label, rationale=rationale))
        out[split] = rows
    return out


# ----------------------------------------------------------------------------------------------------------
# reading files: every error names the file and line

def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_text(path):
    """A data file's text: UTF-8 (with or without a BOM), else an error naming the line of the first bad
    byte."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        fail(f"{path}:{line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); re-save the "
             f"file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {Path(path).name}`")


def read_jsonl(path):
    """[(line number, object)] of a JSON Lines file; blank lines are skipped."""
    if not Path(path).exists():
        fail(f"{path}: file not found")
    rows = []
    for ln, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((ln, json.loads(line)))
        except json.JSONDecodeError as e:
            fail(f"{path}:{ln}: malformed JSON ({e.msg} at column {e.colno}); fix or delete this line")
    return rows


def read_table(path):
    """custom data: .csv (header row), .jsonl, or .json (an array, or JSON Lines) -> [(line, dict)]."""
    path = Path(path)
    if not path.exists():
        fail(f"{path}: file not found")
    if path.suffix == ".csv":
        text = io.StringIO(read_text(path), newline="")
        return [(ln, row) for ln, row in enumerate(csv.DictReader(text), 2)]
    if path.suffix == ".json" and read_text(path).lstrip().startswith("["):
        try:   # "line" = the array item
            return list(enumerate(json.loads(read_text(path)), 1))
        except json.JSONDecodeError as e:
            fail(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the file")
    return read_jsonl(path)


def field(row, key, where):
    if not isinstance(row, dict) or row.get(key) in (None, ""):
        fail(f"{where}: missing field '{key}'")
    return row[key]


# ----------------------------------------------------------------------------------------------------------
# SuperGLUE with the paper's single UnifiedQA-style template (App. E.2). Every task becomes
# "Passage: P\nQuestion: Q\nAnswer: A\nIs the answer correct Yes or No?"; only P is ever shortened.
# Task mappings (paper App. E.2): MultiRC one example per candidate answer (group = question, for F1a/EM);
# COPA one example per alternative (group = the pair); CB/RTE entailment (the hypothesis is the candidate
# answer); WiC same meaning; WSC pronoun refers to. --format=native keeps each task's own label space (CB
# 3-way, COPA choice 1/2) on the same text; binary tasks differ only in their label names.

SUPERGLUE_URL = os.environ.get("DHRD_SUPERGLUE_URL", "https://dl.fbaipublicfiles.com/glue/superglue/data/v2")
SUPERGLUE = {  # task: (folder, metric, native labels, native verbalizers)
    "boolq": ("BoolQ", "accuracy", ["False", "True"], ["No", "Yes"]),
    "cb": ("CB", "cb", ["entailment", "contradiction", "neutral"], ["Yes", "No", "Maybe"]),
    "copa": ("COPA", "copa", ["choice1", "choice2"], ["1", "2"]),
    "multirc": ("MultiRC", "multirc", ["False", "True"], ["No", "Yes"]),
    "rte": ("RTE", "accuracy", ["entailment", "not_entailment"], ["Yes", "No"]),
    "wic": ("WiC", "accuracy", ["False", "True"], ["No", "Yes"]),
    "wsc": ("WSC", "accuracy", ["False", "True"], ["No", "Yes"]),
}
# Task mapping of paper App. E.2: CB/RTE ask whether the hypothesis (the candidate answer) is entailed by the
# premise (the passage); WiC marks the target word in both sentences; WSC asks whether the pronoun refers to
# the candidate. COPA's questions are ours (the paper gives the candidate alternative as the answer only).
ENTAIL_Q = "Is the hypothesis entailed by the premise?"
COPA_Q = {"cause": "What was the cause of this?", "effect": "What happened as a result?"}
# e-SNLI / ANLI (not in the paper): the template their README experiments ran on, kept so that they reproduce
NLI_Q = "What can be concluded from the passage?"


def qa(passage, question, answer, choices="Yes or No"):
    """The paper's single UnifiedQA-style template (App. E.2): each field name on its own line,
    then its text."""
    tail = f"\nQuestion:\n{question}\nAnswer:\n{answer}\nIs the answer correct {choices}?"
    return ("Passage:\n", passage, tail)


def nli_qa(premise, hypothesis):
    """e-SNLI / ANLI x: Passage/Question/Answer on one line each (their README experiments' format)."""
    tail = f"\nQuestion: {NLI_Q}\nAnswer: {hypothesis}\nIs the answer correct Yes, No or Maybe?"
    return ("Passage: ", premise, tail)


def mark(sentence, start, end):
    """WiC: the target word in *asterisks* (App. E.2: 'with the target word marked'),
    by its character span."""
    return f"{sentence[:start]}*{sentence[start:end]}*{sentence[end:]}"


def superglue_items(task, r, fmt="paper"):
    """One raw SuperGLUE row -> [(parts, native label or None, sub-group)]. KeyError names a missing field."""
    y = r.get("label")
    if task == "boolq":
        return [(qa(r["passage"], r["question"] + "?", "Yes"), y, 0)]
    if task in ("cb", "rte"):
        choices = "Yes, No or Maybe" if fmt == "native" and task == "cb" else "Yes or No"
        return [(qa(r["premise"], ENTAIL_Q, r["hypothesis"], choices), y, 0)]
    if task == "wic":
        first = mark(r["sentence1"], r["start1"], r["end1"])
        second = mark(r["sentence2"], r["start2"], r["end2"])
        question = f"Does the word \"{r['word']}\" have the same meaning in sentences 1 and 2?"
        return [(qa(f"1. {first} 2. {second}", question, "Yes"), y, 0)]
    if task == "wsc":
        t = r["target"]
        question = f"Does the pronoun \"{t['span2_text']}\" refer to \"{t['span1_text']}\"?"
        return [(qa(r["text"], question, "Yes"), y, 0)]
    if task == "copa":
        q = COPA_Q[r["question"]]
        if fmt == "native":   # one example per pair
            tail = (f"\nQuestion:\n{q}\nOption 1:\n{r['choice1']}\nOption 2:\n{r['choice2']}\n"
                    "Which option is correct 1 or 2?")
            label = None if y is None else f"choice{y + 1}"
            return [(("Passage:\n", r["premise"], tail), label, 0)]
        return [(qa(r["premise"], q, r[f"choice{k}"]), None if y is None else y == k - 1, 0) for k in (1, 2)]
    if task == "multirc":
        return [(qa(r["passage"]["text"], q["question"], a["text"]), a.get("label"), j)
                for j, q in enumerate(r["passage"]["questions"]) for a in q["answers"]]


def format_input(task, row, fmt="paper"):
    """Raw task row -> [x text] (MultiRC/COPA rows give several). Other tasks: x is the row's "text"
    (KeyError if none)."""
    if task in SUPERGLUE:
        return ["".join(parts) for parts, _, _ in superglue_items(task, row, fmt)]
    return [row["text"]]


def superglue_file(task, data_dir, split):
    folder = Path(data_dir) / SUPERGLUE[task][0]
    if not (folder / "val.jsonl").exists():   # fetch the official zip (gpt.py's resumable download)
        url = f"{SUPERGLUE_URL}/{folder.name}.zip"
        zpath = Path(data_dir) / f"{folder.name}.zip"
        try:
            download(url, zpath, desc=zpath.name)
        except Exception as e:
            fail(f"{folder}/val.jsonl not found and downloading {url} failed ({e}); put the official "
                 f"{folder.name} files (train/val/test.jsonl) into {folder}")
        with zipfile.ZipFile(zpath) as z:
            for m in z.namelist():
                if m.startswith(folder.name + "/") and m.endswith(".jsonl") and ".." not in m:
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / Path(m).name).write_bytes(z.read(m))
        zpath.unlink()
    return folder / f"{split}.jsonl"


def load_superglue(task, data_dir, fmt):
    folder, metric, native, nat_verb = SUPERGLUE[task]
    if fmt == "native":
        labels = native
        verbalizers = dict(zip(native, nat_verb))
        if task == "copa":   # native COPA is one example per pair: plain accuracy
            metric = "accuracy"
        known = labels
    else:
        labels = ["No", "Yes"]
        verbalizers = {"No": "No", "Yes": "Yes"}
        known = ["False", "True"] if task == "copa" else native   # COPA: is this alternative the answer
    splits = {}
    sources = {}
    note = None
    for split in SPLITS:
        path = superglue_file(task, data_dir, split)
        if not path.exists():
            continue
        sources[f"{folder}/{split}.jsonl"] = sha256(path)
        exs = []
        groups = {}
        for ln, r in read_jsonl(path):
            if task == "copa" and r.get("label") not in (None, 0, 1):
                fail(f"{path}:{ln}: unknown label {r['label']!r} in field 'label'; known labels: 0, 1")
            try:
                items = superglue_items(task, r, fmt)
            except (KeyError, TypeError) as e:
                fail(f"{path}:{ln}: missing field {e}")
            for parts, y, sub in items:
                if y is not None:   # None: a test row, label unknown
                    y = {True: "True", False: "False"}.get(y, y)   # bools and MultiRC's 0/1 as in SUPERGLUE
                    if y not in known:
                        fail(f"{path}:{ln}: unknown label {y!r} in field 'label'; known labels: "
                             f"{', '.join(known)}")
                    if fmt == "paper":
                        y = "Yes" if y in ("True", "entailment") else "No"
                exs.append(dict(parts=parts, label=y, group=groups.setdefault((ln, sub), len(groups))))
        if not exs:
            fail(f"{path}: no examples; an official {folder} file has one JSON object a line")
        splits[split] = exs
    if "train" not in splits and "val" in splits:   # BoolQ's offline copy has no train.jsonl: 4/5 of val
        v = splits["val"]
        splits["train"] = [e for e in v if e["group"] % 5]
        splits["val"] = [e for e in v if e["group"] % 5 == 0]
        note = "no train.jsonl: train = val rows with row % 5 != 0, val = row % 5 == 0"
    for exs in splits.values():   # renumber groups 0..G-1 after the split
        ids = {g: j for j, g in enumerate(dict.fromkeys(e["group"] for e in exs))}
        for e in exs:
            e["group"] = ids[e["group"]]
    return dict(splits={s: splits[s] for s in SPLITS if s in splits}, labels=labels, verbalizers=verbalizers,
                metric=metric, sources=sources, note=note)


# ----------------------------------------------------------------------------------------------------------
# Real-rationale sets in the distilling-step-by-step layout (<name>/<name>_<split>.json +
# llm/<split>_CoT_<k>.json, PaLM-540B few-shot completions). Only e-SNLI/ANLI valid+test and CQA train+test
# come with rationales, so: train = the first file (esnli/anli1: valid, cqa: train) without every 10th row,
# val = every 10th row of it, test = the second file (esnli/anli1: test; cqa: test, which is the
# CommonsenseQA dev set).
DISTILL = {"esnli": ("valid", "test"), "anli1": ("valid", "test"), "cqa": ("train", "test")}
# Fetched when missing: the unzipped datasets/ folder of google-research/distilling-step-by-step (its
# datasets.zip; Apache-2.0 repository, e-SNLI/CQA MIT, ANLI CC BY-NC 4.0), from a fork that keeps it unzipped,
# at a fixed commit, each file checked against its size and sha256 here. The files of ANLI and CQA are
# byte-identical to a second, independent fork's copy of the PaLM outputs.
DISTILL_URL = os.environ.get("DHRD_DISTILL_URL", "https://raw.githubusercontent.com/maxh119Z/"
                             "distilling-step-by-step1/5b76a471c46c61f45114eab6621ffdff12d676b6/datasets")
DISTILL_FILES = {  # path under data_dir: (bytes, sha256)
    "anli1/anli1_test.json": (618821, "fe494327269367e1ac4342fd72969a6270f51fd90cef0bc47a364a1d452762e7"),
    "anli1/anli1_valid.json": (618787, "743faf5a43b687e34f5482166106e4c86a9f8f013078364a62caa055f8504704"),
    "anli1/llm/test_CoT_0.json": (492272, "49e312c60501f8d374f9d8f7ba7bf86601bc736e667eedb9087793f274a1a0f1"),
    "anli1/llm/valid_CoT_0.json": (489483, "ac3576f6caba189a7c00d1982bb2521518e5247b5aa2b347c483c874451ab935"),
    "cqa/cqa_test.json": (422767, "caf4f47b8afac62a80f0517e1af3eba2af11de0c7c6f3baf3742fb6390d99dfb"),
    "cqa/cqa_train.json": (3443547, "09601f7b3239eb4c0a3be16c4b897d0c30905e9bc38cf36c77831d98bd37d9fb"),
    "cqa/llm/test_CoT_0.json": (480252, "02860e4fa44b4c1f08ed29513abf74f433345e534c51418448b40869ed752a01"),
    "cqa/llm/test_CoT_1.json": (104190, "44f1fc36088d5beed937c204ae43ca09d74fd0ea6a784fa89207b7e88c37fb15"),
    "cqa/llm/train_CoT_0.json": (478929, "632167edcb645336a0ff1194fe87a1821fefdb02515679d178b167619903fff1"),
    "cqa/llm/train_CoT_1.json": (479710, "8d14f619696c2bf3f0989d3a47ee8120f047af4eddaf23eb64610941cb453796"),
    "cqa/llm/train_CoT_2.json": (482479, "25e559368c7e69dba359245395463a669f2fcef91a3b7b89613ff41bed0fbd8f"),
    "cqa/llm/train_CoT_3.json": (480766, "db2a50477c463dd84a4b7ee2dedae323ff8746f20ca0c4a4619c03e04140ddf5"),
    "cqa/llm/train_CoT_4.json": (479459, "52ccbf961db874a47968599f8411372a39f280f91413df7d90bcbcea291b9836"),
    "cqa/llm/train_CoT_5.json": (480749, "0d238b1c5c4be3630bf14c15a176985b4a2e7bcf5fa5a93d24e9d89ccde06974"),
    "cqa/llm/train_CoT_6.json": (482082, "af81b051cefa61be0b513f9e002b9eeab7160c18731732b59138fede91fccee4"),
    "cqa/llm/train_CoT_7.json": (477210, "0cd6eba4d2449fb295d66e3dd9998ab59f6246820ca07e0fd1cc61dfcc3e6b3d"),
    "cqa/llm/train_CoT_8.json": (471556, "02c156f92540f7b2469d252c814a2a87dad47616f828db3e7e236edd72f21b61"),
    "cqa/llm/train_CoT_9.json": (352538, "7448c4cd5a9416ccb1e0c021e2b3bf2e697dc70173ff6f08d5b64b56d5fe8038"),
    "esnli/esnli_test.json": (4068665, "2307b4f6f6aea3940b2f1e12e792b86bad2b9fa73ef7032ffa41ce9a21976b9b"),
    "esnli/esnli_valid.json": (4106433, "4952f52d3dedfcafcdea691e4cde21a3db1e6dbed1f1622bb314c418cc27e6a6"),
    "esnli/llm/test_CoT_0.json": (1477083, "58051c39aa914699c956281bf56f9bc4b65601f4fe6685b2868226f04ef738ac"),
    "esnli/llm/test_CoT_1.json": (1157792, "2bf21b5ce8feb5177e9f121f237756ea045eaf0a5fa364c4a17d1de665141eed"),
    "esnli/llm/valid_CoT_0.json": (1477343, "3398e706895422fa17ae2ed3022890d7c5009207d5c831713b605e15af5b5c52"),
    "esnli/llm/valid_CoT_1.json": (1167937, "f14d62ae2a81b8b33293cd9e8fe02b28b781d8628f4b92393c862f8903e8a122"),
}
NLI = (["entailment", "neutral", "contradiction"], ["Yes", "Maybe", "No"])   # data label 0/1/2
RATIONALE_SOURCES = ("palm", "human")
# --rationale_source=human: the field of each row that holds its human explanation (e-SNLI: the first of three
# annotators; ANLI: the annotator's reason; CQA: CoS-E's abstractive explanation)
HUMAN = {"esnli": "explanation_1", "anli1": "reason", "cqa": "abstractive_explanation"}


def parse_palm(task, s):
    """A raw PaLM completion -> (rationale, teacher label), or None without an answer marker (rules:
    PROVENANCE.md)."""
    if task == "esnli":
        r, sep, rest = s.partition("Answer:")
        if not sep:
            return None
        return r.strip(), rest.split("Premise")[0].strip()
    r, sep, y = s.split("Q:" if task == "cqa" else "Premise:")[0].partition("So the answer is")
    if not sep:
        return None
    y = y.strip().rstrip(".").strip()
    if task == "cqa" and y.startswith("(") and ")" in y:
        y = y.split(")", 1)[1].strip()   # "(c) wooded area" -> "wooded area"
    return r.strip(), y


def palm_drop_reason(got, gold):
    """Why a parsed PaLM completion is dropped, or None to keep it (paper Table 2: label-consistent only)."""
    if got is None:
        return "no_answer"
    if not got[0]:
        return "empty"
    if got[1].lower() != gold.lower():
        return "disagree"
    return None


def distill_example(task, r, where):
    """One distilling-step-by-step row -> (parts, label, gold answer text the PaLM answer must match)."""
    if task == "cqa":
        ch = field(r, "choices", where)
        options = "\n".join(f"({'abcde'[i]}) {c}" for i, c in enumerate(ch))
        q = f"Question: {field(r, 'question', where)}\nAnswer Choices:\n{options}\nWhich choice is correct?"
        if field(r, "answer", where) not in ch:
            fail(f"{where}: answer {r['answer']!r} is not one of the choices {ch}")
        return ("", "", q), "abcde"[ch.index(r["answer"])], r["answer"]
    if field(r, "label", where) not in (0, 1, 2):
        fail(f"{where}: unknown label {r['label']!r} in field 'label'; known labels: 0, 1, 2")
    parts = nli_qa(field(r, "premise", where), field(r, "hypothesis", where))
    y = NLI[0][r["label"]]
    return parts, y, y


def human_rationale(task, r, where):
    """The dataset's own human explanation of row r (--rationale_source=human), or None when it is empty."""
    text = field(r, HUMAN[task], where)
    if not isinstance(text, str):
        fail(f"{where}: field {HUMAN[task]!r} must be a string (the human explanation), not "
             f"{type(text).__name__}")
    return text.strip() or None


def palm_completions(base, fsplit, path, n_rows):
    """(the PaLM completions of a split in row order, their files): llm/<split>_CoT_<k>.json, k = 0, 1, ..
    in numeric order, not by name."""
    files = []
    while (base / "llm" / f"{fsplit}_CoT_{len(files)}.json").exists():
        files.append(base / "llm" / f"{fsplit}_CoT_{len(files)}.json")
    cot = []
    for f in files:
        cot += json.loads(read_text(f))
    if len(cot) != n_rows:
        fail(f"{base}/llm/{fsplit}_CoT_*.json: {len(cot)} completions for {n_rows} rows of {path}")
    return cot, files


def fetch_distill(task, data_dir, rationale_source):
    """Download what data_dir lacks of `task` (DISTILL_FILES, sizes and sha256 checked), in two parts: the
    rows, and the PaLM completions (llm/, for --rationale_source=palm only). A part of which any file is
    there already is a local copy and is used as it is."""
    for part in ("rows", "palm"):
        files = {rel: pin for rel, pin in DISTILL_FILES.items()
                 if rel.startswith(f"{task}/") and ("/llm/" in rel) == (part == "palm")}
        if part == "palm" and rationale_source != "palm":
            continue
        if any((Path(data_dir) / rel).exists() for rel in files):
            continue
        for rel, (size, sha) in files.items():
            dest = Path(data_dir) / rel
            try:
                download(f"{DISTILL_URL}/{rel}", dest, size, sha, desc=rel)
            except OSError as e:
                fail(f"{dest}: not found, and downloading it failed ({e}); put the distilling-step-by-step "
                     f"datasets/ folder (its <task>/ subfolders) into {data_dir}, or pass --data_dir=DIR")


def load_distill(task, data_dir, rationale_source="palm"):
    """rationale_source 'palm': the PaLM-540B completion, kept only when its answer is the gold label
    (paper Table 2: label-consistent rationales); 'human': the dataset's own explanation (HUMAN), consistent
    with the gold label by construction."""
    if rationale_source not in RATIONALE_SOURCES:
        fail(f"unknown --rationale_source={rationale_source}; use {' or '.join(RATIONALE_SOURCES)}")
    fetch_distill(task, data_dir, rationale_source)
    base = Path(data_dir) / task
    splits = {}
    sources = {}
    dropped = {}
    for fsplit in DISTILL[task]:
        path = base / f"{task}_{fsplit}.json"
        if not path.exists():
            fail(f"{path}: file not found; unpack the distilling-step-by-step datasets into {data_dir}")
        rows = read_jsonl(path)
        cot_files = []
        if rationale_source == "palm":
            cot, cot_files = palm_completions(base, fsplit, path, len(rows))
        for f in [path] + cot_files:
            sources[str(f.relative_to(data_dir))] = sha256(f)
        exs = []
        for i, (ln, r) in enumerate(rows):
            where = f"{path}:{ln}"
            parts, y, gold = distill_example(task, r, where)
            if rationale_source == "human":
                rationale = human_rationale(task, r, where)
                reason = None if rationale else "empty"
            else:
                got = parse_palm(task, cot[i])
                reason = palm_drop_reason(got, gold)
                rationale = None if reason else got[0]
            if reason:
                dropped[f"{fsplit}/{reason}"] = dropped.get(f"{fsplit}/{reason}", 0) + 1
            exs.append(dict(parts=parts, label=y, rationale=rationale))
        if fsplit == DISTILL[task][0]:
            splits["train"] = [e for i, e in enumerate(exs) if i % 10]
            splits["val"] = exs[::10]
        else:
            splits["test"] = exs
    if task == "cqa":
        labels = list("abcde")
        verb = [f"({c})" for c in "abcde"]
    else:
        labels, verb = NLI
    source = "palm-540b (distilling-step-by-step)"
    if rationale_source == "human":
        source = f"human ({HUMAN[task]})"
    return dict(splits={s: splits[s] for s in SPLITS}, labels=labels, verbalizers=dict(zip(labels, verb)),
                metric="accuracy", sources=sources, dropped=dropped, rationale_source=source)


# ----------------------------------------------------------------------------------------------------------
# custom: --train_file/--val_file[/--test_file], CSV/JSON/JSONL with text, label, optional rationale.
# --text_field picks another text column; --filter=COLUMN=VALUE keeps only matching rows (evidence-binding
# CSV: --text_field=sentence --filter=status=verified; README). The label set is inferred from train, stored.

def label_order(v):
    """Sort key of custom label names: integers numerically first, then the other names."""
    if v.lstrip("-").isdigit():
        return (0, int(v), "")
    return (1, 0, v)


def load_custom(files, text_field="text", filter=None):
    col, _, val = (filter or "").partition("=")
    splits = {}
    sources = {}
    dropped = {}
    raw = {}
    for split, path in files.items():
        if path is None:
            continue
        rows = read_table(path)
        sources[Path(path).name] = sha256(path)
        if col:
            kept = [(ln, r) for ln, r in rows if str(r.get(col)) == val]
            if len(kept) < len(rows):
                dropped[f"{split}/filtered"] = len(rows) - len(kept)
                rows = kept
        raw[split] = [(f"{path}:{ln}", r) for ln, r in rows]
        if not rows:
            after = f" after --filter={filter}" if col else ""
            fail(f"{path}: split '{split}' is empty{after}")
    if "train" not in raw:
        fail("task custom needs --train_file=FILE (CSV, JSON or JSONL with text,label[,rationale])")
    names = sorted({str(field(r, "label", w)) for w, r in raw["train"]}, key=label_order)
    for split, rows in raw.items():
        exs = []
        for w, r in rows:
            y = r.get("label")
            if split != "test" or y not in (None, ""):   # test rows may come without a label
                y = str(field(r, "label", w))
                if y not in names:
                    fail(f"{w}: unknown label {y!r} in field 'label'; known labels (from train): "
                         f"{', '.join(names)}")
            rationale = str(r.get("rationale") or "").strip()
            exs.append(dict(parts=("", str(field(r, text_field, w)), ""), label=y or None,
                            rationale=rationale or None))
        splits[split] = exs
    has_rationales = any(e["rationale"] for e in splits["train"])
    return dict(splits=splits, labels=names, verbalizers={n: n for n in names}, metric="accuracy",
                sources=sources, dropped=dropped, rationale_source="file" if has_rationales else None)


# ----------------------------------------------------------------------------------------------------------
# Rationales. File format, one JSON object per line: {"task", "split", "idx", "rationale",
# "label"}, idx = position of the example in the prepared split (S.jsonl "idx"). Teachers append to such a
# file.

# Paper App. E.3 (our wording of its rules): label-conditioned, 2-5 sentences, no answer words inside the
# reasoning, then the "[END OF REASONING]" marker and the answer.
TEACHER_PROMPT = ("Here is a task and its correct answer. Explain step by step, in 2 to 5 sentences, why the "
                  "correct answer is right, using only the information given. Do not use the words Yes, No, "
                  "True or False in your reasoning. After the reasoning write [END OF REASONING] on its own "
                  "line, then \"Answer: \" followed by the correct answer.\n\n{x}\n\nCorrect answer: {y}\n")
RETRY_BASE = 1.0   # seconds; backoff RETRY_BASE * 2**attempt on 429/5xx/timeouts (tests lower it)
RETRY_AFTER_MAX = 300.0  # seconds: a server that asks to wait longer (Retry-After) fails the request now


def parse_teacher(text):
    """Teacher output -> (rationale, answer); answer None when the marker or the answer line is missing."""
    r, sep, rest = text.partition("[END OF REASONING]")
    ans = ""
    if sep:
        ans = rest.partition("Answer:")[2].strip().split("\n")[0].strip().strip(".").strip()
    return r.strip(), ans or None


def agrees(ans, gold):
    """A teacher's answer (lower case) names the gold label: "yes." and "(e) sincere" agree with yes / (e)."""
    return any(ans == g or (ans.startswith(g) and not ans[len(g)].isalnum()) for g in gold)


def attach_rationales(splits, task, path, verbalizers):
    """Import a rationale file; rationales that are empty, answer-less or disagree with gold are dropped and
    counted."""
    dropped = {}
    seen = set()
    for ln, r in read_jsonl(path):
        where = f"{path}:{ln}"
        if r.get("task", task) != task:
            continue
        split = field(r, "split", where)
        i = field(r, "idx", where)
        if split not in splits or not isinstance(i, int) or not 0 <= i < len(splits[split]):
            ranges = ", ".join(f"{s} 0..{len(e) - 1}" for s, e in splits.items())
            fail(f"{where}: no example split={split!r} idx={i!r} (splits: {ranges})")
        if (split, i) in seen:
            continue   # a teacher rerun never writes twice; a hand-made duplicate: the first line wins
        seen.add((split, i))
        e = splits[split][i]
        rat = (r.get("rationale") or "").strip()
        ans = str(r.get("label") or "").strip().lower()
        gold = {str(g).lower() for g in (e["label"], verbalizers.get(e["label"])) if g}
        if not rat:
            reason = "empty"
        elif not ans:
            reason = "no_answer"
        elif not agrees(ans, gold):
            reason = "disagree"
        else:
            reason = None
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
        else:
            e["rationale"] = rat
    return dropped


def _loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name, or none
        return False


def check_teacher_url(url, allow_http):
    """https anywhere; plain http only to this machine, or anywhere with --allow_http=True: every request
    carries the API key and the task's data."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        fail(f"{url}: --teacher_url must be an http(s) URL such as https://api.openai.com/v1")
    if parts.scheme == "https" or allow_http or _loopback(parts.hostname):
        return
    fail(f"{url}: plain http to {parts.hostname}, not this machine, would send the API key and the data "
         "unencrypted; use https, or --allow_http=True on a network you trust")


class TeacherRedirects(urllib.request.HTTPRedirectHandler):
    """The API's redirects: 307/308 keep the POST and its body (301/302/303 would turn it into a GET that no
    chat API answers: an HTTP error naming the new address); the key goes to the host the user named only;
    the new address must pass check_teacher_url."""

    def __init__(self, allow_http):
        self.allow_http = allow_http

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if code not in (307, 308):
            return None
        check_teacher_url(newurl, self.allow_http)
        same = urllib.parse.urlsplit(newurl)[:2] == urllib.parse.urlsplit(req.full_url)[:2]  # scheme, host
        kept = {k: v for k, v in req.headers.items() if same or k.lower() != "authorization"}
        return urllib.request.Request(newurl, req.data, kept, method=req.get_method())


def retry_delay(attempt, retry_after):
    """Seconds before try attempt + 2: the server's Retry-After (seconds or an HTTP date) and up to 20% more,
    else RETRY_BASE * 2**attempt times 0.5..1.5; the random part keeps the workers that one 429 stopped
    together from returning together."""
    seconds = None
    if retry_after is not None:
        try:
            seconds = float(retry_after)
        except ValueError:
            try:
                seconds = email.utils.parsedate_to_datetime(retry_after).timestamp() - time.time()
            except (TypeError, ValueError):  # unparsable: ignored
                seconds = None
    if seconds is None:
        return RETRY_BASE * 2 ** attempt * random.uniform(0.5, 1.5)
    if not seconds >= 0.0:  # negative, a date in the past, nan
        seconds = 0.0
    return seconds * random.uniform(1.0, 1.2)


def completion_text(doc, url):
    """The text of an OpenAI-style chat completion; any other JSON is one clear error."""
    try:
        content = doc["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        fail(f"{url}: malformed response, no choices[0].message.content in {json.dumps(doc)[:80]}; is "
             "--teacher_url an OpenAI-compatible /v1 endpoint?")
    if content is None:  # a refusal or a tool call: no text, counted as an empty rationale
        return ""
    if not isinstance(content, str):
        fail(f"{url}: malformed response, choices[0].message.content is {type(content).__name__} "
             f"{json.dumps(content)[:40]}, not a string")
    return content


def chat(url, model, prompt, key, max_tokens, timeout, opener, stop, tries=6):
    """One OpenAI-compatible /chat/completions call with retries on 429/5xx/network errors and on a body
    that is not JSON (never logs the key); stop (set by Ctrl-C) ends the retries."""
    messages = [dict(role="user", content=prompt)]
    body = json.dumps(dict(model=model, messages=messages, temperature=0, max_tokens=max_tokens)).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    for attempt in range(tries):
        retry_after = None
        try:
            with opener.open(urllib.request.Request(url, body, headers), timeout=timeout) as f:
                raw = f.read()
            doc = json.loads(raw)
        except PrepareError:  # a redirect that check_teacher_url refused
            raise
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500:
                fail(f"{url}: HTTP {e.code} {e.reason}{_redirected(url, e)}; check --teacher_url/"
                     "--teacher_model/--api_key_env")
            err = f"HTTP {e.code}"
            retry_after = e.headers.get("Retry-After")
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
            err = f"{type(e).__name__}: {e}"
        except ValueError as e:  # a body that is not JSON (a proxy's error page, a cut-off reply)
            err = f"malformed response, not JSON ({e})"
        else:
            return completion_text(doc, url)
        delay = retry_delay(attempt, retry_after)
        if delay > RETRY_AFTER_MAX:
            fail(f"{url}: {err} with Retry-After {retry_after}: the server asks for {delay:.0f} s, more than "
                 f"the {RETRY_AFTER_MAX:.0f} s this client waits; rerun later (what is written stays)")
        if attempt + 1 < tries and stop.wait(delay):
            fail(f"{url}: cancelled")
    fail(f"{url}: gave up after {tries} tries ({err})")


def _redirected(url, e):
    """Where an HTTP error came from when the API redirects, and whether the key went along."""
    if 300 <= e.code < 400:
        return f" (moved to {e.headers.get('Location')}: pass that address as --teacher_url)"
    if e.url == url:
        return ""
    if urllib.parse.urlsplit(e.url)[:2] != urllib.parse.urlsplit(url)[:2]:
        return f" from {e.url}, where it redirected (the API key is not sent to another host)"
    return f" from {e.url}, where it redirected"


def teacher_api(todo, prompts, emit, teacher_url, teacher_model, api_key_env, workers, max_new_tokens,
                timeout, allow_http=False):
    """Rationales from an OpenAI-compatible server, `workers` requests at a time, written as they finish.
    Ctrl-C (or any error) cancels the requests not yet sent; those in flight end in the background unread."""
    key = os.environ.get(api_key_env) if api_key_env else None
    url = teacher_url.rstrip("/")
    if not url.endswith("/chat/completions"):
        url += "/chat/completions"
    check_teacher_url(url, allow_http)
    opener = urllib.request.build_opener(TeacherRedirects(allow_http))
    stop = threading.Event()
    failed = []
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futs = {pool.submit(chat, url, teacher_model, p, key, max_new_tokens, timeout, opener, stop): i
                for (i, _), p in zip(todo, prompts)}
        for fut in as_completed(futs):
            try:
                emit(futs[fut], fut.result())
            except PrepareError as e:
                failed.append(str(e))
    finally:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
    if failed:   # not written, so a rerun retries exactly these
        print(f"prepare.py: {len(failed)} teacher requests failed (last: {failed[-1]}); rerun to retry them",
              file=sys.stderr)
        if len(failed) == len(todo):
            fail(failed[-1])


def teacher_local(todo, prompts, emit, teacher, batch, max_new_tokens, teacher_dtype):
    """Rationales from a local checkpoint through gpt.py's batched KV-cache generate (greedy, left-padded)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = native_dtype(device)[0] if teacher_dtype == "auto" else teacher_dtype
    tok = load_tokenizer(teacher)
    # decoding in the weights' own dtype: a step is a few small matmuls, autocast's casts cost more
    model = GPT.from_pretrained(teacher).to(device, getattr(torch, dtype)).eval()
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    bos = [] if tok.bos_id is None else [tok.bos_id]
    block = model.config.block_size
    for b in range(0, len(todo), batch):
        ids = [bos + tok.encode(p) for p in prompts[b:b + batch]]
        T = max(map(len, ids))
        if T + max_new_tokens > block:
            fail(f"{teacher}: a prompt (train examples from idx {todo[b][0]}) needs {T} + {max_new_tokens} "
                 f"tokens, more than its {block} positions; lower --teacher_max_new_tokens")
        idx = torch.tensor([[pad] * (T - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids], device=device)
        with torch.no_grad():
            out = model.generate(idx, max_new_tokens, temperature=0.0, eos_token_id=tok.eos_id,
                                 attention_mask=mask)
        for (i, _), row in zip(todo[b:b + batch], out[:, T:].tolist()):
            if tok.eos_id in row:
                row = row[:row.index(tok.eos_id)]
            emit(i, tok.decode(row))


def run_teacher(splits, task, out_path, verbalizers, teacher=None, teacher_url=None, teacher_model=None,
                api_key_env="OPENAI_API_KEY", batch=8, workers=4, max_new_tokens=160, timeout=60.0,
                teacher_dtype="auto", quiet=False, allow_http=False):
    """Generate rationales for train: append line by line to out_path, skipping (split, idx) already there.
    Kill it (or Ctrl-C) at any point and rerun: nothing lost, nothing generated twice. Progress on stderr."""
    out_path = Path(out_path)
    done = set()
    if out_path.exists():
        raw = out_path.read_bytes()
        if raw and not raw.endswith(b"\n"):   # killed mid-line: drop the partial line
            out_path.write_bytes(raw[:raw.rfind(b"\n") + 1])
        done = {(r.get("split"), r.get("idx")) for _, r in read_jsonl(out_path) if r.get("task") == task}
    labelled = [(i, e) for i, e in enumerate(splits["train"]) if e["label"] is not None]
    todo = [(i, e) for i, e in labelled if ("train", i) not in done]
    prompts = [TEACHER_PROMPT.format(x="".join(e["parts"]), y=verbalizers[e["label"]]) for _, e in todo]
    progress = Progress(f"prepare.py: teacher rationales ({out_path.name})", len(labelled),
                        done=len(labelled) - len(todo), quiet=quiet)
    try:
        with open(out_path, "a", encoding="utf-8") as f, progress:

            def emit(i, text):   # one complete line per rationale, flushed at once
                rat, ans = parse_teacher(text)
                line = dict(task=task, split="train", idx=i, rationale=rat, label=ans)
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                f.flush()
                progress.update(progress.done + 1)

            if teacher_url:
                teacher_api(todo, prompts, emit, teacher_url, teacher_model, api_key_env, workers,
                            max_new_tokens, timeout, allow_http)
            else:
                teacher_local(todo, prompts, emit, teacher, batch, max_new_tokens, teacher_dtype)
    except KeyboardInterrupt:
        print(f"prepare.py: interrupted: {progress.done} of {len(labelled)} rationales are in {out_path}; a "
              "rerun asks for the rest", file=sys.stderr)
        raise


def ablate(exs, ablation, seed, verbalizers):
    """Paper Table 2, train split only: drop the rationales, or shuffle them (alone, or with their
    answers)."""
    if ablation == "none":
        return
    has = [e for e in exs if e.get("rationale")]
    order = random.Random(seed).sample(range(len(has)), len(has))
    moved = [(has[j]["rationale"], verbalizers[has[j]["label"]]) for j in order]
    for e, (r, y) in zip(has, moved):
        if ablation == "only_label":
            e["rationale"] = None
        elif ablation.startswith("shuffle"):
            e["rationale"] = r
        if ablation == "shuffle_reasoning_label":
            e["y"] = y   # the LM target's answer moves with its rationale; the class label stays gold


# ----------------------------------------------------------------------------------------------------------
# tokenize + write. Truncation never cuts the question at the end of x: the passage is shortened instead.

def encode_x(tok, parts, max_len, where):
    """BOS + x. Too long: cut the passage (parts[1]) token-wise until it fits. -> ids, text, shortened?"""
    head, passage, tail = parts
    bos = [] if tok.bos_id is None else [tok.bos_id]
    text = "".join(parts)
    p = None   # the passage's tokens, once x is too long
    k = None   # how many of them are kept
    while len(ids := bos + tok.encode(text)) > max_len:
        if p is None:
            p = tok.encode(passage)
            k = len(p)
        k -= len(ids) - max_len
        if k <= 0:
            fail(f"{where}: the input without its passage is longer than --max_len={max_len} tokens; "
                 "raise --max_len")
        text = head + tok.decode(p[:k]) + tail
    return ids, text, k is not None


def encode_suffix(tok, rationale, y, max_rationale):
    """The suffix + EOS; the rationale is cut to max_rationale tokens, the answer always kept.
    -> ids, clipped?"""
    if y is None:
        return [], False
    r = [] if rationale is None else tok.encode(rationale)
    clipped = len(r) > max_rationale
    if clipped:
        rationale = tok.decode(r[:max_rationale])
    if rationale is None:
        text = SUFFIX_Y + y
    else:
        text = SUFFIX_R + rationale + SUFFIX_Y + y
    eos = [] if tok.eos_id is None else [tok.eos_id]
    return tok.encode(text) + eos, clipped


# what prepare() writes into out_dir: the only files of out_dir that a new prepare replaces; all others stay
OUTPUTS = ("meta.json", *(f"{s}.{ext}" for s in SPLITS for ext in ("bin", "idx.npy", "jsonl")))


def link_or_copy(src, dst):
    """A hard link (no bytes copied: a teacher's rationales.jsonl of any size), or a copy where the file
    system has none."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_splits(out_dir, splits, labels, verbalizers, tok, max_len, max_rationale):
    """Each split's .bin, .idx.npy and .jsonl into the folder out_dir. -> the facts of meta.json."""
    dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32
    stats = dict(counts={}, max_len={}, shortened=0, rationale_clipped=0)
    for split, exs in splits.items():
        if not exs:
            fail(f"split '{split}' of task has no examples; check the input file for that split")
        toks = []
        lines = []
        idx = np.zeros((len(exs), 5), dtype=np.int64)
        for i, e in enumerate(exs):
            x, text, short = encode_x(tok, e["parts"], max_len, f"{split} example {i}")
            y = None
            if e["label"] is not None:   # the LM target's answer: an ablation's, else the verbalised label
                y = e.get("y") or verbalizers[e["label"]]
            s, clipped = encode_suffix(tok, e.get("rationale"), y, max_rationale)
            stats["shortened"] += short
            stats["rationale_clipped"] += clipped
            group = e.get("group", i)
            idx[i, START] = len(toks)
            idx[i, X_LEN] = len(x)
            idx[i, N] = len(x) + len(s)
            idx[i, LABEL] = -1 if e["label"] is None else labels.index(e["label"])
            idx[i, GROUP] = group
            toks += x + s
            row = dict(idx=i, group=group, text=text, label=e["label"], rationale=e.get("rationale"))
            lines.append(json.dumps(row, ensure_ascii=False))
        np.array(toks, dtype=dtype).tofile(out_dir / f"{split}.bin")
        np.save(out_dir / f"{split}.idx.npy", idx)
        (out_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        stats["counts"][split] = len(exs)
        stats["max_len"][split] = dict(x=int(idx[:, X_LEN].max()), n=int(idx[:, N].max()))
    return dict(token_dtype=np.dtype(dtype).name, **stats)


# ----------------------------------------------------------------------------------------------------------
# prepare(): load -> teacher/rationales -> ablation -> tokenize -> write

TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
FORMATS = ("paper", "native")
ABLATIONS = ("none", "only_label", "shuffle_reasoning", "shuffle_reasoning_label")


def load_task(task, data_dir, fmt, files, text_field, filter, rationale_source):
    """The task's examples and facts: dict(splits, labels, verbalizers, metric, sources, ...)."""
    if task == "synth":
        return dict(splits=synth_data(**SYNTH), labels=["No", "Yes"], verbalizers={"No": "No", "Yes": "Yes"},
                    metric="accuracy", sources={}, rationale_source="synth", synth=SYNTH)
    if task in SUPERGLUE:
        return load_superglue(task, data_dir or "data/superglue", fmt)
    if task in DISTILL:
        return load_distill(task, data_dir or "data/distill_step_by_step", rationale_source)
    if task == "custom":
        return load_custom(files, text_field, filter)
    fail(f"unknown --task={task}; use synth, custom, {', '.join(SUPERGLUE)}, {', '.join(DISTILL)}")


def char_vocabulary(splits, verbalizers):
    """Every character of the inputs, rationales, suffixes and answers, sorted."""
    texts = ["".join(e["parts"]) + (e.get("rationale") or "") for exs in splits.values() for e in exs]
    return "".join(sorted(set("".join(texts) + SUFFIX_R + SUFFIX_Y + "".join(verbalizers.values()))))


def prepare(task="synth", out_dir=None, model=None, data_dir=None, fmt="paper", max_len=512,
            max_rationale=256, rationales=None, rationale_source="palm", ablation="none", teacher=None,
            teacher_url=None, teacher_model=None, api_key_env="OPENAI_API_KEY", teacher_batch=8,
            teacher_workers=4, teacher_max_new_tokens=160, teacher_timeout=60.0, teacher_dtype="auto",
            allow_http=False, train_file=None, val_file=None, test_file=None, text_field="text", filter=None,
            seed=1337, revision="main", quiet=False):
    """Python entry point (dhrd.py calls prepare(task="synth", out_dir=...)). Returns the meta dict."""
    out_dir = Path(out_dir or f"data/{task}")
    recover_dir(out_dir)   # a run killed while swapping in its outputs: completed, before anything reads them
    if not model:
        model = "char" if task == "synth" else "gpt2"
    if teacher_dtype not in TEACHER_DTYPES:
        fail(f"unknown --teacher_dtype={teacher_dtype}; use auto (gpt.native_dtype), float32, bfloat16 or "
             "float16")
    if fmt not in FORMATS:
        fail(f"unknown --format={fmt}; use paper (the paper's Yes/No template) or native (each task's "
             "labels)")
    if ablation not in ABLATIONS:
        fail(f"unknown --ablation={ablation}; use none, only_label, shuffle_reasoning or "
             "shuffle_reasoning_label")
    files = dict(train=train_file, val=val_file, test=test_file)
    if rationale_source != "palm" and task not in DISTILL:
        fail(f"--rationale_source={rationale_source} is for the distilling-step-by-step tasks "
             f"({', '.join(DISTILL)}); {task} takes --rationales=FILE.jsonl or a teacher")
    D = load_task(task, data_dir, fmt, files, text_field, filter, rationale_source)
    splits = D["splits"]
    verb = D["verbalizers"]
    dropped = D.get("dropped", {})
    if teacher or teacher_url:
        if teacher_url and not teacher_model:
            fail("--teacher_url needs --teacher_model=NAME (the model name the server serves)")
        out_dir.mkdir(parents=True, exist_ok=True)
        rationales = rationales or out_dir / "rationales.jsonl"
        run_teacher(splits, task, rationales, verb, teacher, teacher_url, teacher_model, api_key_env,
                    teacher_batch, teacher_workers, teacher_max_new_tokens, float(teacher_timeout),
                    teacher_dtype, quiet, allow_http)
        D["rationale_source"] = f"teacher:{teacher_model or teacher}"
    if rationales:
        for k, n in attach_rationales(splits, task, rationales, verb).items():
            dropped[f"rationales/{k}"] = n
        D["sources"][Path(rationales).name] = sha256(rationales)
        if not (teacher or teacher_url):
            D["rationale_source"] = f"file:{Path(rationales).name}"
    ablate(splits.get("train", []), ablation, seed, verb)
    if model == "char":   # a char tokenizer made from the data (synth; or any task for a from-scratch model)
        chars = char_vocabulary(splits, verb)
        tok = CharTokenizer(chars)
        tok_meta = dict(type="char", chars=chars)
    else:  # a hub model's tokenizer at `revision`; meta.json records the commit it resolved to
        folder = resolve_model_dir(model, weights=False, revision=revision)
        tok = Tokenizer(folder, name=str(model))
        tok_meta = dict(type="bpe", name=str(model), revision=hub_commit(folder))
    tmp = begin_dir(out_dir)
    try:
        stats = write_splits(tmp, splits, D["labels"], verb, tok, int(max_len), int(max_rationale))
        meta = dict(task=task, format=fmt, labels=D["labels"], verbalizers=verb, metric=D["metric"],
                    tokenizer=tok_meta, vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id,
                    pad_id=tok.pad_id, **stats, sources=D["sources"], ablation=ablation,
                    rationale_source=D.get("rationale_source"), dropped=dropped, split_note=D.get("note"),
                    synth=D.get("synth"))
        text = json.dumps(meta, indent=1, ensure_ascii=False) + "\n"
        (tmp / "meta.json").write_text(text, encoding="utf-8")
        if out_dir.is_dir():
            shutil.copytree(out_dir, tmp, ignore=lambda d, names: OUTPUTS if Path(d) == out_dir else (),
                            copy_function=link_or_copy, dirs_exist_ok=True)
    except PrepareError:
        shutil.rmtree(tmp, ignore_errors=True)   # nothing of a failed write is kept; out_dir is as it was
        raise
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        error = disk_error(e, out_dir, tmp)
        if error is None:
            raise
        raise error from None
    replace_dir(out_dir)
    if not quiet:
        print(f"prepare.py: {task} -> {out_dir}: {stats['counts']}, shortened {stats['shortened']}, "
              f"dropped {dropped}")
    return meta


def main(argv):
    """Every keyword of prepare() is a flag (--format is fmt), typed like its default; JSON config files
    may be given as positional arguments."""
    params = inspect.signature(prepare).parameters
    defaults = {("format" if name == "fmt" else name): p.default for name, p in params.items()}
    kwargs = parse_flags(argv, defaults)
    if "format" in kwargs:
        kwargs["fmt"] = kwargs.pop("format")
    prepare(**kwargs)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:   # a bad flag: one line, no traceback; exit status 2 (usage error, as argparse)
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except (PrepareError, CheckpointError, WriteError) as e:   # bad input (file, line, field; a model), a full
        # disk: one line, exit status 1
        print(f"prepare.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:   # Ctrl-C: what is written stays (whole lines); leave now, not after the
        sys.stdout.flush()      # teacher requests in flight (the interpreter's exit would join their threads)
        sys.stderr.flush()
        os._exit(130)
