//! Hostile inputs through the `host` binary: each gives one `error:` line and a non-zero exit
//! status, never a panic (status 101, "panicked at", a backtrace) and never a hang.

mod common;
use common::{fails, host, synth_tiny, tokenizer_fixture};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;

fn tiny() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), &["--vocab", "512"]);
    dir
}

/// The tiny model with Qwen3's vocabulary and tokenizer, so text prompts work.
fn tiny_with_tokenizer() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    synth_tiny(dir.path(), &["--vocab", "151936", "--tokenizer", tokenizer_fixture().to_str().unwrap()]);
    dir
}

#[test]
fn bad_prompt_ids_are_refused() {
    let dir = tiny();
    let m = dir.path().to_str().unwrap();
    let decode = |extra: &[&str]| -> String {
        let mut args = vec!["decode", "--model", m, "--device", "cpu", "--json", "--max-new-tokens", "2"];
        args.extend(extra);
        fails(&args)
    };
    let e = decode(&["--prompt-ids", "999999"]);
    assert!(e.contains("999999") && e.contains("512"), "{e}");
    let e = decode(&["--prompt-ids", "1,2,512"]);
    assert!(e.contains("#2") && e.contains("512"), "{e}");
    for empty in ["", " ", ",", " , ,"] {
        let e = decode(&["--prompt-ids", empty]);
        assert!(e.contains("--prompt-ids") && e.contains("no token ids"), "{empty:?}: {e}");
    }
    for (bad, shown) in [
        ("--prompt-ids=-1", "\"-1\""),
        ("--prompt-ids=1.5", "\"1.5\""),
        ("--prompt-ids=0x10", "\"0x10\""),
        ("--prompt-ids=4294967296", "\"4294967296\""),
        ("--prompt-ids=99999999999999999999999", "\"99999999999999999999999\""),
        ("--prompt-ids=1;2", "\"1;2\""),
        ("--prompt-ids=\u{ff11}", "\"\u{ff11}\""),
        ("--prompt-ids=hello", "\"hello\""),
    ] {
        let e = decode(&[bad]);
        assert!(e.contains("--prompt-ids") && e.contains(shown) && e.contains("integer"), "{bad}: {e}");
    }
    // Same checks for perplexity's --ids.
    let e = fails(&["perplexity", "--model", m, "--device", "cpu", "--ids", ""]);
    assert!(e.contains("--ids") && e.contains("no token ids"), "{e}");
    let e = fails(&["perplexity", "--model", m, "--device", "cpu", "--ids", "1,999999"]);
    assert!(e.contains("999999"), "{e}");
    let e = fails(&["perplexity", "--model", m, "--device", "cpu", "--ids=1,-5"]);
    assert!(e.contains("\"-5\""), "{e}");
}

