//! Durable file output for results.
//!
//! A run writes results as each cell finishes, and may be killed at any moment (out of memory, a
//! lost machine, Ctrl-C). Every file is therefore written atomically: the bytes go to a temporary
//! file in the same folder, are flushed to disk, and the temporary file is renamed over the
//! target. A reader sees either the old file or the new one, never half of one.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` atomically, creating missing parent folders.
///
/// After a crash the target holds either its previous content or `bytes`; a stray temporary
/// file (`.NAME.tmp-PID-N.EXT`) may remain next to it, never a truncated target.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |tmp| {
        let mut file = File::create(tmp)?;
        file.write_all(bytes)?;
        file.sync_all()
    })
}

/// Atomic write for producers that insist on writing a file themselves (an image encoder):
/// `fill` is given a temporary path in the target's folder, with the target's extension so that
/// format detection by extension still works; on success it is flushed and renamed over `path`.
pub fn write_atomic_with<F>(path: &Path, fill: F) -> io::Result<()>
where
    F: FnOnce(&Path) -> io::Result<()>,
{
    let folder = parent_folder(path);
    fs::create_dir_all(&folder)?;
    let tmp = temp_path_for(path)?;
    let result = fill(&tmp)
        .and_then(|()| give_default_mode(&tmp))
        .and_then(|()| sync_file(&tmp))
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        // The temporary file is ours and useless now; the target was never touched.
        let _ = fs::remove_file(&tmp);
        return result;
    }
    sync_folder(&folder);
    Ok(())
}

/// Gives a file the mode a plain `create` would (0666 less the umask). Some producers write
/// through a private temporary file (mode 0600), which would keep a group from reading a
/// shared run folder.
fn give_default_mode(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o666 & !umask()))
}

/// The process's umask, read without changing it (changing it would race with other threads).
fn umask() -> u32 {
    static UMASK: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("Umask:")).map(|l| l[6..].trim().to_string()))
            .and_then(|m| u32::from_str_radix(&m, 8).ok())
            .unwrap_or(0o022)
    })
}

/// The folder a file lives in; `.` for a bare file name.
fn parent_folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A fresh hidden name next to `path`. Same folder, so the final rename never crosses file
/// systems; pid and counter keep concurrent writers (threads or processes) apart.
fn temp_path_for(path: &Path) -> io::Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} is not a file path", path.display())))?;
    let name = name.to_string_lossy();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let tmp_name = match path.extension() {
        Some(ext) => format!(".{name}.tmp-{pid}-{n}.{}", ext.to_string_lossy()),
        None => format!(".{name}.tmp-{pid}-{n}"),
    };
    Ok(parent_folder(path).join(tmp_name))
}

/// Flushes a file written by someone else (the `fill` callback) to disk.
fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Makes the rename itself durable. Best effort: not every platform can open a folder.
fn sync_folder(folder: &Path) {
    if let Ok(dir) = File::open(folder) {
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn a_new_file_gets_exactly_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"{\"x\": 1}\n").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"{\"x\": 1}\n");
    }

    #[test]
    fn an_existing_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.txt");
        write_atomic(&path, b"a much longer first version").unwrap();
        write_atomic(&path, b"short").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "short");
    }

    #[test]
    fn missing_parent_folders_are_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs/x/y/report.md");
        write_atomic(&path, b"# report").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "# report");
    }

    #[test]
    fn no_temporary_file_is_left_behind() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..5 {
            write_atomic(&dir.path().join(format!("f{i}.csv")), b"a,b\n").unwrap();
        }
        assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
    }

    #[test]
    fn a_failed_fill_keeps_the_old_content_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("result.json");
        write_atomic(&path, b"old").unwrap();
        let err = write_atomic_with(&path, |tmp| {
            fs::write(tmp, b"half")?;
            Err(io::Error::other("encoder failed"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "encoder failed");
        assert_eq!(fs::read_to_string(&path).unwrap(), "old");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn the_temporary_file_keeps_the_extension_for_format_detection() {
        let tmp = temp_path_for(Path::new("out/figure.png")).unwrap();
        assert_eq!(tmp.extension().unwrap(), "png");
        assert_eq!(tmp.parent().unwrap(), Path::new("out"));
    }

    #[test]
    fn a_file_written_through_a_private_temporary_gets_the_umask_mode() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adapter_model.safetensors");
        write_atomic_with(&path, |tmp| {
            fs::write(tmp, b"x")?;
            fs::set_permissions(tmp, fs::Permissions::from_mode(0o600))
        })
        .unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask(), "{mode:o}");
    }

    #[test]
    fn writing_where_a_folder_stands_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_atomic(dir.path(), b"x");
        assert!(err.is_err());
    }
}

/// The key of a cell: the first 16 hex digits of the SHA-256 of its canonical JSON (object keys
/// sorted), so that any change to what determines a result gives a new key.
pub fn key_hash(value: &serde_json::Value) -> String {
    use sha2::{Digest, Sha256};
    let canonical = canonical_json(value);
    let digest = Sha256::digest(canonical.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn canonical_json(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let parts: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", serde_json::Value::String((*k).clone()), canonical_json(&map[*k])))
                .collect();
            format!("{{{}}}", parts.join(","))
        }
        serde_json::Value::Array(items) => {
            format!("[{}]", items.iter().map(canonical_json).collect::<Vec<_>>().join(","))
        }
        other => other.to_string(),
    }
}

/// SHA-256 of a file's bytes, as hex.
pub fn file_sha256(path: &Path) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(format!("{:x}", hasher.finalize()))
}

/// Whether an error message reads as running out of memory (host or device).
pub fn is_out_of_memory(message: &str) -> bool {
    let m = message.to_lowercase();
    m.contains("out of memory")
        || m.contains("out_of_memory")
        || m.contains("memory allocation")
        || m.contains("cannot allocate")
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn a_cell_key_ignores_key_order_but_not_values() {
        let a = serde_json::json!({"dose": 10, "condition": "em", "seeds": [1, 2]});
        let b = serde_json::json!({"condition": "em", "seeds": [1, 2], "dose": 10});
        let c = serde_json::json!({"condition": "em", "seeds": [1, 2], "dose": 25});
        assert_eq!(key_hash(&a), key_hash(&b));
        assert_ne!(key_hash(&a), key_hash(&c));
        assert_eq!(key_hash(&a).len(), 16);
    }
}
