//! World-model training on candle (cargo feature `train`), kept apart from
//! inference: nothing in `world` depends on this module or on candle.
//!
//! - [`model`]: the network in candle, also the reference the ndarray
//!   forward pass is tested and benchmarked against;
//! - [`trainer`]: the JEPA training loop behind `tofy train-world`;
//! - [`llama`]: a frozen Llama with a gradient to its input rows, and
//!   [`projector`]: the projector trained through it (`tofy train-projector`),
//!   with [`adam`], an AdamW whose state a checkpoint can hold, and `run`,
//!   the metadata both commands' resumable checkpoints are checked by.

pub mod adam;
pub mod llama;
pub mod model;
pub mod projector;
mod run;
pub mod trainer;

use std::collections::HashMap;
use std::path::PathBuf;

pub use model::CandleWorld;
pub use trainer::{TrainConfig, TrainReport, train};

use crate::data::DataError;
use crate::data::pairs::Pair;
use crate::world::{Vocab, WorldError, tokenize};

/// Everything that can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// An argument is out of range.
    #[error("invalid training configuration: {0}")]
    Invalid(String),

    /// The output folder cannot be created or written.
    #[error("{}: output folder is not writable: {error}", path.display())]
    OutDir {
        path: PathBuf,
        error: std::io::Error,
    },

    /// The pairs file (or the vocab) could not be read or written.
    #[error(transparent)]
    Data(#[from] DataError),

    /// A checkpoint (for `--init-encoder`, or the output) failed.
    #[error(transparent)]
    World(#[from] WorldError),

    /// A projector could not be written or read.
    #[error(transparent)]
    Projector(#[from] crate::projector::ProjectorError),

    /// A signal stopped the run; its checkpoint holds every step taken.
    #[error(
        "interrupted at step {step}; the checkpoint {} holds the run: the same command goes on from it",
        checkpoint.display()
    )]
    Interrupted { step: usize, checkpoint: PathBuf },

    /// candle reported an error during training.
    #[error("training failed in candle: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The vocabulary of a corpus: `<pad>`, `<unk>`, `<mask>`, then the
/// `max_vocab` most frequent tokens, ties broken by the token's text.
pub fn build_vocab(pairs: &[Pair], max_vocab: usize) -> Vocab {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for pair in pairs {
        for token in tokenize(&pair.context)
            .into_iter()
            .chain(tokenize(&pair.next))
        {
            *counts.entry(token).or_default() += 1;
        }
    }
    let mut ranked: Vec<(&str, usize)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    Vocab::from_tokens(ranked.into_iter().take(max_vocab).map(|(t, _)| t))
}
