//! Choosing the next token on the device.
//!
//! - Greedy: arg-max, ties to the lowest id (folded into the LM head itself).
//! - Temperature only (no top-k, no top-p): the Gumbel-max trick, also folded into the LM head:
//!   `argmax(logit / T + Gumbel noise)` is an exact sample of `softmax(logit / T)`, and each row's
//!   noise comes from a counter-based hash of (seed, position, row), so no pass over the
//!   vocabulary is needed after the logits.
//! - Top-k (and top-p within it): one block selects the k largest logits by radix select over
//!   their order-preserving bit patterns, sorts them, and samples from the renormalised
//!   distribution.

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

/// Shared memory (u32 words) `sample_top_k` needs.
pub const fn top_k_smem_words(max_k: u32) -> u32 {
    256 + 2 * (2 * max_k) + 2 * max_k + 8
}

/// Run by one whole block: picks a token from `logits[..vocab]` keeping the `k` largest (ties
/// to the lower id), dividing by `temperature`, then keeping the smallest prefix whose
/// probability reaches `top_p`, and sampling with uniform `u`. Returns the token on every
/// thread. `smem` holds `top_k_smem_words(k)` u32.
#[inline(always)]
pub unsafe fn sample_top_k(
    logits: *const f32,
    vocab: u32,
    k: u32,
    temperature: f32,
    top_p: f32,
    u: f32,
    smem: *mut u32,
) -> u32 {
    let hist = smem; // [256]
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
        let mut i = thread_idx();
        while i < vocab {
            let key = order_key(ld_cg_f32(logits.add(i as usize)));
            if key & high_mask == prefix & high_mask {
                shared_atomic_add(hist.add(((key >> shift) & 0xff) as usize), 1);
            }
            i += block_dim();
        }
        sync_threads();
        if thread_idx() == 0 {
            let mut above = 0u32;
            let mut bin = 255i32;
            while bin >= 0 {
                let h = *hist.add(bin as usize);
                if above + h >= want {
                    break;
                }
                above += h;
                bin -= 1;
            }
            let bin = bin.max(0) as u32;
            *misc = prefix | (bin << shift);
            *misc.add(1) = want - above;
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
    let mut i = thread_idx();
    while i < vocab {
        let key = order_key(ld_cg_f32(logits.add(i as usize)));
        if key >= threshold {
            let slot = shared_atomic_add(misc.add(2), 1);
            if slot < cap {
                *cand_key.add(slot as usize) = key;
                *cand_idx.add(slot as usize) = i;
            }
        }
        i += block_dim();
    }
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
