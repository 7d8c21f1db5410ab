"""GPT-2, OPT, Llama and Qwen2/3 with the two heads of Dual-Head Reasoning Distillation (arXiv 2509.21487): a pooled
classification head on the last token of the input x and the LM head as the reasoning head, trained in ONE forward pass
(Eq. 4). Reads/writes Hugging Face folders with its own safetensors code (no pickle), downloads hub names with urllib,
builds a tiktoken tokenizer from tokenizer.json or vocab.json + merges.txt; matches transformers to 1e-4.
Deps: torch, numpy, tiktoken, stdlib."""
import hashlib, json, math, os, re, shutil, sys, time, unicodedata, urllib.error, urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F

class CheckpointError(ValueError): pass  # a model/tokenizer file that cannot be used; the message names file and problem
class DownloadError(OSError): pass  # offline, HTTP error, size or checksum mismatch; the message names the URL

def _check(ok, where, msg):  # how bad input is reported: a CheckpointError naming the file and what is wrong
    if not ok:
        raise CheckpointError(f"{where}: {msg}")

@dataclass
class GPTConfig:
    model_type: str = "gpt2"          # 'gpt2' | 'opt' | 'llama' (Llama 2/3.x, SmolLM2) | 'qwen2' | 'qwen3'
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
    rope_theta: float = 0.0           # rotary positions with this base; 0 -> learned position table (GPT-2/OPT)
    rope_scaling: dict | None = None  # Llama-3.1/3.2 {'rope_type': 'llama3', 'factor', 'low_freq_factor', ...}
    layer_norm_eps: float = 1e-5
    bias: bool = True                 # biases of o_proj, the MLP and LayerNorm
    qkv_bias: bool = True             # biases of q/k/v_proj (Qwen2: True with bias False)
    qk_norm: bool = False             # Qwen3: RMSNorm over each head of q and k before the rotation
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    num_labels: int = 0               # 0 -> no classification head
    head: str = "linear"              # 'linear' (bias-free, HF `score`) | 'mlp' (paper: 2-layer MLP)
    pooling: str = "last"             # 'last' | 'mean' (over the real tokens of x)
    dropout: float = 0.0

# ---------------------------------------------------------------------------------------------------------------
# The model: one attention, one MLP, one block for every family; switches, not copies. Module names are HF Llama's
# (q_proj ... down_proj, so LoRA targets read the same everywhere); GPT-2 / OPT tensors are renamed on load (_weight_map).

ACT = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
       "gelu": F.gelu, "relu": F.relu, "silu": F.silu}

class RMSNorm(nn.Module):  # Llama/Qwen: x / rms(x) * weight, in fp32 then back to x's dtype (as HF, for parity)
    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        y = x.float()
        return self.weight * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

def _norm(cfg, dim):
    return RMSNorm(dim, cfg.layer_norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(dim, eps=cfg.layer_norm_eps)

def rope(pos, cfg):
    """(cos, sin) [B,T,hd] of rotary embeddings (RoFormer) at positions pos [B,T], in fp32 like HF. Llama-3.1's 'llama3'
    scaling divides the low frequencies by `factor` and blends the middle band (transformers' _compute_llama3_parameters)."""
    hd = cfg.head_dim or cfg.n_embd // cfg.n_head
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=pos.device).float() / hd)
    if (sc := cfg.rope_scaling) and sc.get("rope_type", sc.get("type")) == "llama3":
        old, lo, hi, f = sc["original_max_position_embeddings"], sc["low_freq_factor"], sc["high_freq_factor"], sc["factor"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * scaled / f + smooth * scaled, scaled)
    freqs = pos.float()[..., None] * inv
    emb = torch.cat((freqs, freqs), dim=-1)  # HF's half-split layout: dims i and i + hd/2 form a rotation pair
    return emb.cos(), emb.sin()

def _rotate(x, cos, sin):  # x [B,H,T,hd]; rotate_half as in HF: (x1, x2) -> (-x2, x1), in x's dtype as HF
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None].to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin[:, None].to(x.dtype)

class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()  # grouped-query attention: n_kv_head K/V heads shared by n_head // n_kv_head query heads each
        self.n_head, self.n_kv, self.hd = cfg.n_head, cfg.n_kv_head or cfg.n_head, cfg.head_dim or cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.n_embd, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.n_embd, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.n_embd, bias=cfg.bias)
        self.q_norm, self.k_norm = (RMSNorm(self.hd, cfg.layer_norm_eps), RMSNorm(self.hd, cfg.layer_norm_eps)) if cfg.qk_norm else (None, None)
        self.dropout = cfg.dropout

    def forward(self, x, mask=None, cache=None, start=0, rot=None):
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, -1, self.hd) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm of q and k
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if rot is not None:  # Llama/Qwen: rotary positions, applied before k enters the cache
            q, k = _rotate(q, *rot), _rotate(k, *rot)
        if cache is not None:  # preallocated [B, n_kv, T_max, hd] buffers: written in place, never re-concatenated
            if cache[0] is None:
                cache[:2] = [k.new_empty(B, self.n_kv, cache[2], self.hd) for _ in range(2)]
            cache[0][:, :, start:start + T], cache[1][:, :, start:start + T] = k, v
            k, v = cache[0][:, :, :start + T], cache[1][:, :, :start + T]
        if self.n_kv != self.n_head:  # each K/V head serves n_head // n_kv query heads (HF repeat_kv)
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))
        # softmax(q k^T / sqrt(hd)): GPT-2 divides the scores, OPT scales q after q_proj; same maths as SDPA's default
        # scale. No mask -> is_causal, which keeps SDPA on its flash / memory-efficient kernels.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        n = cfg.n_inner or 4 * cfg.n_embd
        self.up_proj, self.down_proj, self.act = nn.Linear(cfg.n_embd, n, bias=cfg.bias), nn.Linear(n, cfg.n_embd, bias=cfg.bias), ACT[cfg.activation]
        self.gate_proj = nn.Linear(cfg.n_embd, n, bias=cfg.bias) if cfg.glu else None

    def forward(self, x):  # GPT-2/OPT: down(act(up x)); Llama/Qwen SwiGLU: down(silu(gate x) * up x)
        return self.down_proj(self.act(self.up_proj(x)) if self.gate_proj is None else self.act(self.gate_proj(x)) * self.up_proj(x))

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.attn = _norm(cfg, cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = _norm(cfg, cfg.n_embd), MLP(cfg)
        self.pre_ln, self.drop = cfg.pre_ln, nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, cache=None, start=0, rot=None):
        if self.pre_ln:  # GPT-2, Llama/Qwen and most OPT sizes
            x = x + self.drop(self.attn(self.ln_1(x), mask, cache, start, rot))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x, mask, cache, start, rot)))  # opt-350m: post-LN (original Transformer)
        return self.ln_2(x + self.drop(self.mlp(x)))

