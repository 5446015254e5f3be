//! Which GGUF file the decoder runs: `JEPA_DECODER_MODEL` when set (and then
//! it must exist), else the first of `models/*.gguf` in sorted order, else
//! the first of `models/**/*.gguf` (the seed's rule).

use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobMatcher};
use walkdir::WalkDir;

use super::DecoderError;

/// The model to use, `None` when there is none (the stub then answers).
pub fn find_model(explicit: Option<&Path>, root: &Path) -> Result<Option<PathBuf>, DecoderError> {
    if let Some(path) = explicit {
        if path.is_dir() {
            return Err(DecoderError::ModelIsDirectory(path.to_path_buf()));
        }
        if !path.is_file() {
            return Err(DecoderError::ModelMissing(path.to_path_buf()));
        }
        return Ok(Some(path.to_path_buf()));
    }
    Ok(search(&root.join("models")))
}

/// `dir/*.gguf` first, then `dir/**/*.gguf`; sorted by path in each.
pub fn search(dir: &Path) -> Option<PathBuf> {
    let flat = matcher("*.gguf");
    let nested = matcher("**/*.gguf");
    // Hidden entries (models/.cache, ...) are skipped, as a shell glob does.
    let hidden =
        |e: &walkdir::DirEntry| e.depth() > 0 && e.file_name().to_string_lossy().starts_with('.');
    let mut files: Vec<PathBuf> = WalkDir::new(dir)
        .follow_links(true)
        .into_iter()
        .filter_entry(|e| !hidden(e))
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.path().strip_prefix(dir).ok().map(Path::to_path_buf))
        .collect();
    // Sorted as strings ("a-b/x" before "a/x"), as the seed sorted paths.
    files.sort_by_key(|p| p.to_string_lossy().into_owned());
    let first = |m: &GlobMatcher| files.iter().find(|p| m.is_match(p)).map(|p| dir.join(p));
    first(&flat).or_else(|| first(&nested))
}

/// Shell-style: `*` stops at `/`, only `**` crosses folders.
fn matcher(pattern: &str) -> GlobMatcher {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .expect("a constant glob pattern")
        .compile_matcher()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(root: &Path, rel: &str) {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn flat_before_nested_then_sorted() {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        touch(&models, "a/aa.gguf");
        touch(&models, "readme.txt");
        assert_eq!(search(&models), Some(models.join("a/aa.gguf")));
        touch(&models, "z.gguf");
        touch(&models, "b.gguf");
        assert_eq!(search(&models), Some(models.join("b.gguf")));
        assert_eq!(
            find_model(None, dir.path()).unwrap(),
            Some(models.join("b.gguf"))
        );
    }

    #[test]
    fn nested_levels_are_sorted_by_path() {
        let dir = tempfile::tempdir().unwrap();
        touch(dir.path(), "x/deep/q.gguf");
        touch(dir.path(), "b/m.gguf");
        touch(dir.path(), "b/a.txt");
        touch(dir.path(), ".cache/a.gguf");
        assert_eq!(search(dir.path()), Some(dir.path().join("b/m.gguf")));
        touch(dir.path(), "a-b/z.gguf");
        touch(dir.path(), "a/z.gguf");
        assert_eq!(search(dir.path()), Some(dir.path().join("a-b/z.gguf")));
    }

    #[test]
    fn nothing_found_and_explicit_paths() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_model(None, dir.path()).unwrap(), None);
        let missing = dir.path().join("none.gguf");
        let err = find_model(Some(&missing), dir.path()).unwrap_err();
        assert!(matches!(err, DecoderError::ModelMissing(_)), "{err}");
        let err = find_model(Some(dir.path()), dir.path()).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        touch(dir.path(), "models/found.gguf");
        touch(dir.path(), "mine.gguf");
        let mine = dir.path().join("mine.gguf");
        assert_eq!(find_model(Some(&mine), dir.path()).unwrap(), Some(mine));
    }
}
