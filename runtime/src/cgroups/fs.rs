//! File-level cgroupfs helpers shared by the v1 and v2 managers: reading and writing control files, making a
//! cgroup path while marking the parents we created, and removing it again.
//!
//! Ownership marker: every *parent* directory that `create` makes carries the sticky bit (`S_ISVTX`). On cgroupfs
//! the bit means nothing to the kernel (no regular files can be created there), it is kept by kernfs for the life
//! of the directory, and it is visible to a later process: a restarted runtime rebuilds the manager from
//! `(cgroup_root, cgroups_path)` alone and `destroy` removes the leaf plus the empty marked ancestors, stopping at
//! the first ancestor that is unmarked (someone else made it, e.g. the pod sandbox or the administrator) or still
//! in use (`EBUSY`: another container of the same pod). The last container of a pod so removes the parents that the
//! first one created. The leaf itself is never marked: it always belongs to its manager.

use std::fs;
use std::io::{self, ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;

use super::CgroupError;

/// The mode bit that marks a parent directory as made by a Windlass cgroup manager.
const CREATED_MARKER: u32 = 0o1000;

/// Delays between `rmdir` attempts while a cgroup is still busy (exiting tasks are uncharged asynchronously; runc
/// retries the same way in `libcontainer/cgroups/utils.go` `RemovePath`/`rmdir`): about 0.6 s in total.
const RMDIR_RETRY_DELAYS_MS: [u64; 6] = [10, 20, 40, 80, 160, 320];

/// Turns an OCI `cgroupsPath` into a relative path of normal components (a leading `/` means "from the root").
pub(crate) fn normalize_cgroups_path(path: &Path) -> Result<PathBuf, CgroupError> {
    let invalid = |reason| CgroupError::InvalidPath {
        path: path.to_path_buf(),
        reason,
    };
    let mut rel = PathBuf::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(c) => {
                if c.to_str().is_none() {
                    return Err(invalid("not valid UTF-8"));
                }
                rel.push(c);
            }
            Component::ParentDir => return Err(invalid("`..` would leave the cgroup root")),
            Component::Prefix(_) => return Err(invalid("not a Unix path")),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(invalid("it names the cgroup root itself"));
    }
    Ok(rel)
}

pub(crate) fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a file that may legitimately be missing (an optional kernel feature): `None` then.
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(source) => Err(CgroupError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes `value` to an existing control file in one `write(2)`, as the kernel expects. Never creates the file:
/// on cgroupfs a missing file means the controller or feature is absent, and that must be an error. `O_TRUNC` as
/// runc's `cgroups.WriteFile` (cgroupfs ignores it; regular files in fixtures need it).
pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let result = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()));
    result.map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_string(),
        source,
    })
}

/// Parses a single number, or `max` as `None` (v2's and v1 pids' spelling of "unlimited").
pub(crate) fn parse_u64_or_max(path: &Path, content: &str) -> Result<Option<u64>, CgroupError> {
    let s = content.trim();
    if s == "max" {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|e| CgroupError::Parse {
        path: path.to_path_buf(),
        reason: format!("{s:?} is not a number: {e}"),
    })
}

/// Looks up `key` in a flat-keyed file (`memory.stat`, `cpu.stat`, `memory.events`, `memory.oom_control`):
/// lines of `key value`.
pub(crate) fn keyed_value(
    path: &Path,
    content: &str,
    key: &str,
) -> Result<Option<u64>, CgroupError> {
    for line in content.lines() {
        let mut fields = line.split_whitespace();
        if fields.next() == Some(key) {
            let value = fields.next().unwrap_or_default();
            return value.parse().map(Some).map_err(|e| CgroupError::Parse {
                path: path.to_path_buf(),
                reason: format!("{key} has value {value:?}: {e}"),
            });
        }
    }
    Ok(None)
}

pub(crate) fn is_marked_created(dir: &Path) -> bool {
    fs::symlink_metadata(dir)
        .is_ok_and(|m| m.is_dir() && m.permissions().mode() & CREATED_MARKER != 0)
}

fn mark_created(dir: &Path) -> io::Result<()> {
    let mut perms = fs::metadata(dir)?.permissions();
    perms.set_mode(perms.mode() | CREATED_MARKER);
    fs::set_permissions(dir, perms)
}

