"""
Speed of DHRD in one run on one backbone (paper Table 5, App. E.6-E.7):
  pooled   classification QPS: samples / wall-clock of pure forward passes over x, last-token pooling,
           the LM head unused (App. E.7);
  cot      chain-of-thought decoding with the KV cache, paper sampling (temperature 0.1, top_p 0.7, E.6);
  speedup  pooled.qps / cot.qps;
  train    one DHRD step: ONE forward for both losses (Eq. 4) + backward + AdamW; tokens/s over x+rationale,
           MFU on CUDA against the card's bf16 dense peak; full fine-tuning, or LoRA adapters on a frozen base
           (--train_lora_rank, paper App. E.4);
  grad_checkpoint the training step with each block recomputed in backward: tokens/s and the peak memory
           of forward + backward, with and without (dhrd.py --grad_checkpoint);
  lm_loss_memory  peak memory of the fused masked LM loss vs full-logits cross-entropy (fwd+bwd).
Each speed is also a fraction of the machine limit that bounds it, measured in the same run ("limits"):
pooled and train of the FLOP/s that the model's own matmul shapes reach alone in the run's dtype; a decode
step's time of the time to stream what it must read (the weights once, the cached keys and values) at the
measured read bandwidth; on CUDA also the card's datasheet peaks and its copy bandwidth.
Weights are random (speed does not depend on their values) unless --init_from is a model folder.
On CUDA a built-in shape is built on the GPU with its weights in --dtype (an 8B model: 16 GB of bf16 there,
never 32 GB of fp32 on the host); on the CPU in fp32, computed under autocast.
  python bench.py --init_from=gpt2 --device=cpu --out=bench.json
  python bench.py --init_from=llama-3.1-8b --device=cuda --cot_tokens=500 --train_lora_rank=16
"""
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from gpt import GPT, GPTConfig, add_lora, dual_loss, fused_lm_loss, native_dtype
from plumbing import ConfigError, parse_flags

# ----------------------------------------------------------------------------- config (--key=value)
@dataclass
class Config:
    init_from: str = "gpt2"         # a model folder (real weights), or a built-in shape below (random)
    device: str = "cpu"             # cpu | cuda | cuda:N
    dtype: str = "auto"             # auto (gpt.native_dtype) | float32 | bfloat16 | float16 (GPU only)
    compile: bool = False           # torch.compile the pooled and training forward (GPU; slow start on CPU)
    threads: int = 0                # CPU threads for torch; 0: torch's default (one per core)
    # pooled classification
    batch_size: int = 16
    seq_len: int = 128
    # CoT decoding
    cot_batch_size: int = 8
    cot_tokens: int = 64            # new tokens per sample (paper: up to 500)
    cot_prompt_len: int = 32        # shorter than seq_len, so the speedup errs in CoT's favour
    cot_compile: bool = False       # torch.compile generate's decode step (CUDA: CUDA graphs)
    cot_batch1: bool = True         # also decode one prompt alone (latency), against its own roofline
    temperature: float = 0.1        # paper App. E.6
    top_p: float = 0.7              # paper App. E.6
    # one DHRD training step; the first half of each row is x; alpha, beta: the Eq. 4 weights of its loss
    train_batch_size: int = 4
    train_seq_len: int = 256
    alpha: float = 1.0
    beta: float = 1.0
    train_lora_rank: int = 0        # 0: full fine-tuning (fp32 master weights + AdamW: 16 bytes/param);
                                    # r > 0: LoRA of rank r on a frozen base (paper App. E.4: 16), only the
                                    # adapters and the pooled head train
    # LM loss memory at GPT-2's vocabulary and a full context
    mem_vocab: int = 50257
    mem_seq_len: int = 1024
    agree_batches: int = 8          # pooled batches compared against the float32 path (prediction agreement)
    warmup: int = 1                 # untimed calls before the timed ones
    repeats: int = 3                # timed calls; their median is reported
    num_labels: int = 2
    seed: int = 1337
    out: str = "bench.json"


CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16")}


