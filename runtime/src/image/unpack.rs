//! Safe layer unpacking into overlayfs form.
//!
//! A layer is unpacked into a fresh directory under the store's `tmp/` and renamed into `layers/<diffID>` only
//! when every entry applied and the uncompressed stream hashed to the expected diffID; on any error the temp
//! directory is removed, so nothing half-unpacked is ever visible.
//!
//! Safety: only this code writes into the temp directory, so the only symlinks in it are ones the layer itself
//! created. Every entry path is relative with no `..` (absolute paths are refused); every parent component must be
//! a real directory (a symlink there is refused: writing through it could leave the layer); an existing entry at
//! the target is unlinked first and files are created with `O_EXCL|O_NOFOLLOW`, so a symlink planted by an earlier
//! entry is never followed; hard-link targets obey the same rules and must already exist inside the layer.
//!
//! Whiteouts follow the OCI image spec (layer.md#whiteouts) and are converted to overlayfs form: `.wh.NAME` becomes
//! a 0:0 character device `NAME`, `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory
//! (Ref: kernel Documentation/filesystems/overlayfs.rst "whiteouts and opaque directories").

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::sys::stat::{makedev, mknod, utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use tar::EntryType;

use super::digest::HashingReader;

/// Why a layer could not be unpacked. Carries the offending entry so an operator can see which route was tried.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry `{entry}` has an absolute path; layers must use relative paths")]
    AbsolutePath { entry: String },
    #[error("layer entry `{entry}` contains `..`, which could write outside the layer")]
    ParentComponent { entry: String },
    #[error("layer entry `{entry}` would be written through symlink `{symlink}`, which could point outside the layer")]
    ThroughSymlink { entry: String, symlink: String },
    #[error("layer entry `{entry}`: parent `{parent}` is not a directory")]
    NotADirectory { entry: String, parent: String },
    #[error("hard link `{entry}` points to `{target}`, which is not a file inside this layer")]
    BadHardLink { entry: String, target: String },
    #[error("layer entry `{entry}`: {what}")]
    BadEntry { entry: String, what: String },
    #[error(
        "layer content hashes to {actual}, but the image config says its diffID is {expected}"
    )]
    DiffIdMismatch { expected: String, actual: String },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading layer stream: {0}")]
    Stream(#[source] io::Error),
}

fn io_at<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> UnpackError + 'a {
    move |source| UnpackError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// What unpacking a layer produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnpackStats {
    pub diff_id: String,
    pub uncompressed_size: u64,
    pub entries: u64,
}

/// Compression of a layer blob, sniffed from its first bytes (media types lie in the wild, e.g. `docker save`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
}

pub(crate) fn sniff(head: &[u8]) -> Compression {
    if head.starts_with(&[0x1f, 0x8b]) {
        Compression::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Compression::Zstd
    } else {
        Compression::None
    }
}

/// A decompressing reader over a layer blob file.
pub(crate) fn open_layer(path: &Path) -> Result<Box<dyn Read + Send>, UnpackError> {
    let file = File::open(path).map_err(io_at("open", path))?;
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let head = reader.fill_buf().map_err(io_at("read", path))?;
    Ok(match sniff(head) {
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(reader)),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::with_buffer(reader).map_err(io_at("zstd", path))?)
        }
        Compression::None => Box::new(reader),
    })
}

/// Unpacks the layer blob at `blob` into `dest` (which must not exist), checking the uncompressed stream against
/// `expected_diff_id` when given. `scratch` is a path on the same filesystem as `dest` for the temp directory.
pub fn unpack_layer(
    blob: &Path,
    dest: &Path,
    scratch: &Path,
    expected_diff_id: Option<&str>,
) -> Result<UnpackStats, UnpackError> {
    let reader = open_layer(blob)?;
    fs::create_dir(scratch).map_err(io_at("create", scratch))?;
    let result = unpack_stream(reader, scratch).and_then(|stats| {
        if let Some(expected) = expected_diff_id {
            if expected != stats.diff_id {
                return Err(UnpackError::DiffIdMismatch {
                    expected: expected.to_string(),
                    actual: stats.diff_id,
                });
            }
        }
        fs::rename(scratch, dest).map_err(io_at("rename", dest))?;
        Ok(stats)
    });
    if result.is_err() {
        // Nothing half-unpacked stays behind; a failure to clean up is logged, the unpack error is what matters.
        if let Err(e) = fs::remove_dir_all(scratch) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %scratch.display(), error = %e, "cannot remove failed unpack");
            }
        }
    }
    result
}

