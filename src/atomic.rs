//! Replacing a file whole: written beside it and renamed over it, so that a
//! process killed mid-write (a training run's checkpoint is rewritten every
//! few minutes) leaves the previous file, never a truncated one. The one
//! place both the data files and the checkpoints are written through.

use std::io::Write;
use std::path::Path;

/// Writes `path` through `write`, atomically, with the usual 0644 (less the
/// umask) rather than a temporary file's 0600: these are files to share.
pub fn replace(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .tempfile_in(dir)?;
    {
        let mut out = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut out)?;
        out.flush()?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
