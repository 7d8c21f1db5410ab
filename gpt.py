"""GPT-2, OPT, Llama and Qwen2/3 with the two heads of Dual-Head Reasoning Distillation (arXiv 2509.21487).

A pooled classification head on the last token of the input x, and the LM head as the reasoning head,
trained from ONE forward pass (paper Eq. 4); at inference the pooled head alone. Matches transformers to 1e-4.
Reading and writing Hugging Face folders (safetensors, config.json, tokenizers, hub downloads) is hf.py's.

- GPTConfig: every size and switch of the five families (hf.FAMILIES sets them from config.json)
- RMSNorm, rope, KVCache / StaticKVCache, CausalSelfAttention, MLP, Block: one module per idea, switches
  instead of copies
- fused_lm_loss (the fused masked LM loss, Eq. 3) and reference_lm_loss (the same, plain, to edit)
- token_kl: KL between two models' next-token distributions at the LM targets (dhrd's --kl_coef, --kd_coef)
- DualOutput (what forward returns, always) and dual_loss (Eq. 4, the one place it is written; extra terms
  such as the KL ones enter through forward's `terms` and dual_loss's `weights`, nowhere else)
- _sample: greedy, temperature and nucleus sampling for generate, no host sync on a GPU; PackedLinear: the
  CPU decode's weights in oneDNN's blocked layout
- LoRA (paper App. E.4): add_lora, lora_disabled, merged export, save_lora / load_lora
- GPT: embeddings, blocks (grad_checkpoint: recomputed in backward), both heads, pooling, generate (prefill,
  then a one-token decode step on a static cache that torch.compile captures whole) and generate_reference
  (the same tokens, plainly), from_pretrained / save_pretrained, configure_optimizers, flops_per_token
- native_dtype: what dtype=auto means on this device
Deps: torch, hf.py, plumbing.py (atomic_write).
"""
import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from hf import (FAMILIES, check, config_from_hf, config_to_hf, copy_tokenizer_files, is_head,
                read_checkpoint, read_safetensors, resolve_model_dir, some, state_dict_from_hf,
                state_dict_to_hf, write_safetensors)
# the entry points stay importable from here: `from gpt import GPT, load_tokenizer`
from hf import CheckpointError, DownloadError, download, load_tokenizer  # noqa: F401
from plumbing import atomic_write


@dataclass
class GPTConfig:
    model_type: str = "gpt2"          # a key of hf.FAMILIES: gpt2 | opt | llama (+SmolLM2) | qwen2 | qwen3
    vocab_size: int = 50257
    block_size: int = 1024            # max positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_kv_head: int = 0                # grouped-query attention (Llama/Qwen): K/V heads; 0 -> n_head
    head_dim: int = 0                 # 0 -> n_embd // n_head (Qwen3 sets it explicitly)
    n_inner: int = 0                  # MLP width; 0 -> 4 * n_embd
    word_embed_proj_dim: int = 0      # OPT-350m: 512 (project_in/out); 0 -> n_embd
    pre_ln: bool = True               # OPT do_layer_norm_before (False for opt-350m)
    norm: str = "layernorm"           # 'layernorm' (GPT-2/OPT) | 'rmsnorm' (Llama/Qwen)
    activation: str = "gelu_new"      # 'gelu_new' (gpt2) | 'relu' (opt) | 'silu' (Llama/Qwen, gated)
    glu: bool = False                 # gated MLP down(act(gate(x)) * up(x)) (SwiGLU, Llama/Qwen)
    rope_theta: float = 0.0           # rotary positions with this base; 0 -> learned positions (GPT-2/OPT)
    rope_scaling: dict | None = None  # Llama-3.1/3.2 {'rope_type': 'llama3', 'factor', 'low_freq_factor', ..}
    pos_offset: int = 0               # first row of the learned position table (OPT: 2, as in fairseq)
    layer_norm_eps: float = 1e-5
    bias: bool = True                 # biases of o_proj, the MLP and LayerNorm
    qkv_bias: bool = True             # biases of q/k/v_proj (Qwen2: True with bias False)
    qk_norm: bool = False             # Qwen3: RMSNorm over each head of q and k before the rotation
    tie_word_embeddings: bool = True
    lm_head: bool = True              # False: a classifier saved without its LM head (require_lm_head)
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    num_labels: int = 0               # 0 -> no classification head
    head: str = "linear"              # 'linear' (bias-free, HF `score`) | 'mlp' (paper: 2-layer MLP)
    pooling: str = "last"             # 'last' | 'mean' (over the real tokens of x)
    dropout: float = 0.0

# ----------------------------------------------------------------------------------------------------------
# The modules: one attention, one MLP, one block for every family; switches, not copies. Module names are HF
# Llama's (q_proj ... down_proj), so LoRA targets read the same everywhere; hf.py renames GPT-2 / OPT tensors.

ACT = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


