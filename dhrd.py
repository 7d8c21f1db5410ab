"""
Dual-Head Reasoning Distillation (arXiv 2509.21487): train a decoder LM with a pooled classification head
on the input x and its LM head (the reasoning head) on the teacher rationale, in ONE forward pass (Eq. 4).
At test time only the pooled head runs: one forward pass over x, no decoding.

    python dhrd.py                                          # synth task, small scratch GPT, CPU, minutes
    python dhrd.py --task=cb --init_from=gpt2 --alpha=1 --beta=1
    torchrun --nproc_per_node=8 dhrd.py --task=cb --init_from=gpt2
    python dhrd.py --init_from=resume --out_dir=out-cb      # continue after an interruption
    python dhrd.py --init_from=out-cb --eval_only=True
    python dhrd.py --init_from=out-cb --predict=inputs.jsonl --predictions=preds.jsonl
Config: the defaults below <- JSON config files (positional) <- --key=value. Data: prepare.py.
"""
import copy, difflib, json, math, os, random, shutil, sys, time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare
from gpt import GPT, GPTConfig, CheckpointError, add_lora, dual_loss, lora_disabled, native_dtype, save_lora

@dataclass
class Config:
    # I/O
    task: str = "synth"             # a task prepared by prepare.py (synth is prepared on the fly)
    data_dir: str = ""              # default: data/<task>
    out_dir: str = ""               # default: out-<task>
    init_from: str = "scratch"      # 'scratch' (small GPT) | 'resume' | hub name | HF folder | a dhrd out_dir
    eval_only: bool = False         # evaluate init_from on eval_split, print the metrics, exit
    eval_split: str = "val"
    predict: str = ""               # in.jsonl: rows with "text" (a formatted x) or raw task rows
    predictions: str = ""           # out.jsonl (default: <predict>.pred.jsonl): label + probabilities per x
    mlflow: bool = False            # log params/metrics to MLflow when the package is importable
    # the method (paper Eq. 4): L = beta * L_cls + alpha * L_lm
    alpha: float = 1.0              # reasoning head weight; 0 = pooled baseline (no rationales needed)
    beta: float = 1.0               # pooled head weight; 0 = CoT-only model, evaluated by decoding the answer
    alpha_schedule: str = "constant"  # 'constant' | 'linear' (anneal alpha to 0 by max_iters; paper §6 future work)
    lm_targets: str = "all"         # 'all' next-token targets of s = [x, r, y] (paper Eq. 3) | 'rationale' (r, y only)
    head: str = "linear"            # 'linear' (bias-free, HF `score`) | 'mlp' (paper's 2-layer MLP)
    pooling: str = "last"           # 'last' real token of x (paper) | 'mean' over x
    cot_tokens: int = 128           # beta=0: max new tokens when decoding reasoning + answer at eval
    kl_coef: float = 0.0            # + kl_coef * KL(p_model || p_base), LM head at the L_lm targets (README: recipe)
    # LoRA (paper App. E.4: r=16, alpha=32, dropout 0.1, all projections; only adapters + pooled head train)
    lora_rank: int = 0; lora_alpha: float = 32.0; lora_dropout: float = 0.1  # noqa: E702  (rank 0 = full fine-tuning)
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # gate_proj: skipped where absent
    # the scratch model (sized for synth)
    n_layer: int = 2; n_head: int = 4; n_embd: int = 256  # noqa: E702  (n_embd 128: too small for the LM + pooled head)
    dropout: float = 0.0
    # optimisation
    batch_size: int = 32            # per-process micro-batch
    gradient_accumulation_steps: int = 1  # for the whole job; divided among DDP ranks (global batch is fixed)
    max_iters: int = 600            # optimizer steps
    learning_rate: float = 1e-3
    min_lr_frac: float = 0.1        # decay to learning_rate * min_lr_frac
    warmup_iters: int = 30
    lr_decay: str = "cosine"        # 'cosine' | 'linear'
    weight_decay: float = 0.1
    grad_clip: float = 1.0          # 0 = off
    # eval / logging / system
    eval_interval: int = 100        # also the checkpoint interval
    log_interval: int = 20
    eval_batch_size: int = 128
    seed: int = 1337
    device: str = "auto"            # 'auto' | 'cpu' | 'cuda' | 'cuda:N'
    dtype: str = "auto"             # 'auto' (gpt.native_dtype) | 'float32' | 'bfloat16' | 'float16'
    compile: bool = False


