//! `qwen3_decode`: whole decode steps of Qwen3 in one persistent cooperative kernel.
//!
//! Per step (token `tokens[s]` at position `start_pos + s`), per layer, five phases separated
//! by grid barriers; every block takes part in every phase:
//!
//! 1. RMSNorm (recomputed by every block) + q/k/v projection          -> `qkv`
//! 2. q/k norm + RoPE + KV append + attention (split over the grid)    -> `attn`
//! 3. o projection + residual                                          -> `x`
//! 4. RMSNorm (recomputed) + gate/up projection + SiLU(gate) * up       -> `mlp`
//! 5. down projection + residual                                       -> `x`
//!
//! then the final RMSNorm + LM head fused with arg-max / sampling / log-sum-exp, whose last
//! block writes the next token, so generation continues without the host. Generated tokens are
//! streamed to a host-mapped ring as they are chosen.

use crate::abi::*;
use crate::device::*;
use crate::ops::attention::{attention_phase, split_plan, AttentionArgs};
use crate::ops::gemv::{block_rows, gemv_rows, load_vector_to_shared, stage_rows, Rows};
use crate::ops::lm_head::{lm_head_phase, LmHeadArgs, LmResult};
use crate::ops::mlp::gate_up_silu_rows;
use crate::ops::norm::{rms_norm_to_shared, NormInput};

/// LM-head rows per block staged into L2 before the LM-head phase (64 rows = 128 KB of a
/// 1024-wide head per block, about 17 MB over 132 blocks: well inside the L2).
const LM_HEAD_PREFETCH_ROWS: u32 = 64;

/// A grid barrier that, when profiling, adds the time thread 0 waited to `waited_ns`.
#[inline(always)]
unsafe fn barrier(p: &DecodeParams, waited_ns: &mut u64) {
    if p.flags & FLAG_PROFILE_PHASES != 0 {
        // The caller keeps the phase bookkeeping (see `Profile`); here only the common path.
        grid_sync(p.barrier as *mut u32);
    } else if p.flags & FLAG_PROFILE_BARRIERS != 0 {
        let t0 = global_timer_ns();
        grid_sync(p.barrier as *mut u32);
        *waited_ns += global_timer_ns() - t0;
    } else {
        grid_sync(p.barrier as *mut u32);
    }
}

/// Phase timing for FLAG_PROFILE_PHASES: cycles of work (phase start to the block's last
/// thread done) and of waiting (from there to the barrier's release), for one layer.
struct Profile {
    on: bool,
    phase: usize,
    start: u64,
}

impl Profile {
    /// Records the cycles since the phase started into `slot` (all threads must call it).
    #[inline(always)]
    unsafe fn mark(&self, p: &DecodeParams, slot: usize) {
        if self.on {
            sync_threads();
            let t = clock64();
            if thread_idx() == 0 {
                *(p.phase_cycles as *mut u32).add(block_idx() as usize * PROFILE_SLOTS + slot) =
                    (t - self.start) as u32;
            }
        }
    }

    /// Ends the current phase: records its work, waits at the grid barrier, records the wait.
    #[inline(always)]
    unsafe fn barrier(&mut self, p: &DecodeParams, waited_ns: &mut u64) {
        if !self.on {
            barrier(p, waited_ns);
            return;
        }
        sync_threads();
        let done = clock64();
        barrier(p, waited_ns);
        let now = clock64();
        if thread_idx() == 0 && self.phase < PROFILE_SLOTS / 2 {
            let slot = (p.phase_cycles as *mut u32).add(block_idx() as usize * PROFILE_SLOTS + 2 * self.phase);
            *slot = (done - self.start) as u32;
            *slot.add(1) = (now - done) as u32;
        }
        self.phase += 1;
        self.start = now;
    }
}

/// Starts fetching into L2 this block's rows of a bf16 matrix (`rows` x `cols`), the slice
/// `block_rows` will give it in the phase that reads the matrix.
#[inline(always)]
unsafe fn prefetch_rows(on: bool, w: u64, cols: u32, rows: u32) {
    if !on {
        return;
    }
    let (r0, r1) = block_rows(rows);
    prefetch_l2_range((w as *const u16).add((r0 * cols) as usize) as *const u8, (r1 - r0) * cols * 2);
}

