//! What each fuzz target checks, for any input: the target (fuzz/) and the
//! corpus replay in tests (tests/fuzz_corpus.rs) both call these, so an
//! input that once broke something stays a test. Each function panics only
//! when an invariant fails; an error for a bad input is the expected answer.

use std::path::Path;
use std::sync::OnceLock;

use crate::world::{LoadOptions, Vocab, WorldModel, default, encode, tokenize};

/// A chat completions body through every check the handler makes, then the
/// messages-to-prompt path: an error (a 4xx) or a prompt.
pub fn chat_request(body: &[u8]) {
    match crate::server::fuzzing::chat(body) {
        Ok(prompt) => assert!(prompt.ends_with("Assistant:"), "{prompt:?}"),
        Err(err) => assert!(err.status.is_client_error(), "{err}"),
    }
}

/// `prompt_embeds` in either encoding: checked rows within the context, or
/// a 400.
pub fn prompt_embeds(body: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) else {
        return;
    };
    match crate::server::fuzzing::embeddings(&value) {
        Ok(rows) => assert!((1..4096).contains(&rows), "{rows} rows"),
        Err(err) => assert_eq!(err.status.as_u16(), 400, "{err}"),
    }
}

/// The world tokenizer on any text: non-empty pieces of the text, in
/// order, and an encoding within `max_seq`.
pub fn world_tokenizer(data: &[u8]) {
    static VOCAB: OnceLock<Vocab> = OnceLock::new();
    let vocab = VOCAB.get_or_init(|| {
        Vocab::parse(Path::new(default::VOCAB_PATH), default::VOCAB).expect("the embedded vocab")
    });
    let text = String::from_utf8_lossy(data);
    let mut rest = text.as_ref();
    for piece in tokenize(&text) {
        assert!(!piece.is_empty());
        let at = rest
            .find(piece)
            .expect("each piece comes from the text, in order");
        rest = &rest[at + piece.len()..];
    }
    if let Some(encoded) = encode(vocab, &text, 128) {
        assert!((1..=128).contains(&encoded.ids.len()));
    }
}

/// The vocab loader on any bytes: a vocabulary (the reserved tokens
/// first) or an error naming the file.
pub fn vocab(data: &[u8]) {
    match Vocab::parse(Path::new("fuzz_vocab.txt"), data) {
        Ok(vocab) => assert!(vocab.len() >= 3),
        Err(err) => assert!(err.to_string().contains("fuzz_vocab.txt"), "{err}"),
    }
}

/// The safetensors checks on any bytes, as a world checkpoint with the
/// embedded vocab: a model, or an error naming the file.
pub fn checkpoint(data: &[u8]) {
    let options = LoadOptions::default();
    if let Err(err) =
        WorldModel::from_bytes("fuzz.safetensors", data.to_vec(), default::VOCAB, &options)
    {
        assert!(err.to_string().contains("fuzz.safetensors"), "{err}");
    }
}
