//! What the training commands' resumable checkpoints share: the metadata
//! that names a run, checked before a checkpoint is continued, with errors
//! that name the file and say what to do; and the comma lists a run's
//! history is kept in.
//!
//! `train-projector` and `train-world` each write their own tensors; both
//! write a format tag and a `run` key (everything that makes two runs the
//! same run), so that a checkpoint of another run is refused rather than
//! silently continued.

use std::collections::HashMap;
use std::path::Path;

use super::TrainError;
use crate::world::checkpoint::Checkpoint;

/// A checkpoint's metadata, checked to be of one run.
pub(super) struct RunMeta<'a> {
    path: &'a Path,
    map: HashMap<String, String>,
}

impl<'a> RunMeta<'a> {
    /// The metadata of `file` (read from `path`), refused unless its
    /// format tag is `format` (a checkpoint of `command`) and its run key is
    /// `run`.
    pub(super) fn read(
        path: &'a Path,
        file: &Checkpoint,
        format: &str,
        command: &str,
        run: &str,
    ) -> Result<Self, TrainError> {
        let meta = Self {
            path,
            map: file.metadata().cloned().unwrap_or_default(),
        };
        if meta.get("tofy.format").ok() != Some(format) {
            return Err(meta.bad(format!("it is not a {command} checkpoint")));
        }
        if meta.get("run")? != run {
            return Err(meta.bad(format!(
                "it is the checkpoint of another run ({}), not of this one ({run})",
                meta.get("run")?,
            )));
        }
        Ok(meta)
    }

    /// The error for a checkpoint that cannot be continued.
    pub(super) fn bad(&self, what: String) -> TrainError {
        TrainError::Invalid(format!(
            "{}: {what}; delete it to start the run afresh",
            self.path.display()
        ))
    }

    /// A key that may be missing (written only by later versions).
    pub(super) fn optional(&self, key: &str) -> Option<&str> {
        self.map.get(key).map(String::as_str)
    }

    pub(super) fn get(&self, key: &str) -> Result<&str, TrainError> {
        self.optional(key)
            .ok_or_else(|| self.bad(format!("no '{key}' in its metadata")))
    }

    pub(super) fn number(&self, key: &str) -> Result<usize, TrainError> {
        self.get(key)?
            .parse()
            .map_err(|_| self.bad(format!("'{key}' is not a number")))
    }

    /// The comma list under `key`, each item parsed by `parse` (`None`:
    /// malformed).
    pub(super) fn list<T>(
        &self,
        key: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Vec<T>, TrainError> {
        self.get(key)?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|item| {
                parse(item).ok_or_else(|| self.bad(format!("'{item}' in '{key}' is malformed")))
            })
            .collect()
    }

    /// A `step:loss` entry.
    pub(super) fn scored(&self, s: &str) -> Result<(usize, f64), TrainError> {
        parse_scored(s).ok_or_else(|| self.bad(format!("'{s}' is not step:loss")))
    }
}

/// `step:value`.
pub(super) fn parse_scored(s: &str) -> Option<(usize, f64)> {
    let (a, b) = s.split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Items joined by commas, for [`RunMeta::list`].
pub(super) fn join<T>(items: &[T], show: impl Fn(&T) -> String) -> String {
    items.iter().map(show).collect::<Vec<_>>().join(",")
}
