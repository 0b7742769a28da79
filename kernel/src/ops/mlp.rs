//! The MLP's first half: SiLU(gate . x) * (up . x), one warp per output, both rows streamed
//! together so neither projection needs its own pass or its own barrier.

use crate::device::*;
use crate::ops::gemv::{dot2, dot2_xregs, x_regs, Rows, XRegs};

#[inline(always)]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + exp(-g))
}

/// `out[i] = silu(gate[i] . x) * (up[i] . x)` for i in `[r0, r1)`; `x` in shared memory.
#[inline(always)]
pub unsafe fn gate_up_silu_rows(gate: Rows, up: Rows, hidden: u32, x: *const f32, r0: u32, r1: u32, out: *mut f32) {
    if gate.staged {
        gate_up_from::<true>(gate, up, hidden, x, r0, r1, out)
    } else {
        gate_up_from::<false>(gate, up, hidden, x, r0, r1, out)
    }
}

#[inline(always)]
unsafe fn gate_up_from<const S: bool>(
    gate: Rows,
    up: Rows,
    hidden: u32,
    x: *const f32,
    r0: u32,
    r1: u32,
    out: *mut f32,
) {
    let mut i = r0 + warp();
    if i >= r1 {
        return;
    }
    let xr = if hidden <= 1024 { x_regs(x, hidden) } else { XRegs([[0.0; 8]; 4]) };
    while i < r1 {
        let (g, u) = if hidden <= 1024 {
            dot2_xregs::<S>(gate.row(i, hidden), up.row(i, hidden), &xr, hidden)
        } else {
            dot2::<S>(gate.row(i, hidden), up.row(i, hidden), x, hidden)
        };
        if lane() == 0 {
            *out.add(i as usize) = silu(g) * u;
        }
        i += warps_per_block();
    }
}