/// Makes `hierarchy/rel` one component at a time and returns the directories it made (outermost first). Parents it
/// makes get the ownership marker. Another container's `destroy` may remove a marked parent between our `mkdir`s
/// (`ENOENT`), so the walk restarts a few times. `after_mkdir` runs on each new directory before its child is
/// made (some settings, like v1 `memory.use_hierarchy`, are refused once a cgroup has children).
pub(crate) fn create_path(
    hierarchy: &Path,
    rel: &Path,
    after_mkdir: &dyn Fn(&Path),
) -> Result<Vec<PathBuf>, CgroupError> {
    const ATTEMPTS: usize = 3;
    let mut created = Vec::new();
    for attempt in 1..=ATTEMPTS {
        match try_create_path(hierarchy, rel, after_mkdir, &mut created) {
            Err(CgroupError::Create { source, .. })
                if source.kind() == ErrorKind::NotFound && attempt < ATTEMPTS =>
            {
                continue
            }
            other => return other.map(|()| created),
        }
    }
    Ok(created)
}

fn try_create_path(
    hierarchy: &Path,
    rel: &Path,
    after_mkdir: &dyn Fn(&Path),
    created: &mut Vec<PathBuf>,
) -> Result<(), CgroupError> {
    let mut dir = hierarchy.to_path_buf();
    let count = rel.components().count();
    for (i, component) in rel.components().enumerate() {
        dir.push(component);
        let is_leaf = i + 1 == count;
        // Parents get the marker in the mkdir itself (Linux honours S_ISVTX in mkdir(2)'s mode, cgroupfs
        // included), so a crash cannot leave an unmarked parent behind; chmod is the fallback.
        let mode = if is_leaf {
            0o755
        } else {
            0o755 | CREATED_MARKER
        };
        match fs::DirBuilder::new().mode(mode).create(&dir) {
            Ok(()) => {
                created.push(dir.clone());
                if !is_leaf && !is_marked_created(&dir) {
                    mark_created(&dir).map_err(|source| CgroupError::Create {
                        path: dir.clone(),
                        source,
                    })?;
                }
                after_mkdir(&dir);
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists && dir.is_dir() => {}
            Err(source) => return Err(CgroupError::Create { path: dir, source }),
        }
    }
    Ok(())
}

/// `rmdir` with retries while the kernel says the cgroup is busy. `Ok(false)` when it was already gone.
fn rmdir_retrying(dir: &Path) -> Result<bool, CgroupError> {
    let mut delays = RMDIR_RETRY_DELAYS_MS.iter();
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) if e.raw_os_error() == Some(Errno::EBUSY as i32) => match delays.next() {
                Some(ms) => std::thread::sleep(Duration::from_millis(*ms)),
                None => {
                    return Err(CgroupError::Remove {
                        path: dir.to_path_buf(),
                        source: e,
                    })
                }
            },
            Err(source) => {
                return Err(CgroupError::Remove {
                    path: dir.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// Child cgroup directories of `dir`, deepest first (a container may have made its own sub-cgroups; runc's
/// `RemovePath` removes them the same way). Control files are not touched: cgroupfs drops them with the directory.
fn subdirs_deepest_first(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            subdirs_deepest_first(&entry.path(), out);
            out.push(entry.path());
        }
    }
}

/// Removes `hierarchy/rel` (with any child cgroups), then every empty ancestor carrying the ownership marker.
/// Returns every error met; a missing directory is not an error (destroy is idempotent).
pub(crate) fn remove_path(hierarchy: &Path, rel: &Path) -> Vec<CgroupError> {
    let mut errors = Vec::new();
    let leaf = hierarchy.join(rel);
    let mut dirs = Vec::new();
    subdirs_deepest_first(&leaf, &mut dirs);
    dirs.push(leaf);
    for dir in &dirs {
        if let Err(e) = rmdir_retrying(dir) {
            errors.push(e);
        }
    }
    if !errors.is_empty() {
        // The leaf is still there, so its parents are not empty: leave them.
        return errors;
    }
    for ancestor in rel.ancestors().skip(1) {
        if ancestor.as_os_str().is_empty() {
            break;
        }
        let dir = hierarchy.join(ancestor);
        if !dir.exists() {
            continue;
        }
        if !is_marked_created(&dir) {
            break;
        }
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            // Still used by another container (cgroupfs says EBUSY; a plain directory says ENOTEMPTY): it is the
            // last user's job to remove it.
            Err(e)
                if e.raw_os_error() == Some(Errno::EBUSY as i32)
                    || e.raw_os_error() == Some(Errno::ENOTEMPTY as i32) =>
            {
                break
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(source) => {
                errors.push(CgroupError::Remove { path: dir, source });
                break;
            }
        }
    }
    errors
}

/// Undoes a partial `create`: removes what it made, innermost first, ignoring errors (best effort).
pub(crate) fn remove_created(created: &[PathBuf]) {
    for dir in created.iter().rev() {
        if let Err(e) = fs::remove_dir(dir) {
            tracing::warn!(path = %dir.display(), error = %e, "cannot roll back cgroup directory");
        }
    }
}

/// Every pid in `cgroup.procs` of `dir` and its child cgroups.
pub(crate) fn procs_recursive(dir: &Path) -> Result<Vec<nix::unistd::Pid>, CgroupError> {
    let mut dirs = vec![dir.to_path_buf()];
    subdirs_deepest_first(dir, &mut dirs);
    let mut pids = Vec::new();
    for d in dirs {
        let file = d.join("cgroup.procs");
        let content = match read_optional(&file)? {
            Some(c) => c,
            None if d == dir => return Err(CgroupError::NotFound { path: d }),
            None => continue,
        };
        for line in content.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let pid: i32 = line.parse().map_err(|e| CgroupError::Parse {
                path: file.clone(),
                reason: format!("{line:?} is not a pid: {e}"),
            })?;
            pids.push(nix::unistd::Pid::from_raw(pid));
        }
    }
    Ok(pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_path_is_made_relative_and_checked() {
        assert_eq!(
            normalize_cgroups_path(Path::new("/windlass/kubepods/pod1/c")).ok(),
            Some(PathBuf::from("windlass/kubepods/pod1/c"))
        );
        assert_eq!(
            normalize_cgroups_path(Path::new("a/./b")).ok(),
            Some(PathBuf::from("a/b"))
        );
        for bad in ["/", "", "a/../../etc", "."] {
            assert!(
                matches!(
                    normalize_cgroups_path(Path::new(bad)),
                    Err(CgroupError::InvalidPath { .. })
                ),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn keyed_files_and_max_values_are_parsed() {
        let p = Path::new("memory.stat");
        let stat = "cache 10\ninactive_file 4096\ntotal_inactive_file 8192\n";
        assert_eq!(keyed_value(p, stat, "inactive_file").ok(), Some(Some(4096)));
        assert_eq!(
            keyed_value(p, stat, "total_inactive_file").ok(),
            Some(Some(8192))
        );
        assert_eq!(keyed_value(p, stat, "rss").ok(), Some(None));
        assert!(keyed_value(p, "rss x\n", "rss").is_err());
        assert_eq!(parse_u64_or_max(p, "max\n").ok(), Some(None));
        assert_eq!(parse_u64_or_max(p, "42\n").ok(), Some(Some(42)));
    }

    #[test]
    fn create_marks_only_the_parents_it_made_and_remove_stops_at_the_first_unmarked_one(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        fs::create_dir_all(root.path().join("existing"))?;
        let rel = Path::new("existing/new-parent/leaf");
        let created = create_path(root.path(), rel, &|_| {})?;
        assert_eq!(
            created,
            vec![
                root.path().join("existing/new-parent"),
                root.path().join(rel)
            ]
        );
        assert!(!is_marked_created(&root.path().join("existing")));
        assert!(is_marked_created(&root.path().join("existing/new-parent")));
        assert!(!is_marked_created(&root.path().join(rel)));

        // A second container under the same parent: nothing new above its leaf.
        let sibling = Path::new("existing/new-parent/sibling");
        assert_eq!(
            create_path(root.path(), sibling, &|_| {})?,
            vec![root.path().join(sibling)]
        );

        // The first one leaves: the shared parent stays for the sibling.
        assert!(remove_path(root.path(), rel).is_empty());
        assert!(root.path().join("existing/new-parent").is_dir());
        // The last one leaves: the marked parent goes, the unmarked one stays.
        assert!(remove_path(root.path(), sibling).is_empty());
        assert!(!root.path().join("existing/new-parent").exists());
        assert!(root.path().join("existing").is_dir());
        // Destroy is idempotent.
        assert!(remove_path(root.path(), sibling).is_empty());
        Ok(())
    }

    #[test]
    fn each_new_directory_is_set_up_before_its_child_is_made(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        fs::create_dir(root.path().join("a"))?;
        let seen = std::cell::RefCell::new(Vec::new());
        create_path(root.path(), Path::new("a/b/c"), &|dir| {
            // The child must not exist yet when the parent is set up.
            let child_exists = fs::read_dir(dir)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true);
            seen.borrow_mut().push((dir.to_path_buf(), child_exists));
        })?;
        assert_eq!(
            seen.into_inner(),
            vec![
                (root.path().join("a/b"), false),
                (root.path().join("a/b/c"), false)
            ]
        );
        Ok(())
    }

    #[test]
    fn write_never_creates_a_missing_control_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let err = write(&dir.path().join("pids.max"), "10");
        assert!(
            matches!(err, Err(CgroupError::Write { ref path, .. }) if path.ends_with("pids.max"))
        );
        assert!(!dir.path().join("pids.max").exists());
        Ok(())
    }
}