def parse_config(argv, config_class=Config):
    """config_class() <- JSON config files <- --key=value (plumbing.parse_flags: unknown keys and bad values
    are a ConfigError naming the flag), then the checks that need no model. experiments/bench_hf.py passes
    its Config, bench.py's with a few more fields."""
    d = asdict(config_class())
    d.update(parse_flags(argv, d, CHOICES))
    cfg = config_class(**d)
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device=cuda but torch.cuda.is_available() is False; use --device=cpu")
    if cfg.dtype == "float16" and "cuda" not in cfg.device:
        raise ConfigError("--dtype=float16: float16 on CUDA only (CPUs run float16 matmuls at a few "
                          "GFLOP/s); use auto, float32 or bfloat16")
    sizes = (cfg.batch_size, cfg.seq_len, cfg.cot_batch_size, cfg.cot_tokens, cfg.cot_prompt_len,
             cfg.train_batch_size, cfg.train_seq_len)
    if min(sizes) < 1:
        raise ConfigError("batch sizes, lengths and token counts must be >= 1")
    if cfg.train_lora_rank < 0:
        raise ConfigError(f"--train_lora_rank={cfg.train_lora_rank}: 0 (full fine-tuning) or a LoRA rank "
                          ">= 1")
    if cfg.threads < 0:
        raise ConfigError(f"--threads={cfg.threads}: 0 (torch's default) or a number of threads >= 1")
    return cfg

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
# The cards' datasheet peaks (SXM parts unless named), most specific name first: the first key contained in
# torch.cuda.get_device_name() counts. Other cards: no MFU, no peak bandwidth.
GPU_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense
GPU_PEAK_GBS = {"H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100-SXM4-80GB": 2039.0,
                "A100": 1555.0}   # HBM bandwidth, GB/s
LORA_ALPHA = 32.0         # paper App. E.4 (with r=16)
LORA_DROPOUT = 0.1        # paper App. E.4
# full fine-tuning keeps fp32 weights, gradients and two AdamW moments: 16 bytes per parameter (an 8B model:
# 128 GB); refused on a GPU where that is over 3/4 of its memory (the rest: activations, allocator slack)
FULL_FT_BYTES_PER_PARAM = 16
LM_CHUNK = 1024           # gpt.fused_lm_loss's vocabulary slice and row block: the head's matmul shapes
LM_ROWS = 2048


def load_model(init_from, dev="cpu", weights_dtype=torch.float32, num_labels=Config.num_labels):
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


def sync(cfg):
    if "cuda" in cfg.device:
        torch.cuda.synchronize(cfg.device)


def timed(cfg, fn, warm=None):
    """Median wall-clock seconds of `repeats` calls after `warmup` calls of `warm` (default: fn itself);
    the clock is read after a GPU sync."""
    warm = warm or fn
    for _ in range(cfg.warmup):
        warm()
    times = []
    for _ in range(cfg.repeats):
        sync(cfg)
        t0 = time.perf_counter()
        fn()
        sync(cfg)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

# ----------------------------------------------------------------------------- the machine's limits
# Each figure is a fraction of the limit that bounds it, measured in the same run: pooled and train against
# the matmul rate at the model's own shapes (FLOP/s), decoding against the bytes a step must read over the
# streaming read bandwidth.

def matmul_tflops(cfg, ptdtype, n):
    """Measured dense n x n matmul throughput (the square probe, kept for comparison)."""
    a = torch.randn(n, n, device=cfg.device, dtype=ptdtype)
    b = torch.randn(n, n, device=cfg.device, dtype=ptdtype)
    return 2 * n**3 / timed(cfg, lambda: a @ b) / 1e12


def gemm_tflops(cfg, ptdtype, shapes):
    """The rate (TFLOP/s) of the matmuls {(M, K, N): count}, each [M, K] @ [K, N] timed alone in ptdtype:
    FLOPs over seconds, weighted by count. What the model's own matmuls reach with nothing else running."""
    flops = 0.0
    secs = 0.0
    for (M, K, N), count in shapes.items():
        a = torch.randn(M, K, device=cfg.device, dtype=ptdtype)
        b = torch.randn(K, N, device=cfg.device, dtype=ptdtype)
        flops += 2 * M * K * N * count
        secs += timed(cfg, lambda: a @ b) * count
    return flops / secs / 1e12


def _add(shapes, key, count=1):
    shapes[key] = shapes.get(key, 0) + count


