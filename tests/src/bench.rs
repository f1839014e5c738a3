//! Small statistics for same-run benchmarks: medians, spread and ratios against a peer.

use std::time::Duration;

/// Samples of one measured command, in milliseconds.
#[derive(Debug, Clone, Default)]
pub struct Samples {
    pub name: String,
    pub millis: Vec<f64>,
}

impl Samples {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            millis: Vec::new(),
        }
    }

    pub fn push(&mut self, d: Duration) {
        self.millis.push(d.as_secs_f64() * 1000.0);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v = self.millis.clone();
        v.sort_by(f64::total_cmp);
        v
    }

    /// The q-quantile (0.0..=1.0) by nearest rank; NaN when there are no samples.
    pub fn quantile(&self, q: f64) -> f64 {
        let v = self.sorted();
        if v.is_empty() {
            return f64::NAN;
        }
        let idx = ((v.len() - 1) as f64 * q).round() as usize;
        v[idx.min(v.len() - 1)]
    }

    pub fn median(&self) -> f64 {
        self.quantile(0.5)
    }
}

/// A Markdown table of `rows` with median, p10–p90 spread and each row's median ratio against `baseline`.
pub fn markdown_table(rows: &[&Samples], baseline: &Samples) -> String {
    let mut out = String::from("| command | runs | median (ms) | p10–p90 (ms) | ratio vs ");
    out.push_str(&baseline.name);
    out.push_str(" |\n|---|---|---|---|---|\n");
    for s in rows {
        out.push_str(&format!(
            "| {} | {} | {:.1} | {:.1}–{:.1} | {:.2} |\n",
            s.name,
            s.millis.len(),
            s.median(),
            s.quantile(0.1),
            s.quantile(0.9),
            s.median() / baseline.median()
        ));
    }
    out
}

/// A numeric benchmark setting from the environment (`BENCH_RUNS=20`), else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median (mean of the middle two for an even count), minimum and maximum of per-round results.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// Panics on an empty set (a benchmark that measured nothing).
    pub fn of(mut v: Vec<f64>) -> Self {
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        let median = if v.len() % 2 == 1 {
            v[mid]
        } else {
            (v[mid - 1] + v[mid]) / 2.0
        };
        Self {
            median,
            min: v[0],
            max: v[v.len() - 1],
        }
    }
}

/// A process's resident set size and its peak (`VmRSS`, `VmHWM`) in MiB; NaN when unreadable.
pub fn rss_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    // utime and stime: fields 14 and 15 (1-based) of /proc/<pid>/stat.
    proc_stat_seconds(pid, 11, 12)
}

/// CPU seconds (user + system) of the waited-for children of a process: `cutime` and `cstime`.
pub fn children_cpu_seconds(pid: u32) -> f64 {
    // Fields 16 and 17 (1-based).
    proc_stat_seconds(pid, 13, 14)
}

/// The sum of two clock-tick fields of /proc/<pid>/stat in seconds; `a` and `b` count from the field after the
/// state (field 3), so field N (1-based) is N - 3. 0 when unreadable.
fn proc_stat_seconds(pid: u32, a: usize, b: usize) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(a) + ticks(b)) / hz.max(1.0)
}

/// Waits until the processes `pids` are done with work deferred past a benchmark round (the embedded store's idle
/// checkpoint, etcd's backend commit), so it does not run in the next target's round: at least 1.5 s (the embedded
/// store checkpoints within ~1.5 s of its last write when idle), then until they use under 3 ms of CPU in 250 ms;
/// at most 6 s.
pub async fn settle(pids: impl Iterator<Item = u32>) {
    let pids: Vec<u32> = pids.collect();
    let used = || pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut before = used();
    while started.elapsed() < Duration::from_secs(6) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = used();
        if now - before < 0.003 {
            return;
        }
        before = now;
    }
}

/// Seconds the whole machine has spent idle (all CPUs, `/proc/stat` idle + iowait) so far.
pub fn machine_idle_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0)) / hz.max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_ratio_come_from_the_samples() {
        let mut a = Samples::new("a");
        let mut b = Samples::new("b");
        for ms in [1, 2, 3, 4, 100] {
            a.push(Duration::from_millis(ms));
            b.push(Duration::from_millis(ms * 2));
        }
        assert_eq!(a.median(), 3.0);
        assert_eq!(b.median(), 6.0);
        let table = markdown_table(&[&a, &b], &b);
        assert!(
            table.contains("| a | 5 | 3.0 | 1.0–100.0 | 0.50 |"),
            "{table}"
        );
    }

    #[test]
    fn spread_takes_the_middle_pair_for_an_even_count() {
        assert_eq!(
            Spread::of(vec![4.0, 1.0, 3.0, 2.0]),
            Spread {
                median: 2.5,
                min: 1.0,
                max: 4.0
            }
        );
        assert_eq!(Spread::of(vec![5.0, 1.0, 9.0]).median, 5.0);
    }
}
