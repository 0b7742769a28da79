//! Checkpoint loading: the real layout, sharding, dtype conversion, and one clear error (never a
//! panic) for each way a checkpoint can be broken.

use half::{bf16, f16};
use host::model::checkpoint::{self, expected_tensors};
use host::model::synth::{write_checkpoint, SynthSpec};
use host::model::tensor_file::SafetensorsFile;
use host::model::Qwen3Config;
use serde_json::json;
use std::path::{Path, PathBuf};

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(path)
}

fn tiny_checkpoint(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SynthSpec::tiny(seed)).unwrap();
    dir
}

/// A raw tensor for hand-written safetensors files.
struct Raw {
    name: String,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// Every tensor of a checkpoint file, as stored.
fn read_all(path: &Path) -> Vec<Raw> {
    let data = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&data[8..8 + n]).unwrap();
    let mut out = Vec::new();
    for (name, e) in header {
        if name == "__metadata__" {
            continue;
        }
        let off = e["data_offsets"].as_array().unwrap();
        let (b, end) = (off[0].as_u64().unwrap() as usize, off[1].as_u64().unwrap() as usize);
        out.push(Raw {
            name,
            dtype: match e["dtype"].as_str().unwrap() {
                "BF16" => "BF16",
                "F16" => "F16",
                "F32" => "F32",
                _ => "I32",
            },
            shape: e["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect(),
            bytes: data[8 + n + b..8 + n + end].to_vec(),
        });
    }
    out
}

fn write_raw(path: &Path, tensors: &[Raw]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for t in tensors {
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [offset, offset + t.bytes.len()]}),
        );
        offset += t.bytes.len();
    }
    let h = serde_json::to_vec(&header).unwrap();
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend(h);
    for t in tensors {
        file.extend(&t.bytes);
    }
    std::fs::write(path, file).unwrap();
}

