//! bf16 matrix x f32 vector: the operation that moves nearly all of a decode step's bytes.
//!
//! A warp computes whole rows: each lane loads 16-byte chunks (8 bf16) of a row through the
//! non-coherent path (chunk `lane + 32 k`), multiplies them with the vector held in shared
//! memory in f32, and the warp sums at the end. What matters for speed is how many loads a
//! warp has in flight: a warp requests *all* the rows it owns in a phase before it uses any
//! (`load_round`), so a phase's weights arrive in one round trip to memory, and a phase asks
//! for its weights before it waits for its input vector (the norm), so the two overlap.

use crate::device::*;

/// 16 bytes of f32 from shared memory in one `ld.shared.v4`.
#[repr(C, align(16))]
#[derive(Clone, Copy)]
struct F32x4([f32; 4]);

/// Where element `i` of a GEMV's input vector lives in shared memory. Chunk `c` (columns
/// `8c..8c+8`, the 16 bytes of bf16 weights a lane loads at once) is split in halves, and the
/// halves of 32 consecutive chunks are stored as two runs of 128 words: the first halves, then
/// the second. A lane `l` reading chunk `l + 32k` then finds its two halves at constant
/// offsets (`256k` and `256k + 128` words) from word `4l`, and a warp's loads are contiguous
/// 512-byte runs, free of bank conflicts. (Stored plainly, each of those 16-byte loads took
/// twice its shared-memory cycles.)
/// The vector takes `abi::gemv_vector_words(n)` words. Writers store four values at a time
/// (`i` a multiple of 4: four consecutive words here too).
#[inline(always)]
pub fn x_index(i: u32) -> usize {
    let c = i >> 3;
    (((c >> 5) << 8) + (((i >> 2) & 1) << 7) + ((c & 31) << 2) + (i & 3)) as usize
}

/// The contiguous range of `rows` owned by this block: blocks take equal slices, so a block's
/// weights for a phase are one contiguous region of memory.
#[inline(always)]
pub fn block_rows(rows: u32) -> (u32, u32) {
    let per = rows.div_ceil(grid_dim());
    let start = (block_idx() * per).min(rows);
    (start, (start + per).min(rows))
}

/// One lane's share of `R` rows: `C` chunks of 16 bytes (8 bf16) per row, chunk `k` holding
/// columns `8 (lane + 32 k) ..`. Rows of up to `256 C` columns fit. Missing rows or chunks are
/// zero.
#[derive(Clone, Copy)]
pub struct LaneRows<const R: usize, const C: usize>(pub [[[u32; 4]; C]; R]);

/// Requests the rows at `rows` (null: no row) of a bf16 matrix with `cols` columns (a multiple
/// of 8, at most `256 C`; rows 16-byte aligned). Returns at once: the registers fill as the
/// loads land, and the first use waits.
#[inline(always)]
pub unsafe fn load_rows<const R: usize, const C: usize>(rows: [*const u16; R], cols: u32) -> LaneRows<R, C> {
    let chunks = cols >> 3;
    let mut w = [[[0u32; 4]; C]; R];
    crate::unroll!(4, RI, {
        if RI < R && !rows[RI].is_null() {
            crate::unroll!(12, K, {
                let c = lane() + 32 * K as u32;
                if K < C && c < chunks {
                    w[RI][K] = ld_nc_v4(rows[RI].add((c * 8) as usize) as *const u32);
                }
            });
        }
    });
    LaneRows(w)
}

/// Row `row` of `w` (`cols` columns) if it is below `end`, else null.
#[inline(always)]
pub unsafe fn row_or_null(w: *const u16, cols: u32, row: u32, end: u32) -> *const u16 {
    if row < end {
        w.add((row * cols) as usize)
    } else {
        core::ptr::null()
    }
}

/// The rows warp `warp()` computes in round `j` of a block's rows `[r0, r1)`: rows
/// `r0 + warp() + warps * (j R + i)` for `i < R`, those below `r1`.
#[inline(always)]
pub fn round_row(r0: u32, j: u32, i: usize, rpr: usize) -> u32 {
    r0 + warp() + warps_per_block() * (j * rpr as u32 + i as u32)
}