/// Applies a tar stream to the (empty, private) directory `root`; returns the diffID of the stream.
pub(crate) fn unpack_stream(reader: impl Read, root: &Path) -> Result<UnpackStats, UnpackError> {
    // tar reads 512-byte headers; buffer the decompressed stream so each is not a separate decoder call.
    let mut hashing = HashingReader::new(io::BufReader::with_capacity(128 * 1024, reader));
    let mut entries = 0u64;
    {
        let mut archive = tar::Archive::new(&mut hashing);
        let mut state = Unpacker {
            root,
            known_dirs: HashSet::new(),
            dir_times: Vec::new(),
            // SAFETY: geteuid and getegid have no preconditions and cannot fail.
            ids: unsafe { (libc::geteuid(), libc::getegid()) },
            umask: current_umask(),
        };
        for entry in archive.entries().map_err(UnpackError::Stream)? {
            let entry = entry.map_err(UnpackError::Stream)?;
            state.apply(entry)?;
            entries += 1;
        }
        // Directory mtimes last: creating children changes them.
        for (path, mtime) in state.dir_times.iter().rev() {
            set_mtime(path, *mtime)?;
        }
    }
    let (diff_id, uncompressed_size) = hashing.finish().map_err(UnpackError::Stream)?;
    Ok(UnpackStats {
        diff_id,
        uncompressed_size,
        entries,
    })
}

struct Unpacker<'a> {
    root: &'a Path,
    /// Relative paths checked (or created) as real directories; dropped when something replaces them.
    known_dirs: HashSet<PathBuf>,
    dir_times: Vec<(PathBuf, (i64, i64))>,
    /// Our effective uid/gid: new files already carry them, so chown is skipped when the entry matches.
    ids: (u32, u32),
    umask: u32,
}

fn current_umask() -> u32 {
    // SAFETY: umask cannot fail; it is set back to the value it returned straight away.
    unsafe {
        let old = libc::umask(0o022);
        libc::umask(old);
        old
    }
}

/// The entry path as relative components, refusing absolute paths and `..`.
fn clean_path(raw: &Path, entry: &str) -> Result<Vec<OsString>, UnpackError> {
    let mut out = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(s) => out.push(s.to_os_string()),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(UnpackError::AbsolutePath {
                    entry: entry.to_string(),
                })
            }
            Component::ParentDir => {
                return Err(UnpackError::ParentComponent {
                    entry: entry.to_string(),
                })
            }
        }
    }
    Ok(out)
}