CHOICES = dict(alpha_schedule=("constant", "linear"), lm_targets=("all", "rationale"), head=("linear", "mlp"), pooling=(
    "last", "mean"), lr_decay=("cosine", "linear"), dtype=("auto", "float32", "bfloat16", "float16"), eval_split=prepare.SPLITS)

class ConfigError(ValueError):
    """A bad key/value, file or run state; the message says which and how to fix it."""

def _set(d, key, value, where):
    """Type-checked assignment of one config value; `where` names the flag or file for the message."""
    types = {f.name: type(f.default) for f in fields(Config)}
    if key not in types:
        close = difflib.get_close_matches(key, types, n=3, cutoff=0.5)
        raise ConfigError(f"{where}: unknown config key '{key}'" + (f"; did you mean {', '.join(close)}?" if close else "")
                          + f" (keys: {', '.join(types)})")
    t, v = types[key], value
    if isinstance(value, str) and t is not str:  # text from the command line
        try:
            v = {"true": True, "1": True, "false": False, "0": False}.get(value.lower()) if t is bool else t(value)
        except ValueError:
            pass
    v = float(v) if t is float and type(v) is int else v
    if type(v) is not t:
        raise ConfigError(f"{where}: expected {t.__name__} for {key} (like {getattr(Config, key)!r}), got {value!r}")
    if key in CHOICES and v not in CHOICES[key]:
        raise ConfigError(f"{where}: {key}={v!r} is not one of {', '.join(CHOICES[key])}")
    d[key] = v

def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e})") from None

def parse_config(argv):
    """defaults <- (resume / eval of an out_dir: its config.json) <- JSON file <- --key=value."""
    d, layers = asdict(Config()), {}
    for a in argv:  # applied in order, later wins: JSON config files and --key=value
        flag, (k, eq, v) = a.startswith("--"), a[2:].partition("=")
        if flag and not eq:
            raise ConfigError(f"argument '{a}': use --key=value")
        obj = {k: v} if flag else _read_json(a, "config file")
        if not isinstance(obj, dict):
            raise ConfigError(f"{a}: a config file is one JSON object {{\"key\": value}}")
        for k, v in obj.items():
            _set(layers, k, v, f"--{k}" if flag else a)
    d.update(layers)
    # a run directory remembers its config: resume / eval / predict need only --out_dir or --init_from
    run = d["out_dir"] or f"out-{d['task']}" if d["init_from"] == "resume" else d["init_from"]
    if Path(run, "config.json").exists() and (d["init_from"] == "resume" or Path(run, "model").is_dir()):
        base = {k: v for k, v in _read_json(Path(run, "config.json"), "run config").items()
                if k not in ("init_from", "eval_only", "predict", "predictions", "eval_split")}
        d = {**d, **{k: v for k, v in base.items() if k in d}, **layers}
        d["out_dir"] = d["out_dir"] if "out_dir" in layers or d["init_from"] == "resume" else run
    d["data_dir"] = d["data_dir"] or f"data/{d['task']}"
    d["out_dir"] = d["out_dir"] or f"out-{d['task']}"
    if min(d["gradient_accumulation_steps"], d["batch_size"], d["eval_interval"], d["log_interval"]) < 1:
        raise ConfigError("batch_size, gradient_accumulation_steps, eval_interval and log_interval must be >= 1")
    return Config(**d)

