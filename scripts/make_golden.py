#!/usr/bin/env python3
"""Writes the golden fixtures the Rust CPU tests compare against (tests/tests/cpu_golden.rs).

Everything is produced by HF transformers / tokenizers, the implementations this project must
agree with:

  OUT/tiny-qwen3/            a tiny random Qwen3 checkpoint saved with save_pretrained (bf16,
                             safetensors, tied embeddings, head_dim * heads != hidden)
  OUT/tiny_logits.json       HF's teacher-forced logits (float32 model) at every position of a
                             fixed prompt, and a 16-token greedy continuation
  OUT/tokenizer_cases.json   ids of assorted texts under the real Qwen3 tokenizer
  OUT/chat_cases.json        apply_chat_template strings (thinking on/off, multi-turn, ...)

Needs python3 with torch, transformers, tokenizers and safetensors; no network. Run from the
repository root:

    python3 scripts/make_golden.py            # writes tests/fixtures/golden/

The real tokenizer is read from tests/fixtures/qwen3-tokenizer/ (gzip-compressed there), so it is
decompressed into a temporary folder first.
"""

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_FIXTURE = os.path.join(REPO, "tests", "fixtures", "qwen3-tokenizer")

# Fixed prompt for the logits golden: ids spread over the vocabulary, including 0 and 511.
PROMPT = [1, 17, 255, 3, 99, 511, 0, 42, 300, 7, 128, 64]
GREEDY_PROMPT = [5, 200, 33]
GREEDY_NEW = 16
SEED = 1234

TOKENIZER_TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界！这是一个测试。",
    "日本語のテキストと한국어 텍스트",
    "Emoji: 😀🎉👍🏽 family: 👨‍👩‍👧‍👦 flag: 🇯🇵",
    "   leading spaces, then\ttabs\t\tand\n\n\nnewlines   \n",
    "def f(x):\n    return x ** 2  # square\n\nprint([f(i) for i in range(10)])",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<think>\nreasoning\n</think>\n\nanswer<|endoftext|>",
    "Mixed: café naïve résumé — “quotes” 123,456.78 $€£ ∑∫√ <tag attr=\"v\">",
    "",
    "a",
    "    ",
    "1234567890 3.14159 1e-6 0xDEADBEEF",
]

CHAT_CASES = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}], "add_generation_prompt": True, "enable_thinking": None},
    {"messages": [{"role": "user", "content": "What is 2+2?"}], "add_generation_prompt": True, "enable_thinking": True},
    {"messages": [{"role": "user", "content": "What is 2+2?"}], "add_generation_prompt": True, "enable_thinking": False},
    {"messages": [{"role": "user", "content": "Hello"}], "add_generation_prompt": False, "enable_thinking": None},
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "<think>\nThe user wants a colour.\n</think>\n\nBlue."},
            {"role": "user", "content": "Another one, 请用中文。"},
        ],
        "add_generation_prompt": True,
        "enable_thinking": None,
    },
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! 😀"},
            {"role": "user", "content": "Bye"},
        ],
        "add_generation_prompt": True,
        "enable_thinking": False,
    },
    {
        "messages": [
            {"role": "user", "content": "Think first."},
            {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nDone."},
        ],
        "add_generation_prompt": False,
        "enable_thinking": None,
    },
]


def make_tiny_model(out_dir):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=40960,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
        attention_bias=False,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(SEED)
    model = Qwen3ForCausalLM(config).eval()
    # HF's init (std 0.02, norms exactly 1) would give near-flat logits on a 64-wide model and
    # leave the norm weights untested. These scales give distinct logits, non-trivial norms, and
    # a greedy continuation that does not just repeat one token (a large tied embedding would
    # make every position predict its own input).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "embed_tokens" in name:
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.25 * torch.randn_like(p))
    model = model.to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    # Drop files the Rust loader does not read and that may vary between versions.
    gen = os.path.join(out_dir, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)


def load_f32(model_dir):
    from transformers import Qwen3ForCausalLM

    try:
        model = Qwen3ForCausalLM.from_pretrained(model_dir, attn_implementation="eager")
    except TypeError:
        model = Qwen3ForCausalLM.from_pretrained(model_dir)
    # The bf16 weights upcast to f32: exactly what the Rust reference computes with.
    return model.float().eval()


def logits_golden(model):
    with torch.no_grad():
        ids = torch.tensor([PROMPT])
        logits = model(input_ids=ids).logits[0].float()
        # Greedy by hand (full recompute each step): no generation-config defaults in the way.
        seq = list(GREEDY_PROMPT)
        margins = []
        for _ in range(GREEDY_NEW):
            row = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
            top2 = torch.topk(row, 2).values
            margins.append(float(top2[0] - top2[1]))
            seq.append(int(torch.argmax(row)))
    return {
        "prompt": PROMPT,
        "logits": [[float(v) for v in row] for row in logits],
        "greedy_prompt": GREEDY_PROMPT,
        "greedy_tokens": seq[len(GREEDY_PROMPT):],
        "greedy_min_top2_margin": min(margins),
    }


def tokenizer_goldens(tok_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    raw = Tokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    auto = AutoTokenizer.from_pretrained(tok_dir)
    cases = []
    for text in TOKENIZER_TEXTS:
        ids = auto.encode(text, add_special_tokens=False)
        raw_ids = raw.encode(text, add_special_tokens=False).ids
        if ids != raw_ids:
            sys.exit(f"transformers and tokenizers disagree on {text!r}: {ids} vs {raw_ids}")
        cases.append({"text": text, "ids": ids, "decoded": auto.decode(ids, skip_special_tokens=False)})
    chats = []
    for case in CHAT_CASES:
        kwargs = {"tokenize": False, "add_generation_prompt": case["add_generation_prompt"]}
        if case["enable_thinking"] is not None:
            kwargs["enable_thinking"] = case["enable_thinking"]
        text = auto.apply_chat_template(case["messages"], **kwargs)
        chats.append(dict(case, text=text, ids=auto.encode(text, add_special_tokens=False)))
    return cases, chats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "tests", "fixtures", "golden"))
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    import transformers

    os.makedirs(args.out, exist_ok=True)
    model_dir = os.path.join(args.out, "tiny-qwen3")
    if os.path.isdir(model_dir):
        shutil.rmtree(model_dir)
    make_tiny_model(model_dir)
    golden = logits_golden(load_f32(model_dir))
    golden["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    with open(os.path.join(args.out, "tiny_logits.json"), "w") as f:
        json.dump(golden, f)
    print(f"greedy tokens {golden['greedy_tokens']}, smallest top-2 margin {golden['greedy_min_top2_margin']:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        with gzip.open(os.path.join(TOKENIZER_FIXTURE, "tokenizer.json.gz"), "rb") as src, open(
            os.path.join(tmp, "tokenizer.json"), "wb"
        ) as dst:
            shutil.copyfileobj(src, dst)
        shutil.copy(os.path.join(TOKENIZER_FIXTURE, "tokenizer_config.json"), tmp)
        cases, chats = tokenizer_goldens(tmp)
    with open(os.path.join(args.out, "tokenizer_cases.json"), "w") as f:
        json.dump(cases, f, ensure_ascii=False, indent=1)
    with open(os.path.join(args.out, "chat_cases.json"), "w") as f:
        json.dump(chats, f, ensure_ascii=False, indent=1)
    print(f"wrote {args.out}: {len(cases)} tokenizer cases, {len(chats)} chat cases")


if __name__ == "__main__":
    main()
