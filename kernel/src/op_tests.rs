//! Each operation of the decode step as its own small kernel, so the host's GPU unit tests can
//! compare it with its CPU twin (host/src/model/ops.rs). They call exactly the device functions
//! the megakernel uses. Launch with `OP_TEST_THREADS` threads per block.

use crate::abi::*;
use crate::device::*;
use crate::ops::attention::{attention_phase, AttentionArgs};
use crate::ops::gemv::{block_rows, gemv_rounds, load_round, x_index};
use crate::ops::lm_head::{lm_head_phase, LmHeadArgs};
use crate::ops::mlp::{gate_up_silu_rows, load_gate_up_round};
use crate::ops::norm::{head_norm_rope, rms_norm_to_shared, NormInput};

/// Copies `n` f32 from global memory into shared memory with plain loads (inputs written by
/// the host, not by this launch). Ends with `sync_threads`.
unsafe fn stage(src: *const f32, n: u32, dst: *mut f32) {
    let mut i = thread_idx();
    while i < n {
        *dst.add(x_index(i)) = *src.add(i as usize);
        i += block_dim();
    }
    sync_threads();
}

/// `out = rms_norm(x) * w`, one block. Shared memory: `(gemv_vector_words(n) + 32) * 4` bytes.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_rms_norm(x: *const f32, w: *const u16, n: u32, eps: f32, out: *mut f32) {
    let smem = dynamic_shared::<f32>();
    let scale = rms_norm_to_shared(NormInput::F32(x), w, n, eps, smem, smem.add(gemv_vector_words(n) as usize));
    let mut i = thread_idx();
    while i < n {
        *out.add(i as usize) = *smem.add(x_index(i)) * scale;
        i += block_dim();
    }
}

/// `y = W x` with W bf16 `[rows, cols]` (`cols` <= 3072), any grid, through the GEMV the decode
/// kernel's layer phases use, with the register tile it uses for that width (q/k/v and
/// gate/up: <= 1024 columns, 3 rows per warp at once; o: <= 2048; down: <= 3072).
/// Shared memory: `gemv_vector_words(cols) * 4` bytes.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_gemv(w: *const u16, rows: u32, cols: u32, x: *const f32, y: *mut f32) {
    let smem = dynamic_shared::<f32>();
    let (r0, r1) = block_rows(rows);
    let out = |row: u32, v: f32| {
        if lane() == 0 {
            *y.add(row as usize) = v;
        }
    };
    if cols <= 1024 {
        let first = load_round::<3, 4>(w, cols, r0, r1, 0);
        stage(x, cols, smem);
        gemv_rounds(w, cols, smem, r0, r1, first, out);
    } else if cols <= 2048 {
        let first = load_round::<1, 8>(w, cols, r0, r1, 0);
        stage(x, cols, smem);
        gemv_rounds(w, cols, smem, r0, r1, first, out);
    } else if cols <= 3072 {
        let first = load_round::<1, 12>(w, cols, r0, r1, 0);
        stage(x, cols, smem);
        gemv_rounds(w, cols, smem, r0, r1, first, out);
    } else {
        trap();
    }
}

/// `out[i] = silu(gate[i] . x) * (up[i] . x)` (`hidden` <= 1024), any grid, as the decode
/// kernel computes it. Shared memory: `gemv_vector_words(hidden) * 4` bytes.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_gate_up_silu(
    w_gate: *const u16,
    w_up: *const u16,
    inter: u32,
    hidden: u32,
    x: *const f32,
    out: *mut f32,
) {
    let smem = dynamic_shared::<f32>();
    let (r0, r1) = block_rows(inter);
    if hidden > 1024 {
        trap();
    }
    let first = load_gate_up_round::<4>(w_gate, w_up, hidden, r0, r1, 0);
    stage(x, hidden, smem);
    gate_up_silu_rows(w_gate, w_up, hidden, smem, 1.0, r0, r1, first, out);
}

/// Per-head RMSNorm + RoPE of `n_heads` heads of `head_dim` (32, 64 or 128), one warp each.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_head_norm_rope(
    x: *const f32,
    w: *const u16,
    n_heads: u32,
    head_dim: u32,
    eps: f32,
    cos: *const f32,
    sin: *const f32,
    out: *mut f32,
) {
    match head_dim {
        128 => head_norm_rope_heads::<4>(x, w, n_heads, eps, cos, sin, out),
        64 => head_norm_rope_heads::<2>(x, w, n_heads, eps, cos, sin, out),
        32 => head_norm_rope_heads::<1>(x, w, n_heads, eps, cos, sin, out),
        _ => trap(),
    }
}

