//! Choosing the next token on the device.
//!
//! - Greedy: arg-max, ties to the lowest id (folded into the LM head itself).
//! - Temperature only (no top-k, no top-p): the Gumbel-max trick, also folded into the LM head:
//!   `argmax(logit / T + Gumbel noise)` is an exact sample of `softmax(logit / T)`, and each row's
//!   noise comes from a counter-based hash of (seed, position, row), so no pass over the
//!   vocabulary is needed after the logits.
//! - Top-k and/or top-p: every block keeps the 32 best logits of its slice of the vocabulary
//!   as it computes them (a sorted list held one entry per lane, `top32_insert`, merged across
//!   its warps), the block that finishes the LM head merges the blocks' lists into the 32 best
//!   of the whole vocabulary (`top32_merge`), and one warp draws from them (`sample_top32`).
//!   That is exact whenever the distribution to draw from lies within those 32: top-k <= 32
//!   (Qwen3's default is 20), or top-p alone with a nucleus of at most 32 tokens. Otherwise,
//!   and only then, one block finishes exactly over the logits the others wrote out:
//!   `sample_top_k` (top-k up to 256) or `sample_top_p` (top-p alone, any nucleus). In the
//!   decode kernel, top-p alone is drawn by every block instead (`lm_head::grid_top_p`: the
//!   same radix select over the grid's histograms, the same token). The streaming step
//!   (kernel/src/stream.rs) draws greedy, temperature alone and top-k <= 32 with these same
//!   functions and noise, every block from the merged lists; the rest is the megakernel's.

use crate::device::*;

/// A 32-bit hash of three words (a few rounds of a multiply-xorshift mix): the random stream
/// for (seed, position, row), identical on every run.
#[inline(always)]
pub fn hash3(seed: u64, pos: u32, row: u32) -> u32 {
    let mut z = seed ^ ((pos as u64) << 32 | row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) as u32
}

