//! The operations of a prefill chunk that are not matrix products (those are `gemm`): the
//! embedding, RMSNorm of many rows into the GEMM's bf16 A, q/k norm + RoPE with the K/V append
//! into the decode kernel's cache, and the residual add (alone, or with the next norm).
//!
//! Each runs as its own ordinary launch (`kernel/src/prefill.rs`), so its inputs were written
//! by earlier launches: plain or read-only loads are coherent here, unlike in the megakernel.
//! The attention itself is on the tensor cores: `ops::flash_attention`.

use crate::abi::PrefillAttentionParams;
use crate::device::*;
use crate::ops::norm::head_norm_rope;

/// `x[r, :] = embed[tokens[r], :]` as f32 (exact), for `rows` rows of `hidden`; any grid.
#[inline(always)]
pub unsafe fn embed_rows(embed: *const u16, tokens: *const u32, rows: u32, hidden: u32, x: *mut f32) {
    let n = rows as usize * hidden as usize;
    let mut i = (block_idx() * block_dim() + thread_idx()) as usize;
    let stride = (grid_dim() * block_dim()) as usize;
    while i < n {
        let (r, c) = (i / hidden as usize, i % hidden as usize);
        let token = *tokens.add(r) as usize;
        *x.add(i) = bf16_to_f32(*embed.add(token * hidden as usize + c));
        i += stride;
    }
}

/// One warp per row: `out[r, :] = bf16(x[r, :] * 1/sqrt(mean(x[r]^2) + eps) * w)`, HF's
/// RMSNorm (scale first, then the weight, as the CPU twin multiplies) rounded to bf16 for the
/// GEMM. `n` must be a multiple of 4 (each lane takes 4 consecutive values per step: one
/// 16-byte load of x, one 8-byte load of w); `x` 16-byte and `out`, `w` 8-byte aligned rows.
#[inline(always)]
pub unsafe fn rms_norm_row_bf16(x: *const f32, w: *const u16, rows: u32, n: u32, eps: f32, out: *mut u16) {
    let row = global_warp();
    if row >= rows {
        return;
    }
    let xr = x.add(row as usize * n as usize);
    let or = out.add(row as usize * n as usize);
    let mut sum_sq = 0.0f32;
    let mut i = lane() * 4;
    while i < n {
        let v = ld_nc_f32s::<4>(xr.add(i as usize));
        for k in 0..4 {
            sum_sq = fma(v[k], v[k], sum_sq);
        }
        i += 128;
    }
    let scale = rsqrt(warp_sum(sum_sq) / n as f32 + eps);
    // Second pass over the row (from L1/L2: a row is at most a few KiB), so that no lane holds
    // a whole row in registers.
    let mut i = lane() * 4;
    while i < n {
        let v = ld_nc_f32s::<4>(xr.add(i as usize));
        let wv = bf16x4_to_f32(ld_nc_v2(w.add(i as usize) as *const u32));
        let mut b = [0u16; 4];
        for k in 0..4 {
            b[k] = f32_to_bf16((v[k] * scale) * wv[k]);
        }
        let lo = b[0] as u32 | (b[1] as u32) << 16;
        let hi = b[2] as u32 | (b[3] as u32) << 16;
        *(or.add(i as usize) as *mut [u32; 2]) = [lo, hi];
        i += 128;
    }
}

/// Most deltas `add_parts_rms_norm_row_bf16` takes (the residual GEMMs split K at most 8 ways).
pub const MAX_ADD_PARTS: usize = 8;

