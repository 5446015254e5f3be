//! `tofy prepare-chatterbot`: the English conversations of the PyPI package
//! `chatterbot-corpus` (BSD-3-Clause, `chatterbot_corpus/data/english/*.yml`)
//! as pairs: an out-of-domain held-out set for models trained on chitchat
//! (issue 24, rung 2). Chitchat is people making small talk; these are
//! short exchanges with a bot in 21 files of topics (science, history, computers,
//! humour, ...), mostly a question and its answer.
//!
//! Each file is `{categories: [...], conversations: [[turn, turn, ...], ...]}`.
//! Files are read in name order and conversations in file order
//! (deterministic); each turn is the context of the next. A pair's
//! conversation id is its file's stem and the conversation's first turn, so
//! the many conversations that open with the same question are resampled
//! together. All of it is held out: nothing here trains anything. The
//! `.history.tsv` twin is written as for chitchat.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

use super::DataError;
use super::pairs;

/// What [`prepare`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    pub path: PathBuf,
    pub files: usize,
    pub conversations: usize,
    pub pairs: usize,
    /// Entries that are not a list of text turns (`file index`, 1-based),
    /// left out.
    pub malformed: Vec<String>,
}

/// Reads every `*.yml` in `dir` and writes their pairs to `out`, with the
/// conversations sidecar and the history twin beside it.
pub fn prepare(dir: &Path, out: &Path) -> Result<Prepared, DataError> {
    let invalid = |path: &Path, reason: String| DataError::Chatterbot {
        path: path.to_path_buf(),
        reason,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| DataError::io(dir, e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yml" || e == "yaml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(invalid(dir, "no .yml file in it".into()));
    }
    let (mut out_pairs, mut histories, mut ids) = (Vec::new(), Vec::new(), Vec::new());
    let mut conversations = 0;
    let mut malformed = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|e| DataError::io(file, e))?;
        let docs = YamlLoader::load_from_str(&text).map_err(|e| invalid(file, e.to_string()))?;
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Some(list) = docs.first().and_then(|d| d["conversations"].as_vec()) else {
            return Err(invalid(file, "no `conversations` list".into()));
        };
        for (i, conversation) in list.iter().enumerate() {
            // The corpus has an entry that is not a list (a missing "- " in
            // trivia.yml): such entries are counted and left out.
            let Some(list) = conversation.as_vec() else {
                malformed.push(format!("{stem} {}", i + 1));
                continue;
            };
            // A turn that is not text (a nested list, a null) would pair
            // two turns that were not adjacent: the entry is malformed.
            let Some(turns) = list.iter().map(turn_text).collect::<Option<Vec<String>>>() else {
                malformed.push(format!("{stem} {}", i + 1));
                continue;
            };
            let turns: Vec<String> = turns.into_iter().filter(|t| !t.is_empty()).collect();
            if turns.len() < 2 {
                continue;
            }
            conversations += 1;
            let id = format!("{stem}/{}", turns[0]);
            let (these, twins) = pairs::dialogue(&turns, pairs::HISTORY_TOKENS);
            ids.extend(std::iter::repeat_n(id, these.len()));
            out_pairs.extend(these);
            histories.extend(twins);
        }
    }
    if out_pairs.is_empty() {
        return Err(invalid(dir, "no conversation with two turns".into()));
    }
    pairs::write_with_twin(out, &out_pairs, &histories, &ids)?;
    Ok(Prepared {
        path: out.to_path_buf(),
        files: files.len(),
        conversations,
        pairs: out_pairs.len(),
        malformed,
    })
}

/// A turn's text on one line: YAML strings, and the numbers and booleans a
/// bare answer parses as (`42`, `true`); `None` for anything else.
fn turn_text(turn: &Yaml) -> Option<String> {
    let text = match turn {
        Yaml::String(s) | Yaml::Real(s) => s.clone(),
        Yaml::Integer(n) => n.to_string(),
        Yaml::Boolean(b) => b.to_string(),
        _ => return None,
    };
    Some(text.split_whitespace().collect::<Vec<_>>().join(" "))
}
