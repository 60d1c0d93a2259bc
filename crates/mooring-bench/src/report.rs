//! Result tables: one row per metric with both targets and their ratio, rendered as Markdown and JSON.

use serde_json::{json, Value};

/// One measured metric for both targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// What was measured, with its unit and direction, e.g. `KiB per connection (lower is better)`.
    pub metric: String,
    /// Mooring's value; `None` when not measured (skipped, failed or not applicable).
    pub mooring: Option<f64>,
    /// Mosquitto's value; `None` when not measured.
    pub mosquitto: Option<f64>,
    /// Honest context: what the number includes, failures, durability.
    pub note: String,
}

impl Row {
    pub fn new(metric: impl Into<String>, mooring: Option<f64>, mosquitto: Option<f64>) -> Row {
        Row {
            metric: metric.into(),
            mooring,
            mosquitto,
            note: String::new(),
        }
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }

    /// mooring ÷ mosquitto, when both are present and the divisor is not zero.
    pub fn ratio(&self) -> Option<f64> {
        match (self.mooring, self.mosquitto) {
            (Some(a), Some(b)) if b != 0.0 && a.is_finite() && b.is_finite() => Some(a / b),
            _ => None,
        }
    }
}

/// The table one suite prints.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Table {
    pub title: String,
    pub rows: Vec<Row>,
}

impl Table {
    pub fn new(title: impl Into<String>) -> Table {
        Table {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// A Markdown table (columns: metric, mooring, mosquitto, ratio, note), padded for terminals.
    pub fn to_markdown(&self) -> String {
        let header = ["metric", "mooring", "mosquitto", "ratio", "note"].map(String::from);
        let mut cells: Vec<[String; 5]> = vec![header];
        for r in &self.rows {
            cells.push([
                r.metric.clone(),
                fmt_value(r.mooring),
                fmt_value(r.mosquitto),
                fmt_ratio(r.ratio()),
                r.note.clone(),
            ]);
        }
        let mut widths = [0usize; 5];
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = format!("### {}\n\n", self.title);
        for (i, row) in cells.iter().enumerate() {
            out.push('|');
            for (col, (w, c)) in widths.iter().zip(row).enumerate() {
                // Numbers right-aligned, text left-aligned.
                if (1..=3).contains(&col) {
                    out.push_str(&format!(" {c:>w$} |"));
                } else {
                    out.push_str(&format!(" {c:<w$} |"));
                }
            }
            out.push('\n');
            if i == 0 {
                out.push('|');
                for (col, w) in widths.iter().enumerate() {
                    let dashes = "-".repeat(*w);
                    if (1..=3).contains(&col) {
                        out.push_str(&format!(" {}: |", &dashes[1..]));
                    } else {
                        out.push_str(&format!(" {dashes} |"));
                    }
                }
                out.push('\n');
            }
        }
        out
    }

    /// The raw numbers, for `--json`.
    pub fn to_json(&self) -> Value {
        json!({
            "title": self.title,
            "rows": self.rows.iter().map(|r| json!({
                "metric": r.metric,
                "mooring": r.mooring,
                "mosquitto": r.mosquitto,
                "ratio": r.ratio(),
                "note": r.note,
            })).collect::<Vec<_>>(),
        })
    }
}

/// A number with precision that fits its size; `—` when absent.
pub fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "—".to_owned(),
        Some(v) if !v.is_finite() => "—".to_owned(),
        Some(v) if v.abs() >= 1000.0 => group_thousands(v.round() as i64),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

/// A count with thousands separators (`100,000`); fractions are rounded.
pub fn fmt_count(v: f64) -> String {
    if v.is_finite() {
        group_thousands(v.round() as i64)
    } else {
        "—".to_owned()
    }
}

/// `0.42×`; `—` when absent.
pub fn fmt_ratio(r: Option<f64>) -> String {
    match r {
        Some(r) if r.is_finite() => format!("{r:.2}×"),
        _ => "—".to_owned(),
    }
}

fn group_thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_get_precision_by_size_and_thousands_separators() {
        assert_eq!(fmt_value(None), "—");
        assert_eq!(fmt_value(Some(f64::NAN)), "—");
        assert_eq!(fmt_value(Some(1.234)), "1.23");
        assert_eq!(fmt_value(Some(42.25)), "42.2");
        assert_eq!(fmt_value(Some(512.6)), "513");
        assert_eq!(fmt_value(Some(1234567.0)), "1,234,567");
        assert_eq!(fmt_value(Some(-1500.0)), "-1,500");
        assert_eq!(fmt_count(50.0), "50");
        assert_eq!(fmt_count(100_000.0), "100,000");
    }

    #[test]
    fn ratio_is_mooring_over_mosquitto_and_absent_without_both() {
        assert_eq!(Row::new("m", Some(10.0), Some(4.0)).ratio(), Some(2.5));
        assert_eq!(Row::new("m", Some(10.0), None).ratio(), None);
        assert_eq!(Row::new("m", None, Some(1.0)).ratio(), None);
        assert_eq!(Row::new("m", Some(1.0), Some(0.0)).ratio(), None);
        assert_eq!(fmt_ratio(Some(0.4249)), "0.42×");
        assert_eq!(fmt_ratio(None), "—");
    }

    #[test]
    fn markdown_table_has_header_alignment_and_one_line_per_row() {
        let mut t = Table::new("ingest");
        t.push(Row::new("msg/s", Some(20000.0), Some(40000.0)).note("ours fsyncs"));
        t.push(Row::new("command RTT p50 (ms)", None, None).note("not yet available"));
        let md = t.to_markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "### ingest");
        assert!(lines[2].starts_with("| metric"), "{md}");
        assert!(
            lines[3].contains("--: |"),
            "numeric columns right-aligned: {md}"
        );
        assert!(lines[4].contains("20,000") && lines[4].contains("40,000"));
        assert!(lines[4].contains("0.50×") && lines[4].contains("ours fsyncs"));
        assert!(lines[5].contains("not yet available") && lines[5].contains('—'));
        assert_eq!(lines.len(), 6);
        // Every line of the table has the same width.
        let widths: Vec<usize> = lines[2..].iter().map(|l| l.chars().count()).collect();
        assert!(widths.windows(2).all(|w| w[0] == w[1]), "{md}");
    }

    #[test]
    fn json_keeps_raw_numbers_and_ratio() {
        let mut t = Table::new("idle");
        t.push(Row::new("KiB/conn", Some(12.5), Some(25.0)));
        let v = t.to_json();
        assert_eq!(v["rows"][0]["mooring"], 12.5);
        assert_eq!(v["rows"][0]["ratio"], 0.5);
        assert_eq!(v["title"], "idle");
    }
}