class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        cfg = self.config = config
        _check(cfg.model_type in ARCH and cfg.head in ("linear", "mlp") and cfg.pooling in ("last", "mean"), "GPTConfig",
               f"model_type {cfg.model_type!r}, head {cfg.head!r}, pooling {cfg.pooling!r} must be {'|'.join(ARCH)}, linear|mlp, last|mean")
        D = cfg.word_embed_proj_dim or cfg.n_embd  # OPT-350m embeds tokens in 512 dims, its blocks run in 1024
        self.pos_offset = 2 if cfg.model_type == "opt" else 0  # OPT's position table starts at row 2 (fairseq)
        self.wte = nn.Embedding(cfg.vocab_size, D)
        self.wpe = None if cfg.rope_theta else nn.Embedding(cfg.block_size + self.pos_offset, cfg.n_embd)  # RoPE: no table
        self.project_in = nn.Linear(D, cfg.n_embd, bias=False) if D != cfg.n_embd else None
        self.drop, self.h = nn.Dropout(cfg.dropout), nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = _norm(cfg, cfg.n_embd) if cfg.pre_ln else None  # post-LN has none
        self.project_out = nn.Linear(cfg.n_embd, D, bias=False) if D != cfg.n_embd else None
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)  # the reasoning head (paper §3)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.wte.weight
        # the pooled head (paper §3, Eq. 2): HF's bias-free `score`, or the paper's 2-layer MLP
        self.score = (None if not cfg.num_labels else nn.Linear(D, cfg.num_labels, bias=False) if cfg.head == "linear"
                      else nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, cfg.num_labels)))
        self.lm_loss = fused_lm_loss  # Eq. 3; reference_lm_loss computes the same, plainly
        self.apply(self._init_weights)
        for name, p in self.h.named_parameters():  # GPT-2 paper §2.3: residual projections scaled by 1/sqrt(2 L)
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
            return pos, None  # right padding: causal attention already hides the pads from every real position
        m = am[:, None, None, :] & torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        return pos, m | torch.eye(T, dtype=torch.bool, device=dev)  # a pad row must attend somewhere (no NaN)

    def _blocks(self, idx, pos, mask, caches=None, start=0):  # embeddings + blocks; KV caches in generate only
        x = self.wte(idx) if self.project_in is None else self.project_in(self.wte(idx))
        rot = rope(pos, self.config) if self.wpe is None else None  # Llama/Qwen rotate q, k; GPT-2/OPT add a position row
        x = self.drop(x if self.wpe is None else x + self.wpe(pos + self.pos_offset))
        for block, cache in zip(self.h, caches or [None] * len(self.h)):
            x = block(x, mask, cache, start, rot)
        return x

    def _final(self, x):
        x = x if self.ln_f is None else self.ln_f(x)
        return x if self.project_out is None else self.project_out(x)

    def hidden_states(self, idx, attention_mask=None):
        """[B,T,D]: HF's last_hidden_state (after the final LN and OPT's project_out)."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of length {idx.shape[1]} is longer than block_size {self.config.block_size}")
        pos, mask = self._mask(attention_mask, idx.shape[1])
        return self._final(self._blocks(idx, pos, mask))

    def lm_logits(self, idx, attention_mask=None):
        return self.lm_head(self.hidden_states(idx, attention_mask)).float()

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
            raise ValueError("this model has no classification head: pass num_labels=K to from_pretrained/GPTConfig")
        return self.forward(idx, attention_mask)[0]

    def forward(self, idx, attention_mask=None, x_len=None, lm_targets=None, kl_ref=None):
        """THE training forward: one pass over s = [x, rationale, answer] feeds both losses of Eq. 4 (and keeps DDP's
        hooks simple). Causal attention makes h at x's last token independent of what follows: pooling there = x alone (§3)."""
        h = self.hidden_states(idx, attention_mask)
        cls_logits = loss_lm = None
        if self.score is not None:
            if x_len is None:  # x alone: the real length of each right-padded row
                x_len = (torch.ones_like(idx) if attention_mask is None else attention_mask).long().sum(1)
            cls_logits = self.score(self.pool(h, x_len))
        if lm_targets is not None:
            loss_lm = self.lm_loss(h, self.lm_head.weight, lm_targets)
        if kl_ref is not None:  # dhrd's --kl_coef: (the frozen reference's hidden states at the valid targets, its LM head)
            return cls_logits, loss_lm, kl_to_ref(h[lm_targets != -100], self.lm_head.weight, *kl_ref)
        return cls_logits, loss_lm

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, eos_token_id=None, attention_mask=None,
                 generator=None):
        """Left-padded prompts [B,T] -> [B, T+new] with a KV cache; temperature 0 = greedy (same tokens as HF).
        Rows past eos_token_id are filled with pad (or eos) like HF; stops early once every row is done."""
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt {T} + {max_new_tokens} new tokens exceeds block_size {self.config.block_size}")
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: SDPA's causal fast path
        pos, mask = self._mask(attention_mask, T, causal_ok=False)
        # which cache slots hold real tokens (the slots of tokens still to come count as real)
        keys = None if attention_mask is None else F.pad(attention_mask.to(idx.device).bool(), (0, max_new_tokens), value=True)
        out, caches = F.pad(idx, (0, max_new_tokens)), [[None, None, T + max_new_tokens] for _ in self.h]
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else eos_token_id
        done, x, n = torch.zeros(B, dtype=torch.bool, device=idx.device), idx, T
        for _ in range(max_new_tokens):
            h = self._blocks(x, pos, mask, caches, n - x.shape[1])
            logits = self.lm_head(self._final(h[:, -1])).float()  # the LM head on the last position only
            tok = _sample(logits, temperature, top_p, generator)
            if eos_token_id is not None:
                tok = torch.where(done, pad, tok)
                done |= tok == eos_token_id
            out[:, n], n = tok, n + 1
            if eos_token_id is not None and bool(done.all()):
                break
            x, pos = tok[:, None], pos[:, -1:] + 1
            mask = None if keys is None else keys[:, None, None, :n]
        return out[:, :n]

    @classmethod
    def from_pretrained(cls, path_or_name, num_labels=None, **overrides):
        """HF folder or hub name -> GPT. A checkpoint `score` head is loaded and sets num_labels; num_labels=K
        without one adds a fresh head. overrides: GPTConfig fields (dropout, head, pooling, ...)."""
        folder = resolve_model_dir(path_or_name)
        cfg, (tensors, file) = _config_from_hf(folder / "config.json"), _read_checkpoint(folder)
        ck = next((k for k in ("score.weight", "score.2.weight") if k in tensors), None)
        if ck:
            cfg.head, cfg.num_labels = "mlp" if "2" in ck else "linear", tensors[ck].shape[0]
            _check(num_labels in (None, cfg.num_labels), file, f"the checkpoint's classification head has {cfg.num_labels} "
                   f"labels, not num_labels={num_labels}; drop num_labels or use a checkpoint without `score`")
        cfg.num_labels = cfg.num_labels or num_labels or 0
        cfg = replace(cfg, **overrides)  # unknown fields -> TypeError
        with torch.device("meta"):  # no time spent initialising weights that are overwritten anyway
            model = cls(cfg)
        wmap, ours, sd, unexpected = _weight_map(model), dict(model.named_parameters()), {}, []  # a tied lm_head is not listed
        for key, t in tensors.items():
            k = key.removeprefix(HF_NAMES[cfg.model_type][0])  # hub gpt2 / OPT files may lack the prefix
            if k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")) or k == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # GPT-2's causal-mask buffers, old Llama files' RoPE buffer; a tied head is the embedding
            if k not in wmap:
                unexpected.append(key)
                continue
            names, transpose = wmap[k]
            t = t.float().t() if transpose and t.dim() == 2 else t.float()
            for name, part in zip(names, t.chunk(len(names))):  # GPT-2's fused c_attn -> our q, k, v
                _check(part.shape == ours[name].shape, file, f"tensor {key} has shape {list(t.shape)}, config.json implies "
                       f"{list(ours[name].shape)}" + (f" for each of its {len(names)} parts" if len(names) > 1 else ""))
                sd[name] = part
        missing = [n for n in ours if n not in sd and not n.startswith("score")]
        _check(not (unexpected or missing), file, f"tensors do not match a {cfg.model_type} model with this config.json: "
               f"missing {missing[:5]} ({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)")
        model.load_state_dict({n: t.contiguous() for n, t in sd.items()}, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.wte.weight
        if model.score is not None and not any(k.startswith("score") for k in sd):  # a fresh head
            model.score.to_empty(device="cpu").apply(model._init_weights)
        model.source_dir = folder  # save_pretrained copies the tokenizer files from here
        return model

    def save_pretrained(self, path, labels=None):
        """HF layout (config.json + model.safetensors + the source folder's tokenizer files) that transformers'
        AutoModelForCausalLM and, for a linear head, AutoModelForSequenceClassification load unchanged."""
        (path := Path(path)).mkdir(parents=True, exist_ok=True)
        sd = merged_state_dict(self)  # LoRA folded into the base weights: a plain HF checkpoint
        write_safetensors(path / "model.safetensors", {
            (hf if hf.startswith(("lm_head", "score")) else HF_NAMES[self.config.model_type][0] + hf):
            (lambda t: t.t() if transpose and t.dim() == 2 else t)(torch.cat([sd[n] for n in names])).contiguous()
            for hf, (names, transpose) in _weight_map(self).items()})
        (path / "config.json.tmp").write_text(json.dumps(_config_to_hf(self.config, labels, self.wte.weight.dtype), indent=2))
        os.replace(path / "config.json.tmp", path / "config.json")
        src = Path(getattr(self, "source_dir", path))
        for f in TOKENIZER_FILES:
            if (src / f).is_file() and src.resolve() != path.resolve():
                shutil.copyfile(src / f, path / f)

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        # decay the matrices (matmuls, embeddings) only; biases and LayerNorm gains stay undecayed (nanoGPT)
        # LoRA: only lora_A/B and `score` require grad; A, B are matrices and decay (as HF Trainer's grouping would):
        # decay pulls B A towards 0, i.e. towards the base model
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        # fused AdamW, on CPU too (torch >= 2.4): GPT-2-124M optimizer step 2138 ms (foreach) -> 76 ms on the 2-core EPYC dev VM,
        # the largest single cost of a CPU training step before (measured by H5 with bench.py)
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type in ("cuda", "cpu"))

    def flops_per_token(self, T):
        """6N + 12 L H Q T (PaLM appendix B, nanoGPT's estimate_mfu); N without position embeddings."""
        c = self.config
        N = sum(p.numel() for p in self.parameters()) - (0 if self.wpe is None else self.wpe.weight.numel())
        return 6 * N + 12 * c.n_layer * c.n_head * (c.head_dim or c.n_embd // c.n_head) * T

def native_dtype(device):
    """(dtype name, reason): the fastest dtype `device` computes natively; what dtype=auto means everywhere.
    CPU: bfloat16 only with native bf16 matrix instructions (AVX-512-BF16 or AMX) that oneDNN is allowed to use,
    else float32. 1024x1024 matmul, 2-core Xeon (AMX), torch 2.13: bf16 1131 vs fp32 255 GFLOP/s; the same
    machine with oneDNN/MKL capped to AVX2 (as an AVX2-only CPU): bf16 0.70 (emulated) vs fp32 108 GFLOP/s.
    cpuinfo's flags alone are not enough: ONEDNN_MAX_CPU_ISA can forbid the instructions; oneDNN's check sees it.
    CUDA: bfloat16 where the card has it (Ampere+), else float16, trained with a gradient scaler."""
    if str(device).startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "native bf16"
        return "float16", "no bf16 on this GPU; fp16 with a gradient scaler"
    has_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if has_bf16 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "bfloat16", "native bf16: AVX-512-BF16/AMX"
    return "float32", "no native bf16"

def _sample(logits, temperature, top_p, generator):
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest prefix of sorted tokens whose mass reaches top_p
        # Sort only the top 64: if they already hold more than top_p, no later token can be in the nucleus
        # (exact); else sort all V. Saves a full sort of V=50257 per row: 30.7 -> 0.7 ms per step at batch 8.
        sp, si = probs.topk(min(64, probs.shape[-1]), -1)
        if not bool((sp.sum(-1) > top_p).all()):
            sp, si = probs.sort(-1, descending=True)
        sp[(sp.cumsum(-1) - sp) > top_p] = 0.0
        return si.gather(-1, torch.multinomial(sp, 1, generator=generator))[:, 0]
    return torch.multinomial(probs, 1, generator=generator)[:, 0]

class _FusedLMLoss(torch.autograd.Function):
    """Head + CE without the [N, V] logits, in [rows, chunk] pieces. Pass 1: each row's logsumexp; pass 2
    (training) recomputes a slice's logits and writes its gradients, a weight-gradient slice in one matmul per
    block (no [V, D] temporaries). bench.py, V=50257, 1024 rows, bf16, fwd+bwd: peak 724 MB (one-pass row
    chunks) -> 183 MB (naive full logits: 673 MB); the 4th head matmul costs nothing measurable here
    (1144 -> 1106 ms, 2-core EPYC VM). Only the gradients autograd needs are made: with a frozen head (LoRA)
    neither the [V, D] fp32 weight-gradient buffer nor its matmul exists. h [256, 576], V=49152 (SmolLM2's
    head), head frozen, fwd+bwd, the two versions alternated in one process, 2-core Xeon, torch 2.13: fp32
    1249 -> 869 ms, bf16 1043 -> 844 ms (min of 12); peak memory beyond the inputs 128 -> 17 MB."""

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

# ---------------------------------------------------------------------------------------------------------------
# LoRA (Hu et al. 2021), as the paper trains its backbones (App. E.4: r=16, alpha=32, dropout 0.1 on q/k/v/o/gate/up/down;
# only the adapters and the pooled head train). y = base(x) + B A drop(x) * alpha/r with B = 0 at the start, so a fresh
# adapter is the base model exactly. save_pretrained merges (W + alpha/r B A): the export is a plain HF folder.

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha, dropout):
        super().__init__()
        self.base, self.scale, self.drop, self.enabled = base, alpha / rank, nn.Dropout(dropout), True
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default (nn.Linear's own init)
        self.train(base.training)  # added to a model in eval mode: no adapter dropout either

    def forward(self, x):  # dropout on the adapter's input only (PEFT); the frozen base path sees x unchanged
        y = self.base(x)
        return y + F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B) * self.scale if self.enabled else y

