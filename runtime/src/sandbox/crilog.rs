//! The CRI container log format: one entry per line, `<RFC3339Nano timestamp> <stream> <tag> <content>`, where the
//! tag is `F` for a full line and `P` for a part of a line longer than the buffer (the next entry continues it).
//! Ref: kubernetes/cri-api log format, kubelet's `pkg/kubelet/kuberuntime/logs`.

use std::io::{self, Write};

/// Longest content of one entry; a longer line is split into `P` entries. Ref: containerd's 16 KiB buffer.
pub const MAX_LINE: usize = 16 * 1024;

/// One stream (stdout or stderr) of a container, turning arbitrary chunks into log entries.
#[derive(Debug)]
pub struct CriLogStream {
    name: &'static str,
    pending: Vec<u8>,
    max: usize,
}

impl CriLogStream {
    pub fn new(name: &'static str) -> Self {
        Self::with_max(name, MAX_LINE)
    }

    pub fn with_max(name: &'static str, max: usize) -> Self {
        Self {
            name,
            pending: Vec::new(),
            max: max.max(1),
        }
    }

    fn entry(&self, out: &mut impl Write, tag: char, content: &[u8]) -> io::Result<()> {
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
        let mut line = Vec::with_capacity(content.len() + 48);
        line.extend_from_slice(format!("{ts} {} {tag} ", self.name).as_bytes());
        line.extend_from_slice(content);
        line.push(b'\n');
        // One write per entry so concurrent streams never interleave inside an entry.
        out.write_all(&line)
    }

    /// Feeds bytes read from the container; writes every complete line and every full buffer.
    pub fn feed(&mut self, out: &mut impl Write, data: &[u8]) -> io::Result<()> {
        self.pending.extend_from_slice(data);
        loop {
            if let Some(pos) = self.pending.iter().position(|b| *b == b'\n') {
                if pos <= self.max {
                    let line: Vec<u8> = self.pending.drain(..=pos).collect();
                    self.entry(out, 'F', &line[..line.len() - 1])?;
                    continue;
                }
            }
            if self.pending.len() > self.max {
                let part: Vec<u8> = self.pending.drain(..self.max).collect();
                self.entry(out, 'P', &part)?;
                continue;
            }
            return Ok(());
        }
    }

    /// At end of stream: what is left is the last (unterminated) line.
    pub fn finish(&mut self, out: &mut impl Write) -> io::Result<()> {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.entry(out, 'F', &rest)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(out: &[u8]) -> Vec<(String, String, String)> {
        String::from_utf8_lossy(out)
            .lines()
            .map(|l| {
                let mut p = l.splitn(4, ' ');
                let ts = p.next().unwrap_or_default();
                assert!(
                    chrono::DateTime::parse_from_rfc3339(ts).is_ok(),
                    "bad timestamp {ts}"
                );
                (
                    p.next().unwrap_or_default().to_string(),
                    p.next().unwrap_or_default().to_string(),
                    p.next().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn complete_lines_become_full_entries_across_chunks() {
        let mut s = CriLogStream::new("stdout");
        let mut out = Vec::new();
        s.feed(&mut out, b"hel").expect("feed");
        s.feed(&mut out, b"lo\nwor").expect("feed");
        s.feed(&mut out, b"ld\n").expect("feed");
        let e = entries(&out);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0], ("stdout".into(), "F".into(), "hello".into()));
        assert_eq!(e[1].2, "world");
    }

    #[test]
    fn long_lines_are_split_into_partial_entries() {
        let mut s = CriLogStream::with_max("stderr", 4);
        let mut out = Vec::new();
        s.feed(&mut out, b"abcdefghij\n").expect("feed");
        s.finish(&mut out).expect("finish");
        let e: Vec<(String, String)> = entries(&out).into_iter().map(|(_, t, c)| (t, c)).collect();
        assert_eq!(
            e,
            [
                ("P".into(), "abcd".into()),
                ("P".into(), "efgh".into()),
                ("F".into(), "ij".into())
            ]
        );
    }

    #[test]
    fn an_unterminated_last_line_is_written_at_the_end() {
        let mut s = CriLogStream::new("stdout");
        let mut out = Vec::new();
        s.feed(&mut out, b"no newline").expect("feed");
        assert!(out.is_empty());
        s.finish(&mut out).expect("finish");
        assert_eq!(entries(&out)[0].2, "no newline");
    }
}
