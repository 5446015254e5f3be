//! `tofy prepare-chitchat`: turns the chitchat corpus (PyPI
//! `chitchat-dataset`, MIT, `chitchat_dataset/dataset.json`) into pairs.
//!
//! The file is a JSON object of conversations keyed by id, each
//! `{"messages": [[{"text", "timestamp", "sender"}, ...], ...]}` with one
//! inner list per speaker turn. A turn's messages are joined by spaces; each
//! turn is the context of the next. Conversations are taken in key order
//! (deterministic), and every [`HELD_OUT_EVERY`]th one goes to the held-out
//! file, so evaluation never sees a training dialogue.
//!
//! The training conversations are also split once more, for choosing
//! hyper-parameters without touching the held-out pairs: every
//! [`VALID_EVERY`]th training conversation goes to `<name>.valid.tsv`, the
//! rest to `<name>.fit.tsv` (so `fit` ∪ `valid` = the training file).
//!
//! Beside each pairs file, `<name>.conversations` holds each pair's
//! conversation key (one per line), so that an evaluation can resample
//! whole conversations: pairs of one dialogue are not independent.
//!
//! And `<name>.history.tsv` holds the same pairs with the conversation so
//! far as the context (issue 24, rung 2): the most recent turns that fit in
//! [`pairs::HISTORY_TOKENS`] world-model tokens, oldest first, joined by
//! [`pairs::TURN_SEPARATOR`]. Line for line it matches `<name>.tsv` (same replies,
//! same conversations), so a world model can be trained on the history
//! while the decoder is scored on the same pairs (`--world-contexts`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::DataError;
use super::pairs;

/// One conversation in this many is held out.
pub const HELD_OUT_EVERY: usize = 20;
/// One training conversation in this many is a validation conversation.
pub const VALID_EVERY: usize = 10;
#[derive(Deserialize)]
struct Conversation {
    messages: Vec<Vec<Message>>,
}

#[derive(Deserialize)]
struct Message {
    text: String,
}

/// Counts of what [`prepare`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub train_path: PathBuf,
    pub heldout_path: PathBuf,
    pub fit_path: PathBuf,
    pub valid_path: PathBuf,
    pub conversations: usize,
    pub train_pairs: usize,
    pub heldout_pairs: usize,
    pub fit_pairs: usize,
    pub valid_pairs: usize,
}

/// The held-out file that goes beside `out`: `x.tsv` → `x.heldout.tsv`.
pub fn heldout_path(out: &Path) -> PathBuf {
    pairs::sibling(out, "heldout")
}

/// Reads `dataset` and writes the training pairs to `out`, and the held-out,
/// fit and validation pairs beside it (`<name>.heldout.tsv`, `.fit.tsv`,
/// `.valid.tsv`).
pub fn prepare(dataset: &Path, out: &Path) -> Result<Prepared, DataError> {
    let bytes = std::fs::read(dataset).map_err(|e| DataError::io(dataset, e))?;
    let conversations: BTreeMap<String, Conversation> =
        serde_json::from_slice(&bytes).map_err(|e| DataError::Chitchat {
            path: dataset.to_path_buf(),
            reason: e.to_string(),
        })?;
    let (mut train, mut heldout) = (Vec::new(), Vec::new());
    let (mut fit, mut valid) = (Vec::new(), Vec::new());
    // Each split's conversation ids, one per pair (the sidecars).
    let (mut train_ids, mut heldout_ids) = (Vec::new(), Vec::new());
    let (mut fit_ids, mut valid_ids) = (Vec::new(), Vec::new());
    // The same pairs with the conversation so far as the context.
    let (mut train_history, mut heldout_history) = (Vec::new(), Vec::new());
    let (mut fit_history, mut valid_history) = (Vec::new(), Vec::new());
    let mut training_conversations = 0;
    for (i, (key, conversation)) in conversations.iter().enumerate() {
        let turns: Vec<String> = conversation
            .messages
            .iter()
            .map(|turn| {
                turn.iter()
                    .map(|m| m.text.trim())
                    .filter(|t| !t.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|t| !t.is_empty())
            .collect();
        let (pairs, histories) = pairs::dialogue(&turns, pairs::HISTORY_TOKENS);
        let ids = || std::iter::repeat_n(key.clone(), turns.len().saturating_sub(1));
        if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 {
            heldout.extend(pairs);
            heldout_history.extend(histories);
            heldout_ids.extend(ids());
            continue;
        }
        training_conversations += 1;
        let start = train.len();
        train.extend(pairs);
        train_history.extend_from_slice(&histories);
        train_ids.extend(ids());
        let (split, split_history, split_ids) = if training_conversations % VALID_EVERY == 0 {
            (&mut valid, &mut valid_history, &mut valid_ids)
        } else {
            (&mut fit, &mut fit_history, &mut fit_ids)
        };
        split.extend_from_slice(&train[start..]);
        split_history.extend(histories);
        split_ids.extend(ids());
    }
    if train.is_empty() {
        return Err(DataError::Chitchat {
            path: dataset.to_path_buf(),
            reason: "it holds no conversation with two turns".into(),
        });
    }
    let heldout_path = heldout_path(out);
    let (fit_path, valid_path) = (pairs::sibling(out, "fit"), pairs::sibling(out, "valid"));
    for (path, split, history, ids) in [
        (out, &train, &train_history, &train_ids),
        (
            heldout_path.as_path(),
            &heldout,
            &heldout_history,
            &heldout_ids,
        ),
        (fit_path.as_path(), &fit, &fit_history, &fit_ids),
        (valid_path.as_path(), &valid, &valid_history, &valid_ids),
    ] {
        pairs::write_with_twin(path, split, history, ids)?;
    }
    Ok(Prepared {
        train_path: out.to_path_buf(),
        heldout_path,
        fit_path,
        valid_path,
        conversations: conversations.len(),
        train_pairs: train.len(),
        heldout_pairs: heldout.len(),
        fit_pairs: fit.len(),
        valid_pairs: valid.len(),
    })
}
