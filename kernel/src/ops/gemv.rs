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
pub unsafe fn dot2(row_a: *const u16, row_b: *const u16, x: *const f32, cols: u32) -> (f32, f32) {
    let chunks = cols >> 3;
    let mut acc_a = [0.0f32; 2];
    let mut acc_b = [0.0f32; 2];
    let mut c = lane();
    while c + 96 < chunks {
        let mut wa = [[0u32; 4]; 4];
        let mut wb = [[0u32; 4]; 4];
        for k in 0..4 {
            wa[k] = ld_nc_v4(row_a.add(((c + 32 * k as u32) * 8) as usize) as *const u32);
            wb[k] = ld_nc_v4(row_b.add(((c + 32 * k as u32) * 8) as usize) as *const u32);
        }
        for k in 0..4 {
            let xs = x.add(((c + 32 * k as u32) * 8) as usize);
            fma_chunk(wa[k], xs, &mut acc_a);
            fma_chunk(wb[k], xs, &mut acc_b);
        }
        c += 128;
    }
    while c < chunks {
        let wa = ld_nc_v4(row_a.add((c * 8) as usize) as *const u32);
        let wb = ld_nc_v4(row_b.add((c * 8) as usize) as *const u32);
        let xs = x.add((c * 8) as usize);
        fma_chunk(wa, xs, &mut acc_a);
        fma_chunk(wb, xs, &mut acc_b);
        c += 32;
    }
    (warp_sum(acc_a[0] + acc_a[1]), warp_sum(acc_b[0] + acc_b[1]))
}

/// Dot product of one bf16 row with `x`, for the calling warp (see `dot2`).
#[inline(always)]
pub unsafe fn dot1(row: *const u16, x: *const f32, cols: u32) -> f32 {
    let chunks = cols >> 3;
    let mut acc = [0.0f32; 2];
    let mut c = lane();
    while c + 96 < chunks {
        let mut w = [[0u32; 4]; 4];
        for k in 0..4 {
            w[k] = ld_nc_v4(row.add(((c + 32 * k as u32) * 8) as usize) as *const u32);
        }
        for k in 0..4 {
            fma_chunk(w[k], x.add(((c + 32 * k as u32) * 8) as usize), &mut acc);
        }
        c += 128;
    }
    while c < chunks {
        let w = ld_nc_v4(row.add((c * 8) as usize) as *const u32);
        fma_chunk(w, x.add((c * 8) as usize), &mut acc);
        c += 32;
    }
    warp_sum(acc[0] + acc[1])
}

/// `out(row, w[row] . x)` for every row in `[r0, r1)`, the block's warps taking rows in turn,
/// two at a time. `out` runs on every lane of the warp that computed the row.
#[inline(always)]
pub unsafe fn gemv_rows<F: FnMut(u32, f32)>(w: *const u16, cols: u32, x: *const f32, r0: u32, r1: u32, mut out: F) {
    let nw = warps_per_block();
    let mut r = r0 + warp();
    while r + nw < r1 {
        let (a, b) = dot2(w.add((r * cols) as usize), w.add(((r + nw) * cols) as usize), x, cols);
        out(r, a);
        out(r + nw, b);
        r += 2 * nw;
    }
    if r < r1 {
        out(r, dot1(w.add((r * cols) as usize), x, cols));
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
