"""Hugging Face formats, beneath gpt.py, importing only plumbing.py.

- errors: CheckpointError (a file that cannot be used) and DownloadError, raised through `check`
- safetensors: the project's own reader/writer (no pickle), single files and sharded checkpoints
- FAMILIES: one record per model family (gpt2, opt, llama, qwen2, qwen3) with everything loading AND saving
  need: config.json keys and transformers' defaults, architectures, tensor names, fixed flags
- config.json <-> plain dicts of GPTConfig field values; tensor names ours <-> HF's
- the tokenizer: GPT-2 byte-level BPE as a tiktoken Encoding (tokenizer.json or vocab.json + merges.txt): the
  tokenizers of GPT-2, OPT, Llama 3.x, SmolLM2, Qwen2/3. SentencePiece tokenizers (Llama 2, Mistral, Gemma)
  are refused with a CheckpointError
- downloads: fetch_file / download (unique temporary names, a lock, resumed with If-Range, size and hashes
  checked, retried with backoff)
- hub names: resolve_model_dir -> a snapshot of the Hugging Face hub cache (shared with transformers), with
  HF_ENDPOINT, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN as huggingface_hub reads them
Deps: torch, numpy, tiktoken, plumbing.py (atomic_write, Progress), stdlib.
"""
import contextlib
import glob
import hashlib
import http.client
import json
import math
import os
import random
import re
import shutil
import sys
import time
import unicodedata
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, urlsplit

import numpy as np
import tiktoken
import torch

from plumbing import Progress, atomic_write

try:
    import fcntl  # the download lock (POSIX); without it, unique temporary names alone keep files intact
except ImportError:
    fcntl = None


class CheckpointError(ValueError):
    """A model or tokenizer file that cannot be used; the message names the file and the problem."""


class DownloadError(OSError):
    """Offline, an HTTP error, a size or checksum mismatch; the message names the URL."""


def check(ok, where, msg):
    """How bad input is reported: a CheckpointError naming the file (or object) and what is wrong with it."""
    if not ok:
        raise CheckpointError(f"{where}: {msg}")


def some(names, n=5):
    """Tensor names for a message: the first n and how many there are, "['a', 'b'] (2 in all)"."""
    names = list(names)
    return f"{names[:n]} ({len(names)} in all)"


# ----------------------------------------------------------------------------------------------------------
# safetensors, read and written here (no pickle): 8-byte little-endian header length, a JSON header
# {name: {dtype, shape, data_offsets: [begin, end]}} (offsets into the data after the header), then the raw
# little-endian bytes.

ST_DTYPES = {  # safetensors name -> (numpy dtype the bytes are read as, torch dtype); bf16 is read as int16
    "F64": (np.float64, torch.float64),
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.int16, torch.bfloat16),
    "I64": (np.int64, torch.int64),
    "I32": (np.int32, torch.int32),
    "I16": (np.int16, torch.int16),
    "I8": (np.int8, torch.int8),
    "U8": (np.uint8, torch.uint8),
    "BOOL": (np.bool_, torch.bool),
}
ST_NAMES = {t: n for n, (_, t) in ST_DTYPES.items()}
INDEX = "model.safetensors.index.json"  # a sharded checkpoint: {"weight_map": {tensor: shard file}}


def _read_header(path, size):
    """-> (header length n, {name: entry}) of a safetensors file of `size` bytes."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        check(n <= min(size - 8, 100_000_000), path,
              f"header length {n} runs past the end of the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
            assert isinstance(header, dict)
        except (ValueError, AssertionError) as e:
            raise CheckpointError(f"{path}: the safetensors header is not a JSON object ({e})") from None
    header.pop("__metadata__", None)
    return n, header


def read_safetensors(path):
    """-> {name: tensor} (owned copies). Every header field is checked against the file size before anything
    is read or allocated, so a truncated or hostile file raises CheckpointError, never a crash or a huge
    allocation."""
    path = Path(path)
    size = path.stat().st_size
    check(size >= 8, path, f"{size} bytes is too short for a safetensors file (truncated download?)")
    n, header = _read_header(path, size)
    spans = []
    for name, info in header.items():
        try:
            dtype = info["dtype"]
            shape = [int(d) for d in info["shape"]]
            b, e = info["data_offsets"]
            assert min(shape, default=0) >= 0 and isinstance(b, int) and isinstance(e, int)
        except (TypeError, KeyError, ValueError, AssertionError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        check(dtype in ST_DTYPES, path, f"tensor {name!r} has unsupported dtype {dtype!r} "
              f"(supported: {', '.join(ST_DTYPES)})")
        check(0 <= b <= e <= size - 8 - n, path,
              f"tensor {name!r} data_offsets [{b}, {e}] fall outside the data (truncated?)")
        check(math.prod(shape) * np.dtype(ST_DTYPES[dtype][0]).itemsize == e - b, path,
              f"tensor {name!r} of shape {shape} and dtype {dtype} does not fit its {e - b} bytes")
        spans.append((b, e, name, dtype, shape))
    end = 0
    for b, e, name, *_ in sorted(spans):
        check(b >= end or b == e, path, f"tensor {name!r} overlaps an earlier tensor (byte {b})")
        end = max(end, e)
    tensors = {}
    for b, e, name, dtype, shape in spans:
        np_dtype, torch_dtype = ST_DTYPES[dtype]
        # np.fromfile reads straight into an owned array: one copy in memory, no mmap to pin the file
        a = np.fromfile(path, dtype=np_dtype, count=math.prod(shape), offset=8 + n + b).reshape(shape)
        tensors[name] = torch.from_numpy(a).view(torch_dtype)
    return tensors


def write_safetensors(path, tensors):
    """{name: tensor} -> path, atomically; header padded to 8 bytes like the reference implementation."""
    ts = {k: tensors[k].detach().cpu().contiguous() for k in sorted(tensors)}
    header = {}
    offset = 0
    for name, t in ts.items():
        span = [offset, offset + t.nbytes]
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": span}
        offset += t.nbytes
    h = json.dumps({**header, "__metadata__": {"format": "pt"}}, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(len(h).to_bytes(8, "little") + h)
            for t in ts.values():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
    atomic_write(path, write)


def shards(index):
    """model.safetensors.index.json -> (weight_map, sorted shard file names); shards are plain file names."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        assert all(isinstance(s, str) and Path(s).name == s for s in files)
        return weight_map, files
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:
        raise CheckpointError(f"{index}: not a valid safetensors index (needs a weight_map of plain file "
                              f"names): {e!r}") from None


def read_checkpoint(folder):
    """model.safetensors, or the index + its shards -> ({name: tensor}, the file name for errors)."""
    single = folder / "model.safetensors"
    index = folder / INDEX
    if single.is_file():
        return read_safetensors(single), str(single)
    if not index.is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        check(False, folder, f"no model.safetensors or {INDEX} (found {pickles or 'neither'}; "
              "pickle is never loaded)")
    weight_map, files = shards(index)
    tensors = {}
    for s in files:
        check((folder / s).is_file(), index, f"shard {s} is missing from {folder}")
        tensors.update(read_safetensors(folder / s))
    check(set(weight_map) <= set(tensors), index, f"tensors in weight_map but in no shard: "
          f"{some(sorted(set(weight_map) - set(tensors)))}; a shard is from another checkpoint or incomplete")
    return tensors, str(index)

