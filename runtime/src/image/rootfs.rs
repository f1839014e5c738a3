//! Container root filesystems: an overlay of the image's layer directories (read-only lowers, top layer first)
//! with a per-container upper and work directory under `containers/<id>/`, removed with the container.
//!
//! Ref: kernel Documentation/filesystems/overlayfs.rst. The classic `mount(2)` data string is limited to one page,
//! which ~50 layers of absolute paths exceed; then we use the new mount API (`fsopen`/`fsconfig`, kernel 5.2+) and
//! append lowers one by one with `lowerdir+` (kernel 6.8+), which has no such limit.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::store::{remove_tree, ImageRecord, Store, StoreError};

/// What failed while preparing or removing a root filesystem.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("layer {diff_id} of {image} is not unpacked in the store")]
    MissingLayer { image: String, diff_id: String },
    #[error("overlay mount at {target} failed: {source}")]
    Mount {
        target: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("path {0} cannot be used in overlay options (contains `,`, `:` or a NUL)")]
    BadPath(PathBuf),
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing the root filesystem failed: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Teardown(Vec<RootfsError>),
}

/// A prepared container root filesystem.
#[derive(Debug, Clone)]
pub struct Rootfs {
    pub record: ImageRecord,
    pub target: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
}

fn opt_path(p: &Path) -> Result<&str, RootfsError> {
    match p.to_str() {
        Some(s) if !s.contains([',', ':', '\0']) => Ok(s),
        _ => Err(RootfsError::BadPath(p.to_path_buf())),
    }
}

/// Mounts an overlay of `lowers` (top layer first) with `upper`/`work` at `target`.
pub fn mount_overlay(
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    target: &Path,
) -> Result<(), RootfsError> {
    let lower_strs = lowers
        .iter()
        .map(|p| opt_path(p))
        .collect::<Result<Vec<_>, _>>()?;
    let data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower_strs.join(":"),
        opt_path(upper)?,
        opt_path(work)?
    );
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|p| usize::try_from(p).ok())
        .unwrap_or(4096);
    let res = if data.len() < page {
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(io::Error::from)
    } else {
        tracing::debug!(
            layers = lowers.len(),
            bytes = data.len(),
            "overlay options exceed a page; using fsconfig lowerdir+"
        );
        mount_overlay_fsconfig(&lower_strs, opt_path(upper)?, opt_path(work)?, target)
    };
    res.map_err(|source| RootfsError::Mount {
        target: target.to_path_buf(),
        source,
    })
}

// Ref: include/uapi/linux/mount.h
const FSOPEN_CLOEXEC: libc::c_uint = 1;
const FSCONFIG_SET_STRING: libc::c_uint = 1;
const FSCONFIG_CMD_CREATE: libc::c_uint = 6;
const FSMOUNT_CLOEXEC: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 4;

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(io::Error::other)
}

fn check(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn fsconfig_string(fs_fd: &OwnedFd, key: &str, value: &str) -> io::Result<()> {
    let (k, v) = (cstr(key)?, cstr(value)?);
    // SAFETY: fs_fd is an open fs context; key and value are NUL-terminated strings alive for the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs_fd.as_raw_fd(),
            FSCONFIG_SET_STRING,
            k.as_ptr(),
            v.as_ptr(),
            0,
        )
    })?;
    Ok(())
}