/// Starts fetching into L2 the cached keys and values this block's attention split will read
/// at position `pos` (those before `pos`; the new one is written in the phase itself).
#[inline(always)]
unsafe fn prefetch_kv_chunk(on: bool, p: &DecodeParams, lw: &LayerPtrs, pos: u32) {
    if !on {
        return;
    }
    let (splits, chunk, _) = split_plan(pos + 1, p.n_kv_heads, p.max_splits);
    let (kv_head, split) = (block_idx() / splits, block_idx() % splits);
    let p0 = split * chunk;
    let end = (p0 + chunk).min(pos);
    if kv_head < p.n_kv_heads && end > p0 {
        let off = ((kv_head * p.max_ctx + p0) * p.head_dim) as usize;
        let bytes = (end - p0) * p.head_dim * 2;
        prefetch_l2_range((lw.k_cache as *const u16).add(off) as *const u8, bytes);
        prefetch_l2_range((lw.v_cache as *const u16).add(off) as *const u8, bytes);
    }
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn qwen3_decode(p: DecodeParams) {
    match p.head_dim {
        128 => decode::<4>(&p),
        64 => decode::<2>(&p),
        32 => decode::<1>(&p),
        _ => trap(),
    }
}

#[inline(always)]
unsafe fn decode<const E: usize>(p: &DecodeParams) {
    let smem = dynamic_shared::<f32>();
    // The last SCRATCH_WORDS words of the base region: block reductions, then this block's
    // rows of the residual stream (`x_own`, see below).
    let scratch = smem.add(
        (decode_smem_bytes(p.hidden, p.n_heads * p.head_dim, p.inter, p.n_heads / p.n_kv_heads, p.head_dim) / 4
            - SCRATCH_WORDS) as usize,
    );
    let x_own = scratch.add(32);
    let head_dim = p.head_dim;
    let q_dim = p.n_heads * head_dim;
    let kv_dim = p.n_kv_heads * head_dim;
    let qkv_rows = q_dim + 2 * kv_dim;
    let x = p.x as *mut f32;
    let qkv = p.qkv as *mut f32;
    let attn = p.attn as *mut f32;
    let mlp = p.mlp as *mut f32;
    let tokens = p.tokens as *mut u32;
    let state = p.state as *mut DecodeState;
    let layers = p.layers as *const LayerPtrs;
    let ring = p.ring as *mut u32;
    let mut waited_ns = 0u64;
    let seed = (p.seed_hi as u64) << 32 | p.seed_lo as u64;
    // Weight staging: each GEMV phase's rows are copied into shared memory (buffers A and B,
    // alternating) by `cp.async` one or two phases ahead; see `Staging`. Without it (weights
    // too large for shared memory, or switched off), weights are prefetched into L2 instead.
    let staging = p.stage_bytes != 0 && p.flags & FLAG_NO_STAGING == 0;
    let prefetch = p.flags & FLAG_NO_PREFETCH == 0 && !staging;
    // Late staging issues each copy at the end of a phase (overlapping the barrier) instead of
    // at its start, so the copies do not queue ahead of the phase's own critical loads.
    let late = p.flags & FLAG_EARLY_STAGING == 0;
    let buf_a = (smem as *mut u8).add(p.stage_offset as usize) as *mut u16;
    let buf_b = buf_a.add(p.stage_bytes as usize / 2);
    let (qkv_r0, qkv_r1) = block_rows(qkv_rows);
    let (h_r0, h_r1) = block_rows(p.hidden);
    let (i_r0, i_r1) = block_rows(p.inter);
    let up_in_a = buf_a.add(((i_r1 - i_r0) * p.hidden) as usize);
    // Group order (cp.async groups complete in order): every wait below leaves only the newest
    // group in flight, which is always the one staged for a later phase.
    if staging {
        stage_rows(buf_a, (*layers).wqkv as *const u16, p.hidden, qkv_r0, qkv_r1);
        cp_async_commit();
    }

    let mut step = 0;
    while step < p.n_steps {
        let pos = p.start_pos + step;
        if block_idx() == 0 && thread_idx() == 0 && !ring.is_null() {
            // For error reports only: a fault leaves the host this word to say where it was.
            st_release_sys(ring.add(RING_STEP), step + 1);
        }
        if step == p.fault_step {
            trap(); // test hook: a device fault the host must report cleanly
        }
        let token = ld_cg_u32(tokens.add(step as usize));
        let embed_row = (p.embed as *const u16).add((token as usize) * p.hidden as usize);
        // Each block owns rows [h_r0, h_r1) of the residual stream x: only it adds to them (in
        // the o and down phases), so it keeps a copy in shared memory and never reads them back
        // from global memory; other blocks read x from global memory for their norms.
        let mut i = h_r0 + thread_idx();
        while i < h_r1 {
            let v = bf16_to_f32(*embed_row.add(i as usize));
            *x.add(i as usize) = v;
            *x_own.add((i - h_r0) as usize) = v;
            i += block_dim();
        }

        let profile_step = step == p.n_steps.min(2) - 1;
        for layer in 0..p.n_layers {
            let lw = *layers.add(layer as usize);
            let on = p.flags & FLAG_PROFILE_PHASES != 0 && profile_step && layer == PROFILE_LAYER;
            if on {
                sync_threads();
            }
            let mut prof = Profile { on, phase: 0, start: clock64() };

            // Each phase first asks for the next phase's weights (or KV), so DRAM streams them
            // while this phase computes and the grid meets at the barrier.

            // 1. norm + qkv. Layer 0 reads the embedding row itself rather than waiting for x.
            prefetch_kv_chunk(p.flags & FLAG_NO_PREFETCH == 0, p, &lw, pos);
            if staging && !late {
                stage_rows(buf_b, lw.wo as *const u16, q_dim, h_r0, h_r1); // for phase 3
                cp_async_commit();
            }
            if staging {
                // This phase's q/k/v rows are in A (late: they are the newest group).
                if late {
                    cp_async_wait_all()
                } else {
                    cp_async_wait_all_but_newest()
                }
            }
            prof.mark(p, 12);
            if p.debug_skip & SKIP_NORM != 0 {
                load_vector_to_shared(x, p.hidden, smem);
            } else if layer == 0 {
                rms_norm_to_shared(
                    NormInput::Bf16(embed_row),
                    lw.input_norm as *const u16,
                    p.hidden,
                    p.eps,
                    smem,
                    scratch,
                );
            } else {
                rms_norm_to_shared(NormInput::F32(x), lw.input_norm as *const u16, p.hidden, p.eps, smem, scratch);
            }
            prof.mark(p, 13);
            let (r0, r1) = if p.debug_skip & SKIP_GEMV != 0 { (0, 0) } else { block_rows(qkv_rows) };
            let rows = if staging {
                Rows { base: buf_a, first: qkv_r0, staged: true }
            } else {
                Rows::global(lw.wqkv as *const u16)
            };
            gemv_rows(rows, p.hidden, smem, r0, r1, |row, v| {
                if lane() == 0 {
                    *qkv.add(row as usize) = v;
                }
            });
            prof.mark(p, 14);
            if staging && late {
                stage_rows(buf_b, lw.wo as *const u16, q_dim, h_r0, h_r1); // for phase 3
                cp_async_commit();
            }
            prof.barrier(p, &mut waited_ns);

            // 2. attention
            let args = AttentionArgs {
                qkv,
                q_norm: lw.q_norm as *const u16,
                k_norm: lw.k_norm as *const u16,
                cos: (p.rope_cos as *const f32).add((pos * head_dim / 2) as usize),
                sin: (p.rope_sin as *const f32).add((pos * head_dim / 2) as usize),
                k_cache: lw.k_cache as *mut u16,
                v_cache: lw.v_cache as *mut u16,
                out: attn,
                partial: p.attn_partial as *mut f32,
                count: p.attn_count as *mut u32,
                n_heads: p.n_heads,
                n_kv_heads: p.n_kv_heads,
                max_ctx: p.max_ctx,
                max_splits: p.max_splits,
                pos,
                eps: p.eps,
            };
            prefetch_rows(prefetch, lw.wo, q_dim, p.hidden);
            // A is free again (phase 1 is done everywhere in this block): gate/up for phase 4.
            let stage_gate_up = || {
                stage_rows(buf_a, lw.w_gate as *const u16, p.hidden, i_r0, i_r1);
                stage_rows(up_in_a, lw.w_up as *const u16, p.hidden, i_r0, i_r1);
                cp_async_commit();
            };
            if staging && !late {
                stage_gate_up();
            }
            if p.debug_skip & SKIP_ATTENTION == 0 {
                attention_phase::<E>(&args, smem);
            }
            if staging && late {
                stage_gate_up();
            }
            prof.barrier(p, &mut waited_ns);

            // 3. o projection + residual
            prefetch_rows(prefetch, lw.w_gate, p.hidden, p.inter);
            prefetch_rows(prefetch, lw.w_up, p.hidden, p.inter);
            if staging {
                cp_async_wait_all_but_newest(); // o rows in B (load_vector_to_shared syncs)
            }
            load_vector_to_shared(attn, q_dim, smem);
            prof.mark(p, 15);
            let (r0, r1) = if p.debug_skip & SKIP_GEMV != 0 { (0, 0) } else { block_rows(p.hidden) };
            let rows = if staging {
                Rows { base: buf_b, first: h_r0, staged: true }
            } else {
                Rows::global(lw.wo as *const u16)
            };
            gemv_rows(rows, q_dim, smem, r0, r1, |row, v| {
                if lane() == 0 {
                    let own = x_own.add((row - h_r0) as usize);
                    let sum = *own + v;
                    *own = sum;
                    *x.add(row as usize) = sum;
                }
            });
            prof.barrier(p, &mut waited_ns);

            // 4. norm + gate/up + SiLU(gate) * up: a warp computes gate row i and up row i together.
            prefetch_rows(prefetch, lw.w_down, p.inter, p.hidden);
            if staging && !late {
                stage_rows(buf_b, lw.w_down as *const u16, p.inter, h_r0, h_r1); // for phase 5
                cp_async_commit();
            }
            if staging {
                // Gate/up rows in A (the norm below syncs); late: they are the newest group.
                if late {
                    cp_async_wait_all()
                } else {
                    cp_async_wait_all_but_newest()
                }
            }
            if p.debug_skip & SKIP_NORM != 0 {
                load_vector_to_shared(x, p.hidden, smem);
            } else {
                let post_norm = lw.post_norm as *const u16;
                rms_norm_to_shared(NormInput::F32(x), post_norm, p.hidden, p.eps, smem, scratch);
            }
            let (r0, r1) = if p.debug_skip & SKIP_GEMV != 0 { (0, 0) } else { block_rows(p.inter) };
            let (gate, up) = if staging {
                (Rows { base: buf_a, first: i_r0, staged: true }, Rows { base: up_in_a, first: i_r0, staged: true })
            } else {
                (Rows::global(lw.w_gate as *const u16), Rows::global(lw.w_up as *const u16))
            };
            gate_up_silu_rows(gate, up, p.hidden, smem, r0, r1, mlp);
            if staging && late {
                stage_rows(buf_b, lw.w_down as *const u16, p.inter, h_r0, h_r1); // for phase 5
                cp_async_commit();
            }
            prof.barrier(p, &mut waited_ns);

            // 5. down projection + residual
            if layer + 1 < p.n_layers {
                prefetch_rows(prefetch, (*layers.add(layer as usize + 1)).wqkv, p.hidden, qkv_rows);
            } else if prefetch {
                // The LM head (hundreds of MB) cannot be staged whole; its first rows can.
                let (r0, r1) = block_rows(p.vocab);
                let rows = (r1 - r0).min(LM_HEAD_PREFETCH_ROWS);
                prefetch_l2_range(
                    (p.lm_head as *const u16).add((r0 * p.hidden) as usize) as *const u8,
                    rows * p.hidden * 2,
                );
            }
            // Next: this step's next layer, or the next step's first layer, into A.
            let stage_next_qkv = || {
                if layer + 1 < p.n_layers {
                    stage_rows(buf_a, (*layers.add(layer as usize + 1)).wqkv as *const u16, p.hidden, qkv_r0, qkv_r1);
                } else if step + 1 < p.n_steps {
                    stage_rows(buf_a, (*layers).wqkv as *const u16, p.hidden, qkv_r0, qkv_r1);
                }
                cp_async_commit(); // possibly empty: keeps the group order uniform
            };
            if staging && !late {
                stage_next_qkv();
            }
            if staging {
                // Down rows in B (load_vector_to_shared syncs); late: they are the newest group.
                if late {
                    cp_async_wait_all()
                } else {
                    cp_async_wait_all_but_newest()
                }
            }
            load_vector_to_shared(mlp, p.inter, smem);
            let (r0, r1) = if p.debug_skip & SKIP_GEMV != 0 { (0, 0) } else { block_rows(p.hidden) };
            let rows = if staging {
                Rows { base: buf_b, first: h_r0, staged: true }
            } else {
                Rows::global(lw.w_down as *const u16)
            };
            gemv_rows(rows, p.inter, smem, r0, r1, |row, v| {
                if lane() == 0 {
                    let own = x_own.add((row - h_r0) as usize);
                    let sum = *own + v;
                    *own = sum;
                    *x.add(row as usize) = sum;
                }
            });
            if staging && late {
                stage_next_qkv();
            }
            prof.barrier(p, &mut waited_ns);
        }

        // Final norm + LM head, unless this is a teacher-forced step nobody needs logits of.
        let teacher_forced = step + 1 < p.prompt_len;
        let mut want_head = !teacher_forced || p.flags & (FLAG_LM_HEAD_ON_PROMPT | FLAG_WRITE_LOGITS) != 0;
        if p.debug_skip & SKIP_LM_HEAD != 0 {
            want_head = false;
            if block_idx() == 0 && thread_idx() == 0 && !teacher_forced {
                *tokens.add(step as usize + 1) = token;
            }
        }
        if want_head {
            let lm_on = p.flags & FLAG_PROFILE_PHASES != 0 && profile_step;
            let mut prof = Profile { on: lm_on, phase: 5, start: clock64() };
            rms_norm_to_shared(NormInput::F32(x), p.final_norm as *const u16, p.hidden, p.eps, smem, scratch);
            let sampling = !teacher_forced && p.temperature > 0.0;
            let args = LmHeadArgs {
                weight: p.lm_head as *const u16,
                vocab: p.vocab,
                hidden: p.hidden,
                logits_out: if p.flags & FLAG_WRITE_LOGITS != 0 && p.logits_out != 0 {
                    (p.logits_out as *mut f32).add((step as usize) * p.vocab as usize)
                } else {
                    core::ptr::null_mut()
                },
                logits_scratch: if sampling && p.top_k > 0 { p.logits as *mut f32 } else { core::ptr::null_mut() },
                partial: p.lm_partial as *mut LmPartial,
                count: p.lm_count as *mut u32,
                target: if teacher_forced { ld_cg_u32(tokens.add(step as usize + 1)) } else { u32::MAX },
                temperature: if sampling { p.temperature } else { 0.0 },
                top_k: p.top_k,
                top_p: p.top_p,
                seed,
                pos,
            };
            // The normalised input stays in smem[..hidden]; the LM head's scratch follows it.
            let result = lm_head_phase(&args, smem, smem.add(p.hidden as usize));
            // The next step's first weights, while the last block reduces and the grid meets.
            if step + 1 < p.n_steps {
                prefetch_rows(prefetch, (*layers).wqkv, p.hidden, qkv_rows);
            }
            if let Some(r) = result {
                finish_step(p, step, teacher_forced, &r, tokens, state, ring);
            }
            prof.barrier(p, &mut waited_ns);
            if ld_cg_u32(&(*state).stop) != 0 {
                step += 1;
                break;
            }
        }
        step += 1;
    }
    // A stop can leave the next step's first weights in flight: never exit with copies pending.
    cp_async_wait_all();
    if thread_idx() == 0 && p.flags & FLAG_PROFILE_BARRIERS != 0 {
        *(p.barrier_ns as *mut u64).add(block_idx() as usize) = waited_ns;
    }
    if thread_idx() == 0 && block_idx() == 0 {
        (*state).steps_done = step;
        if (*state).stop_reason == 0 {
            (*state).stop_reason = STOP_STEPS;
        }
    }
}

/// Run by the one block that reduced the LM head: records the NLL, writes and publishes the
/// next token, and decides whether the launch stops here.
#[inline(always)]
unsafe fn finish_step(
    p: &DecodeParams,
    step: u32,
    teacher_forced: bool,
    r: &LmResult,
    tokens: *mut u32,
    state: *mut DecodeState,
    ring: *mut u32,
) {
    if thread_idx() != 0 {
        return;
    }
    if teacher_forced && p.nll_out != 0 {
        *(p.nll_out as *mut f32).add(step as usize) = r.log_sum_exp - r.target_logit;
    }
    let mut stop = 0;
    if !teacher_forced {
        *tokens.add(step as usize + 1) = r.token;
        let generated = step + 1 - (p.prompt_len - 1);
        if !ring.is_null() {
            *ring.add(RING_TOKENS + generated as usize - 1) = r.token;
            st_release_sys(ring.add(RING_COUNT), generated);
        }
        // Constant indices only: a run-time index into the by-value kernel parameter would
        // make LLVM copy the whole parameter block to local memory.
        for e in 0..4 {
            if (e as u32) < p.n_eos && r.token == p.eos[e] {
                stop = STOP_EOS;
            }
        }
        if stop == 0 && !ring.is_null() && ld_acquire_sys(ring.add(RING_CANCEL)) != 0 {
            stop = STOP_CANCELLED;
        }
    }
    if stop == 0 && step + 1 == p.n_steps {
        stop = STOP_STEPS;
    }
    if stop != 0 {
        (*state).stop_reason = stop;
        (*state).stop = 1;
    }
}
