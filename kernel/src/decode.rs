//! `qwen3_decode_hd*`: whole decode steps of Qwen3 in one persistent cooperative kernel.
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
//!
//! Each barrier is split in two: a block announces that it is done (`grid_arrive`), then
//! requests the weights it will multiply in the next phase (they depend on nothing the grid
//! computes), and only then waits for the others (`grid_wait`). The barrier's latency and the
//! weights' trip from DRAM overlap; after the wait only the input vector remains to fetch.

use crate::abi::*;
use crate::device::*;
use crate::ops::attention::{attention_phase, attention_prefetch, AttentionArgs};
use crate::ops::gemv::{block_rows, gemv_rounds, load_round, load_vector_to_shared, LaneRows};
use crate::ops::lm_head::{lm_head_phase, sampling_needs_all_logits, LmHeadArgs, LmResult};
use crate::ops::mlp::{gate_up_silu_rows, load_gate_up_round};
use crate::ops::norm::{rms_norm_to_shared, NormInput};
use crate::schedule::*;

// `decode`'s layer loop runs one layer's phases in `LAYER_PHASES`' order, each ending at a
// grid barrier; the split kernels dispatch on the same table (`phase_at`).
const _: () = {
    let order = [PhaseOp::Qkv, PhaseOp::Attention, PhaseOp::OProj, PhaseOp::GateUp, PhaseOp::Down];
    assert!(LAYER_PHASES.len() == order.len());
    let mut i = 0;
    while i < order.len() {
        assert!(LAYER_PHASES[i].op as u32 == order[i] as u32);
        i += 1;
    }
};
const FIRST_LAYER_PROFILE: usize = profile_index(PhaseOp::Qkv);
const LM_HEAD_PROFILE: usize = profile_index(PhaseOp::LmHead);

/// Register tiles of the layer GEMVs (see `gemv::LaneRows`): 16-byte chunks per lane of a row
/// of `hidden` (<= 1024), `q_dim` (<= 2048) and `inter` (<= 3072) columns, the sizes the host
/// accepts (`engine::check_supported`), and the q/k/v rows each warp computes at once.
const HIDDEN_CHUNKS: usize = (MAX_HIDDEN / 256) as usize;
const Q_CHUNKS: usize = (MAX_Q_DIM / 256) as usize;
const INTER_CHUNKS: usize = (MAX_INTER / 256) as usize;
const QKV_ROWS_PER_WARP: usize = 3;

/// Blocks without attention work in a layer (at short context all but one per kv head) wait
/// this long (ns) before requesting their o-projection weights: the busy blocks' first loads
/// (q/k/v, the cached K/V) then do not queue behind 4 MB of weights. (Tuned on an H100; 250
/// to 2000 ns did as well: docs/performance.md, experiments log.)
const IDLE_O_DELAY_NS: u32 = 500;

/// The grid barriers of one launch, with the optional timing: FLAG_PROFILE_BARRIERS adds the
/// time thread 0 spends from arriving to leaving each barrier to a per-block total;
/// FLAG_PROFILE_PHASES records, for one layer, SM cycles of work (phase start to the block's
/// last thread done) and of waiting (from there to the barrier's release) per phase, plus
/// marks inside phases (`mark`). Thread 0 keeps the timestamps in shared memory (`timers`),
/// not in registers: every barrier of every layer would otherwise carry them.
struct Barriers {
    bar: *mut u32,
    time_waits: bool,
    /// Phase profiling is on for the current layer.
    on: bool,
    /// `[T_*]`, shared memory, thread 0 only.
    timers: *mut u64,
}

const T_START: usize = 0; // the current phase's start (clock64)
const T_DONE: usize = 1; // the block's arrival at the barrier ending it (clock64)
const T_ARRIVED: usize = 2; // thread 0's arrival (globaltimer)
const T_WAITED: usize = 3; // total ns waited in barriers
const T_PHASE: usize = 4; // the current phase's index
const T_SENSE: usize = 5; // the grid barrier's sense (u32; `grid_sense`), warp 0

