//! `host perplexity`: teacher-forced mean NLL of a text.

use super::{max_context, model_dir, open_backend, parse_ids, Device};
use anyhow::{anyhow, bail, Context};
use host::backend::check_request;
use host::model::tokenizer::Tokenizer;
use host::model::Qwen3Config;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
#[command(group = clap::ArgGroup::new("input").required(true).args(["file", "ids"]))]
pub struct PerplexityArgs {
    /// Checkpoint folder; default: Qwen3-0.6B in the HF cache.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Text file to score (needs the checkpoint's tokenizer).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Token ids to score, e.g. 1,2,3.
    #[arg(long)]
    ids: Option<String>,
    /// Where to run.
    #[arg(long, value_enum, default_value_t = Device::Gpu)]
    device: Device,
    /// KV-cache size; longer texts are cut to this many tokens [default: 4096, or the model's
    /// max_position_embeddings where that is smaller].
    #[arg(long)]
    max_context: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// GPU only: score the text through the chunked prefill (every position through matrix
    /// products on the tensor cores, then per chunk the final norm, the LM head as a matrix
    /// product and the NLL), N positions per chunk; 0 = off, one megakernel step per position
    /// [default: 4096 on the GPU; --device cpu has no prefill and refuses N > 0].
    #[arg(long, value_name = "N")]
    prefill_chunk: Option<usize>,
}

pub fn run(args: PerplexityArgs) -> anyhow::Result<()> {
    let dir = model_dir(&args.model)?;
    let config = Qwen3Config::from_file(&dir.join("config.json"))?;
    let mut tokens = if let Some(ids) = &args.ids {
        parse_ids(ids).context("--ids")?
    } else if let Some(path) = &args.file {
        let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            anyhow!(
                "{} is not UTF-8 text (invalid byte at offset {}); convert it to UTF-8 first",
                path.display(),
                e.utf8_error().valid_up_to()
            )
        })?;
        Tokenizer::from_dir(&dir)?.encode(&text)?
    } else {
        unreachable!("clap requires --file or --ids")
    };
    let max_context = max_context(args.max_context, 2, &config)?;
    if tokens.len() > max_context {
        eprintln!("note: scoring only the first {max_context} of {} tokens (--max-context)", tokens.len());
        tokens.truncate(max_context);
    }
    if tokens.len() < 2 {
        bail!("at least 2 tokens are needed to score anything (got {})", tokens.len());
    }
    // Checked here as well as by the backend, so that a bad request fails before the
    // checkpoint is loaded.
    check_request("text", &tokens, 0, config.vocab_size, max_context)?;
    let mut backend = open_backend(&dir, args.device, max_context, args.prefill_chunk, false)?;
    let nll = backend.score(&tokens)?;
    let mean = nll.iter().map(|&v| v as f64).sum::<f64>() / nll.len() as f64;
    let ppl = mean.exp();
    if args.json {
        let report = serde_json::json!({
            "device": backend.name(),
            "tokens": tokens.len(),
            "scored_tokens": nll.len(),
            "mean_nll": mean,
            "perplexity": ppl,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{} tokens scored on {}: mean NLL {mean:.4} nats, perplexity {ppl:.3}", nll.len(), backend.name());
    }
    Ok(())
}
