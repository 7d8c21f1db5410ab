"""
Speed of DHRD in one run on one backbone (paper Table 5, App. E.6-E.7):
  pooled   classification QPS: samples / wall-clock of pure forward passes over x, last-token pooling,
           the LM head unused (App. E.7);
  cot      chain-of-thought decoding with the KV cache, paper sampling (temperature 0.1, top_p 0.7, E.6);
  speedup  pooled.qps / cot.qps;
  train    one DHRD step: ONE forward for both losses (Eq. 4) + backward + AdamW; tokens/s over x+rationale,
           MFU on CUDA against the card's bf16 dense peak, on CPU the fraction of a matmul peak measured here;
           full fine-tuning, or LoRA adapters on a frozen base (--train_lora_rank, paper App. E.4);
  grad_checkpoint the training step with each block recomputed in backward: tokens/s and the peak memory
           of forward + backward, with and without (dhrd.py --grad_checkpoint);
  lm_loss_memory  peak memory of the fused masked LM loss vs full-logits cross-entropy (fwd+bwd).
Weights are random (speed does not depend on their values) unless --init_from is a model folder.
On CUDA a built-in shape is built on the GPU with its weights in --dtype (an 8B model: 16 GB of bf16 there,
never 32 GB of fp32 on the host); on the CPU in fp32, computed under autocast.
  python bench.py --init_from=gpt2 --device=cpu --out=bench.json
  python bench.py --init_from=llama-3.1-8b --device=cuda --cot_tokens=500 --train_lora_rank=16
"""
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig, add_lora, dual_loss, fused_lm_loss, native_dtype
from plumbing import ConfigError, parse_flags

# ----------------------------------------------------------------------------- config (--key=value)
init_from = "gpt2"        # a model folder (real weights), or a built-in shape below (random weights)
device = "cpu"            # cpu | cuda | cuda:N
dtype = "auto"            # auto (gpt.native_dtype) | float32 | bfloat16 | float16 (GPU only)
compile = False           # torch.compile the model (GPU; slow to start on CPU)
# pooled classification
batch_size = 16
seq_len = 128
# CoT decoding
cot_batch_size = 8
cot_tokens = 64           # new tokens per sample (paper: up to 500)
cot_prompt_len = 32       # shorter than seq_len, so the speedup errs in CoT's favour
temperature = 0.1         # paper App. E.6
top_p = 0.7               # paper App. E.6
# one DHRD training step; the first half of each row is x; alpha, beta: the Eq. 4 weights of its loss
train_batch_size = 4
train_seq_len = 256
alpha = 1.0
beta = 1.0
train_lora_rank = 0       # 0: full fine-tuning (fp32 master weights + AdamW: 16 bytes/param); r > 0: LoRA
                          # of rank r on a frozen base (paper App. E.4: 16); only adapters + pooled head train
