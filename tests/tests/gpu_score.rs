//! Scoring through prefill (`perplexity` on the GPU, host/src/engine/score.rs): the NLL kernel
//! against its CPU twin, and the engine's per-token NLL of a text against
//!
//! - the CPU twin of the whole path (host::model::score::score_through_prefill), whose bf16
//!   roundings are the GPU's: what is left is summation order and approximate exp/rsqrt;
//! - the CPU reference's `score` (activations in f32, bf16 KV cache): the twin alone is
//!   2.9e-3 (tiny) and 2.5e-2 (full size) from it per token, 1.4e-4 and 1.8e-3 in the mean
//!   (tests/tests/cpu_score.rs);
//! - the megakernel's score (one position per step, `prefill_chunk` 0), which is within the
//!   decode kernel's tolerance of the reference.
//!
//! Each as the largest per-token |difference| and the difference of the mean NLLs (what
//! `perplexity` reports), with tolerances of about four times the twin's measured distance
//! per token and five times in the mean; the printed figures are the ones to tighten them by.
//! Texts of 37 tokens in chunks of 16 have a tail chunk (16 + 16 + 4); chunks over SCORE_ROWS
//! (256) rows split the LM head's GEMM (256 + 43, and 256 + 44 in two chunks of 300).
//!
//! `QWEN3_FULL_CHECKPOINT=DIR` runs the full-size tests on that checkpoint instead of random
//! weights (a `host synth` one, or the real Qwen3-0.6B).

mod common;
use common::{download, dptr, finish, full_weights, tiny_weights, Rng, TINY_PREFILL_CASES};
use host::model::synth::random_ids;

use host::backend::Backend;
use host::engine::{GpuEngine, SCORE_ROWS};
use host::gpu::{prefill, Gpu};
use host::model::reference::CpuReference;
use host::model::score::{nll_rows, score_through_prefill};
use host::model::Weights;
use std::sync::Arc;

/// Rows of logits of one vocabulary size, each with its target, to score on the GPU.
struct Rows {
    vocab: usize,
    logits: Vec<f32>,
    targets: Vec<u32>,
    /// What each row is, for the failure message.
    names: Vec<String>,
}

impl Rows {
    fn new(vocab: usize) -> Rows {
        Rows { vocab, logits: Vec::new(), targets: Vec::new(), names: Vec::new() }
    }
    fn push(&mut self, name: &str, row: Vec<f32>, target: usize) {
        assert_eq!(row.len(), self.vocab);
        self.logits.extend(row);
        self.targets.push(target as u32);
        self.names.push(name.to_string());
    }
}

