//! The world model's vocabulary (`vocab_world.txt`): one token per line,
//! ids in order of first appearance, with `<pad>`, `<unk>` and `<mask>`
//! always holding ids 0, 1 and 2.

use std::collections::HashMap;
use std::path::Path;

use super::error::{Result, WorldError};

/// Padding token; fills every prompt up to max_seq.
pub const PAD: &str = "<pad>";
/// Stands in for any token the vocabulary lacks.
pub const UNK: &str = "<unk>";
/// Reserved for masked-prediction training.
pub const MASK: &str = "<mask>";

/// Id of [`PAD`].
pub const PAD_ID: u32 = 0;
/// Id of [`UNK`].
pub const UNK_ID: u32 = 1;

/// Token strings and their ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vocab {
    tokens: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Vocab {
    /// Reads a vocab file. Lines end in `\n` or `\r\n`; empty lines are
    /// skipped; a token seen twice keeps its first id.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| WorldError::io(path, e))?;
        Self::parse(path, &bytes)
    }

    /// Parses the bytes of a vocab file; `path` names it in errors.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let mut lines = Vec::new();
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let line = std::str::from_utf8(line).map_err(|_| WorldError::VocabEncoding {
                path: path.to_path_buf(),
                line: i + 1,
            })?;
            lines.push(line);
        }
        if lines.iter().all(|l| l.is_empty()) {
            return Err(WorldError::EmptyVocab {
                path: path.to_path_buf(),
            });
        }
        Ok(Self::from_tokens(lines))
    }

    /// Builds a vocab from tokens in file order, applying the same rules as
    /// [`Vocab::load`] (reserved ids first, empties skipped, duplicates ignored).
    pub fn from_tokens<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Self {
        let mut vocab = Self {
            tokens: Vec::new(),
            ids: HashMap::new(),
        };
        for token in [PAD, UNK, MASK].into_iter().chain(tokens) {
            if !token.is_empty() && !vocab.ids.contains_key(token) {
                vocab
                    .ids
                    .insert(token.to_string(), vocab.tokens.len() as u32);
                vocab.tokens.push(token.to_string());
            }
        }
        vocab
    }

    /// Number of ids, reserved ones included.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Always false: the reserved tokens are always present.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The id of `token`, or [`UNK_ID`].
    pub fn id(&self, token: &str) -> u32 {
        self.ids.get(token).copied().unwrap_or(UNK_ID)
    }

    /// The token string of `id`, if in range.
    pub fn token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// All tokens in id order, as written to `vocab_world.txt`.
    pub fn tokens(&self) -> &[String] {
        &self.tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_bytes(bytes: &[u8]) -> Result<Vocab> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vocab_world.txt");
        std::fs::write(&path, bytes).unwrap();
        Vocab::load(&path)
    }

    #[test]
    fn reserved_first_duplicates_and_empty_lines_skipped() {
        let v = load_bytes(b"<pad>\n<unk>\n<mask>\nhello\n\nworld\nhello\r\n,\r\n").unwrap();
        assert_eq!(
            v.tokens(),
            ["<pad>", "<unk>", "<mask>", "hello", "world", ","]
        );
        assert_eq!((v.id("hello"), v.id("world"), v.id(",")), (3, 4, 5));
        assert_eq!(v.id("missing"), UNK_ID);
        assert_eq!(v.token(PAD_ID), Some(PAD));
    }

    #[test]
    fn reserved_even_when_the_file_omits_them() {
        let v = load_bytes(b"hello\nworld\n<unk>\n").unwrap();
        assert_eq!(v.tokens(), ["<pad>", "<unk>", "<mask>", "hello", "world"]);
    }

    #[test]
    fn no_trailing_newline_and_crlf() {
        let v = load_bytes(b"a\r\nb\r\nc").unwrap();
        assert_eq!(v.len(), 6);
        assert_eq!(v.id("c"), 5);
    }

    #[test]
    fn empty_file_is_an_error() {
        for bytes in [&b""[..], b"\n\n\r\n"] {
            let err = load_bytes(bytes).unwrap_err();
            assert!(err.to_string().contains("vocab file is empty"), "{err}");
        }
    }

    #[test]
    fn invalid_utf8_names_the_line() {
        let err = load_bytes(b"ok\n\xff\xfe\n").unwrap_err();
        assert!(
            err.to_string().contains("line 2 is not valid UTF-8"),
            "{err}"
        );
    }
}
