"""The dhrd test suite: `python -m pytest -q test_dhrd.py` (CPU, no network; loopback servers only).
Reference outputs come from tests/fixtures/ (made with transformers by tests/fixtures/make_fixtures.py).

The sections, in this order. A section's tests share a name prefix: `pytest -k test_train test_dhrd.py`
selects exactly one section; the short `-k train` also takes the few other names that contain the word.
  -k gpt    gpt.py: parity with transformers, the fused LM loss, the chunked KL (--kl_coef, --kd_coef), the
            one-pass property, sampling and the KV cache, native dtypes, checkpoints and safetensors,
            tokenizers, downloads and the Hugging Face hub cache (a loopback hub: tokens, redirects, retries,
            resume, offline, two processes at once)
  -k prep   prepare.py: synth, SuperGLUE templates, custom data, rationale import, teachers (a loopback
            API, a local model), the flag parser every script uses, bad input, durable writes (a full disk,
            cut folder swaps), a re-prepare killed at random write points
  -k train  dhrd.py: metrics, config errors, DDP and FSDP == one process (and their checkpoints
            interchangeable; evaluation shared by 2-3 ranks == one process's), exact resume after a kill,
            distillation from a teacher (--kd_teacher), gradient statistics and alpha=auto, eval_only /
            predict, a non-finite loss, compile, CoT decoding, LoRA training, --max_epochs with 1-3
            processes, the config/ presets, the Table 1 driver (experiments/superglue.py), --revision's commit
            recorded, runs that survive (the rerun rule, kills at every write point, SIGUSR1, torchrun
            --max-restarts + SIGTERM, a full disk); at its end the tests of gpt.py's LoRA modules (`-k test_lora`)
  -k bench  bench.py: the JSON contract on a tiny model, flag errors, the named shapes' parameter counts,
            the LoRA step's FLOPs
  -k cuda   the checks a GPU can break (parity, bf16, decoding, the fused loss, torchrun + compile,
            recompilations, bench.py on the device): skipped without a GPU; DHRD_TEST_DEVICE=cpu runs
            them on the CPU
"""
import dataclasses
import datetime
import email.utils
import errno
import hashlib
import http.server
import io
import json
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import dhrd  # noqa: E402
import gpt  # noqa: E402
import prepare  # noqa: E402
import hf  # noqa: E402
import plumbing  # noqa: E402
from gpt import (CheckpointError, DownloadError, DualOutput, GPT, GPTConfig, KVCache, download,  # noqa: E402
                 dual_loss, fused_lm_loss, load_tokenizer, reference_lm_loss)
from hf import GPT2_PAT, read_safetensors, resolve_model_dir, write_safetensors  # noqa: E402

# ============================================================================================================
# gpt.py + hf.py: parity with transformers, fused loss, one-pass property, DualOutput / dual_loss, KV cache,
# LoRA, checkpoints and family records, tokenizer, downloads
# ============================================================================================================

FIX = ROOT / "tests" / "fixtures"
PARITY = [("gpt2", "gpt2"), ("gpt2_hub", "gpt2"), ("opt", "opt"), ("opt350", "opt350"),
          ("opt350_hub", "opt350"), ("opt350_bf16", "opt350"), ("llama", "llama"), ("llama_hub", "llama"),
          ("qwen2", "qwen2"), ("qwen3", "qwen3")]


def _gpt_ref(name):
    return {k: torch.from_numpy(v) for k, v in np.load(FIX / f"{name}_ref.npz").items()}


def _gpt_tiny(model_type="gpt2", **kw):
    torch.manual_seed(0)
    opt = model_type == "opt"
    cfg = dict(model_type=model_type, vocab_size=61, block_size=48, n_layer=2, n_head=2, n_embd=16,
               activation="relu" if opt else "gelu_new", word_embed_proj_dim=8 if opt else 0, pre_ln=not opt,
               pos_offset=2 if opt else 0)
    if model_type in ("llama", "qwen3"):  # GQA 2/1, RMSNorm, SwiGLU, RoPE (+ q/k norm)
        cfg.update(n_kv_head=1, norm="rmsnorm", glu=True, activation="silu", rope_theta=1e4, bias=False,
                   qkv_bias=False, qk_norm=model_type == "qwen3", pre_ln=True)
    return GPT(GPTConfig(**{**cfg, **kw})).eval()


@pytest.mark.parametrize("folder,ref", PARITY)
def test_gpt_parity_with_transformers(folder, ref):
    r, m = _gpt_ref(ref), GPT.from_pretrained(FIX / folder).eval()
    real = r["attention_mask"].bool()
    with torch.no_grad():
        d_logits = (m.lm_logits(r["input_ids"], r["attention_mask"]) - r["logits"])[real].abs().max().item()
        d_hidden = (m.hidden_states(r["input_ids"], r["attention_mask"])
                    - r["last_hidden_state"])[real].abs().max().item()
        assert d_logits < 1e-4 and d_hidden < 1e-4, (d_logits, d_hidden)
        if m.score is not None:  # seq-cls checkpoints: HF `score` pooled at the last non-pad token
            assert m.config.num_labels == r["cls_logits"].shape[1]
            assert (m.classify(r["input_ids"], r["attention_mask"]) - r["cls_logits"]).abs().max() < 1e-4
        assert torch.equal(m.generate(r["gen1_input_ids"], 12), r["gen1_output"])
        # left-padded batch
        genb = m.generate(r["genb_input_ids"], 12, attention_mask=r["genb_attention_mask"])
        assert torch.equal(genb, r["genb_output"])
        # the pad the reference used (hub config has none)
        m.config.pad_token_id = int(r["genb_input_ids"][2, 0])
        eos = m.generate(r["genb_input_ids"], 12, attention_mask=r["genb_attention_mask"],
                         eos_token_id=int(r["gen_eos_id"]))
        assert torch.equal(eos, r["gen_eos_output"][:, :eos.shape[1]])  # HF pads finished rows


def test_gpt_hub_layout_has_buffers_and_bare_keys():
    keys = set(read_safetensors(FIX / "gpt2_hub" / "model.safetensors"))
    # the case the loader must handle
    assert "wte.weight" in keys and any(k.endswith("attn.bias") for k in keys)
    assert (FIX / "opt350_hub" / "model.safetensors.index.json").exists()


def test_gpt_fused_lm_loss_equals_reference():
    """fused_lm_loss == reference_lm_loss (the plain gathered-logits path): value and gradients for several
    row blocks and vocabulary slices (targets on slice edges), a non-unit upstream gradient, [B,T] inputs with
    ignored positions, no valid target, no_grad, and within tolerance under bf16 autocast."""
    torch.manual_seed(0)
    h = torch.randn(37, 24, requires_grad=True)
    w = torch.randn(61, 24, requires_grad=True)
    t = torch.randint(0, 61, (37,))
    t[:6] = torch.tensor([0, 60, 15, 16, -100, 31])
    ref = reference_lm_loss(h, w, t)
    rh, rw = torch.autograd.grad(ref, [h, w])
    naive = F.cross_entropy(h @ w.t(), t, ignore_index=-100)  # the reference is the textbook loss
    assert abs(ref.item() - naive.item()) < 1e-6
    for chunk, rows in ((16, 8), (7, 5), (61, 37), (1, 1024), (1024, 2048)):
        loss = fused_lm_loss(h, w, t, chunk=chunk, rows=rows)
        gh, gw = torch.autograd.grad(3 * loss, [h, w])  # a non-unit upstream gradient
        assert abs(loss.item() - ref.item()) < 1e-5
        assert (gh - 3 * rh).abs().max() < 1e-5 and (gw - 3 * rw).abs().max() < 1e-5
    h3 = torch.randn(3, 11, 16, dtype=torch.float64).float().requires_grad_()  # [B,T,D] with ignored spans
    w3 = torch.randn(50, 16).requires_grad_()
    t3 = torch.randint(0, 50, (3, 11))
    t3[0, :4] = -100
    t3[2, 7:] = -100
    ref3 = reference_lm_loss(h3, w3, t3)
    ref3_grads = torch.autograd.grad(ref3, [h3, w3])
    for chunk in (1, 5, 1024):
        loss3 = fused_lm_loss(h3, w3, t3, chunk=chunk)
        assert abs(loss3.item() - ref3.item()) < 1e-5
        for g, r in zip(torch.autograd.grad(loss3, [h3, w3]), ref3_grads):
            assert (g - r).abs().max() < 1e-5
    for loss_fn in (fused_lm_loss, reference_lm_loss):  # no valid target: a zero that keeps its graph (DDP)
        zero = loss_fn(h3, w3, torch.full_like(t3, -100))
        assert zero.item() == 0.0 and zero.requires_grad
    with torch.no_grad():
        assert abs(fused_lm_loss(h3, w3, t3).item() - ref3.item()) < 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_lm_loss(h, w, t, chunk=16, rows=8)
        ref_bf16 = reference_lm_loss(h, w, t)
    gh, gw = torch.autograd.grad(loss, [h, w])
    bh, bw = torch.autograd.grad(ref_bf16, [h, w])
    assert gw.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05 * ref.item()
    assert abs(loss.item() - ref_bf16.item()) < 0.05 * ref.item()
    assert (gw - rw).abs().max() < 0.05 * rw.abs().max() and (gh - rh).abs().max() < 0.05 * rh.abs().max()
    assert (gw - bw).abs().max() < 0.05 * rw.abs().max() and (gh - bh).abs().max() < 0.05 * rh.abs().max()


def test_gpt_fused_lm_loss_frozen_head_makes_no_weight_grad():
    """LoRA freezes the LM head: then the fused loss holds no [V, C] weight-gradient buffer at all (nor does
    its matmul), and the gradient of h still equals the reference's."""
    torch.manual_seed(0)
    h = torch.randn(2, 19, 24, requires_grad=True)
    w = torch.randn(61, 24)  # requires_grad False
    t = torch.randint(0, 61, (2, 19))
    t[1, 12:] = -100
    (rh,) = torch.autograd.grad(reference_lm_loss(h, w, t), [h])
    for chunk, rows in ((16, 8), (1024, 2048)):
        loss = fused_lm_loss(h, w, t, chunk=chunk, rows=rows)
        gh, gw = loss.grad_fn.grads  # the autograd node is the Function's ctx: the gradients made in forward
        assert gw is None and gh.shape == (int((t != -100).sum()), 24)
        loss.backward()
        assert w.grad is None and (h.grad - rh).abs().max() < 1e-5
        h.grad = None
    wt = w.clone().requires_grad_()  # and the converse: a trainable head under a frozen input
    loss = fused_lm_loss(h.detach(), wt, t)
    assert loss.grad_fn.grads[0] is None
    (gw,) = torch.autograd.grad(loss, [wt])
    (rw,) = torch.autograd.grad(reference_lm_loss(h.detach(), wt, t), [wt])
    assert (gw - rw).abs().max() < 1e-5


@pytest.mark.parametrize("model_type", ["gpt2", "opt", "llama", "qwen3"])
def test_gpt_forward_one_pass_property(model_type):
    """Class logits at the last token of x are the same for [x] and [x, rationale] (paper §3), in one batch
    with right padding, for both heads and poolings; and loss_lm equals the naive full-logits loss."""
    for head, pooling in [("linear", "last"), ("mlp", "mean")]:
        m = _gpt_tiny(model_type, num_labels=3, head=head, pooling=pooling)
        torch.manual_seed(1)
        idx = torch.randint(0, 61, (2, 20))
        am = torch.ones_like(idx)
        am[1, 14:] = 0
        x_len = torch.tensor([9, 6])
        tg = torch.cat([idx[:, 1:], torch.full((2, 1), -100)], 1).masked_fill(am == 0, -100)
        out = m(idx, am, x_len=x_len, lm_targets=tg)
        alone = torch.cat([m.classify(idx[b:b + 1, :x_len[b]]) for b in range(2)])
        assert (out.cls_logits - alone).abs().max() < 1e-5
        naive = F.cross_entropy(m.lm_logits(idx, am).view(-1, 61), tg.view(-1), ignore_index=-100)
        assert abs(out.loss_lm.item() - naive.item()) < 1e-5
        out.loss_lm.backward()
        m.lm_loss = reference_lm_loss  # the plain path, swapped in: the same loss
        assert abs(m(idx, am, x_len=x_len, lm_targets=tg).loss_lm.item() - naive.item()) < 1e-5


def test_gpt_dual_output_and_dual_loss():
    """forward always returns DualOutput(cls_logits, loss_lm, extra), None for a head's term not asked for,
    extra = {name: value} of the terms given; dual_loss is Eq. 4: beta * CE(cls_logits, y) + alpha * loss_lm
    + weights[name] * value of each extra term."""
    m = _gpt_tiny("llama", num_labels=3)
    idx = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(0))
    tg = torch.roll(idx, -1, 1)
    y = torch.tensor([2, 0])
    ref = (m.hidden_states(idx).detach()[tg != -100], m.lm_head.weight.detach())
    kl = (lambda h, w, h_ref, w_ref: gpt.token_kl(h, w, h_ref, w_ref), ref)
    kd = (lambda h, w, h_t, w_t: gpt.token_kl(h_t, w_t, h, w, 2.0), ref)
    outs = [m(idx), m(idx, lm_targets=tg), m(idx, lm_targets=tg, terms={"kl": kl}),
            _gpt_tiny("llama")(idx, lm_targets=tg), m(idx, lm_targets=tg, terms={"kl": kl, "kd": kd})]
    for out in outs:
        assert type(out) is DualOutput and out._fields == ("cls_logits", "loss_lm", "extra")
    assert [(o.cls_logits is None, o.loss_lm is None, list(o.extra)) for o in outs] == [
        (False, True, []), (False, False, []), (False, False, ["kl"]), (True, False, []),
        (False, False, ["kl", "kd"])]
    assert outs[0].cls_logits.shape == (2, 3) and abs(outs[2].extra["kl"].item()) < 1e-6  # KL to itself
    assert abs(outs[4].extra["kd"].item()) < 1e-6  # the teacher is the student: nothing to distil
    ce = F.cross_entropy(outs[1].cls_logits, y)
    loss, loss_cls = dual_loss(outs[0], y, alpha=0.7, beta=2.0)  # a pooled baseline: no LM term at all
    assert torch.equal(loss_cls, ce) and torch.equal(loss, 2.0 * ce)
    loss, _ = dual_loss(outs[1], y, alpha=0.7, beta=2.0, weights={"kl": 5.0})  # no KL in out: nothing added
    assert torch.allclose(loss, 2.0 * ce + 0.7 * outs[1].loss_lm)
    out = outs[2]._replace(extra={"kl": torch.tensor(0.25)})
    loss, _ = dual_loss(out, y, alpha=0.7, beta=0.0, weights={"kl": 2.0})  # beta=0: a CoT-only model
    assert torch.allclose(loss, 0.7 * out.loss_lm + 0.5)
    out = outs[4]._replace(extra={"kl": torch.tensor(0.5), "kd": torch.tensor(0.25)})
    loss, _ = dual_loss(out, y, alpha=0.7, beta=2.0, weights={"kl": 5.0, "kd": 4.5})
    assert torch.allclose(loss, 2.0 * ce + 0.7 * out.loss_lm + 5.0 * 0.5 + 4.5 * 0.25)


def test_gpt_kd_chunked_equals_naive_and_trains_the_student_only():
    """--kd_coef's term, KL(p_teacher^T || p_student^T) at the valid LM targets: token_kl's row chunks equal
    the plain [N, V] computation (value and gradients) at T=2; the teacher, run under no_grad, gets none."""
    student = _gpt_tiny("llama", num_labels=2)
    teacher = _gpt_tiny("qwen3", n_embd=32, n_head=4).requires_grad_(False)  # another network, the same V
    teacher.lm_head.weight.mul_(20.0)  # peaked distributions, far from the student's near-uniform ones
    idx = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(0))
    tg = torch.roll(idx, -1, 1)
    tg[0, 5:] = tg[2, :3] = -100  # only the valid targets count
    with torch.no_grad():
        kd_ref = (teacher.hidden_states(idx)[tg != -100], teacher.lm_head.weight)
    term = dhrd.DistillFromTeacher(teacher, dhrd.Config(kd_teacher="t", kd_coef=0.5, kd_temperature=2.0), None)
    assert term.weight == 0.5 * 2.0 ** 2  # kd_coef * T^2 (Hinton's T^2)
    kd = student(idx, lm_targets=tg, terms={"kd": (term.value, kd_ref)}).extra["kd"]  # rows=256: one chunk
    chunked = gpt.token_kl(*kd_ref, student.hidden_states(idx)[tg != -100], student.lm_head.weight,
                           temperature=2.0, rows=5)
    g_chunked = torch.autograd.grad(chunked, list(student.parameters()), allow_unused=True)
    q = F.log_softmax(teacher.lm_logits(idx)[tg != -100] / 2.0, -1)
    p = F.log_softmax(student.lm_logits(idx)[tg != -100] / 2.0, -1)
    naive = F.kl_div(p, q, log_target=True, reduction="batchmean")  # KL(q || p), mean over the N rows
    g_naive = torch.autograd.grad(naive, list(student.parameters()), allow_unused=True)
    assert naive.item() > 0.1
    assert abs(kd.item() - naive.item()) < 1e-6 and abs(chunked.item() - naive.item()) < 1e-6
    for (n, _), a, b in zip(student.named_parameters(), g_chunked, g_naive):
        assert (a is None) == (b is None) and (a is None or (a - b).abs().max() < 1e-6), n
    assert sum(a is not None for a in g_chunked) > 10  # the blocks and the head, not the pooled head
    kd.backward()
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_gpt_grad_checkpoint_same_loss_and_grads(model_type):
    """grad_checkpoint recomputes each block in backward: the same losses and gradients, dropout included
    (checkpoint restores the RNG for the recomputation), and only while training with grad enabled."""
    results = []
    for on in (False, True):
        m = _gpt_tiny(model_type, num_labels=3, dropout=0.2).train()
        m.grad_checkpoint = on
        idx = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(0))
        tg = torch.roll(idx, -1, 1)
        torch.manual_seed(7)  # the same dropout masks in both runs
        out = m(idx, x_len=torch.tensor([5, 7, 12]), lm_targets=tg)
        loss, _ = dual_loss(out, torch.tensor([0, 2, 1]), 1.0, 1.0)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (loss_off, g_off), (loss_on, g_on) = results
    assert loss_on == pytest.approx(loss_off, abs=1e-6) and loss_off != 0
    for n in g_off:
        assert torch.allclose(g_on[n], g_off[n], atol=1e-6), n


def test_gpt_kv_cache_update_in_place():
    cache = KVCache(max_len=6)
    k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)  # [B, n_kv, T, hd]: a 4-token prompt
    ks, vs = cache.update(0, k, v)
    assert cache.k.shape == (2, 3, 6, 5) and torch.equal(ks, k) and torch.equal(vs, v)
    buf = cache.k.data_ptr()
    k1, v1 = torch.randn(2, 3, 1, 5), torch.randn(2, 3, 1, 5)  # one decoded token at position 4
    ks, vs = cache.update(4, k1, v1)
    assert cache.k.data_ptr() == buf and ks.data_ptr() == buf  # written in place, the prefix is a view
    assert (ks.shape == (2, 3, 5, 5) and torch.equal(ks, torch.cat([k, k1], 2))
            and torch.equal(vs, torch.cat([v, v1], 2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # buffers take the dtype of the first keys
        c = KVCache(3)
        c.update(0, k[:, :, :2].bfloat16(), v[:, :, :2].bfloat16())
    assert c.k.dtype == c.v.dtype == torch.bfloat16


def test_gpt_sampling_and_cache_match_recompute():
    m = _gpt_tiny("opt")
    p = torch.randint(0, 61, (1, 5))
    x = p
    for _ in range(8):  # greedy without a cache
        x = torch.cat([x, m.lm_logits(x)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(m.generate(p, 8), x)
    assert torch.equal(m.generate(p, 8, temperature=1.0, top_p=1e-9), x)  # nucleus of one token = greedy
    g = lambda: torch.Generator().manual_seed(3)
    a, b = m.generate(p, 8, temperature=1.0, generator=g()), m.generate(p, 8, temperature=1.0, generator=g())
    assert torch.equal(a, b) and a.shape == (1, 13)


GENERATE_FIXTURES = ["gpt2", "opt", "opt350", "llama", "qwen2", "qwen3"]


@pytest.fixture
def one_thread():
    """Tiny models' many small ops on one thread: on a loaded 2-core machine every op's thread barrier can
    wait a whole time slice for a preempted thread (a 40-token tiny generate: 0.07 s alone, seconds with
    two)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", GENERATE_FIXTURES)
def test_gpt_generate_equals_reference_on_fixtures(name, one_thread):
    """generate (prefill, then StaticKVCache decode steps; EOS read every EOS_CHECK tokens) gives the tokens
    of generate_reference (the plain loop) on every parity fixture in fp32: one prompt, the left-padded
    batch, EOS, and sampling with a fixed seed. The draws are identical, not only alike: both call _sample.
    The batch of 3 decodes through fp32 PackedLinear weights (products within ~1e-6 of F.linear's): the tokens
    still agree on every fixture."""
    r, m = _gpt_ref(name), GPT.from_pretrained(FIX / name).eval()
    ids, am = r["genb_input_ids"], r["genb_attention_mask"]
    m.config.pad_token_id = int(ids[2, 0])
    g = lambda: torch.Generator().manual_seed(1)
    with torch.no_grad():
        assert torch.equal(m.generate(r["gen1_input_ids"], 12), m.generate_reference(r["gen1_input_ids"], 12))
        for kw in (dict(), dict(eos_token_id=int(r["gen_eos_id"])), dict(temperature=1.0),
                   dict(temperature=1.0, top_p=0.9), dict(temperature=0.1, top_p=0.7)):
            fast = m.generate(ids, 20, attention_mask=am, generator=g(), **kw)
            ref = m.generate_reference(ids, 20, attention_mask=am, generator=g(), **kw)
            assert torch.equal(fast, ref), kw


def test_gpt_generate_stops_where_reference_stops(one_thread):
    """Every token id of a tiny model as the EOS of a sampled, left-padded batch (fixed seed): generate reads
    `done` only every EOS_CHECK tokens, then cuts back to the token that finished the last row, so it returns
    generate_reference's tensor, shape included. Among the ids: batches that stop early, between two checks,
    and not at all."""
    m = _gpt_tiny("llama", pad_token_id=0)
    torch.manual_seed(1)
    ids = torch.randint(1, 61, (2, 6))
    am = torch.ones_like(ids)
    am[1, :2] = 0
    stops = []
    with torch.no_grad():
        for eos in range(61):
            kw = dict(eos_token_id=eos, attention_mask=am, temperature=1.0)
            ref = m.generate_reference(ids, 40, generator=torch.Generator().manual_seed(eos), **kw)
            fast = m.generate(ids, 40, generator=torch.Generator().manual_seed(eos), **kw)
            assert torch.equal(fast, ref), eos
            stops.append(ref.shape[1] - ids.shape[1])
    assert min(stops) < 40 and max(stops) == 40, stops
    assert any(n % gpt.EOS_CHECK for n in stops if n < 40), stops


@pytest.mark.parametrize("model_type", ["gpt2", "llama", "qwen3"])
def test_gpt_decode_step_is_one_graph(model_type, monkeypatch, one_thread):
    """generate(compile=True) hands torch.compile a decode step it captures whole (fullgraph=True: a graph
    break raises) and once: one graph for every step of a call and for the next call of the same shapes (a
    prompt of another length in the same CACHE_ROUND slots). A counting backend stands in for inductor; the
    compiled path itself runs in test_cuda_compiled_generate_equals_reference."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, fullgraph, mode: real(fn, fullgraph=fullgraph,
                                                                           backend=backend))
    torch._dynamo.reset()
    m = _gpt_tiny(model_type)
    ids = torch.randint(0, 61, (2, 5))
    am = torch.ones_like(ids)
    am[1, :2] = 0
    try:
        with torch.no_grad():
            for T in (5, 4):
                fast = m.generate(ids[:, :T], 9, attention_mask=am[:, :T], compile=True)
                assert torch.equal(fast, m.generate_reference(ids[:, :T], 9, attention_mask=am[:, :T]))
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 1


@pytest.mark.skipif(not gpt.native_dtype("cpu")[0] == "bfloat16", reason="needs a CPU with native bf16")
def test_gpt_packed_bf16_decode_equals_unpacked(one_thread):
    """On a CPU with native bf16, generate decodes through PackedLinear (oneDNN's blocked weights): the same
    products as F.linear's, so the same tokens as generate_reference, with bf16 weights and under autocast;
    the model's own Linear modules are back afterwards."""
    m = _gpt_tiny("llama")
    ids = torch.randint(0, 61, (3, 6))
    linears = [mod for mod in m.modules() if type(mod) is torch.nn.Linear]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert gpt.cpu_packed_dtype(m, 3) == torch.bfloat16
            assert torch.equal(m.generate(ids, 12), m.generate_reference(ids, 12))
        m = m.bfloat16()
        assert torch.equal(m.generate(ids, 12, temperature=1.0, generator=torch.Generator().manual_seed(0)),
                           m.generate_reference(ids, 12, temperature=1.0,
                                                generator=torch.Generator().manual_seed(0)))
    assert [mod for mod in m.modules() if type(mod) is torch.nn.Linear] == linears


def test_gpt_packed_fp32_decode(monkeypatch, one_thread):
    """fp32 decoding of more than one row packs its weights too (oneDNN's fp32 kernel streams them faster than
    MKL's few-row GEMM): products within rounding of F.linear's, and here the tokens of generate_reference;
    one row is not packed (no faster). The model's own Linear modules are back afterwards."""
    lin = torch.nn.Linear(64, 192)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert (gpt.PackedLinear(lin, 3, torch.float32)(x) - lin(x)).abs().max() < 1e-5
    m = _gpt_tiny("gpt2")
    assert gpt.cpu_packed_dtype(m, 3) == torch.float32 and gpt.cpu_packed_dtype(m, 1) is None
    packs = []
    real = gpt.PackedLinear.__init__

    def spy(self, linear, rows, dtype):
        packs.append((rows, dtype))
        real(self, linear, rows, dtype)
    monkeypatch.setattr(gpt.PackedLinear, "__init__", spy)
    ids = torch.randint(0, 61, (3, 6))
    linears = [mod for mod in m.modules() if type(mod) is torch.nn.Linear]
    with torch.no_grad():
        assert torch.equal(m.generate(ids, 12), m.generate_reference(ids, 12))
        assert set(packs) == {(3, torch.float32)} and len(packs) == len(linears)
        m.generate(ids[:1], 4)
    assert len(packs) == len(linears)
    assert [mod for mod in m.modules() if type(mod) is torch.nn.Linear] == linears


def test_gpt_sample_draws_as_multinomial():
    """_draw is torch.multinomial(p, 1)'s own algorithm without its host-side input checks: the same token
    from the same generator, zeros never drawn; the nucleus keeps the fewest tokens holding more than
    top_p."""
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(4, 300), -1)
    p[:, 7] = 0.0
    for _ in range(50):
        assert torch.equal(gpt._draw(p, g1), torch.multinomial(p, 1, generator=g2))
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0] + [-30.0] * 96])  # softmax ~ 0.64, 0.24, 0.09, 0.03
    drawn = {int(gpt._sample(logits, 1.0, 0.8, g1)) for _ in range(300)}
    assert drawn == {0, 1}  # 0.64 < 0.8 <= 0.64 + 0.24: the nucleus is the first two tokens


