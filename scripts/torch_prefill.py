#!/usr/bin/env python3
"""The PyTorch yardstick for `host bench --prefill`: HF transformers' Qwen3 prefill on the same
GPU. Loads a checkpoint folder (no network: a local folder, e.g. the HF cache's snapshot or a
`host synth` one) in bf16 on CUDA with SDPA attention, and for each prompt length L times one
forward of L random token ids with `use_cache=True` (the KV cache filled as a prefill does)
and the logits of the last position only (the first new token's, as `decode`'s time to first
token includes them). Also times a torch bf16 matmul at 4096^3 and 8192^3: the matrix rate
torch reaches on this card, beside `bench --prefill`'s probe of our own GEMM.

Figures are medians of --reps timed runs after two warm-up runs, CUDA-synchronised wall time.
TFLOP/s count what `bench --prefill` counts (2 m n k per layer GEMM, 4 head_dim per causal
(query, key) pair and q head), for the L positions torch runs through its layers, plus the
one-row LM head.

    python3 scripts/torch_prefill.py --model DIR [--lengths 128,1024,4096] [--reps 5] [--json]
"""
import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM


def load(model_dir):
    kwargs = dict(attn_implementation="sdpa", local_files_only=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **kwargs)
    except TypeError:  # transformers before `dtype` replaced `torch_dtype`
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.bfloat16, **kwargs)
    return model.to("cuda").eval()


def timed(fn, reps, warmup=2):
    """Median seconds of `reps` runs of fn() after `warmup` runs, each CUDA-synchronised."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_tflops(n, reps):
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    per_run = 3  # back-to-back products per timed run, as our GEMM probe launches three
    s = timed(lambda: [a @ b for _ in range(per_run)], reps)
    return 2 * n**3 * per_run / s / 1e12


def prefill_flops(c, m):
    """What host bench --prefill counts for m positions, plus the last position's LM head."""
    h, i = c.hidden_size, c.intermediate_size
    d = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
    gemm = 2 * m * ((q + 2 * kv) * h + h * q + 2 * i * h + h * i)
    attention = 4 * d * c.num_attention_heads * m * (m + 1) / 2
    return c.num_hidden_layers * (gemm + attention) + 2 * c.vocab_size * h


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors)")
    ap.add_argument("--lengths", default="128,1024,4096", help="comma-separated prompt lengths")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    if not lengths or min(lengths) < 1 or args.reps < 1:
        ap.error("--lengths needs positive lengths and --reps at least 1")
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible to torch")

    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    model = load(args.model)
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    matmul = {n: matmul_tflops(n, args.reps) for n in (4096, 8192)}

    rows = []
    for n in lengths:
        ids = torch.randint(0, config.vocab_size, (1, n), generator=gen).to("cuda")

        def forward():
            with torch.inference_mode():
                try:
                    out = model(ids, use_cache=True, logits_to_keep=1)
                except TypeError:  # older transformers: every position's logits
                    out = model(ids, use_cache=True)
                return out.logits[0, -1].argmax()

        s = timed(forward, args.reps)
        tflops = prefill_flops(config, n) / s / 1e12
        rows.append(
            {
                "prompt_tokens": n,
                "forward_ms": s * 1e3,
                "prompt_tokens_per_s": n / s,
                "tflops": tflops,
                "percent_of_matmul_4096": 100 * tflops / matmul[4096],
            }
        )

    report = {
        "device": torch.cuda.get_device_name(),
        "model_class": type(model).__name__,
        "attention": "sdpa",
        "dtype": "bfloat16",
        "reps": args.reps,
        "matmul_tflops": {str(k): v for k, v in matmul.items()},
        "rows": rows,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"## torch prefill: {report['device']}, {report['model_class']} bf16 + sdpa, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; median of {args.reps} after 2 warm-ups\n"
    )
    print(f"torch bf16 matmul: {matmul[4096]:.1f} TFLOP/s at 4096^3, {matmul[8192]:.1f} TFLOP/s at 8192^3\n")
    print("| prompt tokens | forward ms | prompt tok/s | TFLOP/s | % of matmul 4096^3 |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['prompt_tokens']} | {r['forward_ms']:.2f} | {r['prompt_tokens_per_s']:.0f} | {r['tflops']:.1f} | "
            f"{r['percent_of_matmul_4096']:.1f}% |"
        )


if __name__ == "__main__":
    main()
