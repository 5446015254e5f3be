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
//! [`HISTORY_TOKENS`] world-model tokens, oldest first, joined by
//! [`TURN_SEPARATOR`]. Line for line it matches `<name>.tsv` (same replies,
//! same conversations), so a world model can be trained on the history
//! while the decoder is scored on the same pairs (`--world-contexts`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::DataError;
use super::pairs::{self, Pair};

/// One conversation in this many is held out.
pub const HELD_OUT_EVERY: usize = 20;
/// One training conversation in this many is a validation conversation.
pub const VALID_EVERY: usize = 10;
/// The most world-model tokens of history a context holds (the rung-2
/// world models' max_seq): whole turns, the most recent first, and always
/// at least the last turn.
pub const HISTORY_TOKENS: usize = 128;
/// Between two turns of a history context (its own world-model token).
pub const TURN_SEPARATOR: &str = " | ";

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
    split_path(out, "heldout")
}

/// The history twin of a pairs file: `x.tsv` → `x.history.tsv`.
pub fn history_path(pairs: &Path) -> PathBuf {
    split_path(pairs, "history")
}

/// The context of the turn after `turns`' last: the most recent turns
/// whose world-model tokens fit in `budget` (at least the last one),
/// oldest first, joined by [`TURN_SEPARATOR`].
pub fn history(turns: &[String], budget: usize) -> String {
    let separator = crate::world::tokenize(TURN_SEPARATOR).len();
    let mut used = 0;
    let mut first = turns.len();
    for (i, turn) in turns.iter().enumerate().rev() {
        let cost =
            crate::world::tokenize(turn).len() + if first < turns.len() { separator } else { 0 };
        if first < turns.len() && used + cost > budget {
            break;
        }
        used += cost;
        first = i;
    }
    turns[first..].join(TURN_SEPARATOR)
}

/// `x.tsv` → `x.<split>.tsv`.
fn split_path(out: &Path, split: &str) -> PathBuf {
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tsv".into());
    out.with_file_name(format!("{stem}.{split}.{ext}"))
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
        let pairs = turns.windows(2).map(|w| Pair {
            context: w[0].clone(),
            next: w[1].clone(),
        });
        let histories: Vec<Pair> = (1..turns.len())
            .map(|j| Pair {
                context: history(&turns[..j], HISTORY_TOKENS),
                next: turns[j].clone(),
            })
            .collect();
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
    let (fit_path, valid_path) = (split_path(out, "fit"), split_path(out, "valid"));
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
        pairs::write(path, split)?;
        pairs::write_conversations(path, ids)?;
        let twin = history_path(path);
        pairs::write(&twin, history)?;
        pairs::write_conversations(&twin, ids)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_keeps_the_most_recent_whole_turns_that_fit() {
        let turns: Vec<String> = ["a b c", "d e", "f g h i", "j"].map(String::from).to_vec();
        // Each separator is one token ("|").
        assert_eq!(history(&turns, 100), "a b c | d e | f g h i | j");
        assert_eq!(history(&turns, 1), "j");
        assert_eq!(history(&turns, 5), "j", "j + | + 4 is 6 > 5");
        assert_eq!(history(&turns, 6), "f g h i | j");
        assert_eq!(history(&turns, 8), "f g h i | j", "+ | d e is 9 > 8");
        assert_eq!(history(&turns, 9), "d e | f g h i | j");
        // A last turn longer than the budget is kept whole: the world
        // model's own truncation cuts it.
        assert_eq!(history(&turns[..3], 2), "f g h i");
    }
}
