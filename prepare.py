"""
Turn raw data into what dhrd.py trains on (paper arXiv 2509.21487, App. E.2/E.3).

    python prepare.py                                   # synth: embedded, offline, char tokenizer
    python prepare.py --task=cb --model=gpt2 --data_dir=data/superglue
    python prepare.py --task=rte --model=gpt2 --rationales=rte_rationales.jsonl
    python prepare.py --task=cqa --model=gpt2 --data_dir=data/distill_step_by_step
    python prepare.py --task=custom --train_file=a.csv --val_file=b.jsonl --model=gpt2

Output in out_dir (default data/<task>): meta.json and per split S: S.bin (flat token ids), S.idx.npy (int64
[N,5]: start, x_len, n, label, group) and S.jsonl (idx, group, text, label, rationale). Example i is
bin[start:start+n]; its first x_len tokens are the input x (BOS first where the tokenizer has one); when the
label is known a suffix "\\nReasoning:\\n{r}\\nFinal Answer:\\n{y}" + EOS follows (paper App. E.2; without a
rationale just "\\nFinal Answer:\\n{y}" + EOS). Same inputs -> byte-identical outputs.
"""
import csv, hashlib, io, json, os, random, sys, zipfile
from pathlib import Path
import numpy as np

# synth: the embedded default task. Variable tracking mod `mod`: "a=3,b=a+4,c=b-a,d=c+7;d>4?" -> Yes/No.
# The label needs every intermediate value; the rationale spells them out ("b=3+4=7,c=7-3=4,d=4+7=1"), so a
# small train set with rationales (DHRD, alpha>0) can beat the pooled baseline (alpha=0). Tune here only.
SYNTH = dict(seed=1337, n_train=1000, n_val=500, n_test=500, steps=4, mod=10, ops="+-", p_const=0.5)

SUFFIX_R, SUFFIX_Y = "\nReasoning:\n", "\nFinal Answer:\n"   # paper App. E.2: s = [x, <REASON>, r, <ANS>, y]
SPLITS = ("train", "val", "test")


class PrepareError(ValueError):
    """Bad input: the message names the file, line and field, and says how to fix it."""


def fail(msg):
    raise PrepareError(msg)


# ----------------------------------------------------------------------------------------------------------
# tokenizers: BPE from gpt.py, or a char tokenizer for synth (ids: the chars, then BOS, EOS, PAD)

class CharTokenizer:
    def __init__(self, chars):
        self.chars, self.stoi = chars, {c: i for i, c in enumerate(chars)}
        self.bos_id, self.eos_id, self.pad_id = len(chars), len(chars) + 1, len(chars) + 2
        self.vocab_size, self.name = len(chars) + 3, "char"

    def encode(self, s):
        bad = sorted(set(s) - set(self.stoi))
        if bad:
            fail(f"characters {bad} are not in the char vocabulary {self.chars!r}")
        return [self.stoi[c] for c in s]

    def decode(self, ids):
        return "".join(self.chars[i] for i in ids if i < len(self.chars))


def tokenizer_from_meta(meta):
    """The tokenizer a prepared folder was made with (meta = the parsed meta.json)."""
    t = meta["tokenizer"]
    if t["type"] == "char":
        return CharTokenizer(t["chars"])
    from gpt import load_tokenizer
    return load_tokenizer(t["name"])


# ----------------------------------------------------------------------------------------------------------
# synth: seeded generator, train/val/test disjoint, labels balanced by rejection

def synth_data(seed, n_train, n_val, n_test, steps, mod, ops, p_const):
    rng, seen, out = random.Random(seed), set(), {}
    names = "abcdefghijklmnopqrstuvwxyz"[:steps + 1]
    for split, n in zip(SPLITS, (n_train, n_val, n_test)):
        rows, per_label = [], {"No": 0, "Yes": 0}
        while len(rows) < n:
            vals = {"a": rng.randrange(mod)}
            stmts, steps_r = [f"a={vals['a']}"], []
            for j in range(1, steps + 1):
                prev, v, op = names[j - 1], names[j], rng.choice(ops)
                if j == 1 or rng.random() < p_const:
                    argv = rng.randrange(1, mod); arg = str(argv)
                else:
                    arg = rng.choice(names[:j - 1]); argv = vals[arg]
                vals[v] = (vals[prev] + argv if op == "+" else vals[prev] - argv if op == "-" else vals[prev] * argv) % mod
                stmts.append(f"{v}={prev}{op}{arg}")
                steps_r.append(f"{v}={vals[prev]}{op}{argv}={vals[v]}")
            last = names[steps]
            x = ",".join(stmts) + f";{last}>{mod // 2 - 1}?"
            label = "Yes" if vals[last] > mod // 2 - 1 else "No"
            if x in seen or per_label[label] >= (n + 1) // 2:
                continue
            seen.add(x); per_label[label] += 1
            rows.append(dict(parts=("", "", x), label=label, rationale=",".join(steps_r)))
        out[split] = rows
    return out


