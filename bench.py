"""
Speed of DHRD in one run on one backbone (paper Table 5, App. E.6-E.7):
  pooled   classification QPS: samples / wall-clock of pure forward passes over x, last-token pooling,
           the LM head unused (App. E.7);
  cot      chain-of-thought decoding with the KV cache, paper sampling (temperature 0.1, top_p 0.7, E.6);
  speedup  pooled.qps / cot.qps;
  train    one DHRD step: ONE forward for both losses (Eq. 4) + backward + AdamW; tokens/s over x+rationale,
           MFU on CUDA against the card's bf16 dense peak, on CPU the fraction of a matmul peak measured here;
  lm_loss_memory  peak memory of the fused masked LM loss vs full-logits cross-entropy (fwd+bwd).
Weights are random (speed does not depend on their values) unless --init_from is a model folder.
  python bench.py --init_from=gpt2 --device=cpu --out=bench.json
"""
import copy, json, os, subprocess, sys, time, statistics
from contextlib import nullcontext
import torch
import torch.nn.functional as F
from gpt import GPT, GPTConfig, dual_loss, fused_lm_loss, native_dtype

# ----------------------------------------------------------------------------- config (--key=value)
init_from = "gpt2"        # a model folder (real weights), or a built-in shape below (random weights)
device = "cpu"            # cpu | cuda | cuda:N
dtype = "auto"            # auto (gpt.native_dtype) | float32 | bfloat16 | float16 (GPU only)
compile = False           # torch.compile the model (GPU; slow to start on CPU)
batch_size, seq_len = 16, 128               # pooled classification
cot_batch_size, cot_tokens = 8, 64          # CoT decoding: new tokens per sample (paper: up to 500)
cot_prompt_len = 32       # CoT prompt length; shorter than seq_len, so the speedup errs in CoT's favour
temperature, top_p = 0.1, 0.7               # paper App. E.6
train_batch_size, train_seq_len = 4, 256    # one DHRD step; the first half of each row is x
alpha, beta = 1.0, 1.0    # Eq. 4 weights of the timed step
mem_vocab, mem_seq_len = 50257, 1024        # LM loss memory at GPT-2's vocabulary and a full context
agree_batches = 8         # pooled batches compared against the float32 path (prediction agreement)
warmup, repeats = 1, 3    # untimed calls, then the median of `repeats` timed calls
num_labels = 2
seed = 1337
out = "bench.json"

# Shapes of the public checkpoints (their config.json), so `--init_from=gpt2` needs no download.
SHAPES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "facebook/opt-125m": dict(model_type="opt", vocab_size=50272, block_size=2048, n_layer=12, n_head=12,
                              n_embd=768, activation="relu", bos_token_id=2, eos_token_id=2, pad_token_id=1,
                              pos_offset=2),
    "facebook/opt-350m": dict(model_type="opt", vocab_size=50272, block_size=2048, n_layer=24, n_head=16,
                              n_embd=1024, activation="relu", bos_token_id=2, eos_token_id=2, pad_token_id=1,
                              word_embed_proj_dim=512, pre_ln=False, pos_offset=2),
}
GPU_PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}  # bf16 dense; other cards: no MFU


def parse_args(argv, cfg):
    """--key=value over the globals above; the value's type follows the default's."""
    for arg in argv:
        key, eq, val = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not eq or key not in cfg or key.startswith("_"):
            raise SystemExit(f"bench.py: bad argument {arg!r}: expected --key=value with key one of "
                             + ", ".join(k for k in cfg if not k.startswith("_")))
        old = cfg[key]
        try:
            if isinstance(old, bool):
                if val not in ("True", "False", "true", "false", "1", "0"):
                    raise ValueError("expected True or False")
                new = val in ("True", "true", "1")
            else:
                new = type(old)(val)
        except ValueError as e:
            raise SystemExit(f"bench.py: bad value for --{key}: {val!r} ({e}); default is {old!r}")
        cfg[key] = new
    return cfg


def load_model(init_from):
    if os.path.isdir(init_from):  # its own `score` head if it has one, else a fresh num_labels head
        model = GPT.from_pretrained(init_from)
        return model if model.score is not None else GPT.from_pretrained(init_from, num_labels=num_labels)
    if init_from not in SHAPES:
        raise SystemExit(f"bench.py: --init_from={init_from!r} is neither a model folder nor a built-in "
                         f"shape ({', '.join(SHAPES)})")
    return GPT(GPTConfig(**SHAPES[init_from], num_labels=num_labels))


def sync():
    if "cuda" in device:
        torch.cuda.synchronize(device)