# ------------------------------------------------------------------------------------------------------------
# official metrics (SuperGLUE): accuracy; CB macro-F1 + accuracy; MultiRC F1 over all answers (F1a) + exact
# match per question; COPA: per pair, the alternative with the higher P(Yes). An unparsed CoT answer = -1 (wrong).

def _f1(t, p):  # binary F1 of boolean arrays
    return 2 * int((t & p).sum()) / (int(t.sum()) + int(p.sum())) if t.any() or p.any() else 0.0

def metrics(kind, probs, gold, groups, pos=1):
    """probs [N,K] (a zero row = no prediction), gold [N] label ids, groups [N], pos = the 'Yes'/'True' label id."""
    pred = np.where(probs.max(1) > 0, probs.argmax(1), -1)
    acc = float((pred == gold).mean())
    if kind == "cb":  # macro-F1 over the classes seen in gold or predictions (sklearn's 'macro', SuperGLUE)
        cls = sorted((set(gold.tolist()) | set(pred.tolist())) - {-1})
        return {"f1": float(np.mean([_f1(gold == c, pred == c) for c in cls])), "accuracy": acc}
    by = {g: np.flatnonzero(groups == g) for g in np.unique(groups)}  # MultiRC: question, COPA: pair
    if kind == "multirc":
        return {"f1a": _f1(gold == pos, pred == pos), "em": float(np.mean([(pred[ix] == gold[ix]).all() for ix in by.values()]))}
    if kind == "copa":
        return {"accuracy": float(np.mean([gold[ix[int(np.argmax(probs[ix, pos]))]] == pos for ix in by.values()]))}
    return {"accuracy": acc}

# ------------------------------------------------------------------------------------------------------------
# data: prepare.py's memory-mapped splits. The training order is an endless stream of seeded epoch permutations,
# cut into micro-batches; micro-batch j of step s is the same whatever the number of ranks (rank r runs j = r*M..).

def load_split(data_dir, split, meta):
    idx = Path(data_dir, f"{split}.idx.npy")
    if not idx.exists():
        raise ConfigError(f"{idx}: missing; {data_dir} has splits {', '.join(meta['counts'])}")
    return np.memmap(Path(data_dir, f"{split}.bin"), dtype=meta["token_dtype"], mode="r"), np.load(idx)