/// One warp per row: `x[r] += d_0[r] + d_1[r] + ...` (the deltas summed in that order first,
/// as `add_parts_into`), then `out[r] = bf16(rms_norm(x[r]) * w)` (as `rms_norm_row_bf16`):
/// a split-K GEMM's partial products into the residual stream and the next norm in one pass.
/// `deltas` holds `parts` (1 ..= `MAX_ADD_PARTS`) slices of `rows * n`; `n` a multiple of 4,
/// rows 16-byte aligned.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub unsafe fn add_parts_rms_norm_row_bf16(
    x: *mut f32,
    deltas: *const f32,
    parts: u32,
    w: *const u16,
    rows: u32,
    n: u32,
    eps: f32,
    out: *mut u16,
) {
    let row = global_warp();
    if row >= rows {
        return;
    }
    let at = row as usize * n as usize;
    let slice = rows as usize * n as usize;
    let (xr, or) = (x.add(at), out.add(at));
    let mut sum_sq = 0.0f32;
    let mut i = lane() * 4;
    while i < n {
        // Every part's load is issued before the first add waits for one (a rolled loop over
        // the parts would wait for each load in turn): up to `MAX_ADD_PARTS`, unrolled.
        let mut d = [[0.0f32; 4]; MAX_ADD_PARTS];
        crate::unroll!(8, S, {
            if (S as u32) < parts {
                d[S] = ld_nc_f32s::<4>(deltas.add(S * slice + at + i as usize));
            }
        });
        let mut sum = d[0];
        crate::unroll!(8, S, {
            if S > 0 && (S as u32) < parts {
                for k in 0..4 {
                    sum[k] += d[S][k];
                }
            }
        });
        // x is written here, so plain loads (not the read-only path).
        for k in 0..4 {
            let v = *xr.add(i as usize + k) + sum[k];
            *xr.add(i as usize + k) = v;
            sum_sq = fma(v, v, sum_sq);
        }
        i += 128;
    }
    let scale = rsqrt(warp_sum(sum_sq) / n as f32 + eps);
    // Each lane reads back the values it wrote.
    let mut i = lane() * 4;
    while i < n {
        let wv = bf16x4_to_f32(ld_nc_v2(w.add(i as usize) as *const u32));
        let mut b = [0u16; 4];
        for k in 0..4 {
            b[k] = f32_to_bf16((*xr.add(i as usize + k) * scale) * wv[k]);
        }
        let lo = b[0] as u32 | (b[1] as u32) << 16;
        let hi = b[2] as u32 | (b[3] as u32) << 16;
        *(or.add(i as usize) as *mut [u32; 2]) = [lo, hi];
        i += 128;
    }
}

/// `x[i] += (d_0[i] + d_1[i] + ...)` for `n` elements, `parts` deltas `d_s = deltas + s n`
/// summed in that order (a split-K GEMM's partial products into the residual stream: the
/// fixed order keeps the result the same on every run); any grid.
#[inline(always)]
pub unsafe fn add_parts_into(x: *mut f32, deltas: *const f32, n: u32, parts: u32) {
    let mut i = block_idx() * block_dim() + thread_idx();
    let stride = grid_dim() * block_dim();
    while i < n {
        let mut sum = *deltas.add(i as usize);
        for s in 1..parts {
            sum += *deltas.add((s * n + i) as usize);
        }
        *x.add(i as usize) += sum;
        i += stride;
    }
}

/// One warp per (chunk row, head) of q, k and v heads together (`rows * (n_heads + 2 *
/// n_kv_heads)` warps, heads fastest): q heads get q_norm + RoPE into `p.q`; k heads
/// k_norm + RoPE, v heads nothing; all three rounded to bf16 (q for attention's tensor
/// cores), k and v stored into the cache at position
/// `start_pos + row`, in the decode kernel's layout `[kv head, max_ctx, head_dim]` and with
/// its rounding (`norm::head_norm_rope`, `f32_to_bf16`), so decode reads them as if it had
/// written them itself. `E` = head_dim / 32.
#[inline(always)]
pub unsafe fn qk_norm_rope_append<const E: usize>(p: &PrefillAttentionParams) {
    let head_dim = 32 * E as u32;
    let heads = p.n_heads + 2 * p.n_kv_heads;
    let item = global_warp();
    if item >= p.rows * heads {
        return;
    }
    let (row, h) = (item / heads, item % heads);
    let pos = p.start_pos + row;
    let q_dim = p.n_heads * head_dim;
    let row_width = q_dim + 2 * p.n_kv_heads * head_dim;
    let d0 = lane() * E as u32;
    // Heads are stacked q, k, v in the GEMM's row, so head h starts at h * head_dim.
    let x = ld_nc_f32s::<E>((p.qkv as *const f32).add((row * row_width + h * head_dim + d0) as usize));
    let cos = (p.rope_cos as *const f32).add((pos * head_dim / 2) as usize);
    let sin = (p.rope_sin as *const f32).add((pos * head_dim / 2) as usize);
    if h < p.n_heads {
        let r = head_norm_rope::<E>(x, p.q_norm as *const u16, p.eps, cos, sin);
        let q = (p.q as *mut u16).add((row * q_dim + h * head_dim + d0) as usize);
        for e in 0..E {
            *q.add(e) = f32_to_bf16(r[e]);
        }
        return;
    }
    let (cache, kv_head, v) = if h < p.n_heads + p.n_kv_heads {
        (p.k_cache, h - p.n_heads, head_norm_rope::<E>(x, p.k_norm as *const u16, p.eps, cos, sin))
    } else {
        (p.v_cache, h - p.n_heads - p.n_kv_heads, x)
    };
    let dst = (cache as *mut u16).add(((kv_head * p.max_ctx + pos) * head_dim + d0) as usize);
    for e in 0..E {
        *dst.add(e) = f32_to_bf16(v[e]);
    }
}
