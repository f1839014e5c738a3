//! Container logs: decoding the CRI log files the runtime's shim writes and serving them with upstream's options
//! (Ref: kubelet `pkg/kubelet/kuberuntime/logs/logs.go`, `ReadLogs`): `tailLines`, `sinceSeconds`/`sinceTime`,
//! `timestamps`, `limitBytes`, and `follow`, which keeps reading while the container runs and ends once it has
//! exited and everything it wrote was sent (upstream ends the stream then too; a restarted instance is a new
//! request, `kubectl logs -f` again).

use std::io::{self, BufRead, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use jiff::Timestamp;
use tokio::sync::mpsc;

/// How often a followed log is polled for new lines once its end was reached.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// Bytes read per chunk.
const CHUNK: usize = 32 * 1024;

/// The query options of `/containerLogs` (upstream `PodLogOptions`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct LogOptions {
    pub follow: bool,
    pub previous: bool,
    pub timestamps: bool,
    pub tail_lines: Option<u64>,
    pub since: Option<Timestamp>,
    pub limit_bytes: Option<u64>,
}

/// A query value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {name} {value:?}: {why}")]
pub(crate) struct BadOption {
    pub name: &'static str,
    pub value: String,
    pub why: &'static str,
}

fn flag(v: &str) -> bool {
    matches!(v, "true" | "1" | "True" | "TRUE" | "")
}

impl LogOptions {
    /// Parses the query pairs (unknown keys are ignored, as upstream's decoder does); `now` anchors
    /// `sinceSeconds`.
    pub fn parse(query: &[(String, String)], now: Timestamp) -> Result<Self, BadOption> {
        let mut o = LogOptions::default();
        let mut since_seconds = None;
        let mut since_time = None;
        for (k, v) in query {
            let bad = |why| BadOption {
                name: match k.as_str() {
                    "tailLines" => "tailLines",
                    "sinceSeconds" => "sinceSeconds",
                    "sinceTime" => "sinceTime",
                    _ => "limitBytes",
                },
                value: v.clone(),
                why,
            };
            match k.as_str() {
                "follow" => o.follow = flag(v),
                "previous" => o.previous = flag(v),
                "timestamps" => o.timestamps = flag(v),
                "tailLines" => {
                    let n: i64 = v.parse().map_err(|_| bad("not an integer"))?;
                    // Upstream: a negative tail means "all lines".
                    o.tail_lines = (n >= 0).then_some(n as u64);
                }
                "sinceSeconds" => {
                    let n: i64 = v.parse().map_err(|_| bad("not an integer"))?;
                    if n < 1 {
                        return Err(bad("must be greater than 0"));
                    }
                    since_seconds = Some(n);
                }
                "sinceTime" => {
                    since_time = Some(
                        v.parse::<Timestamp>()
                            .map_err(|_| bad("not an RFC 3339 time"))?,
                    );
                }
                "limitBytes" => {
                    let n: i64 = v.parse().map_err(|_| bad("not an integer"))?;
                    if n < 1 {
                        return Err(bad("must be greater than 0"));
                    }
                    o.limit_bytes = Some(n as u64);
                }
                _ => {}
            }
        }
        if since_seconds.is_some() && since_time.is_some() {
            return Err(BadOption {
                name: "sinceTime",
                value: String::new(),
                why: "at most one of sinceTime or sinceSeconds may be specified",
            });
        }
        o.since = since_time.or_else(|| {
            since_seconds.and_then(|s| now.checked_sub(jiff::SignedDuration::from_secs(s)).ok())
        });
        Ok(o)
    }
}

/// One decoded CRI log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry<'a> {
    pub time: Timestamp,
    pub stream: &'a str,
    /// `F`ull line (a newline follows the content) or `P`artial.
    pub full: bool,
    pub content: &'a [u8],
}

