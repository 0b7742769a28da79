//! Replays the hand-made hostile corpus (tests/fixtures/fuzz/) through the parsers the cargo-fuzz
//! targets in fuzz/ exercise: every file parses or fails without a panic, and `bad-*` files fail.

use host::model::config::GenerationConfig;
use host::model::tensor_file::{parse_header, SafetensorsFile};
use host::model::Qwen3Config;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn corpus(kind: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/fuzz").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(files.len() >= 10, "{} holds only {} files", dir.display(), files.len());
    files
}

fn is_bad(path: &Path) -> bool {
    path.file_name().unwrap().to_string_lossy().starts_with("bad-")
}

/// Runs `parse` on `path` under catch_unwind; returns its error text (None when it parsed).
fn replay<T>(what: &str, path: &Path, parse: impl FnOnce() -> anyhow::Result<T>) -> Option<String> {
    match catch_unwind(AssertUnwindSafe(parse)) {
        Err(_) => panic!("{what} panicked on {}", path.display()),
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
    }
}

#[test]
fn config_corpus_never_panics_and_bad_files_fail() {
    for path in corpus("config") {
        let bytes = std::fs::read(&path).unwrap();
        let from_file = replay("Qwen3Config::from_file", &path, || Qwen3Config::from_file(&path));
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let from_str = replay("Qwen3Config::from_json_str", &path, || {
                let c = Qwen3Config::from_json_str(text)?;
                // What callers compute from an accepted config (the fuzz target does the same).
                Ok((c.q_dim(), c.kv_dim(), c.to_hf_json()))
            });
            assert_eq!(
                from_str.is_some(),
                from_file.is_some(),
                "{}: from_file and from_json_str disagree",
                path.display()
            );
            replay("GenerationConfig::from_json_str", &path, || GenerationConfig::from_json_str(text));
        }
        match (is_bad(&path), from_file) {
            (true, None) => panic!("{} was accepted", path.display()),
            (false, Some(e)) => panic!("{} was rejected: {e}", path.display()),
            (true, Some(e)) => assert!(e.contains("config"), "{}: error does not say what failed: {e}", path.display()),
            (false, None) => {}
        }
    }
}

#[test]
fn safetensors_corpus_never_panics_and_bad_files_fail() {
    for path in corpus("safetensors") {
        let bytes = std::fs::read(&path).unwrap();
        let from_bytes = replay("parse_header", &path, || {
            let (data_start, tensors) = parse_header(&bytes)?;
            assert!(data_start <= bytes.len());
            for (name, info) in &tensors {
                let (begin, end) = info.data_offsets;
                assert!(begin <= end && data_start + end <= bytes.len(), "{}: `{name}` out of range", path.display());
            }
            Ok(())
        });
        // The mapped-file path must agree (and name the file when it fails).
        let from_file = replay("SafetensorsFile::open", &path, || SafetensorsFile::open(&path));
        assert_eq!(from_bytes.is_some(), from_file.is_some(), "{}: bytes and file disagree", path.display());
        if let Some(e) = &from_file {
            assert!(e.contains(&path.display().to_string()), "error does not name the file: {e}");
        }
        match (is_bad(&path), from_bytes) {
            (true, None) => panic!("{} was accepted", path.display()),
            (false, Some(e)) => panic!("{} was rejected: {e}", path.display()),
            _ => {}
        }
    }
}
