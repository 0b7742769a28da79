//! Causal attention of a prefill chunk on the tensor cores: each chunk position attends over
//! every cached position up to its own, `softmax(q k^T / sqrt(d)) v`, with the softmax kept
//! online (a running max and sum per row) so that the scores never leave registers.
//!
//! A block takes `FLASH_BLOCK_M` (64) query rows of one q head; each of its 4 warps owns 16
//! rows, the height of an `mma.sync` fragment. The block walks that head's keys in tiles of
//! `FLASH_BLOCK_N` (64) positions: K and V tiles are copied into shared memory by `cp.async`,
//! the next tile while the warps use this one. Per tile and warp:
//!
//! - `S = Q K^T` (16 x 64): Q's fragments sit in registers for the whole walk (loaded once);
//!   K is stored `[key][dim]`, which is already the "col" B operand, so it loads with the
//!   plain `ldmatrix`.
//! - the causal mask (only on tiles that reach past the warp's first position), the running
//!   max, `P = 2^(S - max)` in f32, the rescale of the running sum and of O.
//! - `O += P V`: the accumulator layout of S is the A layout of m16n8k16, so each 16 keys of P
//!   become one A fragment in place (rounded to bf16); V is stored `[key][dim]`, row-major
//!   B, so it loads with the transposing `ldmatrix`.
//!
//! The scores are in log2 units (the scale folds in log2(e), as the decode kernel does), so
//! the exponentials are `ex2`. Rounding: q, K, V and P enter the tensor cores as bf16 (q and
//! P are rounded here; the decode kernel keeps q and the weights in f32), sums are f32; the
//! CPU twin (`host::model::prefill::causal_attention`) and the GPU tests say how close that is.
//!
//! Blocks are numbered with the q head fastest and the latest tile of rows first: those
//! attend to the most keys, so the longest blocks start first and the last wave is short.

use crate::abi::{
    flash_row_bytes, PrefillAttentionParams, FLASH_BLOCK_M, FLASH_BLOCK_N, FLASH_STAGES, PREFILL_THREADS,
};
use crate::device::*;
use crate::ops::gemm::SmemChunk;

/// Fragments of 8 keys in a tile (the n-fragments of S), and steps of 16 keys (the k-steps of
/// P V).
const KEY_FRAGS: usize = (FLASH_BLOCK_N / 8) as usize;
const KEY_STEPS: usize = (FLASH_BLOCK_N / 16) as usize;

// The loops over head_dim are `unroll!(8 or 16, ..)` with the steps past KS or NT cut off at
// compile time (constant conditions): a plain loop may stay rolled, and an array it indexes
// then lives in local memory.
const _: () = {
    // The loops over a tile's keys are unrolled for these counts.
    assert!(KEY_FRAGS == 8 && KEY_STEPS == 4 && FLASH_BLOCK_M == 64);
    assert!(FLASH_STAGES == 2 && PREFILL_THREADS == 128);
};

/// Starts the copies of key tile `tile` (positions `tile * FLASH_BLOCK_N ..`) of K and V into
/// the stage at `stage_address` (K's tile, then V's `tile_bytes` further). Positions at or past
/// `keys` are zero-filled: they are masked out, and zeros (unlike whatever the cache holds
/// there) keep `0 * v` at 0. Thread `t` copies 16-byte chunks `t, t + 128, ...` of the tile,
/// consecutive threads along a row.
#[inline(always)]
unsafe fn copy_kv_tile<const KS: usize>(
    k_head: *const u16,
    v_head: *const u16,
    tile: u32,
    keys: u32,
    stage_address: u32,
    tile_bytes: u32,
) {
    let d = 16 * KS as u32;
    let row_bytes = flash_row_bytes(d);
    let chunks_per_row = d / 8;
    // FLASH_BLOCK_N * d / 8 chunks per tile, PREFILL_THREADS at a time: KS each.
    for i in 0..KS as u32 {
        let c = thread_idx() + i * PREFILL_THREADS;
        let (r, chunk) = (c / chunks_per_row, c % chunks_per_row);
        let key = tile * FLASH_BLOCK_N + r;
        let valid = key < keys;
        let src = (if valid { key } else { 0 } * d + chunk * 8) as usize;
        let dst = stage_address + r * row_bytes + chunk * 16;
        cp_async_16(dst, k_head.add(src) as *const u8, valid);
        cp_async_16(dst + tile_bytes, v_head.add(src) as *const u8, valid);
    }
}