def timed(fn):
    """Median wall-clock seconds of `repeats` calls after `warmup` calls (clock read after a GPU sync)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(ptdtype, n=2048):
    """Measured dense matmul throughput: the peak the CPU figure is a fraction of."""
    a = torch.randn(n, n, device=device, dtype=ptdtype)
    b = torch.randn(n, n, device=device, dtype=ptdtype)
    return 2 * n**3 / timed(lambda: a @ b) / 1e12


def lm_loss_peak_mb(kind, vocab, rows, n_embd, dev, dtype):
    """Peak extra memory (MB) of the LM loss, forward + backward under `dtype` autocast, beyond its
    inputs h [rows,C] and W [V,C]; both variants produce the same gradients, W.grad included.
    CUDA: torch.cuda.max_memory_allocated. CPU (Linux): in a fresh process per variant (no allocator
    cache from earlier work), reset the resident-set high-water mark (/proc/self/clear_refs '5') and
    read VmHWM minus the resident set just before."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, n_embd, generator=g).to(dev).requires_grad_()
    w = (0.02 * torch.randn(vocab, n_embd, generator=g)).to(dev).requires_grad_()
    t = torch.randint(vocab, (rows,), generator=g).to(dev)
    t[::7] = -100  # some ignored targets, like padding
    ctx = nullcontext() if dtype == "float32" else torch.autocast(dev.split(":")[0], getattr(torch, dtype))

    def status_kb(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))
    if dev.startswith("cuda"):
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = status_kb("VmRSS:") * 1024
    with ctx:  # naive: the full [rows, V] logits, as F.cross_entropy needs them
        loss = fused_lm_loss(h, w, t) if kind == "fused" else F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    loss.backward()
    sync()
    peak = torch.cuda.max_memory_allocated(dev) if dev.startswith("cuda") else status_kb("VmHWM:") * 1024
    return (peak - base) / 2**20


def lm_loss_memory(n_embd):
    if device.startswith("cuda"):
        return {k: lm_loss_peak_mb(k, mem_vocab, mem_seq_len, n_embd, device, dtype) for k in ("fused", "naive")}
    res = {}
    for kind in ("fused", "naive"):  # a fresh interpreter each: the allocator holds no memory from before
        code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                f"import torch, bench; torch.set_num_threads({torch.get_num_threads()}); "
                f"print(bench.lm_loss_peak_mb({kind!r}, {mem_vocab}, {mem_seq_len}, {n_embd}, 'cpu', {dtype!r}))")
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"bench.py: LM loss memory child ({kind}) failed:\n{p.stderr[-2000:]}")
        res[kind] = float(p.stdout.split()[-1])
    return res