impl Unpacker<'_> {
    /// Makes sure every component of `parents` is a real directory inside the root (creating missing ones),
    /// never following a symlink. Returns the absolute parent path.
    fn ensure_parents(
        &mut self,
        parents: &[OsString],
        entry: &str,
    ) -> Result<PathBuf, UnpackError> {
        let mut rel = PathBuf::new();
        for comp in parents {
            rel.push(comp);
            if self.known_dirs.contains(&rel) {
                continue;
            }
            let abs = self.root.join(&rel);
            match fs::symlink_metadata(&abs) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(UnpackError::ThroughSymlink {
                        entry: entry.to_string(),
                        symlink: rel.display().to_string(),
                    })
                }
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(UnpackError::NotADirectory {
                        entry: entry.to_string(),
                        parent: rel.display().to_string(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&abs).map_err(io_at("create", &abs))?;
                }
                Err(e) => return Err(io_at("stat", &abs)(e)),
            }
            self.known_dirs.insert(rel.clone());
        }
        Ok(self.root.join(rel))
    }

    /// Removes whatever is at `abs` (relative `rel`) so a new entry can take its place; `keep_dir` leaves an
    /// existing directory alone (a directory entry re-applied only updates metadata).
    fn clear(&mut self, abs: &Path, rel: &Path, keep_dir: bool) -> Result<(), UnpackError> {
        match fs::symlink_metadata(abs) {
            Ok(m) if m.is_dir() => {
                if keep_dir {
                    return Ok(());
                }
                fs::remove_dir_all(abs).map_err(io_at("remove", abs))?;
            }
            Ok(_) => fs::remove_file(abs).map_err(io_at("remove", abs))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_at("stat", abs)(e)),
        }
        self.known_dirs.retain(|d| !d.starts_with(rel));
        Ok(())
    }

    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = entry.path().map_err(UnpackError::Stream)?.into_owned();
        let name_for_errors = raw.display().to_string();
        let comps = clean_path(&raw, &name_for_errors)?;
        let Some((last, parents)) = comps.split_last() else {
            // The layer root itself (`./`): nothing to create.
            return Ok(());
        };
        let last_bytes = last.as_bytes();
        let header = entry.header().clone();
        let kind = header.entry_type();

        // Whiteouts (OCI image spec layer.md#whiteouts), converted to overlayfs form.
        if last_bytes == b".wh..wh..opq" {
            let dir = self.ensure_parents(parents, &name_for_errors)?;
            return set_xattr(&dir, "trusted.overlay.opaque", b"y");
        }
        if last_bytes.starts_with(b".wh..wh.") {
            // AUFS bookkeeping (e.g. `.wh..wh.plnk`), meaningless here.
            return Ok(());
        }
        if let Some(hidden) = last_bytes.strip_prefix(b".wh.") {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(UnpackError::BadEntry {
                    entry: name_for_errors,
                    what: "whiteout names no file".into(),
                });
            }
            let dir = self.ensure_parents(parents, &name_for_errors)?;
            let rel: PathBuf = parents
                .iter()
                .collect::<PathBuf>()
                .join(OsStr::from_bytes(hidden));
            let target = dir.join(OsStr::from_bytes(hidden));
            self.clear(&target, &rel, false)?;
            mknod(&target, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).map_err(|e| {
                UnpackError::Io {
                    op: "mknod whiteout",
                    path: target.clone(),
                    source: e.into(),
                }
            })?;
            return Ok(());
        }

        let dir = self.ensure_parents(parents, &name_for_errors)?;
        let abs = dir.join(last);
        let rel: PathBuf = comps.iter().collect();
        let file_mode = header.mode().unwrap_or(0o644) & 0o7777;
        match kind {
            EntryType::Directory => {
                self.clear(&abs, &rel, true)?;
                if !abs.is_dir() {
                    fs::create_dir(&abs).map_err(io_at("create", &abs))?;
                }
                self.known_dirs.insert(rel.clone());
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                // O_EXCL|O_NOFOLLOW: never open what an earlier entry left there (it may be a symlink that
                // points out); only when something exists is it removed and the create retried.
                let create = || {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(file_mode & 0o777)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&abs)
                };
                let mut file = match create() {
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        self.clear(&abs, &rel, false)?;
                        create()
                    }
                    other => other,
                }
                .map_err(io_at("create", &abs))?;
                io::copy(&mut entry, &mut file).map_err(io_at("write", &abs))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(UnpackError::Stream)?
                    .ok_or_else(|| UnpackError::BadEntry {
                        entry: name_for_errors.clone(),
                        what: "symlink without a target".into(),
                    })?
                    .into_owned();
                self.clear(&abs, &rel, false)?;
                // The target may point anywhere: it is resolved inside the container's root at run time, and
                // we never write through it (see ensure_parents and O_NOFOLLOW above).
                symlink(&target, &abs).map_err(io_at("symlink", &abs))?;
            }
            EntryType::Link => {
                let target_raw = entry
                    .link_name()
                    .map_err(UnpackError::Stream)?
                    .ok_or_else(|| UnpackError::BadEntry {
                        entry: name_for_errors.clone(),
                        what: "hard link without a target".into(),
                    })?
                    .into_owned();
                let bad = || UnpackError::BadHardLink {
                    entry: name_for_errors.clone(),
                    target: target_raw.display().to_string(),
                };
                let tcomps = clean_path(&target_raw, &name_for_errors).map_err(|_| bad())?;
                let Some((tlast, tparents)) = tcomps.split_last() else {
                    return Err(bad());
                };
                // The target's parents must be real directories already in this layer (no symlink hops).
                let mut tdir = self.root.to_path_buf();
                for c in tparents {
                    tdir.push(c);
                    match fs::symlink_metadata(&tdir) {
                        Ok(m) if m.is_dir() => {}
                        _ => return Err(bad()),
                    }
                }
                let tabs = tdir.join(tlast);
                match fs::symlink_metadata(&tabs) {
                    Ok(m) if !m.is_dir() => {}
                    _ => return Err(bad()),
                }
                if tabs == abs {
                    return Ok(());
                }
                self.clear(&abs, &rel, false)?;
                // link(2) does not follow a symlink target, so a link to a symlink links the symlink itself.
                fs::hard_link(&tabs, &abs).map_err(io_at("link", &abs))?;
                // A hard link shares the inode: its metadata came with the first name.
                return Ok(());
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                self.clear(&abs, &rel, false)?;
                let (sflag, dev) = match kind {
                    EntryType::Fifo => (SFlag::S_IFIFO, 0),
                    other => {
                        let major = header.device_major().ok().flatten().unwrap_or(0);
                        let minor = header.device_minor().ok().flatten().unwrap_or(0);
                        let flag = if other == EntryType::Char {
                            SFlag::S_IFCHR
                        } else {
                            SFlag::S_IFBLK
                        };
                        (flag, makedev(u64::from(major), u64::from(minor)))
                    }
                };
                mknod(&abs, sflag, Mode::from_bits_truncate(0o600), dev).map_err(|e| {
                    UnpackError::Io {
                        op: "mknod",
                        path: abs.clone(),
                        source: e.into(),
                    }
                })?;
            }
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => {
                return Ok(());
            }
            other => {
                tracing::debug!(entry = %name_for_errors, kind = ?other, "skipping unsupported tar entry type");
                return Ok(());
            }
        }

        // Metadata: owner first (chown clears set-id bits), then mode, xattrs, mtime.
        let mut uid = header.uid().unwrap_or(0);
        let mut gid = header.gid().unwrap_or(0);
        let mut mtime = (header.mtime().unwrap_or(0) as i64, 0i64);
        let mut xattrs: Vec<(String, Vec<u8>)> = Vec::new();
        if let Ok(Some(pax)) = entry.pax_extensions() {
            for ext in pax.flatten() {
                let Ok(key) = ext.key() else { continue };
                let value = ext.value_bytes();
                match key {
                    "uid" => uid = parse_num(value).unwrap_or(uid),
                    "gid" => gid = parse_num(value).unwrap_or(gid),
                    "mtime" => mtime = parse_time(value).unwrap_or(mtime),
                    _ => {
                        if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                            xattrs.push((name.to_string(), value.to_vec()));
                        }
                    }
                }
            }
        }
        let uid = u32::try_from(uid).map_err(|_| UnpackError::BadEntry {
            entry: name_for_errors.clone(),
            what: format!("uid {uid} out of range"),
        })?;
        let gid = u32::try_from(gid).map_err(|_| UnpackError::BadEntry {
            entry: name_for_errors.clone(),
            what: format!("gid {gid} out of range"),
        })?;
        let chowned = (uid, gid) != self.ids;
        if chowned {
            lchown(&abs, Some(uid), Some(gid)).map_err(io_at("chown", &abs))?;
        }
        // A new regular file already has its permission bits unless the umask took some, chown cleared
        // set-id bits, or it has set-id/sticky bits open(2) does not apply.
        let created_exact = matches!(
            kind,
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse
        ) && !chowned
            && file_mode & 0o7000 == 0
            && file_mode & self.umask == 0;
        if kind != EntryType::Symlink && !created_exact {
            fs::set_permissions(&abs, fs::Permissions::from_mode(file_mode))
                .map_err(io_at("chmod", &abs))?;
        }
        for (name, value) in xattrs {
            // Overlay's own attributes (redirect, metacopy, origin ...) would let a layer redirect lookups to
            // other layers' paths; only our whiteout conversion may set them.
            if name.starts_with("trusted.overlay.") {
                tracing::warn!(entry = %name_for_errors, xattr = %name, "dropping overlay xattr from layer");
                continue;
            }
            set_xattr(&abs, &name, &value)?;
        }
        if kind == EntryType::Directory {
            self.dir_times.push((abs, mtime));
        } else {
            set_mtime(&abs, mtime)?;
        }
        Ok(())
    }
}

