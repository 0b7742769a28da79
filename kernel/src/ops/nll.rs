//! Teacher-forced negative log-likelihood of rows of logits: what scoring through prefill
//! computes after its LM-head GEMM (host/src/engine/score.rs). One block per row, so that a
//! row of Qwen3's 151936 logits is read once, by 128 threads side by side.
//!
//! `nll[r] = ln(sum_j exp(logits[r, j])) - logits[r, targets[r]]`, the log-sum-exp taken
//! stably: each thread keeps a running maximum `m` and `s = sum exp(v - m)`, rescaling `s`
//! when the maximum grows, so no exponential of a large logit is ever formed (a row of logits
//! near 1e4, or near f32::MAX, does not overflow). The decode kernel's LM head computes the
//! same quantity (`ops::lm_head`), fused with its GEMV; here the logits come from a GEMM in
//! global memory, written by an earlier launch (plain loads are coherent).

use crate::device::*;

/// Logits a thread folds into its running state at once: one rescale of `s` per batch.
const BATCH: u32 = 4; // the unroll! below is written for 4

/// Running log-sum-exp state of the values seen so far: `(m, s)` with `s = sum exp(v - m)`;
/// `(-inf, 0)` for none.
#[derive(Clone, Copy)]
struct Lse {
    m: f32,
    s: f32,
}

impl Lse {
    const EMPTY: Lse = Lse { m: f32::NEG_INFINITY, s: 0.0 };

    /// `s * exp(m - to)`: this state's sum relative to a maximum `to >= m` (0 when empty, where
    /// `m - to` would be `-inf - -inf`).
    #[inline(always)]
    fn sum_at(self, to: f32) -> f32 {
        if self.m == f32::NEG_INFINITY {
            0.0
        } else {
            self.s * exp(self.m - to)
        }
    }

    #[inline(always)]
    fn merge(self, o: Lse) -> Lse {
        let m = fmaxf(self.m, o.m);
        Lse { m, s: self.sum_at(m) + o.sum_at(m) }
    }
}

/// Block `r` (for `r < rows`; any block count, each takes rows `block_idx() + k * grid_dim()`)
/// writes `nll[r]` for row `r` of `logits` (f32 `[rows, vocab]`, row-major), with target id
/// `targets[r]`. A target outside the vocabulary gives NaN (the host refuses such ids first).
/// `scratch` is shared memory of 2 f32 per warp of the block.
#[inline(always)]
pub unsafe fn nll_rows(
    logits: *const f32,
    targets: *const u32,
    rows: u32,
    vocab: u32,
    nll: *mut f32,
    scratch: *mut f32,
) {
    let mut r = block_idx();
    while r < rows {
        let row = logits.add(r as usize * vocab as usize);
        let mut st = Lse::EMPTY;
        // Batches of BATCH logits, BATCH * block_dim apart: each load instruction of a warp
        // still reads 32 consecutive floats.
        let step = block_dim();
        let mut i = thread_idx();
        while i < vocab {
            let mut v = [f32::NEG_INFINITY; BATCH as usize];
            let mut bm = f32::NEG_INFINITY;
            crate::unroll!(4, K, {
                let j = i + K as u32 * step;
                if j < vocab {
                    v[K] = *row.add(j as usize);
                    bm = fmaxf(bm, v[K]);
                }
            });
            // The batch holds one logit at least (index i), so `bm` is finite for finite logits.
            let m = fmaxf(st.m, bm);
            let mut s = st.sum_at(m);
            crate::unroll!(4, K, {
                // exp(-inf - m) = 0 for a slot past the row's end.
                s += exp(v[K] - m);
            });
            st = Lse { m, s };
            i += BATCH * step;
        }
        // The warp's state, then the block's (thread 0 merges the warps').
        let wm = warp_max(st.m);
        let ws = warp_sum(st.sum_at(wm));
        if lane() == 0 {
            *scratch.add(2 * warp() as usize) = wm;
            *scratch.add(2 * warp() as usize + 1) = ws;
        }
        sync_threads();
        if thread_idx() == 0 {
            let mut total = Lse::EMPTY;
            for w in 0..warps_per_block() {
                total = total.merge(Lse { m: *scratch.add(2 * w as usize), s: *scratch.add(2 * w as usize + 1) });
            }
            let target = *targets.add(r as usize);
            *nll.add(r as usize) =
                if target < vocab { (total.m + ln(total.s)) - *row.add(target as usize) } else { f32::NAN };
        }
        // The scratch words are rewritten by the next row's warps.
        sync_threads();
        r += grid_dim();
    }
}
