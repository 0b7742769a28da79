//! The CPU sampler: greedy, top-k, top-p, temperature, seeding, and the distribution it draws.

use host::backend::SamplingParams;
use host::model::ops::argmax;
use host::model::sampling::{filtered_distribution, Sampler};

fn params(temperature: f32, top_k: u32, top_p: f32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, top_k, top_p, seed }
}

/// Logits whose softmax is exactly `probs`.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|p| p.ln() as f32).collect()
}

#[test]
fn argmax_ties_go_to_the_lowest_index_and_nan_never_wins() {
    assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
    assert_eq!(argmax(&[f32::NAN, 0.5, f32::NAN, 0.5]), 1);
    assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    assert_eq!(argmax(&[-1.0, f32::INFINITY, f32::NAN]), 1);
    assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
}

#[test]
fn greedy_is_argmax() {
    let logits = vec![0.1, 2.0, 2.0, -1.0];
    let mut s = Sampler::new(SamplingParams::GREEDY);
    for _ in 0..5 {
        assert_eq!(s.sample(&logits), 1);
    }
}

#[test]
fn top_k_one_and_tiny_top_p_are_greedy() {
    let logits: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
    let best = argmax(&logits);
    for seed in 0..50 {
        assert_eq!(Sampler::new(params(1.0, 1, 1.0, seed)).sample(&logits), best);
        assert_eq!(Sampler::new(params(5.0, 0, 1e-6, seed)).sample(&logits), best);
    }
}

#[test]
fn same_seed_same_tokens_other_seed_other_tokens() {
    let logits = logits_of(&[0.1; 10]);
    let draw = |seed| {
        let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
        (0..64).map(|_| s.sample(&logits)).collect::<Vec<u32>>()
    };
    assert_eq!(draw(42), draw(42));
    assert_ne!(draw(42), draw(43));
}

#[test]
fn filters_keep_the_right_tokens() {
    let logits = logits_of(&[0.1, 0.4, 0.2, 0.3]);
    let d = filtered_distribution(&logits, &params(1.0, 2, 1.0, 0));
    assert_eq!(d.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 3]);
    assert!((d[0].1 - 4.0 / 7.0).abs() < 1e-6 && (d[1].1 - 3.0 / 7.0).abs() < 1e-6);
    // top-p 0.5: 0.4 alone is below, 0.4 + 0.3 reaches it.
    let d = filtered_distribution(&logits, &params(1.0, 0, 0.5, 0));
    assert_eq!(d.iter().map(|e| e.0).collect::<Vec<_>>(), vec![1, 3]);
    // top-p exactly at a cumulative boundary keeps that token and no more.
    let d = filtered_distribution(&logits_of(&[0.5, 0.25, 0.25]), &params(1.0, 0, 0.5, 0));
    assert_eq!(d.len(), 1);
    // Temperature 2 flattens: probabilities follow softmax(logits / 2).
    let d = filtered_distribution(&logits, &params(2.0, 0, 1.0, 0));
    let expect: Vec<f64> = [0.1f64, 0.4, 0.2, 0.3].iter().map(|p| p.sqrt()).collect();
    let total: f64 = expect.iter().sum();
    for (id, p) in d {
        assert!((p - expect[id as usize] / total).abs() < 1e-6);
    }
    // NaN logits are never candidates.
    let d = filtered_distribution(&[f32::NAN, 1.0, f32::NAN], &params(1.0, 0, 1.0, 0));
    assert_eq!(d, vec![(1, 1.0)]);
}

/// Pearson's chi-square of `counts` against `probs`.
fn chi_square(counts: &[u64], probs: &[f64]) -> f64 {
    let n: u64 = counts.iter().sum();
    counts.iter().zip(probs).map(|(&c, &p)| (c as f64 - n as f64 * p).powi(2) / (n as f64 * p)).sum()
}

#[test]
fn draws_follow_the_distribution() {
    let probs = [0.1, 0.2, 0.3, 0.4];
    let logits = logits_of(&probs);
    let mut s = Sampler::new(params(1.0, 0, 1.0, 7));
    let mut counts = [0u64; 4];
    for _ in 0..40_000 {
        counts[s.sample(&logits) as usize] += 1;
    }
    // 3 degrees of freedom: P(chi2 > 16.27) = 0.001 for a correct sampler.
    let x = chi_square(&counts, &probs);
    assert!(x < 16.27, "chi-square {x} for counts {counts:?}");

    // With top-k 2 only ids 3 and 2 appear, in ratio 4:3.
    let mut s = Sampler::new(params(1.0, 2, 1.0, 9));
    let mut counts = [0u64; 4];
    for _ in 0..20_000 {
        counts[s.sample(&logits) as usize] += 1;
    }
    assert_eq!(counts[0] + counts[1], 0);
    let x = chi_square(&counts[2..], &[3.0 / 7.0, 4.0 / 7.0]);
    assert!(x < 10.83, "chi-square {x} for counts {counts:?}");
}
