//! Pairs files: one `context<TAB>next_turn` (or `context|||next_turn`) per
//! line, the training and evaluation data of the world model; and their
//! conversation sidecars (`NAME.conversations`, one conversation id per
//! pair), which let an evaluation resample whole conversations.

use std::path::{Path, PathBuf};

use super::{DataError, write_atomic};

/// A context and the turn that followed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub context: String,
    pub next: String,
}

/// Reads a pairs file. Empty lines and pairs with an empty side are
/// skipped; a non-empty line without a separator is an error naming it.
pub fn read(path: &Path) -> Result<Vec<Pair>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    let mut pairs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (context, next) = line
            .split_once('\t')
            .or_else(|| line.split_once("|||"))
            .ok_or(DataError::NoSeparator {
                path: path.to_path_buf(),
                line: i + 1,
            })?;
        let (context, next) = (context.trim(), next.trim());
        if !context.is_empty() && !next.is_empty() {
            pairs.push(Pair {
                context: context.to_string(),
                next: next.to_string(),
            });
        }
    }
    if pairs.is_empty() {
        return Err(DataError::NoPairs {
            path: path.to_path_buf(),
        });
    }
    Ok(pairs)
}

/// Writes pairs as `context<TAB>next` lines, atomically. Tabs and line
/// breaks inside a turn become spaces so that every pair stays one line.
pub fn write(path: &Path, pairs: &[Pair]) -> Result<(), DataError> {
    write_atomic(path, |out| {
        for p in pairs {
            writeln!(out, "{}\t{}", one_line(&p.context), one_line(&p.next))?;
        }
        Ok(())
    })
}

/// The most world-model tokens of history a twin's context holds (the
/// rung-2 world models' max_seq): whole turns, the most recent first, and
/// always at least the last turn.
pub const HISTORY_TOKENS: usize = 128;
/// Between two turns of a history context (its own world-model token).
pub const TURN_SEPARATOR: &str = " | ";

/// `x.tsv` → `x.<tag>.tsv`: a file that goes beside a pairs file.
pub fn sibling(path: &Path, tag: &str) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tsv".into());
    path.with_file_name(format!("{stem}.{tag}.{ext}"))
}

/// The history twin of a pairs file: `x.tsv` → `x.history.tsv`, the same
/// pairs line for line with the conversation so far as the context.
pub fn history_path(path: &Path) -> PathBuf {
    sibling(path, "history")
}

/// A conversation's pairs (each turn the context of the next) and their
/// history twins: the most recent whole turns before the reply whose
/// world-model tokens (one per separator) fit in `budget`, at least the
/// last one, oldest first, joined by [`TURN_SEPARATOR`].
pub fn dialogue(turns: &[String], budget: usize) -> (Vec<Pair>, Vec<Pair>) {
    let separator = crate::world::tokenize(TURN_SEPARATOR).len();
    let tokens: Vec<usize> = turns
        .iter()
        .map(|t| crate::world::tokenize(t).len())
        .collect();
    let (mut pairs, mut twins) = (Vec::new(), Vec::new());
    for j in 1..turns.len() {
        let mut first = j - 1;
        let mut used = tokens[first];
        while first > 0 && used + separator + tokens[first - 1] <= budget {
            first -= 1;
            used += separator + tokens[first];
        }
        pairs.push(Pair {
            context: turns[j - 1].clone(),
            next: turns[j].clone(),
        });
        twins.push(Pair {
            context: turns[first..j].join(TURN_SEPARATOR),
            next: turns[j].clone(),
        });
    }
    (pairs, twins)
}

/// Writes `pairs` to `path` and `twins` to its history twin, each with the
/// same conversation sidecar.
pub fn write_with_twin(
    path: &Path,
    pairs: &[Pair],
    twins: &[Pair],
    ids: &[String],
) -> Result<(), DataError> {
    write(path, pairs)?;
    write_conversations(path, ids)?;
    let twin = history_path(path);
    write(&twin, twins)?;
    write_conversations(&twin, ids)
}

/// The contexts the world model reads for `pairs`, from `path`: a pairs
/// file that holds the same pairs line for line with other contexts (the
/// conversation so far, `prepare-chitchat`'s `.history.tsv`). Its replies
/// must be `pairs`' replies, in the same order.
pub fn world_contexts(path: &Path, pairs: &[Pair]) -> Result<Vec<String>, DataError> {
    let twins = read(path)?;
    let misaligned = |what: String| DataError::Misaligned {
        path: path.to_path_buf(),
        what,
    };
    if twins.len() != pairs.len() {
        return Err(misaligned(format!(
            "{} pairs where the pairs file has {}",
            twins.len(),
            pairs.len()
        )));
    }
    if let Some(i) = twins.iter().zip(pairs).position(|(t, p)| t.next != p.next) {
        return Err(misaligned(format!(
            "pair {} has another reply than the pairs file's",
            i + 1
        )));
    }
    Ok(twins.into_iter().map(|t| t.context).collect())
}

