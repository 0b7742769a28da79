//! `config.json` and `generation_config.json` of a Qwen3 checkpoint.
//!
//! Only what the decoder implements is accepted: anything that would silently change the maths
//! (another architecture, another activation, RoPE scaling, sliding windows, attention biases)
//! is rejected with a message naming the field, so that a checkpoint we cannot run correctly
//! never produces plausible-looking wrong text.

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::{Map, Value};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Qwen3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// Reads a non-negative integer field; `Ok(None)` when absent or null.
fn opt_usize(obj: &Map<String, Value>, key: &str) -> anyhow::Result<Option<usize>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| anyhow!("config field `{key}` must be a non-negative integer, got {v}")),
    }
}

fn req_usize(obj: &Map<String, Value>, key: &str) -> anyhow::Result<usize> {
    opt_usize(obj, key)?.ok_or_else(|| anyhow!("config field `{key}` is missing"))
}

fn opt_f64(obj: &Map<String, Value>, key: &str) -> anyhow::Result<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_f64().map(Some).ok_or_else(|| anyhow!("config field `{key}` must be a number, got {v}")),
    }
}

fn opt_bool(obj: &Map<String, Value>, key: &str) -> anyhow::Result<Option<bool>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => bail!("config field `{key}` must be true or false, got {v}"),
    }
}

/// `eos_token_id` is an int in config.json but a list in generation_config.json; accept both.
fn token_id_list(obj: &Map<String, Value>, key: &str) -> anyhow::Result<Vec<u32>> {
    let as_id = |v: &Value| -> anyhow::Result<u32> {
        v.as_u64()
            .filter(|&n| n <= u32::MAX as u64)
            .map(|n| n as u32)
            .ok_or_else(|| anyhow!("config field `{key}` must hold token ids, got {v}"))
    };
    match obj.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(v) => Ok(vec![as_id(v)?]),
    }
}

impl Qwen3Config {
    /// The real Qwen/Qwen3-0.6B values.
    pub fn qwen3_0_6b() -> Self {
        Qwen3Config {
            vocab_size: 151936,
            hidden_size: 1024,
            intermediate_size: 3072,
            num_hidden_layers: 28,
            num_attention_heads: 16,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 40960,
            tie_word_embeddings: true,
            bos_token_id: Some(151643),
            eos_token_ids: vec![151645],
        }
    }

    /// Width of the concatenated query heads (2048 for Qwen3-0.6B, which differs from hidden).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read model config {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("invalid model config {}", path.display()))
    }

    pub fn from_json_str(text: &str) -> anyhow::Result<Self> {
        let root: Value = serde_json::from_str(text).context("config is not valid JSON")?;
        let obj = root.as_object().ok_or_else(|| anyhow!("config must be a JSON object"))?;

        match obj.get("model_type") {
            Some(Value::String(t)) if t == "qwen3" => {}
            None | Some(Value::Null) => bail!("config field `model_type` is missing (expected \"qwen3\")"),
            Some(other) => bail!("config field `model_type` is {other}; only \"qwen3\" is supported"),
        }
        if let Some(act) = obj.get("hidden_act") {
            if act.as_str() != Some("silu") {
                bail!("config field `hidden_act` is {act}; only \"silu\" is supported");
            }
        }
        if let Some(scaling) = obj.get("rope_scaling") {
            if !scaling.is_null() {
                bail!("config field `rope_scaling` is {scaling}; RoPE scaling is not supported (must be null)");
            }
        }
        if opt_bool(obj, "attention_bias")? == Some(true) {
            bail!("config field `attention_bias` is true; attention biases are not supported");
        }
        if opt_bool(obj, "use_sliding_window")? == Some(true) {
            bail!("config field `use_sliding_window` is true; sliding-window attention is not supported");
        }

        let vocab_size = req_usize(obj, "vocab_size")?;
        let hidden_size = req_usize(obj, "hidden_size")?;
        let intermediate_size = req_usize(obj, "intermediate_size")?;
        let num_hidden_layers = req_usize(obj, "num_hidden_layers")?;
        let num_attention_heads = req_usize(obj, "num_attention_heads")?;
        // HF defaults the KV head count to the query head count (plain multi-head attention).
        let num_key_value_heads = opt_usize(obj, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        for (name, v) in [
            ("vocab_size", vocab_size),
            ("hidden_size", hidden_size),
            ("intermediate_size", intermediate_size),
            ("num_hidden_layers", num_hidden_layers),
            ("num_attention_heads", num_attention_heads),
            ("num_key_value_heads", num_key_value_heads),
        ] {
            if v == 0 {
                bail!("config field `{name}` is 0; it must be positive");
            }
        }
        let head_dim = match opt_usize(obj, "head_dim")? {
            Some(d) => d,
            None => {
                // HF's fallback: hidden_size / num_attention_heads, which only makes sense when
                // it divides evenly.
                if hidden_size % num_attention_heads != 0 {
                    bail!(
                        "config field `head_dim` is missing and cannot be derived: hidden_size {hidden_size} \
                         is not a multiple of num_attention_heads {num_attention_heads}"
                    );
                }
                hidden_size / num_attention_heads
            }
        };
        if head_dim == 0 {
            bail!("config field `head_dim` is 0; it must be positive");
        }
        if head_dim % 2 != 0 {
            bail!("config field `head_dim` is {head_dim}; rotate-half RoPE needs an even head_dim");
        }
        // q_dim() and kv_dim() multiply these; a product past usize is no real model.
        if num_attention_heads.checked_mul(head_dim).is_none() {
            bail!(
                "config fields `num_attention_heads` ({num_attention_heads}) times `head_dim` ({head_dim}) \
                 overflows; the config is corrupt"
            );
        }
        if num_attention_heads % num_key_value_heads != 0 {
            bail!(
                "config field `num_key_value_heads` ({num_key_value_heads}) must divide \
                 `num_attention_heads` ({num_attention_heads})"
            );
        }

        let rms_norm_eps = opt_f64(obj, "rms_norm_eps")?.unwrap_or(1e-6);
        if !(rms_norm_eps > 0.0 && rms_norm_eps.is_finite()) {
            bail!("config field `rms_norm_eps` is {rms_norm_eps}; it must be a positive number");
        }
        // Newer transformers nest RoPE settings under `rope_parameters`.
        let nested = obj.get("rope_parameters").and_then(Value::as_object);
        if let Some(params) = nested {
            if let Some(kind) = params.get("rope_type").and_then(Value::as_str) {
                if kind != "default" {
                    bail!("config field `rope_parameters.rope_type` is {kind:?}; only \"default\" RoPE is supported");
                }
            }
        }
        let rope_theta = match opt_f64(obj, "rope_theta")? {
            Some(t) => t,
            None => match nested {
                Some(params) => opt_f64(params, "rope_theta").context("in `rope_parameters`")?.unwrap_or(10000.0),
                None => 10000.0,
            },
        };
        if !(rope_theta > 0.0 && rope_theta.is_finite()) {
            bail!("config field `rope_theta` is {rope_theta}; it must be a positive number");
        }
        let max_position_embeddings = opt_usize(obj, "max_position_embeddings")?.unwrap_or(40960);
        if max_position_embeddings == 0 {
            bail!("config field `max_position_embeddings` is 0; it must be positive");
        }
        let tie_word_embeddings = opt_bool(obj, "tie_word_embeddings")?.unwrap_or(true);
        let bos_token_id = token_id_list(obj, "bos_token_id")?.first().copied();
        let eos_token_ids = token_id_list(obj, "eos_token_id")?;

        Ok(Qwen3Config {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta,
            max_position_embeddings,
            tie_word_embeddings,
            bos_token_id,
            eos_token_ids,
        })
    }

    /// The HF `config.json` for this config (what `host synth` writes).
    pub fn to_hf_json(&self) -> Value {
        let eos: Value = match self.eos_token_ids.as_slice() {
            [one] => Value::from(*one),
            many => Value::from(many.to_vec()),
        };
        serde_json::json!({
            "architectures": ["Qwen3ForCausalLM"],
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "model_type": "qwen3",
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps as f64,
            "rope_scaling": null,
            "rope_theta": self.rope_theta,
            "sliding_window": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.51.0",
            "use_cache": true,
            "use_sliding_window": false,
            "vocab_size": self.vocab_size,
        })
    }
}