impl Barriers {
    /// The barrier word `bar` (null: none, for the split kernels, where launches take the
    /// barriers' place); `time_waits` for FLAG_PROFILE_BARRIERS; `timers` TIMER_WORDS words of
    /// shared memory, 8-byte aligned.
    #[inline(always)]
    unsafe fn new(bar: *mut u32, time_waits: bool, timers: *mut u64) -> Barriers {
        if !bar.is_null() {
            grid_sense_at(bar, timers.add(T_SENSE) as *mut u32);
        }
        if thread_idx() == 0 {
            *timers.add(T_WAITED) = 0;
        }
        Barriers { bar, time_waits, on: false, timers }
    }

    /// Starts phase profiling (all threads) when `on`, from phase `phase`.
    #[inline(always)]
    unsafe fn profile_from(&mut self, on: bool, phase: usize) {
        self.on = on;
        if on {
            sync_threads();
            if thread_idx() == 0 {
                *self.timers.add(T_PHASE) = phase as u64;
                *self.timers.add(T_START) = clock64();
            }
        }
    }

    /// Records the cycles since the phase started into `slot` (all threads must call it).
    #[inline(always)]
    unsafe fn mark(&self, p: &DecodeParams, slot: usize) {
        if self.on {
            sync_threads();
            if thread_idx() == 0 {
                let t = clock64();
                *(p.phase_cycles as *mut u32).add(block_idx() as usize * PROFILE_SLOTS + slot) =
                    (t - *self.timers.add(T_START)) as u32;
            }
        }
    }

    /// Ends the current phase: the block's writes are released and it counts as arrived.
    /// All threads call it.
    #[inline(always)]
    unsafe fn arrive(&mut self) {
        if self.on {
            sync_threads();
            if thread_idx() == 0 {
                *self.timers.add(T_DONE) = clock64();
            }
        }
        if self.time_waits && thread_idx() == 0 {
            *self.timers.add(T_ARRIVED) = global_timer_ns();
        }
        grid_arrive(self.bar);
    }

    /// Waits until every block has arrived; then every other block's writes are visible.
    #[inline(always)]
    unsafe fn wait(&mut self, p: &DecodeParams) {
        // Warp 0's copy of the barrier's sense lives in shared memory, not in a register held
        // through every phase.
        let t = self.timers;
        grid_wait_at(self.bar, t.add(T_SENSE) as *mut u32);
        if thread_idx() != 0 {
            return;
        }
        if self.time_waits {
            *t.add(T_WAITED) += global_timer_ns() - *t.add(T_ARRIVED);
        }
        if self.on {
            let now = clock64();
            let phase = *t.add(T_PHASE) as usize;
            if phase < PROFILE_SLOTS / 2 {
                let slot = (p.phase_cycles as *mut u32).add(block_idx() as usize * PROFILE_SLOTS + 2 * phase);
                *slot = (*t.add(T_DONE) - *t.add(T_START)) as u32;
                *slot.add(1) = (now - *t.add(T_DONE)) as u32;
            }
            *t.add(T_PHASE) = phase as u64 + 1;
            *t.add(T_START) = now;
        }
    }
}

