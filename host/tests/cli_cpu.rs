//! The `host` binary end to end on the CPU: synth, decode, perplexity, tokenize, and the error
//! paths a user can hit (each a one-line `error:` and exit status 1, never a panic).

mod common;
use common::{fails, host, ok, synth_tiny, tokenizer_fixture};
use serde_json::Value;

#[test]
fn help_answers_for_every_command() {
    for cmd in ["decode", "perplexity", "tokenize", "synth", "bench", "sync-bench"] {
        let text = ok(&[cmd, "--help"]);
        assert!(text.contains("Usage"), "{cmd} --help: {text}");
    }
    assert!(ok(&["--help"]).contains("decode"));
}

#[test]
fn decode_json_on_a_tiny_synth_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), &["--vocab", "512"]);
    let m = dir.path().to_str().unwrap();
    let run = |extra: &[&str]| -> Value {
        let mut args = vec!["decode", "--model", m, "--device", "cpu", "--prompt-ids", "1,2,3", "--json"];
        args.extend(extra);
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let v = run(&["--max-new-tokens", "5", "--temperature", "0"]);
    assert_eq!(v["prompt_tokens"], 3);
    assert_eq!(v["tokens"].as_array().unwrap().len(), 5);
    assert_eq!(v["device"], "cpu");
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["prefill_s"].as_f64().is_some() && v["decode_s"].as_f64().is_some());
    assert!(v["text"].is_null(), "no tokenizer, no text");
    // Greedy is reproducible; seeded sampling too.
    assert_eq!(run(&["--max-new-tokens", "5", "--temperature", "0"])["tokens"], v["tokens"]);
    let s1 = run(&["--max-new-tokens", "8", "--seed", "3"]);
    assert_eq!(run(&["--max-new-tokens", "8", "--seed", "3"])["tokens"], s1["tokens"]);

    // Perplexity of ids: finite, consistent with its mean NLL.
    let p: Value =
        serde_json::from_str(&ok(&["perplexity", "--model", m, "--device", "cpu", "--ids", "1,2,3,4,5", "--json"]))
            .unwrap();
    assert_eq!(p["tokens"], 5);
    let (nll, ppl) = (p["mean_nll"].as_f64().unwrap(), p["perplexity"].as_f64().unwrap());
    assert!(nll > 0.0 && (ppl - nll.exp()).abs() < 1e-6 * ppl);
}

