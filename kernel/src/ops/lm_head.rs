//! The LM head fused with everything that needs the logits: arg-max (greedy), Gumbel-max
//! sampling, log-sum-exp for the teacher-forced NLL, and optional logit output. Each block
//! reduces its rows to one `LmPartial`; the last block to finish (acq_rel arrival counter)
//! reduces the partials and decides the token, so the vocabulary is read exactly once.

use crate::abi::{LmPartial, DECODE_THREADS, MAX_TOP_K};
use crate::device::*;
use crate::ops::gemv::{block_rows, gemv_stream};
use crate::ops::sampling::{
    candidate_key, gumbel, hash3, order_key, sample_top32, sample_top_k, sample_top_p, select_bin_from_top,
    top32_insert, top32_merge, top_k_smem_words, uniform, warp_bin_add, BINS, TOP, TOP_P_SMEM_WORDS,
};

#[derive(Clone, Copy)]
pub struct LmHeadArgs {
    /// bf16 `[vocab, hidden]`.
    pub weight: *const u16,
    pub vocab: u32,
    pub hidden: u32,
    /// Where to write every logit (or null).
    pub logits_out: *mut f32,
    /// Every logit, for the one-block finish of top-k above 32 or of a top-p nucleus wider
    /// than 32 (`sampling::sample_top_k`, `sample_top_p`); null when neither can happen.
    pub logits_scratch: *mut f32,
    /// `[grid][32]` candidate keys: each block's 32 best logits (top-k / top-p sampling).
    pub candidates: *mut u64,
    pub partial: *mut LmPartial,
    pub count: *mut u32,
    /// Row whose logit the NLL needs, or u32::MAX.
    pub target: u32,
    /// 0 for greedy.
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed: u64,
    pub pos: u32,
    /// What the logits are scaled by: the final norm's scale (`norm::rms_norm_to_shared`).
    pub xn_scale: f32,
    /// A word block 0 (thread 0) hands to the block that finishes the step, through its
    /// partial: the decode loop's copy of the host's cancel flag.
    pub forward: u32,
    /// The grid barrier every block of the launch takes part in, or null (the split kernels):
    /// with it, top-p alone is decided by all blocks together (`grid_top_p`), not by one.
    pub bar: *mut u32,
    /// Warp 0's copy of the barrier's sense, in shared memory (`grid_wait_at`).
    pub sense: *mut u32,
    /// u64 `[GRID_TOP_P_ROUNDS][BINS]`, zero between uses: the grid's weight histograms.
    pub grid_hist: *mut u64,
}

/// Histogram rounds of `grid_top_p`: 8 bits of the order key each.
pub const GRID_TOP_P_ROUNDS: u32 = 4;
/// u64 words of `LmHeadArgs::grid_hist` (the host sizes it by the ABI's figure).
pub const GRID_TOP_P_HIST_WORDS: u32 = GRID_TOP_P_ROUNDS * BINS;
const _: () = assert!(GRID_TOP_P_HIST_WORDS == crate::abi::LM_GRID_HIST_WORDS);

/// What the last block decided.
#[derive(Clone, Copy)]
pub struct LmResult {
    pub token: u32,
    /// ln(sum(exp(logits))) and the target's logit (-inf if no target). (With top-k / top-p
    /// sampling the sum is of exp(logit / T): the draw needs that, and no NLL is wanted.)
    pub log_sum_exp: f32,
    pub target_logit: f32,
    /// Block 0's `LmHeadArgs::forward`.
    pub forward: u32,
}

/// Where the block's candidate lists start in the LM head's shared memory (after one record
/// per warp and the flag; u32 words, even so that the u64 lists are aligned).
const fn candidates_at(warps: u32) -> u32 {
    (warps * 5 + 8 + 1) & !1
}

/// Shared memory (f32 words) the LM-head phase needs besides the normalised input: one
/// record per warp and the flag, every warp's candidate list, or the one-block finishes'.
pub const fn lm_head_smem_words(warps: u32, max_top_k: u32) -> u32 {
    let per_warp = candidates_at(warps) + 2 * TOP * warps;
    let top_k = top_k_smem_words(max_top_k);
    let finish = if top_k > TOP_P_SMEM_WORDS { top_k } else { TOP_P_SMEM_WORDS };
    if per_warp > finish {
        per_warp
    } else {
        finish
    }
}
// The decode kernel's shared memory is sized by `abi::decode_smem_bytes` (shared with the host).
const _: () =
    assert!(lm_head_smem_words(DECODE_THREADS / 32, MAX_TOP_K) <= crate::abi::lm_head_words(DECODE_THREADS / 32));

