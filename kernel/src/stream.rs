//! `qwen3_stream_step`: decode steps of Qwen3-0.6B in which the weight stream does not stop
//! at dependency points (sm_90: bulk copies, mbarriers, thread-block clusters).
//!
//! The megakernel (kernel/src/decode.rs) streams a phase's weights only inside the grid
//! barrier before it, so a step costs the sum over its 141 phases of (weight fetch + the
//! dependent chain). Here every block's share of every matrix is known before the step
//! starts, so a **loader** (one lane of one warp) walks that list and keeps a ring of
//! shared-memory pages full with bulk copies, waiting only for a free page, never for an
//! activation; eight **consumer** warps take the pages in the same order. The weights of the
//! next matrices are thus in flight, or already in shared memory, while the consumers wait
//! for their inputs.
//!
//! The work of a layer (`abi::STREAM_*` name the shape and the split):
//! - q/k/v: the 64 blocks of the first 8 clusters, a cluster per kv head; each block's 64 rows
//!   go to every block of its cluster with `st.async`, so each holds its kv head's two q
//!   heads and the new k and v without a trip through global memory. Every one of them norms
//!   and rotates them; rank 0 appends k and v to the KV cache.
//! - attention: the cluster's blocks split the cached positions in pages of 32, whose k and v
//!   rows the loader streams through the ring like weights (they too are known before the
//!   step: only the new position is computed, and it is in shared memory); each block keeps
//!   an online softmax for both q heads; the partials meet at the block that owns each head's
//!   32 dims, which are exactly the 32 columns of o that block multiplies (split-K: o's inputs
//!   never leave the cluster).
//! - o and down: split by their inputs, so each block produces a part of every one of the
//!   1024 outputs. Parts meet first inside the cluster (each block sums one eighth, in rank
//!   order), then in global memory as counting fixed-point sums (`abi::STREAM_COUNT_SHIFT`):
//!   integer adds, so the bits do not depend on which cluster adds first, and each word
//!   carries the number of contributions it holds, so readers poll the data itself with
//!   relaxed loads. No release fence on a streaming SM (it would wait for the bulk copies in
//!   flight). The residual is one more addend of cluster 0's sum, so what every block reads
//!   back is the new residual stream.
//! - gate/up: every block takes units of 4 intermediate indices (`StreamBlockPlan`), and the
//!   down columns of the same indices, so SiLU(gate) * up never leaves the block.
//!
//! So a layer has two all-to-all hand-offs (after o, after down) and no grid barrier. A step
//! ends with the LM head (every block a range of rows) and one release/acquire hand-off of
//! the best logit (greedy, or the Gumbel-max for temperature alone) or, for a top-k draw, of
//! every block's 32 best, from which every block draws the same token (`draw_top_k`). The
//! hand-off also publishes the KV cache rows and the cleared sums to the next step.

use crate::abi::*;
use crate::device::*;
use crate::ops::sampling::{
    candidate_key, candidate_logit, candidate_row, gumbel, hash3, sample_top32, top32_insert, top32_merge_tree, uniform,
    TOP,
};
use crate::unroll;

const RING: u32 = STREAM_RING_PAGES;
const PAGE: u32 = STREAM_PAGE_BYTES;
const ROW_BYTES: u32 = STREAM_HIDDEN * 2;
const CONSUMER_BARRIER: u32 = 1;
const HEAD_DIM: u32 = STREAM_HEAD_DIM;
const KV_ROWS: u32 = STREAM_KV_PAGE_POSITIONS;
const KV_ROW_BYTES: u32 = HEAD_DIM * 2;
const _: () = assert!(2 * KV_ROWS * KV_ROW_BYTES == PAGE && KV_ROWS == 32);

/// Waits until every block has passed the token hand-off of `steps` steps (acquiring what
/// each released there: its KV cache rows, its cleared sums).
#[inline(always)]
unsafe fn wait_token_handoffs(p: &StreamParams, steps: u32) {
    let mut tries = 0u32;
    while ld_acquire(p.arrivals as *const u32) < STREAM_GRID * steps {
        tries += 1;
        if tries > p.spin_limit {
            trap();
        }
    }
}

// ---------------------------------------------------------------- shared memory

/// Byte offsets of the shared-memory rooms (the ring first: its pages are 16-byte aligned for
/// the bulk copies). `STREAM_SMEM_BYTES` is the total the host asks for.
const SM_BARS: u32 = RING * PAGE; // full[RING], empty[RING], qkv, attn, parts, seen: u64 each
const SM_X: u32 = SM_BARS + 256; // f32 [hidden]: the residual stream
const SM_XN: u32 = SM_X + 4 * STREAM_HIDDEN; // f32 [hidden]: the normed input of a GEMV
const SM_QKV_OWN: u32 = SM_XN + 4 * STREAM_HIDDEN; // f32 [64]: this block's q/k/v rows
const SM_QKV_RECV: u32 = SM_QKV_OWN + 256; // f32 [8][64]: the cluster's q/k/v rows, by rank
const SM_QKV: u32 = SM_QKV_RECV + 4 * 8 * 64; // f32 [512]: q head 0, q head 1, k, v, normed and rotated
const SM_WARP_PART: u32 = SM_QKV + 4 * 512; // f32 [8 warps][2 heads][132]: max, sum, -, -, acc[128]
const WARP_PART_WORDS: u32 = 4 + HEAD_DIM;
const SM_ATTN_RECV: u32 = SM_WARP_PART + 4 * 8 * 2 * WARP_PART_WORDS; // f32 [8][36]: partials for my dims
const ATTN_RECV_WORDS: u32 = 36; // max, sum, acc[32], padding
const SM_ATTN_OUT: u32 = SM_ATTN_RECV + 4 * 8 * ATTN_RECV_WORDS; // f32 [32]: my dims of the attention output
const SM_PARTS: u32 = SM_ATTN_OUT + 128; // f32 [hidden]: this block's parts of o or down
const SM_PARTS_RECV: u32 = SM_PARTS + 4 * STREAM_HIDDEN; // f32 [8][128]: the cluster's parts of my eighth
const SM_GATE_UP: u32 = SM_PARTS_RECV + 4 * STREAM_HIDDEN; // f32 [MAX_UNITS][8]: gate and up rows
const SM_RED: u32 = SM_GATE_UP + 4 * 8 * STREAM_MAX_UNITS; // 256 bytes: reductions, best keys, token
const RED_TOKEN: u32 = 128; // u32 in SM_RED: the next step's token
const SM_TRACE: u32 = SM_RED + 256; // u64 [STREAM_TRACE_MARKS]
const SM_PLAN: u32 = SM_TRACE + 8 * STREAM_TRACE_MARKS; // StreamBlockPlan: this block's
const SM_LAYERS: u32 = SM_PLAN + 16; // LayerPtrs [STREAM_MAX_LAYERS]
pub const STREAM_SMEM_END: u32 = SM_LAYERS + STREAM_MAX_LAYERS * LAYER_PTRS_WORDS * 4;
const _: () = assert!(STREAM_SMEM_END == STREAM_SMEM_BYTES && core::mem::size_of::<StreamBlockPlan>() == 16);
const _: () = assert!(SM_WARP_PART % 16 == 0 && SM_ATTN_RECV % 16 == 0 && SM_PARTS % 16 == 0);
const _: () = assert!(SM_PARTS_RECV % 16 == 0 && SM_QKV_RECV % 16 == 0 && SM_LAYERS % 8 == 0);

/// Thread 0 notes the SM's cycle counter at `mark` when this layer or step is traced.
#[inline(always)]
unsafe fn mark(sm: Smem, on: bool, mark: StreamMark) {
    if on && thread_idx() == 0 {
        *(sm.ptr.add((SM_TRACE + 8 * mark as u32) as usize) as *mut u64) = clock64();
    }
}

#[derive(Clone, Copy)]
struct Smem {
    /// Shared-window address of the dynamic shared memory.
    base: u32,
    ptr: *mut u8,
}