# LM loss memory at GPT-2's vocabulary and a full context
mem_vocab = 50257
mem_seq_len = 1024
agree_batches = 8         # pooled batches compared against the float32 path (prediction agreement)
warmup = 1                # untimed calls before the timed ones
repeats = 3               # timed calls; their median is reported
num_labels = 2
seed = 1337
out = "bench.json"
# the flags: every setting above, typed like its default (plumbing.parse_flags has the rules)
FLAGS = {k: v for k, v in globals().items()
         if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16")}

# Llama / Qwen3: the fixed fields gpt.py's config.json loader sets for these families (RMSNorm, SwiGLU,
# no biases, pre-LN); Llama-3.1/3.2's 'llama3' rotary scaling, its `factor` per model
_LLAMA_QWEN = dict(norm="rmsnorm", glu=True, activation="silu", bias=False, qkv_bias=False, pre_ln=True)
_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
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
    # the paper's backbones (Table 1, Table 5), from their config.json
    "llama-3.1-8b": dict(model_type="llama", **_LLAMA_QWEN, vocab_size=128256, block_size=131072,
                         n_layer=32, n_head=32, n_kv_head=8, head_dim=128, n_embd=4096, n_inner=14336,
                         rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
                         layer_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000,
                         eos_token_id=128001),
    "llama-3.2-3b": dict(model_type="llama", **_LLAMA_QWEN, vocab_size=128256, block_size=131072,
                         n_layer=28, n_head=24, n_kv_head=8, head_dim=128, n_embd=3072, n_inner=8192,
                         rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
                         layer_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000,
                         eos_token_id=128001),
    "qwen3-4b": dict(model_type="qwen3", **_LLAMA_QWEN, qk_norm=True, vocab_size=151936, block_size=40960,
                     n_layer=36, n_head=32, n_kv_head=8, head_dim=128, n_embd=2560, n_inner=9728,
                     rope_theta=1000000.0, layer_norm_eps=1e-6, tie_word_embeddings=True,
                     bos_token_id=151643, eos_token_id=151645),
    "qwen3-8b": dict(model_type="qwen3", **_LLAMA_QWEN, qk_norm=True, vocab_size=151936, block_size=40960,
                     n_layer=36, n_head=32, n_kv_head=8, head_dim=128, n_embd=4096, n_inner=12288,
                     rope_theta=1000000.0, layer_norm_eps=1e-6, tie_word_embeddings=False,
                     bos_token_id=151643, eos_token_id=151645),
}
# tiny members of three families: CPU dry runs of experiments/gpu/run.sh (their timings mean nothing)
_TINY = dict(vocab_size=512, n_layer=2, n_head=4, n_embd=64, bos_token_id=1, eos_token_id=2)
SHAPES["gpt2-tiny"] = dict(**_TINY, block_size=256)
SHAPES["llama-tiny"] = {**SHAPES["llama-3.2-3b"], **_TINY, "n_kv_head": 2, "head_dim": 16, "n_inner": 128}
SHAPES["qwen3-tiny"] = {**SHAPES["qwen3-4b"], **_TINY, "n_kv_head": 2, "head_dim": 32, "n_inner": 128}
GPU_PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}  # bf16 dense; other cards: no MFU
LORA_ALPHA = 32.0         # paper App. E.4 (with r=16)
LORA_DROPOUT = 0.1        # paper App. E.4
# full fine-tuning keeps fp32 weights, gradients and two AdamW moments: 16 bytes per parameter (an 8B model:
# 128 GB); refused on a GPU where that is over 3/4 of its memory (the rest: activations, allocator slack)
FULL_FT_BYTES_PER_PARAM = 16


def load_model(init_from, dev="cpu", weights_dtype=torch.float32):
    """The model on `dev`, its weights in `weights_dtype`. A built-in shape is constructed there directly
    (default device and dtype set around GPT(...)); a folder is read on the host, then moved."""
    if os.path.isdir(init_from):  # its own `score` head if it has one, else a fresh num_labels head
        model = GPT.from_pretrained(init_from)
        if model.score is None:
            model = GPT.from_pretrained(init_from, num_labels=num_labels)
        return model.to(dev, weights_dtype)
    if init_from not in SHAPES:
        raise ConfigError(f"--init_from={init_from!r} is neither a model folder nor a built-in shape "
                          f"({', '.join(SHAPES)})")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(weights_dtype)
    try:
        with torch.device(dev):
            return GPT(GPTConfig(**SHAPES[init_from], num_labels=num_labels))
    finally:
        torch.set_default_dtype(default_dtype)


def train_flops_per_token(model, T):
    """FLOPs of one training token: gpt's 6 N + 12 L H Q T (per weight: forward 2, input gradient 2,
    weight gradient 2) less 2 per frozen weight, which gets no weight gradient:
    6 N_trained + 4 N_frozen + 12 L H Q T. Full fine-tuning: N_frozen = 0. The position table is left out,
    as gpt.flops_per_token does."""
    frozen = sum(p.numel() for n, p in model.named_parameters()
                 if not p.requires_grad and not n.startswith("wpe."))
    return model.flops_per_token(T) - 2 * frozen