def forward_matmuls(model, M):
    """{(M, in, out): count}: the blocks' weight matmuls of a forward over M tokens (the pooled path)."""
    shapes = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m is not model.lm_head and m is not model.score:
            _add(shapes, (M, m.in_features, m.out_features))
    return shapes


def train_matmuls(model, M, rows):
    """{(M, K, N): count}: one training step's weight matmuls over M tokens: forward, input gradient and,
    for a trained weight, weight gradient; the LM head as gpt.fused_lm_loss computes it, in [rows, LM_CHUNK]
    slices of the vocabulary (its pass-2 recomputation left out: not counted in the FLOPs either)."""
    shapes = {}
    for m in model.modules():
        if not isinstance(m, torch.nn.Linear) or m is model.score:
            continue
        n_in = m.in_features
        n_out = m.out_features
        count = 1
        if m is model.lm_head:  # vocabulary slices over row blocks
            M = min(rows, LM_ROWS)
            n_out = LM_CHUNK
            count = m.out_features / LM_CHUNK
        _add(shapes, (M, n_in, n_out), count)          # forward
        _add(shapes, (M, n_out, n_in), count)          # the input's gradient
        if m.weight.requires_grad:
            _add(shapes, (n_out, M, n_in), count)      # the weight's gradient
    return shapes