class RMSNorm(nn.Module):
    """Llama/Qwen: x / rms(x) * weight, in fp32 then back to x's dtype (as HF, for parity)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        y = x.float()
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _norm(cfg, dim):
    if cfg.norm == "rmsnorm":
        return RMSNorm(dim, cfg.layer_norm_eps)
    return nn.LayerNorm(dim, eps=cfg.layer_norm_eps)


def _llama3_scaling(inv, sc):
    """Llama-3.1's 'llama3' rope scaling (transformers' _compute_llama3_parameters): the low frequencies are
    divided by `factor`, the high ones kept, the band between blended smoothly."""
    old = sc["original_max_position_embeddings"]
    lo = sc["low_freq_factor"]
    hi = sc["high_freq_factor"]
    f = sc["factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / f, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    return torch.where(mid, (1 - smooth) * scaled / f + smooth * scaled, scaled)


def rope(pos, cfg):
    """(cos, sin) [B,T,hd] of rotary embeddings (RoFormer) at positions pos [B,T], in fp32 like HF."""
    hd = cfg.head_dim or cfg.n_embd // cfg.n_head
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=pos.device).float() / hd)
    sc = cfg.rope_scaling
    if sc and sc.get("rope_type", sc.get("type")) == "llama3":
        inv = _llama3_scaling(inv, sc)
    freqs = pos.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)  # HF's half-split layout: dims i and i + hd/2 rotate together
    return emb.cos(), emb.sin()


def _rotate(x, cos, sin):  # x [B,H,T,hd]; rotate_half as in HF: (x1, x2) -> (-x2, x1), in x's dtype as HF
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None].to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin[:, None].to(x.dtype)


class KVCache:
    """One attention layer's keys and values during generate (gpt-fast's KVCache): [B, n_kv, max_len, hd]
    buffers written in place, never re-concatenated. They are allocated by the first update (the prompt), in
    the dtype k has there, so the cache never casts what it stores: under autocast that is the matmul dtype,
    but fp32 after Qwen3's q/k RMSNorm. v shares k's buffer dtype, since attention takes one dtype."""

    def __init__(self, max_len):
        self.max_len = max_len
        self.k = None
        self.v = None

    def update(self, start, k, v):
        """Write k, v [B, n_kv, T, hd] at start..start+T-1 -> the keys and values of 0..start+T-1."""
        if self.k is None:
            B, n_kv, _, hd = k.shape
            self.k = k.new_empty(B, n_kv, self.max_len, hd)
            self.v = k.new_empty(B, n_kv, self.max_len, hd)
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


CACHE_ROUND = 64  # a compiled generate's StaticKVCaches hold T + new slots rounded up to a multiple of this
EOS_CHECK = 8     # generate asks the device whether every row is done once per EOS_CHECK tokens


class StaticKVCache:
    """The fast generate's cache of one layer: [B, n_kv, n_slots, hd] buffers made before the first decode
    step, written at the slots given as a tensor and read whole, so every step has the same shapes and
    torch.compile captures one graph for all of them (on CUDA one CUDA graph, at fixed buffer addresses).
    The attention mask hides the slots not written yet; they hold zeros, not garbage (0 x NaN is NaN)."""

    def __init__(self, k, v):
        self.k = k
        self.v = v

    def update(self, slots, k, v):
        """Write k, v [B, n_kv, T, hd] at slots [T] (a tensor) -> the whole buffers."""
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        return self.k, self.v


class CausalSelfAttention(nn.Module):
    """Grouped-query attention: n_kv_head K/V heads, each shared by n_head // n_kv_head query heads."""

    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv = cfg.n_kv_head or cfg.n_head
        self.hd = cfg.head_dim or cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.n_embd, bias=cfg.bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head of q and k
            self.q_norm = RMSNorm(self.hd, cfg.layer_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.layer_norm_eps)
        else:
            self.q_norm = None
            self.k_norm = None
        self.dropout = cfg.dropout

    def forward(self, x, mask=None, cache=None, start=0, rot=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.hd)
        k = self.k_proj(x).view(B, T, -1, self.hd)
        v = self.v_proj(x).view(B, T, -1, self.hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = q.transpose(1, 2)
        k = k.transpose(1, 2)
        v = v.transpose(1, 2)
        if rot is not None:  # Llama/Qwen: rotary positions, applied before k enters the cache
            q = _rotate(q, *rot)
            k = _rotate(k, *rot)
        p_drop = self.dropout if self.training else 0.0
        if cache is not None:
            k, v = cache.update(start, k, v)
        if cache is not None and T == 1:  # decoding: one new token per row against the cache
            return self.o_proj(_attend_one(q, k, v, mask, p_drop).reshape(B, 1, -1))
        if self.n_kv != self.n_head:  # each K/V head serves n_head // n_kv query heads (HF repeat_kv)
            k = k.repeat_interleave(self.n_head // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv, dim=1)
        # softmax(q k^T / sqrt(hd)): GPT-2 divides the scores, OPT scales q after q_proj; same maths as SDPA's
        # default scale. No mask -> is_causal, which keeps SDPA on its flash / memory-efficient kernels.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=p_drop)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def _attend_one(q, k, v, mask, p_drop):
    """Attention of one query per row, q [B, H, 1, hd], over the cache k, v [B, n_kv, S, hd] (mask
    [B, 1, 1, S] or None) -> [B, H, 1, hd], written out as HF's eager attention (scores in the matmul dtype,
    softmax in fp32). SDPA's CPU flash kernel is slow on a one-row query in bf16: GPT-2 shape, batch 8, 128
    slots, one layer 1317 -> 209 us (2-core EPYC). The g = H / n_kv query heads of a K/V head are one matmul,
    so grouped-query attention reads the cache once instead of repeating it."""
    B, H, _, hd = q.shape
    n_kv = k.shape[1]
    q = q.view(B, n_kv, H // n_kv, hd)  # query head i * g + j uses K/V head i, as repeat_interleave has it
    scores = (q @ k.transpose(-1, -2)).float() / math.sqrt(hd)  # [B, n_kv, g, S]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    att = F.dropout(scores.softmax(-1), p_drop).to(v.dtype)
    return (att @ v).view(B, H, 1, hd)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n = cfg.n_inner or 4 * cfg.n_embd
        self.up_proj = nn.Linear(cfg.n_embd, n, bias=cfg.bias)
        self.down_proj = nn.Linear(n, cfg.n_embd, bias=cfg.bias)
        self.act = ACT[cfg.activation]
        self.gate_proj = nn.Linear(cfg.n_embd, n, bias=cfg.bias) if cfg.glu else None

    def forward(self, x):
        if self.gate_proj is None:  # GPT-2/OPT: down(act(up x))
            return self.down_proj(self.act(self.up_proj(x)))
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU: silu(gate x) * up x


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = _norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = _norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg)
        self.pre_ln = cfg.pre_ln
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, cache=None, start=0, rot=None):
        if self.pre_ln:  # GPT-2, Llama/Qwen and most OPT sizes
            x = x + self.drop(self.attn(self.ln_1(x), mask, cache, start, rot))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x, mask, cache, start, rot)))  # opt-350m: post-LN
        return self.ln_2(x + self.drop(self.mlp(x)))

# ----------------------------------------------------------------------------------------------------------
# The reasoning head's loss (paper Eq. 3): mean token cross-entropy over the valid targets of s = [x, r, y].
# fused_lm_loss never builds the [N, V] logits; reference_lm_loss is the same loss written plainly, the one to
# edit when trying a change (assign it to model.lm_loss), and the one the fused path is tested against.