/// Parses one line (without its `\n`) of a CRI log: `<RFC3339Nano> <stdout|stderr> <F|P> <content>`.
pub(crate) fn parse_entry(line: &[u8]) -> Option<Entry<'_>> {
    let mut rest = line;
    let mut field = || {
        let sp = rest.iter().position(|b| *b == b' ')?;
        let f = &rest[..sp];
        rest = &rest[sp + 1..];
        Some(f)
    };
    let time = std::str::from_utf8(field()?).ok()?.parse().ok()?;
    let stream = std::str::from_utf8(field()?).ok()?;
    if stream != "stdout" && stream != "stderr" {
        return None;
    }
    // Ref: upstream also accepts the older format without a tag; ours always has one.
    let full = match field() {
        Some(b"F") => true,
        Some(b"P") => false,
        _ => return None,
    };
    Some(Entry {
        time,
        stream,
        full,
        content: rest,
    })
}

/// Turns CRI log lines into what the client receives, applying `since`, `timestamps` and `limitBytes`.
#[derive(Debug)]
pub(crate) struct Decoder {
    since: Option<Timestamp>,
    timestamps: bool,
    left: Option<u64>,
}

impl Decoder {
    pub fn new(o: &LogOptions) -> Self {
        Self {
            since: o.since,
            timestamps: o.timestamps,
            left: o.limit_bytes,
        }
    }

    /// Whether `limitBytes` is used up (the stream should end).
    pub fn done(&self) -> bool {
        self.left == Some(0)
    }

    /// Appends the output for one log line to `out`. Malformed lines are skipped (upstream logs and skips them).
    pub fn line(&mut self, line: &[u8], out: &mut Vec<u8>) {
        if self.done() {
            return;
        }
        let Some(e) = parse_entry(line) else {
            return;
        };
        if self.since.is_some_and(|s| e.time < s) {
            return;
        }
        let start = out.len();
        if self.timestamps {
            out.extend_from_slice(e.time.to_string().as_bytes());
            out.push(b' ');
        }
        out.extend_from_slice(e.content);
        if e.full {
            out.push(b'\n');
        }
        if let Some(left) = &mut self.left {
            let n = (out.len() - start) as u64;
            if n >= *left {
                out.truncate(start + *left as usize);
                *left = 0;
            } else {
                *left -= n;
            }
        }
    }
}

/// The byte offset where the last `n` lines of a CRI log begin (a line being a run of `P` entries ended by an `F`
/// entry, as upstream counts). Reads the file forward once, keeping the last `n` line starts.
pub(crate) fn tail_offset(r: &mut impl Read, n: u64) -> io::Result<u64> {
    if n == 0 {
        // Nothing of the past; with follow, only what comes next.
        return io::copy(r, &mut io::sink());
    }
    let mut starts = std::collections::VecDeque::with_capacity(n.min(4096) as usize + 1);
    let mut reader = io::BufReader::new(r);
    let mut line = Vec::new();
    let mut offset = 0u64;
    let mut line_start = 0u64;
    let mut in_line = false;
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line)?;
        if read == 0 {
            break;
        }
        if line.last() != Some(&b'\n') {
            // A half-written last line: leave it for a follower to read once complete.
            break;
        }
        if !in_line {
            line_start = offset;
            in_line = true;
        }
        offset += read as u64;
        let full = parse_entry(&line[..line.len() - 1]).is_none_or(|e| e.full);
        if full {
            starts.push_back(line_start);
            if starts.len() as u64 > n {
                starts.pop_front();
            }
            in_line = false;
        }
    }
    Ok(starts.front().copied().unwrap_or(offset))
}

/// Where a container instance's log is and how to tell whether it may still grow.
pub(crate) struct LogSource {
    pub path: PathBuf,
    /// Whether the instance still runs (checked when a follower reaches the end of the file).
    pub running: Box<dyn Fn() -> bool + Send + Sync>,
}

