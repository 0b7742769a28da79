//! The structures the host hands to the decode kernel. This file is compiled twice: into the
//! kernel (`mod abi`) and into the host (`include!`), so both sides share one definition.
//! Pointers are `u64` device addresses so that the host side stays `Send` and plain data.

/// One decoder layer's device pointers. bf16 matrices are row-major `[out, in]` as in HF.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerPtrs {
    /// bf16 `[hidden]`: RMSNorm weight before attention.
    pub input_norm: u64,
    /// bf16 `[q_dim + 2 * kv_dim, hidden]`: q_proj, k_proj and v_proj rows, stacked.
    pub wqkv: u64,
    /// bf16 `[head_dim]` each: per-head RMSNorm weights applied before RoPE.
    pub q_norm: u64,
    pub k_norm: u64,
    /// bf16 `[hidden, q_dim]`.
    pub wo: u64,
    /// bf16 `[hidden]`: RMSNorm weight before the MLP.
    pub post_norm: u64,
    /// bf16 `[inter, hidden]` each.
    pub w_gate: u64,
    pub w_up: u64,
    /// bf16 `[hidden, inter]`.
    pub w_down: u64,
    /// bf16 `[n_kv_heads, max_ctx, head_dim]` each: this layer's KV cache.
    pub k_cache: u64,
    pub v_cache: u64,
}

/// Flags for `DecodeParams::flags`.
pub const FLAG_LM_HEAD_ON_PROMPT: u32 = 1; // run the LM head on teacher-forced steps too (NLL, logits)
pub const FLAG_WRITE_LOGITS: u32 = 2; // write every step's logits to `logits_out`
pub const FLAG_PROFILE_BARRIERS: u32 = 4; // accumulate time spent waiting in grid barriers
pub const FLAG_PROFILE_PHASES: u32 = 16; // per-block cycles of work and wait per phase, one layer

/// Why the kernel stopped (`DecodeState::stop_reason`).
pub const STOP_STEPS: u32 = 1; // ran all `n_steps`
pub const STOP_EOS: u32 = 2; // generated an end-of-sequence token
pub const STOP_CANCELLED: u32 = 3; // the host raised the cancel flag in the ring

/// Layout of the host-mapped ring the kernel streams generated tokens into (u32 words).
/// Word 0 is unused. Generated token `i` is stored as `token + 1` in word `RING_TOKENS + i`, one
/// relaxed store with no fence; the host clears the ring before a launch and reads slots in
/// order until it finds a zero.
pub const RING_CANCEL: usize = 1; // the host writes 1 here to stop after the current token or the next
pub const RING_STEP: usize = 2; // the step the kernel is on (1-based; 0 = not started), for error reports
pub const RING_TOKENS: usize = 4; // generated tokens start here

/// Most GPU-side top-k candidates for sampling (top_k above this is refused by the host).
pub const MAX_TOP_K: u32 = 256;
/// Most q heads per kv head the attention phase handles.
pub const MAX_GROUP: u32 = 4;
/// Largest head_dim the attention phase handles (4 values per lane).
pub const MAX_HEAD_DIM: u32 = 128;
/// Widest rows the decode kernel's layer GEMVs hold in registers (a lane takes 16-byte chunks,
/// a warp 256 columns per chunk): Qwen3-0.6B's hidden size, q width and MLP width.
pub const MAX_HIDDEN: u32 = 1024;
pub const MAX_Q_DIM: u32 = 2048;
pub const MAX_INTER: u32 = 3072;
/// Threads per block of the decode kernel.
pub const DECODE_THREADS: u32 = 384; // build.rs's LAUNCH_BOUNDS must agree

/// Most splits of the context per kv head in the attention phase (sizes `attn_partial`). The
/// merge of the splits holds one per lane of a warp, so at most 32.
pub const MAX_SPLITS: u32 = 32;
const _: () = assert!(MAX_SPLITS <= 32);

/// Shared memory (f32 words) the attention phase needs with `warps` warps per block: the
/// group's q heads, each warp's softmax state per head, 32 words of flags, the new k and v.
pub const fn attention_smem_words(warps: u32, group: u32, head_dim: u32) -> u32 {
    group * head_dim + warps * group * (head_dim + 2) + 32 + 2 * head_dim
}

/// Shared-memory words a GEMV input vector of `n` values takes (`ops::gemv::x_index`: halves
/// of chunks in runs of 256 words).
pub const fn gemv_vector_words(n: u32) -> u32 {
    n.div_ceil(256) * 256
}

