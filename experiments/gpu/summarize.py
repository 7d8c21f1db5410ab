"""The GPU tables of README's bench.py section, from the JSON files that experiments/gpu/run.sh writes
(bench.py: bench_<shape>.json, experiments/bench_hf.py: hf_<shape>.json), paired by shape:
    python experiments/gpu/summarize.py experiments/results/gpu        # markdown on stdout
  1. pooled vs CoT (paper Table 5): pooled QPS, CoT new tokens/s, and the pooled/CoT QPS ratio, dhrd and
     transformers side by side with dhrd/transformers ratios, next to the paper's H100 figures;
  2. the training step: tokens/s of both, and the MFU of both against the peak bench.py used
     (transformers' step counted with bench.py's FLOPs per token: the same model and step kind);
  3. bench.py's roofline fractions: pooled and train of the GEMM rate at the model's shapes, a decode step
     (batch 8 and 1) of the time to read its weights and cached keys/values at the measured bandwidth.
A figure a run did not produce (a failed or skipped step) shows as '–'."""
import json
import sys
from pathlib import Path

# paper Table 5 (H100; batch sizes and input lengths not stated): (pooled QPS, CoT QPS)
PAPER_QPS = {"llama-3.1-8b": (414.91, 4.14), "llama-3.2-3b": (631.16, 4.44), "qwen3-8b": (341.15, 3.56),
             "qwen3-4b": (440.83, 3.76)}
ORDER = ["gpt2", "llama-3.2-3b", "qwen3-4b", "llama-3.1-8b", "qwen3-8b"]


def load(root):
    """{shape: {"dhrd": result, "hf": result}} from every bench_*.json and hf_*.json under root."""
    runs = {}
    for path in sorted(Path(root).rglob("*.json")):
        kind = path.name.split("_")[0]
        if kind not in ("bench", "hf"):
            continue
        res = json.loads(path.read_text())
        impl = "dhrd"
        if kind == "hf":
            impl = "hf"
        runs.setdefault(res["model"], {})[impl] = res
    return runs


def get(res, *keys):
    """res[k1][k2]...; None where a run or a key is missing."""
    for k in keys:
        if not isinstance(res, dict) or res.get(k) is None:
            return None
        res = res[k]
    return res


def num(x, fmt="{:.1f}"):
    if x is None:
        return "–"
    return fmt.format(x)


def ratio(a, b, fmt="{:.2f}×"):
    if a is None or b is None or b == 0:
        return "–"
    return fmt.format(a / b)


def size(n):
    if n is None:
        return "–"
    if n >= 1e8:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.2f}M"


def pct(x):
    if x is None:
        return "–"
    return f"{100 * x:.1f} %"


def ordered(runs):
    return [s for s in ORDER if s in runs] + sorted(s for s in runs if s not in ORDER)


def header(runs):
    any_dhrd = next((r["dhrd"] for r in runs.values() if "dhrd" in r), {})
    any_hf = next((r["hf"] for r in runs.values() if "hf" in r), {})
    cot = any_dhrd.get("cot", {})
    pooled = any_dhrd.get("pooled", {})
    return (f"{any_dhrd.get('gpu') or any_dhrd.get('device', '?')}, torch {any_dhrd.get('torch', '?')}, "
            f"transformers {any_hf.get('transformers', '–')}, {any_dhrd.get('dtype', '?')}; pooled batch "
            f"{pooled.get('batch_size', '?')} × {pooled.get('seq_len', '?')} tokens; CoT batch "
            f"{cot.get('batch_size', '?')}, {cot.get('prompt_len', '?')}-token prompt + "
            f"{cot.get('new_tokens', '?')} new, T={cot.get('temperature', '?')} "
            f"top_p={cot.get('top_p', '?')}")


