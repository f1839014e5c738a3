//! Host-local style address allocator.
//!
//! Layout (as containernetworking/plugins `ipam/host-local/backend/disk`): one directory per network under
//! `dataDir`, one file per allocated address named by the address and holding `<containerID>\r\n<ifname>`,
//! `last_reserved_ip.0` remembering where the round-robin search stopped, and a `lock` file every operation
//! holds with `flock(LOCK_EX)` so concurrent plugin processes never hand out one address twice.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::Ipv4Net;
use nix::fcntl::{Flock, FlockArg};

use crate::spec::Attachment;

const LOCK_FILE: &str = "lock";
const LAST_RESERVED_FILE: &str = "last_reserved_ip.0";
/// host-local's separator between container ID and interface name.
const LINE_BREAK: &str = "\r\n";

#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error("IPAM state {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("cannot lock IPAM state {path}: {source}")]
    Lock {
        path: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("no free address left in {subnet} ({allocated} allocated; the gateway, network and broadcast addresses are reserved)")]
    Exhausted { subnet: Ipv4Net, allocated: usize },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> IpamError + '_ {
    move |source| IpamError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The allocator for one network's subnet.
#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
    subnet: Ipv4Net,
}

/// Held while the state directory is being read or changed.
struct StateLock {
    _lock: Flock<File>,
}

impl Ipam {
    /// `dir` is `<dataDir>/<network name>`; it is created on first use.
    pub fn new(dir: impl Into<PathBuf>, subnet: Ipv4Net) -> Self {
        Self {
            dir: dir.into(),
            subnet: subnet.trunc(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn lock(&self) -> Result<StateLock, IpamError> {
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let path = self.dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, source)| IpamError::Lock { path, source })?;
        Ok(StateLock { _lock: lock })
    }

    /// The addresses pods may get: everything but network, gateway (`.1`) and broadcast.
    fn range(&self) -> (u32, u32) {
        let first = u32::from(self.subnet.network()) + 2;
        let last = u32::from(self.subnet.broadcast()) - 1;
        (first, last)
    }

    /// How many pod addresses the subnet has.
    pub fn capacity(&self) -> usize {
        let (first, last) = self.range();
        (last + 1).saturating_sub(first) as usize
    }

    /// Allocates an address for `who`, or returns the one it already holds (a repeated ADD gets the same
    /// address). The bool is true when the address was newly allocated by this call.
    pub fn allocate(&self, who: &Attachment) -> Result<(Ipv4Addr, bool), IpamError> {
        let _lock = self.lock()?;
        let current = self.read_allocations()?;
        if let Some((ip, _)) = current.iter().find(|(_, a)| *a == who) {
            return Ok((*ip, false));
        }
        let (first, last) = self.range();
        // Ref: host-local's RangeIter — start after the last reserved address and wrap around, so a freed address
        // is not handed out again at once but is reachable once the search wraps.
        let start = self
            .read_last_reserved()
            .map(u32::from)
            .filter(|ip| (first..=last).contains(ip))
            .map(|ip| if ip == last { first } else { ip + 1 })
            .unwrap_or(first);
        let span = last - first + 1;
        for step in 0..span {
            let candidate = first + (start - first + step) % span;
            let ip = Ipv4Addr::from(candidate);
            if current.contains_key(&ip) {
                continue;
            }
            let path = self.dir.join(ip.to_string());
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    f.write_all(
                        format!("{}{LINE_BREAK}{}", who.container_id, who.ifname).as_bytes(),
                    )
                    .map_err(io_err(&path))?;
                    // Best effort, like host-local: losing the hint only changes where the next search starts.
                    let last_path = self.dir.join(LAST_RESERVED_FILE);
                    if let Err(e) = fs::write(&last_path, ip.to_string()) {
                        tracing::warn!(path = %last_path.display(), error = %e, "cannot record last reserved IP");
                    }
                    return Ok((ip, true));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Err(IpamError::Exhausted {
            subnet: self.subnet,
            allocated: current.len(),
        })
    }

    /// The address `who` holds, if any.
    pub fn lookup(&self, who: &Attachment) -> Result<Option<Ipv4Addr>, IpamError> {
        let _lock = self.lock()?;
        Ok(self
            .read_allocations()?
            .into_iter()
            .find(|(_, a)| a == who)
            .map(|(ip, _)| ip))
    }

    /// Releases every address `who` holds; releasing nothing is not an error (DEL is idempotent).
    pub fn release(&self, who: &Attachment) -> Result<Vec<Ipv4Addr>, IpamError> {
        self.release_where(|a| a == who)
    }

    /// Releases only `ip`, and only if it is still held by `who` (rollback of a failed ADD).
    pub fn release_ip(&self, ip: Ipv4Addr, who: &Attachment) -> Result<bool, IpamError> {
        Ok(!self
            .release_where_ip(|i, a| i == ip && a == who)?
            .is_empty())
    }

    /// Releases every address whose holder `keep` rejects: 1.1's GC and the kubelet's leak recovery.
    pub fn retain(&self, keep: impl Fn(&Attachment) -> bool) -> Result<Vec<Ipv4Addr>, IpamError> {
        self.release_where(|a| !keep(a))
    }

    fn release_where(
        &self,
        pred: impl Fn(&Attachment) -> bool,
    ) -> Result<Vec<Ipv4Addr>, IpamError> {
        self.release_where_ip(|_, a| pred(a))
    }

    fn release_where_ip(
        &self,
        pred: impl Fn(Ipv4Addr, &Attachment) -> bool,
    ) -> Result<Vec<Ipv4Addr>, IpamError> {
        if !self.dir.exists() {
            return Ok(Vec::new());
        }
        let _lock = self.lock()?;
        let mut released = Vec::new();
        for (ip, who) in self.read_allocations()? {
            if pred(ip, &who) {
                let path = self.dir.join(ip.to_string());
                match fs::remove_file(&path) {
                    Ok(()) => released.push(ip),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err(&path)(e)),
                }
            }
        }
        Ok(released)
    }

    /// Every current allocation.
    pub fn allocations(&self) -> Result<BTreeMap<Ipv4Addr, Attachment>, IpamError> {
        if !self.dir.exists() {
            return Ok(BTreeMap::new());
        }
        let _lock = self.lock()?;
        self.read_allocations()
    }

    fn read_last_reserved(&self) -> Option<Ipv4Addr> {
        fs::read_to_string(self.dir.join(LAST_RESERVED_FILE))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Reads the allocation files (caller holds the lock). Files that are not addresses of our subnet are
    /// ignored, so stray files cannot break allocation.
    fn read_allocations(&self) -> Result<BTreeMap<Ipv4Addr, Attachment>, IpamError> {
        let mut out = BTreeMap::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err(&self.dir))?;
            let Some(ip) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<Ipv4Addr>().ok())
            else {
                continue;
            };
            if !self.subnet.contains(&ip) {
                continue;
            }
            let path = entry.path();
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                // Released by a process that did not take the lock (should not happen) — skip it.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err(&path)(e)),
            };
            // host-local before v0.7 wrote only the container ID.
            let mut lines = text.split(LINE_BREAK);
            let container_id = lines.next().unwrap_or_default().trim().to_string();
            let ifname = lines.next().unwrap_or_default().trim().to_string();
            out.insert(
                ip,
                Attachment {
                    container_id,
                    ifname,
                },
            );
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(id: &str) -> Attachment {
        Attachment {
            container_id: id.to_string(),
            ifname: "eth0".to_string(),
        }
    }

