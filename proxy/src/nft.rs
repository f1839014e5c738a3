//! Applying nft scripts: one script is one atomic kernel transaction.
//!
//! Two backends parse the same text: the `nft` tool (`nft -f -`, one process per script), or `libnftables` — the
//! library behind that tool — loaded at run time and kept with one context for the process's life
//! ([`Nft::with_library`]). The library saves a process start per sync, which dominates a one-element change
//! (see the proxy section of BENCHMARKS.md); the tool works wherever `nft` is on PATH and can be wrapped (tests run
//! it through `ip netns exec`). Text was measured against JSON through the same tool (`nft -j -f`, which is what
//! the `nftables` crate drives): see BENCHMARKS.md. Nothing here lists the table; the sync path only writes.

use std::ffi::{c_char, c_int, c_void, CStr, CString, OsString};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

/// Failure to run `nft` or a rejected transaction (nothing of it was applied).
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        program: OsString,
        source: std::io::Error,
    },
    #[error("nft rejected the transaction ({status}); nothing was applied: {stderr}")]
    Rejected { status: String, stderr: String },
    #[error("cannot load {library}: {message}")]
    Library {
        library: &'static str,
        message: String,
    },
}

/// The library's soname (Debian's `libnftables1`, installed with `nftables`).
pub const LIBNFTABLES: &str = "libnftables.so.1";

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxFn = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxGet = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;
type CtxFree = unsafe extern "C" fn(*mut c_void);

/// A libnftables context (`struct nft_ctx`) with output and errors buffered in memory.
struct LibNft {
    ctx: *mut c_void,
    run: RunCmd,
    get_error: CtxGet,
    get_output: CtxGet,
    free: CtxFree,
}

impl Drop for LibNft {
    fn drop(&mut self) {
        // SAFETY: the context came from nft_ctx_new and is freed exactly once, here.
        unsafe { (self.free)(self.ctx) }
    }
}

// SAFETY: a `struct nft_ctx` may be used from any thread, one at a time (libnftables keeps no thread-local state);
// every use goes through the `Mutex` in `Nft`. The dlopen handle is never closed, so the function pointers stay
// valid for the process's life.
unsafe impl Send for LibNft {}

impl LibNft {
    fn load() -> Result<Self, NftError> {
        let err = |message: String| NftError::Library {
            library: LIBNFTABLES,
            message,
        };
        let name = CString::new(LIBNFTABLES).map_err(|e| err(e.to_string()))?;
        // SAFETY: dlopen with a valid NUL-terminated name; the handle is intentionally never closed.
        let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            return Err(err("dlopen failed (is libnftables1 installed?)".into()));
        }
        let sym = |n: &str| -> Result<*mut c_void, NftError> {
            let c = CString::new(n).map_err(|e| err(e.to_string()))?;
            // SAFETY: dlsym on a live handle with a valid NUL-terminated symbol name.
            let p = unsafe { libc::dlsym(handle, c.as_ptr()) };
            if p.is_null() {
                Err(err(format!("no symbol {n}")))
            } else {
                Ok(p)
            }
        };
        // SAFETY: the symbols have these C signatures in libnftables(3) (the 1.x ABI, soname .1).
        let (ctx_new, buffer_output, buffer_error, run, get_error, get_output, free) = unsafe {
            (
                std::mem::transmute::<*mut c_void, CtxNew>(sym("nft_ctx_new")?),
                std::mem::transmute::<*mut c_void, CtxFn>(sym("nft_ctx_buffer_output")?),
                std::mem::transmute::<*mut c_void, CtxFn>(sym("nft_ctx_buffer_error")?),
                std::mem::transmute::<*mut c_void, RunCmd>(sym("nft_run_cmd_from_buffer")?),
                std::mem::transmute::<*mut c_void, CtxGet>(sym("nft_ctx_get_error_buffer")?),
                std::mem::transmute::<*mut c_void, CtxGet>(sym("nft_ctx_get_output_buffer")?),
                std::mem::transmute::<*mut c_void, CtxFree>(sym("nft_ctx_free")?),
            )
        };
        // SAFETY: NFT_CTX_DEFAULT is 0; the returned context is checked for NULL before use.
        let ctx = unsafe { ctx_new(0) };
        if ctx.is_null() {
            return Err(err("nft_ctx_new failed".into()));
        }
        let lib = Self {
            ctx,
            run,
            get_error,
            get_output,
            free,
        };
        // SAFETY: ctx is a live context from nft_ctx_new (freed by `lib`'s Drop on the error path too).
        if unsafe { buffer_output(ctx) } != 0 || unsafe { buffer_error(ctx) } != 0 {
            return Err(err("cannot buffer the context's output".into()));
        }
        Ok(lib)
    }

    fn apply(&mut self, script: &str) -> Result<(), NftError> {
        let text = CString::new(script).map_err(|_| NftError::Rejected {
            status: "not run".into(),
            stderr: "the script contains a NUL byte".into(),
        })?;
        // SAFETY: live context, NUL-terminated script that outlives the call.
        let rc = unsafe { (self.run)(self.ctx, text.as_ptr()) };
        // Reading a buffer also resets it, so each run starts empty. SAFETY: live context; the returned
        // strings are owned by the context and copied before the next call.
        let read = |get: CtxGet, ctx| unsafe {
            let p = get(ctx);
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let _ = read(self.get_output, self.ctx);
        let stderr = read(self.get_error, self.ctx);
        if rc == 0 {
            Ok(())
        } else {
            Err(NftError::Rejected {
                status: format!("libnftables returned {rc}"),
                stderr: truncate(stderr),
            })
        }
    }
}

