//! Helpers shared by the GPU test files (each `tests/*.rs` is its own crate; `mod common;`).
#![allow(dead_code)]

use host::model::ops;

/// ||a - b|| / ||b||, refusing non-finite values in `a` (the GPU side).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    assert!(a.iter().all(|v| v.is_finite()), "the GPU produced a non-finite value");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Largest logit minus the second largest.
pub fn top2_margin(v: &[f32]) -> f32 {
    let best = ops::argmax(v) as usize;
    let second = v.iter().enumerate().filter(|(i, _)| *i != best).map(|(_, &x)| x).fold(f32::NEG_INFINITY, f32::max);
    v[best] - second
}
