//! Everything about Qwen3 that is not GPU code.
//!
//! Tensors are stored as in the HF checkpoint: row-major `[out_features, in_features]`, bf16.

pub mod checkpoint;
pub mod config;
pub mod ops;
pub mod prefill;
pub mod reference;
pub mod sampling;
pub mod score;
pub mod synth;
pub mod tensor_file;
pub mod tokenizer;

pub use config::Qwen3Config;
use half::bf16;

/// One decoder layer's weights, bf16, HF layout and names.
#[derive(Clone)]
pub struct LayerWeights {
    pub input_layernorm: Vec<bf16>,          // [hidden]
    pub q_proj: Vec<bf16>,                   // [n_heads * head_dim, hidden]
    pub k_proj: Vec<bf16>,                   // [n_kv_heads * head_dim, hidden]
    pub v_proj: Vec<bf16>,                   // [n_kv_heads * head_dim, hidden]
    pub o_proj: Vec<bf16>,                   // [hidden, n_heads * head_dim]
    pub q_norm: Vec<bf16>,                   // [head_dim]
    pub k_norm: Vec<bf16>,                   // [head_dim]
    pub post_attention_layernorm: Vec<bf16>, // [hidden]
    pub gate_proj: Vec<bf16>,                // [intermediate, hidden]
    pub up_proj: Vec<bf16>,                  // [intermediate, hidden]
    pub down_proj: Vec<bf16>,                // [hidden, intermediate]
}

/// A whole checkpoint in memory, validated against its config.
#[derive(Clone)]
pub struct Weights {
    pub config: Qwen3Config,
    pub embed_tokens: Vec<bf16>, // [vocab, hidden]
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<bf16>, // [hidden]
    /// `None` when the embeddings are tied (the LM head is `embed_tokens`).
    pub lm_head: Option<Vec<bf16>>, // [vocab, hidden]
}

impl Weights {
    /// The LM head matrix, tied or not.
    pub fn lm_head(&self) -> &[bf16] {
        self.lm_head.as_deref().unwrap_or(&self.embed_tokens)
    }
}
