//! `host decode`: prompt in, streamed text out (or one JSON object with timings).

use super::{max_context, model_dir, open_backend, parse_ids, utf8_arg, Device};
use anyhow::{bail, Context};
use host::backend::{check_request, SamplingParams, StopReason};
use host::engine::MAX_EOS;
use host::model::config::GenerationConfig;
use host::model::tokenizer::{ChatMessage, Tokenizer};
use host::model::Qwen3Config;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct DecodeArgs {
    /// Checkpoint folder; default: Qwen3-0.6B in the HF cache.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt text (needs the checkpoint's tokenizer).
    #[arg(long, conflicts_with = "prompt_ids")]
    prompt: Option<OsString>,
    /// Prompt as token ids, e.g. 1,2,3 (works without a tokenizer, with --json).
    #[arg(long)]
    prompt_ids: Option<String>,
    /// Wrap --prompt in the chat template as one user turn.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// With --chat: ask Qwen3 to skip its <think> block.
    #[arg(long, requires = "chat")]
    no_thinking: bool,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// KV-cache size: prompt + new tokens must fit [default: 4096, or the model's
    /// max_position_embeddings where that is smaller].
    #[arg(long)]
    max_context: Option<usize>,
    /// Sampling temperature; 0 = greedy [default: generation_config.json's, greedy without one].
    #[arg(long)]
    temperature: Option<f32>,
    /// Keep only the K most likely tokens (0 = off) [default: generation_config.json's].
    #[arg(long)]
    top_k: Option<u32>,
    /// Nucleus sampling threshold in (0, 1] (1 = off) [default: generation_config.json's].
    #[arg(long)]
    top_p: Option<f32>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Gpu)]
    device: Device,
    /// Print one JSON object (tokens, text, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// GPU only: the prompt (all but its last token) goes through the chunked prefill (matrix
    /// products on the tensor cores), N positions per chunk, before the megakernel starts at
    /// its last token; 0 = off, every prompt token through the megakernel one per step
    /// [default: 4096 on the GPU; --device cpu has no prefill and refuses N > 0].
    #[arg(long, value_name = "N")]
    prefill_chunk: Option<usize>,
    /// GPU only: generate with the megakernel (kernel/src/decode.rs) even where the streaming
    /// step (kernel/src/stream.rs) could: an sm_90+ GPU, Qwen3-0.6B's shape, and greedy,
    /// temperature alone or top-k up to 32 (top-p without top-k is the megakernel's anyway).
    #[arg(long)]
    megakernel: bool,
}

/// Sampling: the checkpoint's defaults, each overridden by its flag.
fn sampling_params(args: &DecodeArgs, defaults: &GenerationConfig) -> anyhow::Result<SamplingParams> {
    let mut p = defaults.sampling(args.seed);
    let sampling_flag = args.temperature.is_some() || args.top_k.is_some() || args.top_p.is_some();
    if sampling_flag && p.is_greedy() {
        // Asking for top-k/top-p on a greedy default means sampling at the usual temperature.
        p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: args.seed };
    }
    if let Some(t) = args.temperature {
        if !(t >= 0.0 && t.is_finite()) {
            bail!("--temperature must be >= 0, got {t}");
        }
        p.temperature = t;
    }
    if let Some(k) = args.top_k {
        p.top_k = k;
    }
    if let Some(top_p) = args.top_p {
        if !(top_p > 0.0 && top_p <= 1.0) {
            bail!("--top-p must be in (0, 1], got {top_p}");
        }
        p.top_p = top_p;
    }
    Ok(p)
}