/// Rows of `vocab` logits: ordinary ones, one whose target holds the largest logit, and rows
/// whose plain exp() would overflow f32 (near 1e4 and near 1e30, spread; all near 3e38).
fn test_rows(vocab: usize, rng: &mut Rng) -> Rows {
    let mut rows = Rows::new(vocab);
    let mut random = |scale: f32, offset: f32| -> Vec<f32> {
        (0..vocab).map(|_| offset + scale * rng.uniform(-1.0, 1.0)).collect::<Vec<f32>>()
    };
    let target = |i: usize| (i * 7919 + 3) % vocab;
    rows.push("random, scale 4", random(4.0, 0.0), target(0));
    rows.push("random, scale 20", random(20.0, -5.0), target(1));
    let mut peaked = random(4.0, 0.0);
    let best = target(2);
    peaked[best] = 30.0;
    rows.push("the target holds the largest logit", peaked, best);
    if vocab > 1 {
        let mut tied = random(4.0, 0.0);
        let (best, other) = (target(3), (target(3) + 1) % vocab);
        tied[best] = 10.0;
        tied[other] = 10.0;
        rows.push("the target ties with another for the largest logit", tied, best);
    }
    rows.push("huge: 1e4 + 20 x noise", random(20.0, 1e4), target(4));
    rows.push("huge: 1e30 x noise", random(1e30, 0.0), target(5));
    rows.push("near f32::MAX, all equal", vec![3e38; vocab], target(6));
    rows.push("the last index is the target", random(4.0, 0.0), vocab - 1);
    rows
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn prefill_nll_matches_cpu() {
    let gpu = Gpu::new(0).expect("these tests need a CUDA GPU");
    let mut rng = Rng(501);
    // Qwen3's vocabulary (1187 batches of 128 per thread), a small one (one logit per thread
    // at most), one not a multiple of the block (tails), and the degenerate vocabulary of one.
    for vocab in [151936usize, 512, 100, 1] {
        let rows = test_rows(vocab, &mut rng);
        let n = rows.targets.len();
        let want = nll_rows(&rows.logits, vocab, &rows.targets);
        let dl = gpu.upload(&rows.logits, "logits").unwrap();
        let dt = gpu.upload(&rows.targets, "targets").unwrap();
        let out = gpu.upload(&vec![f32::NAN; n], "nll").unwrap();
        unsafe { prefill::nll(&gpu, dptr(&dl), dptr(&dt), n, vocab, dptr(&out)) }.unwrap();
        finish(&gpu, "prefill_nll");
        let got = download(&out);
        for r in 0..n {
            let row = &rows.logits[r * vocab..(r + 1) * vocab];
            let max_abs = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            // f32 arithmetic on values of this size, plus ex2/lg2.approx on the sum.
            let tol = 1e-4 + 8.0 * f32::EPSILON * max_abs;
            let (g, w) = (got[r], want[r]);
            eprintln!("vocab {vocab}, {}: gpu {g}, cpu {w}", rows.names[r]);
            assert!(
                g.is_finite() && (g - w).abs() <= tol,
                "vocab {vocab}, {}: gpu {g}, cpu {w} (tolerance {tol})",
                rows.names[r]
            );
        }
    }
    // Empty matrices are refused before any launch.
    let e = unsafe { prefill::nll(&gpu, 0, 0, 0, 512, 0) }.unwrap_err();
    assert!(format!("{e:#}").contains("empty"), "{e:#}");
    let e = unsafe { prefill::nll(&gpu, 0, 0, 4, 0, 0) }.unwrap_err();
    assert!(format!("{e:#}").contains("empty"), "{e:#}");
}

/// Largest per-token |difference| and |difference of the means| allowed against one yardstick.
#[derive(Clone, Copy)]
struct Tol {
    per_token: f32,
    mean: f64,
}

/// Against the CPU twin of the path, the CPU reference and the megakernel.
#[derive(Clone, Copy)]
struct Tolerance {
    twin: Tol,
    reference: Tol,
    megakernel: Tol,
}

const TINY_TOL: Tolerance = Tolerance {
    twin: Tol { per_token: 1e-2, mean: 2e-3 },
    reference: Tol { per_token: 2e-2, mean: 5e-3 },
    megakernel: Tol { per_token: 2e-2, mean: 5e-3 },
};
const FULL_TOL: Tolerance = Tolerance {
    twin: Tol { per_token: 5e-2, mean: 1e-2 },
    reference: Tol { per_token: 1.5e-1, mean: 2e-2 },
    megakernel: Tol { per_token: 1.5e-1, mean: 2e-2 },
};

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64
}

fn check(what: &str, got: &[f32], want: &[f32], tol: Tol) {
    assert_eq!(got.len(), want.len(), "{what}: {} NLLs, want {}", got.len(), want.len());
    assert!(got.iter().all(|v| v.is_finite()), "{what}: a non-finite NLL from the GPU");
    let (worst, max_diff) =
        got.iter().zip(want).map(|(a, b)| (a - b).abs()).enumerate().fold((0, 0.0f32), |m, (i, d)| {
            if d > m.1 {
                (i, d)
            } else {
                m
            }
        });
    let mean_diff = (mean(got) - mean(want)).abs();
    eprintln!(
        "{what}: largest per-token difference {max_diff:.2e} (token {}; tolerance {:.0e}), mean NLL {:.5} vs {:.5} \
         (difference {mean_diff:.2e}, tolerance {:.0e})",
        worst + 1,
        tol.per_token,
        mean(got),
        mean(want),
        tol.mean
    );
    assert!(max_diff <= tol.per_token, "{what}: token {}'s NLL off by {max_diff}", worst + 1);
    assert!(mean_diff <= tol.mean, "{what}: mean NLL off by {mean_diff}");
}

