"""
GPT-2 and OPT in one file, with the two heads of Dual-Head Reasoning Distillation (arXiv 2509.21487):
a pooled classification head on the last token of the input x, and the (tied) LM head as the
reasoning head, trained in ONE forward pass (paper Eq. 4). Loads/saves Hugging Face safetensors
folders with its own reader/writer (no pickle), downloads hub names with urllib, and builds a
tiktoken tokenizer from vocab.json + merges.txt. Semantics follow HF transformers exactly
(GPT2LMHeadModel, OPTForCausalLM, *ForSequenceClassification). Deps: torch, numpy, tiktoken, stdlib.
"""
import hashlib, inspect, json, math, mmap, os, re, shutil, sys, time, urllib.error, urllib.request
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F


class CheckpointError(ValueError):
    """A model folder / file that cannot be used; the message names the file and what is wrong."""


class DownloadError(OSError):
    """A download that failed (offline, HTTP error, size or checksum mismatch); names the URL."""


@dataclass
class GPTConfig:
    model_type: str = "gpt2"          # 'gpt2' | 'opt'
    vocab_size: int = 50257
    block_size: int = 1024            # max positions
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int = 0                  # MLP width; 0 -> 4 * n_embd
    word_embed_proj_dim: int = 0      # OPT-350m: 512 (project_in/out); 0 -> n_embd
    pre_ln: bool = True               # OPT do_layer_norm_before (False for opt-350m)
    activation: str = "gelu_new"      # 'gelu_new' (gpt2) | 'relu' (opt)
    layer_norm_eps: float = 1e-5
    bias: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    num_labels: int = 0               # 0 -> no classification head
    head: str = "linear"              # 'linear' (bias-free, HF `score`) | 'mlp' (paper: 2-layer MLP)
    pooling: str = "last"             # 'last' | 'mean' (over the real tokens of x)
    dropout: float = 0.0

# ----------------------------------------------------------------------------------------------
# The model. Module names follow nanoGPT/GPT-2; OPT weights are renamed on load (see _weight_map).

