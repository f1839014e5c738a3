//! Content digests (`sha256:<64 hex>`), the only algorithm the store accepts.
//!
//! A digest from a registry ends up in a file name, so it is validated before any path is built from it: a
//! manifest that names `sha256:../../etc` must fail here, not in the filesystem.

use std::io::{self, Read, Write};

use sha2::{Digest as _, Sha256};

/// Why a string is not a digest the store can use.
#[derive(Debug, thiserror::Error)]
#[error("`{digest}` is not a sha256 digest (expected `sha256:` and 64 lowercase hex digits)")]
pub struct DigestError {
    pub digest: String,
}

/// The hex part of a `sha256:` digest, after checking its form.
pub(crate) fn hex_of(digest: &str) -> Result<&str, DigestError> {
    let hex = digest.strip_prefix("sha256:").ok_or_else(|| DigestError {
        digest: digest.to_string(),
    })?;
    if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(hex)
    } else {
        Err(DigestError {
            digest: digest.to_string(),
        })
    }
}

/// The `sha256:` digest of `bytes`.
pub(crate) fn of_bytes(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// A reader that hashes everything read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Reads what is left (a tar stream ends before its padding does), then returns the digest and byte count.
    pub(crate) fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        ))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

/// A writer that hashes everything written through it.
pub(crate) struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub(crate) fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    pub(crate) fn finish(self) -> (W, String, u64) {
        (
            self.inner,
            format!("sha256:{}", hex::encode(self.hasher.finalize())),
            self.count,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_that_could_escape_a_directory_are_refused() {
        assert!(hex_of("sha256:../../etc/passwd").is_err());
        assert!(hex_of("md5:abc").is_err());
        assert!(hex_of(&format!("sha256:{}", "A".repeat(64))).is_err());
        let ok = of_bytes(b"hello");
        assert_eq!(
            hex_of(&ok).ok(),
            Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
        );
    }
}
