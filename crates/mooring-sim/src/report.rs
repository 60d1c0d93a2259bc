//! The run report: raw numbers as JSON, a human table, and an HTML page with SVG plots of
//! online devices, telemetry rate and command states over simulated time.

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// One sample of the fleet's state at a simulated time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub t_ms: u64,
    pub online: u64,
    /// Telemetry messages acknowledged to agents (so durably stored) since the previous sample,
    /// per simulated minute.
    pub telemetry_per_min: f64,
    /// Commands by state.
    pub commands: BTreeMap<String, u64>,
}

/// A fault kind: how many were injected and how many the server or the agents noticed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultCount {
    pub injected: u64,
    pub detected: u64,
}

/// One `[expect]` line and whether it held.
#[derive(Debug, Clone, Serialize)]
pub struct ExpectationResult {
    pub name: String,
    pub expected: String,
    pub actual: String,
    pub ok: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub devices: u64,
    pub simulated_ms: u64,
    pub wall_ms: u64,
    /// Resident memory of the simulator process at the end (server + all agents), bytes.
    pub rss_bytes: u64,
    /// Peak resident memory of the process (VmHWM), bytes.
    pub rss_peak_bytes: u64,
    /// (RSS at the end - RSS after the server started and the fleet was registered) / devices.
    pub rss_bytes_per_device: u64,
    /// Telemetry messages handed to the agents (each with a unique `sim.n`).
    pub telemetry_sent: u64,
    /// Messages not handed over because the agent's input queue was full.
    pub telemetry_input_dropped: u64,
    /// Messages whose PUBACK reached the agent (deleted from its outbox).
    pub telemetry_acked: u64,
    /// Distinct messages in the server's store at the end (deleted devices excluded).
    pub telemetry_stored: u64,
    /// Acknowledged messages missing from the store at the end: must be 0.
    pub lost_acked_telemetry: u64,
    /// The first few lost messages (`device sim.n=N`).
    pub lost_examples: Vec<String>,
    pub commands_sent: u64,
    pub commands_succeeded: u64,
    pub commands_failed: u64,
    pub commands_expired: u64,
    pub commands_not_final: u64,
    /// Commands deleted with their device (`delete_device` events).
    pub commands_deleted: u64,
    /// The first few commands not final at the end (`device state`).
    pub commands_not_final_examples: Vec<String>,
    /// Commands (device, command) whose handler ran exactly once.
    pub commands_executed_once: u64,
    pub commands_executed_twice: u64,
    /// Connections the agents lost or failed to open (their `reconnects_total`).
    pub reconnects: u64,
    /// Connection attempts refused because the device's link was down.
    pub connects_refused_link_down: u64,
    pub online_at_end: u64,
    pub deleted_devices: u64,
    pub faults: BTreeMap<String, FaultCount>,
    /// The server's own `/metrics` numbers at the end.
    pub server_metrics: BTreeMap<String, f64>,
    pub samples: Vec<Sample>,
    /// What each scenario event did, in order.
    pub events: Vec<String>,
    pub expectations: Vec<ExpectationResult>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.expectations.iter().all(|e| e.ok)
    }

    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let sim_h = self.simulated_ms as f64 / 3_600_000.0;
        let _ = writeln!(
            out,
            "scenario {} (seed {}): {} devices, {:.2} simulated h in {:.1} s wall ({:.0}x)",
            self.scenario,
            self.seed,
            self.devices,
            sim_h,
            self.wall_ms as f64 / 1000.0,
            self.simulated_ms as f64 / self.wall_ms.max(1) as f64
        );
        let rows: Vec<(&str, String)> = vec![
            (
                "memory (RSS of the simulator process)",
                format!("{:.1} MiB", self.rss_bytes as f64 / 1048576.0),
            ),
            (
                "memory peak (VmHWM)",
                format!("{:.1} MiB", self.rss_peak_bytes as f64 / 1048576.0),
            ),
            (
                "memory per simulated device",
                format!("{:.1} KiB", self.rss_bytes_per_device as f64 / 1024.0),
            ),
            (
                "telemetry sent / acked / stored",
                format!(
                    "{} / {} / {}",
                    self.telemetry_sent, self.telemetry_acked, self.telemetry_stored
                ),
            ),
            (
                "telemetry not handed over (agent input full)",
                self.telemetry_input_dropped.to_string(),
            ),
            (
                "acked telemetry lost",
                self.lost_acked_telemetry.to_string(),
            ),
            ("commands sent", self.commands_sent.to_string()),
            (
                "commands succeeded / failed / expired / not final / deleted",
                format!(
                    "{} / {} / {} / {} / {}",
                    self.commands_succeeded,
                    self.commands_failed,
                    self.commands_expired,
                    self.commands_not_final,
                    self.commands_deleted
                ),
            ),
            (
                "commands executed once / twice or more",
                format!(
                    "{} / {}",
                    self.commands_executed_once, self.commands_executed_twice
                ),
            ),
            (
                "reconnects (refused while link down)",
                format!("{} ({})", self.reconnects, self.connects_refused_link_down),
            ),
            ("online at end", self.online_at_end.to_string()),
            ("devices deleted", self.deleted_devices.to_string()),
        ];
        for (k, v) in rows {
            let _ = writeln!(out, "  {k:<52} {v}");
        }
        if !self.faults.is_empty() {
            let _ = writeln!(
                out,
                "  {:<52} {:>10} {:>10}",
                "fault", "injected", "detected"
            );
            for (k, f) in &self.faults {
                let _ = writeln!(out, "  {k:<52} {:>10} {:>10}", f.injected, f.detected);
            }
        }
        for e in &self.events {
            let _ = writeln!(out, "  event {e}");
        }
        for l in &self.lost_examples {
            let _ = writeln!(out, "  LOST {l}");
        }
        for c in &self.commands_not_final_examples {
            let _ = writeln!(out, "  NOT FINAL {c}");
        }
        for e in &self.expectations {
            let _ = writeln!(
                out,
                "  expect {:<45} {} (expected {}, got {})",
                e.name,
                if e.ok { "ok" } else { "FAILED" },
                e.expected,
                e.actual
            );
        }
        out
    }

    /// A self-contained HTML page (inline SVG, no scripts).
    pub fn html(&self) -> String {
        let mut out = String::new();
        let _ = write!(
            out,
            "<!doctype html><meta charset=utf-8><title>mooring sim: {0}</title>\
             <style>body{{font-family:sans-serif;margin:2em}}pre{{background:#f4f4f4;padding:1em}}\
             svg{{border:1px solid #ccc;margin:.5em 0}}</style><h1>Scenario {0}</h1><pre>{1}</pre>",
            escape(&self.scenario),
            escape(&self.table())
        );
        let t: Vec<f64> = self
            .samples
            .iter()
            .map(|s| s.t_ms as f64 / 60_000.0)
            .collect();
        let online: Vec<f64> = self.samples.iter().map(|s| s.online as f64).collect();
        let rate: Vec<f64> = self.samples.iter().map(|s| s.telemetry_per_min).collect();
        out.push_str(&svg_chart(
            "Online devices",
            &t,
            &[("online", "#1f77b4", &online)],
        ));
        out.push_str(&svg_chart(
            "Telemetry acknowledged (durably stored) per simulated minute",
            &t,
            &[("msg/min", "#2ca02c", &rate)],
        ));
        let states: std::collections::BTreeSet<&String> = self
            .samples
            .iter()
            .flat_map(|s| s.commands.keys())
            .collect();
        let palette = [
            "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#ff7f0e",
        ];
        let series: Vec<(String, &str, Vec<f64>)> = states
            .iter()
            .enumerate()
            .map(|(i, st)| {
                (
                    (*st).clone(),
                    palette[i % palette.len()],
                    self.samples
                        .iter()
                        .map(|s| s.commands.get(*st).copied().unwrap_or(0) as f64)
                        .collect(),
                )
            })
            .collect();
        let refs: Vec<(&str, &str, &[f64])> = series
            .iter()
            .map(|(n, c, v)| (n.as_str(), *c, v.as_slice()))
            .collect();
        if !refs.is_empty() {
            out.push_str(&svg_chart("Commands by state", &t, &refs));
        }
        out
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A line chart: x in simulated minutes, one polyline per series.
fn svg_chart(title: &str, x: &[f64], series: &[(&str, &str, &[f64])]) -> String {
    const W: f64 = 800.0;
    const H: f64 = 240.0;
    const PAD: f64 = 40.0;
    let x_max = x.iter().copied().fold(1.0_f64, f64::max);
    let y_max = series
        .iter()
        .flat_map(|(_, _, v)| v.iter().copied())
        .fold(1.0_f64, f64::max);
    let mut out = String::new();
    let _ = write!(
        out,
        "<h2>{}</h2><svg width='{W}' height='{H}' viewBox='0 0 {W} {H}' xmlns='http://www.w3.org/2000/svg'>",
        escape(title)
    );
    let _ = write!(
        out,
        "<line x1='{PAD}' y1='{0}' x2='{PAD}' y2='{1}' stroke='black' /><line x1='{PAD}' y1='{1}' x2='{W}' y2='{1}' stroke='black' />\
         <text x='2' y='12' font-size='10'>{2:.0}</text><text x='2' y='{1}' font-size='10'>0</text>\
         <text x='{3}' y='{4}' font-size='10'>{5:.0} min</text>",
        PAD / 2.0,
        H - PAD,
        y_max,
        W - 60.0,
        H - PAD + 14.0,
        x_max
    );
    for (i, (name, color, values)) in series.iter().enumerate() {
        let points: Vec<String> = x
            .iter()
            .zip(values.iter())
            .map(|(xv, yv)| {
                let px = PAD + xv / x_max * (W - PAD - 10.0);
                let py = (H - PAD) - yv / y_max * (H - PAD - PAD / 2.0);
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let _ = write!(
            out,
            "<polyline fill='none' stroke='{color}' stroke-width='1.5' points='{}' />\
             <text x='{}' y='{}' font-size='11' fill='{color}'>{}</text>",
            points.join(" "),
            PAD + 10.0 + 120.0 * i as f64,
            H - 8.0,
            escape(name)
        );
    }
    out.push_str("</svg>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_table_json_and_html() {
        let mut r = Report {
            scenario: "smoke".into(),
            devices: 3,
            simulated_ms: 3_600_000,
            wall_ms: 1000,
            ..Report::default()
        };
        r.samples.push(Sample {
            t_ms: 60_000,
            online: 3,
            telemetry_per_min: 3.0,
            commands: BTreeMap::from([("succeeded".to_owned(), 2)]),
        });
        r.expectations.push(ExpectationResult {
            name: "lost_acked_telemetry".into(),
            expected: "= 0".into(),
            actual: "0".into(),
            ok: true,
        });
        assert!(r.passed());
        assert!(r.table().contains("3600x"));
        assert!(r.html().contains("<polyline"));
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["devices"], 3);
    }
}
