//! Attention for one new position over the KV cache, split across the whole grid.
//!
//! Block `b` takes kv head `b / splits` and a contiguous chunk of the context (split
//! `b % splits`), for all q heads that share that kv head (GQA). Within a block each warp walks
//! its share of positions with an online softmax; the warps are merged in shared memory and
//! the block writes a partial (max, sum, weighted values). The last block to finish a kv head
//! (an acq_rel arrival counter) merges the partials, so no extra grid barrier is needed.
//! The block whose chunk holds the new position first normalises, rotates and appends its k
//! and v to the cache. Scores are kept in log2 units (q is pre-scaled by log2(e)/sqrt(d)).

use crate::device::*;
use crate::ops::norm::head_norm_rope;

/// Inputs of one attention phase (one layer, one position).
#[derive(Clone, Copy)]
pub struct AttentionArgs {
    /// f32: raw q of all heads (`n_heads * head_dim`), then raw k and v of all kv heads.
    pub qkv: *const f32,
    pub q_norm: *const u16,
    pub k_norm: *const u16,
    /// f32 rows of `head_dim / 2` for this position.
    pub cos: *const f32,
    pub sin: *const f32,
    /// bf16 `[n_kv_heads, max_ctx, head_dim]`.
    pub k_cache: *mut u16,
    pub v_cache: *mut u16,
    /// f32 `[n_heads * head_dim]`: the result.
    pub out: *mut f32,
    /// f32 `[n_heads, max_splits, head_dim + 2]`.
    pub partial: *mut f32,
    /// u32 `[n_kv_heads]`, zero on entry and on exit.
    pub count: *mut u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub max_ctx: u32,
    /// At most 32 (`abi::MAX_SPLITS`): the merge holds one split per lane.
    pub max_splits: u32,
    pub pos: u32,
    pub eps: f32,
}

/// Fewest positions a split of the context gets: one per warp of a decode block. Fewer splits
/// mean longer walks per warp; more, that the merge reads more partials (12 beat 32 at 40 and
/// 64 positions: docs/performance.md, experiments log).
const MIN_CHUNK: u32 = crate::abi::DECODE_THREADS / 32;

/// Splits' partials the cross-block merge reads per round trip to L2.
const MERGE_BATCH: u32 = 16; // the unroll! in the merge is written for 16

/// Cached positions a warp loads at once.
const KV_BATCH: usize = 4; // the unroll! below is written for 4

/// How the context of `len` positions is cut: (splits per kv head, positions per split,
/// splits that have work).
#[inline(always)]
pub fn split_plan(len: u32, n_kv_heads: u32, max_splits: u32) -> (u32, u32, u32) {
    let splits = (grid_dim() / n_kv_heads).clamp(1, max_splits);
    // Below MIN_CHUNK positions per split, a block's warps would idle while the merge across
    // blocks (an atomic and a read of the partials) still costs its round trips.
    let chunk = len.div_ceil(splits).max(MIN_CHUNK);
    (splits, chunk, len.div_ceil(chunk))
}

/// Contexts from which `attention_prefetch` runs: below it a split's first batch is a few
/// rows, and the prefetch's own cost outweighed what it saved (docs/performance.md,
/// experiments log).
const PREFETCH_FROM: u32 = 192;

/// Brings into L2 the first batch of cached K/V rows each warp of this block reads in the
/// attention phase: they depend on nothing the step computes, so the megakernel calls this
/// while it waits at the barrier before the phase, and the phase's first round trip then
/// ends in L2 rather than DRAM. Lanes `l % 16 < KV_BATCH` take one row each, lanes 16.. its
/// second 128-byte line (a row of head_dim <= 128 bf16 is at most two).
#[inline(always)]
pub unsafe fn attention_prefetch<const E: usize>(a: &AttentionArgs) {
    let head_dim = 32 * E as u32;
    // Opaque: the plan is the same in every layer, and hoisted out of the layer loop it would
    // hold registers through every phase.
    let len = opaque(a.pos) + 1;
    if len < PREFETCH_FROM {
        return;
    }
    let (splits, chunk, active) = split_plan(len, opaque(a.n_kv_heads), a.max_splits);
    let (kv_head, split) = (block_idx() / splits, block_idx() % splits);
    if kv_head >= a.n_kv_heads || split >= active {
        return;
    }
    let p0 = split * chunk;
    let p1 = (p0 + chunk).min(len);
    let (w, nw, l) = (warp(), warps_per_block(), lane());
    let pj = p0 + w + (l % 16) * nw;
    if l % 16 < KV_BATCH as u32 && pj < p1 && pj != a.pos && (l < 16 || head_dim > 64) {
        let off = ((kv_head * a.max_ctx + pj) * head_dim) as usize + (l / 16) as usize * 64;
        prefetch_l2(a.k_cache.add(off));
        prefetch_l2(a.v_cache.add(off));
    }
}