/// Dynamic shared memory (bytes per block) `qwen3_decode_hd*` needs: the largest of the phases'
/// needs (a vector of the widest input; the attention phase's q and per-warp state; the LM
/// head's input plus its reduction or top-k scratch), plus `SCRATCH_WORDS`.
pub const fn decode_smem_bytes(hidden: u32, q_dim: u32, inter: u32, group: u32, head_dim: u32) -> u32 {
    let warps = DECODE_THREADS / 32;
    let attention = attention_smem_words(warps, group, head_dim);
    let lm = gemv_vector_words(hidden) + lm_head_words(warps);
    let mut words = gemv_vector_words(hidden);
    let others = [gemv_vector_words(q_dim), gemv_vector_words(inter), attention, lm];
    let mut i = 0;
    while i < others.len() {
        if others[i] > words {
            words = others[i];
        }
        i += 1;
    }
    (words + SCRATCH_WORDS) * 4
}

/// Shared memory (words) the LM head needs besides its input, with `warps` warps: one record
/// per warp (5 words) and 8 more, then a list of 32 u64 candidates per warp (top-k / top-p);
/// or the one-block finishes of sampling (top-k's radix select over up to MAX_TOP_K
/// candidates, top-p's 256-bin histogram of u64). The kernel checks that this covers
/// `ops::lm_head::lm_head_smem_words`.
pub const fn lm_head_words(warps: u32) -> u32 {
    let reduce = ((warps * 5 + 8 + 1) & !1) + 64 * warps;
    let top_k = 256 + 6 * MAX_TOP_K + 8;
    let top_p = 2 * 256 + 8;
    let finish = if top_k > top_p { top_k } else { top_p };
    if reduce > finish {
        reduce
    } else {
        finish
    }
}

/// Words at the end of the decode kernel's base shared memory: 32 for block reductions, then
/// room for the block's own rows of the residual stream (at most `MAX_OWN_ROWS`), then the
/// barriers' timestamps (`TIMER_WORDS`, 8-byte aligned: two words of slack), then the layers'
/// pointers (`LayerPtrs[MAX_LAYERS]`).
pub const SCRATCH_WORDS: u32 = 32 + MAX_OWN_ROWS + TIMER_WORDS + 2 + MAX_LAYERS * LAYER_PTRS_WORDS;
/// Most layers the decode kernel takes: it keeps every layer's `LayerPtrs` in shared memory.
pub const MAX_LAYERS: u32 = 64;
pub const LAYER_PTRS_WORDS: u32 = (core::mem::size_of::<LayerPtrs>() / 4) as u32;
/// Six u64 words of the decode kernel's barriers: five timestamps of the profiling, the sense.
pub const TIMER_WORDS: u32 = 12;
/// Most rows of the hidden state one block may own (`ceil(hidden / grid)`).
pub const MAX_OWN_ROWS: u32 = 64;