#[test]
fn decode_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), &["--vocab", "512"]);
    let m = dir.path().to_str().unwrap();
    let base = ["decode", "--model", m, "--device", "cpu"];
    let with = |extra: &[&'static str]| -> Vec<&str> { base.iter().copied().chain(extra.iter().copied()).collect() };
    let e = fails(&with(&["--prompt-ids", "1,999", "--json"]));
    assert!(e.contains("999") && e.contains("512"), "{e}");
    let e = fails(&with(&["--prompt-ids", "1,2,3", "--json", "--max-context", "8", "--max-new-tokens", "6"]));
    assert!(e.contains("--max-context"), "{e}");
    let e = fails(&with(&["--prompt-ids", "1,x", "--json"]));
    assert!(e.contains("\"x\""), "{e}");
    let e = fails(&with(&["--prompt-ids", "1,2"]));
    assert!(e.contains("tokenizer") && e.contains("--json"), "{e}");
    let e = fails(&with(&["--prompt", "hello", "--json"]));
    assert!(e.contains("tokenizer"), "{e}");
    let e = fails(&with(&["--prompt-ids", "1,2,3", "--json", "--prefill-chunk", "16"]));
    assert!(e.contains("--prefill-chunk") && e.contains("--device cpu"), "{e}");
    let e = fails(&["decode", "--model", "/nonexistent/model", "--prompt-ids", "1", "--json"]);
    assert!(e.contains("/nonexistent/model"), "{e}");
    // The GPU path reports its own errors the same way (no GPU here, or one: either way no panic).
    let out = host(&["decode", "--model", m, "--prompt-ids", "1,2", "--json", "--max-new-tokens", "2"]);
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

/// `--prefill-chunk` is the GPU's: with `--device cpu` its default is silently unused and 0
/// (off) is accepted, but a chunk asked for is refused before anything loads, by `decode` and
/// `perplexity` alike. The help states the GPU's default, `host::engine::DEFAULT_PREFILL_CHUNK`.
#[test]
fn prefill_chunk_is_refused_on_the_cpu_and_its_default_documented() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), &["--vocab", "512"]);
    let m = dir.path().to_str().unwrap();
    let decode =
        ["decode", "--model", m, "--device", "cpu", "--prompt-ids", "1,2,3", "--json", "--max-new-tokens", "2"];
    let perplexity = ["perplexity", "--model", m, "--device", "cpu", "--ids", "1,2,3,4", "--json"];
    for base in [&decode[..], &perplexity[..]] {
        let with =
            |extra: &[&'static str]| -> Vec<&str> { base.iter().copied().chain(extra.iter().copied()).collect() };
        ok(base);
        ok(&with(&["--prefill-chunk", "0"]));
        for n in ["1", "16", "1024"] {
            let e = fails(&with(&["--prefill-chunk", n]));
            assert!(e.contains("--prefill-chunk") && e.contains("--device cpu"), "{base:?} --prefill-chunk {n}: {e}");
        }
    }
    let default = format!("default: {} on the GPU", host::engine::DEFAULT_PREFILL_CHUNK);
    for cmd in ["decode", "perplexity"] {
        let help = ok(&[cmd, "--help"]);
        assert!(help.contains("--prefill-chunk") && help.contains(&default), "{cmd} --help: {help}");
    }
    // bench --prefill times prompts the way decode runs them, so it says the same default.
    let help = ok(&["bench", "--help"]);
    let default = format!("default: {}, as `decode`", host::engine::DEFAULT_PREFILL_CHUNK);
    assert!(help.contains(&default), "bench --help: {help}");
}

#[test]
fn text_prompt_streams_with_a_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let tok = tokenizer_fixture();
    synth_tiny(dir.path(), &["--vocab", "151936", "--tokenizer", tok.to_str().unwrap()]);
    let m = dir.path().to_str().unwrap();
    let text = ok(&[
        "decode",
        "--model",
        m,
        "--device",
        "cpu",
        "--prompt",
        "Hello",
        "--chat",
        "--no-thinking",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]);
    assert!(!text.trim().is_empty() || text.ends_with('\n'));
    let v: Value = serde_json::from_str(&ok(&[
        "decode",
        "--model",
        m,
        "--device",
        "cpu",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["prompt_tokens"], 1);
    assert!(v["text"].is_string());
    // The streamed text is the decoded tokens (special tokens are not shown in the stream).
    let plain = ok(&[
        "decode",
        "--model",
        m,
        "--device",
        "cpu",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
    ]);
    assert_eq!(
        plain.trim_end_matches('\n'),
        v["text"].as_str().unwrap().replace("<|im_end|>", "").replace("<|endoftext|>", "")
    );
}

#[test]
fn tokenize_prints_ids() {
    let tok = tokenizer_fixture();
    let out = ok(&["tokenize", "--model", tok.to_str().unwrap(), "<|im_start|>Hello"]);
    assert_eq!(out.trim(), "151644,9707");
}

#[test]
fn synth_rejects_impossible_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let e = fails(&["synth", "--out", out.to_str().unwrap(), "--heads", "16", "--kv-heads", "5", "--layers", "1"]);
    assert!(e.contains("num_key_value_heads"), "{e}");
}

/// A checkpoint whose config.json allows only `positions` positions.
fn tiny_with_max_positions(positions: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), &["--vocab", "512"]);
    let config = dir.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let edited =
        text.replace("\"max_position_embeddings\": 40960", &format!("\"max_position_embeddings\": {positions}"));
    assert_ne!(text, edited, "synth's config.json no longer holds max_position_embeddings 40960");
    std::fs::write(&config, edited).unwrap();
    dir
}

