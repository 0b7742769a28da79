//! `host tokenize`: the ids of a text, comma-separated (ready for `--prompt-ids`).

use host::model::tokenizer::Tokenizer;
use std::ffi::OsString;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    /// Checkpoint (or tokenizer) folder; default: Qwen3-0.6B in the HF cache.
    #[arg(long)]
    model: Option<PathBuf>,
    /// The text to tokenize.
    text: OsString,
}

pub fn run(args: TokenizeArgs) -> anyhow::Result<()> {
    let dir = super::model_dir(&args.model)?;
    let tokenizer = Tokenizer::from_dir(&dir)?;
    let ids = tokenizer.encode(super::utf8_arg("TEXT", &args.text)?)?;
    println!("{}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
    Ok(())
}