/// A text of `n` tokens scored through prefill in chunks of `chunk` against the three
/// yardsticks, through `score_prefill` and through `Backend::score` with `prefill_chunk` set.
fn compare_score(w: &Arc<Weights>, n: usize, chunk: usize, max_ctx: usize, tol: Tolerance) {
    let tokens = random_ids(n, w.config.vocab_size, 13);
    let what = |vs: &str| format!("n={n} chunk={chunk}: vs {vs}");
    let mut gpu = GpuEngine::new(w, max_ctx).unwrap();
    let got = gpu.score_prefill(&tokens, chunk).unwrap();
    assert_eq!(got.len(), n - 1);

    check(&what("the CPU twin"), &got, &score_through_prefill(w, &tokens, chunk, max_ctx), tol.twin);
    let reference = CpuReference::new(w.clone(), max_ctx).with_bf16_kv(true).score(&tokens).unwrap();
    check(&what("the CPU reference"), &got, &reference, tol.reference);
    // The megakernel's score on the same engine (its cache refilled one position per step).
    let per_step = gpu.score(&tokens).unwrap();
    check(&what("the megakernel's score"), &got, &per_step, tol.megakernel);

    // `perplexity` goes through Backend::score: with prefill_chunk set, the same launches.
    gpu.prefill_chunk = chunk;
    assert_eq!(gpu.score(&tokens).unwrap(), got, "{}: Backend::score differs from score_prefill", what("itself"));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn tiny_model_score_through_prefill_matches_cpu_and_megakernel() {
    let w = tiny_weights(51);
    for (n, chunk, ctx) in TINY_PREFILL_CASES {
        compare_score(&w, n, chunk, ctx, TINY_TOL);
    }
    assert_eq!(SCORE_ROWS, 256, "the cases below split the LM head at 256 rows");
    compare_score(&w, 300, 512, 320, TINY_TOL); // one chunk of 299: LM head 256 + 43
    compare_score(&w, 600, 300, 640, TINY_TOL); // chunks 300 + 299: 256 + 44, 256 + 43
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn full_size_score_through_prefill_matches_cpu_and_megakernel() {
    let w = full_weights();
    compare_score(&w, 77, 32, 128, FULL_TOL); // chunks 32 + 32 + 12
    compare_score(&w, 300, 512, 320, FULL_TOL); // one chunk of 299: LM head 256 + 43
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn score_prefill_refuses_bad_requests() {
    let w = tiny_weights(52);
    let mut gpu = GpuEngine::new(&w, 64).unwrap();
    let vocab = w.config.vocab_size as u32;
    let cases: [(&[u32], usize, &str); 3] = [
        (&[1, vocab, 3], 16, "outside the vocabulary"),
        (&[1, 2, 3], 0, "at least 1 position"),
        (&[1; 65], 16, "--max-context"),
    ];
    for (tokens, chunk, why) in cases {
        let e = gpu.score_prefill(tokens, chunk).unwrap_err();
        assert!(format!("{e:#}").contains(why), "score_prefill(chunk {chunk}): {e:#} (wanted `{why}`)");
    }
    assert!(gpu.score_prefill(&[5], 16).unwrap().is_empty(), "one token scores nothing");
    // The engine still works after refusals.
    assert_eq!(gpu.score_prefill(&[1, 2, 3], 16).unwrap().len(), 2);
}