fn load_err(dir: &Path) -> String {
    match checkpoint::load(dir, false) {
        Ok(_) => panic!("broken checkpoint {} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn model_file(dir: &Path) -> PathBuf {
    dir.join("model.safetensors")
}

#[test]
fn synth_checkpoint_loads_with_tied_embeddings() {
    let dir = tiny_checkpoint(1);
    let w = checkpoint::load(dir.path(), false).unwrap();
    let c = &w.config;
    assert_eq!(c, &SynthSpec::tiny(1).config);
    assert!(w.lm_head.is_none(), "tied: the stored lm_head copy is ignored");
    assert_eq!(w.lm_head().len(), c.vocab_size * c.hidden_size);
    assert_eq!(w.layers.len(), 2);
    let l = &w.layers[1];
    assert_eq!(l.q_proj.len(), c.q_dim() * c.hidden_size);
    assert_eq!(l.o_proj.len(), c.hidden_size * c.q_dim());
    assert_eq!(l.k_proj.len(), c.kv_dim() * c.hidden_size);
    assert_eq!(l.down_proj.len(), c.hidden_size * c.intermediate_size);
    assert_eq!(l.q_norm.len(), c.head_dim);
    // Norm weights near one, projections small: the synth scales are realistic.
    assert!(l.input_layernorm.iter().all(|w| (w.to_f32() - 1.0).abs() < 0.5));
    let std = (l.q_proj.iter().map(|w| w.to_f32().powi(2)).sum::<f32>() / l.q_proj.len() as f32).sqrt();
    assert!((0.015..0.025).contains(&std), "q_proj std {std}");
    // Same seed, same weights; another seed, other weights.
    let again = checkpoint::load(tiny_checkpoint(1).path(), false).unwrap();
    assert_eq!(again.layers[0].gate_proj, w.layers[0].gate_proj);
    let other = checkpoint::load(tiny_checkpoint(2).path(), false).unwrap();
    assert_ne!(other.layers[0].gate_proj, w.layers[0].gate_proj);
}

#[test]
fn untied_checkpoint_uses_its_lm_head() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = SynthSpec::tiny(3);
    spec.config.tie_word_embeddings = false;
    write_checkpoint(dir.path(), &spec).unwrap();
    let w = checkpoint::load(dir.path(), false).unwrap();
    let head = w.lm_head.as_ref().expect("untied model keeps its LM head");
    assert_ne!(head, &w.embed_tokens);

    // Untied but without lm_head.weight: refused, naming the tensor.
    let path = model_file(dir.path());
    let kept: Vec<Raw> = read_all(&path).into_iter().filter(|t| t.name != "lm_head.weight").collect();
    write_raw(&path, &kept);
    let msg = load_err(dir.path());
    assert!(msg.contains("lm_head.weight") && msg.contains("tie_word_embeddings"), "{msg}");
}

#[test]
fn tied_checkpoint_without_lm_head_loads() {
    let dir = tiny_checkpoint(4);
    let path = model_file(dir.path());
    let kept: Vec<Raw> = read_all(&path).into_iter().filter(|t| t.name != "lm_head.weight").collect();
    write_raw(&path, &kept);
    let w = checkpoint::load(dir.path(), false).unwrap();
    assert!(w.lm_head.is_none());
}

#[test]
fn f16_and_f32_tensors_are_converted_to_bf16() {
    let dir = tiny_checkpoint(5);
    let path = model_file(dir.path());
    let reference = checkpoint::load(dir.path(), false).unwrap();
    let mut tensors = read_all(&path);
    for t in tensors.iter_mut() {
        let values: Vec<f32> = t.bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        if t.name.ends_with("q_proj.weight") {
            t.dtype = "F32";
            t.bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        } else if t.name.ends_with("norm.weight") {
            // Norm weights near 1 have fewer significant bits than f16 holds: exact round trip.
            t.dtype = "F16";
            t.bytes = values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect();
        }
    }
    write_raw(&path, &tensors);
    let w = checkpoint::load(dir.path(), false).unwrap();
    assert_eq!(w.layers[1].q_proj, reference.layers[1].q_proj);
    assert_eq!(w.layers[0].input_layernorm, reference.layers[0].input_layernorm);
    assert_eq!(w.norm, reference.norm);
}

#[test]
fn missing_folder_and_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("config.json"), "{msg}");
    let dir = tiny_checkpoint(6);
    std::fs::remove_file(model_file(dir.path())).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model.safetensors") && msg.contains("model.safetensors.index.json"), "{msg}");
    let err = checkpoint::resolve_model_dir(Some(&dir.path().join("nope"))).unwrap_err();
    assert!(format!("{err:#}").contains("nope"));
}

#[test]
fn hf_cache_lookup_says_where_it_looked() {
    // The only test that touches the environment, so no other test races with it.
    let cache = tempfile::tempdir().unwrap();
    std::env::set_var("HF_HUB_CACHE", cache.path());
    let err = format!("{:#}", checkpoint::resolve_model_dir(None).unwrap_err());
    assert!(err.contains(&cache.path().display().to_string()) && err.contains("--model"), "{err}");
    assert!(err.contains("hf download Qwen/Qwen3-0.6B"), "the error names the download command: {err}");
    let snap = cache.path().join("models--Qwen--Qwen3-0.6B/snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(snap.join("config.json"), "{}").unwrap();
    assert_eq!(checkpoint::resolve_model_dir(None).unwrap(), snap);
    std::env::remove_var("HF_HUB_CACHE");
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let dir = tiny_checkpoint(7);
    let path = model_file(dir.path());
    let last = {
        let file = SafetensorsFile::open(&path).unwrap();
        file.tensors.iter().max_by_key(|(_, info)| info.data_offsets.1).unwrap().0.clone()
    };
    let data = std::fs::read(&path).unwrap();
    std::fs::write(&path, &data[..data.len() - 2]).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model.safetensors") && msg.contains("truncated"), "{msg}");
    assert!(msg.contains(&format!("`{last}`")), "the last tensor, {last}, is the cut one: {msg}");
    // Cut deeper, the first tensor that lost bytes is named, and how many follow it.
    std::fs::write(&path, &data[..data.len() - 1000]).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("truncated") && msg.contains("more tensor(s) after it"), "{msg}");
    // Too short for even the header length.
    std::fs::write(&path, [1u8, 2, 3]).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("too short"), "{msg}");
}