class _FusedLMLoss(torch.autograd.Function):
    """Head + CE without the [N, V] logits, in [rows, chunk] pieces. Pass 1: each row's logsumexp; pass 2
    (training) recomputes a slice's logits and writes its gradients, a weight-gradient slice in one matmul per
    block (no [V, D] temporaries): bench.py's peak at V=50257, 1024 rows, 724 MB with one-pass row chunks ->
    183 MB (full logits: 673 MB), the 4th head matmul at no measurable cost. Only the gradients autograd
    needs are made: with a frozen head (LoRA) neither the [V, D] fp32 weight-gradient buffer nor its matmul
    exists (SmolLM2's head: peak beyond the inputs 128 -> 17 MB)."""

    @staticmethod
    def forward(ctx, h, w, t, chunk, rows, need_h, need_w):
        N = t.numel()
        V, C = w.shape
        dev = h.device
        cdt = (h[:1] @ w[:1].t()).dtype  # the matmul dtype: bf16 under bf16 autocast
        gh = torch.empty(N, C, dtype=h.dtype, device=dev) if need_h else None
        gw = torch.zeros(V, C, dtype=torch.float32, device=dev) if need_w else None
        loss = torch.zeros((), dtype=torch.float32, device=dev)
        for r0 in range(0, N, rows):
            hb = h[r0:r0 + rows].to(cdt)
            tb = t[r0:r0 + rows]
            ar = torch.arange(len(tb), device=dev)
            lse = None
            zt = torch.empty(len(tb), dtype=torch.float32, device=dev)  # the target's logit
            for v0 in range(0, V, chunk):  # pass 1: logsumexp over the vocabulary (statistics in fp32)
                z = (hb @ w[v0:v0 + chunk].to(cdt).t()).float()
                hit = (tb >= v0) & (tb < v0 + chunk)
                zt[hit] = z[ar[hit], tb[hit] - v0]
                m = z.amax(-1)  # logsumexp in place: torch.logsumexp would allocate another [rows, chunk]
                s = z.sub_(m[:, None]).exp_().sum(-1).log_().add_(m)
                lse = s if lse is None else torch.logaddexp(lse, s)
            loss += (lse - zt).sum()
            if not (need_h or need_w):
                continue
            ghb = torch.zeros(len(tb), C, dtype=torch.float32, device=dev) if need_h else None
            for v0 in range(0, V, chunk):  # pass 2: d(mean CE)/d logits = (softmax - onehot) / N
                wc = w[v0:v0 + chunk].to(cdt)
                hit = (tb >= v0) & (tb < v0 + chunk)
                g = (hb @ wc.t()).float().sub_(lse[:, None]).exp_()
                g[ar[hit], tb[hit] - v0] -= 1.0
                g = g.div_(N).to(cdt)
                if need_h:
                    ghb += g @ wc
                if need_w:
                    gw[v0:v0 + chunk] += g.t() @ hb
            if need_h:
                gh[r0:r0 + rows] = ghb
        ctx.grads = (gh, gw)
        ctx.w_dtype = w.dtype
        return loss / N

    @staticmethod
    def backward(ctx, go):
        gh, gw = ctx.grads
        ctx.grads = None  # hand the buffers over: scaled in place, adopted without a copy
        if gh is not None:
            gh = gh.mul_(go.to(gh.dtype))
        if gw is not None:
            gw = gw.mul_(go).to(ctx.w_dtype)
        return gh, gw, None, None, None, None, None


def fused_lm_loss(h, weight, targets, ignore_index=-100, chunk=1024, rows=2048):
    """Eq. 3: mean CE of the reasoning head over the valid targets. h [B,T,D], weight [V,D] (the tied LM
    head), targets [B,T] (ignore_index = none). Only valid rows reach the head, in [rows, chunk] pieces."""
    valid = targets != ignore_index
    hv = h[valid]
    tv = targets[valid]
    if tv.numel() == 0:
        return h.sum() * 0.0 + weight.sum() * 0.0  # a zero that still has a graph (DDP-safe)
    need_h = torch.is_grad_enabled() and h.requires_grad
    need_w = torch.is_grad_enabled() and weight.requires_grad  # False for LoRA's frozen head
    return _FusedLMLoss.apply(hv, weight, tv, chunk, rows, need_h, need_w)


def reference_lm_loss(h, weight, targets, ignore_index=-100):
    """Eq. 3 the plain way: gather the valid rows, their [N, V] logits, cross-entropy in fp32. The same
    arguments and result as fused_lm_loss, at N x V memory."""
    valid = targets != ignore_index
    t_valid = targets[valid]
    if t_valid.numel() == 0:
        return h.sum() * 0.0 + weight.sum() * 0.0  # a zero that still has a graph (DDP-safe)
    logits = h[valid] @ weight.t()
    return F.cross_entropy(logits.float(), t_valid)


def token_kl(h_p, w_p, h_q, w_q, temperature=1.0, rows=256):
    """Mean over rows of KL(p || q), p = softmax(h_p w_p^T / T) and q = softmax(h_q w_q^T / T): two
    models' next-token distributions at the same valid LM targets (row i of h_p and of h_q), exact over the
    vocabulary. dhrd's --kl_coef: KL(p_model || p_base); --kd_coef: KL(p_teacher || p_student) at temperature
    T (Hinton et al. 2015; paper App. F). Row chunks under activation checkpointing: at most [rows, V] logits
    exist at a time, forward and backward; the gradient reaches whichever side requires it."""
    def part(a, b):
        lp = F.log_softmax((a @ w_p.t()).float() / temperature, -1)
        lq = F.log_softmax((b @ w_q.t()).float() / temperature, -1)
        return (lp.exp() * (lp - lq)).sum()
    if len(h_p) == 0:
        return h_p.sum() * 0.0 + h_q.sum() * 0.0
    chunks = (checkpoint(part, h_p[i:i + rows], h_q[i:i + rows], use_reentrant=False)
              for i in range(0, len(h_p), rows))
    return sum(chunks) / len(h_p)

# ----------------------------------------------------------------------------------------------------------
# The dual objective: forward returns both heads' terms from one pass; dual_loss combines them (Eq. 4).