/// Requests this warp's rows of round `j` (see `round_row`) of `w`.
#[inline(always)]
pub unsafe fn load_round<const R: usize, const C: usize>(
    w: *const u16,
    cols: u32,
    r0: u32,
    r1: u32,
    j: u32,
) -> LaneRows<R, C> {
    let mut rows = [core::ptr::null(); R];
    crate::unroll!(4, I, {
        if I < R {
            rows[I] = row_or_null(w, cols, round_row(r0, j, I, R), r1);
        }
    });
    load_rows::<R, C>(rows, cols)
}

/// The `R` dot products of loaded rows with `x` (shared memory, `cols` f32), summed across the
/// warp: every lane returns all of them.
#[inline(always)]
pub unsafe fn dot_rows<const R: usize, const C: usize>(w: &LaneRows<R, C>, x: *const f32, cols: u32) -> [f32; R] {
    let chunks = cols >> 3;
    let mut acc = [[0.0f32; 2]; R];
    crate::unroll!(12, K, {
        let c = lane() + 32 * K as u32;
        if K < C && c < chunks {
            let a = *(x.add(x_index(c * 8)) as *const F32x4);
            let b = *(x.add(x_index(c * 8 + 4)) as *const F32x4);
            let xs = [a.0[0], a.0[1], a.0[2], a.0[3], b.0[0], b.0[1], b.0[2], b.0[3]];
            crate::unroll!(4, RI, {
                if RI < R {
                    crate::unroll!(4, J, {
                        let (lo, hi) = bf16x2_to_f32(w.0[RI][K][J]);
                        acc[RI][0] = fma(lo, xs[2 * J], acc[RI][0]);
                        acc[RI][1] = fma(hi, xs[2 * J + 1], acc[RI][1]);
                    });
                }
            });
        }
    });
    let mut out = [0.0f32; R];
    crate::unroll!(4, RI, {
        if RI < R {
            out[RI] = warp_sum(acc[RI][0] + acc[RI][1]);
        }
    });
    out
}

/// `out(row, w[row] . x)` for every row of the block's `[r0, r1)`, in rounds of `R` rows per
/// warp (see `round_row`). Round 0's weights are `first`, requested by the caller with
/// `load_round(.., 0)` before it prepared `x`; any later round is requested when reached. `out`
/// runs on every lane of the warp that computed the row.
#[inline(always)]
pub unsafe fn gemv_rounds<const R: usize, const C: usize, F: FnMut(u32, f32)>(
    w: *const u16,
    cols: u32,
    x: *const f32,
    r0: u32,
    r1: u32,
    first: LaneRows<R, C>,
    mut out: F,
) {
    let mut rows = first;
    let mut j = 0;
    while round_row(r0, j, 0, R) < r1 {
        if j > 0 {
            rows = load_round::<R, C>(w, cols, r0, r1, j);
        }
        let sums = dot_rows(&rows, x, cols);
        crate::unroll!(4, I, {
            if I < R {
                let row = round_row(r0, j, I, R);
                if row < r1 {
                    out(row, sums[I]);
                }
            }
        });
        j += 1;
    }
}

/// `out(row, w[row] . x)` for a long run of rows `[r0, r1)` (the LM head), `cols` <= 1024:
/// the warps take rows two at a time, and each warp requests its next two rows before it
/// computes the current two, so four rows per warp are always in flight.
#[inline(always)]
pub unsafe fn gemv_stream<F: FnMut(u32, f32)>(w: *const u16, cols: u32, x: *const f32, r0: u32, r1: u32, mut out: F) {
    let mut rows = load_round::<2, 4>(w, cols, r0, r1, 0);
    let mut j = 0;
    while round_row(r0, j, 0, 2) < r1 {
        let next = load_round::<2, 4>(w, cols, r0, r1, j + 1);
        let sums = dot_rows(&rows, x, cols);
        crate::unroll!(4, I, {
            if I < 2 {
                let row = round_row(r0, j, I, 2);
                if row < r1 {
                    out(row, sums[I]);
                }
            }
        });
        rows = next;
        j += 1;
    }
}

/// Copies `n` f32 from global memory (written earlier in this launch, so read via L2) into
/// shared memory in the GEMV's layout (`x_index`), block-wide. Ends with `sync_threads`.
#[inline(always)]
pub unsafe fn load_vector_to_shared(src: *const f32, n: u32, dst: *mut f32) {
    let mut i = thread_idx() * 4;
    while i < n {
        let v = ld_cg_f32x4(src.add(i as usize));
        *(dst.add(x_index(i)) as *mut F32x4) = F32x4(v);
        i += block_dim() * 4;
    }
    sync_threads();
}
