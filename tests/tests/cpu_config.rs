//! config.json / generation_config.json parsing and the rejection of what we cannot run.

use host::model::config::GenerationConfig;
use host::model::Qwen3Config;
use serde_json::{json, Value};
use std::path::PathBuf;

fn fixture(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(path)
}

fn real_config_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("qwen3-0.6b/config.json")).unwrap()).unwrap()
}

/// An edit of the config's JSON object.
type Edit = Box<dyn FnOnce(&mut serde_json::Map<String, Value>)>;

/// The real config with `edit` applied; returns the parse error's full text.
fn rejected(edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> String {
    let mut v = real_config_json();
    edit(v.as_object_mut().unwrap());
    match Qwen3Config::from_json_str(&v.to_string()) {
        Ok(c) => panic!("config was accepted: {c:?}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn real_config_parses_to_the_known_values() {
    let c = Qwen3Config::from_file(&fixture("qwen3-0.6b/config.json")).unwrap();
    assert_eq!(c, Qwen3Config::qwen3_0_6b());
    assert_eq!(c.q_dim(), 2048);
    assert_eq!(c.kv_dim(), 1024);
    assert_ne!(c.q_dim(), c.hidden_size, "Qwen3-0.6B's query width differs from hidden");
}

#[test]
fn nested_rope_parameters_and_eos_lists_are_read() {
    let c = Qwen3Config::from_json_str(
        &json!({
            "model_type": "qwen3", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
            "rope_parameters": {"rope_theta": 5000.0, "rope_type": "default"},
            "eos_token_id": [7, 9], "tie_word_embeddings": false
        })
        .to_string(),
    )
    .unwrap();
    assert_eq!(c.rope_theta, 5000.0);
    assert_eq!(c.eos_token_ids, vec![7, 9]);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.bos_token_id, None);
}

#[test]
fn head_dim_is_derived_when_absent() {
    let mut v = real_config_json();
    v.as_object_mut().unwrap().remove("head_dim");
    let c = Qwen3Config::from_json_str(&v.to_string()).unwrap();
    assert_eq!(c.head_dim, 1024 / 16);
}

#[test]
fn hf_json_written_by_synth_round_trips() {
    let c = Qwen3Config::qwen3_0_6b();
    assert_eq!(Qwen3Config::from_json_str(&c.to_hf_json().to_string()).unwrap(), c);
}

#[test]
fn unsupported_configs_are_rejected_naming_the_field() {
    let cases: Vec<(&str, Edit)> = vec![
        ("model_type", Box::new(|m| drop(m.insert("model_type".into(), json!("llama"))))),
        ("model_type", Box::new(|m| drop(m.remove("model_type")))),
        ("hidden_act", Box::new(|m| drop(m.insert("hidden_act".into(), json!("gelu"))))),
        ("rope_scaling", Box::new(|m| drop(m.insert("rope_scaling".into(), json!({"type": "yarn", "factor": 4.0}))))),
        ("attention_bias", Box::new(|m| drop(m.insert("attention_bias".into(), json!(true))))),
        ("use_sliding_window", Box::new(|m| drop(m.insert("use_sliding_window".into(), json!(true))))),
        ("num_key_value_heads", Box::new(|m| drop(m.insert("num_key_value_heads".into(), json!(6))))),
        ("hidden_size", Box::new(|m| drop(m.insert("hidden_size".into(), json!(0))))),
        ("vocab_size", Box::new(|m| drop(m.remove("vocab_size")))),
        ("intermediate_size", Box::new(|m| drop(m.insert("intermediate_size".into(), json!("big"))))),
        ("head_dim", Box::new(|m| drop(m.insert("head_dim".into(), json!(127))))),
        ("head_dim", Box::new(|m| drop(m.insert("head_dim".into(), json!(0))))),
        ("num_hidden_layers", Box::new(|m| drop(m.insert("num_hidden_layers".into(), json!(-3))))),
        ("rms_norm_eps", Box::new(|m| drop(m.insert("rms_norm_eps".into(), json!(-1.0))))),
        ("rope_theta", Box::new(|m| drop(m.insert("rope_theta".into(), json!(0))))),
        ("tie_word_embeddings", Box::new(|m| drop(m.insert("tie_word_embeddings".into(), json!("yes"))))),
        (
            "head_dim",
            Box::new(|m| {
                m.remove("head_dim");
                m.insert("hidden_size".into(), json!(1000));
            }),
        ),
    ];
    for (field, edit) in cases {
        let msg = rejected(edit);
        assert!(msg.contains(field), "error for a bad `{field}` does not name it: {msg}");
    }
}

#[test]
fn malformed_json_is_an_error() {
    assert!(Qwen3Config::from_json_str("{ not json").is_err());
    assert!(Qwen3Config::from_json_str("[1, 2]").is_err());
    let missing = Qwen3Config::from_file(&fixture("no-such-dir/config.json")).unwrap_err();
    assert!(format!("{missing:#}").contains("no-such-dir"));
}

#[test]
fn generation_config_reads_qwen3_defaults() {
    let g = GenerationConfig::from_file(&fixture("qwen3-0.6b/generation_config.json")).unwrap();
    assert!(g.do_sample);
    assert_eq!(g.temperature, 0.6);
    assert_eq!(g.top_k, 20);
    assert_eq!(g.top_p, 0.95);
    assert_eq!(g.eos_token_ids, vec![151645, 151643]);
    let s = g.sampling(7);
    assert_eq!((s.temperature, s.top_k, s.top_p, s.seed), (0.6, 20, 0.95, 7));
}

#[test]
fn generation_config_defaults_and_errors() {
    let g = GenerationConfig::from_json_str("{}").unwrap();
    assert_eq!(g, GenerationConfig::default());
    assert!(g.sampling(0).is_greedy(), "without do_sample the default is greedy");
    let err = GenerationConfig::from_json_str(r#"{"top_p": 1.5}"#).unwrap_err();
    assert!(format!("{err:#}").contains("top_p"));
    let err = GenerationConfig::from_json_str(r#"{"temperature": -1}"#).unwrap_err();
    assert!(format!("{err:#}").contains("temperature"));
    let g = GenerationConfig::from_json_str(r#"{"eos_token_id": 5}"#).unwrap();
    assert_eq!(g.eos_token_ids, vec![5]);
}

#[test]
fn gpu_kernel_limits_are_checked_before_anything_runs() {
    use host::engine::check_supported;
    check_supported(&Qwen3Config::qwen3_0_6b()).expect("Qwen3-0.6B is what the kernel is for");
    // The kernel keeps every layer's pointers in shared memory: at most MAX_LAYERS.
    let deep = Qwen3Config { num_hidden_layers: 65, ..Qwen3Config::qwen3_0_6b() };
    let err = format!("{:#}", check_supported(&deep).unwrap_err());
    assert!(err.contains("at most 64 layers, not 65"), "{err}");
    let ok = Qwen3Config { num_hidden_layers: 64, ..Qwen3Config::qwen3_0_6b() };
    check_supported(&ok).expect("64 layers fit");
}