def speed_table(runs):
    rows = ["| shape | params | pooled QPS dhrd | transformers | dhrd/tf | CoT new tok/s dhrd "
            "| transformers | dhrd/tf | pooled/CoT dhrd | transformers | paper (H100) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in ordered(runs):
        d = runs[shape].get("dhrd")
        h = runs[shape].get("hf")
        params = get(d, "params") or get(h, "params")
        paper = "–"
        if shape in PAPER_QPS:
            p_pooled, p_cot = PAPER_QPS[shape]
            paper = f"{p_pooled:.0f} / {p_cot:.2f} = {p_pooled / p_cot:.0f}×"
        cells = [shape, size(params),
                 num(get(d, "pooled", "qps")), num(get(h, "pooled", "qps")),
                 ratio(get(d, "pooled", "qps"), get(h, "pooled", "qps")),
                 num(get(d, "cot", "tokens_per_s")), num(get(h, "cot", "tokens_per_s")),
                 ratio(get(d, "cot", "tokens_per_s"), get(h, "cot", "tokens_per_s")),
                 num(get(d, "speedup"), "{:.0f}×"), num(get(h, "speedup"), "{:.0f}×"), paper]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def train_table(runs):
    rows = ["| shape | step | tokens/s dhrd | transformers | dhrd/tf | TFLOP/s dhrd | MFU dhrd "
            "| MFU transformers | peak TFLOP/s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for shape in ordered(runs):
        d = runs[shape].get("dhrd")
        h = runs[shape].get("hf")
        tr = get(d, "train") or {}
        step = "–"
        if tr:
            step = f"full, {tr['batch_size']} × {tr['seq_len']}"
            if tr.get("lora_rank"):
                step = f"LoRA r={tr['lora_rank']}, {tr['batch_size']} × {tr['seq_len']}"
        hf_tok = get(h, "train", "tokens_per_s")
        mfu_hf = None
        if hf_tok and tr.get("flops_per_token") and tr.get("peak_tflops"):
            mfu_hf = hf_tok * tr["flops_per_token"] / 1e12 / tr["peak_tflops"]
        cells = [shape, step, num(tr.get("tokens_per_s"), "{:.0f}"), num(hf_tok, "{:.0f}"),
                 ratio(tr.get("tokens_per_s"), hf_tok), num(tr.get("tflops"), "{:.0f}"),
                 pct(tr.get("mfu")), pct(mfu_hf), num(tr.get("peak_tflops"), "{:.0f}")]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def roofline_table(runs):
    """bench.py's fractions of the limit that bounds each figure, measured in the same run: pooled and train
    of the GEMM rate at the model's shapes, a decode step of the time to read its bytes at the measured
    bandwidth."""
    rows = ["| shape | read GB/s (datasheet) | pooled of GEMM | train of GEMM | decode | step ms, batch 8 "
            "| of read | step ms, batch 1 | of read |",
            "|---|---|---|---|---|---|---|---|---|"]
    for shape in ordered(runs):
        d = runs[shape].get("dhrd")
        if d is None:
            continue
        lim = d.get("limits") or {}
        decode = "compiled" if get(d, "cot", "compiled") else "eager"
        cells = [shape, f"{num(lim.get('read_gb_s'), '{:.0f}')} ({num(lim.get('peak_gb_s'), '{:.0f}')})",
                 pct(get(d, "pooled", "roofline_fraction")), pct(get(d, "train", "roofline_fraction")),
                 decode, num(get(d, "cot", "step_ms"), "{:.2f}"), pct(get(d, "cot", "roofline_fraction")),
                 num(get(d, "cot_batch1", "step_ms"), "{:.2f}"),
                 pct(get(d, "cot_batch1", "roofline_fraction"))]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(root):
    runs = load(root)
    if not runs:
        sys.exit(f"summarize.py: no bench_*.json or hf_*.json under {root}")
    print(header(runs))
    print()
    print(speed_table(runs))
    print()
    print(train_table(runs))
    print()
    print(roofline_table(runs))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/gpu/summarize.py DIR  (the JSON files of experiments/gpu/run.sh)")
    main(sys.argv[1])
