//! Terminals: the container side allocates a pty from its own devpts and sends the master over a unix socket with
//! `SCM_RIGHTS`, as runc does with `--console-socket` (the message body is the slave's name). A foreground `run` or
//! `exec` receives it over a socketpair and copies bytes between it and its own stdio.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::fcntl::OFlag;
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

use super::process::Failed;

/// In the container: makes a pty the controlling terminal and stdio, then sends the master to `socket`.
pub(crate) fn setup_console(socket: RawFd, size: Option<(u16, u16)>) -> Result<(), Failed> {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| format!("open /dev/ptmx: {e}"))?;
    grantpt(&master).map_err(|e| format!("grantpt: {e}"))?;
    unlockpt(&master).map_err(|e| format!("unlockpt: {e}"))?;
    let name = ptsname_r(&master).map_err(|e| format!("ptsname: {e}"))?;
    if let Some((rows, cols)) = size {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads a winsize struct that lives across the call.
        unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    }
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| format!("open {name}: {e}"))?;
    // Ref: runc binds the pty slave over /dev/console.
    let console = std::path::Path::new("/dev/console");
    if std::fs::File::create(console).is_ok() {
        let _ = nix::mount::mount(
            Some(name.as_str()),
            console,
            None::<&str>,
            nix::mount::MsFlags::MS_BIND,
            None::<&str>,
        );
    }
    // SAFETY: TIOCSCTTY on a terminal fd we own, in a session we lead (setsid ran before).
    if unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) } != 0 {
        return Err(format!("TIOCSCTTY: {}", std::io::Error::last_os_error()));
    }
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors; both fds are valid.
        if unsafe { libc::dup2(slave.as_raw_fd(), fd) } < 0 {
            return Err(format!("dup2 pty: {}", std::io::Error::last_os_error()));
        }
    }
    let fds = [master.as_raw_fd()];
    sendmsg::<()>(
        socket,
        &[IoSlice::new(name.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .map_err(|e| format!("send pty master over console socket: {e}"))?;
    Ok(())
}

/// Gives the pty `master` the window size of our stdin's terminal (if stdin is one).
pub fn copy_window_size(master: std::os::fd::BorrowedFd<'_>) {
    // SAFETY: winsize is plain old data; TIOCGWINSZ fills it, TIOCSWINSZ reads it; both fds are valid.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(libc::STDIN_FILENO, libc::TIOCGWINSZ, &mut ws) == 0 {
            libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws);
        }
    }
}

/// Our stdin in raw mode while a foreground terminal is proxied (keys go to the container unprocessed, as with
/// runc); the previous mode comes back on drop.
pub struct RawTerminal {
    saved: nix::sys::termios::Termios,
}

impl RawTerminal {
    /// None when stdin is not a terminal.
    pub fn enable() -> Option<Self> {
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw).ok()?;
        Some(Self { saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = nix::sys::termios::tcsetattr(
            std::io::stdin(),
            nix::sys::termios::SetArg::TCSANOW,
            &self.saved,
        );
    }
}

/// Receives a pty master sent by [`setup_console`].
pub(crate) fn recv_master(socket: RawFd) -> std::io::Result<OwnedFd> {
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            if let Some(fd) = fds.first() {
                // SAFETY: the kernel just installed this fd in our table for us; we own it now.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    Err(std::io::Error::other(
        "no pty master received on the console socket",
    ))
}

/// Copies stdin → master and master → stdout in background threads. The returned handle ends when the terminal
/// closes (every slave fd gone), so joining it after the process exited flushes its last output.
pub fn proxy_terminal(master: OwnedFd) -> Option<std::thread::JoinHandle<()>> {
    let write_end = master.try_clone().ok()?;
    std::thread::spawn(move || {
        let mut out = std::fs::File::from(write_end);
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    Some(std::thread::spawn(move || {
        let mut input = std::fs::File::from(master);
        let mut stdout = std::io::stdout();
        let mut buf = [0u8; 4096];
        // EIO once the last slave fd closes ends the loop.
        while let Ok(n) = input.read(&mut buf) {
            if n == 0 || stdout.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = stdout.flush();
        }
    }))
}
