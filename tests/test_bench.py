import json
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "gpt.py").exists())
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
from gpt import GPT, GPTConfig, fused_lm_loss  # noqa: E402

BENCH_TINY = ["--batch_size=4", "--seq_len=16", "--cot_batch_size=2", "--cot_tokens=5", "--cot_prompt_len=3",
              "--train_batch_size=2", "--train_seq_len=12", "--agree_batches=2", "--warmup=0", "--repeats=2",
              # 4096 rows x 4096 vocab: the naive loss holds several [4096, 4096] fp32 tensors (64 MB each),
              # the fused one only [chunk, 4096] pieces, so fused < naive must hold by a wide margin
              "--mem_vocab=4096", "--mem_seq_len=4096"]


def _bench_run(*args, timeout=120):
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _bench_tiny_model(path):
    cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, num_labels=3)
    GPT(cfg).save_pretrained(path)
    return path


def test_bench_end_to_end_json(tmp_path):
    model_dir = _bench_tiny_model(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    p = _bench_run(f"--init_from={model_dir}", f"--out={out}", *BENCH_TINY)  # default dtype: bfloat16
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    # every key of SPEC §5, with the shapes that were asked for
    assert r["device"] == "cpu" and r["dtype"] == "bfloat16" and r["model"] == str(model_dir)
    assert {k: r["pooled"][k] for k in ("batch_size", "seq_len")} == {"batch_size": 4, "seq_len": 16}
    assert {k: r["cot"][k] for k in ("batch_size", "new_tokens")} == {"batch_size": 2, "new_tokens": 5}
    assert {k: r["train"][k] for k in ("batch_size", "seq_len")} == {"batch_size": 2, "seq_len": 12}
    assert r["train"]["mfu"] is None  # no MFU on a CPU: there is no vendor peak to divide by
    for v in (r["pooled"]["qps"], r["cot"]["qps"], r["cot"]["tokens_per_s"], r["train"]["tokens_per_s"]):
        assert isinstance(v, float) and v > 0
    assert r["speedup"] == r["pooled"]["qps"] / r["cot"]["qps"]
    assert r["cot"]["tokens_per_s"] == pytest.approx(r["cot"]["qps"] * 5)
    assert r["pooled"]["agreement_n"] == 8 and 0 <= r["pooled"]["agreement_fp32"] <= 1
    m = r["lm_loss_memory"]
    assert 0 < m["fused_peak_mb"] < m["naive_peak_mb"]
    assert m["naive_peak_mb"] > 32  # at least one [4096, 4096] logits tensor was measured
    assert "pooled QPS" in p.stdout and "speedup" in p.stdout  # the printed table


def test_bench_builtin_shape_is_gpt2_124m():
    # `--init_from=gpt2` builds the real shape without a download: 124,439,808 parameters (tied
    # embeddings, as HF counts GPT2LMHeadModel) plus the bias-free 768 x 2 pooled head
    model = bench.load_model("gpt2")
    assert sum(p.numel() for p in model.parameters()) == 124_439_808 + 768 * bench.num_labels


def test_bench_bad_flag_cli():
    p = _bench_run("--batch_sise=4", timeout=60)
    assert p.returncode != 0 and "bad argument '--batch_sise=4'" in p.stderr and "batch_size" in p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("arg, needle", [
    ("--batch_size=four", "bad value for --batch_size"),
    ("--compile=maybe", "bad value for --compile"),
    ("seq_len=4", "bad argument 'seq_len=4'"),
    ("--init_from=no-such-model", "neither a model folder nor a built-in shape"),
    ("--dtype=float16", "float16 on CUDA only"),
    ("--seq_len=65", "exceeds the model's block_size 64"),
])
def test_bench_bad_flags(arg, needle, tmp_path, monkeypatch):
    model_dir = _bench_tiny_model(tmp_path / "tiny")
    saved = dict(vars(bench))  # main() writes the flags into the module globals (nanoGPT style)
    monkeypatch.setattr(sys, "argv", ["bench.py", f"--init_from={model_dir}", arg])
    try:
        with pytest.raises(SystemExit) as e:
            bench.main()
    finally:
        vars(bench).update(saved)
    assert needle in str(e.value)


def test_bench_fused_lm_loss_blocks_and_bf16_match_naive():
    # bench.py's memory figure relies on gpt.fused_lm_loss working in [rows, chunk] pieces: several row blocks
    # and vocabulary slices (targets on slice edges) must give the naive loss and gradients, also under autocast
    torch.manual_seed(0)
    h = torch.randn(37, 24, requires_grad=True)
    w = torch.randn(61, 24, requires_grad=True)
    t = torch.randint(0, 61, (37,))
    t[:6] = torch.tensor([0, 60, 15, 16, -100, 31])
    ref = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, [h, w])
    for chunk, rows in ((16, 8), (7, 5), (61, 37)):
        loss = fused_lm_loss(h, w, t, chunk=chunk, rows=rows)
        gh, gw = torch.autograd.grad(3 * loss, [h, w])  # a non-unit upstream gradient
        assert abs(loss.item() - ref.item()) < 1e-5
        assert (gh - 3 * rh).abs().max() < 1e-5 and (gw - 3 * rw).abs().max() < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_lm_loss(h, w, t, chunk=16, rows=8)
    gh, gw = torch.autograd.grad(loss, [h, w])
    assert gw.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05 * ref.item()
    assert (gw - rw).abs().max() < 0.05 * rw.abs().max() and (gh - rh).abs().max() < 0.05 * rh.abs().max()