def stream(n, seed, start, count):
    """Example ids at positions [start, start + count) of an endless stream of seeded epoch permutations of n."""
    first = start // n
    perms = [np.random.default_rng([seed, e]).permutation(n) for e in range(first, (start + count - 1) // n + 1)]
    return np.concatenate(perms)[start - first * n:start - first * n + count]

def make_batch(toks, rows, pad, lm, span, device):
    """rows [B,5] -> right-padded idx, attention mask, x_len, y, lm_targets ([x, r, y] when lm, else x only).
    lm_targets[b,t] = idx[b,t+1] for the targets of Eq. 3: every next token of s ('all') or of r, y ('rationale')."""
    ends = rows[:, 2] if lm else rows[:, 1]
    ids = np.full((len(rows), int(ends.max())), pad, dtype=np.int64)
    for b, (s, e) in enumerate(zip(rows[:, 0], ends)):
        ids[b, :e] = toks[s:s + e]
    t, tgt = np.arange(ids.shape[1])[None], None
    if lm:
        first = 0 if span == "all" else rows[:, 1:2] - 1  # the last x token predicts the first rationale token
        tgt = np.full_like(ids, -100)
        tgt[:, :-1] = np.where((t[:, 1:] < ends[:, None]) & (t[:, :-1] >= first), ids[:, 1:], -100)
    dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)
    return (dev(ids), dev((t < ends[:, None]).astype(np.int64)), dev(rows[:, 1].copy()), dev(rows[:, 3].copy()),
            None if tgt is None else dev(tgt))

# ------------------------------------------------------------------------------------------------------------
# inference: the pooled head (one forward over x, paper §3), or for a CoT-only model (beta=0) greedy decoding
# of "Reasoning: ... Final Answer: y" and parsing the verbalised label. Length-sorted batches: minimal padding.

@torch.no_grad()
def class_probs(model, seqs, meta, cot, device, ctx, bs, cot_tokens, tok=None):
    model.eval()
    pad, out = meta["pad_id"] if meta["pad_id"] is not None else 0, np.zeros((len(seqs), len(meta["labels"])))
    verbal = {v: i for i, v in enumerate(meta["verbalizers"][l] for l in meta["labels"])}
    order = np.argsort([len(s) for s in seqs], kind="stable")
    for i in range(0, len(seqs), bs):
        chunk = order[i:i + bs]
        L = max(len(seqs[j]) for j in chunk)
        ids, mask = np.full((len(chunk), L), pad, dtype=np.int64), np.zeros((len(chunk), L), dtype=np.int64)
        for b, j in enumerate(chunk):
            s = slice(L - len(seqs[j]), L) if cot else slice(0, len(seqs[j]))  # generate wants left padding
            ids[b, s], mask[b, s] = seqs[j], 1
        ids, mask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
        with ctx:
            if not cot:
                out[chunk] = F.softmax(model.classify(ids, mask).float(), -1).cpu().numpy()
                continue
            new = min(cot_tokens, model.config.block_size - L)
            gen = model.generate(ids, new, eos_token_id=meta["eos_id"], attention_mask=mask)[:, L:].tolist()
        for b, j in enumerate(chunk):  # the label word after the last "\nFinal Answer:\n" (paper App. E.2)
            text = tok.decode(gen[b][:gen[b].index(meta["eos_id"])] if meta["eos_id"] in gen[b] else gen[b])
            y = text.rsplit(prepare.SUFFIX_Y, 1)[1].strip() if prepare.SUFFIX_Y in text else None
            if y in verbal:
                out[j, verbal[y]] = 1.0
    model.train()
    return out

def evaluate(model, split, meta, cot, device, ctx, cfg, tok):
    toks, rows = split
    probs = class_probs(model, [toks[s:s + x] for s, x in rows[:, :2]], meta, cot, device, ctx,
                        cfg.eval_batch_size, cfg.cot_tokens, tok)
    pos = next((i for i, l in enumerate(meta["labels"]) if meta["verbalizers"][l] == "Yes"), len(meta["labels"]) - 1)
    return metrics(meta["metric"], probs, rows[:, 3], rows[:, 4], pos)

# ------------------------------------------------------------------------------------------------------------
# checkpoints: torch.save to a temporary name + os.replace (atomic), loaded with weights_only=True, so RNG
# states are stored as tensors / plain lists. The best model is exported in HF layout (+ dhrd's meta.json).

def rng_state():
    n = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                numpy=[n[0], torch.from_numpy(n[1].astype(np.int64)), *n[2:]], python=list(random.getstate()))

def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    torch.cuda.set_rng_state_all(s["cuda"]) if s["cuda"] and torch.cuda.is_available() else None
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))

def save_atomic(obj, path):  # a kill mid-write leaves the previous checkpoint intact
    torch.save(obj, path.with_name(path.name + ".tmp")), os.replace(path.with_name(path.name + ".tmp"), path)

