"""
Dual-Head Reasoning Distillation (arXiv 2509.21487): train a decoder LM with a pooled classification head
on the input x and its LM head (the reasoning head) on the teacher rationale, in ONE forward pass (Eq. 4).
At test time only the pooled head runs: one forward pass over x, no decoding.

    python dhrd.py                                          # synth task, small scratch GPT, CPU, minutes
    python dhrd.py --task=cb --init_from=gpt2 --alpha=1 --beta=1
    torchrun --nproc_per_node=8 dhrd.py --task=cb --init_from=gpt2
    python dhrd.py --init_from=resume --out_dir=out-cb      # continue after an interruption (as does the same
                                                            # command again: check_rerun)
    python dhrd.py --init_from=out-cb --eval_only=True
    python dhrd.py --init_from=out-cb --predict=inputs.jsonl --predictions=preds.jsonl
Config: the defaults below <- JSON config files (positional) <- --key=value. Data: prepare.py.
"""
import copy
import datetime
import functools
import importlib
import json
import math
import os
import pickle
import random
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import prepare
from gpt import (GPT, GPTConfig, CheckpointError, add_lora, dual_loss, load_tokenizer, lora_disabled,
                 native_dtype, save_lora, token_kl)
from hf import COMMIT, hub_commit, resolve_model_dir
from plumbing import (ConfigError, Progress, WriteError, atomic_write, begin_dir, fsync, parse_flags,
                      recover_dir, replace_dir)


# ------------------------------------------------------------------------------------------------------------
# the config: the defaults below <- JSON config files (positional) <- --key=value (parse_config)

@dataclass
class Config:
    # I/O
    task: str = "synth"             # a task prepared by prepare.py (synth is prepared on the fly)
    data_dir: str = ""              # default: data/<task>
    out_dir: str = ""               # default: out-<task>
    init_from: str = ""             # 'scratch' (small GPT) | 'resume' | hub name | HF folder | dhrd out_dir;
                                    # default: the model data_dir was prepared with (scratch for synth)
    revision: str = "main"          # of a hub init_from: branch, tag or commit sha; config.json and
                                    # results.json record the commit sha it resolved to
    overwrite: bool = False         # out_dir holds another run: delete it (ckpt.pt, logs, model/) and start
                                    # this one; without it a rerun continues or finishes (check_rerun)
    eval_only: bool = False         # evaluate init_from on eval_split, print the metrics, exit
    eval_split: str = "val"
    predict: str = ""               # in.jsonl: rows with "text" (a formatted x) or raw task rows
    predictions: str = ""           # out.jsonl (default: <predict>.pred.jsonl): label + probabilities per x
    mlflow: bool = False            # also log params/metrics to MLflow (imported only then)
    wandb_log: bool = False         # also log them to Weights & Biases (imported only then)
    wandb_project: str = "dhrd"
    wandb_run_name: str = ""        # default: the out_dir's name
    # the method (paper Eq. 4): L = beta * L_cls + alpha * L_lm
    alpha: float | str = 1.0        # reasoning head weight; 0 = pooled baseline (no rationales needed);
                                    # 'auto': matched to the gradients at the start (alpha_from_gradients)
    beta: float = 1.0               # pooled head weight; 0 = CoT-only model, evaluated by decoding the answer
    alpha_schedule: str = "constant"  # 'constant' | 'linear' (alpha annealed to 0; paper §6 future work)
    lm_targets: str = "all"         # 'all' next tokens of s = [x, r, y] (paper Eq. 3) | 'rationale' (r, y)
    head: str = "linear"            # 'linear' (bias-free, HF `score`) | 'mlp' (paper's 2-layer MLP)
    pooling: str = "last"           # 'last' real token of x (paper) | 'mean' over x
    cot_tokens: int = 128           # beta=0: max new tokens when decoding reasoning + answer at eval
    grad_stats: bool = False        # log the backbone gradient norms of beta L_cls, alpha L_lm, their cosine
    kl_coef: float = 0.0            # + kl_coef * KL(p_model || p_base), LM head at the L_lm targets
    # soft-target distillation of the reasoning head (paper App. F, future work), at the L_lm targets
    kd_teacher: str = ""            # dhrd out_dir | exported or HF folder | hub name; the data's tokenizer
    kd_coef: float = 0.0            # + kd_coef * T^2 * KL(p_teacher^T || p_model^T)
    kd_temperature: float = 1.0     # T: p^T = softmax(logits / T) for both models
    # LoRA (paper App. E.4: r=16, alpha=32, dropout 0.1, all projections; only adapters + pooled head train)
    lora_rank: int = 0              # 0 = full fine-tuning
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # gate_proj: where present
    # the scratch model (sized for synth)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 256               # 128: too small for the LM + pooled head
    dropout: float = 0.0
    # optimisation
    batch_size: int = 32            # per-process micro-batch
    gradient_accumulation_steps: int = 0  # for the whole job, divided among DDP ranks (the global batch is
                                          # fixed); 0 = one micro-batch per rank
    max_iters: int = 600            # optimizer steps (when max_epochs is 0)
    max_epochs: float = 0.0         # > 0: max_iters = this many epochs of the training split (resolve_epochs)
    learning_rate: float = 1e-3
    min_lr_frac: float = 0.1        # decay to learning_rate * min_lr_frac
    warmup_iters: int = 30
    lr_decay: str = "cosine"        # 'cosine' | 'linear'
    weight_decay: float = 0.1
    grad_clip: float = 1.0          # 0 = off
    patience: int = 0               # early stopping: stop after this many evaluations without a better
                                    # val score (the best model stays exported); 0 = off
    grad_checkpoint: bool = False   # recompute each block in backward: activation memory of one block, not
                                    # L, for ~1 extra forward per step (MultiRC --max_len=700, 3-8B models)
    # eval / logging / system
    eval_interval: int | str = 100  # every evaluation also writes ckpt.pt; 'epoch': the steps of one epoch
    ckpt_interval: int = 0          # steps between checkpoints besides those; 0 = eval_interval
    log_interval: int = 20
    eval_batch_size: int = 128
    seed: int = 1337
    device: str = "auto"            # 'auto' | 'cpu' | 'cuda' | 'cuda:N'
    dtype: str = "auto"             # 'auto' (gpt.native_dtype) | 'float32' | 'bfloat16' | 'float16'
    compile: bool = False
    fsdp: bool = False              # under torchrun: FSDP2 (fully_shard per block, then the root), not DDP
    dist_timeout_s: int = 1800      # under torchrun: the longest wait of a rank for the others (collectives,
                                    # rank 0's export + ckpt.pt: an 8B model's are 128 GB, 30 min at 71 MB/s)


# the values a str key may take; alpha, a float, may also be 'auto' (plumbing.flag_value has the rules)
CHOICES = dict(
    alpha=("auto",),
    alpha_schedule=("constant", "linear"),
    lm_targets=("all", "rationale"),
    head=("linear", "mlp"),
    pooling=("last", "mean"),
    lr_decay=("cosine", "linear"),
    dtype=("auto", "float32", "bfloat16", "float16"),
    eval_split=prepare.SPLITS,
    eval_interval=("epoch",),
)


# what one command does, not what the run is: never taken from a run directory's config.json
COMMAND_KEYS = ("init_from", "eval_only", "predict", "predictions", "eval_split", "overwrite")


# a rerun in an out_dir that holds a run continues it if its config is the same but for these keys: they
# change how long it trains and when it evaluates, logs and checkpoints, or what it runs on (device, compile,
# fsdp, grad_checkpoint: the same math, rounded differently; dist_timeout_s), not the model, the data or the
# loss, so its ckpt.pt stays valid (max_iters, max_epochs also move the end of the lr decay: the lr of the
# steps to come). Any other key makes it another run: refused, naming the keys (check_rerun). Trackers: where
# it logs.
RERUN_SAFE_KEYS = ("max_iters", "max_epochs", "eval_interval", "ckpt_interval", "log_interval", "patience",
                   "eval_batch_size", "device", "compile", "fsdp", "grad_checkpoint", "dist_timeout_s",
                   "mlflow", "wandb_log", "wandb_project", "wandb_run_name")


# ------------------------------------------------------------------------------------------------------------
# the run: train() is the method's loop; main() picks train, --eval_only or --predict. Everything they call
# is defined below, in reading order: the steps of a run, data, inference, metrics, files, the process;
# then, fenced, the optional features a first reading can skip (extra loss terms and the teacher,
# gradient statistics and alpha=auto, preemption, FSDP2, trackers, --eval_only / --predict).

