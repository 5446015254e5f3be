//! Conversation data for training and evaluating world models: the
//! `context<TAB>next_turn` pairs files ([`pairs`]) and the converters from
//! the chitchat corpus ([`chitchat`]) and the chatterbot corpus
//! ([`chatterbot`], an out-of-domain held-out set).

pub mod chatterbot;
pub mod chitchat;
pub mod pairs;

use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors reading or writing data files; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// A line of a pairs file is not `context<TAB>next` or `context|||next`.
    #[error("{}: line {line} has no tab or `|||` between context and next turn", path.display())]
    NoSeparator { path: PathBuf, line: usize },

    /// A pairs file holds no usable pair.
    #[error("{}: no valid `context<TAB>next_turn` line (empty lines and lines with an empty side are skipped)", path.display())]
    NoPairs { path: PathBuf },

    /// A conversation sidecar that does not match its pairs file.
    #[error("{}: {ids} conversation ids for {pairs} pairs; regenerate it with `tofy prepare-chitchat` (or delete it: the ids are then inferred)", path.display())]
    Sidecar {
        path: PathBuf,
        ids: usize,
        pairs: usize,
    },

    /// A world-contexts file that is not line for line its pairs file.
    #[error("{}: {what}; it must hold the same pairs, line for line, as the pairs file it goes with (e.g. chitchat_pairs.valid.history.tsv with chitchat_pairs.valid.tsv; `make -B data` writes both)", path.display())]
    Misaligned { path: PathBuf, what: String },

    /// A chatterbot corpus file is not in the expected shape.
    #[error("{}: not a chatterbot corpus (a folder of .yml files with a `conversations` list of turn lists): {reason}", path.display())]
    Chatterbot { path: PathBuf, reason: String },

    /// The chitchat dataset is not in the expected shape.
    #[error("{}: not a chitchat dataset.json: {reason}", path.display())]
    Chitchat { path: PathBuf, reason: String },
}

impl DataError {
    pub(crate) fn io(path: &Path, error: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            error,
        }
    }
}

/// Writes `path` atomically: the bytes go to a temporary sibling that is
/// renamed over `path` only once complete, so no reader ever sees half a file.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<(), DataError> {
    crate::atomic::replace(path, write).map_err(|e| DataError::io(path, e))
}