impl Smem {
    fn new() -> Smem {
        let ptr = dynamic_shared::<u8>();
        Smem { base: shared_address(ptr), ptr }
    }
    fn addr(self, off: u32) -> u32 {
        self.base + off
    }
    fn f32s(self, off: u32) -> *mut f32 {
        unsafe { self.ptr.add(off as usize) as *mut f32 }
    }
    fn page(self, slot: u32) -> u32 {
        self.base + slot * PAGE
    }
    fn full(self, slot: u32) -> u32 {
        self.base + SM_BARS + 8 * slot
    }
    fn empty(self, slot: u32) -> u32 {
        self.base + SM_BARS + 8 * (RING + slot)
    }
    fn qkv_bar(self) -> u32 {
        self.base + SM_BARS + 8 * 2 * RING
    }
    fn attn_bar(self) -> u32 {
        self.qkv_bar() + 8
    }
    fn parts_bar(self) -> u32 {
        self.qkv_bar() + 16
    }
    /// Completes a phase each time thread 0 has seen a layer's down sum (the next layer's input).
    fn seen_bar(self) -> u32 {
        self.qkv_bar() + 24
    }
    /// The block's plan, read where it is used: registers held through the step are what
    /// the consumers run short of.
    fn plan(self) -> StreamBlockPlan {
        unsafe { *(self.ptr.add(SM_PLAN as usize) as *const StreamBlockPlan) }
    }
    fn layer(self, l: u32) -> LayerPtrs {
        unsafe { *(self.ptr.add((SM_LAYERS + l * LAYER_PTRS_WORDS * 4) as usize) as *const LayerPtrs) }
    }
}

// ---------------------------------------------------------------- the entry

#[no_mangle]
pub unsafe extern "ptx-kernel" fn qwen3_stream_step(p: StreamParams) {
    let in_flight_ok = p.copies_in_flight >= 1 && p.copies_in_flight <= RING;
    let shape_ok = block_dim() == STREAM_THREADS && grid_dim() == STREAM_GRID && p.n_layers <= STREAM_MAX_LAYERS;
    if !shape_ok || !in_flight_ok || !Choice::supported(&p) {
        trap();
    }
    let sm = Smem::new();
    let t = thread_idx();
    if t == 0 {
        for slot in 0..RING {
            mbarrier_init(sm.full(slot), 1);
            mbarrier_init(sm.empty(slot), STREAM_CONSUMERS);
        }
        mbarrier_init(sm.qkv_bar(), 1);
        mbarrier_init(sm.attn_bar(), 1);
        mbarrier_init(sm.parts_bar(), 1);
        mbarrier_init(sm.seen_bar(), 1);
        fence_mbarrier_init();
        // A mark a block does not reach reads 0.
        for i in 0..STREAM_TRACE_MARKS {
            *(sm.ptr.add((SM_TRACE + 8 * i) as usize) as *mut u64) = 0;
        }
    }
    // The layers' pointers live in shared memory: after a wait that empties L1, a pointer
    // read from global memory (or spilled) is a round trip to L2 on the chain.
    let words = p.n_layers * LAYER_PTRS_WORDS;
    let mut i = t;
    while i < words {
        *(sm.ptr.add((SM_LAYERS + 4 * i) as usize) as *mut u32) = *(p.layers as *const u32).add(i as usize);
        i += STREAM_THREADS;
    }
    if t < 4 {
        *(sm.ptr.add((SM_PLAN + 4 * t) as usize) as *mut u32) =
            *(p.plan as *const u32).add((4 * block_idx() + t) as usize);
    }
    sync_threads();
    // No block may signal a peer's mbarrier before the peer has initialised it.
    cluster_sync();
    if warp() == STREAM_CONSUMER_WARPS {
        if lane() == 0 {
            load_weights(&p, sm, sm.plan());
        }
    } else {
        consume(&p, sm);
    }
    // Peers may still be storing into this block's shared memory until they are done too.
    cluster_sync();
}

// ---------------------------------------------------------------- the loader

/// Whether this block's loader holds each layer's MLP pages until its consumers have seen the
/// layer's input (`STREAM_FLAG_QUIET_HANDOFF`: blocks without attention only).
#[inline(always)]
fn quiet_handoff(p: &StreamParams, head: bool) -> bool {
    !head && p.flags & STREAM_FLAG_QUIET_HANDOFF != 0
}

/// Claims the ring page of copy `k` (waiting until the consumers freed its last use, and
/// until copy `k - in_flight` has landed) and arms its barrier for `bytes`.
#[inline(always)]
unsafe fn claim(sm: Smem, k: u32, bytes: u32, in_flight: u32) -> (u32, u32) {
    let slot = k % RING;
    let round = k / RING;
    if round > 0 {
        mbarrier_wait(sm.empty(slot), (round - 1) & 1);
    }
    if k >= in_flight {
        let landed = k - in_flight;
        mbarrier_wait(sm.full(landed % RING), (landed / RING) & 1);
    }
    mbarrier_arrive_expect_tx(sm.full(slot), bytes);
    (sm.page(slot), sm.full(slot))
}

/// The block's weights, every step, in the order the consumers take them.
#[inline(always)]
unsafe fn load_weights(p: &StreamParams, sm: Smem, plan: StreamBlockPlan) {
    let b = block_idx();
    let head = b < STREAM_HEAD_BLOCKS;
    let (g, r) = (b / STREAM_CLUSTER, b % STREAM_CLUSTER);
    let q_dim = STREAM_HEADS * HEAD_DIM;
    let kv_dim = STREAM_KV_HEADS * HEAD_DIM;
    let kv_row = if r < 4 { q_dim + HEAD_DIM * g + 32 * r } else { q_dim + kv_dim + HEAD_DIM * g + 32 * (r - 4) };
    let in_flight = p.copies_in_flight;
    let quiet = quiet_handoff(p, head);
    let mut k = 0u32;
    for step in 0..p.n_steps {
        let pos = p.start_pos + step;
        let kv_n = stream_kv_pages(pos, r);
        // Cached rows this launch wrote (positions `start_pos .. pos`) are read only after the
        // last step's token hand-off, which released them, and through the async proxy after
        // a proxy fence. Rows written before the launch need neither.
        let last_end = (KV_ROWS * (r + STREAM_CLUSTER * kv_n.max(1) - STREAM_CLUSTER + 1)).min(pos);
        let mut visible = !head || kv_n == 0 || last_end <= p.start_pos;
        for l in 0..p.n_layers {
            let lp = sm.layer(l);
            if head {
                for pg in 0..STREAM_QKV_PAGES {
                    let row = if pg < 4 { 32 * b + 8 * pg } else { kv_row + 8 * (pg - 4) };
                    let (dst, bar) = claim(sm, k, PAGE, in_flight);
                    bulk_copy_to_shared(dst, lp.wqkv + (row * ROW_BYTES) as u64, PAGE, bar);
                    k += 1;
                }
                if !visible {
                    wait_token_handoffs(p, step);
                    fence_proxy_async_global();
                    visible = true;
                }
                for i in 0..kv_n {
                    let j0 = KV_ROWS * (r + STREAM_CLUSTER * i);
                    let bytes = (pos - j0).min(KV_ROWS) * KV_ROW_BYTES;
                    let at = (g * p.max_ctx + j0) as u64 * KV_ROW_BYTES as u64;
                    let (dst, bar) = claim(sm, k, 2 * bytes, in_flight);
                    bulk_copy_to_shared(dst, lp.k_cache + at, bytes, bar);
                    bulk_copy_to_shared(dst + PAGE / 2, lp.v_cache + at, bytes, bar);
                    k += 1;
                }
                let tile = p.o_tiles + ((l * STREAM_HEAD_BLOCKS + b) * STREAM_O_PAGES) as u64 * PAGE as u64;
                for pg in 0..STREAM_O_PAGES {
                    let (dst, bar) = claim(sm, k, PAGE, in_flight);
                    bulk_copy_to_shared(dst, tile + (pg * PAGE) as u64, PAGE, bar);
                    k += 1;
                }
            }
            if quiet && l > 0 {
                // Phase `step * (n_layers - 1) + l - 1`: thread 0 saw layer l - 1's down sum
                // (thread 0 arrives only where this wait follows, so no phase goes unwaited).
                mbarrier_wait(sm.seen_bar(), (step * (p.n_layers - 1) + l - 1) & 1);
            }
            for u in 0..plan.mlp_units {
                let row = (STREAM_MLP_UNIT * (plan.mlp_start + u)) as u64 * ROW_BYTES as u64;
                let (dst, bar) = claim(sm, k, PAGE, in_flight);
                bulk_copy_to_shared(dst, lp.w_gate + row, PAGE / 2, bar);
                bulk_copy_to_shared(dst + PAGE / 2, lp.w_up + row, PAGE / 2, bar);
                k += 1;
            }
            let down = p.down_tiles + (l * STREAM_MLP_UNITS + plan.mlp_start) as u64 * STREAM_DOWN_UNIT_BYTES as u64;
            // Two units' down columns to a page (contiguous in the tile order).
            for q in 0..plan.mlp_units.div_ceil(2) {
                let bytes = if 2 * q + 1 < plan.mlp_units { PAGE } else { STREAM_DOWN_UNIT_BYTES };
                let (dst, bar) = claim(sm, k, bytes, in_flight);
                bulk_copy_to_shared(dst, down + (q * PAGE) as u64, bytes, bar);
                k += 1;
            }
        }
        let lm = p.lm_head + plan.lm_start as u64 * ROW_BYTES as u64;
        for pg in 0..plan.lm_rows / STREAM_LM_ROWS_PER_PAGE {
            let (dst, bar) = claim(sm, k, PAGE, in_flight);
            bulk_copy_to_shared(dst, lm + (pg * PAGE) as u64, PAGE, bar);
            k += 1;
        }
    }
}