def train(cfg, rt):
    """Train, evaluate every eval_interval steps, export the best model; -> its val metrics."""
    out_dir = Path(cfg.out_dir)
    use_lm = cfg.alpha == "auto" or cfg.alpha > 0  # alpha=0: the pooled baseline feeds x alone (no LM work)
    trackers = tracking_modules(cfg)  # first: a missing package stops the run before any work
    # --- data, model, optimizer (a resumed run: restored from ckpt.pt)
    meta, train_split, val_split = load_data(cfg, rt, use_lm)
    resolve_epochs(cfg, len(train_split[1]))  # max_epochs / eval_interval=epoch -> steps, before config.json
    ckpt = None  # a run in out_dir that parse_config let this command go on with: continued, or finished
    if (out_dir / "ckpt.pt").exists() and not cfg.overwrite:
        ckpt = read_checkpoint(out_dir)
        if finished(ckpt, cfg, rt):
            return ckpt["best"]["val"]
    tok = prepare.tokenizer_from_meta(meta)
    pad = pad_id(meta)
    check_fsdp(cfg, rt)
    hub = [(cfg.init_from, cfg.revision), (cfg.kd_teacher, "main")]
    hub = [(name, rev) for name, rev in hub if name not in ("", "scratch", "resume")]
    download_once_per_node(rt, hub)  # local rank 0 first; the others then find the files in the cache
    raw = build_model(cfg, meta, use_lm, ckpt)  # what trains; eval, checkpoints and export: full_state
    check_context(cfg.data_dir, "train", train_split[1], raw.config.block_size, x_only=not use_lm)
    check_context(cfg.data_dir, "val", val_split[1], raw.config.block_size, x_only=True)
    ref = kl_reference(cfg, raw, ckpt)
    teacher = load_teacher(cfg, meta, tok, raw, use_lm, rt)
    terms = extra_terms(cfg, raw, ref, teacher, rt.ctx)  # what Eq. 4 gets beyond its two terms
    weights = {t.name: t.weight for t in terms}
    place(raw, ref, cfg, rt)  # onto the device; --fsdp: this rank's shards, which the optimizer then holds
    optimizer = raw.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (0.9, 0.95), rt.dev_type)
    scaler = torch.amp.GradScaler(rt.dev_type, enabled=rt.dtype == "float16")
    it, pos, best = 0, 0, {"score": -math.inf, "iter": None, "val": None, "report": None, "stale": 0}
    if ckpt is not None:
        it, pos, best = resume(ckpt, raw, optimizer, scaler, cfg, rt.rank)
    model = wrap(raw, cfg, rt)
    # --- logs, and alpha=auto from the gradients at the initial weights
    log = Log(out_dir / "log.jsonl")
    if rt.master:
        start_run_files(cfg, out_dir, it, resumed=ckpt is not None)
        print(startup_line(cfg, meta, raw, rt, terms), flush=True)
        if ckpt is not None:
            print(f"dhrd.py: continuing the run in {out_dir} from its ckpt.pt at iter {it}", flush=True)
        log = Log(out_dir / "log.jsonl", *start_tracking(cfg, trackers))
    alpha_base = initial_alpha(cfg, ckpt, raw, train_split, pad, rt, log)  # cfg.alpha; 'auto': measured

    # --- the loop: one optimizer step = gradient_accumulation_steps micro-batches over all ranks
    ctx, micro = rt.ctx, rt.micro
    t0 = t_last = time.time()
    saved = it if ckpt is not None else None  # iter of the last checkpoint this run wrote or resumed from
    every = ckpt_every(cfg)
    while it < cfg.max_iters and not out_of_patience(best, cfg):
        lr = lr_at(it, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        alpha = alpha_at(it, cfg, alpha_base)
        stats = {}
        sums = torch.zeros(3 + len(terms), device=rt.device)  # loss, L_cls, L_lm, each extra term
        for m in range(micro):
            start = pos + (rt.rank * micro + m) * cfg.batch_size
            batch = micro_batch(train_split, start, cfg, pad, use_lm, rt.device)
            idx, mask, x_len, y, lm_targets = batch
            if m == 0:
                stats = step_grad_stats(cfg, rt, it + 1, raw, batch, alpha)  # --grad_stats, at log steps
            # DDP: all-reduce on the last micro-step only; FSDP reduce-scatters every one (keeps shards only)
            model.require_backward_grad_sync = m == micro - 1
            given = {t.name: (t.value, t.given(idx, mask, lm_targets)) for t in terms}  # their no-grad side
            with ctx:
                # ONE forward over s = [x, rationale, answer]: pooled logits at x_len, the LM loss on s
                out = model(idx, mask, x_len, lm_targets, given)
                loss, loss_cls = dual_loss(out, y, alpha, cfg.beta, weights)  # paper Eq. 4
            scaler.scale(loss / micro).backward()
            lm_term = out.loss_lm if use_lm else loss.new_zeros(())
            sums += torch.stack([loss, loss_cls, lm_term, *out.extra.values()]).detach().float()
        pos += cfg.batch_size * cfg.gradient_accumulation_steps
        # + whether a signal asked this rank to stop: summed with the losses, so every rank stops at this step
        sums = torch.cat([sums, torch.tensor([float(PREEMPTION.signal > 0)], device=rt.device)])
        if rt.ddp:
            dist.all_reduce(sums)  # the job's mean over all its micro-batches: identical on every rank
        *means, stop = torch.cat([sums[:-1] / cfg.gradient_accumulation_steps, sums[-1:]]).tolist()
        loss_v, cls_v, lm_v, *extra_v = means
        check_finite(loss_v, cls_v, lm_v, it, lr, out_dir, saved)
        optimizer_step(model, optimizer, scaler, cfg.grad_clip)
        it += 1
        if rt.master and logged(it, cfg):
            dt = (time.time() - t_last) / (1 if it == 1 else cfg.log_interval)
            t_last = time.time()
            print(f"iter {it}: loss {loss_v:.4f} (cls {cls_v:.4f}, lm {lm_v:.4f}) lr {lr:.2e} "
                  f"{dt * 1000:.0f}ms/it", flush=True)
            extra = {f"loss_{t.name}": v for t, v in zip(terms, extra_v)}
            log.write(dict(iter=it, loss=loss_v, loss_cls=cls_v, loss_lm=lm_v if use_lm else None, lr=lr,
                           alpha=alpha, **extra, **stats))
        at_eval = it % cfg.eval_interval == 0 or it == cfg.max_iters
        if at_eval or it % every == 0 or stop:
            plain, optim_state = full_state(raw, optimizer, cfg, rt)  # FSDP: every rank takes part
            if at_eval:
                best = validate(plain, it, best, val_split, meta, tok, cfg, rt, log)  # every rank: its share
            checkpoint(plain, optim_state, scaler, it, pos, best, alpha_base, ref, log, cfg, rt)
            del plain, optim_state
            saved = it
        if stop and it < cfg.max_iters and not out_of_patience(best, cfg):  # else the run just ends
            stop_for_requeue(it, out_dir, log)

    # --- the end: results.json holds the best evaluation
    if rt.master:
        write_results(cfg, meta, best, it, time.time() - t0)
        log.close()
    return best["val"]


def main(argv):
    cfg = parse_config(argv)
    rt = setup(cfg)
    cfg.gradient_accumulation_steps = rt.micro * rt.world  # resolved (0 -> world): config.json and resume
    if cfg.predict:
        return predict(cfg, rt)
    if cfg.eval_only:
        return eval_only(cfg, rt)
    PREEMPTION.armed = True  # a signal now stops the run at a step boundary, after a checkpoint
    return train(cfg, rt)


# ------------------------------------------------------------------------------------------------------------
# the config as a run reads it: files and flags over the defaults (parse_config), and the rule for an
# out_dir that already holds a run (check_rerun)

def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e})") from None


def parse_config(argv):
    """defaults <- (resume / eval of an out_dir: its config.json) <- JSON files <- --key=value; a training
    command then meets the rule for an out_dir that holds a run (check_rerun)."""
    d = asdict(Config())
    flags = parse_flags(argv, d, CHOICES)  # the keys that were set, applied in order, later wins
    d.update(flags)
    # a run directory remembers its config: resume / eval / predict need only --out_dir or --init_from
    resume = d["init_from"] == "resume"
    training = not (d["eval_only"] or d["predict"])
    if resume:
        run = d["out_dir"] or f"out-{d['task']}"
    else:
        run = d["init_from"]
    if run and Path(run, "config.json").exists() and (resume or Path(run, "model").is_dir()):
        saved = _read_json(Path(run, "config.json"), "run config")
        base = {k: v for k, v in saved.items() if k in d and k not in COMMAND_KEYS}
        d = {**d, **base, **flags}
        if resume:  # what the run started from: its ckpt.pt holds the rest (none yet: it starts from this)
            d["init_from"] = saved.get("init_from", "")
        if "out_dir" not in flags and not training:
            d["out_dir"] = run
    if resume and d["init_from"] == "resume":  # no run there yet: a first launch is a new run
        d["init_from"] = ""
    d["data_dir"] = d["data_dir"] or f"data/{d['task']}"
    d["out_dir"] = d["out_dir"] or f"out-{d['task']}"
    d["init_from"] = d["init_from"] or prepared_with(d["data_dir"])
    interval = 1 if d["eval_interval"] == "epoch" else d["eval_interval"]  # 'epoch': resolve_epochs
    if min(d["batch_size"], interval, d["log_interval"]) < 1 or d["ckpt_interval"] < 0:
        raise ConfigError("batch_size, eval_interval and log_interval must be >= 1 (eval_interval: or "
                          "epoch), ckpt_interval >= 0")
    if d["max_epochs"] < 0:
        raise ConfigError(f"max_epochs={d['max_epochs']}: use a number of epochs > 0, or 0 to count "
                          "max_iters")
    if d["max_epochs"] > 0 and "max_iters" in flags:
        raise ConfigError(f"max_iters={d['max_iters']} is set, but max_epochs={d['max_epochs']:g} sets the "
                          f"steps (from the data); add --max_epochs=0 to count max_iters, or drop max_iters")
    if d["gradient_accumulation_steps"] < 0:
        raise ConfigError("gradient_accumulation_steps must be >= 1, or 0 (one micro-batch per rank)")
    if training:
        check_rerun(d, resume)
    return Config(**d)


def same_value(key, saved, now):
    """A key of a run's config.json and of this command mean the same: equal, for a path the same folder
    (data/cb and /home/me/data/cb), for revision a branch or tag against the commit it resolved to."""
    if saved == now:
        return True
    if key == "revision" and isinstance(now, str) and not COMMIT.match(now):
        return True  # config.json holds the commit that the branch or tag named on the command resolved to
    paths = key in ("data_dir", "init_from", "kd_teacher") and isinstance(saved, str) and isinstance(now, str)
    return paths and bool(saved) and bool(now) and Path(saved).resolve() == Path(now).resolve()


def check_rerun(d, resume):
    """The rule for an out_dir that already holds a run (its config.json): a training command with the same
    config, RERUN_SAFE_KEYS aside, continues from its ckpt.pt or finds it finished (train); --init_from=resume
    continues it under the flags given; --overwrite=True deletes it and starts over; any other config is
    refused, naming the keys and these choices. An out_dir that is, or holds, the model it starts from is
    refused always. d: the resolved config."""
    out = Path(d["out_dir"])
    for key in ("init_from", "kd_teacher"):
        src = Path(d[key])
        if d[key] in ("", "scratch") or not src.exists():
            continue
        if out.resolve() == src.resolve() or out.resolve() in src.resolve().parents:
            raise ConfigError(f"--{key}={d[key]} is inside --out_dir={out}: the run would overwrite the "
                              "model it starts from; pass a new --out_dir")
    if resume or d["overwrite"]:
        return
    if not (out / "config.json").exists():
        left = [name for name in ("ckpt.pt", "results.json", "model") if (out / name).exists()]
        if left:
            raise ConfigError(f"{out}: holds {', '.join(left)} but no config.json, so it is not known to be "
                              "this run: pass a new --out_dir, or --overwrite=True to delete them and start "
                              "this run there")
        return
    saved = _read_json(out / "config.json", "run config")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    # gradient_accumulation_steps as setup resolves it (0: one micro-batch per rank)
    now = {**d, "gradient_accumulation_steps": d["gradient_accumulation_steps"] or world}
    ignored = set(RERUN_SAFE_KEYS) | set(COMMAND_KEYS) | {"out_dir"}  # out_dir: where the run is now
    ignored.discard("init_from")  # what it starts from is part of what the run is
    differ = [k for k in saved if k in now and k not in ignored and not same_value(k, saved[k], now[k])]
    if not differ:
        return
    changes = ", ".join(f"{k} {saved[k]!r} -> {now[k]!r}" for k in differ)
    choices = "pass a new --out_dir"
    if "init_from" not in differ:  # a run continues from its own weights, not from another model's
        flags = " ".join(f"--{k}={now[k]}" for k in differ)
        choices += f"; to continue it with these values: --init_from=resume --out_dir={out} {flags}"
    raise ConfigError(f"{out}/config.json: {out} holds a run with another config ({changes}). To keep it, "
                      f"{choices}; to delete it and start this run there: --overwrite=True")


def prepared_with(data_dir):
    """The default init_from: the model whose tokenizer prepared data_dir (its meta.json), so that
    `dhrd.py --task=cb` fine-tunes the model the data was made for; 'scratch' for a char tokenizer (synth)
    or when nothing is prepared yet."""
    meta_path = Path(data_dir, "meta.json")
    if not meta_path.exists():
        return "scratch"
    tok = _read_json(meta_path, "prepared data's meta").get("tokenizer", {})
    if tok.get("type") == "bpe":
        return tok["name"]
    return "scratch"


# ------------------------------------------------------------------------------------------------------------
# training, step by step: data, model, optimizer (restored on resume), logs, schedule, one step, validation
# and checkpoints, the results

