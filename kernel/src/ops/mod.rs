//! The operations a decode step is made of, as block- and warp-level device functions, and
//! those of prefill: `gemm`, the tensor-core matrix product, `prefill`, the row-wise ops and
//! the chunk's causal attention, and `nll`, the teacher-forced NLL of rows of logits (scoring
//! a text through prefill). The megakernel (`decode.rs`) composes the first; `op_tests.rs`
//! exposes each one as a small kernel so the host can check it against its CPU twin. The
//! prefill kernels (`../prefill.rs`) are ordinary launches the host checks directly.

pub mod attention;
pub mod flash_attention;
pub mod gemm;
pub mod gemv;
pub mod lm_head;
pub mod mlp;
pub mod nll;
pub mod norm;
pub mod prefill;
pub mod sampling;
