//! bf16 matrix x f32 vector, one warp per row: the operation that moves nearly all of a decode
//! step's bytes. Each lane streams 16-byte chunks of the row (8 bf16) through the non-coherent
//! path, multiplies with the vector held in shared memory in f32, and the warp sums at the end.

use crate::device::*;

/// 16 bytes of f32 from shared memory in one `ld.shared.v4`.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct F32x4([f32; 4]);

/// The contiguous range of `rows` owned by this block: blocks take equal slices, so a block's
/// weights for a phase are one contiguous region of memory.
#[inline(always)]
pub fn block_rows(rows: u32) -> (u32, u32) {
    let per = rows.div_ceil(grid_dim());
    let start = (block_idx() * per).min(rows);
    (start, (start + per).min(rows))
}

/// 16 bytes of weights: from a block's staged copy in shared memory (`S`), or from global
/// memory through the non-coherent path.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct U32x4([u32; 4]);

#[inline(always)]
unsafe fn load_w<const S: bool>(p: *const u16) -> [u32; 4] {
    if S {
        (*(p as *const U32x4)).0
    } else {
        ld_nc_v4(p as *const u32)
    }
}

/// Adds one 16-byte chunk of bf16 weights times 8 f32 activations into `acc`.
#[inline(always)]
unsafe fn fma_chunk(w: [u32; 4], x: *const f32, acc: &mut [f32; 2]) {
    let a = *(x as *const F32x4);
    let b = *(x.add(4) as *const F32x4);
    let (w0, w1) = bf16x2_to_f32(w[0]);
    let (w2, w3) = bf16x2_to_f32(w[1]);
    let (w4, w5) = bf16x2_to_f32(w[2]);
    let (w6, w7) = bf16x2_to_f32(w[3]);
    acc[0] = fma(w0, a.0[0], acc[0]);
    acc[1] = fma(w1, a.0[1], acc[1]);
    acc[0] = fma(w2, a.0[2], acc[0]);
    acc[1] = fma(w3, a.0[3], acc[1]);
    acc[0] = fma(w4, b.0[0], acc[0]);
    acc[1] = fma(w5, b.0[1], acc[1]);
    acc[0] = fma(w6, b.0[2], acc[0]);
    acc[1] = fma(w7, b.0[3], acc[1]);
}

/// Dot products of two bf16 rows with `x` (shared memory, `cols` f32), for the calling warp.
/// Every lane returns the same sums. Loads for both rows are issued before any arithmetic so
/// that eight 16-byte loads per lane are in flight. `cols` must be a multiple of 8 and rows
/// 16-byte aligned.
#[inline(always)]
pub unsafe fn dot2<const S: bool>(row_a: *const u16, row_b: *const u16, x: *const f32, cols: u32) -> (f32, f32) {
    let chunks = cols >> 3;
    let mut acc_a = [0.0f32; 2];
    let mut acc_b = [0.0f32; 2];
    let mut c = lane();
    while c + 96 < chunks {
        let mut wa = [[0u32; 4]; 4];
        let mut wb = [[0u32; 4]; 4];
        crate::unroll!(4, K, {
            wa[K] = load_w::<S>(row_a.add(((c + 32 * K as u32) * 8) as usize));
            wb[K] = load_w::<S>(row_b.add(((c + 32 * K as u32) * 8) as usize));
        });
        crate::unroll!(4, K, {
            let xs = x.add(((c + 32 * K as u32) * 8) as usize);
            fma_chunk(wa[K], xs, &mut acc_a);
            fma_chunk(wb[K], xs, &mut acc_b);
        });
        c += 128;
    }
    while c < chunks {
        let wa = load_w::<S>(row_a.add((c * 8) as usize));
        let wb = load_w::<S>(row_b.add((c * 8) as usize));
        let xs = x.add((c * 8) as usize);
        fma_chunk(wa, xs, &mut acc_a);
        fma_chunk(wb, xs, &mut acc_b);
        c += 32;
    }
    (warp_sum(acc_a[0] + acc_a[1]), warp_sum(acc_b[0] + acc_b[1]))
}