/// How to apply scripts: the `nft` program and leading arguments (e.g. `["ip", "netns", "exec", "lab", "nft"]` in
/// tests), or the library in this process ([`Nft::with_library`]; listing still runs the program).
#[derive(Clone)]
pub struct Nft {
    argv: Vec<OsString>,
    lib: Option<Arc<Mutex<LibNft>>>,
}

impl std::fmt::Debug for Nft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nft")
            .field("argv", &self.argv)
            .field("library", &self.lib.is_some())
            .finish()
    }
}

/// nft echoes the offending statement; a 100k-element line would drown the log.
fn truncate(mut stderr: String) -> String {
    if stderr.len() > 4000 {
        let mut cut = 4000;
        while !stderr.is_char_boundary(cut) {
            cut -= 1;
        }
        stderr.truncate(cut);
        stderr.push('…');
    }
    stderr
}

impl Default for Nft {
    fn default() -> Self {
        Self::new(vec!["nft".into()])
    }
}

impl Nft {
    /// `argv` must not be empty; an empty one means plain `nft`.
    pub fn new(argv: Vec<OsString>) -> Self {
        if argv.is_empty() {
            return Self::default();
        }
        Self { argv, lib: None }
    }

    /// Applies scripts through libnftables in this process (in the calling thread's network namespace) instead
    /// of running the program; fails when the library cannot be loaded.
    pub fn with_library(mut self) -> Result<Self, NftError> {
        self.lib = Some(Arc::new(Mutex::new(LibNft::load()?)));
        Ok(self)
    }

    /// Which backend applies scripts, for the start-up log.
    pub fn backend(&self) -> &'static str {
        if self.lib.is_some() {
            "libnftables"
        } else {
            "nft -f"
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]);
        cmd
    }

    /// Runs `script` as one transaction.
    pub fn apply(&self, script: &str) -> Result<(), NftError> {
        if let Some(lib) = &self.lib {
            // A poisoned lock only means another sync panicked mid-call; the context itself is still usable.
            let mut lib = lib.lock().unwrap_or_else(|p| p.into_inner());
            return lib.apply(script);
        }
        let mut cmd = self.command();
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let spawn_err = |source| NftError::Spawn {
            program: self.argv[0].clone(),
            source,
        };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        // Write from a thread: nft may print errors while we are still writing a large script.
        let stdin = child.stdin.take();
        let writer = {
            let script = script.to_owned();
            std::thread::spawn(move || {
                if let Some(mut stdin) = stdin {
                    let _ = stdin.write_all(script.as_bytes());
                }
            })
        };
        let out = child.wait_with_output().map_err(spawn_err)?;
        let _ = writer.join();
        if out.status.success() {
            return Ok(());
        }
        Err(NftError::Rejected {
            status: out.status.to_string(),
            stderr: truncate(String::from_utf8_lossy(&out.stderr).into_owned()),
        })
    }
}

