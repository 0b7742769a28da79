//! CPU versions of every operation the GPU kernel performs. The reference forward is built from
//! these, and the GPU unit tests compare each kernel stage against them, so their semantics
//! follow HF transformers' Qwen3 exactly (fp32 maths over bf16 weights).

use half::bf16;
use rayon::prelude::*;

/// bf16 -> f32 is exact: the bf16 bits are the top half of the f32 bits. Written out so the
/// compiler can vectorise the dot products below.
#[inline(always)]
fn widen(w: bf16) -> f32 {
    f32::from_bits((w.to_bits() as u32) << 16)
}

/// Round-to-nearest-even through bf16 (what the GPU does when it stores a value as bf16).
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// HF Qwen3RMSNorm: `x * (1 / sqrt(mean(x^2) + eps)) * weight`, in f32.
pub fn rms_norm(x: &[f32], weight: &[bf16], eps: f32) -> Vec<f32> {
    assert_eq!(x.len(), weight.len(), "rms_norm: input and weight lengths differ");
    let mean_sq = x.iter().map(|&v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (mean_sq + eps).sqrt();
    x.iter().zip(weight).map(|(&v, &w)| (v * inv) * widen(w)).collect()
}

/// Lane count of the dot-product accumulators: independent partial sums let the compiler use
/// SIMD without reassociating a single f32 chain (which it may not do on its own).
const LANES: usize = 16;

/// `sum_i mul(a[i], b[i])` in `LANES` partial sums (lane `i % LANES`), added up in lane order,
/// then the tail of fewer than `LANES` elements in order.
#[inline(always)]
fn dot_in_lanes<A: Copy, B: Copy>(a: &[A], b: &[B], mul: impl Fn(A, B) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let ac = a.chunks_exact(LANES);
    let bc = b.chunks_exact(LANES);
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (al, bl) in ac.zip(bc) {
        for i in 0..LANES {
            acc[i] += mul(al[i], bl[i]);
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (&x, &y) in ar.iter().zip(br) {
        sum += mul(x, y);
    }
    sum
}

fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    dot_in_lanes(w, x, |w, x| widen(w) * x)
}

/// Below this many weights a matrix-vector product is faster on one thread than spread out.
const PARALLEL_MIN_WEIGHTS: usize = 1 << 16;

/// `y[r] = sum_c w[r*cols + c] * x[c]` with f32 accumulation; `w` is row-major `[rows, cols]`
/// (HF's `[out_features, in_features]`).
pub fn gemv(w: &[bf16], rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    assert_eq!(w.len(), rows * cols, "gemv: weight is not rows x cols");
    assert_eq!(x.len(), cols, "gemv: input length is not cols");
    if rows * cols < PARALLEL_MIN_WEIGHTS {
        return w.chunks_exact(cols).map(|row| dot_bf16(row, x)).collect();
    }
    let mut y = vec![0.0f32; rows];
    // Blocks of rows, so each rayon task does enough work to amortise its scheduling.
    const ROWS_PER_TASK: usize = 64;
    y.par_chunks_mut(ROWS_PER_TASK).enumerate().for_each(|(block, out)| {
        let first = block * ROWS_PER_TASK;
        for (i, o) in out.iter_mut().enumerate() {
            let r = first + i;
            *o = dot_bf16(&w[r * cols..(r + 1) * cols], x);
        }
    });
    y
}

/// `sum_i a[i] * b[i]` of two bf16 vectors with f32 accumulation (in `LANES` partial sums, as
/// `dot_bf16`). Each product of two bf16 is exact in f32: only the order of the sums differs
/// from the GPU's.
pub fn dot_bf16_bf16(a: &[bf16], b: &[bf16]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_bf16_bf16: lengths differ");
    dot_in_lanes(a, b, |x, y| widen(x) * widen(y))
}

/// `C[m, n] = A[m, k] W[n, k]^T` with f32 accumulation: A row-major (one row per position), W
/// row-major `[out, in]` as HF stores weights, C row-major f32. The CPU twin of the GPU's
/// tensor-core GEMM (kernel/src/ops/gemm.rs), which sums in another order: compare with a
/// tolerance.
pub fn gemm_bf16(a: &[bf16], w: &[bf16], m: usize, n: usize, k: usize) -> Vec<f32> {
    assert_eq!(a.len(), m * k, "gemm_bf16: A is not m x k");
    assert_eq!(w.len(), n * k, "gemm_bf16: W is not n x k");
    let mut c = vec![0.0f32; m * n];
    if k == 0 {
        return c;
    }
    // Runs of entries of C as rayon tasks: a single row (m = 1) still spreads over threads.
    const ENTRIES_PER_TASK: usize = 64;
    c.par_chunks_mut(ENTRIES_PER_TASK).enumerate().for_each(|(task, out)| {
        let first = task * ENTRIES_PER_TASK;
        for (e, o) in out.iter_mut().enumerate() {
            let (i, j) = ((first + e) / n, (first + e) % n);
            *o = dot_bf16_bf16(&a[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
        }
    });
    c
}

/// RoPE cos/sin tables, each `[positions][head_dim / 2]`, with HF's float32 semantics:
/// `inv_freq[i] = 1 / theta^(2i / head_dim)` as f32, the angle is the f32 product
/// `pos * inv_freq[i]`, and its cos/sin are rounded to f32.
pub fn rope_table(theta: f64, head_dim: usize, positions: usize) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| {
            // torch: arange(0, dim, 2).float() / dim is an f32 division; base ** that is f32.
            let exponent = (2 * i) as f32 / head_dim as f32;
            let power = theta.powf(exponent as f64) as f32;
            1.0f32 / power
        })
        .collect();
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for pos in 0..positions {
        for &f in &inv_freq {
            let angle = (pos as f32) * f;
            cos.push((angle as f64).cos() as f32);
            sin.push((angle as f64).sin() as f32);
        }
    }
    (cos, sin)
}

/// One attention head in place: RMSNorm over the head (q_norm / k_norm), then rotate-half RoPE
/// with this position's `cos`/`sin` rows (`head_dim / 2` values each).
pub fn head_norm_rope(head: &mut [f32], weight: &[bf16], eps: f32, cos: &[f32], sin: &[f32]) {
    let h = head.len() / 2;
    assert_eq!(cos.len(), h, "head_norm_rope: cos row is not head_dim / 2");
    assert_eq!(sin.len(), h, "head_norm_rope: sin row is not head_dim / 2");
    let normed = rms_norm(head, weight, eps);
    for i in 0..h {
        let (a, b) = (normed[i], normed[i + h]);
        head[i] = a * cos[i] - b * sin[i];
        head[i + h] = b * cos[i] + a * sin[i];
    }
}

/// Causal attention of one query position over `len` cached positions, with grouped-query
/// heads: query head `h` reads KV head `h / (n_heads / n_kv_heads)`. `keys`/`values` are
/// position-major `[len][n_kv_heads * head_dim]`. Scale `1/sqrt(head_dim)`; softmax in f64.
/// Returns `[n_heads * head_dim]`.
pub fn attention(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    len: usize,
) -> Vec<f32> {
    let kv_width = n_kv_heads * head_dim;
    assert_eq!(q.len(), n_heads * head_dim, "attention: q is not n_heads * head_dim");
    assert!(keys.len() >= len * kv_width && values.len() >= len * kv_width, "attention: cache too short");
    assert!(len > 0, "attention over zero positions");
    let group = n_heads / n_kv_heads;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let one_head = |h: usize| -> Vec<f32> {
        let kvh = h / group;
        let qh = &q[h * head_dim..(h + 1) * head_dim];
        let scores: Vec<f64> = (0..len)
            .map(|p| {
                let k = &keys[p * kv_width + kvh * head_dim..][..head_dim];
                let dot: f32 = qh.iter().zip(k).map(|(a, b)| a * b).sum();
                (dot * scale) as f64
            })
            .collect();
        let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        let mut out = vec![0.0f64; head_dim];
        for (p, e) in exps.iter().enumerate() {
            let weight = e / total;
            let v = &values[p * kv_width + kvh * head_dim..][..head_dim];
            for (o, &vv) in out.iter_mut().zip(v) {
                *o += weight * vv as f64;
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    };
    // Threads only pay off once the cache is long enough to make each head real work.
    let per_head: Vec<Vec<f32>> = if len * head_dim * n_heads >= PARALLEL_MIN_WEIGHTS {
        (0..n_heads).into_par_iter().map(one_head).collect()
    } else {
        (0..n_heads).map(one_head).collect()
    };
    per_head.concat()
}

/// SwiGLU's elementwise part: `silu(gate) * up` with `silu(g) = g / (1 + exp(-g))`.
pub fn silu_mul(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len(), "silu_mul: lengths differ");
    gate.iter().zip(up).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect()
}

/// Index of the largest logit; ties go to the lowest index and NaN never wins (an all-NaN row
/// gives 0).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if v <= b => {}
            _ => best = Some((i, v)),
        }
    }
    best.map(|(i, _)| i as u32).unwrap_or(0)
}

/// `log softmax(logits)[index]`, computed stably in f64.
pub fn log_softmax_at(logits: &[f32], index: usize) -> f32 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    (logits[index] as f64 - lse) as f32
}