/// Online log-sum-exp state: (max, sum of exp(v - max)).
#[inline(always)]
fn lse_push(m: &mut f32, s: &mut f32, v: f32) {
    if v > *m {
        *s = fma(*s, exp(*m - v), 1.0);
        *m = v;
    } else {
        *s += exp(v - *m);
    }
}
#[inline(always)]
fn lse_merge(m: f32, s: f32, m2: f32, s2: f32) -> (f32, f32) {
    let mm = fmaxf(m, m2);
    if mm == f32::NEG_INFINITY {
        return (mm, 0.0);
    }
    (mm, s * exp(m - mm) + s2 * exp(m2 - mm))
}

/// A reduction record of the LM head: the best score and its row, the online log-sum-exp
/// state, the target's logit.
#[derive(Clone, Copy)]
struct Record {
    best: f32,
    best_i: u32,
    max: f32,
    sum_exp: f32,
    target: f32,
}

impl Record {
    const EMPTY: Record = Record {
        best: f32::NEG_INFINITY,
        best_i: u32::MAX,
        max: f32::NEG_INFINITY,
        sum_exp: 0.0,
        target: f32::NEG_INFINITY,
    };

    #[inline(always)]
    fn merge(&mut self, o: &Record) {
        if better(o.best, o.best_i, self.best, self.best_i) {
            self.best = o.best;
            self.best_i = o.best_i;
        }
        (self.max, self.sum_exp) = lse_merge(self.max, self.sum_exp, o.max, o.sum_exp);
        self.target = fmaxf(self.target, o.target);
    }

    /// Every lane's record merged across the warp; every lane gets the result.
    #[inline(always)]
    fn warp_merge(&self) -> Record {
        let (best, best_i) = warp_argmax(self.best, self.best_i);
        let max = warp_max(self.max);
        let scaled = if self.max == f32::NEG_INFINITY { 0.0 } else { self.sum_exp * exp(self.max - max) };
        Record { best, best_i, max, sum_exp: warp_sum(scaled), target: warp_max(self.target) }
    }
}

