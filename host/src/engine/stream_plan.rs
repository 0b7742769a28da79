//! The streaming step's plan (kernel/src/stream.rs): which block streams which weights, and
//! the two matrices it reads by input columns (o and down) laid out tile by tile, so that
//! every page the loader copies is one contiguous range. Pure CPU code, checked without a GPU.

use super::abi::*;
use crate::model::Qwen3Config;
use anyhow::{ensure, Result};
use half::bf16;

/// The streaming step is compiled for Qwen3-0.6B's shape alone; anything else is refused
/// before any upload.
pub fn check_stream_shape(c: &Qwen3Config) -> Result<()> {
    let want = [
        ("hidden_size", c.hidden_size, STREAM_HIDDEN),
        ("num_attention_heads", c.num_attention_heads, STREAM_HEADS),
        ("num_key_value_heads", c.num_key_value_heads, STREAM_KV_HEADS),
        ("head_dim", c.head_dim, STREAM_HEAD_DIM),
        ("intermediate_size", c.intermediate_size, STREAM_INTER),
    ];
    for (name, have, need) in want {
        ensure!(
            have == need as usize,
            "the streaming step is compiled for Qwen3-0.6B's shape: {name} {need}, not {have}"
        );
    }
    ensure!(
        c.num_hidden_layers >= 1 && c.num_hidden_layers <= STREAM_MAX_LAYERS as usize,
        "the streaming step takes 1 to {STREAM_MAX_LAYERS} layers, not {}",
        c.num_hidden_layers
    );
    ensure!(
        c.vocab_size.is_multiple_of(STREAM_LM_ROWS_PER_PAGE as usize) && c.vocab_size <= u32::MAX as usize / 2,
        "the streaming step needs a vocabulary that is a multiple of {STREAM_LM_ROWS_PER_PAGE}, not {}",
        c.vocab_size
    );
    Ok(())
}

/// Bytes a block streams per layer with `units` MLP units (and q/k/v + o if a head block).
pub fn layer_bytes(head: bool, units: u32) -> u64 {
    let attention = if head { (STREAM_QKV_PAGES + STREAM_O_PAGES) * STREAM_PAGE_BYTES } else { 0 };
    (attention + units * (STREAM_PAGE_BYTES + STREAM_DOWN_UNIT_BYTES)) as u64
}

/// How the MLP's units are split over the blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlpSplit {
    /// The most bytes any block streams per layer as small as it can be.
    EvenBytes,
    /// Blocks without attention take as many units as their ring holds whole (they wait for
    /// attention's sum with nothing else to do, so their whole share can be in shared memory
    /// by then); the blocks with attention take the rest.
    RingFirst,
    /// Each block with attention takes this many units (0 ..= `STREAM_MAX_UNITS`), the others
    /// the rest (for sweeps: `QWEN3_STREAM_SPLIT=heads:N`).
    HeadUnits(u32),
}

impl MlpSplit {
    /// `even`, `ring` or `heads:N`; `None` for anything else or a split the blocks cannot take.
    pub fn parse(s: &str) -> Option<MlpSplit> {
        let split = match s {
            "even" => MlpSplit::EvenBytes,
            "ring" => MlpSplit::RingFirst,
            _ => MlpSplit::HeadUnits(s.strip_prefix("heads:")?.parse().ok()?),
        };
        if let MlpSplit::HeadUnits(n) = split {
            let heads = STREAM_HEAD_BLOCKS * n;
            let others = STREAM_GRID - STREAM_HEAD_BLOCKS;
            let fits = n <= STREAM_MAX_UNITS
                && heads <= STREAM_MLP_UNITS
                && (STREAM_MLP_UNITS - heads).div_ceil(others) <= STREAM_MAX_UNITS;
            if !fits {
                return None;
            }
        }
        Some(split)
    }
}

/// `QWEN3_STREAM_IN_FLIGHT`'s value: bulk copies each loader keeps on their way at once, 1 to
/// the ring's pages; `None` for anything else.
pub fn parse_copies_in_flight(s: &str) -> Option<u32> {
    s.parse().ok().filter(|n| (1..=STREAM_RING_PAGES).contains(n))
}

/// `QWEN3_STREAM_POLL_GAP`'s value: SM cycles between two polls of a hand-off sum, 0 to
/// `STREAM_MAX_POLL_GAP`; `None` for anything else.
pub fn parse_poll_gap(s: &str) -> Option<u32> {
    s.parse().ok().filter(|n| *n <= STREAM_MAX_POLL_GAP)
}

/// Ring pages `units` MLP units take: a gate/up page each, a down page per two.
pub fn mlp_pages(units: u32) -> u32 {
    units + units.div_ceil(2)
}

