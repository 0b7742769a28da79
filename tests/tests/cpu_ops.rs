//! The CPU ops against straightforward f64 versions written from the formulas.

use half::bf16;
use host::model::ops;

/// Deterministic values in about [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn weights(n: usize, seed: u64, scale: f32, offset: f32) -> Vec<bf16> {
    values(n, seed).into_iter().map(|v| bf16::from_f32(offset + scale * v)).collect()
}

fn close(a: f32, b: f64, rel: f64, abs: f64) -> bool {
    ((a as f64) - b).abs() <= abs + rel * b.abs()
}

#[test]
fn rms_norm_matches_f64() {
    let x = values(1024, 1);
    let w = weights(1024, 2, 0.1, 1.0);
    let y = ops::rms_norm(&x, &w, 1e-6);
    let ms = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + 1e-6).sqrt();
    for i in 0..x.len() {
        let want = x[i] as f64 * inv * w[i].to_f32() as f64;
        assert!(close(y[i], want, 1e-5, 1e-6), "{i}: {} vs {want}", y[i]);
    }
}

fn gemv_f64(w: &[bf16], rows: usize, cols: usize, x: &[f32]) -> Vec<f64> {
    (0..rows).map(|r| (0..cols).map(|c| w[r * cols + c].to_f32() as f64 * x[c] as f64).sum()).collect()
}

#[test]
fn gemv_matches_f64_small_large_and_ragged() {
    // Small (single-threaded), large (parallel), and widths that are not a multiple of 16.
    for (rows, cols) in [(7, 37), (64, 64), (3000, 1024), (1024, 3072), (130, 1001)] {
        let w = weights(rows * cols, rows as u64, 0.05, 0.0);
        let x = values(cols, cols as u64);
        let y = ops::gemv(&w, rows, cols, &x);
        let want = gemv_f64(&w, rows, cols, &x);
        // f32 accumulation over up to 3072 terms of size ~0.05.
        let tol = 1e-6 * cols as f64;
        for r in 0..rows {
            assert!(close(y[r], want[r], 1e-5, tol), "{rows}x{cols} row {r}: {} vs {}", y[r], want[r]);
        }
    }
}

#[test]
fn rope_table_follows_hf() {
    let (theta, d, n) = (1_000_000.0f64, 128usize, 4096usize);
    let (cos, sin) = ops::rope_table(theta, d, n);
    assert_eq!(cos.len(), n * d / 2);
    assert!(cos[..d / 2].iter().all(|&c| c == 1.0) && sin[..d / 2].iter().all(|&s| s == 0.0));
    for pos in [1usize, 2, 100, 4095] {
        for i in [0usize, 1, 31, 63] {
            let angle = pos as f64 / theta.powf(2.0 * i as f64 / d as f64);
            // The table's angle is an f32 product, off by up to an f32 ulp of the angle.
            let tol = angle * 2.0 * f32::EPSILON as f64 + 1e-7;
            assert!(close(cos[pos * 64 + i], angle.cos(), 0.0, tol), "cos pos {pos} i {i}");
            assert!(close(sin[pos * 64 + i], angle.sin(), 0.0, tol), "sin pos {pos} i {i}");
        }
    }
    // Frequency 0 rotates one radian per position.
    assert_eq!(sin[64], (1.0f64).sin() as f32);
}

#[test]
fn head_norm_rope_is_norm_then_rotate_half() {
    let d = 8;
    let head = values(d, 5);
    let w = weights(d, 6, 0.2, 1.0);
    let (cos, sin) = ([0.5f32, -0.3, 1.0, 0.0], [0.8f32, 0.2, 0.0, 1.0]);
    let mut got = head.clone();
    ops::head_norm_rope(&mut got, &w, 1e-6, &cos, &sin);
    let normed = ops::rms_norm(&head, &w, 1e-6);
    for i in 0..4 {
        let (a, b) = (normed[i] as f64, normed[i + 4] as f64);
        let (c, s) = (cos[i] as f64, sin[i] as f64);
        assert!(close(got[i], a * c - b * s, 1e-6, 1e-7));
        assert!(close(got[i + 4], b * c + a * s, 1e-6, 1e-7));
    }
    // Position 0 (cos 1, sin 0) is the norm alone.
    let mut at0 = head.clone();
    ops::head_norm_rope(&mut at0, &w, 1e-6, &[1.0; 4], &[0.0; 4]);
    assert_eq!(at0, normed);
}

fn attention_f64(q: &[f32], k: &[f32], v: &[f32], nh: usize, nkv: usize, d: usize, len: usize) -> Vec<f64> {
    let mut out = vec![0.0; nh * d];
    for h in 0..nh {
        let kvh = h * nkv / nh;
        let scores: Vec<f64> = (0..len)
            .map(|p| {
                (0..d).map(|i| q[h * d + i] as f64 * k[p * nkv * d + kvh * d + i] as f64).sum::<f64>()
                    / (d as f64).sqrt()
            })
            .collect();
        let m = scores.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
        for p in 0..len {
            let a = (scores[p] - m).exp() / z;
            for i in 0..d {
                out[h * d + i] += a * v[p * nkv * d + kvh * d + i] as f64;
            }
        }
    }
    out
}

