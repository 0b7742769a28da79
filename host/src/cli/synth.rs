//! `host synth`: a random-weight checkpoint, Qwen3-0.6B's layout unless sizes are given.

use anyhow::Context;
use host::model::synth::{write_checkpoint, SynthSpec};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// Folder to write config.json, generation_config.json and model.safetensors into.
    #[arg(long)]
    out: PathBuf,
    /// Seed of the random weights (same seed, same checkpoint).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Decoder layers [default: 28].
    #[arg(long)]
    layers: Option<usize>,
    /// Hidden size [default: 1024].
    #[arg(long)]
    hidden: Option<usize>,
    /// MLP intermediate size [default: 3072].
    #[arg(long)]
    intermediate: Option<usize>,
    /// Query heads [default: 16].
    #[arg(long)]
    heads: Option<usize>,
    /// Key/value heads [default: 8].
    #[arg(long)]
    kv_heads: Option<usize>,
    /// Head dimension [default: 128].
    #[arg(long)]
    head_dim: Option<usize>,
    /// Vocabulary size [default: 151936].
    #[arg(long)]
    vocab: Option<usize>,
    /// Separate LM head instead of tied embeddings.
    #[arg(long)]
    untied: bool,
    /// Copy tokenizer.json(.gz) and tokenizer_config.json from this folder.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    let mut spec = SynthSpec::qwen3_0_6b(args.seed);
    let c = &mut spec.config;
    c.num_hidden_layers = args.layers.unwrap_or(c.num_hidden_layers);
    c.hidden_size = args.hidden.unwrap_or(c.hidden_size);
    c.intermediate_size = args.intermediate.unwrap_or(c.intermediate_size);
    c.num_attention_heads = args.heads.unwrap_or(c.num_attention_heads);
    c.num_key_value_heads = args.kv_heads.unwrap_or(c.num_key_value_heads);
    c.head_dim = args.head_dim.unwrap_or(c.head_dim);
    c.vocab_size = args.vocab.unwrap_or(c.vocab_size);
    c.tie_word_embeddings = !args.untied;
    // Special ids only where the vocabulary has them (a small random vocabulary does not).
    if c.vocab_size <= 151645 {
        c.bos_token_id = None;
        c.eos_token_ids.clear();
    }
    spec.tokenizer = args.tokenizer;
    write_checkpoint(&args.out, &spec).with_context(|| format!("cannot write checkpoint to {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
