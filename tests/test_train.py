"""dhrd.py: DDP == one process, exact resume after a kill, official metrics, config errors, non-finite loss,
torch.compile, eval_only and predict. CPU only; dhrd.py runs as a subprocess on tiny synth data."""
import json, os, pathlib, re, subprocess, sys, time

import numpy as np
import pytest
import torch

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "gpt.py").exists())
sys.path.insert(0, str(ROOT))
import dhrd, prepare  # noqa: E402

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=8", "--dtype=float32", "--eval_batch_size=256",
        "--warmup_iters=2", "--learning_rate=3e-3"]


def _train_run(*args, cwd, timeout=120, check=True):
    r = subprocess.run([sys.executable, str(ROOT / "dhrd.py"), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def _train_log(out_dir, key="loss"):
    return [json.loads(l) for l in (pathlib.Path(out_dir) / "log.jsonl").read_text().splitlines()
            if key in json.loads(l)]


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth")
    prepare.prepare(task="synth", out_dir=d, quiet=True)
    return d


def test_train_metrics_handmade():
    # CB: 3 classes; macro-F1 = mean of per-class F1 over classes seen in gold or predictions
    gold = np.array([0, 0, 1, 2, 2, 2])
    probs = np.eye(3)[[0, 1, 1, 2, 2, 0]]
    m = dhrd.metrics("cb", probs, gold, np.arange(6))
    f1 = [2 * 1 / (2 + 2), 2 * 1 / (1 + 2), 2 * 2 / (3 + 2)]  # class 0: tp 1, |gold| 2, |pred| 2; ...
    assert m == pytest.approx({"f1": sum(f1) / 3, "accuracy": 4 / 6})
    # MultiRC: F1a over all answers (positive = 1); EM = share of questions (groups) with every answer right
    gold = np.array([1, 0, 1, 1, 0, 0])
    pred = np.array([1, 0, 0, 1, 0, 1])
    groups = np.array([7, 7, 7, 3, 3, 5])
    m = dhrd.metrics("multirc", np.eye(2)[pred], gold, groups, pos=1)
    assert m == pytest.approx({"f1a": 2 * 2 / (3 + 3), "em": 1 / 3})
    # COPA: per pair the alternative with the higher P(Yes) is chosen; correct if its gold is Yes (pos=1)
    gold = np.array([1, 0, 0, 1, 1, 0])
    p_yes = np.array([0.4, 0.3, 0.9, 0.8, 0.2, 0.1])  # pair 0: option 0 (right); pair 1: option 2 (wrong); pair 2: 4
    probs = np.stack([1 - p_yes, p_yes], 1)
    assert dhrd.metrics("copa", probs, gold, np.array([0, 0, 1, 1, 2, 2]), pos=1) == {"accuracy": pytest.approx(2 / 3)}
    # an unparsed CoT answer (zero row) is wrong, never class 0
    assert dhrd.metrics("accuracy", np.array([[0.0, 0.0], [0.0, 1.0]]), np.array([0, 1]), np.arange(2)) == {"accuracy": 0.5}


def test_train_config_errors(tmp_path):
    r = _train_run("--learning_rat=1e-3", cwd=tmp_path, check=False)  # the CLI: a message, no traceback
    assert r.returncode != 0 and "unknown config key 'learning_rat'" in r.stderr and "learning_rate" in r.stderr
    assert "Traceback" not in r.stderr
    for args, msg in [(["--max_iters=ten"], "--max_iters: expected int for max_iters (like 600), got 'ten'"),
                      (["--compile=maybe"], "expected bool for compile"), (["--alpha=x"], "expected float for alpha"),
                      (["--lr_decay=step"], "lr_decay='step' is not one of cosine, linear"),
                      (["--batch_size"], "use --key=value"), (["--batch_size=0"], "must be >= 1")]:
        with pytest.raises(dhrd.ConfigError, match=re.escape(msg)):
            dhrd.parse_config(args)
    (tmp_path / "c.json").write_text(json.dumps({"batch_size": 4, "alhpa": 1}))
    with pytest.raises(dhrd.ConfigError, match=r"c.json: unknown config key 'alhpa'; did you mean alpha\?"):
        dhrd.parse_config([str(tmp_path / "c.json")])
    (tmp_path / "d.json").write_text(json.dumps({"batch_size": 4, "alpha": 0}))
    cfg = dhrd.parse_config([str(tmp_path / "d.json"), "--batch_size=7"])  # later wins; an int is a fine float
    assert (cfg.batch_size, cfg.alpha, cfg.out_dir, cfg.data_dir) == (7, 0.0, "out-synth", "data/synth")
    with pytest.raises(dhrd.ConfigError, match="nowhere/meta.json: not found.*prepare.py --task=cb"):
        dhrd.main(["--task=cb", "--data_dir=nowhere"])


def test_train_ddp_two_processes_match_one(train_data, tmp_path):
    """2 Gloo processes x 1 micro-step == 1 process x 2 micro-steps: same samples per step, same losses."""
    flags = [*TINY, f"--data_dir={train_data}", "--gradient_accumulation_steps=2", "--max_iters=4",
             "--log_interval=1", "--eval_interval=4", "--dropout=0.0"]
    _train_run(*flags, f"--out_dir={tmp_path / 'one'}", cwd=tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(ROOT / "dhrd.py"), *flags, f"--out_dir={tmp_path / 'two'}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = _train_log(tmp_path / "one"), _train_log(tmp_path / "two")
    assert [l["iter"] for l in one] == [l["iter"] for l in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for k in ("loss", "loss_cls", "loss_lm"):
            assert abs(a[k] - b[k]) < 1e-5, (k, a, b)
    assert len({l["loss"] for l in one}) == 4  # the losses move: the comparison means something


def _train_weights(out_dir):
    return torch.load(pathlib.Path(out_dir) / "ckpt.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def trained_run(train_data, tmp_path_factory):
    """An uninterrupted run (dropout on, so RNG restore matters) that resume, eval_only and predict compare to."""
    d = tmp_path_factory.mktemp("run")
    flags = [*TINY, f"--data_dir={train_data}", "--max_iters=40", "--eval_interval=5", "--log_interval=1",
             "--dropout=0.1"]
    _train_run(*flags, f"--out_dir={d / 'full'}", cwd=d)
    return d, flags


def test_train_resume_after_kill_is_exact(trained_run):
    d, flags = trained_run
    out = d / "killed"
    p = subprocess.Popen([sys.executable, str(ROOT / "dhrd.py"), *flags, f"--out_dir={out}"], cwd=d,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (out / "ckpt.pt").exists() and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    p.kill()
    p.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    killed_at = torch.load(out / "ckpt.pt", weights_only=True)["iter"]
    assert killed_at < 40
    _train_run("--init_from=resume", f"--out_dir={out}", cwd=d)
    full, resumed = _train_weights(d / "full"), _train_weights(out)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    res = [json.loads((x / "results.json").read_text()) for x in (d / "full", out)]
    assert res[0] == res[1] and res[0]["val"]["accuracy"] > 0
    assert _train_log(d / "full") == _train_log(out)  # the log after the kill was trimmed to the checkpoint


def test_train_eval_only_and_predict(trained_run):
    d, _ = trained_run
    run, res = d / "full", json.loads((d / "full" / "results.json").read_text())
    r = _train_run(f"--init_from={run}", "--eval_only=True", cwd=d)
    assert json.loads(r.stdout.strip().splitlines()[-1])["val"] == res["val"]  # the exported best model
    rows = [json.loads(l) for l in (pathlib.Path(json.loads((run / "config.json").read_text())["data_dir"]) /
                                    "val.jsonl").read_text().splitlines()]
    (d / "in.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    _train_run(f"--init_from={run / 'model'}", f"--predict={d / 'in.jsonl'}", f"--predictions={d / 'p.jsonl'}", cwd=d)
    preds = [json.loads(l) for l in (d / "p.jsonl").read_text().splitlines()]
    assert len(preds) == len(rows) and all(abs(sum(p["probs"].values()) - 1) < 1e-5 for p in preds)
    acc = np.mean([p["label"] == r["label"] for p, r in zip(preds, rows)])
    assert acc == pytest.approx(res["val"]["accuracy"])
    (d / "bad.jsonl").write_text('{"text": "a=1;a>4?"}\n{"txt": 1}\n')
    r = _train_run(f"--init_from={run}", f"--predict={d / 'bad.jsonl'}", cwd=d, check=False)
    assert r.returncode != 0 and "bad.jsonl:2" in r.stderr and "'text'" in r.stderr


def test_train_nonfinite_loss_stops_clearly(train_data, tmp_path):
    out = tmp_path / "nan"
    r = _train_run(*TINY, f"--data_dir={train_data}", f"--out_dir={out}", "--learning_rate=1e30", "--warmup_iters=0",
                   "--grad_clip=0", "--max_iters=6", "--eval_interval=1", cwd=tmp_path, check=False)
    assert r.returncode != 0 and "non-finite loss at iter 2" in r.stderr, r.stdout + r.stderr
    assert "ckpt.pt (iter 1)" in r.stderr and "Traceback" not in r.stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 1  # the last good checkpoint is intact


def test_train_compile_alpha0_and_cot(train_data, tmp_path):
    """--compile=True trains; alpha=0 (pooled baseline) logs no LM loss; beta=0 evaluates by decoding."""
    r = _train_run(*TINY, f"--data_dir={train_data}", f"--out_dir={tmp_path / 'c'}", "--compile=True", "--max_iters=2",
                   "--alpha=0", cwd=tmp_path, timeout=300)
    assert "val accuracy" in r.stdout and _train_log(tmp_path / "c")[-1]["loss_lm"] is None
    _train_run(*TINY, f"--data_dir={train_data}", f"--out_dir={tmp_path / 'cot'}", "--beta=0", "--max_iters=2",
               "--cot_tokens=8", cwd=tmp_path)
    val = _train_log(tmp_path / "cot", "val")[-1]["val"]
    assert val == {"accuracy": 0.0}  # 8 tokens never reach "Final Answer:": unparsed answers count as wrong


class _TrainFakeLM:
    """Stands in for GPT in class_probs: 'decodes' a fixed continuation per prompt."""
    config = type("C", (), {"block_size": 64})

    def __init__(self, tok, answers):
        self.tok, self.answers = tok, answers

    def eval(self):
        pass

    train = eval

    def generate(self, idx, n, eos_token_id=None, attention_mask=None):
        outs = [self.tok.encode(a) + [eos_token_id] * n for a in self.answers[:len(idx)]]
        return torch.cat([idx, torch.tensor([o[:n] for o in outs])], 1)


def test_train_cot_answer_parsing():
    """beta=0 evaluation: the verbalised label after the last "Final Answer:" line; anything else = no prediction."""
    meta = dict(labels=["No", "Yes"], verbalizers={"No": "No", "Yes": "Yes"}, pad_id=40, eos_id=39)
    tok = prepare.CharTokenizer("\n +,-0123456789:;=>?AFNRYabcdegilnorsw")
    answers = ["\nReasoning:\nb=1+2=3\nFinal Answer:\nYes", "\nReasoning:\nb=9\nFinal Answer:\nNo",
               "\nReasoning:\nb=9\nFinal Answer:\nYess", "\nReasoning:\nb=1+2=3,c="]
    seqs = [[1, 2], [3], [4, 5, 6], [7]]  # lengths differ: length-sorted batches must map back to the rows
    order = np.argsort([len(s) for s in seqs], kind="stable")
    model = _TrainFakeLM(tok, [answers[j] for j in order])
    probs = dhrd.class_probs(model, seqs, meta, True, "cpu", torch.no_grad(), 8, 60, tok)
    assert probs.tolist() == [[0, 1], [1, 0], [0, 0], [0, 0]]