/// Every block's share: the MLP units split as `split` says, then the LM head's pages as
/// evenly as they go, the spare ones to the blocks with the fewest MLP bytes.
pub fn block_plans(vocab: usize, split: MlpSplit) -> Vec<StreamBlockPlan> {
    let grid = STREAM_GRID as usize;
    let heads = STREAM_HEAD_BLOCKS;
    let others = STREAM_GRID - heads;
    let (head_total, other_total) = match split {
        MlpSplit::EvenBytes => {
            let mut best: Option<(u64, u32)> = None;
            for head_units in 0..=STREAM_MAX_UNITS.min(STREAM_MLP_UNITS / heads) {
                let other_units = (STREAM_MLP_UNITS - heads * head_units).div_ceil(others);
                if other_units > STREAM_MAX_UNITS {
                    continue;
                }
                let worst = layer_bytes(true, head_units).max(layer_bytes(false, other_units));
                if best.is_none_or(|(w, _)| worst < w) {
                    best = Some((worst, head_units));
                }
            }
            let (_, head_units) = best.expect("some split of the MLP fits STREAM_MAX_UNITS");
            (heads * head_units, STREAM_MLP_UNITS - heads * head_units)
        }
        MlpSplit::RingFirst => {
            let fit = (1..=STREAM_MAX_UNITS).take_while(|&u| mlp_pages(u) <= STREAM_RING_PAGES).last().unwrap_or(1);
            let other_total = (others * fit).min(STREAM_MLP_UNITS - heads);
            (STREAM_MLP_UNITS - other_total, other_total)
        }
        MlpSplit::HeadUnits(n) => (heads * n, STREAM_MLP_UNITS - heads * n),
    };
    let mut plans = vec![StreamBlockPlan::default(); grid];
    let mut start = 0;
    for (b, plan) in plans.iter_mut().enumerate() {
        let b = b as u32;
        let (total, n, i) = if b < heads { (head_total, heads, b) } else { (other_total, others, b - heads) };
        let units = total / n + u32::from(i < total % n);
        plan.mlp_start = start;
        plan.mlp_units = units;
        start += units;
    }
    debug_assert_eq!(start, STREAM_MLP_UNITS);

    let pages = (vocab / STREAM_LM_ROWS_PER_PAGE as usize) as u32;
    let (base, spare) = (pages / STREAM_GRID, pages % STREAM_GRID);
    let mut order: Vec<usize> = (0..grid).collect();
    order.sort_by_key(|&b| (layer_bytes((b as u32) < heads, plans[b].mlp_units), b));
    let mut extra = vec![false; grid];
    for &b in order.iter().take(spare as usize) {
        extra[b] = true;
    }
    let mut row = 0;
    for (plan, extra) in plans.iter_mut().zip(extra) {
        plan.lm_start = row;
        plan.lm_rows = (base + u32::from(extra)) * STREAM_LM_ROWS_PER_PAGE;
        row += plan.lm_rows;
    }
    plans
}

/// o_proj (`[hidden, q_dim]`) as `STREAM_HEAD_BLOCKS` tiles of its columns `32 b .. 32 b + 32`,
/// each `[hidden, 32]` row-major: head block `b`'s four pages.
pub fn o_tiles(o_proj: &[bf16]) -> Vec<u16> {
    let (hidden, q_dim) = (STREAM_HIDDEN as usize, (STREAM_HEADS * STREAM_HEAD_DIM) as usize);
    assert_eq!(o_proj.len(), hidden * q_dim, "o_proj is not [hidden, q_dim]");
    let mut out = Vec::with_capacity(o_proj.len());
    for b in 0..STREAM_HEAD_BLOCKS as usize {
        for row in 0..hidden {
            let at = row * q_dim + 32 * b;
            out.extend(o_proj[at..at + 32].iter().map(|v| v.to_bits()));
        }
    }
    out
}

/// down_proj (`[hidden, inter]`) as `STREAM_MLP_UNITS` tiles of its columns `4 u .. 4 u + 4`,
/// each `[hidden, 4]` row-major: one page per MLP unit.
pub fn down_tiles(down_proj: &[bf16]) -> Vec<u16> {
    let (hidden, inter, unit) = (STREAM_HIDDEN as usize, STREAM_INTER as usize, STREAM_MLP_UNIT as usize);
    assert_eq!(down_proj.len(), hidden * inter, "down_proj is not [hidden, inter]");
    let mut out = Vec::with_capacity(down_proj.len());
    for u in 0..STREAM_MLP_UNITS as usize {
        for row in 0..hidden {
            let at = row * inter + unit * u;
            out.extend(down_proj[at..at + unit].iter().map(|v| v.to_bits()));
        }
    }
    out
}

/// The counting fixed-point word of one contribution `v` to a hand-off sum, as the kernel
/// makes it (`stream.rs`: `encode_part`), and the value of a word holding `count` of them.
pub fn encode_part(v: f32) -> u64 {
    let c = if v.is_nan() { -STREAM_CLAMP } else { v.clamp(-STREAM_CLAMP, STREAM_CLAMP) };
    let fixed = (c * (1u64 << STREAM_FIXED_BITS) as f32).round_ties_even() as i64;
    ((1u64 << STREAM_COUNT_SHIFT) + STREAM_BIAS).wrapping_add(fixed as u64)
}

pub fn decode_sum(word: u64, count: u32) -> Option<f32> {
    if word >> STREAM_COUNT_SHIFT != count as u64 {
        return None;
    }
    let low = (word & ((1u64 << STREAM_COUNT_SHIFT) - 1)) as i64;
    Some((low - (STREAM_BIAS * count as u64) as i64) as f32 / (1u64 << STREAM_FIXED_BITS) as f32)
}