/// Everything one launch of `qwen3_decode_hd*` (or `qwen3_phase_hd*`) needs. Passed by value as the only parameter.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeParams {
    // ---- model (device pointers)
    /// `LayerPtrs[n_layers]` in device memory.
    pub layers: u64,
    /// bf16 `[vocab, hidden]`.
    pub embed: u64,
    /// bf16 `[hidden]`.
    pub final_norm: u64,
    /// bf16 `[vocab, hidden]` (the embedding again when tied).
    pub lm_head: u64,
    /// f32 `[max_ctx, head_dim / 2]` each: RoPE tables, computed on the host like HF does.
    pub rope_cos: u64,
    pub rope_sin: u64,

    // ---- work buffers (device pointers)
    /// f32 `[hidden]`: the residual stream.
    pub x: u64,
    /// f32 `[q_dim + 2 * kv_dim]`: raw q, k, v of the current position.
    pub qkv: u64,
    /// f32 `[q_dim]`: attention output (all heads).
    pub attn: u64,
    /// f32 `[inter]`: SiLU(gate) * up.
    pub mlp: u64,
    /// f32 `[n_heads, max_splits, head_dim + 2]`: per-split attention partials (max, sum, acc).
    pub attn_partial: u64,
    /// u32 `[n_kv_heads]`: arrivals per kv head for the last-block combine; zero between uses.
    pub attn_count: u64,
    /// `LmPartial[grid]`: per-block LM-head results.
    pub lm_partial: u64,
    /// f32 `[vocab]`: logits of the current step (used by top-k sampling).
    pub logits: u64,
    /// u32: arrivals for the LM-head last-block reduction; zero between uses.
    pub lm_count: u64,
    /// u32: the grid barrier's word; zero before the first launch, never reset.
    pub barrier: u64,
    /// `DecodeState` in device memory.
    pub state: u64,
    /// u64 `[grid]`: nanoseconds each block waited in barriers (FLAG_PROFILE_BARRIERS).
    pub barrier_ns: u64,

    // ---- the sequence
    /// u32 `[n_steps + 1]`: `tokens[s]` is fed at step `s` (position `start_pos + s`). The first
    /// `prompt_len` are given; the kernel writes each chosen token to `tokens[s + 1]`.
    pub tokens: u64,
    /// Host-mapped u32 ring (see RING_*), or 0: generated tokens are published there.
    pub ring: u64,
    /// f32 `[n_steps, vocab]` or 0: logits of every step (FLAG_WRITE_LOGITS).
    pub logits_out: u64,
    /// f32 `[n_steps]` or 0: NLL of `tokens[s + 1]` at each teacher-forced step.
    pub nll_out: u64,

    // ---- dimensions
    pub vocab: u32,
    pub hidden: u32,
    pub inter: u32,
    pub n_layers: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub max_ctx: u32,
    pub max_splits: u32,
    pub eps: f32,

    // ---- this launch
    pub start_pos: u32,
    pub prompt_len: u32,
    pub n_steps: u32,
    pub flags: u32,
    pub eos: [u32; 4],
    pub n_eos: u32,

    // ---- sampling (temperature 0 = greedy)
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed_lo: u32,
    pub seed_hi: u32,

    /// Diagnostics only (SKIP_*): leave stages out to see what they cost. Outputs are garbage.
    pub debug_skip: u32,
    /// Test hook: the kernel traps (a device fault) when it reaches this step; u32::MAX: never.
    pub fault_step: u32,
    /// u32 `[grid, PROFILE_SLOTS]` (FLAG_PROFILE_PHASES): for layer `PROFILE_LAYER` of step
    /// `min(1, n_steps - 1)`, SM cycles each block spent working and waiting in each phase:
    /// `[2 i]` work, `[2 i + 1]` wait of phase `i` of `schedule::PROFILED_PHASES` (one layer's,
    /// then the LM head's, recorded in the same step); the slots `schedule::MARKS` names hold
    /// cycles from a phase's start to marks inside it.
    pub phase_cycles: u64,
    /// u64 `[grid, 32]`: each block's 32 best logits for top-k / top-p sampling (candidate
    /// keys, `ops::sampling::candidate_key`). (Last, so that the layout before it stays that
    /// of earlier kernels, which `QWEN3_PTX_FILE` can still load for comparison.)
    pub lm_candidates: u64,
    /// u64 `[4, 256]`, zero between uses: the grid's weight histograms for top-p alone
    /// (`ops::lm_head::grid_top_p`). (After `lm_candidates` for the same reason.)
    pub lm_grid_hist: u64,
}

pub const PROFILE_LAYER: u32 = 1;
pub const PROFILE_SLOTS: usize = 16;

/// `DecodeParams::debug_skip` bits.
pub const SKIP_GEMV: u32 = 1; // the q/k/v, o, gate/up and down projections
pub const SKIP_ATTENTION: u32 = 2; // the attention phase
pub const SKIP_LM_HEAD: u32 = 4; // the final norm + LM head (each step feeds its own token again)
pub const SKIP_NORM: u32 = 8; // the RMSNorms (the input is copied unnormalised)

/// u64 words of `DecodeParams::lm_grid_hist` (and `LmHeadTestParams::grid_hist`): four
/// rounds of 256-bin histograms (`ops::lm_head::grid_top_p`).
pub const LM_GRID_HIST_WORDS: u32 = 4 * 256;

/// One block's LM-head result.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LmPartial {
    /// Largest logit seen and sum of exp(logit - max) over the block's rows.
    pub max: f32,
    pub sum_exp: f32,
    /// The block's choice: best score (logit, or perturbed logit when sampling) and its row.
    pub best: f32,
    pub best_index: u32,
    /// The logit of the teacher-forced target, if this block owns its row (else -inf).
    pub target_logit: f32,
    /// Block 0's word for whichever block finishes the step (`LmHeadArgs::forward`).
    pub forward: u32,
    pub _pad: [u32; 2],
}

/// What the kernel reports back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeState {
    /// Steps completed in this launch.
    pub steps_done: u32,
    /// One of STOP_*.
    pub stop_reason: u32,
    /// Set by the LM-head reducer when the next step must not run.
    pub stop: u32,
    pub _pad: u32,
}

/// Parameters of the `test_attention` kernel (one attention phase, as in the decode step).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct AttentionTestParams {
    pub qkv: u64,
    pub q_norm: u64,
    pub k_norm: u64,
    pub cos: u64,
    pub sin: u64,
    pub k_cache: u64,
    pub v_cache: u64,
    pub out: u64,
    pub partial: u64,
    pub count: u64,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub max_ctx: u32,
    pub max_splits: u32,
    pub pos: u32,
    pub eps: f32,
    pub _pad: u32,
}

