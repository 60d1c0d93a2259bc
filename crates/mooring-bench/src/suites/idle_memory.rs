//! Suite 1: resident memory per idle mTLS connection.

use super::{fresh_start, over_fd_limit, row_from, IDLE_KEEPALIVE_SECS, RSS_SETTLE};
use crate::fleet::{Fleet, FleetOpts};
use crate::report::{Row, Table};
use crate::target::{self};
use crate::Bench;
use std::collections::BTreeMap;

/// Suite 1: RSS growth per idle mTLS connection.
pub async fn idle_memory(b: &mut Bench) -> anyhow::Result<Table> {
    let mut table = Table::new("idle memory per connected mTLS device");
    let sizes = b.args.idle_connections();
    for n in sizes {
        if let Some(note) = over_fd_limit(b, n) {
            let nn = crate::report::fmt_value(Some(n as f64));
            table.push(
                Row::new(
                    format!("KiB per idle connection, {nn} conns (lower is better)"),
                    None,
                    None,
                )
                .note(note),
            );
            continue;
        }
        let mut per_conn = BTreeMap::new();
        let mut before = BTreeMap::new();
        let mut after = BTreeMap::new();
        let mut connect_secs = BTreeMap::new();
        let mut notes = Vec::new();
        for t in b.targets.iter_mut() {
            eprintln!("idle-memory: {} with {n} connections", t.name());
            fresh_start(t, n).await?;
            tokio::time::sleep(RSS_SETTLE).await;
            let rss0 = t.rss_kib()?;
            let self0 = target::rss_kib(std::process::id())?;
            let fleet = Fleet::spawn(
                t.endpoint()?.clone(),
                t.creds(n)?,
                b.sources.clone(),
                FleetOpts {
                    keepalive_secs: IDLE_KEEPALIVE_SECS,
                    reconnect: false,
                    attempts_max: 5,
                    concurrency: b.args.connect_concurrency,
                    respond_to_commands: false,
                },
            );
            let all = fleet
                .wait_until(b.args.timeout(), |s| s.connected_now() + s.failed() >= n)
                .await;
            let took = fleet.started.elapsed();
            let up = fleet.stats.connected_now();
            let errors = fleet.stats.connect_errors();
            tokio::time::sleep(RSS_SETTLE).await;
            let rss1 = t.rss_kib()?;
            let self1 = target::rss_kib(std::process::id())?;
            let still_up = fleet.stats.connected_now();
            fleet.shutdown().await;
            t.kill().await;
            if !all || up < n || still_up < up {
                notes.push(format!(
                    "{}: {up} of {n} connected{}, {still_up} still up at the RSS sample",
                    t.name(),
                    if all { "" } else { " before the timeout" }
                ));
            }
            if errors > 0 {
                notes.push(format!("{}: {errors} connect attempts retried", t.name()));
            }
            if up == 0 {
                continue;
            }
            per_conn.insert(t.name(), (rss1 as f64 - rss0 as f64) / up as f64);
            before.insert(t.name(), rss0 as f64 / 1024.0);
            after.insert(t.name(), rss1 as f64 / 1024.0);
            connect_secs.insert(t.name(), took.as_secs_f64());
            eprintln!(
                "  {}: {up}/{n} up in {:.1} s; server RSS {rss0} → {rss1} KiB; load generator RSS {self0} → {self1} KiB",
                t.name(),
                took.as_secs_f64(),
            );
        }
        let nn = crate::report::fmt_value(Some(n as f64));
        table.push(
            row_from(
                format!("KiB per idle connection, {nn} conns (lower is better)"),
                &per_conn,
            )
            .note(if notes.is_empty() {
                "server RSS delta ÷ connections; TLS 1.3, ECDSA P-256 client certs".to_owned()
            } else {
                notes.join("; ")
            }),
        );
        table.push(row_from(format!("server RSS before, MiB ({nn})"), &before));
        table.push(row_from(
            format!("server RSS with all connected, MiB ({nn})"),
            &after,
        ));
        table.push(
            row_from(format!("time to connect all {nn}, s"), &connect_secs).note(format!(
                "{} handshakes in flight from the load generator",
                b.args.connect_concurrency
            )),
        );
    }
    Ok(table)
}