def export(model, path, meta, cfg):  # written aside, then swapped in by renames
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, labels=meta["labels"])
    info = {**meta, "eval": "cot" if cfg.beta == 0 else "pooled", "pooling": cfg.pooling}  # what predict needs
    (tmp / "meta.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    os.replace(path, old) if path.exists() else None
    os.replace(tmp, path), shutil.rmtree(old, ignore_errors=True)

def predict(model, meta, cot, tok, device, ctx, cfg):
    """Rows with "text" (a formatted x) or raw task rows (formatted like prepare.py) -> {"line", "text", "label", "probs"}."""
    texts, lines, bos = [], [], [] if meta["bos_id"] is None else [meta["bos_id"]]
    for ln, row in prepare.read_jsonl(cfg.predict):
        try:
            xs = [row["text"]] if "text" in row else prepare.format_input(meta["task"], row, meta.get("format", "paper"))
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{cfg.predict}:{ln}: not a formatted row (field 'text') nor a raw {meta['task']} row "
                              f"(missing field {e})") from None
        texts, lines = texts + xs, lines + [ln] * len(xs)
    seqs = [bos + tok.encode(t) for t in texts]
    too_long = next((ln for ln, s in zip(lines, seqs) if len(s) > model.config.block_size), None)
    if too_long:
        raise ConfigError(f"{cfg.predict}:{too_long}: longer than the model's {model.config.block_size} tokens")
    probs = class_probs(model, seqs, meta, cot, device, ctx, cfg.eval_batch_size, cfg.cot_tokens, tok)
    out = Path(cfg.predictions or Path(cfg.predict).with_suffix(".pred.jsonl"))
    with open(out, "w") as f:
        for ln, t, p in zip(lines, texts, probs):
            f.write(json.dumps({"line": ln, "text": t, "label": meta["labels"][int(p.argmax())] if p.max() > 0 else None,
                                "probs": dict(zip(meta["labels"], map(float, p)))}, ensure_ascii=False) + "\n")
    print(f"dhrd.py: {len(texts)} predictions -> {out}")
    return out

