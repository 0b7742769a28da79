//! Hostile inputs to the library side: broken tokenizer files, checkpoints whose header
//! lies, configs with absurd values. Each is one clear error naming the file or field, never a
//! panic and never a hang. (The CLI-level cases are in host/tests/cli_hostile.rs; the parsers'
//! corpus replay is cpu_fuzz_corpus.rs.)

use host::model::checkpoint;
use host::model::synth::{write_checkpoint, SynthSpec};
use host::model::tensor_file::SafetensorsFile;
use host::model::tokenizer::Tokenizer;
use host::model::Qwen3Config;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// Runs `f` on another thread; fails the test if it panics or takes longer than `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("still running after {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("panicked"),
    }
}

fn tokenizer_fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3-tokenizer")
}

fn tokenizer_err(dir: &Path) -> String {
    let dir = dir.to_path_buf();
    within(60, move || match Tokenizer::from_dir(&dir) {
        Ok(_) => panic!("broken tokenizer in {} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    })
}

/// CRC-32 (IEEE), for hand-made gzip members.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A valid gzip file holding `data` in one stored (uncompressed) deflate block.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    assert!(data.len() < 65536);
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 1];
    let len = data.len() as u16;
    out.extend(len.to_le_bytes());
    out.extend((!len).to_le_bytes());
    out.extend(data);
    out.extend(crc32(data).to_le_bytes());
    out.extend((data.len() as u32).to_le_bytes());
    out
}

#[test]
fn tokenizer_json_that_does_not_parse_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    for garbage in [
        &b"not json at all"[..],
        b"",
        b"{\"version\": \"1.0\", \"model\": {\"type\": \"BPE\"",
        b"[1, 2, 3]",
        b"\xff\xfe{}",
    ] {
        std::fs::write(&path, garbage).unwrap();
        let e = tokenizer_err(dir.path());
        assert!(e.contains(&path.display().to_string()) && e.contains("cannot load tokenizer"), "{garbage:?}: {e}");
    }
}

#[test]
fn tokenizer_json_gz_that_is_truncated_or_not_gzip_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json.gz");
    let real = std::fs::read(tokenizer_fixture().join("tokenizer.json.gz")).unwrap();
    for (what, bytes) in [
        ("truncated", real[..real.len() / 3].to_vec()),
        ("cut in the trailer", real[..real.len() - 4].to_vec()),
        ("header only", real[..10].to_vec()),
        ("empty", Vec::new()),
        ("not gzip", b"{\"version\": \"1.0\"}".to_vec()),
    ] {
        std::fs::write(&path, &bytes).unwrap();
        let e = tokenizer_err(dir.path());
        assert!(e.contains(&path.display().to_string()) && e.contains("gzip"), "{what}: {e}");
    }
    // Valid gzip, but what it holds is no tokenizer.
    std::fs::write(&path, gzip_stored(b"{\"not\": \"a tokenizer\"")).unwrap();
    let e = tokenizer_err(dir.path());
    assert!(e.contains(&path.display().to_string()) && e.contains("cannot load tokenizer"), "{e}");
}

