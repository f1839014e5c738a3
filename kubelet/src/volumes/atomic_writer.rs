//! Writes a set of files into a volume directory so that a container sees either the old set or the new one,
//! never a mix (upstream `pkg/volume/util/atomic_writer.go`).
//!
//! Layout inside the target directory:
//! ```text
//! ..2026_11_23_20_31_22.123456789/   the current payload (a fresh directory per update)
//! ..data -> ..2026_11_23_20_31_22.123456789
//! key    -> ..data/key                user-visible names, one symlink per top-level entry
//! ```
//! An update writes a new timestamped directory, points `..data_tmp` at it and renames that over `..data` (one
//! atomic rename), then adds/removes the top-level symlinks and deletes the old directory.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::VolumeError;

const DATA_DIR: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// One file of the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileProjection {
    pub data: Vec<u8>,
    pub mode: u32,
}

/// Relative path → file.
pub type Payload = BTreeMap<String, FileProjection>;

/// Upstream `validatePath`: relative, no `..` element, no leading `..`, not empty, at most 4096 bytes.
pub fn validate_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("path is empty".into());
    }
    if p.len() > 4096 {
        return Err(format!("path {p:?} is longer than 4096 bytes"));
    }
    if p.starts_with('/') {
        return Err(format!("path {p:?} is absolute"));
    }
    if p.starts_with("..") {
        return Err(format!("path {p:?} starts with '..'"));
    }
    if Path::new(p).components().any(|c| c == Component::ParentDir) {
        return Err(format!("path {p:?} contains '..'"));
    }
    Ok(())
}

fn io_err(path: &Path, source: std::io::Error) -> VolumeError {
    VolumeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn top_level(p: &str) -> &str {
    p.split('/')
        .find(|s| !s.is_empty() && *s != ".")
        .unwrap_or(p)
}

fn timestamp_dir_name() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let now = jiff::Timestamp::now();
    // A counter keeps two updates within one clock tick apart.
    format!(
        "..{}.{:09}{}",
        now.strftime("%Y_%m_%d_%H_%M_%S"),
        now.subsec_nanosecond(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Makes `target` hold exactly `payload`. Returns whether anything changed.
pub fn write(target: &Path, payload: &Payload) -> Result<bool, VolumeError> {
    for p in payload.keys() {
        validate_path(p).map_err(|reason| VolumeError::InvalidPayload {
            path: target.to_path_buf(),
            reason,
        })?;
    }
    std::fs::create_dir_all(target).map_err(|e| io_err(target, e))?;
    let data_link = target.join(DATA_DIR);
    let old_ts = std::fs::read_link(&data_link).ok();
    if let Some(old) = &old_ts {
        if payload_matches(&target.join(old), payload) {
            return Ok(false);
        }
    }

    let ts_name = timestamp_dir_name();
    let ts_dir = target.join(&ts_name);
    std::fs::create_dir(&ts_dir).map_err(|e| io_err(&ts_dir, e))?;
    let result = (|| {
        // World-readable like upstream's payload directories; file modes restrict the files themselves.
        std::fs::set_permissions(&ts_dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| io_err(&ts_dir, e))?;
        for (rel, file) in payload {
            let path = ts_dir.join(rel);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
            }
            let mut f = std::fs::File::create(&path).map_err(|e| io_err(&path, e))?;
            f.write_all(&file.data).map_err(|e| io_err(&path, e))?;
            f.sync_all().map_err(|e| io_err(&path, e))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file.mode))
                .map_err(|e| io_err(&path, e))?;
        }
        let tmp_link = target.join(DATA_TMP);
        let _ = std::fs::remove_file(&tmp_link);
        symlink(&ts_name, &tmp_link).map_err(|e| io_err(&tmp_link, e))?;
        std::fs::rename(&tmp_link, &data_link).map_err(|e| io_err(&data_link, e))
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&ts_dir);
        return Err(e);
    }

    // User-visible names: one symlink per top-level entry through ..data.
    let wanted: BTreeSet<&str> = payload.keys().map(|k| top_level(k)).collect();
    for name in &wanted {
        let link = target.join(name);
        let dest = PathBuf::from(DATA_DIR).join(name);
        match std::fs::read_link(&link) {
            Ok(existing) if existing == dest => continue,
            Ok(_) => std::fs::remove_file(&link).map_err(|e| io_err(&link, e))?,
            Err(_) => {}
        }
        symlink(&dest, &link).map_err(|e| io_err(&link, e))?;
    }
    // Names no longer in the payload go; the ..-prefixed internals stay.
    let entries = std::fs::read_dir(target).map_err(|e| io_err(target, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("..") || wanted.contains(name.as_str()) {
            continue;
        }
        let path = entry.path();
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            std::fs::remove_file(&path).map_err(|e| io_err(&path, e))?;
        }
    }
    if let Some(old) = old_ts {
        let old_dir = target.join(old);
        if old_dir != ts_dir {
            std::fs::remove_dir_all(&old_dir).map_err(|e| io_err(&old_dir, e))?;
        }
    }
    Ok(true)
}