/// What block 0 forwards in `test_lm_head` (trial 0): the test checks that the finishing
/// block received it, and not another block's word.
pub const LM_FORWARD_TEST: u32 = 0x5eed_f00d;

/// Parameters of the `test_lm_head` kernel: `trials` LM-head phases on the same input, trial
/// `t` at position `pos + t` (so sampling draws fresh noise), separated by grid barriers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LmHeadTestParams {
    /// f32 `[hidden]`: the already normalised input.
    pub xn: u64,
    pub weight: u64,
    pub logits_out: u64,
    pub logits_scratch: u64,
    pub partial: u64,
    pub count: u64,
    pub barrier: u64,
    /// u32 `[trials]` chosen tokens; f32 `[2]`: log-sum-exp and target logit of trial 0.
    pub tokens_out: u64,
    pub lse_out: u64,
    pub vocab: u32,
    pub hidden: u32,
    pub target: u32,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed_lo: u32,
    pub seed_hi: u32,
    pub pos: u32,
    pub trials: u32,
    /// u64 `[grid, 32]`: the blocks' candidate lists (top-k / top-p).
    pub candidates: u64,
    /// u64 `[4, 256]` zeroed, or 0: with it, top-p alone is drawn by every block together, as
    /// in the decode kernel (`ops::lm_head::grid_top_p`); without, by the one finishing block.
    pub grid_hist: u64,
}

/// Threads per block of the op test kernels (the same as the decode kernel's).
pub const OP_TEST_THREADS: u32 = DECODE_THREADS;

// ---------------------------------------------------------------- bf16 GEMM (ops::gemm)

/// A block of the GEMM computes a `GEMM_TILE_M x GEMM_TILE_N` tile of C, stepping through K
/// `GEMM_TILE_K` at a time, with `GEMM_THREADS` threads: 4 warps, each a 64 x 32 piece.
pub const GEMM_TILE_M: u32 = 128;
pub const GEMM_TILE_N: u32 = 64;
pub const GEMM_TILE_K: u32 = 32;
pub const GEMM_THREADS: u32 = 128;
/// K-tiles in flight per block: the one being multiplied and `GEMM_STAGES - 1` being copied.
pub const GEMM_STAGES: u32 = 3;
/// bf16 per row of a shared-memory tile: `GEMM_TILE_K` plus 8 of padding (ops::gemm says why).
pub const GEMM_SMEM_ROW: u32 = GEMM_TILE_K + 8;
/// Dynamic shared memory (bytes per block) of the GEMM: every stage's A and W tiles. Below
/// the 48 KiB a launch may ask for without opting in.
pub const GEMM_SMEM_BYTES: u32 = GEMM_STAGES * (GEMM_TILE_M + GEMM_TILE_N) * GEMM_SMEM_ROW * 2;
const _: () = assert!(GEMM_SMEM_BYTES <= 48 * 1024);

/// Why the GEMM cannot compute `C[m, n] = A[m, k] W[n, k]^T`, or `None` when it can: M any
/// size from 1 (the last tile's missing rows are zeros and are not stored), N a multiple of
/// `GEMM_TILE_N` and K of `GEMM_TILE_K` (no partial tiles there: Qwen3's widths are all
/// multiples of 64, the vocabulary too, 151936 = 64 x 2374), and the grid within a 1-D launch.
pub const fn gemm_shape_error(m: u32, n: u32, k: u32) -> Option<&'static str> {
    if m == 0 || n == 0 || k == 0 {
        Some("an empty matrix")
    } else if !n.is_multiple_of(GEMM_TILE_N) {
        Some("N is not a multiple of GEMM_TILE_N (64)")
    } else if !k.is_multiple_of(GEMM_TILE_K) {
        Some("K is not a multiple of GEMM_TILE_K (32)")
    } else if (m.div_ceil(GEMM_TILE_M) as u64) * ((n / GEMM_TILE_N) as u64) > i32::MAX as u64 {
        Some("more tiles than a 1-D grid has blocks")
    } else {
        None
    }
}

/// Blocks of a GEMM launch (one per tile of C) for a shape `gemm_shape_error` accepts.
pub const fn gemm_grid(m: u32, n: u32) -> u32 {
    m.div_ceil(GEMM_TILE_M) * (n / GEMM_TILE_N)
}

/// Most splits of K one GEMM launch takes.
pub const GEMM_MAX_SPLITS: u32 = 16;