def load_data(cfg, rt, use_lm):
    """-> (meta, train split, val split) of data_dir; synth is prepared on the fly (the embedded default)."""
    if not Path(cfg.data_dir, "meta.json").exists():
        prepare_on_the_fly(cfg, rt)
    meta = _read_json(Path(cfg.data_dir, "meta.json"), "prepared data's meta")
    train = load_split(cfg.data_dir, "train", meta)
    val = load_split(cfg.data_dir, "val", meta)
    check_split(cfg.data_dir, "train", train[1], meta)
    check_split(cfg.data_dir, "val", val[1], meta)
    rows = train[1]
    if use_lm and cfg.lm_targets == "rationale" and (rows[:, prepare.N] == rows[:, prepare.X_LEN]).all():
        raise ConfigError(f"{cfg.data_dir}: no training example has a rationale/answer suffix; use --alpha=0")
    return meta, train, val


def prepare_on_the_fly(cfg, rt):
    """A missing data_dir is prepared with the tokenizer of the model to train: synth always (the embedded
    default), a real task when --init_from names a model and prepare.py can find or download the task's
    files. Rank 0 prepares; the others wait and share its outcome (an error stops every rank)."""
    scratch = cfg.init_from in ("scratch", "resume")
    if cfg.task != "synth" and scratch:
        raise ConfigError(f"{cfg.data_dir}/meta.json: not found; run `python prepare.py "
                          f"--task={cfg.task} --model=<the model you train> "
                          f"--out_dir={cfg.data_dir}` first, or pass --init_from=<that model>")
    error = [None]
    if rt.master:
        try:
            prepare.prepare(task=cfg.task, out_dir=cfg.data_dir, model="char" if scratch else cfg.init_from,
                            revision=cfg.revision)
        except ValueError as e:  # PrepareError / ConfigError: the task's files are not to be had
            error[0] = (f"{cfg.data_dir}/meta.json: not found, and preparing {cfg.task} with the tokenizer "
                        f"of {cfg.init_from} failed: {e}")
    if rt.ddp:
        dist.broadcast_object_list(error, src=0, group=rt.host_group)  # host-side: preparing may take minutes
    if error[0] is not None:
        raise ConfigError(error[0])


def read_checkpoint(out_dir):
    """out_dir/ckpt.pt, checked: a damaged one is an error that says what is left and how to go on."""
    path = out_dir / "ckpt.pt"
    best = f"no model was exported to {out_dir}/model/ yet: start the run over with --overwrite=True"
    if Path(out_dir, "model", "config.json").exists():
        best = (f"the best model so far is intact in {out_dir}/model/: start a new run from it in a new "
                f"folder, --init_from={out_dir}/model --out_dir=<a new folder>")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as e:  # truncated, corrupt, not torch's
        reason = str(e).splitlines()[0].split(". ")[0][:100]  # torch's first sentence
        raise ConfigError(f"{path}: cannot be read, it is truncated or corrupt ({reason}); {best}") from None
    missing = list(CHECKPOINT_KEYS)
    if isinstance(ckpt, dict):
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise ConfigError(f"{path}: not a dhrd.py checkpoint (no {', '.join(missing)}); {best}")
    return ckpt