/// Default sampling settings shipped with a checkpoint (`generation_config.json`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GenerationConfig {
    pub do_sample: bool,
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub eos_token_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    /// transformers' own defaults when a field is absent.
    fn default() -> Self {
        GenerationConfig { do_sample: false, temperature: 1.0, top_k: 50, top_p: 1.0, eos_token_ids: Vec::new() }
    }
}

impl GenerationConfig {
    pub fn from_json_str(text: &str) -> anyhow::Result<Self> {
        let root: Value = serde_json::from_str(text).context("generation config is not valid JSON")?;
        let obj = root.as_object().ok_or_else(|| anyhow!("generation config must be a JSON object"))?;
        let d = GenerationConfig::default();
        let temperature = opt_f64(obj, "temperature")?.map(|t| t as f32).unwrap_or(d.temperature);
        if !(temperature >= 0.0 && temperature.is_finite()) {
            bail!("generation config field `temperature` is {temperature}; it must be >= 0");
        }
        let top_p = opt_f64(obj, "top_p")?.map(|p| p as f32).unwrap_or(d.top_p);
        if !(top_p > 0.0 && top_p <= 1.0) {
            bail!("generation config field `top_p` is {top_p}; it must be in (0, 1]");
        }
        let top_k = opt_usize(obj, "top_k")?.map(|k| k.min(u32::MAX as usize) as u32).unwrap_or(d.top_k);
        Ok(GenerationConfig {
            do_sample: opt_bool(obj, "do_sample")?.unwrap_or(d.do_sample),
            temperature,
            top_k,
            top_p,
            eos_token_ids: token_id_list(obj, "eos_token_id")?,
        })
    }

    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read generation config {}", path.display()))?;
        Self::from_json_str(&text).with_context(|| format!("invalid generation config {}", path.display()))
    }

    /// `generation_config.json` of `dir` if there is one, else the defaults.
    pub fn from_model_dir(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("generation_config.json");
        if path.exists() {
            Self::from_file(&path)
        } else {
            Ok(Self::default())
        }
    }

    /// The sampling these defaults ask for: greedy unless `do_sample`.
    pub fn sampling(&self, seed: u64) -> crate::backend::SamplingParams {
        if self.do_sample {
            crate::backend::SamplingParams { temperature: self.temperature, top_k: self.top_k, top_p: self.top_p, seed }
        } else {
            crate::backend::SamplingParams { seed, ..crate::backend::SamplingParams::GREEDY }
        }
    }
}