# ----------------------------------------------------------------------------------------------------------
# One record per model family. Loading (config_from_hf, state_dict_from_hf) and saving (config_to_hf,
# state_dict_to_hf) read the same record, so a family's knowledge lives in one place. Our tensor names are HF
# Llama's module names (q_proj ... down_proj) under h.{i}.; GPT-2 and OPT tensors are renamed.


@dataclass(frozen=True)
class Family:
    causal_lm: str       # config.json "architectures" of a plain checkpoint (AutoModelForCausalLM)
    seq_cls: str         # ... of one with a linear `score` head (AutoModelForSequenceClassification)
    keys: dict           # our GPTConfig field -> (its config.json key, transformers' default)
    fixed: dict          # GPTConfig fields the family implies (no config.json key)
    prefix: str          # before every backbone tensor name; hub files may lack it
    top: dict            # HF name -> our name, outside the blocks
    block: str           # HF name prefix of block i ("{}" = i); ours is h.{i}.
    per_block: dict      # HF name -> our name, inside a block
    fused: dict          # HF name -> several of our names: the tensor is split along dim 0 into their sizes
    transposed: tuple    # per-block HF weights stored as [in, out] (GPT-2's Conv1D)
    rope: bool           # rotary positions: rope_theta, rope_scaling (or rope_parameters) from config.json
    unsupported: tuple   # config.json switches dhrd does not implement: they must be false or absent
    dropout_keys: tuple  # config.json keys save_pretrained writes dropout to (never read: dhrd has a flag)
    written: dict        # constant config.json entries save_pretrained adds
    null_if_derived: tuple  # our sizes where 0 means derived and transformers writes null (GPT-2's n_inner)


GPT2 = Family(
    causal_lm="GPT2LMHeadModel",
    seq_cls="GPT2ForSequenceClassification",
    keys=dict(
        vocab_size=("vocab_size", 50257),
        block_size=("n_positions", 1024),
        n_layer=("n_layer", 12),
        n_head=("n_head", 12),
        n_embd=("n_embd", 768),
        n_inner=("n_inner", None),
        activation=("activation_function", "gelu_new"),
        layer_norm_eps=("layer_norm_epsilon", 1e-5),
        tie_word_embeddings=("tie_word_embeddings", True),
        bos_token_id=("bos_token_id", 50256),
        eos_token_id=("eos_token_id", 50256),
        pad_token_id=("pad_token_id", None),
    ),
    fixed=dict(norm="layernorm", glu=False, bias=True, qkv_bias=True, qk_norm=False, pos_offset=0),
    prefix="transformer.",
    top={"wte": "wte", "wpe": "wpe", "ln_f": "ln_f"},
    block="h.{}.",
    per_block={
        "ln_1": "ln_1",
        "ln_2": "ln_2",
        "attn.c_proj": "attn.o_proj",
        "mlp.c_fc": "mlp.up_proj",
        "mlp.c_proj": "mlp.down_proj",
    },
    fused={"attn.c_attn": ("attn.q_proj", "attn.k_proj", "attn.v_proj")},
    transposed=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
    rope=False,
    unsupported=(),
    dropout_keys=("resid_pdrop", "embd_pdrop", "attn_pdrop"),
    written={},
    null_if_derived=("n_inner",),
)

OPT = Family(
    causal_lm="OPTForCausalLM",
    seq_cls="OPTForSequenceClassification",
    keys=dict(
        vocab_size=("vocab_size", 50272),
        block_size=("max_position_embeddings", 2048),
        n_layer=("num_hidden_layers", 12),
        n_head=("num_attention_heads", 12),
        n_embd=("hidden_size", 768),
        n_inner=("ffn_dim", 3072),
        word_embed_proj_dim=("word_embed_proj_dim", None),  # opt-350m: 512, with project_in/out
        pre_ln=("do_layer_norm_before", True),  # False for opt-350m
        activation=("activation_function", "relu"),
        bias=("enable_bias", True),
        tie_word_embeddings=("tie_word_embeddings", True),
        bos_token_id=("bos_token_id", 2),
        eos_token_id=("eos_token_id", 2),
        pad_token_id=("pad_token_id", 1),
    ),
    # pos_offset: OPT's position table starts at row 2 (fairseq's padding_idx + 1)
    fixed=dict(norm="layernorm", glu=False, qkv_bias=True, qk_norm=False, pos_offset=2),
    prefix="model.",
    top={
        "decoder.embed_tokens": "wte",
        "decoder.embed_positions": "wpe",
        "decoder.project_in": "project_in",
        "decoder.project_out": "project_out",
        "decoder.final_layer_norm": "ln_f",
    },
    block="decoder.layers.{}.",
    per_block={
        "self_attn.q_proj": "attn.q_proj",
        "self_attn.k_proj": "attn.k_proj",
        "self_attn.v_proj": "attn.v_proj",
        "self_attn.out_proj": "attn.o_proj",
        "self_attn_layer_norm": "ln_1",
        "fc1": "mlp.up_proj",
        "fc2": "mlp.down_proj",
        "final_layer_norm": "ln_2",
    },
    fused={},
    transposed=(),
    rope=False,
    unsupported=(),
    dropout_keys=("dropout", "attention_dropout"),
    written={},
    null_if_derived=(),
)

LLAMA = Family(  # Llama 3.x, SmolLM2: RMSNorm, rotary positions, SwiGLU, grouped-query attention
    causal_lm="LlamaForCausalLM",
    seq_cls="LlamaForSequenceClassification",
    keys=dict(
        vocab_size=("vocab_size", 32000),
        block_size=("max_position_embeddings", 2048),
        n_layer=("num_hidden_layers", 32),
        n_head=("num_attention_heads", 32),
        n_kv_head=("num_key_value_heads", None),
        n_embd=("hidden_size", 4096),
        head_dim=("head_dim", None),
        n_inner=("intermediate_size", 11008),
        activation=("hidden_act", "silu"),
        layer_norm_eps=("rms_norm_eps", 1e-6),
        tie_word_embeddings=("tie_word_embeddings", False),
        bos_token_id=("bos_token_id", 1),
        eos_token_id=("eos_token_id", 2),
        pad_token_id=("pad_token_id", None),
    ),
    fixed=dict(norm="rmsnorm", glu=True, bias=False, qkv_bias=False, qk_norm=False, pos_offset=0),
    prefix="model.",
    top={"embed_tokens": "wte", "norm": "ln_f"},
    block="layers.{}.",
    per_block={
        "input_layernorm": "ln_1",
        "post_attention_layernorm": "ln_2",
        "self_attn.q_proj": "attn.q_proj",
        "self_attn.k_proj": "attn.k_proj",
        "self_attn.v_proj": "attn.v_proj",
        "self_attn.o_proj": "attn.o_proj",
        "self_attn.q_norm": "attn.q_norm",  # Qwen3 only; absent modules are left out of the map
        "self_attn.k_norm": "attn.k_norm",
        "mlp.gate_proj": "mlp.gate_proj",
        "mlp.up_proj": "mlp.up_proj",
        "mlp.down_proj": "mlp.down_proj",
    },
    fused={},
    transposed=(),
    rope=True,
    unsupported=("attention_bias", "mlp_bias", "use_sliding_window"),  # no released Llama/Qwen sets them
    dropout_keys=("attention_dropout",),
    written={"attention_bias": False},
    null_if_derived=(),
)

