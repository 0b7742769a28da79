//! The decode step as data: its phases in order, what each reads and writes, and the names the
//! profiler and `host bench` print. Compiled into the kernel (`mod schedule`) and into the host
//! (`host::engine::schedule`), like `abi.rs`, so that both read one description.
//!
//! A step is `LAYER_PHASES` once per layer, then `HEAD_PHASE`. Each phase ends where every
//! later reader of its output may start: at a grid barrier in the megakernel
//! (`qwen3_decode_hd*`), at a kernel boundary in the split kernels (`qwen3_phase_hd*`, which
//! `host bench --compare` replays as a CUDA graph, one launch per phase). The split kernels
//! dispatch on `phase_at`; the megakernel's layer loop runs the same phases in the same order,
//! written out because each phase's weights are requested during the barrier before it (see
//! kernel/src/decode.rs), and a compile-time check there holds that order to this table.

/// What a phase computes.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhaseOp {
    /// RMSNorm of the residual stream (layer 0: of the embedding row) + the q/k/v projection.
    Qkv,
    /// q/k norm + RoPE + the K/V append + attention over the cache, split over the grid.
    Attention,
    /// The o projection, added into the residual stream.
    OProj,
    /// RMSNorm + the gate and up projections + SiLU(gate) * up.
    GateUp,
    /// The down projection, added into the residual stream.
    Down,
    /// Final RMSNorm + LM head fused with arg-max / sampling / log-sum-exp; the last block
    /// writes the next token.
    LmHead,
}

/// The vectors and caches phases hand to each other (`DecodeParams`' buffers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Buffer {
    /// The token fed at this step (`tokens`) and its embedding row.
    Token,
    /// The residual stream (`x`, f32 `[hidden]`).
    X,
    /// q, k and v of this position (`qkv`, f32).
    Qkv,
    /// This layer's K/V cache.
    KvCache,
    /// The attention's output (`attn`, f32 `[q_dim]`).
    Attn,
    /// SiLU(gate) * up (`mlp`, f32 `[inter]`).
    Mlp,
    /// The next token (`tokens[step + 1]`), its NLL or logits where asked for.
    NextToken,
}

/// One phase: its op, its name in profiles and bench tables, the buffers it reads and writes
/// besides the weights (which depend on nothing the step computes).
#[derive(Clone, Copy, Debug)]
pub struct Phase {
    pub op: PhaseOp,
    pub name: &'static str,
    pub reads: &'static [Buffer],
    pub writes: &'static [Buffer],
}

/// One decoder layer's phases, in the order they run.
pub const LAYER_PHASES: [Phase; 5] = [
    // In layer 0 the input is the fed token's embedding row, which this phase also writes to x.
    Phase { op: PhaseOp::Qkv, name: "q/k/v", reads: &[Buffer::Token, Buffer::X], writes: &[Buffer::X, Buffer::Qkv] },
    Phase {
        op: PhaseOp::Attention,
        name: "attention",
        reads: &[Buffer::Qkv, Buffer::KvCache],
        writes: &[Buffer::KvCache, Buffer::Attn],
    },
    Phase { op: PhaseOp::OProj, name: "o proj", reads: &[Buffer::Attn, Buffer::X], writes: &[Buffer::X] },
    Phase { op: PhaseOp::GateUp, name: "gate/up", reads: &[Buffer::X], writes: &[Buffer::Mlp] },
    Phase { op: PhaseOp::Down, name: "down", reads: &[Buffer::Mlp, Buffer::X], writes: &[Buffer::X] },
];

/// The step's last phase, after every layer's.
pub const HEAD_PHASE: Phase =
    Phase { op: PhaseOp::LmHead, name: "LM head", reads: &[Buffer::X], writes: &[Buffer::NextToken] };

/// Phases in one step of `n_layers` layers: the megakernel's grid barriers per step, the split
/// graph's launches.
pub const fn phases_per_step(n_layers: u32) -> u32 {
    LAYER_PHASES.len() as u32 * n_layers + 1
}

/// Phase `index` (0 ..= `phases_per_step(n_layers) - 1`) of a step: its layer and its op (the
/// LM head's layer is `n_layers`), or `None` past the end.
pub const fn phase_at(index: u32, n_layers: u32) -> Option<(u32, PhaseOp)> {
    let per_layer = LAYER_PHASES.len() as u32;
    if index < per_layer * n_layers {
        Some((index / per_layer, LAYER_PHASES[(index % per_layer) as usize].op))
    } else if index == per_layer * n_layers {
        Some((n_layers, PhaseOp::LmHead))
    } else {
        None
    }
}

/// The phases `host bench --phases` reports, in its order: one layer's, then the LM head's.
/// A phase's index here is its profile index (`profile_index`).
pub const PROFILED_PHASES: [Phase; LAYER_PHASES.len() + 1] =
    [LAYER_PHASES[0], LAYER_PHASES[1], LAYER_PHASES[2], LAYER_PHASES[3], LAYER_PHASES[4], HEAD_PHASE];

/// Where `op` is in `PROFILED_PHASES`: its work and wait cycles are profile slots `2 i` and
/// `2 i + 1` of each block (`DecodeParams::phase_cycles`).
pub const fn profile_index(op: PhaseOp) -> usize {
    let mut i = 0;
    while i < PROFILED_PHASES.len() {
        if PROFILED_PHASES[i].op as u32 == op as u32 {
            return i;
        }
        i += 1;
    }
    panic!("an op missing from PROFILED_PHASES")
}

/// Profile slots for marks inside phases (cycles from the phase's start; slots after the
/// phases' work/wait pairs), and what they mark.
pub const MARK_QKV_NORMED: usize = 13;
pub const MARK_QKV_GEMV_DONE: usize = 14;
pub const MARK_O_INPUT_LOADED: usize = 15;
pub const MARKS: [(usize, &str); 3] = [
    (MARK_QKV_NORMED, "q/k/v: norm done"),
    (MARK_QKV_GEMV_DONE, "q/k/v: GEMV done"),
    (MARK_O_INPUT_LOADED, "o proj: input loaded"),
];

// The profile's slots (abi::PROFILE_SLOTS) hold every phase's pair and the marks.
const _: () = assert!(2 * PROFILED_PHASES.len() <= MARK_QKV_NORMED && MARK_O_INPUT_LOADED < super::abi::PROFILE_SLOTS);