def scratch_config(cfg, meta):
    """The small GPT for synth; its context the longest prepared example, rounded up to a multiple of 64."""
    longest = max(v["n"] for v in meta["max_len"].values())
    return GPTConfig(vocab_size=meta["vocab_size"], block_size=-(-longest // 64) * 64,
                     n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout,
                     num_labels=len(meta["labels"]), head=cfg.head, pooling=cfg.pooling,
                     bos_token_id=meta["bos_id"], eos_token_id=meta["eos_id"], pad_token_id=meta["pad_id"])


def build_model(cfg, meta, use_lm, ckpt):
    """scratch | pretrained (hub name or folder) | resumed from ckpt, with its LoRA adapters; on the CPU."""
    if ckpt is not None:
        model = GPT(GPTConfig(**ckpt["model_config"]))  # weights loaded below, once the adapters exist
    elif cfg.init_from == "scratch":
        model = GPT(scratch_config(cfg, meta))
    else:
        folder = resolve_model_dir(cfg.init_from, revision=cfg.revision)
        cfg.revision = hub_commit(folder) or cfg.revision  # the commit, for config.json and results.json
        model = GPT.from_pretrained(folder, num_labels=len(meta["labels"]), head=cfg.head,
                                    pooling=cfg.pooling, dropout=cfg.dropout)
    if meta["vocab_size"] > model.config.vocab_size:
        raise ConfigError(f"{cfg.data_dir}: tokenized with {meta['tokenizer']} ({meta['vocab_size']} ids), "
                          f"more than the model's vocab_size {model.config.vocab_size}; prepare the data "
                          f"with --model={cfg.init_from}")
    if use_lm:  # an untied classifier file has no LM head: one clear line now, not a failure at step 1
        model.require_lm_head(f"--alpha={cfg.alpha} (the reasoning head's loss, Eq. 3)")
    if cfg.beta == 0:
        model.require_lm_head("--beta=0 (evaluation by decoding the answer)")
    if not use_lm and model.lm_head is not None and not model.config.tie_word_embeddings:
        model.lm_head.weight.requires_grad_(False)  # unused: DDP would wait for its gradient forever
    # LoRA's frozen base: every trainable tensor (adapters, score) gets a gradient each step, so plain DDP
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    if cfg.kl_coef and not use_lm:
        raise ConfigError("--kl_coef acts at the LM targets, which --alpha=0 does not build; use alpha > 0")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    model.grad_checkpoint = cfg.grad_checkpoint
    return model


def resume(ckpt, raw, optimizer, scaler, cfg, rank):
    """-> (iter, data position, best) of ckpt, with the optimizer, the scaler and the RNG restored (the
    weights: build_model). The lr schedule is a function of iter, the data order of the position; rank 0's
    RNG streams are restored, the other ranks reseeded deterministically."""
    load_optimizer_state(raw, optimizer, ckpt["optimizer"], cfg)
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    if rank:
        torch.manual_seed(cfg.seed + rank + 1000 * ckpt["iter"])
    return ckpt["iter"], ckpt["data_pos"], restored_best(ckpt)


def restored_best(ckpt):
    """The best evaluation in ckpt, in the key order it was saved with (ckpt.pt is rewritten byte for byte);
    a checkpoint older than the report and --patience gets them."""
    best = dict(ckpt["best"])
    best.setdefault("report", None)
    best.setdefault("stale", 0)
    return best


def finished(ckpt, cfg, rt):
    """Whether the run in out_dir is done (its results.json written, no step left: max_iters reached or out of
    --patience); then rank 0 says so. A rerun of a finished run's command changes nothing and exits 0."""
    out_dir = Path(cfg.out_dir)
    best = restored_best(ckpt)
    if not (out_dir / "results.json").exists():
        return False  # killed between its last checkpoint and results.json: train writes it
    if ckpt["iter"] < cfg.max_iters and not out_of_patience(best, cfg):
        return False
    longer = "--max_iters"
    if cfg.max_epochs > 0:
        longer = "--max_epochs"
    if rt.master:
        vals = " ".join(f"{k} {v:.4f}" for k, v in best["val"].items())
        print(f"dhrd.py: {out_dir} holds a finished run (iter {ckpt['iter']}, val {vals} at iter "
              f"{best['iter']}): nothing to do. Its model: {out_dir}/model, its results: "
              f"{out_dir}/results.json; to train it further raise {longer}, for another run pass a new "
              f"--out_dir", flush=True)
    return True


def place(raw, ref, cfg, rt):
    """The model (and a KL base) onto the run's device; under --fsdp the model becomes this rank's shards."""
    if cfg.fsdp:
        shard(raw, rt)  # in place: DTensor shards, on rt.device
    else:
        raw.to(rt.device)
    if ref is not None:
        ref.to(rt.device)


def wrap(model, cfg, rt):
    """What the loop runs: compiled (--compile=True), and in DDP under torchrun (unless --fsdp: shard did
    it already). Evaluation, checkpoints and the export use the plain module (full_state)."""
    if cfg.compile:
        model = torch.compile(model)
    if rt.ddp and not cfg.fsdp:
        model = DDP(model, device_ids=[rt.local_rank] if rt.dev_type == "cuda" else None)
    return model


RUN_FILES = ("ckpt.pt", "results.json", "log.jsonl", "model", "adapter")  # what --overwrite=True deletes


def start_run_files(cfg, out_dir, it, resumed):
    """out_dir/config.json (the resolved config) and log.jsonl: a resumed run keeps the lines up to its
    checkpoint (the lines after it are written again, identically; a line cut by a kill goes too); a new run
    starts it empty, and with --overwrite=True the files of the run that was there go first. An export cut
    between its renames is completed (plumbing.recover_dir)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.overwrite:
        for name in RUN_FILES:
            for path in (out_dir / name, out_dir / f"{name}.tmp", out_dir / f"{name}.old"):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
    for folder in ("model", "adapter"):
        recover_dir(out_dir / folder)
    write_text(out_dir / "config.json", json.dumps(asdict(cfg), indent=1) + "\n")
    log_path = out_dir / "log.jsonl"
    keep = []
    if resumed and log_path.exists():
        for line in log_path.read_text().splitlines():
            try:
                if json.loads(line)["iter"] <= it:
                    keep.append(line)
            except ValueError:  # a line a kill cut short: from after the checkpoint, it is written again
                pass
    write_text(log_path, "".join(l + "\n" for l in keep))


class Log:
    """out_dir/log.jsonl, one JSON object a line (training lines: iter, loss..; evaluation lines: iter, val),
    and the same numbers to MLflow and wandb when they run (val metrics as val/<name>)."""

    def __init__(self, path, mlflow=None, wandb_run=None):
        self.path = path
        self.mlflow = mlflow
        self.wandb_run = wandb_run

    def write(self, d):
        with open(self.path, "a") as f:
            f.write(json.dumps(d) + "\n")
        flat = {k: v for k, v in d.items() if k not in ("iter", "val") and v is not None}
        flat.update({f"val/{k}": v for k, v in d.get("val", {}).items()})
        values = {k: float(v) for k, v in flat.items()}
        if self.mlflow is not None:
            self.mlflow.log_metrics(values, step=d["iter"])
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=d["iter"])

    def close(self):
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def startup_line(cfg, meta, model, rt, terms):
    params = sum(p.numel() for p in model.parameters()) / 1e6  # a DTensor shard counts its full size
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    line = (f"dhrd.py: {cfg.task} {meta['counts']} | {cfg.init_from} {params:.2f}M params "
            f"({trained:.2f}M trained) | {rt.device} {rt.dtype} ({rt.dtype_why}) | "
            f"global batch {rt.world * rt.micro * cfg.batch_size} = {rt.world} processes x {rt.micro} "
            f"micro-batches x {cfg.batch_size}{' (fsdp)' if cfg.fsdp else ''} | "
            f"alpha {cfg.alpha} beta {cfg.beta} | {schedule_text(cfg, meta['counts']['train'])}")
    for term in terms:
        if term.about:
            line += f" | {term.about}"
    return line


def steps_per_epoch(cfg, n_train):
    """Optimizer steps in one epoch of n_train examples: ceil(n_train / global batch), the global batch being
    batch_size x gradient_accumulation_steps (for the whole job, resolved for the world size in main), so the
    same for any number of processes. Rounded up, as HF Trainer counts a last partial batch: every example is
    seen in each epoch (the last step's tail runs into the next epoch's permutation); rounding down would
    skip up to a batch of them, and leave a task smaller than one batch (CB: 250 rows, batch 256) no step."""
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps
    return -(-n_train // global_batch)


def resolve_epochs(cfg, n_train):
    """--max_epochs=E and --eval_interval=epoch in optimizer steps, written into cfg before config.json is:
    max_iters = ceil(E x steps_per_epoch) (HF Trainer's max_steps for num_train_epochs), eval_interval = one
    epoch's steps. max_epochs=0 leaves max_iters as given."""
    per_epoch = steps_per_epoch(cfg, n_train)
    if cfg.eval_interval == "epoch":
        cfg.eval_interval = per_epoch
    if cfg.max_epochs > 0:
        # - 1e-9: 0.1 x 30 is 3.0000000000000004 in floating point, which must not round up to 4 steps
        cfg.max_iters = max(1, math.ceil(cfg.max_epochs * per_epoch - 1e-9))


def schedule_text(cfg, n_train):
    """The startup line's words for the schedule: which of max_epochs / max_iters applies, and the numbers."""
    per_epoch = steps_per_epoch(cfg, n_train)
    global_batch = cfg.batch_size * cfg.gradient_accumulation_steps
    data = f"{per_epoch} per epoch: {n_train} train rows / global batch {global_batch}, rounded up"
    if cfg.max_epochs > 0:
        steps = f"max_epochs {cfg.max_epochs:g} = {cfg.max_iters} steps"
    else:
        steps = f"max_iters {cfg.max_iters} steps = {cfg.max_iters / per_epoch:.3g} epochs"
    return f"{steps} ({data}), eval every {cfg.eval_interval}"


def lr_at(it, cfg):
    """Linear warmup, then cosine or linear decay to learning_rate * min_lr_frac."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    frac = min(1.0, (it - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    if cfg.lr_decay == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * frac))
    else:
        decay = 1 - frac
    return cfg.learning_rate * (cfg.min_lr_frac + decay * (1 - cfg.min_lr_frac))


def alpha_at(it, cfg, alpha):
    """--alpha_schedule=linear anneals alpha to 0 by max_iters (paper §6, future work)."""
    if cfg.alpha_schedule == "linear":
        return alpha * (1 - it / cfg.max_iters)
    return alpha


def logged(step, cfg):
    """Whether optimizer step `step` (1-based) writes a training log line."""
    return step % cfg.log_interval == 0 or step == 1


def check_finite(loss_v, cls_v, lm_v, it, lr, out_dir, saved):
    """A non-finite loss stops the run before the optimizer step: nothing is saved, the last checkpoint
    stays good."""
    if math.isfinite(loss_v):
        return
    last = "none written by this run yet"
    if saved is not None:
        last = f"{out_dir}/ckpt.pt (iter {saved})"
    raise FloatingPointError(f"non-finite loss at iter {it + 1}: loss {loss_v}, loss_cls {cls_v}, "
                             f"loss_lm {lm_v} (lr {lr:.3g}); stopped without saving. Last good checkpoint: "
                             f"{last}. Lower --learning_rate or use float32")


def optimizer_step(model, optimizer, scaler, grad_clip):
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def validate(raw, it, best, split, meta, tok, cfg, rt, log):
    """Evaluate on val (under torchrun every rank its share, all with the same metrics) and log it; rank 0
    exports a better mean of the task's metrics (SuperGLUE's score) to out_dir/model/ (and the adapters alone
    to out_dir/adapter/). -> the best so far, the same on every rank."""
    out_dir = Path(cfg.out_dir)
    val, report = evaluate(raw, split, meta, cfg.beta == 0, cfg, rt, tok)
    if rt.master:
        print(f"iter {it}: val " + " ".join(f"{k} {v:.4f}" for k, v in val.items()), flush=True)
        log.write(dict(iter=it, val=val))
    score = float(np.mean(list(val.values())))
    if score <= best["score"]:
        return {**best, "stale": best["stale"] + 1}  # --patience counts these (kept on resume)
    if rt.master:
        export(raw, out_dir / "model", meta, cfg)  # LoRA merged in: a plain HF folder
        if cfg.lora_rank:
            save_lora(raw, out_dir / "adapter")  # + the adapters alone (megabytes)
    return {"score": score, "iter": it, "val": val, "report": report, "stale": 0}


def ckpt_every(cfg):
    """Steps between checkpoints: --ckpt_interval, or 0 = eval_interval (every evaluation writes one)."""
    return cfg.ckpt_interval or cfg.eval_interval


def checkpoint(raw, optim_state, scaler, it, pos, best, alpha, ref, log, cfg, rt):
    """ckpt.pt at step `it`, which every rank reached together (an evaluation, --ckpt_interval, a stop
    signal): rank 0 writes it, with the log up to it on the disk first; every rank leaves once it is in place
    (best is the same on every rank: validate). raw, optim_state: full_state's (optim_state: None on the
    other ranks under FSDP)."""
    if rt.master:
        fsync(log.path)
        save_checkpoint(Path(cfg.out_dir) / "ckpt.pt", raw, optim_state, scaler, it, pos, best, alpha, ref)
    wait_for_rank0(rt)  # for its export and ckpt.pt, host-side: not in the next step's all-reduce


def out_of_patience(best, cfg):
    """--patience=N: N evaluations in a row without a better val score stop the run (early stopping)."""
    return cfg.patience > 0 and best["stale"] >= cfg.patience


def write_results(cfg, meta, best, it, seconds):
    out_dir = Path(cfg.out_dir)
    res = {"task": cfg.task, "metric": meta["metric"], "val": best["val"], "best_iter": best["iter"],
           "report": best["report"], "stopped_early_at": None,
           "revision": cfg.revision if COMMIT.match(cfg.revision) else None}  # the hub commit trained from
    if out_of_patience(best, cfg):
        res["stopped_early_at"] = it
    write_text(out_dir / "results.json", json.dumps(res, indent=1) + "\n")
    if res["report"] is not None:  # None: the best evaluation is from a checkpoint older than the report
        print(f"per class, val at iter {best['iter']}:")
        print(report_text(res["report"]))
    if res["stopped_early_at"] is not None:
        print(f"dhrd.py: stopped at iter {it}: {cfg.patience} evaluations without a better val score")
    vals = " ".join(f"{k} {v:.4f}" for k, v in best["val"].items())
    print(f"dhrd.py: {cfg.task} val {vals} (best at iter {best['iter']}) in {seconds:.0f}s "
          f"-> {out_dir}/results.json")


# ------------------------------------------------------------------------------------------------------------
# data: prepare.py's memory-mapped splits, one index row [START, X_LEN, N, LABEL, GROUP] per example. The
# training order is an endless stream of seeded epoch permutations, cut into micro-batches; micro-batch j of
# step s is the same whatever the number of ranks (rank r runs j = r*M..).

def load_split(data_dir, split, meta):
    """(the split's tokens, memory-mapped; its index rows [N, 5])."""
    idx = Path(data_dir, f"{split}.idx.npy")
    if not idx.exists():
        raise ConfigError(f"{idx}: missing; {data_dir} has splits {', '.join(meta['counts'])}")
    return np.memmap(Path(data_dir, f"{split}.bin"), dtype=meta["token_dtype"], mode="r"), np.load(idx)


def check_split(data_dir, name, rows, meta):
    """A split that would fail mid-run, refused at startup in one line naming the file, row and value: no
    examples, an input x without a token, a label id outside meta's labels, an example without a label (train,
    val and an --eval_only split are scored). Row i is line i + 1 of S.jsonl, the readable copy of the split
    that prepare.py writes beside its token files."""
    if len(rows) == 0:
        raise ConfigError(f"{data_dir}/{name}.idx.npy: the {name} split has no examples; prepare it again "
                          f"from a {name} file with examples")
    where = f"{data_dir}/{name}.jsonl"
    empty = rows[:, prepare.X_LEN] < 1
    if empty.any():
        i = int(np.argmax(empty))
        raise ConfigError(f"{where}:{i + 1}: the input x has no tokens (an empty text, a tokenizer without "
                          f"BOS): the pooled head has none to read; drop the row or give it text")
    labels = meta["labels"]
    y = rows[:, prepare.LABEL]
    bad = (y < 0) | (y >= len(labels))
    if bad.any():
        i = int(np.argmax(bad))
        if y[i] == -1:
            raise ConfigError(f"{where}:{i + 1}: no label, and the {name} split is trained on or scored; use "
                              f"a labelled split (an unlabelled test split: --predict)")
        raise ConfigError(f"{where}:{i + 1}: label id {y[i]} is not one of the {len(labels)} labels "
                          f"({', '.join(labels)}); prepare the data again")


def check_context(data_dir, name, rows, context, x_only):
    """The longest example of a split against the model's context (block_size), at startup: x alone for
    evaluation and the pooled baseline (alpha=0), x + rationale + answer where the LM loss reads them."""
    n = rows[:, prepare.X_LEN] if x_only else rows[:, prepare.N]
    i = int(np.argmax(n))
    if n[i] <= context:
        return
    x = int(rows[i, prepare.X_LEN])
    what = "x"
    fix = "prepare the data again with a smaller --max_len"
    if not x_only:
        what = f"x {x} + rationale and answer {n[i] - x}"
        fix += " or --max_rationale, or train with --alpha=0 (x alone)"
    raise ConfigError(f"{data_dir}/{name}.jsonl:{i + 1}: {n[i]} tokens ({what}), longer than the model's "
                      f"context of {context} positions; {fix}")


def stream(n, seed, start, count):
    """Example ids [start, start + count) of an endless stream of seeded epoch permutations of n."""
    first = start // n
    last = (start + count - 1) // n
    perms = [np.random.default_rng([seed, e]).permutation(n) for e in range(first, last + 1)]
    return np.concatenate(perms)[start - first * n:start - first * n + count]


def pad_id(meta):
    """The token that fills padding: the tokenizer's pad, else its EOS (as gpt.generate), else 0. Padding is
    masked out of attention, pooling and the LM targets, so the id never changes a result."""
    for key in ("pad_id", "eos_id"):
        if meta.get(key) is not None:
            return meta[key]
    return 0


def _tensor(a, device):
    return torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)


def make_batch(toks, rows, pad, lm, span, device):
    """rows [B,5] -> right-padded idx, attention mask, x_len, y, lm_targets ([x, r, y] when lm, else x only;
    None when not lm). lm_targets[b,t] = idx[b,t+1] for the targets of Eq. 3: every next token of s ('all')
    or of r, y ('rationale'); -100 elsewhere."""
    x_len = rows[:, prepare.X_LEN]
    ends = rows[:, prepare.N] if lm else x_len
    ids = np.full((len(rows), int(ends.max())), pad, dtype=np.int64)
    for b, (s, e) in enumerate(zip(rows[:, prepare.START], ends)):
        ids[b, :e] = toks[s:s + e]
    t = np.arange(ids.shape[1])[None]
    mask = (t < ends[:, None]).astype(np.int64)
    tgt = None
    if lm:
        # 'rationale': from the last x token on, which predicts the first rationale token
        first = 0 if span == "all" else x_len[:, None] - 1
        tgt = np.full_like(ids, -100)
        tgt[:, :-1] = np.where((t[:, 1:] < ends[:, None]) & (t[:, :-1] >= first), ids[:, 1:], -100)
    y = rows[:, prepare.LABEL]
    return (_tensor(ids, device), _tensor(mask, device), _tensor(x_len.copy(), device),
            _tensor(y.copy(), device), None if tgt is None else _tensor(tgt, device))


