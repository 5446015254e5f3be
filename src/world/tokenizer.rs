//! The world model's tokenizer: ASCII words (letters, digits, apostrophes)
//! are tokens; every other non-whitespace character is a token of its own.

use super::vocab::Vocab;

/// Splits `text` into tokens, in order, as slices of `text`.
///
/// Non-ASCII letters are not word characters, so each is a token of its own:
///
/// ```
/// use tofy::world::tokenize;
/// assert_eq!(tokenize("Hi, it's 5pm!"), ["Hi", ",", "it's", "5pm", "!"]);
/// assert_eq!(tokenize("café\tau lait"), ["caf", "é", "au", "lait"]);
/// ```
pub fn tokenize(text: &str) -> Vec<&str> {
    let mut tokens = Vec::new();
    let mut word_start = None;
    for (i, c) in text.char_indices() {
        if c.is_ascii_alphanumeric() || c == '\'' {
            word_start.get_or_insert(i);
            continue;
        }
        if let Some(start) = word_start.take() {
            tokens.push(&text[start..i]);
        }
        if !c.is_whitespace() {
            tokens.push(&text[i..i + c.len_utf8()]);
        }
    }
    if let Some(start) = word_start {
        tokens.push(&text[start..]);
    }
    tokens
}

/// A prompt turned into ids for the forward pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Vocabulary ids of the first `max_seq` tokens (never empty).
    pub ids: Vec<u32>,
    /// Tokens in the prompt before truncation.
    pub total_tokens: usize,
}

impl Encoded {
    /// Whether the prompt was cut to fit max_seq.
    pub fn truncated(&self) -> bool {
        self.total_tokens > self.ids.len()
    }
}

/// Tokenizes `text` and maps it to ids, keeping the first `max_seq`.
/// Returns `None` when the text has no tokens at all.
pub fn encode(vocab: &Vocab, text: &str, max_seq: usize) -> Option<Encoded> {
    let tokens = tokenize(text);
    if tokens.is_empty() {
        return None;
    }
    let ids = tokens.iter().take(max_seq).map(|t| vocab.id(t)).collect();
    Some(Encoded {
        ids,
        total_tokens: tokens.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example() {
        assert_eq!(tokenize("Hi, it's 5pm!"), ["Hi", ",", "it's", "5pm", "!"]);
    }

    #[test]
    fn punctuation_apostrophes_digits() {
        assert_eq!(
            tokenize("don't--stop...2024'"),
            ["don't", "-", "-", "stop", ".", ".", ".", "2024'"]
        );
        assert_eq!(
            tokenize("'quoted' (x+y)=3"),
            ["'quoted'", "(", "x", "+", "y", ")", "=", "3"]
        );
    }

    #[test]
    fn non_ascii_letters_are_tokens_of_their_own() {
        assert_eq!(tokenize("café über"), ["caf", "é", "ü", "ber"]);
        assert_eq!(tokenize("日本語"), ["日", "本", "語"]);
        assert_eq!(tokenize("naïve🙂ok"), ["na", "ï", "ve", "🙂", "ok"]);
    }

    #[test]
    fn whitespace_of_every_kind_separates() {
        assert_eq!(
            tokenize("a\tb\nc\r\nd\u{00A0}e\u{2003}f  g"),
            ["a", "b", "c", "d", "e", "f", "g"]
        );
        assert!(tokenize("").is_empty());
        assert!(tokenize(" \t\n\r\u{3000} ").is_empty());
    }

    #[test]
    fn case_is_kept() {
        let vocab = Vocab::from_tokens(["Hello", "hello"]);
        let e = encode(&vocab, "Hello hello HELLO", 8).unwrap();
        assert_eq!(e.ids, [3, 4, 1]);
    }

    #[test]
    fn truncates_to_max_seq_and_counts_all_tokens() {
        let vocab = Vocab::from_tokens(["a"]);
        let e = encode(&vocab, "a b a b a", 3).unwrap();
        assert_eq!(e.ids, [3, 1, 3]);
        assert_eq!(e.total_tokens, 5);
        assert!(e.truncated());
        assert!(!encode(&vocab, "a", 3).unwrap().truncated());
    }

    #[test]
    fn empty_and_whitespace_prompts_encode_to_nothing() {
        let vocab = Vocab::from_tokens(["a"]);
        assert_eq!(encode(&vocab, "", 8), None);
        assert_eq!(encode(&vocab, " \n\t ", 8), None);
    }
}
