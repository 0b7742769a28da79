//! The real Qwen3 tokenizer (compressed fixture): round trips, special tokens, the chat template,
//! and streaming decode that never emits a broken character.

use host::model::tokenizer::{ChatMessage, Tokenizer};
use std::path::PathBuf;

fn tokenizer() -> Tokenizer {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/qwen3-tokenizer");
    Tokenizer::from_dir(&dir).unwrap()
}

const TEXTS: &[&str] = &[
    "Hello, world!",
    "你好，世界！",
    "Emoji 😀🎉 and a family 👨‍👩‍👧‍👦",
    "  spaces\t\ttabs\n\nnewlines  ",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "<|im_start|>user\nhi<|im_end|>",
];

#[test]
fn encode_decode_round_trips() {
    let t = tokenizer();
    for text in TEXTS {
        let ids = t.encode(text).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(&t.decode(&ids).unwrap(), text, "ids {ids:?}");
    }
    assert!(t.encode("").unwrap().is_empty());
}

#[test]
fn special_tokens_are_single_ids() {
    let t = tokenizer();
    assert_eq!(t.encode("<|im_start|>").unwrap(), vec![151644]);
    assert_eq!(t.encode("<|im_end|>").unwrap(), vec![151645]);
    assert_eq!(t.encode("<|endoftext|>").unwrap(), vec![151643]);
    assert_eq!(t.eos_ids(), &[151645]);
    assert_eq!(t.vocab_size(), 151669);
    // No BOS is prepended.
    assert_eq!(t.encode("Hello").unwrap().len(), 1);
}

#[test]
fn chat_template_renders_like_qwen3() {
    let t = tokenizer();
    assert!(t.has_chat_template());
    let msgs = [ChatMessage::new("user", "Hi")];
    assert_eq!(
        t.apply_chat_template(&msgs, true, true).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(
        t.apply_chat_template(&msgs, true, false).unwrap(),
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    );
    // A past assistant turn loses its reasoning; string methods (.split, .lstrip) must work.
    let turns = [
        ChatMessage::new("system", "S"),
        ChatMessage::new("user", "Q1"),
        ChatMessage::new("assistant", "<think>\nr\n</think>\n\nA1"),
        ChatMessage::new("user", "Q2"),
    ];
    assert_eq!(
        t.apply_chat_template(&turns, false, true).unwrap(),
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
    );
}

/// Feeds ids one at a time; returns the pieces.
fn stream_pieces(t: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut s = t.stream(false);
    let mut pieces: Vec<String> = ids.iter().map(|&id| s.push(id).unwrap()).collect();
    pieces.push(s.finish().unwrap());
    pieces
}

#[test]
fn stream_decoder_never_splits_a_character() {
    let t = tokenizer();
    for text in ["😀🎉👨‍👩‍👧‍👦 ok", "日本語のテキスト", "a🇯🇵b", "plain ascii text"] {
        let ids = t.encode(text).unwrap();
        let pieces = stream_pieces(&t, &ids);
        for p in &pieces {
            assert!(!p.contains('\u{FFFD}'), "broken character in piece {p:?} of {text:?}");
        }
        assert_eq!(pieces.concat(), text);
    }
}

#[test]
fn emoji_really_spans_several_tokens() {
    // Guards the test above: at least one token of the emoji text decodes to an incomplete
    // character on its own, so the stream decoder had something to hold back.
    let t = tokenizer();
    let ids = t.encode("😀🎉👨‍👩‍👧‍👦").unwrap();
    assert!(ids.iter().any(|&id| t.decode(&[id]).unwrap().contains('\u{FFFD}')), "{ids:?}");
}

#[test]
fn stream_decoder_flushes_an_unfinished_tail() {
    let t = tokenizer();
    let ids = t.encode("ok 😀").unwrap();
    // Stop in the middle of the emoji: finish() still returns what is left (as U+FFFD).
    let cut = &ids[..ids.len() - 1];
    let pieces = stream_pieces(&t, cut);
    assert!(pieces.concat().starts_with("ok"));
    assert_eq!(pieces.concat(), t.decode(cut).unwrap());
}

#[test]
fn stream_decoder_can_skip_special_tokens() {
    let t = tokenizer();
    let ids = t.encode("Hi<|im_end|>").unwrap();
    let mut s = t.stream(true);
    let text: String = ids.iter().map(|&id| s.push(id).unwrap()).collect::<String>() + &s.finish().unwrap();
    assert_eq!(text, "Hi");
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).err().expect("no tokenizer there");
    assert!(format!("{err:#}").contains("tokenizer.json"));
}