def add_lora(model, rank=16, alpha=32.0, dropout=0.1, targets=LORA_TARGETS):
    """Freeze every weight, wrap the targeted projections of every block, keep `score` trainable (PEFT's modules_to_save
    for sequence classification). A known target this family lacks (gate_proj in GPT-2/OPT) is skipped."""
    targets = [t.strip() for t in targets.split(",")] if isinstance(targets, str) else list(targets)
    if bad := [t for t in targets if t not in LORA_TARGETS]:
        raise ValueError(f"unknown LoRA target(s) {bad}; valid: {','.join(LORA_TARGETS)}")
    if rank < 1 or getattr(model, "lora", None):
        raise ValueError(f"LoRA rank must be >= 1 (got {rank}), and adapters are added once per model")
    model.requires_grad_(False)
    pairs = [(m, t) for b in model.h for m in (b.attn, b.mlp) for t in targets
             if isinstance(getattr(m, t, None), nn.Linear)]
    if not pairs:
        raise ValueError(f"LoRA targets {targets}: none exists in this {model.config.model_type} model")
    for m, t in pairs:
        setattr(m, t, LoRALinear(getattr(m, t), rank, alpha, dropout))
    model.score.requires_grad_(True) if model.score is not None else None
    model.lora = dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets)
    return model