    fn ipam(dir: &Path, subnet: &str) -> Ipam {
        Ipam::new(dir.join("net"), subnet.parse().expect("subnet"))
    }

    #[test]
    fn the_first_pod_gets_dot_two_and_a_repeat_gets_the_same_address() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ipam = ipam(tmp.path(), "10.244.1.0/24");
        let (a, new) = ipam.allocate(&who("a")).expect("alloc");
        assert_eq!(a, Ipv4Addr::new(10, 244, 1, 2));
        assert!(new);
        assert_eq!(ipam.allocate(&who("a")).expect("alloc"), (a, false));
        let text = fs::read_to_string(tmp.path().join("net/10.244.1.2")).expect("state file");
        assert_eq!(text, "a\r\neth0");
    }

    #[test]
    fn a_slash_30_has_one_pod_address_then_is_exhausted() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ipam = ipam(tmp.path(), "10.9.0.0/30");
        assert_eq!(ipam.capacity(), 1);
        assert_eq!(
            ipam.allocate(&who("a")).expect("alloc").0,
            Ipv4Addr::new(10, 9, 0, 2)
        );
        assert!(matches!(
            ipam.allocate(&who("b")),
            Err(IpamError::Exhausted { .. })
        ));
    }

    #[test]
    fn freed_addresses_become_allocatable_again() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ipam = ipam(tmp.path(), "10.9.0.0/29"); // .2 - .6
        let ids: Vec<_> = (0..5).map(|i| who(&format!("c{i}"))).collect();
        for id in &ids {
            ipam.allocate(id).expect("alloc");
        }
        assert!(ipam.allocate(&who("x")).is_err());
        assert_eq!(
            ipam.release(&ids[1]).expect("release"),
            vec![Ipv4Addr::new(10, 9, 0, 3)]
        );
        assert_eq!(
            ipam.allocate(&who("x")).expect("alloc").0,
            Ipv4Addr::new(10, 9, 0, 3)
        );
    }

    #[test]
    fn release_of_an_unknown_container_is_a_no_op() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ipam = ipam(tmp.path(), "10.9.0.0/24");
        assert!(ipam.release(&who("nobody")).expect("release").is_empty());
    }

    #[test]
    fn retain_recovers_leaked_addresses() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ipam = ipam(tmp.path(), "10.9.0.0/24");
        for id in ["live", "dead1", "dead2"] {
            ipam.allocate(&who(id)).expect("alloc");
        }
        let freed = ipam.retain(|a| a.container_id == "live").expect("gc");
        assert_eq!(freed.len(), 2);
        let left: Vec<_> = ipam.allocations().expect("list").into_values().collect();
        assert_eq!(left, vec![who("live")]);
    }

    #[test]
    fn concurrent_allocations_never_share_an_address() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let ipam = ipam(tmp.path(), "10.9.0.0/24");
        let ips: Vec<Ipv4Addr> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..64)
                .map(|i| {
                    let ipam = ipam.clone();
                    s.spawn(move || ipam.allocate(&who(&format!("c{i}"))).expect("alloc").0)
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        let unique: std::collections::BTreeSet<_> = ips.iter().collect();
        assert_eq!(unique.len(), 64);
    }
}