/// A lane's `E` bf16 values of a cached row, still packed (E = 4: two words; 2: one; 1: the
/// low half of one): half the registers of f32, so two batches can be in flight.
#[inline(always)]
unsafe fn load_bf16_raw<const E: usize>(p: *const u16) -> [u32; 2] {
    if E == 4 {
        ld_cg_v2(p as *const u32)
    } else if E == 2 {
        [ld_cg_u32(p as *const u32), 0]
    } else {
        [ld_cg_u16(p) as u32, 0]
    }
}

#[inline(always)]
fn unpack_bf16<const E: usize>(w: [u32; 2]) -> [f32; E] {
    let mut out = [0.0f32; E];
    for e in 0..E {
        out[e] = bf16_to_f32((w[e / 2] >> (16 * (e % 2))) as u16);
    }
    out
}

#[inline(always)]
unsafe fn store_bf16_row<const E: usize>(p: *mut u16, v: [f32; E]) {
    for e in 0..E {
        *p.add(e) = f32_to_bf16(v[e]);
    }
}

/// One attention phase. `E` = head_dim / 32. `smem` has `abi::attention_smem_words` f32.
/// Returns whether this block had work (false: no split of the context is this block's).
#[inline(always)]
pub unsafe fn attention_phase<const E: usize>(a: &AttentionArgs, smem: *mut f32) -> bool {
    let head_dim = 32 * E as u32;
    let group = a.n_heads / a.n_kv_heads;
    let len = a.pos + 1;
    let (splits, chunk, active) = split_plan(len, a.n_kv_heads, a.max_splits);
    let kv_head = block_idx() / splits;
    let split = block_idx() % splits;
    if kv_head >= a.n_kv_heads || split >= active {
        return false;
    }
    let p0 = split * chunk;
    let p1 = (p0 + chunk).min(len);
    let nw = warps_per_block();
    let q_s = smem; // [group][head_dim], pre-scaled
    let warp_state = smem.add((group * head_dim) as usize); // [nw][group][head_dim + 2]
    let flag = smem.add((group * head_dim + nw * group * (head_dim + 2)) as usize) as *mut u32;
    // The new position's k (normalised, rotated) and v, as the block owning it computes them.
    let k_new = smem.add((group * head_dim + nw * group * (head_dim + 2) + 32) as usize);
    let v_new = k_new.add(head_dim as usize);
    let lane_dim = (lane() * E as u32) as usize;
    let q_dim = a.n_heads * head_dim;
    let kv_dim = a.n_kv_heads * head_dim;
    let row_off = ((kv_head * a.max_ctx) as usize) * head_dim as usize;
    let w = warp();

    // Each warp walks positions p0 + w, p0 + w + nw, ... in batches of KV_BATCH whose loads are
    // all issued before any is used, so a long context costs a few round trips to memory per
    // warp, not one per position. The first batch of cached positions is requested before the
    // q/k/v work below, so at short context the whole phase costs about one round trip.
    let mut k = [[0u32; 2]; KV_BATCH];
    let mut v = [[0u32; 2]; KV_BATCH];
    let load_batch = |p: u32, k: &mut [[u32; 2]; KV_BATCH], v: &mut [[u32; 2]; KV_BATCH]| {
        crate::unroll!(4, J, {
            let pj = p + J as u32 * nw;
            if pj < p1 && pj != a.pos {
                let off = row_off + (pj * head_dim) as usize + lane_dim;
                k[J] = load_bf16_raw::<E>(a.k_cache.add(off));
                v[J] = load_bf16_raw::<E>(a.v_cache.add(off));
            }
        });
    };
    let mut p = p0 + w;
    load_batch(p, &mut k, &mut v);

    // Normalise and rotate this kv head's q heads; the block owning the new position also
    // appends its k and v to the cache and keeps them in shared memory for its own use.
    let q_scale = LOG2_E * rsqrt(head_dim as f32);
    if w < group {
        let qh = kv_head * group + w;
        let x = ld_cg_f32s::<E>(a.qkv.add((qh * head_dim) as usize + lane_dim));
        let r = head_norm_rope::<E>(x, a.q_norm, a.eps, a.cos, a.sin);
        for e in 0..E {
            *q_s.add((w * head_dim) as usize + lane_dim + e) = r[e] * q_scale;
        }
    } else if w == group && p1 == len {
        let x = ld_cg_f32s::<E>(a.qkv.add((q_dim + kv_head * head_dim) as usize + lane_dim));
        let r = head_norm_rope::<E>(x, a.k_norm, a.eps, a.cos, a.sin);
        store_bf16_row::<E>(a.k_cache.add(row_off + (a.pos * head_dim) as usize + lane_dim), r);
        for e in 0..E {
            // Rounded like the cached copy, so this block sees what later steps will read.
            *k_new.add(lane_dim + e) = round_bf16(r[e]);
        }
    } else if w == group + 1 && p1 == len {
        let x = ld_cg_f32s::<E>(a.qkv.add((q_dim + kv_dim + kv_head * head_dim) as usize + lane_dim));
        store_bf16_row::<E>(a.v_cache.add(row_off + (a.pos * head_dim) as usize + lane_dim), x);
        for e in 0..E {
            *v_new.add(lane_dim + e) = round_bf16(x[e]);
        }
    }
    // q, k_new and v_new are ready for every warp.
    sync_threads();

    // Each warp: online softmax over its positions, for every q head of the group.
    let mut m = [f32::NEG_INFINITY; 4];
    let mut l = [0.0f32; 4];
    let mut acc = [[0.0f32; E]; 4];
    let mut q = [[0.0f32; E]; 4];
    crate::unroll!(4, G, {
        if (G as u32) < group {
            for e in 0..E {
                q[G][e] = *q_s.add(G * head_dim as usize + lane_dim + e);
            }
        }
    });
    while p < p1 {
        // The next batch is requested before this one is used: two batches in flight.
        let mut k_next = [[0u32; 2]; KV_BATCH];
        let mut v_next = [[0u32; 2]; KV_BATCH];
        load_batch(p + KV_BATCH as u32 * nw, &mut k_next, &mut v_next);
        crate::unroll!(4, J, {
            let pj = p + J as u32 * nw;
            if pj < p1 {
                // The new position's k and v come from shared memory (this block wrote them).
                let (mut kf, mut vf) = (unpack_bf16::<E>(k[J]), unpack_bf16::<E>(v[J]));
                if pj == a.pos {
                    for e in 0..E {
                        kf[e] = *k_new.add(lane_dim + e);
                        vf[e] = *v_new.add(lane_dim + e);
                    }
                }
                crate::unroll!(4, G, {
                    if (G as u32) < group {
                        let mut s = 0.0f32;
                        for e in 0..E {
                            s = fma(q[G][e], kf[e], s);
                        }
                        let s = warp_sum(s);
                        let m_new = fmaxf(m[G], s);
                        let corr = exp2(m[G] - m_new);
                        let pr = exp2(s - m_new);
                        l[G] = fma(l[G], corr, pr);
                        for e in 0..E {
                            acc[G][e] = fma(acc[G][e], corr, pr * vf[e]);
                        }
                        m[G] = m_new;
                    }
                });
            }
        });
        p += KV_BATCH as u32 * nw;
        k = k_next;
        v = v_next;
    }
    let stride = (head_dim + 2) as usize;
    // A constant bound keeps m, l and acc in registers (a run-time index would spill them).
    crate::unroll!(4, G, {
        if (G as u32) < group {
            let st = warp_state.add((w as usize * group as usize + G) * stride);
            if lane() == 0 {
                *st = m[G];
                *st.add(1) = l[G];
            }
            for e in 0..E {
                *st.add(2 + lane_dim + e) = acc[G][e];
            }
        }
    });
    sync_threads();

    // Merge the warps: warp g takes q head g of the group.
    if w < group {
        let qh = kv_head * group + w;
        // Every warp's (max, sum) at once, lane ww taking warp ww (nw <= 32).
        let st_w = warp_state.add((lane().min(nw - 1) * group + w) as usize * stride);
        let m_w = if lane() < nw { *st_w } else { f32::NEG_INFINITY };
        let big_m = warp_max(m_w);
        let f_w = if lane() < nw { exp2(m_w - big_m) } else { 0.0 };
        let big_l = warp_sum(*st_w.add(1) * f_w);
        // Then the weighted values, four warps' at a time (a constant count, so their loads
        // from shared memory are issued together).
        let mut big_acc = [0.0f32; E];
        let mut w0 = 0;
        while w0 < nw {
            crate::unroll!(4, J, {
                let ww = (w0 + J as u32).min(nw - 1);
                let f = shfl_idx_f32(f_w, w0 + J as u32);
                let st = warp_state.add((ww * group + w) as usize * stride + 2 + lane_dim);
                for e in 0..E {
                    big_acc[e] = fma(*st.add(e), f, big_acc[e]);
                }
            });
            w0 += 4;
        }
        if active == 1 {
            let inv = 1.0 / big_l;
            for e in 0..E {
                *a.out.add((qh * head_dim) as usize + lane_dim + e) = big_acc[e] * inv;
            }
        } else {
            let pp = a.partial.add(((qh * a.max_splits + split) as usize) * stride);
            if lane() == 0 {
                *pp = big_m;
                *pp.add(1) = big_l;
            }
            for e in 0..E {
                *pp.add(2 + lane_dim + e) = big_acc[e];
            }
        }
    }
    if active == 1 {
        return true;
    }

    // The last block of this kv head to get here merges every split's partial.
    sync_threads();
    if thread_idx() == 0 {
        let old = atomic_add_acq_rel(a.count.add(kv_head as usize), 1);
        let last = old == active - 1;
        if last {
            // Nobody else touches this counter until a later grid barrier.
            *a.count.add(kv_head as usize) = 0;
        }
        *flag = last as u32;
    }
    sync_threads();
    // Splits' weighted values come MERGE_BATCH at a time (a split past `active` reads the last
    // one again, weighted 0), the first batch requested with every split's (max, sum), lane s
    // taking split s (active <= MAX_SPLITS = 32): up to 16 splits cost one round trip to L2,
    // 32 two. Warp g merges q head g of the group, with no barrier among warps: the other
    // warps leave at once. (Two warps per q head taking alternate batches of 8 made as few
    // round trips, but they met at a named barrier without the others, which LLVM duplicated
    // into both arms of an `if` and racecheck could not follow.)
    if *flag == 0 || w >= group {
        return true;
    }
    let qh = kv_head * group + w;
    let base = a.partial.add((qh * a.max_splits) as usize * stride);
    let load_values = |s0: u32| {
        let mut vals = [[0.0f32; E]; MERGE_BATCH as usize];
        crate::unroll!(16, J, {
            let pp = base.add(((s0 + J as u32).min(active - 1)) as usize * stride + 2 + lane_dim);
            for e in 0..E {
                vals[J][e] = ld_cg_f32(pp.add(e));
            }
        });
        vals
    };
    let mut s0 = 0;
    let mut vals = load_values(s0);
    let s = lane().min(active - 1);
    let (m_s, l_s) = (ld_cg_f32(base.add(s as usize * stride)), ld_cg_f32(base.add(s as usize * stride + 1)));
    let m_s = if lane() < active { m_s } else { f32::NEG_INFINITY };
    let big_m = warp_max(m_s);
    let f_s = if lane() < active { exp2(m_s - big_m) } else { 0.0 };
    let inv = 1.0 / warp_sum(l_s * f_s);
    let mut big_acc = [0.0f32; E];
    loop {
        crate::unroll!(16, J, {
            let f = shfl_idx_f32(f_s, s0 + J as u32);
            for e in 0..E {
                big_acc[e] = fma(vals[J][e], f, big_acc[e]);
            }
        });
        s0 += MERGE_BATCH;
        if s0 >= active {
            break;
        }
        vals = load_values(s0);
    }
    for e in 0..E {
        *a.out.add((qh * head_dim) as usize + lane_dim + e) = big_acc[e] * inv;
    }
    true
}