@contextmanager
def lora_disabled(model):  # the frozen base network, without a second copy of its weights (dhrd's --kl_coef reference)
    mods = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m in mods:
            m.enabled = True

def merged_state_dict(model):  # state_dict with every adapter folded in (W + scale B A, in fp32); the model is untouched
    sd, mods = model.state_dict(), {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    sd = {k: v for k, v in sd.items() if ".lora_" not in k}
    for n, m in mods.items():
        w = sd.pop(f"{n}.base.weight")
        sd[f"{n}.weight"] = (w.float() + m.scale * (m.lora_B.detach().float() @ m.lora_A.detach().float())).to(w.dtype)
        if f"{n}.base.bias" in sd:
            sd[f"{n}.bias"] = sd.pop(f"{n}.base.bias")
    return sd

def save_lora(model, path):
    """Adapter-only checkpoint: path/adapter.safetensors (every lora_A [r,in] / lora_B [out,r] and the `score` head, by
    our module names) + path/adapter.json (rank, alpha, dropout, targets, base_model). load_lora is its exact inverse."""
    _check(getattr(model, "lora", None), "save_lora", "the model has no LoRA adapters; call add_lora first")
    (path := Path(path)).mkdir(parents=True, exist_ok=True)
    write_safetensors(path / "adapter.safetensors", {k: v for k, v in model.state_dict().items() if ".lora_" in k or
                                                     k.startswith("score")})
    src = str(Path(model.source_dir).resolve()) if hasattr(model, "source_dir") else ""  # none on a dhrd resume
    (path / "adapter.json").write_text(json.dumps({**model.lora, "base_model": src, "num_labels": model.config.num_labels,
                                                   "head": model.config.head}, indent=1))

def load_lora(model, path):
    """On GPT.from_pretrained(base_model, num_labels=K): add the saved adapters and head, checked name by name and shape
    by shape (a different base gives a CheckpointError naming the tensor)."""
    file = Path(path) / "adapter.safetensors"
    try:
        c = json.loads((Path(path) / "adapter.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{Path(path) / 'adapter.json'}: cannot read the adapter config ({e})") from None
    tensors, hint = read_safetensors(file), f"saved on base {c.get('base_model') or '?'} with num_labels={c.get('num_labels')}"
    add_lora(model, c["rank"], c["alpha"], c["dropout"], c["targets"])
    ours = {k: v for k, v in model.state_dict().items() if ".lora_" in k or k.startswith("score")}
    _check(ours.keys() == tensors.keys(), file, f"tensors do not match this model ({hint}): missing "
           f"{sorted(ours.keys() - tensors.keys())[:4]}, unexpected {sorted(tensors.keys() - ours.keys())[:4]}")
    for k, t in tensors.items():
        _check(t.shape == ours[k].shape, file, f"tensor {k} has shape {list(t.shape)}, this model's is {list(ours[k].shape)}; "
               f"the adapter was {hint}: load that base")
    model.load_state_dict(tensors, strict=False)
    return model

def kl_to_ref(h, w, h_ref, w_ref, rows=256):
    """Mean over rows of KL(p || p_ref) (dhrd's --kl_coef): p = softmax(h w^T), the model's next-token distribution at
    the valid LM targets, p_ref the frozen reference's (h_ref, w_ref without grad). Row chunks under activation
    checkpointing: at most [rows, V] logits exist at a time, forward and backward, never [N, V]."""
    def part(a, b):
        lp, lq = F.log_softmax((a @ w.t()).float(), -1), F.log_softmax((b @ w_ref.t()).float(), -1)
        return (lp.exp() * (lp - lq)).sum()
    if len(h) == 0:
        return h.sum() * 0.0
    return sum(torch.utils.checkpoint.checkpoint(part, h[i:i + rows], h_ref[i:i + rows], use_reentrant=False)
               for i in range(0, len(h), rows)) / len(h)

# ---------------------------------------------------------------------------------------------------------------
# safetensors, read and written here (no pickle): 8-byte little-endian header length, a JSON header {name: {dtype,
# shape, data_offsets: [begin, end]}} (offsets into the data after the header), then the raw little-endian bytes.

ST_DTYPES = {"F64": (np.float64, torch.float64), "F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
             "BF16": (np.int16, torch.bfloat16), "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32), "I16": (np.int16,
             torch.int16), "I8": (np.int8, torch.int8), "U8": (np.uint8, torch.uint8), "BOOL": (np.bool_, torch.bool)}  # bf16: as int16
ST_NAMES = {t: n for n, (_, t) in ST_DTYPES.items()}

def read_safetensors(path):
    """-> {name: tensor} (owned copies). Every header field is checked against the file size before anything is
    read or allocated, so a truncated or hostile file raises CheckpointError, never a crash or a huge allocation."""
    size = (path := Path(path)).stat().st_size
    _check(size >= 8, path, f"{size} bytes is too short for a safetensors file (truncated download?)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        _check(n <= min(size - 8, 100_000_000), path, f"header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not a JSON object ({e})") from None
    header.pop("__metadata__", None)
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (b, e) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
            assert min(shape, default=0) >= 0 and isinstance(b, int) and isinstance(e, int)
        except (TypeError, KeyError, ValueError, AssertionError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        _check(dtype in ST_DTYPES, path, f"tensor {name!r} has unsupported dtype {dtype!r} (supported: {', '.join(ST_DTYPES)})")
        _check(0 <= b <= e <= size - 8 - n, path, f"tensor {name!r} data_offsets [{b}, {e}] fall outside the data (truncated?)")
        _check(math.prod(shape) * np.dtype(ST_DTYPES[dtype][0]).itemsize == e - b, path,
               f"tensor {name!r} of shape {shape} and dtype {dtype} does not fit its {e - b} bytes")
        spans.append((b, e, name, dtype, shape))
    end = 0
    for b, e, name, *_ in sorted(spans):
        _check(b >= end or b == e, path, f"tensor {name!r} overlaps an earlier tensor (byte {b})")
        end = max(end, e)
    return {name: torch.from_numpy(  # np.fromfile reads straight into an owned array: one copy in memory, no mmap to pin
        np.fromfile(path, dtype=ST_DTYPES[dtype][0], count=math.prod(shape), offset=8 + n + b).reshape(shape)).view(ST_DTYPES[dtype][1])
        for b, e, name, dtype, shape in spans}

def write_safetensors(path, tensors):
    """{name: tensor} -> path, atomically (temporary file + rename); header padded to 8 bytes like the reference."""
    header, off, ts = {}, 0, {k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)}
    for name, t in ts.items():
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + t.nbytes]}
        off += t.nbytes
    h = json.dumps({**header, "__metadata__": {"format": "pt"}}, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(f"{path}.tmp", "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for t in ts.values():
            f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    os.replace(f"{path}.tmp", path)

def _shards(index):
    try:
        wmap = json.loads(index.read_text())["weight_map"]
        shards = sorted(set(wmap.values()))
        assert all(isinstance(s, str) and Path(s).name == s for s in shards)
        return wmap, shards
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index (needs a weight_map of plain file names): {e!r}") from None

def _read_checkpoint(folder):
    """model.safetensors, or model.safetensors.index.json + its shards -> ({name: tensor}, file name for errors)."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return read_safetensors(single), str(single)
    if not index.is_file():
        bins = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        _check(False, folder, f"no model.safetensors or model.safetensors.index.json (found {bins or 'neither'}; pickle is never loaded)")
    (wmap, shards), tensors = _shards(index), {}
    for s in shards:
        _check((folder / s).is_file(), index, f"shard {s} is missing from {folder}")
        tensors.update(read_safetensors(folder / s))
    _check(set(wmap) <= set(tensors), index, f"tensors in weight_map but in no shard: {sorted(set(wmap) - set(tensors))[:5]}")
    return tensors, str(index)

# ---------------------------------------------------------------------------------------------------------------
# HF config.json <-> GPTConfig: our field -> (config.json name, transformers' default), per model_type.

HF_KEYS = {
    "gpt2": dict(vocab_size=("vocab_size", 50257), block_size=("n_positions", 1024), n_layer=("n_layer", 12), n_head=("n_head", 12),
                 n_embd=("n_embd", 768), n_inner=("n_inner", None), activation=("activation_function", "gelu_new"),
                 layer_norm_eps=("layer_norm_epsilon", 1e-5), tie_word_embeddings=("tie_word_embeddings", True),
                 bos_token_id=("bos_token_id", 50256), eos_token_id=("eos_token_id", 50256), pad_token_id=("pad_token_id", None)),
    "opt": dict(vocab_size=("vocab_size", 50272), block_size=("max_position_embeddings", 2048), n_layer=("num_hidden_layers", 12),
                n_head=("num_attention_heads", 12), n_embd=("hidden_size", 768), n_inner=("ffn_dim", 3072),
                word_embed_proj_dim=("word_embed_proj_dim", None), pre_ln=("do_layer_norm_before", True),
                activation=("activation_function", "relu"), bias=("enable_bias", True), tie_word_embeddings=("tie_word_embeddings", True),
                bos_token_id=("bos_token_id", 2), eos_token_id=("eos_token_id", 2), pad_token_id=("pad_token_id", 1))}
_LLAMA = dict(vocab_size=("vocab_size", 32000), block_size=("max_position_embeddings", 2048), n_layer=("num_hidden_layers", 32),
              n_head=("num_attention_heads", 32), n_kv_head=("num_key_value_heads", None), n_embd=("hidden_size", 4096),
              head_dim=("head_dim", None), n_inner=("intermediate_size", 11008), activation=("hidden_act", "silu"),
              layer_norm_eps=("rms_norm_eps", 1e-6), tie_word_embeddings=("tie_word_embeddings", False),
              bos_token_id=("bos_token_id", 1), eos_token_id=("eos_token_id", 2), pad_token_id=("pad_token_id", None))
_QWEN = {**_LLAMA, "vocab_size": ("vocab_size", 151936), "block_size": ("max_position_embeddings", 32768),
         "n_inner": ("intermediate_size", 22016), "bos_token_id": ("bos_token_id", None), "eos_token_id": ("eos_token_id", None)}
HF_KEYS.update(llama=_LLAMA, qwen2=_QWEN, qwen3={**_QWEN, "head_dim": ("head_dim", 128)})
ARCH = {"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"), "opt": ("OPTForCausalLM", "OPTForSequenceClassification"),
        "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"), "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
        "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification")}
ROPE = ("llama", "qwen2", "qwen3")  # RMSNorm, rotary positions, SwiGLU, grouped-query attention

def _config_from_hf(file):
    try:
        d = json.loads(Path(file).read_text())
        assert isinstance(d, dict) and isinstance(d.get("dhrd", {}), dict)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; a model folder needs config.json (HF layout)") from None
    except (ValueError, AssertionError) as e:
        raise CheckpointError(f"{file}: not a JSON object ({e})") from None
    _check((mt := d.get("model_type")) in ARCH, file, f"model_type {mt!r} is not supported (supported: {', '.join(ARCH)})")
    ours = d.get("dhrd", {})  # the head settings HF has no field for
    cfg = GPTConfig(mt, head=ours.get("head", "linear"), pooling=ours.get("pooling", "last"),
                    **{k: d.get(*v) for k, v in HF_KEYS[mt].items()})
    cfg.n_inner, cfg.n_kv_head, cfg.head_dim = cfg.n_inner or 0, cfg.n_kv_head or 0, cfg.head_dim or 0
    cfg.word_embed_proj_dim = 0 if cfg.word_embed_proj_dim in (None, cfg.n_embd) else cfg.word_embed_proj_dim
    if isinstance(cfg.eos_token_id, list):  # Llama-3 lists several end tokens; the first is its <|end_of_text|>
        cfg.eos_token_id = cfg.eos_token_id[0]
    if mt in ROPE:
        rp = d.get("rope_parameters") or {}  # transformers >= 5 writes rope_theta / the scaling here, older files at top level
        sc = d.get("rope_scaling") or (rp if rp.get("rope_type", "default") != "default" else None)
        _check(not sc or sc.get("rope_type", sc.get("type")) in ("default", "llama3"), file, f"rope_scaling {sc} is not "
               "supported (only 'default' and Llama-3.1's 'llama3')")
        _check(not (d.get("attention_bias") or d.get("mlp_bias") or d.get("use_sliding_window")), file, "attention_bias, "
               "mlp_bias and use_sliding_window must be false or absent (no released Llama/Qwen2/Qwen3 sets them)")
        cfg = replace(cfg, norm="rmsnorm", glu=True, bias=False, qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3",
                      rope_theta=float(d.get("rope_theta") or rp.get("rope_theta") or 10000.0), rope_scaling=sc and dict(sc))
    sizes = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "n_inner", "word_embed_proj_dim", "n_kv_head", "head_dim")
    bad = [HF_KEYS[mt].get(k, (k,))[0] for k in sizes if not isinstance(getattr(cfg, k), int) or getattr(cfg, k) < (k in sizes[:5])]
    heads_ok = not bad and (cfg.head_dim or cfg.n_embd % cfg.n_head == 0) and cfg.n_head % (cfg.n_kv_head or cfg.n_head) == 0
    _check(heads_ok and cfg.activation in list(ACT), file, f"invalid field(s) {bad or 'heads'} or activation: sizes must be "
           f"positive ints, hidden size divisible by heads, heads by key_value heads, activation in {list(ACT)}")
    return cfg

def _config_to_hf(c, labels, dtype):
    opt = c.model_type == "opt"
    d = {name: getattr(c, k) for k, (name, _) in HF_KEYS[c.model_type].items()}
    if c.model_type in ROPE:
        d.update(num_key_value_heads=c.n_kv_head or c.n_head, head_dim=c.head_dim or c.n_embd // c.n_head,
                 intermediate_size=c.n_inner or 4 * c.n_embd, rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
                 attention_dropout=c.dropout, **({} if c.model_type == "qwen2" else {"attention_bias": False}))
    elif opt:
        d.update(ffn_dim=c.n_inner or 4 * c.n_embd, word_embed_proj_dim=c.word_embed_proj_dim or c.n_embd, dropout=c.dropout,
                 attention_dropout=c.dropout)
    else:
        d.update(n_inner=c.n_inner or None, resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout)
    d.update(model_type=c.model_type, architectures=[ARCH[c.model_type][bool(c.num_labels and c.head == "linear")]],
             dhrd={"head": c.head, "pooling": c.pooling})
    if c.num_labels:
        names = list(labels) if labels else [f"LABEL_{i}" for i in range(c.num_labels)]
        d.update(num_labels=c.num_labels, id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    return d | {"torch_dtype": str(dtype).removeprefix("torch.")}

# HF tensor names -> ours, per family: (prefix, top-level pairs, block prefix, per-block pairs). Several names of ours:
# the HF tensor is split in equal parts (GPT-2's fused c_attn -> q, k, v).
_LLAMA_NAMES = ("model.", [("embed_tokens", "wte"), ("norm", "ln_f")], "layers.{}.", [("input_layernorm", "ln_1"),
    ("post_attention_layernorm", "ln_2"), *[(f"self_attn.{n}", f"attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm",
    "k_norm")], *[(f"mlp.{n}", f"mlp.{n}") for n in ("gate_proj", "up_proj", "down_proj")]])
HF_NAMES = {
    "gpt2": ("transformer.", [("wte", "wte"), ("wpe", "wpe"), ("ln_f", "ln_f")], "h.{}.", [("ln_1", "ln_1"), ("ln_2", "ln_2"),
             ("attn.c_attn", "attn.q_proj attn.k_proj attn.v_proj"), ("attn.c_proj", "attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"),
             ("mlp.c_proj", "mlp.down_proj")]),
    "opt": ("model.", [("decoder.embed_tokens", "wte"), ("decoder.embed_positions", "wpe"), ("decoder.project_in", "project_in"),
            ("decoder.project_out", "project_out"), ("decoder.final_layer_norm", "ln_f")], "decoder.layers.{}.",
            [("self_attn.q_proj", "attn.q_proj"), ("self_attn.k_proj", "attn.k_proj"), ("self_attn.v_proj", "attn.v_proj"),
             ("self_attn.out_proj", "attn.o_proj"), ("self_attn_layer_norm", "ln_1"), ("fc1", "mlp.up_proj"), ("fc2", "mlp.down_proj"),
             ("final_layer_norm", "ln_2")]),
    "llama": _LLAMA_NAMES, "qwen2": _LLAMA_NAMES, "qwen3": _LLAMA_NAMES}

def _weight_map(model):
    """HF name (without the `transformer.` / `model.` prefix) -> (our names, transpose); transpose: GPT-2's Conv1D
    stores its matrices as [in, out]."""
    c, ours = model.config, {n.replace(".base.", "."): p for n, p in model.named_parameters(remove_duplicate=False)}  # LoRA
    _, top, blk, pairs = HF_NAMES[c.model_type]
    m = {n: ((n,), False) for n in ours if n.startswith("score") or n == "lm_head.weight" and not c.tie_word_embeddings}
    for w in ("weight", "bias"):
        m.update({f"{a}.{w}": (tuple(f"{n}.{w}" for n in b.split()), False) for a, b in top})
        for i in range(c.n_layer):
            m.update({f"{blk.format(i)}{a}.{w}": (tuple(f"h.{i}.{n}.{w}" for n in b.split()), c.model_type == "gpt2") for a, b in pairs})
    return {k: v for k, v in m.items() if all(n in ours for n in v[0])}  # drops project_in / ln_f / biases this config lacks

# ---------------------------------------------------------------------------------------------------------------
# Tokenizer: GPT-2's byte-level BPE (Radford et al. 2019) as a tiktoken Encoding built from tokenizer.json (HF's
# format: Llama-3, Qwen2/3, SmolLM2) or else vocab.json + merges.txt (GPT-2, OPT). tiktoken merges the adjacent pair
# whose concatenation has the lowest rank, HF the pair listed first in merges: giving merge i the rank 256 + i makes
# the two agree. Ranks then map to vocab ids: the identity for GPT-2, a permutation for OPT (fairseq's dictionary
# order, with <s> <pad> </s> <unk> at 0..3). tiktoken takes one regex, so _pretokenizer folds HF's steps into one.

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

def bytes_to_unicode():  # GPT-2's reversible byte -> printable character map (openai/gpt-2 encoder.py)
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return dict(zip(bs + [b for b in range(256) if b not in bs], map(chr, bs + [256 + i for i in range(256 - len(bs))])))

def _pretokenizer(pre, where):
    """tokenizer.json's pre_tokenizer -> one regex; only the byte-level forms whose splitting it reproduces exactly."""
    steps = pre.get("pretokenizers") or [] if (pre or {}).get("type") == "Sequence" else [pre or {}]
    kinds, last = [s.get("type") for s in steps], steps[-1] if steps else {}
    regex = last.get("use_regex", True)
    _check(kinds[-1:] == ["ByteLevel"] and not last.get("add_prefix_space"), where, f"pre_tokenizer {kinds} is not "
           "supported: it must end with ByteLevel(add_prefix_space=false)")
    if kinds == ["ByteLevel"] and regex:
        return GPT2_PAT
    if kinds == ["Split", "ByteLevel"] and not regex:  # Llama-3, Qwen2: one regex; unmatched text is a piece too
        _check((s := steps[0]).get("behavior") == "Isolated" and not s.get("invert") and (r := s["pattern"].get("Regex")),
               where, f"pre_tokenizer Split {s['pattern']} {s.get('behavior')} invert={s.get('invert')} is not supported")
        return f"{r}|(?:(?!(?:{r}))[\\s\\S])+"
    # SmolLM2: Digits makes every \p{N} (Rust's char::is_numeric) its own piece BEFORE the GPT-2 regex runs, so
    # whitespace before a digit ends a piece: "a  1" -> "a", "  ", "1" (GPT2_PAT alone: "a", " ", " ", "1").
    _check(kinds == ["Digits", "ByteLevel"] and regex, where, f"pre_tokenizer {kinds} is not supported")
    return ((r"\p{N}|" if steps[0].get("individual_digits") else r"\p{N}+|") +
            GPT2_PAT.replace(r"| ?\p{N}+", "").replace(r"\s+(?!\S)", r"\s+(?:(?!\S)|(?=\p{N}))"))

class Tokenizer:
    """.encode(str) -> ids, equal to HF's tokenizer with add_special_tokens=False; .decode(ids) -> str; .bos_id (the
    id HF prepends: </s> for OPT, <|begin_of_text|> for Llama-3, None for GPT-2/Qwen/SmolLM2), .eos_id, .pad_id,
    .vocab_size, .name."""

    def __init__(self, folder, name=None):
        folder, self.name, meta = Path(folder), str(name or folder), {}
        tj = folder / "tokenizer.json"  # HF's format wins: only it has the pre-tokenizer (SmolLM2: Digits), normalizer
        try:
            for f in ("special_tokens_map.json", "tokenizer_config.json", "config.json"):  # earlier files win
                meta = {**(json.loads((folder / f).read_text(encoding="utf-8")) if (folder / f).is_file() else {}), **meta}
            if tj.is_file():
                t = json.loads(tj.read_text(encoding="utf-8"))
                m, vfile, mfile = t.get("model") or {}, f"{tj} model.vocab", f"{tj} model.merges"
                bad = {k: m.get(k) for k in ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix")}
                _check(m.get("type") == "BPE" and not any(bad.values()), tj, f"model {m.get('type')} {bad}: only byte-level"
                       " BPE is supported")
                _check(t.get("normalizer") in (None, {"type": "NFC"}), tj, f"normalizer {t.get('normalizer')} is not"
                       " supported (only NFC, Qwen2's)")
                vocab, pat, self._nfc = m.get("vocab", {}), _pretokenizer(t.get("pre_tokenizer"), tj), t.get("normalizer")
                merges = [x if isinstance(x, str) else " ".join(x) for x in m.get("merges", [])]  # "a b" or [a, b]
                added = {a["content"]: a["id"] for a in t.get("added_tokens", [])}  # all split from text, as HF does
                _check(not any(a.get(k) for a in t.get("added_tokens", []) for k in ("lstrip", "rstrip", "single_word")),
                       tj, "added_tokens with lstrip/rstrip/single_word are not supported")
                post = t.get("post_processor") or {}  # Llama-3: TemplateProcessing "single" = bos + $A; HF uses it
                tmpl = [p for p in post.get("processors", [post]) if p.get("type") == "TemplateProcessing"]
                first = tmpl and (tmpl[0].get("single") or [{}])[0].get("SpecialToken", {}).get("id")
                meta = {**meta, "add_bos_token": bool(first), **({"bos_token": first} if first else {})}
            else:
                vocab, pat, self._nfc, vfile, mfile = (json.loads((folder / "vocab.json").read_text(encoding="utf-8")),
                                                       GPT2_PAT, None, folder / "vocab.json", folder / "merges.txt")
                merges, added = (folder / "merges.txt").read_text(encoding="utf-8").splitlines(), {}
        except FileNotFoundError as e:
            raise CheckpointError(f"{e.filename}: missing; a tokenizer folder needs tokenizer.json or vocab.json + "
                                  "merges.txt") from None
        except ValueError as e:
            raise CheckpointError(f"{folder}: a tokenizer file is not valid JSON ({e})") from None
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        order = [s for _, s in sorted((i, s) for s, i in vocab.items() if len(s) == 1 and s in byte_of)]
        _check(all(chr(c) in vocab for c in range(33, 127)) and "Ġ" in vocab, vfile, f"has {len(order)} of the 256 "
               "byte tokens and not all of the printable ASCII ones; not GPT-2 byte-level BPE")
        for ln, line in enumerate(merges, 1):
            if line.strip() and not line.startswith("#version"):
                if len(line.split(" ")) != 2 or (m := line.replace(" ", "")) not in vocab or any(c not in byte_of for c in m):
                    raise CheckpointError(f"{mfile}:{ln}: expected two byte-level tokens whose merge is in vocab, got {line!r}")
                order.append(m)
        ranks, rank2id = {}, []
        for s in order:  # rank = merge priority (the first occurrence wins)
            if (b := bytes(byte_of[c] for c in s)) not in ranks:
                ranks[b] = len(rank2id)
                rank2id.append(vocab[s])
        miss = [bytes([b]) for b in range(256) if bytes([b]) not in ranks]  # tiktoken needs all 256; HF drops a byte its
        ranks, rank2id = {**ranks, **{b: len(rank2id) + j for j, b in enumerate(miss)}}, rank2id + [-1] * len(miss)  # vocab lacks
        content = lambda v: v.get("content") if isinstance(v, dict) else v
        added = {**added, **{content(v): int(k) for k, v in meta.get("added_tokens_decoder", {}).items()}}
        full, opt_like = {**vocab, **added}, "</s>" in vocab and "<s>" in vocab
        named = [content(meta[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if meta.get(k)]
        named = named or (["</s>", "<pad>"] if opt_like else ["<|endoftext|>"])  # HF's defaults without a config
        specials = {s: full[s] for s in list(added) + named if s in full and s.encode() not in ranks}  # split out, as HF
        self.enc = tiktoken.Encoding(self.name, pat_str=pat, mergeable_ranks=ranks,
                                     special_tokens={s: len(rank2id) + j for j, s in enumerate(specials)})
        r2i = np.array(rank2id + list(specials.values()), dtype=np.int64)
        self._r2i = None if np.array_equal(r2i, np.arange(len(r2i))) else r2i  # GPT-2: the ranks are the ids
        if self._nfc:  # Qwen2: NFC on the text between added tokens (HF splits those out before normalizing)
            split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")").split
            self._nfc = lambda s: "".join(p if i % 2 else unicodedata.normalize("NFC", p) for i, p in enumerate(split(s)))
        self.vocab_size = max(full.values()) + 1
        self._bytes = [b""] * self.vocab_size  # id -> bytes, for decode
        for s, i in full.items():
            self._bytes[i] = bytes(byte_of[c] for c in s) if s not in specials and all(c in byte_of for c in s) else s.encode()
        tid = lambda k, d: full.get(content(meta[k])) if meta.get(k) else meta.get(k + "_id", d)
        self.eos_id = tid("eos_token", full.get("</s>", full.get("<|endoftext|>")))
        self.pad_id = tid("pad_token", full.get("<pad>"))
        add_bos = meta.get("add_bos_token", meta.get("model_type") == "opt" or opt_like)  # HF: OPT prepends </s>
        self.bos_id = tid("bos_token", full.get("</s>")) if add_bos else None

    def encode(self, text):
        ranks = self.enc.encode(self._nfc(text) if self._nfc else text, allowed_special="all")
        return ranks if self._r2i is None else [i for i in self._r2i[np.asarray(ranks, dtype=np.int64)].tolist() if i >= 0]

    def decode(self, ids):
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

def load_tokenizer(path_or_name):
    return Tokenizer(resolve_model_dir(path_or_name, weights=False), name=path_or_name)

# ---------------------------------------------------------------------------------------------------------------
# Hub names -> a cache folder. Files come from {DHRD_HUB_URL}/{name}/resolve/main/{file}; sizes and sha256 (the
# LFS oid) from {DHRD_HUB_URL}/api/models/{name}/tree/main when the server offers that listing.

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

def resolve_model_dir(path_or_name, weights=True):
    """A local folder as is; a hub name -> DHRD_CACHE/<owner--name>, downloading whatever is missing."""
    if Path(path_or_name).expanduser().is_dir():
        return Path(path_or_name).expanduser()
    _check(HUB_NAME.match(name := str(path_or_name)) and ".." not in name, name, "no such folder, and not a hub name like 'gpt2'")
    cache = Path(os.environ.get("DHRD_CACHE", "~/.cache/dhrd")).expanduser() / name.replace("/", "--")
    base = os.environ.get("DHRD_HUB_URL", "https://huggingface.co").rstrip("/")
    have, index = lambda *fs: all((cache / f).is_file() for f in fs), cache / "model.safetensors.index.json"
    if have("config.json") and (have("tokenizer.json") or have("vocab.json", "merges.txt")) and (not weights or have("model.safetensors") or
                                                            have(index.name) and have(*_shards(index)[1])):
        return cache  # complete in the cache: no network
    try:  # {file: (size, sha256 of LFS files)}; None when offline or the server has no listing
        with urllib.request.urlopen(f"{base}/api/models/{name}/tree/main", timeout=30) as r:
            listing = {it["path"]: ((it.get("lfs") or {}).get("size", it.get("size")), (it.get("lfs") or {}).get("oid"))
                       for it in json.loads(r.read()) if it.get("type") == "file"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        listing = None
    get = lambda f: have(f) or download(f"{base}/{name}/resolve/main/{f}", cache / f, *(listing or {}).get(f, (None, None)))
    try:
        tok = ("tokenizer.json",) if "tokenizer.json" in (listing or {}) else ("vocab.json", "merges.txt")  # Llama-3: no vocab.json
        for f in ("config.json",) + tok + tuple(f for f in TOKENIZER_FILES if f in (listing or {})):
            get(f)
    except DownloadError as e:  # most often a mistyped local path
        raise CheckpointError(f"{name}: no such local folder, and no such model on the hub ({e})") from None
    if not weights or have("model.safetensors"):
        return cache
    _check(listing is None or {"model.safetensors", index.name} & set(listing), f"{base}/{name}", "the repository has no "
           f"model.safetensors (files: {sorted(listing or [])[:12]}); only safetensors is loaded (never pickle): convert it")
    try:
        if listing is None or "model.safetensors" in listing:
            return get("model.safetensors") and cache
    except DownloadError:
        if listing is not None:
            raise  # without a listing, a 404 here may just mean that the checkpoint is sharded
    get(index.name)
    for s in _shards(index)[1]:
        get(s)
    return cache

def download(url, dest, expected_size=None, sha256=None, desc=None):
    """urllib download to dest via dest.part, renamed only once complete and verified; resumes a partial .part
    with an HTTP Range request; progress on stderr. Raises DownloadError naming the URL."""
    dest, last = Path(dest), 0.0
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    have = 0 if expected_size is not None and have > expected_size else have  # a stale .part: start over
    if expected_size is None or have < expected_size:
        try:
            req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
            with urllib.request.urlopen(req, timeout=60) as r, open(part, "ab" if have else "wb") as f:
                if have and r.status != 206:  # the server ignored Range: start over
                    have = f.truncate(0)
                total = (have + int(r.headers.get("Content-Length") or 0)) / 1e6
                while chunk := r.read(1 << 20):
                    if (have := have + f.write(chunk)) and time.time() - last > 0.5:
                        last = time.time()
                        print(f"\r{desc or url}: {have / 1e6:.1f}/{total:.1f} MB", end="", file=sys.stderr, flush=True)
            print(f"\r{desc or url}: {have / 1e6:.1f} MB done", file=sys.stderr)
        except urllib.error.HTTPError as e:
            if not (e.code == 416 and have):  # 416 on a resume: the .part is already complete
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
        except OSError as e:  # URLError, timeouts, resets
            raise DownloadError(f"could not download {url} ({getattr(e, 'reason', e)}). Offline? Put the files in a "
                                f"local folder and pass its path instead (the partial {part} resumes next time)") from None
    if expected_size is not None and (size := part.stat().st_size) != expected_size:
        if size > expected_size:
            part.unlink()
        raise DownloadError(f"{url}: got {size} bytes, expected {expected_size}" +
                            (" (interrupted: run again to resume)" if size < expected_size else "; the file was removed"))
    with open(part, "rb") as f:
        got = hashlib.file_digest(f, "sha256").hexdigest() if sha256 else None
    if got != (sha256 and sha256.lower()):
        part.unlink()
        raise DownloadError(f"{url}: sha256 {got} is not the expected {sha256}; the file was removed")
    os.replace(part, dest)
    return dest
