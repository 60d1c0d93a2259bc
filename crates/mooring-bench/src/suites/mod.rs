//! The benchmark suites (idle memory, ingest, connect storm, command RTT, fan-out, telemetry storage, retention, cluster, devices filter): each returns one table; all but telemetry storage and cluster (ours only) drive every target with the same load.
//!
//! One file per suite; the QoS 0/1 publishers the ingest and fan-out suites share are in
//! `publishers.rs`, and the helpers every suite uses are here.

mod cluster;
mod command_rtt;
mod connect_storm;
mod devices_filter;
mod fanout;
mod idle_memory;
mod ingest;
mod publishers;
mod retention;
mod telemetry_storage;

pub use cluster::cluster;
pub use command_rtt::command_rtt;
pub use connect_storm::connect_storm;
pub use devices_filter::devices_filter;
pub use fanout::{fanout, FANOUT_FILTER};
pub use idle_memory::idle_memory;
pub use ingest::ingest;
pub use publishers::MESSAGES_PER_PUBLISHER_MAX;
pub use retention::retention;
pub use telemetry_storage::telemetry_storage;

use crate::fleet::{Fleet, FleetOpts};
use crate::report::Row;
use crate::target::{self, Kind, Target};
use crate::Bench;
use std::collections::BTreeMap;
use std::time::Duration;

/// Keep-alive of idle devices (they ping at ¾ of it, so never during a default-sized run).
pub const IDLE_KEEPALIVE_SECS: u16 = 300;
/// Wait after the last CONNACK (or a start) before sampling RSS, so buffers settle.
pub const RSS_SETTLE: Duration = Duration::from_secs(2);

fn per_kind<T: Copy>(m: &BTreeMap<&'static str, T>, kind: Kind) -> Option<T> {
    m.get(kind.name()).copied()
}

fn row_from(metric: String, m: &BTreeMap<&'static str, f64>) -> Row {
    Row::new(
        metric,
        per_kind(m, Kind::Mooring),
        per_kind(m, Kind::Mosquitto),
    )
}

/// `Some(note)` when `n` connections cannot fit under the open-file limit of a server process.
fn over_fd_limit(b: &Bench, n: usize) -> Option<String> {
    let usable = b.fd_limit.saturating_sub(target::FD_RESERVE);
    (n as u64 > usable).then(|| {
        format!(
            "not measured: {n} connections need more than the open-file limit of {} per process \
             (a hard limit here; raising it needs CAP_SYS_RESOURCE)",
            b.fd_limit
        )
    })
}

/// from a clean heap (the HTTP provisioning traffic is not part of what we measure).
/// Spawns a fleet of `n` devices against `t` and waits until all are connected. If they are
/// not by `timeout`, records a note (`"<target>: only X of n <what>"`), tears the fleet and the
/// target down and returns `None`.
async fn spawn_connected(
    t: &mut Target,
    n: usize,
    sources: std::sync::Arc<crate::client::SourceAddrs>,
    opts: FleetOpts,
    timeout: Duration,
    what: &str,
    notes: &mut Vec<String>,
) -> anyhow::Result<Option<Fleet>> {
    let fleet = Fleet::spawn(t.endpoint()?.clone(), t.creds(n)?, sources, opts);
    if fleet.wait_until(timeout, |s| s.connacked(0) >= n).await {
        return Ok(Some(fleet));
    }
    notes.push(format!(
        "{}: only {} of {n} {what}",
        t.name(),
        fleet.stats.connacked(0)
    ));
    fleet.shutdown().await;
    t.kill().await;
    Ok(None)
}

/// Kill, start fresh, provision `n` devices and, if that took work, restart so the server starts
async fn fresh_start(t: &mut Target, n: usize) -> anyhow::Result<()> {
    t.kill().await;
    t.start().await?;
    let took = t.ensure_devices(n).await?;
    if took > Duration::ZERO {
        eprintln!(
            "  {}: provisioned devices up to {n} in {:.1} s",
            t.name(),
            took.as_secs_f64()
        );
        t.kill().await;
        t.start().await?;
    }
    Ok(())
}

/// The value at fraction `p` of sorted `v` (nearest rank); 0 when empty.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// The medians per column and a note with their spreads.
pub(super) fn medians(
    samples: &BTreeMap<&'static str, Vec<f64>>,
) -> (BTreeMap<&'static str, f64>, String) {
    let mut out = BTreeMap::new();
    let mut notes = Vec::new();
    for (&name, v) in samples {
        let mut v = v.clone();
        v.sort_by(f64::total_cmp);
        notes.push(format!(
            "{name}: median of {}, range {}–{}",
            v.len(),
            crate::report::fmt_value(v.first().copied()),
            crate::report::fmt_value(v.last().copied())
        ));
        out.insert(name, percentile(&v, 0.5));
    }
    (out, notes.join("; "))
}

/// `n` events over `d` per second; 0 when no time passed.
pub(super) fn per_sec(n: usize, d: Duration) -> f64 {
    if d > Duration::ZERO {
        n as f64 / d.as_secs_f64()
    } else {
        0.0
    }
}
