//! The MLP's first half: SiLU(gate . x) * (up . x), one warp per output, both rows streamed
//! together so neither projection needs its own pass or its own barrier.

use crate::device::*;
use crate::ops::gemv::{dot_rows, load_rows, round_row, row_or_null, LaneRows};

#[inline(always)]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + exp(-g))
}

/// Outputs a warp computes per round: two, i.e. four rows (gate and up of each).
const PAIRS: usize = 2;

/// Requests this warp's gate and up rows of round `j` of the block's outputs `[r0, r1)`:
/// `[gate i, up i, gate i', up i']` for its two outputs `i`, `i'` (see `gemv::round_row`).
#[inline(always)]
pub unsafe fn load_gate_up_round<const C: usize>(
    gate: *const u16,
    up: *const u16,
    hidden: u32,
    r0: u32,
    r1: u32,
    j: u32,
) -> LaneRows<4, C> {
    let mut rows = [core::ptr::null(); 4];
    crate::unroll!(4, I, {
        if I < PAIRS {
            let row = round_row(r0, j, I, PAIRS);
            rows[2 * I] = row_or_null(gate, hidden, row, r1);
            rows[2 * I + 1] = row_or_null(up, hidden, row, r1);
        }
    });
    load_rows::<4, C>(rows, hidden)
}

/// `out[i] = silu(s gate[i] . x) * (s up[i] . x)` for the block's outputs `[r0, r1)`; `x` in
/// shared memory, `s` = `x_scale` (the norm's, see `norm::rms_norm_to_shared`). Round 0's rows
/// are `first` (`load_gate_up_round(.., 0)`, requested by the caller before it prepared `x`).
#[inline(always)]
pub unsafe fn gate_up_silu_rows<const C: usize>(
    gate: *const u16,
    up: *const u16,
    hidden: u32,
    x: *const f32,
    x_scale: f32,
    r0: u32,
    r1: u32,
    first: LaneRows<4, C>,
    out: *mut f32,
) {
    let mut rows = first;
    let mut j = 0;
    while round_row(r0, j, 0, PAIRS) < r1 {
        if j > 0 {
            rows = load_gate_up_round::<C>(gate, up, hidden, r0, r1, j);
        }
        let s = dot_rows(&rows, x, hidden);
        crate::unroll!(4, I, {
            if I < PAIRS {
                let row = round_row(r0, j, I, PAIRS);
                if row < r1 && lane() == 0 {
                    *out.add(row as usize) = silu(s[2 * I] * x_scale) * (s[2 * I + 1] * x_scale);
                }
            }
        });
        j += 1;
    }
}