fn mount_overlay_fsconfig(
    lowers: &[&str],
    upper: &str,
    work: &str,
    target: &Path,
) -> io::Result<()> {
    let name = cstr("overlay")?;
    // SAFETY: name is NUL-terminated; the returned fd is checked and then owned.
    let fs_fd = check(unsafe { libc::syscall(libc::SYS_fsopen, name.as_ptr(), FSOPEN_CLOEXEC) })?;
    // SAFETY: fsopen returned a new fd that nothing else owns.
    let fs_fd = unsafe { OwnedFd::from_raw_fd(fs_fd as i32) };
    for lower in lowers {
        fsconfig_string(&fs_fd, "lowerdir+", lower)?;
    }
    fsconfig_string(&fs_fd, "upperdir", upper)?;
    fsconfig_string(&fs_fd, "workdir", work)?;
    // SAFETY: plain syscall on the fs context fd; no pointers.
    check(unsafe {
        libc::syscall(
            libc::SYS_fsconfig,
            fs_fd.as_raw_fd(),
            FSCONFIG_CMD_CREATE,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<libc::c_void>(),
            0,
        )
    })?;
    // SAFETY: creates a detached mount from the configured context; the fd is checked and then owned.
    let mnt =
        check(unsafe { libc::syscall(libc::SYS_fsmount, fs_fd.as_raw_fd(), FSMOUNT_CLOEXEC, 0) })?;
    // SAFETY: fsmount returned a new fd that nothing else owns.
    let mnt = unsafe { OwnedFd::from_raw_fd(mnt as i32) };
    let empty = cstr("")?;
    let to = CString::new(target.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: moves the detached mount (mnt, empty path) onto `to`; both strings are NUL-terminated.
    check(unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            mnt.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH,
        )
    })?;
    Ok(())
}

impl Store {
    /// Mounts `image`'s root filesystem for `container_id` at `target` (created if missing) and leases the
    /// image to the container. Undone by [`Store::remove_rootfs`].
    pub fn prepare_rootfs(
        &self,
        image: &str,
        container_id: &str,
        target: &Path,
    ) -> Result<Rootfs, RootfsError> {
        let dir = self.container_dir(container_id)?;
        let record = self.lease(image, container_id)?;
        let result = (|| {
            let mut lowers = Vec::with_capacity(record.layers.len());
            for layer in record.layers.iter().rev() {
                let p = self.layer_path(&layer.diff_id)?;
                if !p.is_dir() {
                    return Err(RootfsError::MissingLayer {
                        image: record.reference.clone(),
                        diff_id: layer.diff_id.clone(),
                    });
                }
                lowers.push(p);
            }
            let upper = dir.join("upper");
            let work = dir.join("work");
            for d in [&upper, &work, &target.to_path_buf()] {
                fs::create_dir_all(d).map_err(|source| RootfsError::Io {
                    op: "create",
                    path: d.clone(),
                    source,
                })?;
            }
            if lowers.is_empty() {
                // overlayfs needs a lower layer; an image without layers gets an empty one.
                let empty = dir.join("empty");
                fs::create_dir_all(&empty).map_err(|source| RootfsError::Io {
                    op: "create",
                    path: empty.clone(),
                    source,
                })?;
                lowers.push(empty);
            }
            mount_overlay(&lowers, &upper, &work, target)?;
            tracing::info!(container = %container_id, image = %record.reference, target = %target.display(),
                layers = record.layers.len(), "root filesystem mounted");
            Ok(Rootfs {
                record: record.clone(),
                target: target.to_path_buf(),
                upper,
                work,
            })
        })();
        if result.is_err() {
            let _ = remove_tree(&dir);
            let _ = self.release(container_id);
        }
        result
    }

    /// Unmounts `target` (if mounted), deletes the container's upper/work directories and releases its lease.
    /// Does every step even when one fails, then reports all failures.
    pub fn remove_rootfs(&self, container_id: &str, target: &Path) -> Result<(), RootfsError> {
        let mut errors = Vec::new();
        match umount2(target, MntFlags::empty()) {
            Ok(()) => {}
            // Not mounted (already removed) or not there: nothing to undo.
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(nix::errno::Errno::EBUSY) => {
                if let Err(e) = umount2(target, MntFlags::MNT_DETACH) {
                    errors.push(RootfsError::Mount {
                        target: target.to_path_buf(),
                        source: e.into(),
                    });
                }
            }
            Err(e) => errors.push(RootfsError::Mount {
                target: target.to_path_buf(),
                source: e.into(),
            }),
        }
        match self.container_dir(container_id) {
            Ok(dir) => {
                if let Err(e) = remove_tree(&dir) {
                    errors.push(e.into());
                }
            }
            Err(e) => errors.push(e.into()),
        }
        if let Err(e) = self.release(container_id) {
            errors.push(e.into());
        }
        if errors.is_empty() {
            tracing::info!(container = %container_id, "root filesystem removed");
            Ok(())
        } else {
            Err(RootfsError::Teardown(errors))
        }
    }
}