_QWEN_KEYS = {
    **LLAMA.keys,
    "vocab_size": ("vocab_size", 151936),
    "block_size": ("max_position_embeddings", 32768),
    "n_inner": ("intermediate_size", 22016),
    "bos_token_id": ("bos_token_id", None),
    "eos_token_id": ("eos_token_id", None),
}
QWEN2 = replace(  # Llama with biases on q/k/v
    LLAMA,
    causal_lm="Qwen2ForCausalLM",
    seq_cls="Qwen2ForSequenceClassification",
    keys=_QWEN_KEYS,
    fixed={**LLAMA.fixed, "qkv_bias": True},
    written={},  # Qwen2Config has no attention_bias
)
QWEN3 = replace(  # Llama with an RMSNorm over each head of q and k, and an explicit head_dim
    LLAMA,
    causal_lm="Qwen3ForCausalLM",
    seq_cls="Qwen3ForSequenceClassification",
    keys={**_QWEN_KEYS, "head_dim": ("head_dim", 128)},
    fixed={**LLAMA.fixed, "qk_norm": True},
)
FAMILIES = {"gpt2": GPT2, "opt": OPT, "llama": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3}  # by model_type

# ----------------------------------------------------------------------------------------------------------
# config.json <-> {GPTConfig field: value}

POSITIVE_SIZES = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")  # must be >= 1
DERIVED_SIZES = ("n_inner", "word_embed_proj_dim", "n_kv_head", "head_dim")  # >= 0; 0 = derived


def _read_config(file):
    try:
        d = json.loads(Path(file).read_text())
        assert isinstance(d, dict) and isinstance(d.get("dhrd", {}), dict)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing; a model folder needs config.json (HF layout)") from None
    except (ValueError, AssertionError) as e:
        raise CheckpointError(f"{file}: not a JSON object ({e})") from None
    return d


