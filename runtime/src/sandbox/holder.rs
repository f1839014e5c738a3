//! The sandbox holder: a tiny process owning a pod's network, IPC and UTS namespaces (and its PID namespace when
//! the pod shares one, as its PID 1), like Kubernetes' pause container. It sets the pod's hostname, brings up
//! loopback, reaps orphans and otherwise sleeps in `sigwait`.
//!
//! It is forked (not exec'd) from the runtime library, so it runs no logging and takes no locks.

use std::os::fd::AsRawFd;

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, Signal};

use crate::container::Failed;

extern "C" fn wake(_: libc::c_int) {}

/// Sets IFF_UP on `lo` in the current network namespace.
fn loopback_up() -> Result<(), Failed> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS fills the ifreq we pass, which lives across the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } != 0 {
        return Err(format!(
            "SIOCGIFFLAGS lo: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: reading and writing the flags member of the union SIOCGIFFLAGS just filled.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: SIOCSIFFLAGS reads the ifreq we pass.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) } != 0 {
        return Err(format!(
            "SIOCSIFFLAGS lo: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The holder's body, run as stage 2 of [`crate::container::spawn`]; returns only on a setup failure.
pub(crate) fn run(
    hostname: &str,
    sysctls: &[(String, String)],
    own_network: bool,
    report: &crate::container::Reporter,
) -> Failed {
    if let Err(e) = nix::unistd::setsid() {
        return format!("setsid: {e}");
    }
    if !hostname.is_empty() {
        if let Err(e) = nix::unistd::sethostname(hostname) {
            return format!("sethostname: {e}");
        }
    }
    // In the node's network namespace (hostNetwork) the node's loopback is left as it is.
    if own_network {
        if let Err(e) = loopback_up() {
            return e;
        }
    }
    // /proc/sys/net and the IPC sysctls show the namespaces of the process that opens them: ours, now.
    for (key, value) in sysctls {
        let path = std::path::Path::new("/proc/sys").join(key.replace('.', "/"));
        if let Err(e) = std::fs::write(&path, value) {
            return format!("sysctl {key}={value}: {e}");
        }
    }
    // A PID 1 of a PID namespace ignores signals it has no handler for, even when blocked: install one so
    // SIGTERM and SIGCHLD reach sigwait.
    let handler = SigAction::new(SigHandler::Handler(wake), SaFlags::empty(), SigSet::empty());
    let mut set = SigSet::empty();
    for sig in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGCHLD,
    ] {
        // SAFETY: the handler does nothing and is async-signal-safe.
        let _ = unsafe { sigaction(sig, &handler) };
        set.add(sig);
    }
    if let Err(e) = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        return format!("sigprocmask: {e}");
    }
    report.ready();
    // Nothing else to tell the runtime: close the report pipe and stdio (they may be the caller's pipes).
    crate::container::close_fds_except(&[]);
    if let Ok(null) = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDWR,
        nix::sys::stat::Mode::empty(),
    ) {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                while let Ok(s) =
                    nix::sys::wait::waitpid(None, Some(nix::sys::wait::WaitPidFlag::WNOHANG))
                {
                    if s == nix::sys::wait::WaitStatus::StillAlive {
                        break;
                    }
                }
            }
            // SAFETY: _exit ends the holder without running anything inherited from the parent.
            Ok(_) => unsafe { libc::_exit(0) },
            Err(_) => {}
        }
    }
}
