//! The streaming step's trace (`StreamStep::trace`: each block's SM cycle counter at the marks
//! of `StreamMark`, in one layer and at the end of a step) as us after the mark each is
//! measured from, over a group of blocks: the median block and the latest one, and which block
//! that was. A hand-off waits for its latest contributor, so the latest and its block say where
//! a straggler comes from. Pure CPU code, checked without a GPU.

use super::abi::{StreamMark as M, STREAM_GRID, STREAM_HEAD_BLOCKS, STREAM_TRACE_MARKS};
use crate::stats::median;

/// Which blocks a summary is over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceBlocks {
    /// The 64 blocks with attention (q/k/v, attention, o and a share of the MLP).
    Heads,
    /// The blocks with only a share of the MLP (and of the LM head).
    Others,
    All,
}

impl TraceBlocks {
    fn holds(self, block: u32) -> bool {
        match self {
            TraceBlocks::Heads => block < STREAM_HEAD_BLOCKS,
            TraceBlocks::Others => block >= STREAM_HEAD_BLOCKS,
            TraceBlocks::All => true,
        }
    }
}

/// One mark over a group of blocks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MarkSummary {
    pub name: &'static str,
    pub median_us: f64,
    pub latest_us: f64,
    pub latest_block: u32,
}

/// The layer's marks, measured from the layer's start, and whether only blocks with attention
/// record them (of those, only blocks with cached positions record `CachedPageIn`).
const LAYER_MARKS: [(&str, M, bool); 14] = [
    ("input normed", M::InputNormed, true),
    ("q/k/v pages", M::QkvPages, true),
    ("q/k/v exchanged", M::QkvExchanged, true),
    ("q/k rotated", M::QkvRotated, true),
    ("first cached page in", M::CachedPageIn, true),
    ("cached positions", M::CachedPositions, true),
    ("attention merged", M::AttentionMerged, true),
    ("o pages", M::OPages, true),
    ("o sum published", M::OSumPublished, true),
    ("o sum seen", M::OSumSeen, false),
    ("gate/up pages", M::GateUpPages, false),
    ("down pages", M::DownPages, false),
    ("down sum published", M::DownSumPublished, false),
    ("layer (down sum seen)", M::DownSumSeen, false),
];

/// The marks `blocks` record (`marks` is `[STREAM_GRID][STREAM_TRACE_MARKS]` cycles, as
/// `StreamStep::trace` returns them; `clock_khz` the SM clock): the layer's marks after its
/// start, then the LM head's pages and the token after the LM head's start, then the step.
/// Blocks that did not record a mark (it reads 0) are left out of its summary.
pub fn summarize(marks: &[u64], clock_khz: f64, blocks: TraceBlocks) -> Vec<MarkSummary> {
    let per = STREAM_TRACE_MARKS as usize;
    assert_eq!(marks.len(), STREAM_GRID as usize * per, "a trace is {STREAM_GRID} blocks of {per} marks");
    let us = |cycles: u64| cycles as f64 / clock_khz * 1e3;
    let over = |name, m: M, from: M, heads_only: bool| {
        let times: Vec<(u32, f64)> = marks
            .chunks_exact(per)
            .enumerate()
            .map(|(b, t)| (b as u32, t))
            .filter(|&(b, t)| blocks.holds(b) && (!heads_only || b < STREAM_HEAD_BLOCKS) && t[m as usize] != 0)
            .map(|(b, t)| (b, us(t[m as usize].wrapping_sub(t[from as usize]))))
            .collect();
        if times.is_empty() {
            return None;
        }
        let (latest_block, latest_us) =
            times.iter().copied().fold((0, f64::NEG_INFINITY), |best, (b, v)| if v > best.1 { (b, v) } else { best });
        let mut values: Vec<f64> = times.iter().map(|&(_, v)| v).collect();
        Some(MarkSummary { name, median_us: median(&mut values), latest_us, latest_block })
    };
    let mut out: Vec<MarkSummary> =
        LAYER_MARKS.iter().filter_map(|&(name, m, heads)| over(name, m, M::LayerStart, heads)).collect();
    out.extend(over("LM head pages", M::LmHeadPages, M::LmHeadStart, false));
    out.extend(over("token known", M::TokenKnown, M::LmHeadStart, false));
    out.extend(over("step", M::TokenKnown, M::StepStart, false));
    out
}
