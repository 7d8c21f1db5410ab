"""
Side-by-side baseline of bench.py: the same shapes and settings timed with Hugging Face transformers, so that
dhrd / transformers ratios can be reported. A developer script outside the runtime path (like
tests/fixtures/make_fixtures.py): it imports transformers, nothing in the project imports it.
  pooled   AutoModelForSequenceClassification forward over [batch_size, seq_len] random ids, full mask;
           autocast on CPU when dtype != float32 (as bench.py), weights in dtype on CUDA ("precision");
  cot      AutoModelForCausalLM.generate, KV cache, weights in dtype, pure nucleus sampling like bench.py
           (temperature, top_p, top_k=0), exactly cot_tokens new tokens per row; also a greedy figure;
  train    one LM-only step: forward with labels=ids (HF's full-logits loss) + backward + fused AdamW,
           autocast when dtype != float32 (HF has no dual-head DHRD loss, so "kind": "lm_only"); full
           fine-tuning (fp32 master weights), or PEFT LoRA on a frozen base with --train_lora_rank=r
           (App. E.4);
  lm_loss_memory  the train step's peak CUDA memory (HF's loss is bench.py's "naive" full-logits path);
           null on CPU.
Each figure is the median of `repeats` calls after `warmup` untimed calls (GPU synced around each clock read).
Weights are random (speed does not depend on their values) unless --init_from is a local HF folder.
On CUDA a built-in shape is built on the GPU with its weights in dtype (as bench.py), on the CPU in fp32.
Flags are bench.py's Config (--key=value, same defaults, the same parser) and a few more (Config below).
--pairs=N: N same-run pairs, bench.py then bench_hf.py, each a fresh process with these flags, alternated;
each pair's dhrd / transformers ratios and their medians (the figures to report: single runs on a shared
machine move by +-30%), and bench.py's roofline fractions, go to --out.
  python experiments/bench_hf.py --pairs=3 --out=pairs.json     # medians of 3 pairs, CPU
  python experiments/bench_hf.py --init_from=gpt2 --device=cpu --dtype=float32 --out=hf.json
  python experiments/bench_hf.py --init_from=facebook/opt-125m --device=cuda --out=hf_opt.json
  python experiments/bench_hf.py --init_from=tests/fixtures/gpt2 --out=/tmp/bh.json
  python3 experiments/bench_hf.py --init_from=llama-3.1-8b --device=cuda --train_lora_rank=16 --greedy=False
"""
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace

import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config,
                          LlamaConfig, OPTConfig, Qwen3Config)

# the repo root: bench.SHAPES and gpt.native_dtype are the definitions this baseline must agree with
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
from bench import FULL_FT_BYTES_PER_PARAM, LORA_ALPHA, LORA_DROPOUT, SHAPES  # noqa: E402
from gpt import native_dtype  # noqa: E402
from plumbing import ConfigError  # noqa: E402

# ------------------------------------------------------------------ config (--key=value), as bench.py
@dataclass
class Config(bench.Config):
    """bench.py's settings (same defaults, the same parser), and these. compile: the pooled and training
    forward (generate stays eager); alpha, beta, agree_batches, mem_vocab, mem_seq_len, cot_compile, threads:
    accepted so one command line drives both scripts (threads is honoured)."""
    attn_implementation: str = "sdpa"   # HF attention backend: sdpa | eager | flash_attention_2 ...
    greedy: bool = True                 # also time greedy decoding (off saves one more decode per repeat)
    pairs: int = 0                      # > 0: that many bench.py, bench_hf.py runs, alternated, each a fresh
                                        # process; `out` gets each pair's ratios and their medians
    out: str = "bench_hf.json"


flags = Config()  # main() sets the parsed ones

# dropout fields of the HF configs: zeroed because bench.py's GPT trains with dropout 0.0
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "dropout",
                  "attention_dropout", "activation_dropout", "layerdrop")