def main():
    cfg = parse_args(sys.argv[1:], {k: v for k, v in globals().items()
                                    if not k.startswith("_") and isinstance(v, (int, float, bool, str))})
    globals().update(cfg)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench.py: --device=cuda but torch.cuda.is_available() is False; use --device=cpu")
    if dtype not in ("auto", "float32", "bfloat16", "float16") or dtype == "float16" and "cuda" not in device:
        raise SystemExit(f"bench.py: --dtype={dtype!r}: expected auto, float32 or bfloat16 (float16 on CUDA only: "
                         "CPUs run float16 matmuls at a few GFLOP/s)")
    why = "--dtype"
    if dtype == "auto":
        globals()["dtype"], why = native_dtype(device)
    if min(batch_size, seq_len, cot_batch_size, cot_tokens, cot_prompt_len, train_batch_size, train_seq_len) < 1:
        raise SystemExit("bench.py: batch sizes, lengths and token counts must be >= 1")
    torch.manual_seed(seed)
    device_type = "cuda" if "cuda" in device else "cpu"
    ptdtype = getattr(torch, dtype)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=ptdtype)

    model = load_model(init_from).to(device)
    c = model.config
    for name, n in (("seq_len", seq_len), ("cot_prompt_len + cot_tokens", cot_prompt_len + cot_tokens),
                    ("train_seq_len", train_seq_len)):
        if n > c.block_size:
            raise SystemExit(f"bench.py: --{name.split()[0]}: {name}={n} exceeds the model's block_size {c.block_size}")
    # torch.compile wraps forward only: compile the pooled entry point and the training forward (generate is eager)
    classify, fast = (torch.compile(model.classify), torch.compile(model)) if compile else (model.classify, model)
    g = torch.Generator(device).manual_seed(seed)
    rand = lambda *shape: torch.randint(c.vocab_size, shape, generator=g, device=device)
    model.eval()

    # --- pooled classification (App. E.7): one forward over x, last-token pooling, no LM head
    x = rand(batch_size, seq_len)
    with torch.inference_mode(), ctx:  # one autocast region: weights are cast once, then cached
        t_pooled = timed(lambda: classify(x))
    # agreement with the float32 path on batches of mixed lengths (right padding, the real use)
    agree = total = 0
    with torch.inference_mode():
        for _ in range(agree_batches):
            xb = rand(batch_size, seq_len)
            lens = torch.randint(1, seq_len + 1, (batch_size,), generator=g, device=device)
            mask = (torch.arange(seq_len, device=device)[None] < lens[:, None]).long()
            ref = model.classify(xb, mask).argmax(-1)
            with ctx:  # autocast keeps the residual stream in fp32: 100% agree (all-bf16 weights: 98.4%)
                agree += (classify(xb, mask).argmax(-1) == ref).sum().item()
            total += batch_size

    # --- CoT decoding (App. E.6): KV cache, temperature 0.1, top_p 0.7, no early stop (fixed length)
    prompt = rand(cot_batch_size, cot_prompt_len)
    # decoding runs on a copy with weights in `dtype`: a decode step is a few small matmuls, and autocast's
    # casts and fp32 side ops cost more than the matmuls there (gpt2: 60 -> 107 new tok/s, 2-core EPYC)
    infer = model if dtype == "float32" else copy.deepcopy(model).to(ptdtype)
    def decode():
        gen = torch.Generator(device).manual_seed(seed)
        y = infer.generate(prompt, cot_tokens, temperature=temperature, top_p=top_p, generator=gen)
        assert y.shape == (cot_batch_size, cot_prompt_len + cot_tokens), y.shape
    with torch.inference_mode():
        t_cot = timed(decode)
    del infer

    # --- one DHRD training step: forward (both losses, Eq. 4) + backward + AdamW
    model.train()
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
    s = rand(train_batch_size, train_seq_len)
    x_len = torch.full((train_batch_size,), max(1, train_seq_len // 2), device=device)
    targets = torch.cat([s[:, 1:], torch.full_like(s[:, :1], -100)], 1)  # next token; last has none
    y = torch.randint(max(1, c.num_labels), (train_batch_size,), generator=g, device=device)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")
    def step():
        with ctx:
            loss, _ = dual_loss(fast(s, x_len=x_len, lm_targets=targets), y, alpha, beta)  # Eq. 4
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    t_train = timed(step)
    tok_s = train_batch_size * train_seq_len / t_train
    achieved = model.flops_per_token(train_seq_len) * tok_s / 1e12
    peak_mm = matmul_tflops(ptdtype)
    mfu = None
    if device_type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
        mfu = achieved / peak if peak else None

    mem = lm_loss_memory(c.n_embd)

    res = {"device": device, "dtype": dtype, "dtype_reason": why, "model": init_from,
           "pooled": {"batch_size": batch_size, "seq_len": seq_len, "qps": batch_size / t_pooled,
                      "agreement_fp32": agree / total, "agreement_n": total},
           "cot": {"batch_size": cot_batch_size, "new_tokens": cot_tokens, "prompt_len": cot_prompt_len,
                   "temperature": temperature, "top_p": top_p, "qps": cot_batch_size / t_cot,
                   "tokens_per_s": cot_batch_size * cot_tokens / t_cot},
           "train": {"batch_size": train_batch_size, "seq_len": train_seq_len, "tokens_per_s": tok_s,
                     "tflops": achieved, "mfu": mfu, "matmul_peak_tflops": peak_mm,
                     "matmul_peak_fraction": achieved / peak_mm},
           "lm_loss_memory": {"fused_peak_mb": mem["fused"], "naive_peak_mb": mem["naive"],
                              "vocab": mem_vocab, "seq_len": mem_seq_len,
                              "method": "cuda max_memory_allocated" if device_type == "cuda"
                              else "fresh process, VmHWM after clear_refs"}}
    res["speedup"] = res["pooled"]["qps"] / res["cot"]["qps"]
    res["threads"] = torch.get_num_threads()

    p, ct, tr, m = res["pooled"], res["cot"], res["train"], res["lm_loss_memory"]
    print(f"dhrd bench: {init_from} on {device} {dtype} ({why}), {res['threads']} threads, median of {repeats}")
    rows = [("pooled QPS", f"{p['qps']:.2f}", f"batch {batch_size} x {seq_len} tokens; "
             f"agrees with fp32 on {100 * p['agreement_fp32']:.1f}% of {total}"),
            ("CoT QPS", f"{ct['qps']:.3f}", f"batch {cot_batch_size}, {cot_prompt_len}-token prompt "
             f"+ {cot_tokens} new, T={temperature} top_p={top_p}"),
            ("CoT new tokens/s", f"{ct['tokens_per_s']:.1f}", "KV cache"),
            ("speedup", f"{res['speedup']:.1f}x", "pooled QPS / CoT QPS (paper Table 5: 96-142x at 500 tokens)"),
            ("train tokens/s", f"{tok_s:.1f}", f"DHRD step batch {train_batch_size} x {train_seq_len}, "
             f"{achieved:.3f} TFLOP/s"),
            ("train MFU" if mfu is not None else "matmul peak frac",
             f"{100 * (mfu if mfu is not None else tr['matmul_peak_fraction']):.1f}%",
             f"measured {dtype} matmul peak {peak_mm:.3f} TFLOP/s"),
            ("LM loss peak MB", f"{m['fused_peak_mb']:.0f} / {m['naive_peak_mb']:.0f}",
             f"fused / full logits (x{m['fused_peak_mb'] / max(m['naive_peak_mb'], 1e-9):.2f}), "
             f"V={mem_vocab} T={mem_seq_len}, fwd+bwd")]
    for r in rows:
        print(f"  {r[0]:<18} {r[1]:>12}   {r[2]}")
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