// One entry point per head_dim (the host picks by name). A single kernel switching on
// head_dim at run time would hold all three instantiations, and its code size and register
// pressure cost every phase (docs/performance.md, experiments log).
#[no_mangle]
pub unsafe extern "ptx-kernel" fn qwen3_decode_hd128(p: DecodeParams) {
    decode_checked::<4>(&p)
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn qwen3_decode_hd64(p: DecodeParams) {
    decode_checked::<2>(&p)
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn qwen3_decode_hd32(p: DecodeParams) {
    decode_checked::<1>(&p)
}

#[inline(always)]
unsafe fn decode_checked<const E: usize>(p: &DecodeParams) {
    if p.head_dim != 32 * E as u32 || p.n_layers > MAX_LAYERS {
        trap(); // the host launched the wrong entry point, or broke `check_supported`
    }
    decode::<E>(p)
}

/// What every phase of a step needs, derived once per launch.
struct Step<'a> {
    p: &'a DecodeParams,
    smem: *mut f32,
    /// 32 words for block reductions.
    scratch: *mut f32,
    /// The block's copy of its rows of x (megakernel), or null: read them from global memory.
    x_own: *mut f32,
    q_dim: u32,
    x: *mut f32,
    qkv: *mut f32,
    attn: *mut f32,
    mlp: *mut f32,
    tokens: *mut u32,
    /// Every layer's `LayerPtrs`, in shared memory.
    layers: *const LayerPtrs,
    /// This block's rows of the q/k/v, hidden-wide (o, down) and MLP-wide projections (empty
    /// when the GEMVs are skipped, for diagnostics), and of the residual stream.
    qkv_rows: (u32, u32),
    h_rows: (u32, u32),
    i_rows: (u32, u32),
    own_rows: (u32, u32),
}

/// Where the barriers' timestamps start, given the scratch words (see `abi::SCRATCH_WORDS`).
#[inline(always)]
fn timers_after(scratch: *mut f32) -> *mut u64 {
    let after = scratch.wrapping_add(32 + MAX_OWN_ROWS as usize) as usize;
    ((after + 7) & !7) as *mut u64
}

impl<'a> Step<'a> {
    #[inline(always)]
    unsafe fn new(p: &'a DecodeParams, own_copy: bool) -> Step<'a> {
        let smem = dynamic_shared::<f32>();
        // The last SCRATCH_WORDS words of the base region: block reductions, then this block's
        // rows of the residual stream.
        let q_dim = p.n_heads * p.head_dim;
        let scratch = smem.add(
            (decode_smem_bytes(p.hidden, q_dim, p.inter, p.n_heads / p.n_kv_heads, p.head_dim) / 4 - SCRATCH_WORDS)
                as usize,
        );
        let skip_gemv = p.debug_skip & SKIP_GEMV != 0;
        let rows_of = |n: u32| if skip_gemv { (0, 0) } else { block_rows(n) };
        // Every layer's pointers, copied once into shared memory (after the timers): a phase
        // then finds its weights without a load from global memory, which after each
        // barrier's acquire (it empties L1) would be a round trip to L2 before the weights'
        // own requests could go out.
        let table = timers_after(scratch).add(TIMER_WORDS as usize / 2) as *mut u64;
        let src = p.layers as *const u64;
        let words = p.n_layers * LAYER_PTRS_WORDS / 2;
        let mut i = thread_idx();
        while i < words {
            *table.add(i as usize) = *src.add(i as usize);
            i += block_dim();
        }
        sync_threads();
        Step {
            p,
            smem,
            scratch,
            x_own: if own_copy { scratch.add(32) } else { core::ptr::null_mut() },
            q_dim,
            x: p.x as *mut f32,
            qkv: p.qkv as *mut f32,
            attn: p.attn as *mut f32,
            mlp: p.mlp as *mut f32,
            tokens: p.tokens as *mut u32,
            layers: table as *const LayerPtrs,
            qkv_rows: rows_of(q_dim + 2 * p.n_kv_heads * p.head_dim),
            h_rows: rows_of(p.hidden),
            i_rows: rows_of(p.inter),
            own_rows: block_rows(p.hidden),
        }
    }

    /// The barriers' timestamps: TIMER_WORDS words after the block's rows of x, 8-byte aligned.
    #[inline(always)]
    fn timers(&self) -> *mut u64 {
        timers_after(self.scratch)
    }

    #[inline(always)]
    unsafe fn layer(&self, layer: u32) -> LayerPtrs {
        *self.layers.add(layer as usize)
    }

    /// The embedding row of the token fed at `step`, whose rows this block owns go to x.
    #[inline(always)]
    unsafe fn embed(&self, step: u32) -> *const u16 {
        let token = ld_cg_u32(self.tokens.add(step as usize));
        let row = (self.p.embed as *const u16).add((token as usize) * self.p.hidden as usize);
        let mut i = self.own_rows.0 + thread_idx();
        while i < self.own_rows.1 {
            let v = bf16_to_f32(*row.add(i as usize));
            *self.x.add(i as usize) = v;
            if !self.x_own.is_null() {
                *self.x_own.add((i - self.own_rows.0) as usize) = v;
            }
            i += block_dim();
        }
        row
    }

    /// Block-wide: RMSNorm of the residual stream (or, in layer 0, the embedding row) with the
    /// bf16 `weight`, into the start of `smem` (in the GEMV's layout), less its scale, which it
    /// returns (see `rms_norm_to_shared`; with norms skipped: the raw input, scale 1).
    #[inline(always)]
    unsafe fn normed_input(&self, input: NormInput, weight: u64) -> f32 {
        let p = self.p;
        if p.debug_skip & SKIP_NORM != 0 {
            load_vector_to_shared(self.x, p.hidden, self.smem);
            1.0
        } else {
            rms_norm_to_shared(input, weight as *const u16, p.hidden, p.eps, self.smem, self.scratch)
        }
    }

    /// The o and down projections' output: `x[row] += v` (lane 0 of the warp that has it).
    /// Only this block adds to its rows, so with its own copy it never reads them back.
    #[inline(always)]
    unsafe fn add_residual(&self, row: u32, v: f32) {
        if lane() == 0 {
            let sum = if self.x_own.is_null() {
                ld_cg_f32(self.x.add(row as usize)) + v
            } else {
                let own = self.x_own.add((row - self.own_rows.0) as usize);
                *own += v;
                *own
            };
            *self.x.add(row as usize) = sum;
        }
    }

    // Each GEMV phase's weights are requested by a `load_*` (into registers) before the phase
    // runs: the megakernel does it while it waits at the barrier before the phase.

    #[inline(always)]
    unsafe fn load_qkv(&self, layer: u32) -> LaneRows<QKV_ROWS_PER_WARP, HIDDEN_CHUNKS> {
        let (r0, r1) = self.qkv_rows;
        load_round(self.layer(layer).wqkv as *const u16, self.p.hidden, r0, r1, 0)
    }
    #[inline(always)]
    unsafe fn load_o(&self, layer: u32) -> LaneRows<1, Q_CHUNKS> {
        load_round(self.layer(layer).wo as *const u16, self.q_dim, self.h_rows.0, self.h_rows.1, 0)
    }
    #[inline(always)]
    unsafe fn load_gate_up(&self, layer: u32) -> LaneRows<4, HIDDEN_CHUNKS> {
        let lw = self.layer(layer);
        let (r0, r1) = self.i_rows;
        load_gate_up_round(lw.w_gate as *const u16, lw.w_up as *const u16, self.p.hidden, r0, r1, 0)
    }
    #[inline(always)]
    unsafe fn load_down(&self, layer: u32) -> LaneRows<1, INTER_CHUNKS> {
        load_round(self.layer(layer).w_down as *const u16, self.p.inter, self.h_rows.0, self.h_rows.1, 0)
    }

    /// Phase 1: norm + q/k/v projection -> `qkv`.
    #[inline(always)]
    unsafe fn qkv(&self, layer: u32, input: NormInput, w: LaneRows<QKV_ROWS_PER_WARP, HIDDEN_CHUNKS>, bars: &Barriers) {
        let lw = self.layer(layer);
        let scale = self.normed_input(input, lw.input_norm);
        bars.mark(self.p, MARK_QKV_NORMED);
        let (r0, r1) = self.qkv_rows;
        let qkv = self.qkv;
        gemv_rounds(lw.wqkv as *const u16, self.p.hidden, self.smem, r0, r1, w, |row, v| {
            if lane() == 0 {
                *qkv.add(row as usize) = v * scale;
            }
        });
        bars.mark(self.p, MARK_QKV_GEMV_DONE);
    }

    /// Phase 2: q/k norm + RoPE + KV append + attention at `pos` -> `attn`. Returns whether
    /// this block had any of the work.
    #[inline(always)]
    unsafe fn attention<const E: usize>(&self, layer: u32, pos: u32) -> bool {
        self.p.debug_skip & SKIP_ATTENTION == 0 && attention_phase::<E>(&self.attention_args(layer, pos), self.smem)
    }

    /// While waiting at the barrier before phase 2: this block's first cached K/V rows into L2.
    /// (The layer goes through `opaque`: otherwise the compiler merges these loads of the
    /// layer's pointers with the attention phase's and holds them through the barrier.)
    #[inline(always)]
    unsafe fn prefetch_attention<const E: usize>(&self, layer: u32, pos: u32) {
        if self.p.debug_skip & SKIP_ATTENTION == 0 {
            attention_prefetch::<E>(&self.attention_args(opaque(layer), pos));
        }
    }

    #[inline(always)]
    unsafe fn attention_args(&self, layer: u32, pos: u32) -> AttentionArgs {
        let (p, lw) = (self.p, self.layer(layer));
        AttentionArgs {
            qkv: self.qkv,
            q_norm: lw.q_norm as *const u16,
            k_norm: lw.k_norm as *const u16,
            cos: (p.rope_cos as *const f32).add((pos * p.head_dim / 2) as usize),
            sin: (p.rope_sin as *const f32).add((pos * p.head_dim / 2) as usize),
            k_cache: lw.k_cache as *mut u16,
            v_cache: lw.v_cache as *mut u16,
            out: self.attn,
            partial: p.attn_partial as *mut f32,
            count: p.attn_count as *mut u32,
            n_heads: p.n_heads,
            n_kv_heads: p.n_kv_heads,
            max_ctx: p.max_ctx,
            max_splits: p.max_splits,
            pos,
            eps: p.eps,
        }
    }

    /// Phase 3: o projection + residual -> `x`.
    #[inline(always)]
    unsafe fn o_proj(&self, layer: u32, w: LaneRows<1, Q_CHUNKS>, bars: &Barriers) {
        load_vector_to_shared(self.attn, self.q_dim, self.smem);
        bars.mark(self.p, MARK_O_INPUT_LOADED);
        let (r0, r1) = self.h_rows;
        gemv_rounds(self.layer(layer).wo as *const u16, self.q_dim, self.smem, r0, r1, w, |row, v| {
            self.add_residual(row, v)
        });
    }

    /// Phase 4: norm + gate/up + SiLU(gate) * up -> `mlp` (a warp computes gate row i and up
    /// row i together).
    #[inline(always)]
    unsafe fn gate_up(&self, layer: u32, w: LaneRows<4, HIDDEN_CHUNKS>) {
        let lw = self.layer(layer);
        let scale = self.normed_input(NormInput::F32(self.x), lw.post_norm);
        let (r0, r1) = self.i_rows;
        let (gate, up) = (lw.w_gate as *const u16, lw.w_up as *const u16);
        gate_up_silu_rows(gate, up, self.p.hidden, self.smem, scale, r0, r1, w, self.mlp);
    }

    /// Phase 5: down projection + residual -> `x`.
    #[inline(always)]
    unsafe fn down(&self, layer: u32, w: LaneRows<1, INTER_CHUNKS>) {
        load_vector_to_shared(self.mlp, self.p.inter, self.smem);
        let (r0, r1) = self.h_rows;
        gemv_rounds(self.layer(layer).w_down as *const u16, self.p.inter, self.smem, r0, r1, w, |row, v| {
            self.add_residual(row, v)
        });
    }

    /// The LM head runs unless `step` is teacher-forced and nobody needs its logits.
    #[inline(always)]
    fn wants_head(&self, step: u32) -> bool {
        let p = self.p;
        let teacher_forced = step + 1 < p.prompt_len;
        p.debug_skip & SKIP_LM_HEAD == 0
            && (!teacher_forced || p.flags & (FLAG_LM_HEAD_ON_PROMPT | FLAG_WRITE_LOGITS) != 0)
    }

    /// Final norm + LM head fused with arg-max / sampling / log-sum-exp; the block that
    /// reduces it last finishes the step (next token, NLL, stop decision).
    #[inline(always)]
    unsafe fn lm_head(&self, step: u32) {
        let p = self.p;
        let pos = p.start_pos + step;
        let teacher_forced = step + 1 < p.prompt_len;
        let xn_scale = rms_norm_to_shared(
            NormInput::F32(self.x),
            p.final_norm as *const u16,
            p.hidden,
            p.eps,
            self.smem,
            self.scratch,
        );
        // The host's cancel flag crosses PCIe (a microsecond or more): block 0 requests it now
        // and hands it, with its LM-head partial, to the block that finishes the step. (Every
        // block reading it makes the PCIe reads queue, on the step's critical path.)
        let ring = p.ring as *mut u32;
        let cancel = if !teacher_forced && !ring.is_null() && block_idx() == 0 && thread_idx() == 0 {
            ld_relaxed_sys(ring.add(RING_CANCEL))
        } else {
            0
        };
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
            logits_scratch: if sampling && sampling_needs_all_logits(p.temperature, p.top_k, p.top_p) {
                p.logits as *mut f32
            } else {
                core::ptr::null_mut()
            },
            candidates: p.lm_candidates as *mut u64,
            partial: p.lm_partial as *mut LmPartial,
            count: p.lm_count as *mut u32,
            target: if teacher_forced { ld_cg_u32(self.tokens.add(step as usize + 1)) } else { u32::MAX },
            temperature: if sampling { p.temperature } else { 0.0 },
            top_k: p.top_k,
            top_p: p.top_p,
            seed: (p.seed_hi as u64) << 32 | p.seed_lo as u64,
            pos,
            xn_scale,
            forward: cancel,
            // The megakernel's grid barrier (top-p alone is then drawn by every block); the
            // split kernels have none.
            bar: if self.x_own.is_null() { core::ptr::null_mut() } else { p.barrier as *mut u32 },
            sense: self.timers().add(T_SENSE) as *mut u32,
            grid_hist: p.lm_grid_hist as *mut u64,
        };
        // The normalised input stays at the start of smem (`gemv_vector_words(hidden)`); the LM
        // head's scratch follows it.
        if let Some(r) = lm_head_phase(&args, self.smem, self.smem.add(gemv_vector_words(p.hidden) as usize)) {
            finish_step(p, step, teacher_forced, &r, self.tokens, p.state as *mut DecodeState, ring);
        }
    }
}

#[inline(always)]
unsafe fn decode<const E: usize>(p: &DecodeParams) {
    let st = Step::new(p, true);
    let state = p.state as *mut DecodeState;
    let ring = p.ring as *mut u32;
    let mut bars = Barriers::new(p.barrier as *mut u32, p.flags & FLAG_PROFILE_BARRIERS != 0, st.timers());
    // Layer 0's q/k/v weights for the first step; later ones are requested at the barrier
    // before the phase that uses them.
    let mut qkv_w = st.load_qkv(0);

    let mut step = 0;
    while step < p.n_steps {
        let pos = p.start_pos + step;
        if block_idx() == 0 && thread_idx() == 0 && !ring.is_null() {
            // For error reports only: a fault leaves the host this word to say where it was.
            st_relaxed_sys(ring.add(RING_STEP), step + 1);
        }
        if step == p.fault_step {
            trap(); // test hook: a device fault the host must report cleanly
        }
        let want_head = st.wants_head(step);
        let embed_row = st.embed(step);

        let profile_step = step == p.n_steps.min(2) - 1;
        for layer in 0..p.n_layers {
            bars.profile_from(
                p.flags & FLAG_PROFILE_PHASES != 0 && profile_step && layer == PROFILE_LAYER,
                FIRST_LAYER_PROFILE,
            );
            // Layer 0 normalises the embedding row itself rather than waiting for x.
            let input = if layer == 0 { NormInput::Bf16(embed_row) } else { NormInput::F32(st.x) };
            st.qkv(layer, input, qkv_w, &bars);
            bars.arrive();
            st.prefetch_attention::<E>(layer, pos);
            bars.wait(p);

            let worked = st.attention::<E>(layer, pos);
            bars.arrive();
            if !worked {
                nanosleep(IDLE_O_DELAY_NS);
            }
            let o_w = st.load_o(layer);
            bars.wait(p);

            st.o_proj(layer, o_w, &bars);
            bars.arrive();
            let gate_up_w = st.load_gate_up(layer);
            bars.wait(p);

            st.gate_up(layer, gate_up_w);
            bars.arrive();
            let down_w = st.load_down(layer);
            bars.wait(p);

            st.down(layer, down_w);
            bars.arrive();
            // Next: the next layer's q/k/v, or (without an LM head in between) the next step's.
            // (Also after the last step: every path overwrites `qkv_w`, so the compiler need
            // not keep it alive through the LM head.)
            if layer + 1 < p.n_layers {
                qkv_w = st.load_qkv(layer + 1);
            } else if !want_head {
                qkv_w = st.load_qkv(0);
            }
            bars.wait(p);
        }

        if p.debug_skip & SKIP_LM_HEAD != 0 && block_idx() == 0 && thread_idx() == 0 && step + 1 >= p.prompt_len {
            // Diagnostics without the LM head: each step feeds its own token again.
            *st.tokens.add(step as usize + 1) = *st.tokens.add(step as usize);
        }
        if want_head {
            bars.profile_from(p.flags & FLAG_PROFILE_PHASES != 0 && profile_step, LM_HEAD_PROFILE);
            st.lm_head(step);
            bars.arrive();
            qkv_w = st.load_qkv(0);
            bars.wait(p);
            if ld_cg_u32(&(*state).stop) != 0 {
                step += 1;
                break;
            }
        }
        step += 1;
    }
    if thread_idx() == 0 && bars.time_waits {
        *(p.barrier_ns as *mut u64).add(block_idx() as usize) = *bars.timers.add(T_WAITED);
    }
    if thread_idx() == 0 && block_idx() == 0 {
        (*state).steps_done = step;
        if (*state).stop_reason == 0 {
            (*state).stop_reason = STOP_STEPS;
        }
    }
}

// The same step split at its barriers into separate launches (for `host bench --compare`):
// launch `op` runs phase `op` of the step as `schedule::phase_at` numbers them (one layer's
// `LAYER_PHASES` after another, then the LM head), for one step (`n_steps` = 1) at
// `start_pos`. Kernel boundaries take the barriers' place; the block keeps no copy of its
// residual rows between launches. Same math, same results.
#[no_mangle]
pub unsafe extern "ptx-kernel" fn qwen3_phase_hd128(p: DecodeParams, op: u32) {
    phase_checked::<4>(&p, op)
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn qwen3_phase_hd64(p: DecodeParams, op: u32) {
    phase_checked::<2>(&p, op)
}

#[no_mangle]
pub unsafe extern "ptx-kernel" fn qwen3_phase_hd32(p: DecodeParams, op: u32) {
    phase_checked::<1>(&p, op)
}

#[inline(always)]
unsafe fn phase_checked<const E: usize>(p: &DecodeParams, op: u32) {
    let phase = if p.n_layers > MAX_LAYERS { None } else { phase_at(op, p.n_layers) };
    let Some((layer, phase)) = phase.filter(|_| p.head_dim == 32 * E as u32) else {
        trap(); // the host launched the wrong entry point or op
    };
    let st = Step::new(p, false);
    let bars = Barriers::new(core::ptr::null_mut(), false, st.timers());
    match phase {
        PhaseOp::Qkv => {
            let w = st.load_qkv(layer);
            let input = if layer == 0 { NormInput::Bf16(st.embed(0)) } else { NormInput::F32(st.x) };
            st.qkv(layer, input, w, &bars);
        }
        PhaseOp::Attention => {
            st.attention::<E>(layer, p.start_pos);
        }
        PhaseOp::OProj => st.o_proj(layer, st.load_o(layer), &bars),
        PhaseOp::GateUp => st.gate_up(layer, st.load_gate_up(layer)),
        PhaseOp::Down => st.down(layer, st.load_down(layer)),
        PhaseOp::LmHead => {
            if st.wants_head(0) {
                st.lm_head(0);
            }
        }
    }
}

/// Run by the one block that reduced the LM head: records the NLL, writes and publishes the
/// next token, and decides whether the launch stops here (`r.forward`: the host's cancel flag
/// as block 0 read it at the start of the LM head).
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
            // One store publishes the token (its slot is zero until then): no fence, which
            // at system scope would hold this block, and so the step, for a PCIe round trip.
            st_relaxed_sys(ring.add(RING_TOKENS + generated as usize - 1), r.token + 1);
        }
        // Constant indices only: a run-time index into the by-value kernel parameter would
        // make LLVM copy the whole parameter block to local memory.
        for e in 0..4 {
            if (e as u32) < p.n_eos && r.token == p.eos[e] {
                stop = STOP_EOS;
            }
        }
        if stop == 0 && r.forward != 0 {
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