/// Why the GEMM cannot split K of this shape `splits` ways (each split a block per tile of C,
/// writing its partial product to its own `[m, n]` slice of C), if it cannot: the shape must
/// pass `gemm_shape_error`, and each split be whole K-tiles.
pub const fn gemm_split_error(m: u32, n: u32, k: u32, splits: u32) -> Option<&'static str> {
    if let Some(why) = gemm_shape_error(m, n, k) {
        Some(why)
    } else if splits == 0 || splits > GEMM_MAX_SPLITS {
        Some("splits of K must be 1 ..= GEMM_MAX_SPLITS (16)")
    } else if !k.is_multiple_of(splits * GEMM_TILE_K) {
        Some("K is not a multiple of splits x GEMM_TILE_K (32)")
    } else if (gemm_grid(m, n) as u64) * (splits as u64) > i32::MAX as u64 {
        Some("more tiles x splits than a 1-D grid has blocks")
    } else if (m as u64) * (n as u64) * (splits as u64) > u32::MAX as u64 {
        Some("C's splits hold more elements than 32-bit offsets reach")
    } else {
        None
    }
}

// ---------------------------------------------------------------- prefill (kernel/src/prefill.rs)

/// Threads per block of every prefill kernel but the GEMM (which takes `GEMM_THREADS`): four
/// warps. The row ops and attention give each warp one row, head or (position, head).
pub const PREFILL_THREADS: u32 = 128;
pub const PREFILL_WARPS: u32 = PREFILL_THREADS / 32;

/// Blocks of a prefill launch that gives one warp to each of `items` rows, heads or
/// (position, head) pairs.
pub const fn prefill_warp_grid(items: u32) -> u32 {
    items.div_ceil(PREFILL_WARPS)
}

/// Blocks of a prefill launch that gives one thread to each of `n` elements (grid-stride
/// loops cover any `n`; this many blocks is enough to fill a GPU and no more).
pub const fn prefill_elementwise_grid(n: u32) -> u32 {
    let blocks = n.div_ceil(PREFILL_THREADS);
    if blocks > 4096 {
        4096
    } else if blocks == 0 {
        1
    } else {
        blocks
    }
}

/// Prefill attention (`prefill_attention_hd*`, kernel/src/ops/flash_attention.rs): a block of
/// `PREFILL_THREADS` takes `FLASH_BLOCK_M` query rows of one q head (16 per warp, the height
/// of an `mma.sync` fragment) and walks the keys in tiles of `FLASH_BLOCK_N`.
pub const FLASH_BLOCK_M: u32 = 64;
pub const FLASH_BLOCK_N: u32 = 64;
/// Stages of the K/V tile pipeline: tile j + 1 is copied while tile j is used.
pub const FLASH_STAGES: u32 = 2;

/// Bytes of one K or V tile row in shared memory: `head_dim` bf16 plus 16 bytes of padding,
/// so that the eight 16-byte rows an `ldmatrix` reads start on distinct groups of banks.
pub const fn flash_row_bytes(head_dim: u32) -> u32 {
    head_dim * 2 + 16
}

/// Dynamic shared memory of a prefill attention block: `FLASH_STAGES` K tiles and as many V
/// tiles (69632 bytes at head_dim 128: over the default 48 KiB, so the host opts in).
pub const fn flash_smem_bytes(head_dim: u32) -> u32 {
    2 * FLASH_STAGES * FLASH_BLOCK_N * flash_row_bytes(head_dim)
}

/// Blocks of a prefill attention launch: one per (tile of `FLASH_BLOCK_M` rows, q head).
pub const fn flash_grid(rows: u32, n_heads: u32) -> u32 {
    rows.div_ceil(FLASH_BLOCK_M) * n_heads
}

const _: () = assert!(PREFILL_THREADS == 32 * FLASH_BLOCK_M / 16);

/// What the prefill's q/k norm + RoPE (`prefill_qk_rope_hd*`) and attention
/// (`prefill_attention_hd*`) kernels need, for one layer and one chunk of `rows` positions
/// `start_pos .. start_pos + rows`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct PrefillAttentionParams {
    /// f32 `[rows, q_dim + 2 * kv_dim]`: the q/k/v GEMM's output, each row q of all heads,
    /// then k and v of all kv heads (the stacked `wqkv`'s order).
    pub qkv: u64,
    /// bf16 `[head_dim]` each.
    pub q_norm: u64,
    pub k_norm: u64,
    /// f32 `[max_ctx, head_dim / 2]` each: the whole RoPE tables (row `pos` is used).
    pub rope_cos: u64,
    pub rope_sin: u64,
    /// bf16 `[n_kv_heads, max_ctx, head_dim]` each: the decode kernel's KV cache of this layer.
    pub k_cache: u64,
    pub v_cache: u64,
    /// bf16 `[rows, q_dim]`: q after its norm and RoPE (written by the RoPE kernel, read by
    /// attention's tensor cores).
    pub q: u64,
    /// bf16 `[rows, q_dim]`: the attention output, the o GEMM's A.
    pub out: u64,
    pub rows: u32,
    pub start_pos: u32,
    pub n_heads: u32,
    pub n_kv_heads: u32,
    pub head_dim: u32,
    pub max_ctx: u32,
    pub eps: f32,
    pub _pad: u32,
}