#[test]
fn default_context_fits_the_checkpoint() {
    // The default --max-context is 4096 only where the model allows as many positions.
    let dir = tiny_with_max_positions(512);
    let m = dir.path().to_str().unwrap();
    let v: Value =
        serde_json::from_str(&ok(&["decode", "--model", m, "--device", "cpu", "--prompt-ids", "1,2", "--json"]))
            .unwrap();
    assert_eq!(v["generated_tokens"], 256, "the default --max-new-tokens fits 512 positions");
    let p = ok(&["perplexity", "--model", m, "--device", "cpu", "--ids", "1,2,3", "--json"]);
    assert!(p.contains("perplexity"), "{p}");
    // What does not fit is refused against the model's limit, not against 4096.
    let e =
        fails(&["decode", "--model", m, "--device", "cpu", "--prompt-ids", "1,2", "--json", "--max-new-tokens", "511"]);
    assert!(e.contains("maximum context of 512"), "{e}");
    let e = fails(&["decode", "--model", m, "--device", "cpu", "--prompt-ids", "1", "--json", "--max-context", "4096"]);
    assert!(e.contains("max_position_embeddings (512)"), "{e}");
}

#[test]
fn one_token_reports_no_decode_rate() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), &["--vocab", "151936", "--tokenizer", tokenizer_fixture().to_str().unwrap()]);
    let m = dir.path().to_str().unwrap();
    let out = host(&["decode", "--model", m, "--device", "cpu", "--prompt", "Hi", "--max-new-tokens", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // One token is all prefill: there is no decode rate to show.
    assert!(stderr.contains("[1 token, max_new_tokens; prefill") && !stderr.contains("tokens/s"), "{stderr}");
    let v: Value = serde_json::from_str(&ok(&[
        "decode",
        "--model",
        m,
        "--device",
        "cpu",
        "--prompt-ids",
        "1",
        "--max-new-tokens",
        "1",
        "--json",
    ]))
    .unwrap();
    assert!(v["tokens_per_s"].is_null(), "{v}");
    assert_eq!(v["stop_reason"], "max_new_tokens");
}

#[test]
fn stop_reason_comes_from_the_backend() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), &["--vocab", "512"]);
    let m = dir.path().to_str().unwrap();
    let run = || -> Value {
        let args =
            ["decode", "--model", m, "--device", "cpu", "--prompt-ids", "1,2,3", "--json", "--max-new-tokens", "8"];
        let args: Vec<&str> = args.into_iter().chain(["--temperature", "0"]).collect();
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let free = run();
    assert_eq!(free["stop_reason"], "max_new_tokens");
    // The 4th generated token made an end token: generation stops at its first occurrence.
    let eos = free["tokens"][3].as_u64().unwrap();
    let tokens: Vec<u64> = free["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
    let first = tokens.iter().position(|&t| t == eos).unwrap();
    let generation = dir.path().join("generation_config.json");
    std::fs::write(&generation, format!("{{\"eos_token_id\": [{eos}]}}")).unwrap();
    let stopped = run();
    assert_eq!(stopped["stop_reason"], "eos");
    assert_eq!(stopped["tokens"].as_array().unwrap().len(), first + 1);
}

#[test]
fn more_end_tokens_than_the_gpu_kernel_holds_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), &["--vocab", "512"]);
    let m = dir.path().to_str().unwrap();
    std::fs::write(dir.path().join("generation_config.json"), r#"{"eos_token_id": [7, 8, 9, 10, 11]}"#).unwrap();
    // Refused before the GPU is opened, so this holds on machines without one too.
    let e = fails(&["decode", "--model", m, "--prompt-ids", "1,2", "--json", "--max-new-tokens", "2"]);
    assert!(e.contains("generation_config.json") && e.contains("5 distinct end-of-sequence ids"), "{e}");
    assert!(e.contains("up to 4"), "{e}");
    // The CPU reference stops at any number of them.
    ok(&["decode", "--model", m, "--device", "cpu", "--prompt-ids", "1,2", "--json", "--max-new-tokens", "2"]);
}
