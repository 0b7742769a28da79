//! A checkpoint into device memory: the weights packed the way the kernel reads them, the KV
//! cache, the work buffers and the host-mapped token ring.

use super::abi::*;
use super::{as_u16, check_supported, decode_kernel_name, dptr, GpuEngine};
use crate::backend::check_max_context;
use crate::gpu::Gpu;
use crate::model::{ops, Weights};
use anyhow::{ensure, Context, Result};
use cust::memory::CopyDestination;
use half::bf16;

impl GpuEngine {
    /// Uploads `w` and allocates a KV cache of `max_context` positions on GPU 0.
    pub fn new(w: &Weights, max_context: usize) -> Result<GpuEngine> {
        let gpu = Gpu::new(0)?;
        let c = w.config.clone();
        check_supported(&c)?;
        check_max_context(max_context, 1, &c)?;
        let (hidden, inter, head_dim) = (c.hidden_size as u32, c.intermediate_size as u32, c.head_dim as u32);
        let (q_dim, kv_dim) = (c.q_dim() as u32, c.kv_dim() as u32);
        let group = (c.num_attention_heads / c.num_key_value_heads) as u32;
        let smem = decode_smem_bytes(hidden, q_dim, inter, group, head_dim).next_multiple_of(16);

        let kernel = gpu.kernel(&decode_kernel_name(c.head_dim))?;
        if smem > 48 * 1024 {
            kernel.set_max_dynamic_smem(smem)?;
        }
        let grid = kernel.cooperative_grid(DECODE_THREADS, smem, 1)?;
        ensure!(
            hidden.div_ceil(grid) <= MAX_OWN_ROWS,
            "hidden size {hidden} over {grid} blocks gives each more than {MAX_OWN_ROWS} rows of the residual stream"
        );
        ensure!(
            grid >= c.num_key_value_heads as u32,
            "the GPU has too few SMs ({grid}) for {} kv heads",
            c.num_key_value_heads
        );

        // Weights, packed the way the kernel reads them: q, k, v rows stacked into one matrix.
        let mut weights = Vec::new();
        let mut up = |data: &[u16], what: &str| -> Result<u64> {
            let b = gpu.upload(data, what)?;
            let p = dptr(&b);
            weights.push(b);
            Ok(p)
        };
        let embed = up(as_u16(&w.embed_tokens), "embed_tokens")?;
        let final_norm = up(as_u16(&w.norm), "norm")?;
        let lm_head = match &w.lm_head {
            Some(m) => up(as_u16(m), "lm_head")?,
            None => embed,
        };
        let max_ctx = max_context as u32;
        let mut kv_caches = Vec::new();
        let mut table = Vec::new();
        for (i, l) in w.layers.iter().enumerate() {
            let mut qkv = Vec::with_capacity(l.q_proj.len() + l.k_proj.len() + l.v_proj.len());
            qkv.extend_from_slice(as_u16(&l.q_proj));
            qkv.extend_from_slice(as_u16(&l.k_proj));
            qkv.extend_from_slice(as_u16(&l.v_proj));
            let cache_len = c.num_key_value_heads * max_context * c.head_dim;
            let k_cache = gpu.alloc::<u16>(cache_len, &format!("layer {i} K cache"))?;
            let v_cache = gpu.alloc::<u16>(cache_len, &format!("layer {i} V cache"))?;
            table.push(LayerPtrs {
                input_norm: up(as_u16(&l.input_layernorm), "input_layernorm")?,
                wqkv: up(&qkv, "qkv_proj")?,
                q_norm: up(as_u16(&l.q_norm), "q_norm")?,
                k_norm: up(as_u16(&l.k_norm), "k_norm")?,
                wo: up(as_u16(&l.o_proj), "o_proj")?,
                post_norm: up(as_u16(&l.post_attention_layernorm), "post_attention_layernorm")?,
                w_gate: up(as_u16(&l.gate_proj), "gate_proj")?,
                w_up: up(as_u16(&l.up_proj), "up_proj")?,
                w_down: up(as_u16(&l.down_proj), "down_proj")?,
                k_cache: dptr(&k_cache),
                v_cache: dptr(&v_cache),
            });
            kv_caches.push(k_cache);
            kv_caches.push(v_cache);
        }
        let layer_table = gpu.upload(&table, "layer table")?;
        let (cos, sin) = ops::rope_table(c.rope_theta, c.head_dim, max_context);
        let rope_cos = gpu.upload(&cos, "RoPE cos table")?;
        let rope_sin = gpu.upload(&sin, "RoPE sin table")?;
        let n_heads = c.num_attention_heads;
        let engine = GpuEngine {
            stream: None,
            x: gpu.alloc(c.hidden_size, "residual")?,
            qkv: gpu.alloc((q_dim + 2 * kv_dim) as usize, "qkv")?,
            attn: gpu.alloc(q_dim as usize, "attention output")?,
            mlp: gpu.alloc(c.intermediate_size, "mlp activations")?,
            attn_partial: gpu.alloc(n_heads * MAX_SPLITS as usize * (c.head_dim + 2), "attention partials")?,
            attn_count: gpu.alloc(c.num_key_value_heads, "attention counters")?,
            lm_partial: gpu.alloc(grid as usize, "LM-head partials")?,
            lm_candidates: gpu.alloc(grid as usize * 32, "LM-head sampling candidates")?,
            lm_grid_hist: gpu.alloc(LM_GRID_HIST_WORDS as usize, "LM-head top-p histograms")?,
            logits: gpu.alloc(c.vocab_size, "logits")?,
            lm_count: gpu.alloc(1, "LM-head counter")?,
            barrier: gpu.alloc(1, "grid barrier")?,
            state: gpu.alloc(1, "decode state")?,
            barrier_ns: gpu.alloc(grid as usize, "barrier timers")?,
            phase_cycles: gpu.alloc(grid as usize * PROFILE_SLOTS, "phase timers")?,
            tokens: gpu.alloc(max_context + 1, "tokens")?,
            ring: gpu.host_ring(RING_TOKENS + max_context + 1)?,
            _weights: weights,
            layer_table,
            layers: table,
            prefill_buffers: None,
            rope_cos,
            rope_sin,
            kv_caches,
            embed,
            final_norm,
            lm_head,
            eos: c.eos_token_ids.clone(),
            fault_step: None,
            prefill_chunk: 0,
            config: c,
            max_ctx,
            grid,
            smem,
            gpu,
        };
        Ok(engine)
    }

    /// Fills every KV cache with random bf16 values (benchmarks: positions before the one
    /// timed hold realistic data, never zeros).
    pub fn randomize_kv_cache(&mut self, seed: u64) -> Result<()> {
        let mut s = seed | 1;
        for cache in &mut self.kv_caches {
            let v: Vec<u16> = (0..cache.len())
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0).to_bits()
                })
                .collect();
            cache.copy_from(&v[..]).context("uploading random KV cache")?;
        }
        Ok(())
    }
}