def hf_config():
    """The HF config of a built-in shape (bench.SHAPES) or of a local HF folder."""
    if os.path.isdir(flags.init_from):
        cfg = AutoConfig.from_pretrained(flags.init_from)
        # the folder's own classification head if it has one (as bench.py), else a fresh num_labels head
        archs = cfg.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            cfg.num_labels = flags.num_labels
    elif flags.init_from not in SHAPES:
        raise SystemExit(f"bench_hf.py: --init_from={flags.init_from!r} is neither a model folder nor a "
                         f"built-in shape ({', '.join(SHAPES)})")
    elif SHAPES[flags.init_from].get("model_type", "gpt2") == "gpt2":
        s = SHAPES[flags.init_from]
        cfg = GPT2Config(vocab_size=s.get("vocab_size", 50257), n_positions=s.get("block_size", 1024),
                         n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"],
                         num_labels=flags.num_labels,
                         bos_token_id=s.get("bos_token_id", 50256), eos_token_id=s.get("eos_token_id", 50256))
    elif SHAPES[flags.init_from]["model_type"] == "opt":
        s = SHAPES[flags.init_from]
        cfg = OPTConfig(vocab_size=s["vocab_size"], max_position_embeddings=s["block_size"],
                        num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                        hidden_size=s["n_embd"], ffn_dim=4 * s["n_embd"], activation_function=s["activation"],
                        word_embed_proj_dim=s.get("word_embed_proj_dim", s["n_embd"]),
                        do_layer_norm_before=s.get("pre_ln", True), bos_token_id=s["bos_token_id"],
                        eos_token_id=s["eos_token_id"], pad_token_id=s["pad_token_id"],
                        num_labels=flags.num_labels)
    elif SHAPES[flags.init_from]["model_type"] in ("llama", "qwen3"):
        s = SHAPES[flags.init_from]
        # rope_theta / rope_scaling as config.json spells them (transformers 5 moves them to rope_parameters)
        rope = {"rope_theta": s["rope_theta"]}
        config_class = Qwen3Config
        if s["model_type"] == "llama":
            rope["rope_scaling"] = s["rope_scaling"]
            config_class = LlamaConfig
        cfg = config_class(vocab_size=s["vocab_size"], max_position_embeddings=s["block_size"],
                           num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                           num_key_value_heads=s["n_kv_head"], head_dim=s["head_dim"],
                           hidden_size=s["n_embd"], intermediate_size=s["n_inner"],
                           hidden_act=s["activation"],
                           rms_norm_eps=s["layer_norm_eps"], tie_word_embeddings=s["tie_word_embeddings"],
                           attention_bias=False, bos_token_id=s["bos_token_id"],
                           eos_token_id=s["eos_token_id"], num_labels=flags.num_labels, **rope)
    else:
        kind = SHAPES[flags.init_from]["model_type"]
        raise SystemExit(f"bench_hf.py: no HF config for model_type {kind!r}")
    for field in DROPOUT_FIELDS:
        if hasattr(cfg, field):
            setattr(cfg, field, 0.0)
    # GPT-2 has no pad token; *ForSequenceClassification refuses batches > 1 without one, generate wants one
    if cfg.pad_token_id is None:
        cfg.pad_token_id = cfg.eos_token_id
    return cfg


def build(auto_cls, cfg, weights_dtype):
    """The model on `device`, weights in `weights_dtype`: a built-in shape is constructed there (default
    flags.device and flags.dtype set around from_config, which honours both); a folder is read, then moved."""
    if os.path.isdir(flags.init_from):
        model = auto_cls.from_pretrained(flags.init_from, config=cfg,
                                         attn_implementation=flags.attn_implementation)
        return model.to(flags.device, weights_dtype)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(weights_dtype)
    try:
        with torch.device(flags.device):
            model = auto_cls.from_config(cfg, attn_implementation=flags.attn_implementation)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.to(flags.device, weights_dtype)  # a no-op where from_config honoured both


def add_peft_lora(lm, model_type):
    """PEFT LoRA on the frozen LM (App. E.4: every projection; GPT-2's fused Conv1D ones by their names)."""
    try:
        import peft
    except ImportError:
        raise SystemExit("bench_hf.py: --train_lora_rank > 0 needs the peft package (pip install peft)")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if model_type == "gpt2":
        targets = ["c_attn", "c_proj", "c_fc"]
    if model_type == "opt":
        targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    lora = peft.LoraConfig(r=flags.train_lora_rank, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                           target_modules=targets, bias="none", fan_in_fan_out=model_type == "gpt2")
    # PEFT keeps the adapters in fp32 on a bf16 base (autocast_adapter_dtype), like bench.py
    return peft.get_peft_model(lm, lora), f"peft {peft.__version__}"


def sync():
    if "cuda" in flags.device:
        torch.cuda.synchronize(flags.device)