def test_gpt_bf16_autocast_cpu():
    m = _gpt_tiny("gpt2", num_labels=2)
    idx = torch.randint(0, 61, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cls, loss, _ = m(idx, lm_targets=idx)
        loss.backward()
        out = m.generate(idx[:, :4], 3)
    assert torch.isfinite(loss) and cls.shape == (2, 2) and out.shape == (2, 7)
    assert m.wte.weight.grad is not None and m.wte.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("avx512_bf16, amx, onednn, cuda_bf16, cpu, gpu", [
    (True, False, True, True, ("bfloat16", "native bf16: AVX-512-BF16/AMX"), ("bfloat16", "native bf16")),
    (False, True, True, True, ("bfloat16", "native bf16: AVX-512-BF16/AMX"), ("bfloat16", "native bf16")),
    (False, False, True, False, ("float32", "no native bf16"),
     ("float16", "no bf16 on this GPU; fp16 with a gradient scaler")),
    (True, True, False, False, ("float32", "no native bf16"),
     ("float16", "no bf16 on this GPU; fp16 with a gradient scaler")),
])
def test_gpt_native_dtype_choice(monkeypatch, avx512_bf16, amx, onednn, cuda_bf16, cpu, gpu):
    # dtype=auto: bf16 on a CPU only with AVX-512-BF16 or AMX that oneDNN may use (ONEDNN_MAX_CPU_ISA can
    # forbid it: the 4th row), else fp32 (emulated bf16 is ~150x slower); on CUDA bf16 where supported, else
    # fp16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    assert gpt.native_dtype("cpu") == cpu
    assert gpt.native_dtype("cuda:1") == gpu


def test_gpt_optimizer_groups_and_flops():
    m = _gpt_tiny("gpt2")
    opt = m.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert m.flops_per_token(32) > 6 * sum(p.numel() for p in m.parameters()) - 6 * m.wpe.weight.numel()


@pytest.mark.parametrize("folder", ["gpt2", "gpt2_hub", "opt", "opt350", "opt350_hub", "llama", "llama_hub",
                                    "qwen2", "qwen3"])
def test_gpt_save_pretrained_round_trip(folder, tmp_path):
    """Every family record (hf.FAMILIES), loading and saving alike: from_pretrained -> save_pretrained ->
    from_pretrained gives the same tensors, config and outputs, in the family's own HF layout."""
    m = GPT.from_pretrained(FIX / folder).eval()
    assert m.config.pos_offset == (2 if m.config.model_type == "opt" else 0)  # the OPT record sets it
    m.save_pretrained(tmp_path / "m", labels=["a", "b", "c"] if m.score is not None else None)
    m2 = GPT.from_pretrained(tmp_path / "m").eval()
    sd, sd2 = m.state_dict(), m2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) and sd[k].dtype == sd2[k].dtype
                                           for k in sd)
    resolved = lambda c: {**vars(c), "head_dim": c.head_dim or c.n_embd // c.n_head}  # saved spelled out
    assert resolved(m2.config) == resolved(m.config)
    idx = torch.randint(0, m.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(m.lm_logits(idx), m2.lm_logits(idx))
        if m.score is not None:
            assert torch.equal(m.classify(idx), m2.classify(idx))
    assert (tmp_path / "m" / "vocab.json").read_bytes() == (FIX / folder / "vocab.json").read_bytes()
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    fam = hf.FAMILIES[m.config.model_type]
    assert cfg["model_type"] == m.config.model_type and (m.score is None or cfg["id2label"]["2"] == "c")
    assert cfg["architectures"] == [fam.seq_cls if m.score is not None else fam.causal_lm]
    keys = set(read_safetensors(tmp_path / "m" / "model.safetensors"))
    assert all(k.startswith((fam.prefix, "score.", "lm_head.")) for k in keys)
    assert any(k.startswith(fam.prefix + fam.block.format(0)) for k in keys)
    assert ("lm_head.weight" in keys) == (not m.config.tie_word_embeddings)


def test_gpt_rope_config_keys_and_errors(tmp_path):
    """rope_theta / rope_scaling are read from the top level (hub files) and from rope_parameters
    (transformers 5); what gpt.py does not implement is refused by name, not run differently."""
    a, b = GPT.from_pretrained(FIX / "llama").config, GPT.from_pretrained(FIX / "llama_hub").config
    assert a.rope_theta == b.rope_theta == 1e4 and a.rope_scaling["factor"] == b.rope_scaling["factor"] == 8.0
    assert (a.n_kv_head, a.norm, a.glu, a.qkv_bias, a.qk_norm) == (2, "rmsnorm", True, False, False)
    q2, q3 = GPT.from_pretrained(FIX / "qwen2").config, GPT.from_pretrained(FIX / "qwen3").config
    assert ((q2.qkv_bias, q2.bias, q2.tie_word_embeddings, q3.qk_norm, q3.head_dim, q3.n_kv_head)
            == (True, False, False, True, 16, 1))
    base = json.loads((FIX / "llama_hub" / "config.json").read_text())
    for extra, msg in [({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                        "rope_scaling.*yarn.*not supported"),
                       ({"attention_bias": True}, "attention_bias"), ({"num_key_value_heads": 3}, "heads")]:
        shutil.copytree(FIX / "llama_hub", d := tmp_path / str(len(list(tmp_path.iterdir()))))
        (d / "config.json").write_text(json.dumps({**base, **extra}))
        with pytest.raises(CheckpointError, match=msg) as e:
            GPT.from_pretrained(d)
        assert str(d / "config.json") in str(e.value)


def test_gpt_mlp_head_and_new_head(tmp_path):
    # a linear checkpoint head vs head=mlp
    with pytest.raises(CheckpointError, match="unexpected.*score.weight"):
        GPT.from_pretrained(FIX / "opt", head="mlp")
    m = GPT.from_pretrained(FIX / "opt350_bf16", num_labels=4, head="mlp")
    assert m.classify(torch.tensor([[5, 6, 7]])).shape == (1, 4)
    m.save_pretrained(tmp_path / "mlp")
    m2 = GPT.from_pretrained(tmp_path / "mlp")
    assert m2.config.head == "mlp" and torch.equal(m.classify(torch.tensor([[5, 6]])),
                                                   m2.classify(torch.tensor([[5, 6]])))
    with pytest.raises(CheckpointError, match="labels"):
        GPT.from_pretrained(FIX / "gpt2", num_labels=5)


class _AttnPoolGPT(GPT):
    """A fork's pooled head: attention pooling over x (a learned score per position, softmax over the real
    tokens of x), then `score`. Its one definition is head_modules."""
    head_modules = ("score", "pool_attn")

    def __init__(self, config):
        super().__init__(config)
        self.pool_attn = torch.nn.Linear(config.n_embd, 1, bias=False)
        self.pool_attn.apply(self._init_weights)

    def pool(self, h, x_len):
        t = torch.arange(h.shape[1], device=h.device)[None]
        s = self.pool_attn(h).squeeze(-1).masked_fill(t >= x_len.to(h.device)[:, None], float("-inf"))
        return (F.softmax(s.float(), -1).to(h.dtype)[..., None] * h).sum(1)


def test_gpt_extended_head_trains_exports_reloads(tmp_path):
    """A head with a parameter outside `score` trains under LoRA, exports, reloads bit for bit and
    round-trips its adapter: export, load, LoRA freezing and adapter files read the one head_modules."""
    m = _AttnPoolGPT.from_pretrained(FIX / "llama", num_labels=3)  # pool_attn is fresh: initialised, finite
    assert m.pool_attn.weight.device.type == "cpu" and 0 < m.pool_attn.weight.abs().max() < 1
    gpt.add_lora(m, rank=4, alpha=32, dropout=0.0)
    assert sorted(m.head_parameters()) == ["pool_attn.weight", "score.weight"]
    assert {n for n, p in m.named_parameters() if p.requires_grad and ".lora_" not in n} == {
        "pool_attn.weight", "score.weight"}
    r = _gpt_ref("llama")
    ids, am = r["input_ids"], r["attention_mask"]
    y = torch.tensor([0, 2, 1])[:len(ids)]
    start = m.pool_attn.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        F.cross_entropy(m.classify(ids, am), y).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(m.pool_attn.weight, start)  # it trained
    m.eval()
    m.save_pretrained(tmp_path / "exp")
    assert "pool_attn.weight" in read_safetensors(tmp_path / "exp" / "model.safetensors")
    back = _AttnPoolGPT.from_pretrained(tmp_path / "exp").eval()
    merged = gpt.merged_state_dict(m)
    assert back.state_dict().keys() == merged.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in merged.items())
    with pytest.raises(CheckpointError, match="unexpected.*pool_attn.weight"):  # a plain GPT lacks this head
        GPT.from_pretrained(tmp_path / "exp")
    gpt.save_lora(m, tmp_path / "ad")
    assert "pool_attn.weight" in read_safetensors(tmp_path / "ad" / "adapter.safetensors")
    m2 = gpt.load_lora(_AttnPoolGPT.from_pretrained(FIX / "llama", num_labels=3), tmp_path / "ad").eval()
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in m.state_dict().items())
    with torch.no_grad():
        assert torch.equal(m2.classify(ids, am), m.classify(ids, am))


def test_gpt_fused_tensor_splits_into_unequal_parts():
    """GPT-2's fused c_attn holds q, k, v; with grouped-query attention (2 K/V heads of 4) the parts differ in
    size, and the split follows each part's own size: save -> load is exact."""
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=4, n_kv_head=2, n_embd=32)
    model = GPT(cfg)
    sd = model.state_dict()
    files = hf.state_dict_to_hf(sd, cfg, model.head_modules)
    key = "transformer.h.0.attn.c_attn.weight"
    assert files[key].shape == (32, 32 + 16 + 16)  # [in, q + k + v] (Conv1D)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    back = hf.state_dict_from_hf(files, cfg, shapes, "fused.safetensors", model.head_modules)
    assert all(torch.equal(back[n], sd[n]) for n in shapes)
    files[key] = files[key][:, :60]
    with pytest.raises(CheckpointError, match=r"fused.safetensors: tensor transformer.h.0.attn.c_attn.weight "
                       r"has shape "
                       r"\[60, 32\], config.json implies .* for its 3 parts \(rows 32 \+ 16 \+ 16\)"):
        hf.state_dict_from_hf(files, cfg, shapes, "fused.safetensors", model.head_modules)


def test_gpt_tokenizer_matches_transformers():
    cases = json.loads((FIX / "tokenizer_cases.json").read_text())
    for name in ("tok_gpt2", "tok_opt"):
        tok, info = load_tokenizer(FIX / name), cases["tokenizers_info"][name]
        assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (info["eos_id"], info["pad_id"], info["len"])
        assert tok.bos_id == (2 if name == "tok_opt" else None)  # HF prepends </s> for OPT, nothing for GPT-2
        for c in cases["cases"]:
            assert tok.encode(c["text"]) == c[name], (name, c["text"])
            assert tok.decode(c[name]) == c["text"]

TOK_JSON = ("tok_llama3", "tok_qwen2", "tok_smol")

def test_gpt_tokenizer_json_matches_transformers():
    cases = json.loads((FIX / "tokenizer_json_cases.json").read_text(encoding="utf-8"))
    for name in TOK_JSON:
        tok, info = load_tokenizer(FIX / name), cases["info"][name]
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (info["bos_prepended"], info["eos_id"],
                                                                       info["pad_id"], info["len"]), name
        for c in cases["cases"]:
            assert tok.encode(c["text"]) == c[name], (name, c["text"])
            assert tok.decode(c[name]) == c[name + "_decoded"], (name, c["text"])
            assert (tok.decode(c[name]) == c["text"]
                    or set(c["text"]) & set("\x04\x06\x13\x1d\U00040000\U00080001")
                    or name == "tok_qwen2"), (name, c["text"])  # round trip, but for dropped bytes and NFC
    # the cases can fail: the naive fold of Digits into GPT-2's regex, no NFC, and a bytes-missing vocab each
    # differ
    smol, qwen = load_tokenizer(FIX / "tok_smol"), load_tokenizer(FIX / "tok_qwen2")
    ids = lambda tok, enc, text: [i for i in tok._r2i[enc.encode(text, allowed_special="all")].tolist()
                                  if i >= 0]
    naive = tiktoken.Encoding("naive", pat_str=r"\p{N}|" + GPT2_PAT,
                              mergeable_ranks=smol.enc._mergeable_ranks,
                              special_tokens=smol.enc._special_tokens)
    assert any(ids(smol, naive, c["text"]) != c["tok_smol"] for c in cases["cases"])
    assert any(ids(qwen, qwen.enc, c["text"]) != c["tok_qwen2"] for c in cases["cases"])
    assert cases["info"]["tok_smol"]["missing_bytes"] and smol.encode("\x04") == [] == next(
        c["tok_smol"] for c in cases["cases"] if c["text"] == "\x04")

def test_gpt_tokenizer_json_unsupported(tmp_path):
    t = json.loads((FIX / "tok_llama3" / "tokenizer.json").read_text(encoding="utf-8"))
    for field, value, msg in [("normalizer", {"type": "Lowercase"}, "normalizer"),
                              ("pre_tokenizer", {"type": "Whitespace"}, r"pre_tokenizer \['Whitespace'\]"),
                              ("pre_tokenizer", {"type": "ByteLevel", "add_prefix_space": True},
                               "add_prefix_space"),
                              ("model", {**t["model"], "type": "WordPiece"}, "model WordPiece"),
                              ("model", {**t["model"], "vocab": {"a": 0}, "merges": []},
                               "model.vocab: has 1 of the 256")]:
        d = tmp_path / field
        d.mkdir(exist_ok=True)
        (d / "tokenizer.json").write_text(json.dumps({**t, field: value}), encoding="utf-8")
        with pytest.raises(CheckpointError, match=f"tokenizer.json.*{msg}"):
            load_tokenizer(d)

def test_gpt_bad_tokenizer_files(tmp_path):
    d = _gpt_copy(tmp_path, "tok_gpt2")
    lines = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
    (d / "merges.txt").write_text("\n".join(lines[:3] + ["a b c"] + lines[4:]), encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"merges.txt:4: .*'a b c'"):
        load_tokenizer(d)
    (d / "vocab.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_tokenizer(d)
    (d / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="vocab.json: missing"):
        load_tokenizer(d)

# -- LoRA: adapters on a frozen base (paper App. E.4), merged export, adapter-only files, KL to the base


# non-zero B (a fresh adapter is exactly the base), so merges and round trips show
def _gpt_lora_perturb(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    for n, p in m.named_parameters():
        if ".lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.1


@pytest.mark.parametrize("model_type", ["gpt2", "llama"])
def test_gpt_lora_fresh_is_base_and_trains_only_adapters(model_type):
    m = _gpt_tiny(model_type, num_labels=3)
    idx = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cls = m.lm_logits(idx), m.classify(idx)
    base = {k: v.clone() for k, v in gpt.merged_state_dict(m).items()}
    gpt.add_lora(m, rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # B = 0: bit-identical to the base model
        assert torch.equal(m.lm_logits(idx), logits) and torch.equal(m.classify(idx), cls)
    trained = [n for n, p in m.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or n.startswith("score") for n in trained) and "score.weight" in trained
    # GPT-2 has no gate_proj: skipped
    assert any("gate_proj.lora_A" in n for n in trained) == (model_type == "llama")
    assert sum(".lora_A" in n for n in trained) == 2 * (7 if model_type == "llama" else 6)
    opt = m.configure_optimizers(0.1, 1e-2, (0.9, 0.95), "cpu")
    assert (sum(p.numel() for g in opt.param_groups for p in g["params"])
            == sum(p.numel() for p in m.parameters() if p.requires_grad))
    m.train()
    y, losses = torch.tensor([0, 1, 2]), []
    for _ in range(8):
        loss, _ = dual_loss(m(idx, lm_targets=torch.roll(idx, -1, 1)), y, alpha=1.0, beta=1.0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    after = dict(m.state_dict())
    for k, v in base.items():  # the frozen weights did not move by a bit; the adapters and the head did
        if not k.startswith("score"):
            assert torch.equal(after[k.replace("_proj.", "_proj.base.")], v), k
    assert not torch.equal(after["score.weight"], base["score.weight"])
    assert all(after[n].abs().sum() > 0 for n in trained if ".lora_B" in n)
    with pytest.raises(ValueError,
                       match="unknown LoRA target.*'qkv'.*valid: q_proj,k_proj,v_proj,o_proj,gate_proj"):
        gpt.add_lora(_gpt_tiny(model_type), targets="q_proj,qkv")
    with pytest.raises(ValueError, match="none exists"):
        gpt.add_lora(_gpt_tiny("gpt2"), targets=["gate_proj"])


def test_gpt_lora_merged_export_and_adapter_round_trip(tmp_path):
    m = gpt.add_lora(GPT.from_pretrained(FIX / "llama").eval(), rank=4, alpha=32, dropout=0.1)
    _gpt_lora_perturb(m)
    r = _gpt_ref("llama")
    ids, am = r["input_ids"], r["attention_mask"]
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        logits, cls = m.lm_logits(ids, am), m.classify(ids, am)
    assert (logits - r["logits"]).abs().max() > 1e-3  # the adapters change the model
    m.save_pretrained(tmp_path / "merged")
    assert m.state_dict().keys() == before.keys() and all(torch.equal(m.state_dict()[k], v)
                                                          for k, v in before.items())
    merged = GPT.from_pretrained(tmp_path / "merged").eval()  # a plain HF folder: no lora tensors in it
    assert not any("lora" in k or ".base." in k
                   for k in read_safetensors(tmp_path / "merged" / "model.safetensors"))
    with torch.no_grad():
        assert (merged.lm_logits(ids, am) - logits).abs().max() < 1e-5
        assert (merged.classify(ids, am) - cls).abs().max() < 1e-5
    gpt.save_lora(m, tmp_path / "ad")
    saved = read_safetensors(tmp_path / "ad" / "adapter.safetensors")
    assert set(saved) == {k for k in before if ".lora_" in k or k.startswith("score")}
    assert json.loads((tmp_path / "ad" / "adapter.json").read_text())["rank"] == 4
    m2 = gpt.load_lora(GPT.from_pretrained(FIX / "llama").eval(), tmp_path / "ad")
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(m2.lm_logits(ids, am), logits) and torch.equal(m2.classify(ids, am), cls)
    with pytest.raises(CheckpointError, match=r"adapter.safetensors: tensor h.0.attn.\w+.lora_A has shape "
                       r"\[4, 32\], this model's is \[4, 16\].*load that base"):
        gpt.load_lora(_gpt_tiny("llama", num_labels=3), tmp_path / "ad")
    with pytest.raises(CheckpointError, match="unexpected.*score.weight"):  # a base loaded without num_labels
        gpt.load_lora(_gpt_tiny("llama", n_embd=32, vocab_size=897, n_head=4, head_dim=8, n_kv_head=2,
                                n_inner=64), tmp_path / "ad")


def test_gpt_lora_kl_to_base(monkeypatch):
    m = gpt.add_lora(_gpt_tiny("llama", num_labels=2, vocab_size=61), rank=4, alpha=8, dropout=0.0)
    idx = torch.randint(0, 61, (3, 12), generator=torch.Generator().manual_seed(0))
    tg = torch.roll(idx, -1, 1)
    tg[0, 5:] = tg[2, :3] = -100  # only the valid targets count

    def kl(rows=256):
        with torch.no_grad(), gpt.lora_disabled(m):
            ref = (m.hidden_states(idx)[tg != -100], m.lm_head.weight)
        h = m.hidden_states(idx)[tg != -100]
        term = (lambda h, w, *r: gpt.token_kl(h, w, *r), ref)
        return gpt.token_kl(h, m.lm_head.weight, *ref, rows=rows), m(idx, lm_targets=tg, terms={"kl": term}).extra["kl"]

    assert max(abs(v.item()) for v in kl()) < 1e-6  # adapters at zero: the model is the base
    _gpt_lora_perturb(m)
    a, b = kl(rows=5)  # row chunks of 5 == one chunk == the naive full-logits KL
    with torch.no_grad(), gpt.lora_disabled(m):
        q = F.log_softmax(m.lm_logits(idx)[tg != -100], -1)
    p = F.log_softmax(m.lm_logits(idx)[tg != -100], -1)
    naive = (p.exp() * (p - q)).sum(-1).mean()
    assert a.item() > 1e-3 and abs(a.item() - naive.item()) < 1e-5 and abs(b.item() - naive.item()) < 1e-5
    b.backward()
    for n, prm in m.named_parameters():  # the gradient reaches the adapters only (the head is not in the KL)
        assert (prm.grad is not None and prm.grad.abs().sum() > 0) == (".lora_" in n), n

# -- bad input --------------------------------------------------------------------------------


def _gpt_st(header, data=b"", n=None):
    h = json.dumps(header).encode()
    return (len(h) if n is None else n).to_bytes(8, "little") + h + data


BAD_FILES = [
    (b"\x01\x02", "too short"),
    ((10 ** 9).to_bytes(8, "little") + b"{}", "past the end"),
    (_gpt_st({}, n=4) + b"xx", "not a JSON object"),
    (_gpt_st({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"1234"), "outside"),
    (_gpt_st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "b": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"12345678"), "'b' overlaps"),
    (_gpt_st({"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
              "z": {"dtype": "U8", "shape": [0], "data_offsets": [1, 1]},
              "b": {"dtype": "U8", "shape": [2], "data_offsets": [4, 6]}}, b"12345678"), "'b' overlaps"),
    (_gpt_st({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, b"1234"), "unsupported dtype"),
    (_gpt_st({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"12345678"),
     "does not fit its 8 bytes"),
    (_gpt_st({"a": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, b"1234"), "malformed"),
    (_gpt_st([1, 2]), "not a JSON object"),
]


@pytest.mark.parametrize("data,msg", BAD_FILES)
def test_gpt_bad_safetensors(tmp_path, data, msg):
    f = tmp_path / "model.safetensors"
    f.write_bytes(data)
    with pytest.raises(CheckpointError, match=msg) as e:
        read_safetensors(f)
    assert str(f) in str(e.value)


def test_gpt_safetensors_dtypes_round_trip(tmp_path):
    ts = {"f32": torch.randn(3, 2), "f16": torch.randn(4).half(), "bf16": torch.randn(2, 2).bfloat16(),
          "i64": torch.arange(5), "empty": torch.zeros(0, 3), "scalar": torch.tensor(1.5)}
    write_safetensors(tmp_path / "t.safetensors", ts)
    back = read_safetensors(tmp_path / "t.safetensors")
    assert set(back) == set(ts) and all(torch.equal(back[k], ts[k]) and back[k].dtype == ts[k].dtype
                                        for k in ts)


def _gpt_copy(tmp_path, folder="gpt2"):
    d = tmp_path / folder
    shutil.copytree(FIX / folder, d)
    return d


def test_gpt_bad_checkpoints(tmp_path):
    d = _gpt_copy(tmp_path)
    st = read_safetensors(d / "model.safetensors")
    cases = []
    cases.append(({**st, "transformer.h.9.mlp.c_fc.weight": torch.zeros(1)}, "unexpected.*h.9"))
    cases.append(({k: v for k, v in st.items() if "ln_f" not in k}, "missing.*ln_f"))
    bad = dict(st)
    bad["transformer.wpe.weight"] = torch.zeros(7, 32)
    cases.append((bad, r"wpe.weight has shape \[7, 32\]"))
    for tensors, msg in cases:
        write_safetensors(d / "model.safetensors", tensors)
        with pytest.raises(CheckpointError, match=msg):
            GPT.from_pretrained(d)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])  # truncated download
    with pytest.raises(CheckpointError, match="model.safetensors"):
        GPT.from_pretrained(d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="pickle is never loaded"):
        GPT.from_pretrained(d)
    for text, msg in [('{"model_type": "mistral"}', "model_type 'mistral' is not supported"),
                      ("{nope", "not a JSON"),
                      ('{"model_type": "gpt2", "n_embd": 30, "n_head": 4}', "invalid field"),
                      ('{"model_type": "opt", "hidden_size": "big"}', "wrong type|invalid")]:
        (d / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=msg) as e:
            GPT.from_pretrained(d)
        assert "config.json" in str(e.value)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        GPT.from_pretrained(d)
    with pytest.raises(CheckpointError, match="no such folder"):
        GPT.from_pretrained(str(tmp_path / "nope" / "x"))


def test_gpt_untied_classifier_has_no_lm_head(tmp_path):
    """Qwen2ForSequenceClassification (untied) saves no lm_head.weight: it loads as a classifier with HF's
    class logits; whatever needs the LM head says so and names the fix; save_pretrained writes no LM head and
    round-trips. Without score.weight the file is a broken causal LM; odd tensors are named and counted."""
    r = {k: torch.from_numpy(v) for k, v in np.load(FIX / "qwen2_cls_ref.npz").items()}
    m = GPT.from_pretrained(FIX / "qwen2_cls").eval()
    assert m.lm_head is None and m.config.num_labels == 2 and not m.config.lm_head
    with torch.no_grad():
        assert (m.classify(r["input_ids"], r["attention_mask"]) - r["cls_logits"]).abs().max() < 1e-4
    ids = r["input_ids"][:1, :4]
    for call in (lambda: m.generate(ids, 2), lambda: m.lm_logits(ids), lambda: m(ids, lm_targets=ids)):
        with pytest.raises(CheckpointError, match=r"qwen2_cls: .*needs the LM head \(lm_head.weight\).*"
                           r"Start from the base model"):
            call()
    m.save_pretrained(tmp_path / "rt")
    assert "lm_head.weight" not in read_safetensors(tmp_path / "rt" / "model.safetensors")
    back = GPT.from_pretrained(tmp_path / "rt")
    assert back.lm_head is None and back.state_dict().keys() == m.state_dict().keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in m.state_dict().items())
    d = _gpt_copy(tmp_path, "qwen2_cls")
    st = read_safetensors(d / "model.safetensors")
    write_safetensors(d / "model.safetensors", {k: v for k, v in st.items() if k != "score.weight"})
    with pytest.raises(CheckpointError, match=r"missing \['lm_head.weight'\] \(1 in all\).*as a classifier"):
        GPT.from_pretrained(d)
    bad = {k: v for k, v in st.items() if not k.startswith("model.layers.1.mlp.")}
    bad["model.layers.7.mlp.up_proj.weight"] = torch.zeros(32, 16)
    write_safetensors(d / "model.safetensors", bad)
    mlp = [f"'model.layers.1.mlp.{n}_proj.weight'" for n in ("up", "down", "gate")]
    msg = (r"qwen2_cls/model.safetensors: tensors do not match a qwen2 model with this config.json "
           rf"\(2 layers\): missing \[{', '.join(mlp)}\] \(3 in all\), "
           r"unexpected \['model.layers.7.mlp.up_proj.weight'\] \(1 in all\)")
    with pytest.raises(CheckpointError, match=msg):
        GPT.from_pretrained(d)


def test_gpt_bad_sharded_index(tmp_path):
    d = _gpt_copy(tmp_path, "opt350_hub")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors is missing"):
        GPT.from_pretrained(d)
    idx["weight_map"] = {k: "../evil.safetensors" for k in idx["weight_map"]}
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="index"):
        GPT.from_pretrained(d)

# -- downloads against a loopback server ---------------------------------------------------------


class _GPTHandler(http.server.BaseHTTPRequestHandler):
    """A loopback file server and hub: byte ranges with If-Range, and knobs a test sets per url path."""
    files = {}     # url path (query included) -> bytes
    etags = {}     # url path -> its ETag; an If-Range naming another one gets the whole file (200)
    redirect = {}  # url path -> where a 302 sends the client
    fail = {}      # url path -> statuses answered first, one per request (with Retry-After: 0)
    cut = {}       # url path -> the byte where the body stops, though Content-Length promised all of it
    lie = set()    # url paths whose 206 answers start at byte 0, whatever the Range asked for
    hold = {}      # url path -> a threading.Event the answer waits for
    private = ()   # url path prefixes that need "Authorization: Bearer <token>": 401 without, 403 if wrong
    token = None
    hits = []      # (url path, the request's headers)

    def log_message(self, *a):
        pass

    def answer(self, code, headers=(), body=b""):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path
        self.hits.append((path, self.headers))
        if path in self.hold:
            self.hold[path].wait(60)
        if self.fail.get(path):
            return self.answer(self.fail[path].pop(0), [("Retry-After", "0")])
        auth = self.headers.get("Authorization")
        if path.startswith(self.private) and auth != f"Bearer {self.token}":
            return self.answer(403 if auth else 401)
        if path in self.redirect:
            return self.answer(302, [("Location", self.redirect[path])])
        body = self.files.get(path)
        if body is None:
            return self.answer(404)
        etag = self.etags.get(path)
        rng = self.headers.get("Range")
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        if self.headers.get("If-Range") not in (None, etag):
            start = 0  # the file changed since the part was fetched: all of it
        if start >= len(body) and start:
            return self.answer(416, [("Content-Range", f"bytes */{len(body)}")])
        first = 0 if path in self.lie else start
        headers = [("Content-Length", str(len(body) - first))]
        if etag:
            headers.append(("ETag", etag))
        if start:
            headers.append(("Content-Range", f"bytes {first}-{len(body) - 1}/{len(body)}"))
        self.answer(206 if start else 200, headers, body[first:self.cut.get(path, len(body))])


@pytest.fixture
def _gpt_server(monkeypatch):
    knobs = dict(files={}, etags={}, redirect={}, fail={}, cut={}, lie=set(), hold={}, private=(), token=None,
                 hits=[])
    for k, v in knobs.items():
        setattr(_GPTHandler, k, v)
    monkeypatch.setattr(hf, "RETRY_DELAYS", (0.0, 0.0, 0.0))  # retries without the waits
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GPTHandler)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    for event in _GPTHandler.hold.values():
        event.set()
    srv.shutdown()
    srv.server_close()


def _gpt_dead_url():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here: looks offline
    return f"http://127.0.0.1:{port}"


def test_gpt_download_resume_and_checks(_gpt_server, tmp_path):
    body = os.urandom(300_000)
    _GPTHandler.files["/f.bin"] = body
    sha = hashlib.sha256(body).hexdigest()
    dest = tmp_path / "f.bin"
    (tmp_path / "f.bin.0.part").write_bytes(body[:123_456])  # an interrupted earlier download
    download(f"{_gpt_server}/f.bin", dest, expected_size=len(body), sha256=sha)
    assert dest.read_bytes() == body and not list(tmp_path.glob("*.part"))
    assert _GPTHandler.hits[-1][1]["Range"] == "bytes=123456-"
    with pytest.raises(DownloadError, match="expected 999"):
        download(f"{_gpt_server}/f.bin", tmp_path / "g.bin", expected_size=999)
    with pytest.raises(DownloadError, match="sha256"):
        download(f"{_gpt_server}/f.bin", tmp_path / "h.bin", sha256="0" * 64)
    assert not list(tmp_path.glob("[gh].bin*"))  # neither the file nor a part
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{_gpt_server}/missing", tmp_path / "m.bin")
    dead = _gpt_dead_url()
    with pytest.raises(DownloadError, match=f"{dead}/x.*local folder.*after 4 tries"):
        download(f"{dead}/x", tmp_path / "x.bin")
    (tmp_path / "n.bin.0.part").write_bytes(b"x" * 1000)  # nothing (ETag, hash) could tell a splice: anew
    download(f"{_gpt_server}/f.bin", tmp_path / "n.bin")
    assert (tmp_path / "n.bin").read_bytes() == body and _GPTHandler.hits[-1][1]["Range"] is None


def test_gpt_download_truncation_etag_and_content_range(_gpt_server, tmp_path):
    """A body shorter than its Content-Length is retried, then reported, and its part kept; the next run
    resumes it with If-Range = its ETag. A changed ETag gets the new file whole; a 206 that starts at
    another byte than asked restarts the file."""
    old, new = os.urandom(300_000), os.urandom(300_000)
    for f in ("f", "g", "h"):
        _GPTHandler.files[f"/{f}.bin"] = old
        _GPTHandler.etags[f"/{f}.bin"] = '"v1"'
        _GPTHandler.cut[f"/{f}.bin"] = 100_000
        with pytest.raises(DownloadError, match=r"after 100000 of 300000 bytes \(truncated\) \(after 4"):
            download(f"{_gpt_server}/{f}.bin", tmp_path / f"{f}.bin")
        parts = list(tmp_path.glob(f"{f}.bin.*.part"))
        assert len(parts) == 1 and parts[0].stat().st_size == 100_000 and not (tmp_path / f"{f}.bin").exists()
        del _GPTHandler.cut[f"/{f}.bin"]
    assert [h.get("If-Range") for _, h in _GPTHandler.hits[:4]] == [None, '"v1"', '"v1"', '"v1"']
    download(f"{_gpt_server}/f.bin", tmp_path / "f.bin")  # resumed
    assert (tmp_path / "f.bin").read_bytes() == old
    last = _GPTHandler.hits[-1][1]
    assert (last["Range"], last["If-Range"]) == ("bytes=100000-", '"v1"')
    _GPTHandler.files["/g.bin"] = new  # changed on the server since the part was fetched
    _GPTHandler.etags["/g.bin"] = '"v2"'
    download(f"{_gpt_server}/g.bin", tmp_path / "g.bin")
    assert (tmp_path / "g.bin").read_bytes() == new and _GPTHandler.hits[-1][1]["If-Range"] == '"v1"'
    _GPTHandler.lie.add("/h.bin")
    download(f"{_gpt_server}/h.bin", tmp_path / "h.bin")
    assert (tmp_path / "h.bin").read_bytes() == old
    assert [h["Range"] for _, h in _GPTHandler.hits[-2:]] == ["bytes=100000-", None]
    assert not list(tmp_path.glob("*.part")) and not list(tmp_path.glob("*.etag"))


class _GPTFakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_gpt_progress_line_log_and_terminal(_gpt_server, tmp_path, monkeypatch, capsys):
    """plumbing.Progress: in a log, plain lines at each 10 % (done/total, rate, ETA, what an earlier run did);
    on a
    terminal one line redrawn with \r and ended by one newline; nothing when quiet or done within `delay`. The
    download of a resumed .part reports its bytes."""
    monkeypatch.setattr(plumbing.Progress, "delay", 0.0)
    log = io.StringIO()
    with plumbing.Progress("eval", 50, stream=log) as p:
        for i in range(1, 51):
            p.update(i)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and 10 <= len(lines) <= 12  # the first line, then one per 10 %
    assert re.fullmatch(r"eval: 1/50 \(2%\), [\d.]+/s, ETA \d+s", lines[0]), lines[0]
    assert lines[-1].startswith("eval: 50/50 (100%), ") and lines[-1].endswith("ETA 0s")
    log = io.StringIO()
    with plumbing.Progress("teacher", 10, done=4, stream=log) as p:
        p.update(5)
    assert log.getvalue().startswith("teacher: 5/10 (50%), 4 from an earlier run, ")
    tty = _GPTFakeTerminal()
    with plumbing.Progress("eval", 1000, stream=tty) as p:
        for i in range(1, 1001):
            p.update(i)
    out = tty.getvalue()
    assert out.startswith("\reval: 1/1000 (0%)") and out.endswith("\n") and out.count("\n") == 1
    assert out.rsplit("\r", 1)[1].startswith("eval: 1000/1000 (100%)")
    for kw in (dict(quiet=True), dict(stream=_GPTFakeTerminal())):
        stream = kw.setdefault("stream", io.StringIO())
        with plumbing.Progress("eval", 3, **kw) as p:
            if "quiet" not in kw:
                p.delay = 60.0  # short work: silent
            p.update(3)
        assert stream.getvalue() == ""
    body = os.urandom(3_000_000)
    _GPTHandler.files["/f.bin"] = body
    (tmp_path / "f.bin.0.part").write_bytes(body[:1_000_000])
    capsys.readouterr()
    download(f"{_gpt_server}/f.bin", tmp_path / "f.bin", expected_size=len(body),
             sha256=hashlib.sha256(body).hexdigest(), desc="f.bin")
    err = capsys.readouterr().err
    assert re.search(r"f.bin: 3.0/3.0 MB \(100%\), 1.0 MB from an earlier run, [\d.]+ MB/s", err), err

# -- the hub: model info listing, the Hugging Face hub cache, tokens ------------------------------


@pytest.fixture
def _gpt_hub(_gpt_server, tmp_path, monkeypatch):
    """The hub at the loopback server, an empty hub cache under tmp_path/hub, no token, online."""
    for v in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
              "HUGGINGFACE_HUB_CACHE", "DHRD_HUB_URL", "DHRD_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", _gpt_server)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    return _gpt_server


def _gpt_git_sha1(body):  # the hub's id of a file kept in git (not LFS)
    return hashlib.sha1(b"blob %d\0" % len(body) + body).hexdigest()


def _gpt_blob_name(file, body):  # what huggingface_hub names a blob: LFS files by sha256, others by git sha1
    return hashlib.sha256(body).hexdigest() if file.endswith(".safetensors") else _gpt_git_sha1(body)


def _gpt_folder(folder):
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def _gpt_serve_repo(name, files, cdn=None):
    """{file: bytes} as hub repo `name` at one commit, also branch main: the model info listing with sizes
    and hashes, resolve URLs, *.safetensors as LFS files (redirected to `cdn` when given). -> the sha."""
    sha = hashlib.sha1(name.encode()).hexdigest()
    siblings = []
    for f, body in files.items():
        path = f"/{name}/resolve/{sha}/{f}"
        _GPTHandler.files[path] = body
        if not f.endswith(".safetensors"):
            siblings.append({"rfilename": f, "size": len(body), "blobId": _gpt_git_sha1(body)})
            continue
        oid = hashlib.sha256(body).hexdigest()
        siblings.append({"rfilename": f, "size": 134, "blobId": _gpt_git_sha1(oid.encode()),
                         "lfs": {"sha256": oid, "size": len(body), "pointerSize": 134}})
        if cdn:
            _GPTHandler.redirect[path] = f"{cdn}/cdn/{oid}"
            _GPTHandler.files[f"/cdn/{oid}"] = body
    info = json.dumps({"id": name, "sha": sha, "siblings": siblings}).encode()
    for rev in ("main", sha):
        _GPTHandler.files[f"/api/models/{name}/revision/{rev}?blobs=true"] = info
    return sha


def _gpt_hf_cache(cache, name, files, sha):
    """A hub cache as huggingface_hub's `hf download` leaves it (file_download.py): blobs by hash, relative
    links in snapshots/<sha>/, refs/main holding the sha without a newline."""
    repo = cache / ("models--" + name.replace("/", "--"))
    for d in ("refs", "blobs", f"snapshots/{sha}"):
        (repo / d).mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    for f, body in files.items():
        blob = _gpt_blob_name(f, body)
        (repo / "blobs" / blob).write_bytes(body)
        (repo / "snapshots" / sha / f).symlink_to(f"../../blobs/{blob}")
    return repo


def _gpt_tree(root):
    """{path: link target, or the sha256 of a file's bytes} under root."""
    tree = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            tree[str(p.relative_to(root))] = "-> " + os.readlink(p)
        elif p.is_file():
            tree[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return tree


def _gpt_matches_ref(m, ref):
    r = _gpt_ref(ref)
    n = r["lengths"][0]
    return (m.eval().lm_logits(r["input_ids"][:1, :n]) - r["logits"][:1, :n]).abs().max() < 1e-4


def test_gpt_hub_names_resolve_into_cache(_gpt_hub, tmp_path, monkeypatch):
    """Hub names -> snapshots of the hub cache; the project's own DHRD_HUB_URL / DHRD_CACHE still name the
    hub and the cache; sharded weights; pickle-only and missing repositories, an unknown revision."""
    for v in ("HF_ENDPOINT", "HF_HUB_CACHE"):
        monkeypatch.delenv(v)
    monkeypatch.setenv("DHRD_HUB_URL", _gpt_hub)
    monkeypatch.setenv("DHRD_CACHE", str(tmp_path / "cache"))
    sha = _gpt_serve_repo("tiny/gpt2", _gpt_folder(FIX / "gpt2_hub"))
    _gpt_serve_repo("tiny/opt350", _gpt_folder(FIX / "opt350_hub"))
    assert _gpt_matches_ref(GPT.from_pretrained("tiny/gpt2"), "gpt2")
    assert resolve_model_dir("tiny/gpt2") == tmp_path / "cache" / "models--tiny--gpt2" / "snapshots" / sha
    assert hf.hub_commit(resolve_model_dir("tiny/gpt2")) == sha
    n = len(_GPTHandler.hits)
    assert load_tokenizer("tiny/gpt2").encode("Hello") == load_tokenizer(FIX / "gpt2_hub").encode("Hello")
    assert len(_GPTHandler.hits) == n  # second use: served from the cache, no network
    assert _gpt_matches_ref(GPT.from_pretrained("tiny/opt350"), "opt350")  # sharded, fp16
    pickle = {f: (FIX / "gpt2" / f).read_bytes() for f in ("config.json", "vocab.json", "merges.txt")}
    _gpt_serve_repo("tiny/pickle", {**pickle, "pytorch_model.bin": b"\x80\x02"})
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        GPT.from_pretrained("tiny/pickle")
    bad = _gpt_serve_repo("tiny/bad", pickle)
    _GPTHandler.files[f"/tiny/bad/resolve/{bad}/config.json"] = b" " * len(pickle["config.json"])
    with pytest.raises(CheckpointError, match=r"tiny/bad: .*config.json: git blob sha1 \w+ is not the "
                       rf"expected {_gpt_git_sha1(pickle['config.json'])}; the file was removed"):
        load_tokenizer("tiny/bad")  # a file kept in git (not LFS) is checked by its blob id
    assert list((tmp_path / "cache" / "models--tiny--bad" / "blobs").iterdir()) == []  # no blob, no part
    with pytest.raises(CheckpointError, match="tiny/absent: no such local folder, and no model tiny/absent "
                                              r"with revision 'main' on http://127.0.0.1:\d+ \(HTTP 404"):
        GPT.from_pretrained("tiny/absent")
    with pytest.raises(CheckpointError, match="no model tiny/gpt2 with revision 'v9'"):
        resolve_model_dir("tiny/gpt2", revision="v9")


def test_gpt_hub_listing_retried_then_reported(_gpt_hub, tmp_path):
    """HTTP 429 then success: the listing is asked again and the model loads. A listing that keeps failing
    is reported after 4 tries, never skipped (the sizes and hashes come from it)."""
    listing = "/api/models/tiny/gpt2/revision/main?blobs=true"
    _GPTHandler.fail[listing] = [429]
    sha = _gpt_serve_repo("tiny/gpt2", _gpt_folder(FIX / "gpt2_hub"))
    assert hf.hub_commit(resolve_model_dir("tiny/gpt2")) == sha
    assert [p for p, _ in _GPTHandler.hits[:2]] == [listing, listing]
    _gpt_serve_repo("tiny/opt350", _gpt_folder(FIX / "opt350_hub"))
    _GPTHandler.fail["/api/models/tiny/opt350/revision/main?blobs=true"] = [503] * 4
    with pytest.raises(CheckpointError, match=r"tiny/opt350: .*HTTP 503 .*\(after 4 tries\)"):
        resolve_model_dir("tiny/opt350")
    assert not (tmp_path / "hub" / "models--tiny--opt350").exists()


def test_gpt_hub_token_gated_and_cross_host_redirect(_gpt_hub, tmp_path, monkeypatch):
    """A gated repo: no token and a wrong token give the one gated/private line; the token file that `hf
    auth login` writes (or HF_TOKEN) gets it. The token goes to the hub's host, also across a redirect on
    it, never to the CDN host a redirect names, and it is written nowhere."""
    cdn = _gpt_hub.replace("127.0.0.1", "localhost")  # another host name: the token must not go there
    sha = _gpt_serve_repo("gated/gpt2", _gpt_folder(FIX / "gpt2_hub"), cdn=cdn)
    moved = "/gated/moved/config.json"  # a redirect on the hub itself keeps the token
    _GPTHandler.redirect[f"/gated/gpt2/resolve/{sha}/config.json"] = _gpt_hub + moved
    _GPTHandler.files[moved] = (FIX / "gpt2_hub" / "config.json").read_bytes()
    _GPTHandler.private = ("/api/models/gated/", "/gated/")
    _GPTHandler.token = "hf_right"
    with pytest.raises(CheckpointError, match=r"gated/gpt2: HTTP 401: the model is gated or private .*no "
                       rf"token was found .*Accept its licence at {_gpt_hub}/gated/gpt2 .*set HF_TOKEN"):
        GPT.from_pretrained("gated/gpt2")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(CheckpointError, match=r"HTTP 403: the model is gated .*the token sent .*was refused"
                       ) as e:
        GPT.from_pretrained("gated/gpt2")
    assert "hf_wrong" not in str(e.value) and "\n" not in str(e.value)
    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "hf_home").mkdir()
    (tmp_path / "hf_home" / "token").write_text("hf_right\n")  # as `hf auth login` writes it
    _GPTHandler.hits.clear()
    assert _gpt_matches_ref(GPT.from_pretrained("gated/gpt2"), "gpt2")
    auth = {p: h.get("Authorization") for p, h in _GPTHandler.hits}
    assert auth[moved] == "Bearer hf_right" and auth["/api/models/gated/gpt2/revision/main?blobs=true"]
    assert {v for p, v in auth.items() if p.startswith("/gated/")} == {"Bearer hf_right"}
    cdn_hits = [p for p in auth if p.startswith("/cdn/")]
    assert cdn_hits and not any(auth[p] for p in cdn_hits)
    assert not any(b"hf_right" in f.read_bytes() for f in (tmp_path / "hub").rglob("*") if f.is_file())


def test_gpt_hub_cache_shared_with_huggingface_hub(_gpt_hub, tmp_path, monkeypatch):
    """Downloads land in the hub cache exactly as huggingface_hub lays it out (compared with a cache built
    here as `hf download` leaves it); such a cache loads with no server running; HF_HUB_OFFLINE never asks
    the hub, and a file missing there is one line."""
    files = _gpt_folder(FIX / "gpt2_hub")
    sha = _gpt_serve_repo("tiny/gpt2", files)
    assert _gpt_matches_ref(GPT.from_pretrained("tiny/gpt2"), "gpt2")
    built = _gpt_hf_cache(tmp_path / "built", "tiny/gpt2", files, sha)
    assert _gpt_tree(tmp_path / "hub" / "models--tiny--gpt2") == _gpt_tree(built)
    assert list((tmp_path / "hub" / ".locks" / "models--tiny--gpt2").iterdir())  # huggingface_hub's locks
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "built"))
    monkeypatch.setenv("HF_ENDPOINT", _gpt_dead_url())  # no server
    for rev in ("main", sha):
        assert resolve_model_dir("tiny/gpt2", revision=rev) == built / "snapshots" / sha
    assert _gpt_matches_ref(GPT.from_pretrained("tiny/gpt2"), "gpt2")
    assert load_tokenizer("tiny/gpt2").encode("Hello") == load_tokenizer(FIX / "gpt2_hub").encode("Hello")
    monkeypatch.setenv("HF_ENDPOINT", _gpt_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (built / "snapshots" / sha / "model.safetensors").unlink()
    _GPTHandler.hits.clear()
    assert load_tokenizer("tiny/gpt2").encode("Hello")  # the tokenizer is all there
    with pytest.raises(CheckpointError, match=r"tiny/gpt2: HF_HUB_OFFLINE is set and the hub cache has no "
                       rf"complete copy of revision 'main' in {built}/snapshots/{sha} "):
        GPT.from_pretrained("tiny/gpt2")
    with pytest.raises(CheckpointError, match=rf"revision 'v2' in {built} "):
        load_tokenizer("tiny/gpt2", revision="v2")
    assert _GPTHandler.hits == []


def test_gpt_hub_two_processes_one_copy(_gpt_hub, tmp_path):
    """Two processes fetch one model at once: each file is downloaded once, the other process waits at its
    lock and uses it; one intact copy, no temporary files. The weights' answer is held until a process says
    that it waits for them, so the two overlap by construction."""
    files = _gpt_folder(FIX / "gpt2_hub")
    sha = _gpt_serve_repo("tiny/gpt2", files)
    weights = f"/tiny/gpt2/resolve/{sha}/model.safetensors"
    _GPTHandler.hold[weights] = threading.Event()
    code = "import hf; print(hf.resolve_model_dir('tiny/gpt2'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    waits = threading.Event()
    errs = [[], []]

    def read(p, out):
        for line in p.stderr:
            out.append(line)
            if "waiting for another process to finish downloading tiny/gpt2/model.safetensors" in line:
                waits.set()
    readers = [threading.Thread(target=read, args=(p, e), daemon=True) for p, e in zip(procs, errs)]
    for r in readers:
        r.start()
    assert waits.wait(120), errs
    _GPTHandler.hold[weights].set()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert outs == [f"{tmp_path / 'hub' / 'models--tiny--gpt2' / 'snapshots' / sha}\n"] * 2
    got = [p for p, _ in _GPTHandler.hits if "/resolve/" in p]
    assert sorted(got) == sorted(f"/tiny/gpt2/resolve/{sha}/{f}" for f in files)  # each file once
    built = _gpt_hf_cache(tmp_path / "built", "tiny/gpt2", files, sha)
    assert _gpt_tree(tmp_path / "hub" / "models--tiny--gpt2") == _gpt_tree(built)

# ============================================================================================================
# prepare.py: synth, SuperGLUE templates, custom data, rationales, teachers, bad input
# ============================================================================================================

def _prep_files(d):
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(d).iterdir())}