def _rope_fields(d, file):
    """rope_theta / rope_scaling: transformers >= 5 writes them in rope_parameters, older files at the top."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or None
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = params
    check(not scaling or scaling.get("rope_type", scaling.get("type")) in ("default", "llama3"), file,
          f"rope_scaling {scaling} is not supported (only 'default' and Llama-3.1's 'llama3')")
    theta = float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)
    return {"rope_theta": theta, "rope_scaling": dict(scaling) if scaling else None}


def config_from_hf(file):
    """config.json -> {GPTConfig field: value}: its keys (transformers' default where absent), the family's
    fixed flags, and dhrd's head settings (HF has no field for them). Sizes are checked; errors name the
    file."""
    d = _read_config(file)
    model_type = d.get("model_type")
    check(model_type in FAMILIES, file, f"model_type {model_type!r} is not supported "
          f"(supported: {', '.join(FAMILIES)})")
    fam = FAMILIES[model_type]
    ours = d.get("dhrd", {})
    c = {"model_type": model_type}
    for field, (key, default) in fam.keys.items():
        c[field] = d.get(key, default)
    c.update(fam.fixed)
    c["head"] = ours.get("head", "linear")
    c["pooling"] = ours.get("pooling", "last")
    for field in ("n_inner", "n_kv_head", "head_dim"):  # null or absent: 4 n_embd, n_head, n_embd / n_head
        c[field] = c.get(field) or 0
    if c.get("word_embed_proj_dim") in (None, c["n_embd"]):
        c["word_embed_proj_dim"] = 0  # no project_in / project_out
    if isinstance(c["eos_token_id"], list):  # Llama-3 lists several end tokens; the first: <|end_of_text|>
        c["eos_token_id"] = c["eos_token_id"][0]
    if fam.rope:
        c.update(_rope_fields(d, file))
    set_switches = [k for k in fam.unsupported if d.get(k)]
    check(not set_switches, file, f"{', '.join(fam.unsupported)} must be false or absent (set: "
          f"{set_switches}; dhrd does not implement them, and no released {model_type} checkpoint sets them)")
    bad = [k for k in POSITIVE_SIZES if not isinstance(c[k], int) or c[k] < 1]
    bad += [k for k in DERIVED_SIZES if not isinstance(c[k], int) or c[k] < 0]
    bad = [fam.keys.get(k, (k,))[0] for k in bad]  # by their config.json names
    heads_ok = not bad and (c["head_dim"] or c["n_embd"] % c["n_head"] == 0)
    heads_ok = heads_ok and c["n_head"] % (c["n_kv_head"] or c["n_head"]) == 0
    check(heads_ok, file, f"invalid field(s) {bad or 'heads'}: sizes must be positive ints, hidden size "
          "divisible by heads, heads by key_value heads")
    return c


def config_to_hf(c, labels, dtype):
    """A config object (GPTConfig's attributes) -> the config.json dict transformers reads: the family's keys,
    derived sizes spelled out, architectures, labels, and dhrd's head settings."""
    fam = FAMILIES[c.model_type]
    resolved = {
        "n_inner": c.n_inner or 4 * c.n_embd,
        "n_kv_head": c.n_kv_head or c.n_head,
        "head_dim": c.head_dim or c.n_embd // c.n_head,
        "word_embed_proj_dim": c.word_embed_proj_dim or c.n_embd,
    }
    d = {}
    for field, (key, _) in fam.keys.items():
        value = getattr(c, field)
        if field in fam.null_if_derived:
            value = value or None
        elif field in resolved:
            value = resolved[field]
        d[key] = value
    if fam.rope:
        d["rope_theta"] = c.rope_theta
        d["rope_scaling"] = c.rope_scaling
    for key in fam.dropout_keys:
        d[key] = c.dropout
    d.update(fam.written)
    seq_cls = bool(c.num_labels) and c.head == "linear"  # transformers has no class for our MLP head
    d["model_type"] = c.model_type
    d["architectures"] = [fam.seq_cls if seq_cls else fam.causal_lm]
    d["dhrd"] = {"head": c.head, "pooling": c.pooling}
    if c.num_labels:
        names = list(labels) if labels else [f"LABEL_{i}" for i in range(c.num_labels)]
        d["num_labels"] = c.num_labels
        d["id2label"] = dict(enumerate(names))
        d["label2id"] = {n: i for i, n in enumerate(names)}
    d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d

# ----------------------------------------------------------------------------------------------------------
# Tensor names, ours <-> HF's, from the family record.

# GPT-2's causal-mask buffers (with the dot: c_attn.bias is a weight) and old Llama files' RoPE buffer:
# the model computes these itself
IGNORED = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def is_head(name, head):
    """Whether our parameter `name` belongs to the pooled head, the top-level modules named in `head`."""
    return name.split(".", 1)[0] in head


def weight_map(c, ours, head):
    """HF tensor name (without the family prefix) -> (our names, transpose), for config c and the collection
    of our parameter names `ours`; head: the top-level module names of the pooled head (GPT.head_modules).
    Entries naming a tensor this config lacks (OPT's project_in, biases) are left out."""
    fam = FAMILIES[c.model_type]
    m = {}
    for name in ours:  # the heads keep their own names (HF's `score`), as lm_head when it is not tied
        if is_head(name, head) or (name == "lm_head.weight" and not c.tie_word_embeddings):
            m[name] = ((name,), False)
    for w in ("weight", "bias"):
        for hf, our in fam.top.items():
            m[f"{hf}.{w}"] = ((f"{our}.{w}",), False)
        for i in range(c.n_layer):
            hf_block = fam.block.format(i)
            for hf, our in fam.per_block.items():
                m[f"{hf_block}{hf}.{w}"] = ((f"h.{i}.{our}.{w}",), w == "weight" and hf in fam.transposed)
            for hf, parts in fam.fused.items():
                names = tuple(f"h.{i}.{p}.{w}" for p in parts)
                m[f"{hf_block}{hf}.{w}"] = (names, w == "weight" and hf in fam.transposed)
    return {k: v for k, v in m.items() if all(n in ours for n in v[0])}


def state_dict_from_hf(tensors, c, shapes, file, head):
    """HF tensors -> {our name: float32 tensor}, checked name by name and shape by shape against shapes
    ({our parameter name: shape}; a tied lm_head is the embedding and not listed). A missing pooled head
    (`head`: its module names) is fine: the model gets a fresh one."""
    fam = FAMILIES[c.model_type]
    wmap = weight_map(c, shapes, head)
    sd = {}
    unexpected = []
    for key, t in tensors.items():
        k = key.removeprefix(fam.prefix)  # hub gpt2 / OPT files may lack the prefix
        if k.endswith(IGNORED) or (k == "lm_head.weight" and c.tie_word_embeddings):
            continue
        if k not in wmap:
            unexpected.append(key)
            continue
        names, transpose = wmap[k]
        t = t.float()
        if transpose and t.dim() == 2:  # a malformed file's 3-D tensor is left for the shape check to report
            t = t.t()
        # a fused tensor (GPT-2's c_attn -> our q, k, v) splits into our tensors' own sizes along dim 0, so
        # parts of different sizes (grouped-query K/V beside a larger Q) split too
        want = [list(shapes[n]) for n in names]
        rows = [s[0] for s in want]
        parts = [t]
        if len(names) > 1 and t.dim() >= 1 and t.shape[0] == sum(rows):
            parts = t.split(rows)
        implied = want[0]
        if len(names) > 1:
            implied = f"{want} for its {len(names)} parts (rows {' + '.join(map(str, rows))})"
        check(len(parts) == len(names) and all(list(p.shape) == w for p, w in zip(parts, want)), file,
              f"tensor {key} has shape {list(t.shape)}, config.json implies {implied}")
        sd.update(zip(names, parts))
    missing = [n for n in shapes if n not in sd and not is_head(n, head)]
    if not (unexpected or missing):
        return sd
    file_name = {n: _file_name(fam, k, head) for k, (names, _) in wmap.items() for n in names}
    missing = list(dict.fromkeys(file_name.get(n, n) for n in missing))  # as the file would spell them
    # an untied LM head may be absent only beside a classification head (from_pretrained: no LM head then)
    hint = "config.json and the weights must come from the same model (family, layers, sizes)"
    if missing == ["lm_head.weight"]:
        hint = ("an untied checkpoint without lm_head.weight loads only as a classifier (with its "
                "score.weight); use the complete *ForCausalLM checkpoint")
    raise CheckpointError(f"{file}: tensors do not match a {c.model_type} model with this config.json "
                          f"({c.n_layer} layers): missing {some(missing)}, unexpected {some(unexpected)}; "
                          f"{hint}")


def _file_name(fam, hf, head):
    """An HF tensor name of weight_map as written in a file: the heads bare, the backbone with the prefix."""
    if hf.startswith("lm_head") or is_head(hf, head):
        return hf
    return fam.prefix + hf


def state_dict_to_hf(sd, c, head):
    """Our state dict (plain names: LoRA merged in) -> {HF tensor name: tensor} in the family's layout;
    head: the pooled head's module names, saved under their own names."""
    fam = FAMILIES[c.model_type]
    out = {}
    for hf, (names, transpose) in weight_map(c, sd, head).items():
        t = torch.cat([sd[n] for n in names])
        if transpose:
            t = t.t()
        out[_file_name(fam, hf, head)] = t.contiguous()
    return out

# ----------------------------------------------------------------------------------------------------------
# Tokenizer: GPT-2's byte-level BPE (Radford et al. 2019) as a tiktoken Encoding built from tokenizer.json
# (HF's format: Llama-3, Qwen2/3, SmolLM2) or else vocab.json + merges.txt (GPT-2, OPT). tiktoken merges the
# adjacent pair whose concatenation has the lowest rank, HF the pair listed first in merges: giving merge i
# the rank 256 + i makes the two agree. Ranks then map to vocab ids: the identity for GPT-2, a permutation
# for OPT (fairseq's dictionary order, with <s> <pad> </s> <unk> at 0..3). tiktoken takes one regex, so
# _pretokenizer folds HF's pre-tokenizer steps into one.

TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
# what a refusal says: the tokenizers reproduced exactly, and those that are not (SentencePiece's
# byte-fallback BPE has no tiktoken form here, nor reference ids from the real tokenizers to test one against)
SUPPORTED_TOKENIZERS = ("supported: GPT-2 byte-level BPE, the tokenizers of GPT-2, OPT, Llama 3.x, SmolLM2 "
                        "and Qwen2/3; not SentencePiece ones (tokenizer.model, byte_fallback: Llama 2, "
                        "Mistral, Gemma)")
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 encoder.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in bs]
    chars = bs + [256 + i for i in range(len(rest))]
    return dict(zip(bs + rest, map(chr, chars)))


def _pretokenizer(pre, where):
    """tokenizer.json's pre_tokenizer -> one regex; only the byte-level forms it reproduces exactly."""
    pre = pre or {}
    if pre.get("type") == "Sequence":
        steps = pre.get("pretokenizers") or []
    else:
        steps = [pre]
    kinds = [s.get("type") for s in steps]
    last = steps[-1] if steps else {}
    regex = last.get("use_regex", True)
    check(kinds[-1:] == ["ByteLevel"] and not last.get("add_prefix_space"), where,
          f"pre_tokenizer {kinds} is not supported: it must end with ByteLevel(add_prefix_space=false)")
    if kinds == ["ByteLevel"] and regex:
        return GPT2_PAT
    if kinds == ["Split", "ByteLevel"] and not regex:  # Llama-3, Qwen2: one regex; unmatched text is a piece
        split = steps[0]
        ok = split.get("behavior") == "Isolated" and not split.get("invert")
        r = split["pattern"].get("Regex")
        check(ok and r, where, f"pre_tokenizer Split {split['pattern']} {split.get('behavior')} "
              f"invert={split.get('invert')} is not supported")
        return f"{r}|(?:(?!(?:{r}))[\\s\\S])+"
    # SmolLM2: Digits makes every \p{N} (Rust's char::is_numeric) its own piece BEFORE the GPT-2 regex runs,
    # so whitespace before a digit ends a piece: "a  1" -> "a", "  ", "1" (GPT2_PAT: "a", " ", " ", "1").
    check(kinds == ["Digits", "ByteLevel"] and regex, where, f"pre_tokenizer {kinds} is not supported")
    digits = r"\p{N}|" if steps[0].get("individual_digits") else r"\p{N}+|"
    rest = GPT2_PAT.replace(r"| ?\p{N}+", "").replace(r"\s+(?!\S)", r"\s+(?:(?!\S)|(?=\p{N}))")
    return digits + rest


class _BPEFiles(NamedTuple):  # what the tokenizer files say, before the tiktoken tables are built
    vocab: dict          # byte-level token string -> id
    merges: list         # "a b" lines in priority order
    added: dict          # added token string -> id (split out of the text, as HF does)
    pattern: str         # the pre-tokenizer regex
    nfc: bool            # NFC-normalize the text between added tokens (Qwen2)
    bos: str | None      # the token a TemplateProcessing post-processor prepends (Llama-3)
    vocab_file: str      # where the vocabulary and the merges were read, for error messages
    merges_file: str


def _read_tokenizer_json(file):
    t = json.loads(file.read_text(encoding="utf-8"))
    m = t.get("model") or {}
    unsupported = ("byte_fallback", "dropout", "continuing_subword_prefix", "end_of_word_suffix")
    bad = {k: m.get(k) for k in unsupported}
    check(m.get("type") == "BPE" and not any(bad.values()), file,
          f"model {m.get('type')} {bad} is not byte-level BPE ({SUPPORTED_TOKENIZERS})")
    check(t.get("normalizer") in (None, {"type": "NFC"}), file, f"normalizer {t.get('normalizer')} is not "
          "supported (only NFC, Qwen2's)")
    pattern = _pretokenizer(t.get("pre_tokenizer"), file)
    merges = [x if isinstance(x, str) else " ".join(x) for x in m.get("merges", [])]  # "a b" or [a, b]
    added_tokens = t.get("added_tokens", [])
    added = {a["content"]: a["id"] for a in added_tokens}
    check(not any(a.get(k) for a in added_tokens for k in ("lstrip", "rstrip", "single_word")), file,
          "added_tokens with lstrip/rstrip/single_word are not supported")
    post = t.get("post_processor") or {}
    templates = [p for p in post.get("processors", [post]) if p.get("type") == "TemplateProcessing"]
    bos = None
    if templates:  # Llama-3: "single" = bos + $A; HF prepends it with add_special_tokens=True
        single = templates[0].get("single") or [{}]
        bos = single[0].get("SpecialToken", {}).get("id")
    return _BPEFiles(m.get("vocab", {}), merges, added, pattern, bool(t.get("normalizer")), bos,
                     f"{file} model.vocab", f"{file} model.merges")


def _read_vocab_merges(folder):
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    return _BPEFiles(vocab, merges, {}, GPT2_PAT, False, None, folder / "vocab.json", folder / "merges.txt")


def _check_ids(ids, where, n):
    """Token ids are ints from 0 to 2n - 1, n the number of tokens (real files: dense, 0 to n - 1)."""
    for s, i in ids.items():
        check(type(i) is int and 0 <= i < 2 * n, where, f"token {s!r} has id {i!r}; ids must be ints from 0 "
              f"to {2 * n - 1} (twice the {n} tokens): the file is corrupt")


def _tokenizer_meta(folder):
    """special_tokens_map.json, tokenizer_config.json, config.json merged; earlier files win."""
    meta = {}
    for f in ("special_tokens_map.json", "tokenizer_config.json", "config.json"):
        if (folder / f).is_file():
            meta = {**json.loads((folder / f).read_text(encoding="utf-8")), **meta}
    return meta


def _content(v):  # an added-token entry is a string or {"content": string, ...}
    return v.get("content") if isinstance(v, dict) else v


def _special_id(meta, full, key, default):
    """The id of the token tokenizer_config names as `key` (bos_token, ...), else `<key>_id`, else default."""
    if meta.get(key):
        return full.get(_content(meta[key]))
    return meta.get(key + "_id", default)


class Tokenizer:
    """.encode(str) -> ids, equal to HF's tokenizer with add_special_tokens=False; .decode(ids) -> str;
    .bos_id (the id HF prepends: </s> for OPT, <|begin_of_text|> for Llama-3, None for GPT-2/Qwen/SmolLM2),
    .eos_id, .pad_id, .vocab_size, .name."""

    def __init__(self, folder, name=None):
        folder = Path(folder)
        self.name = str(name or folder)
        tj = folder / "tokenizer.json"  # wins: only it has the pre-tokenizer (SmolLM2: Digits) and normalizer
        try:
            meta = _tokenizer_meta(folder)
            if tj.is_file():
                bpe = _read_tokenizer_json(tj)
                meta["add_bos_token"] = bool(bpe.bos)
                if bpe.bos:
                    meta["bos_token"] = bpe.bos
            else:
                bpe = _read_vocab_merges(folder)
        except FileNotFoundError as e:
            raise CheckpointError(f"{e.filename}: missing; a tokenizer folder needs tokenizer.json or "
                                  f"vocab.json + merges.txt ({SUPPORTED_TOKENIZERS})") from None
        except CheckpointError:  # a ValueError too: reported as it is, not as invalid JSON
            raise
        except ValueError as e:
            raise CheckpointError(f"{folder}: a tokenizer file is not valid JSON ({e})") from None
        vocab = bpe.vocab
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        order = [s for _, s in sorted((i, s) for s, i in vocab.items() if len(s) == 1 and s in byte_of)]
        check(all(chr(c) in vocab for c in range(33, 127)) and "Ġ" in vocab, bpe.vocab_file,
              f"has {len(order)} of the 256 byte tokens and not all of the printable ASCII ones; "
              f"not GPT-2 byte-level BPE ({SUPPORTED_TOKENIZERS})")
        for ln, line in enumerate(bpe.merges, 1):
            if not line.strip() or line.startswith("#version"):
                continue
            merged = line.replace(" ", "")
            if len(line.split(" ")) != 2 or merged not in vocab or any(c not in byte_of for c in merged):
                raise CheckpointError(f"{bpe.merges_file}:{ln}: expected two byte-level tokens whose "
                                      f"merge is in vocab, got {line!r}")
            order.append(merged)
        ranks = {}  # token bytes -> rank = merge priority (the first occurrence wins)
        rank2id = []
        for s in order:
            b = bytes(byte_of[c] for c in s)
            if b not in ranks:
                ranks[b] = len(rank2id)
                rank2id.append(vocab[s])
        for b in range(256):  # tiktoken needs all 256 bytes; HF drops a byte its vocab lacks: id -1, dropped
            if bytes([b]) not in ranks:
                ranks[bytes([b])] = len(rank2id)
                rank2id.append(-1)
        added = dict(bpe.added)
        for k, v in meta.get("added_tokens_decoder", {}).items():
            added[_content(v)] = int(k)
        full = {**vocab, **added}
        # decode's id -> bytes table has max id + 1 rows: a hostile id of 2e9 would be a 16 GB list
        sources = ((vocab, bpe.vocab_file), (bpe.added, tj), (added, folder / "tokenizer_config.json"))
        for ids, where in sources:
            _check_ids(ids, where, len(full))
        opt_like = "</s>" in vocab and "<s>" in vocab
        roles = ("bos_token", "eos_token", "unk_token", "pad_token")
        named = [_content(meta[k]) for k in roles if meta.get(k)]
        if not named:  # HF's defaults without a config
            named = ["</s>", "<pad>"] if opt_like else ["<|endoftext|>"]
        # split out of the text, as HF does; a special that is also a plain BPE token stays BPE
        specials = {s: full[s] for s in list(added) + named if s in full and s.encode() not in ranks}
        special_ranks = {s: len(rank2id) + j for j, s in enumerate(specials)}
        self.enc = tiktoken.Encoding(self.name, pat_str=bpe.pattern, mergeable_ranks=ranks,
                                     special_tokens=special_ranks)
        r2i = np.array(rank2id + list(specials.values()), dtype=np.int64)
        self._r2i = None if np.array_equal(r2i, np.arange(len(r2i))) else r2i  # GPT-2: the ranks are the ids
        self._split_added = None
        if bpe.nfc:  # Qwen2: NFC on the text between added tokens (HF splits those out before normalizing)
            alternatives = "|".join(map(re.escape, sorted(specials, key=len, reverse=True)))
            self._split_added = re.compile("(" + alternatives + ")").split
        self.vocab_size = max(full.values()) + 1
        self._bytes = [b""] * self.vocab_size  # id -> bytes, for decode
        for s, i in full.items():
            if s not in specials and all(c in byte_of for c in s):
                self._bytes[i] = bytes(byte_of[c] for c in s)
            else:
                self._bytes[i] = s.encode()
        self.eos_id = _special_id(meta, full, "eos_token", full.get("</s>", full.get("<|endoftext|>")))
        self.pad_id = _special_id(meta, full, "pad_token", full.get("<pad>"))
        add_bos = meta.get("add_bos_token", meta.get("model_type") == "opt" or opt_like)  # OPT prepends </s>
        self.bos_id = _special_id(meta, full, "bos_token", full.get("</s>")) if add_bos else None

    def _nfc(self, text):  # odd pieces of the split are the added tokens themselves: left as they are
        pieces = self._split_added(text)
        return "".join(p if i % 2 else unicodedata.normalize("NFC", p) for i, p in enumerate(pieces))

    def encode(self, text):
        if self._split_added is not None:
            text = self._nfc(text)
        ranks = self.enc.encode(text, allowed_special="all")
        if self._r2i is None:
            return ranks
        return [i for i in self._r2i[np.asarray(ranks, dtype=np.int64)].tolist() if i >= 0]

    def decode(self, ids):
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")


def copy_tokenizer_files(src, dst):
    """The tokenizer files of folder src into folder dst (save_pretrained: an export loads on its own)."""
    src = Path(src)
    dst = Path(dst)
    if src.resolve() == dst.resolve():
        return
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copyfile(src / f, dst / f)


# ----------------------------------------------------------------------------------------------------------
# Downloads: one verified file from a URL. The bytes go to a temporary name unique to this process (a broken
# lock then costs bandwidth, never a corrupt file), renamed into place only once complete and checked. A lock
# file makes the other processes of a job, or a second job on the machine, wait and then use the finished
# file. A partial file survives a network error: the next try (or run) adopts it and resumes with a Range
# request, If-Range naming the ETag it was fetched with, so a file changed on the server restarts from zero.

RETRY_DELAYS = (1.0, 4.0, 16.0)  # seconds before the 2nd, 3rd, 4th try (x0.5-1.5 jitter), or Retry-After
RETRY_AFTER_MAX = 120.0          # a longer Retry-After is cut to this


class _Transient(DownloadError):
    """A failure worth another try: HTTP 429 or 5xx, a dropped connection, a short body."""

    def __init__(self, msg, retry_after=None):
        super().__init__(msg)
        self.retry_after = retry_after


def _retry_after(headers):
    try:
        return float(headers.get("Retry-After"))
    except (TypeError, ValueError):  # absent, or an HTTP date: the backoff decides
        return None


def _http_error(e, url):
    """An HTTPError -> the DownloadError to raise: _Transient for 429 and 5xx."""
    msg = f"{url}: HTTP {e.code} {e.reason}"
    if e.code == 429 or e.code >= 500:
        return _Transient(msg, _retry_after(e.headers))
    return DownloadError(msg)


def with_retries(attempt):
    """attempt() until it returns; a _Transient failure is tried again after RETRY_DELAYS, then raised as
    one DownloadError that says how many tries were made."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return attempt()
        except _Transient as e:
            if delay is None:
                raise DownloadError(f"{e} (after {len(RETRY_DELAYS) + 1} tries)") from None
            wait = e.retry_after
            if wait is None:
                wait = delay * random.uniform(0.5, 1.5)  # jitter: the ranks of a job do not retry in step
            time.sleep(min(wait, RETRY_AFTER_MAX))


class _SameHostAuth(urllib.request.HTTPRedirectHandler):
    """Redirects keep the Authorization header only on the host it was sent to: the hub's redirects to its
    CDN carry signed URLs that need no token, and another host must never see it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        auth = req.unredirected_hdrs.get("Authorization")
        same_host = urlsplit(newurl).netloc.lower() == urlsplit(req.full_url).netloc.lower()
        if new is not None and auth and same_host:
            new.add_unredirected_header("Authorization", auth)
        return new


_OPENER = urllib.request.build_opener(_SameHostAuth)


def http_open(url, headers=None, token=None, timeout=60):
    """urlopen with `token` as a bearer token for url's host only (an unredirected header: urllib copies
    ordinary headers to every redirect target)."""
    req = urllib.request.Request(url, headers=headers or {})
    if token:
        req.add_unredirected_header("Authorization", f"Bearer {token}")
    return _OPENER.open(req, timeout=timeout)


@contextlib.contextmanager
def _locked(lock, label):
    """An exclusive lock on `lock`: a folder, or a file (created group-writable as huggingface_hub makes it,
    so users sharing a cache wait for each other; never removed: that would let two holders in)."""
    if lock.is_dir():
        fd = os.open(lock, os.O_RDONLY)
    else:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o664)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"hf.py: waiting for another process to finish downloading {label} ({lock})",
                  file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except (OSError, AttributeError):  # no flock here (some network file systems; no fcntl on Windows):
            pass                           # the unique temporary names keep the file intact regardless
        yield
    finally:
        os.close(fd)  # and with it the lock