#[test]
fn header_length_beyond_file_is_reported() {
    let dir = tiny_checkpoint(8);
    let path = model_file(dir.path());
    let mut data = std::fs::read(&path).unwrap();
    data[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&path, &data).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model.safetensors") && msg.contains("header length"), "{msg}");
}

#[test]
fn corrupt_header_json_is_reported() {
    let dir = tiny_checkpoint(9);
    let path = model_file(dir.path());
    let mut data = std::fs::read(&path).unwrap();
    data[8..16].copy_from_slice(b"#garbage");
    std::fs::write(&path, &data).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model.safetensors") && msg.contains("not valid JSON"), "{msg}");
}

#[test]
fn offsets_that_disagree_with_the_shape_are_reported() {
    let dir = tiny_checkpoint(10);
    let path = model_file(dir.path());
    let mut tensors = read_all(&path);
    let t = tensors.iter_mut().find(|t| t.name == "model.norm.weight").unwrap();
    t.bytes.truncate(t.bytes.len() - 2);
    write_raw(&path, &tensors);
    let msg = load_err(dir.path());
    assert!(msg.contains("`model.norm.weight`") && msg.contains("data_offsets"), "{msg}");
}

#[test]
fn wrong_shape_names_file_and_tensor() {
    let dir = tiny_checkpoint(11);
    // The config now promises a wider MLP than the file holds.
    let mut config = SynthSpec::tiny(11).config;
    config.intermediate_size = 256;
    std::fs::write(dir.path().join("config.json"), config.to_hf_json().to_string()).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model.safetensors"), "{msg}");
    assert!(msg.contains("model.layers.0.mlp.gate_proj.weight") && msg.contains("shape"), "{msg}");
    assert!(msg.contains("[128, 64]") && msg.contains("[256, 64]"), "{msg}");
}

#[test]
fn wrong_dtype_names_file_and_tensor() {
    let dir = tiny_checkpoint(12);
    let path = model_file(dir.path());
    let mut tensors = read_all(&path);
    let t = tensors.iter_mut().find(|t| t.name == "model.layers.1.self_attn.k_norm.weight").unwrap();
    t.dtype = "I32";
    t.bytes.extend(t.bytes.clone()); // I32 is 4 bytes per element
    write_raw(&path, &tensors);
    let msg = load_err(dir.path());
    assert!(msg.contains("model.safetensors") && msg.contains("model.layers.1.self_attn.k_norm.weight"), "{msg}");
    assert!(msg.contains("I32"), "{msg}");
}

#[test]
fn missing_tensor_is_named() {
    let dir = tiny_checkpoint(13);
    let path = model_file(dir.path());
    let kept: Vec<Raw> =
        read_all(&path).into_iter().filter(|t| t.name != "model.layers.1.mlp.up_proj.weight").collect();
    write_raw(&path, &kept);
    let msg = load_err(dir.path());
    assert!(msg.contains("missing") && msg.contains("model.layers.1.mlp.up_proj.weight"), "{msg}");
}

#[test]
fn extra_tensor_is_named() {
    let dir = tiny_checkpoint(14);
    let path = model_file(dir.path());
    let mut tensors = read_all(&path);
    tensors.push(Raw {
        name: "model.layers.2.input_layernorm.weight".into(),
        dtype: "BF16",
        shape: vec![64],
        bytes: vec![0; 128],
    });
    write_raw(&path, &tensors);
    let msg = load_err(dir.path());
    assert!(msg.contains("unexpected") && msg.contains("model.layers.2.input_layernorm.weight"), "{msg}");
    assert!(msg.contains("model.safetensors"), "{msg}");
}

/// Splits a single-file checkpoint into two shards plus an index, as HF does for big models.
fn shard(dir: &Path) {
    let tensors = read_all(&model_file(dir));
    std::fs::remove_file(model_file(dir)).unwrap();
    let (a, b): (Vec<Raw>, Vec<Raw>) = tensors.into_iter().partition(|t| t.name.contains("layers.0."));
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", &a), ("model-00002-of-00002.safetensors", &b)] {
        for t in part.iter() {
            map.insert(t.name.clone(), json!(file));
        }
        write_raw(&dir.join(file), part);
    }
    std::fs::write(dir.join("model.safetensors.index.json"), json!({"metadata": {}, "weight_map": map}).to_string())
        .unwrap();
}