#[test]
fn broken_tokenizer_config_is_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(tokenizer_fixture().join("tokenizer.json.gz"), dir.path().join("tokenizer.json.gz")).unwrap();
    let config = dir.path().join("tokenizer_config.json");
    for (text, expect) in [(&b"{\"eos_token\": "[..], "not valid JSON"), (b"[1]", "not a JSON object"), (b"\xff", "")] {
        std::fs::write(&config, text).unwrap();
        let e = tokenizer_err(dir.path());
        assert!(e.contains("tokenizer_config.json") && e.contains(expect), "{text:?}: {e}");
    }
    // Wrong types for the optional fields are ignored, not fatal: no template, no eos.
    std::fs::write(&config, json!({"chat_template": 5, "eos_token": [1], "bos_token": {"content": 3}}).to_string())
        .unwrap();
    let t = Tokenizer::from_dir(dir.path()).unwrap();
    assert!(!t.has_chat_template() && t.eos_ids().is_empty());
    // A template that does not parse or raises is an error of one line, not a panic.
    std::fs::write(&config, json!({"chat_template": "{% for m in messages %}{{ m.content"}).to_string()).unwrap();
    let t = Tokenizer::from_dir(dir.path()).unwrap();
    let e = format!("{:#}", t.apply_chat_template(&[], true, true).unwrap_err());
    assert!(e.contains("chat template does not parse") && e.lines().count() == 1, "{e}");
    std::fs::write(&config, json!({"chat_template": "{{ raise_exception('no system turns') }}"}).to_string()).unwrap();
    let t = Tokenizer::from_dir(dir.path()).unwrap();
    let e = format!("{:#}", t.apply_chat_template(&[], true, true).unwrap_err());
    assert!(e.contains("no system turns") && e.lines().count() == 1, "{e}");
}

fn tiny_checkpoint(seed: u64) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &SynthSpec::tiny(seed)).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    let dir = dir.to_path_buf();
    within(60, move || match checkpoint::load(&dir, false) {
        Ok(_) => panic!("broken checkpoint {} loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    })
}

/// Rewrites the JSON header of a safetensors file (same data section) after `edit`.
fn edit_header(path: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let data = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, Value> = serde_json::from_slice(&data[8..8 + n]).unwrap();
    edit(&mut header);
    let h = serde_json::to_vec(&header).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(&data[8 + n..]);
    std::fs::write(path, out).unwrap();
}

#[test]
fn header_shape_lies_are_reported() {
    // Already covered in cpu_checkpoint.rs: offsets that disagree with the shape
    // (offsets_that_disagree_with_the_shape_are_reported) and a shape that disagrees with the
    // config (wrong_shape_names_file_and_tensor). Here: the remaining lies.
    let dir = tiny_checkpoint(20);
    let path = dir.path().join("model.safetensors");
    let pristine = std::fs::read(&path).unwrap();

    // A shape whose element count overflows, with offsets that look plausible.
    edit_header(&path, |h| h["model.norm.weight"]["shape"] = json!([1u64 << 32, 1u64 << 32, 64]));
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("`model.norm.weight`") && e.contains("too many"), "{e}");

    // Transposed: the bytes fit the shape, the shape does not fit the config.
    std::fs::write(&path, &pristine).unwrap();
    edit_header(&path, |h| h["model.layers.0.mlp.down_proj.weight"]["shape"] = json!([128, 64]));
    let e = load_err(dir.path());
    assert!(e.contains("model.layers.0.mlp.down_proj.weight") && e.contains("[128, 64]") && e.contains("[64, 128]"));

    // Two tensors claiming the same bytes.
    std::fs::write(&path, &pristine).unwrap();
    edit_header(&path, |h| {
        let offsets = h["model.layers.0.self_attn.k_norm.weight"]["data_offsets"].clone();
        h["model.layers.0.self_attn.q_norm.weight"]["data_offsets"] = offsets;
    });
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("overlap") && e.contains("q_norm"), "{e}");

    // Bytes that no tensor claims (the format forbids them), here after the last tensor.
    std::fs::write(&path, [&pristine[..], &[0u8; 8][..]].concat()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("after the last tensor"), "{e}");

    // Offsets as negative numbers, floats, or strings.
    for bad in [json!([-64, 0]), json!([0.0, 64.0]), json!(["0", "64"]), json!([0]), json!(null)] {
        std::fs::write(&path, &pristine).unwrap();
        edit_header(&path, |h| h["model.norm.weight"]["data_offsets"] = bad.clone());
        let e = load_err(dir.path());
        assert!(e.contains("`model.norm.weight`") && e.contains("data_offsets"), "{bad}: {e}");
    }
}