def forward_flops(model, B, T):
    """FLOPs of the pooled forward over [B, T]: 2 per weight of the blocks and token (no LM head) + attention,
    4 L H Q T per token (the forward third of gpt.flops_per_token's 12 L H Q T)."""
    c = model.config
    n = sum(p.numel() for name, p in model.named_parameters()
            if not name.startswith(("wte.", "wpe.", "lm_head.", "score")))
    return B * T * (2 * n + 4 * c.n_layer * c.n_head * (c.head_dim or c.n_embd // c.n_head) * T)


def read_gbs(cfg, nbytes):
    """Streaming read bandwidth, GB/s: the max of a buffer far larger than the last-level cache, each element
    read once by a reduction too light to be the limit."""
    x = torch.ones(nbytes // 4, device=cfg.device)
    return nbytes / timed(cfg, lambda: x.amax()) / 1e9


def copy_gbs(cfg, nbytes):
    """Copy bandwidth, GB/s of bytes read + written."""
    x = torch.ones(nbytes // 4, device=cfg.device)
    y = torch.empty_like(x)
    return 2 * nbytes / timed(cfg, lambda: y.copy_(x)) / 1e9


def decode_step_bytes(model, B, context):
    """Bytes a decode step must read at batch B with `context` cached tokens a row: each weight it uses once
    (the LM head whole; of the embeddings a row per token, left out) and the keys and values of the context,
    in the dtype the model holds them."""
    c = model.config
    skip = ("wpe.", "score")
    if model.lm_head.weight is not model.wte.weight:
        skip = ("wpe.", "score", "wte.")  # untied: the head is lm_head.weight; of wte only the looked-up rows
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith(skip))
    hd = c.head_dim or c.n_embd // c.n_head
    kv = 2 * c.n_layer * (c.n_kv_head or c.n_head) * hd * model.wte.weight.element_size()
    return weights + B * context * kv

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


def peak_mb(fn, *args, cuda=False):
    """fn(*args), a peak-memory measurement; on the CPU run in a fresh interpreter (no allocator cache from
    earlier work in this one)."""
    if cuda:
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


def lm_loss_memory(cfg, n_embd):
    cuda = cfg.device.startswith("cuda")
    return {kind: peak_mb(lm_loss_peak_mb, kind, cfg.mem_vocab, cfg.mem_seq_len, n_embd, cfg.device,
                          cfg.dtype, cuda=cuda)
            for kind in ("fused", "naive")}


def train_memory(cfg, model):
    """The training step's peak extra memory without and with gradient checkpointing: on CUDA of the
    benchmark's model (LoRA or not), on the CPU of a fresh full-fine-tuning copy in its own process."""
    res = {}
    B = cfg.train_batch_size
    T = cfg.train_seq_len
    for on in (False, True):
        if cfg.device.startswith("cuda"):
            res[on] = train_peak_mb(cfg.init_from, B, T, on, cfg.device, cfg.dtype, model)
        else:
            res[on] = peak_mb(train_peak_mb, cfg.init_from, B, T, on, cfg.device, cfg.dtype)
    model.grad_checkpoint = False
    model.zero_grad(set_to_none=True)
    return res

# ----------------------------------------------------------------------------- the figures

def bench_pooled(cfg, model, classify, ctx, rand, g, weights_dtype):
    """Pooled classification (App. E.7): QPS of one forward over x, last-token pooling, no LM head; and how
    often its predictions agree with the float32 path's."""
    B = cfg.batch_size
    T = cfg.seq_len
    x = rand(B, T)
    # the agreement check: batches of mixed lengths (right padding, the real use), first through the float32
    # path: the same weights cast up (on CUDA bf16 -> fp32 -> bf16, exact both ways; 32 GB for an 8B model)
    agree_in = []
    for _ in range(cfg.agree_batches):
        xb = rand(B, T)
        lens = torch.randint(1, T + 1, (B,), generator=g, device=cfg.device)
        mask = (torch.arange(T, device=cfg.device)[None] < lens[:, None]).long()
        agree_in.append((xb, mask))
    model.float()
    with torch.inference_mode():
        refs = [model.classify(xb, mask).argmax(-1) for xb, mask in agree_in]
    model.to(weights_dtype)
    with torch.inference_mode(), ctx:  # one autocast region: weights are cast once, then cached
        t_pooled = timed(cfg, lambda: classify(x))
    agree = 0
    # CPU: autocast keeps the residual stream in fp32: 100% agree (all-bf16 weights: 98.4%)
    with torch.inference_mode(), ctx:
        for (xb, mask), ref in zip(agree_in, refs):
            agree += (classify(xb, mask).argmax(-1) == ref).sum().item()
    flops = forward_flops(model, B, T)
    n = B * cfg.agree_batches
    return {"batch_size": B, "seq_len": T, "qps": B / t_pooled, "agreement_fp32": agree / n, "agreement_n": n,
            "flops": flops, "tflops": flops / t_pooled / 1e12}


def bench_cot(cfg, infer, prompt, read_gb_s):
    """CoT decoding (App. E.6) of `prompt` [B, P]: cot_tokens new tokens a row, no early stop. Timed whole
    (the QPS of Table 5) and with one new token (the prompt's forward, prefill): the difference over the
    cot_tokens - 1 decode steps is a step's time, against the bytes it must read over read_gb_s."""
    B, P = prompt.shape
    N = cfg.cot_tokens

    def decode(new_tokens):
        gen = torch.Generator(cfg.device).manual_seed(cfg.seed)
        y = infer.generate(prompt, new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, generator=gen,
                           compile=cfg.cot_compile)
        assert y.shape == (B, P + new_tokens), y.shape
    # the warm-up decodes 16 tokens: the one-time costs (kernel choice, allocator, lazy init, compilation)
    # come with the first tokens, and a 500-token warm-up would double the time of the measurement
    with torch.inference_mode():
        t = timed(cfg, lambda: decode(N), warm=lambda: decode(min(N, 16)))
        t_prefill = timed(cfg, lambda: decode(1))
    res = {"batch_size": B, "new_tokens": N, "prompt_len": P, "temperature": cfg.temperature,
           "top_p": cfg.top_p, "compiled": cfg.cot_compile, "qps": B / t, "tokens_per_s": B * N / t,
           "prefill_s": t_prefill, "step_ms": None, "bytes_per_step": None, "roofline_step_ms": None,
           "roofline_fraction": None}
    if N > 1 and t > t_prefill:
        step_s = (t - t_prefill) / (N - 1)
        step_bytes = decode_step_bytes(infer, B, P + N / 2)  # steps 1 .. N-1 attend to P + 1 .. P + N-1 slots
        res.update(step_ms=1e3 * step_s, bytes_per_step=step_bytes,
                   roofline_step_ms=1e3 * step_bytes / (read_gb_s * 1e9),
                   roofline_fraction=step_bytes / (read_gb_s * 1e9) / step_s)
    return res


def print_table(cfg, res):
    p = res["pooled"]
    tr = res["train"]
    lim = res["limits"]
    m = res["lm_loss_memory"]
    dt = res["dtype"]
    print(f"dhrd bench: {res['model']} on {res['device']} {dt} ({res['dtype_reason']}), "
          f"{res['threads']} threads, median of {cfg.repeats}")
    peak = ""
    if lim["peak_gb_s"] is not None:
        peak = f", datasheet {lim['peak_gb_s']:.0f} GB/s"
    print(f"  limits: read {lim['read_gb_s']:.1f} GB/s, copy {lim['copy_gb_s']:.1f} GB/s (read + write)"
          f"{peak}; {dt} matmuls at the model's shapes: pooled {p['gemm_tflops']:.3f}, train "
          f"{tr['gemm_tflops']:.3f} TFLOP/s (square {lim['matmul_peak_tflops']:.3f})")
    kind = "full fine-tuning"
    if tr["lora_rank"]:
        kind = f"LoRA r={tr['lora_rank']}"
    mem_ratio = m["fused_peak_mb"] / max(m["naive_peak_mb"], 1e-9)
    gc = res["grad_checkpoint"]
    gc_ratio = gc["peak_mb"] / max(gc["peak_mb_off"], 1e-9)
    rows = [("pooled QPS", f"{p['qps']:.2f}", _pct(p["roofline_fraction"], "GEMM"),
             f"{p['tflops']:.3f} TFLOP/s; batch {p['batch_size']} x {p['seq_len']}; agrees with fp32 on "
             f"{100 * p['agreement_fp32']:.1f}% of {p['agreement_n']}")]
    for key in ("cot", "cot_batch1"):
        ct = res[key]
        if ct is None:
            continue
        step = ""
        if ct["step_ms"] is not None:
            step = (f"; a step {ct['step_ms']:.1f} ms, reading its {ct['bytes_per_step'] / 1e9:.3f} GB "
                    f"{ct['roofline_step_ms']:.1f} ms; prefill {1e3 * ct['prefill_s']:.0f} ms")
        compiled = "compiled" if ct["compiled"] else "eager"
        rows.append((f"CoT tokens/s, B={ct['batch_size']}", f"{ct['tokens_per_s']:.1f}",
                     _pct(ct["roofline_fraction"], "read"),
                     f"QPS {ct['qps']:.3f}; {ct['prompt_len']}-token prompt + {ct['new_tokens']} new, "
                     f"T={ct['temperature']} top_p={ct['top_p']}, {compiled}{step}"))
    rows += [("speedup", f"{res['speedup']:.1f}x", "",
              "pooled QPS / CoT QPS (paper Table 5: 96-142x at 500 tokens)"),
             ("train tokens/s", f"{tr['tokens_per_s']:.1f}", _pct(tr["roofline_fraction"], "GEMM"),
              f"{tr['tflops']:.3f} TFLOP/s ({tr['flops_formula']}); DHRD step {tr['batch_size']} x "
              f"{tr['seq_len']}, {kind}")]
    if tr["mfu"] is not None:
        rows.append(("train MFU", f"{100 * tr['mfu']:.1f}%", "",
                     f"of {tr['peak_tflops']:.0f} TFLOP/s bf16 dense"))
    rows += [("grad checkpoint", f"{gc['tokens_per_s']:.1f}", "", f"train tokens/s with it; peak MB of "
              f"fwd+bwd {gc['peak_mb']:.0f} with, {gc['peak_mb_off']:.0f} without (x{gc_ratio:.2f})"),
             ("LM loss peak MB", f"{m['fused_peak_mb']:.0f} / {m['naive_peak_mb']:.0f}", "",
              f"fused / full logits (x{mem_ratio:.2f}), V={m['vocab']} T={m['seq_len']}, fwd+bwd")]
    for r in rows:
        print(f"  {r[0]:<18} {r[1]:>11} {r[2]:>12}   {r[3]}")


def _pct(fraction, limit):
    if fraction is None:
        return ""
    return f"{100 * fraction:.0f}% {limit}"


def main(argv=None):
    cfg = parse_config(sys.argv[1:] if argv is None else argv)
    why = "--dtype"
    if cfg.dtype == "auto":
        native, why = native_dtype(cfg.device)
        cfg = replace(cfg, dtype=native)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = cfg.device
    device_type = "cuda" if "cuda" in device else "cpu"
    ptdtype = getattr(torch, cfg.dtype)
    ctx = nullcontext() if cfg.dtype == "float32" else torch.autocast(device_type, dtype=ptdtype)

    # CUDA: weights in `dtype` from the start, built on the GPU; the training step below makes its own fp32
    # master weights (full fine-tuning) or fp32 adapters (LoRA). CPU: fp32 weights under autocast, the faster
    # choice there (README: bf16 autocast on the pooled path 3.9 -> 13.7 QPS).
    weights_dtype = torch.float32
    if device_type == "cuda":
        weights_dtype = ptdtype
    model = load_model(cfg.init_from, device, weights_dtype, cfg.num_labels)
    c = model.config
    lengths = {"seq_len": cfg.seq_len, "cot_prompt_len + cot_tokens": cfg.cot_prompt_len + cfg.cot_tokens,
               "train_seq_len": cfg.train_seq_len}
    for name, n in lengths.items():
        if n > c.block_size:
            raise ConfigError(f"--{name.split()[0]}: {name}={n} exceeds the model's block_size "
                              f"{c.block_size}")
    n_params = sum(p.numel() for p in model.parameters())
    gpu = None
    if device_type == "cuda":
        gpu = torch.cuda.get_device_name(device)
        card = torch.cuda.get_device_properties(device).total_memory
        if cfg.train_lora_rank == 0 and FULL_FT_BYTES_PER_PARAM * n_params > 0.75 * card:
            need = FULL_FT_BYTES_PER_PARAM * n_params / 2**30
            raise ConfigError(f"--train_lora_rank=0: full fine-tuning of {n_params / 1e9:.2f}B parameters "
                              f"needs ~{need:.0f} GiB (fp32 weights, gradients, AdamW) of this {gpu}'s "
                              f"{card / 2**30:.0f} GiB; use --train_lora_rank=16 (paper App. E.4)")
    # the limits first, on an otherwise idle device: the bandwidth from buffers 16x (CPU: 512 MiB) or 64x
    # (GPU: 4 GiB) the last-level cache
    nbytes = 2**29
    if device_type == "cuda":
        nbytes = 2**32
    limits = {"read_gb_s": read_gbs(cfg, nbytes), "copy_gb_s": copy_gbs(cfg, nbytes),
              "peak_gb_s": _gpu_peak(GPU_PEAK_GBS, gpu), "peak_tflops": _gpu_peak(GPU_PEAK_TFLOPS, gpu)}
    # the square probe; on a GPU 8192^3 (1.1 TFLOP, ~1.5 ms on an H200) runs long past launch overhead
    mm_n = 2048
    if device_type == "cuda":
        mm_n = 8192
    limits["matmul_peak_tflops"] = matmul_tflops(cfg, ptdtype, mm_n)
    # torch.compile wraps forward only: compile the pooled entry point here, the training forward below
    # (the decode step: --cot_compile)
    classify = model.classify
    if cfg.compile:
        classify = torch.compile(model.classify)
    g = torch.Generator(device).manual_seed(cfg.seed)

    def rand(*shape):
        return torch.randint(c.vocab_size, shape, generator=g, device=device)

    model.eval()
    pooled = bench_pooled(cfg, model, classify, ctx, rand, g, weights_dtype)
    pooled["gemm_tflops"] = gemm_tflops(cfg, ptdtype, forward_matmuls(model, cfg.batch_size * cfg.seq_len))
    pooled["roofline_fraction"] = pooled["tflops"] / pooled["gemm_tflops"]

    # decoding runs with weights in `dtype` (on the CPU on a copy): a decode step is a few small matmuls,
    # and autocast's casts and fp32 side ops cost more than the matmuls there (gpt2: 60 -> 107 new tok/s)
    infer = model
    if model.wte.weight.dtype != ptdtype:
        infer = copy.deepcopy(model).to(ptdtype)
    prompt = rand(cfg.cot_batch_size, cfg.cot_prompt_len)
    cot = bench_cot(cfg, infer, prompt, limits["read_gb_s"])
    cot_batch1 = None
    if cfg.cot_batch1 and cfg.cot_batch_size > 1:
        cot_batch1 = bench_cot(cfg, infer, prompt[:1], limits["read_gb_s"])
    del infer
    infer = None
    model.decode_caches = None

    # --- one DHRD training step: forward (both losses, Eq. 4) + backward + AdamW
    B = cfg.train_batch_size
    T = cfg.train_seq_len
    model.train()
    if cfg.train_lora_rank:
        add_lora(model, cfg.train_lora_rank, LORA_ALPHA, LORA_DROPOUT)
        for p in model.parameters():
            if p.requires_grad:  # adapters and pooled head in fp32 (PEFT's default); the base stays in dtype
                p.data = p.data.float()
    else:
        model.float()  # fp32 master weights (CPU: already)
    fast = model
    if cfg.compile:
        fast = torch.compile(model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), device_type)
    s = rand(B, T)
    x_len = torch.full((B,), max(1, T // 2), device=device)
    targets = torch.cat([s[:, 1:], torch.full_like(s[:, :1], -100)], 1)  # next token; last has none
    y = torch.randint(max(1, c.num_labels), (B,), generator=g, device=device)
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")

    def step():
        with ctx:
            loss, _ = dual_loss(fast(s, x_len=x_len, lm_targets=targets), y, cfg.alpha, cfg.beta)  # Eq. 4
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    t_train = timed(cfg, step)
    tok_s = B * T / t_train
    # the same step with gradient checkpointing (dhrd.py --grad_checkpoint): its time here, memory below
    model.grad_checkpoint = True
    t_train_ckpt = timed(cfg, step)
    model.grad_checkpoint = False
    flops = train_flops_per_token(model, T)
    achieved = flops * tok_s / 1e12
    gemm_train = gemm_tflops(cfg, ptdtype, train_matmuls(model, B * T, B * (T - 1)))
    mfu = None
    if limits["peak_tflops"]:
        mfu = achieved / limits["peak_tflops"]

    mem = lm_loss_memory(cfg, c.n_embd)
    train_mem = train_memory(cfg, model)

    if device_type == "cuda":
        mem_method = "cuda max_memory_allocated"
    else:
        mem_method = "fresh process, VmHWM after clear_refs"
    formula = "6 N + 12 L H Q T"
    if cfg.train_lora_rank:
        formula = "6 N_trained + 4 N_frozen + 12 L H Q T"
    res = {"device": device, "dtype": cfg.dtype, "dtype_reason": why, "model": cfg.init_from, "gpu": gpu,
           "torch": torch.__version__, "compile": cfg.compile, "params": n_params,
           "threads": torch.get_num_threads(), "limits": limits, "pooled": pooled, "cot": cot,
           "cot_batch1": cot_batch1,
           "train": {"batch_size": B, "seq_len": T, "tokens_per_s": tok_s,
                     "lora_rank": cfg.train_lora_rank, "trained_params": trained,
                     "flops_per_token": flops, "flops_formula": formula, "tflops": achieved,
                     "mfu": mfu, "peak_tflops": limits["peak_tflops"], "gemm_tflops": gemm_train,
                     "roofline_fraction": achieved / gemm_train,
                     "matmul_peak_tflops": limits["matmul_peak_tflops"],
                     "matmul_peak_fraction": achieved / limits["matmul_peak_tflops"]},
           "grad_checkpoint": {"tokens_per_s": B * T / t_train_ckpt, "tokens_per_s_off": tok_s,
                               "peak_mb": train_mem[True], "peak_mb_off": train_mem[False]},
           "lm_loss_memory": {"fused_peak_mb": mem["fused"], "naive_peak_mb": mem["naive"],
                              "vocab": cfg.mem_vocab, "seq_len": cfg.mem_seq_len, "method": mem_method}}
    res["speedup"] = pooled["qps"] / cot["qps"]
    print_table(cfg, res)
    with open(cfg.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {cfg.out}")


def _gpu_peak(table, gpu):
    """The table's value for the first of its names that the GPU's name contains; None off a GPU."""
    if gpu is None:
        return None
    return next((v for k, v in table.items() if k in gpu), None)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as e:   # a bad flag: one line, no traceback; exit status 2 (usage error, as argparse)
        print(f"bench.py: error: {e}", file=sys.stderr)
        sys.exit(2)
