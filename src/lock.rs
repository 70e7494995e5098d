//! Advisory locks between processes, e.g. two runs building the same cached model at once.
//!
//! The lock is the operating system's (`flock`), held by an open file: it is released when the
//! holder exits for any reason, `kill -9` included, so a crashed run never leaves a stale lock.

use std::fs::{File, OpenOptions};
use std::path::Path;

use anyhow::Context;

/// An exclusive lock, held until dropped.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock at `path` is free, then holds it.
    pub fn acquire(path: &Path) -> anyhow::Result<FileLock> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        file.lock().with_context(|| format!("cannot lock {}", path.display()))?;
        Ok(FileLock { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_waits_until_the_first_releases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = FileLock::acquire(&path).unwrap();
        let other = File::options().write(true).open(&path).unwrap();
        assert!(other.try_lock().is_err());
        drop(first);
        assert!(other.try_lock().is_ok());
    }
}