/// The LM head for input `xn` (shared memory, in the GEMV's layout; the normalised input once
/// scaled by `a.xn_scale`). Returns `Some` on every thread of the last block to finish, `None`
/// elsewhere. `smem` holds `lm_head_smem_words` words.
#[inline(always)]
pub unsafe fn lm_head_phase(a: &LmHeadArgs, xn: *const f32, smem: *mut f32) -> Option<LmResult> {
    let sampling = a.temperature > 0.0;
    // Top-k / top-p: every block keeps its 32 best logits (unless top-k asks for more: then
    // the one-block finish alone decides); temperature alone: Gumbel-max.
    let filtered = sampling && (a.top_k > 0 || a.top_p < 1.0);
    let keeps_top32 = filtered && a.top_k <= TOP;
    let grid_draw = filtered && a.top_k == 0 && !a.bar.is_null();
    let gumbel_sampling = sampling && !filtered;
    let inv_t = if sampling { 1.0 / a.temperature } else { 1.0 };
    let lse_scale = if filtered { inv_t } else { 1.0 };
    let (r0, r1) = block_rows(a.vocab);
    let mut best = f32::NEG_INFINITY;
    let mut best_i = u32::MAX;
    let mut m = f32::NEG_INFINITY;
    let mut s = 0.0f32;
    let mut target_logit = f32::NEG_INFINITY;
    // The warp's 32 best (lane l: the l-th), and lane 31's on every lane.
    let mut top = 0u64;
    let mut top_last = 0u64;
    gemv_stream(a.weight, a.hidden, xn, r0, r1, |row, dot| {
        let logit = dot * a.xn_scale;
        if lane() == 0 {
            if !a.logits_out.is_null() {
                *a.logits_out.add(row as usize) = logit;
            }
            if !a.logits_scratch.is_null() {
                *a.logits_scratch.add(row as usize) = logit;
            }
        }
        let score = if gumbel_sampling { logit * inv_t + gumbel(hash3(a.seed, a.pos, row)) } else { logit };
        if better(score, row, best, best_i) {
            best = score;
            best_i = row;
        }
        lse_push(&mut m, &mut s, logit * lse_scale);
        if row == a.target {
            target_logit = logit;
        }
        if keeps_top32 {
            top32_insert(&mut top, &mut top_last, candidate_key(logit, row));
        }
    });

    // Block reduction: one record per warp, merged across the lanes of warp 0; with top-k /
    // top-p every warp's list too, merged by warp 0 into the block's.
    let w = warp() as usize;
    let nw = warps_per_block();
    let rec = smem; // [warps][5]
    let lists = smem.add(candidates_at(nw) as usize) as *mut u64; // [warps][32]
    if lane() == 0 {
        *rec.add(w * 5) = best;
        *(rec.add(w * 5 + 1) as *mut u32) = best_i;
        *rec.add(w * 5 + 2) = m;
        *rec.add(w * 5 + 3) = s;
        *rec.add(w * 5 + 4) = target_logit;
    }
    if keeps_top32 {
        *lists.add(w * TOP as usize + lane() as usize) = top;
    }
    sync_threads();
    let flag = rec.add(nw as usize * 5) as *mut u32;
    if warp() == 0 {
        let mut r = Record::EMPTY;
        if lane() < nw {
            let l = lane() as usize * 5;
            r = Record {
                best: *rec.add(l),
                best_i: *(rec.add(l + 1) as *const u32),
                max: *rec.add(l + 2),
                sum_exp: *rec.add(l + 3),
                target: *rec.add(l + 4),
            };
        }
        let r = r.warp_merge();
        if keeps_top32 {
            for ww in 1..nw {
                top = top32_merge(top, *lists.add((ww * TOP + lane()) as usize));
            }
            *a.candidates.add((block_idx() * TOP + lane()) as usize) = top;
            // Every lane's store is ordered before lane 0's release below.
            sync_warp();
        }
        if lane() == 0 {
            *a.partial.add(block_idx() as usize) = LmPartial {
                max: r.max,
                sum_exp: r.sum_exp,
                best: r.best,
                best_index: r.best_i,
                target_logit: r.target,
                forward: a.forward,
                _pad: [0; 2],
            };
            if !grid_draw {
                *flag = arrive_last(a.count) as u32;
            }
        }
    }
    // Top-p alone: every block takes part in the draw (its partial's best becomes its part of
    // the answer), then arrives.
    let mut grid_token = u32::MAX;
    if grid_draw {
        grid_token = grid_top_p(a, inv_t, smem);
        if thread_idx() == 0 {
            *flag = arrive_last(a.count) as u32;
        }
    }
    sync_threads();
    if *flag == 0 {
        return None;
    }
    sync_threads();
    if grid_draw && grid_token == u32::MAX {
        // The histograms are read by now (every block arrived after its last round): zero for
        // the next draw.
        let mut i = thread_idx();
        while i < GRID_TOP_P_HIST_WORDS {
            *a.grid_hist.add(i as usize) = 0;
            i += block_dim();
        }
    }

    // Last block: merge every block's partial (warp 0), then pick the token. Lane l takes
    // blocks l, l + 32, ..., eight per lane per round trip (all 256 of a round requested
    // before any is used).
    let out = smem as *mut u32; // [0] token, [1] lse bits, [2] target bits, [3] forward, [4] max, [5] sum
    if warp() == 0 {
        let forward = ld_cg_u32(&(*a.partial).forward);
        let r = merge_partials(a);
        if lane() == 0 {
            *out = r.best_i;
            *out.add(1) = (r.max + ln(r.sum_exp)).to_bits();
            *out.add(2) = r.target.to_bits();
            *out.add(3) = forward;
            *out.add(4) = r.max.to_bits();
            *out.add(5) = r.sum_exp.to_bits();
        }
    }
    sync_threads();
    let mut result = LmResult {
        token: *out,
        log_sum_exp: f32::from_bits(*out.add(1)),
        target_logit: f32::from_bits(*out.add(2)),
        forward: *out.add(3),
    };
    if grid_draw {
        // Decided within the 32 best, or the Gumbel-max of the blocks' parts of the nucleus.
        if grid_token != u32::MAX {
            result.token = grid_token;
        }
    } else if filtered {
        result.token = draw_filtered(a, inv_t, smem);
    }
    Some(result)
}