/// Where the conversation ids of the pairs in `path` are kept: the same
/// name with the extension `.conversations`.
pub fn conversations_path(path: &Path) -> PathBuf {
    path.with_extension("conversations")
}

/// Writes the conversation id of each pair of `path`, one per line, to its
/// sidecar (`conversations_path`).
pub fn write_conversations(path: &Path, ids: &[String]) -> Result<(), DataError> {
    write_atomic(&conversations_path(path), |out| {
        for id in ids {
            writeln!(out, "{}", one_line(id))?;
        }
        Ok(())
    })
}

/// Which conversation each pair comes from, and how that was known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversations {
    /// One id per pair, in the file's order.
    pub ids: Vec<String>,
    /// `sidecar`, or `chained` (inferred: see [`conversations`]).
    pub source: &'static str,
}

/// The conversation of each of `pairs` (as read from `path`): from the
/// sidecar when there is one (an error unless it has one id per pair), else
/// inferred from the order that `prepare-chitchat` writes, where each
/// conversation's pairs are consecutive and chained (a pair's context is
/// the previous pair's reply).
pub fn conversations(path: &Path, pairs: &[Pair]) -> Result<Conversations, DataError> {
    let sidecar = conversations_path(path);
    if sidecar.exists() {
        let text = std::fs::read_to_string(&sidecar).map_err(|e| DataError::io(&sidecar, e))?;
        let ids: Vec<String> = text.lines().map(str::to_string).collect();
        if ids.len() != pairs.len() {
            return Err(DataError::Sidecar {
                path: sidecar,
                ids: ids.len(),
                pairs: pairs.len(),
            });
        }
        return Ok(Conversations {
            ids,
            source: "sidecar",
        });
    }
    let mut ids = Vec::with_capacity(pairs.len());
    let mut id = 0usize;
    for (k, pair) in pairs.iter().enumerate() {
        if k > 0 && pairs[k - 1].next != pair.context {
            id += 1;
        }
        ids.push(format!("chain-{id}"));
    }
    Ok(Conversations {
        ids,
        source: "chained",
    })
}

fn one_line(text: &str) -> String {
    text.split(['\t', '\n', '\r'])
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_history_keeps_the_most_recent_whole_turns_that_fit() {
        let turns: Vec<String> = ["a b c", "d e", "f g h i", "j", "k"]
            .map(String::from)
            .to_vec();
        // The history before the reply "k"; each separator is one token ("|").
        let last = |budget| dialogue(&turns, budget).1.pop().unwrap().context;
        assert_eq!(last(100), "a b c | d e | f g h i | j");
        assert_eq!(last(1), "j");
        assert_eq!(last(5), "j", "j + | + 4 is 6 > 5");
        assert_eq!(last(6), "f g h i | j");
        assert_eq!(last(8), "f g h i | j", "+ | d e is 9 > 8");
        assert_eq!(last(9), "d e | f g h i | j");
        // A last turn longer than the budget is kept whole: the world
        // model's own truncation cuts it.
        assert_eq!(dialogue(&turns[..4], 2).1[2].context, "f g h i");
        let (pairs, twins) = dialogue(&turns, 100);
        assert_eq!(pairs.len(), 4);
        assert_eq!(
            (pairs[0].context.as_str(), twins[0].context.as_str()),
            ("a b c", "a b c")
        );
        assert!(pairs.iter().zip(&twins).all(|(p, t)| p.next == t.next));
    }

    #[test]
    fn reads_both_separators_and_skips_empties() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.tsv");
        std::fs::write(
            &path,
            "hi\thello there\n\n  \nhow are you|||fine thanks\n\tno context\n",
        )
        .unwrap();
        let pairs = read(&path).unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1].context, "how are you");
        assert_eq!(pairs[1].next, "fine thanks");
    }

    #[test]
    fn a_line_without_separator_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.tsv");
        std::fs::write(&path, "a\tb\njust text\n").unwrap();
        assert!(
            read(&path)
                .unwrap_err()
                .to_string()
                .ends_with("line 2 has no tab or `|||` between context and next turn")
        );
        std::fs::write(&path, "\n\n").unwrap();
        assert!(read(&path).unwrap_err().to_string().contains("no valid"));
    }

    #[test]
    fn write_keeps_each_pair_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.tsv");
        let pairs = vec![Pair {
            context: "a\tb\nc".into(),
            next: "d\r\ne".into(),
        }];
        write(&path, &pairs).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "a b c\td e\n");
    }
}