def _prep_decode(d, split):
    """Round trip: the memory-mapped record layout back to (x text, suffix text, label, group) per example."""
    meta = json.loads((pathlib.Path(d) / "meta.json").read_text())
    tok = prepare.tokenizer_from_meta(meta)
    b = np.memmap(pathlib.Path(d) / f"{split}.bin", dtype=meta["token_dtype"], mode="r")
    idx = np.load(pathlib.Path(d) / f"{split}.idx.npy")
    out = []
    for start, x_len, n, label, group in idx.tolist():
        ids = b[start:start + n].tolist()
        # minus BOS/EOS
        x, suffix = ids[int(tok.bos_id is not None):x_len], ids[x_len:n - 1 if n > x_len else n]
        out.append((ids, tok.decode(x), tok.decode(suffix), label, group))
    return meta, tok, idx, out


def test_prep_synth_deterministic_and_layout(tmp_path):
    m1 = prepare.prepare(task="synth", out_dir=tmp_path / "a", quiet=True)
    prepare.prepare(task="synth", out_dir=tmp_path / "b", quiet=True)
    assert _prep_files(tmp_path / "a") == _prep_files(tmp_path / "b")          # byte-identical
    assert set(_prep_files(tmp_path / "a")) == {f"{s}.{e}" for s in ("train", "val", "test")
                                                for e in ("bin", "idx.npy", "jsonl")} | {"meta.json"}
    assert m1["counts"] == {"train": prepare.SYNTH["n_train"], "val": prepare.SYNTH["n_val"],
                            "test": prepare.SYNTH["n_test"]}
    texts = {}
    for split in ("train", "val", "test"):
        meta, tok, idx, exs = _prep_decode(tmp_path / "a", split)
        rows = [json.loads(l) for l in (tmp_path / "a" / f"{split}.jsonl").read_text().splitlines()]
        assert idx.dtype == np.int64 and idx.shape == (len(rows), 5)
        assert (prepare.START, prepare.X_LEN, prepare.N, prepare.LABEL,
                prepare.GROUP) == (0, 1, 2, 3, 4)  # the documented layout
        start, n = prepare.START, prepare.N
        assert (idx[1:, start] == idx[:-1, start] + idx[:-1, n]).all()           # contiguous, in order
        for (ids, x, suffix, label, group), r in zip(exs, rows):
            assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
            assert x == r["text"] and meta["labels"][label] == r["label"] and group == r["idx"]
            assert suffix == f"\nReasoning:\n{r['rationale']}\nFinal Answer:\n{r['label']}"
            # the label follows from the last value the rationale computes
            last = int(r["rationale"].rsplit("=", 1)[1])
            assert r["label"] == ("Yes" if last > prepare.SYNTH["mod"] // 2 - 1 else "No")
        assert abs(np.bincount(idx[:, prepare.LABEL]).tolist()[0] - len(rows) / 2) <= 1   # balanced labels
        texts[split] = {r["text"] for r in rows}
    assert not (texts["train"] & texts["val"]) and not (texts["train"] & texts["test"])


def test_prep_synth_rationale_values_are_correct(tmp_path):
    prepare.prepare(task="synth", out_dir=tmp_path, quiet=True)
    for line in (tmp_path / "val.jsonl").read_text().splitlines()[:200]:
        r = json.loads(line)
        env, mod = {}, prepare.SYNTH["mod"]
        stmts = r["text"].split(";")[0].split(",")
        for s in stmts:
            v, expr = s.split("=")
            env[v] = eval(expr, {}, dict(env)) % mod
        assert r["rationale"] == ",".join(f"{s.split('=')[0]}={env[s.split('=')[1][0]]}{s.split('=')[1][1]}"
                                          f"{env.get(s.split('=')[1][2:], s.split('=')[1][2:])}"
                                          f"={env[s.split('=')[0]]}"
                                          for s in stmts[1:])


# ---------------------------------------------------------------------------------------------------------
# SuperGLUE: tiny files in the official jsonl layout

_PREP_SG = {
    "CB": [dict(premise="It rained all day.", hypothesis="The ground is wet.", label="entailment", idx=0),
           dict(premise="He left early.", hypothesis="He stayed late.", label="contradiction", idx=1),
           dict(premise="She bought a car.", hypothesis="The car is red.", label="neutral", idx=2)],
    "RTE": [dict(premise="Paris is in France.", hypothesis="Paris is French.", label="entailment", idx=0),
            dict(premise="Cats meow.", hypothesis="Dogs meow.", label="not_entailment", idx=1)],
    "BoolQ": [dict(question="is the sky blue", passage="Sky -- The sky is blue.", label=True, idx=0),
              dict(question="is grass red", passage="Grass -- Grass is green.", label=False, idx=1)],
    "COPA": [dict(premise="The man turned on the faucet.", choice1="The toilet filled.",
                  choice2="Water flowed.", question="effect", label=1, idx=0),
             dict(premise="I was cold.", choice1="I wore a coat.", choice2="I ate soup.", question="cause",
                  label=0, idx=1)],
    "MultiRC": [dict(idx=0, version=1.1, passage=dict(
        text="Tom has two cats. He feeds them fish.", questions=[
            dict(question="How many cats?", idx=0,
                 answers=[dict(text="two", idx=0, label=1), dict(text="three", idx=1, label=0),
                          dict(text="2", idx=2, label=1)]),
            dict(question="What do they eat?", idx=1,
                 answers=[dict(text="fish", idx=3, label=1), dict(text="rice", idx=4, label=0)])]))],
    "WiC": [dict(word="bank", sentence1="He sat on the bank.", sentence2="The bank raised rates.", idx=0,
                 label=False, start1=14, end1=18, start2=4, end2=8, version=1.1)],
    "WSC": [dict(text="Mark told Pete he was late.",
                 target=dict(span1_index=0, span1_text="Mark", span2_index=3, span2_text="he"),
                 idx=0, label=True)],
}


def _prep_write_sg(root, drop=()):
    for folder, rows in _PREP_SG.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for split in ("train", "val", "test"):
            if (folder, split) in drop:
                continue
            rs = [{k: v for k, v in r.items() if k != "label"} for r in rows] if split == "test" else rows
            if folder == "MultiRC" and split == "test":
                rs = [json.loads(json.dumps(rows[0]).replace(', "label": 1', "").replace(', "label": 0', ""))]
            (root / folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return root


def _prep_rows(d, split):
    return [json.loads(l) for l in (pathlib.Path(d) / f"{split}.jsonl").read_text().splitlines()]


def test_prep_superglue_templates_and_mappings(tmp_path):
    sg = _prep_write_sg(tmp_path / "sg")
    m = prepare.prepare(task="cb", data_dir=sg, out_dir=tmp_path / "cb", model="char", quiet=True)
    assert (m["labels"] == ["No", "Yes"] and m["metric"] == "cb"
            and m["counts"] == dict(train=3, val=3, test=3))
    r = _prep_rows(tmp_path / "cb", "train")
    assert r[0]["text"] == ("Passage:\nIt rained all day.\nQuestion:\n"
                            "Is the hypothesis entailed by the premise?"
                            "\nAnswer:\nThe ground is wet.\nIs the answer correct Yes or No?")  # App. E.2
    assert prepare.format_input("cb", _PREP_SG["CB"][0]) == [r[0]["text"]]                # dhrd.py --predict
    assert prepare.format_input("multirc", _PREP_SG["MultiRC"][0])[3].endswith(
        "Answer:\nfish\nIs the answer correct Yes or No?")
    assert prepare.format_input("custom", {"text": "as is"}) == ["as is"]
    assert ([x["label"] for x in r] == ["Yes", "No", "No"]
            and [x["label"] for x in _prep_rows(tmp_path / "cb", "test")] == [None] * 3)
    meta, tok, idx, exs = _prep_decode(tmp_path / "cb", "train")
    # label-only suffix, no rationale
    assert exs[0][2] == "\nFinal Answer:\nYes" and exs[0][1] == r[0]["text"]
    _, _, tidx, texs = _prep_decode(tmp_path / "cb", "test")
    assert (tidx[:, prepare.X_LEN] == tidx[:, prepare.N]).all()                  # test: x only,
    assert (tidx[:, prepare.LABEL] == -1).all()                                  # label unknown
    m = prepare.prepare(task="cb", fmt="native", data_dir=sg, out_dir=tmp_path / "cbn", model="char",
                        quiet=True)
    assert (m["labels"] == ["entailment", "contradiction", "neutral"]
            and m["verbalizers"]["neutral"] == "Maybe")
    assert ([x["label"] for x in _prep_rows(tmp_path / "cbn", "train")]
            == ["entailment", "contradiction", "neutral"])
    assert _prep_rows(tmp_path / "cbn", "train")[0]["text"].endswith(
        "Is the answer correct Yes, No or Maybe?")
    # COPA: one example per alternative, grouped by pair; native: one example per pair
    m = prepare.prepare(task="copa", data_dir=sg, out_dir=tmp_path / "copa", model="char", quiet=True)
    r = _prep_rows(tmp_path / "copa", "train")
    assert m["metric"] == "copa" and [(x["group"], x["label"]) for x in r] == [(0, "No"), (0, "Yes"),
                                                                               (1, "Yes"), (1, "No")]
    assert "Question:\nWhat happened as a result?\nAnswer:\nWater flowed." in r[1]["text"]
    assert np.load(tmp_path / "copa" / "train.idx.npy")[:, prepare.GROUP].tolist() == [0, 0, 1, 1]
    m = prepare.prepare(task="copa", fmt="native", data_dir=sg, out_dir=tmp_path / "copan", model="char",
                        quiet=True)
    assert (m["metric"] == "accuracy"
            and [x["label"] for x in _prep_rows(tmp_path / "copan", "train")] == ["choice2", "choice1"])
    # MultiRC: one example per candidate answer, group = question
    prepare.prepare(task="multirc", data_dir=sg, out_dir=tmp_path / "mrc", model="char", quiet=True)
    r = _prep_rows(tmp_path / "mrc", "train")
    assert [(x["group"], x["label"]) for x in r] == [(0, "Yes"), (0, "No"), (0, "Yes"), (1, "Yes"), (1, "No")]
    assert r[3]["text"].endswith(
        "Question:\nWhat do they eat?\nAnswer:\nfish\nIs the answer correct Yes or No?")
    assert [x["label"] for x in _prep_rows(tmp_path / "mrc", "test")] == [None] * 5
    for task, label, frag in [("rte", "No", "Answer:\nDogs meow."),
                              ("boolq", "No", "Question:\nis grass red?"),
                              ("wsc", "Yes", 'Question:\nDoes the pronoun "he" refer to "Mark"?'
                                             '\nAnswer:\nYes'),
                              ("wic", "No", '1. He sat on the *bank*. 2. The *bank* raised rates.\n'
                                            'Question:\nDoes the word "bank" have the same meaning')]:
        prepare.prepare(task=task, data_dir=sg, out_dir=tmp_path / task, model="char", quiet=True)
        r = _prep_rows(tmp_path / task, "val")
        assert r[-1]["label"] == label and frag in r[-1]["text"], (task, r[-1])


def test_prep_boolq_without_train_splits_val(tmp_path):
    rows = [dict(question=f"q{i}", passage=f"P -- text {i}", label=i % 3 == 0, idx=i) for i in range(10)]
    (tmp_path / "BoolQ").mkdir()
    (tmp_path / "BoolQ" / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = prepare.prepare(task="boolq", data_dir=tmp_path, out_dir=tmp_path / "o", model="char", quiet=True)
    assert m["counts"] == dict(train=8, val=2) and "train" in m["split_note"]
    assert [r["text"].split("\n")[3]
            for r in _prep_rows(tmp_path / "o", "val")] == ["q0?", "q5?"]  # Question:


def test_prep_truncation_shortens_passage_keeps_question(tmp_path):
    rows = [dict(premise="word " * 200, hypothesis="The final hypothesis stays.", label="entailment", idx=0),
            dict(premise="short.", hypothesis="Also kept.", label="not_entailment", idx=1)]
    (tmp_path / "RTE").mkdir()
    for s in ("train", "val"):
        (tmp_path / "RTE" / f"{s}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = prepare.prepare(task="rte", data_dir=tmp_path, out_dir=tmp_path / "o", model="char", max_len=300,
                        quiet=True)
    assert m["shortened"] == 2 and m["max_len"]["train"]["x"] == 300                   # 1 per split
    meta, tok, idx, exs = _prep_decode(tmp_path / "o", "train")
    assert idx[0, prepare.X_LEN] == 300
    assert exs[0][1].endswith("Answer:\nThe final hypothesis stays.\nIs the answer correct Yes or No?")
    assert (exs[0][1].startswith("Passage:\nword word")
            and exs[1][1] == _prep_rows(tmp_path / "o", "train")[1]["text"])
    with pytest.raises(prepare.PrepareError, match="raise --max_len"):
        prepare.prepare(task="rte", data_dir=tmp_path, out_dir=tmp_path / "o2", model="char", max_len=40,
                        quiet=True)


# ---------------------------------------------------------------------------------------------------------
# custom data, rationale import, ablations

def _prep_custom(tmp_path):
    (tmp_path / "train.csv").write_text("text,label,rationale\n\"good, fine\",pos,nice words\n"
                                        "awful,neg,bad words\ngreat,pos,\nmeh,neg,dull\n")
    (tmp_path / "val.jsonl").write_text('{"text": "ok", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n')
    (tmp_path / "test.json").write_text('[{"text": "what"}, {"text": "so so", "label": "neg"}]')
    return dict(train_file=tmp_path / "train.csv", val_file=tmp_path / "val.jsonl",
                test_file=tmp_path / "test.json")


def test_prep_custom_formats_and_labels(tmp_path):
    m = prepare.prepare(task="custom", out_dir=tmp_path / "o", model="char", quiet=True,
                        **_prep_custom(tmp_path))
    assert m["labels"] == ["neg", "pos"] and m["counts"] == dict(train=4, val=2, test=2)
    assert set(m["sources"]) == {"train.csv", "val.jsonl", "test.json"} and m["rationale_source"] == "file"
    r = _prep_rows(tmp_path / "o", "train")
    assert [(x["text"], x["label"], x["rationale"]) for x in r] == [
        ("good, fine", "pos", "nice words"), ("awful", "neg", "bad words"), ("great", "pos", None),
        ("meh", "neg", "dull")]
    _, _, idx, exs = _prep_decode(tmp_path / "o", "train")
    assert exs[0][2] == "\nReasoning:\nnice words\nFinal Answer:\npos" and exs[2][2] == "\nFinal Answer:\npos"
    assert [x["label"] for x in _prep_rows(tmp_path / "o", "test")] == [None, "neg"]
    m = prepare.prepare(task="custom", out_dir=tmp_path / "o", model="char", quiet=True,
                        **{**_prep_custom(tmp_path), "test_file": None})  # rerun without a test file
    assert m["counts"] == dict(train=4, val=2) and not list((tmp_path / "o").glob("test.*"))
    m = prepare.prepare(task="custom", out_dir=tmp_path / "clip", model="char", max_rationale=4, quiet=True,
                        **_prep_custom(tmp_path))
    assert (m["rationale_clipped"] == 2
            and _prep_decode(tmp_path / "clip", "train")[3][0][2] == "\nReasoning:\nnice\nFinal Answer:\npos")
    # integer labels sort numerically; evidence-binding recipe: --text_field=sentence --filter=status=verified
    (tmp_path / "ev.csv").write_text("sentence,status,label\nA holds.,verified,10\nB maybe.,draft,2\n"
                                     "C holds.,verified,2\n")
    m = prepare.prepare(task="custom", train_file=tmp_path / "ev.csv", val_file=tmp_path / "ev.csv",
                        text_field="sentence", filter="status=verified", out_dir=tmp_path / "ev",
                        model="char", quiet=True)
    assert m["labels"] == ["2", "10"] and m["counts"] == dict(train=2, val=2)
    assert m["dropped"] == {"train/filtered": 1, "val/filtered": 1}
    assert [x["text"] for x in _prep_rows(tmp_path / "ev", "train")] == ["A holds.", "C holds."]


def test_prep_rationale_import_and_ablations(tmp_path):
    files = _prep_custom(tmp_path)
    lines = [dict(task="custom", split="train", idx=0, rationale="  first reason ", label="pos"),
             dict(task="custom", split="train", idx=1, rationale="second reason", label="neg"),
             dict(task="custom", split="train", idx=2, rationale="wrong side", label="neg"),     # disagrees
             dict(task="custom", split="train", idx=3, rationale="", label="neg"),               # empty
             dict(task="custom", split="val", idx=0, rationale="no answer given"),              # answer-less
             dict(task="custom", split="val", idx=1, rationale="says so", label="Neg. Clearly"),  # agrees
             dict(task="custom", split="test", idx=1, rationale="says not", label="negative"),    # disagrees
             dict(task="other", split="train", idx=0, rationale="ignored", label="x")]
    rf = tmp_path / "r.jsonl"
    rf.write_text("".join(json.dumps(l) + "\n" for l in lines))
    m = prepare.prepare(task="custom", out_dir=tmp_path / "o", model="char", rationales=rf, quiet=True,
                        **files)
    assert m["dropped"] == {"rationales/disagree": 2, "rationales/empty": 1, "rationales/no_answer": 1}
    assert [x["rationale"] for x in _prep_rows(tmp_path / "o", "val")] == [None, "says so"]
    assert m["rationale_source"] == "file:r.jsonl" and "r.jsonl" in m["sources"]
    r = _prep_rows(tmp_path / "o", "train")
    # CSV rationale kept for 3
    assert [x["rationale"] for x in r] == ["first reason", "second reason", None, "dull"]
    _, _, _, exs = _prep_decode(tmp_path / "o", "train")
    assert exs[1][2] == "\nReasoning:\nsecond reason\nFinal Answer:\nneg"
    m = prepare.prepare(task="custom", out_dir=tmp_path / "a", model="char", rationales=rf,
                        ablation="only_label", quiet=True, **files)
    assert m["ablation"] == "only_label"
    _, _, _, exs = _prep_decode(tmp_path / "a", "train")
    assert [e[2] for e in exs] == ["\nFinal Answer:\npos", "\nFinal Answer:\nneg", "\nFinal Answer:\npos",
                                   "\nFinal Answer:\nneg"]
    outs = {}
    for abl in ("shuffle_reasoning", "shuffle_reasoning_label"):
        for seed in (1, 1, 5):
            prepare.prepare(task="custom", out_dir=tmp_path / abl, model="char", rationales=rf, ablation=abl,
                            seed=seed, quiet=True, **files)
            outs.setdefault(abl, []).append(_prep_files(tmp_path / abl))
            _, _, idx, exs = _prep_decode(tmp_path / abl, "train")
            assert idx[:, prepare.LABEL].tolist() == [1, 0, 1, 0]  # class labels stay gold
            suffixes = [e[2].split("\nFinal Answer:\n") for e in exs if "Reasoning" in e[2]]
            assert sorted(s[0] for s in suffixes) == sorted(
                "\nReasoning:\n" + r for r in ("first reason", "second reason", "dull"))
            pairs = {("\nReasoning:\nfirst reason", "pos"), ("\nReasoning:\nsecond reason", "neg"),
                     ("\nReasoning:\ndull", "neg")}
            if abl == "shuffle_reasoning_label":
                assert {tuple(s) for s in suffixes} == pairs  # answer moves with its rationale
        assert outs[abl][0] == outs[abl][1]  # seeded
    # a different seed shuffles differently
    assert outs["shuffle_reasoning"][0] != outs["shuffle_reasoning"][2]


def _prep_esnli(root, n=20):
    """A tiny e-SNLI in the distilling-step-by-step layout: valid (train + val) and test rows, their PaLM
    completions split over 2 files for valid (CoT_0, CoT_1: read in numeric order)."""
    base = root / "esnli"
    (base / "llm").mkdir(parents=True)
    answers = ["entailment", "neutral", "contradiction"]
    for split, k in (("valid", n), ("test", 4)):
        rows = [dict(premise=f"A man {i} sits.", hypothesis=f"Someone {i} rests.", label=i % 3,
                     explanation_1=f"human reason {i}" if i != 3 else "  ", explanation_2="x")
                for i in range(k)]
        (base / f"esnli_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        said = [answers[0] if i == 1 else answers[i % 3] for i in range(k)]  # row 1's answer disagrees
        cot = [f"palm reason {i}\nAnswer: {said[i]}\n\nPremise: more" for i in range(k)]
        cot[2] = "no marker at all"
        halves = [cot] if split == "test" else [cot[:k // 2], cot[k // 2:]]
        for f, part in enumerate(halves):
            (base / "llm" / f"{split}_CoT_{f}.json").write_text(json.dumps(part))
    return root


def test_prep_distill_palm_and_human_rationales(tmp_path):
    """e-SNLI: train = valid without every 10th row, val = every 10th; --rationale_source=palm keeps the PaLM
    rationale only when its answer is the gold label, =human takes the dataset's explanation_1."""
    data = _prep_esnli(tmp_path / "dss")
    m = prepare.prepare(task="esnli", data_dir=data, out_dir=tmp_path / "palm", model="char", quiet=True)
    assert m["counts"] == dict(train=18, val=2, test=4)
    assert m["dropped"] == {"valid/disagree": 1, "valid/no_answer": 1, "test/disagree": 1,
                            "test/no_answer": 1}
    assert m["rationale_source"].startswith("palm-540b") and "esnli/llm/valid_CoT_1.json" in m["sources"]
    train = _prep_rows(tmp_path / "palm", "train")  # valid rows 1..9, 11..19
    assert [r["rationale"] for r in train[:3]] == [None, None, "palm reason 3"]
    assert train[9]["rationale"] == "palm reason 11"  # the second CoT file continues the first
    m = prepare.prepare(task="esnli", data_dir=data, out_dir=tmp_path / "human", model="char",
                        rationale_source="human", quiet=True)
    assert m["rationale_source"] == "human (explanation_1)"
    assert m["dropped"] == {"valid/empty": 1, "test/empty": 1}
    assert not any("llm" in k for k in m["sources"])
    train = _prep_rows(tmp_path / "human", "train")
    assert [r["rationale"] for r in train[:3]] == ["human reason 1", "human reason 2", None]
    assert [r["text"] for r in train] == [r["text"] for r in _prep_rows(tmp_path / "palm", "train")]
    with pytest.raises(prepare.PrepareError, match="--rationale_source=human is for the distilling-step-by"):
        prepare.prepare(task="synth", out_dir=tmp_path / "s", rationale_source="human", quiet=True)
    with pytest.raises(prepare.PrepareError, match="unknown --rationale_source=gpt; use palm or human"):
        prepare.prepare(task="esnli", data_dir=data, out_dir=tmp_path / "x", rationale_source="gpt",
                        quiet=True)


def test_prep_distill_downloads_pinned_files(tmp_path, monkeypatch):
    """A missing distilling-step-by-step file is fetched from DISTILL_URL and checked against its pinned size
    and sha256 (a changed file is refused, one line naming it); what is there already is not fetched."""
    src = _prep_esnli(tmp_path / "src")
    pins = {p.relative_to(src).as_posix(): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(src.rglob("*.json"))}
    got = []

    class Hub(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(src), **kw)

        def log_message(self, *a):
            got.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(prepare, "DISTILL_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(prepare, "DISTILL_FILES", pins)
    try:
        data = tmp_path / "data"
        prepare.prepare(task="esnli", data_dir=data, out_dir=tmp_path / "human", model="char",
                        rationale_source="human", quiet=True)  # human: the rows only, no PaLM files
        assert sorted(got) == ["/esnli/esnli_test.json", "/esnli/esnli_valid.json"]
        got.clear()
        prepare.prepare(task="esnli", data_dir=data, out_dir=tmp_path / "human", model="char",
                        rationale_source="human", quiet=True)
        assert got == []  # the rows are there (one of their files is): a local copy, used as it is
        prepare.prepare(task="esnli", data_dir=data, out_dir=tmp_path / "palm", model="char", quiet=True)
        assert len(got) == 3 and all((data / rel).read_bytes() == (src / rel).read_bytes() for rel in pins)
        ref = prepare.prepare(task="esnli", data_dir=src, out_dir=tmp_path / "ref", model="char", quiet=True)
        assert json.loads((tmp_path / "palm" / "meta.json").read_text())["sources"] == ref["sources"]
        shutil.rmtree(data / "esnli" / "llm")
        size, _ = pins["esnli/llm/test_CoT_0.json"]
        pins["esnli/llm/test_CoT_0.json"] = (size, "0" * 64)  # the source changed
        with pytest.raises(prepare.PrepareError, match=r"llm/test_CoT_0.json: not found, and downloading it "
                           r"failed \(.*sha256"):
            prepare.prepare(task="esnli", data_dir=data, out_dir=tmp_path / "bad", model="char", quiet=True)
        assert not (data / "esnli" / "llm" / "test_CoT_0.json").exists()
    finally:
        server.shutdown()


# ---------------------------------------------------------------------------------------------------------
# teacher over an OpenAI-compatible API: a fake /v1/chat/completions on 127.0.0.1

def _prep_server(handler_fn):
    """A loopback server; handler_fn(path, headers, body) -> (status, payload) or (status, payload,
    headers)."""
    import http.server, threading

    class H(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            code, payload, *more = handler_fn(self.path, self.headers, body)
            self.send_response(code)
            for k, v in (more[0] if more else {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload if isinstance(payload, bytes) else json.dumps(payload).encode())

        def do_GET(self):
            code, payload = handler_fn(self.path, self.headers, None)
            self.send_response(code)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def test_prep_teacher_api_retries_drops_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare, "RETRY_BASE", 0.01)
    monkeypatch.setenv("PREP_TEST_KEY", "sk-secret-123")
    rows = [dict(text=f"item {k}", label="pos" if k % 2 == 0 else "neg") for k in range(8)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls, broken, seen = {}, {7}, {}

    def handle(path, headers, body):
        assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sk-secret-123"
        assert body["model"] == "tiny-teacher"
        prompt = body["messages"][0]["content"]
        assert "[END OF REASONING]" in prompt and "2 to 5 sentences" in prompt
        k = int(prompt.split("item ")[1].split()[0])
        gold = prompt.split("Correct answer: ")[1].strip()
        calls[k] = calls.get(k, 0) + 1
        other = "neg" if gold == "pos" else "pos"
        ok = lambda txt: (200, {"choices": [{"message": {"content": txt}}]})
        if k in broken:
            return 500, {"error": "down"}
        seen[k] = seen.get(k, []) + [time.monotonic()]
        if k == 3 and calls[k] == 1:                              # transient: 429 with Retry-After, 500,
            return 429, {"error": "slow down"}, {"Retry-After": "1"}  # a body that is not JSON
        if k in (4, 5) and calls[k] == 1:
            return {4: (500, {"error": "oops"}), 5: (200, b"not json")}[k]
        return ok({1: f"Reasoning for {k}.\n[END OF REASONING]\nAnswer: {other}",  # disagrees with gold
                   2: "I forgot the marker. Answer: pos",  # answer-less
                   6: "[END OF REASONING]\nAnswer: pos"}.get(
                       k, f"Step one for {k}. Step two.\n[END OF REASONING]\nAnswer: {gold}."))

    srv, url = _prep_server(handle)
    kw = dict(task="custom", train_file=tmp_path / "t.jsonl", val_file=tmp_path / "t.jsonl", model="char",
              teacher_url=url + "/v1", teacher_model="tiny-teacher", api_key_env="PREP_TEST_KEY",
              teacher_workers=3, out_dir=tmp_path / "o", quiet=True)
    try:
        m = prepare.prepare(**kw)  # item 7 fails for good: not written
        rf = tmp_path / "o" / "rationales.jsonl"
        assert sorted(json.loads(l)["idx"] for l in rf.read_text().splitlines()) == list(range(7))
        assert m["dropped"] == {"rationales/disagree": 1, "rationales/no_answer": 1, "rationales/empty": 1}
        assert m["rationale_source"] == "teacher:tiny-teacher"
        assert calls[3] == calls[4] == calls[5] == 2 and calls[0] == 1 and calls[7] == 6
        assert seen[3][1] - seen[3][0] >= 1.0  # Retry-After: 1 honoured (the backoff alone: 0.005..0.015 s)
        r = _prep_rows(tmp_path / "o", "train")
        assert (r[0]["rationale"] == "Step one for 0. Step two."
                and r[5]["rationale"] == "Step one for 5. Step two.")
        assert [x["rationale"] is None for x in r] == [False, True, True, False, False, False, True, True]
        for p in (tmp_path / "o").iterdir():
            assert b"sk-secret-123" not in p.read_bytes()
        # resume after a kill mid-line: the partial line goes, existing ids are skipped, only the rest is
        # asked for
        lines = rf.read_text().splitlines(keepends=True)
        rf.write_text("".join(lines[:4]) + lines[4][:10])
        broken.clear()
        before = dict(calls)
        monkeypatch.setattr(plumbing.Progress, "delay", 0.0)
        capsys.readouterr()
        m = prepare.prepare(**{**kw, "quiet": False})  # with its progress line: done/total, the resumed part
        err = capsys.readouterr().err
        assert re.search(r"prepare.py: teacher rationales \(rationales.jsonl\): 8/8 \(100%\), 4 from an "
                         r"earlier run, [\d.]+/s", err), err
        got = [json.loads(l)["idx"] for l in rf.read_text().splitlines()]
        assert sorted(got) == list(range(8)) and len(got) == 8
        done_first = {json.loads(l)["idx"] for l in lines[:4]}
        assert {k for k in calls if calls[k] != before.get(k)} == set(range(8)) - done_first
        assert _prep_rows(tmp_path / "o", "train")[7]["rationale"] == "Step one for 7. Step two."
        before = dict(calls)
        prepare.prepare(**kw)
        assert calls == before  # nothing generated twice
    finally:
        srv.shutdown()


def test_prep_teacher_api_backoff_and_ctrl_c(tmp_path, monkeypatch, capsys):
    """The backoff: RETRY_BASE * 2**attempt with jitter (x 0.5..1.5), a server's Retry-After in seconds or as
    an HTTP date (+ up to 20 %). Ctrl-C cancels the queue: the call ends at once although the requests in
    flight hang, the rationales written so far stay whole, the queued ones were never sent, and a rerun asks
    only for the rest."""
    monkeypatch.setattr(prepare, "RETRY_BASE", 1.0)
    delays = [prepare.retry_delay(3, None) for _ in range(50)]
    assert all(4.0 <= x <= 12.0 for x in delays) and len(set(delays)) > 40
    assert 7.0 <= prepare.retry_delay(0, "7") <= 8.4
    assert 95 <= prepare.retry_delay(0, email.utils.formatdate(time.time() + 100, usegmt=True)) <= 121
    assert prepare.retry_delay(0, "-5") == prepare.retry_delay(0, "nan") == 0.0
    assert 0.5 <= prepare.retry_delay(0, "soon") <= 1.5  # unparsable: the backoff
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(dict(text=f"item {k}", label="pos")) + "\n"
                                              for k in range(8)))
    rf = tmp_path / "o" / "rationales.jsonl"
    asked = []
    release = threading.Event()
    lock = threading.Lock()
    main = threading.main_thread().ident

    def handle(path, headers, body):
        k = int(body["messages"][0]["content"].split("item ")[1].split()[0])
        with lock:
            asked.append((body["model"], k))  # the model's name tells the two runs apart
            n = len(asked)
        if n > 2:  # the third request: Ctrl-C once the first two are written; it and the 4th hang
            t0 = time.monotonic()
            while (not rf.exists() or len(rf.read_text().splitlines()) < 2) and time.monotonic() - t0 < 30:
                time.sleep(0.01)
            if n == 3:
                signal.pthread_kill(main, signal.SIGINT)
            release.wait(60)
        return 200, {"choices": [{"message": {"content": f"Why {k}.\n[END OF REASONING]\nAnswer: pos"}}]}

    srv, url = _prep_server(handle)
    kw = dict(task="custom", train_file=tmp_path / "t.jsonl", val_file=tmp_path / "t.jsonl", model="char",
              teacher_url=url + "/v1", teacher_model="m", teacher_workers=2, out_dir=tmp_path / "o",
              quiet=True)
    try:
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            prepare.prepare(**kw)
        assert time.monotonic() - t0 < 20  # not the 60 s the hanging requests take
        assert "prepare.py: interrupted: 2 of 8 rationales are in " in capsys.readouterr().err
        written = sorted(json.loads(l)["idx"] for l in rf.read_text().splitlines())
        assert written == sorted(k for _, k in asked[:2])
        release.set()
        prepare.prepare(**{**kw, "teacher_model": "again"})
        assert sorted(json.loads(l)["idx"] for l in rf.read_text().splitlines()) == list(range(8))
        assert {k for m, k in asked if m == "m"} <= set(range(4))  # 2 written, 2 in flight at most: the
        assert sorted(k for m, k in asked if m == "again") == sorted(set(range(8)) - set(written))  # rest
        # was cancelled, never sent
    finally:
        release.set()
        srv.shutdown()


# ---------------------------------------------------------------------------------------------------------
# bad input: one clean message naming file, line and field

def test_prep_bad_input_messages(tmp_path):
    sg = _prep_write_sg(tmp_path / "sg")
    cb = sg / "CB" / "train.jsonl"
    good = cb.read_text()
    run = lambda **kw: prepare.prepare(**{**dict(task="cb", data_dir=sg, out_dir=tmp_path / "o", model="char",
                                                 quiet=True), **kw})
    cb.write_text(good + '{"premise": "x", "hypothesis": \n')
    with pytest.raises(prepare.PrepareError, match=r"CB/train.jsonl:4: malformed JSON"):
        run()
    cb.write_text(good + '{"premise": "x", "label": "neutral", "idx": 3}\n')
    with pytest.raises(prepare.PrepareError, match=r"CB/train.jsonl:4: missing field 'hypothesis'"):
        run()
    cb.write_text(good + '{"premise": "x", "hypothesis": "y", "label": "maybe", "idx": 3}\n')
    with pytest.raises(prepare.PrepareError, match=r"CB/train.jsonl:4: unknown label 'maybe'.*"
                                                   r"known labels: entailment, contradiction, neutral"):
        run()
    cb.write_text("\n")
    with pytest.raises(prepare.PrepareError, match=r"CB/train.jsonl: no examples"):
        run()
    cb.write_text(good)
    files = _prep_custom(tmp_path)
    (tmp_path / "bad.csv").write_text("text,label\nfine,pos\nnope,weird\n")
    with pytest.raises(prepare.PrepareError,
                       match=r"bad.csv:3: unknown label 'weird'.*known labels \(from train\): neg, pos"):
        prepare.prepare(task="custom", out_dir=tmp_path / "c", model="char",
                        **{**files, "val_file": tmp_path / "bad.csv"})
    (tmp_path / "nolabel.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "b"}\n')
    with pytest.raises(prepare.PrepareError, match=r"nolabel.jsonl:2: missing field 'label'"):
        prepare.prepare(task="custom", out_dir=tmp_path / "c", model="char",
                        **{**files, "train_file": tmp_path / "nolabel.jsonl"})
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(prepare.PrepareError, match=r"empty.csv: split 'val' is empty"):
        prepare.prepare(task="custom", out_dir=tmp_path / "c", model="char",
                        **{**files, "val_file": tmp_path / "empty.csv"})
    (tmp_path / "r.jsonl").write_text('{"task": "custom", "split": "train", "idx": 0, "rationale": "a", '
                                      '"label": "pos"}\n'
                                      '{"task": "custom", "split": "train", "rationale": "b"}\n')
    with pytest.raises(prepare.PrepareError, match=r"r.jsonl:2: missing field 'idx'"):
        prepare.prepare(task="custom", out_dir=tmp_path / "c", model="char", rationales=tmp_path / "r.jsonl",
                        **files)
    (tmp_path / "r.jsonl").write_text('{"task": "custom", "split": "train", "idx": 99, "rationale": "b", '
                                      '"label": "pos"}\n')
    with pytest.raises(prepare.PrepareError, match=r"r.jsonl:1: no example split='train' idx=99"):
        prepare.prepare(task="custom", out_dir=tmp_path / "c", model="char", rationales=tmp_path / "r.jsonl",
                        **files)
    # the CLI: a bad flag raises ConfigError, bad input PrepareError (prepare.py's __main__: one line,
    # exit 2 / 1)
    bad_cb = ["--task=cb", f"--data_dir={sg}", "--model=char", "--format=weird"]
    for argv, err, msg in [(["--task=nope"], prepare.PrepareError, "unknown --task=nope"),
                           (["--bogus=1"], plumbing.ConfigError, "--bogus: unknown config key 'bogus'"),
                           (["cb"], plumbing.ConfigError, "argument 'cb': use --key=value"),
                           (["--task=synth", "--max_len=big"], plumbing.ConfigError,
                            "--max_len: expected int for max_len (like 512), got 'big'"),
                           (bad_cb, prepare.PrepareError, "unknown --format=weird")]:
        with pytest.raises(err, match=re.escape(msg)):
            prepare.main(argv)


def test_prep_flags_parser_rules(tmp_path):
    """plumbing.parse_flags, the one --key=value parser of every script: types follow the defaults."""
    defaults = dict(quiet=False, n=3, lr=1e-3, alpha=1.0, name="a", dtype="auto", out=None)
    choices = dict(dtype=("auto", "float32"), alpha=("auto",))   # alpha: a float, or the string auto

    def parse(*argv):
        return plumbing.parse_flags(list(argv), defaults, choices)

    assert parse() == {}
    got = parse("--quiet=TRUE", "--n=7", "--lr=2", "--name=b=c", "--out=x", "--dtype=float32")
    assert got == dict(quiet=True, n=7, lr=2.0, name="b=c", out="x", dtype="float32")
    assert type(got["lr"]) is float
    for text, want in (("true", True), ("False", False), ("1", True), ("0", False)):
        assert parse(f"--quiet={text}") == {"quiet": want}
    assert parse("--alpha=auto") == {"alpha": "auto"} and parse("--alpha=0.5") == {"alpha": 0.5}
    for arg, msg in [("--quiet=yes",
                      "--quiet: expected bool for quiet (like False), got 'yes'; use true, false"),
                     ("--quiet=", "--quiet: expected bool for quiet (like False), got ''"),
                     ("--n=3.5", "--n: expected int for n (like 3), got '3.5'"),
                     ("--lr=fast", "--lr: expected float for lr (like 0.001), got 'fast'"),
                     ("--alpha=half",
                      "--alpha: expected float for alpha (like 1.0), got 'half'; or use auto"),
                     ("--dtype=fp8", "--dtype: dtype='fp8' is not one of auto, float32"),
                     ("--nmae=b",
                      "--nmae: unknown config key 'nmae'; did you mean name? (keys: quiet, n, lr,"),
                     ("--quiet", "argument '--quiet': use --key=value"),
                     ("quiet=1",
                      "argument 'quiet=1': use --key=value, or give the path of a JSON config file")]:
        with pytest.raises(plumbing.ConfigError, match=re.escape(msg)):
            parse(arg)
    # JSON config files (positional) and flags apply in order, later wins; JSON values keep their JSON type
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(dict(n=5, lr=1, quiet=True, alpha="auto")))
    b.write_text(json.dumps(dict(n=6, out=None)))
    assert parse(str(a), "--n=9", str(b)) == dict(n=6, lr=1.0, quiet=True, alpha="auto", out=None)
    assert parse(str(a), "--n=9")["n"] == 9
    for obj, msg in [({"quiet": "yes"}, "a.json: expected bool for quiet (like False), got 'yes'"),
                     ({"quiet": 1}, "a.json: expected bool for quiet (like False), got 1"),
                     ({"n": 2.0}, "a.json: expected int for n (like 3), got 2.0"),
                     ({"nn": 1}, "a.json: unknown config key 'nn'; did you mean n"),
                     ([1], "a.json: a config file is one JSON object")]:
        a.write_text(json.dumps(obj))
        with pytest.raises(plumbing.ConfigError, match=re.escape(msg)):
            parse(str(a))
    a.write_text("{broken")
    with pytest.raises(plumbing.ConfigError, match=re.escape("a.json: cannot read the config file")):
        parse(str(a))
    # the command line: one line on stderr, exit status 2 for a bad flag and 1 for bad input, no traceback
    for arg, code, line in [("--quiet=yes", 2,
                             "prepare.py: error: --quiet: expected bool for quiet (like False)"),
                            ("--task=nope", 1, "prepare.py: error: unknown --task=nope; use synth")]:
        p = subprocess.run([sys.executable, str(ROOT / "prepare.py"), arg], cwd=tmp_path, capture_output=True,
                           text=True, timeout=120)
        assert p.returncode == code and len(p.stderr.splitlines()) == 1, p.stderr
        assert p.stderr.startswith(line), p.stderr


# ---------------------------------------------------------------------------------------------------------
# BPE tokenizers (the tiny fixture folders in tests/fixtures) and the SuperGLUE download on loopback

def test_prep_bpe_tokenizers_bos_and_truncation(tmp_path):
    sg = _prep_write_sg(tmp_path / "sg")
    long = dict(premise="The committee discussed the budget at length. " * 60,
                hypothesis="The budget was discussed.", label="entailment", idx=9)
    (sg / "RTE" / "train.jsonl").write_text((sg / "RTE" / "train.jsonl").read_text() + json.dumps(long)
                                            + "\n")
    for name, has_bos in (("tok_gpt2", False), ("tok_opt", True)):
        folder = ROOT / "tests" / "fixtures" / name
        m = prepare.prepare(task="rte", data_dir=sg, out_dir=tmp_path / name, model=str(folder), max_len=128,
                            quiet=True)
        assert m["tokenizer"] == {"type": "bpe", "name": str(folder), "revision": None}  # not from the hub
        assert m["token_dtype"] == "uint16"
        meta, tok, idx, exs = _prep_decode(tmp_path / name, "train")
        assert (m["bos_id"] is not None) == has_bos and m["shortened"] == 1 and idx[2, prepare.X_LEN] == 128
        rows = _prep_rows(tmp_path / name, "train")
        for (ids, x, suffix, label, group), r, x_len in zip(exs, rows, idx[:, prepare.X_LEN]):
            assert (ids[0] == tok.bos_id) == has_bos and ids[-1] == tok.eos_id
            assert x == r["text"] and suffix == "\nFinal Answer:\n" + r["label"]
            assert ids[:x_len] == ([tok.bos_id] if has_bos else []) + tok.encode(r["text"])
        assert exs[2][1].endswith("\nAnswer:\nThe budget was discussed.\nIs the answer correct Yes or No?")


def test_prep_superglue_download_from_loopback(tmp_path, monkeypatch):
    import io, zipfile
    src = _prep_write_sg(tmp_path / "src")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in sorted((src / "CB").iterdir()):
            z.writestr(f"CB/{f.name}", f.read_bytes())
        z.writestr("__MACOSX/CB/._train.jsonl", b"junk")
    served = []

    def handle(path, headers, body):
        served.append(path)
        return (200, buf.getvalue()) if path == "/CB.zip" else (404, b"no")

    srv, url = _prep_server(handle)
    try:
        monkeypatch.setattr(prepare, "SUPERGLUE_URL", url)
        m = prepare.prepare(task="cb", data_dir=tmp_path / "dl", out_dir=tmp_path / "o", model="char",
                            quiet=True)
        assert m["counts"] == dict(train=3, val=3, test=3) and served == ["/CB.zip"]
        assert sorted(p.name for p in (tmp_path / "dl").rglob("*")) == ["CB", "test.jsonl", "train.jsonl",
                                                                        "val.jsonl"]
        assert m["sources"]["CB/train.jsonl"] == prepare.sha256(src / "CB" / "train.jsonl")
        prepare.prepare(task="cb", data_dir=tmp_path / "dl", out_dir=tmp_path / "o", model="char", quiet=True)
        assert served == ["/CB.zip"]  # present now: no second fetch
        with pytest.raises(prepare.PrepareError,
                           match=r"RTE/val.jsonl not found and downloading .*/RTE.zip failed"):
            prepare.prepare(task="rte", data_dir=tmp_path / "dl", out_dir=tmp_path / "o", model="char",
                            quiet=True)
    finally:
        srv.shutdown()


def test_prep_local_teacher_batched_generate_and_resume(tmp_path, monkeypatch):
    """--teacher=DIR: gpt.py's batched, left-padded generate; one line per train example; a rerun generates
    nothing."""
    monkeypatch.setattr(prepare, "TEACHER_PROMPT", "{x} => {y}:")  # short: the tiny model has 64 positions
    rows = [dict(text=t, label=l) for t, l in (("a cat", "pos"), ("the long dog ran", "neg"), ("x", "pos"))]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    real = prepare.GPT.generate
    monkeypatch.setattr(prepare.GPT, "generate",
                        lambda self, idx, *a, **k: calls.append(idx.shape) or real(self, idx, *a, **k))
    kw = dict(task="custom", train_file=tmp_path / "t.jsonl", val_file=tmp_path / "t.jsonl", model="char",
              teacher=str(ROOT / "tests" / "fixtures" / "gpt2"), teacher_max_new_tokens=6, quiet=True,
              # exact batch == one-at-a-time below; bf16 rounding depends on the shapes
              teacher_dtype="float32")
    texts = {}
    for batch in (3, 1):
        m = prepare.prepare(out_dir=tmp_path / f"b{batch}", teacher_batch=batch, **kw)
        lines = [json.loads(l)
                 for l in (tmp_path / f"b{batch}" / "rationales.jsonl").read_text().splitlines()]
        assert [l["idx"] for l in lines] == [0, 1, 2] and m["rationale_source"].startswith("teacher:")
        assert sum(m["dropped"].values()) == 3                   # a random tiny model never writes the marker
        texts[batch] = [l["rationale"] for l in lines]
        assert all(texts[batch])                                # it did generate text
    assert len(calls) == 4 and calls[0][0] == 3 and texts[3] == texts[1]  # left-padded batch == one at a time
    prepare.prepare(out_dir=tmp_path / "b3", teacher_batch=3, **kw)
    assert len(calls) == 4                                                  # resume: nothing generated twice
    with pytest.raises(prepare.PrepareError, match=r"needs \d+ \+ 60 tokens, more than its 64 positions"):
        prepare.prepare(out_dir=tmp_path / "long", **{**kw, "teacher_max_new_tokens": 60})
    with pytest.raises(prepare.PrepareError, match="unknown --teacher_dtype=fp8; use auto"):
        prepare.prepare(out_dir=tmp_path / "bad", **{**kw, "teacher_dtype": "fp8"})
    prepare.prepare(out_dir=tmp_path / "bf16", **{**kw, "teacher_dtype": "bfloat16"})  # runs in bf16 weights
    assert len((tmp_path / "bf16" / "rationales.jsonl").read_text().splitlines()) == 3


def test_prep_durable_writes_full_disk_and_cut_swaps(tmp_path, monkeypatch):
    """plumbing.atomic_write: a full disk (ENOSPC) removes the temporary and raises WriteError naming the
    file, the old file intact; a download cut off (DownloadError, an OSError without errno) keeps its .part to
    resume. recover_dir after each state a killed replace_dir can leave. prepare.py on a full disk: one
    line, no data.tmp, the old outputs intact."""
    path = tmp_path / "f.txt"
    path.write_text("old")

    def full(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(plumbing.WriteError, match=r"f.txt: cannot be written \(No space left on device\); "
                                                  r"the partial f.txt.tmp was removed") as e:
        plumbing.atomic_write(path, full)
    assert "\n" not in str(e.value) and path.read_text() == "old" and not (tmp_path / "f.txt.tmp").exists()

    def cut(part):
        part.write_text("first half")
        raise DownloadError("http://x/f: connection reset")
    with pytest.raises(DownloadError):
        plumbing.atomic_write(path, cut, suffix=".part")
    assert (tmp_path / "f.txt.part").read_text() == "first half" and path.read_text() == "old"
    # recover_dir: (no d, d.old, d.tmp) = cut between the renames -> d.tmp is d; (no d, d.old) -> d.old is d;
    # (d, d.tmp, d.old) -> both stale
    d = tmp_path / "d"
    for present, kept in [(("old", "tmp"), "tmp"), (("old",), "old"), (("", "tmp", "old"), "")]:
        for suffix in present:
            (tmp_path / f"d{'.' + suffix if suffix else ''}").mkdir()
            (tmp_path / f"d{'.' + suffix if suffix else ''}" / "which").write_text(suffix)
        plumbing.recover_dir(d)
        assert (d / "which").read_text() == kept and sorted(p.name for p in tmp_path.glob("d*")) == ["d"]
        shutil.rmtree(d)
    out = tmp_path / "data"
    prepare.prepare(task="synth", out_dir=out, quiet=True)
    before = _crash_files(out)
    real = np.save

    def no_space(*a, **k):
        real(*a, **k)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(np, "save", no_space)
    with pytest.raises(plumbing.WriteError, match=r"data: cannot be written \(No space left on device\); the "
                                                  r"partial data.tmp was removed") as e:
        prepare.prepare(task="synth", out_dir=out, max_rationale=8, quiet=True)
    assert "\n" not in str(e.value) and _crash_files(out) == before and not (tmp_path / "data.tmp").exists()


# The crash tests (SQLite's way): a script runs under _CRASH, which SIGKILLs it (or sends a signal) at points
# the test names, counted per process: the n-th optimizer step ("step"), pooled-head forward of an evaluation
# ("classify"), os.replace onto a file named `name` ("replace", or "replaced": just after it), or os.replace /
# os.fsync of any file ("io"). Then the test starts it again and compares bytes. The script itself has no test
# hook; n = 0 counts: "crash-count <n>" on stderr at the end.
_CRASH = r"""
import atexit, json, os, runpy, signal, sys, time
from pathlib import Path
root, script = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)
import torch, gpt
specs = [s for s in json.loads(os.environ["DHRD_CRASH"])
         if str(s.get("rank", os.environ.get("RANK", "0"))) == os.environ.get("RANK", "0")
         and str(s.get("attempt", "0")) == os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")]
counts = [0] * len(specs)

def reached(at, name=None):
    for i, s in enumerate(specs):
        if s["at"] == at and s.get("name") in (None, name):
            counts[i] += 1
            if counts[i] == s["n"]:
                act(s)

def act(s):
    sig = s.get("signal", "SIGKILL")
    if sig == "SIGTERM_PARENT":  # torchrun forwards it to every worker; wait until it reached this one
        os.kill(os.getppid(), signal.SIGTERM)
        t0 = time.time()
        while sys.modules["__main__"].PREEMPTION.signal == 0 and time.time() - t0 < 120:
            time.sleep(0.01)
        return
    os.kill(os.getpid(), getattr(signal, sig))

def patch(owner, attr, at, named=False, after=None):
    real = getattr(owner, attr)
    def wrapped(*a, **k):
        name = Path(a[1]).name if named else None
        reached(at, name)
        out = real(*a, **k)
        if after is not None:
            reached(after, name)
        return out
    setattr(owner, attr, wrapped)

patch(torch.optim.AdamW, "step", "step")
patch(gpt.GPT, "classify", "classify")
patch(os, "replace", "replace", named=True, after="replaced")
patch(os, "replace", "io")
patch(os, "fsync", "io")
if any(s["n"] == 0 for s in specs):
    atexit.register(lambda: print(f"crash-count {counts[0]}", file=sys.stderr, flush=True))
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def crash_script(tmp_path_factory):
    path = tmp_path_factory.mktemp("crash") / "crash.py"
    path.write_text(_CRASH)
    return path


def _crash_run(crash_script, script, args, specs, cwd, torchrun=False):
    """script (dhrd.py / prepare.py) with args under _CRASH with these kill specs -> CompletedProcess."""
    cmd = [sys.executable, str(crash_script), str(ROOT), str(ROOT / script), *args]
    if torchrun:
        cmd = [*TORCHRUN, "--max-restarts=2", str(crash_script), str(ROOT), str(ROOT / script), *args]
    env = {**os.environ, "DHRD_CRASH": json.dumps(specs), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _crash_files(folder):
    """{relative path: bytes} of every file under folder."""
    folder = pathlib.Path(folder)
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_prep_crash_at_random_points_then_rerun_is_byte_identical(crash_script, tmp_path, monkeypatch):
    """A re-prepare (new settings over an old prepare, a teacher's rationales.jsonl beside it) SIGKILLed at 3
    seeded random points among its fsyncs and renames and once between the two renames of its swap, each time
    started again: after every kill the old outputs or the new ones are whole (a cut swap: the new ones in
    data.tmp, which the next start puts in place), never a mix; the last run's are byte-identical to an
    uninterrupted prepare's, and rationales.jsonl is untouched."""
    prepare.prepare(task="synth", out_dir=tmp_path / "clean", quiet=True)
    want = _crash_files(tmp_path / "clean")
    out = tmp_path / "data"
    prepare.prepare(task="synth", out_dir=out, max_rationale=8, quiet=True)  # the old settings
    before = _crash_files(out)
    assert before != want
    rationales = b'{"task": "synth", "split": "train", "idx": 0, "rationale": "r", "label": "No"}\n'
    (out / "rationales.jsonl").write_bytes(rationales)  # not an output of this prepare: it must stay
    calls = []  # an uninterrupted re-prepare's fsyncs and renames, the points to kill at
    for name in ("fsync", "replace"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, real=real: calls.append(a) or real(*a))
    shutil.copytree(out, tmp_path / "count")
    prepare.prepare(task="synth", out_dir=tmp_path / "count", quiet=True)
    monkeypatch.undo()
    assert len(calls) == 15  # 10 outputs + rationales.jsonl, data.tmp, 2 renames, data's parent folder
    points = [{"at": "io", "n": n} for n in sorted(random.Random(0).sample(range(1, len(calls) + 1), 3))]
    points.insert(1, {"at": "replace", "name": "data", "n": 1})  # data.tmp -> data, after data -> data.old
    for spec in points:
        r = _crash_run(crash_script, "prepare.py", ["--task=synth", f"--out_dir={out}"], [spec], tmp_path)
        assert r.returncode == -9, (spec, r.stderr)
        if out.exists():
            seen = _crash_files(out)
        else:  # cut between the renames: the new outputs are whole in data.tmp, the old ones in data.old
            seen = _crash_files(out.with_name("data.tmp"))
            old_meta = _crash_files(out.with_name("data.old"))["meta.json"]
            assert old_meta in (before["meta.json"], want["meta.json"])
        assert seen.pop("rationales.jsonl") == rationales, spec
        assert seen in (before, want), spec
    prepare.prepare(task="synth", out_dir=out, quiet=True)
    got = _crash_files(out)
    assert got.pop("rationales.jsonl") == rationales and got == want
    assert not out.with_name("data.tmp").exists() and not out.with_name("data.old").exists()


# ============================================================================================================
# dhrd.py: metrics, config errors, DDP == single process, exact resume, grad stats, eval/predict, compile
# ============================================================================================================

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=8", "--dtype=float32",
        "--eval_batch_size=256", "--warmup_iters=2", "--learning_rate=3e-3"]


def _train_run(*args, cwd, timeout=600, check=True, env=None):
    r = subprocess.run([sys.executable, str(ROOT / "dhrd.py"), *args], cwd=cwd, capture_output=True,
                       text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def _train_log(out_dir, key="loss"):
    lines = (pathlib.Path(out_dir) / "log.jsonl").read_text().splitlines()
    return [json.loads(l) for l in lines if key in json.loads(l)]


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
    # COPA: per pair the alternative with the higher P(Yes) is chosen; correct if its gold is Yes (pos=1).
    # pair 0: option 0 (right); pair 1: option 2 (wrong); pair 2: option 4 (right)
    gold = np.array([1, 0, 0, 1, 1, 0])
    p_yes = np.array([0.4, 0.3, 0.9, 0.8, 0.2, 0.1])
    probs = np.stack([1 - p_yes, p_yes], 1)
    pairs = np.array([0, 0, 1, 1, 2, 2])
    assert dhrd.metrics("copa", probs, gold, pairs, pos=1) == {"accuracy": pytest.approx(2 / 3)}
    # an unparsed CoT answer (zero row) is wrong, never class 0
    probs = np.array([[0.0, 0.0], [0.0, 1.0]])
    assert dhrd.metrics("accuracy", probs, np.array([0, 1]), np.arange(2)) == {"accuracy": 0.5}


def test_train_config_errors(tmp_path):
    """dhrd.py's keys and choices through the shared parser (its rules: test_prep_flags_parser_rules), the
    checks of parse_config, and the command line's one-line error."""
    r = _train_run("--learning_rat=1e-3", cwd=tmp_path, check=False)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stderr.startswith("dhrd.py: error: --learning_rat: unknown config key 'learning_rat'"), r.stderr
    assert "did you mean learning_rate" in r.stderr
    for arg, msg in [("--max_iters=ten", "--max_iters: expected int for max_iters (like 600), got 'ten'"),
                     ("--alpha=x", "--alpha: expected float for alpha (like 1.0), got 'x'; or use auto"),
                     ("--lr_decay=step", "--lr_decay: lr_decay='step' is not one of cosine, linear"),
                     ("--batch_size=0", "must be >= 1")]:
        with pytest.raises(dhrd.ConfigError, match=re.escape(msg)):
            dhrd.parse_config([arg])
    assert dhrd.parse_config(["--alpha=auto"]).alpha == "auto"
    (tmp_path / "d.json").write_text(json.dumps({"batch_size": 4, "alpha": 0}))
    cfg = dhrd.parse_config([str(tmp_path / "d.json"), "--batch_size=7"])  # later wins; an int is a float
    assert (cfg.batch_size, cfg.alpha, cfg.out_dir, cfg.data_dir) == (7, 0.0, "out-synth", "data/synth")
    with pytest.raises(dhrd.ConfigError, match="nowhere/meta.json: not found.*prepare.py --task=cb"):
        dhrd.main(["--task=cb", "--data_dir=nowhere"])


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _train_torchrun(*args, cwd, popen=False, check=True, nproc=2):
    """dhrd.py in 2 Gloo processes (one thread each: the test machine has 2 cores); popen: started, not
    waited for, in its own process group (so a kill reaches torchrun's workers too); check: exit status 0."""
    cmd = [*TORCHRUN[:-1], f"--nproc_per_node={nproc}", str(ROOT / "dhrd.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_train_ddp_and_fsdp_two_processes_match_one(train_data, tmp_path):
    """2 Gloo processes x 1 micro-step == 1 process x 2 micro-steps: same samples per step, same losses, for
    DDP and for FSDP2 (--fsdp=True); FSDP's ckpt.pt, gathered on rank 0, has the 1-process layout and
    values."""
    flags = [*TINY, f"--data_dir={train_data}", "--gradient_accumulation_steps=2", "--max_iters=4",
             "--log_interval=1", "--eval_interval=2", "--dropout=0.0"]
    _train_run(*flags, f"--out_dir={tmp_path / 'one'}", cwd=tmp_path)
    _train_torchrun(*flags, f"--out_dir={tmp_path / 'two'}", cwd=tmp_path)
    r = _train_torchrun(*flags, "--fsdp=True", f"--out_dir={tmp_path / 'fsdp'}", cwd=tmp_path)
    assert "| global batch 16 = 2 processes x 1 micro-batches x 8 (fsdp) |" in r.stdout, r.stdout
    one = _train_log(tmp_path / "one")
    for run in ("two", "fsdp"):
        two = _train_log(tmp_path / run)
        assert [l["iter"] for l in one] == [l["iter"] for l in two] == [1, 2, 3, 4]
        for a, b in zip(one, two):
            for k in ("loss", "loss_cls", "loss_lm"):
                assert abs(a[k] - b[k]) < 1e-5, (run, k, a, b)
    assert len({l["loss"] for l in one}) == 4  # the losses move: the comparison means something
    a, b = (torch.load(tmp_path / run / "ckpt.pt", weights_only=True) for run in ("one", "fsdp"))
    assert a.keys() == b.keys() and a["model"].keys() == b["model"].keys() and a["iter"] == b["iter"] == 4
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) < 1e-5
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, st in oa["state"].items():
        for k, v in st.items():
            assert (v.float() - ob["state"][i][k].float()).abs().max() < 1e-5, (i, k)
    assert (tmp_path / "fsdp" / "model" / "model.safetensors").exists()
    for run in ("two", "fsdp"):  # validation, each rank its share of val (FSDP: the model gathered on both)
        assert [l["iter"] for l in _train_log(tmp_path / run, "val")] == [2, 4]  # logged once, by rank 0
        res = json.loads((tmp_path / run / "results.json").read_text())
        assert dhrd.main([f"--init_from={tmp_path / run}", "--eval_only=True"]) == res["val"], run


def test_train_torchrun_evaluation_equals_one_process(trained_run, train_data, _gpt_hub, tmp_path, capsys):
    """Evaluation under torchrun (each rank its share of the length-sorted batches, gathered in input order)
    equals one process's exactly (fp32, CPU): --eval_only of a 1-process run in 2 processes (its config.json
    recorded gradient_accumulation_steps=1: no training layout to check) prints the run's metrics and report;
    a CoT model (--beta=0) trained in 2 processes logs the val metrics that 1 process computes from its
    export; --predict with it in 3 processes, 8 batches dealt 3 + 3 + 2, loaded by hub name from a loopback
    hub, writes the bytes 1 process writes, and every file was downloaded once (local rank 0 first)."""
    run = trained_run[0] / "full"
    res = json.loads((run / "results.json").read_text())
    r = _train_torchrun(f"--init_from={run}", "--eval_only=True", cwd=tmp_path)
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert (got["val"], got["report"]) == (res["val"], res["report"])
    cot = tmp_path / "cot"
    _train_torchrun(*TINY, f"--data_dir={train_data}", f"--out_dir={cot}", "--beta=0", "--cot_tokens=40",
                    "--batch_size=16", "--learning_rate=1e-2", "--max_iters=40", "--eval_interval=40",
                    "--log_interval=40", cwd=tmp_path)
    res = json.loads((cot / "results.json").read_text())
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one process here, one thread as each torchrun worker: quick on a busy machine
    try:
        dhrd.main([f"--init_from={cot}", "--eval_only=True"])  # beta=0, cot_tokens=40: the run's config.json
        got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (got["val"], got["report"]) == (res["val"], res["report"])
        assert sum(sum(row[:-1]) for row in res["report"]["confusion"]) > 0  # some decoded answers parse
        flags = [f"--predict={tmp_path / 'in.jsonl'}", f"--data_dir={train_data}", "--beta=0",
                 "--cot_tokens=40", "--eval_batch_size=64"]  # 500 rows: 8 batches
        rows = [json.loads(l) for l in (train_data / "val.jsonl").read_text().splitlines()]
        (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
        dhrd.main([f"--init_from={cot / 'model'}", *flags, f"--predictions={tmp_path / 'one.jsonl'}"])
    finally:
        torch.set_num_threads(threads)
    repo = tmp_path / "repo"
    shutil.copytree(cot / "model", repo)
    for f in ("vocab.json", "merges.txt"):  # what a hub repo has; the model reads meta.json's char tokenizer
        shutil.copy(FIX / "gpt2" / f, repo)
    sha = _gpt_serve_repo("tiny/cot", _gpt_folder(repo))
    _train_torchrun("--init_from=tiny/cot", *flags, f"--predictions={tmp_path / 'three.jsonl'}", cwd=tmp_path,
                    nproc=3)
    one = (tmp_path / "one.jsonl").read_text()
    assert (tmp_path / "three.jsonl").read_text() == one
    labels = [json.loads(l)["label"] for l in one.splitlines()]
    assert len(labels) == 500 and None in labels and {"No", "Yes"} & set(labels)
    paths = [p for p, _ in _GPTHandler.hits]
    assert paths.count(f"/tiny/cot/resolve/{sha}/model.safetensors") == 1 and len(paths) == len(set(paths))


def test_train_fsdp_resume_after_kill_and_across_ddp(train_data, tmp_path):
    """FSDP checkpoints resume exactly and are interchangeable with one process's: a 1-process run killed
    after its first checkpoint, resumed under FSDP, and an FSDP run killed likewise, resumed in 1 process,
    both end where the uninterrupted 1-process run ends (losses within 1e-5, the same results)."""
    flags = [*TINY, f"--data_dir={train_data}", "--gradient_accumulation_steps=2", "--max_iters=20",
             "--eval_interval=5", "--log_interval=1", "--dropout=0.0"]
    _train_run(*flags, f"--out_dir={tmp_path / 'full'}", cwd=tmp_path)
    _train_kill_after_first_ckpt(flags, tmp_path / "one-killed", tmp_path)
    _train_torchrun("--init_from=resume", f"--out_dir={tmp_path / 'one-killed'}", "--fsdp=True", cwd=tmp_path)
    out = tmp_path / "fsdp-killed"
    p = _train_torchrun(*flags, "--fsdp=True", f"--out_dir={out}", cwd=tmp_path, popen=True)
    t0 = time.time()
    while not (out / "ckpt.pt").exists() and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    os.killpg(p.pid, 9)
    p.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] < 20
    _train_run("--init_from=resume", f"--out_dir={out}", "--fsdp=False", cwd=tmp_path)
    full = _train_weights(tmp_path / "full")
    res = json.loads((tmp_path / "full" / "results.json").read_text())
    log = _train_log(tmp_path / "full")
    for run in ("one-killed", "fsdp-killed"):
        w = _train_weights(tmp_path / run)
        # 2 ranks average gradients in another order than 1 process's accumulation: 1.04e-5 after 20 steps
        assert max((full[k] - w[k]).abs().max().item() for k in full) < 1e-4, run
        assert json.loads((tmp_path / run / "results.json").read_text()) == res, run
        for a, b in zip(log, _train_log(tmp_path / run), strict=True):
            assert a["iter"] == b["iter"] and abs(a["loss"] - b["loss"]) < 1e-5, (run, a, b)


def test_train_fsdp_refuses_what_it_cannot_do(train_data, tmp_path):
    base = [*TINY, f"--data_dir={train_data}", f"--out_dir={tmp_path / 'x'}", "--fsdp=True"]
    for args, msg in [([], "launch it as `torchrun --nproc_per_node=N dhrd.py --fsdp=True"),
                      (["--lora_rank=4"], "--fsdp=True with --lora_rank: not supported"),
                      (["--dtype=float16"], "--fsdp=True with float16"),
                      (["--alpha=auto"], "--fsdp=True with --grad_stats or --alpha=auto")]:
        with pytest.raises(dhrd.ConfigError, match=re.escape(msg)):
            dhrd.main([*base, *args])


def _train_weights(out_dir):
    return torch.load(pathlib.Path(out_dir) / "ckpt.pt", weights_only=True)["model"]


@pytest.fixture(scope="module")
def trained_run(train_data, tmp_path_factory):
    """An uninterrupted run (dropout on, so RNG restore matters): what resume, eval_only and predict
    compare to."""
    d = tmp_path_factory.mktemp("run")
    flags = [*TINY, f"--data_dir={train_data}", "--max_iters=40", "--eval_interval=5", "--log_interval=1",
             "--dropout=0.1"]
    _train_run(*flags, f"--out_dir={d / 'full'}", cwd=d)
    return d, flags


def _train_kill_after_first_ckpt(flags, out, cwd):
    """Start dhrd.py and kill -9 it as soon as its first checkpoint exists (before it can finish)."""
    p = subprocess.Popen([sys.executable, str(ROOT / "dhrd.py"), *flags, f"--out_dir={out}"], cwd=cwd,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (out / "ckpt.pt").exists() and p.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)
    p.kill()
    p.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"


def test_train_resume_after_kill_is_exact(trained_run):
    d, flags = trained_run
    out = d / "killed"
    _train_kill_after_first_ckpt(flags, out, d)
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] < 40
    assert set(ckpt) == {"model", "model_config", "optimizer", "scaler", "iter", "data_pos", "best", "rng",
                         "alpha"}  # what resume reads (+ kl_ref with --kl_coef and full fine-tuning)
    _train_run("--init_from=resume", f"--out_dir={out}", cwd=d)
    full = _train_weights(d / "full")
    resumed = _train_weights(out)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    res = [json.loads((x / "results.json").read_text()) for x in (d / "full", out)]
    assert res[0] == res[1] and res[0]["val"]["accuracy"] > 0
    assert _train_log(d / "full") == _train_log(out)  # the log after the kill was trimmed to the checkpoint


def test_train_extra_term_is_one_definition(train_data, tmp_path, monkeypatch, capsys):
    """The seam for what Eq. 4 gets added: a toy term (the mean square of the hidden states at the LM
    targets) is one class, listed by extra_terms; the loop, dual_loss, log.jsonl and the startup line take
    it as it is, and its weight reaches the loss."""
    class Toy:
        name = "toy"
        weight = 0.5
        about = "toy term, weight 0.5"

        def given(self, idx, mask, lm_targets):
            return ()

        def value(self, h, w):
            return h.float().pow(2).mean()

    base = dhrd.extra_terms
    monkeypatch.setattr(dhrd, "extra_terms", lambda *a: [*base(*a), Toy()])
    flags = [*TINY, f"--data_dir={train_data}", "--max_iters=3", "--eval_interval=3", "--log_interval=1"]
    dhrd.main([*flags, f"--out_dir={tmp_path / 'toy'}"])
    assert "| toy term, weight 0.5" in capsys.readouterr().out
    log = _train_log(tmp_path / "toy")
    assert len(log) == 3 and all(l["loss_toy"] > 0 for l in log)
    assert all(abs(l["loss"] - (l["loss_cls"] + l["loss_lm"] + 0.5 * l["loss_toy"])) < 1e-5 for l in log)
    monkeypatch.setattr(dhrd, "extra_terms", base)
    dhrd.main([*flags, f"--out_dir={tmp_path / 'plain'}"])
    plain = _train_log(tmp_path / "plain")
    assert "loss_toy" not in plain[0] and plain[0]["loss_cls"] == log[0]["loss_cls"]  # the same first batch
    assert plain[-1]["loss_cls"] != log[-1]["loss_cls"]  # the term changed the training


def test_train_kd_teacher_end_to_end_and_resume(trained_run, tmp_path):
    """--kd_teacher (a dhrd out_dir: its exported model/ and meta.json's tokenizer): loss_kd logged, the
    teacher on the startup line; a killed run resumes to the same weights, log and results; the term is 0
    when the teacher is the student; bad combinations and a different tokenizer stop with a clear error."""
    d, flags = trained_run
    teacher = d / "full"
    kd = [*flags, "--max_iters=20", f"--kd_teacher={teacher}", "--kd_coef=0.5", "--kd_temperature=2"]
    r = _train_run(*kd, f"--out_dir={d / 'kd'}", cwd=d)
    assert f"| kd teacher {teacher} " in r.stdout and "coef 0.5 T 2.0" in r.stdout, r.stdout
    log = _train_log(d / "kd")
    assert all(l["loss_kd"] > 0 for l in log) and log[-1]["loss_kd"] < log[0]["loss_kd"]
    out = d / "kd-killed"
    _train_kill_after_first_ckpt(kd, out, d)
    _train_run("--init_from=resume", f"--out_dir={out}", cwd=d)
    full = _train_weights(d / "kd")
    resumed = _train_weights(out)
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)
    res = [json.loads((x / "results.json").read_text()) for x in (d / "kd", out)]
    assert res[0] == res[1] and _train_log(d / "kd") == _train_log(out)
    # the teacher is the student (the same exported weights, fp32, no dropout): KL 0 at the first step
    data = next(f for f in flags if f.startswith("--data_dir="))
    same = [f"--init_from={teacher / 'model'}", data, *TINY, "--dropout=0.0", "--max_iters=1",
            f"--kd_teacher={teacher}", "--kd_coef=1", f"--out_dir={tmp_path / 'same'}"]
    _train_run(*same, cwd=tmp_path)
    assert abs(_train_log(tmp_path / "same")[0]["loss_kd"]) < 1e-7
    bad = tmp_path / "bad"  # the same vocab_size, two characters swapped: a different tokenizer
    shutil.copytree(teacher / "model", bad)
    meta = json.loads((bad / "meta.json").read_text())
    chars = list(meta["tokenizer"]["chars"])
    chars[3], chars[4] = chars[4], chars[3]
    meta["tokenizer"]["chars"] = "".join(chars)
    (bad / "meta.json").write_text(json.dumps(meta))
    base = [data, *TINY, f"--out_dir={tmp_path / 'x'}"]
    for args, msg in [([f"--kd_teacher={bad}", "--kd_coef=1"], f"first differ at id 3: {chars[3]!r} vs "
                       f"{chars[4]!r}"),
                      (["--kd_coef=1"], "--kd_coef needs --kd_teacher"),
                      ([f"--kd_teacher={teacher}"], "needs --kd_coef > 0"),
                      ([f"--kd_teacher={teacher}", "--kd_coef=1", "--alpha=0"], "which --alpha=0 does not"),
                      ([f"--kd_teacher={tmp_path / 'nowhere'}", "--kd_coef=1"], "--kd_teacher=.*nowhere")]:
        with pytest.raises(dhrd.ConfigError, match=re.escape(msg) if "*" not in msg else msg):
            dhrd.main([*base, *args])


def test_train_grad_stats_match_naive():
    # --grad_stats: the block-parameter gradients of L_cls and L_lm, separately, against a plain backward each
    model = GPT(GPTConfig(vocab_size=61, block_size=32, n_layer=2, n_head=2, n_embd=16, num_labels=3,
                          dropout=0.1))
    torch.manual_seed(1)
    idx = torch.randint(0, 61, (4, 12))
    x_len = torch.tensor([5, 7, 12, 3])
    y = torch.tensor([0, 2, 1, 1])
    targets = torch.where(torch.arange(12) < 11, idx.roll(-1, 1), -100)
    batch = (idx, torch.ones_like(idx), x_len, y, targets)
    rng = torch.get_rng_state()
    g_cls, g_lm = dhrd.backbone_grads(model, batch, torch.autocast("cpu", enabled=False), "cpu")
    assert torch.equal(torch.get_rng_state(), rng)  # forked: the run's dropout masks do not move
    stats = dhrd.grad_stats(g_cls, g_lm, alpha=0.5, beta=2.0)
    naive = []
    for which in (0, 1):
        model.zero_grad()
        torch.set_rng_state(rng)  # the same dropout masks as above
        out = model(*batch[:3], lm_targets=targets)
        loss = F.cross_entropy(out[0], y) if which == 0 else out[1]
        loss.backward()
        naive.append(torch.cat([p.grad.flatten() for p in model.h.parameters()]))
    assert stats["grad_cls"] == pytest.approx(2.0 * naive[0].norm().item(), rel=1e-5)
    assert stats["grad_lm"] == pytest.approx(0.5 * naive[1].norm().item(), rel=1e-5)
    cos = F.cosine_similarity(naive[0], naive[1], dim=0).item()
    assert stats["grad_cos"] == pytest.approx(cos, rel=1e-4, abs=1e-6)
    assert dhrd.alpha_from_gradients([2.0, 4.0], [1.0, 2.0], beta=0.5) == pytest.approx(1.0)


def test_train_grad_stats_leave_the_run_unchanged(trained_run):
    d, flags = trained_run
    _train_run(*flags, "--grad_stats=True", f"--out_dir={d / 'stats'}", cwd=d)
    full = _train_weights(d / "full")
    stats = _train_weights(d / "stats")
    assert all(torch.equal(full[k], stats[k]) for k in full)  # dropout 0.1: the RNG was forked
    lines = _train_log(d / "stats")
    assert [l["loss"] for l in lines] == [l["loss"] for l in _train_log(d / "full")]
    assert all(l["grad_cls"] > 0 and l["grad_lm"] > 0 and -1 <= l["grad_cos"] <= 1 for l in lines)


def test_train_alpha_auto_fixed_and_resumed(train_data, tmp_path):
    flags = [*TINY, f"--data_dir={train_data}", "--max_iters=12", "--eval_interval=3", "--alpha=auto"]
    _train_run(*flags, f"--out_dir={tmp_path / 'full'}", cwd=tmp_path)
    first = _train_log(tmp_path / "full", "alpha_auto")
    assert len(first) == 1 and first[0]["iter"] == 0  # decided once, before the first step
    a = first[0]["alpha_auto"]
    assert a == pytest.approx(first[0]["grad_norm_cls"] / first[0]["grad_norm_lm"])  # beta = 1
    assert {l["alpha"] for l in _train_log(tmp_path / "full")} == {a}  # fixed after
    _train_kill_after_first_ckpt(flags, tmp_path / "killed", tmp_path)
    _train_run("--init_from=resume", f"--out_dir={tmp_path / 'killed'}", cwd=tmp_path)
    assert _train_log(tmp_path / "killed") == _train_log(tmp_path / "full")  # alpha kept, not re-measured


def test_train_eval_only_and_predict(trained_run):
    d, _ = trained_run
    run = d / "full"
    res = json.loads((run / "results.json").read_text())
    r = _train_run(f"--init_from={run}", "--eval_only=True", cwd=d)
    assert json.loads(r.stdout.strip().splitlines()[-1])["val"] == res["val"]  # the exported best model
    data_dir = pathlib.Path(json.loads((run / "config.json").read_text())["data_dir"])
    rows = [json.loads(l) for l in (data_dir / "val.jsonl").read_text().splitlines()]
    (d / "in.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows))
    predict = [f"--predict={d / 'in.jsonl'}", f"--predictions={d / 'p.jsonl'}"]
    _train_run(f"--init_from={run / 'model'}", *predict, cwd=d)
    preds = [json.loads(l) for l in (d / "p.jsonl").read_text().splitlines()]
    assert len(preds) == len(rows) and all(abs(sum(p["probs"].values()) - 1) < 1e-5 for p in preds)
    acc = np.mean([p["label"] == r["label"] for p, r in zip(preds, rows)])
    assert acc == pytest.approx(res["val"]["accuracy"])
    (d / "bad.jsonl").write_text('{"text": "a=1;a>4?"}\n{"txt": 1}\n')
    r = _train_run(f"--init_from={run}", f"--predict={d / 'bad.jsonl'}", cwd=d, check=False)
    assert r.returncode != 0 and "bad.jsonl:2" in r.stderr and "'text'" in r.stderr


def _idx(edit):
    """A table entry for a prepared S.idx.npy: the file's bytes -> those of edit(its index rows)."""
    def change(good):
        buf = io.BytesIO()
        np.save(buf, edit(np.load(io.BytesIO(good))))
        return buf.getvalue()
    return change


def _idx_set(row, column, value):
    """A table entry: S.idx.npy with rows[row, column] = value."""
    def edit(rows):
        rows[row, column] = value
        return rows
    return _idx(edit)


def _teacher_moves_host(headers):
    """An API on 127.0.0.1 that moves to localhost, another host: the key stays behind (with it: a 200)."""
    if headers["Host"].startswith("127.0.0.1"):
        return 307, {"Location": "{localhost}/v1/chat/completions"}, b""
    if headers.get("Authorization"):
        return 200, {}, json.dumps({"choices": [{"message": {"content": "the key leaked"}}]}).encode()
    return 401, {}, b""


# Malformed input, per entry point: (entry point, file name, its bytes or a function of the good file's
# bytes, the message). A new case is one row. Every message is one line naming the file (and line). The
# "train" and "eval" rows change a copy of the prepared synth data; their failures come before step 1. The
# "teacher" rows name the --teacher_url ({srv}: a loopback server) and its reply to every request: (status,
# headers, body), or a function of the request's headers giving one.
BAD_INPUTS = [
    ("config", "c.json", b'{"batch_size": 4,', r"c.json: cannot read the config file"),
    ("config", "c.json", b"[1, 2]", r"c.json: a config file is one JSON object"),
    ("config", "c.json", b'{"batch_sise": 4}',
     r"c.json: unknown config key 'batch_sise'; did you mean batch_size"),
    ("config", "c.json", b'{"max_iters": "ten"}',
     r"c.json: expected int for max_iters \(like 600\), got 'ten'"),
    ("config", "c.json", b'{"lr_decay": "step"}', r"c.json: lr_decay='step' is not one of cosine, linear"),
    ("config", "c.json", b'\xff{"a": 1}', r"c.json: cannot read the config file \(.*utf-8"),
    ("predict", "in.jsonl", b'{"text": 5}\n', r"in.jsonl:1: field 'text' must be a string .*not int 5"),
    ("predict", "in.jsonl", b'{"text": ["a"]}\n', r"in.jsonl:1: field 'text' must be a string .*not list"),
    ("predict", "in.jsonl", b'{"text": "a=1;a>4?"}\n[1, 2]\n', r"in.jsonl:2: a row is a JSON object"),
    ("predict", "in.jsonl", b'{"text": "a=1;a>4?"\n', r"in.jsonl:1: malformed JSON"),
    ("predict", "in.jsonl", b'\n{"txt": "a"}\n', r"in.jsonl:2: not a formatted row .*missing field 'text'"),
    ("predict", "in.jsonl", b'{"text": "a=1;a>4?"}\n{"text": "\xe9"}\n', r"in.jsonl:2: not UTF-8 text"),
    ("predict", "in.jsonl", b'{"text": "\xc3\xa9t\xc3\xa9"}\n',
     r"in.jsonl:1: characters \['t', '\xe9'\] are not in the"),
    ("data", "train.csv", b"text,label\nfine,pos\n\xe9t\xe9,neg\n",
     r"train.csv:3: not UTF-8 text \(byte 0xe9"),
    ("data", "train.csv", b"text,lab\nfine,pos\n", r"train.csv:2: missing field 'label'"),
    ("data", "val.jsonl", b'{"text": "ok", "label": "pos"}\n{"text": 1', r"val.jsonl:2: malformed JSON"),
    ("data", "val.jsonl", b'{"text": "ok", "label": "pos"}\n\xff\xfe', r"val.jsonl:2: not UTF-8 text"),
    ("data", "val.jsonl", b'{"text": "ok", "label": "maybe"}\n', r"val.jsonl:1: unknown label 'maybe'"),
    ("rationales", "r.jsonl", b'\xff\n', r"r.jsonl:1: not UTF-8 text"),
    ("rationales", "r.jsonl", b'{"task": "custom", "split": "train"', r"r.jsonl:1: malformed JSON"),
    ("rationales", "r.jsonl", b'{"task": "custom", "split": "train", "rationale": "b"}\n',
     r"r.jsonl:1: missing field 'idx'"),
    ("checkpoint", "ckpt.pt", lambda good: good[:len(good) // 2],
     r"ckpt.pt: cannot be read, it is truncated or corrupt .*the best model so far is intact in .*/model/: "
     r"start a new run from it in a new folder, --init_from=.*/model --out_dir=<a new folder>"),
    ("checkpoint", "ckpt.pt", b"not a checkpoint", r"ckpt.pt: cannot be read, it is truncated or corrupt"),
    ("checkpoint", "ckpt.pt", lambda good: _torch_bytes({"model": {}}),
     r"ckpt.pt: not a dhrd.py checkpoint \(no model_config, optimizer, .*\); the best model so far is "
     r"intact"),
    ("checkpoint", "ckpt.pt", lambda good: _torch_bytes(torch.zeros(2)),
     r"ckpt.pt: not a dhrd.py checkpoint"),
    ("train", "train.idx.npy", _idx_set(5, prepare.N, 1000),
     r"train.jsonl:6: 1000 tokens \(x \d+ \+ rationale and answer \d+\), longer than the model's context "
     r"of 64 positions; .*--max_rationale, or train with --alpha=0"),
    ("train", "val.idx.npy", _idx_set(3, prepare.LABEL, 7),
     r"val.jsonl:4: label id 7 is not one of the 2 labels \(No, Yes\)"),
    ("train", "train.idx.npy", _idx(lambda rows: rows[:0]),
     r"train.idx.npy: the train split has no examples"),
    ("train", "val.idx.npy", _idx_set(2, prepare.LABEL, -1), r"val.jsonl:3: no label, and the val split is"),
    ("train", "val.idx.npy", _idx_set(1, prepare.X_LEN, 0), r"val.jsonl:2: the input x has no tokens"),
    ("eval", "test.idx.npy", _idx_set(0, prepare.LABEL, -1),
     r"test.jsonl:1: no label, and the test split is trained on or scored; .*--predict"),
    ("predict_no_bos", "in.jsonl", b'{"text": "a=1;a>4?"}\n{"text": ""}\n',
     r"in.jsonl:2: the text '' has no tokens and the tokenizer no BOS"),
    ("teacher", "http://192.0.2.7:8000/v1", (200, {}, b""),
     r"192.0.2.7:8000/v1/chat/completions: plain http to 192.0.2.7, not this machine, would send the API key "
     r"and the data unencrypted; use https, or --allow_http=True"),
    ("teacher", "{srv}/v1", (307, {"Location": "http://192.0.2.7/v1/chat/completions"}, b""),
     r"http://192.0.2.7/v1/chat/completions: plain http to 192.0.2.7"),
    ("teacher", "{srv}/v1", _teacher_moves_host,
     r"HTTP 401 .* from http://localhost:\d+/v1/chat/completions, where it redirected \(the API key is "
     r"not sent"),
    ("teacher", "{srv}/v1", (302, {"Location": "{srv}/v2/chat/completions"}, b""),
     r"HTTP 302 .*moved to http://127.0.0.1:\d+/v2/chat/completions: pass that address as --teacher_url"),
    ("teacher", "{srv}/v1", (200, {}, b'{"choices": [{"message": {"content": 5}}]}'),
     r"malformed response, choices\[0\].message.content is int 5, not a string"),
    ("teacher", "{srv}/v1", (200, {}, b'{"choices": []}'),
     r"malformed response, no choices\[0\].message.content in {\"choices\": \[\]}"),
    ("teacher", "{srv}/v1", (429, {"Retry-After": "86400"}, b""),
     r"HTTP 429 with Retry-After 86400: the server asks for \d+ s, more than the 300 s this client waits"),
    # token ids are bounded (0 to 2 x the tokens) before decode's id -> bytes table is allocated
    ("tokenizer", "tokenizer.json", lambda good: _bad_token_id(good, "model", 2e9),
     r"tokenizer.json model.vocab: token 'A' has id 2000000000.0; ids must be ints from 0 to 1399 "
     r"\(twice the 700 tokens\)"),
    ("tokenizer", "tokenizer.json", lambda good: _bad_token_id(good, "model", 2100),
     r"tokenizer.json model.vocab: token 'A' has id 2100; ids must be ints from 0 to 1399"),
    ("tokenizer", "tokenizer.json", lambda good: _bad_token_id(good, "added_tokens", -1),
     r"tokenizer.json: token '<\|begin_of_text\|>' has id -1; ids must be ints"),
]


def _bad_token_id(good, where, bad):
    """tokenizer.json with one id replaced: of 'A' in model.vocab, or of the first added token."""
    t = json.loads(good)
    if where == "model":
        t["model"]["vocab"]["A"] = bad
    else:
        t["added_tokens"][0]["id"] = bad
    return json.dumps(t).encode()


def _torch_bytes(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _bad_teacher_call(url, reply, tmp_path, monkeypatch):
    """prepare.py's API teacher (with a key) for a custom task, at url; a loopback server gives the reply."""
    monkeypatch.setenv("DHRD_TEST_KEY", "sk-table")
    where = {}

    def handle(path, headers, body):
        code, sent, payload = reply(headers) if callable(reply) else reply
        sent = {k: v.format(srv=where["srv"], localhost=where["srv"].replace("127.0.0.1", "localhost"))
                for k, v in sent.items()}
        return code, payload, sent

    srv, where["srv"] = _prep_server(handle)
    try:
        return prepare.prepare(task="custom", out_dir=tmp_path / "o", model="char", quiet=True,
                               teacher_url=url.format(srv=where["srv"]), teacher_model="m",
                               api_key_env="DHRD_TEST_KEY", **_prep_custom(tmp_path))
    finally:
        srv.shutdown()


def _bad_input_call(entry, path, run, tmp_path):
    """Feed the bad file at path to its entry point: dhrd.py (config file, --predict, resume from a
    checkpoint, training or --eval_only on prepared data) or prepare.py (a custom task's data file, a
    rationale file, the tokenizer of --model)."""
    if entry == "config":
        return dhrd.main([str(path)])
    if entry in ("predict", "predict_no_bos"):
        return dhrd.main([f"--init_from={run}", f"--predict={path}", f"--predictions={tmp_path / 'p.jsonl'}"])
    if entry == "checkpoint":
        return dhrd.main(["--init_from=resume", f"--out_dir={path.parent}"])
    if entry == "train":
        out = f"--out_dir={tmp_path / 'out'}"
        return dhrd.main([*TINY, f"--data_dir={path.parent}", out, "--max_iters=1"])
    if entry == "eval":
        split = path.name.split(".")[0]
        return dhrd.main([f"--init_from={run}", "--eval_only=True", f"--data_dir={path.parent}",
                          f"--eval_split={split}"])
    files = _prep_custom(tmp_path)
    if entry == "data":
        files[f"{path.stem}_file"] = path
    rationales = path if entry == "rationales" else None
    model = str(path.parent) if entry == "tokenizer" else "char"
    return prepare.prepare(task="custom", out_dir=tmp_path / "o", model=model, rationales=rationales,
                           quiet=True, **files)


@pytest.mark.parametrize("entry, name, content, msg", BAD_INPUTS,
                         ids=[f"{e}-{i}" for i, (e, *_) in enumerate(BAD_INPUTS)])
def test_train_bad_input_table(trained_run, train_data, tmp_path, monkeypatch, entry, name, content, msg):
    d, _ = trained_run
    run = tmp_path / "run"  # a copy of a finished run: config.json, ckpt.pt, model/
    shutil.copytree(d / "full", run)
    if entry == "predict_no_bos":  # a model whose tokenizer has no BOS
        meta = json.loads((run / "model" / "meta.json").read_text())
        (run / "model" / "meta.json").write_text(json.dumps({**meta, "bos_id": None}))
    folder = tmp_path / "bad"
    if entry == "checkpoint":
        folder = run
    if entry in ("train", "eval"):  # a copy of the prepared data
        shutil.copytree(train_data, folder)
    if entry == "tokenizer":  # a copy of a good tokenizer folder (Llama-3's tokenizer.json)
        shutil.copytree(FIX / "tok_llama3", folder)
    folder.mkdir(exist_ok=True)
    path = folder / name
    if callable(content) and entry != "teacher":
        content = content(path.read_bytes())
    if entry != "teacher":
        path.write_bytes(content)
    with pytest.raises(ValueError, match=msg) as e:  # ConfigError / PrepareError: __main__ prints one line
        if entry == "teacher":
            _bad_teacher_call(name, content, tmp_path, monkeypatch)
        else:
            _bad_input_call(entry, path, run, tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "log.jsonl").exists()  # "train": stopped before step 1


def test_train_bad_input_cli_one_line(trained_run, tmp_path):
    """The three cases that ended in a traceback: one `<script>: error:` line, exit status 1."""
    d, _ = trained_run
    shutil.copytree(d / "full", tmp_path / "run")
    (tmp_path / "in.jsonl").write_text('{"text": 5}\n')
    ckpt = tmp_path / "run" / "ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    files = _prep_custom(tmp_path)
    (tmp_path / "train.csv").write_bytes(b"text,label\nfine,pos\n\xe9t\xe9,neg\n")
    cases = [("dhrd.py", [f"--init_from={tmp_path / 'run'}", f"--predict={tmp_path / 'in.jsonl'}"],
              "in.jsonl:1: field 'text' must be a string"),
             ("dhrd.py", ["--init_from=resume", f"--out_dir={tmp_path / 'run'}"], "ckpt.pt: cannot be read"),
             ("prepare.py", ["--task=custom", *[f"--{k}={v}" for k, v in files.items()], "--model=char",
                             f"--out_dir={tmp_path / 'o'}"], "train.csv:3: not UTF-8 text")]
    for script, argv, msg in cases:
        r = subprocess.run([sys.executable, str(ROOT / script), *argv], cwd=tmp_path, capture_output=True,
                           text=True, timeout=600)
        last = r.stderr.splitlines()[-1]  # dhrd.py --predict first says which model it loaded
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert last.startswith(f"{script}: error: ") and msg in last, r.stderr


def test_train_nonfinite_loss_stops_clearly(train_data, tmp_path):
    out = tmp_path / "nan"
    r = _train_run(*TINY, f"--data_dir={train_data}", f"--out_dir={out}", "--learning_rate=1e30",
                   "--warmup_iters=0", "--grad_clip=0", "--max_iters=6", "--eval_interval=1", cwd=tmp_path,
                   check=False)
    assert r.returncode != 0 and "non-finite loss at iter 2" in r.stderr, r.stdout + r.stderr
    assert "ckpt.pt (iter 1)" in r.stderr and "Traceback" not in r.stderr
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 1  # the last good checkpoint is intact


def test_train_compile_alpha0_and_cot(train_data, tmp_path):
    """--compile=True trains; alpha=0 (pooled baseline) logs no LM loss; beta=0 evaluates by decoding."""
    r = _train_run(*TINY, f"--data_dir={train_data}", f"--out_dir={tmp_path / 'c'}", "--compile=True",
                   "--max_iters=2", "--alpha=0", cwd=tmp_path, timeout=300)
    assert "val accuracy" in r.stdout and _train_log(tmp_path / "c")[-1]["loss_lm"] is None
    _train_run(*TINY, f"--data_dir={train_data}", f"--out_dir={tmp_path / 'cot'}", "--beta=0",
               "--max_iters=2", "--cot_tokens=8", cwd=tmp_path)
    val = _train_log(tmp_path / "cot", "val")[-1]["val"]
    assert val == {"accuracy": 0.0}  # 8 tokens never reach "Final Answer:": unparsed answers count as wrong


def test_train_from_untied_classifier_pooled_only(train_data, tmp_path):
    """An untied *ForSequenceClassification file (no lm_head.weight) trains with --alpha=0 and evaluates;
    alpha > 0 stops before the first step with one line naming lm_head.weight and the fix."""
    init = f"--init_from={FIX / 'qwen2_cls'}"
    out = tmp_path / "cls"
    r = _train_run(*TINY, init, f"--data_dir={train_data}", f"--out_dir={out}", "--alpha=0", "--max_iters=2",
                   cwd=tmp_path)
    assert "val accuracy" in r.stdout and _train_log(out)[-1]["loss_lm"] is None
    r = _train_run(f"--init_from={out}", "--eval_only=True", cwd=tmp_path)
    val = json.loads(r.stdout.strip().splitlines()[-1])["val"]
    assert val == json.loads((out / "results.json").read_text())["val"]
    r = _train_run(*TINY, init, f"--data_dir={train_data}", f"--out_dir={tmp_path / 'dhrd'}", "--alpha=1",
                   "--max_iters=2", cwd=tmp_path, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert not (tmp_path / "dhrd" / "log.jsonl").exists()  # stopped while building the model
    assert re.fullmatch(r"dhrd.py: error: .*qwen2_cls: --alpha=1.0 .* needs the LM head \(lm_head.weight\).*"
                        r"Start from the base model.*", lines[-1]), r.stderr


def test_train_records_the_hub_commit(_gpt_hub, tmp_path, monkeypatch, capfd):
    """--revision pins a hub commit; prepare.py's meta.json, dhrd.py's config.json and results.json record
    the commit sha that the revision resolved to. The repository is private: its token is sent, and it is
    in none of those files nor in the output."""
    sha = _gpt_serve_repo("tiny/gpt2", _gpt_folder(FIX / "gpt2_hub"))
    _GPTHandler.private = ("/api/models/tiny/", "/tiny/")
    _GPTHandler.token = "hf_secret_9f3"
    monkeypatch.setenv("HF_TOKEN", "hf_secret_9f3")
    meta = prepare.prepare(task="synth", out_dir=tmp_path / "data", model="tiny/gpt2", revision="main",
                           quiet=True)
    assert meta["tokenizer"] == {"type": "bpe", "name": "tiny/gpt2", "revision": sha}
    out = tmp_path / "out"
    dhrd.main(["--init_from=tiny/gpt2", "--revision=main", f"--data_dir={tmp_path / 'data'}",
               f"--out_dir={out}", "--alpha=0", "--max_iters=1", "--eval_interval=1", "--batch_size=4",
               "--dtype=float32"])
    assert json.loads((out / "config.json").read_text())["revision"] == sha
    assert json.loads((out / "results.json").read_text())["revision"] == sha
    written = [f for d in (tmp_path / "data", out) for f in d.rglob("*") if f.is_file()]
    assert {tmp_path / "data" / "meta.json", out / "config.json", out / "results.json"} <= set(written)
    assert not any(b"hf_secret_9f3" in f.read_bytes() for f in written)
    assert "hf_secret_9f3" not in "".join(capfd.readouterr())
    assert {h.get("Authorization") for p, h in _GPTHandler.hits} == {"Bearer hf_secret_9f3"}
    # the same command again is the same run: config.json's commit is what --revision=main resolved to
    dhrd.main(["--init_from=tiny/gpt2", "--revision=main", f"--data_dir={tmp_path / 'data'}",
               f"--out_dir={out}", "--alpha=0", "--max_iters=1", "--eval_interval=1", "--batch_size=4",
               "--dtype=float32"])
    assert "holds a finished run" in capfd.readouterr().out
    with pytest.raises(plumbing.ConfigError, match=r"revision '.*' -> '0{40}'"):  # another commit: another run
        dhrd.main(["--init_from=tiny/gpt2", "--revision=" + "0" * 40, f"--data_dir={tmp_path / 'data'}",
                   f"--out_dir={out}", "--alpha=0", "--max_iters=1", "--eval_interval=1", "--batch_size=4",
                   "--dtype=float32"])
    with pytest.raises(CheckpointError, match="no model tiny/gpt2 with revision 'v9'"):
        dhrd.main(["--init_from=tiny/gpt2", "--revision=v9", f"--data_dir={tmp_path / 'data'}",
                   f"--out_dir={tmp_path / 'v9'}", "--alpha=0", "--max_iters=1"])


def test_train_export_writes_the_training_pad(tmp_path):
    """GPT-2 has no pad token, and transformers' GPT2ForSequenceClassification refuses batches > 1 without
    config.json's pad_token_id. The export writes the id training padded with (dhrd.pad_id: EOS here); a
    right-padded batch then gives each row's unpadded class logits, pooled where HF pools: at the last token
    that is not pad_token_id (tests/fixtures/check_export_batch.py runs the batch through transformers)."""
    meta = prepare.prepare(task="synth", out_dir=tmp_path / "data", model=str(FIX / "gpt2_hub"), quiet=True)
    assert meta["pad_id"] is None and dhrd.pad_id(meta) == meta["eos_id"] == 896
    m = GPT.from_pretrained(FIX / "gpt2_hub", num_labels=2).eval()
    assert m.config.pad_token_id is None
    dhrd.export(m, tmp_path / "model", meta, dhrd.Config())
    assert json.loads((tmp_path / "model" / "config.json").read_text())["pad_token_id"] == 896
    back = GPT.from_pretrained(tmp_path / "model").eval()
    tok = load_tokenizer(tmp_path / "model")
    rows = [tok.encode(t) for t in ("a=79,b=a-74;b>49?", "Is it?", "Yes")]
    ids, mask = dhrd._padded(rows, 896, left=False)
    ids = torch.from_numpy(ids)
    hf_last = (torch.arange(ids.shape[1]) * (ids != 896)).argmax(1)  # HF's pooling position
    assert hf_last.tolist() == [len(r) - 1 for r in rows]
    with torch.no_grad():
        batch = back.classify(ids, torch.from_numpy(mask))
        alone = torch.cat([back.classify(torch.tensor([r])) for r in rows])
    assert (batch - alone).abs().max() < 1e-5


class _TrainFakeLM:
    """Stands in for GPT in class_probs: 'decodes' a fixed continuation per prompt."""
    config = type("C", (), {"block_size": 64})

    def __init__(self, tok, answers):
        self.tok = tok
        self.answers = answers
        self.compiled = []
        self.decode_caches = "kept"

    def eval(self):
        pass

    train = eval

    def generate(self, idx, n, eos_token_id=None, attention_mask=None, compile=False):
        self.compiled.append(compile)
        outs = [self.tok.encode(a) + [eos_token_id] * n for a in self.answers[:len(idx)]]
        return torch.cat([idx, torch.tensor([o[:n] for o in outs])], 1)


def test_train_cot_answer_parsing(monkeypatch, capsys):
    """beta=0 evaluation: the verbalised label after the last "Final Answer:" line; anything else = no
    prediction. Evaluation that takes long shows its progress (here: always). With --compile on CUDA (not
    FSDP) it decodes with the compiled step and then drops the model's static caches."""
    meta = dict(labels=["No", "Yes"], verbalizers={"No": "No", "Yes": "Yes"}, pad_id=40, eos_id=39)
    tok = prepare.CharTokenizer("\n +,-0123456789:;=>?AFNRYabcdegilnorsw")
    answers = ["\nReasoning:\nb=1+2=3\nFinal Answer:\nYes", "\nReasoning:\nb=9\nFinal Answer:\nNo",
               "\nReasoning:\nb=9\nFinal Answer:\nYess", "\nReasoning:\nb=1+2=3,c="]
    seqs = [[1, 2], [3], [4, 5, 6], [7]]  # lengths differ: length-sorted batches must map back to the rows
    order = np.argsort([len(s) for s in seqs], kind="stable")
    model = _TrainFakeLM(tok, [answers[j] for j in order])
    monkeypatch.setattr(plumbing.Progress, "delay", 0.0)
    probs = dhrd.class_probs(model, seqs, meta, True, "cpu", torch.no_grad(), 8, 60, tok)
    assert probs.tolist() == [[0, 1], [1, 0], [0, 0], [0, 0]]
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("dhrd.py: evaluating: 0/4 (0%)")
    assert err[-1].startswith("dhrd.py: evaluating: 4/4 (100%)")
    assert set(model.compiled) == {False} and model.decode_caches == "kept"
    # --compile on CUDA: the compiled decode step, its static caches freed for the training that follows
    rt = dhrd.Runtime(ddp=False, rank=0, local_rank=0, world=1, master=True, device="cuda", dev_type="cuda",
                      dtype="bfloat16", dtype_why="", ctx=None, micro=1, host_group=None)
    compiled = dhrd.decode_compiled(dhrd.Config(compile=True), rt)
    assert compiled and not dhrd.decode_compiled(dhrd.Config(compile=True, fsdp=True), rt)
    on_cpu = dataclasses.replace(rt, device="cpu", dev_type="cpu")
    assert not dhrd.decode_compiled(dhrd.Config(compile=True), on_cpu)
    probs = dhrd.class_probs(model, seqs, meta, True, "cpu", torch.no_grad(), 8, 60, tok, compile=compiled)
    assert probs.tolist() == [[0, 1], [1, 0], [0, 0], [0, 0]]
    assert model.compiled[-1] is True and model.decode_caches is None


def test_train_class_report_handmade():
    """class_report: sklearn's per-class precision / recall / F1 / support and confusion matrix (rows gold,
    columns predicted), a zero row of probs (a CoT model that decoded no label) in the last column."""
    gold = np.array([0, 0, 0, 1, 1, 2])
    probs = np.zeros((6, 3))
    for i, p in enumerate([0, 1, 0, 1, 1, -1]):  # -1: no prediction
        if p >= 0:
            probs[i, p] = 1.0
    r = dhrd.class_report(probs, gold, ["a", "b", "c"])
    assert r["columns"] == ["a", "b", "c", "none"]
    assert r["confusion"] == [[2, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]]
    assert r["per_class"]["a"] == dict(precision=1.0, recall=pytest.approx(2 / 3), f1=pytest.approx(0.8),
                                       support=3)
    assert r["per_class"]["b"] == dict(precision=pytest.approx(2 / 3), recall=1.0, f1=pytest.approx(0.8),
                                       support=2)
    assert r["per_class"]["c"] == dict(precision=0.0, recall=0.0, f1=0.0, support=1)
    text = dhrd.report_text(r)
    assert "precision" in text and "confusion" in text and len(text.splitlines()) == 1 + 3 + 2 + 3


def test_train_patience_stops_resumes_and_reports(train_data, tmp_path):
    """--patience=N stops after N evaluations without a better val score (learning_rate=0: val never
    improves after the first evaluation), the best model stays exported, results.json has the per-class
    report and the stop; a resumed run keeps the count of evaluations since the best."""
    flags = [*TINY, f"--data_dir={train_data}", "--learning_rate=0", "--eval_interval=2", "--log_interval=1"]
    r = _train_run(*flags, "--max_iters=40", "--patience=2", f"--out_dir={tmp_path / 'a'}", cwd=tmp_path)
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert (res["best_iter"], res["stopped_early_at"]) == (2, 6)
    assert [l["iter"] for l in _train_log(tmp_path / "a", "val")] == [2, 4, 6]
    assert "stopped at iter 6: 2 evaluations without a better val score" in r.stdout
    assert "precision" in r.stdout and "confusion" in r.stdout  # the table after the final evaluation
    rep = res["report"]
    assert sum(map(sum, rep["confusion"])) == 500 and set(rep["per_class"]) == {"No", "Yes"}
    assert sum(c["support"] for c in rep["per_class"].values()) == 500
    assert (tmp_path / "a" / "model" / "config.json").exists()
    # 4 steps: evaluations at 2 (best) and 4 (1 since the best); resumed with patience 2, it stops at 6,
    # not at 8 (which a lost count would give)
    _train_run(*flags, "--max_iters=4", "--patience=2", f"--out_dir={tmp_path / 'b'}", cwd=tmp_path)
    assert json.loads((tmp_path / "b" / "results.json").read_text())["stopped_early_at"] is None
    _train_run("--init_from=resume", f"--out_dir={tmp_path / 'b'}", "--max_iters=40", cwd=tmp_path)
    res_b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert (res_b["best_iter"], res_b["stopped_early_at"]) == (2, 6)
    assert res_b["report"] == res["report"]


def test_train_trackers_get_the_log_and_missing_ones_stop(train_data, tmp_path, monkeypatch):
    """--wandb_log / --mlflow: imported only when asked (fakes here), every log.jsonl number reaches them
    (val metrics as val/<name>); a tracker asked for but not installed stops the run with one line."""
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("wandb", step, values))

        def finish(self):
            calls.append(("wandb", "finish", None))

    class FakeWandb:
        @staticmethod
        def init(project, name, config):
            calls.append(("wandb", "init", (project, name, config["max_iters"])))
            return Run()

    class FakeMlflow:
        start_run = staticmethod(lambda: calls.append(("mlflow", "start", None)))
        log_params = staticmethod(lambda params: calls.append(("mlflow", "params", params["max_iters"])))
        end_run = staticmethod(lambda: calls.append(("mlflow", "end", None)))

        @staticmethod
        def log_metrics(values, step):
            calls.append(("mlflow", step, values))

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    monkeypatch.setitem(sys.modules, "mlflow", FakeMlflow)
    out = tmp_path / "run"
    dhrd.main([*TINY, f"--data_dir={train_data}", "--max_iters=4", "--eval_interval=2", "--log_interval=1",
               f"--out_dir={out}", "--wandb_log=True", "--wandb_project=p", "--mlflow=True"])
    assert calls[0] == ("mlflow", "start", None) and ("wandb", "init", ("p", "run", 4)) in calls
    assert calls[-2:] == [("mlflow", "end", None), ("wandb", "finish", None)]
    lines = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    for tracker in ("wandb", "mlflow"):
        got = [(step, v) for t, step, v in calls if t == tracker and isinstance(step, int)]
        want = [(l["iter"], {**{k: v for k, v in l.items() if k not in ("iter", "val") and v is not None},
                             **{f"val/{k}": v for k, v in l.get("val", {}).items()}}) for l in lines]
        assert got == want and len(got) == 6  # 4 training lines, 2 evaluations
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(dhrd.ConfigError, match=re.escape("--wandb_log=True needs the wandb package: "
                                                         "pip install wandb")):
        dhrd.main([*TINY, f"--data_dir={train_data}", f"--out_dir={tmp_path / 'x'}", "--wandb_log=True"])
    assert not (tmp_path / "x").exists()  # stopped before any work


def test_train_task_prepared_on_the_fly_and_init_from_defaults(tmp_path, monkeypatch):
    """`dhrd.py --task=cb --init_from=MODEL` with no data/cb prepares it with MODEL's tokenizer (the task's
    files found where prepare.py looks: data/superglue/CB); afterwards `--task=cb` alone trains that
    model (meta.json names it), synth stays scratch, and a missing task without a model says what to do."""
    monkeypatch.chdir(tmp_path)
    _prep_write_sg(tmp_path / "data" / "superglue")
    model = tmp_path / "llama"
    m = GPT.from_pretrained(FIX / "llama")  # a base model: no `score`, a context for CB's inputs
    m.score, m.config.num_labels, m.config.block_size = None, 0, 256  # RoPE: no position table to grow
    m.save_pretrained(model)
    flags = ["--max_iters=2", "--eval_interval=2", "--batch_size=2", "--dtype=float32", "--alpha=0"]
    dhrd.main(["--task=cb", f"--init_from={model}", *flags])
    meta = json.loads((tmp_path / "data" / "cb" / "meta.json").read_text())
    assert meta["tokenizer"] == {"type": "bpe", "name": str(model), "revision": None}
    assert meta["counts"]["train"] == 3
    assert dhrd.parse_config(["--task=cb", "--out_dir=new"]).init_from == str(model)  # out-cb: the run above
    assert dhrd.parse_config([]).init_from == "scratch"
    dhrd.main(["--task=cb", *flags, "--out_dir=out-again"])
    assert json.loads((tmp_path / "out-again" / "config.json").read_text())["init_from"] == str(model)
    with pytest.raises(dhrd.ConfigError, match=r"data/rte/meta.json: not found; run `python prepare.py "
                                               r"--task=rte.*or pass --init_from=<that model>"):
        dhrd.main(["--task=rte", *flags])
    # e-SNLI's files are not here and their source does not answer: prepare.py's reason, in one line
    monkeypatch.setattr(prepare, "DISTILL_URL", "http://127.0.0.1:9/datasets")  # the discard port: refused
    with pytest.raises(dhrd.ConfigError, match=r"data/esnli/meta.json: not found, and preparing esnli with "
                                               r"the tokenizer of .*llama failed: .*esnli_test.json: not "
                                               r"found, and downloading it failed .*put the distilling"):
        dhrd.main(["--task=esnli", f"--init_from={model}", *flags])


def test_train_torchrun_defaults_and_one_error_line(train_data, tmp_path):
    """The default gradient_accumulation_steps (0) is one micro-batch per rank whatever the world size, the
    startup line states the global batch; a config error is printed once, by rank 0, exit status 1."""
    flags = [*TINY, f"--data_dir={train_data}", "--max_iters=2", "--eval_interval=2", "--log_interval=1"]
    r = _train_torchrun(*flags, f"--out_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert "global batch 16 = 2 processes x 1 micro-batches x 8" in r.stdout
    assert json.loads((tmp_path / "a" / "config.json").read_text())["gradient_accumulation_steps"] == 2
    r = _train_torchrun(*flags, "--gradient_accumulation_steps=3", cwd=tmp_path, check=False)
    msg = "dhrd.py: error: gradient_accumulation_steps=3 is for the whole job, divided among the 2 processes"
    assert r.returncode != 0 and (r.stdout + r.stderr).count(msg) == 1, r.stdout + r.stderr


def test_train_setup_dist_timeout_and_eval_layout(trained_run, monkeypatch):
    """setup() under torchrun (RANK set; the rendezvous and init_process_group recorded, not run): the
    process group and its store wait --dist_timeout_s, and the store's keys go under the restart attempt's
    prefix; --eval_only of a 1-process run (config.json: gradient_accumulation_steps=1) is no training batch
    to divide among 2 ranks, while training with that layout is still refused."""
    calls = []
    store = dhrd.dist.HashStore()
    monkeypatch.setattr(dhrd.dist, "rendezvous", lambda url, **kw: iter([(store, 1, 2)]))
    monkeypatch.setattr(dhrd.dist, "init_process_group", lambda backend, **kw: calls.append((backend, kw)))
    for k, v in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", TORCHELASTIC_RESTART_COUNT="3").items():
        monkeypatch.setenv(k, v)
    run = trained_run[0] / "full"
    cfg = dhrd.parse_config([f"--init_from={run}", "--eval_only=True", "--dist_timeout_s=7"])
    assert cfg.gradient_accumulation_steps == 1
    rt = dhrd.setup(cfg)
    assert (rt.ddp, rt.rank, rt.world, rt.micro, rt.host_group) == (True, 1, 2, 1, None)  # CPU: Gloo only
    [(backend, kw)] = calls
    prefixed = kw.pop("store")
    assert (backend, kw) == ("gloo", dict(rank=1, world_size=2, timeout=datetime.timedelta(seconds=7)))
    prefixed.set("k", "v")
    assert store.get("attempt3/k") == b"v" and store.timeout == datetime.timedelta(seconds=7)
    cfg.eval_only = False
    with pytest.raises(dhrd.ConfigError, match="gradient_accumulation_steps=1 is for the whole job"):
        dhrd.setup(cfg)


@pytest.fixture(scope="module")
def lora_data(tmp_path_factory):
    """A score-less copy of the tiny Llama fixture and synth data tokenized with its tokenizer."""
    d = tmp_path_factory.mktemp("lora")
    m = GPT.from_pretrained(FIX / "llama")
    m.score, m.config.num_labels = None, 0
    m.save_pretrained(d / "base")
    prepare.prepare(task="synth", out_dir=d / "data", model=str(d / "base"), quiet=True)
    return d, [f"--init_from={d / 'base'}", f"--data_dir={d / 'data'}", "--batch_size=4", "--dtype=float32",
               "--learning_rate=3e-3", "--warmup_iters=2", "--lora_rank=4", "--lora_dropout=0.1",
               "--kl_coef=0.1", "--max_iters=8", "--eval_interval=4", "--log_interval=1",
               "--eval_batch_size=500"]


def test_train_lora_end_to_end_and_resume(lora_data):
    """dhrd.py --lora_rank: the base stays frozen; merged model/ and adapter/ give the trained model's class
    logits; eval_only reads the merged export; a killed run resumes to the same adapters, log and results."""
    d, flags = lora_data
    _train_run(*flags, f"--out_dir={d / 'full'}", cwd=d)
    ck = _train_weights(d / "full")
    base = read_safetensors(d / "base" / "model.safetensors")
    assert torch.equal(ck["h.1.mlp.gate_proj.base.weight"], base["model.layers.1.mlp.gate_proj.weight"])
    assert ck["h.1.mlp.gate_proj.lora_B"].abs().sum() > 0
    log = _train_log(d / "full")
    assert log[-1]["loss_kl"] > 0 and log[0]["loss_kl"] < 1e-6  # KL to the base: 0 while B = 0, then grows
    res = json.loads((d / "full" / "results.json").read_text())
    raw = GPT(GPTConfig(**torch.load(d / "full" / "ckpt.pt", weights_only=True)["model_config"]))
    gpt.add_lora(raw, 4, 32.0, 0.1)
    raw.load_state_dict(ck)
    merged = GPT.from_pretrained(d / "full" / "model").eval()
    adapted = gpt.load_lora(GPT.from_pretrained(d / "base", num_labels=2), d / "full" / "adapter").eval()
    ids = torch.randint(0, 897, (4, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # model/ and adapter/ are the same best model; the checkpoint holds the last one
        c = adapted.classify(ids)
        assert (merged.classify(ids) - c).abs().max() < 1e-5
        assert (merged.lm_logits(ids) - adapted.lm_logits(ids)).abs().max() < 1e-5
        assert torch.equal(raw.eval().classify(ids), c) == (res["best_iter"] == 8), res
    r = _train_run(f"--init_from={d / 'full'}", "--eval_only=True", cwd=d)
    assert json.loads(r.stdout.strip().splitlines()[-1])["val"] == res["val"]
    out = d / "killed"
    _train_kill_after_first_ckpt(flags, out, d)
    _train_run("--init_from=resume", f"--out_dir={out}", cwd=d)
    resumed = _train_weights(out)
    assert ck.keys() == resumed.keys() and all(torch.equal(ck[k], resumed[k]) for k in ck)
    assert json.loads((out / "results.json").read_text()) == res and _train_log(d / "full") == _train_log(out)


def test_train_kd_teacher_hf_folder_and_tokenizer_check(lora_data, tmp_path):
    """An HF folder as the teacher (its tokenizer files): the same tokenizer trains; a tokenizer with two ids
    swapped (the same vocab_size) stops with a message naming both and the first differing id, another
    vocab_size with one naming both sizes."""
    d, flags = lora_data
    flags = [f for f in flags if not f.startswith(("--lora", "--kl_coef", "--max_iters"))] + ["--max_iters=2"]
    out = tmp_path / "kd"
    _train_run(*flags, f"--kd_teacher={FIX / 'llama'}", "--kd_coef=1", f"--out_dir={out}", cwd=tmp_path)
    log = _train_log(out)  # the student starts as the teacher (the same fixture): 0, then it moves away
    assert abs(log[0]["loss_kd"]) < 1e-7 < log[1]["loss_kd"]
    swapped = tmp_path / "swapped"
    shutil.copytree(FIX / "llama", swapped)
    vocab = json.loads((swapped / "vocab.json").read_text())
    a, b = (next(t for t, i in vocab.items() if i == n) for n in (500, 501))
    vocab[a], vocab[b] = 501, 500
    (swapped / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(dhrd.ConfigError, match=r"the teacher's tokenizer \(.*swapped, 897 ids\) is not the "
                       r"one .*first differ at id 500"):
        dhrd.main([*flags, f"--kd_teacher={swapped}", "--kd_coef=1", f"--out_dir={tmp_path / 'o1'}"])
    with pytest.raises(dhrd.ConfigError, match="the teacher's vocab_size is 61, the student's"):
        small = tmp_path / "small"
        _gpt_tiny("llama").save_pretrained(small)
        hf.copy_tokenizer_files(d / "base", small)
        dhrd.main([*flags, f"--kd_teacher={small}", "--kd_coef=1", f"--out_dir={tmp_path / 'o2'}"])
    no_head = r"--kd_teacher=.*qwen2_cls: .*needs the LM head \(lm_head.weight\)"  # an untied classifier
    with pytest.raises(dhrd.ConfigError, match=no_head):
        dhrd.main([*flags, f"--kd_teacher={FIX / 'qwen2_cls'}", "--kd_coef=1", f"--out_dir={tmp_path / 'c'}"])


# ------------------------------------------------------------------------------------------------------------
# runs that survive: reruns, restarts, SIGTERM / SIGUSR1, kills at every write point, a full disk

@pytest.fixture(scope="module")
def crash_data(tmp_path_factory):
    """A task a 1-layer model learns in 6 steps (an x or a y in the text), so that val improves 3 times and
    the export is replaced twice; and its uninterrupted run: 8 steps, evaluations at 2, 4, 6, 8 (exports at
    2, 4, 6), checkpoints at those and at 3 (--ckpt_interval=3)."""
    d = tmp_path_factory.mktemp("crash-data")
    rng = random.Random(0)
    for split, n in (("train", 64), ("val", 40)):
        with open(d / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                label = rng.choice(["pos", "neg"])
                ch = "x" if label == "pos" else "y"
                text = "".join(rng.choice("abc" + ch * 2) for _ in range(12))
                f.write(json.dumps({"text": text, "label": label, "rationale": f"it has {ch}"}) + "\n")
    prepare.prepare(task="custom", train_file=d / "train.jsonl", val_file=d / "val.jsonl",
                    out_dir=d / "data", model="char", quiet=True)
    flags = [*TINY, "--task=custom", f"--data_dir={d / 'data'}", "--learning_rate=1e-2", "--max_iters=8",
             "--eval_batch_size=16", "--eval_interval=2", "--ckpt_interval=3", "--log_interval=1",
             "--dropout=0.1"]
    _train_run(*flags, f"--out_dir={d / 'full'}", cwd=d, env={"OMP_NUM_THREADS": "1"})
    accuracy = [l["val"]["accuracy"] for l in _train_log(d / "full", "val")]
    assert len(accuracy) == 4 and accuracy[0] < accuracy[1]  # (0.425, 0.625, 1, 1 here): model/ replaced
    return d, flags


def _crash_outputs(out_dir):
    """What a run leaves that must not depend on its interruptions: ckpt.pt, the export, results.json, the
    log, the config (but for its out_dir); and no temporary."""
    files = _crash_files(out_dir)
    assert not [f for f in files if f.endswith((".tmp", ".old")) or "model." in f.split("/")[0]], list(files)
    config = json.loads(files["config.json"])
    files["config.json"] = {**config, "out_dir": None}
    return files


def test_train_rerun_rule_refusals_resume_and_overwrite(crash_data, tmp_path, monkeypatch):
    """The rule for an out_dir that holds a run (here a copy: out_dir itself does not count): another config
    is refused in one line naming the keys and the choices (the --init_from=resume one spelled out, none for
    another init_from); an out_dir that is or holds init_from or kd_teacher is refused (also when
    read_checkpoint's hint is followed without its --out_dir); a run's files without config.json are refused;
    safe keys and another spelling of data_dir continue; the same run counted in epochs (8 steps = 1 epoch)
    is finished, and 1.25 epochs continue it to 10 steps as max_iters=10 would; --init_from=resume takes the
    run's config under the flags, and on a first launch starts a new run; --overwrite=True starts over."""
    d, flags = crash_data
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "out-custom"  # where this task's runs go by default
    shutil.copytree(d / "full", run)
    here = [*flags, f"--out_dir={run}"]
    r = _train_run(*here, "--seed=7", cwd=tmp_path, check=False)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and r.stdout == "", r.stderr
    assert r.stderr == (f"dhrd.py: error: {run}/config.json: {run} holds a run with another config (seed "
                        f"1337 -> 7). To keep it, pass a new --out_dir; to continue it with these values: "
                        f"--init_from=resume --out_dir={run} --seed=7; to delete it and start this run "
                        f"there: --overwrite=True\n")
    shutil.copytree(run / "model", tmp_path / "copied" / "model")
    refusals = [([*here, "--seed=7", "--lora_rank=2"], r"\(lora_rank 0 -> 2, seed 1337 -> 7\)\..*"
                                                       r"--lora_rank=2 --seed=7;"),
                ([*here, f"--init_from={FIX / 'llama'}"], r"\(init_from 'scratch' -> .*llama'\)\. To keep "
                                                          r"it, pass a new --out_dir; to delete it"),
                ([*here, f"--init_from={run / 'model'}"], r"--init_from=.*out-custom/model is inside "
                                                          r"--out_dir=.*out-custom: the run would overwrite"),
                ([*flags, "--init_from=out-custom/model"], r"is inside --out_dir=out-custom"),  # hint, cut
                ([*here, f"--kd_teacher={run}", "--kd_coef=1"], r"--kd_teacher=.* is inside --out_dir"),
                ([*flags, f"--out_dir={tmp_path / 'copied'}"], r"copied: holds model but no config.json")]
    for argv, msg in refusals:
        with pytest.raises(dhrd.ConfigError, match=msg) as e:
            dhrd.parse_config(argv)
        assert "\n" not in str(e.value)
    data = os.path.relpath(d / "data", tmp_path)
    for argv in ([*here, "--max_iters=20", "--eval_interval=5", "--patience=3", "--ckpt_interval=1",
                  "--dist_timeout_s=60"],
                 [*flags, "--out_dir=out-custom", "--device=cpu", "--compile=True", f"--data_dir={data}"]):
        assert dhrd.parse_config(argv).max_iters in (8, 20)  # the same run: it continues
    epochs = [f for f in here if not f.startswith("--max_iters")] + ["--eval_interval=epoch"]
    r = _train_run(*epochs, "--max_epochs=1", cwd=tmp_path)
    assert r.stdout.startswith(f"dhrd.py: {run} holds a finished run (iter 8, ") and r.stderr == "", r.stderr
    assert "to train it further raise --max_epochs" in r.stdout
    r = _train_run(*epochs, "--max_epochs=1.25", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert "continuing the run in" in r.stdout and "from its ckpt.pt at iter 8" in r.stdout
    assert [l["iter"] for l in _train_log(run, "val")] == [2, 4, 6, 8, 10]  # then each epoch: 8 steps
    assert torch.load(run / "ckpt.pt", weights_only=True)["iter"] == 10
    cfg = dhrd.parse_config(["--init_from=resume", f"--out_dir={run}", "--seed=7"])
    assert (cfg.seed, cfg.init_from, cfg.max_epochs, cfg.task) == (7, "scratch", 1.25, "custom")
    cfg = dhrd.parse_config([*flags, "--init_from=resume", f"--out_dir={tmp_path / 'first'}"])
    assert cfg.init_from == "scratch"  # a first launch: nothing to resume, a new run
    _train_run(*here, "--seed=7", "--max_iters=2", "--overwrite=True", cwd=tmp_path,
               env={"OMP_NUM_THREADS": "1"})
    assert [l["iter"] for l in _train_log(run)] == [1, 2]  # the old run's lines went with it
    assert json.loads((run / "results.json").read_text())["best_iter"] == 2
    assert torch.load(run / "ckpt.pt", weights_only=True)["iter"] == 2
    assert json.loads((run / "config.json").read_text())["seed"] == 7


def test_train_full_disk_is_one_line_and_the_temporary_goes(crash_data, tmp_path):
    """ckpt.pt.tmp on a full disk (a link to /dev/full: the kernel's ENOSPC through torch.save): one
    'dhrd.py: error:' line naming the file, exit status 1, the temporary removed; once there is room the
    same command runs again from its last checkpoint (none yet here) to the uninterrupted run's files."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    d, flags = crash_data
    out = tmp_path / "full-disk"
    out.mkdir()
    (out / "ckpt.pt.tmp").symlink_to("/dev/full")
    r = _train_run(*flags, f"--out_dir={out}", cwd=tmp_path, check=False, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == (f"dhrd.py: error: {out}/ckpt.pt: cannot be written (No space left "
                                         "on device); the partial ckpt.pt.tmp was removed and the ckpt.pt "
                                         "there before, if any, is intact: free space on that disk (or write "
                                         "elsewhere) and run the command again")
    assert not os.path.lexists(out / "ckpt.pt.tmp") and not (out / "ckpt.pt").exists()
    _train_run(*flags, f"--out_dir={out}", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert _crash_outputs(out) == _crash_outputs(d / "full")


def test_train_crash_at_each_write_point_then_rerun_is_bitwise_identical(crash_data, crash_script):
    """One run SIGKILLed at 6 points, each time started again with the same command: before its 2nd step,
    before the rename of its 1st ckpt.pt, in the middle of its 1st evaluation, just after the rename of its
    2nd ckpt.pt (iter 3), between the two renames of an export that replaces model/ (iter 4), and before the
    rename of results.json (after the last checkpoint). The last start ends the run; every file it leaves
    (ckpt.pt, model/, results.json, log.jsonl, config.json) is bitwise that of the uninterrupted run (fp32,
    CPU, dropout on), and one more start says 'finished', exits 0 and changes nothing."""
    d, flags = crash_data
    out = d / "crashed"
    points = [{"at": "step", "n": 2}, {"at": "replace", "name": "ckpt.pt", "n": 1},
              {"at": "classify", "n": 2}, {"at": "replaced", "name": "ckpt.pt", "n": 2},
              {"at": "replace", "name": "model", "n": 1}, {"at": "replace", "name": "results.json", "n": 1}]
    for spec in points:
        r = _crash_run(crash_script, "dhrd.py", [*flags, f"--out_dir={out}"], [spec], d)
        assert r.returncode == -9, (spec, r.stdout, r.stderr)
        if spec.get("name") == "model":
            assert not (out / "model").exists() and (out / "model.old").is_dir()  # cut between the renames
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 8 and not (out / "results.json").exists()
    r = _train_run(*flags, f"--out_dir={out}", cwd=d, env={"OMP_NUM_THREADS": "1"})
    assert "continuing the run in" in r.stdout and "from its ckpt.pt at iter 8" in r.stdout
    full = _crash_outputs(d / "full")
    assert _crash_outputs(out) == full
    r = _train_run(*flags, f"--out_dir={out}", cwd=d, env={"OMP_NUM_THREADS": "1"})
    assert r.stdout.startswith(f"dhrd.py: {out} holds a finished run (iter 8, val accuracy ")
    assert _crash_outputs(out) == full


def test_train_sigusr1_checkpoints_at_the_next_step_and_the_rerun_is_exact(crash_data, crash_script):
    """SIGUSR1 (SLURM's warning; SIGTERM takes the same path) during step 4: the run writes ckpt.pt at the end
    of step 5, a step that neither evaluates nor checkpoints, says so in one line, and exits with 143
    (requeue me); the same command continues it to the uninterrupted run's files, bit for bit. --eval_only,
    which has nothing to checkpoint, ends at SIGTERM as a program does by default."""
    d, flags = crash_data
    out = d / "signalled"
    r = _crash_run(crash_script, "dhrd.py", [*flags, f"--out_dir={out}"],
                   [{"at": "step", "n": 4, "signal": "SIGUSR1"}], d)
    assert r.returncode == dhrd.REQUEUE_EXIT == 143, r.stderr
    assert r.stderr.splitlines()[-1] == (f"dhrd.py: stopped by SIGUSR1 at iter 5, after writing "
                                         f"{out}/ckpt.pt: the same command continues the run (exit status "
                                         "143: requeue me)")
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 5
    assert [l["iter"] for l in _train_log(out)] == [1, 2, 3, 4, 5] and not (out / "results.json").exists()
    r = _train_run(*flags, f"--out_dir={out}", cwd=d, env={"OMP_NUM_THREADS": "1"})
    assert "from its ckpt.pt at iter 5" in r.stdout
    assert _crash_outputs(out) == _crash_outputs(d / "full")
    r = _crash_run(crash_script, "dhrd.py", [f"--init_from={out}", "--eval_only=True"],
                   [{"at": "classify", "n": 1, "signal": "SIGTERM"}], d)
    assert r.returncode == -signal.SIGTERM and r.stdout == "", (r.returncode, r.stderr)


def test_train_torchrun_restart_after_a_kill_and_sigterm_continue_exactly(crash_data, crash_script):
    """torchrun --nproc_per_node=2 --max-restarts=2, Gloo, 3 kill points in one command. Attempt 0: SIGUSR1
    to rank 1 alone (SLURM may signal some ranks only) at its 1st optimizer update: both ranks stop after
    step 2, an evaluation that both ranks share, with ckpt.pt written, and exit 143; torchrun restarts them
    (they meet in the store again: a prefix per attempt) and they continue from iter 2. Attempt 1: rank 1
    SIGKILLed before its 5th update (after the step's all-reduces: rank 0 ends step 5, which neither
    evaluates nor checkpoints, and fails in step 6's); the restart continues from the last checkpoint, iter
    4. Attempt 2: in its 2nd step rank 0 sends SIGTERM to torchrun, which passes it to both workers: both
    stop after step 7 (no evaluation, no --ckpt_interval) with ckpt.pt written, exit 143, and torchrun ends.
    The same torchrun command then ends the run: ckpt.pt, model/, results.json and the log bitwise those of
    the uninterrupted 2-process run."""
    d, flags = crash_data
    flags = [*flags, "--gradient_accumulation_steps=2", "--dropout=0.0"]  # 0: rank 1 is reseeded on resume
    _train_torchrun(*flags, f"--out_dir={d / 'two'}", cwd=d)
    out = d / "two-crashed"
    specs = [{"at": "step", "n": 1, "rank": 1, "attempt": 0, "signal": "SIGUSR1"},
             {"at": "step", "n": 3, "rank": 1, "attempt": 1},
             {"at": "step", "n": 2, "rank": 0, "attempt": 2, "signal": "SIGTERM_PARENT"}]
    r = _crash_run(crash_script, "dhrd.py", [*flags, f"--out_dir={out}"], specs, d, torchrun=True)
    assert r.returncode != 0, r.stderr
    said = r.stdout + r.stderr
    stopped = f"dhrd.py: stopped by a signal to another rank at iter 2, after writing {out}/ckpt.pt"
    assert stopped in said, said
    for it in (2, 4):
        assert f"continuing the run in {out} from its ckpt.pt at iter {it}\n" in r.stdout, said
    assert f"dhrd.py: stopped by SIGTERM at iter 7, after writing {out}/ckpt.pt" in r.stderr, said
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter"] == 7
    r = _train_torchrun(*flags, f"--out_dir={out}", cwd=d)
    assert "from its ckpt.pt at iter 7" in r.stdout
    assert _crash_outputs(out) == _crash_outputs(d / "two")


# epochs (--max_epochs, --eval_interval=epoch), the presets in config/, the Table 1 driver (experiments/)

def test_train_epochs_resolved_and_their_errors(tmp_path):
    """steps per epoch = ceil(train rows / global batch); max_iters = ceil(max_epochs x that) (HF Trainer's
    count), eval_interval=epoch = one epoch; max_iters stays when max_epochs is 0; the bad combinations."""
    def resolved(n, *args):
        cfg = dhrd.parse_config(list(args))
        dhrd.resolve_epochs(cfg, n)
        return cfg.max_iters, cfg.eval_interval

    # the paper's CB on 8 GPUs: 250 rows, global batch 4 x 64 = 256 -> 1 step per epoch, 3 in all
    assert resolved(250, "--batch_size=4", "--gradient_accumulation_steps=64", "--max_epochs=3",
                    "--eval_interval=epoch") == (3, 1)
    assert resolved(9427, "--batch_size=4", "--gradient_accumulation_steps=64", "--max_epochs=3",
                    "--eval_interval=epoch") == (111, 37)  # BoolQ: 36.8 -> 37 steps per epoch
    assert resolved(300, "--batch_size=10", "--gradient_accumulation_steps=1", "--max_epochs=0.1") == (3, 100)
    assert resolved(300, "--batch_size=10", "--gradient_accumulation_steps=1", "--max_iters=7") == (7, 100)
    cfg = dhrd.parse_config(["--batch_size=10", "--gradient_accumulation_steps=1", "--max_iters=45"])
    assert dhrd.schedule_text(cfg, 300) == ("max_iters 45 steps = 1.5 epochs (30 per epoch: 300 train rows / "
                                            "global batch 10, rounded up), eval every 100")
    preset = tmp_path / "p.json"
    preset.write_text(json.dumps({"_about": "a note", "_anything": [1], "max_epochs": 3, "batch_size": 2}))
    cfg = dhrd.parse_config([str(preset)])  # "_" keys are notes, skipped
    assert (cfg.max_epochs, cfg.batch_size) == (3.0, 2)
    assert dhrd.parse_config([str(preset), "--max_epochs=0", "--max_iters=5"]).max_iters == 5
    both = "max_iters=5 is set, but max_epochs=3 sets the steps (from the data); add --max_epochs=0 to count"
    for args, msg in [([str(preset), "--max_iters=5"], both),
                      (["--max_epochs=-1"], "max_epochs=-1.0: use a number of epochs > 0, or 0"),
                      (["--eval_interval=often"], "expected int for eval_interval (like 100), got 'often'; "
                                                  "or use epoch"),
                      (["--eval_interval=0"], "eval_interval and log_interval must be >= 1"),
                      (["--_about=x"], "unknown config key '_about'")]:
        with pytest.raises(dhrd.ConfigError, match=re.escape(msg)):
            dhrd.parse_config(args)


def _torchrun_n(n, script, *args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(script), *args]
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_train_max_epochs_one_two_three_processes(tmp_path, capsys):
    """--max_epochs=2 --eval_interval=epoch on 30 rows, global batch 12 = 3 steps per epoch (2.5 rounded up):
    6 steps, evaluated at 3 and 6, recorded in config.json, stated on the startup line, for 1 process x 6
    micro-batches, 2 x 3 (the same losses) and 3 x 1 (the default accumulation, micro-batch 4)."""
    rows = [dict(text=f"n={i}", label=["even", "odd"][i % 2], rationale=f"{i} mod 2 = {i % 2}")
            for i in range(40)]
    for split, part in (("train", rows[:30]), ("val", rows[30:])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    data = tmp_path / "data"
    prepare.prepare(task="custom", out_dir=data, model="char", quiet=True,
                    train_file=tmp_path / "train.jsonl", val_file=tmp_path / "val.jsonl")
    flags = [*TINY, f"--data_dir={data}", "--max_epochs=2", "--eval_interval=epoch", "--log_interval=1"]
    dhrd.main([*flags, "--batch_size=2", "--gradient_accumulation_steps=6", f"--out_dir={tmp_path / 'one'}"])
    line = "max_epochs 2 = 6 steps (3 per epoch: 30 train rows / global batch 12, rounded up), eval every 3"
    assert "global batch 12 = 1 processes x 6 micro-batches x 2" in capsys.readouterr().out
    r2 = _torchrun_n(2, ROOT / "dhrd.py", *flags, "--batch_size=2", "--gradient_accumulation_steps=6",
                     f"--out_dir={tmp_path / 'two'}", cwd=tmp_path)
    r3 = _torchrun_n(3, ROOT / "dhrd.py", *flags, "--batch_size=4", f"--out_dir={tmp_path / 'three'}",
                     cwd=tmp_path)
    assert "global batch 12 = 2 processes x 3 micro-batches x 2" in r2.stdout and line in r2.stdout
    assert "global batch 12 = 3 processes x 1 micro-batches x 4" in r3.stdout and line in r3.stdout
    for run, accum in (("one", 6), ("two", 6), ("three", 3)):
        saved = json.loads((tmp_path / run / "config.json").read_text())
        assert (saved["max_epochs"], saved["max_iters"], saved["eval_interval"]) == (2.0, 6, 3), run
        assert saved["gradient_accumulation_steps"] == accum, run
        assert [l["iter"] for l in _train_log(tmp_path / run, "val")] == [3, 6], run
        assert [l["iter"] for l in _train_log(tmp_path / run)] == [1, 2, 3, 4, 5, 6], run
    for a, b in zip(_train_log(tmp_path / "one"), _train_log(tmp_path / "two"), strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a, b)


# bench.py's named shapes are these public checkpoints' (test_bench_paper_shapes_have_the_public_parameter_
# counts checks them), so a hub name maps to its family without a download
PRESET_BACKBONES = {"llama-3.1-8b": "meta-llama/Llama-3.1-8B", "llama-3.2-3b": "meta-llama/Llama-3.2-3B",
                    "qwen3-8b": "Qwen/Qwen3-8B", "qwen3-4b": "Qwen/Qwen3-4B"}


def test_train_presets_parse_and_name_known_families():
    """Every config/*.json parses with every key and choice resolved (the "_" keys are notes), names a model
    of a known family without a download, and the paper's presets carry App. E's numbers, a source for each
    key, a global batch of 256 whatever the GPU count, and pooled = DHRD with alpha 0."""
    presets = sorted((ROOT / "config").glob("*.json"))
    assert {p.stem for p in presets} >= {f"{b}-{arm}" for b in PRESET_BACKBONES for arm in ("dhrd", "pooled")}
    for path in presets:
        raw = json.loads(path.read_text())
        keys = {k for k in raw if not k.startswith("_")}
        cfg = dhrd.parse_config([str(path)])
        assert all(getattr(cfg, k) == raw[k] for k in keys), path.name
        assert "_about" in raw and set(raw.get("_source", {})) <= keys, path.name
        if "init_from" in raw:
            model = raw["init_from"]
            if (ROOT / model / "config.json").exists():  # a folder: its config.json names the family
                family = json.loads((ROOT / model / "config.json").read_text())["model_type"]
            else:  # a hub name: bench.py's shape of that checkpoint (no download)
                family = bench.SHAPES[model.split("/")[-1].lower()]["model_type"]
            assert family in hf.FAMILIES, (path.name, model)
    for short, name in PRESET_BACKBONES.items():
        dhrd_, pooled = (json.loads((ROOT / "config" / f"{short}-{arm}.json").read_text()) for arm in
                         ("dhrd", "pooled"))
        assert set(dhrd_["_source"]) == {k for k in dhrd_ if not k.startswith("_")}  # every value cited
        assert {k: v for k, v in pooled.items() if k[0] != "_" and k != "alpha"} == \
               {k: v for k, v in dhrd_.items() if k[0] != "_" and k != "alpha"}
        assert pooled["alpha"] == 0 and dhrd_["alpha"] == (0.5 if short == "qwen3-4b" else 1.0)
        assert dhrd_["init_from"] == name and dhrd_["beta"] == 1 and dhrd_["head"] == "mlp"
        assert (dhrd_["lora_rank"], dhrd_["lora_alpha"], dhrd_["lora_dropout"]) == (16, 32, 0.1)  # App. E.4
        assert len(dhrd_["lora_targets"].split(",")) == 7
        optim = (dhrd_["learning_rate"], dhrd_["weight_decay"], dhrd_["lr_decay"], dhrd_["warmup_iters"])
        assert optim == (2e-4, 0.01, "cosine", 5)  # App. E.5, as are the epochs
        assert (dhrd_["max_epochs"], dhrd_["eval_interval"]) == (3, "epoch")
        assert dhrd_["batch_size"] * dhrd_["gradient_accumulation_steps"] == 256
        for world in (1, 2, 4, 8):  # the accumulation is for the whole job: each GPU count here divides it
            assert dhrd_["gradient_accumulation_steps"] % world == 0
    # the repository's own experiment: the preset is what every committed run of it used
    budget = json.loads((ROOT / "config" / "esnli-budget.json").read_text())
    runs = sorted((ROOT / "experiments" / "results" / "esnli").glob("*/config.json"))
    assert len(runs) >= 9
    for run in runs:
        saved = json.loads(run.read_text())
        assert all(saved[k] == v for k, v in budget.items() if k[0] != "_"), run


sys.path.insert(0, str(ROOT / "experiments"))
import pilot_epochs  # noqa: E402
import summarize  # noqa: E402
import superglue  # noqa: E402
import template_rationales  # noqa: E402


def test_train_lowdata_experiment_rules(capsys):
    """The low-data experiment's two pre-registered rules, as its scripts apply them: the pilot's epoch count
    (and the committed pilots' decisions), and the paired verdict on test-2k with the detectable difference."""
    E, m, longer = pilot_epochs.choose_epochs([0.5, 0.6, 0.7, 0.7, 0.7, 0.7])
    assert (E, longer) == (4, False) and m[:2] == pytest.approx([0.55, 0.6])  # ends: two epochs averaged
    assert pilot_epochs.choose_epochs([0.5, 0.6, 0.62, 0.66])[2]  # max at the end and +0.04 in its last quarter
    for pilot in sorted((ROOT / "experiments" / "results" / "esnli-lowdata").glob("n*/pilot*/epochs.json")):
        saved = json.loads(pilot.read_text())
        assert pilot_epochs.choose_epochs(saved["val"])[::2] == (saved["E"], saved["rerun_longer"]), pilot
    assert summarize.t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)  # Student's t tables
    assert summarize.t_quantile(0.80, 4) == pytest.approx(0.9410, abs=1e-4)
    assert summarize.t_sf2(2.7764451, 4) == pytest.approx(0.05, abs=1e-6)

    def verdict(d, seeds=5):
        base = {s: {"test": 0.7} for s in range(1, seeds + 1)}
        arm = {s: {"test": 0.7 + x} for s, x in zip(base, d)}
        summarize.lowdata_decision({"pooled": base, "dhrd_palm": arm})
        return capsys.readouterr().out.strip().rsplit("=> ", 1)[-1]

    assert verdict([0.001, 0.09, 0.002, 0.05, 0.003]) == "gain"  # p = 0.18, but 5 of 5 seeds ahead
    assert verdict([0.05, 0.06, 0.04, 0.05, -0.001]) == "gain"  # one seed behind, p = 0.02
    assert verdict([-0.01, -0.02, -0.01, -0.03, -0.02]) == "loss"
    d = [0.02, -0.01, 0.03, -0.02, 0.01]
    mde = 1.662 * statistics.stdev(d)
    assert verdict(d) == f"no difference at this resolution (the design detects {mde:.3f} and larger)"
    assert verdict([0.05, 0.06], seeds=2).endswith("undecided so far")  # no verdict before 5 seeds


def test_train_table1_paper_averaging():
    """CB's F1/acc and MultiRC's F1a/EM are averaged first, then the tasks; gains relative to pooled."""
    vals = {"cb": {"pooled": {"f1": 0.8, "accuracy": 0.9}, "dhrd": {"f1": 0.9, "accuracy": 0.9}},
            "multirc": {"pooled": {"f1a": 0.7, "em": 0.3}, "dhrd": {"f1a": 0.7, "em": 0.5}},
            "rte": {"pooled": {"accuracy": 0.6}, "dhrd": {"accuracy": 0.6}}}
    t = superglue.table1(vals)
    assert t["tasks"]["cb"]["score"] == pytest.approx({"pooled": 0.85, "dhrd": 0.9})
    assert t["tasks"]["multirc"]["gain_pct"] == pytest.approx(20.0)  # 0.5 -> 0.6
    assert t["avg"]["pooled"] == pytest.approx((0.85 + 0.5 + 0.6) / 3)
    assert t["avg"]["dhrd"] == pytest.approx((0.9 + 0.6 + 0.6) / 3)
    assert t["avg"]["gain_pct"] == pytest.approx(100 * (2.1 - 1.95) / 1.95)
    assert superglue.relative_gain(0.8752, 0.8629) == pytest.approx(1.425, abs=1e-3)  # paper: Llama-3.1-8B
    md = superglue.markdown(t, "title", "DHRD").splitlines()
    assert md[2] == "| | CB F1/acc | MultiRC F1a/EM | RTE | Avg (3 of 7 tasks) |"
    assert md[4] == "| pooled baseline (alpha 0) | 80.00/90.00 | 70.00/30.00 | 60.00 | 65.00 |"
    assert md[6] == "| relative gain | +5.88% | +20.00% | +0.00% | +7.69% |"


def test_train_superglue_driver_end_to_end_rerun_and_torchrun(tmp_path, capsys):
    """experiments/superglue.py on two tiny tasks (CB, COPA), the tiny Llama fixture, template rationales made
    locally: prepares both, trains pooled then DHRD per task (2 steps each), writes Table 1 from the runs'
    results.json; a rerun skips everything, a run without results.json but with ckpt.pt resumes, 2 torchrun
    processes give the same table; a missing rationale source or a pooled preset is one clear error."""
    sg = _prep_write_sg(tmp_path / "sg")
    template_rationales.main(["--tasks=cb,copa", f"--data_dir={sg}", f"--out={tmp_path / 'r.jsonl'}"])
    args = [str(ROOT / "config" / "cpu-demo.json"), f"--init_from={FIX / 'llama_base'}", "--tasks=copa,cb",
            f"--rationales={tmp_path / 'r.jsonl'}", f"--data_dir={sg}", "--max_epochs=2", "--batch_size=2",
            "--gradient_accumulation_steps=2", "--eval_interval=epoch", "--lora_dropout=0"]  # 0: ranks' masks
    out = tmp_path / "one"
    superglue.main([*args, f"--out_dir={out}"])
    printed = capsys.readouterr().out
    for task, rows in (("cb", 3), ("copa", 4)):
        meta = json.loads((out / "data" / task / "meta.json").read_text())
        assert meta["counts"]["train"] == rows and meta["rationale_source"] == "file:r.jsonl", meta
        assert meta["dropped"] == {}  # every template rationale names the gold label
        for arm, alpha in (("pooled", 0.0), ("dhrd", 1.0)):
            saved = json.loads((out / f"{task}-{arm}" / "config.json").read_text())
            assert (saved["alpha"], saved["max_iters"], saved["eval_interval"]) == (alpha, 2, 1), saved
            assert saved["lora_rank"] == 4 and saved["head"] == "mlp"  # the preset, under the flags
    assert printed.index("cb pooled") < printed.index("cb dhrd") < printed.index("copa pooled")
    table = json.loads((out / "table1.json").read_text())
    assert list(table["tasks"]) == ["cb", "copa"] and table["avg"]["n_tasks"] == 2
    for task in ("cb", "copa"):
        for arm in ("pooled", "dhrd"):
            val = json.loads((out / f"{task}-{arm}" / "results.json").read_text())["val"]
            assert table["tasks"][task][arm] == val
    assert "| | CB F1/acc | COPA | Avg (2 of 7 tasks) |" in (out / "table1.md").read_text()
    assert (out / "table1.md").read_text() in printed
    # rerun: nothing is prepared or trained again
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix != ".md"
              and p.name != "table1.json"}
    superglue.main([*args, f"--out_dir={out}"])
    printed = capsys.readouterr().out
    assert printed.count("(done)") == 4 and printed.count("prepared before, kept") == 2, printed
    assert stamps == {p: p.stat().st_mtime_ns for p in stamps}
    # an interrupted run (ckpt.pt, no results.json) resumes: here at its end, so it writes the same results
    before = (out / "cb-dhrd" / "results.json").read_text()
    (out / "cb-dhrd" / "results.json").unlink()
    superglue.main([*args, f"--out_dir={out}"])
    assert f"cb dhrd: {out / 'cb-dhrd'} (resume)" in capsys.readouterr().out
    assert json.loads((out / "cb-dhrd" / "results.json").read_text())["val"] == json.loads(before)["val"]
    # 2 processes x 1 micro-batch == 1 process x 2: the same table
    r = _torchrun_n(2, ROOT / "experiments" / "superglue.py", *args, f"--out_dir={tmp_path / 'two'}",
                    cwd=tmp_path)
    assert "2 processes x 1 micro-batches x 2" in r.stdout
    two = json.loads((tmp_path / "two" / "table1.json").read_text())
    assert (two["tasks"], two["avg"]) == (table["tasks"], table["avg"])
    for run in ("cb-pooled", "cb-dhrd", "copa-pooled", "copa-dhrd"):
        for a, b in zip(_train_log(out / run), _train_log(tmp_path / "two" / run), strict=True):
            assert abs(a["loss"] - b["loss"]) < 1e-5, (run, a, b)
    no_source = [a for a in args if not a.startswith("--rationales")]
    for argv, msg in [(no_source, "DHRD needs a rationale source: --rationales=FILE.jsonl"),
                      ([*args, "--alpha=0"], "the preset is a pooled baseline (alpha 0)"),
                      ([*args, "--tasks=cb,mnli"], "--tasks=cb,mnli: use a comma list of boolq, cb"),
                      ([*args, "--task=cb"], "unknown config key 'task'; did you mean tasks")]:
        with pytest.raises(dhrd.ConfigError, match=re.escape(msg)):
            superglue.main([*argv, f"--out_dir={tmp_path / 'bad'}"])
    assert not (tmp_path / "bad").exists()


# ============================================================================================================
# bench.py: the JSON contract on a tiny model, flag errors
# ============================================================================================================

BENCH_TINY = ["--batch_size=4", "--seq_len=16", "--cot_batch_size=2", "--cot_tokens=5", "--cot_prompt_len=3",
              "--train_batch_size=2", "--train_seq_len=12", "--agree_batches=2", "--warmup=0", "--repeats=2",
              # 4096 rows x 4096 vocab: the naive loss holds several [4096, 4096] fp32 tensors (64 MB each),
              # the fused one only [chunk, 4096] pieces, so fused < naive must hold by a wide margin
              "--mem_vocab=4096", "--mem_seq_len=4096",
              "--threads=1"]  # a tiny model's small ops: one thread is faster on a loaded 2-core machine


def _bench_run(*args, timeout=600):
    return subprocess.run([sys.executable, str(ROOT / "bench.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _bench_tiny_model(path):
    cfg = GPTConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32, num_labels=3)
    GPT(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_bench_end_to_end_json(lora_rank, tmp_path):
    model_dir = _bench_tiny_model(tmp_path / "tiny")
    out = tmp_path / "bench.json"
    p = _bench_run(f"--init_from={model_dir}", f"--out={out}", f"--train_lora_rank={lora_rank}",
                   *BENCH_TINY)  # default dtype: auto
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    # every key of the bench JSON (README, bench.py), with the shapes that were asked for
    assert r["device"] == "cpu" and r["model"] == str(model_dir)
    # bf16 only where the CPU has it natively
    assert (r["dtype"], r["dtype_reason"]) == gpt.native_dtype("cpu")
    assert {k: r["pooled"][k] for k in ("batch_size", "seq_len")} == {"batch_size": 4, "seq_len": 16}
    assert {k: r["cot"][k] for k in ("batch_size", "new_tokens")} == {"batch_size": 2, "new_tokens": 5}
    assert {k: r["train"][k] for k in ("batch_size", "seq_len")} == {"batch_size": 2, "seq_len": 12}
    assert r["train"]["mfu"] is None  # no MFU on a CPU: there is no vendor peak to divide by
    assert r["train"]["peak_tflops"] is None and r["gpu"] is None
    assert r["train"]["lora_rank"] == lora_rank
    assert (r["train"]["trained_params"] < r["params"]) == (lora_rank > 0)  # LoRA: adapters + pooled head
    for v in (r["pooled"]["qps"], r["cot"]["qps"], r["cot"]["tokens_per_s"], r["train"]["tokens_per_s"]):
        assert isinstance(v, float) and v > 0
    assert r["speedup"] == r["pooled"]["qps"] / r["cot"]["qps"]
    assert r["cot"]["tokens_per_s"] == pytest.approx(r["cot"]["qps"] * 5)
    assert r["pooled"]["agreement_n"] == 8 and 0 <= r["pooled"]["agreement_fp32"] <= 1
    # the limits, measured in the run, and each figure's fraction of the one that bounds it
    lim = r["limits"]
    assert r["threads"] == 1  # --threads
    assert lim["read_gb_s"] > 0 and lim["copy_gb_s"] > 0 and lim["matmul_peak_tflops"] > 0
    assert lim["peak_gb_s"] is None and lim["peak_tflops"] is None  # datasheet peaks: GPUs only
    for fig in (r["pooled"], r["train"]):
        assert fig["gemm_tflops"] > 0
        assert fig["roofline_fraction"] == pytest.approx(fig["tflops"] / fig["gemm_tflops"])
    c1 = r["cot_batch1"]
    assert c1["batch_size"] == 1 and c1["new_tokens"] == 5 and r["cot"]["compiled"] is False
    for ct in (r["cot"], c1):
        if ct["step_ms"] is not None:  # None only where the prefill-only call timed slower (tiny model)
            assert ct["roofline_fraction"] == pytest.approx(ct["roofline_step_ms"] / ct["step_ms"])
    m = bench.load_model(str(model_dir))  # fp32: 4 bytes a weight; the tied head counted once, wpe not at all
    weights = 4 * (sum(p.numel() for p in m.parameters()) - m.wpe.weight.numel() - m.score.weight.numel())
    kv = 2 * 2 * 32 * 4  # K and V, 2 layers, 32 channels, fp32, per cached token
    assert bench.decode_step_bytes(m, 2, 10) == weights + 2 * 10 * kv
    assert "pooled QPS" in p.stdout and "% read" in p.stdout and "% GEMM" in p.stdout
    m = r["lm_loss_memory"]
    assert 0 < m["fused_peak_mb"] < m["naive_peak_mb"]
    assert m["naive_peak_mb"] > 32  # at least one [4096, 4096] logits tensor was measured
    assert "pooled QPS" in p.stdout and "speedup" in p.stdout  # the printed table


def test_bench_builtin_shape_is_gpt2_124m():
    # `--init_from=gpt2` builds the real shape without a download: 124,439,808 parameters (tied
    # embeddings, as HF counts GPT2LMHeadModel) plus the bias-free 768 x 2 pooled head
    model = bench.load_model("gpt2")
    assert sum(p.numel() for p in model.parameters()) == 124_439_808 + 768 * bench.Config.num_labels


@pytest.mark.parametrize("name, hf_params", [("llama-3.1-8b", 8_030_261_248), ("llama-3.2-3b", 3_212_749_824),
                                             ("qwen3-4b", 4_022_468_096), ("qwen3-8b", 8_190_735_360)])
def test_bench_paper_shapes_have_the_public_parameter_counts(name, hf_params):
    # the paper's backbones, built on the meta device (no memory, no time): the public counts (HF's, a tied
    # LM head counted once) plus the bias-free pooled head, num_labels x hidden; the Llama/Qwen3 fields
    model = bench.load_model(name, "meta")
    c = model.config
    assert next(model.parameters()).is_meta
    assert sum(p.numel() for p in model.parameters()) == hf_params + c.n_embd * bench.Config.num_labels
    family = (c.norm, c.glu, c.activation, c.bias, c.qkv_bias, c.pre_ln)
    assert family == ("rmsnorm", True, "silu", False, False, True)
    assert c.qk_norm == name.startswith("qwen3")
    assert (model.lm_head.weight is model.wte.weight) == c.tie_word_embeddings
    assert (c.rope_scaling or {}).get("rope_type") == ("llama3" if name.startswith("llama") else None)


def test_bench_builds_in_dtype_and_counts_lora_flops():
    # a built-in shape is constructed in the benchmark dtype directly (CUDA: on the GPU, no fp32 host copy)
    model = bench.load_model("llama-tiny", "cpu", torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored
    assert bench.train_flops_per_token(model, 32) == model.flops_per_token(32)  # full fine-tuning: 6N + attn
    gpt.add_lora(model, 4)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    attn = model.flops_per_token(32) - 6 * (trained + frozen)
    # LoRA: a frozen weight has a forward and an input gradient, no weight gradient
    assert bench.train_flops_per_token(model, 32) == 6 * trained + 4 * frozen + attn


def test_bench_bad_flag_cli():
    p = _bench_run("--batch_sise=4", timeout=60)
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1, p.stderr  # one line, no traceback
    assert p.stderr.startswith("bench.py: error: --batch_sise: unknown config key 'batch_sise'; "
                               "did you mean batch_size")


@pytest.mark.parametrize("arg, needle", [
    ("--batch_size=four", "--batch_size: expected int for batch_size (like 16), got 'four'"),
    ("--compile=maybe", "--compile: expected bool for compile (like False), got 'maybe'"),
    ("seq_len=4", "argument 'seq_len=4': use --key=value"),
    ("--dtype=fp8", "--dtype: dtype='fp8' is not one of auto, float32, bfloat16, float16"),
    ("--init_from=no-such-model", "neither a model folder nor a built-in shape"),
    ("--dtype=float16", "float16 on CUDA only"),
    ("--seq_len=65", "exceeds the model's block_size 64"),
    ("--train_lora_rank=-1", "0 (full fine-tuning) or a LoRA rank >= 1"),
    ("--threads=-2", "0 (torch's default) or a number of threads >= 1"),
])
def test_bench_bad_flags(arg, needle, tmp_path):
    model_dir = _bench_tiny_model(tmp_path / "tiny")
    with pytest.raises(bench.ConfigError) as e:  # plumbing.ConfigError; __main__ prints it as one line
        bench.main([f"--init_from={model_dir}", arg])
    assert needle in str(e.value)


# ============================================================================================================
# cuda: skipped without a GPU (`pytest -k cuda`). The checks a GPU can break: parity in fp32, bf16
# predictions, greedy decoding, the fused LM loss, a torchrun (NCCL) compiled bf16 run, recompilations
# over varying lengths.
# DHRD_TEST_DEVICE=cpu runs the same bodies on the CPU (Gloo for the torchrun run) to debug them.
# ============================================================================================================

DEV = os.environ.get("DHRD_TEST_DEVICE", "cuda")
cuda = pytest.mark.skipif(DEV.startswith("cuda") and not torch.cuda.is_available(),
                          reason="needs CUDA (DHRD_TEST_DEVICE=cpu runs these tests on the CPU)")


@pytest.fixture
def _cuda_exact_fp32(monkeypatch):
    # float32 matmuls in float32, not TF32 (10-bit mantissa), whatever the environment set
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _cuda_ref(name):
    return {k: v.to(DEV) for k, v in _gpt_ref(name).items()}


@cuda
@pytest.mark.parametrize("folder,ref", PARITY)
def test_cuda_parity_with_transformers_fp32(folder, ref, _cuda_exact_fp32):
    r = _cuda_ref(ref)
    m = GPT.from_pretrained(FIX / folder).eval().to(DEV)
    ids, am = r["input_ids"], r["attention_mask"]
    real = am.bool()
    with torch.no_grad():
        d_logits = (m.lm_logits(ids, am) - r["logits"])[real].abs().max().item()
        d_hidden = (m.hidden_states(ids, am) - r["last_hidden_state"])[real].abs().max().item()
        assert d_logits <= 1e-4 and d_hidden <= 1e-4, (d_logits, d_hidden)
        if m.score is not None:  # seq-cls checkpoints: HF `score` pooled at the last non-pad token
            d_cls = (m.classify(ids, am) - r["cls_logits"]).abs().max().item()
            assert d_cls <= 1e-4, d_cls


def _cuda_classifier(folder):
    # the fixture's own head, or a fresh seeded one (the same on every device: initialised on the host)
    torch.manual_seed(0)
    m = GPT.from_pretrained(FIX / folder)
    if m.score is None:
        torch.manual_seed(0)
        m = GPT.from_pretrained(FIX / folder, num_labels=3)
    return m.eval().to(DEV)


@cuda
def test_cuda_bf16_class_argmax_agrees_with_fp32(_cuda_exact_fp32):
    """bf16 weights (bench.py's CUDA setting) against the same model in fp32, 3 rows of every fixture. A row
    may flip only where the fp32 margin between the top two classes is within twice bf16's error on that
    row's logits; in all, >= 90% must agree. DHRD_TEST_DEVICE=cpu: 30 of 30 agree (smallest fp32 margin 0.015,
    largest bf16 logit error 0.048, on rows with margins >= 0.12)."""
    agree = 0
    total = 0
    for folder, ref in PARITY:
        r = _cuda_ref(ref)
        ids, am = r["input_ids"], r["attention_mask"]
        with torch.no_grad():
            c32 = _cuda_classifier(folder).classify(ids, am)
            c16 = _cuda_classifier(folder).to(torch.bfloat16).classify(ids, am).float()
        top2 = c32.topk(2, -1).values
        margin = top2[:, 0] - top2[:, 1]
        error = (c32 - c16).abs().max(-1).values
        same = c32.argmax(-1) == c16.argmax(-1)
        assert (same | (margin <= 2 * error)).all(), (folder, margin.tolist(), error.tolist())
        agree += int(same.sum())
        total += len(same)
    assert agree >= 0.9 * total, (agree, total)


@cuda
@pytest.mark.parametrize("folder,ref", PARITY)
def test_cuda_greedy_generate_matches_transformers(folder, ref, _cuda_exact_fp32):
    r = _cuda_ref(ref)
    m = GPT.from_pretrained(FIX / folder).eval().to(DEV)
    assert torch.equal(m.generate(r["gen1_input_ids"], 12), r["gen1_output"])
    genb = m.generate(r["genb_input_ids"], 12, attention_mask=r["genb_attention_mask"])  # left-padded batch
    assert torch.equal(genb, r["genb_output"])
    m.config.pad_token_id = int(r["genb_input_ids"][2, 0])  # the pad the reference used
    eos = m.generate(r["genb_input_ids"], 12, attention_mask=r["genb_attention_mask"],
                     eos_token_id=int(r["gen_eos_id"]))
    assert torch.equal(eos, r["gen_eos_output"][:, :eos.shape[1]])  # HF pads finished rows


@cuda
@pytest.mark.parametrize("name", ["gpt2", "qwen3"])
def test_cuda_compiled_generate_equals_reference(name, _cuda_exact_fp32):
    """generate(compile=True): the decode step through inductor (CUDA: mode reduce-overhead, CUDA graphs, the
    StaticKVCaches kept for the next call of the same shapes) gives the eager reference's tokens in fp32: the
    left-padded batch greedy, with EOS, and sampled with a fixed seed (no host sync per token on CUDA), each
    twice (the second call replays)."""
    r = _cuda_ref(name)
    m = GPT.from_pretrained(FIX / name).eval().to(DEV)
    ids, am = r["genb_input_ids"], r["genb_attention_mask"]
    m.config.pad_token_id = int(ids[2, 0])
    g = lambda: torch.Generator(DEV).manual_seed(1)
    torch._dynamo.reset()
    with torch.no_grad():
        for kw in (dict(), dict(eos_token_id=int(r["gen_eos_id"])), dict(temperature=1.0, top_p=0.9)):
            ref = m.generate_reference(ids, 20, attention_mask=am, generator=g(), **kw)
            for _ in range(2):
                assert torch.equal(m.generate(ids, 20, attention_mask=am, generator=g(), compile=True, **kw),
                                   ref), kw
    assert m.decode_caches is not None and m.decode_caches[0].k.device == ids.device
    torch._dynamo.reset()


def _cuda_close(a, b, rel=1e-4):
    return (a - b).abs().max().item() <= rel * b.abs().max().item() + 1e-7


@cuda
def test_cuda_fused_lm_loss_equals_cross_entropy(_cuda_exact_fp32):
    """gpt.fused_lm_loss against the plain path (full logits, F.cross_entropy): value and both gradients for
    several [rows, chunk] piece sizes, targets on the slice edges and ignored ones; a frozen head (LoRA) gets
    the gradient of h alone; under bf16 autocast within 5%."""
    def naive(h, w, t):
        return F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    g = torch.Generator().manual_seed(0)
    cases = [(37, 61, 24, [(16, 8), (7, 5), (61, 37)]),
             (700, 5003, 64, [(1024, 256), (2048, 2048), (999, 700)])]
    for n, vocab, dim, pieces in cases:
        h = torch.randn(n, dim, generator=g).to(DEV).requires_grad_()
        w = (0.5 * torch.randn(vocab, dim, generator=g)).to(DEV).requires_grad_()
        t = torch.randint(0, vocab, (n,), generator=g)
        edges = [e for e in (0, vocab - 1, 15, 16, 1023, 1024, 2047, 2048) if e < vocab]
        t[:len(edges) + 1] = torch.tensor(edges + [-100])
        t = t.to(DEV)
        ref = naive(h, w, t)
        rh, rw = torch.autograd.grad(ref, [h, w])
        for chunk, rows in pieces:
            loss = fused_lm_loss(h, w, t, chunk=chunk, rows=rows)
            gh, gw = torch.autograd.grad(3 * loss, [h, w])  # a non-unit upstream gradient
            assert abs(loss.item() - ref.item()) <= 1e-5 * ref.item(), (chunk, rows)
            assert _cuda_close(gh, 3 * rh) and _cuda_close(gw, 3 * rw), (chunk, rows)
        (gh,) = torch.autograd.grad(fused_lm_loss(h, w.detach(), t), [h])
        assert _cuda_close(gh, rh)
        with torch.autocast(DEV.split(":")[0], dtype=torch.bfloat16):
            loss = fused_lm_loss(h, w, t, chunk=pieces[0][0], rows=pieces[0][1])
        gh, gw = torch.autograd.grad(loss, [h, w])
        assert gw.dtype == torch.float32 and abs(loss.item() - ref.item()) < 0.05 * ref.item()
        assert _cuda_close(gh, rh, 0.05) and _cuda_close(gw, rw, 0.05)


def _cuda_aot_eager_launcher(path):
    """On the CPU, dhrd.py with torch.compile's backend set to aot_eager: inductor's C++ build of the graphs
    takes ~45 s on 2 cores; dynamo, AOT autograd and the process group are the same."""
    path.write_text("\n".join([
        "import runpy",
        "import sys",
        "import torch",
        f"sys.path.insert(0, {str(ROOT)!r})",
        "compile_ = torch.compile",
        "torch.compile = lambda model, **kw: compile_(model, backend='aot_eager', **kw)",
        f"runpy.run_path({str(ROOT / 'dhrd.py')!r}, run_name='__main__')",
    ]) + "\n")
    return path


@cuda
def test_cuda_torchrun_compiled_bf16_run_loss_falls(train_data, tmp_path):
    """torchrun --standalone --nproc_per_node=1 (NCCL on CUDA, Gloo on the CPU), --compile=True, bf16: 30
    steps of the tiny scratch model on synth finish and the logged loss falls."""
    script = ROOT / "dhrd.py"
    if not DEV.startswith("cuda"):
        script = _cuda_aot_eager_launcher(tmp_path / "dhrd_aot_eager.py")
    flags = [f for f in TINY if not f.startswith("--dtype=")]
    flags += [f"--data_dir={train_data}", f"--out_dir={tmp_path / 'run'}", f"--device={DEV}",
              "--compile=True", "--dtype=bfloat16", "--max_iters=30", "--log_interval=1",
              "--eval_interval=30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                        str(script), *flags], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = [l["loss"] for l in _train_log(tmp_path / "run")]
    assert len(losses) == 30 and np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.2, losses  # CPU: 4.22 -> 3.16


class _CudaCountGraphs:
    """Stands in for torch.compile's result in dhrd.main: after each training forward, records the batch's
    length and the number of graphs dynamo has compiled so far."""

    def __init__(self, compiled):
        self.compiled = compiled
        self.seen = []

    def __call__(self, idx, *args):
        from torch._dynamo.utils import counters
        out = self.compiled(idx, *args)
        self.seen.append((idx.shape[1], counters["stats"]["unique_graphs"]))
        return out

    def parameters(self):
        return self.compiled.parameters()


def _cuda_varied_lengths(folder, n=160):
    """A custom task whose examples have x of 3-60 characters and rationales of 0-40: batches of many lengths
    (synth's are all 58 or 59 tokens long)."""
    rng = np.random.default_rng(0)
    words = ["ab", "cde", "fg", "hij", "k"]

    def text(lo, hi):
        return " ".join(rng.choice(words, int(rng.integers(lo, hi))))
    rows = [{"text": text(1, 20), "label": ["neg", "pos"][i % 2], "rationale": text(0, 14)} for i in range(n)]
    folder.mkdir()
    for split in ("train", "val"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare.prepare(task="custom", train_file=folder / "train.jsonl", val_file=folder / "val.jsonl",
                    out_dir=folder / "data", model="char", quiet=True)
    return folder / "data"


@cuda
def test_cuda_compile_graphs_stay_bounded_over_varying_lengths(tmp_path, monkeypatch):
    """dhrd.py --compile=True on batches of many lengths (each batch is padded to its longest row): after a
    few batches dynamo has a graph with a dynamic length for every piece of the forward and compiles nothing
    more, however many new lengths follow. The pieces: graph breaks (the padding check in GPT._mask, the
    boolean gather of the LM targets, the fused loss's loop) split the forward, and each piece turns dynamic
    at its own second size. DHRD_TEST_DEVICE=cpu (aot_eager, torch 2.13), 24 batches of 19 lengths: 5 graphs
    after the first batch, 21 from the 5th batch on. Were the count to grow with the number of lengths,
    bucketing the lengths in dhrd.make_batch would be the fix."""
    from torch._dynamo.utils import counters
    backend = "inductor"
    if not DEV.startswith("cuda"):
        backend = "aot_eager"  # the same graphs as inductor's; no C++ build
    made = []
    compile_ = torch.compile

    def compile_counted(model, **kw):
        made.append(_CudaCountGraphs(compile_(model, backend=backend, **kw)))
        return made[-1]
    monkeypatch.setattr(torch, "compile", compile_counted)
    torch._dynamo.reset()
    counters.clear()
    flags = [f for f in TINY if not f.startswith(("--dtype=", "--batch_size="))]
    data = _cuda_varied_lengths(tmp_path / "varied")
    flags += [f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", f"--device={DEV}", "--compile=True",
              "--dtype=bfloat16", "--batch_size=4", "--max_iters=16", "--log_interval=16",
              "--eval_interval=16", "--task=custom"]
    try:
        dhrd.main(flags)
    finally:
        torch._dynamo.reset()
    lengths = [n for n, _ in made[0].seen]
    graphs = [k for _, k in made[0].seen]
    assert len(lengths) == 16 and len(set(lengths)) >= 8, lengths  # many different lengths
    half = len(lengths) // 2
    assert len(set(lengths[half:]) - set(lengths[:half])) >= 3, lengths  # the second half brings new lengths
    assert graphs[half - 1] == graphs[-1], list(zip(lengths, graphs))    # and compiles nothing for them


@cuda
def test_cuda_bench_tiny_llama_lora_on_the_device(tmp_path):
    """bench.py's device path on a tiny Llama, LoRA step: weights built in bf16 on the device, the JSON of
    the bench JSON with the GPU's name and, on a card of GPU_PEAK_TFLOPS, the MFU against its bf16 dense peak."""
    out = tmp_path / "bench.json"
    p = _bench_run("--init_from=llama-tiny", f"--device={DEV}", "--dtype=bfloat16", "--train_lora_rank=4",
                   f"--out={out}", *BENCH_TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["dtype"] == "bfloat16" and r["train"]["lora_rank"] == 4
    assert r["train"]["trained_params"] < r["params"] and r["train"]["tokens_per_s"] > 0
    assert r["train"]["flops_formula"] == "6 N_trained + 4 N_frozen + 12 L H Q T"
    if DEV.startswith("cuda"):
        assert r["gpu"] == torch.cuda.get_device_name(DEV)
        peak = next((v for k, v in bench.GPU_PEAK_TFLOPS.items() if k in r["gpu"]), None)
        assert r["train"]["peak_tflops"] == peak and (r["train"]["mfu"] is None) == (peak is None)