/// Thread 0: counts this block's arrival at the LM head's end; true for the last block, which
/// resets the counter for the next step.
#[inline(always)]
unsafe fn arrive_last(count: *mut u32) -> bool {
    let old = atomic_add_acq_rel(count, 1);
    let last = old == grid_dim() - 1;
    if last {
        *count = 0;
    }
    last
}

/// Warp 0: every block's partial merged (the same order in every block, so every block that
/// calls it gets the same bits). Lane l takes blocks l, l + 32, ..., eight per lane per round
/// trip (all 256 of a round requested before any is used).
#[inline(always)]
unsafe fn merge_partials(a: &LmHeadArgs) -> Record {
    let mut r = Record::EMPTY;
    let mut b0 = 0;
    while b0 < grid_dim() {
        let mut parts = [[0u32; 5]; 8];
        crate::unroll!(8, J, {
            let b = b0 + lane() + 32 * J as u32;
            if b < grid_dim() {
                let p = a.partial.add(b as usize) as *const u32;
                let v = ld_cg_v4(p);
                parts[J] = [v[0], v[1], v[2], v[3], ld_cg_u32(p.add(4))];
            }
        });
        crate::unroll!(8, J, {
            if b0 + lane() + 32 * (J as u32) < grid_dim() {
                let q = parts[J];
                r.merge(&Record {
                    max: f32::from_bits(q[0]),
                    sum_exp: f32::from_bits(q[1]),
                    best: f32::from_bits(q[2]),
                    best_i: q[3],
                    target: f32::from_bits(q[4]),
                });
            }
        });
        b0 += 256;
    }
    r.warp_merge()
}

/// All threads: the 32 best of the vocabulary from the blocks' candidate lists, on warp 0's
/// lanes (lane l the l-th best; other warps get garbage). Every warp merges the lists of
/// blocks w, w + warps, ..., twelve requested at once, then warp 0 merges the warps'.
#[inline(always)]
unsafe fn merge_candidates(a: &LmHeadArgs, smem: *mut f32) -> u64 {
    let nw = warps_per_block();
    let w = warp() as usize;
    let lists = smem.add(candidates_at(nw) as usize) as *mut u64; // [warps][32]
    let mut merged = 0u64;
    let mut b0 = 0;
    while b0 < grid_dim() {
        let mut got = [0u64; 12];
        crate::unroll!(12, J, {
            let b = b0 + warp() + nw * J as u32;
            if b < grid_dim() {
                got[J] = ld_cg_u64(a.candidates.add((b * TOP + lane()) as usize));
            }
        });
        crate::unroll!(12, J, {
            if b0 + warp() + nw * (J as u32) < grid_dim() {
                merged = top32_merge(merged, got[J]);
            }
        });
        b0 += 12 * nw;
    }
    *lists.add(w * TOP as usize + lane() as usize) = merged;
    sync_threads();
    let mut top = 0u64;
    if warp() == 0 {
        top = *lists.add(lane() as usize);
        for ww in 1..nw {
            top = top32_merge(top, *lists.add((ww * TOP + lane()) as usize));
        }
    }
    top
}