class DualOutput(NamedTuple):
    cls_logits: torch.Tensor | None  # [B, K] the pooled head at the last token of x (Eq. 2); None: no head
    loss_lm: torch.Tensor | None     # L_lm, the reasoning head's loss (Eq. 3); None: no lm_targets given
    extra: dict                      # name -> value of each extra term forward was given; {} without


def dual_loss(out, y, alpha, beta, weights=None):
    """Paper Eq. 4: L = beta * L_cls + alpha * L_lm, from one forward's DualOutput and the labels y, plus
    weights[name] * value for each extra term out carries (dhrd's --kl_coef and --kd_coef, or a fork's own).
    -> (loss, loss_cls). A pooled baseline (alpha=0) passes no LM targets, so loss_lm is None and no LM work
    was done at all."""
    loss_cls = F.cross_entropy(out.cls_logits.float(), y)
    loss = beta * loss_cls
    if out.loss_lm is not None:
        loss = loss + alpha * out.loss_lm
    for name, value in out.extra.items():
        loss = loss + weights[name] * value
    return loss, loss_cls

# ----------------------------------------------------------------------------------------------------------
# Sampling the next token in generate: greedy, temperature, nucleus (paper App. E.6: 0.1 and 0.7 for CoT).

def _sample(logits, temperature, top_p, generator):
    """The next token [B] of fp32 logits [B, V]: the argmax (temperature 0), else a draw at `temperature`
    from the nucleus, the fewest most likely tokens that hold more than top_p of the mass. No host sync on a
    GPU."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return _draw(probs, generator)[:, 0]
    if probs.is_cuda:  # a full sort takes microseconds there, and a branch on its result would be a sync
        sp, si = probs.sort(-1, descending=True)
    else:
        # Sort only the top 64: if they already hold more than top_p, no later token can be in the nucleus
        # (exact); else sort all V. Saves a full sort of V=50257 per row: 30.7 -> 0.7 ms per step at batch 8.
        # Reading the flag is no sync on a CPU, where the tensor already is in memory.
        sp, si = probs.topk(min(64, probs.shape[-1]), -1)
        if not bool((sp.sum(-1) > top_p).all()):
            sp, si = probs.sort(-1, descending=True)
    sp[(sp.cumsum(-1) - sp) > top_p] = 0.0
    return si.gather(-1, _draw(sp, generator))[:, 0]


def _draw(probs, generator):
    """[B, 1]: torch.multinomial(probs, 1)'s own draw, argmax(p / Exp(1)) (the same tokens from the same
    generator), without its input checks, which read two values back to the host."""
    return (probs / torch.empty_like(probs).exponential_(1, generator=generator)).argmax(-1, keepdim=True)


class PackedLinear(nn.Module):
    """A Linear with its weight in oneDNN's blocked layout for `rows`-row inputs, in `dtype`: generate's
    decode matmuls on a CPU (inductor's freezing packs a frozen graph's weights the same way). Unpacked, oneDNN
    reorders a bf16 weight at every call (a skinny matmul reads it twice and writes it once: packed, the same
    products), and MKL's fp32 GEMM of a few rows reads the weight slowly (packed: products within rounding,
    ~1e-6, of F.linear's). GPT-2-124M's 73 decode matmuls timed alone, batch 1 / 8, one thread, 2-core EPYC
    (AVX-512-BF16), torch 2.13: bf16 F.linear 43.5 / 53.7 ms, pre-transposed x @ W^T 46.4 / 59.5,
    torch.utils.mkldnn 53.4 / 60.1, packed 23.9 / 31.6 ms (10.3 / 7.8 GB/s); fp32 F.linear 57.7 / 104.4,
    MKL-packed 46.3 / 106.2, packed 47.3 / 52.9 ms (oneDNN capped to AVX2: F.linear 51.8 / 67.7, packed
    47.1 / 48.8): fp32 packs for more than one row only. The whole decode step compiled instead (inductor
    takes no packed weight; freezing would keep stale ones after a training step): bf16 34.9 / 43.1 ms, eager
    packed 23.9 / 40.6 ms."""

    def __init__(self, linear, rows, dtype):
        super().__init__()
        self.dtype = dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().to(dtype), rows)
        self.bias = None
        if linear.bias is not None:
            self.bias = linear.bias.detach().to(dtype)

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [], "")


@contextmanager
def packed_linears(model, rows, dtype):
    """Every nn.Linear of `model` swapped for its PackedLinear for the duration: one pass over the weights
    (GPT-2-124M: ~0.15 s a call in bf16, ~0.4 s in fp32)."""
    swaps = [(m, name, child) for m in model.modules() for name, child in m.named_children()
             if type(child) is nn.Linear]
    for m, name, linear in swaps:
        setattr(m, name, PackedLinear(linear, rows, dtype))
    try:
        yield model
    finally:
        for m, name, linear in swaps:
            setattr(m, name, linear)

# ----------------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021), as the paper trains its backbones (App. E.4: r=16, alpha=32, dropout 0.1 on
# q/k/v/o/gate/up/down; only the adapters and the pooled head train). y = base(x) + B A drop(x) * alpha/r with
# B = 0 at the start, so a fresh adapter is the base model exactly. save_pretrained merges (W + alpha/r B A):
# the export is a plain HF folder.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.drop = nn.Dropout(dropout)
        self.enabled = True
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default (nn.Linear's own init)
        self.train(base.training)  # added to a model in eval mode: no adapter dropout either

    def forward(self, x):  # dropout on the adapter's input only (PEFT); the frozen base path sees x unchanged
        y = self.base(x)
        if not self.enabled:
            return y
        return y + F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.scale


def add_lora(model, rank=16, alpha=32.0, dropout=0.1, targets=LORA_TARGETS):
    """Freeze every weight, wrap the targeted projections of every block, keep the pooled head trainable
    (model.head_parameters(); PEFT's modules_to_save for sequence classification). A known target this family
    lacks (gate_proj in GPT-2/OPT) is skipped."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",")]
    targets = list(targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad:
        raise ValueError(f"unknown LoRA target(s) {bad}; valid: {','.join(LORA_TARGETS)}")
    if rank < 1 or model.lora is not None:
        raise ValueError(f"LoRA rank must be >= 1 (got {rank}), and adapters are added once per model")
    model.requires_grad_(False)
    pairs = [(m, t) for b in model.h for m in (b.attn, b.mlp) for t in targets
             if isinstance(getattr(m, t, None), nn.Linear)]
    if not pairs:
        raise ValueError(f"LoRA targets {targets}: none exists in this {model.config.model_type} model")
    for m, t in pairs:
        setattr(m, t, LoRALinear(getattr(m, t), rank, alpha, dropout))
    for p in model.head_parameters().values():
        p.requires_grad_(True)
    model.lora = dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    return model


@contextmanager
def lora_disabled(model):  # the frozen base network without a second copy of its weights (--kl_coef's base)
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True


def merged_state_dict(model):
    """state_dict with every adapter folded in (W + scale B A, in fp32); the model is untouched."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    mods = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    for n, m in mods.items():
        w = sd.pop(f"{n}.base.weight")
        delta = m.lora_B.detach().float() @ m.lora_A.detach().float()
        sd[f"{n}.weight"] = (w.float() + m.scale * delta).to(w.dtype)
        if f"{n}.base.bias" in sd:
            sd[f"{n}.bias"] = sd.pop(f"{n}.base.bias")
    return sd


def _adapter_state(model):  # what an adapter-only checkpoint holds: every lora_A / lora_B, the pooled head
    return {k: v for k, v in model.state_dict().items() if ".lora_" in k or is_head(k, model.head_modules)}


def save_lora(model, path):
    """Adapter-only checkpoint: path/adapter.safetensors (every lora_A [r,in] / lora_B [out,r] and the pooled
    head, by our module names) + path/adapter.json (rank, alpha, dropout, targets, base_model). load_lora is
    its exact inverse."""
    check(model.lora is not None, "save_lora", "the model has no LoRA adapters; call add_lora first")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "adapter.safetensors", _adapter_state(model))
    src = "" if model.source_dir is None else str(Path(model.source_dir).resolve())  # none on a dhrd resume
    info = {**model.lora, "base_model": src, "num_labels": model.config.num_labels, "head": model.config.head}
    atomic_write(path / "adapter.json", lambda tmp: tmp.write_text(json.dumps(info, indent=1)))


def load_lora(model, path):
    """On GPT.from_pretrained(base_model, num_labels=K): add the saved adapters and head, checked name by name
    and shape by shape (a different base gives a CheckpointError naming the tensor)."""
    file = Path(path) / "adapter.safetensors"
    config_file = Path(path) / "adapter.json"
    try:
        c = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_file}: cannot read the adapter config ({e})") from None
    tensors = read_safetensors(file)
    hint = f"saved on base {c.get('base_model') or '?'} with num_labels={c.get('num_labels')}"
    add_lora(model, c["rank"], c["alpha"], c["dropout"], c["targets"])
    ours = _adapter_state(model)
    missing = sorted(ours.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - ours.keys())
    check(ours.keys() == tensors.keys(), file, f"tensors do not match this model ({hint}): "
          f"missing {some(missing)}, unexpected {some(unexpected)}")
    for k, t in tensors.items():
        check(t.shape == ours[k].shape, file, f"tensor {k} has shape {list(t.shape)}, this model's is "
              f"{list(ours[k].shape)}; the adapter was {hint}: load that base")
    model.load_state_dict(tensors, strict=False)
    return model

# ----------------------------------------------------------------------------------------------------------
# The model.

HEAD_TENSORS = {  # a classification head saved with a checkpoint: its first tensor -> GPTConfig.head
    "score.weight": "linear",  # HF's *ForSequenceClassification: a bias-free nn.Linear
    "score.2.weight": "mlp",   # ours: nn.Sequential(Linear, GELU, Linear), the paper's 2-layer MLP
}


class GPT(nn.Module):
    # The pooled head (paper §3, Eq. 2) is every parameter under these top-level modules; this one list is
    # what LoRA keeps trainable, adapter files hold, and save_pretrained / from_pretrained write and read
    # under their own names (HF's `score`). A fork that adds to the head (attention pooling's query, say)
    # adds the module's name here, in a subclass or in place.
    head_modules = ("score",)

    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        ok = cfg.model_type in FAMILIES and cfg.head in ("linear", "mlp") and cfg.pooling in ("last", "mean")
        check(ok, "GPTConfig", f"model_type {cfg.model_type!r}, head {cfg.head!r}, pooling {cfg.pooling!r} "
              f"must be {'|'.join(FAMILIES)}, linear|mlp, last|mean")
        D = cfg.word_embed_proj_dim or cfg.n_embd  # OPT-350m embeds tokens in 512 dims, its blocks in 1024
        self.wte = nn.Embedding(cfg.vocab_size, D)
        # RoPE: no table; OPT's table has pos_offset extra rows at its start
        self.wpe = None if cfg.rope_theta else nn.Embedding(cfg.block_size + cfg.pos_offset, cfg.n_embd)
        self.project_in = nn.Linear(D, cfg.n_embd, bias=False) if D != cfg.n_embd else None
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = _norm(cfg, cfg.n_embd) if cfg.pre_ln else None  # post-LN has none
        self.project_out = nn.Linear(cfg.n_embd, D, bias=False) if D != cfg.n_embd else None
        self.lm_head = None  # an untied classifier file without lm_head.weight has no reasoning head
        if cfg.lm_head:
            self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)  # the reasoning head (paper §3)
        if cfg.lm_head and cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        # the pooled head (paper §3, Eq. 2): HF's bias-free `score`, or the paper's 2-layer MLP
        if not cfg.num_labels:
            self.score = None
        elif cfg.head == "linear":
            self.score = nn.Linear(D, cfg.num_labels, bias=False)
        else:
            self.score = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, cfg.num_labels))
        self.lm_loss = fused_lm_loss  # Eq. 3; reference_lm_loss computes the same, plainly
        self.source_dir = None  # the folder from_pretrained read; save_pretrained copies its tokenizer files
        self.lora = None  # add_lora's settings (rank, alpha, dropout, targets) once it has added adapters
        self.decode_caches = None  # a compiled generate's StaticKVCaches, kept for its next call
        self.grad_checkpoint = False  # recompute each block in backward (dhrd.py --grad_checkpoint)
        self.apply(self._init_weights)
        for name, p in self.h.named_parameters():  # GPT-2 paper §2.3: residual projections by 1/sqrt(2 L)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)

    def _mask(self, attention_mask, T, causal_ok=True):
        """Positions and SDPA mask for a right- or left-padded attention_mask (1 = real token)."""
        dev = self.wte.weight.device
        if attention_mask is None:
            return torch.arange(T, device=dev)[None], None
        am = attention_mask.to(dev).bool()
        pos = (am.long().cumsum(1) - 1).clamp(min=0)  # OPT / HF generate: positions count real tokens only
        if causal_ok and bool((am[:, 1:] <= am[:, :-1]).all()):
            return pos, None  # right padding: causal attention already hides the pads from real positions
        m = am[:, None, None, :] & torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        return pos, m | torch.eye(T, dtype=torch.bool, device=dev)  # a pad row must attend somewhere (no NaN)

    def _blocks(self, idx, pos, mask, caches=None, start=0):  # embeddings + blocks; caches: generate only
        x = self.wte(idx)
        if self.project_in is not None:
            x = self.project_in(x)
        rot = None
        if self.wpe is None:  # Llama/Qwen rotate q and k in every block
            rot = rope(pos, self.config)
        else:  # GPT-2/OPT add a learned position row
            x = x + self.wpe(pos + self.config.pos_offset)
        x = self.drop(x)
        for block, cache in zip(self.h, caches or [None] * len(self.h)):
            if self.grad_checkpoint and self.training and torch.is_grad_enabled():
                # keep only each block's input; its activations are recomputed in backward (dropout too:
                # checkpoint restores the RNG), about one more forward per step for O(L) less memory
                x = checkpoint(block, x, mask, cache, start, rot, use_reentrant=False)
            else:
                x = block(x, mask, cache, start, rot)
        return x

    def _final(self, x):
        if self.ln_f is not None:
            x = self.ln_f(x)
        if self.project_out is not None:
            x = self.project_out(x)
        return x

    def hidden_states(self, idx, attention_mask=None):
        """[B,T,D]: HF's last_hidden_state (after the final LN and OPT's project_out)."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of length {idx.shape[1]} is longer than block_size "
                             f"{self.config.block_size}")
        pos, mask = self._mask(attention_mask, idx.shape[1])
        return self._final(self._blocks(idx, pos, mask))

    def require_lm_head(self, use):
        """The LM head, or a CheckpointError saying that `use` needs the head this model was loaded
        without."""
        where = self.source_dir or "GPT"
        check(self.lm_head is not None, where, f"{use} needs the LM head (lm_head.weight), which this "
              "untied classifier does not have: transformers' *ForSequenceClassification saves no LM head. "
              "Start from the base model it was fine-tuned from (its *ForCausalLM checkpoint) instead; the "
              "pooled head (classify, evaluation, prediction, training with alpha=0) works as it is")
        return self.lm_head

    def lm_logits(self, idx, attention_mask=None):
        return self.require_lm_head("lm_logits")(self.hidden_states(idx, attention_mask)).float()

    def head_parameters(self):
        """{name: parameter} of the pooled head: everything under head_modules."""
        return {n: p for n, p in self.named_parameters() if is_head(n, self.head_modules)}

    def pool(self, h, x_len):
        """[B,D]: the state at the last real token of x ('last', paper Eq. 2) or the mean over x ('mean')."""
        x_len = x_len.to(h.device)
        if self.config.pooling == "last":
            return h[torch.arange(h.shape[0], device=h.device), x_len - 1]
        keep = (torch.arange(h.shape[1], device=h.device)[None] < x_len[:, None]).to(h.dtype)
        return (h * keep[..., None]).sum(1) / x_len[:, None].to(h.dtype)

    def classify(self, idx, attention_mask=None):
        """[B,K] class logits pooled at the last real token (right padding). Never touches the LM head."""
        if self.score is None:
            raise ValueError("this model has no classification head: pass num_labels=K to "
                             "from_pretrained/GPTConfig")
        return self.forward(idx, attention_mask).cls_logits

    def forward(self, idx, attention_mask=None, x_len=None, lm_targets=None, terms=None):
        """THE training forward: one pass over s = [x, rationale, answer] feeds both losses of Eq. 4 (and
        keeps DDP's and FSDP's hooks simple: the LM head is gathered only inside forward). Causal attention
        makes h at x's last token independent of what follows: pooling there = x alone (§3).
        terms: {name: (fn, args)}, extra loss terms computed in this same pass, each fn(h at the valid LM
        targets, the LM head's weight, *args) -> a scalar (dhrd's KL terms).
        -> DualOutput, None for each head's term not asked for."""
        h = self.hidden_states(idx, attention_mask)
        cls_logits = None
        loss_lm = None
        if self.score is not None:
            if x_len is None:  # x alone: the real length of each right-padded row
                real = torch.ones_like(idx) if attention_mask is None else attention_mask
                x_len = real.long().sum(1)
            cls_logits = self.score(self.pool(h, x_len))
        if lm_targets is not None:
            loss_lm = self.lm_loss(h, self.require_lm_head("the LM loss L_lm (alpha > 0)").weight, lm_targets)
        extra = {}
        for name, (fn, args) in (terms or {}).items():
            extra[name] = fn(h[lm_targets != -100], self.require_lm_head(f"the {name} term").weight, *args)
        return DualOutput(cls_logits, loss_lm, extra)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, eos_token_id=None,
                 attention_mask=None, generator=None, compile=False):
        """Left-padded prompts [B,T] -> [B, T+new] with a KV cache; temperature 0 = greedy (HF's tokens).
        Rows past eos_token_id are filled with pad (or eos) like HF; stops once every row is done. As gpt-fast
        decodes: the prompt's forward (prefill) as generate_reference runs it, then one _decode_step per token
        on StaticKVCaches, the same shapes at every step; compile=True compiles that step, no graph breaks
        (CUDA: mode reduce-overhead, CUDA graphs). Sampling and EOS stay on the device: the host reads `done`
        once per EOS_CHECK tokens. On a CPU the decode step's matmuls use packed weights (PackedLinear).
        The tokens are generate_reference's (the tests hold them equal; fp32 packed products differ from
        F.linear's by rounding)."""
        B, T = idx.shape
        lm_head = self._check_generate(T, max_new_tokens)
        dev = idx.device
        n_slots = T + max_new_tokens
        if compile:  # an evaluation's prompts of many lengths share a few shapes: few recompilations
            n_slots = -(-n_slots // CACHE_ROUND) * CACHE_ROUND
        real = torch.ones_like(idx, dtype=torch.bool)
        if attention_mask is not None:
            real = attention_mask.to(dev).bool()
        if bool(real.all()):
            attention_mask = None  # no padding: SDPA's causal fast path
        keys = F.pad(real, (0, n_slots - T), value=True)  # slots of real tokens (those still to come count)
        slots = torch.arange(n_slots, device=dev)
        step = self._decode_step
        if compile:
            mode = None
            if idx.is_cuda:
                mode = "reduce-overhead"
            step = torch.compile(self._decode_step, fullgraph=True, mode=mode)
        packed = nullcontext()
        pack_dtype = cpu_packed_dtype(self, B)
        if dev.type == "cpu" and pack_dtype is not None and not compile:  # inductor takes no packed weights
            packed = packed_linears(self, B, pack_dtype)
        out = F.pad(idx, (0, max_new_tokens))
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else eos_token_id
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        n = T
        pos, mask = self._mask(attention_mask, T, causal_ok=False)
        prompt = [KVCache(T) for _ in self.h]
        logits = lm_head(self._final(self._blocks(idx, pos, mask, prompt)[:, -1])).float()
        caches = self._static_caches(prompt, n_slots, keep=compile)
        pos = pos[:, -1] + 1
        with packed:
            while True:
                tok = _sample(logits, temperature, top_p, generator)
                if eos_token_id is not None:
                    tok = torch.where(done, pad, tok)
                    done |= tok == eos_token_id
                out[:, n] = tok
                n += 1
                if n == T + max_new_tokens:
                    break
                if eos_token_id is not None and (n - T) % EOS_CHECK == 0 and bool(done.all()):
                    break
                if compile and idx.is_cuda:
                    torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed
                logits = step(tok, pos, slots[n - 1:n], keys, caches)
                pos = pos + 1
        if eos_token_id is not None and bool(done.all()):  # end where generate_reference stops: at the EOS
            n = T + 1 + int((out[:, T:n] == eos_token_id).int().argmax(1).max())  # that finished the last row
        return out[:, :n]

    def _check_generate(self, T, max_new_tokens):
        """-> the LM head, once T + max_new_tokens fits the positions."""
        lm_head = self.require_lm_head("generate")
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceeds block_size "
                             f"{self.config.block_size}")
        return lm_head

    def _static_caches(self, prompt, n_slots, keep):
        """StaticKVCaches of n_slots holding the prompt's keys and values (the KVCaches `prompt`). keep (a
        compiled step): reused by the next call of the same shapes; CUDA graphs replay at fixed addresses."""
        k0 = prompt[0].k
        B, n_kv, T, hd = k0.shape
        caches = self.decode_caches
        same = caches and caches[0].k.shape == (B, n_kv, n_slots, hd) and caches[0].k.dtype == k0.dtype
        if not (keep and same and caches[0].k.device == k0.device):
            caches = []
            for _ in prompt:
                k = k0.new_zeros(B, n_kv, n_slots, hd)
                v = k0.new_zeros(B, n_kv, n_slots, hd)
                if k.is_cuda:  # CUDA graphs: the buffers are the graph's own, updated in place
                    torch._dynamo.mark_static_address(k)
                    torch._dynamo.mark_static_address(v)
                caches.append(StaticKVCache(k, v))
        self.decode_caches = caches if keep else None
        for c, p in zip(caches, prompt):
            c.k[:, :, :T] = p.k
            c.v[:, :, :T] = p.v
            c.k[:, :, T:] = 0.0
            c.v[:, :, T:] = 0.0
        return caches

    def _decode_step(self, tok, pos, slot, keys, caches):
        """generate's step: tokens tok [B] at position ids pos [B], cache slot `slot` [1] -> the next token's
        logits [B, V] (fp32). slot is a tensor and the mask spans every slot: one graph for every step."""
        mask = keys & (torch.arange(keys.shape[1], device=keys.device) <= slot)  # [B, n_slots]
        h = self._blocks(tok[:, None], pos[:, None], mask[:, None, None, :], caches, slot)
        return self.lm_head(self._final(h[:, -1])).float()

    @torch.no_grad()
    def generate_reference(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, eos_token_id=None,
                           attention_mask=None, generator=None):
        """generate, plainly: the same arguments and tokens, one growing KVCache, a forward per token and a
        look at `done` after each; the loop to read and to edit (the tests hold generate equal to it)."""
        B, T = idx.shape
        lm_head = self._check_generate(T, max_new_tokens)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: SDPA's causal fast path
        pos, mask = self._mask(attention_mask, T, causal_ok=False)
        keys = None  # which cache slots hold real tokens (the slots of tokens still to come count as real)
        if attention_mask is not None:
            keys = F.pad(attention_mask.to(idx.device).bool(), (0, max_new_tokens), value=True)
        out = F.pad(idx, (0, max_new_tokens))
        caches = [KVCache(T + max_new_tokens) for _ in self.h]
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else eos_token_id
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        x = idx
        n = T
        for _ in range(max_new_tokens):
            h = self._blocks(x, pos, mask, caches, n - x.shape[1])
            logits = lm_head(self._final(h[:, -1])).float()  # the LM head on the last position only
            tok = _sample(logits, temperature, top_p, generator)
            if eos_token_id is not None:
                tok = torch.where(done, pad, tok)
                done |= tok == eos_token_id
            out[:, n] = tok
            n += 1
            if eos_token_id is not None and bool(done.all()):
                break
            x = tok[:, None]
            pos = pos[:, -1:] + 1
            mask = None if keys is None else keys[:, None, None, :n]
        return out[:, :n]

    @classmethod
    def from_pretrained(cls, path_or_name, num_labels=None, revision="main", **overrides):
        """HF folder or hub name (at `revision`: a branch, tag or commit sha) -> GPT. A checkpoint `score`
        head is loaded and sets num_labels; num_labels=K without one adds a fresh head. overrides: GPTConfig
        fields (dropout, head, pooling, ...)."""
        folder = resolve_model_dir(path_or_name, revision=revision)
        fields = config_from_hf(folder / "config.json")
        act_key = FAMILIES[fields["model_type"]].keys["activation"][0]
        check(fields["activation"] in ACT, folder / "config.json", f"{act_key} {fields['activation']!r} is "
              f"not supported (supported: {', '.join(ACT)})")
        tensors, file = read_checkpoint(folder)
        saved_head = next((k for k in HEAD_TENSORS if k in tensors), None)
        if saved_head is not None:
            fields["head"] = HEAD_TENSORS[saved_head]
            fields["num_labels"] = tensors[saved_head].shape[0]
            check(num_labels in (None, fields["num_labels"]), file, f"the checkpoint's classification head "
                  f"has {fields['num_labels']} labels, not num_labels={num_labels}; drop num_labels or use a "
                  "checkpoint without `score`")
        fields["num_labels"] = fields.get("num_labels") or num_labels or 0
        # transformers' *ForSequenceClassification saves no LM head: untied, its file lacks lm_head.weight
        if saved_head is not None and not fields["tie_word_embeddings"] and "lm_head.weight" not in tensors:
            fields["lm_head"] = False
        cfg = GPTConfig(**{**fields, **overrides})  # unknown fields -> TypeError
        with torch.device("meta"):  # no time spent initialising weights that are overwritten anyway
            model = cls(cfg)
        shapes = {n: p.shape for n, p in model.named_parameters()}  # a tied lm_head is not listed
        sd = state_dict_from_hf(tensors, cfg, shapes, file, model.head_modules)
        model.load_state_dict({n: t.contiguous() for n, t in sd.items()}, strict=False, assign=True)
        if cfg.tie_word_embeddings and model.lm_head is not None:
            model.lm_head.weight = model.wte.weight
        for name in model.head_modules:  # a head module the checkpoint lacks starts fresh
            module = getattr(model, name)
            if module is not None and not any(is_head(k, (name,)) for k in sd):
                module.to_empty(device="cpu").apply(model._init_weights)
        model.source_dir = folder
        return model

    def save_pretrained(self, path, labels=None, pad_token_id=None):
        """HF layout (config.json + model.safetensors + the source folder's tokenizer files) that
        transformers' AutoModelForCausalLM and, for a linear head, AutoModelForSequenceClassification load.
        pad_token_id: the id the inputs were padded with, written when the config has none (GPT-2)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        sd = merged_state_dict(self)  # LoRA folded into the base weights: a plain HF checkpoint
        write_safetensors(path / "model.safetensors", state_dict_to_hf(sd, self.config, self.head_modules))
        cfg = self.config
        if cfg.pad_token_id is None and pad_token_id is not None:
            # HF's *ForSequenceClassification pools at the last token that is not pad_token_id, and without
            # one refuses every batch of more than one row
            cfg = replace(cfg, pad_token_id=pad_token_id)
        text = json.dumps(config_to_hf(cfg, labels, self.wte.weight.dtype), indent=2)
        atomic_write(path / "config.json", lambda tmp: tmp.write_text(text))
        if self.source_dir is not None:
            copy_tokenizer_files(self.source_dir, path)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the matrices (matmuls, embeddings) only; biases and LayerNorm gains stay undecayed (nanoGPT).
        # LoRA: only lora_A/B and the pooled head require grad; A, B are matrices and decay (as HF Trainer's
        # grouping would): decay pulls B A towards 0, i.e. towards the base model
        params = [p for p in self.parameters() if p.requires_grad]
        decay = {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay}
        no_decay = {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}
        # fused AdamW, on CPU too (torch >= 2.4): the GPT-2-124M optimizer step 2138 -> 76 ms (foreach); it was
        # the largest single cost of a CPU train step
        return torch.optim.AdamW([decay, no_decay], lr=learning_rate, betas=betas,
                                 fused=device_type in ("cuda", "cpu"))

    def flops_per_token(self, T):
        """6N + 12 L H Q T (PaLM appendix B, nanoGPT's estimate_mfu); N without position embeddings."""
        c = self.config
        N = sum(p.numel() for p in self.parameters())
        if self.wpe is not None:
            N -= self.wpe.weight.numel()
        return 6 * N + 12 * c.n_layer * c.n_head * (c.head_dim or c.n_embd // c.n_head) * T

# ----------------------------------------------------------------------------------------------------------
# The device.

def cpu_packed_dtype(model, rows):
    """The dtype a CPU decode of `rows` rows packs the model's weights in (PackedLinear), or None: bfloat16
    where its matmuls run in native bf16 (bf16 weights or bf16 autocast, on a CPU with the instructions;
    elsewhere bf16 is emulated, ~60x slower, and packing gains nothing), float32 for fp32 matmuls of more than
    one row (one row: packed no faster than F.linear), else None."""
    dtype = model.wte.weight.dtype
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    if dtype == torch.bfloat16 and native_dtype("cpu")[0] == "bfloat16":
        return torch.bfloat16
    if dtype == torch.float32 and rows > 1:
        return torch.float32
    return None


def native_dtype(device):
    """(dtype name, reason): the fastest dtype `device` computes natively; what dtype=auto means everywhere.
    CPU: bfloat16 only with native bf16 matrix instructions (AVX-512-BF16 or AMX) that oneDNN is allowed to
    use, else float32: without them bf16 matmuls are emulated, ~150x slower than fp32 (experiments/README.md,
    "Engineering measurements"). cpuinfo's flags alone are not enough: ONEDNN_MAX_CPU_ISA can forbid the
    instructions; oneDNN's check sees it. CUDA: bfloat16 where the card has it (Ampere+), else float16 with a
    gradient scaler."""
    if str(device).startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "native bf16"
        return "float16", "no bf16 on this GPU; fp16 with a gradient scaler"
    has_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if has_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bfloat16", "native bf16: AVX-512-BF16/AMX"
    return "float32", "no native bf16"