def _etag_file(part):
    return part.with_suffix(".etag")  # f.bin.<id>.part -> f.bin.<id>.etag


def _adopt_part(dest, part):
    """An earlier try's partial file of dest (the largest) and its ETag become ours, by rename: of two
    processes that reach the same one (a broken lock), one gets it and the other starts afresh."""
    earlier = sorted(dest.parent.glob(glob.escape(dest.name) + ".*.part"), key=lambda p: p.stat().st_size)
    for old in reversed(earlier):
        try:
            os.rename(old, part)
        except FileNotFoundError:
            continue
        try:
            os.rename(_etag_file(old), _etag_file(part))
        except FileNotFoundError:
            pass
        return


def _content_range_start(r):
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", ""))
    return int(m.group(1)) if m else None


def _receive(url, part, token, label):
    """One GET of url into part, resuming what part holds. Returns once the body is complete (as many bytes
    as Content-Length said); a dropped or short body raises _Transient and part keeps what came."""
    have = part.stat().st_size if part.exists() else 0
    etag_file = _etag_file(part)
    headers = {"Accept-Encoding": "identity"}  # the bytes of the file itself, so the sizes compare
    if have:
        headers["Range"] = f"bytes={have}-"
        if etag_file.exists():
            headers["If-Range"] = etag_file.read_text()
    try:
        with http_open(url, headers, token) as r, open(part, "r+b" if have else "wb") as f:
            if have and r.status == 206 and _content_range_start(r) != have:
                f.truncate(0)  # a range we did not ask for: the next try starts from zero
                raise _Transient(f"{url}: asked for bytes {have}-, got Content-Range "
                                 f"{r.headers.get('Content-Range')!r}")
            if r.status != 206:  # the whole file: Range ignored, or If-Range saw another ETag
                have = 0
                f.truncate(0)
            etag = r.headers.get("ETag")
            if etag and not etag.startswith("W/"):  # If-Range takes strong validators only
                etag_file.write_text(etag)
            else:
                etag_file.unlink(missing_ok=True)
            f.seek(have)
            length = r.headers.get("Content-Length")
            total = have + int(length) if length else None
            with Progress(label, total, done=have, unit=" MB", scale=1e6) as progress:
                while chunk := r.read(1 << 20):
                    have += f.write(chunk)
                    progress.update(have)
    except DownloadError:
        raise
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after byte `have`: complete, if the server's size agrees
            size = (e.headers.get("Content-Range") or "").rpartition("/")[2]
            if size == str(have):
                return
            part.unlink()  # longer than the server's file: the next try starts from zero
            raise _Transient(f"{url}: HTTP 416, the file is {size} bytes, the partial one {have}") from None
        raise _http_error(e, url) from None
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets, IncompleteRead
        raise _Transient(f"could not download {url} ({getattr(e, 'reason', e)}); the partial {part} resumes "
                         "on the next try. Offline? Put the files in a local folder and pass its path "
                         "instead") from None
    if total is not None and have != total:
        raise _Transient(f"{url}: the connection closed after {have} of {total} bytes (truncated)")