#[test]
fn attention_matches_f64_with_grouped_heads() {
    for (nh, nkv, d, len) in [(16, 8, 128, 37), (4, 2, 32, 1), (8, 1, 64, 300), (4, 4, 16, 5)] {
        let q: Vec<f32> = values(nh * d, 11).iter().map(|v| v * 3.0).collect();
        let k = values(len * nkv * d, 12);
        let v = values(len * nkv * d, 13);
        let got = ops::attention(&q, &k, &v, nh, nkv, d, len);
        let want = attention_f64(&q, &k, &v, nh, nkv, d, len);
        for i in 0..got.len() {
            assert!(close(got[i], want[i], 1e-4, 1e-5), "{nh}/{nkv}/{d}/{len} [{i}]: {} vs {}", got[i], want[i]);
        }
    }
    // One position: each q head returns its own KV head's value row exactly.
    let (nh, nkv, d) = (4, 2, 4);
    let v: Vec<f32> = (0..nkv * d).map(|i| i as f32).collect();
    let got = ops::attention(&values(nh * d, 1), &values(nkv * d, 2), &v, nh, nkv, d, 1);
    assert_eq!(&got[..d], &v[..d]);
    assert_eq!(&got[d..2 * d], &v[..d]);
    assert_eq!(&got[2 * d..3 * d], &v[d..]);
    assert_eq!(&got[3 * d..], &v[d..]);
}

#[test]
fn silu_mul_matches_f64() {
    let g: Vec<f32> = values(500, 21).iter().map(|v| v * 20.0).collect();
    let u = values(500, 22);
    let y = ops::silu_mul(&g, &u);
    for i in 0..g.len() {
        let gg = g[i] as f64;
        let want = gg / (1.0 + (-gg).exp()) * u[i] as f64;
        assert!(close(y[i], want, 1e-6, 1e-7), "{i}");
    }
}

#[test]
fn log_softmax_is_stable_and_exact() {
    let logits = [1000.0f32, 1001.0, 999.0];
    let z = (0.0f64.exp() + 1.0f64.exp() + (-1.0f64).exp()).ln();
    assert!(close(ops::log_softmax_at(&logits, 1), 1.0 - z, 1e-6, 1e-6));
    assert!(close(ops::log_softmax_at(&logits, 2), -1.0 - z, 1e-6, 1e-6));
    let uniform = vec![0.25f32; 1000];
    assert!(close(ops::log_softmax_at(&uniform, 3), -(1000f64).ln(), 1e-6, 0.0));
}

#[test]
fn round_bf16_is_nearest_even() {
    assert_eq!(ops::round_bf16(1.0), 1.0);
    // Halfway between 1 and the next bf16 (1 + 2^-7): ties to the even one, 1.
    assert_eq!(ops::round_bf16(1.0 + 2f32.powi(-8)), 1.0);
    // Halfway between 1 + 2^-7 and 1 + 2^-6: ties to the even one, 1 + 2^-6.
    assert_eq!(ops::round_bf16(1.0 + 3.0 * 2f32.powi(-8)), 1.0 + 2f32.powi(-6));
    assert_eq!(ops::round_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 1.0 + 2f32.powi(-7));
    assert_eq!(ops::round_bf16(-3.0), -3.0);
}

#[test]
fn gemm_bf16_matches_f64() {
    // m = 1 and a ragged k (not a multiple of the 16 partial sums) included.
    for (m, n, k) in [(1usize, 3usize, 5usize), (7, 64, 64), (3, 5, 1000)] {
        let a = weights(m * k, 30 + k as u64, 2.0, 0.0);
        let w = weights(n * k, 31 + n as u64, 0.5, 0.1);
        let c = ops::gemm_bf16(&a, &w, m, n, k);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k).map(|p| a[i * k + p].to_f32() as f64 * w[j * k + p].to_f32() as f64).sum();
                let scale: f64 =
                    (0..k).map(|p| (a[i * k + p].to_f32() as f64 * w[j * k + p].to_f32() as f64).abs()).sum();
                assert!(
                    close(c[i * n + j], want, 0.0, 1e-5 * scale + 1e-30),
                    "{m}x{n}x{k} [{i}, {j}]: {} vs {want}",
                    c[i * n + j]
                );
            }
        }
    }
}

#[test]
fn gemm_shapes_outside_the_kernel_contract_are_refused() {
    use host::gpu::check_gemm_shape;
    // Qwen3-0.6B's prefill shapes (q/k/v stacked, o, gate/up, down, LM head) at chunk tails.
    for m in [1usize, 7, 100, 257, 4096] {
        for (n, k) in [(4096usize, 1024usize), (1024, 2048), (3072, 1024), (1024, 3072), (151936, 1024), (6144, 1024)] {
            check_gemm_shape(m, n, k).unwrap_or_else(|e| panic!("{m}x{n}x{k} refused: {e:#}"));
        }
    }
    for (m, n, k, why) in [
        (0usize, 64usize, 64usize, "empty"),
        (4, 0, 64, "empty"),
        (4, 100, 64, "N is not a multiple"),
        (4, 64, 48, "K is not a multiple"),
        (4, 64, 0, "empty"),
        (1 << 33, 64, 64, "32 bits"),
    ] {
        let e = check_gemm_shape(m, n, k).expect_err(&format!("{m}x{n}x{k} accepted"));
        assert!(format!("{e:#}").contains(why), "{m}x{n}x{k}: `{e:#}` does not say `{why}`");
    }
}
