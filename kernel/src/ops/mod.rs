//! The operations a decode step is made of, as block- and warp-level device functions (and
//! `gemm`, the tensor-core matrix product prefill is to be built from). The megakernel
//! (`decode.rs`) composes them; `op_tests.rs` exposes each one as a small kernel so
//! the host can check it against its CPU twin.

pub mod attention;
pub mod gemm;
pub mod gemv;
pub mod lm_head;
pub mod mlp;
pub mod norm;
pub mod prefill;
pub mod sampling;