#[test]
fn sharded_checkpoint_loads_like_the_single_file() {
    let single = tiny_checkpoint(15);
    let sharded = tiny_checkpoint(15);
    shard(sharded.path());
    let (a, b) = (checkpoint::load(single.path(), false).unwrap(), checkpoint::load(sharded.path(), false).unwrap());
    assert_eq!(a.embed_tokens, b.embed_tokens);
    assert_eq!(a.layers[0].q_proj, b.layers[0].q_proj);
    assert_eq!(a.layers[1].down_proj, b.layers[1].down_proj);
    assert_eq!(a.norm, b.norm);
}

#[test]
fn sharded_checkpoint_with_missing_shard_names_it() {
    let dir = tiny_checkpoint(16);
    shard(dir.path());
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let msg = load_err(dir.path());
    assert!(msg.contains("model-00002-of-00002.safetensors") && msg.contains("missing"), "{msg}");
    assert!(msg.contains("model."), "names a tensor it should hold: {msg}");
}

/// `tensors.tsv` rows: name -> (shape, dtype).
fn real_layout() -> Vec<(String, Vec<usize>, String)> {
    std::fs::read_to_string(fixture("qwen3-0.6b/tensors.tsv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            let shape: Vec<usize> = serde_json::from_str(cols[1]).unwrap();
            (cols[0].to_string(), shape, cols[2].to_string())
        })
        .collect()
}

#[test]
fn expected_layout_matches_the_real_checkpoint() {
    let mut real = real_layout();
    assert_eq!(real.len(), 311);
    assert!(real.iter().all(|(_, _, dtype)| dtype == "BF16"));
    let mut ours: Vec<(String, Vec<usize>, String)> = expected_tensors(&Qwen3Config::qwen3_0_6b(), true)
        .into_iter()
        .map(|(n, s)| (n, s, "BF16".to_string()))
        .collect();
    real.sort();
    ours.sort();
    assert_eq!(ours, real);
}

#[test]
fn synth_writes_the_real_tensor_names_and_loads_them() {
    // All 28 layers' names, at small widths so the test stays fast; the full-size shapes are
    // covered by `expected_layout_matches_the_real_checkpoint`.
    let dir = tempfile::tempdir().unwrap();
    let mut spec = SynthSpec::tiny(17);
    spec.config.num_hidden_layers = 28;
    write_checkpoint(dir.path(), &spec).unwrap();
    let file = SafetensorsFile::open(&model_file(dir.path())).unwrap();
    let names: std::collections::BTreeSet<&str> = file.tensors.keys().map(String::as_str).collect();
    let real = real_layout();
    let real_names: std::collections::BTreeSet<&str> = real.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, real_names);
    for (name, shape) in expected_tensors(&spec.config, true) {
        let entry = &file.tensors[&name];
        assert_eq!(entry.shape, shape, "{name}");
        assert_eq!(format!("{:?}", entry.dtype), "BF16", "{name}");
    }
    let w = checkpoint::load(dir.path(), false).unwrap();
    assert_eq!(w.layers.len(), 28);
}

/// The real layout end to end: a full-size synthetic checkpoint (1.5 GB, a few seconds) has
/// exactly the names, shapes and dtypes of tensors.tsv, and loads.
#[test]
fn full_size_synth_has_the_real_layout_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SynthSpec::qwen3_0_6b(0)).unwrap();
    let file = SafetensorsFile::open(&model_file(dir.path())).unwrap();
    let mut stored: Vec<(String, Vec<usize>, String)> =
        file.tensors.iter().map(|(n, e)| (n.clone(), e.shape.clone(), format!("{:?}", e.dtype))).collect();
    drop(file);
    let mut real = real_layout();
    stored.sort();
    real.sort();
    assert_eq!(stored, real);
    let w = checkpoint::load(dir.path(), false).unwrap();
    assert_eq!(w.config, Qwen3Config::qwen3_0_6b());
    assert!(w.lm_head.is_none(), "tied: the stored lm_head.weight is not kept");
}