// ---------------------------------------------------------------- the consumers' helpers

/// The consumers' place in the ring: the next page they take, in the loader's order.
struct Pages {
    k: u32,
}

impl Pages {
    /// Waits for the next page; its shared-window address.
    #[inline(always)]
    unsafe fn take(&self, sm: Smem) -> u32 {
        let slot = self.k % RING;
        mbarrier_wait(sm.full(slot), (self.k / RING) & 1);
        sm.page(slot)
    }
    /// This thread is done with the page. Every consumer thread frees every page: each
    /// thread's reads are then ordered before the copy that overwrites them by its own arrival
    /// (which is what racecheck follows, too).
    #[inline(always)]
    unsafe fn free(&mut self, sm: Smem) {
        mbarrier_arrive(sm.empty(self.k % RING));
        self.k += 1;
    }
}

#[inline(always)]
fn consumers_sync() {
    named_barrier(CONSUMER_BARRIER, STREAM_CONSUMERS);
}

/// A lane's share of a 1024-wide input vector: elements `256 c + 8 lane .. + 8`, c = 0..4,
/// matching a row's 16-byte chunks in shared memory.
#[inline(always)]
unsafe fn lane_vector(v: *const f32) -> [f32; 32] {
    let mut x = [0.0f32; 32];
    let l = lane() as usize;
    unroll!(4, c, {
        unroll!(8, e, {
            x[8 * c + e] = *v.add(256 * c + 8 * l + e);
        });
    });
    x
}