#[test]
fn context_limits_cannot_be_overflowed() {
    let dir = tiny();
    let m = dir.path().to_str().unwrap();
    let base = ["decode", "--model", m, "--device", "cpu", "--json", "--prompt-ids", "1,2,3"];
    let decode = |extra: &[&str]| -> String { fails(&base.iter().chain(extra).copied().collect::<Vec<_>>()) };
    // prompt + new tokens beyond the context, including a count that would wrap usize.
    let e = decode(&["--max-new-tokens", "4094"]);
    assert!(e.contains("--max-context") && e.contains("4096"), "{e}");
    let e = decode(&["--max-new-tokens", &usize::MAX.to_string()]);
    assert!(e.contains("--max-context") && e.contains(&usize::MAX.to_string()), "{e}");
    let e = decode(&["--max-context", "2", "--max-new-tokens", "0"]);
    assert!(e.contains("--max-context"), "{e}");
    let e = decode(&["--max-context", "0"]);
    assert!(e.contains("--max-context"), "{e}");
    // Beyond max_position_embeddings (40960), or absurd: refused before anything is allocated.
    for ctx in ["40961", "1000000000000", &usize::MAX.to_string()] {
        let e = decode(&["--max-context", ctx, "--max-new-tokens", "1"]);
        assert!(e.contains("--max-context") && e.contains("max_position_embeddings"), "{ctx}: {e}");
        let e = fails(&["perplexity", "--model", m, "--device", "cpu", "--ids", "1,2", "--max-context", ctx]);
        assert!(e.contains("--max-context") && e.contains("max_position_embeddings"), "{ctx}: {e}");
    }
    let e = fails(&["perplexity", "--model", m, "--device", "cpu", "--ids", "1,2", "--max-context", "1"]);
    assert!(e.contains("--max-context"), "{e}");
    // Values clap cannot even parse are its own error (status 2), still no panic.
    let out = host(&base.iter().chain(&["--max-new-tokens", "-1"]).copied().collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
}

#[test]
fn empty_text_prompts_are_refused() {
    let dir = tiny_with_tokenizer();
    let m = dir.path().to_str().unwrap();
    let e = fails(&["decode", "--model", m, "--device", "cpu", "--json", "--prompt", ""]);
    assert!(e.contains("no tokens"), "{e}");
    // Without a tokenizer the prompt cannot be read at all: that is the error.
    let bare = tiny();
    let e = fails(&["decode", "--model", bare.path().to_str().unwrap(), "--device", "cpu", "--json", "--prompt", ""]);
    assert!(e.contains("tokenizer"), "{e}");
    // Perplexity of an empty file: too few tokens.
    let file = dir.path().join("empty.txt");
    std::fs::write(&file, "").unwrap();
    let e = fails(&["perplexity", "--model", m, "--device", "cpu", "--file", file.to_str().unwrap()]);
    assert!(e.contains("at least 2 tokens"), "{e}");
}

#[test]
fn non_utf8_text_is_a_clear_error() {
    let dir = tiny_with_tokenizer();
    let m = OsString::from(dir.path());
    let bad = OsStr::from_bytes(b"caf\xe9 \xff\xfe").to_os_string();
    let args: Vec<OsString> = ["decode", "--device", "cpu", "--json", "--model"]
        .iter()
        .map(OsString::from)
        .chain([m.clone(), "--prompt".into(), bad.clone()])
        .collect();
    let e = fails(&args);
    assert!(e.contains("--prompt") && e.contains("UTF-8"), "{e}");
    let args: Vec<OsString> = vec!["tokenize".into(), "--model".into(), m.clone(), bad];
    let e = fails(&args);
    assert!(e.contains("UTF-8"), "{e}");

    let file = dir.path().join("latin1.txt");
    std::fs::write(&file, b"The caf\xe9 is open.\n").unwrap();
    let e = fails(&["perplexity", "--model", m.to_str().unwrap(), "--device", "cpu", "--file", file.to_str().unwrap()]);
    assert!(e.contains(file.to_str().unwrap()) && e.contains("UTF-8") && e.contains("offset 7"), "{e}");
    let missing = dir.path().join("no-such.txt");
    let e =
        fails(&["perplexity", "--model", m.to_str().unwrap(), "--device", "cpu", "--file", missing.to_str().unwrap()]);
    assert!(e.contains("no-such.txt"), "{e}");
}

#[test]
fn broken_tokenizer_files_are_named() {
    let dir = tiny_with_tokenizer();
    let m = dir.path().to_str().unwrap();
    let prompt = ["decode", "--model", m, "--device", "cpu", "--json", "--prompt", "hi", "--max-new-tokens", "1"];
    // synth writes a plain tokenizer.json; the compressed form is tried when that is absent.
    let plain = dir.path().join("tokenizer.json");
    std::fs::remove_file(&plain).unwrap();
    let gz = dir.path().join("tokenizer.json.gz");
    let data = std::fs::read(tokenizer_fixture().join("tokenizer.json.gz")).unwrap();

    // Truncated gzip.
    std::fs::write(&gz, &data[..data.len() / 2]).unwrap();
    let e = fails(&prompt);
    assert!(e.contains("tokenizer.json.gz") && e.contains("gzip"), "{e}");
    // Not gzip at all.
    std::fs::write(&gz, b"{\"version\": \"1.0\"}").unwrap();
    let e = fails(&prompt);
    assert!(e.contains("tokenizer.json.gz") && e.contains("gzip"), "{e}");
    std::fs::remove_file(&gz).unwrap();
    // Garbage, truncated and non-UTF-8 JSON.
    for garbage in [&b"not json"[..], b"{\"version\": \"1.0\", \"model\": {", b"\xff\xfe\x00{", b""] {
        std::fs::write(&plain, garbage).unwrap();
        let e = fails(&prompt);
        assert!(e.contains("tokenizer.json") && e.contains("cannot load tokenizer"), "{garbage:?}: {e}");
    }
    // A broken tokenizer_config.json is named too, and a chat template that does not parse is
    // one line.
    std::fs::write(&gz, &data).unwrap();
    std::fs::remove_file(&plain).unwrap();
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(&config, "{\"eos_token\": ").unwrap();
    let e = fails(&prompt);
    assert!(e.contains("tokenizer_config.json") && e.contains("JSON"), "{e}");
    std::fs::write(&config, r#"{"chat_template": "{% for m in messages %}{{ m.content"}"#).unwrap();
    let chat: Vec<&str> = prompt.iter().copied().chain(["--chat"]).collect();
    let e = fails(&chat);
    assert!(e.contains("chat template"), "{e}");
}

#[test]
fn broken_config_and_weights_are_named() {
    let dir = tiny();
    let m = dir.path().to_str().unwrap();
    let args = ["decode", "--model", m, "--device", "cpu", "--json", "--prompt-ids", "1", "--max-new-tokens", "1"];
    let config = dir.path().join("config.json");
    let good = std::fs::read_to_string(&config).unwrap();
    for (text, expect) in [
        ("", "not valid JSON"),
        ("{\"model_type\": \"qwen3\"", "not valid JSON"),
        ("[]", "JSON object"),
        ("{\"model_type\": \"qwen3\"}", "vocab_size"),
    ] {
        std::fs::write(&config, text).unwrap();
        let e = fails(&args);
        assert!(e.contains("config.json") && e.contains(expect), "{text:?}: {e}");
    }
    std::fs::write(&config, b"{\"model_type\": \"qwen3\xff\"}").unwrap();
    let e = fails(&args);
    assert!(e.contains("config.json") && e.contains("UTF-8"), "{e}");
    // A config that lies about the layer count fails at once instead of listing 10^18 tensors.
    std::fs::write(&config, good.replace("\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1000000000000000000"))
        .unwrap();
    let e = fails(&args);
    assert!(e.contains("num_hidden_layers") && e.contains("1000000000000000000"), "{e}");
    std::fs::write(&config, &good).unwrap();
    // An empty weights file.
    std::fs::write(dir.path().join("model.safetensors"), b"").unwrap();
    let e = fails(&args);
    assert!(e.contains("model.safetensors") && e.contains("too short"), "{e}");
}

#[test]
fn bad_bench_sampling_is_refused_before_anything_loads() {
    for (bad, says) in [
        ("fast", "greedy, default or T,K,P"),
        ("0.6,20", "greedy, default or T,K,P"),
        ("hot,20,0.9", "bad temperature"),
        ("0.6,-1,0.9", "bad top-k"),
        ("0.6,20,1.5", "top-p must be in (0, 1]"),
        ("-1,20,0.9", "temperature must be >= 0"),
    ] {
        // No --model: the checkpoint would be looked up only after the flags are checked.
        let e = fails(&["bench", "--synthetic", "--sampling", "greedy", "--sampling", bad]);
        assert!(e.contains(says) && e.contains(bad), "--sampling {bad}: {e}");
    }
}

#[test]
fn bad_bench_prefill_lengths_are_refused_before_the_gpu_is_opened() {
    // Lengths below 2 are refused before the checkpoint is looked up (it does not exist here).
    for lengths in ["1", "128,1", "0"] {
        let e = fails(&["bench", "--model", "/nonexistent/model", "--prefill", lengths]);
        assert!(e.contains("--prefill") && e.contains("at least 2 tokens"), "--prefill {lengths}: {e}");
    }
    // A prompt (and its first new token) beyond the model's positions: refused once the
    // config is known, before the GPU is opened (so the same on machines without one).
    let dir = tiny();
    let m = dir.path().to_str().unwrap();
    let e = fails(&["bench", "--model", m, "--prefill", "128,40960"]);
    assert!(e.contains("--prefill 40960") && e.contains("40960 positions"), "{e}");
    // The decode table's flags do not mix with --prefill, and --prefill-chunk needs it.
    for extra in
        [&["--prefill", "128", "--positions", "5"][..], &["--prefill", "128", "--compare"], &["--prefill-chunk", "64"]]
    {
        let out = host(&[&["bench", "--model", m][..], extra].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "bench {extra:?}: {stderr}");
        assert!(stderr.contains("--prefill"), "bench {extra:?}: {stderr}");
    }
}

#[test]
fn bench_stream_with_only_samplings_it_cannot_draw_is_refused_before_the_gpu_is_opened() {
    // The streaming step draws greedy, temperature alone and top-k up to 32: asking to time it
    // with top-p alone or top-k 64 only is refused once the sampling is known, before the GPU
    // is opened; and --stream with --no-stream is a usage error.
    let dir = tiny();
    let m = dir.path().to_str().unwrap();
    let e = fails(&["bench", "--model", m, "--stream", "--sampling", "0.7,0,0.9", "--sampling", "0.7,64,1"]);
    assert!(e.contains("--stream") && e.contains("top-k 1 to 32"), "{e}");
    let out = host(&["bench", "--model", m, "--stream", "--no-stream"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}
