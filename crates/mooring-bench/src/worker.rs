//! The cluster suite's load-generator process (hidden suite `cluster-worker`): reads a [`WorkerSpec`] on stdin, connects its range of devices to the cluster's nodes (device i to node i mod N) on `go`, and writes a [`WorkerReport`] as a JSON line on stdout every [`REPORT_INTERVAL`] until stdin closes, a signal comes or its lifetime ends.
//!
//! Its stdout is the protocol: nothing else is printed there (diagnostics go to stderr).

use crate::client::{Cred, Endpoint, SourceAddrs};
use crate::cluster::REPORT_INTERVAL;
use crate::fleet::{Fleet, FleetOpts};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::time::Instant;

/// Longest a worker waits for its spec on stdin.
const SPEC_TIMEOUT: Duration = Duration::from_secs(60);

/// What one worker does.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WorkerSpec {
    /// The credential cache (JSON lines, device `bench-<i>` on line i).
    pub creds_file: PathBuf,
    /// This worker's devices: `first .. first + count`.
    pub first: usize,
    pub count: usize,
    /// The nodes' MQTT/TLS addresses: device i connects to `nodes[i % nodes.len()]`.
    pub nodes: Vec<SocketAddr>,
    /// The fleet CA (PEM) that signed the nodes' server certificate.
    pub ca_file: PathBuf,
    /// First source address block ([`SourceAddrs::from_block`]): workers use disjoint blocks.
    pub source_block: usize,
    /// Connects in flight at once.
    pub concurrency: usize,
    pub keepalive_secs: u16,
    /// Subscribe to commands and answer each (as [`FleetOpts::respond_to_commands`]).
    pub respond_to_commands: bool,
    /// The worker disconnects and exits by itself after this long.
    pub lifetime_secs: u64,
}

/// A worker's counters (the parent adds them up with [`WorkerReport::sum`]).
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
pub struct WorkerReport {
    /// Credentials loaded; waiting for `go` (or past it).
    pub ready: bool,
    /// Sessions up now.
    pub connected: usize,
    /// Devices that got a CONNACK at least once.
    pub connacked: usize,
    /// Devices that gave up (every attempt failed).
    pub failed: usize,
    /// Failed connect attempts, retried or not.
    pub connect_errors: usize,
    /// Sessions the server closed.
    pub dropped: usize,
    /// This process's resident memory.
    pub rss_kib: u64,
    /// The first failed attempt's error.
    pub first_error: Option<String>,
    /// When (Unix ms) every device of this worker was up at once, if they were.
    pub all_up_unix_ms: Option<u64>,
    /// Final report: every device disconnected.
    pub done: bool,
}

impl WorkerReport {
    /// Counters added up; `ready`/`done` only if every report says so; the first error found.
    pub fn sum(reports: &[WorkerReport]) -> WorkerReport {
        let mut t = WorkerReport {
            ready: !reports.is_empty(),
            done: !reports.is_empty(),
            // The last worker's moment, once every worker has one.
            all_up_unix_ms: (!reports.is_empty()).then_some(0),
            ..Default::default()
        };
        for r in reports {
            t.ready &= r.ready;
            t.done &= r.done;
            t.connected += r.connected;
            t.connacked += r.connacked;
            t.failed += r.failed;
            t.connect_errors += r.connect_errors;
            t.dropped += r.dropped;
            t.rss_kib += r.rss_kib;
            if t.first_error.is_none() {
                t.first_error.clone_from(&r.first_error);
            }
            t.all_up_unix_ms = match (t.all_up_unix_ms, r.all_up_unix_ms) {
                (Some(a), Some(b)) => Some(a.max(b)),
                _ => None,
            };
        }
        t
    }
}

/// Lines `first .. first + count` of the credential cache, each checked to be `bench-<i>`.
pub fn load_creds_range(path: &Path, first: usize, count: usize) -> anyhow::Result<Vec<Cred>> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut out = Vec::with_capacity(count);
    for (k, line) in std::io::BufReader::new(f)
        .lines()
        .skip(first)
        .take(count)
        .enumerate()
    {
        let line = line?;
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("{} line {}", path.display(), first + k + 1))?;
        let s = |key: &str| v[key].as_str().map(str::to_owned);
        let want = crate::target::device_id(first + k);
        match (s("id"), s("cert"), s("key")) {
            (Some(id), Some(cert_pem), Some(key_pem)) if id == want => out.push(Cred {
                id,
                cert_pem,
                key_pem,
            }),
            _ => anyhow::bail!(
                "{} line {}: not the credentials of {want}",
                path.display(),
                first + k + 1
            ),
        }
    }
    anyhow::ensure!(
        out.len() == count,
        "{} holds {} of the {count} devices from {first}",
        path.display(),
        out.len()
    );
    Ok(out)
}

async fn write_report(out: &mut tokio::io::Stdout, r: &WorkerReport) -> anyhow::Result<()> {
    let mut line = serde_json::to_vec(r)?;
    line.push(b'\n');
    out.write_all(&line).await?;
    out.flush().await?;
    Ok(())
}

