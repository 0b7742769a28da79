//! Synthetic checkpoints: HF-loadable Qwen3 folders (config.json, generation_config.json,
//! model.safetensors) with deterministic random weights of realistic scale. The real weights are
//! not available here; a synthetic checkpoint of the exact Qwen3-0.6B layout has the same memory
//! traffic (so speed figures hold) and lets CPU and GPU be compared on identical weights.

use super::checkpoint::{expected_tensors, SINGLE_FILE};
use super::sampling::SplitMix64;
use super::Qwen3Config;
use anyhow::{anyhow, bail, Context};
use half::bf16;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, View};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// What to synthesise.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    pub config: Qwen3Config,
    pub seed: u64,
    /// Store `lm_head.weight` even when tied, as the real Qwen3-0.6B checkpoint does.
    pub store_lm_head: bool,
    /// A folder whose tokenizer files are copied next to the weights.
    pub tokenizer: Option<PathBuf>,
}

impl SynthSpec {
    /// Qwen3-0.6B's exact layout.
    pub fn qwen3_0_6b(seed: u64) -> Self {
        SynthSpec { config: Qwen3Config::qwen3_0_6b(), seed, store_lm_head: true, tokenizer: None }
    }

    /// A tiny model for tests: 2 layers, hidden 64, 4 q heads / 2 kv heads of 32 (so the query
    /// width 128 differs from hidden), MLP 128, vocab 512, no special token ids.
    pub fn tiny(seed: u64) -> Self {
        let config = Qwen3Config {
            vocab_size: 512,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 32,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 40960,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        };
        SynthSpec { config, seed, store_lm_head: true, tokenizer: None }
    }
}

/// How a tensor's values are drawn.
#[derive(Clone, Copy)]
enum Init {
    /// Approximately normal with this standard deviation.
    Normal(f32),
    /// `1 + spread * noise`: norm weights near one, as trained models have.
    NearOne(f32),
}

/// Projections: HF's initializer range. Keeps each layer's contribution modest so 28 layers of
/// residual additions stay bounded.
const PROJ_STD: f32 = 0.02;
/// Embeddings (and the tied LM head) a little wider than the projections, so the logits of a
/// 152k vocabulary spread over a few units and the top-2 margins are not degenerate.
const EMBED_STD: f32 = 0.05;

fn init_for(name: &str) -> Init {
    if name.ends_with("norm.weight") {
        Init::NearOne(0.1)
    } else if name.contains("embed_tokens") || name.starts_with("lm_head") {
        Init::Normal(EMBED_STD)
    } else {
        Init::Normal(PROJ_STD)
    }
}

/// Irwin-Hall with 4 uniforms from one 64-bit draw: mean 0, variance 1, bounded by +-3.46, and
/// much cheaper than Box-Muller.
#[inline]
fn unit_noise(rng: &mut SplitMix64) -> f32 {
    let r = rng.next_u64();
    let sum: u32 = (0..4).map(|i| ((r >> (16 * i)) & 0xFFFF) as u32).sum();
    let uniform_sum = sum as f32 / 65536.0; // in [0, 4), mean 2, variance 4/12
    (uniform_sum - 2.0) * 3.0f32.sqrt()
}

/// Elements generated per independent RNG stream: parallel and deterministic regardless of the
/// thread count.
const CHUNK: usize = 1 << 16;

fn tensor_bytes(seed: u64, stream: u64, n: usize, init: Init) -> Vec<u8> {
    let mut out = vec![0u8; n * 2];
    out.par_chunks_mut(CHUNK * 2).enumerate().for_each(|(chunk, bytes)| {
        // Each (tensor, chunk) gets its own well-mixed starting state.
        let mut mix = SplitMix64::new(seed ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93) ^ ((chunk as u64) << 32));
        let mut rng = SplitMix64::new(mix.next_u64());
        for b in bytes.chunks_exact_mut(2) {
            let v = match init {
                Init::Normal(std) => std * unit_noise(&mut rng),
                Init::NearOne(spread) => 1.0 + spread * unit_noise(&mut rng),
            };
            b.copy_from_slice(&bf16::from_f32(v).to_bits().to_le_bytes());
        }
    });
    out
}

/// One synthetic bf16 tensor for the `safetensors` writer: its values are drawn when the writer
/// asks for them, so a full-size checkpoint needs about one tensor of extra memory.
struct SynthTensor {
    shape: Vec<usize>,
    seed: u64,
    stream: u64,
    init: Init,
}

impl View for SynthTensor {
    fn dtype(&self) -> Dtype {
        Dtype::BF16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(tensor_bytes(self.seed, self.stream, self.shape.iter().product(), self.init))
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype().size()
    }
}

/// `n` token ids below `vocab` from a linear congruential generator: random-looking prompts
/// (for benches and tests) that are the same for the same seed.
pub fn random_ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// Writes config.json, generation_config.json and model.safetensors into `dir`.
pub fn write_checkpoint(dir: &Path, spec: &SynthSpec) -> anyhow::Result<()> {
    let c = &spec.config;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config_json = serde_json::to_string_pretty(&c.to_hf_json())?;
    // Validate through the same parser the loader uses, so synth never writes a config we reject.
    Qwen3Config::from_json_str(&config_json).context("synth produced an invalid config")?;
    std::fs::write(dir.join("config.json"), config_json + "\n")?;
    let generation = serde_json::json!({
        "bos_token_id": c.bos_token_id,
        "do_sample": true,
        "eos_token_id": c.eos_token_ids,
        "pad_token_id": c.bos_token_id,
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.95,
        "transformers_version": "4.51.0",
    });
    std::fs::write(dir.join("generation_config.json"), serde_json::to_string_pretty(&generation)? + "\n")?;

    let with_lm_head = spec.store_lm_head || !c.tie_word_embeddings;
    let tensors = expected_tensors(c, with_lm_head).into_iter().map(|(name, shape)| {
        // A tied LM head is stored as a copy of the embeddings (same stream), like the real one.
        let stream_name =
            if name == "lm_head.weight" && c.tie_word_embeddings { "model.embed_tokens.weight" } else { &name };
        let stream =
            stream_name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3));
        let tensor = SynthTensor { shape, seed: spec.seed, stream, init: init_for(&name) };
        (name, tensor)
    });
    let metadata = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    let path = dir.join(SINGLE_FILE);
    safetensors::serialize_to_file(tensors, &metadata, &path)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;

    if let Some(src) = &spec.tokenizer {
        copy_tokenizer(src, dir)?;
    }
    Ok(())
}

/// Copies a tokenizer folder's files next to the weights. A compressed tokenizer.json.gz is
/// written out as plain tokenizer.json so HF tools can read the checkpoint too.
fn copy_tokenizer(src: &Path, dst: &Path) -> anyhow::Result<()> {
    let plain = src.join("tokenizer.json");
    let gz = src.join("tokenizer.json.gz");
    if plain.is_file() {
        std::fs::copy(&plain, dst.join("tokenizer.json"))
            .with_context(|| format!("cannot copy {}", plain.display()))?;
    } else if gz.is_file() {
        let mut text = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(&gz)?)
            .read_to_end(&mut text)
            .with_context(|| format!("cannot decompress {}", gz.display()))?;
        std::fs::write(dst.join("tokenizer.json"), text)?;
    } else {
        bail!("{}: no tokenizer.json or tokenizer.json.gz to copy", src.display());
    }
    for extra in ["tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja"] {
        let from = src.join(extra);
        if from.is_file() {
            std::fs::copy(&from, dst.join(extra)).with_context(|| format!("cannot copy {}", from.display()))?;
        }
    }
    Ok(())
}