def _checked(path, expected_size, sha256, git_sha1):
    """None if path has the expected size and hashes (those given), else what is wrong."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"got {size} bytes, expected {expected_size}"
    with open(path, "rb") as f:
        if sha256:
            got = hashlib.file_digest(f, "sha256").hexdigest()
            if got != sha256.lower():
                return f"sha256 {got} is not the expected {sha256}"
        if git_sha1:  # the hub's id of a file kept in git itself: sha1 of "blob <size>\0" + the bytes
            h = hashlib.sha1(f"blob {size}\0".encode())
            while chunk := f.read(1 << 20):
                h.update(chunk)
            if h.hexdigest() != git_sha1.lower():
                return f"git blob sha1 {h.hexdigest()} is not the expected {git_sha1}"
        os.fsync(f.fileno())  # the bytes are on disk before the name says the file is complete
    return None


def fetch_file(url, dest, lock, expected_size=None, sha256=None, git_sha1=None, token=None, desc=None):
    """url -> dest, complete and checked (size, sha256, git blob sha1: those given), under the lock file
    `lock`; a process that finds dest already there (another one finished it) downloads nothing. A part
    is resumed only when something can tell a spliced file: its ETag (If-Range) or a hash."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(Path(lock), desc or url):
        if dest.is_file():
            return dest
        part = dest.with_name(f"{dest.name}.{uuid.uuid4().hex[:12]}.part")
        _adopt_part(dest, part)
        if part.exists() and not (_etag_file(part).exists() or sha256 or git_sha1):
            part.unlink()  # nothing could tell an old part of another file: start over
        with_retries(lambda: _receive(url, part, token, desc or url))
        problem = _checked(part, expected_size, sha256, git_sha1)
        if problem:
            part.unlink()
            _etag_file(part).unlink(missing_ok=True)
            raise DownloadError(f"{url}: {problem}; the file was removed")
        os.replace(part, dest)
        _etag_file(part).unlink(missing_ok=True)
    return dest