fn parse_num(value: &[u8]) -> Option<u64> {
    std::str::from_utf8(value).ok()?.trim().parse().ok()
}

fn parse_time(value: &[u8]) -> Option<(i64, i64)> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = secs.parse().ok()?;
    let mut nanos: i64 = 0;
    for (i, c) in frac.chars().take(9).enumerate() {
        nanos += i64::from(c.to_digit(10)?) * 10i64.pow(8 - i as u32);
    }
    Some((secs, nanos))
}

fn set_mtime(path: &Path, (secs, nanos): (i64, i64)) -> Result<(), UnpackError> {
    let ts = TimeSpec::new(secs, nanos);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &ts,
        &ts,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|e| UnpackError::Io {
        op: "utimensat",
        path: path.to_path_buf(),
        source: e.into(),
    })
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> Result<(), UnpackError> {
    let err = |source: io::Error| UnpackError::Io {
        op: "setxattr",
        path: path.to_path_buf(),
        source,
    };
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|e| err(io::Error::other(e)))?;
    let cname = CString::new(name).map_err(|e| err(io::Error::other(e)))?;
    // SAFETY: both strings are NUL-terminated and live across the call; value points to value.len() bytes.
    let rc = unsafe {
        libc::lsetxattr(
            cpath.as_ptr(),
            cname.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(err(io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_with_dotdot_or_a_root_are_refused() {
        assert!(matches!(
            clean_path(Path::new("a/../../etc"), "x"),
            Err(UnpackError::ParentComponent { .. })
        ));
        assert!(matches!(
            clean_path(Path::new("/etc/passwd"), "x"),
            Err(UnpackError::AbsolutePath { .. })
        ));
        assert_eq!(
            clean_path(Path::new("./usr/bin/"), "x").ok(),
            Some(vec![OsString::from("usr"), OsString::from("bin")])
        );
    }

    #[test]
    fn pax_times_keep_their_fraction() {
        assert_eq!(
            parse_time(b"1700000000.5"),
            Some((1_700_000_000, 500_000_000))
        );
        assert_eq!(parse_time(b"12"), Some((12, 0)));
    }

    #[test]
    fn compression_is_sniffed_from_magic_bytes() {
        assert_eq!(sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(sniff(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(sniff(b"usr/\0"), Compression::None);
    }
}