def micro_batch(split, start, cfg, pad, lm, device):
    """The batch_size examples at position start of the training stream, as make_batch's tensors."""
    toks, rows = split
    ids = stream(len(rows), cfg.seed, start, cfg.batch_size)
    return make_batch(toks, rows[ids], pad, lm, cfg.lm_targets, device)


# ------------------------------------------------------------------------------------------------------------
# inference: the pooled head (one forward over x, paper §3), or for a CoT-only model (beta=0) greedy
# decoding of "Reasoning: ... Final Answer: y" and parsing the verbalised label. Length-sorted batches:
# minimal padding.

def _padded(seqs, pad, left):
    """Token lists -> (ids, mask) [B, longest]: right-padded for the pooled head, left-padded for generate."""
    L = max(len(s) for s in seqs)
    ids = np.full((len(seqs), L), pad, dtype=np.int64)
    mask = np.zeros((len(seqs), L), dtype=np.int64)
    for b, s in enumerate(seqs):
        where = slice(L - len(s), L) if left else slice(0, len(s))
        ids[b, where] = s
        mask[b, where] = 1
    return ids, mask


def _answer(tokens, eos, tok):
    """The label word after the last "\\nFinal Answer:\\n" of a decoded continuation (paper App. E.2),
    or None."""
    if eos in tokens:
        tokens = tokens[:tokens.index(eos)]
    text = tok.decode(tokens)
    if prepare.SUFFIX_Y not in text:
        return None
    return text.rsplit(prepare.SUFFIX_Y, 1)[1].strip()


@torch.no_grad()
def class_probs(model, seqs, meta, cot, device, ctx, bs, cot_tokens, tok=None, rt=None, compile=False):
    """[N, K] per token list x: the pooled head's probabilities, or (cot) a one-hot of the decoded label,
    a zero row when the decoded text names none. compile: decode with generate's compiled step (see
    decode_compiled). Under torchrun (rt) the ranks share the work: the length-sorted batches are dealt out in
    turn (batch j to rank j % world), so the shares cost about the same and each batch is the very one a
    single process runs (the same rows, padding and numbers: bitwise equal results); each rank fills its rows
    and a sum over the ranks puts every row in input order (a row is nonzero on one rank only: exact). Every
    rank returns the whole [N, K]."""
    model.eval()
    out = np.zeros((len(seqs), len(meta["labels"])))
    verbal = {meta["verbalizers"][l]: i for i, l in enumerate(meta["labels"])}
    pad = pad_id(meta)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    batches = [order[i:i + bs] for i in range(0, len(seqs), bs)]
    rank, world = 0, 1
    if rt is not None and rt.ddp:
        rank, world = rt.rank, rt.world
    mine = batches[rank::world]
    label = "dhrd.py: evaluating"
    if world > 1:
        label += f" (rank 0's share of {len(seqs)})"
    # silent unless it takes seconds (CoT, big splits); rank 0 speaks for all
    progress = Progress(label, sum(len(c) for c in mine), quiet=rank != 0)
    done = 0
    for chunk in mine:
        progress.update(done)
        ids, mask = _padded([seqs[j] for j in chunk], pad, left=cot)
        L = ids.shape[1]
        ids = torch.from_numpy(ids).to(device)
        mask = torch.from_numpy(mask).to(device)
        with ctx:
            if cot:
                new = min(cot_tokens, model.config.block_size - L)
                gen = model.generate(ids, new, eos_token_id=meta["eos_id"], attention_mask=mask,
                                     compile=compile)
            else:
                out[chunk] = F.softmax(model.classify(ids, mask).float(), -1).cpu().numpy()
        if cot:
            for b, y in enumerate(_answer(row, meta["eos_id"], tok) for row in gen[:, L:].tolist()):
                if y in verbal:
                    out[chunk[b], verbal[y]] = 1.0
        done += len(chunk)
    progress.update(done)
    progress.close()
    if compile:  # the compiled step's static caches stay on the model between calls: free them for training
        model.decode_caches = None
    model.train()
    if world > 1:
        dist.all_reduce(torch.from_numpy(out), group=rt.host_group)  # in place: the tensor is out's memory
    return out


def yes_id(meta):
    """The id of the label verbalised 'Yes' (MultiRC's and COPA's positive class), else the last label."""
    for i, label in enumerate(meta["labels"]):
        if meta["verbalizers"][label] == "Yes":
            return i
    return len(meta["labels"]) - 1


def class_report(probs, gold, labels):
    """What HF / sklearn users read first (sklearn's classification_report + confusion_matrix): precision,
    recall, F1 and support per label, and the confusion matrix, rows = gold, columns = predicted, the last
    column for no prediction (a CoT model whose decoded text names no label)."""
    pred = predicted_labels(probs)
    K = len(labels)
    confusion = np.zeros((K, K + 1), dtype=np.int64)
    np.add.at(confusion, (gold, np.where(pred < 0, K, pred)), 1)
    per_class = {}
    for i, label in enumerate(labels):
        hit = int(confusion[i, i])
        predicted = int(confusion[:, i].sum())
        support = int(confusion[i].sum())
        precision = hit / predicted if predicted else 0.0
        recall = hit / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
        per_class[label] = dict(precision=precision, recall=recall, f1=f1, support=support)
    return dict(per_class=per_class, confusion=confusion.tolist(), columns=[*labels, "none"])


def report_text(report):
    """class_report as the table sklearn prints, then the confusion matrix."""
    w = max(9, *(len(l) + 2 for l in report["columns"]))
    lines = [f"{'':{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>10}"]
    for label, r in report["per_class"].items():
        lines.append(f"{label:{w}}{r['precision']:>10.4f}{r['recall']:>10.4f}{r['f1']:>10.4f}"
                     f"{r['support']:>10}")
    lines.append("confusion (rows: gold, columns: predicted)")
    lines.append(f"{'':{w}}" + "".join(f"{c:>{w}}" for c in report["columns"]))
    for label, row in zip(report["per_class"], report["confusion"]):
        lines.append(f"{label:{w}}" + "".join(f"{n:>{w}}" for n in row))
    return "\n".join(lines)


def decode_compiled(cfg, rt):
    """Whether CoT evaluation compiles generate's decode step: with --compile on CUDA (one CUDA graph a step).
    On a CPU the eager step is the fast one (bf16 packed weights, which inductor does not take: GPT-2-124M,
    batch 8, 40.6 ms eager vs 43.1 ms compiled, 2-core EPYC); under FSDP the shards' hooks break the graph."""
    return cfg.compile and rt.dev_type == "cuda" and not cfg.fsdp


def evaluate(model, split, meta, cot, cfg, rt, tok):
    """-> (the task's official metrics, class_report) of model on a split (tokens, index rows); under torchrun
    every rank evaluates its share and gets the same result."""
    toks, rows = split
    xs = [toks[s:s + x] for s, x in zip(rows[:, prepare.START], rows[:, prepare.X_LEN])]
    probs = class_probs(model, xs, meta, cot, rt.device, rt.ctx, cfg.eval_batch_size, cfg.cot_tokens, tok, rt,
                        decode_compiled(cfg, rt))
    gold = rows[:, prepare.LABEL]
    val = metrics(meta["metric"], probs, gold, rows[:, prepare.GROUP], yes_id(meta))
    return val, class_report(probs, gold, meta["labels"])


# ------------------------------------------------------------------------------------------------------------
# official metrics (SuperGLUE): accuracy; CB macro-F1 + accuracy; MultiRC F1 over all answers (F1a) + exact
# match per question; COPA: per pair, the alternative with the higher P(Yes). An unparsed CoT answer = -1
# (wrong).

def _f1(t, p):
    """Binary F1 of boolean arrays; 0 when neither has a positive."""
    if not (t.any() or p.any()):
        return 0.0
    return 2 * int((t & p).sum()) / (int(t.sum()) + int(p.sum()))


def predicted_labels(probs):
    """The label id per row of probs [N,K]; -1 for a zero row (a CoT model whose decoded text names none)."""
    return np.where(probs.max(1) > 0, probs.argmax(1), -1)


def metrics(kind, probs, gold, groups, pos=1):
    """probs [N,K] (a zero row = no prediction), gold [N] label ids, groups [N], pos = the 'Yes' label id."""
    pred = predicted_labels(probs)
    acc = float((pred == gold).mean())
    if kind == "cb":  # macro-F1 over the classes seen in gold or predictions (sklearn's 'macro', SuperGLUE)
        cls = sorted((set(gold.tolist()) | set(pred.tolist())) - {-1})
        return {"f1": float(np.mean([_f1(gold == c, pred == c) for c in cls])), "accuracy": acc}
    by = [np.flatnonzero(groups == g) for g in np.unique(groups)]  # MultiRC: a question, COPA: a pair
    if kind == "multirc":
        em = float(np.mean([(pred[ix] == gold[ix]).all() for ix in by]))
        return {"f1a": _f1(gold == pos, pred == pos), "em": em}
    if kind == "copa":
        chosen = [ix[int(np.argmax(probs[ix, pos]))] for ix in by]
        return {"accuracy": float(np.mean([gold[j] == pos for j in chosen]))}
    return {"accuracy": acc}


# ------------------------------------------------------------------------------------------------------------
# files: each is written to a temporary sibling, fsynced and renamed into place (plumbing.atomic_write; a
# folder: replace_dir), so a kill or a power loss at any point leaves the previous version or the new one
# whole (the crash tests kill runs at their writes and renames). Checkpoints are loaded with
# weights_only=True, so RNG states are stored as tensors / plain lists. The best model is exported in HF
# layout (+ dhrd's meta.json).

def write_text(path, text):
    atomic_write(path, lambda tmp: tmp.write_text(text))