/// Top-p alone in the megakernel, by every block (all threads call it, after their block's
/// partial and candidate list are written): one grid barrier, then every block merges the
/// partials and the candidate lists as the finishing block would and draws with
/// `sample_top32`; a nucleus within the 32 best is then decided (the same token in every
/// block, returned). A wider one takes `GRID_TOP_P_ROUNDS` more barriers: each round every
/// block histograms the integer weights of its own rows (those in the current key prefix) in
/// shared memory, adds the histogram into the grid's (`grid_hist`), and after the barrier
/// every block reads the sum and picks the same bin, as `sample_top_p` does over all logits
/// in one block. Each block then writes the Gumbel-max of its rows in the nucleus as its
/// partial's best, and the finishing block's merge of the partials picks the token: the very
/// token `sample_top_p` would, at the cost of five barriers instead of one block reading the
/// vocabulary five times. Returns `u32::MAX` in that case.
#[inline(never)]
unsafe fn grid_top_p(a: &LmHeadArgs, inv_t: f32, smem: *mut f32) -> u32 {
    let nw = warps_per_block();
    let out = smem as *mut u32; // [0] token, [4] max, [5] sum, [8..12] the round's result
    grid_arrive(a.bar);
    grid_wait_at(a.bar, a.sense);
    if warp() == 0 {
        let r = merge_partials(a);
        if lane() == 0 {
            *out.add(4) = r.max.to_bits();
            *out.add(5) = r.sum_exp.to_bits();
        }
    }
    let top = merge_candidates(a, smem); // its barrier publishes [4], [5]
    let u = uniform(hash3(a.seed, a.pos, u32::MAX));
    let max_scaled = f32::from_bits(*out.add(4));
    if warp() == 0 {
        let drawn = sample_top32(top, inv_t, max_scaled, f32::from_bits(*out.add(5)), 0, a.top_p, u);
        if lane() == 0 {
            *out = drawn.unwrap_or(u32::MAX);
        }
    }
    sync_threads();
    let token = *out;
    if token != u32::MAX {
        sync_threads();
        return token;
    }

    // The nucleus is wider than the 32 best: the radix select over the whole grid.
    let hist_lo = smem.add(candidates_at(nw) as usize) as *mut u32; // [BINS], over the lists
    let hist_hi = hist_lo.add(BINS as usize); // [BINS]
    let misc = out.add(8);
    let (r0, r1) = block_rows(a.vocab);
    let logits = a.logits_scratch as *const f32;
    let weight = |l: f32| -> u64 { (exp(l * inv_t - max_scaled) * 4_294_967_296.0) as u64 };
    let bin_weight = |b: u32| -> u64 { (*hist_hi.add(b as usize) as u64) << 32 | *hist_lo.add(b as usize) as u64 };
    let mut want = 0u64; // set by the first round
    let mut prefix = 0u32;
    for round in 0..GRID_TOP_P_ROUNDS {
        let shift = 24 - 8 * round;
        let mut b = thread_idx();
        while b < 2 * BINS {
            *hist_lo.add(b as usize) = 0;
            b += block_dim();
        }
        sync_threads();
        let high_mask = if round == 0 { 0 } else { !0u32 << (shift + 8) };
        // Whole warps walk the block's rows (warp_bin_add shuffles); the block wrote them.
        let mut base = r0;
        while base < r1 {
            let i = base + thread_idx();
            let l = if i < r1 { ld_cg_f32(logits.add(i as usize)) } else { f32::NAN };
            let key = order_key(l);
            let counts = !l.is_nan() && key & high_mask == prefix & high_mask;
            let w = if counts { weight(l) } else { 0 };
            warp_bin_add(counts, (key >> shift) & 0xff, w, |bin, sum| {
                shared_atomic_add_u64_pair(hist_lo.add(bin as usize), hist_hi.add(bin as usize), sum);
            });
            base += block_dim();
        }
        sync_threads();
        let grid_hist = a.grid_hist.add((round * BINS) as usize);
        let t = thread_idx();
        if t < BINS {
            let v = bin_weight(t);
            if v != 0 {
                red_add_relaxed_u64(grid_hist.add(t as usize), v);
            }
        }
        grid_arrive(a.bar);
        grid_wait_at(a.bar, a.sense);
        if t < BINS {
            let v = ld_cg_u64(grid_hist.add(t as usize));
            *hist_lo.add(t as usize) = v as u32;
            *hist_hi.add(t as usize) = (v >> 32) as u32;
        }
        sync_threads();
        if warp() == 0 {
            let (bin, above, w) = select_bin_from_top(bin_weight, |total| {
                if round == 0 {
                    (((a.top_p as f64) * (total as f64)) as u64).clamp(1, total.max(1))
                } else {
                    want
                }
            });
            if lane() == 0 {
                let rest = (w - above.min(w)).max(1);
                *misc = prefix | (bin << shift);
                *misc.add(1) = rest as u32;
                *misc.add(2) = (rest >> 32) as u32;
            }
        }
        sync_threads();
        prefix = *misc;
        want = (*misc.add(2) as u64) << 32 | *misc.add(1) as u64;
        sync_threads();
    }

    // This block's part of the draw: the Gumbel-max of its rows in the nucleus.
    let mut best = f32::NEG_INFINITY;
    let mut best_i = u32::MAX;
    let mut i = r0 + thread_idx();
    while i < r1 {
        let l = ld_cg_f32(logits.add(i as usize));
        if !l.is_nan() && order_key(l) >= prefix {
            let score = l * inv_t + gumbel(hash3(a.seed, a.pos, i));
            if better(score, i, best, best_i) {
                best = score;
                best_i = i;
            }
        }
        i += block_dim();
    }
    let (best, best_i) = warp_argmax(best, best_i);
    let votes = hist_lo; // [warps][2]
    if lane() == 0 {
        *votes.add(2 * warp() as usize) = best.to_bits();
        *votes.add(2 * warp() as usize + 1) = best_i;
    }
    sync_threads();
    if warp() == 0 {
        let (mut v, mut vi) = (f32::NEG_INFINITY, u32::MAX);
        if lane() < nw {
            v = f32::from_bits(*votes.add(2 * lane() as usize));
            vi = *votes.add(2 * lane() as usize + 1);
        }
        let (v, vi) = warp_argmax(v, vi);
        if lane() == 0 {
            let mine = a.partial.add(block_idx() as usize);
            (*mine).best = v;
            (*mine).best_index = vi;
        }
    }
    sync_threads();
    u32::MAX
}

