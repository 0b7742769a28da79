//! Loading an HF Qwen3 checkpoint folder (`config.json` + `model.safetensors`, or shards listed
//! in `model.safetensors.index.json`) into [`Weights`].
//!
//! Every header is read (tensor_file.rs, with the `safetensors` crate's types) and every
//! tensor's name, shape and dtype is checked against the config before a single value is
//! converted, so a bad checkpoint fails fast with one error
//! that names the file and the tensor, instead of panicking half-way through a 1.2 GB copy.

use super::tensor_file::SafetensorsFile;
use super::{LayerWeights, Qwen3Config, Weights};
use anyhow::{anyhow, bail, Context};
use half::{bf16, f16};
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

pub(crate) const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// Every tensor a checkpoint for `config` holds, with its shape, in HF names. `lm_head.weight`
/// is included when `with_lm_head` (untied models need it; tied ones may store it anyway).
pub fn expected_tensors(config: &Qwen3Config, with_lm_head: bool) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (config.hidden_size, config.intermediate_size, config.vocab_size);
    let (q, kv, d) = (config.q_dim(), config.kv_dim(), config.head_dim);
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (suffix, shape) in [
            ("input_layernorm.weight", vec![h]),
            ("self_attn.q_proj.weight", vec![q, h]),
            ("self_attn.k_proj.weight", vec![kv, h]),
            ("self_attn.v_proj.weight", vec![kv, h]),
            ("self_attn.o_proj.weight", vec![h, q]),
            ("self_attn.q_norm.weight", vec![d]),
            ("self_attn.k_norm.weight", vec![d]),
            ("post_attention_layernorm.weight", vec![h]),
            ("mlp.gate_proj.weight", vec![i, h]),
            ("mlp.up_proj.weight", vec![i, h]),
            ("mlp.down_proj.weight", vec![h, i]),
        ] {
            out.push((format!("{p}.{suffix}"), shape));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if with_lm_head {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// The safetensors files of a checkpoint folder and which file each tensor name is in.
fn open_files(dir: &Path) -> anyhow::Result<(Vec<SafetensorsFile>, BTreeMap<String, usize>)> {
    let single = dir.join(SINGLE_FILE);
    let index = dir.join(INDEX_FILE);
    let mut files = Vec::new();
    let mut location = BTreeMap::new();
    if single.is_file() {
        let f = SafetensorsFile::open(&single)?;
        for name in f.tensors.keys() {
            location.insert(name.clone(), 0);
        }
        files.push(f);
    } else if index.is_file() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let json: Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| anyhow!("{}: no `weight_map` object", index.display()))?;
        // Shard name -> the tensors the index puts there, so a missing shard's error can say
        // what it should have held.
        let mut shards: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard
                .as_str()
                .ok_or_else(|| anyhow!("{}: `weight_map` entry for `{tensor}` is not a file name", index.display()))?;
            if shard.contains('/') || shard.contains('\\') || shard == ".." {
                bail!("{}: shard name {shard:?} for `{tensor}` must be a plain file name", index.display());
            }
            shards.entry(shard.to_string()).or_default().push(tensor.clone());
        }
        for (shard, tensors) in &shards {
            let path = dir.join(shard);
            if !path.is_file() {
                bail!(
                    "{}: shard {} listed in {INDEX_FILE} is missing (it should hold {} tensors, e.g. `{}`)",
                    dir.display(),
                    path.display(),
                    tensors.len(),
                    tensors[0]
                );
            }
            let f = SafetensorsFile::open(&path)?;
            for tensor in tensors {
                if !f.tensors.contains_key(tensor) {
                    bail!(
                        "{}: tensor `{tensor}` is listed in {INDEX_FILE} for this shard but is not in it",
                        path.display()
                    );
                }
            }
            for name in f.tensors.keys() {
                if let Some(&other) = location.get(name) {
                    let other: &SafetensorsFile = &files[other];
                    bail!("tensor `{name}` is stored twice: in {} and in {}", other.path.display(), path.display());
                }
                location.insert(name.clone(), files.len());
            }
            files.push(f);
        }
    } else {
        bail!("{}: neither {SINGLE_FILE} nor {INDEX_FILE} is there", dir.display());
    }
    Ok((files, location))
}