/// One block's attention (see the module): `KS` = head_dim / 16, `NT` = head_dim / 8. All
/// `PREFILL_THREADS` threads call it; `smem` is `abi::flash_smem_bytes(head_dim)` bytes;
/// `block_idx() < abi::flash_grid(p.rows, p.n_heads)`.
///
/// # Safety
/// `p` as `PrefillAttentionParams` describes it, positions inside the cache, whole GQA groups;
/// the chunk's own K and V already in the cache (an earlier launch).
#[inline(always)]
pub unsafe fn flash_attention<const KS: usize, const NT: usize>(p: &PrefillAttentionParams, smem: *mut SmemChunk) {
    let d = 16 * KS as u32;
    let row_tiles = p.rows.div_ceil(FLASH_BLOCK_M);
    let qh = block_idx() % p.n_heads;
    let r0 = (row_tiles - 1 - block_idx() / p.n_heads) * FLASH_BLOCK_M;
    let kv_head = qh / (p.n_heads / p.n_kv_heads);
    let last_row = if r0 + FLASH_BLOCK_M < p.rows { r0 + FLASH_BLOCK_M } else { p.rows } - 1;
    // The block's queries see cache positions 0 .. keys.
    let keys = p.start_pos + last_row + 1;
    let key_tiles = keys.div_ceil(FLASH_BLOCK_N);

    let row_bytes = flash_row_bytes(d);
    let tile_bytes = FLASH_BLOCK_N * row_bytes;
    let smem_address = shared_address(smem);
    let cache_offset = (kv_head * p.max_ctx * d) as usize;
    let k_head = (p.k_cache as *const u16).add(cache_offset);
    let v_head = (p.v_cache as *const u16).add(cache_offset);

    // Tile 0 is on its way while Q's fragments load.
    copy_kv_tile::<KS>(k_head, v_head, 0, keys, smem_address, tile_bytes);
    cp_async_commit_group();

    // Lane (g, t) = (lane / 4, lane % 4) holds rows g and g + 8 of the warp's 16 (fragment
    // layout, device.rs): chunk rows `row_a`, `row_b` at positions `pos_a`, `pos_b`.
    let l = lane();
    let (g, t) = (l >> 2, l & 3);
    let warp_r0 = r0 + warp() * 16;
    let (row_a, row_b) = (warp_r0 + g, warp_r0 + g + 8);
    let (pos_a, pos_b) = (p.start_pos + row_a, p.start_pos + row_b);
    let q_dim = p.n_heads * d;

    // Q's A fragments, straight from global memory (read once): register pairs of adjacent
    // dims; rows past the chunk are zeros (computed, never stored).
    let q = p.q as *const u16;
    let q_word = |row: u32, col: u32| -> u32 {
        if row < p.rows {
            *(q.add((row * q_dim + qh * d + col) as usize) as *const u32)
        } else {
            0
        }
    };
    let mut qa = [[0u32; 4]; KS];
    crate::unroll!(8, KSI, {
        if KSI < KS {
            let c = KSI as u32 * 16 + 2 * t;
            qa[KSI] = [q_word(row_a, c), q_word(row_b, c), q_word(row_a, c + 8), q_word(row_b, c + 8)];
        }
    });

    // `ldmatrix` row addresses of this lane within a tile (see device::ldmatrix_x4 and _trans):
    // K: lanes 0-7 keys 0-7 at dim 0, 8-15 keys 0-7 at dim 8, 16-31 the same for keys 8-15 ->
    // B fragments (b0, b1) of two 8-key fragments. V: lanes 0-7 keys 0-7, 8-15 keys 8-15 at
    // dim 0, 16-31 the same at dim 8 -> (b0, b1) of two 8-dim fragments of O.
    let k_lane = ((l & 7) + ((l >> 4) << 3)) * row_bytes + ((l >> 3) & 1) * 16;
    let v_lane = ((l & 7) + (((l >> 3) & 1) << 3)) * row_bytes + (l >> 4) * 16;

    let scale = LOG2_E * rsqrt(d as f32);
    let (mut m_a, mut m_b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    let (mut l_a, mut l_b) = (0.0f32, 0.0f32);
    let mut o = [[0.0f32; 4]; NT];
    let mut tile = 0;
    while tile < key_tiles {
        // Tile `tile` (the only group in flight) has landed for every thread, and every warp
        // is done with the other stage, which the next copies overwrite.
        cp_async_wait_group::<0>();
        sync_threads();
        let stage = smem_address + (tile % FLASH_STAGES) * 2 * tile_bytes;
        if tile + 1 < key_tiles {
            let next = smem_address + ((tile + 1) % FLASH_STAGES) * 2 * tile_bytes;
            copy_kv_tile::<KS>(k_head, v_head, tile + 1, keys, next, tile_bytes);
        }
        cp_async_commit_group();

        // S = Q K^T for this warp's 16 rows and the tile's 64 keys.
        let mut s = [[0.0f32; 4]; KEY_FRAGS];
        crate::unroll!(8, KSI, {
            if KSI < KS {
                crate::unroll!(4, NP, {
                    let r = ldmatrix_x4(stage + k_lane + NP as u32 * 16 * row_bytes + KSI as u32 * 32);
                    mma_bf16_m16n8k16(&mut s[2 * NP], qa[KSI], [r[0], r[1]]);
                    mma_bf16_m16n8k16(&mut s[2 * NP + 1], qa[KSI], [r[2], r[3]]);
                });
            }
        });

        // Scale, and mask keys after each row's position (only where the tile reaches past
        // the warp's first position; past `keys` too, which no row of the block sees).
        let key0 = tile * FLASH_BLOCK_N;
        let masked = key0 + FLASH_BLOCK_N - 1 > p.start_pos + warp_r0;
        let (mut mx_a, mut mx_b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
        crate::unroll!(8, NF, {
            crate::unroll!(4, E, {
                let key = key0 + NF as u32 * 8 + 2 * t + (E as u32 & 1);
                let pos = if E < 2 { pos_a } else { pos_b };
                let v = s[NF][E] * scale;
                s[NF][E] = if masked && key > pos { f32::NEG_INFINITY } else { v };
            });
            mx_a = fmaxf(mx_a, fmaxf(s[NF][0], s[NF][1]));
            mx_b = fmaxf(mx_b, fmaxf(s[NF][2], s[NF][3]));
        });
        // A row's values are spread over the 4 lanes of its quad.
        mx_a = fmaxf(mx_a, shfl_xor_f32(mx_a, 1));
        mx_a = fmaxf(mx_a, shfl_xor_f32(mx_a, 2));
        mx_b = fmaxf(mx_b, shfl_xor_f32(mx_b, 1));
        mx_b = fmaxf(mx_b, shfl_xor_f32(mx_b, 2));
        let new_a = fmaxf(m_a, mx_a);
        let new_b = fmaxf(m_b, mx_b);
        // A row with no key yet (all masked so far) subtracts 0, not -inf (which gives NaN).
        let base_a = if new_a == f32::NEG_INFINITY { 0.0 } else { new_a };
        let base_b = if new_b == f32::NEG_INFINITY { 0.0 } else { new_b };
        let (corr_a, corr_b) = (exp2(m_a - base_a), exp2(m_b - base_b));
        m_a = new_a;
        m_b = new_b;
        l_a *= corr_a;
        l_b *= corr_b;
        crate::unroll!(16, NF, {
            if NF < NT {
                o[NF][0] *= corr_a;
                o[NF][1] *= corr_a;
                o[NF][2] *= corr_b;
                o[NF][3] *= corr_b;
            }
        });
        crate::unroll!(8, NF, {
            s[NF][0] = exp2(s[NF][0] - base_a);
            s[NF][1] = exp2(s[NF][1] - base_a);
            s[NF][2] = exp2(s[NF][2] - base_b);
            s[NF][3] = exp2(s[NF][3] - base_b);
            l_a += s[NF][0] + s[NF][1];
            l_b += s[NF][2] + s[NF][3];
        });

        // O += P V: keys 16 KK.. of P as one A fragment (rows g, g + 8; keys 2t.., 2t + 8..).
        crate::unroll!(4, KK, {
            let a = [
                pack_bf16x2(s[2 * KK][0], s[2 * KK][1]),
                pack_bf16x2(s[2 * KK][2], s[2 * KK][3]),
                pack_bf16x2(s[2 * KK + 1][0], s[2 * KK + 1][1]),
                pack_bf16x2(s[2 * KK + 1][2], s[2 * KK + 1][3]),
            ];
            crate::unroll!(8, DP, {
                if DP < NT / 2 {
                    let r =
                        ldmatrix_x4_trans(stage + tile_bytes + v_lane + KK as u32 * 16 * row_bytes + DP as u32 * 32);
                    mma_bf16_m16n8k16(&mut o[2 * DP], a, [r[0], r[1]]);
                    mma_bf16_m16n8k16(&mut o[2 * DP + 1], a, [r[2], r[3]]);
                }
            });
        });
        tile += 1;
    }
    // The last group committed is empty; nothing may be in flight when the block exits.
    cp_async_wait_group::<0>();

    l_a += shfl_xor_f32(l_a, 1);
    l_a += shfl_xor_f32(l_a, 2);
    l_b += shfl_xor_f32(l_b, 1);
    l_b += shfl_xor_f32(l_b, 2);
    let (inv_a, inv_b) = (1.0 / l_a, 1.0 / l_b);
    let out = p.out as *mut u16;
    crate::unroll!(16, NF, {
        if NF < NT {
            let f = o[NF];
            let col = qh * d + NF as u32 * 8 + 2 * t;
            if row_a < p.rows {
                *(out.add((row_a * q_dim + col) as usize) as *mut u32) = pack_bf16x2(f[0] * inv_a, f[1] * inv_a);
            }
            if row_b < p.rows {
                *(out.add((row_b * q_dim + col) as usize) as *mut u32) = pack_bf16x2(f[2] * inv_b, f[3] * inv_b);
            }
        }
    });
}