#[test]
fn config_that_lies_about_the_layer_count_fails_fast() {
    // Listing the expected tensors of 10^18 layers would never finish.
    let dir = tiny_checkpoint(21);
    let mut config = SynthSpec::tiny(21).config.to_hf_json();
    config["num_hidden_layers"] = json!(1_000_000_000_000_000_000u64);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("num_hidden_layers") && e.contains("25 tensors"), "{e}");
    // One layer too many still lists what is missing.
    config["num_hidden_layers"] = json!(3);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("missing") && e.contains("model.layers.2."), "{e}");
}

#[test]
fn odd_weight_files_are_named() {
    let dir = tiny_checkpoint(22);
    let path = dir.path().join("model.safetensors");
    // Empty file (a zero-length map).
    std::fs::write(&path, b"").unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors") && e.contains("too short"), "{e}");
    assert!(SafetensorsFile::open(&path).is_err());
    // A folder where the file should be: not taken for the file.
    std::fs::remove_file(&path).unwrap();
    std::fs::create_dir(&path).unwrap();
    let e = load_err(dir.path());
    assert!(e.contains("model.safetensors"), "{e}");
    std::fs::remove_dir(&path).unwrap();
    // A broken index, and one that points outside the folder.
    let index = dir.path().join("model.safetensors.index.json");
    for (text, expect) in [
        ("{\"weight_map\": ", "not valid JSON"),
        ("{\"metadata\": {}}", "weight_map"),
        ("{\"weight_map\": {\"model.norm.weight\": 7}}", "not a file name"),
        ("{\"weight_map\": {\"model.norm.weight\": \"../model.safetensors\"}}", "plain file name"),
        ("{\"weight_map\": {\"model.norm.weight\": \"shard.safetensors\"}}", "missing"),
    ] {
        std::fs::write(&index, text).unwrap();
        let e = load_err(dir.path());
        assert!(e.contains("model.safetensors.index.json") && e.contains(expect), "{text}: {e}");
    }
}

#[test]
fn config_wrong_types_and_absurd_values_name_the_field() {
    // cpu_config.rs covers malformed JSON, missing/zero/negative/string sizes, unsupported
    // features; these are the rest. The corpus in tests/fixtures/fuzz/config has more.
    let base = SynthSpec::tiny(0).config.to_hf_json();
    for (field, value) in [
        ("rms_norm_eps", json!("1e-6")),
        ("rope_theta", json!([10000])),
        ("eos_token_id", json!("<|im_end|>")),
        ("eos_token_id", json!([1, 1u64 << 40])),
        ("bos_token_id", json!(-1)),
        ("num_key_value_heads", json!(2.5)),
        ("vocab_size", json!(1e300)),
        ("max_position_embeddings", json!(0)),
        ("model_type", json!(["qwen3"])),
        ("head_dim", json!({"value": 32})),
        ("attention_bias", json!("no")),
    ] {
        let mut v = base.clone();
        v[field] = value.clone();
        let e = format!("{:#}", Qwen3Config::from_json_str(&v.to_string()).unwrap_err());
        assert!(e.contains(field), "bad {field} = {value}: {e}");
    }
    // Sizes whose product overflows.
    let mut v = base.clone();
    v["num_attention_heads"] = json!(1u64 << 62);
    v["num_key_value_heads"] = json!(1u64 << 62);
    v["head_dim"] = json!(8);
    let e = format!("{:#}", Qwen3Config::from_json_str(&v.to_string()).unwrap_err());
    assert!(e.contains("num_attention_heads") && e.contains("overflows"), "{e}");
    // Not UTF-8, on disk: the file is named.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, b"{\"model_type\": \"qwen\xff3\"}").unwrap();
    let e = format!("{:#}", Qwen3Config::from_file(&path).unwrap_err());
    assert!(e.contains(&path.display().to_string()) && e.contains("UTF-8"), "{e}");
}