/// The last block's draw for top-k / top-p sampling, after `lm_head_phase` merged the
/// blocks' partials into `smem` (`[4]` the largest logit / T, `[5]` the sum of exp(logit / T -
/// it)): the 32 best of the vocabulary from the blocks' lists, then `sample_top32`, or, beyond
/// those 32, the one-block finishes over every logit. Every thread of the block calls it and
/// gets the token. (Not inlined: it runs on one block per step, and inlined into the decode
/// kernel its registers were taken from every other phase.)
#[inline(never)]
unsafe fn draw_filtered(a: &LmHeadArgs, inv_t: f32, smem: *mut f32) -> u32 {
    let u = uniform(hash3(a.seed, a.pos, u32::MAX));
    if a.top_k > TOP {
        // No block kept candidates (`lm_head_phase`): more than 32 are needed. The caller's
        // reads of the merged partials come first: `sample_top_k` reuses those words.
        sync_threads();
        if a.logits_scratch.is_null() {
            trap();
        }
        return sample_top_k(a.logits_scratch, a.vocab, a.top_k, a.temperature, a.top_p, u, smem as *mut u32);
    }
    let out = smem as *mut u32;
    let top = merge_candidates(a, smem);
    let fallback = out.add(6);
    if warp() == 0 {
        let (max, sum) = (f32::from_bits(*out.add(4)), f32::from_bits(*out.add(5)));
        let drawn = sample_top32(top, inv_t, max, sum, a.top_k, a.top_p, u);
        if lane() == 0 {
            *out = drawn.unwrap_or(0);
            *fallback = drawn.is_none() as u32;
        }
    }
    sync_threads();
    let token = *out;
    let needs_all = *fallback != 0;
    // Read before the barrier: `sample_top_p` zeroes these words first thing.
    let max = f32::from_bits(*out.add(4));
    sync_threads();
    if !needs_all {
        return token;
    }
    // A nucleus wider than the 32 best (top-p alone): one block over every logit (the others
    // wrote them out).
    if a.logits_scratch.is_null() {
        trap(); // the caller's choice of `logits_scratch` missed a case
    }
    sample_top_p(a.logits_scratch, a.vocab, inv_t, max, a.top_p, a.seed, a.pos, smem as *mut u32)
}

/// Whether the LM head may need every logit written out (`LmHeadArgs::logits_scratch`) for
/// sampling with `temperature`, `top_k` and `top_p`: top-k above 32, or top-p alone (its
/// nucleus may be wider than 32).
#[inline(always)]
pub fn sampling_needs_all_logits(temperature: f32, top_k: u32, top_p: f32) -> bool {
    temperature > 0.0 && (top_k > TOP || (top_k == 0 && top_p < 1.0))
}
