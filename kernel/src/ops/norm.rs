//! RMSNorm, as Qwen3 computes it: in f32, `x * 1/sqrt(mean(x^2) + eps)`, then times the weight.

use crate::device::*;
use crate::ops::gemv::x_index;

/// Where the vector to normalise lives: f32 written earlier in this launch (read via L2), or a
/// bf16 row of the embedding.
#[derive(Clone, Copy)]
pub enum NormInput {
    F32(*const f32),
    Bf16(*const u16),
}

/// Block-wide RMSNorm of the `n` values of `input`, times the bf16 `weight`, in two parts:
/// `out` (shared memory, in the GEMV's layout: `gemv::x_index`) gets `x * w`, and the return
/// value is the scale `1/sqrt(mean(x^2) + eps)` that turns it into the norm. The caller
/// applies the scale to what it computes from `out` (a GEMV's dot products): that saves a
/// pass over `out` and a block barrier per norm. Each thread loads four
/// values and their four weights together, so the whole norm costs one memory round trip and
/// one block barrier. `n` must be a multiple of 4; `scratch` holds one f32 per warp and is not
/// reused before a later grid barrier. Ends with `sync_threads`, so `out` is ready for every
/// thread; every thread gets the same scale.
#[inline(always)]
pub unsafe fn rms_norm_to_shared(
    input: NormInput,
    weight: *const u16,
    n: u32,
    eps: f32,
    out: *mut f32,
    scratch: *mut f32,
) -> f32 {
    let mut sum_sq = 0.0f32;
    let mut i = thread_idx() * 4;
    while i < n {
        let x = match input {
            NormInput::F32(p) => ld_cg_f32x4(p.add(i as usize)),
            NormInput::Bf16(p) => bf16x4_to_f32(ld_nc_v2(p.add(i as usize) as *const u32)),
        };
        let w = bf16x4_to_f32(ld_nc_v2(weight.add(i as usize) as *const u32));
        let o = out.add(x_index(i));
        for k in 0..4 {
            *o.add(k) = x[k] * w[k];
            sum_sq = fma(x[k], x[k], sum_sq);
        }
        i += block_dim() * 4;
    }
    let warp_total = warp_sum(sum_sq);
    if lane() == 0 {
        *scratch.add(warp() as usize) = warp_total;
    }
    sync_threads();
    // Every thread adds the per-warp sums in the same order: all get the same scale.
    let mut total = 0.0f32;
    for k in 0..warps_per_block() {
        total += *scratch.add(k as usize);
    }
    rsqrt(total / n as f32 + eps)
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
    let half = head_dim / 2;
    // Weight, cos and sin first: their loads then travel with the caller's load of `v` instead
    // of waiting for the reduction below (one round trip to memory, not two). A lane's E dims
    // are consecutive and never straddle the halves, so each is one vector load.
    let d0 = lane() * E as u32;
    let w = ld_nc_bf16s::<E>(weight.add(d0 as usize));
    let c = ld_nc_f32s::<E>(cos.add((d0 % half) as usize));
    let s = ld_nc_f32s::<E>(sin.add((d0 % half) as usize));
    let mut ss = 0.0f32;
    for e in 0..E {
        ss = fma(v[e], v[e], ss);
    }
    let scale = rsqrt(warp_sum(ss) / head_dim as f32 + eps);
    let mut out = [0.0f32; E];
    for e in 0..E {
        let d = lane() * E as u32 + e as u32;
        let n = v[e] * scale * w[e];
        let partner = shfl_xor_f32(n, 16);
        out[e] = if d < half { n * c[e] - partner * s[e] } else { n * c[e] + partner * s[e] };
    }
    out
}
