"""
The paper's Table 1 in one command: for one backbone preset, the pooled baseline and DHRD on each SuperGLUE
task, one run after another, then the table (per-task val metrics, the paper's average, the relative gain).

    python experiments/superglue.py config/llama-3.1-8b-dhrd.json --teacher_url=URL --teacher_model=NAME
    torchrun --standalone --nproc_per_node=8 experiments/superglue.py config/qwen3-4b-dhrd.json \\
        --rationales=rationales/{task}.jsonl
    python experiments/superglue.py config/cpu-demo.json --tasks=cb,copa --rationales=demo.jsonl   # CPU demo

The rationale source, one of prepare.py's: --rationales=FILE.jsonl (one file for all tasks, or {task} in the
name for one file per task), --teacher=DIR (a local model), or --teacher_url=URL --teacher_model=NAME (an
OpenAI-compatible endpoint). A teacher's rationales go to <out_dir>/rationales/<task>.jsonl, so an interrupted
teacher resumes where it stopped (prepare.py's rule).
Flags: --tasks (default: the seven), --out_dir (default out-superglue/<the preset's name>), --data_dir (the
SuperGLUE files as prepare.py reads them: <Task>/{train,val,test}.jsonl, downloaded when missing),
prepare.py's teacher and length flags, and any dhrd.py key, which overrides the preset in both runs
(--max_epochs=1 ...).
The pooled run is the preset with --alpha=0; the DHRD run is the preset.
Each step is done once: a prepared task (its meta.json) and a finished run (its results.json) are skipped, an
interrupted run resumes from its ckpt.pt. Under torchrun rank 0 prepares while the others wait, and every rank
trains. Outputs in out_dir: data/<task>/, <task>-pooled/, <task>-dhrd/ (dhrd.py's out_dirs), table1.md and
table1.json (rewritten after each task).
"""
import gc
import inspect
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dhrd  # noqa: E402
import prepare  # noqa: E402
from plumbing import ConfigError, atomic_write, parse_flags  # noqa: E402

TASKS = tuple(prepare.SUPERGLUE)  # boolq cb copa multirc rte wic wsc: Table 1's columns, in its order
# prepare.py's keywords that pass through: the rationale source and the input lengths (defaults: prepare's)
PREPARE_KEYS = ("rationales", "teacher", "teacher_url", "teacher_model", "api_key_env", "teacher_batch",
                "teacher_workers", "teacher_max_new_tokens", "teacher_timeout", "teacher_dtype", "max_len",
                "max_rationale")
OWN = dict(tasks=",".join(TASKS), out_dir="", data_dir="")
# dhrd.py keys the driver sets per run (task, data_dir, out_dir) or that are another command (eval_only, ...)
NOT_PASSED = ("task", "data_dir", "out_dir", "eval_only", "eval_split", "predict", "predictions")
ARMS = {"pooled": ["--alpha=0"], "dhrd": []}  # Table 1's two rows: the preset without and with L_lm
# the wait of the other ranks while rank 0 prepares: a teacher can take hours (MultiRC: 27k rationales),
# longer than the process group's default timeout, so the wait has its own Gloo group
PREPARE_TIMEOUT = timedelta(hours=48)


def parse_args(argv):
    """-> (the driver's and prepare.py's settings, dhrd.py's arguments: the preset files and dhrd keys in
    their order, the dhrd Config they give). Every key is checked here, before any work."""
    params = inspect.signature(prepare.prepare).parameters
    prep = {k: params[k].default for k in PREPARE_KEYS}
    train = {k: v for k, v in asdict(dhrd.Config()).items() if k not in NOT_PASSED}
    defaults = {**train, **prep, **OWN}
    flags = [a for a in argv if a.startswith("--")]
    values = parse_flags(flags, defaults, dhrd.CHOICES)  # unknown keys, types: one message, close matches
    opts = {**prep, **OWN, **{k: v for k, v in values.items() if k in prep or k in OWN}}
    train_args = [a for a in argv if not a.startswith("--") or a[2:].partition("=")[0] in train]
    model = parse_flags(train_args, asdict(dhrd.Config()), dhrd.CHOICES).get("init_from", "")  # files too
    if model in ("", "scratch", "resume"):
        raise ConfigError("the preset names no model: give a backbone preset (config/*-dhrd.json) or "
                          "--init_from=MODEL, the model whose tokenizer prepares the tasks")
    cfg = dhrd.parse_config(train_args)  # dhrd.py's own checks, before any work
    tasks = [t for t in opts["tasks"].split(",") if t]
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise ConfigError(f"--tasks={opts['tasks']}: use a comma list of {', '.join(TASKS)}")
    opts["tasks"] = [t for t in TASKS if t in tasks]  # Table 1's order
    if cfg.alpha == 0:
        raise ConfigError("the preset is a pooled baseline (alpha 0): give the DHRD preset "
                          "(config/*-dhrd.json); the pooled run is derived from it with --alpha=0")
    if not (opts["rationales"] or opts["teacher"] or opts["teacher_url"]):
        raise ConfigError("DHRD needs a rationale source: --rationales=FILE.jsonl ({task} in the name for "
                          "one file per task), --teacher=DIR, or --teacher_url=URL --teacher_model=NAME")
    if not opts["out_dir"]:
        presets = [Path(a).stem for a in argv if not a.startswith("--")]
        opts["out_dir"] = str(Path("out-superglue", presets[-1] if presets else Path(cfg.init_from).name))
    return opts, train_args, cfg


