//! The world model's error type: every variant names the file (or argument)
//! at fault and says what to do, so the CLI can print it as one line.

use std::path::PathBuf;

/// Everything that can go wrong loading a world model or conditioning on a prompt.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// The file could not be opened or read.
    // The io error is part of the message rather than a `source`, so that
    // printing the error chain does not repeat it.
    #[error("{}: cannot read file: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },

    /// The bytes are not a safetensors file.
    #[error("{}: not a safetensors file ({reason}); expected a model_world_*.safetensors checkpoint", path.display())]
    NotSafetensors { path: PathBuf, reason: String },

    /// The header promises more (or fewer) bytes of tensor data than the file holds.
    #[error("{}: file is truncated or corrupt: its header describes a {expected}-byte file, but the file holds {found} bytes; copy the checkpoint again", path.display())]
    Truncated {
        path: PathBuf,
        expected: usize,
        found: usize,
    },

    /// The file is the EMA teacher a training run writes beside the model.
    #[error("{}: this is the training-only EMA teacher encoder, not a world model; use the model_world_*.safetensors beside it (without _teacher)", path.display())]
    Teacher { path: PathBuf },

    /// A tensor the forward pass needs is absent.
    #[error("{}: missing tensor `{name}`; is this a Tofy world-model checkpoint (model_world_*.safetensors)?", path.display())]
    MissingTensor { path: PathBuf, name: String },

    /// A tensor has a shape other than the one the configuration implies.
    #[error("{}: tensor `{name}` has shape {found:?}, expected {expected:?} ({why})", path.display())]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        why: String,
    },

    /// A tensor is stored in a dtype other than F32.
    #[error("{}: tensor `{name}` has dtype {found}, expected F32", path.display())]
    Dtype {
        path: PathBuf,
        name: String,
        found: String,
    },

    /// A tensor holds NaN or infinite values, which would poison every vector.
    #[error("{}: tensor `{name}` contains NaN or infinite values; the checkpoint is corrupt", path.display())]
    NonFinite { path: PathBuf, name: String },

    /// A `__metadata__` entry this runtime reads is not a positive integer.
    #[error("{}: metadata `{key}` = {value:?} is not a positive integer", path.display())]
    Metadata {
        path: PathBuf,
        key: String,
        value: String,
    },

    /// The checkpoint's encoder has a different number of blocks than requested.
    #[error("{}: checkpoint has {found} encoder blocks (encoder.block_0..), but {requested} were requested by {source_of}", path.display())]
    Layers {
        path: PathBuf,
        found: usize,
        requested: usize,
        source_of: &'static str,
    },

    /// A size that must be positive and consistent is not.
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    /// The vocabulary file is not UTF-8.
    #[error("{}: line {line} is not valid UTF-8; the vocab must be a UTF-8 text file", path.display())]
    VocabEncoding { path: PathBuf, line: usize },

    /// The vocabulary file holds no tokens.
    #[error("{}: vocab file is empty (no tokens); expected one token per line (vocab_world.txt)", path.display())]
    EmptyVocab { path: PathBuf },

    /// The vocabulary and the embedding table disagree on the vocabulary size.
    #[error("{}: vocab has {vocab} tokens (with <pad>, <unk>, <mask>) but `encoder.embed.weight` in {} has {rows} rows; use the vocab_world.txt written with this checkpoint", vocab_path.display(), model_path.display())]
    VocabMismatch {
        vocab_path: PathBuf,
        model_path: PathBuf,
        vocab: usize,
        rows: usize,
    },

    /// The GPU backend could not start or run (`--device cuda`).
    #[error("CUDA: {message}")]
    Cuda { message: String },

    /// A prompt contains no tokens at all.
    #[error("prompt {index} is empty or whitespace-only: there is nothing to condition on")]
    EmptyPrompt { index: usize },
}

impl WorldError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            error,
        }
    }
}

/// Result alias for the world module.
pub type Result<T, E = WorldError> = std::result::Result<T, E>;