/// Dynamic shared memory (bytes per block) of `prefill_nll`: the running log-sum-exp state of
/// each warp of its `PREFILL_THREADS` (two f32), merged by thread 0.
pub const PREFILL_NLL_SMEM_BYTES: u32 = 2 * PREFILL_WARPS * 4;

// ---------------------------------------------------------------- the streaming step (kernel/src/stream.rs)

/// The streaming step runs on `STREAM_GRID` blocks in thread-block clusters of
/// `STREAM_CLUSTER`: the first `STREAM_KV_HEADS` clusters hold one kv head each (its q, k and
/// v rows, its attention, its o columns), every block a share of the MLP and the LM head.
pub const STREAM_CLUSTER: u32 = 8;
pub const STREAM_CLUSTERS: u32 = 15;
pub const STREAM_GRID: u32 = STREAM_CLUSTER * STREAM_CLUSTERS;
/// Consumer warps of a block; one more warp is the loader.
pub const STREAM_CONSUMER_WARPS: u32 = 8;
pub const STREAM_CONSUMERS: u32 = 32 * STREAM_CONSUMER_WARPS;
pub const STREAM_THREADS: u32 = STREAM_CONSUMERS + 32; // build.rs's LAUNCH_BOUNDS must agree
/// A ring page: 8 rows of 1024 bf16, or a tile of o or down of the same size or less.
pub const STREAM_PAGE_BYTES: u32 = 16384;
pub const STREAM_RING_PAGES: u32 = 12;
/// `StreamParams::copies_in_flight` unless QWEN3_STREAM_IN_FLIGHT says otherwise. DRAM is busy
/// with a few pages in flight per SM; more only queue, and every hand-off's loads and adds
/// wait in that queue (Little's law: latency = bytes in flight / bandwidth).
pub const STREAM_COPIES_IN_FLIGHT: u32 = 3;
/// `StreamParams::poll_gap_cycles` unless QWEN3_STREAM_POLL_GAP says otherwise, and the most
/// it may say (a hand-off takes a few thousand cycles; a gap is the latency it may add).
pub const STREAM_POLL_GAP_CYCLES: u32 = 1200;
pub const STREAM_MAX_POLL_GAP: u32 = 100_000;
const _: () = assert!(STREAM_POLL_GAP_CYCLES <= STREAM_MAX_POLL_GAP);

/// The one shape the streaming step is compiled for: Qwen3-0.6B's.
pub const STREAM_HIDDEN: u32 = 1024;
pub const STREAM_HEADS: u32 = 16;
pub const STREAM_KV_HEADS: u32 = 8;
pub const STREAM_HEAD_DIM: u32 = 128;
pub const STREAM_INTER: u32 = 3072;
pub const STREAM_MAX_LAYERS: u32 = 32;
/// Blocks holding attention: a cluster per kv head. Block `r` of kv head `g`'s cluster
/// (`b = 8 g + r`) computes q rows `32 b .. 32 b + 32` (q head `2 g + r / 4`, dims `32 (r % 4)`
/// on), k rows `32 r ..` (r < 4) or v rows `32 (r - 4) ..` of kv head `g`, and keeps attention
/// output dims `32 b .. 32 b + 32` of the q width, the o columns it multiplies.
pub const STREAM_HEAD_BLOCKS: u32 = STREAM_KV_HEADS * STREAM_CLUSTER;
/// q/k/v and o pages a head block streams per layer: 64 rows of 1024, then o's 1024 x 32.
pub const STREAM_QKV_PAGES: u32 = 8;
pub const STREAM_O_PAGES: u32 = 4;
/// Cached positions a ring page holds: their k rows (8 KB), then their v rows. A kv head's
/// positions `0 .. pos` go to its cluster page by page: block `r` takes pages `r, r + 8, ..`.
pub const STREAM_KV_PAGE_POSITIONS: u32 = 32;
/// Pages of cached positions (`0 .. pos`, `STREAM_KV_PAGE_POSITIONS` to a page) that cluster
/// block `rank` attends: pages `rank, rank + 8, ..`.
pub const fn stream_kv_pages(pos: u32, rank: u32) -> u32 {
    let n = pos.div_ceil(STREAM_KV_PAGE_POSITIONS);
    if n > rank {
        (n - rank).div_ceil(STREAM_CLUSTER)
    } else {
        0
    }
}
/// The cluster block that attends the new position (from shared memory, not a page): the one
/// after the last page's, which has the fewest pages.
pub const fn stream_new_position_rank(pos: u32) -> u32 {
    pos.div_ceil(STREAM_KV_PAGE_POSITIONS) % STREAM_CLUSTER
}
/// The MLP is handed out in units of 4 intermediate indices: a page of their gate and up rows
/// (4 + 4 rows of 1024) and their down columns (1024 x 4, 8 KB; two units to a page).
pub const STREAM_MLP_UNIT: u32 = 4;
pub const STREAM_MLP_UNITS: u32 = STREAM_INTER / STREAM_MLP_UNIT;
pub const STREAM_DOWN_UNIT_BYTES: u32 = STREAM_HIDDEN * STREAM_MLP_UNIT * 2;
/// Most MLP units one block takes (shared memory holds their gate/up outputs).
pub const STREAM_MAX_UNITS: u32 = 16;
/// LM-head rows per page.
pub const STREAM_LM_ROWS_PER_PAGE: u32 = 8;

