#!/usr/bin/env python3
"""Teacher-forced logits from HF transformers' Qwen3ForCausalLM on a checkpoint folder (e.g. one
written by `host synth`), for tests/tests/gpu_hf.rs to compare our CPU reference and the GPU
megakernel against. Runs where torch and transformers are installed (the GPU machine); the
model runs in float32 (weights loaded from bf16), on the GPU when there is one.

    python3 scripts/hf_logits.py --model DIR --ids 1,2,3 --positions 0,2 --out hf.json
"""
import argparse
import json

import torch
import transformers
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--ids", required=True, help="comma-separated token ids")
    ap.add_argument("--positions", required=True, help="comma-separated positions to keep")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    ids = [int(x) for x in args.ids.split(",")]
    positions = [int(x) for x in args.positions.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits[0].float().cpu()
    json.dump(
        {
            "model_class": type(model).__name__,
            "ids": ids,
            "positions": positions,
            "logits": [logits[p].tolist() for p in positions],
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        },
        open(args.out, "w"),
    )
    print(f"{type(model).__name__} on {device}: wrote logits at {len(positions)} positions to {args.out}")


if __name__ == "__main__":
    main()