/// Now, in ms since the Unix epoch (comparable across the processes of one machine).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn report_of(fleet: &Fleet, all_up_unix_ms: Option<u64>, done: bool) -> WorkerReport {
    let s = &fleet.stats;
    WorkerReport {
        ready: true,
        connected: s.connected_now(),
        connacked: s.connacked(0),
        failed: s.failed(),
        connect_errors: s.connect_errors(),
        dropped: s.dropped(),
        rss_kib: crate::target::rss_kib(std::process::id()).unwrap_or(0),
        first_error: s.first_error(),
        all_up_unix_ms,
        done,
    }
}

/// The worker's whole life: spec, credentials, `ready`, `go`, connect and report, stop.
pub async fn run_worker() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let mut out = tokio::io::stdout();
    let line = tokio::time::timeout(SPEC_TIMEOUT, stdin.next_line())
        .await
        .context("no spec on stdin in time")??
        .context("stdin closed before the spec")?;
    let spec: WorkerSpec = serde_json::from_str(&line).context("parsing the worker spec")?;
    anyhow::ensure!(!spec.nodes.is_empty(), "a worker needs at least one node");
    let deadline = Instant::now() + Duration::from_secs(spec.lifetime_secs);
    let creds = load_creds_range(&spec.creds_file, spec.first, spec.count)?;
    let ca = std::fs::read_to_string(&spec.ca_file)
        .with_context(|| format!("reading {}", spec.ca_file.display()))?;
    let endpoints = spec
        .nodes
        .iter()
        .map(|a| Endpoint::new(*a, &ca).map(Arc::new))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let ready = WorkerReport {
        ready: true,
        rss_kib: crate::target::rss_kib(std::process::id()).unwrap_or(0),
        ..Default::default()
    };
    write_report(&mut out, &ready).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Wait for `go`; stdin closed, a signal or the lifetime's end stop the worker already here.
    loop {
        tokio::select! {
            line = stdin.next_line() => match line {
                Ok(Some(l)) if l.trim() == "go" => break,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return Ok(()),
            },
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
    let n = endpoints.len();
    let devices: Vec<(Arc<Endpoint>, Cred)> = creds
        .into_iter()
        .enumerate()
        .map(|(k, c)| (endpoints[(spec.first + k) % n].clone(), c))
        .collect();
    let fleet = Fleet::spawn_assigned(
        devices,
        Arc::new(SourceAddrs::from_block(spec.source_block)),
        FleetOpts {
            keepalive_secs: spec.keepalive_secs,
            reconnect: false,
            attempts_max: 5,
            concurrency: spec.concurrency.max(1),
            respond_to_commands: spec.respond_to_commands,
        },
    );
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    let mut all_up = None;
    loop {
        let lifetime_left = deadline.saturating_duration_since(Instant::now());
        tokio::select! {
            _ = tick.tick() => {
                if write_report(&mut out, &report_of(&fleet, all_up, false)).await.is_err() {
                    break; // the parent is gone
                }
            }
            // The moment the last device is up, timed here (the reports come at intervals).
            up = fleet.wait_until(lifetime_left, |s| s.connected_now() >= spec.count), if all_up.is_none() => {
                if up {
                    all_up = Some(unix_ms());
                    tick.reset_immediately();
                }
            }
            line = stdin.next_line() => match line {
                Ok(Some(l)) if l.trim() != "stop" => {}
                _ => break,
            },
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!("cluster-worker: lifetime of {} s over; stopping", spec.lifetime_secs);
                break;
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    let last = report_of(&fleet, all_up, false);
    fleet.shutdown().await;
    let _ = write_report(&mut out, &WorkerReport { done: true, ..last }).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_add_up_and_ready_needs_every_worker() {
        let a = WorkerReport {
            ready: true,
            connected: 3,
            connacked: 3,
            rss_kib: 10,
            ..Default::default()
        };
        let b = WorkerReport {
            ready: false,
            connected: 2,
            connacked: 4,
            failed: 1,
            first_error: Some("x".into()),
            ..Default::default()
        };
        let t = WorkerReport::sum(&[a.clone(), b]);
        assert!(!t.ready);
        assert_eq!(
            (t.connected, t.connacked, t.failed, t.rss_kib),
            (5, 7, 1, 10)
        );
        assert_eq!(t.first_error.as_deref(), Some("x"));
        assert!(WorkerReport::sum(std::slice::from_ref(&a)).ready);
        // "All up" is the last worker's moment, and only once every worker has one.
        let up = |ms| WorkerReport {
            all_up_unix_ms: Some(ms),
            ..a.clone()
        };
        assert_eq!(WorkerReport::sum(&[up(5), up(9)]).all_up_unix_ms, Some(9));
        assert_eq!(WorkerReport::sum(&[up(5), a.clone()]).all_up_unix_ms, None);
        assert!(!WorkerReport::sum(&[]).ready);
    }

    #[test]
    fn a_range_of_the_credential_cache_is_loaded_and_checked() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("devices.jsonl");
        let creds: Vec<Cred> = (0..5)
            .map(|i| Cred {
                id: crate::target::device_id(i),
                cert_pem: format!("c{i}"),
                key_pem: format!("k{i}"),
            })
            .collect();
        crate::target::append_creds(&path, &creds)?;
        let got = load_creds_range(&path, 2, 3)?;
        assert_eq!(
            got.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
            ["bench-000002", "bench-000003", "bench-000004"]
        );
        assert_eq!(got[0].key_pem, "k2");
        assert!(load_creds_range(&path, 3, 3).is_err(), "past the end");
        Ok(())
    }
}