ACT = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
       "gelu": F.gelu, "relu": F.relu}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # one fused q,k,v matmul (GPT-2 c_attn); OPT's q_proj/k_proj/v_proj are concatenated on load
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.n_head, self.dropout = cfg.n_head, cfg.dropout

    def forward(self, x, mask=None, cache=None, start=0):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if cache is not None:  # preallocated [B, H, T_max, hd] buffers: write in place, never re-concatenate
            if cache[0] is None:
                cache[0] = k.new_empty(B, self.n_head, cache[2], C // self.n_head)
                cache[1] = torch.empty_like(cache[0])
            cache[0][:, :, start:start + T], cache[1][:, :, start:start + T] = k, v
            k, v = cache[0][:, :, :start + T], cache[1][:, :, :start + T]
        # softmax(q k^T / sqrt(hd)): GPT-2 divides the scores, OPT scales q after q_proj — same maths, the
        # SDPA default scale. No mask -> is_causal, which lets SDPA pick its flash/memory-efficient kernels.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, cfg.n_inner or 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_inner or 4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.act = ACT[cfg.activation]

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.pre_ln, self.drop = cfg.pre_ln, nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, cache=None, start=0):
        if self.pre_ln:  # GPT-2 and most OPT sizes
            x = x + self.drop(self.attn(self.ln_1(x), mask, cache, start))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x, mask, cache, start)))  # opt-350m: post-LN (original Transformer)
        return self.ln_2(x + self.drop(self.mlp(x)))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        assert cfg.model_type in ("gpt2", "opt") and cfg.n_embd % cfg.n_head == 0 and cfg.activation in ACT
        assert cfg.head in ("linear", "mlp") and cfg.pooling in ("last", "mean")
        D = cfg.word_embed_proj_dim or cfg.n_embd  # OPT-350m embeds tokens in 512 dims, the blocks run in 1024
        self.pos_offset = 2 if cfg.model_type == "opt" else 0  # OPT's position table starts at 2 (fairseq)
        self.wte = nn.Embedding(cfg.vocab_size, D)
        self.wpe = nn.Embedding(cfg.block_size + self.pos_offset, cfg.n_embd)
        self.project_in = nn.Linear(D, cfg.n_embd, bias=False) if D != cfg.n_embd else None
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_eps) if cfg.pre_ln else None  # post-LN: none
        self.project_out = nn.Linear(cfg.n_embd, D, bias=False) if D != cfg.n_embd else None
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)  # the reasoning head (paper §3)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        self.score = None  # the pooled classification head, on the last real token of x (paper §3, Eq. 2)
        if cfg.num_labels and cfg.head == "linear":  # HF *ForSequenceClassification `score`: bias-free
            self.score = nn.Linear(D, cfg.num_labels, bias=False)
        elif cfg.num_labels:  # paper: a 2-layer MLP on the pooled state
            self.score = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, cfg.num_labels))
        self.apply(self._init_weights)
        for name, p in self.h.named_parameters():  # GPT-2 paper §2.3: residual projections / sqrt(2 * n_layer)
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)

    # -- forward pieces ---------------------------------------------------------------------------
    def _mask(self, attention_mask, T):
        """Positions and the SDPA mask for right- or left-padded `attention_mask` (1 = real)."""
        dev = self.wte.weight.device
        if attention_mask is None:
            return torch.arange(T, device=dev)[None], None
        am = attention_mask.to(dev).bool()
        pos = (am.long().cumsum(1) - 1).clamp(min=0)  # OPT/HF-generate: positions count real tokens only
        if bool((am[:, 1:] <= am[:, :-1]).all()):
            # right padding: pads come after every real token, so plain causal attention already hides
            # them from real positions (and keeps SDPA on its fused kernels)
            return pos, None
        m = am[:, None, None, :] & torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        return pos, m | torch.eye(T, dtype=torch.bool, device=dev)  # a pad row must attend somewhere (no NaN)

    def _embed(self, idx, pos):
        x = self.wte(idx)
        if self.project_in is not None:
            x = self.project_in(x)
        return self.drop(x + self.wpe(pos + self.pos_offset))

    def _final(self, x):
        if self.ln_f is not None:
            x = self.ln_f(x)
        return self.project_out(x) if self.project_out is not None else x

    def hidden_states(self, idx, attention_mask=None):
        """[B,T,D]: HF's last_hidden_state (after the final LN and OPT's project_out)."""
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos, mask = self._mask(attention_mask, T)
        x = self._embed(idx, pos)
        for block in self.h:
            x = block(x, mask)
        return self._final(x)

    def lm_logits(self, idx, attention_mask=None):
        return self.lm_head(self.hidden_states(idx, attention_mask)).float()

    def pool(self, h, x_len):
        """[B,D]: the state at the last real token of x ('last', paper Eq. 2) or the mean over x ('mean')."""
        x_len = x_len.to(h.device)
        if self.config.pooling == "last":
            return h[torch.arange(h.shape[0], device=h.device), x_len - 1]
        keep = (torch.arange(h.shape[1], device=h.device)[None] < x_len[:, None]).to(h.dtype)
        return (h * keep[..., None]).sum(1) / x_len[:, None].to(h.dtype)

    def _x_len(self, idx, attention_mask):
        if attention_mask is None:
            return torch.full((idx.shape[0],), idx.shape[1], dtype=torch.long, device=idx.device)
        return attention_mask.long().sum(1)

    def classify(self, idx, attention_mask=None):
        """[B,K] class logits pooled at the last real token (right padding). Never touches the LM head."""
        if self.score is None:
            raise ValueError("this model has no classification head: pass num_labels=K to from_pretrained/GPTConfig")
        return self.score(self.pool(self.hidden_states(idx, attention_mask), self._x_len(idx, attention_mask)))

    def forward(self, idx, attention_mask=None, x_len=None, lm_targets=None):
        """THE training forward: one pass over s = [x, rationale, answer] gives both losses' inputs.
        Causal attention makes h at the last token of x independent of what follows, so pooling at x_len
        equals running x alone (paper §3): the DDP-safe single forward for Eq. 4."""
        h = self.hidden_states(idx, attention_mask)
        cls_logits = loss_lm = None
        if self.score is not None:
            cls_logits = self.score(self.pool(h, x_len if x_len is not None else self._x_len(idx, attention_mask)))
        if lm_targets is not None:
            loss_lm = fused_lm_loss(h, self.lm_head.weight, lm_targets)
        return cls_logits, loss_lm

    # -- decoding ---------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, eos_token_id=None,
                 attention_mask=None, generator=None):
        """Left-padded prompts [B,T] -> [B, T+new]; KV cache; temperature 0 = greedy (HF-identical).
        Rows that emitted eos_token_id are filled with pad (or eos) like HF; stops when all rows are done."""
        B, T = idx.shape
        L = T + max_new_tokens
        if L > self.config.block_size:
            raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceeds block_size {self.config.block_size}")
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else eos_token_id
        out = idx.new_empty(B, L)
        out[:, :T] = idx
        pos, mask = self._mask(attention_mask, T)
        keys = None
        if mask is not None or (attention_mask is not None and not bool(attention_mask.all())):
            keys = torch.zeros(B, L, dtype=torch.bool, device=idx.device)  # which cache slots are real tokens
            keys[:, :T] = attention_mask.bool()
            if mask is None:  # right padding in a prompt: needs the explicit mask too
                mask = keys[:, None, None, :T] & torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
                mask = mask | torch.eye(T, dtype=torch.bool, device=idx.device)
        caches = [[None, None, L] for _ in self.h]
        next_pos = pos[:, -1:] + 1 if attention_mask is None else attention_mask.long().sum(1, keepdim=True)
        x, start, n = idx, 0, T
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        for i in range(max_new_tokens):
            h = self._embed(x, pos)
            for block, cache in zip(self.h, caches):
                h = block(h, mask, cache, start)
            logits = self.lm_head(self._final(h[:, -1])).float()  # only the last position needs the LM head
            tok = _sample(logits, temperature, top_p, generator)
            if eos_token_id is not None:
                tok = torch.where(done, torch.full_like(tok, pad), tok)
                done |= tok == eos_token_id
            out[:, n] = tok
            n += 1
            if eos_token_id is not None and bool(done.all()):
                break
            x, start, pos = tok[:, None], n - 1, next_pos
            next_pos = next_pos + 1
            if keys is not None:
                keys[:, n - 1] = True
                mask = keys[:, None, None, :n]
        return out[:, :n]

    # -- training helpers -------------------------------------------------------------------------
    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay matrices (matmuls, embeddings) only; biases and LayerNorm gains stay undecayed (nanoGPT)
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **({"fused": True} if fused else {}))

    def flops_per_token(self, T):
        """6N + 12 L H Q T (PaLM appendix B, as in nanoGPT's estimate_mfu); N excludes position embeddings."""
        cfg = self.config
        N = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6 * N + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * T


