//! The CPU reference, tokenizer and chat template against HF transformers' own outputs, stored in
//! tests/fixtures/golden by scripts/make_golden.py.

use host::backend::{Backend, SamplingParams};
use host::model::checkpoint;
use host::model::reference::CpuReference;
use host::model::tokenizer::{ChatMessage, Tokenizer};
use serde_json::Value;
use std::path::PathBuf;
use std::sync::Arc;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn golden(name: &str) -> Value {
    let path = fixtures().join("golden").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}; generate it with `python3 scripts/make_golden.py`", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn reference() -> CpuReference {
    let weights = checkpoint::load(&fixtures().join("golden/tiny-qwen3"), false).unwrap();
    CpuReference::new(Arc::new(weights), 64)
}

/// Both sides compute in f32 over the same bf16 weights, so only summation order differs (the
/// largest error seen is ~1.2e-6 of the row's max |logit|; the bound leaves 16x headroom):
/// |ours - hf| <= 2e-5 * max|hf row| + 1e-5 per logit.
const REL_TOL: f32 = 2e-5;
const ABS_TOL: f32 = 1e-5;

#[test]
fn teacher_forced_logits_match_hf() {
    let g = golden("tiny_logits.json");
    let prompt = ids(&g["prompt"]);
    let want: Vec<Vec<f32>> = g["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect())
        .collect();
    let positions: Vec<usize> = (0..prompt.len()).collect();
    let got = reference().logits(&prompt, &positions).unwrap();
    assert_eq!(got.len(), want.len());
    let mut worst = 0.0f32;
    for (pos, (g_row, w_row)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g_row.len(), w_row.len());
        let scale = w_row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in g_row.iter().zip(w_row).enumerate() {
            let err = (a - b).abs();
            worst = worst.max(err / scale);
            assert!(err <= REL_TOL * scale + ABS_TOL, "position {pos} logit {i}: ours {a}, HF {b}");
        }
    }
    eprintln!("largest logit error relative to the row's max |logit|: {worst:e}");
}

#[test]
fn greedy_continuation_matches_hf() {
    let g = golden("tiny_logits.json");
    let prompt = ids(&g["greedy_prompt"]);
    let want = ids(&g["greedy_tokens"]);
    let got = reference().generate(&prompt, want.len(), &SamplingParams::GREEDY, &[], &mut |_| true).unwrap();
    assert_eq!(got, want);
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&fixtures().join("qwen3-tokenizer")).unwrap()
}

#[test]
fn token_ids_match_hf() {
    let t = tokenizer();
    let cases = golden("tokenizer_cases.json");
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(t.encode(text).unwrap(), ids(&case["ids"]), "ids of {text:?}");
        assert_eq!(t.decode(&ids(&case["ids"])).unwrap(), case["decoded"].as_str().unwrap(), "decode of {text:?}");
    }
}

#[test]
fn chat_template_matches_hf() {
    let t = tokenizer();
    let cases = golden("chat_cases.json");
    for case in cases.as_array().unwrap() {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        // Not passing enable_thinking (null) behaves like true in Qwen3's template.
        let thinking = case["enable_thinking"].as_bool().unwrap_or(true);
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let text = t.apply_chat_template(&messages, add, thinking).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "case {case}");
        assert_eq!(t.encode(&text).unwrap(), ids(&case["ids"]), "ids of case {case}");
    }
}