/// Reads, validates and converts a checkpoint folder. `progress` draws a progress bar.
pub fn load(dir: &Path, progress: bool) -> anyhow::Result<Weights> {
    let config = Qwen3Config::from_file(&dir.join("config.json"))?;
    let (files, location) = open_files(dir)?;

    // Validate everything first: unknown tensors, missing tensors, shapes, dtypes.
    let stored_lm_head = location.contains_key("lm_head.weight");
    if !config.tie_word_embeddings && !stored_lm_head {
        bail!(
            "{}: tensor `lm_head.weight` is missing; config.json says tie_word_embeddings is false, so it is required",
            dir.display()
        );
    }
    // Each layer has 11 tensors: a config claiming more layers than there are tensors cannot
    // match, and listing its expected tensors could take forever.
    if config.num_hidden_layers > location.len() {
        bail!(
            "{}: config.json says num_hidden_layers is {}, but the checkpoint holds only {} tensors",
            dir.display(),
            config.num_hidden_layers,
            location.len()
        );
    }
    let expected = expected_tensors(&config, stored_lm_head);
    let expected_names: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let unknown: Vec<String> = location
        .iter()
        .filter(|(name, _)| !expected_names.contains(name.as_str()))
        .map(|(name, &f)| format!("`{name}` (in {})", files[f].path.display()))
        .collect();
    if !unknown.is_empty() {
        bail!(
            "{}: {} unexpected tensor(s) for a {}-layer Qwen3: {}",
            dir.display(),
            unknown.len(),
            config.num_hidden_layers,
            summarize(&unknown)
        );
    }
    let missing: Vec<String> =
        expected.iter().filter(|(n, _)| !location.contains_key(n)).map(|(n, _)| format!("`{n}`")).collect();
    if !missing.is_empty() {
        bail!("{}: {} tensor(s) missing: {}", dir.display(), missing.len(), summarize(&missing));
    }
    for (name, shape) in &expected {
        let file = &files[location[name]];
        let entry = &file.tensors[name];
        if !matches!(entry.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
            bail!(
                "{}: tensor `{name}` has dtype {:?}; only BF16, F16 and F32 are supported",
                file.path.display(),
                entry.dtype
            );
        }
        if &entry.shape != shape {
            bail!(
                "{}: tensor `{name}` has shape {:?}, expected {:?} from config.json",
                file.path.display(),
                entry.shape,
                shape
            );
        }
    }

    // Then convert. Tied models use the embeddings as the LM head even if a copy is stored.
    let total_bytes: usize = expected
        .iter()
        .filter(|(n, _)| !(config.tie_word_embeddings && n == "lm_head.weight"))
        .map(|(n, _)| {
            let (begin, end) = files[location[n]].tensors[n].data_offsets;
            end - begin
        })
        .sum();
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(total_bytes as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("loading weights {bar:40} {bytes}/{total_bytes} ({eta})")
                .expect("static template")
                .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let get = |name: &str| -> anyhow::Result<Vec<bf16>> {
        let view = files[location[name]].tensor(name)?;
        let out = to_bf16(&view);
        bar.inc(view.data().len() as u64);
        Ok(out)
    };
    let embed_tokens = get("model.embed_tokens.weight")?;
    let layers = (0..config.num_hidden_layers)
        .map(|l| {
            let p = format!("model.layers.{l}");
            Ok(LayerWeights {
                input_layernorm: get(&format!("{p}.input_layernorm.weight"))?,
                q_proj: get(&format!("{p}.self_attn.q_proj.weight"))?,
                k_proj: get(&format!("{p}.self_attn.k_proj.weight"))?,
                v_proj: get(&format!("{p}.self_attn.v_proj.weight"))?,
                o_proj: get(&format!("{p}.self_attn.o_proj.weight"))?,
                q_norm: get(&format!("{p}.self_attn.q_norm.weight"))?,
                k_norm: get(&format!("{p}.self_attn.k_norm.weight"))?,
                post_attention_layernorm: get(&format!("{p}.post_attention_layernorm.weight"))?,
                gate_proj: get(&format!("{p}.mlp.gate_proj.weight"))?,
                up_proj: get(&format!("{p}.mlp.up_proj.weight"))?,
                down_proj: get(&format!("{p}.mlp.down_proj.weight"))?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let norm = get("model.norm.weight")?;
    let lm_head = if config.tie_word_embeddings { None } else { Some(get("lm_head.weight")?) };
    bar.finish_and_clear();
    Ok(Weights { config, embed_tokens, layers, norm, lm_head })
}

/// At most a handful of names in an error message; the count says how many there were.
fn summarize(items: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = items.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(", ... ({} more)", items.len() - SHOWN));
    }
    s
}

/// A tensor's little-endian values as bf16 (round-to-nearest-even from f32). The map may not be
/// aligned for the element type, so values are assembled from bytes. `load` has refused every
/// dtype but these three.
fn to_bf16(view: &TensorView<'_>) -> Vec<bf16> {
    const CHUNK: usize = 1 << 16;
    let (bytes, dtype) = (view.data(), view.dtype());
    let size = dtype.size();
    let mut out = vec![bf16::ZERO; bytes.len() / size];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, dst)| {
        let src = &bytes[c * CHUNK * size..][..dst.len() * size];
        match dtype {
            Dtype::BF16 => {
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = bf16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            Dtype::F16 => {
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    *d = bf16::from_f32(f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32());
                }
            }
            Dtype::F32 => {
                for (d, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
                    *d = bf16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                }
            }
            other => unreachable!("load refuses {other:?} tensors before converting any"),
        }
    });
    out
}

/// The HF hub cache folder for Qwen/Qwen3-0.6B.
const HUB_REPO_DIR: &str = "models--Qwen--Qwen3-0.6B";

/// The checkpoint folder: `arg` (from `--model`) when given, else the newest snapshot of
/// Qwen/Qwen3-0.6B in the HF cache (`$HF_HUB_CACHE`, `$HF_HOME/hub` or
/// `~/.cache/huggingface/hub`).
pub fn resolve_model_dir(arg: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = arg {
        if !dir.is_dir() {
            bail!("model folder {} does not exist or is not a folder", dir.display());
        }
        return Ok(dir.to_path_buf());
    }
    let hub = if let Some(cache) = std::env::var_os("HF_HUB_CACHE") {
        PathBuf::from(cache)
    } else if let Some(home) = std::env::var_os("HF_HOME") {
        PathBuf::from(home).join("hub")
    } else if let Some(home) = std::env::var_os("HOME") {
        PathBuf::from(home).join(".cache").join("huggingface").join("hub")
    } else {
        bail!("no --model given and neither HF_HOME nor HOME is set, so the HF cache cannot be found");
    };
    let repo = hub.join(HUB_REPO_DIR);
    let snapshots = repo.join("snapshots");
    // The revision `refs/main` points at is the one HF itself would load.
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let dir = snapshots.join(rev.trim());
        if dir.join("config.json").is_file() {
            return Ok(dir);
        }
    }
    let mut newest: Option<(std::time::SystemTime, PathBuf)> = None;
    if let Ok(entries) = std::fs::read_dir(&snapshots) {
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.join("config.json").is_file() {
                continue;
            }
            let modified = entry.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
            if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, path));
            }
        }
    }
    newest.map(|(_, p)| p).ok_or_else(|| {
        anyhow!(
            "no --model given and no Qwen3-0.6B snapshot with a config.json in the HF cache (looked in {}); \
             download it with `hf download Qwen/Qwen3-0.6B` (or `huggingface-cli download Qwen/Qwen3-0.6B`), \
             or pass --model DIR",
            snapshots.display()
        )
    })
}
