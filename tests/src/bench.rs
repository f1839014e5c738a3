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
}