# ----------------------------------------------------------------------------------------------------------
# tokenize + write. Truncation never cuts the question at the end of x: the passage is shortened instead.

def encode_x(tok, parts, max_len, where):
    head, passage, tail = parts
    bos = [] if tok.bos_id is None else [tok.bos_id]
    text = head + passage + tail
    ids = bos + tok.encode(text)
    if len(ids) <= max_len:
        return ids, text, False
    p = tok.encode(passage)
    k = len(p)
    while len(ids) > max_len:
        k -= len(ids) - max_len
        if k <= 0:
            fail(f"{where}: the input without its passage is longer than --max_len={max_len} tokens; raise --max_len")
        text = head + tok.decode(p[:k]) + tail
        ids = bos + tok.encode(text)
    return ids, text, True


def encode_suffix(tok, rationale, y, max_rationale):
    """"\\nReasoning:\\n{r}\\nFinal Answer:\\n{y}" + EOS; the rationale is cut to max_rationale tokens (answer kept)."""
    eos = [] if tok.eos_id is None else [tok.eos_id]
    if y is None:
        return [], False
    if rationale is None:
        return tok.encode(SUFFIX_Y + y) + eos, False
    r = tok.encode(rationale)
    clipped = len(r) > max_rationale
    if clipped:
        rationale = tok.decode(r[:max_rationale])
    return tok.encode(SUFFIX_R + rationale + SUFFIX_Y + y) + eos, clipped


def write_splits(out_dir, splits, labels, verbalizers, tok, max_len, max_rationale):
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size < 65536 else np.uint32
    stats = dict(counts={}, max_len={}, shortened=0, rationale_clipped=0)
    for split, exs in splits.items():
        if not exs:
            fail(f"split '{split}' of task has no examples; check the input file for that split")
        toks, rows, lines = [], [], []
        for i, e in enumerate(exs):
            x, text, short = encode_x(tok, e["parts"], max_len, f"{split} example {i}")
            y = None if e["label"] is None else verbalizers[e["label"]]
            s, clipped = encode_suffix(tok, e.get("rationale"), y, max_rationale)
            stats["shortened"] += short; stats["rationale_clipped"] += clipped
            group = e.get("group", i)
            rows.append((len(toks), len(x), len(x) + len(s), -1 if e["label"] is None else labels.index(e["label"]), group))
            toks += x + s
            lines.append(json.dumps(dict(idx=i, group=group, text=text, label=e["label"], rationale=e.get("rationale")),
                                    ensure_ascii=False))
        np.array(toks, dtype=dtype).tofile(out_dir / f"{split}.bin")
        idx = np.array(rows, dtype=np.int64).reshape(-1, 5)
        np.save(out_dir / f"{split}.idx.npy", idx)
        (out_dir / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        stats["counts"][split] = len(exs)
        stats["max_len"][split] = dict(x=int(idx[:, 1].max()), n=int(idx[:, 2].max()))
    return dict(token_dtype=np.dtype(dtype).name, **stats)


# ----------------------------------------------------------------------------------------------------------
# prepare(): load -> rationales -> ablation -> tokenize -> write

def prepare(task="synth", out_dir=None, model="gpt2", data_dir=None, fmt="paper", max_len=512, max_rationale=256,
            seed=1337, quiet=False):
    out_dir = Path(out_dir or f"data/{task}")
    if task == "synth":
        splits = synth_data(**SYNTH)
        labels, verbalizers, metric, sources = ["No", "Yes"], {"No": "No", "Yes": "Yes"}, "accuracy", {}
        chars = sorted(set("".join(e["parts"][2] + e["rationale"] for exs in splits.values() for e in exs)
                           + SUFFIX_R + SUFFIX_Y + "YesNo"))
        tok, tok_meta = CharTokenizer("".join(chars)), dict(type="char", chars="".join(chars))
    else:
        fail(f"unknown task '{task}'")
    stats = write_splits(out_dir, splits, labels, verbalizers, tok, max_len, max_rationale)
    meta = dict(task=task, format=fmt, labels=labels, verbalizers=verbalizers, metric=metric, tokenizer=tok_meta,
                vocab_size=tok.vocab_size, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, **stats,
                sources=sources, ablation="none", rationale_source="synth" if task == "synth" else None, dropped={},
                synth=SYNTH if task == "synth" else None)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if not quiet:
        print(f"prepare.py: {task} -> {out_dir}: " + ", ".join(f"{k} {v}" for k, v in stats["counts"].items()),
              file=sys.stderr)
    return meta


def main(argv):
    kw = {}
    for a in argv:
        k, eq, v = a.removeprefix("--").partition("=")
        if not a.startswith("--") or not eq:
            sys.exit(f"prepare.py: bad argument '{a}'; use --key=value")
        kw["fmt" if k == "format" else k] = int(v) if v.lstrip("-").isdigit() else v
    try:
        prepare(**kw)
    except PrepareError as e:
        sys.exit(f"prepare.py: {e}")
    except TypeError as e:
        sys.exit(f"prepare.py: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