/// Sums handed between all blocks (after o, after down) are 64-bit words that carry their own
/// completeness: each contribution adds `1 << STREAM_COUNT_SHIFT` (so the top byte counts the
/// contributions) plus `STREAM_BIAS` plus its value in fixed point (`2^STREAM_FIXED_BITS` per
/// unit, clamped to `STREAM_CLAMP`). Integer sums do not depend on their order: the result is
/// the same bits whichever cluster adds first. A reader polls its words until the count is
/// the number of contributors; no fence, no flag.
pub const STREAM_COUNT_SHIFT: u32 = 56;
pub const STREAM_FIXED_BITS: u32 = 28;
pub const STREAM_BIAS: u64 = 1 << 49;
pub const STREAM_CLAMP: f32 = (1u64 << 20) as f32;

/// One block's share of the MLP and of the LM head (the host's plan, `engine::stream_plan`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamBlockPlan {
    /// MLP units `mlp_start .. mlp_start + mlp_units` (indices `4 mlp_start ..`).
    pub mlp_start: u32,
    pub mlp_units: u32,
    /// LM-head rows `lm_start .. lm_start + lm_rows` (a multiple of 8).
    pub lm_start: u32,
    pub lm_rows: u32,
}

/// `StreamParams::flags`.
pub const STREAM_FLAG_LOGITS: u32 = 1; // write the last step's logits to `logits_out`
/// The loaders of blocks without attention hold a layer's pages until their consumers have
/// seen the layer's input (the last layer's down sum): the hand-off then runs with only the
/// attention blocks' copies in flight.
pub const STREAM_FLAG_QUIET_HANDOFF: u32 = 2;

/// Everything one launch of `qwen3_stream_step` needs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StreamParams {
    /// `LayerPtrs[n_layers]`: the same weights and KV cache the megakernel reads.
    pub layers: u64,
    /// bf16 `[n_layers, STREAM_HEAD_BLOCKS, hidden, 32]`: o's columns `32 b .. 32 b + 32`, tile
    /// `b` contiguous.
    pub o_tiles: u64,
    /// bf16 `[n_layers, STREAM_MLP_UNITS, hidden, 4]`: down's columns `4 u .. 4 u + 4`.
    pub down_tiles: u64,
    /// `StreamBlockPlan[STREAM_GRID]`.
    pub plan: u64,
    pub embed: u64,
    pub final_norm: u64,
    pub lm_head: u64,
    pub rope_cos: u64,
    pub rope_sin: u64,
    /// u64 `[2, n_layers, 2, hidden]`, zero at launch: the hand-off sums of even and odd steps.
    pub sums: u64,
    /// u64 `[n_steps]`, zero at launch: each step's best logit and token, as a max key.
    pub best: u64,
    /// u32, zero at launch: blocks arrived at the steps' token hand-offs.
    pub arrivals: u64,
    /// u32 `[n_steps + 1]`: `tokens[s]` is fed at step `s`; the first `prompt_len` are given,
    /// the kernel writes each step's choice to `tokens[s + 1]` past them.
    pub tokens: u64,
    /// f32 `[vocab]` or 0: the last step's logits (STREAM_FLAG_LOGITS).
    pub logits_out: u64,
    /// f32 `[STREAM_PROBE_WORDS]` or 0 (tests): layer 0's pieces at the launch's first step,
    /// at the `STREAM_PROBE_*` offsets.
    pub probe: u64,
    /// u64 `[STREAM_GRID, STREAM_TRACE_MARKS]` or 0: each block's SM cycles at the marks of
    /// `StreamMark`, in layer `STREAM_TRACE_LAYER` and the end of the launch's last step.
    pub trace: u64,
    pub n_layers: u32,
    pub vocab: u32,
    pub max_ctx: u32,
    pub start_pos: u32,
    pub prompt_len: u32,
    pub n_steps: u32,
    pub flags: u32,
    pub eps: f32,
    /// Polls of global memory after which a wait is a hang: the kernel traps, so the host gets
    /// an error rather than a GPU that never returns (seconds, where real waits take
    /// microseconds; the host lifts it under compute-sanitizer).
    pub spin_limit: u32,
    /// Bulk copies a block's loader keeps on their way at once (1 ..= `STREAM_RING_PAGES`;
    /// the ring may hold more pages that have landed).
    pub copies_in_flight: u32,
    /// SM cycles a thread idles between two polls of a hand-off sum that is not complete yet
    /// (0: none). Every consumer thread of every block polls its words of each sum; polled
    /// back to back, those loads queue in the L2 ahead of the adds they wait for.
    pub poll_gap_cycles: u32,
    /// How each step past the prompt chooses its token, as `DecodeParams` says it: temperature
    /// 0 is greedy (the arg-max); with temperature alone (top-k 0, top-p 1) the Gumbel-max of
    /// logit / T; with top-k 1 ..= `STREAM_MAX_TOP_K` (and any top-p) a draw from the 32 best
    /// logits of the vocabulary. Top-p without top-k (a nucleus of any width) is the
    /// megakernel's alone: the host refuses it here.
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub seed_lo: u32,
    pub seed_hi: u32,
    /// u64 `[2, STREAM_GRID, 32]`: each block's 32 best logits of a step as candidate keys
    /// (`ops::sampling::candidate_key`), by the step's parity; read only for top-k sampling.
    pub candidates: u64,
}

