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
Flags are bench.py's (--key=value, same defaults); alpha, beta, agree_batches, mem_vocab and mem_seq_len are
accepted so one command line drives both scripts, and have no effect here.
  /tmp/hfvenv/bin/python experiments/bench_hf.py --init_from=gpt2 --device=cpu --dtype=float32 --out=hf.json
  /tmp/hfvenv/bin/python experiments/bench_hf.py --init_from=facebook/opt-125m --device=cuda --out=hf_opt.json
  /tmp/hfvenv/bin/python experiments/bench_hf.py --init_from=tests/fixtures/gpt2 --out=/tmp/bh.json
  python3 experiments/bench_hf.py --init_from=llama-3.1-8b --device=cuda --train_lora_rank=16 --greedy=False
"""
import copy, json, os, statistics, sys, time
from contextlib import nullcontext
import torch
import transformers
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config,
                          LlamaConfig, OPTConfig, Qwen3Config)

# the repo root: bench.SHAPES and gpt.native_dtype are the definitions this baseline must agree with
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import FULL_FT_BYTES_PER_PARAM, LORA_ALPHA, LORA_DROPOUT, SHAPES  # noqa: E402
from gpt import native_dtype  # noqa: E402

# ------------------------------------------------------------------ config (--key=value), as bench.py
init_from = "gpt2"        # a local HF folder (real weights), or a shape of bench.SHAPES (random weights)
device = "cpu"            # cpu | cuda | cuda:N
dtype = "auto"            # auto (gpt.native_dtype) | float32 | bfloat16 | float16 (GPU only)
compile = False           # torch.compile the pooled and training forward (generate eager, as bench.py)
attn_implementation = "sdpa"                # HF attention backend: sdpa | eager | flash_attention_2 ...
batch_size, seq_len = 16, 128               # pooled classification
cot_batch_size, cot_tokens = 8, 64          # CoT decoding: new tokens per sample
cot_prompt_len = 32       # CoT prompt length
temperature, top_p = 0.1, 0.7               # paper App. E.6
train_batch_size, train_seq_len = 4, 256    # one training step
train_lora_rank = 0       # 0: full fine-tuning; r > 0: PEFT LoRA of rank r (bench.py's alpha and dropout)
greedy = True             # also time greedy decoding (HF only; off saves one more decode per repeat)
alpha, beta = 1.0, 1.0    # bench.py's Eq. 4 weights; no effect here (LM-only step)
mem_vocab, mem_seq_len = 50257, 1024        # bench.py's loss-memory shape; no effect here (train-step peak)
agree_batches = 8         # bench.py's fp32 agreement check; no effect here
warmup, repeats = 1, 3    # untimed calls, then the median of `repeats` timed calls
num_labels = 2
seed = 1337
out = "bench_hf.json"

# dropout fields of the HF configs: zeroed because bench.py's GPT trains with dropout 0.0
DROPOUT_FIELDS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout", "dropout",
                  "attention_dropout", "activation_dropout", "layerdrop")


def parse_args(argv, cfg):
    """--key=value over the globals above; the value's type follows the default's."""
    for arg in argv:
        key, eq, val = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not eq or key not in cfg:
            raise SystemExit(f"bench_hf.py: bad argument {arg!r}: expected --key=value with key one of "
                             + ", ".join(cfg))
        old = cfg[key]
        try:
            if isinstance(old, bool):
                if val not in ("True", "False", "true", "false", "1", "0"):
                    raise ValueError("expected True or False")
                new = val in ("True", "true", "1")
            else:
                new = type(old)(val)
        except ValueError as e:
            raise SystemExit(f"bench_hf.py: bad value for --{key}: {val!r} ({e}); default is {old!r}")
        cfg[key] = new
    return cfg


def hf_config(init_from):
    """The HF config of a built-in shape (bench.SHAPES) or of a local HF folder."""
    if os.path.isdir(init_from):
        cfg = AutoConfig.from_pretrained(init_from)
        # the folder's own classification head if it has one (as bench.py), else a fresh num_labels head
        archs = cfg.architectures or []
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            cfg.num_labels = num_labels
    elif init_from not in SHAPES:
        raise SystemExit(f"bench_hf.py: --init_from={init_from!r} is neither a model folder nor a built-in "
                         f"shape ({', '.join(SHAPES)})")
    elif SHAPES[init_from].get("model_type", "gpt2") == "gpt2":
        s = SHAPES[init_from]
        cfg = GPT2Config(vocab_size=s.get("vocab_size", 50257), n_positions=s.get("block_size", 1024),
                         n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"], num_labels=num_labels,
                         bos_token_id=s.get("bos_token_id", 50256), eos_token_id=s.get("eos_token_id", 50256))
    elif SHAPES[init_from]["model_type"] == "opt":
        s = SHAPES[init_from]
        cfg = OPTConfig(vocab_size=s["vocab_size"], max_position_embeddings=s["block_size"],
                        num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                        hidden_size=s["n_embd"], ffn_dim=4 * s["n_embd"], activation_function=s["activation"],
                        word_embed_proj_dim=s.get("word_embed_proj_dim", s["n_embd"]),
                        do_layer_norm_before=s.get("pre_ln", True), bos_token_id=s["bos_token_id"],
                        eos_token_id=s["eos_token_id"], pad_token_id=s["pad_token_id"], num_labels=num_labels)
    elif SHAPES[init_from]["model_type"] in ("llama", "qwen3"):
        s = SHAPES[init_from]
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
                           eos_token_id=s["eos_token_id"], num_labels=num_labels, **rope)
    else:
        raise SystemExit(f"bench_hf.py: no HF config for model_type {SHAPES[init_from]['model_type']!r}")
    for field in DROPOUT_FIELDS:
        if hasattr(cfg, field):
            setattr(cfg, field, 0.0)
    # GPT-2 has no pad token; *ForSequenceClassification refuses batches > 1 without one, generate wants one
    if cfg.pad_token_id is None:
        cfg.pad_token_id = cfg.eos_token_id
    return cfg


def build(auto_cls, cfg, weights_dtype):
    """The model on `device`, weights in `weights_dtype`: a built-in shape is constructed there (default
    device and dtype set around from_config, which honours both); a folder is read, then moved."""
    if os.path.isdir(init_from):
        model = auto_cls.from_pretrained(init_from, config=cfg, attn_implementation=attn_implementation)
        return model.to(device, weights_dtype)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(weights_dtype)
    try:
        with torch.device(device):
            model = auto_cls.from_config(cfg, attn_implementation=attn_implementation)
    finally:
        torch.set_default_dtype(default_dtype)
    return model.to(device, weights_dtype)  # a no-op where from_config honoured both


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
    lora = peft.LoraConfig(r=train_lora_rank, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                           target_modules=targets, bias="none", fan_in_fan_out=model_type == "gpt2")
    # PEFT keeps the adapters in fp32 on a bf16 base (autocast_adapter_dtype), like bench.py
    return peft.get_peft_model(lm, lora), f"peft {peft.__version__}"


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


def main():
    cfg = parse_args(sys.argv[1:], {k: v for k, v in globals().items()
                                    if not k.startswith("_") and isinstance(v, (int, float, bool, str))})
    globals().update(cfg)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_hf.py: --device=cuda but torch.cuda.is_available() is False; "
                         "use --device=cpu")
    if dtype not in ("auto", "float32", "bfloat16", "float16") or dtype == "float16" and "cuda" not in device:
        raise SystemExit(f"bench_hf.py: --dtype={dtype!r}: expected auto, float32 or bfloat16 "
                         "(float16 on CUDA only)")
    why = "--dtype"
    if dtype == "auto":  # the same rule as bench.py, so both scripts pick the same dtype on one machine
        globals()["dtype"], why = native_dtype(device)
    sizes = (batch_size, seq_len, cot_batch_size, cot_tokens, cot_prompt_len, train_batch_size, train_seq_len)
    if min(sizes) < 1:
        raise SystemExit("bench_hf.py: batch sizes, lengths and token counts must be >= 1")
    torch.manual_seed(seed)
    device_type = "cuda" if "cuda" in device else "cpu"
    ptdtype = getattr(torch, dtype)
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type, dtype=ptdtype)

    hcfg = hf_config(init_from)
    block_size = hcfg.max_position_embeddings
    for name, n in (("seq_len", seq_len), ("cot_prompt_len + cot_tokens", cot_prompt_len + cot_tokens),
                    ("train_seq_len", train_seq_len)):
        if n > block_size:
            raise SystemExit(f"bench_hf.py: --{name.split()[0]}: {name}={n} exceeds the model's "
                             f"max_position_embeddings {block_size}")
    g = torch.Generator(device).manual_seed(seed)

    def rand(*shape):
        return torch.randint(hcfg.vocab_size, shape, generator=g, device=device)

    # CUDA: weights in dtype from the start, built on the GPU (bench.py's rule); CPU: fp32 under autocast
    weights_dtype = torch.float32
    gpu = None
    if device_type == "cuda":
        weights_dtype = ptdtype
        gpu = torch.cuda.get_device_name(device)
    if train_lora_rank < 0:
        raise SystemExit(f"bench_hf.py: --train_lora_rank={train_lora_rank}: 0 or a LoRA rank >= 1")

    # --- pooled classification: one forward over x, HF's last-non-pad-token pooling
    clf = build(AutoModelForSequenceClassification, hcfg, weights_dtype)
    clf.eval()
    # CPU: autocast like bench.py's pooled path; CUDA: weights in dtype, HF's usual half-precision setup
    precision = "autocast" if device_type == "cpu" and dtype != "float32" else "weights"
    pooled_ctx = nullcontext()
    if precision == "autocast":
        pooled_ctx = ctx
    classify = torch.compile(clf) if compile else clf
    x = rand(batch_size, seq_len)
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
    if device_type == "cuda" and train_lora_rank == 0:
        card = torch.cuda.get_device_properties(device).total_memory
        if FULL_FT_BYTES_PER_PARAM * n_params > 0.75 * card:  # bench.py's rule
            raise SystemExit(f"bench_hf.py: full fine-tuning of {n_params / 1e9:.2f}B parameters does not "
                             f"fit this {gpu}; use --train_lora_rank=16")
    prompt = rand(cot_batch_size, cot_prompt_len)
    prompt_mask = torch.ones_like(prompt)
    # weights in dtype, as bench.py decodes (CPU: on a copy, the fp32 model is trained below under autocast)
    infer = lm
    if lm.dtype != ptdtype:
        infer = copy.deepcopy(lm).to(ptdtype)

    def decode(sample, new_tokens):
        # HF samples from the global generator: reseed so every call draws the same tokens
        torch.manual_seed(seed)
        kw = dict(do_sample=False)
        if sample:
            # top_k=0 turns off HF's default top_k=50: pure nucleus sampling, as bench.py's _sample
            kw = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        # min_new_tokens = max_new_tokens: every row gets exactly new_tokens, as bench.py (no eos)
        y = infer.generate(prompt, attention_mask=prompt_mask, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=hcfg.pad_token_id, use_cache=True, **kw)
        assert y.shape == (cot_batch_size, cot_prompt_len + new_tokens), y.shape
    warm_tokens = min(cot_tokens, 16)  # bench.py's short warm-up
    t_greedy = None
    with torch.inference_mode():
        t_cot = timed(lambda: decode(True, cot_tokens), warm=lambda: decode(True, warm_tokens))
        if greedy:
            t_greedy = timed(lambda: decode(False, cot_tokens), warm=lambda: decode(False, warm_tokens))
    del infer

    # --- one LM-only training step: forward with labels (HF's full-logits loss) + backward + AdamW
    lm.train()
    lora_impl = None
    if train_lora_rank:
        lm, lora_impl = add_peft_lora(lm, hcfg.model_type)
    else:
        lm.float()  # fp32 master weights (CPU: already)
    params = [p for p in lm.parameters() if p.requires_grad]
    trained = sum(p.numel() for p in params)
    # bench.py's grouping (nanoGPT): matrices decay, biases and LayerNorm gains do not
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=device_type in ("cuda", "cpu"))
    fast = torch.compile(lm) if compile else lm
    s = rand(train_batch_size, train_seq_len)
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == "float16")

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
        torch.cuda.reset_peak_memory_stats(device)
    t_train = timed(step)
    if device_type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    tok_s = train_batch_size * train_seq_len / t_train

    method = None
    if device_type == "cuda":
        method = "cuda max_memory_allocated over the train step (weights, grads and AdamW state included)"
    greedy_tok_s = None
    if t_greedy is not None:
        greedy_tok_s = cot_batch_size * cot_tokens / t_greedy
    res = {"impl": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
           "device": device, "dtype": dtype, "dtype_reason": why, "model": init_from, "gpu": gpu,
           "attn_implementation": attn_implementation, "compile": compile, "params": n_params,
           "pooled": {"batch_size": batch_size, "seq_len": seq_len, "precision": precision,
                      "qps": batch_size / t_pooled},
           "cot": {"batch_size": cot_batch_size, "new_tokens": cot_tokens, "prompt_len": cot_prompt_len,
                   "temperature": temperature, "top_p": top_p, "top_k": 0, "qps": cot_batch_size / t_cot,
                   "tokens_per_s": cot_batch_size * cot_tokens / t_cot,
                   "greedy_tokens_per_s": greedy_tok_s},
           "train": {"batch_size": train_batch_size, "seq_len": train_seq_len, "tokens_per_s": tok_s,
                     "kind": "lm_only", "lora_rank": train_lora_rank, "lora_impl": lora_impl,
                     "trained_params": trained},
           "lm_loss_memory": {"train_step_peak_mb": peak_mb, "batch_size": train_batch_size,
                              "seq_len": train_seq_len, "vocab": hcfg.vocab_size, "method": method}}
    res["speedup"] = res["pooled"]["qps"] / res["cot"]["qps"]
    res["threads"] = torch.get_num_threads()

    p, ct = res["pooled"], res["cot"]
    print(f"transformers {transformers.__version__} bench: {init_from} on {device} {dtype} ({why}), "
          f"attn {attn_implementation}, {res['threads']} threads, median of {repeats}")
    peak_txt = "n/a (CPU)"
    greedy_txt = "n/a (--greedy=False)"
    if greedy_tok_s is not None:
        greedy_txt = f"{greedy_tok_s:.1f}"
    if peak_mb is not None:
        peak_txt = f"{peak_mb:.0f}"
    rows = [("pooled QPS", f"{p['qps']:.2f}", f"batch {batch_size} x {seq_len} tokens, {precision}"),
            ("CoT QPS", f"{ct['qps']:.3f}", f"batch {cot_batch_size}, {cot_prompt_len}-token prompt "
             f"+ {cot_tokens} new, T={temperature} top_p={top_p} top_k=0"),
            ("CoT new tokens/s", f"{ct['tokens_per_s']:.1f}", "KV cache, sampled"),
            ("greedy tokens/s", greedy_txt, "KV cache, do_sample=False"),
            ("speedup", f"{res['speedup']:.1f}x", "pooled QPS / CoT QPS"),
            ("train tokens/s", f"{tok_s:.1f}", f"LM-only step batch {train_batch_size} x {train_seq_len}, "
             f"{lora_impl or 'full fine-tuning'}"),
            ("train peak MB", peak_txt, "HF full-logits loss, fwd+bwd+AdamW")]
    for r in rows:
        print(f"  {r[0]:<18} {r[1]:>12}   {r[2]}")
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