/// Dot product of one bf16 row with `x`, for the calling warp (see `dot2`). A warp that owns a
/// single long row (the o and down projections give each block only a few) issues up to eight
/// 16-byte loads per lane before using any, so the row arrives in one round trip.
#[inline(always)]
pub unsafe fn dot1<const S: bool>(row: *const u16, x: *const f32, cols: u32) -> f32 {
    let chunks = cols >> 3;
    let mut acc = [0.0f32; 2];
    let mut c = lane();
    while c + 224 < chunks {
        let mut w = [[0u32; 4]; 8];
        crate::unroll!(8, K, {
            w[K] = load_w::<S>(row.add(((c + 32 * K as u32) * 8) as usize));
        });
        crate::unroll!(8, K, {
            fma_chunk(w[K], x.add(((c + 32 * K as u32) * 8) as usize), &mut acc);
        });
        c += 256;
    }
    while c + 96 < chunks {
        let mut w = [[0u32; 4]; 4];
        crate::unroll!(4, K, {
            w[K] = load_w::<S>(row.add(((c + 32 * K as u32) * 8) as usize));
        });
        crate::unroll!(4, K, {
            fma_chunk(w[K], x.add(((c + 32 * K as u32) * 8) as usize), &mut acc);
        });
        c += 128;
    }
    while c < chunks {
        let w = load_w::<S>(row.add((c * 8) as usize));
        fma_chunk(w, x.add((c * 8) as usize), &mut acc);
        c += 32;
    }
    warp_sum(acc[0] + acc[1])
}

/// Where a phase's weight rows come from: the matrix in global memory, or the block's own
/// rows `[first, ..)` staged into shared memory ahead of time (`stage_rows`).
#[derive(Clone, Copy)]
pub struct Rows {
    pub base: *const u16,
    pub first: u32,
    pub staged: bool,
}

impl Rows {
    pub fn global(w: *const u16) -> Rows {
        Rows { base: w, first: 0, staged: false }
    }
    #[inline(always)]
    pub unsafe fn row(&self, r: u32, cols: u32) -> *const u16 {
        self.base.add(((r - self.first) * cols) as usize)
    }
}

/// `out(row, w[row] . x)` for every row in `[r0, r1)`, the block's warps taking rows in turn,
/// two at a time. `out` runs on every lane of the warp that computed the row.
#[inline(always)]
pub unsafe fn gemv_rows<F: FnMut(u32, f32)>(w: Rows, cols: u32, x: *const f32, r0: u32, r1: u32, out: F) {
    if w.staged {
        gemv_rows_from::<true, F>(w, cols, x, r0, r1, out)
    } else {
        gemv_rows_from::<false, F>(w, cols, x, r0, r1, out)
    }
}

/// A lane's share of `x` (at most four 8-wide chunks, so `cols` <= 1024), held in registers
/// for every row the warp computes: the rows' loop then reads only weights.
#[derive(Clone, Copy)]
pub struct XRegs(pub [[f32; 8]; 4]);

#[inline(always)]
pub unsafe fn x_regs(x: *const f32, cols: u32) -> XRegs {
    let chunks = cols >> 3;
    let mut v = [[0.0f32; 8]; 4];
    crate::unroll!(4, K, {
        let c = lane() + 32 * K as u32;
        if c < chunks {
            let a = *(x.add((c * 8) as usize) as *const F32x4);
            let b = *(x.add((c * 8 + 4) as usize) as *const F32x4);
            v[K] = [a.0[0], a.0[1], a.0[2], a.0[3], b.0[0], b.0[1], b.0[2], b.0[3]];
        }
    });
    XRegs(v)
}

#[inline(always)]
fn fma8(w: [u32; 4], x: &[f32; 8], acc: &mut [f32; 2]) {
    for j in 0..4 {
        let (lo, hi) = bf16x2_to_f32(w[j]);
        acc[0] = fma(lo, x[2 * j], acc[0]);
        acc[1] = fma(hi, x[2 * j + 1], acc[1]);
    }
}

