//! The LM head fused with everything that needs the logits: arg-max (greedy), Gumbel-max
//! sampling, log-sum-exp for the teacher-forced NLL, and optional logit output. Each block
//! reduces its rows to one `LmPartial`; the last block to finish (acq_rel arrival counter)
//! reduces the partials and decides the token, so the vocabulary is read exactly once.

use crate::abi::LmPartial;
use crate::device::*;
use crate::ops::gemv::{block_rows, gemv_stream};
use crate::ops::sampling::{gumbel, hash3, sample_top_k, top_k_smem_words};

#[derive(Clone, Copy)]
pub struct LmHeadArgs {
    /// bf16 `[vocab, hidden]`.
    pub weight: *const u16,
    pub vocab: u32,
    pub hidden: u32,
    /// Where to write every logit (or null).
    pub logits_out: *mut f32,
    /// Scratch logits for top-k sampling (or null when not sampling with top-k).
    pub logits_scratch: *mut f32,
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
}

/// What the last block decided.
#[derive(Clone, Copy)]
pub struct LmResult {
    pub token: u32,
    /// ln(sum(exp(logits))) and the target's logit (-inf if no target).
    pub log_sum_exp: f32,
    pub target_logit: f32,
}

/// Shared memory (f32 words) the LM-head phase needs besides the normalised input.
pub const fn lm_head_smem_words(warps: u32, max_top_k: u32) -> u32 {
    let per_warp = warps * 5 + 8;
    let top_k = top_k_smem_words(max_top_k);
    if per_warp > top_k {
        per_warp
    } else {
        top_k
    }
}

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

/// The LM head for input `xn` (shared memory, normalised). Returns `Some` on every thread of
/// the last block to finish, `None` elsewhere. `smem` holds `lm_head_smem_words` words.
#[inline(always)]
pub unsafe fn lm_head_phase(a: &LmHeadArgs, xn: *const f32, smem: *mut f32) -> Option<LmResult> {
    let gumbel_sampling = a.temperature > 0.0 && a.top_k == 0;
    let inv_t = if a.temperature > 0.0 { 1.0 / a.temperature } else { 1.0 };
    let (r0, r1) = block_rows(a.vocab);
    let mut best = f32::NEG_INFINITY;
    let mut best_i = u32::MAX;
    let mut m = f32::NEG_INFINITY;
    let mut s = 0.0f32;
    let mut target_logit = f32::NEG_INFINITY;
    gemv_stream(a.weight, a.hidden, xn, r0, r1, |row, logit| {
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
        lse_push(&mut m, &mut s, logit);
        if row == a.target {
            target_logit = logit;
        }
    });

    // Block reduction: one record per warp, merged by thread 0.
    let w = warp() as usize;
    let rec = smem; // [warps][5]
    if lane() == 0 {
        *rec.add(w * 5) = best;
        *(rec.add(w * 5 + 1) as *mut u32) = best_i;
        *rec.add(w * 5 + 2) = m;
        *rec.add(w * 5 + 3) = s;
        *rec.add(w * 5 + 4) = target_logit;
    }
    sync_threads();
    let flag = rec.add(warps_per_block() as usize * 5) as *mut u32;
    if thread_idx() == 0 {
        let mut p = LmPartial {
            max: f32::NEG_INFINITY,
            sum_exp: 0.0,
            best: f32::NEG_INFINITY,
            best_index: u32::MAX,
            target_logit: f32::NEG_INFINITY,
            _pad: [0; 3],
        };
        for ww in 0..warps_per_block() as usize {
            let (bv, bi) = (*rec.add(ww * 5), *(rec.add(ww * 5 + 1) as *const u32));
            if better(bv, bi, p.best, p.best_index) {
                p.best = bv;
                p.best_index = bi;
            }
            let (mm, ss) = lse_merge(p.max, p.sum_exp, *rec.add(ww * 5 + 2), *rec.add(ww * 5 + 3));
            p.max = mm;
            p.sum_exp = ss;
            p.target_logit = fmaxf(p.target_logit, *rec.add(ww * 5 + 4));
        }
        *a.partial.add(block_idx() as usize) = p;
        let old = atomic_add_acq_rel(a.count, 1);
        let last = old == grid_dim() - 1;
        if last {
            *a.count = 0;
        }
        *flag = last as u32;
    }
    sync_threads();
    if *flag == 0 {
        return None;
    }
    sync_threads();

    // Last block: merge every block's partial (warp 0), then pick the token.
    let out = smem as *mut u32; // [0] token, [1] lse bits, [2] target bits
    if warp() == 0 {
        let mut bv = f32::NEG_INFINITY;
        let mut bi = u32::MAX;
        let mut mm = f32::NEG_INFINITY;
        let mut ss = 0.0f32;
        let mut tl = f32::NEG_INFINITY;
        let mut b = lane();
        while b < grid_dim() {
            let p = a.partial.add(b as usize) as *const f32;
            let (pv, pi) = (ld_cg_f32(p.add(2)), ld_cg_u32(p.add(3) as *const u32));
            if better(pv, pi, bv, bi) {
                bv = pv;
                bi = pi;
            }
            let (m2, s2) = lse_merge(mm, ss, ld_cg_f32(p), ld_cg_f32(p.add(1)));
            mm = m2;
            ss = s2;
            tl = fmaxf(tl, ld_cg_f32(p.add(4)));
            b += 32;
        }
        let (_, bi) = warp_argmax(bv, bi);
        let big_m = warp_max(mm);
        let scaled = if mm == f32::NEG_INFINITY { 0.0 } else { ss * exp(mm - big_m) };
        let total = warp_sum(scaled);
        let tl = warp_max(tl);
        if lane() == 0 {
            *out = bi;
            *out.add(1) = (big_m + ln(total)).to_bits();
            *out.add(2) = tl.to_bits();
        }
    }
    sync_threads();
    let mut result =
        LmResult { token: *out, log_sum_exp: f32::from_bits(*out.add(1)), target_logit: f32::from_bits(*out.add(2)) };
    sync_threads();
    if a.temperature > 0.0 && a.top_k > 0 {
        let u = crate::ops::sampling::uniform(hash3(a.seed, a.pos, u32::MAX));
        result.token = sample_top_k(a.logits_scratch, a.vocab, a.top_k, a.temperature, a.top_p, u, smem as *mut u32);
    }
    Some(result)
}