def download(url, dest, expected_size=None, sha256=None, desc=None):
    """url -> dest (no credentials sent), checked against expected_size / sha256 where given; the lock is
    dest's folder (a data folder gets no lock files). Raises DownloadError naming the URL."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    return fetch_file(url, dest, dest.parent, expected_size, sha256, desc=desc)

# ----------------------------------------------------------------------------------------------------------
# Hub names -> a snapshot folder of the Hugging Face hub cache, the layout huggingface_hub (transformers,
# `hf download`) reads and writes, so both share one copy:
#   $HF_HUB_CACHE/models--<owner>--<name>/blobs/<hash>         the files: sha256 (LFS) or git blob sha1
#                                        /snapshots/<commit>/<file> -> ../../blobs/<hash>   (relative links)
#                                        /refs/<revision>           the commit a branch or tag resolved to
#   $HF_HUB_CACHE/.locks/models--<owner>--<name>/<hash>.lock      huggingface_hub's lock of that blob
# The model info API ({endpoint}/api/models/<name>/revision/<revision>?blobs=true) gives the commit sha and
# every file's size and hash; files then come from {endpoint}/<name>/resolve/<commit>/<file>, so they all
# belong to one commit even if the branch moves meanwhile.

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
REVISION = re.compile(r"^[\w.-]+(/[\w.-]+)*$")  # a branch, tag or commit sha; refs/pr/1 has slashes
COMMIT = re.compile(r"^[0-9a-f]{40}$")
TRUE = ("1", "ON", "YES", "TRUE")  # what huggingface_hub takes as a true environment variable


class Blob(NamedTuple):  # one file of a hub listing
    size: int
    sha256: str | None   # an LFS file's (its blob name)
    git_sha1: str | None  # a file kept in git itself (its blob name)

    @property
    def name(self):
        return self.sha256 or self.git_sha1


def hub_endpoint():
    base = os.environ.get("HF_ENDPOINT") or os.environ.get("DHRD_HUB_URL") or "https://huggingface.co"
    return base.rstrip("/")


def hf_home():
    default = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(os.environ.get("HF_HOME") or default).expanduser()


def hub_cache():
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")  # (its older name)
    cache = cache or os.environ.get("DHRD_CACHE") or hf_home() / "hub"
    return Path(cache).expanduser()


def hub_offline():
    return any(os.environ.get(v, "").upper() in TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def token_file():
    return Path(os.environ.get("HF_TOKEN_PATH") or hf_home() / "token").expanduser()


def hub_token():
    """HF_TOKEN, else HUGGING_FACE_HUB_TOKEN, else the file `hf auth login` writes; None without one."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        try:
            token = token_file().read_text()
        except OSError:
            return None
    return token.strip() or None


def _token_for(base):
    """The token for the hub at base; never over plain http to another machine (anyone on the way reads
    it)."""
    u = urlsplit(base)
    if u.scheme == "https" or u.hostname in ("127.0.0.1", "localhost", "::1"):
        return hub_token()
    return None


def hub_commit(folder):
    """The commit a hub-cache snapshot folder holds (…/snapshots/<sha>), else None (any other folder)."""
    folder = Path(folder)
    if folder.parent.name == "snapshots" and COMMIT.match(folder.name):
        return folder.name
    return None


def _has(folder, *names):
    return all((folder / n).is_file() for n in names)


def _tokenizer_files(has):
    """The tokenizer files a folder needs, by `has(file)`: tokenizer.json wins (Llama-3 has no vocab.json)."""
    if has("tokenizer.json"):
        return ("tokenizer.json",)
    return ("vocab.json", "merges.txt")