/// Two rows against `x` held in registers (`cols` <= 1024): all eight weight loads first.
#[inline(always)]
pub unsafe fn dot2_xregs<const S: bool>(row_a: *const u16, row_b: *const u16, x: &XRegs, cols: u32) -> (f32, f32) {
    let chunks = cols >> 3;
    let mut wa = [[0u32; 4]; 4];
    let mut wb = [[0u32; 4]; 4];
    crate::unroll!(4, K, {
        let c = lane() + 32 * K as u32;
        if c < chunks {
            wa[K] = load_w::<S>(row_a.add((c * 8) as usize));
            wb[K] = load_w::<S>(row_b.add((c * 8) as usize));
        }
    });
    let mut acc_a = [0.0f32; 2];
    let mut acc_b = [0.0f32; 2];
    crate::unroll!(4, K, {
        if lane() + 32 * (K as u32) < chunks {
            fma8(wa[K], &x.0[K], &mut acc_a);
            fma8(wb[K], &x.0[K], &mut acc_b);
        }
    });
    (warp_sum(acc_a[0] + acc_a[1]), warp_sum(acc_b[0] + acc_b[1]))
}

/// One row against `x` held in registers (`cols` <= 1024).
#[inline(always)]
pub unsafe fn dot1_xregs<const S: bool>(row: *const u16, x: &XRegs, cols: u32) -> f32 {
    let chunks = cols >> 3;
    let mut w = [[0u32; 4]; 4];
    crate::unroll!(4, K, {
        let c = lane() + 32 * K as u32;
        if c < chunks {
            w[K] = load_w::<S>(row.add((c * 8) as usize));
        }
    });
    let mut acc = [0.0f32; 2];
    crate::unroll!(4, K, {
        if lane() + 32 * (K as u32) < chunks {
            fma8(w[K], &x.0[K], &mut acc);
        }
    });
    warp_sum(acc[0] + acc[1])
}

#[inline(always)]
unsafe fn gemv_rows_from<const S: bool, F: FnMut(u32, f32)>(
    w: Rows,
    cols: u32,
    x: *const f32,
    r0: u32,
    r1: u32,
    mut out: F,
) {
    let nw = warps_per_block();
    let mut r = r0 + warp();
    if cols <= 1024 {
        if r >= r1 {
            return;
        }
        let xr = x_regs(x, cols);
        while r + nw < r1 {
            let (a, b) = dot2_xregs::<S>(w.row(r, cols), w.row(r + nw, cols), &xr, cols);
            out(r, a);
            out(r + nw, b);
            r += 2 * nw;
        }
        if r < r1 {
            out(r, dot1_xregs::<S>(w.row(r, cols), &xr, cols));
        }
        return;
    }
    while r + nw < r1 {
        let (a, b) = dot2::<S>(w.row(r, cols), w.row(r + nw, cols), x, cols);
        out(r, a);
        out(r + nw, b);
        r += 2 * nw;
    }
    if r < r1 {
        out(r, dot1::<S>(w.row(r, cols), x, cols));
    }
}

/// Block-wide: starts asynchronous copies (`cp.async`) of rows `[r0, r1)` of a bf16 matrix
/// with `cols` columns into shared memory at `dst`. The caller commits them
/// (`cp_async_commit`) and later waits (`cp_async_wait_*` + `sync_threads`) before reading.
/// Weights do not depend on activations, so a block stages a phase's rows while earlier
/// phases still run and the grid meets at barriers: the copy's DRAM time leaves the critical
/// path.
#[inline(always)]
pub unsafe fn stage_rows(dst: *mut u16, w: *const u16, cols: u32, r0: u32, r1: u32) {
    copy_async(dst as *mut u8, w.add((r0 * cols) as usize) as *const u8, (r1 - r0) * cols * 2);
}

/// `bytes` (a multiple of 16) from global `src` to shared `dst` with 16-byte `cp.async`s
/// spread over the block. Not committed: see `cp_async_commit`.
#[inline(always)]
pub unsafe fn copy_async(dst: *mut u8, src: *const u8, bytes: u32) {
    let mut off = thread_idx() * 16;
    while off < bytes {
        cp_async_16(dst.add(off as usize), src.add(off as usize));
        off += block_dim() * 16;
    }
}

/// Copies `n` f32 from global memory (written earlier in this launch, so read via L2) into
/// shared memory, block-wide. Ends with `sync_threads`.
#[inline(always)]
pub unsafe fn load_vector_to_shared(src: *const f32, n: u32, dst: *mut f32) {
    let mut i = thread_idx() * 4;
    while i < n {
        let v = ld_cg_f32x4(src.add(i as usize));
        *(dst.add(i as usize) as *mut F32x4) = F32x4(v);
        i += block_dim() * 4;
    }
    sync_threads();
}
