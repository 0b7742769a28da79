//! Choosing the next token on the CPU: greedy arg-max, or temperature / top-k / top-p sampling
//! with a small seeded generator (reproducible runs need no external RNG crate).

use super::ops;
use crate::backend::SamplingParams;

/// splitmix64: tiny, fast, and statistically fine for picking tokens.
#[derive(Clone, Debug)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// A sampler for one sequence: the RNG state carries over from token to token.
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        Sampler { params, rng: SplitMix64::new(params.seed) }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return ops::argmax(logits);
        }
        let candidates = filtered_distribution(logits, &self.params);
        let u = self.rng.next_f64();
        let mut cumulative = 0.0;
        for &(id, p) in &candidates {
            cumulative += p;
            if u < cumulative {
                return id;
            }
        }
        // Rounding left `cumulative` a hair below 1: the last candidate takes the remainder.
        candidates.last().map(|&(id, _)| id).unwrap_or_else(|| ops::argmax(logits))
    }
}

/// The distribution sampling draws from: softmax(logits / temperature), restricted to the
/// `top_k` most likely tokens (0 = all), then to the smallest most-likely prefix whose
/// probability reaches `top_p` (always at least one token), renormalised. Sorted by
/// probability, highest first; ties keep the lower id first. NaN logits are never chosen.
pub fn filtered_distribution(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let temperature = params.temperature.max(f32::MIN_POSITIVE) as f64;
    let mut order: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan())
        .map(|(i, &v)| (i as u32, v as f64 / temperature))
        .collect();
    if order.is_empty() {
        return vec![(0, 1.0)];
    }
    let by_prob = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let k = params.top_k as usize;
    if k > 0 && k < order.len() {
        // Partition first so only the k survivors get sorted (the vocabulary is 152k wide).
        order.select_nth_unstable_by(k - 1, by_prob);
        order.truncate(k);
    }
    order.sort_by(by_prob);
    let max = order[0].1;
    let mut total = 0.0;
    for entry in order.iter_mut() {
        entry.1 = (entry.1 - max).exp();
        total += entry.1;
    }
    for entry in order.iter_mut() {
        entry.1 /= total;
    }
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let mut keep = order.len();
        for (i, &(_, p)) in order.iter().enumerate() {
            cumulative += p;
            if cumulative >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        order.truncate(keep.max(1));
        let kept: f64 = order.iter().map(|e| e.1).sum();
        for entry in order.iter_mut() {
            entry.1 /= kept;
        }
    }
    order
}

// ---------------------------------------------------------------- the kernels' draws, on the CPU

/// The kernels' random stream (kernel/src/ops/sampling.rs: `hash3`): a 32-bit hash of
/// (seed, position, row), the same on every run.
pub fn device_hash(seed: u64, pos: u32, row: u32) -> u32 {
    let mut z = seed ^ ((pos as u64) << 32 | row as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 32) as u32
}

/// The kernels' uniform in (0, 1) from a hash (`uniform`).
pub fn device_uniform(h: u32) -> f64 {
    ((h >> 8) as f64 + 0.5) / 16_777_216.0
}

/// What a GPU draw at position `pos` must choose from `logits`, and how close the decision
/// came to another answer (the GPU sums in f32 with fast exponentials: a decision closer than
/// its rounding may go either way, and a test skips it).
pub struct DeviceDraw {
    pub token: u32,
    pub margin: f64,
}

/// A top-k (and top-p) draw as the kernels make it (`sample_top32`): the uniform of
/// (seed, `pos`, `u32::MAX`) against the cumulative shares of `filtered_distribution`. The
/// margin is the distance of the uniform from the nearest cumulative share, or of a share from
/// the top-p cut.
pub fn device_top_k_draw(logits: &[f32], params: &SamplingParams, pos: u32) -> DeviceDraw {
    let u = device_uniform(device_hash(params.seed, pos, u32::MAX));
    let mut margin = f64::INFINITY;
    if params.top_p < 1.0 {
        // The cut itself: cumulative shares of the top k against top-p.
        let all = filtered_distribution(logits, &SamplingParams { top_p: 1.0, ..*params });
        let mut cumulative = 0.0;
        for &(_, p) in &all {
            cumulative += p;
            margin = margin.min((cumulative - params.top_p as f64).abs());
        }
    }
    let kept = filtered_distribution(logits, params);
    let mut cumulative = 0.0;
    let mut token = kept.last().map_or(0, |&(id, _)| id);
    let mut chosen = false;
    for &(id, p) in &kept {
        cumulative += p;
        margin = margin.min((cumulative - u).abs());
        if !chosen && u < cumulative {
            token = id;
            chosen = true;
        }
    }
    DeviceDraw { token, margin }
}

/// A draw with temperature alone as the kernels make it: the Gumbel-max of logit / T plus the
/// noise of (seed, `pos`, row). The margin is the gap between the two best scores.
pub fn device_gumbel_draw(logits: &[f32], params: &SamplingParams, pos: u32) -> DeviceDraw {
    let inv_t = 1.0 / params.temperature as f64;
    let (mut best, mut second, mut token) = (f64::NEG_INFINITY, f64::NEG_INFINITY, 0u32);
    for (row, &l) in logits.iter().enumerate() {
        if l.is_nan() {
            continue;
        }
        let u = device_uniform(device_hash(params.seed, pos, row as u32));
        let score = l as f64 * inv_t - (-u.ln()).ln();
        if score > best {
            (second, best, token) = (best, score, row as u32);
        } else if score > second {
            second = score;
        }
    }
    DeviceDraw { token, margin: best - second }
}