/// A uniform number in (0, 1) from a hash.
#[inline(always)]
pub fn uniform(h: u32) -> f32 {
    ((h >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0)
}

/// Gumbel(0, 1) noise: -ln(-ln(u)).
#[inline(always)]
pub fn gumbel(h: u32) -> f32 {
    -ln(-ln(uniform(h)))
}

/// Maps f32 to u32 so that unsigned order equals float order (NaN aside).
#[inline(always)]
pub fn order_key(v: f32) -> u32 {
    let b = v.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Logits a thread requests at once in the one-block passes over the vocabulary.
const PASS_BATCH: u32 = 8; // the unroll! below is written for 8

/// `f(i, logit, valid)` for every `i` below `vocab`, by the whole block: whole warps take 32
/// consecutive logits (so `f` may shuffle and vote: `valid` is false past the end), and each
/// thread requests PASS_BATCH logits before it uses any. One block alone reads all 152k
/// logits here, so with one load in flight per thread a pass is a chain of ~400 round trips
/// to L2; batches make it ~50.
#[inline(always)]
unsafe fn for_each_logit<F: FnMut(u32, f32, bool)>(logits: *const f32, vocab: u32, mut f: F) {
    let stride = block_dim();
    let mut w0 = warp() * WARP_SIZE;
    while w0 < vocab {
        let mut v = [f32::NAN; PASS_BATCH as usize];
        crate::unroll!(8, J, {
            let i = w0 + lane() + J as u32 * stride;
            if i < vocab {
                v[J] = ld_cg_f32(logits.add(i as usize));
            }
        });
        crate::unroll!(8, J, {
            let wj = w0 + J as u32 * stride;
            if wj < vocab {
                let i = wj + lane();
                f(i, v[J], i < vocab);
            }
        });
        w0 += PASS_BATCH * stride;
    }
}

/// Radix-select bins: 8 bits of the order key per pass, four passes from the top.
pub const BINS: u32 = 256;

/// Adds `amount` to bin `bin` for each lane where `counts`, through `add(bin, total)`. Flat
/// distributions put most of a warp's logits in one bin: then the warp sums first and one
/// lane adds, instead of 32 lanes adding to one word one after another. All 32 lanes call it
/// (a shuffle some lanes skipped would hang the warp).
#[inline(always)]
pub fn warp_bin_add<A: FnMut(u32, u64)>(counts: bool, bin: u32, amount: u64, mut add: A) {
    let lanes = ballot(counts);
    let first_bin = shfl_idx_u32(bin, lanes.trailing_zeros() & (WARP_SIZE - 1));
    let one_bin = ballot(counts && bin == first_bin) == lanes;
    if lanes != 0 && one_bin {
        let sum = warp_sum_u64(if counts { amount } else { 0 });
        if lane() == lanes.trailing_zeros() {
            add(first_bin, sum);
        }
    } else if counts {
        add(bin, amount);
    }
}

/// Run by one whole warp after a histogram pass: the bin where the running sum of
/// `value(bin)`, from the top bin down, first reaches `want_of(total)` (`total`: the sum over
/// all bins), or bin 0 if it never does. Returns (bin, sum above it, want) on every lane.
/// Lane `l` sums bins `255 - 8l` down to `248 - 8l`, one prefix sum over the lanes finds the
/// lane whose bins cross, and that lane's eight are scanned: a chain of ~16 steps, not 256.
#[inline(always)]
pub unsafe fn select_bin_from_top<V: Fn(u32) -> u64, W: FnOnce(u64) -> u64>(value: V, want_of: W) -> (u32, u64, u64) {
    const PER_LANE: u32 = BINS / WARP_SIZE;
    let top = BINS - 1 - PER_LANE * lane();
    let mut own = 0u64;
    for j in 0..PER_LANE {
        own += value(top - j);
    }
    let upto = warp_prefix_sum_u64(own);
    let want = want_of(shfl_idx_u64(upto, WARP_SIZE - 1));
    let crossed = ballot(upto >= want);
    let l = if crossed != 0 { crossed.trailing_zeros() } else { WARP_SIZE - 1 };
    let mut above = shfl_idx_u64(upto - own, l);
    let mut bin = BINS - 1 - PER_LANE * l;
    for _ in 1..PER_LANE {
        let h = value(bin);
        if above + h >= want {
            break;
        }
        above += h;
        bin -= 1;
    }
    (bin, above, want)
}

/// Shared memory (u32 words) `sample_top_k` needs.
pub const fn top_k_smem_words(max_k: u32) -> u32 {
    256 + 2 * (2 * max_k) + 2 * max_k + 8
}

/// Run by one whole block: picks a token from `logits[..vocab]` keeping the `k` largest (ties
/// to the lower id), dividing by `temperature`, then keeping the smallest prefix whose
/// probability reaches `top_p`, and sampling with uniform `u`. Returns the token on every
/// thread. `smem` holds `top_k_smem_words(k)` u32. (Not inlined, like `sample_top_p`.)
#[inline(never)]
pub unsafe fn sample_top_k(
    logits: *const f32,
    vocab: u32,
    k: u32,
    temperature: f32,
    top_p: f32,
    u: f32,
    smem: *mut u32,
) -> u32 {
    let hist = smem; // [BINS]
    let cand_key = smem.add(256); // [2k]
    let cand_idx = smem.add(256 + 2 * k as usize); // [2k]
    let sorted_val = smem.add(256 + 4 * k as usize) as *mut f32; // [k]
    let sorted_idx = smem.add(256 + 5 * k as usize); // [k]
    let misc = smem.add(256 + 6 * k as usize); // [8]
    let k = k.min(vocab);

    // Radix select: the key of the k-th largest logit, 8 bits at a time from the top.
    let mut prefix = 0u32;
    let mut want = k;
    let mut shift = 32u32;
    while shift > 0 {
        shift -= 8;
        let mut i = thread_idx();
        while i < 256 {
            *hist.add(i as usize) = 0;
            i += block_dim();
        }
        sync_threads();
        let high_mask = if shift == 24 { 0 } else { !0u32 << (shift + 8) };
        for_each_logit(logits, vocab, |_, l, valid| {
            let key = order_key(l);
            // Counts go straight to the (32-bit, native) shared atomics: summing a warp's
            // first, as the weights below do, was slower here.
            if valid && key & high_mask == prefix & high_mask {
                shared_atomic_add(hist.add(((key >> shift) & 0xff) as usize), 1);
            }
        });
        sync_threads();
        if warp() == 0 {
            let (bin, above, _) = select_bin_from_top(|b| *hist.add(b as usize) as u64, |_| want as u64);
            if lane() == 0 {
                *misc = prefix | (bin << shift);
                *misc.add(1) = want - above as u32;
            }
        }
        sync_threads();
        prefix = *misc;
        want = *misc.add(1);
        sync_threads();
    }
    let threshold = prefix;

    // Gather everything at or above the threshold (more than k only through ties).
    if thread_idx() == 0 {
        *misc.add(2) = 0;
    }
    sync_threads();
    let cap = 2 * k;
    for_each_logit(logits, vocab, |i, l, valid| {
        let key = order_key(l);
        if valid && key >= threshold {
            let slot = shared_atomic_add(misc.add(2), 1);
            if slot < cap {
                *cand_key.add(slot as usize) = key;
                *cand_idx.add(slot as usize) = i;
            }
        }
    });
    sync_threads();
    let n = (*misc.add(2)).min(cap);

    // Rank sort: larger logit first, ties to the lower id; keep the first k.
    let mut c = thread_idx();
    while c < n {
        let key = *cand_key.add(c as usize);
        let idx = *cand_idx.add(c as usize);
        let mut rank = 0u32;
        for j in 0..n {
            let kj = *cand_key.add(j as usize);
            let ij = *cand_idx.add(j as usize);
            if kj > key || (kj == key && ij < idx) {
                rank += 1;
            }
        }
        if rank < k {
            *sorted_idx.add(rank as usize) = idx;
            *sorted_val.add(rank as usize) = ld_cg_f32(logits.add(idx as usize));
        }
        c += block_dim();
    }
    sync_threads();

    // Softmax over the k, nucleus cut, and the draw: sequential and exact, k is small.
    if thread_idx() == 0 {
        let top = *sorted_val;
        let inv_t = 1.0 / temperature;
        let mut total = 0.0f32;
        for j in 0..k {
            total += exp((*sorted_val.add(j as usize) - top) * inv_t);
        }
        let mut keep = k;
        let mut kept = 0.0f32;
        for j in 0..k {
            kept += exp((*sorted_val.add(j as usize) - top) * inv_t);
            if kept >= top_p * total {
                keep = j + 1;
                break;
            }
        }
        let target = u * kept;
        let mut acc = 0.0f32;
        let mut chosen = *sorted_idx.add((keep - 1) as usize);
        for j in 0..keep {
            acc += exp((*sorted_val.add(j as usize) - top) * inv_t);
            if target < acc {
                chosen = *sorted_idx.add(j as usize);
                break;
            }
        }
        *misc.add(3) = chosen;
    }
    sync_threads();
    let chosen = *misc.add(3);
    sync_threads();
    chosen
}

// ---------------------------------------------------------------- the 32 best, across the grid

/// Best candidates one list holds: one per lane.
pub const TOP: u32 = 32;

/// A candidate as one u64 that orders like the reference's sort: larger logit first, ties to
/// the lower row. 0 is no candidate (and NaN logits map to it: never chosen).
#[inline(always)]
pub fn candidate_key(logit: f32, row: u32) -> u64 {
    if logit.is_nan() {
        return 0;
    }
    (order_key(logit) as u64) << 32 | (!row) as u64
}
#[inline(always)]
pub fn candidate_logit(key: u64) -> f32 {
    let k = (key >> 32) as u32;
    f32::from_bits(if k & 0x8000_0000 != 0 { k & 0x7fff_ffff } else { !k })
}
#[inline(always)]
pub fn candidate_row(key: u64) -> u32 {
    !(key as u32)
}

/// Adds `key` (the same on every lane) to the warp's sorted list: lane `l` holds the `l`-th
/// best key seen (`*list`), `*last` every lane's copy of lane 31's. All 32 lanes call it.
#[inline(always)]
pub fn top32_insert(list: &mut u64, last: &mut u64, key: u64) {
    if key > *last {
        // Entries better than `key` stay; the rest move down a lane, the last one drops out.
        let pos = ballot(*list > key).count_ones();
        let below = shfl_up_u64(*list, 1);
        if lane() == pos {
            *list = key;
        } else if lane() > pos {
            *list = below;
        }
        *last = shfl_idx_u64(*list, TOP - 1);
    }
}

/// The 32 best of two sorted lists (one entry per lane, best in lane 0), sorted the same way:
/// lane `l` pairs `a`'s `l`-th with `b`'s `(31 - l)`-th, the better of each pair makes a
/// bitonic sequence holding the 32 best, and five compare-exchange steps sort it.
#[inline(always)]
pub fn top32_merge(a: u64, b: u64) -> u64 {
    let b_rev = shfl_idx_u64(b, TOP - 1 - lane());
    let mut v = if a > b_rev { a } else { b_rev };
    let mut d = TOP / 2;
    while d > 0 {
        let o = shfl_xor_u64(v, d);
        let keep_larger = lane() & d == 0;
        v = if (o > v) == keep_larger { o } else { v };
        d >>= 1;
    }
    v
}

/// The 32 best of `N` sorted lists (`N` a power of two; a list of zeros is empty), merged in
/// pairs level by level: the merges of a level do not depend on each other, so the warp
/// overlaps their shuffles, and the chain is log2(N) merges deep rather than N - 1.
#[inline(always)]
pub fn top32_merge_tree<const N: usize>(mut lists: [u64; N]) -> u64 {
    const { assert!(N.is_power_of_two() && N <= 16) };
    // Level k merges list i + 2^k into list i, for i a multiple of 2^(k + 1). Every index is a
    // constant, so the lists stay in registers.
    crate::unroll!(4, K, {
        crate::unroll!(16, I, {
            let d = 1usize << K;
            if I % (2 * d) == 0 && I + d < N {
                lists[I] = top32_merge(lists[I], lists[I + d]);
            }
        });
    });
    lists[0]
}

/// Draws from the 32 best candidates of the vocabulary (`key`: lane `l` the `l`-th best, 0 for
/// none), as `host::model::sampling::filtered_distribution` defines it: softmax of logit / T
/// over the top `top_k` (0: all), cut to the smallest prefix whose share reaches `top_p`.
/// `max_scaled` and `sum_scaled` are the whole vocabulary's log-sum-exp state of logit / T
/// (its largest value and the sum of exp(v - largest)): top-p without top-k needs the share
/// of the whole. Returns `None` (every lane) when the answer needs more than these 32: top-k
/// above 32, or a nucleus wider than 32. All 32 lanes call it; every lane gets the result.
#[inline(always)]
pub fn sample_top32(
    key: u64,
    inv_t: f32,
    max_scaled: f32,
    sum_scaled: f32,
    top_k: u32,
    top_p: f32,
    u: f32,
) -> Option<u32> {
    if top_k > TOP {
        return None;
    }
    let k = if top_k == 0 { TOP } else { top_k };
    let live = key != 0 && lane() < k;
    let w = if live { exp(candidate_logit(key) * inv_t - max_scaled) } else { 0.0 };
    let cum = warp_prefix_sum(w);
    // The share is of the top k when top-k is set (all of them are here), else of the whole.
    let total = if top_k == 0 { sum_scaled } else { shfl_idx_f32(cum, TOP - 1) };
    let reached = if top_p < 1.0 { ballot(live && cum >= top_p * total) } else { 0 };
    let keep = if reached != 0 {
        reached.trailing_zeros() + 1
    } else if top_k > 0 {
        ballot(live).count_ones() // without top-p (or rounding short of it): all k
    } else {
        return None; // the nucleus reaches past the 32 best
    };
    let kept = shfl_idx_f32(cum, keep - 1);
    let target = u * kept;
    let hit = ballot(lane() < keep && target < cum);
    let chosen = if hit != 0 { hit.trailing_zeros() } else { keep - 1 };
    Some(candidate_row(shfl_idx_u64(key, chosen)))
}

/// Shared memory (u32 words) `sample_top_p` needs.
pub const TOP_P_SMEM_WORDS: u32 = 2 * BINS + 8;

/// Run by one whole block, when the nucleus of top-p (no top-k) is wider than the 32 best:
/// draws exactly from the smallest most-likely prefix of softmax(logits / T) whose share
/// reaches `top_p`. Weights are integers (`exp(l / T - max_scaled)` in units of 2^-32), so
/// every sum, and so the draw, is the same in every run whatever the order of additions. A
/// radix select over the logits' order keys, 8 bits at a time from the top, finds the
/// smallest logit in the nucleus (the first pass, over every logit, also gives the whole
/// vocabulary's weight); the token is then the Gumbel-max over the nucleus (an exact draw
/// from it), with the noise of (seed, position, row). Logits tied with that smallest one are
/// all kept (the reference keeps them in id order until the share is reached). Returns the
/// token on every thread. `smem` holds `TOP_P_SMEM_WORDS` u32. (Not inlined: it runs rarely,
/// and inlined into the decode kernel its loops cost registers everywhere else.)
#[inline(never)]
pub unsafe fn sample_top_p(
    logits: *const f32,
    vocab: u32,
    inv_t: f32,
    max_scaled: f32,
    top_p: f32,
    seed: u64,
    pos: u32,
    smem: *mut u32,
) -> u32 {
    // Each bin's weight as two u32 words (`shared_atomic_add_u64_pair`).
    let hist_lo = smem; // [BINS]
    let hist_hi = smem.add(BINS as usize); // [BINS]
    let misc = smem.add(2 * BINS as usize); // [4]
    let weight = |l: f32| -> u64 { (exp(l * inv_t - max_scaled) * 4_294_967_296.0) as u64 };
    let bin_weight = |b: u32| -> u64 { (*hist_hi.add(b as usize) as u64) << 32 | *hist_lo.add(b as usize) as u64 };
    let mut want = 0u64; // set by the first pass
    let mut prefix = 0u32;
    let mut shift = 32u32;
    while shift > 0 {
        shift -= 8;
        let mut b = thread_idx();
        while b < 2 * BINS {
            *smem.add(b as usize) = 0;
            b += block_dim();
        }
        sync_threads();
        let high_mask = if shift == 24 { 0 } else { !0u32 << (shift + 8) };
        for_each_logit(logits, vocab, |_, l, valid| {
            let key = order_key(l);
            let counts = valid && !l.is_nan() && key & high_mask == prefix & high_mask;
            let w = if counts { weight(l) } else { 0 };
            warp_bin_add(counts, (key >> shift) & 0xff, w, |bin, sum| {
                shared_atomic_add_u64_pair(hist_lo.add(bin as usize), hist_hi.add(bin as usize), sum);
            });
        });
        sync_threads();
        if warp() == 0 {
            let first = shift == 24;
            let (bin, above, w) = select_bin_from_top(bin_weight, |total| {
                if first {
                    (((top_p as f64) * (total as f64)) as u64).clamp(1, total.max(1))
                } else {
                    want
                }
            });
            if lane() == 0 {
                *misc = prefix | (bin << shift);
                let rest = (w - above.min(w)).max(1);
                *misc.add(1) = rest as u32;
                *misc.add(2) = (rest >> 32) as u32;
            }
        }
        sync_threads();
        prefix = *misc;
        want = (*misc.add(2) as u64) << 32 | *misc.add(1) as u64;
        sync_threads();
    }
    // Gumbel-max over the nucleus: every logit at or above the threshold.
    let mut best = f32::NEG_INFINITY;
    let mut best_i = u32::MAX;
    for_each_logit(logits, vocab, |i, l, valid| {
        if valid && !l.is_nan() && order_key(l) >= prefix {
            let score = l * inv_t + gumbel(hash3(seed, pos, i));
            if better(score, i, best, best_i) {
                best = score;
                best_i = i;
            }
        }
    });
    let (best, best_i) = warp_argmax(best, best_i);
    let votes = smem; // [warps][2], over the histogram: nobody reads it any more
    if lane() == 0 {
        *votes.add(2 * warp() as usize) = best.to_bits();
        *votes.add(2 * warp() as usize + 1) = best_i;
    }
    sync_threads();
    let mut b = f32::NEG_INFINITY;
    let mut bi = u32::MAX;
    for w in 0..warps_per_block() {
        let v = f32::from_bits(*votes.add(2 * w as usize));
        let vi = *votes.add(2 * w as usize + 1);
        if better(v, vi, b, bi) {
            b = v;
            bi = vi;
        }
    }
    sync_threads();
    bi
}