/// The largest top-k the streaming step draws from (the candidates each block keeps).
pub const STREAM_MAX_TOP_K: u32 = 32;

/// Dynamic shared memory of `qwen3_stream_step` (its rooms: kernel/src/stream.rs).
pub const STREAM_SMEM_BYTES: u32 = 231080;
// 227 KiB is the most a block may opt in to on sm_90.
const _: () = assert!(STREAM_SMEM_BYTES <= 227 * 1024 && STREAM_RING_PAGES * STREAM_PAGE_BYTES < STREAM_SMEM_BYTES);

/// `StreamParams::probe`'s rooms: q/k/v rows as the projection gives them (`[q_dim + 2 kv_dim]`,
/// the stacked rows' order), the attention output (`[q_dim]`), the input norm's output, the
/// residual after o and after down (`[hidden]` each, as block 0 sees them).
pub const STREAM_PROBE_QKV: u32 = 0;
pub const STREAM_PROBE_ATTN: u32 = 4096;
pub const STREAM_PROBE_XN: u32 = 6144;
pub const STREAM_PROBE_X_ATTN: u32 = 7168;
pub const STREAM_PROBE_X_MLP: u32 = 8192;
/// Block 0's q/k/v rows as received from its cluster (`[8][64]`, by rank) and as attended
/// (`[512]`: q head 0, q head 1, k, v; normed, rotated, k and v rounded to bf16).
pub const STREAM_PROBE_RECV: u32 = 9216;
pub const STREAM_PROBE_ATTENDED: u32 = 9728;
pub const STREAM_PROBE_WARP_PART: u32 = 10240; // block 0, warp 0: [2][132]
pub const STREAM_PROBE_ATTN_RECV: u32 = 10504; // block 0: [8][36]
pub const STREAM_PROBE_WORDS: u32 = 10792;

/// The trace's marks (`StreamParams::trace`), in the order a step reaches them (but the
/// last). A block without attention records none of `QkvPages ..= OSumPublished`, and a
/// block without cached positions no `CachedPageIn`; a mark not recorded reads 0.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamMark {
    LayerStart,
    QkvPages,
    QkvExchanged,
    CachedPositions,
    AttentionMerged,
    OPages,
    OSumPublished,
    OSumSeen,
    GateUpPages,
    DownPages,
    DownSumPublished,
    DownSumSeen,
    LmHeadStart,
    LmHeadPages,
    TokenKnown,
    StepStart,
    /// The block's first page of cached positions is in shared memory (between
    /// `QkvExchanged` and `CachedPositions`).
    CachedPageIn,
    /// The layer's input normed in shared memory (blocks with attention; before `QkvPages`).
    InputNormed,
    /// q and k normed and rotated, k and v rounded to the cache's bf16 (after `QkvExchanged`).
    QkvRotated,
}
pub const STREAM_TRACE_MARKS: u32 = 19;
pub const STREAM_TRACE_LAYER: u32 = 1;

/// Hand-off sum words of one parity of steps: two per layer of `hidden` each.
pub const fn stream_sum_words(n_layers: u32) -> u32 {
    n_layers * 2 * STREAM_HIDDEN
}
