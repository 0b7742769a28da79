//! `host`: the command-line front end (decode, perplexity, tokenize, synth, bench, sync-bench).

mod cli;

fn main() {
    if let Err(e) = cli::run() {
        // `{:#}` prints the whole cause chain on one line: "cannot open X: No such file".
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