def on_rank0(fn, group):
    """fn() on rank 0 (or alone, group None); its result, or its error as one line, shared with every rank."""
    out = [None, None]
    if group is None or dist.get_rank() == 0:
        try:
            out[0] = fn()
        except ValueError as e:  # ConfigError, PrepareError: bad input, said once by rank 0
            out[1] = str(e)
    if group is not None:
        dist.broadcast_object_list(out, src=0, group=group)
    if out[1] is not None:
        raise ConfigError(out[1])
    return out[0]


def prepare_task(task, opts, model, out_dir):
    """out_dir/data/<task>: the task tokenized with the model's tokenizer, with the source's rationales
    (prepare.py's Python entry point); a prepared task (its meta.json) is kept."""
    data = out_dir / "data" / task
    if (data / "meta.json").exists():
        return f"{data}: prepared before, kept (delete it to prepare again)"
    kwargs = {k: opts[k] for k in PREPARE_KEYS}
    if opts["rationales"]:
        kwargs["rationales"] = opts["rationales"].replace("{task}", task)
    elif opts["teacher"] or opts["teacher_url"]:
        kwargs["rationales"] = out_dir / "rationales" / f"{task}.jsonl"  # not in data/: kept if prepare fails
        kwargs["rationales"].parent.mkdir(parents=True, exist_ok=True)
    meta = prepare.prepare(task=task, out_dir=data, model=model, data_dir=opts["data_dir"] or None, **kwargs)
    return f"{data}: {meta['counts']}, rationale source {meta['rationale_source']}, dropped {meta['dropped']}"


def run_state(run_dir):
    """'done' (results.json), 'resume' (ckpt.pt) or 'new'; what a new run would find there, a run killed
    before its first checkpoint left, is removed (nothing in it can be resumed)."""
    if (run_dir / "results.json").exists():
        return "done"
    if (run_dir / "ckpt.pt").exists():
        return "resume"
    shutil.rmtree(run_dir, ignore_errors=True)
    return "new"


def task_score(val):
    """The paper's one number per task in Avg: CB the mean of F1 and accuracy, MultiRC of F1a and EM, the
    others their accuracy (the mean of a one-metric dict); also the score dhrd.py picks its best model by."""
    return sum(val.values()) / len(val)


def relative_gain(new, old):
    """In percent of old, as the paper's Table 1 states it (86.29 -> 87.52: +1.43%)."""
    return 100 * (new - old) / old if old else None


def table1(vals):
    """vals {task: {"pooled": val metrics, "dhrd": val metrics}}, the finished tasks -> Table 1 as data:
    per task both rows' metrics, their scores and the gain; the average over the tasks and its gain."""
    rows = {}
    for task, arms in vals.items():
        scores = {arm: task_score(arms[arm]) for arm in ARMS}
        rows[task] = {**arms, "score": scores, "gain_pct": relative_gain(scores["dhrd"], scores["pooled"])}
    avg = {arm: sum(r["score"][arm] for r in rows.values()) / len(rows) for arm in ARMS}
    return {"tasks": rows, "avg": {**avg, "gain_pct": relative_gain(avg["dhrd"], avg["pooled"]),
                                   "n_tasks": len(rows)}}


def _pct(x):
    return f"{100 * x:.2f}"


def _gain(g):
    return "n/a" if g is None else f"{g:+.2f}%"