/// Whether the directory already holds exactly this payload (same files, contents and modes).
fn payload_matches(dir: &Path, payload: &Payload) -> bool {
    let mut found = BTreeSet::new();
    if collect_files(dir, dir, &mut found).is_err() {
        return false;
    }
    if found.len() != payload.len() {
        return false;
    }
    payload.iter().all(|(rel, f)| {
        let p = dir.join(rel);
        found.contains(rel)
            && std::fs::read(&p).is_ok_and(|d| d == f.data)
            && std::fs::metadata(&p).is_ok_and(|m| m.permissions().mode() & 0o7777 == f.mode)
    })
}

fn collect_files(base: &Path, dir: &Path, out: &mut BTreeSet<String>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_files(base, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(base) {
            out.insert(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(entries: &[(&str, &str, u32)]) -> Payload {
        entries
            .iter()
            .map(|(p, d, m)| {
                (
                    p.to_string(),
                    FileProjection {
                        data: d.as_bytes().to_vec(),
                        mode: *m,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn files_are_visible_through_data_symlinks_with_their_modes() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("vol");
        assert!(write(&t, &payload(&[("a", "1", 0o644), ("sub/b", "2", 0o400)])).unwrap());
        assert_eq!(std::fs::read_to_string(t.join("a")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(t.join("sub/b")).unwrap(), "2");
        assert_eq!(
            std::fs::read_link(t.join("a")).unwrap(),
            Path::new("..data/a")
        );
        assert_eq!(
            std::fs::read_link(t.join("sub")).unwrap(),
            Path::new("..data/sub")
        );
        let mode = std::fs::metadata(t.join("sub/b"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o400);
        assert!(std::fs::read_link(t.join("..data"))
            .unwrap()
            .to_string_lossy()
            .starts_with("..20"));
    }

    #[test]
    fn an_update_swaps_the_data_link_and_removes_old_names_and_dirs() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("vol");
        write(&t, &payload(&[("a", "1", 0o644), ("b", "x", 0o644)])).unwrap();
        let first = std::fs::read_link(t.join("..data")).unwrap();
        // An open handle on the old file keeps reading the old content (what a reader mid-update sees).
        let old_a = std::fs::read_to_string(t.join("a")).unwrap();
        assert!(write(&t, &payload(&[("a", "2", 0o644), ("c", "y", 0o644)])).unwrap());
        let second = std::fs::read_link(t.join("..data")).unwrap();
        assert_ne!(first, second);
        assert_eq!(old_a, "1");
        assert_eq!(std::fs::read_to_string(t.join("a")).unwrap(), "2");
        assert!(!t.join("b").exists() && std::fs::symlink_metadata(t.join("b")).is_err());
        assert_eq!(std::fs::read_to_string(t.join("c")).unwrap(), "y");
        assert!(!t.join(&first).exists(), "old payload dir removed");
        assert!(!t.join("..data_tmp").exists());
    }

    #[test]
    fn an_unchanged_payload_is_not_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("vol");
        let p = payload(&[("a", "1", 0o644)]);
        assert!(write(&t, &p).unwrap());
        let first = std::fs::read_link(t.join("..data")).unwrap();
        assert!(!write(&t, &p).unwrap());
        assert_eq!(std::fs::read_link(t.join("..data")).unwrap(), first);
        assert!(
            write(&t, &payload(&[("a", "1", 0o600)])).unwrap(),
            "mode change rewrites"
        );
    }

    #[test]
    fn escaping_paths_are_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("vol");
        for bad in ["../x", "/etc/passwd", "a/../../x", "..data", ""] {
            let err = write(&t, &payload(&[(bad, "1", 0o644)])).unwrap_err();
            assert!(
                matches!(err, VolumeError::InvalidPayload { .. }),
                "{bad}: {err}"
            );
        }
        assert!(!dir.path().join("x").exists());
    }
}