def _complete(folder, weights):
    """Whether folder holds config.json, a tokenizer and (weights=True) the weights: then no network."""
    if folder is None or not _has(folder, "config.json", *_tokenizer_files(lambda f: _has(folder, f))):
        return False
    if not weights or _has(folder, "model.safetensors"):
        return True
    return _has(folder, INDEX) and _has(folder, *shards(folder / INDEX)[1])


def _snapshot(repo, revision):
    """The snapshot folder `revision` names in a repo's cache folder: a commit sha as is, a branch or tag by
    refs/<revision>; None when the cache has no such ref."""
    if COMMIT.match(revision):
        return repo / "snapshots" / revision
    ref = repo / "refs" / revision
    sha = ref.read_text().strip() if ref.is_file() else ""
    if not COMMIT.match(sha):
        return None
    return repo / "snapshots" / sha


def _access_denied(name, code, base, token):
    """The one line for HTTP 401/403: gated or private, and what to do."""
    if token:
        tok = (f"the token sent (HF_TOKEN, HUGGING_FACE_HUB_TOKEN or {token_file()}) was refused or lacks "
               "access")
    elif urlsplit(base).scheme != "https" and hub_token():
        tok = f"no token was sent, as {base} is plain http"
    else:
        tok = f"no token was found (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, {token_file()})"
    return (f"{name}: HTTP {code}: the model is gated or private (or the name is wrong); {tok}. Accept its "
            f"licence at {base}/{name} while logged in, then set HF_TOKEN to a read token (or run "
            "`hf auth login`)")


def _listing(base, name, revision, token):
    """-> (commit sha, {file: Blob}) from the model info API, retried on 429/5xx/network errors."""
    url = f"{base}/api/models/{name}/revision/{quote(revision, safe='')}?blobs=true"

    def attempt():
        try:
            with http_open(url, token=token, timeout=30) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code in (401, 403):
                raise CheckpointError(_access_denied(name, e.code, base, token)) from None
            if e.code == 404:
                raise CheckpointError(f"{name}: no such local folder, and no model {name} with revision "
                                      f"{revision!r} on {base} (HTTP 404 from {url})") from None
            raise _http_error(e, url) from None
        except (OSError, http.client.HTTPException) as e:
            raise _Transient(f"could not list the files of {name} at {url} ({getattr(e, 'reason', e)}). "
                             "Offline? Set HF_HUB_OFFLINE=1 to use the hub cache only, or pass a local "
                             "folder") from None
    body = with_retries(attempt)
    try:
        info = json.loads(body)
        sha = info["sha"]
        assert isinstance(sha, str) and COMMIT.match(sha)
        files = {}
        for s in info["siblings"]:
            lfs = s.get("lfs")
            if lfs:
                files[s["rfilename"]] = Blob(int(lfs["size"]), str(lfs["sha256"]), None)
            else:
                files[s["rfilename"]] = Blob(int(s["size"]), None, str(s["blobId"]))
    except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as e:
        raise CheckpointError(f"{url}: not a Hugging Face model listing with a commit sha and file sizes and "
                              f"hashes ({e!r}); is HF_ENDPOINT a Hugging Face hub?") from None
    return sha, files


def _write_ref(repo, revision, sha):
    ref = repo / "refs" / revision
    if ref.is_file() and ref.read_text() == sha:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f"{ref.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.write_text(sha)  # no newline, as huggingface_hub writes it
    os.replace(tmp, ref)


def _link(blob, link):
    """link -> blob as a relative symlink (../../blobs/<hash>), as huggingface_hub makes it; a copy where
    the file system has no symlinks. Made under a unique name, then renamed over whatever was there."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        os.symlink(os.path.relpath(blob, link.parent), tmp)
    except OSError:
        shutil.copyfile(blob, tmp)
    os.replace(tmp, link)


def resolve_model_dir(path_or_name, weights=True, revision="main"):
    """A local folder as is; a hub name -> its snapshot folder in the hub cache, downloading what is missing
    (weights=False: config.json and the tokenizer only). revision: a branch, tag or commit sha (hub names
    only). A complete snapshot needs no network; HF_HUB_OFFLINE=1 never uses it."""
    if Path(path_or_name).expanduser().is_dir():
        return Path(path_or_name).expanduser()
    name = str(path_or_name)
    revision = revision or "main"
    check(HUB_NAME.match(name) and ".." not in name, name, "no such folder, and not a hub name like 'gpt2'")
    check(REVISION.match(revision) and ".." not in revision, name, f"revision {revision!r} is not a branch, "
          "tag or commit sha")
    cache = hub_cache()
    repo = cache / ("models--" + name.replace("/", "--"))
    snapshot = _snapshot(repo, revision)
    if _complete(snapshot, weights):
        return snapshot
    if hub_offline():
        raise CheckpointError(f"{name}: HF_HUB_OFFLINE is set and the hub cache has no complete copy of "
                              f"revision {revision!r} in {snapshot or repo} (config.json, tokenizer, "
                              "weights); unset HF_HUB_OFFLINE to download it, or pass a local folder")
    base = hub_endpoint()
    token = _token_for(base)
    try:
        sha, files = _listing(base, name, revision, token)
    except DownloadError as e:  # one line, as every bad input: the run cannot start without the listing
        raise CheckpointError(f"{name}: {e}") from None
    snapshot = repo / "snapshots" / sha
    if revision != sha:
        _write_ref(repo, revision, sha)

    def fetch(f):  # blobs/<hash>, unless there already (another repo or tool put it there), then the link
        check(f in files, f"{base}/{name}", f"{f} is not in the repository at {sha} (files: "
              f"{sorted(files)[:12]})")
        blob = files[f]
        path = repo / "blobs" / blob.name
        if not (snapshot / f).is_file():
            lock = cache / ".locks" / repo.name / f"{blob.name}.lock"
            url = f"{base}/{name}/resolve/{sha}/{quote(f)}"
            try:
                fetch_file(url, path, lock, blob.size, blob.sha256, blob.git_sha1, token, desc=f"{name}/{f}")
            except DownloadError as e:  # one line, as every bad input: the run cannot start without it
                raise CheckpointError(f"{name}: {e}") from None
            _link(path, snapshot / f)

    tokenizer = _tokenizer_files(lambda f: f in files)
    check(set(tokenizer) <= set(files), f"{base}/{name}", f"the repository has no tokenizer.json or "
          f"vocab.json + merges.txt (files: {sorted(files)[:12]}); {SUPPORTED_TOKENIZERS}")
    for f in ("config.json",) + tokenizer + tuple(f for f in TOKENIZER_FILES if f in files):
        fetch(f)
    if not weights:
        return snapshot
    if "model.safetensors" in files:
        fetch("model.safetensors")
        return snapshot
    check(INDEX in files, f"{base}/{name}", f"the repository has no model.safetensors (files: "
          f"{sorted(files)[:12]}); only safetensors is loaded (never pickle): convert it")
    fetch(INDEX)
    for s in shards(snapshot / INDEX)[1]:
        fetch(s)
    return snapshot


def load_tokenizer(path_or_name, revision="main"):
    """A tokenizer folder or hub name -> Tokenizer (a hub name downloads only config.json and the tokenizer
    files)."""
    return Tokenizer(resolve_model_dir(path_or_name, weights=False, revision=revision), name=path_or_name)