def markdown(table, title, dhrd_row):
    """Table 1's layout: a column per task (CB F1/acc, MultiRC F1a/EM), then Avg; rows pooled, DHRD, the
    gain."""
    tasks = table["tasks"]
    avg = table["avg"]
    names = []
    for task in tasks:
        name = prepare.SUPERGLUE[task][0]
        if len(tasks[task]["pooled"]) > 1:  # CB, MultiRC: their two metrics
            name += " " + "/".join({"f1": "F1", "accuracy": "acc", "f1a": "F1a", "em": "EM"}[k]
                                   for k in tasks[task]["pooled"])
        names.append(name)
    n = avg["n_tasks"]
    avg_name = "Avg" if n == len(TASKS) else f"Avg ({n} of {len(TASKS)} tasks)"
    lines = [title, "", "| | " + " | ".join(names) + f" | {avg_name} |", "|---" * (len(names) + 2) + "|"]
    for arm, label in (("pooled", "pooled baseline (alpha 0)"), ("dhrd", dhrd_row)):
        cells = ["/".join(_pct(v) for v in tasks[t][arm].values()) for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pct(avg[arm])} |")
    gains = [_gain(tasks[t]["gain_pct"]) for t in tasks]
    lines.append("| relative gain | " + " | ".join(gains) + f" | {_gain(avg['gain_pct'])} |")
    return "\n".join(lines) + "\n"


def write_table(opts, cfg, train_args, out_dir):
    """table1.json and table1.md from the finished runs' results.json (so a rerun rebuilds it whole)
    -> the Markdown."""
    vals = {}
    for task in opts["tasks"]:
        files = {arm: out_dir / f"{task}-{arm}" / "results.json" for arm in ARMS}
        if all(f.exists() for f in files.values()):
            vals[task] = {arm: json.loads(f.read_text())["val"] for arm, f in files.items()}
    if not vals:
        return ""
    table = table1(vals)
    dhrd_row = f"DHRD (alpha {cfg.alpha}, beta {cfg.beta:g})"
    if cfg.alpha != "auto":
        dhrd_row = f"DHRD (alpha {cfg.alpha:g}, beta {cfg.beta:g})"
    title = (f"Table 1 layout: {cfg.init_from}, SuperGLUE val, the best of the evaluations; CB (F1/acc) and "
             f"MultiRC (F1a/EM) are averaged before Avg; gains relative to the pooled baseline")
    text = markdown(table, title, dhrd_row)
    info = {"model": cfg.init_from, "args": train_args, "split": "val", "alpha": cfg.alpha, "beta": cfg.beta}
    data = json.dumps({**info, **table}, indent=1) + "\n"
    atomic_write(out_dir / "table1.json", lambda tmp: tmp.write_text(data))
    atomic_write(out_dir / "table1.md", lambda tmp: tmp.write_text(text))
    return text


def main(argv):
    opts, train_args, cfg = parse_args(argv)
    out_dir = Path(opts["out_dir"])
    group = None
    master = True
    if "RANK" in os.environ:  # torchrun: dhrd.setup starts the process group once, every run then shares it
        rt = dhrd.setup(cfg)
        master = rt.master
        group = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    for task in opts["tasks"]:
        said = on_rank0(lambda: prepare_task(task, opts, cfg.init_from, out_dir), group)
        if master:
            print(f"superglue.py: {said}", flush=True)
    for task in opts["tasks"]:
        for arm, extra in ARMS.items():
            run_dir = out_dir / f"{task}-{arm}"
            state = on_rank0(lambda: run_state(run_dir), group)
            if master:
                print(f"superglue.py: {task} {arm}: {run_dir} ({state})", flush=True)
            if state == "done":
                continue
            resume = ["--init_from=resume"] if state == "resume" else []
            dhrd.main([*train_args, *extra, f"--task={task}", f"--data_dir={out_dir / 'data' / task}",
                       f"--out_dir={run_dir}", *resume])
            gc.collect()  # the next run's model goes where this one was (DDP's reference cycles hold it)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if master:
            write_table(opts, cfg, train_args, out_dir)
    if master:
        text = write_table(opts, cfg, train_args, out_dir)
        print(f"\n{text}\n-> {out_dir}/table1.md, {out_dir}/table1.json", flush=True)


if __name__ == "__main__":
    # as dhrd.py's own ending (the reasons are written there): a config error once, by rank 0; a finished
    # torchrun worker leaves with os._exit(0) after destroy_process_group
    try:
        main(sys.argv[1:])
    except (ValueError, FloatingPointError) as e:
        same_on_all = isinstance(e, (ConfigError, FloatingPointError))
        if os.environ.get("RANK", "0") == "0" or not same_on_all:
            print(f"superglue.py: error: {e}", file=sys.stderr, flush=True)
        else:
            time.sleep(3.0)
        sys.exit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
