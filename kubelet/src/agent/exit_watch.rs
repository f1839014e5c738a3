//! Wake-ups for a pod worker when one of its containers or its sandbox ends, so the worker reacts at once without
//! polling the runtime (upstream's PLEG relists every second and feeds container events to the pod workers; here
//! the runtime hands out a pidfd of each container's log shim, which exits right after recording the container's
//! exit status, and of each sandbox's holder).

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// What a watch is on: a container instance (API container ID) or a sandbox (its ID).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Watched {
    Container(String),
    Sandbox(String),
}

/// One task per watched process; dropping the set stops them all.
#[derive(Debug, Default)]
pub(crate) struct ExitWatches {
    tasks: HashMap<Watched, JoinHandle<()>>,
}

impl Drop for ExitWatches {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.abort();
        }
    }
}

impl ExitWatches {
    /// Drops the watches not in `wanted`, and those that fired (their process ended; a new instance needs a new
    /// watch); returns what in `wanted` has no watch now.
    pub(crate) fn keep_only(&mut self, wanted: &HashSet<Watched>) -> Vec<Watched> {
        self.tasks.retain(|k, t| {
            let keep = wanted.contains(k) && !t.is_finished();
            if !keep {
                t.abort();
            }
            keep
        });
        wanted
            .iter()
            .filter(|w| !self.tasks.contains_key(w))
            .cloned()
            .collect()
    }

    /// Wakes `wake` once `fd` (a pidfd) becomes readable, i.e. the process ended.
    pub(crate) fn watch(
        &mut self,
        what: Watched,
        fd: OwnedFd,
        wake: Arc<Notify>,
    ) -> std::io::Result<()> {
        // SAFETY: an OwnedFd is a valid open descriptor, owned by the AsyncFd from here on, and always returns
        // the same raw descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        let task = tokio::spawn(async move {
            // Readable (or an error, e.g. the reactor shutting down): either way the worker should look.
            let _ = fd.readable().await;
            wake.notify_one();
        });
        self.tasks.insert(what, task);
        Ok(())
    }

    pub(crate) fn clear(&mut self) {
        for t in self.tasks.values() {
            t.abort();
        }
        self.tasks.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::time::Duration;

    fn pidfd(pid: i32) -> OwnedFd {
        // SAFETY: pidfd_open takes a PID and flags; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }

    #[tokio::test]
    async fn a_watch_wakes_the_worker_when_the_process_ends_and_is_dropped_when_unwanted() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let wake = Arc::new(Notify::new());
        let mut w = ExitWatches::default();
        let what = Watched::Container("windlass://s/c.0".into());
        let wanted = HashSet::from([what.clone()]);
        assert_eq!(w.keep_only(&wanted), vec![what.clone()]);
        w.watch(what.clone(), pidfd(child.id() as i32), wake.clone())
            .unwrap();
        assert!(w.keep_only(&wanted).is_empty(), "watched now");
        tokio::time::timeout(Duration::from_secs(10), wake.notified())
            .await
            .expect("woken when the process exited");
        let _ = child.wait();
        // A watch that fired counts as missing: the next instance needs its own.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(w.keep_only(&wanted), vec![what]);
        assert!(w.keep_only(&HashSet::new()).is_empty());
        assert!(w.tasks.is_empty());
    }
}