/// Reads `source` with `opts` and sends the output in chunks until done (or the receiver is gone).
pub(crate) async fn stream(source: LogSource, opts: LogOptions, tx: mpsc::Sender<Bytes>) {
    let path = source.path.clone();
    if let Err(e) = stream_inner(source, opts, tx).await {
        tracing::debug!(path = %path.display(), error = %e, "log stream ended with an error");
    }
}

async fn stream_inner(
    source: LogSource,
    opts: LogOptions,
    tx: mpsc::Sender<Bytes>,
) -> io::Result<()> {
    let path = source.path.clone();
    let tail = opts.tail_lines;
    let (mut file, start) = tokio::task::spawn_blocking(move || -> io::Result<_> {
        let mut f = std::fs::File::open(&path)?;
        let start = match tail {
            Some(n) => tail_offset(&mut f, n)?,
            None => 0,
        };
        f.seek(SeekFrom::Start(start))?;
        Ok((f, start))
    })
    .await
    .map_err(io::Error::other)??;
    let _ = start;
    let mut decoder = Decoder::new(&opts);
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; CHUNK];
    let mut exited_seen = false;
    loop {
        // Blocking reads of a regular file are short; a file never blocks on "no data".
        let (n, back) = tokio::task::spawn_blocking(move || {
            let n = file.read(&mut buf);
            (n.map(|n| (n, buf)), file)
        })
        .await
        .map_err(io::Error::other)?;
        file = back;
        let (n, b) = n?;
        buf = b;
        if n > 0 {
            pending.extend_from_slice(&buf[..n]);
            let mut out = Vec::new();
            let mut consumed = 0;
            while let Some(pos) = pending[consumed..].iter().position(|b| *b == b'\n') {
                decoder.line(&pending[consumed..consumed + pos], &mut out);
                consumed += pos + 1;
                if decoder.done() {
                    break;
                }
            }
            pending.drain(..consumed);
            if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                return Ok(());
            }
            if decoder.done() {
                return Ok(());
            }
            continue;
        }
        // End of the file so far.
        if !opts.follow || exited_seen {
            return Ok(());
        }
        if !(source.running)() {
            // One more read after seeing the exit: the shim writes the last lines before the exit is recorded.
            exited_seen = true;
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_POLL) => {}
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// Whether `path` exists as a file.
pub(crate) fn exists(path: &Path) -> bool {
    path.is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "2024-05-01T10:00:00.000000001Z stdout F one\n\
2024-05-01T10:00:01.5Z stderr F two\n\
2024-05-01T10:00:02Z stdout P thr\n\
2024-05-01T10:00:02.1Z stdout F ee\n\
garbage line\n\
2024-05-01T10:00:03Z stdout F four\n";

    fn decode(opts: &LogOptions, text: &str) -> String {
        let mut d = Decoder::new(opts);
        let mut out = Vec::new();
        for l in text.lines() {
            d.line(l.as_bytes(), &mut out);
        }
        String::from_utf8(out).unwrap()
    }

    fn query(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn cri_entries_decode_to_lines_with_partials_joined_and_garbage_skipped() {
        assert_eq!(
            decode(&LogOptions::default(), LOG),
            "one\ntwo\nthree\nfour\n"
        );
        let e = parse_entry(b"2024-05-01T10:00:00Z stderr F with  spaces ").unwrap();
        assert_eq!(e.stream, "stderr");
        assert_eq!(e.content, b"with  spaces ");
        assert!(parse_entry(b"2024-05-01T10:00:00Z stdin F x").is_none());
        assert!(parse_entry(b"yesterday stdout F x").is_none());
    }

    #[test]
    fn timestamps_prefix_each_entry_in_rfc3339_with_trailing_zeros_trimmed() {
        let o = LogOptions {
            timestamps: true,
            ..Default::default()
        };
        let out = decode(&o, LOG);
        let first: Vec<&str> = out.lines().take(2).collect();
        assert_eq!(
            first,
            [
                "2024-05-01T10:00:00.000000001Z one",
                "2024-05-01T10:00:01.5Z two"
            ]
        );
    }

    #[test]
    fn since_drops_older_entries_and_limit_bytes_cuts_the_output() {
        let o = LogOptions {
            since: Some("2024-05-01T10:00:01.5Z".parse().unwrap()),
            ..Default::default()
        };
        assert_eq!(decode(&o, LOG), "two\nthree\nfour\n");
        let o = LogOptions {
            limit_bytes: Some(6),
            ..Default::default()
        };
        assert_eq!(decode(&o, LOG), "one\ntw");
    }

    #[test]
    fn tail_counts_whole_lines_from_the_end() {
        let off = |n| tail_offset(&mut LOG.as_bytes(), n).unwrap() as usize;
        assert_eq!(decode(&LogOptions::default(), &LOG[off(1)..]), "four\n");
        // "three" is two entries (P then F) but one line; the garbage line counts as one too.
        assert_eq!(
            decode(&LogOptions::default(), &LOG[off(3)..]),
            "three\nfour\n"
        );
        assert_eq!(off(100), 0);
        assert_eq!(off(0), LOG.len());
        // An unterminated last line is not counted (it is still being written).
        let partial = format!("{LOG}2024-05-01T10:00:04Z stdout F fi");
        assert_eq!(
            tail_offset(&mut partial.as_bytes(), 1).unwrap() as usize,
            off(1)
        );
    }

    #[test]
    fn query_options_parse_as_upstream_and_bad_values_are_named() {
        let now: Timestamp = "2024-05-01T10:00:10Z".parse().unwrap();
        let o = LogOptions::parse(
            &query(&[
                ("follow", "true"),
                ("tailLines", "5"),
                ("sinceSeconds", "8"),
                ("timestamps", "1"),
                ("container", "c"),
            ]),
            now,
        )
        .unwrap();
        assert!(o.follow && o.timestamps && !o.previous);
        assert_eq!(o.tail_lines, Some(5));
        assert_eq!(o.since, Some("2024-05-01T10:00:02Z".parse().unwrap()));
        assert_eq!(
            LogOptions::parse(&query(&[("tailLines", "-1")]), now)
                .unwrap()
                .tail_lines,
            None
        );
        let e = LogOptions::parse(&query(&[("limitBytes", "0")]), now).unwrap_err();
        assert_eq!(e.name, "limitBytes");
        assert!(LogOptions::parse(&query(&[("sinceTime", "noon")]), now).is_err());
        assert!(LogOptions::parse(
            &query(&[("sinceTime", "2024-05-01T10:00:00Z"), ("sinceSeconds", "3")]),
            now
        )
        .is_err());
    }

    #[tokio::test]
    async fn a_followed_log_delivers_new_lines_and_ends_after_the_container_exits() {
        use std::io::Write;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, "2024-05-01T10:00:00Z stdout F old\n").unwrap();
        let running = Arc::new(AtomicBool::new(true));
        let r = running.clone();
        let (tx, mut rx) = mpsc::channel(8);
        let task = tokio::spawn(stream(
            LogSource {
                path: path.clone(),
                running: Box::new(move || r.load(Ordering::SeqCst)),
            },
            LogOptions {
                follow: true,
                ..Default::default()
            },
            tx,
        ));
        assert_eq!(rx.recv().await.unwrap(), Bytes::from("old\n"));
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(b"2024-05-01T10:00:01Z stdout F new\n").unwrap();
        assert_eq!(rx.recv().await.unwrap(), Bytes::from("new\n"));
        f.write_all(b"2024-05-01T10:00:02Z stdout F last\n")
            .unwrap();
        running.store(false, Ordering::SeqCst);
        let mut rest = Vec::new();
        while let Some(b) = rx.recv().await {
            rest.extend_from_slice(&b);
        }
        assert_eq!(rest, b"last\n");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the stream ends once the container exited")
            .unwrap();
    }
}