def timed(fn, warm=None):
    """Median wall-clock seconds of `repeats` calls after `warmup` calls of `warm` (default: fn itself);
    the clock is read after a GPU sync."""
    warm = warm or fn
    for _ in range(flags.warmup):
        warm()
    times = []
    for _ in range(flags.repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    global flags
    try:
        flags = bench.parse_config(sys.argv[1:], Config)
    except ConfigError as e:
        raise SystemExit(f"bench_hf.py: error: {e}")
    if flags.pairs > 0:
        return pairs()
    why = "--dtype"
    if flags.dtype == "auto":  # the same rule as bench.py, so both scripts pick the same dtype on one machine
        native, why = native_dtype(flags.device)
        flags = replace(flags, dtype=native)
    if flags.threads:
        torch.set_num_threads(flags.threads)
    torch.manual_seed(flags.seed)
    device_type = "cuda" if "cuda" in flags.device else "cpu"
    ptdtype = getattr(torch, flags.dtype)
    ctx = nullcontext() if flags.dtype == "float32" else torch.autocast(device_type, dtype=ptdtype)

    hcfg = hf_config()
    block_size = hcfg.max_position_embeddings
    lengths = {"seq_len": flags.seq_len, "train_seq_len": flags.train_seq_len}
    lengths["cot_prompt_len + cot_tokens"] = flags.cot_prompt_len + flags.cot_tokens
    for name, n in lengths.items():
        if n > block_size:
            raise SystemExit(f"bench_hf.py: --{name.split()[0]}: {name}={n} exceeds the model's "
                             f"max_position_embeddings {block_size}")
    g = torch.Generator(flags.device).manual_seed(flags.seed)

    def rand(*shape):
        return torch.randint(hcfg.vocab_size, shape, generator=g, device=flags.device)

    # CUDA: weights in dtype from the start, built on the GPU (bench.py's rule); CPU: fp32 under autocast
    weights_dtype = torch.float32
    gpu = None
    if device_type == "cuda":
        weights_dtype = ptdtype
        gpu = torch.cuda.get_device_name(flags.device)

    # --- pooled classification: one forward over x, HF's last-non-pad-token pooling
    clf = build(AutoModelForSequenceClassification, hcfg, weights_dtype)
    clf.eval()
    # CPU: autocast like bench.py's pooled path; CUDA: weights in dtype, HF's usual half-precision setup
    precision = "autocast" if device_type == "cpu" and flags.dtype != "float32" else "weights"
    pooled_ctx = nullcontext()
    if precision == "autocast":
        pooled_ctx = ctx
    classify = torch.compile(clf) if flags.compile else clf
    x = rand(flags.batch_size, flags.seq_len)
    x_mask = torch.ones_like(x)
    with torch.inference_mode(), pooled_ctx:
        t_pooled = timed(lambda: classify(input_ids=x, attention_mask=x_mask).logits)
    del clf, classify
    if device_type == "cuda":
        torch.cuda.empty_cache()

    # --- CoT decoding: KV cache, nucleus sampling, fixed length (no early stop)
    lm = build(AutoModelForCausalLM, hcfg, weights_dtype)
    lm.eval()
    n_params = sum(p.numel() for p in lm.parameters())
    if device_type == "cuda" and flags.train_lora_rank == 0:
        card = torch.cuda.get_device_properties(flags.device).total_memory
        if FULL_FT_BYTES_PER_PARAM * n_params > 0.75 * card:  # bench.py's rule
            raise SystemExit(f"bench_hf.py: full fine-tuning of {n_params / 1e9:.2f}B parameters does not "
                             f"fit this {gpu}; use --train_lora_rank=16")
    prompt = rand(flags.cot_batch_size, flags.cot_prompt_len)
    # weights in dtype, as bench.py decodes (CPU: on a copy, the fp32 model is trained below under autocast)
    infer = lm
    if lm.dtype != ptdtype:
        infer = copy.deepcopy(lm).to(ptdtype)

    def decode(sample, new_tokens, rows=prompt):
        # HF samples from the global generator: reseed so every call draws the same tokens
        torch.manual_seed(flags.seed)
        kw = dict(do_sample=False)
        if sample:
            # top_k=0 turns off HF's default top_k=50: pure nucleus sampling, as bench.py's _sample
            kw = dict(do_sample=True, temperature=flags.temperature, top_p=flags.top_p, top_k=0)
        # min_new_tokens = max_new_tokens: every row gets exactly new_tokens, as bench.py (no eos)
        y = infer.generate(rows, attention_mask=torch.ones_like(rows), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=hcfg.pad_token_id, use_cache=True, **kw)
        assert y.shape == (rows.shape[0], flags.cot_prompt_len + new_tokens), y.shape
    N = flags.cot_tokens
    warm_tokens = min(N, 16)  # bench.py's short warm-up
    t_greedy = None
    t_batch1 = None
    with torch.inference_mode():
        t_cot = timed(lambda: decode(True, N), warm=lambda: decode(True, warm_tokens))
        if flags.greedy:
            t_greedy = timed(lambda: decode(False, N), warm=lambda: decode(False, warm_tokens))
        if flags.cot_batch1 and flags.cot_batch_size > 1:  # one prompt alone, as bench.py's cot_batch1
            t_batch1 = timed(lambda: decode(True, N, prompt[:1]),
                             warm=lambda: decode(True, warm_tokens, prompt[:1]))
    del infer

    # --- one LM-only training step: forward with labels (HF's full-logits loss) + backward + AdamW
    lm.train()
    lora_impl = None
    if flags.train_lora_rank:
        lm, lora_impl = add_peft_lora(lm, hcfg.model_type)
    else:
        lm.float()  # fp32 master weights (CPU: already)
    params = [p for p in lm.parameters() if p.requires_grad]
    trained = sum(p.numel() for p in params)
    # bench.py's grouping (nanoGPT): matrices decay, biases and LayerNorm gains do not
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=device_type in ("cuda", "cpu"))
    fast = torch.compile(lm) if flags.compile else lm
    s = rand(flags.train_batch_size, flags.train_seq_len)
    scaler = torch.amp.GradScaler(device_type, enabled=flags.dtype == "float16")

    def step():
        with ctx:
            # use_cache=False: a training forward builds no KV cache (bench.py's does not either)
            loss = fast(input_ids=s, labels=s, use_cache=False).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    peak_mb = None
    if device_type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(flags.device)
    t_train = timed(step)
    if device_type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(flags.device) / 2**20
    tok_s = flags.train_batch_size * flags.train_seq_len / t_train

    method = None
    if device_type == "cuda":
        method = "cuda max_memory_allocated over the train step (weights, grads and AdamW state included)"
    greedy_tok_s = None
    if t_greedy is not None:
        greedy_tok_s = flags.cot_batch_size * N / t_greedy
    f = flags
    cot = {"batch_size": f.cot_batch_size, "new_tokens": N, "prompt_len": f.cot_prompt_len,
           "temperature": f.temperature, "top_p": f.top_p, "top_k": 0, "qps": f.cot_batch_size / t_cot,
           "tokens_per_s": f.cot_batch_size * N / t_cot, "greedy_tokens_per_s": greedy_tok_s}
    cot_batch1 = None
    if t_batch1 is not None:
        cot_batch1 = {"batch_size": 1, "new_tokens": N, "qps": 1 / t_batch1, "tokens_per_s": N / t_batch1}
    res = {"impl": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
           "device": f.device, "dtype": f.dtype, "dtype_reason": why, "model": f.init_from, "gpu": gpu,
           "attn_implementation": f.attn_implementation, "compile": f.compile, "params": n_params,
           "threads": torch.get_num_threads(),
           "pooled": {"batch_size": f.batch_size, "seq_len": f.seq_len, "precision": precision,
                      "qps": f.batch_size / t_pooled},
           "cot": cot, "cot_batch1": cot_batch1,
           "train": {"batch_size": f.train_batch_size, "seq_len": f.train_seq_len, "tokens_per_s": tok_s,
                     "kind": "lm_only", "lora_rank": f.train_lora_rank, "lora_impl": lora_impl,
                     "trained_params": trained},
           "lm_loss_memory": {"train_step_peak_mb": peak_mb, "batch_size": f.train_batch_size,
                              "seq_len": f.train_seq_len, "vocab": hcfg.vocab_size, "method": method}}
    res["speedup"] = res["pooled"]["qps"] / res["cot"]["qps"]

    p = res["pooled"]
    print(f"transformers {transformers.__version__} bench: {f.init_from} on {f.device} {f.dtype} ({why}), "
          f"attn {f.attn_implementation}, {res['threads']} threads, median of {f.repeats}")
    peak_txt = "n/a (CPU)"
    greedy_txt = "n/a (--greedy=False)"
    if greedy_tok_s is not None:
        greedy_txt = f"{greedy_tok_s:.1f}"
    if peak_mb is not None:
        peak_txt = f"{peak_mb:.0f}"
    rows = [("pooled QPS", f"{p['qps']:.2f}", f"batch {f.batch_size} x {f.seq_len} tokens, {precision}"),
            ("CoT QPS", f"{cot['qps']:.3f}", f"batch {f.cot_batch_size}, {f.cot_prompt_len}-token prompt "
             f"+ {N} new, T={f.temperature} top_p={f.top_p} top_k=0"),
            ("CoT new tokens/s", f"{cot['tokens_per_s']:.1f}", "KV cache, sampled")]
    if cot_batch1 is not None:
        rows.append(("  at batch 1", f"{cot_batch1['tokens_per_s']:.1f}", "one prompt alone, sampled"))
    rows += [("greedy tokens/s", greedy_txt, "KV cache, do_sample=False"),
             ("speedup", f"{res['speedup']:.1f}x", "pooled QPS / CoT QPS"),
             ("train tokens/s", f"{tok_s:.1f}", f"LM-only step batch {f.train_batch_size} x "
              f"{f.train_seq_len}, {lora_impl or 'full fine-tuning'}"),
             ("train peak MB", peak_txt, "HF full-logits loss, fwd+bwd+AdamW")]
    for r in rows:
        print(f"  {r[0]:<18} {r[1]:>12}   {r[2]}")
    with open(f.out, "w") as fh:
        json.dump(res, fh, indent=2)
    print(f"wrote {f.out}")