def sync():
    if "cuda" in device:
        torch.cuda.synchronize(device)


def timed(fn, warm=None):
    """Median wall-clock seconds of `repeats` calls after `warmup` calls of `warm` (default: fn itself);
    the clock is read after a GPU sync."""
    warm = warm or fn
    for _ in range(warmup):
        warm()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_tflops(ptdtype, n):
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
    base = _peak_start(dev)
    with ctx:
        if kind == "fused":
            loss = fused_lm_loss(h, w, t)
        else:   # naive: the full [rows, V] logits, as F.cross_entropy needs them
            loss = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    loss.backward()
    return (_peak_bytes(dev) - base) / 2**20


def train_peak_mb(model_name, B, T, grad_checkpoint, dev, dtype, model=None):
    """Peak extra memory (MB) of one DHRD forward + backward (activations and gradients, on top of the
    weights) at batch B x T, with or without gradient checkpointing; measured as lm_loss_peak_mb does.
    model: the benchmark's own (CUDA, in this process), else model_name is built (fp32 weights)."""
    if model is None:
        model = load_model(model_name, dev)
    model.train()
    model.grad_checkpoint = grad_checkpoint
    g = torch.Generator().manual_seed(0)
    s = torch.randint(model.config.vocab_size, (B, T), generator=g).to(dev)
    targets = torch.cat([s[:, 1:], torch.full_like(s[:, :1], -100)], 1)
    x_len = torch.full((B,), max(1, T // 2), device=dev)
    y = torch.zeros(B, dtype=torch.long, device=dev)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(dev.split(":")[0], getattr(torch, dtype))
    base = _peak_start(dev)
    with ctx:
        loss, _ = dual_loss(model(s, x_len=x_len, lm_targets=targets), y, 1.0, 1.0)
    loss.backward()
    return (_peak_bytes(dev) - base) / 2**20


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def _peak_start(dev):
    """Reset the peak-memory counter -> the bytes in use now. CUDA: the allocator's counters; CPU (Linux):
    the resident set's high-water mark, reset through /proc/self/clear_refs."""
    if dev.startswith("cuda"):
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS:") * 1024


def _peak_bytes(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev)
    return _status_kb("VmHWM:") * 1024


def peak_mb(fn, *args):
    """fn(*args), a peak-memory measurement; on the CPU run in a fresh interpreter (no allocator cache from
    earlier work in this one)."""
    if device.startswith("cuda"):
        return fn(*args)
    here = os.path.dirname(os.path.abspath(__file__))
    code = "\n".join([
        "import sys",
        f"sys.path.insert(0, {here!r})",
        "import torch",
        "import bench",
        f"torch.set_num_threads({torch.get_num_threads()})",
        f"print(bench.{fn.__name__}{args!r})",
    ])
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"bench.py: {fn.__name__}{args!r} failed in its own process:\n{p.stderr[-2000:]}")
    return float(p.stdout.split()[-1])


def lm_loss_memory(n_embd):
    return {kind: peak_mb(lm_loss_peak_mb, kind, mem_vocab, mem_seq_len, n_embd, device, dtype)
            for kind in ("fused", "naive")}


def train_memory(model):
    """The training step's peak extra memory without and with gradient checkpointing: on CUDA of the
    benchmark's model (LoRA or not), on the CPU of a fresh full-fine-tuning copy in its own process."""
    res = {}
    for on in (False, True):
        if device.startswith("cuda"):
            res[on] = train_peak_mb(init_from, train_batch_size, train_seq_len, on, device, dtype, model)
        else:
            res[on] = peak_mb(train_peak_mb, init_from, train_batch_size, train_seq_len, on, device, dtype)
    model.grad_checkpoint = False
    model.zero_grad(set_to_none=True)
    return res


def print_table(res):
    p = res["pooled"]
    ct = res["cot"]
    tr = res["train"]
    m = res["lm_loss_memory"]
    print(f"dhrd bench: {res['model']} on {res['device']} {res['dtype']} ({res['dtype_reason']}), "
          f"{res['threads']} threads, median of {repeats}")
    if tr["mfu"] is not None:
        peak_row = ("train MFU", f"{100 * tr['mfu']:.1f}%", f"of {tr['peak_tflops']:.0f} TFLOP/s bf16 dense; "
                    f"measured {res['dtype']} matmul peak {tr['matmul_peak_tflops']:.3f} TFLOP/s")
    else:   # no vendor peak (a CPU, or an unlisted GPU): the fraction of the matmul peak measured here
        peak_row = ("matmul peak frac", f"{100 * tr['matmul_peak_fraction']:.1f}%",
                    f"measured {res['dtype']} matmul peak {tr['matmul_peak_tflops']:.3f} TFLOP/s")
    kind = "full fine-tuning"
    if tr["lora_rank"]:
        kind = f"LoRA r={tr['lora_rank']}"
    mem_ratio = m["fused_peak_mb"] / max(m["naive_peak_mb"], 1e-9)
    gc = res["grad_checkpoint"]
    gc_ratio = gc["peak_mb"] / max(gc["peak_mb_off"], 1e-9)
    rows = [("pooled QPS", f"{p['qps']:.2f}", f"batch {p['batch_size']} x {p['seq_len']} tokens; "
             f"agrees with fp32 on {100 * p['agreement_fp32']:.1f}% of {p['agreement_n']}"),
            ("CoT QPS", f"{ct['qps']:.3f}", f"batch {ct['batch_size']}, {ct['prompt_len']}-token prompt "
             f"+ {ct['new_tokens']} new, T={ct['temperature']} top_p={ct['top_p']}"),
            ("CoT new tokens/s", f"{ct['tokens_per_s']:.1f}", "KV cache"),
            ("speedup", f"{res['speedup']:.1f}x",
             "pooled QPS / CoT QPS (paper Table 5: 96-142x at 500 tokens)"),
            ("train tokens/s", f"{tr['tokens_per_s']:.1f}", f"DHRD step batch {tr['batch_size']} x "
             f"{tr['seq_len']}, {kind}, {tr['tflops']:.3f} TFLOP/s ({tr['flops_formula']})"),
            peak_row,
            ("grad checkpoint", f"{gc['tokens_per_s']:.1f}", f"train tokens/s with it; peak MB of fwd+bwd "
             f"{gc['peak_mb']:.0f} with, {gc['peak_mb_off']:.0f} without (x{gc_ratio:.2f})"),
            ("LM loss peak MB", f"{m['fused_peak_mb']:.0f} / {m['naive_peak_mb']:.0f}",
             f"fused / full logits (x{mem_ratio:.2f}), V={m['vocab']} T={m['seq_len']}, fwd+bwd")]
    for r in rows:
        print(f"  {r[0]:<18} {r[1]:>12}   {r[2]}")


def main():
    globals().update(parse_flags(sys.argv[1:], FLAGS, CHOICES))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but torch.cuda.is_available() is False; use --device=cpu")
    if dtype == "float16" and "cuda" not in device:
        raise ConfigError("--dtype=float16: float16 on CUDA only (CPUs run float16 matmuls at a few "
                          "GFLOP/s); use auto, float32 or bfloat16")
    why = "--dtype"
    if dtype == "auto":
        native, why = native_dtype(device)
        globals()["dtype"] = native
    sizes = (batch_size, seq_len, cot_batch_size, cot_tokens, cot_prompt_len, train_batch_size, train_seq_len)
    if min(sizes) < 1:
        raise ConfigError("batch sizes, lengths and token counts must be >= 1")
    if train_lora_rank < 0:
        raise ConfigError(f"--train_lora_rank={train_lora_rank}: 0 (full fine-tuning) or a LoRA rank >= 1")
    torch.manual_seed(seed)
    device_type = "cuda" if "cuda" in device else "cpu"
    ptdtype = getattr(torch, dtype)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=ptdtype)

    # CUDA: weights in `dtype` from the start, built on the GPU; the training step below makes its own fp32
    # master weights (full fine-tuning) or fp32 adapters (LoRA). CPU: fp32 weights under autocast, the faster
    # choice there (README: bf16 autocast on the pooled path 3.9 -> 13.7 QPS).
    weights_dtype = torch.float32
    if device_type == "cuda":
        weights_dtype = ptdtype
    model = load_model(init_from, device, weights_dtype)
    c = model.config
    lengths = {"seq_len": seq_len, "cot_prompt_len + cot_tokens": cot_prompt_len + cot_tokens,
               "train_seq_len": train_seq_len}
    for name, n in lengths.items():
        if n > c.block_size:
            raise ConfigError(f"--{name.split()[0]}: {name}={n} exceeds the model's block_size "
                              f"{c.block_size}")
    n_params = sum(p.numel() for p in model.parameters())
    gpu = None
    if device_type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        card = torch.cuda.get_device_properties(device).total_memory
        if train_lora_rank == 0 and FULL_FT_BYTES_PER_PARAM * n_params > 0.75 * card:
            need = FULL_FT_BYTES_PER_PARAM * n_params / 2**30
            raise ConfigError(f"--train_lora_rank=0: full fine-tuning of {n_params / 1e9:.2f}B parameters "
                              f"needs ~{need:.0f} GiB (fp32 weights, gradients, AdamW) of this {gpu}'s "
                              f"{card / 2**30:.0f} GiB; use --train_lora_rank=16 (paper App. E.4)")
    # torch.compile wraps forward only: compile the pooled entry point here, the training forward below
    # (generate stays eager)
    classify = model.classify
    if compile:
        classify = torch.compile(model.classify)
    g = torch.Generator(device).manual_seed(seed)

    def rand(*shape):
        return torch.randint(c.vocab_size, shape, generator=g, device=device)

    model.eval()

    # --- pooled classification (App. E.7): one forward over x, last-token pooling, no LM head
    x = rand(batch_size, seq_len)
    # the agreement check: batches of mixed lengths (right padding, the real use), first through the float32
    # path: the same weights cast up (on CUDA bf16 -> fp32 -> bf16, exact both ways; 32 GB for an 8B model)
    agree_in = []
    for _ in range(agree_batches):
        xb = rand(batch_size, seq_len)
        lens = torch.randint(1, seq_len + 1, (batch_size,), generator=g, device=device)
        mask = (torch.arange(seq_len, device=device)[None] < lens[:, None]).long()
        agree_in.append((xb, mask))
    model.float()
    with torch.inference_mode():
        refs = [model.classify(xb, mask).argmax(-1) for xb, mask in agree_in]
    model.to(weights_dtype)
    with torch.inference_mode(), ctx:  # one autocast region: weights are cast once, then cached
        t_pooled = timed(lambda: classify(x))
    agree = 0
    # CPU: autocast keeps the residual stream in fp32: 100% agree (all-bf16 weights: 98.4%)
    with torch.inference_mode(), ctx:
        for (xb, mask), ref in zip(agree_in, refs):
            agree += (classify(xb, mask).argmax(-1) == ref).sum().item()
    total = batch_size * agree_batches

    # --- CoT decoding (App. E.6): KV cache, temperature 0.1, top_p 0.7, no early stop (fixed length)
    prompt = rand(cot_batch_size, cot_prompt_len)
    # decoding runs with weights in `dtype` (on the CPU on a copy): a decode step is a few small matmuls,
    # and autocast's casts and fp32 side ops cost more than the matmuls there (gpt2: 60 -> 107 new tok/s,
    # 2-core EPYC)
    infer = model
    if model.wte.weight.dtype != ptdtype:
        infer = copy.deepcopy(model).to(ptdtype)

    def decode(new_tokens):
        gen = torch.Generator(device).manual_seed(seed)
        y = infer.generate(prompt, new_tokens, temperature=temperature, top_p=top_p, generator=gen)
        assert y.shape == (cot_batch_size, cot_prompt_len + new_tokens), y.shape
    # the warm-up decodes 16 tokens: the one-time costs (kernel choice, allocator, lazy init) come with the
    # first tokens, and a 500-token warm-up would double the time of the measurement
    with torch.inference_mode():
        t_cot = timed(lambda: decode(cot_tokens), warm=lambda: decode(min(cot_tokens, 16)))
    del infer

    # --- one DHRD training step: forward (both losses, Eq. 4) + backward + AdamW
    model.train()
    if train_lora_rank:
        add_lora(model, train_lora_rank, LORA_ALPHA, LORA_DROPOUT)
        for p in model.parameters():
            if p.requires_grad:  # adapters and pooled head in fp32 (PEFT's default); the base stays in dtype
                p.data = p.data.float()
    else:
        model.float()  # fp32 master weights (CPU: already)
    fast = model
    if compile:
        fast = torch.compile(model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
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
    # the same step with gradient checkpointing (dhrd.py --grad_checkpoint): its time here, memory below
    model.grad_checkpoint = True
    t_train_ckpt = timed(step)
    model.grad_checkpoint = False
    flops = train_flops_per_token(model, train_seq_len)
    achieved = flops * tok_s / 1e12
    # the CPU figure's peak; on a GPU 8192^3 (1.1 TFLOP, ~1.5 ms on an H200) runs long past launch overhead
    mm_n = 2048
    if device_type == "cuda":
        mm_n = 8192
    peak_mm = matmul_tflops(ptdtype, mm_n)
    peak = None
    if gpu is not None:
        peak = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in gpu), None)
    mfu = None
    if peak:
        mfu = achieved / peak

    mem = lm_loss_memory(c.n_embd)
    train_mem = train_memory(model)

    if device_type == "cuda":
        mem_method = "cuda max_memory_allocated"
    else:
        mem_method = "fresh process, VmHWM after clear_refs"
    formula = "6 N + 12 L H Q T"
    if train_lora_rank:
        formula = "6 N_trained + 4 N_frozen + 12 L H Q T"
    res = {"device": device, "dtype": dtype, "dtype_reason": why, "model": init_from, "gpu": gpu,
           "torch": torch.__version__, "compile": compile, "params": n_params,
           "pooled": {"batch_size": batch_size, "seq_len": seq_len, "qps": batch_size / t_pooled,
                      "agreement_fp32": agree / total, "agreement_n": total},
           "cot": {"batch_size": cot_batch_size, "new_tokens": cot_tokens, "prompt_len": cot_prompt_len,
                   "temperature": temperature, "top_p": top_p, "qps": cot_batch_size / t_cot,
                   "tokens_per_s": cot_batch_size * cot_tokens / t_cot},
           "train": {"batch_size": train_batch_size, "seq_len": train_seq_len, "tokens_per_s": tok_s,
                     "lora_rank": train_lora_rank, "trained_params": trained,
                     "flops_per_token": flops, "flops_formula": formula, "tflops": achieved,
                     "mfu": mfu, "peak_tflops": peak, "matmul_peak_tflops": peak_mm,
                     "matmul_peak_fraction": achieved / peak_mm},
           "grad_checkpoint": {"tokens_per_s": train_batch_size * train_seq_len / t_train_ckpt,
                               "tokens_per_s_off": tok_s, "peak_mb": train_mem[True],
                               "peak_mb_off": train_mem[False]},
           "lm_loss_memory": {"fused_peak_mb": mem["fused"], "naive_peak_mb": mem["naive"],
                              "vocab": mem_vocab, "seq_len": mem_seq_len, "method": mem_method}}
    res["speedup"] = res["pooled"]["qps"] / res["cot"]["qps"]
    res["threads"] = torch.get_num_threads()
    print_table(res)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:   # a bad flag: one line, no traceback; exit status 2 (usage error, as argparse)
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
