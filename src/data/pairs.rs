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
