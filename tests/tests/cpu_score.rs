//! The CPU twins of scoring through prefill (host::model::score): the NLL of a row of logits
//! (the twin of the `prefill_nll` kernel) on rows whose answer is known, huge logits included,
//! and the twin of the whole path, whose per-token NLL must stay close to the CPU reference's
//! `score` (which keeps activations in f32 and runs its LM head on f32 rows). That distance is
//! the yardstick for the GPU's perplexity through prefill (tests/tests/gpu_score.rs).

mod common;
use common::weights;
use host::model::synth::random_ids;

use host::backend::Backend;
use host::model::reference::CpuReference;
use host::model::score::{nll_rows, score_through_prefill};
use host::model::synth::SynthSpec;
use host::model::Weights;
use std::sync::Arc;

#[test]
fn nll_twin_matches_rows_with_known_answers() {
    let (ln2, ln3) = (2f32.ln(), 3f32.ln());
    // exp: 1, 2, 3 sum to 6, so the NLL of index i is ln 6 - logit i.
    let row = [0.0, ln2, ln3];
    let got = nll_rows(&[row, row, row].concat(), 3, &[0, 1, 2]);
    for (i, (g, want)) in got.iter().zip([6f32.ln(), 3f32.ln(), ln2]).enumerate() {
        assert!((g - want).abs() < 1e-6, "row {i}: {g}, want {want}");
    }
    // Equal logits: ln(vocab) whatever they are (exp(1e4) overflows f32; a stable log-sum-exp
    // never forms it). Near f32::MAX, ln(vocab) is far below the logits' spacing, so the
    // log-sum-exp rounds to the logit itself: 0, and never inf or NaN.
    for v in [0.0f32, -50.0, 1e4, 1e6] {
        let got = nll_rows(&vec![v; 151936], 151936, &[77])[0];
        assert!((got - 151936f32.ln()).abs() < 1e-4, "logits all {v}: {got}");
    }
    let got = nll_rows(&vec![3e38f32; 151936], 151936, &[77])[0];
    assert!(got == 0.0, "logits all 3e38: {got}");
    // The target holds the one largest logit, far above the rest: its NLL is about 0, never
    // negative.
    let mut row = vec![-3.0f32; 512];
    row[100] = 40.0;
    let got = nll_rows(&row, 512, &[100])[0];
    assert!((0.0..1e-12).contains(&got), "dominant target: {got}");
    // Huge and spread: the rest are e^-1e4 below the largest, so the NLL is the gap.
    let row = [1e4f32, 2e4, 0.0];
    let got = nll_rows(&row, 3, &[0])[0];
    assert_eq!(got, 1e4, "huge logits: {got}");
}

#[test]
#[should_panic(expected = "outside the vocabulary")]
fn nll_twin_refuses_a_target_outside_the_vocabulary() {
    nll_rows(&[0.0; 8], 8, &[8]);
}

/// Per-token NLL of the twin of scoring through prefill against the CPU reference (bf16 KV
/// cache, as the GPU's): (largest |difference|, |difference of the means|).
fn score_twin_error(w: &Arc<Weights>, n: usize, chunk: usize, max_ctx: usize) -> (f32, f64) {
    let tokens = random_ids(n, w.config.vocab_size, 12);
    let want = CpuReference::new(w.clone(), max_ctx).with_bf16_kv(true).score(&tokens).unwrap();
    let got = score_through_prefill(w, &tokens, chunk, max_ctx);
    assert_eq!(got.len(), n - 1);
    assert!(got.iter().all(|v| v.is_finite() && *v >= 0.0), "a non-finite or negative NLL: {got:?}");
    let max_diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
    let mean_diff = (mean(&got) - mean(&want)).abs();
    eprintln!(
        "score through the prefill twin, {n} tokens in chunks of {chunk}: largest per-token NLL difference \
         {max_diff:.2e}, mean NLL {:.5} vs the reference's {:.5} (difference {mean_diff:.2e})",
        mean(&got),
        mean(&want)
    );
    (max_diff, mean_diff)
}

#[test]
fn score_twin_stays_close_to_the_reference_tiny() {
    let w = weights(&SynthSpec::tiny(33), "tiny33");
    let (max_diff, mean_diff) = score_twin_error(&w, 37, 16, 64);
    assert!(max_diff < 1e-2, "per-token NLL off by {max_diff}"); // measured: 2.9e-3
    assert!(mean_diff < 1e-3, "mean NLL off by {mean_diff}"); // measured: 1.4e-4
                                                              // Rows are independent: the chunk size changes nothing.
    let tokens = random_ids(37, w.config.vocab_size, 12);
    let whole = score_through_prefill(&w, &tokens, 64, 64);
    for chunk in [1, 16, 36] {
        assert_eq!(score_through_prefill(&w, &tokens, chunk, 64), whole, "chunk {chunk}");
    }
    assert!(score_through_prefill(&w, &tokens[..1], 16, 64).is_empty(), "one token scores nothing");
}

/// The same at full size (28 layers and the 151936-row LM head at every position: about ten
/// seconds on two CPU cores).
#[test]
#[ignore = "slow on a CPU: the full-size model"]
fn score_twin_stays_close_to_the_reference_full_size() {
    let w = weights(&SynthSpec::qwen3_0_6b(7), "full7");
    let (max_diff, mean_diff) = score_twin_error(&w, 37, 16, 64);
    assert!(max_diff < 6e-2, "per-token NLL off by {max_diff}"); // measured: 2.45e-2
    assert!(mean_diff < 6e-3, "mean NLL off by {mean_diff}"); // measured: 1.8e-3 (means 13.79)
}
