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
use crate::ops::attention::{attention_phase, AttentionArgs};
use crate::ops::gemv::{block_rows, gemv_rows, load_vector_to_shared};
use crate::ops::lm_head::{lm_head_phase, LmHeadArgs, LmResult};
use crate::ops::mlp::gate_up_silu_rows;
use crate::ops::norm::rms_norm_to_shared;

/// A grid barrier that, when profiling, adds the time thread 0 waited to `waited_ns`.
#[inline(always)]
unsafe fn barrier(p: &DecodeParams, waited_ns: &mut u64) {
    if p.flags & FLAG_PROFILE_BARRIERS != 0 {
        let t0 = global_timer_ns();
        grid_sync(p.barrier as *mut u32);
        *waited_ns += global_timer_ns() - t0;
    } else {
        grid_sync(p.barrier as *mut u32);
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
    let scratch = smem.add(
        (decode_smem_bytes(p.hidden, p.n_heads * p.head_dim, p.inter, p.n_heads / p.n_kv_heads, p.head_dim) / 4 - 32)
            as usize,
    );
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

    let mut step = 0;
    while step < p.n_steps {
        let pos = p.start_pos + step;
        let token = ld_cg_u32(tokens.add(step as usize));
        let embed_row = (p.embed as *const u16).add((token as usize) * p.hidden as usize);
        if block_idx() == 0 {
            let mut i = thread_idx();
            while i < p.hidden {
                *x.add(i as usize) = bf16_to_f32(*embed_row.add(i as usize));
                i += block_dim();
            }
        }

        for layer in 0..p.n_layers {
            let lw = *layers.add(layer as usize);

            // 1. norm + qkv. Layer 0 reads the embedding row itself rather than waiting for x.
            if layer == 0 {
                rms_norm_to_shared(
                    |i| bf16_to_f32(*embed_row.add(i as usize)),
                    lw.input_norm as *const u16,
                    p.hidden,
                    p.eps,
                    smem,
                    scratch,
                );
            } else {
                rms_norm_to_shared(
                    |i| ld_cg_f32(x.add(i as usize)),
                    lw.input_norm as *const u16,
                    p.hidden,
                    p.eps,
                    smem,
                    scratch,
                );
            }
            let (r0, r1) = block_rows(qkv_rows);
            gemv_rows(lw.wqkv as *const u16, p.hidden, smem, r0, r1, |row, v| {
                if lane() == 0 {
                    *qkv.add(row as usize) = v;
                }
            });
            barrier(p, &mut waited_ns);

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
            attention_phase::<E>(&args, smem);
            barrier(p, &mut waited_ns);

            // 3. o projection + residual
            load_vector_to_shared(attn, q_dim, smem);
            let (r0, r1) = block_rows(p.hidden);
            gemv_rows(lw.wo as *const u16, q_dim, smem, r0, r1, |row, v| {
                if lane() == 0 {
                    *x.add(row as usize) = ld_cg_f32(x.add(row as usize)) + v;
                }
            });
            barrier(p, &mut waited_ns);

            // 4. norm + gate/up + SiLU(gate) * up: a warp computes gate row i and up row i together.
            rms_norm_to_shared(
                |i| ld_cg_f32(x.add(i as usize)),
                lw.post_norm as *const u16,
                p.hidden,
                p.eps,
                smem,
                scratch,
            );
            let (r0, r1) = block_rows(p.inter);
            gate_up_silu_rows(lw.w_gate as *const u16, lw.w_up as *const u16, p.hidden, smem, r0, r1, mlp);
            barrier(p, &mut waited_ns);

            // 5. down projection + residual
            load_vector_to_shared(mlp, p.inter, smem);
            let (r0, r1) = block_rows(p.hidden);
            gemv_rows(lw.w_down as *const u16, p.inter, smem, r0, r1, |row, v| {
                if lane() == 0 {
                    *x.add(row as usize) = ld_cg_f32(x.add(row as usize)) + v;
                }
            });
            barrier(p, &mut waited_ns);
        }

        // Final norm + LM head, unless this is a teacher-forced step nobody needs logits of.
        let teacher_forced = step + 1 < p.prompt_len;
        let want_head = !teacher_forced || p.flags & (FLAG_LM_HEAD_ON_PROMPT | FLAG_WRITE_LOGITS) != 0;
        if want_head {
            rms_norm_to_shared(
                |i| ld_cg_f32(x.add(i as usize)),
                p.final_norm as *const u16,
                p.hidden,
                p.eps,
                smem,
                scratch,
            );
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
            if let Some(r) = lm_head_phase(&args, smem, smem.add(p.hidden as usize)) {
                finish_step(p, step, teacher_forced, &r, tokens, state, ring);
            }
            barrier(p, &mut waited_ns);
            if ld_cg_u32(&(*state).stop) != 0 {
                step += 1;
                break;
            }
        }
        step += 1;
    }
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
