//! The checkpoint's tokenizer (`tokenizer.json`, optionally gzip-compressed) and chat template
//! (`tokenizer_config.json`'s `chat_template`, or `chat_template.jinja`), rendered the way HF
//! transformers renders it.

use anyhow::{anyhow, bail, Context};
use serde::Serialize;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};

/// One chat turn, as passed to the chat template.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage { role: role.to_string(), content: content.to_string() }
    }
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    /// Named special tokens from tokenizer_config.json (`eos_token`, `pad_token`, ...), which HF
    /// also hands to the template.
    special: serde_json::Map<String, Value>,
    eos_ids: Vec<u32>,
}

/// `tokenizer.json` or `tokenizer.json.gz` in `dir`, if either exists.
fn tokenizer_file(dir: &Path) -> Option<PathBuf> {
    ["tokenizer.json", "tokenizer.json.gz"].iter().map(|n| dir.join(n)).find(|p| p.is_file())
}

impl Tokenizer {
    /// Whether `dir` has a tokenizer at all (checkpoints made by `host synth` may not).
    pub fn exists_in(dir: &Path) -> bool {
        tokenizer_file(dir).is_some()
    }

    /// Loads the tokenizer and chat template of a checkpoint (or tokenizer) folder.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Tokenizer> {
        let path = tokenizer_file(dir).ok_or_else(|| {
            anyhow!("{}: no tokenizer.json (or tokenizer.json.gz); use --prompt-ids and --json instead", dir.display())
        })?;
        let mut bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        if path.extension().is_some_and(|e| e == "gz") {
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&bytes[..])
                .read_to_end(&mut plain)
                .with_context(|| format!("{}: not a valid gzip file", path.display()))?;
            bytes = plain;
        }
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;

        let config_path = dir.join("tokenizer_config.json");
        let config: serde_json::Map<String, Value> = if config_path.is_file() {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("cannot read {}", config_path.display()))?;
            match serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", config_path.display()))? {
                Value::Object(map) => map,
                _ => bail!("{}: not a JSON object", config_path.display()),
            }
        } else {
            Default::default()
        };
        let jinja_path = dir.join("chat_template.jinja");
        let chat_template = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path)
                    .with_context(|| format!("cannot read {}", jinja_path.display()))?,
            )
        } else {
            match config.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // Some checkpoints ship several named templates; "default" is the chat one.
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            }
        };
        let mut special = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            // Either a plain string or an AddedToken object with a `content` field.
            let value = match config.get(key) {
                Some(Value::String(s)) => Value::String(s.clone()),
                Some(Value::Object(o)) => o.get("content").cloned().unwrap_or(Value::Null),
                _ => Value::Null,
            };
            special.insert(key.to_string(), value);
        }
        let eos_ids =
            special.get("eos_token").and_then(Value::as_str).and_then(|t| inner.token_to_id(t)).into_iter().collect();
        Ok(Tokenizer { inner, chat_template, special, eos_ids })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) become their ids;
    /// no BOS is added (Qwen3 has none).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("cannot tokenize: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> anyhow::Result<String> {
        self.decode_with(ids, false)
    }

    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> anyhow::Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| anyhow!("cannot decode token ids: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The end-of-sequence id(s) tokenizer_config.json names (`<|im_end|>` for Qwen3).
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Renders the chat template as transformers' `apply_chat_template(..., tokenize=False)`
    /// does: Jinja with `trim_blocks` and `lstrip_blocks`, Python string methods available, and
    /// the special tokens as variables. `enable_thinking = false` asks Qwen3 for an empty think
    /// block.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        enable_thinking: bool,
    ) -> anyhow::Result<String> {
        let template = self.chat_template.as_deref().ok_or_else(|| {
            anyhow!("this tokenizer has no chat template (tokenizer_config.json has no chat_template)")
        })?;
        render_chat_template(template, messages, add_generation_prompt, enable_thinking, &self.special)
    }

    /// A streaming decoder over this tokenizer.
    pub fn stream(&self, skip_special: bool) -> StreamDecoder<'_> {
        StreamDecoder { tokenizer: self, skip_special, ids: Vec::new(), prefix: 0, read: 0 }
    }
}

/// Renders a chat template (HF semantics); see [`Tokenizer::apply_chat_template`].
fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    enable_thinking: bool,
    special: &serde_json::Map<String, Value>,
) -> anyhow::Result<String> {
    let mut env = minijinja::Environment::new();
    // transformers builds its Jinja environment with these two; without them the template's
    // block tags leave newlines and indentation in the prompt.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    // Templates call raise_exception() to refuse malformed conversations.
    env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template).map_err(|e| anyhow!("chat template does not parse: {e}"))?;
    let mut ctx = special.clone();
    ctx.insert("messages".into(), serde_json::to_value(messages)?);
    ctx.insert("add_generation_prompt".into(), Value::Bool(add_generation_prompt));
    ctx.insert("enable_thinking".into(), Value::Bool(enable_thinking));
    let tmpl = env.get_template("chat").expect("just added");
    tmpl.render(minijinja::Value::from_serialize(&ctx)).map_err(|e| anyhow!("chat template failed to render: {e}"))
}

/// Turns a stream of token ids into text pieces that are always complete UTF-8.
///
/// Byte-level BPE splits multi-byte characters (emoji, CJK) across tokens, so decoding one token
/// at a time would print replacement characters. Instead the decoder keeps the ids of the
/// current unfinished piece and emits the difference between the decoded text with and without
/// the newest ids only once that text no longer ends in an incomplete character.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    /// Start of the ids decoded as context for the next piece.
    prefix: usize,
    /// End of the ids whose text has been emitted.
    read: usize,
}

/// How many undecodable ids to hold back before giving up and emitting replacement characters
/// (a UTF-8 character is at most 4 bytes, so a longer wait means the bytes are really invalid).
const MAX_PENDING: usize = 8;

impl StreamDecoder<'_> {
    /// Feeds one id; returns the text that became complete (often empty).
    pub fn push(&mut self, id: u32) -> anyhow::Result<String> {
        self.ids.push(id);
        let before = self.tokenizer.decode_with(&self.ids[self.prefix..self.read], self.skip_special)?;
        let after = self.tokenizer.decode_with(&self.ids[self.prefix..], self.skip_special)?;
        let incomplete = after.ends_with('\u{FFFD}') && self.ids.len() - self.read < MAX_PENDING;
        if incomplete || after.len() <= before.len() || !after.starts_with(&before) {
            // Nothing new, or the newest bytes do not yet finish a character. (Text that does not
            // extend the earlier text cannot happen with byte-level BPE; holding back is safe.)
            if after.len() <= before.len() && !incomplete && after.starts_with(&before) {
                // The id decoded to nothing visible (e.g. a skipped special token): move on.
                self.prefix = self.read;
                self.read = self.ids.len();
            }
            return Ok(String::new());
        }
        let piece = after[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(piece)
    }

    /// Text not yet emitted (an incomplete character at the end comes out as U+FFFD).
    pub fn finish(&mut self) -> anyhow::Result<String> {
        let before = self.tokenizer.decode_with(&self.ids[self.prefix..self.read], self.skip_special)?;
        let after = self.tokenizer.decode_with(&self.ids[self.prefix..], self.skip_special)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(after.get(before.len()..).unwrap_or_default().to_string())
    }
}