unsafe fn head_norm_rope_heads<const E: usize>(
    x: *const f32,
    w: *const u16,
    n_heads: u32,
    eps: f32,
    cos: *const f32,
    sin: *const f32,
    out: *mut f32,
) {
    let h = global_warp();
    if h >= n_heads {
        return;
    }
    let base = (h * 32 * E as u32 + lane() * E as u32) as usize;
    let mut v = [0.0f32; E];
    for e in 0..E {
        v[e] = *x.add(base + e);
    }
    let r = head_norm_rope::<E>(v, w, eps, cos, sin);
    for e in 0..E {
        *out.add(base + e) = r[e];
    }
}

/// One attention phase (q/k norm, RoPE, KV append, split attention, last-block merge).
/// Any grid; shared memory: `abi::attention_smem_words(..) * 4` bytes.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_attention(t: AttentionTestParams) {
    let args = AttentionArgs {
        qkv: t.qkv as *const f32,
        q_norm: t.q_norm as *const u16,
        k_norm: t.k_norm as *const u16,
        cos: t.cos as *const f32,
        sin: t.sin as *const f32,
        k_cache: t.k_cache as *mut u16,
        v_cache: t.v_cache as *mut u16,
        out: t.out as *mut f32,
        partial: t.partial as *mut f32,
        count: t.count as *mut u32,
        n_heads: t.n_heads,
        n_kv_heads: t.n_kv_heads,
        max_ctx: t.max_ctx,
        max_splits: t.max_splits,
        pos: t.pos,
        eps: t.eps,
    };
    let smem = dynamic_shared::<f32>();
    let _ = match t.head_dim {
        128 => attention_phase::<4>(&args, smem),
        64 => attention_phase::<2>(&args, smem),
        32 => attention_phase::<1>(&args, smem),
        _ => trap(),
    };
}

/// `trials` LM-head phases (cooperative launch: grid barriers between trials). Shared memory:
/// `(gemv_vector_words(hidden) + lm_head_words(warps) + 1) * 4` bytes (the last word: the
/// barrier's sense).
#[no_mangle]
pub unsafe extern "ptx-kernel" fn test_lm_head(t: LmHeadTestParams) {
    let smem = dynamic_shared::<f32>();
    stage(t.xn as *const f32, t.hidden, smem);
    // The barrier's sense in shared memory after the LM head's words, as the decode kernel
    // keeps it (the grid draw of top-p waits at the same barrier).
    let bar = t.barrier as *mut u32;
    let sense = smem.add((gemv_vector_words(t.hidden) + lm_head_words(warps_per_block())) as usize) as *mut u32;
    grid_sense_at(bar, sense);
    for trial in 0..t.trials {
        let args = LmHeadArgs {
            weight: t.weight as *const u16,
            vocab: t.vocab,
            hidden: t.hidden,
            logits_out: if trial == 0 { t.logits_out as *mut f32 } else { core::ptr::null_mut() },
            logits_scratch: t.logits_scratch as *mut f32,
            candidates: t.candidates as *mut u64,
            partial: t.partial as *mut LmPartial,
            count: t.count as *mut u32,
            target: t.target,
            temperature: t.temperature,
            top_k: t.top_k,
            top_p: t.top_p,
            seed: (t.seed_hi as u64) << 32 | t.seed_lo as u64,
            pos: t.pos + trial,
            xn_scale: 1.0,
            forward: if block_idx() == 0 { LM_FORWARD_TEST ^ trial } else { trial + 1 },
            bar: if t.grid_hist != 0 { bar } else { core::ptr::null_mut() },
            sense,
            grid_hist: t.grid_hist as *mut u64,
        };
        if let Some(r) = lm_head_phase(&args, smem, smem.add(gemv_vector_words(t.hidden) as usize)) {
            if thread_idx() == 0 {
                *(t.tokens_out as *mut u32).add(trial as usize) = r.token;
                if trial == 0 {
                    *(t.lse_out as *mut f32) = r.log_sum_exp;
                    *(t.lse_out as *mut f32).add(1) = r.target_logit;
                    *(t.lse_out as *mut u32).add(2) = r.forward;
                }
            }
        }
        grid_arrive(bar);
        grid_wait_at(bar, sense);
    }
}
