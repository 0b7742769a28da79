//! RMSNorm, as Qwen3 computes it: in f32, `x * 1/sqrt(mean(x^2) + eps)`, then times the weight.

use crate::device::*;

/// Block-wide RMSNorm of `n` values produced by `load(i)` into shared memory `out`, times the
/// bf16 `weight`. `scratch` holds one f32 per warp. Ends with `sync_threads`, so `out` is ready
/// for every thread.
#[inline(always)]
pub unsafe fn rms_norm_to_shared<L: Fn(u32) -> f32>(
    load: L,
    weight: *const u16,
    n: u32,
    eps: f32,
    out: *mut f32,
    scratch: *mut f32,
) {
    let mut sum_sq = 0.0f32;
    let mut i = thread_idx();
    while i < n {
        let v = load(i);
        *out.add(i as usize) = v;
        sum_sq = fma(v, v, sum_sq);
        i += block_dim();
    }
    let total = block_sum(sum_sq, scratch);
    let scale = rsqrt(total / n as f32 + eps);
    let mut i = thread_idx();
    while i < n {
        let w = bf16_to_f32(*weight.add(i as usize));
        *out.add(i as usize) = *out.add(i as usize) * scale * w;
        i += block_dim();
    }
    sync_threads();
}

/// One attention head, held by one warp with `E` consecutive values per lane (head_dim = 32*E):
/// RMSNorm with `weight`, then RoPE rotate-half with this position's `cos`/`sin` rows
/// (head_dim/2 values each). Lane `l` holds dims `l*E..l*E+E`, so the partner of a dim in the
/// first half sits in lane `l ^ 16`.
#[inline(always)]
pub unsafe fn head_norm_rope<const E: usize>(
    v: [f32; E],
    weight: *const u16,
    eps: f32,
    cos: *const f32,
    sin: *const f32,
) -> [f32; E] {
    let head_dim = 32 * E as u32;
    let mut ss = 0.0f32;
    for e in 0..E {
        ss = fma(v[e], v[e], ss);
    }
    let scale = rsqrt(warp_sum(ss) / head_dim as f32 + eps);
    let mut out = [0.0f32; E];
    let half = head_dim / 2;
    for e in 0..E {
        let d = lane() * E as u32 + e as u32;
        let n = v[e] * scale * bf16_to_f32(*weight.add(d as usize));
        let partner = shfl_xor_f32(n, 16);
        let i = d % half;
        let c = *cos.add(i as usize);
        let s = *sin.add(i as usize);
        out[e] = if d < half { n * c - partner * s } else { n * c + partner * s };
    }
    out
}