# (figure, key path in both JSON files): the ratios a pair reports, dhrd / transformers
RATIOS = {"pooled QPS": ("pooled", "qps"), "CoT tokens/s": ("cot", "tokens_per_s"),
          "CoT tokens/s at batch 1": ("cot_batch1", "tokens_per_s"),
          "train tokens/s": ("train", "tokens_per_s")}
# bench.py's fractions of the bounding limit, measured in the same run
FRACTIONS = {"pooled of GEMM": ("pooled", "roofline_fraction"), "CoT of read": ("cot", "roofline_fraction"),
             "CoT batch 1 of read": ("cot_batch1", "roofline_fraction"),
             "train of GEMM": ("train", "roofline_fraction")}


def _get(res, keys):
    for k in keys:
        if not isinstance(res, dict) or res.get(k) is None:
            return None
        res = res[k]
    return res


def pairs():
    """--pairs=N: bench.py then this script, N times, each in a fresh process with the same flags (bench.py's
    own only for it): a pair ran under the same load, so its ratio means more than either figure alone."""
    here = os.path.dirname(os.path.abspath(__file__))
    bench_keys = set(bench.Config.__dataclass_fields__)
    args = [a for a in sys.argv[1:] if not a.startswith(("--pairs=", "--out="))]
    bench_args = [a for a in args if a[2:].partition("=")[0] in bench_keys]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(flags.pairs):
            pair = {}
            for name, cmd in (("dhrd", [os.path.join(os.path.dirname(here), "bench.py"), *bench_args]),
                              ("hf", [os.path.abspath(__file__), *args])):
                out = os.path.join(tmp, f"{name}_{i}.json")
                load = os.getloadavg()[0]
                print(f"pair {i + 1}/{flags.pairs}: {name}, load average {load:.2f}", flush=True)
                subprocess.run([sys.executable, *cmd, f"--out={out}"], check=True, stdout=subprocess.DEVNULL)
                with open(out) as fh:
                    pair[name] = json.load(fh)
            runs.append(pair)
    res = {"pairs": [], "median": {}, "load_average": os.getloadavg()}
    for pair in runs:
        row = {}
        for fig, keys in RATIOS.items():
            d = _get(pair["dhrd"], keys)
            h = _get(pair["hf"], keys)
            row[fig] = None if d is None or h is None else d / h
        for fig, keys in FRACTIONS.items():
            row[fig] = _get(pair["dhrd"], keys)
        row["dhrd"] = {fig: _get(pair["dhrd"], keys) for fig, keys in RATIOS.items()}
        row["hf"] = {fig: _get(pair["hf"], keys) for fig, keys in RATIOS.items()}
        res["pairs"].append(row)
    first = runs[0]["dhrd"]
    print(f"dhrd / transformers, {flags.init_from} {first['dtype']}, {first['threads']} threads, "
          f"{len(runs)} same-run pairs: the median (each pair)")
    for fig in (*RATIOS, *FRACTIONS):
        vals = [row[fig] for row in res["pairs"] if row[fig] is not None]
        if not vals:
            continue
        res["median"][fig] = statistics.median(vals)
        if fig in RATIOS:
            each = ", ".join(f"{v:.2f}" for v in vals)
            print(f"  {fig:<26} {res['median'][fig]:6.2f}x   ({each})")
        else:  # bench.py's fraction of its limit
            each = ", ".join(f"{100 * v:.0f}%" for v in vals)
            print(f"  {fig:<26} {100 * res['median'][fig]:5.0f}%    ({each})")
    with open(flags.out, "w") as fh:
        json.dump(res, fh, indent=2)
    print(f"wrote {flags.out}")


if __name__ == "__main__":
    main()