# ------------------------------------------------------------------------------------------------------------
def main(argv):
    cfg = parse_config(argv)
    # --- DDP (torchrun sets RANK): NCCL on CUDA, Gloo on CPU; rank 0 logs, evaluates and checkpoints
    ddp = "RANK" in os.environ
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) if ddp else (0, 0, 1)
    device = cfg.device if cfg.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    if ddp:
        device = f"cuda:{local}" if dev_type == "cuda" else device
        torch.cuda.set_device(device) if dev_type == "cuda" else None
        dist.init_process_group("nccl" if dev_type == "cuda" else "gloo")
    if cfg.gradient_accumulation_steps % world:
        raise ConfigError(f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} (whole job) must be a multiple of {world}")
    master, micro = rank == 0, cfg.gradient_accumulation_steps // world
    dtype, why = (cfg.dtype, "--dtype") if cfg.dtype != "auto" else native_dtype(device)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(dev_type, dtype=getattr(torch, dtype))
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):  # per rank (dropout); DDP broadcasts rank 0's init
        seed_fn(cfg.seed + rank)
    out_dir = Path(cfg.out_dir)

    # --- model for eval_only / predict: a dhrd out_dir or an exported/HF folder; then the data it was made for
    if cfg.eval_only or cfg.predict:
        folder = Path(cfg.init_from, "model") if Path(cfg.init_from, "model", "config.json").exists() else Path(cfg.init_from)
        meta = _read_json(folder / "meta.json" if (folder / "meta.json").exists() else Path(cfg.data_dir, "meta.json"), "meta")
        model = GPT.from_pretrained(folder, pooling=meta.get("pooling", cfg.pooling)).to(device)
        cot, tok = meta.get("eval") == "cot" or cfg.beta == 0, prepare.tokenizer_from_meta(meta)
        print(f"dhrd.py: {'predict' if cfg.predict else 'eval'} {folder} | {device} {dtype} ({why})", file=sys.stderr)
        if cfg.predict:
            return predict(model, meta, cot, tok, device, ctx, cfg)
        val = evaluate(model, load_split(cfg.data_dir, cfg.eval_split, meta), meta, cot, device, ctx, cfg, tok)
        print(json.dumps({"task": meta["task"], "split": cfg.eval_split, "model": str(cfg.init_from), cfg.eval_split: val}))
        return val

    # --- data (synth is prepared on the fly: the embedded default)
    if not Path(cfg.data_dir, "meta.json").exists():
        if cfg.task != "synth":
            raise ConfigError(f"{cfg.data_dir}/meta.json: not found; run `python prepare.py --task={cfg.task} "
                              f"--model=<the model you train> --out_dir={cfg.data_dir}` first")
        if master:
            prepare.prepare(task="synth", out_dir=cfg.data_dir,
                            model="char" if cfg.init_from in ("scratch", "resume") else cfg.init_from)
        dist.barrier() if ddp else None
    meta = _read_json(Path(cfg.data_dir, "meta.json"), "prepared data's meta")
    train, val_split = load_split(cfg.data_dir, "train", meta), load_split(cfg.data_dir, "val", meta)
    if (train[1][:, 3] < 0).any():
        raise ConfigError(f"{cfg.data_dir}/train.jsonl: line {int(np.argmax(train[1][:, 3] < 0)) + 1} has no label")
    use_lm = cfg.alpha > 0  # alpha=0: the pooled baseline needs no rationale, so x alone is fed (no LM work)
    if use_lm and cfg.lm_targets == "rationale" and (train[1][:, 2] == train[1][:, 1]).all():
        raise ConfigError(f"{cfg.data_dir}: no training example has a rationale/answer suffix; use --alpha=0")
    tok, pad, cot = prepare.tokenizer_from_meta(meta), meta["pad_id"] if meta["pad_id"] is not None else 0, cfg.beta == 0

    # --- model: scratch | resume | pretrained
    ckpt = None
    if cfg.init_from == "resume":
        if not (out_dir / "ckpt.pt").exists():
            raise ConfigError(f"{out_dir}/ckpt.pt: no checkpoint to resume from; pass the run's --out_dir")
        ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
        model = GPT(GPTConfig(**ckpt["model_config"]))  # its weights are loaded below, once the adapters exist
    elif cfg.init_from == "scratch":
        block = max(v["n"] for v in meta["max_len"].values())
        model = GPT(GPTConfig(vocab_size=meta["vocab_size"], block_size=-(-block // 64) * 64, n_layer=cfg.n_layer, n_head=cfg.n_head,
                              n_embd=cfg.n_embd, dropout=cfg.dropout, num_labels=len(meta["labels"]), head=cfg.head,
                              pooling=cfg.pooling, bos_token_id=meta["bos_id"], eos_token_id=meta["eos_id"], pad_token_id=meta["pad_id"]))
    else:
        model = GPT.from_pretrained(cfg.init_from, num_labels=len(meta["labels"]), head=cfg.head, pooling=cfg.pooling,
                                    dropout=cfg.dropout)
    if meta["vocab_size"] > model.config.vocab_size:
        raise ConfigError(f"{cfg.data_dir}: tokenized with {meta['tokenizer']} ({meta['vocab_size']} ids), more than the "
                          f"model's vocab_size {model.config.vocab_size}; prepare the data with --model={cfg.init_from}")
    if not use_lm and not model.config.tie_word_embeddings:
        model.lm_head.weight.requires_grad_(False)  # unused: DDP would wait for its gradient forever
    if cfg.lora_rank:  # frozen base: every trainable tensor (adapters, score) gets a gradient each step, so plain DDP
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if cfg.kl_coef and not use_lm:
        raise ConfigError("--kl_coef acts at the LM targets, which --alpha=0 does not build; use alpha > 0")
    model.load_state_dict(ckpt["model"]) if ckpt else None
    model.to(device)
    # the KL reference: with LoRA the same network with its adapters off; else a frozen copy of the initial weights
    ref = None if not cfg.kl_coef else model if cfg.lora_rank else copy.deepcopy(model).requires_grad_(False).eval()
    ref.load_state_dict(ckpt["kl_ref"]) if ckpt and ref is not None and ref is not model else None
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95), dev_type)
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "float16")
    it, pos, best = 0, 0, {"score": -math.inf, "iter": None, "val": None}
    if ckpt:  # the lr schedule is a function of `it`; the data order of `pos`; rank 0's RNG streams are restored
        optimizer.load_state_dict(ckpt["optimizer"]), scaler.load_state_dict(ckpt["scaler"]), set_rng_state(ckpt["rng"])
        it, pos, best = ckpt["iter"], ckpt["data_pos"], ckpt["best"]
        torch.manual_seed(cfg.seed + rank + 1000 * it) if rank else None  # other ranks: reseeded deterministically
    raw = model  # evaluation, checkpoints and export use the plain module
    model = torch.compile(model) if cfg.compile else model
    model = DDP(model, device_ids=[local] if dev_type == "cuda" else None) if ddp else model

    # --- logs: out_dir/config.json (resolved), log.jsonl (a resumed run drops the lines after its checkpoint)
    log_path, mlf = out_dir / "log.jsonl", None
    if master:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
        keep = [l for l in log_path.read_text().splitlines() if json.loads(l)["iter"] <= it] if ckpt and log_path.exists() else []
        log_path.write_text("".join(l + "\n" for l in keep))
        print(f"dhrd.py: {cfg.task} {meta['counts']} | {cfg.init_from} {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M "
              f"params ({sum(p.numel() for p in raw.parameters() if p.requires_grad) / 1e6:.2f}M trained) | {device} {dtype} ({why}) | "
              f"{world} x {micro} x {cfg.batch_size} | alpha {cfg.alpha} beta {cfg.beta}", flush=True)
        if cfg.mlflow:  # optional: never a hard dependency
            try:
                import mlflow as mlf
                mlf.start_run(), mlf.log_params(asdict(cfg))
            except ImportError:
                print("dhrd.py: --mlflow=True but the mlflow package is not installed; logging to log.jsonl only")

    def log(d):
        with open(log_path, "a") as f:
            f.write(json.dumps(d) + "\n")
        if mlf:
            mlf.log_metrics({k: float(v) for k, v in {**d, **d.get("val", {})}.items() if k not in ("iter", "val")
                             and v is not None}, step=d["iter"])

    def lr_at(i):  # linear warmup, then cosine or linear decay to learning_rate * min_lr_frac
        if i < cfg.warmup_iters:
            return cfg.learning_rate * (i + 1) / (cfg.warmup_iters + 1)
        frac = min(1.0, (i - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_decay == "cosine" else 1 - frac
        return cfg.learning_rate * (cfg.min_lr_frac + decay * (1 - cfg.min_lr_frac))

    # --- the loop: one optimizer step = gradient_accumulation_steps micro-batches over all ranks
    t0 = t_last = time.time()
    saved = it if ckpt else None  # iter of the last checkpoint this run wrote or resumed from
    G, B = cfg.gradient_accumulation_steps, cfg.batch_size
    while it < cfg.max_iters:
        for g in optimizer.param_groups:
            g["lr"] = lr = lr_at(it)
        alpha = cfg.alpha * (1 - it / cfg.max_iters) if cfg.alpha_schedule == "linear" else cfg.alpha
        sums = torch.zeros(4, device=device)
        for m in range(micro):
            rows = train[1][stream(len(train[1]), cfg.seed, pos + (rank * micro + m) * B, B)]
            idx, mask, x_len, y, lm_targets = make_batch(train[0], rows, pad, use_lm, cfg.lm_targets, device)
            model.require_backward_grad_sync = m == micro - 1  # DDP: all-reduce gradients on the last micro-step only
            kl_ref = None
            if ref is not None:  # the base model's hidden states at the valid LM targets: no grad, no dropout
                with torch.no_grad(), ctx, lora_disabled(ref):
                    kl_ref = (ref.eval().hidden_states(idx, mask)[lm_targets != -100], ref.lm_head.weight)
                raw.train()
            with ctx:
                # ONE forward over s = [x, rationale, answer]: pooled logits at x_len, reasoning-head loss on s
                out = model(idx, mask, x_len, lm_targets, kl_ref)
                # paper Eq. 4: beta L_cls + alpha L_lm; plus kl_coef * KL(p_model || p_base) when --kl_coef > 0
                loss, loss_cls = dual_loss(out, y, alpha, cfg.beta, cfg.kl_coef)
                loss_lm = out.loss_lm
                loss_kl = out.loss_kl if out.loss_kl is not None else loss_cls.new_zeros(())
            scaler.scale(loss / micro).backward()
            sums += torch.stack([loss, loss_cls, loss_lm if use_lm else loss.new_zeros(()), loss_kl]).detach().float()
        pos += B * G
        if ddp:
            dist.all_reduce(sums)  # the job's mean over all G micro-batches: identical on every rank
        loss_v, cls_v, lm_v, kl_v = (sums / G).tolist()
        if not math.isfinite(loss_v):
            last = f"{out_dir}/ckpt.pt (iter {saved})" if saved is not None else "none written by this run yet"
            raise FloatingPointError(f"non-finite loss at iter {it + 1}: loss {loss_v}, loss_cls {cls_v}, loss_lm {lm_v} (lr {lr:.3g})"
                                     f"; stopped without saving. Last good checkpoint: {last}. Lower --learning_rate or use float32")
        if cfg.grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer), scaler.update(), optimizer.zero_grad(set_to_none=True)
        it += 1
        if master and (it % cfg.log_interval == 0 or it == 1):
            dt, t_last = (time.time() - t_last) / (1 if it == 1 else cfg.log_interval), time.time()
            print(f"iter {it}: loss {loss_v:.4f} (cls {cls_v:.4f}, lm {lm_v:.4f}) lr {lr:.2e} {dt * 1000:.0f}ms/it", flush=True)
            log(dict(iter=it, loss=loss_v, loss_cls=cls_v, loss_lm=lm_v if use_lm else None, lr=lr, alpha=alpha,
                     **({"loss_kl": kl_v} if ref is not None else {})))
        if it % cfg.eval_interval == 0 or it == cfg.max_iters:
            if master:
                val = evaluate(raw, val_split, meta, cot, device, ctx, cfg, tok)
                print(f"iter {it}: val " + " ".join(f"{k} {v:.4f}" for k, v in val.items()), flush=True)
                log(dict(iter=it, val=val))
                if (sc := float(np.mean(list(val.values())))) > best["score"]:  # the mean of the task's metrics (SuperGLUE)
                    best = {"score": sc, "iter": it, "val": val}
                    export(raw, out_dir / "model", meta, cfg)  # LoRA merged in: a plain HF folder
                    save_lora(raw, out_dir / "adapter") if cfg.lora_rank else None  # + the adapters alone (megabytes)
                save_atomic(dict(model=raw.state_dict(), model_config=asdict(raw.config), optimizer=optimizer.state_dict(),
                                 scaler=scaler.state_dict(), scheduler={"iter": it, "lr": lr}, iter=it, data_pos=pos,
                                 best=best, rng=rng_state(), config=asdict(cfg), **({} if ref in (None, raw) else
                                 {"kl_ref": ref.state_dict()})), out_dir / "ckpt.pt")  # full fine-tuning's KL base
            saved = it
            dist.barrier() if ddp else None  # the other ranks wait for rank 0's evaluation and checkpoint

    if master:
        res = {"task": cfg.task, "metric": meta["metric"], "val": best["val"], "best_iter": best["iter"]}
        (out_dir / "results.json").write_text(json.dumps(res, indent=1) + "\n")
        vals = " ".join(f"{k} {v:.4f}" for k, v in best["val"].items())
        print(f"dhrd.py: {cfg.task} val {vals} (best at iter {best['iter']}) in {time.time() - t0:.0f}s -> {out_dir}/results.json")
        mlf.end_run() if mlf else None
    return best["val"]

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FloatingPointError) as e:  # ConfigError, CheckpointError, PrepareError, non-finite loss
        sys.exit(f"dhrd.py: error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