pub fn run(args: DecodeArgs) -> anyhow::Result<()> {
    let dir = model_dir(&args.model)?;
    let config = Qwen3Config::from_file(&dir.join("config.json"))?;
    let tokenizer = if Tokenizer::exists_in(&dir) { Some(Tokenizer::from_dir(&dir)?) } else { None };
    if tokenizer.is_none() && !args.json {
        bail!("{} has no tokenizer.json, so text cannot be shown: use --prompt-ids with --json", dir.display());
    }

    let prompt: Vec<u32> = match (&args.prompt, &args.prompt_ids) {
        (_, Some(ids)) => parse_ids(ids).context("--prompt-ids")?,
        (Some(text), None) => {
            let tok = tokenizer.as_ref().ok_or_else(|| {
                anyhow::anyhow!(
                    "{} has no tokenizer.json, so --prompt cannot be used: give --prompt-ids",
                    dir.display()
                )
            })?;
            let text = utf8_arg("--prompt", text)?;
            let text = if args.chat {
                tok.apply_chat_template(&[ChatMessage::new("user", text)], true, !args.no_thinking)?
            } else {
                text.to_string()
            };
            tok.encode(&text)?
        }
        (None, None) => bail!("give a prompt: --prompt TEXT or --prompt-ids 1,2,3"),
    };
    let max_context = max_context(args.max_context, 1, &config)?;
    // Checked here as well as by the backend, so that a bad request fails before the
    // checkpoint is loaded; the same check, so the same message.
    check_request("prompt", &prompt, args.max_new_tokens, config.vocab_size, max_context)?;
    let gen_config = GenerationConfig::from_model_dir(&dir)?;
    let sampling = sampling_params(&args, &gen_config)?;
    let eos = eos_ids(&dir, &config, &gen_config, tokenizer.as_ref(), args.device)?;

    let mut backend = open_backend(&dir, args.device, max_context, args.prefill_chunk, !args.megakernel)?;

    // Ctrl-C finishes the current token, then stops and prints what there is.
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let flag = Arc::clone(&interrupted);
        // Failing to install the handler (e.g. one already set) only loses the graceful stop.
        let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    }

    let mut stream = tokenizer.as_ref().map(|t| t.stream(true));
    let mut stdout = std::io::stdout().lock();
    let mut stream_error: Option<anyhow::Error> = None;
    let start = Instant::now();
    let mut token_times: Vec<Instant> = Vec::new();
    let generation = {
        let mut on_token = |id: u32| -> bool {
            token_times.push(Instant::now());
            if !args.json {
                if let Some(s) = stream.as_mut() {
                    match s.push(id) {
                        Ok(piece) => {
                            let _ = write!(stdout, "{piece}");
                            let _ = stdout.flush();
                        }
                        Err(e) => {
                            stream_error = Some(e);
                            return false;
                        }
                    }
                }
            }
            !interrupted.load(Ordering::SeqCst)
        };
        backend.decode(&prompt, args.max_new_tokens, &sampling, &eos, &mut on_token)?
    };
    let end = Instant::now();
    if let Some(e) = stream_error {
        return Err(e.context("cannot decode the generated tokens"));
    }

    // Time to the first token is prefill (plus one sample); the rest is steady decode.
    let prefill_s = token_times.first().map_or(0.0, |t| (*t - start).as_secs_f64());
    let decode_s = match (token_times.first(), token_times.last()) {
        (Some(a), Some(b)) => (*b - *a).as_secs_f64(),
        _ => 0.0,
    };
    // A rate needs two tokens at least: the first one's time is prefill.
    let decode_steps = generation.tokens.len().saturating_sub(1);
    let tokens_per_s = (decode_steps > 0 && decode_s > 0.0).then(|| decode_steps as f64 / decode_s);
    let stop_reason = match generation.stop {
        // The only cancel `on_token` asks for here is Ctrl-C's.
        StopReason::Cancelled => "interrupted",
        other => other.as_str(),
    };
    let tokens = generation.tokens;

    if args.json {
        let text = match &tokenizer {
            Some(t) => Some(t.decode_with(&tokens, false)?),
            None => None,
        };
        let report = serde_json::json!({
            "device": backend.name(),
            "kernel": backend.decode_kernel(&sampling),
            "prompt_tokens": prompt.len(),
            "tokens": tokens,
            "generated_tokens": tokens.len(),
            "text": text,
            "stop_reason": stop_reason,
            "sampling": {
                "temperature": sampling.temperature,
                "top_k": sampling.top_k,
                "top_p": sampling.top_p,
                "seed": sampling.seed,
            },
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "total_s": (end - start).as_secs_f64(),
            "tokens_per_s": tokens_per_s,
        });
        writeln!(stdout, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        if let Some(s) = stream.as_mut() {
            write!(stdout, "{}", s.finish()?)?;
        }
        writeln!(stdout)?;
        stdout.flush()?;
        let rate = tokens_per_s.map(|r| format!(", decode {r:.1} tokens/s")).unwrap_or_default();
        let count = if tokens.len() == 1 { "1 token".to_string() } else { format!("{} tokens", tokens.len()) };
        let on = format!("{} ({})", backend.name(), backend.decode_kernel(&sampling));
        eprintln!("[{count}, {stop_reason}; prefill {prefill_s:.3} s{rate} on {on}]");
    }
    Ok(())
}

/// The end-of-sequence ids to stop at: every one the checkpoint names, in generation_config.json,
/// config.json or tokenizer_config.json. The GPU kernel compares each token with at most
/// [`MAX_EOS`] of them, so a longer list is refused there (naming where the ids come from)
/// rather than cut short.
fn eos_ids(
    dir: &Path,
    config: &Qwen3Config,
    gen_config: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    device: Device,
) -> anyhow::Result<Vec<u32>> {
    let sources = [
        ("generation_config.json", gen_config.eos_token_ids.as_slice()),
        ("config.json", config.eos_token_ids.as_slice()),
        ("tokenizer_config.json", tokenizer.map_or(&[][..], |t| t.eos_ids())),
    ];
    let mut eos: Vec<u32> = sources.iter().flat_map(|(_, ids)| ids.iter().copied()).collect();
    eos.sort_unstable();
    eos.dedup();
    if device == Device::Gpu && eos.len() > MAX_EOS {
        let named: Vec<String> = sources
            .iter()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(file, ids)| format!("{} lists {} ({ids:?})", dir.join(file).display(), ids.len()))
            .collect();
        bail!(
            "the checkpoint names {} distinct end-of-sequence ids ({}), but the GPU kernel stops at up to \
             {MAX_EOS}; shorten the list or use --device cpu",
            eos.len(),
            named.join("; ")
        );
    }
    Ok(eos)
}
