//! hostPath `type` checks (upstream `pkg/volume/hostpath`: `checkType`/`FileTypeChecker`).

use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use super::VolumeError;

fn fail(path: &Path, reason: &str) -> VolumeError {
    VolumeError::HostPathType {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Checks (and for the `...OrCreate` types creates) `path` per the hostPath `type`:
/// `""` no check; `DirectoryOrCreate` creates a 0755 directory (with parents); `Directory`; `FileOrCreate` creates
/// an empty 0644 file (its parent must exist, as upstream); `File`; `Socket`; `CharDevice`; `BlockDevice`.
pub fn check_host_path(path: &Path, type_: &str) -> Result<(), VolumeError> {
    let meta = std::fs::metadata(path);
    match type_ {
        "" => Ok(()),
        "DirectoryOrCreate" => match meta {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(fail(path, "is not a directory")),
            Err(_) => {
                std::fs::create_dir_all(path).map_err(|e| super::io(path, e))?;
                std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
                    .map_err(|e| super::io(path, e))
            }
        },
        "Directory" => match meta {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(fail(path, "is not a directory")),
            Err(_) => Err(fail(path, "does not exist")),
        },
        "FileOrCreate" => match meta {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(fail(path, "is not a file")),
            Err(_) => std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(path)
                .map(drop)
                .map_err(|e| super::io(path, e)),
        },
        "File" => match meta {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(fail(path, "is not a file")),
            Err(_) => Err(fail(path, "does not exist")),
        },
        "Socket" => match meta {
            Ok(m) if m.file_type().is_socket() => Ok(()),
            Ok(_) => Err(fail(path, "is not a socket file")),
            Err(_) => Err(fail(path, "does not exist")),
        },
        "CharDevice" => match meta {
            Ok(m) if m.file_type().is_char_device() => Ok(()),
            Ok(_) => Err(fail(path, "is not a character device")),
            Err(_) => Err(fail(path, "does not exist")),
        },
        "BlockDevice" => match meta {
            Ok(m) if m.file_type().is_block_device() => Ok(()),
            Ok(_) => Err(fail(path, "is not a block device")),
            Err(_) => Err(fail(path, "does not exist")),
        },
        other => Err(fail(path, &format!("has unknown hostPath type {other:?}"))),
    }
}