def _sample(logits, temperature, top_p, generator):
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p
        sp, si = probs.sort(-1, descending=True)
        sp[(sp.cumsum(-1) - sp) > top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class _FusedLMLoss(torch.autograd.Function):
    """Head + cross-entropy over chunks of rows, gradients computed in the same sweep, so only
    [chunk, V] logits ever exist (forward and backward) instead of [B*T, V]."""

    @staticmethod
    def forward(ctx, h, w, t, chunk, need_grad):
        N = t.numel()
        gh = torch.empty_like(h) if need_grad else None
        gw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, N, chunk):
            hc, tc = h[i:i + chunk], t[i:i + chunk]
            z = hc @ w.t()  # under autocast: a bf16 matmul, softmax statistics in fp32
            logits, cdt = z.float(), z.dtype
            lse = torch.logsumexp(logits, -1)
            loss += (lse - logits.gather(1, tc[:, None])[:, 0]).sum()
            if need_grad:  # d(mean CE)/d logits = (softmax - onehot) / N
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(tc), device=g.device), tc] -= 1.0
                g = g.div_(N).to(cdt)
                gh[i:i + chunk] = g @ w.to(cdt)
                gw += (g.t() @ hc.to(cdt)).float()
        ctx.save_for_backward(gh, gw)
        ctx.w_dtype = w.dtype
        return loss / N

    @staticmethod
    def backward(ctx, go):
        gh, gw = ctx.saved_tensors
        return gh * go.to(gh.dtype), (gw * go).to(ctx.w_dtype), None, None, None


def fused_lm_loss(h, weight, targets, ignore_index=-100, chunk=1024):
    """Eq. 3: mean token cross-entropy of the reasoning head over the valid targets only.
    h [B,T,D], weight [V,D] (the tied LM head), targets [B,T] with ignore_index. Gathers the N valid rows
    first (prompt padding never reaches the head), then runs head + CE in chunks of `chunk` rows."""
    valid = targets != ignore_index
    hv, tv = h[valid], targets[valid]
    if tv.numel() == 0:
        return h.sum() * 0.0 + weight.sum() * 0.0  # zero loss that still has a graph (DDP-safe)
    need = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _FusedLMLoss.apply(hv, weight, tv, chunk, need)