/// A 1024-wide bf16 row in shared memory times the lane vector: this lane's part of the dot
/// product, in four independent chains.
#[inline(always)]
unsafe fn row_part(row: u32, x: &[f32; 32]) -> f32 {
    let mut acc = [0.0f32; 4];
    unroll!(4, c, {
        let w = ld_shared_v4(row + (256 * c as u32 + 8 * lane()) * 2);
        unroll!(4, j, {
            let (lo, hi) = bf16x2_to_f32(w[j]);
            acc[c] = fma(lo, x[8 * c + 2 * j], acc[c]);
            acc[c] = fma(hi, x[8 * c + 2 * j + 1], acc[c]);
        });
    });
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// Row `warp()` of each of the ring's next `n` pages times the lane vector. The dot products
/// are summed over the warp eight pages at a time (`warp_sum8`), so a page costs its loads and
/// FMAs and is freed at once; `out(i, d)` gets page `i`'s, on one lane of the four that hold it.
#[inline(always)]
unsafe fn page_rows(sm: Smem, pages: &mut Pages, n: u32, x: &[f32; 32], mut out: impl FnMut(u32, f32)) {
    page_groups(sm, pages, n, x, |i, d, holds| {
        if holds {
            out(i, d)
        }
    });
}

/// `page_rows` for callers that shuffle and vote: `out(i, d, holds)` runs on every lane of the
/// warp once per eight pages, lane `l` with page `i`'s dot product where `holds` (the first of
/// the four lanes that hold it, and `i < n`).
#[inline(always)]
unsafe fn page_groups(sm: Smem, pages: &mut Pages, n: u32, x: &[f32; 32], mut out: impl FnMut(u32, f32, bool)) {
    let w = warp();
    let mut first = 0;
    while first < n {
        let mut parts = [0.0f32; 8];
        unroll!(8, i, {
            if first + (i as u32) < n {
                let page = pages.take(sm);
                parts[i] = row_part(page + w * ROW_BYTES, x);
                pages.free(sm);
            }
        });
        let d = warp_sum8(parts);
        let i = first + ((lane() >> 2) & 7);
        out(i, d, lane() % 4 == 0 && i < n);
        first += 8;
    }
}

/// Thread `t`'s four bf16 of a norm weight (`norm_words`), asked for before the wait that
/// precedes the norm so that they are not a round trip on the chain after it.
#[inline(always)]
unsafe fn norm_words(weight: u64) -> [u32; 2] {
    ld_cg_v2((weight as *const u32).add(2 * thread_idx() as usize))
}

/// RMSNorm of the residual (thread `t` holds elements `4 t .. 4 t + 4`) times the weight
/// (`norm_words`), into the XN room; the sum of squares meets in a fixed order, so every
/// block gets the same bits.
#[inline(always)]
unsafe fn norm_to_shared(sm: Smem, x: [f32; 4], weight: [u32; 2], eps: f32) {
    let t = thread_idx();
    let red = sm.f32s(SM_RED);
    let ss = warp_sum(x[0] * x[0] + x[1] * x[1] + x[2] * x[2] + x[3] * x[3]);
    if lane() == 0 {
        *red.add(warp() as usize) = ss;
    }
    consumers_sync();
    let mut total = 0.0f32;
    unroll!(8, w, {
        total += *red.add(w);
    });
    let inv = rsqrt(total / STREAM_HIDDEN as f32 + eps);
    let wt = bf16x4_to_f32(weight);
    let xn = sm.f32s(SM_XN);
    unroll!(4, i, {
        *xn.add(4 * t as usize + i) = (x[i] * inv) * wt[i];
    });
    consumers_sync();
}

#[inline(always)]
fn encode_part(v: f32) -> u64 {
    let c = fminf(fmaxf(v, -STREAM_CLAMP), STREAM_CLAMP);
    let fixed = f32_to_i64_nearest(c * (1u64 << STREAM_FIXED_BITS) as f32);
    ((1u64 << STREAM_COUNT_SHIFT) + STREAM_BIAS).wrapping_add(fixed as u64)
}

/// Waits until this thread's four words of a hand-off sum hold `count` contributions each;
/// their values (the new residual stream, elements `4 t .. 4 t + 4`).
#[inline(always)]
unsafe fn poll_sums(words: *const u64, count: u32, spin_limit: u32, gap_cycles: u32) -> [f32; 4] {
    let p = words.add(4 * thread_idx() as usize);
    let want = count as u64;
    let mut tries = 0u32;
    loop {
        tries += 1;
        if tries > spin_limit {
            trap();
        }
        let a = ld_relaxed_v2_u64(p);
        let b = ld_relaxed_v2_u64(p.add(2));
        let w = [a[0], a[1], b[0], b[1]];
        let done = (w[0] >> STREAM_COUNT_SHIFT) == want
            && (w[1] >> STREAM_COUNT_SHIFT) == want
            && (w[2] >> STREAM_COUNT_SHIFT) == want
            && (w[3] >> STREAM_COUNT_SHIFT) == want;
        // The warp leaves together (its lanes' words complete within the same few adds).
        if ballot(!done) == 0 {
            let mut out = [0.0f32; 4];
            let mask = (1u64 << STREAM_COUNT_SHIFT) - 1;
            let bias = (STREAM_BIAS * want) as i64;
            let scale = 1.0 / (1u64 << STREAM_FIXED_BITS) as f32;
            unroll!(4, i, {
                out[i] = ((w[i] & mask) as i64 - bias) as f32 * scale;
            });
            return out;
        }
        // Idle until the next poll (`StreamParams::poll_gap_cycles`). Not `nanosleep`: with it
        // ptxas spills.
        let t0 = clock64();
        while clock64().wrapping_sub(t0) < gap_cycles as u64 {}
    }
}

/// The block's parts (the PARTS room, all 1024 outputs) summed with the cluster's: rank `r`
/// sums eighth `r` of every block's parts, in rank order, adds the residual if asked (cluster
/// 0), and adds the result into the global sums `dest`.
#[inline(always)]
unsafe fn cluster_sum(sm: Smem, parity: u32, dest: *mut u64, add_residual: bool) {
    let t = thread_idx();
    let rank = block_idx() % STREAM_CLUSTER;
    if t == 0 {
        mbarrier_arrive_expect_tx(sm.parts_bar(), STREAM_CLUSTER * 128 * 4);
    }
    let (peer, chunk) = (t / 32, t % 32);
    let src = sm.f32s(SM_PARTS).add((128 * peer + 4 * chunk) as usize) as *const u32;
    let v = [*src, *src.add(1), *src.add(2), *src.add(3)];
    let remote = cluster_address(sm.addr(SM_PARTS_RECV + 4 * (128 * rank + 4 * chunk)), peer);
    st_async_v4(remote, v, cluster_address(sm.parts_bar(), peer));
    mbarrier_wait_cluster(sm.parts_bar(), parity);
    if t < 128 {
        let recv = sm.f32s(SM_PARTS_RECV);
        let mut s = 0.0f32;
        unroll!(8, src, {
            s += *recv.add(128 * src + t as usize);
        });
        if add_residual {
            s += *sm.f32s(SM_X).add((128 * rank + t) as usize);
        }
        red_add_relaxed_u64(dest.add((128 * rank + t) as usize), encode_part(s));
    }
    // The residual's room is rewritten by the poll that follows.
    consumers_sync();
}

#[inline(always)]
fn best_key(v: f32, row: u32) -> u64 {
    let u = v.to_bits();
    let ordered = if u & 0x8000_0000 != 0 { !u } else { u | 0x8000_0000 };
    ((ordered as u64) << 32) | (u32::MAX - row) as u64
}

// ---------------------------------------------------------------- the consumers

#[inline(always)]
unsafe fn consume(p: &StreamParams, sm: Smem) {
    let t = thread_idx();
    let (w, l_) = (warp(), lane());
    let b = block_idx();
    let cluster = b / STREAM_CLUSTER;
    let head = b < STREAM_HEAD_BLOCKS;
    let mut pages = Pages { k: 0 };
    let set_words = stream_sum_words(p.n_layers) as usize;
    let token_slot = sm.ptr.add((SM_RED + RED_TOKEN) as usize) as *mut u32;
    // Thread 0 arrives on the seen barrier exactly where the loader waits on it.
    let quiet = quiet_handoff(p, head);
    let mut token = *(p.tokens as *const u32);
    for s in 0..p.n_steps {
        let pos = p.start_pos + s;
        let traced = p.trace != 0 && s + 1 == p.n_steps;
        mark(sm, traced, StreamMark::StepStart);
        if s > 0 {
            // Clear the other parity's sums (last step's): every block has read them, since it
            // took part in last step's token hand-off; the next to add to them comes after this
            // step's, which publishes these stores.
            let other = (p.sums as *mut u64).add(set_words * ((s + 1) & 1) as usize);
            let per = set_words.div_ceil(STREAM_GRID as usize);
            let mut i = per * b as usize + t as usize;
            while i < (per * (b as usize + 1)).min(set_words) {
                *other.add(i) = 0;
                i += STREAM_CONSUMERS as usize;
            }
        }
        let row = (p.embed as *const u32).add((token * STREAM_HIDDEN / 2 + 2 * t) as usize);
        let mut x = bf16x4_to_f32(ld_nc_v2(row));
        unroll!(4, i, {
            *sm.f32s(SM_X).add(4 * t as usize + i) = x[i];
        });
        let mut next_norm = if head { norm_words(sm.layer(0).input_norm) } else { [0; 2] };
        for l in 0..p.n_layers {
            // The cluster barriers' phases: the q/k/v and attention barriers complete once a
            // layer, the parts barrier once (down) or, in the clusters with attention, twice
            // (o, then down) a layer.
            let round = s * p.n_layers + l;
            let lp = sm.layer(l);
            let probe = if s == 0 && l == 0 && p.probe != 0 { p.probe as *mut f32 } else { core::ptr::null_mut() };
            let on = traced && l == STREAM_TRACE_LAYER;
            mark(sm, on, StreamMark::LayerStart);
            // This step's sums, from the parameter (not a pointer held through the step).
            let o_sums = (p.sums as *mut u64).add(set_words * (s & 1) as usize + (2 * l * STREAM_HIDDEN) as usize);
            let down_sums = o_sums.add(STREAM_HIDDEN as usize);
            if head {
                norm_to_shared(sm, x, next_norm, p.eps);
                mark(sm, on, StreamMark::InputNormed);
                if !probe.is_null() && b == 0 {
                    unroll!(4, i, {
                        *probe.add((STREAM_PROBE_XN + 4 * t) as usize + i) = *sm.f32s(SM_XN).add(4 * t as usize + i);
                    });
                }
                attend(p, sm, &mut pages, &lp, pos, round & 1, probe, on);
                // o: 4 pages of 256 rows x 32 columns; 4 lanes to a row, 8 columns each.
                let (q, sub) = (l_ / 4, l_ % 4);
                let a = sm.f32s(SM_ATTN_OUT).add(8 * sub as usize);
                let mut av = [0.0f32; 8];
                unroll!(8, e, {
                    av[e] = *a.add(e);
                });
                let parts = sm.f32s(SM_PARTS);
                for pg in 0..STREAM_O_PAGES {
                    let page = pages.take(sm);
                    let mut d = [0.0f32; 4];
                    unroll!(4, it, {
                        let r = 32 * w + 8 * it as u32 + q;
                        let wv = ld_shared_v4(page + r * 64 + 16 * sub);
                        unroll!(4, j, {
                            let (lo, hi) = bf16x2_to_f32(wv[j]);
                            d[it] = fma(lo, av[2 * j], d[it]);
                            d[it] = fma(hi, av[2 * j + 1], d[it]);
                        });
                    });
                    pages.free(sm);
                    // The four lanes of a row meet for all four rows at once: lane sub gets
                    // row 32 w + 8 sub + q.
                    *parts.add((256 * pg + 32 * w + 8 * sub + q) as usize) = quad_sum4(d);
                }
                mark(sm, on, StreamMark::OPages);
                consumers_sync();
                cluster_sum(sm, 0, o_sums, cluster == 0);
                mark(sm, on, StreamMark::OSumPublished);
            }
            let post_norm = norm_words(lp.post_norm);
            x = poll_sums(o_sums, STREAM_KV_HEADS, p.spin_limit, p.poll_gap_cycles);
            mark(sm, on, StreamMark::OSumSeen);
            unroll!(4, i, {
                *sm.f32s(SM_X).add(4 * t as usize + i) = x[i];
            });
            if !probe.is_null() && b == 0 {
                unroll!(4, i, {
                    *probe.add((STREAM_PROBE_X_ATTN + 4 * t) as usize + i) = x[i];
                });
            }

            // The MLP: gate and up rows of each unit (warp w: row w of the page), then down.
            norm_to_shared(sm, x, post_norm, p.eps);
            let xv = lane_vector(sm.f32s(SM_XN));
            let gu = sm.f32s(SM_GATE_UP);
            let units = sm.plan().mlp_units;
            page_rows(sm, &mut pages, units, &xv, |u, d| *gu.add((8 * u + w) as usize) = d);
            mark(sm, on, StreamMark::GateUpPages);
            consumers_sync();
            // SiLU(gate) * up once per index, over the gate's word (each thread its own).
            if t < STREAM_MLP_UNIT * units {
                let at = (8 * (t / 4) + t % 4) as usize;
                let (g, up) = (*gu.add(at), *gu.add(at + 4));
                *gu.add(at) = g / (1.0 + exp(-g)) * up;
            }
            consumers_sync();
            let mut acc = [0.0f32; 4];
            for q in 0..units.div_ceil(2) {
                let page = pages.take(sm);
                unroll!(2, half, {
                    let u = 2 * q + half as u32;
                    if u < units {
                        let mut act = [0.0f32; 4];
                        unroll!(4, i, {
                            act[i] = *gu.add(8 * u as usize + i);
                        });
                        let cols = page + half as u32 * STREAM_DOWN_UNIT_BYTES;
                        unroll!(4, i, {
                            let wv = bf16x4_to_f32(ld_shared_v2(cols + (t + 256 * i as u32) * 8));
                            unroll!(4, c, {
                                acc[i] = fma(wv[c], act[c], acc[i]);
                            });
                        });
                    }
                });
                pages.free(sm);
            }
            mark(sm, on, StreamMark::DownPages);
            let parts = sm.f32s(SM_PARTS);
            unroll!(4, i, {
                *parts.add(t as usize + 256 * i) = acc[i];
            });
            consumers_sync();
            cluster_sum(sm, if head { 1 } else { round & 1 }, down_sums, cluster == 0);
            mark(sm, on, StreamMark::DownSumPublished);
            // The next norm's weight: the next layer's input norm (head blocks) or the final one.
            if l + 1 == p.n_layers {
                next_norm = norm_words(p.final_norm);
            } else if head {
                next_norm = norm_words(sm.layer(l + 1).input_norm);
            }
            x = poll_sums(down_sums, STREAM_CLUSTERS, p.spin_limit, p.poll_gap_cycles);
            mark(sm, on, StreamMark::DownSumSeen);
            if t == 0 && quiet && l + 1 < p.n_layers {
                mbarrier_arrive(sm.seen_bar());
            }
            unroll!(4, i, {
                *sm.f32s(SM_X).add(4 * t as usize + i) = x[i];
            });
            if !probe.is_null() && b == 0 {
                unroll!(4, i, {
                    *probe.add((STREAM_PROBE_X_MLP + 4 * t) as usize + i) = x[i];
                });
            }
        }

        // The LM head: warp w takes row w of every page; the block's best (or its 32 best, for
        // a top-k draw) goes to the grid.
        norm_to_shared(sm, x, next_norm, p.eps);
        let xv = lane_vector(sm.f32s(SM_XN));
        mark(sm, traced, StreamMark::LmHeadStart);
        let last = s + 1 == p.n_steps && p.flags & STREAM_FLAG_LOGITS != 0;
        // Prompt steps feed the next prompt token: nothing to draw.
        let choice = if s + 1 < p.prompt_len { Choice::Greedy } else { Choice::of(p) };
        let inv_t = 1.0 / p.temperature;
        let seed = (p.seed_hi as u64) << 32 | p.seed_lo as u64;
        // Each lane keeps the best of the rows it was handed; the warp's best meets once. For
        // top-k the warp keeps its 32 best rows (`top`: lane l the l-th; `top_last` lane 31's).
        let plan = sm.plan();
        let (mut best, mut best_row) = (f32::NEG_INFINITY, plan.lm_start);
        let (mut top, mut top_last) = (0u64, 0u64);
        page_groups(sm, &mut pages, plan.lm_rows / STREAM_LM_ROWS_PER_PAGE, &xv, |pg, d, holds| {
            let row = plan.lm_start + STREAM_LM_ROWS_PER_PAGE * pg + w;
            if holds {
                // Gumbel-max: argmax(logit / T + noise of (seed, position, row)) is a draw from
                // softmax(logit / T), the megakernel's noise, so the same token from the same logits.
                let score = if choice == Choice::Gumbel { d * inv_t + gumbel(hash3(seed, pos, row)) } else { d };
                if score > best {
                    best = score;
                    best_row = row;
                }
                if last {
                    *(p.logits_out as *mut f32).add(row as usize) = d;
                }
            }
            if choice == Choice::TopK {
                // Eight rows a call: only those that beat the list's last go in, one by one.
                let key = if holds { candidate_key(d, row) } else { 0 };
                let mut better = ballot(key > top_last);
                while better != 0 {
                    let from = better.trailing_zeros();
                    better &= better - 1;
                    top32_insert(&mut top, &mut top_last, shfl_idx_u64(key, from));
                }
            }
        });
        mark(sm, traced, StreamMark::LmHeadPages);
        let mut key = best_key(best, best_row);
        let mut m = 16;
        while m > 0 {
            key = key.max(shfl_xor_u64(key, m));
            m >>= 1;
        }
        let keys = sm.ptr.add(SM_RED as usize) as *mut u64;
        if l_ == 0 {
            *keys.add(w as usize) = key;
        }
        // The warps' lists, in the attention partials' room (free until the next layer).
        let lists = sm.ptr.add(SM_WARP_PART as usize) as *mut u64;
        if choice == Choice::TopK {
            *lists.add((TOP * w + l_) as usize) = top;
        }
        consumers_sync();
        let candidates = (p.candidates as *mut u64).add(((s & 1) * STREAM_GRID * TOP) as usize);
        if choice == Choice::TopK && w == 0 {
            let merged = warp_lists_merged(lists);
            *candidates.add((TOP * b + l_) as usize) = merged;
            // Every lane's store is ordered before thread 0's release below.
            sync_warp();
        }
        let best_word = (p.best as *mut u64).add(s as usize);
        if t == 0 {
            let mut key = 0u64;
            unroll!(8, i, {
                key = key.max(*keys.add(i));
            });
            if choice != Choice::TopK {
                red_max_relaxed_u64(best_word, key);
            }
            // Release: this block's KV cache rows, cleared sums, logits and list go with it.
            let arrivals = p.arrivals as *mut u32;
            red_add_release(arrivals, 1);
            wait_token_handoffs(p, s + 1);
        }
        let chosen = if choice == Choice::TopK {
            consumers_sync();
            draw_top_k(p, sm, candidates, pos, inv_t, seed)
        } else if t == 0 {
            u32::MAX - ld_cg_u64(best_word) as u32
        } else {
            0
        };
        if t == 0 {
            let next = if s + 1 < p.prompt_len { *(p.tokens as *const u32).add(s as usize + 1) } else { chosen };
            if b == 0 && s + 1 >= p.prompt_len {
                *(p.tokens as *mut u32).add(s as usize + 1) = chosen;
            }
            *token_slot = next;
            mark(sm, traced, StreamMark::TokenKnown);
            if traced {
                let out = (p.trace as *mut u64).add((b * STREAM_TRACE_MARKS) as usize);
                let marks = sm.ptr.add(SM_TRACE as usize) as *const u64;
                for i in 0..STREAM_TRACE_MARKS as usize {
                    *out.add(i) = *marks.add(i);
                }
            }
        }
        consumers_sync();
        token = *token_slot;
        consumers_sync();
    }
}

/// How a step past the prompt chooses its token (`StreamParams::temperature`, `top_k`).
#[derive(Clone, Copy, PartialEq)]
enum Choice {
    /// The arg-max, ties to the lowest id.
    Greedy,
    /// Temperature alone: the Gumbel-max, folded into each block's best.
    Gumbel,
    /// Top-k (and top-p within it): a draw from the vocabulary's 32 best (`draw_top_k`).
    TopK,
}

impl Choice {
    #[inline(always)]
    fn of(p: &StreamParams) -> Choice {
        if !(p.temperature > 0.0) {
            Choice::Greedy
        } else if p.top_k == 0 {
            Choice::Gumbel
        } else {
            Choice::TopK
        }
    }
    /// What the kernel can draw (the host refuses the rest before it launches).
    #[inline(always)]
    fn supported(p: &StreamParams) -> bool {
        !(p.temperature > 0.0) || (p.top_k <= STREAM_MAX_TOP_K && (p.top_k > 0 || p.top_p >= 1.0))
    }
}

/// Run by one warp: the 32 best of the eight consumer warps' lists in the LISTS room.
#[inline(always)]
unsafe fn warp_lists_merged(lists: *const u64) -> u64 {
    let mut got = [0u64; STREAM_CONSUMER_WARPS as usize];
    unroll!(8, ww, {
        got[ww] = *lists.add(TOP as usize * ww + lane() as usize);
    });
    top32_merge_tree(got)
}

/// Every consumer thread, after the token hand-off of a top-k step: the vocabulary's 32 best
/// from the blocks' lists (warp w merges blocks w, w + 8, ..., all its loads asked for at
/// once, then warp 0 the warps'), and the draw (`sample_top32`) with the step's uniform of
/// (seed, position), as the megakernel draws. The merged list does not depend on the order of
/// the merges (the keys are distinct), so every block draws the same token. Returns it on
/// warp 0 (garbage elsewhere).
#[inline(always)]
unsafe fn draw_top_k(p: &StreamParams, sm: Smem, candidates: *const u64, pos: u32, inv_t: f32, seed: u64) -> u32 {
    const PER_WARP: u32 = STREAM_GRID / STREAM_CONSUMER_WARPS;
    const _: () = assert!(PER_WARP * STREAM_CONSUMER_WARPS == STREAM_GRID && PER_WARP <= 16);
    let (w, l_) = (warp(), lane());
    // A sixteenth list of zeros, empty, when there are fifteen.
    let mut got = [0u64; 16];
    unroll!(16, j, {
        if (j as u32) < PER_WARP {
            got[j] = ld_cg_u64(candidates.add((TOP * (w + STREAM_CONSUMER_WARPS * j as u32) + l_) as usize));
        }
    });
    let merged = top32_merge_tree(got);
    let lists = sm.ptr.add(SM_WARP_PART as usize) as *mut u64;
    // Warp 0 read its own list from here before the hand-off; every warp has passed a barrier since.
    *lists.add((TOP * w + l_) as usize) = merged;
    consumers_sync();
    let mut chosen = 0;
    if w == 0 {
        let top = warp_lists_merged(lists);
        // The largest logit / T: the same product the megakernel's log-sum-exp keeps.
        let max_scaled = candidate_logit(shfl_idx_u64(top, 0)) * inv_t;
        let u = uniform(hash3(seed, pos, u32::MAX));
        let drawn = sample_top32(top, inv_t, max_scaled, 0.0, p.top_k, p.top_p, u);
        chosen = drawn.unwrap_or(candidate_row(shfl_idx_u64(top, 0)));
    }
    // The lists' room is the attention's again after this.
    consumers_sync();
    chosen
}

/// q/k/v, the cluster's exchange, q/k norm + RoPE + the KV append, attention over the cached
/// positions and the merge: leaves this block's 32 dims of the attention output in ATTN_OUT.
#[inline(always)]
unsafe fn attend(
    p: &StreamParams,
    sm: Smem,
    pages: &mut Pages,
    lp: &LayerPtrs,
    pos: u32,
    parity: u32,
    probe: *mut f32,
    on: bool,
) {
    let t = thread_idx();
    let (w, l_) = (warp(), lane());
    let b = block_idx();
    let (g, rank) = (b / STREAM_CLUSTER, b % STREAM_CLUSTER);

    // Warps 0-2's q/k norm weights and RoPE factors depend on nothing this step computes: ask
    // for them now, so that they are here when the exchange is (not a round trip after it).
    let half = (HEAD_DIM / 2) as usize;
    let (mut nw, mut cos, mut sin) = ([0u16; 4], [0.0f32; 2], [0.0f32; 2]);
    if w < 3 {
        let weight = if w < 2 { lp.q_norm } else { lp.k_norm } as *const u16;
        unroll!(4, i, {
            nw[i] = ld_cg_u16(weight.add(l_ as usize + 32 * i));
        });
        unroll!(2, i, {
            let j = pos as usize * half + l_ as usize + 32 * i;
            cos[i] = ld_cg_f32((p.rope_cos as *const f32).add(j));
            sin[i] = ld_cg_f32((p.rope_sin as *const f32).add(j));
        });
    }

    // q/k/v rows: warp w takes row w of each of the 8 pages.
    let xv = lane_vector(sm.f32s(SM_XN));
    let own = sm.f32s(SM_QKV_OWN);
    page_rows(sm, pages, STREAM_QKV_PAGES, &xv, |pg, d| *own.add((8 * pg + w) as usize) = d);
    mark(sm, on, StreamMark::QkvPages);
    consumers_sync();
    if !probe.is_null() && t < 64 {
        let q_dim = STREAM_HEADS * HEAD_DIM;
        let kv_dim = STREAM_KV_HEADS * HEAD_DIM;
        let kv_row = if rank < 4 { q_dim + HEAD_DIM * g + 32 * rank } else { q_dim + kv_dim + HEAD_DIM * g + 32 * (rank - 4) };
        let row = if t < 32 { 32 * b + t } else { kv_row + t - 32 };
        *probe.add((STREAM_PROBE_QKV + row) as usize) = *own.add(t as usize);
    }
    if t == 0 {
        mbarrier_arrive_expect_tx(sm.qkv_bar(), STREAM_CLUSTER * 64 * 4);
    }
    if t < 128 {
        let (peer, chunk) = (t / 16, t % 16);
        let src = own.add(4 * chunk as usize) as *const u32;
        let v = [*src, *src.add(1), *src.add(2), *src.add(3)];
        let remote = cluster_address(sm.addr(SM_QKV_RECV + 4 * (64 * rank + 4 * chunk)), peer);
        st_async_v4(remote, v, cluster_address(sm.qkv_bar(), peer));
    }
    mbarrier_wait_cluster(sm.qkv_bar(), parity);
    mark(sm, on, StreamMark::QkvExchanged);

    // Warps 0-3: q head 0, q head 1, k, v. Lane dims lane + 32 i; rank 4 h + i sent dims
    // 32 i .. of q head h (words 0..32), rank i (k) or 4 + i (v) dims 32 i .. (words 32..64).
    let qkv = sm.f32s(SM_QKV);
    if w < 4 {
        let recv = sm.f32s(SM_QKV_RECV);
        let (rank0, word0) = match w {
            0 => (0, 0),
            1 => (4, 0),
            2 => (0, 32),
            _ => (4, 32),
        };
        let mut v = [0.0f32; 4];
        unroll!(4, i, {
            v[i] = *recv.add(64 * (rank0 + i) + word0 + l_ as usize);
        });
        if w < 3 {
            let ss = warp_sum(v[0] * v[0] + v[1] * v[1] + v[2] * v[2] + v[3] * v[3]);
            let inv = rsqrt(ss / HEAD_DIM as f32 + p.eps);
            let mut n = [0.0f32; 4];
            unroll!(4, i, {
                n[i] = (v[i] * inv) * bf16_to_f32(nw[i]);
            });
            unroll!(2, i, {
                v[i] = n[i] * cos[i] - n[i + 2] * sin[i];
                v[i + 2] = n[i + 2] * cos[i] + n[i] * sin[i];
            });
        }
        if w >= 2 {
            // The cache holds bf16: the new position is attended as it will be read later.
            let cache = (if w == 2 { lp.k_cache } else { lp.v_cache }) as *mut u16;
            let at = cache.add(((g * p.max_ctx + pos) * HEAD_DIM) as usize);
            unroll!(4, i, {
                let bits = f32_to_bf16(v[i]);
                v[i] = bf16_to_f32(bits);
                if rank == 0 {
                    *at.add(l_ as usize + 32 * i) = bits;
                }
            });
        }
        unroll!(4, i, {
            *qkv.add(128 * w as usize + l_ as usize + 32 * i) = v[i];
        });
    }
    consumers_sync();
    mark(sm, on, StreamMark::QkvRotated);
    if !probe.is_null() && b == 0 {
        let recv = sm.f32s(SM_QKV_RECV);
        *probe.add((STREAM_PROBE_RECV + t) as usize) = *recv.add(t as usize);
        *probe.add((STREAM_PROBE_RECV + 256 + t) as usize) = *recv.add(256 + t as usize);
        *probe.add((STREAM_PROBE_ATTENDED + t) as usize) = *qkv.add(t as usize);
        *probe.add((STREAM_PROBE_ATTENDED + 256 + t) as usize) = *qkv.add(256 + t as usize);
    }

    // Attention: the cluster's blocks take the cached positions page by page
    // (`stream_kv_pages`), the loader's copies of their k and v rows. A block with up to
    // FEW_PAGES pages folds each with all its warps (`fold_rows`); one with more gives its
    // pages to its warps in turn, two warps a page (`fold_half`), so that up to four pages are
    // attended at once and a page's rows take half as long as on one warp. The new position
    // (in shared memory) is folded in by warp 0 of the block after the last page's
    // (`stream_new_position_rank`).
    let mut st = SoftmaxState::new();
    let d0 = 4 * l_ as usize;
    let mut q_lane = [[0.0f32; 4]; 2];
    unroll!(4, i, {
        q_lane[0][i] = *qkv.add(d0 + i) * SCORE_SCALE;
        q_lane[1][i] = *qkv.add(128 + d0 + i) * SCORE_SCALE;
    });
    let kv_n = stream_kv_pages(pos, rank);
    if kv_n <= FEW_PAGES {
        // One page: the whole block on it, which finishes it sooner than two warps.
        for i in 0..kv_n {
            let page = pages.take(sm);
            if i == 0 {
                mark(sm, on, StreamMark::CachedPageIn);
            }
            st.fold_rows(&q_lane, page, KV_ROWS * (rank + STREAM_CLUSTER * i), pos);
            pages.free(sm);
        }
    } else {
        let q = PageQ::load(qkv);
        for i in 0..kv_n {
            // Every thread waits for every page, its own or not: an arrival on a slot's empty
            // barrier must not run ahead of the copy it frees.
            let page = pages.take(sm);
            if i == 0 {
                mark(sm, on, StreamMark::CachedPageIn);
            }
            // Warp w takes half w % 2 of the pages i with i % 4 == w / 2.
            if i % (STREAM_CONSUMER_WARPS / 2) == w / 2 {
                let half = w % 2;
                let j0 = KV_ROWS * (rank + STREAM_CLUSTER * i) + HALF_ROWS * half;
                let n = pos.saturating_sub(j0).min(HALF_ROWS);
                if n == HALF_ROWS {
                    st.fold_half::<true>(&q, page, half, n);
                } else if n > 0 {
                    st.fold_half::<false>(&q, page, half, n);
                }
            }
            pages.free(sm);
        }
    }
    if rank == stream_new_position_rank(pos) && w == 0 {
        let (mut k, mut v) = ([0.0f32; 4], [0.0f32; 4]);
        unroll!(4, i, {
            k[i] = *qkv.add(256 + d0 + i);
            v[i] = *qkv.add(384 + d0 + i);
        });
        st.fold_one(&q_lane, &k, &v);
    }
    let SoftmaxState { m: [m0, m1], s: [s0, s1], a: [a0, a1] } = st;
    let (s0, s1) = (warp_sum(s0), warp_sum(s1));
    mark(sm, on, StreamMark::CachedPositions);
    let part = sm.f32s(SM_WARP_PART);
    let mine0 = part.add((2 * w * WARP_PART_WORDS) as usize);
    let mine1 = mine0.add(WARP_PART_WORDS as usize);
    if l_ == 0 {
        *mine0 = m0;
        *mine0.add(1) = s0;
        *mine1 = m1;
        *mine1.add(1) = s1;
    }
    unroll!(4, i, {
        *mine0.add(4 + d0 + i) = a0[i];
        *mine1.add(4 + d0 + i) = a1[i];
    });
    consumers_sync();

    if !probe.is_null() && b == 0 && t < 2 * WARP_PART_WORDS {
        *probe.add((STREAM_PROBE_WARP_PART + t) as usize) = *part.add(t as usize);
    }
    // The block's partial for (head h, dim d) = thread t, sent to the owner of those dims.
    let (h, d) = (t / 128, t % 128);
    let mut mx = f32::NEG_INFINITY;
    unroll!(8, ww, {
        mx = fmaxf(mx, *part.add(((2 * ww as u32 + h) * WARP_PART_WORDS) as usize));
    });
    let (mut sum, mut acc) = (0.0f32, 0.0f32);
    unroll!(8, ww, {
        let wp = part.add(((2 * ww as u32 + h) * WARP_PART_WORDS) as usize);
        let m = *wp;
        let f = if m == f32::NEG_INFINITY { 0.0 } else { exp2(m - mx) };
        sum = fma(*wp.add(1), f, sum);
        acc = fma(*wp.add(4 + d as usize), f, acc);
    });
    if t == 0 {
        mbarrier_arrive_expect_tx(sm.attn_bar(), STREAM_CLUSTER * (8 + 32 * 4));
    }
    let owner = 4 * h + d / 32;
    let slot = sm.addr(SM_ATTN_RECV + 4 * ATTN_RECV_WORDS * rank);
    let owner_bar = cluster_address(sm.attn_bar(), owner);
    if d % 32 == 0 {
        st_async_v2(cluster_address(slot, owner), [mx.to_bits(), sum.to_bits()], owner_bar);
    }
    st_async_b32(cluster_address(slot + 4 * (2 + d % 32), owner), acc.to_bits(), owner_bar);
    mbarrier_wait_cluster(sm.attn_bar(), parity);
    if !probe.is_null() && b == 0 {
        let recv = sm.f32s(SM_ATTN_RECV);
        *probe.add((STREAM_PROBE_ATTN_RECV + t) as usize) = *recv.add(t as usize);
        if t < 32 {
            *probe.add((STREAM_PROBE_ATTN_RECV + 256 + t) as usize) = *recv.add(256 + t as usize);
        }
    }
    if t < 32 {
        let recv = sm.f32s(SM_ATTN_RECV);
        let mut mx = f32::NEG_INFINITY;
        unroll!(8, src, {
            mx = fmaxf(mx, *recv.add(ATTN_RECV_WORDS as usize * src));
        });
        let (mut sum, mut acc) = (0.0f32, 0.0f32);
        unroll!(8, src, {
            let r = recv.add(ATTN_RECV_WORDS as usize * src);
            let m = *r;
            let f = if m == f32::NEG_INFINITY { 0.0 } else { exp2(m - mx) };
            sum = fma(*r.add(1), f, sum);
            acc = fma(*r.add(2 + t as usize), f, acc);
        });
        *sm.f32s(SM_ATTN_OUT).add(t as usize) = acc / sum;
        if !probe.is_null() {
            *probe.add((STREAM_PROBE_ATTN + 32 * b + t) as usize) = acc / sum;
        }
    }
    mark(sm, on, StreamMark::AttentionMerged);
    consumers_sync();
}

/// Up to this many cached pages a block folds with `fold_rows`, beyond with `fold_half`.
const FEW_PAGES: u32 = 1;

/// Cached positions one warp folds at a time beyond `FEW_PAGES`: half a page.
const HALF_ROWS: u32 = KV_ROWS / 2;

/// q's factor for scores in log2 units: 1/sqrt(head_dim), times log2(e) for `exp2`.
const SCORE_SCALE: f32 = 0.088388347648318440550 * LOG2_E;
const _: () = assert!(HEAD_DIM == 128);

/// A warp's running softmax over the positions it attended, for both q heads of its kv head
/// (log2 units): the max (the same on every lane), each lane's part of the sum of weights,
/// and the weighted sum of v over the lane's dims `4 lane .. 4 lane + 4`.
struct SoftmaxState {
    m: [f32; 2],
    s: [f32; 2],
    a: [[f32; 4]; 2],
}

impl SoftmaxState {
    #[inline(always)]
    fn new() -> SoftmaxState {
        SoftmaxState { m: [f32::NEG_INFINITY; 2], s: [0.0; 2], a: [[0.0; 4]; 2] }
    }

    /// Scores `score[h]` (this lane's position; -inf for none) folded in for head `h`: the new
    /// max over the warp, the old state scaled to it; the weights returned.
    #[inline(always)]
    fn rescale(&mut self, score: [f32; 2]) -> [f32; 2] {
        let mut p = [0.0f32; 2];
        unroll!(2, h, {
            // Finite: every fold has a position for each head (`fold_half`: lanes 0 and 4).
            let mx = fmaxf(self.m[h], warp_max(score[h]));
            let corr = exp2(self.m[h] - mx);
            p[h] = exp2(score[h] - mx);
            self.s[h] = fma(self.s[h], corr, p[h]);
            unroll!(4, i, {
                self.a[h][i] *= corr;
            });
            self.m[h] = mx;
        });
        p
    }

    /// The first `n` (1 ..= 16) positions of half `half` of a ring page (16 of its 32 k rows,
    /// then the same v rows). Scores: lane `8 p + g` takes rows `p + 4 i` (i = 0..4) of the
    /// half over its dims of q (`PageQ`), for both heads; the eight lanes of a row group meet
    /// in one butterfly that leaves lane g with head `g / 4`'s score of row `p + 4 (g % 4)`,
    /// so every (row, head) weight is computed once. Values: each lane adds its dims
    /// `4 lane ..` of every row, the weights passed lane to lane. `FULL`: all 16 rows are
    /// positions, no branch; otherwise the rows past `n` are skipped, a uniform branch each.
    #[inline(always)]
    unsafe fn fold_half<const FULL: bool>(&mut self, q: &PageQ, page: u32, half: u32, n: u32) {
        let (p, g) = (lane() / 8, lane() % 8);
        let k_rows = page + HALF_ROWS * half * KV_ROW_BYTES;
        let mut dots = [0.0f32; 8];
        unroll!(4, i, {
            if FULL || (4 * i as u32) < n {
                let row = k_rows + (p + 4 * i as u32) * KV_ROW_BYTES + 16 * g;
                // Chunks g and g + 8 of the row: the eight lanes of a quarter-warp read eight
                // different bank groups.
                let k = [ld_shared_v4(row), ld_shared_v4(row + 128)];
                unroll!(2, h, {
                    let mut d = [0.0f32; 2];
                    unroll!(2, c, {
                        unroll!(4, e, {
                            let (lo, hi) = bf16x2_to_f32(k[c][e]);
                            d[c] = fma(q.v[h][c][2 * e], lo, d[c]);
                            d[c] = fma(q.v[h][c][2 * e + 1], hi, d[c]);
                        });
                    });
                    dots[4 * h + i] = d[0] + d[1];
                });
            }
        });
        let d = group8_sum8(dots);
        let row = p + 4 * (g % 4);
        // Rows past the cached positions hold an older page's bytes: never scored.
        let d = if FULL || row < n { d } else { f32::NEG_INFINITY };
        let score = if g < 4 { [d, f32::NEG_INFINITY] } else { [f32::NEG_INFINITY, d] };
        let w = self.rescale(score);
        let v_rows = k_rows + PAGE / 2 + 8 * lane();
        unroll!(4, a, {
            unroll!(4, b, {
                // Row 4 a + b: its weights are lanes 8 b + a's (head 0) and 8 b + 4 + a's.
                let r = 4 * a as u32 + b as u32;
                if FULL || r < n {
                    let w0 = shfl_idx_f32(w[0], 8 * b as u32 + a as u32);
                    let w1 = shfl_idx_f32(w[1], 8 * b as u32 + 4 + a as u32);
                    let v = bf16x4_to_f32(ld_shared_v2(v_rows + r * KV_ROW_BYTES));
                    unroll!(4, j, {
                        self.a[0][j] = fma(w0, v[j], self.a[0][j]);
                        self.a[1][j] = fma(w1, v[j], self.a[1][j]);
                    });
                }
            });
        });
    }

    /// Rows `warp + 8 e` (e = 0..4) of a page whose first row is position `j0`, those before
    /// `pos`: every warp of the block takes four rows of the same page (lane dims, as `a`).
    #[inline(always)]
    unsafe fn fold_rows(&mut self, q: &[[f32; 4]; 2], page: u32, j0: u32, pos: u32) {
        let (w, l) = (warp(), lane());
        let mut k = [[0.0f32; 4]; 4];
        let mut v = [[0.0f32; 4]; 4];
        let mut valid = [false; 4];
        unroll!(4, e, {
            let row = w + STREAM_CONSUMER_WARPS * e as u32;
            // Rows past the cached positions hold an older page's bytes: never read as values.
            valid[e] = j0 + row < pos;
            if valid[e] {
                let at = page + row * KV_ROW_BYTES + 8 * l;
                k[e] = bf16x4_to_f32(ld_shared_v2(at));
                v[e] = bf16x4_to_f32(ld_shared_v2(at + PAGE / 2));
            }
        });
        // The eight dot products (head h, row e: index 4 h + e) reduced together, then each
        // taken from a lane that holds it.
        let mut dots = [0.0f32; 8];
        unroll!(2, h, {
            unroll!(4, e, {
                dots[4 * h + e] = q[h][0] * k[e][0] + q[h][1] * k[e][1] + q[h][2] * k[e][2] + q[h][3] * k[e][3];
            });
        });
        let total = warp_sum8(dots);
        unroll!(2, h, {
            let mut score = [f32::NEG_INFINITY; 4];
            let mut mx = self.m[h];
            unroll!(4, e, {
                let d = shfl_idx_f32(total, 16 * h as u32 + 4 * e as u32);
                if valid[e] {
                    score[e] = d;
                }
                mx = fmaxf(mx, score[e]);
            });
            // Warp-uniform: no row of this warp is a position.
            if mx != f32::NEG_INFINITY {
                let corr = exp2(self.m[h] - mx);
                let mut p = [0.0f32; 4];
                unroll!(4, e, {
                    p[e] = exp2(score[e] - mx);
                });
                // The weights are the same on every lane: lane 0 keeps their sum.
                let sum = if l == 0 { (p[0] + p[1]) + (p[2] + p[3]) } else { 0.0 };
                self.s[h] = fma(self.s[h], corr, sum);
                unroll!(4, i, {
                    let mut acc = self.a[h][i] * corr;
                    unroll!(4, e, {
                        acc = fma(p[e], v[e][i], acc);
                    });
                    self.a[h][i] = acc;
                });
                self.m[h] = mx;
            }
        });
    }

    /// One position whose k and v are in registers (lane dims, as `a`), q scaled likewise.
    #[inline(always)]
    fn fold_one(&mut self, q: &[[f32; 4]; 2], k: &[f32; 4], v: &[f32; 4]) {
        let mut dots = [0.0f32; 8];
        unroll!(2, h, {
            dots[h] = q[h][0] * k[0] + q[h][1] * k[1] + q[h][2] * k[2] + q[h][3] * k[3];
        });
        // Lanes 0-3 hold dots[0]'s sum, lanes 4-7 dots[4]'s: every lane reads both.
        let total = warp_sum8(dots);
        let score = [shfl_idx_f32(total, 0), shfl_idx_f32(total, 4)];
        let mut p = self.rescale(if lane() == 0 { score } else { [f32::NEG_INFINITY; 2] });
        unroll!(2, h, {
            p[h] = shfl_idx_f32(p[h], 0);
            unroll!(4, i, {
                self.a[h][i] = fma(p[h], v[i], self.a[h][i]);
            });
        });
    }
}

/// This lane's dims of both q heads (scaled), as `fold_half` takes them: lane `8 p + g` holds
/// dims `8 g .. 8 g + 8` and `64 + 8 g ..` of each head.
struct PageQ {
    v: [[[f32; 8]; 2]; 2],
}

impl PageQ {
    /// From the QKV room (q head 0, q head 1: 128 f32 each).
    #[inline(always)]
    unsafe fn load(qkv: *const f32) -> PageQ {
        let g = (lane() % 8) as usize;
        let mut v = [[[0.0f32; 8]; 2]; 2];
        unroll!(2, h, {
            unroll!(2, c, {
                unroll!(8, e, {
                    v[h][c][e] = *qkv.add(128 * h + 64 * c + 8 * g + e) * SCORE_SCALE;
                });
            });
        });
        PageQ { v }
    }
}