def rng_state():
    n = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    numpy = [n[0], torch.from_numpy(n[1].astype(np.int64)), *n[2:]]
    return dict(torch=torch.get_rng_state(), cuda=cuda, numpy=numpy, python=list(random.getstate()))


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    np.random.set_state((s["numpy"][0], s["numpy"][1].numpy().astype(np.uint32), *s["numpy"][2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


CHECKPOINT_KEYS = ("model", "model_config", "optimizer", "scaler", "iter", "data_pos", "best", "rng", "alpha")


def save_checkpoint(path, raw, optim_state, scaler, it, pos, best, alpha, ref):
    """ckpt.pt: what resume reads (weights, optimizer, scaler, step, data position, best, RNG, the alpha that
    --alpha=auto chose) + model_config to rebuild the network, + kl_ref: full fine-tuning's frozen KL base.
    raw: a plain GPT; optim_state: the optimizer's state_dict (full_state gives both, with or without
    FSDP)."""
    state = dict(model=raw.state_dict(), model_config=asdict(raw.config), optimizer=optim_state,
                 scaler=scaler.state_dict(), iter=it, data_pos=pos, best=best, rng=rng_state(), alpha=alpha)
    if ref is not None and ref is not raw:
        state["kl_ref"] = ref.state_dict()

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object, not a path: a full disk is then an OSError with its errno
            torch.save(state, f)
    atomic_write(path, write)


def export(model, path, meta, cfg):
    """The model (LoRA merged in: a plain HF folder) + meta.json, written to the folder path.name + ".tmp",
    then swapped in by renames (plumbing.replace_dir; a kill between them is repaired by recover_dir)."""
    tmp = begin_dir(path)
    try:
        model.save_pretrained(tmp, labels=meta["labels"], pad_token_id=pad_id(meta))  # transformers: batches
        info = {**meta, "eval": "cot" if cfg.beta == 0 else "pooled", "pooling": cfg.pooling}  # for --predict
        write_text(tmp / "meta.json", json.dumps(info, indent=1, ensure_ascii=False) + "\n")
    except WriteError:
        shutil.rmtree(tmp, ignore_errors=True)  # a full disk: none of the partial folder is kept
        raise
    replace_dir(path)


# ------------------------------------------------------------------------------------------------------------
# the process: DDP rank, device, dtype; shared by training, evaluation and prediction

@dataclass
class Runtime:
    ddp: bool           # launched by torchrun (it sets RANK)
    rank: int
    local_rank: int
    world: int
    master: bool        # rank 0: logs, evaluates and checkpoints
    device: str
    dev_type: str       # 'cuda' | 'cpu'
    dtype: str
    dtype_why: str      # why dtype=auto chose it (gpt.native_dtype), or '--dtype'
    ctx: object         # autocast to dtype, or nullcontext for float32
    micro: int          # micro-batches per optimizer step on this rank
    host_group: object  # Gloo group: the host-side waits and the evaluation's gather; None: the default one


def setup(cfg):
    """DDP under torchrun (NCCL on CUDA, Gloo on CPU), the device and dtype, the seeds per rank (dropout; DDP
    broadcasts rank 0's initial weights). Every wait between ranks is bounded by --dist_timeout_s; the waits
    for one rank's work on files (preparing data, a download, the export and ckpt.pt) are Gloo collectives on
    the CPU, outside NCCL and its watchdog, so no GPU sits in a collective while one rank writes."""
    ddp = "RANK" in os.environ
    rank, local, world = 0, 0, 1
    if ddp:
        rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    accum = cfg.gradient_accumulation_steps or world  # the default 0: one micro-batch per rank
    if cfg.eval_only or cfg.predict:
        accum = world  # no training batch: not the layout that the run's config.json recorded for training
    if accum % world:
        raise ConfigError(f"gradient_accumulation_steps={accum} is for the whole job, divided among the "
                          f"{world} processes: use a multiple of {world}, or 0 (one micro-batch per rank)")
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    if ddp and dev_type == "cuda":
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    host_group = None
    if ddp:
        timeout = datetime.timedelta(seconds=cfg.dist_timeout_s)
        if not dist.is_initialized():  # initialized: a driver runs several trainings in one job
            # torchrun --max-restarts starts the new workers on the store of the attempt before (its
            # agent's): without a prefix per attempt they can read the dead workers' addresses from it, and
            # fail to connect or wait for them (4 of 8 restarts failed to connect, 0 of 4 with the prefix)
            store, _, _ = next(dist.rendezvous("env://", timeout=timeout))
            store.set_timeout(timeout)  # what init_process_group does with a store it makes itself
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"attempt{attempt}", store)
            dist.init_process_group("nccl" if dev_type == "cuda" else "gloo", store=store, rank=rank,
                                    world_size=world, timeout=timeout)
        if dev_type == "cuda":
            host_group = gloo_group(timeout)
    dtype, why = cfg.dtype, "--dtype"
    if cfg.dtype == "auto":
        dtype, why = native_dtype(device)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(dev_type, dtype=getattr(torch, dtype))
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
        seed_fn(cfg.seed + rank)
    return Runtime(ddp=ddp, rank=rank, local_rank=local, world=world, master=rank == 0, device=device,
                   dev_type=dev_type, dtype=dtype, dtype_why=why, ctx=ctx,
                   micro=accum // world, host_group=host_group)


@functools.cache
def gloo_group(timeout):
    """A Gloo group beside NCCL, made once per process (every rank calls setup alike; a driver calls it per
    training run)."""
    return dist.new_group(backend="gloo", timeout=timeout)


def wait_for_rank0(rt):
    """Under torchrun: the other ranks wait here, host-side (Gloo, --dist_timeout_s), while rank 0 writes."""
    if rt.ddp:
        dist.barrier(group=rt.host_group)


def download_once_per_node(rt, names):
    """Under torchrun, local rank 0 of each node resolves the hub names ((name, revision) pairs) first
    (downloads them into the cache) while the others wait; then every rank finds the files in the cache, so
    no two processes of a node write the same files. Local folders pass through. A failure stops every rank
    with that rank's one line."""
    if not rt.ddp:
        return
    error = None
    if rt.local_rank == 0:
        try:
            for name, revision in names:
                resolve_model_dir(name, revision=revision)
        except (ValueError, OSError) as e:  # CheckpointError, DownloadError: no such model, offline, ...
            error = str(e)
    errors = [None] * rt.world
    dist.all_gather_object(errors, error, group=rt.host_group)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise ConfigError(first)


# ------------------------------------------------------------------------------------------------------------
# ============================================================================================================
# OPTIONAL FEATURES. A first reading can stop here: each plugs into train() at a line or two.
# ============================================================================================================
#
# extra loss terms, the one seam for what the loop adds to Eq. 4. A term is an object with a `name` (logged
# as loss_<name>), a `weight` (its coefficient in the loss), `about` (words for the startup line, or ""),
# given(idx, mask, lm_targets): the term's no-grad work on one micro-batch (a tuple of tensors), and
# value(h, w, *given): what GPT.forward computes in the same pass from the model's hidden states at the
# valid LM targets and its LM head weight, a scalar (a method, not a fresh closure per step: torch.compile
# keeps one graph). extra_terms maps the flags to terms: a new term is one class and one line there (and
# its flag in Config); forward, dual_loss, the logged sums and the startup line take it as it is.

class KLToBase:
    """--kl_coef: kl_coef * KL(p_model || p_base) at the LM targets. The base (kl_reference) is the model with
    its LoRA adapters off, or a frozen copy of the initial weights; its hidden states come with no grad and no
    dropout."""
    name = "kl"
    about = ""

    def __init__(self, ref, model, coef, ctx):
        self.ref = ref
        self.model = model
        self.weight = coef
        self.ctx = ctx

    def given(self, idx, mask, lm_targets):
        with torch.no_grad(), self.ctx, lora_disabled(self.ref):
            h_base = self.ref.eval().hidden_states(idx, mask)[lm_targets != -100]
        self.model.train()  # under LoRA the base is the model itself, which eval() above switched
        return h_base, self.ref.lm_head.weight

    def value(self, h, w, h_base, w_base):
        return token_kl(h, w, h_base, w_base)


class DistillFromTeacher:
    """--kd_teacher, --kd_coef: the soft-target distillation of the reasoning head (paper App. F, future
    work), kd_coef * T^2 * KL(p_teacher^T || p_model^T) at the LM targets; T^2 keeps its gradients the size of a T=1
    term's (Hinton et al. 2015, §2). The teacher side first, as distillation has it."""
    name = "kd"

    def __init__(self, teacher, cfg, ctx):
        self.teacher = teacher
        self.temperature = cfg.kd_temperature
        self.weight = cfg.kd_coef * cfg.kd_temperature ** 2
        self.ctx = ctx
        params = sum(p.numel() for p in teacher.parameters()) / 1e6
        self.about = (f"kd teacher {cfg.kd_teacher} {params:.2f}M params, coef {cfg.kd_coef} "
                      f"T {cfg.kd_temperature}")

    def given(self, idx, mask, lm_targets):
        with torch.no_grad(), self.ctx:  # the teacher is frozen and in eval mode
            h_teacher = self.teacher.hidden_states(idx, mask)[lm_targets != -100]
        return h_teacher, self.teacher.lm_head.weight

    def value(self, h, w, h_teacher, w_teacher):
        return token_kl(h_teacher, w_teacher, h, w, self.temperature)


def extra_terms(cfg, raw, ref, teacher, ctx):
    """The extra loss terms the flags ask for, in the order they are added to the loss and logged."""
    terms = []
    if ref is not None:
        terms.append(KLToBase(ref, raw, cfg.kl_coef, ctx))
    if teacher is not None:
        terms.append(DistillFromTeacher(teacher, cfg, ctx))
    return terms


def kl_reference(cfg, model, ckpt):
    """The base of --kl_coef's KL(p_model || p_base): with LoRA the same network with its adapters off
    (no second copy); with full fine-tuning a frozen copy of the initial weights (kept in ckpt.pt); None
    without --kl_coef."""
    if not cfg.kl_coef:
        return None
    if cfg.lora_rank:
        return model
    ref = copy.deepcopy(model).requires_grad_(False).eval()
    if ckpt is not None:
        ref.load_state_dict(ckpt["kl_ref"])
    return ref


def vocabulary(tok):
    """(each id's text, the special ids): what two tokenizers must share to give every id the same meaning."""
    return [tok.decode([i]) for i in range(tok.vocab_size)], (tok.bos_id, tok.eos_id, tok.pad_id)


def check_same_vocabulary(cfg, teacher, student, t_tok, tok):
    """Distillation compares the teacher's and the student's next-token distributions id by id: both models
    must read the data's token ids with one tokenizer and have LM heads of one size."""
    who = f"--kd_teacher={cfg.kd_teacher}"
    tv = teacher.config.vocab_size
    sv = student.config.vocab_size
    if tv != sv:
        raise ConfigError(f"{who}: the teacher's vocab_size is {tv}, the student's ({cfg.init_from}) {sv}; "
                          "distillation needs one vocabulary: use a teacher of the student's family")
    t_ids, t_special = vocabulary(t_tok)
    s_ids, s_special = vocabulary(tok)
    if t_ids == s_ids and t_special == s_special:
        return
    first = next((i for i, (a, b) in enumerate(zip(t_ids, s_ids)) if a != b), min(len(t_ids), len(s_ids)))
    t_text = repr(t_ids[first]) if first < len(t_ids) else "none"
    s_text = repr(s_ids[first]) if first < len(s_ids) else "none"
    if t_ids == s_ids:
        where = f"the special ids (bos, eos, pad) are {t_special} vs {s_special}"
    else:
        where = f"they first differ at id {first}: {t_text} vs {s_text}"
    raise ConfigError(f"{who}: the teacher's tokenizer ({t_tok.name}, {len(t_ids)} ids) is not the one "
                      f"{cfg.data_dir} was prepared with and the student ({cfg.init_from}) reads "
                      f"({tok.name}, {len(s_ids)} ids); {where}. Use a teacher with the student's tokenizer")


def load_teacher(cfg, meta, tok, student, use_lm, rt):
    """--kd_teacher: a dhrd out_dir (its model/), an exported or HF folder, or a hub name, loaded with
    GPT.from_pretrained; frozen and in eval mode, for its soft targets at the L_lm targets. Its weights are
    cast to the training dtype (a frozen model needs no fp32 master copy: half the memory under bf16); it runs
    under the same autocast as the student. Not kept in ckpt.pt: a resume loads it again. None without it."""
    if not cfg.kd_teacher:
        if cfg.kd_coef:
            raise ConfigError("--kd_coef needs --kd_teacher=DIR|hub-name, the model whose soft targets "
                              "to learn")
        return None
    if not use_lm:
        raise ConfigError("--kd_teacher acts at the LM targets, which --alpha=0 does not build; "
                          "use alpha > 0")
    if cfg.kd_coef <= 0 or cfg.kd_temperature <= 0:
        raise ConfigError(f"--kd_teacher needs --kd_coef > 0 and --kd_temperature > 0 (got {cfg.kd_coef}, "
                          f"{cfg.kd_temperature})")
    where = Path(cfg.kd_teacher)
    if Path(where, "model", "config.json").exists():
        where = where / "model"
    try:
        teacher = GPT.from_pretrained(where)
        teacher.require_lm_head("--kd_teacher (its soft targets come from its LM head)")
        folder = teacher.source_dir
        if (folder / "meta.json").exists():  # a dhrd export: the tokenizer of the data it was trained on
            t_tok = prepare.tokenizer_from_meta(_read_json(folder / "meta.json", "teacher's meta"))
        else:
            t_tok = load_tokenizer(folder)
    except CheckpointError as e:
        raise ConfigError(f"--kd_teacher={cfg.kd_teacher}: {e}") from None
    check_same_vocabulary(cfg, teacher, student, t_tok, tok)
    longest = max(v["n"] for v in meta["max_len"].values())
    if teacher.config.block_size < longest:
        raise ConfigError(f"--kd_teacher={cfg.kd_teacher}: block_size {teacher.config.block_size} is shorter "
                          f"than the longest example of {cfg.data_dir} ({longest} tokens)")
    teacher.requires_grad_(False).eval()
    if rt.dtype != "float32":
        teacher.to(getattr(torch, rt.dtype))
    return teacher.to(rt.device)


# ------------------------------------------------------------------------------------------------------------
# gradient statistics (--grad_stats) and --alpha=auto: how the two losses of Eq. 4 pull on the shared
# backbone (the transformer blocks; the embeddings, the pooled head and the LM head are each touched by
# one loss only, or tied to the input side)

ALPHA_AUTO_BATCHES = 8  # micro-batches averaged by --alpha=auto before the first step


def _dense(grads, params):  # a parameter that one loss does not reach has a zero gradient for it
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


def backbone_grads(model, batch, ctx, device):
    """(grad of L_cls, grad of L_lm or None) w.r.t. the trainable block parameters, for one micro-batch,
    unweighted. An extra forward + backward on the plain module (no DDP hooks, no compile); the RNG is
    forked, so dropout masks and the run's trajectory are the same as without it."""
    params = [p for p in model.h.parameters() if p.requires_grad]
    idx, mask, x_len, y, lm_targets = batch
    devices = [torch.device(device)] if str(device).startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        with ctx:
            out = model(idx, mask, x_len, lm_targets)
        loss_cls = F.cross_entropy(out.cls_logits.float(), y)
        has_lm = out.loss_lm is not None
        g_cls = torch.autograd.grad(loss_cls, params, retain_graph=has_lm, allow_unused=True)
        g_lm = None
        if has_lm:
            g_lm = torch.autograd.grad(out.loss_lm, params, allow_unused=True)
    if g_lm is None:
        return _dense(g_cls, params), None
    return _dense(g_cls, params), _dense(g_lm, params)


def _norm(gs):
    return torch.sqrt(sum(g.float().pow(2).sum() for g in gs)).item()


def grad_stats(g_cls, g_lm, alpha, beta):
    """Norms of the backbone gradients of beta L_cls and alpha L_lm (Eq. 4's two terms) and their cosine."""
    n_cls = _norm(g_cls)
    stats = {"grad_cls": beta * n_cls}
    if g_lm is not None:
        n_lm = _norm(g_lm)
        dot = sum((a.float() * b.float()).sum() for a, b in zip(g_cls, g_lm)).item()
        stats["grad_lm"] = alpha * n_lm
        stats["grad_cos"] = dot / max(n_cls * n_lm, 1e-30)
    return stats


def step_grad_stats(cfg, rt, step, raw, batch, alpha):
    """--grad_stats at a logged optimizer step (1-based): grad_stats of this micro-batch on rank 0, else {}."""
    if not (cfg.grad_stats and rt.master and logged(step, cfg)):
        return {}
    g_cls, g_lm = backbone_grads(raw, batch, rt.ctx, rt.device)
    return grad_stats(g_cls, g_lm, alpha, cfg.beta)


def alpha_from_gradients(norms_cls, norms_lm, beta):
    """--alpha=auto, the rule: alpha = beta * mean ||grad L_cls|| / mean ||grad L_lm|| over the backbone at
    the initial weights, on the first ALPHA_AUTO_BATCHES training micro-batches, so that the two terms of
    Eq. 4 start with gradients of equal size. Fixed for the whole run (and across a resume). The paper picks
    alpha on validation per backbone and names the sensitivity to alpha as a limitation (App. A, F)."""
    return beta * (sum(norms_cls) / len(norms_cls)) / max(sum(norms_lm) / len(norms_lm), 1e-30)


def initial_alpha(cfg, ckpt, raw, split, pad, rt, log):
    """The alpha of Eq. 4 the run starts from: cfg.alpha, or for 'auto' the one measured before the first
    step (alpha_auto); a resumed run keeps the alpha it chose."""
    if cfg.alpha != "auto":
        return cfg.alpha
    if ckpt is not None:
        return ckpt["alpha"]
    return alpha_auto(cfg, raw, split, pad, rt, log)


def alpha_auto(cfg, raw, split, pad, rt, log):
    """--alpha=auto at the initial weights: the same first micro-batches of the stream on every rank, their
    norms summed over the ranks, so every rank gets the same alpha whatever its rounding."""
    norms = torch.zeros(2, device=rt.device)
    for j in range(ALPHA_AUTO_BATCHES):
        batch = micro_batch(split, j * cfg.batch_size, cfg, pad, True, rt.device)
        g_cls, g_lm = backbone_grads(raw, batch, rt.ctx, rt.device)
        norms += torch.tensor([_norm(g_cls), _norm(g_lm)], device=rt.device)
    if rt.ddp:
        dist.all_reduce(norms)
    alpha = alpha_from_gradients([norms[0].item()], [norms[1].item()], cfg.beta)
    if rt.master:
        n_cls, n_lm = (norms / (ALPHA_AUTO_BATCHES * rt.world)).tolist()
        print(f"alpha=auto: {alpha:.4f} = beta {cfg.beta} x |grad L_cls| {n_cls:.4g} / |grad L_lm| {n_lm:.4g}"
              f" (backbone, initial weights, {ALPHA_AUTO_BATCHES} micro-batches)", flush=True)
        log.write(dict(iter=0, alpha_auto=alpha, grad_norm_cls=n_cls, grad_norm_lm=n_lm))
    return alpha


# ------------------------------------------------------------------------------------------------------------
# preemption: SIGTERM (what torchrun, SLURM, Kubernetes and spot instances send some seconds before SIGKILL)
# and SIGUSR1 (SLURM's --signal=USR1@seconds warning before the time limit) stop the run at the next
# optimizer step, on every rank together, after a checkpoint; the same command continues it.

# the exit status then: 128 + SIGTERM, what a shell reports for a process that SIGTERM ended, so whatever
# retries those retries this: torchrun --max-restarts restarts the workers on any non-zero status,
# Kubeflow's restartPolicy=ExitCode retries 128-255 (1-127 are permanent errors), Kubernetes' podFailurePolicy
# matches it by onExitCodes, SLURM requeues a job whose status is in its RequeueExit list. (A finished run's
# rerun exits 0.)
REQUEUE_EXIT = 143


class Preemption:
    """The stop a signal asked for: its number, 0 = none. install() is the command line's: a program that
    calls train() itself keeps its own handlers. Until main arms it for a training run (eval_only and
    predict have no checkpoint to write) a signal does what it does by default: it ends the process."""

    def __init__(self):
        self.signal = 0
        self.armed = False

    def install(self):
        for name in ("SIGTERM", "SIGUSR1"):  # Windows has no SIGUSR1
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self.ask)

    def ask(self, signum, frame):
        if not self.armed:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum


PREEMPTION = Preemption()


class Preempted(Exception):
    """The run stopped for a signal, after writing its checkpoint."""


def stop_for_requeue(it, out_dir, log):
    """End the run for the signal, after its checkpoint at iter `it`: main's caller exits with REQUEUE_EXIT."""
    log.close()
    name = "a signal to another rank"  # SLURM's USR1 may reach some ranks only
    if PREEMPTION.signal:
        name = signal.Signals(PREEMPTION.signal).name
    raise Preempted(f"stopped by {name} at iter {it}, after writing {out_dir}/ckpt.pt: the same "
                    f"command continues the run (exit status {REQUEUE_EXIT}: requeue me)")


# ------------------------------------------------------------------------------------------------------------
# FSDP2 (--fsdp=True under torchrun): full fine-tuning of a model whose weights, gradients and AdamW state do
# not fit one device together. The blocks and then the root are sharded over the ranks. Evaluation, the export
# and ckpt.pt work on a plain GPT gathered from the shards onto every rank (full_state): each rank evaluates
# its share of val as with DDP, rank 0 exports and writes ckpt.pt (the same layout as one process's: a
# 1-process checkpoint resumes under FSDP and back; tested). A gathered copy rather than evaluating through
# FSDP's hooks: classify and generate reach the root's parameters (embeddings, LM head) outside
# GPT.forward's hooks, where they are still shards. The cost: one unsharded fp32 copy per device while it
# evaluates; rank 0 held that copy for its lone evaluation before, so the peak memory per device is unchanged.
# --eval_only and --predict load the exported model whole on every rank: weights alone, a quarter of the
# weights + gradients + AdamW state that needed the sharding.
# torch.distributed.fsdp and .checkpoint are imported in the functions, not at the top: ~2 s of imports that
# only --fsdp runs pay.

def check_fsdp(cfg, rt):
    """The combinations --fsdp does not support, refused before anything starts."""
    if not cfg.fsdp:
        return
    if cfg.lora_rank:
        raise ConfigError("--fsdp=True with --lora_rank: not supported (adapters, their KL base and export "
                          "are written for plain tensors); LoRA's trained state is megabytes: use DDP")
    if rt.dtype == "float16":
        raise ConfigError("--fsdp=True with float16: the GradScaler's inf check would see this rank's shard "
                          "of the gradients only; use --dtype=bfloat16 or float32")
    if cfg.grad_stats or cfg.alpha == "auto":
        raise ConfigError("--fsdp=True with --grad_stats or --alpha=auto: they take gradients outside the "
                          "training step, which FSDP's hooks do not support; use DDP")
    if not rt.ddp:
        raise ConfigError("--fsdp=True shards the model over torchrun's processes: launch it as "
                          "`torchrun --nproc_per_node=N dhrd.py --fsdp=True ...`")


def shard(raw, rt):
    """FSDP2 in place: every block, then the root (embeddings, final norm, the tied heads), become FSDP
    modules whose parameters are DTensor shards over the ranks, on rt.device (fully_shard moves a block as it
    shards it: the whole model is never on one GPU). Under bf16 the parameters are all-gathered in bf16 (half
    the traffic; the norms and the residual stream then run in bf16 too, where DDP's autocast keeps them in
    fp32) and the gradients reduce-scattered in fp32, as DDP sums fp32 gradients. Every rank starts from rank
    0's weights, as DDP's broadcast gives it (a scratch model is initialised with each rank's own seed)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    full = raw.state_dict() if rt.master else {}
    mesh = init_device_mesh(rt.dev_type, (rt.world,))
    policy = MixedPrecisionPolicy()
    if rt.dtype != "float32":
        policy = MixedPrecisionPolicy(param_dtype=getattr(torch, rt.dtype), reduce_dtype=torch.float32)
    for block in raw.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(raw, mesh=mesh, mp_policy=policy)
    set_model_state_dict(raw, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def _param_names(raw, optimizer):
    """Each parameter's name in the optimizer's own order: state_dict()'s integer ids index this list."""
    name = {p: n for n, p in raw.named_parameters()}
    return [name[p] for g in optimizer.param_groups for p in g["params"]]


def _rekey(osd, keys):
    """An optimizer state dict with its parameter keys mapped through keys (ids -> names or back)."""
    groups = [{**g, "params": [keys[k] for k in g["params"]]} for g in osd["param_groups"]]
    return {"state": {keys[k]: v for k, v in osd["state"].items()}, "param_groups": groups}


def full_state(raw, optimizer, cfg, rt):
    """(a plain GPT with the full weights, the optimizer's state_dict in ckpt.pt's layout): raw and
    optimizer.state_dict() themselves, or with FSDP gathered from every rank's shards (a collective: every
    rank calls it), the weights onto every rank's device (each evaluates its share of val) and the optimizer
    state onto rank 0's CPU (the others get None), the GPT rebuilt around those tensors."""
    if not cfg.fsdp:
        return raw, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    sd = get_model_state_dict(raw, options=StateDictOptions(full_state_dict=True))  # on every rank
    offload = StateDictOptions(full_state_dict=True, cpu_offload=True)  # cpu_offload: rank 0 only
    osd = get_optimizer_state_dict(raw, optimizer, options=offload)  # keyed by parameter name
    with torch.device("meta"):
        plain = GPT(raw.config)
    plain.load_state_dict(sd, assign=True)
    if raw.config.tie_word_embeddings:
        plain.lm_head.weight = plain.wte.weight
    plain.source_dir = raw.source_dir  # the export copies its tokenizer files
    if not rt.master:
        return plain.to(rt.device), None
    ids = {name: i for i, name in enumerate(_param_names(raw, optimizer))}
    return plain.to(rt.device), _rekey(osd, ids)


def load_optimizer_state(raw, optimizer, state, cfg):
    """ckpt.pt's optimizer state (the full one, read by every rank) into the optimizer; with FSDP each rank
    keeps its shards of it."""
    if not cfg.fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    named = _rekey(state, _param_names(raw, optimizer))
    set_optimizer_state_dict(raw, optimizer, named, options=StateDictOptions(full_state_dict=True))


# ------------------------------------------------------------------------------------------------------------
# experiment trackers (--wandb_log, --mlflow): imported only when a flag asks for them

def tracking_modules(cfg):
    """The experiment trackers asked for, imported only then: {'mlflow': module, 'wandb': module}. A tracker
    asked for but not installed stops the run before it starts (a long run that logs nowhere is worse)."""
    asked = {"mlflow": cfg.mlflow, "wandb": cfg.wandb_log}
    modules = {}
    for name in (n for n, on in asked.items() if on):
        try:
            modules[name] = importlib.import_module(name)
        except ImportError:
            flag = "--mlflow" if name == "mlflow" else "--wandb_log"
            raise ConfigError(f"{flag}=True needs the {name} package: pip install {name} (or drop the "
                              f"flag; log.jsonl has the same numbers)") from None
    return modules


def start_tracking(cfg, modules):
    """Start a run in each tracker with the config as its parameters -> (mlflow module, wandb run)."""
    mlflow = modules.get("mlflow")
    wandb_run = None
    if mlflow is not None:
        mlflow.start_run()
        mlflow.log_params(asdict(cfg))
    if "wandb" in modules:  # nanoGPT's flags: wandb_log, wandb_project, wandb_run_name
        name = cfg.wandb_run_name or Path(cfg.out_dir).name
        wandb_run = modules["wandb"].init(project=cfg.wandb_project, name=name, config=asdict(cfg))
    return mlflow, wandb_run


# ------------------------------------------------------------------------------------------------------------
# --eval_only and --predict: the exported best model (out_dir/model/) or any HF folder; only the pooled
# head runs (a CoT-only model, beta=0: decoding)

def load_exported(cfg, rt):
    """-> (model, meta, cot, tok) of a dhrd out_dir (its model/) or an exported / HF folder, with the
    meta.json it was exported with (else the prepared data's)."""
    folder = Path(cfg.init_from)
    if Path(cfg.init_from, "model", "config.json").exists():
        folder = Path(cfg.init_from, "model")
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        meta_path = Path(cfg.data_dir, "meta.json")
    meta = _read_json(meta_path, "meta")
    download_once_per_node(rt, [(str(folder), cfg.revision)])  # a hub name at --revision; a folder as is
    model = GPT.from_pretrained(folder, revision=cfg.revision, pooling=meta.get("pooling", cfg.pooling))
    model = model.to(rt.device)
    cot = meta.get("eval") == "cot" or cfg.beta == 0
    K = len(meta["labels"])
    if not cot and model.config.num_labels != K:
        raise ConfigError(f"{folder}: the model's pooled head has {model.config.num_labels} labels, "
                          f"{meta_path} names {K} ({', '.join(meta['labels'])}); use the model's own data")
    tok = prepare.tokenizer_from_meta(meta)
    what = "predict" if cfg.predict else "eval"
    line = f"dhrd.py: {what} {folder} | {rt.device} {rt.dtype} ({rt.dtype_why})"
    if rt.ddp:
        line += f" | {rt.world} processes"
    if rt.master:
        print(line, file=sys.stderr)
    return model, meta, cot, tok


def eval_only(cfg, rt):
    """Print the official metrics of the model on eval_split as one JSON line (rank 0; under torchrun every
    rank evaluates its share)."""
    model, meta, cot, tok = load_exported(cfg, rt)
    split = load_split(cfg.data_dir, cfg.eval_split, meta)
    check_split(cfg.data_dir, cfg.eval_split, split[1], meta)
    check_context(cfg.data_dir, cfg.eval_split, split[1], model.config.block_size, x_only=True)
    t0 = time.time()
    val, report = evaluate(model, split, meta, cot, cfg, rt, tok)
    if rt.master:
        print(report_text(report), file=sys.stderr)
        print(f"dhrd.py: {len(split[1])} {cfg.eval_split} examples evaluated in {time.time() - t0:.2f}s",
              file=sys.stderr)
        print(json.dumps({"task": meta["task"], "split": cfg.eval_split, "model": str(cfg.init_from),
                          cfg.eval_split: val, "report": report}))
    return val


def read_inputs(path, meta):
    """-> (line numbers, texts): each row's "text" (a formatted x), or the x's prepare.py formats from a raw
    task row (MultiRC / COPA: one per answer / alternative)."""
    lines, texts = [], []
    for ln, row in prepare.read_jsonl(path):
        where = f"{path}:{ln}"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: a row is a JSON object such as {{\"text\": \"...\"}}, not "
                              f"{type(row).__name__} {json.dumps(row)[:40]}")
        if "text" in row and not isinstance(row["text"], str):
            raise ConfigError(f"{where}: field 'text' must be a string (the formatted input x), not "
                              f"{type(row['text']).__name__} {json.dumps(row['text'])[:40]}")
        try:
            if "text" in row:
                xs = [row["text"]]
            else:
                xs = prepare.format_input(meta["task"], row, meta.get("format", "paper"))
        except KeyError as e:
            raise ConfigError(f"{where}: not a formatted row (field 'text') nor a raw {meta['task']} row "
                              f"(missing field {e})") from None
        except (TypeError, AttributeError) as e:
            raise ConfigError(f"{where}: a field of this raw {meta['task']} row has the wrong type "
                              f"({e})") from None
        lines += [ln] * len(xs)
        texts += xs
    return lines, texts


def predict(cfg, rt):
    """--predict rows -> one JSON line per x in --predictions: {"line", "text", "label", "probs"} (rank 0
    writes; under torchrun every rank predicts its share)."""
    model, meta, cot, tok = load_exported(cfg, rt)
    lines, texts = read_inputs(cfg.predict, meta)
    bos = [] if meta["bos_id"] is None else [meta["bos_id"]]
    seqs = []
    for ln, t in zip(lines, texts):
        try:
            seqs.append(bos + tok.encode(t))
        except ValueError as e:  # a char tokenizer (synth, scratch models) meets a character it lacks
            raise ConfigError(f"{cfg.predict}:{ln}: {e}") from None
        if len(seqs[-1]) > model.config.block_size:
            raise ConfigError(f"{cfg.predict}:{ln}: longer than the model's {model.config.block_size} tokens")
        if not seqs[-1]:
            raise ConfigError(f"{cfg.predict}:{ln}: the text {t!r} has no tokens and the tokenizer no BOS: "
                              f"the pooled head has none to read; give the row some text")
    probs = class_probs(model, seqs, meta, cot, rt.device, rt.ctx, cfg.eval_batch_size, cfg.cot_tokens, tok,
                        rt, decode_compiled(cfg, rt))
    out = Path(cfg.predictions or Path(cfg.predict).with_suffix(".pred.jsonl"))
    if not rt.master:  # under torchrun every rank predicted its share; rank 0 writes them all
        return out
    text = ""
    for ln, t, p in zip(lines, texts, probs):
        label = meta["labels"][int(p.argmax())] if p.max() > 0 else None
        row = {"line": ln, "text": t, "label": label, "probs": dict(zip(meta["labels"], map(float, p)))}
        text += json.dumps(row, ensure_ascii=False) + "\n"
    write_text(out, text)
    print(f"dhrd.py: {len(texts)} predictions -> {out}")
    return out


if __name__ == "__main__":
    PREEMPTION.install()
    status = 0
    try:
        main(sys.argv[1:])
    except Preempted as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"dhrd.py: {e}", file=sys.stderr, flush=True)
        status = REQUEUE_EXIT
    except (ValueError, FloatingPointError, WriteError) as e:  # ConfigError, CheckpointError, NaN, full disk
        # under torchrun every rank meets the same config error or NaN: rank 0 alone says it, and the others
        # leave 3 s later (1 s lost the race in a loaded CI run), so that torchrun's failure report names
        # rank 0 (whose message is printed) instead of stopping it with SIGTERM before it could print
        same_on_all = isinstance(e, (ConfigError, FloatingPointError))
        if os.environ.get("RANK", "0") == "0" or not same_on_all:
            print(f"dhrd.py: error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(3.0)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if "RANK" in os.environ:
        # a finished torchrun worker leaves without the interpreter's shutdown: destroy_process_group does
        # not stop Gloo's worker threads, and one that frees the last collective's tensors after shutdown
        # began needs the GIL, which then aborts the process ("terminate called without an active
        # exception", SIGABRT; experiments/README.md, "Engineering measurements", has the count)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
