//! The MLP's first half: SiLU(gate . x) * (up . x), one warp per output, both rows streamed
//! together so neither projection needs its own pass or its own barrier.

use crate::device::*;
use crate::ops::gemv::dot2;

#[inline(always)]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + exp(-g))
}

/// `out[i] = silu(gate[i] . x) * (up[i] . x)` for i in `[r0, r1)`; `x` in shared memory.
#[inline(always)]
pub unsafe fn gate_up_silu_rows(
    w_gate: *const u16,
    w_up: *const u16,
    hidden: u32,
    x: *const f32,
    r0: u32,
    r1: u32,
    out: *mut f32,
) {
    let mut i = r0 + warp();
    while i < r1 {
        let off = (i * hidden) as usize;
        let (g, u) = dot2(w_gate.add(off), w_up.add(off), x, hidden);
        if lane() == 0 {
            *out.add(i as usize) = silu(g) * u;
        }
        i += warps_per_block();
    }
}
