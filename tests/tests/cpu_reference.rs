//! The CPU reference decoder on a tiny synthetic model: determinism, consistency between
//! generate / score / logits, and clear errors for bad requests.

use host::backend::{Backend, SamplingParams, StopReason};
use host::model::checkpoint;
use host::model::ops;
use host::model::reference::CpuReference;
use host::model::synth::{write_checkpoint, SynthSpec};
use host::model::Weights;
use std::sync::Arc;

fn tiny_weights(seed: u64) -> Arc<Weights> {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SynthSpec::tiny(seed)).unwrap();
    Arc::new(checkpoint::load(dir.path(), false).unwrap())
}

const PROMPT: [u32; 6] = [3, 141, 59, 265, 358, 97];

#[test]
fn forward_is_deterministic_and_finite() {
    let w = tiny_weights(1);
    let run = || {
        let mut r = CpuReference::new(Arc::clone(&w), 64);
        PROMPT.iter().enumerate().map(|(p, &t)| r.forward(t, p)).collect::<Vec<_>>()
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert!(a.iter().flatten().all(|v| v.is_finite()));
    assert_eq!(a[0].len(), 512);
    // Logits depend on the context, not just the token.
    let mut r = CpuReference::new(Arc::clone(&w), 64);
    let first = r.forward(PROMPT[5], 0);
    assert_ne!(first, a[5]);
}

#[test]
fn logits_rows_match_incremental_forward() {
    let w = tiny_weights(2);
    let mut r = CpuReference::new(Arc::clone(&w), 64);
    let rows = r.logits(&PROMPT, &[0, 3, 5]).unwrap();
    let mut inc = CpuReference::new(w, 64);
    let all: Vec<Vec<f32>> = PROMPT.iter().enumerate().map(|(p, &t)| inc.forward(t, p)).collect();
    assert_eq!(rows, vec![all[0].clone(), all[3].clone(), all[5].clone()]);
}

#[test]
fn score_is_negative_log_softmax_of_logits() {
    let w = tiny_weights(3);
    let mut r = CpuReference::new(w, 64);
    let nll = r.score(&PROMPT).unwrap();
    let positions: Vec<usize> = (0..PROMPT.len() - 1).collect();
    let rows = r.logits(&PROMPT, &positions).unwrap();
    assert_eq!(nll.len(), PROMPT.len() - 1);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(nll[i], -ops::log_softmax_at(row, PROMPT[i + 1] as usize));
        assert!(nll[i] > 0.0);
    }
}

#[test]
fn greedy_generate_is_argmax_of_forward() {
    let w = tiny_weights(4);
    let mut r = CpuReference::new(Arc::clone(&w), 64);
    let mut streamed = Vec::new();
    let out = r
        .generate(&PROMPT, 10, &SamplingParams::GREEDY, &[], &mut |t| {
            streamed.push(t);
            true
        })
        .unwrap();
    assert_eq!(out, streamed);
    assert_eq!(out.len(), 10);
    let mut m = CpuReference::new(w, 64);
    let mut logits = Vec::new();
    for (p, &t) in PROMPT.iter().enumerate() {
        logits = m.forward(t, p);
    }
    let mut manual = Vec::new();
    for i in 0..10 {
        let next = ops::argmax(&logits);
        manual.push(next);
        if i < 9 {
            logits = m.forward(next, PROMPT.len() + i);
        }
    }
    assert_eq!(out, manual);
}

#[test]
fn sampling_is_seeded_and_stops_where_asked() {
    let w = tiny_weights(5);
    let mut r = CpuReference::new(w, 64);
    let p = SamplingParams { temperature: 1.0, top_k: 50, top_p: 0.9, seed: 11 };
    let a = r.generate(&PROMPT, 12, &p, &[], &mut |_| true).unwrap();
    let b = r.generate(&PROMPT, 12, &p, &[], &mut |_| true).unwrap();
    assert_eq!(a, b, "same seed, same tokens (and each call starts afresh)");
    // An eos token stops generation and is included.
    let eos = a[3];
    let first = a.iter().position(|&t| t == eos).unwrap();
    let c = r.generate(&PROMPT, 12, &p, &[eos], &mut |_| true).unwrap();
    assert_eq!(c, a[..=first].to_vec());
    // on_token returning false stops after that token.
    let mut seen = 0;
    let d = r
        .generate(&PROMPT, 12, &p, &[], &mut |_| {
            seen += 1;
            seen < 2
        })
        .unwrap();
    assert_eq!(d, a[..2].to_vec());
    // Each way of stopping is reported as such.
    let stop = |r: &mut CpuReference, eos: &[u32], cancel_after: usize| {
        let mut seen = 0;
        r.decode(&PROMPT, 12, &p, eos, &mut |_| {
            seen += 1;
            seen < cancel_after
        })
        .unwrap()
        .stop
    };
    assert_eq!(stop(&mut r, &[], usize::MAX), StopReason::MaxNewTokens);
    assert_eq!(stop(&mut r, &[eos], usize::MAX), StopReason::Eos);
    assert_eq!(stop(&mut r, &[], 2), StopReason::Cancelled);
    assert_eq!(stop(&mut r, &[a[1]], 2), StopReason::Eos, "an end token stops as such even when cancelled too");
    assert!(r.generate(&PROMPT, 0, &p, &[], &mut |_| true).unwrap().is_empty());
}

#[test]
fn bf16_kv_rounding_changes_little() {
    let w = tiny_weights(6);
    let mut exact = CpuReference::new(Arc::clone(&w), 64);
    let mut rounded = CpuReference::new(w, 64).with_bf16_kv(true);
    let a = exact.logits(&PROMPT, &[5]).unwrap().remove(0);
    let b = rounded.logits(&PROMPT, &[5]).unwrap().remove(0);
    assert_ne!(a, b, "rounding the cache must change something");
    let max_diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(max_diff < 0.05, "bf16 KV moved a logit by {max_diff}");
}

#[test]
fn bad_requests_are_errors_not_panics() {
    let w = tiny_weights(7);
    let mut r = CpuReference::new(w, 8);
    let g = SamplingParams::GREEDY;
    let msg = |e: anyhow::Error| format!("{e:#}");
    assert!(msg(r.generate(&[], 1, &g, &[], &mut |_| true).unwrap_err()).contains("empty"));
    let e = msg(r.generate(&[1, 512], 1, &g, &[], &mut |_| true).unwrap_err());
    assert!(e.contains("512") && e.contains("vocabulary"), "{e}");
    let e = msg(r.generate(&[1, 2, 3], 6, &g, &[], &mut |_| true).unwrap_err());
    assert!(e.contains("maximum context of 8"), "{e}");
    assert!(r.generate(&[1, 2, 3], 5, &g, &[], &mut |_| true).is_ok(), "exactly full context is fine");
    assert!(msg(r.score(&[1; 9]).unwrap_err()).contains("maximum context"));
    assert!(msg(r.logits(&[1, 2], &[2]).unwrap_err()).contains("beyond"));
    assert!(msg(r.logits(&[1, 2], &[1, 0]).unwrap_err()).contains("ascending"));
    r.reset();
    assert!(r.try_forward(1, 3).is_err(), "positions must be sequential");
    assert!(r.try_forward(600, 0).is_err());
}
