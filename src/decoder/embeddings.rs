//! Embedding rows: vectors that take the place of tokens in a prompt.
//!
//! A row is what the decoder's first layer would otherwise get from its
//! token-embedding table (llama.cpp's `llama_batch.embd`), `width` =
//! the model's `n_embd_inp` floats. [`Embeddings`] is checked once, when it
//! is built: a whole number of rows of the stated width, every value finite.
//! Each row keeps a hash of its bits, so the prompt cache can tell two rows
//! apart cheaply; equal hashes are confirmed bit for bit, so a cached row is
//! reused only for the very same content.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

/// What is wrong with a set of embedding rows (each says what to send).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbeddingsError {
    #[error("embedding rows need a width of at least 1")]
    ZeroWidth,
    #[error("no embedding rows: send at least one row")]
    Empty,
    #[error("{len} values are not a whole number of rows of width {width}")]
    Ragged { len: usize, width: usize },
    #[error(
        "embedding row {row} has a non-finite value (NaN or infinity) or one beyond ±1e6 at column {column}; send finite numbers of token-embedding scale"
    )]
    NotFinite { row: usize, column: usize },
    #[error(
        "embedding rows are {got} wide but this model's input width (n_embd) is {expected}; build rows of {expected} values"
    )]
    Width { got: usize, expected: usize },
}

/// The largest magnitude a row value may have.
pub const MAX_ABS: f32 = 1e6;

/// `n_rows x width` f32 rows, row-major, finite, shared cheaply.
#[derive(Clone)]
pub struct Embeddings {
    data: Arc<[f32]>,
    hashes: Arc<[u64]>,
    width: usize,
}

impl Embeddings {
    /// Checks and wraps `data`, `data.len() / width` rows of `width` values.
    pub fn new(data: Vec<f32>, width: usize) -> Result<Self, EmbeddingsError> {
        if width == 0 {
            return Err(EmbeddingsError::ZeroWidth);
        }
        if data.is_empty() {
            return Err(EmbeddingsError::Empty);
        }
        if !data.len().is_multiple_of(width) {
            return Err(EmbeddingsError::Ragged {
                len: data.len(),
                width,
            });
        }
        // Token embeddings are of order 1; values far beyond that only
        // overflow the first layer's norm into NaN logits.
        if let Some(at) = data
            .iter()
            .position(|v| !v.is_finite() || v.abs() > MAX_ABS)
        {
            return Err(EmbeddingsError::NotFinite {
                row: at / width,
                column: at % width,
            });
        }
        let hashes = data.chunks_exact(width).map(hash_row).collect();
        Ok(Self {
            data: data.into(),
            hashes,
            width,
        })
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn n_rows(&self) -> usize {
        self.hashes.len()
    }

    /// Row `i` (panics past the end, as slices do).
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.width..(i + 1) * self.width]
    }

    /// All rows, row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// An error unless the rows are `expected` wide.
    pub fn check_width(&self, expected: usize) -> Result<(), EmbeddingsError> {
        if self.width == expected {
            Ok(())
        } else {
            Err(EmbeddingsError::Width {
                got: self.width,
                expected,
            })
        }
    }

    /// Whether row `i` of `self` and row `j` of `other` hold the same bits.
    pub fn same_row(&self, i: usize, other: &Self, j: usize) -> bool {
        self.hashes[i] == other.hashes[j]
            && self
                .row(i)
                .iter()
                .zip(other.row(j))
                .all(|(a, b)| a.to_bits() == b.to_bits())
            && self.width == other.width
    }
}

impl std::fmt::Debug for Embeddings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embeddings")
            .field("n_rows", &self.n_rows())
            .field("width", &self.width)
            .finish_non_exhaustive()
    }
}

/// Two sets are equal when every row holds the same bits.
impl PartialEq for Embeddings {
    fn eq(&self, other: &Self) -> bool {
        self.width == other.width
            && self.n_rows() == other.n_rows()
            && (0..self.n_rows()).all(|i| self.same_row(i, other, i))
    }
}

/// The row's bits through SipHash with this process's random keys: a quick
/// reject for rows that differ (equal hashes are then compared bit for bit).
pub(crate) fn hash_row(row: &[f32]) -> u64 {
    static KEYS: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    let mut hasher = KEYS.get_or_init(std::hash::RandomState::new).build_hasher();
    for v in row {
        hasher.write_u32(v.to_bits());
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_checked_once() {
        assert_eq!(
            Embeddings::new(vec![1.0; 6], 4).unwrap_err(),
            EmbeddingsError::Ragged { len: 6, width: 4 }
        );
        assert_eq!(
            Embeddings::new(vec![0.0, 1.0, f32::NAN, 2.0], 2).unwrap_err(),
            EmbeddingsError::NotFinite { row: 1, column: 0 }
        );
        assert_eq!(
            Embeddings::new(vec![0.0, -1e7], 2).unwrap_err(),
            EmbeddingsError::NotFinite { row: 0, column: 1 }
        );
        assert_eq!(
            Embeddings::new(Vec::new(), 2).unwrap_err(),
            EmbeddingsError::Empty
        );
        assert_eq!(
            Embeddings::new(vec![1.0], 0).unwrap_err(),
            EmbeddingsError::ZeroWidth
        );
        let e = Embeddings::new(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3).unwrap();
        assert_eq!((e.n_rows(), e.width()), (2, 3));
        assert_eq!(e.row(1), &[4.0, 5.0, 6.0]);
        assert!(e.check_width(3).is_ok());
        assert_eq!(
            e.check_width(576).unwrap_err().to_string(),
            "embedding rows are 3 wide but this model's input width (n_embd) is 576; build rows of 576 values"
        );
    }

    #[test]
    fn rows_match_only_on_equal_bits() {
        let a = Embeddings::new(vec![1.0, 2.0, 0.0, 4.0], 2).unwrap();
        let b = Embeddings::new(vec![0.0, 4.0, 1.0, 2.0], 2).unwrap();
        assert!(a.same_row(0, &b, 1) && a.same_row(1, &b, 0));
        assert!(!a.same_row(0, &b, 0));
        // -0.0 == 0.0 as numbers, but not as the bits the model is fed.
        let c = Embeddings::new(vec![-0.0, 4.0], 2).unwrap();
        assert!(!c.same_row(0, &a, 1));
        assert_eq!(a, a.clone());
        assert_ne!(a, b);
    }
}
