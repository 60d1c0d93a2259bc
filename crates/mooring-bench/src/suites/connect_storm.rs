//! Suite 3: how long a fleet takes to reconnect after the server is killed and restarted.

use super::{fresh_start, over_fd_limit, row_from, spawn_connected, IDLE_KEEPALIVE_SECS};
use crate::fleet::FleetOpts;
use crate::report::{Row, Table};
use crate::Bench;
use std::collections::BTreeMap;
use std::time::Instant;

/// Suite 3: time for N devices to reconnect after `kill -9` and restart of the server.
pub async fn connect_storm(b: &mut Bench) -> anyhow::Result<Table> {
    let mut table =
        Table::new("connect storm: reconnect after kill -9 and restart (lower is better)");
    for n in b.args.storm_connections() {
        if let Some(note) = over_fd_limit(b, n) {
            let nn = crate::report::fmt_value(Some(n as f64));
            table.push(
                Row::new(format!("kill -9 → all {nn} reconnected, s"), None, None).note(note),
            );
            continue;
        }
        let mut restart = BTreeMap::new();
        let mut after_listen = BTreeMap::new();
        let mut total = BTreeMap::new();
        let mut notes = Vec::new();
        for t in b.targets.iter_mut() {
            eprintln!("connect-storm: {} with {n} devices", t.name());
            fresh_start(t, n).await?;
            let opts = FleetOpts {
                keepalive_secs: IDLE_KEEPALIVE_SECS,
                reconnect: true,
                attempts_max: u32::MAX,
                concurrency: b.args.connect_concurrency,
                respond_to_commands: false,
            };
            let Some(fleet) = spawn_connected(
                t,
                n,
                b.sources.clone(),
                opts,
                b.args.timeout(),
                "connected initially",
                &mut notes,
            )
            .await?
            else {
                continue;
            };
            let errors_before = fleet.stats.connect_errors();
            fleet.set_epoch(1);
            let killed = Instant::now();
            t.kill().await;
            t.start().await?;
            let listening = killed.elapsed();
            let all = fleet
                .wait_until(b.args.timeout(), |s| s.connacked(1) >= n)
                .await;
            let done = killed.elapsed();
            let back = fleet.stats.connacked(1);
            let retries = fleet.stats.connect_errors() - errors_before;
            fleet.shutdown().await;
            t.kill().await;
            eprintln!(
                "  {}: listening after {:.2} s, {back}/{n} back after {:.2} s ({retries} failed attempts)",
                t.name(),
                listening.as_secs_f64(),
                done.as_secs_f64()
            );
            notes.push(format!("{}: {retries} failed attempts", t.name()));
            if !all {
                notes.push(format!(
                    "{}: only {back} of {n} back within the timeout",
                    t.name()
                ));
                continue;
            }
            restart.insert(t.name(), listening.as_secs_f64());
            after_listen.insert(t.name(), (done - listening).as_secs_f64());
            total.insert(t.name(), done.as_secs_f64());
        }
        let nn = crate::report::fmt_value(Some(n as f64));
        table.push(
            row_from(
                format!("kill -9 → listening again ({nn} online), s"),
                &restart,
            )
            .note("includes the kernel tearing down the killed process's sockets"),
        );
        table.push(
            row_from(
                format!("listening → all {nn} reconnected, s"),
                &after_listen,
            )
            .note(format!(
                "clients retry with full-jitter backoff ({}–{} ms), {} handshakes in flight",
                crate::fleet::BACKOFF_BASE.as_millis(),
                crate::fleet::BACKOFF_CAP.as_millis(),
                b.args.connect_concurrency
            )),
        );
        table.push(
            row_from(format!("kill -9 → all {nn} reconnected, s"), &total).note(notes.join("; ")),
        );
    }
    Ok(table)
}