/// How to invoke `conntrack` (same convention as [`Nft`]).
#[derive(Debug, Clone)]
pub struct Conntrack {
    argv: Vec<OsString>,
}

impl Default for Conntrack {
    fn default() -> Self {
        Self {
            argv: vec!["conntrack".into()],
        }
    }
}

impl Conntrack {
    pub fn new(argv: Vec<OsString>) -> Self {
        if argv.is_empty() {
            return Self::default();
        }
        Self { argv }
    }

    /// Deletes conntrack entries matching `filter` (e.g. `-p udp --orig-dst 10.96.0.10 --reply-src 10.244.1.5`).
    /// "No entry matched" is success; a missing tool or kernel error is returned as text for the caller to log.
    pub fn delete(&self, filter: &[String]) -> Result<(), String> {
        let out = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .arg("-D")
            .args(filter)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {:?}: {e}", self.argv[0]))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        // conntrack exits 1 with "0 flow entries have been deleted" when nothing matched.
        if out.status.success() || stderr.contains("0 flow entries") {
            Ok(())
        } else {
            Err(format!(
                "conntrack -D {}: {}",
                filter.join(" "),
                stderr.trim()
            ))
        }
    }
}

/// One live `ClientIP` affinity entry: client, the frontend it used, and the endpoint it is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AffinityEntry {
    pub client: String,
    pub daddr: String,
    pub proto: String,
    pub port: u64,
    pub endpoint: String,
}

impl AffinityEntry {
    pub fn key(&self) -> String {
        format!(
            "{} . {} . {} . {}",
            self.client, self.daddr, self.proto, self.port
        )
    }
}

impl Nft {
    /// Lists the live entries of the dynamic affinity map (only that map: it holds one entry per active client and
    /// Service, and is read only when an affinity Service lost an endpoint).
    pub(crate) fn list_affinity(
        &self,
        family: &str,
        table: &str,
        map: &str,
    ) -> Result<Vec<AffinityEntry>, NftError> {
        let out = self
            .command()
            .args(["-j", "list", "map", family, table, map])
            .stdin(Stdio::null())
            .output()
            .map_err(|source| NftError::Spawn {
                program: self.argv[0].clone(),
                source,
            })?;
        if !out.status.success() {
            return Err(NftError::Rejected {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(parse_affinity(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// Parses `nft -j list map` output of the affinity map; malformed entries are skipped.
pub(crate) fn parse_affinity(json: &str) -> Vec<AffinityEntry> {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let mut entries = Vec::new();
    let objects = v["nftables"].as_array().cloned().unwrap_or_default();
    for obj in objects {
        for pair in obj["map"]["elem"].as_array().into_iter().flatten() {
            let key = &pair[0]["elem"]["val"]["concat"];
            let val = &pair[1]["concat"];
            let (Some(client), Some(daddr), Some(proto), Some(port)) = (
                key[0].as_str(),
                key[1].as_str(),
                key[2].as_str(),
                key[3].as_u64(),
            ) else {
                continue;
            };
            let (Some(ep), Some(ep_port)) = (val[0].as_str(), val[1].as_u64()) else {
                continue;
            };
            entries.push(AffinityEntry {
                client: client.to_string(),
                daddr: daddr.to_string(),
                proto: proto.to_string(),
                port,
                endpoint: format!("{ep} . {ep_port}"),
            });
        }
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_entries_are_read_from_nft_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"map": {"family": "ip", "name": "affinity",
            "table": "t", "elem": [[{"elem": {"val": {"concat": ["10.0.0.5", "10.96.0.20", "tcp", 80]},
            "timeout": 60, "expires": 59}}, {"concat": ["10.244.1.2", 8080]}], [{"bad": 1}, {}]]}}]}"#;
        let e = parse_affinity(json);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].key(), "10.0.0.5 . 10.96.0.20 . tcp . 80");
        assert_eq!(e[0].endpoint, "10.244.1.2 . 8080");
        assert!(parse_affinity("not json").is_empty());
    }
}
