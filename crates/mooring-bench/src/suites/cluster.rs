//! Suite: a cluster of our nodes on PostgreSQL + NATS (issue 13): many devices over several nodes from several load-generator processes (server memory per connection, connect time, command round trip across nodes), and ingest and command throughput with 1, 2 and 3 nodes.
//!
//! Phases, each bounded by `--timeout-secs`:
//! 1. **provision**: node n1 alone creates the devices through `POST /api/v1/devices` (timed,
//!    never part of a connect time; cached in the work dir), then is killed.
//! 2. **scaling**, for each `--cluster-scaling` count k (1, 2, 3): k fresh nodes; QoS 1 ingest
//!    from `--cluster-publishers` devices (publisher j on node j mod k; the stored count, summed
//!    over the nodes' `/metrics`, must equal the PUBACKs), then the same devices answering
//!    `--commands` commands sent `--cluster-commands-in-flight` at a time through the API of a
//!    node other than the device's.
//! 3. **connect**: `--cluster-nodes` fresh nodes; RSS summed over them; `--cluster-devices`
//!    devices connected by worker processes ([`crate::worker`]), device i on node i mod N,
//!    each subscribed to its commands; time until all are up; RSS again; then `--commands`
//!    commands, `--command-concurrency` at a time, each through a node other than the one the
//!    device is on, timed until the API answers `succeeded`.
//!
//! Every node's cluster counters (bus messages dropped, outbox drops, takeovers) and the
//! WARN/ERROR lines of its log (kept whole in the work dir) go into the table's notes.

use super::publishers::{connect_publishers_to, publish_all, MESSAGES_PER_PUBLISHER_MAX};
use super::{medians, percentile, IDLE_KEEPALIVE_SECS, RSS_SETTLE};
use crate::client::{Cred, CONNECTIONS_PER_SOURCE_ADDR};
use crate::cluster::{pool_size_for, Cluster, ClusterOpts, Workers};
use crate::fleet::{Fleet, FleetOpts};
use crate::report::{fmt_count, Row, Table};
use crate::target::{self, all_processes_cpu_secs, machine_cpu_secs, MachineCpu};
use crate::worker::WorkerSpec;
use crate::Bench;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest the nodes' stored counts may lag behind the PUBACKs of an ingest case.
const STORE_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(60);
/// `wait_ms` of every command (the API answers then, final or not).
const COMMAND_WAIT_MS: u64 = 10_000;
/// The first source-address block of the workers (127.0.0.12 on): the parent's own connections
/// (scaling phase) use the first blocks, so a worker never shares an address's ports with them.
const WORKER_SOURCE_BLOCK_FIRST: usize = 10;
/// Longest the workers may take to disconnect their devices and exit.
const WORKER_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the connect phase prints its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// Metrics of one node read for the table's health note.
const HEALTH_METRICS: [(&str, &str); 6] = [
    ("bus_dropped", "mooring_cluster_bus_dropped_total"),
    ("outbox_dropped", "mooring_cluster_outbox_dropped_total"),
    ("takeovers", "mooring_cluster_takeovers_total"),
    ("bus_sent", "mooring_cluster_bus_sent_total"),
    ("bus_received", "mooring_cluster_bus_received_total"),
    ("connections", "mooring_mqtt_connections"),
];

/// The cluster suite (ours only: Mosquitto has no cluster here).
pub async fn cluster(b: &mut Bench) -> anyhow::Result<Table> {
    let args = b.args.clone();
    anyhow::ensure!(
        args.cluster_nodes >= 1,
        "--cluster-nodes must be at least 1"
    );
    anyhow::ensure!(
        args.cluster_devices >= 1,
        "--cluster-devices must be at least 1"
    );
    anyhow::ensure!(
        args.cluster_publishers >= 1,
        "--cluster-publishers must be at least 1"
    );
    let bin = crate::mooring_bin(&args)?;
    let dir = b.work.join("cluster");
    let mut table = Table::new(format!(
        "cluster: {} devices over {} nodes on PostgreSQL + NATS (ours only)",
        fmt_count(args.cluster_devices as f64),
        args.cluster_nodes
    ));
    let c = Cluster::create(ClusterOpts {
        bin: bin.clone(),
        dir: dir.clone(),
        postgres_url: args.postgres_url.clone(),
        nats_url: args.nats_url.clone(),
        fd_limit: b.fd_limit,
        keep: args.work_dir.is_some(),
    })
    .await?;
    eprintln!(
        "cluster: database {} ({}), node logs in {}",
        c.database(),
        if c.db_created { "created" } else { "reused" },
        dir.display()
    );
    let mut run = Run {
        c,
        notes: Vec::new(),
        health: BTreeMap::new(),
        workers_used: 0,
    };
    let result = run.all(b, &mut table).await;
    run.c.kill_all().await;
    let Run {
        c,
        notes,
        health,
        workers_used,
    } = run;
    let db = c.database().to_owned();
    c.finish().await;
    result?;
    let machine = crate::machine();
    let cpus = machine["cpus"].as_u64().unwrap_or(0);
    table.push(Row::new("setup", None, None).note(format!(
        "all {} nodes, PostgreSQL, NATS and the load generator ({} worker processes + this one) \
         share this machine's {cpus} cores ({}); nothing here measures scaling over machines. \
         Nodes: `mooring serve`, [store] PostgreSQL database {db} (dropped at the end unless \
         --work-dir keeps it), [bus] NATS {} with a random prefix, default cluster settings; \
         devices: TLS 1.3, ECDSA P-256 client certificates, clean session, keep-alive {} s{}",
        args.cluster_nodes,
        workers_used,
        machine["cpu"].as_str().unwrap_or("?"),
        args.nats_url,
        IDLE_KEEPALIVE_SECS,
        if notes.is_empty() {
            String::new()
        } else {
            format!("; {}", notes.join("; "))
        }
    )));
    let health_note = health
        .iter()
        .map(|(phase, h)| format!("{phase}: {h}"))
        .collect::<Vec<_>>()
        .join(" | ");
    table.push(Row::new("cluster health", None, None).note(format!(
        "{health_note}; full node logs: {}/n<i>.log",
        dir.display()
    )));
    Ok(table)
}

/// One run of the suite: the cluster, notes for the setup row, health per phase.
struct Run {
    c: Cluster,
    notes: Vec<String>,
    health: BTreeMap<String, String>,
    workers_used: usize,
}

impl Run {
    async fn all(&mut self, b: &mut Bench, table: &mut Table) -> anyhow::Result<()> {
        let args = b.args.clone();
        // 1. Provision (node n1 alone), not part of any other figure.
        let need = args.cluster_devices.max(args.cluster_publishers);
        let pool = self.pool_size(b, 1).await?;
        self.c.set_pool_size(pool);
        self.c.start(0).await?;
        let (took, created) = self.c.ensure_devices(need).await?;
        self.c.kill_all().await;
        let rate = (created > 0).then(|| created as f64 / took.as_secs_f64().max(1e-9));
        table.push(
            Row::new("devices provisioned through the API, per second", rate, None).note(
                if created > 0 {
                    format!(
                        "{created} created in {:.1} s through node n1 (POST /api/v1/devices, {} in flight; \
                         the server makes each key and certificate); keys cached in the work dir; \
                         not part of any connect time",
                        took.as_secs_f64(),
                        target::PROVISION_CONCURRENCY
                    )
                } else {
                    format!("all {need} devices cached from a kept work dir")
                },
            ),
        );
        eprintln!(
            "cluster: {need} devices ready ({created} created in {:.1} s)",
            took.as_secs_f64()
        );

        // 2. Throughput with 1, 2, 3 nodes.
        let mut scaling = args.cluster_scaling.clone();
        scaling.retain(|k| *k > 0);
        scaling.sort_unstable();
        scaling.dedup();
        let mut scaling_rows = Vec::new();
        for k in scaling {
            match self.scaling_case(b, k).await {
                Ok(rows) => scaling_rows.extend(rows),
                Err(e) => {
                    eprintln!("cluster: {k} node(s): failed: {e:#}");
                    scaling_rows.push(
                        Row::new(format!("throughput with {k} node(s)"), None, None)
                            .note(format!("failed: {e:#}")),
                    );
                }
            }
            self.c.kill_all().await;
        }

        // 3. All devices over all nodes.
        match self.connect_phase(b).await {
            Ok(rows) => table.rows.extend(rows),
            Err(e) => {
                eprintln!("cluster: connect phase failed: {e:#}");
                table.push(
                    Row::new(
                        format!(
                            "{} devices over {} nodes",
                            fmt_count(args.cluster_devices as f64),
                            args.cluster_nodes
                        ),
                        None,
                        None,
                    )
                    .note(format!("failed: {e:#}")),
                );
            }
        }
        table.rows.extend(scaling_rows);
        Ok(())
    }

    /// `--pool-size`, else PostgreSQL's free connections shared over `nodes`.
    async fn pool_size(&self, b: &Bench, nodes: usize) -> anyhow::Result<usize> {
        match b.args.pool_size {
            Some(n) => Ok(n.max(1)),
            // Nothing of ours runs when this is asked: the count excludes our nodes.
            None => pool_size_for(&b.args.postgres_url, nodes).await,
        }
    }

    /// Every running node's counters and log lines, as one note.
    async fn health_of(&self) -> String {
        let mut parts = Vec::new();
        for node in self.c.running() {
            let mut m = Vec::new();
            for (short, name) in HEALTH_METRICS {
                match node.metric(name).await {
                    Ok(v) => m.push(format!("{short} {}", fmt_count(v))),
                    Err(e) => m.push(format!("{short} ? ({e})")),
                }
            }
            let (warn, error) = node.log_counts();
            parts.push(format!(
                "{}: {}, log WARN {warn} ERROR {error}",
                node.name,
                m.join(", ")
            ));
        }
        parts.join("; ")
    }

    /// Ingest and command throughput with `k` fresh nodes.
    async fn scaling_case(&mut self, b: &mut Bench, k: usize) -> anyhow::Result<Vec<Row>> {
        let args = b.args.clone();
        let p = args.cluster_publishers;
        let pool = self.pool_size(b, k).await?;
        self.c.set_pool_size(pool);
        self.c.start_first(k).await?;
        let endpoints = (0..k)
            .map(|i| self.c.endpoint(i))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let creds: Vec<Cred> = self.c.creds(p)?.to_vec();
        let nodes = if k == 1 {
            "1 node".to_owned()
        } else {
            format!("{k} nodes")
        };
        let mut rows = Vec::new();

        // Ingest: QoS 1, durable; the nodes' stored counts must add up to the PUBACKs.
        let total = args.messages.max(p);
        let mut samples: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
        let mut notes = Vec::new();
        let mut bus_per_msg = Vec::new();
        for rep in 0..args.repeat.max(1) {
            eprintln!(
                "cluster: ingest over {nodes}: {p} publishers, {total} QoS 1 messages (run {})",
                rep + 1
            );
            let case = b.next_case();
            let seq_base = b.seq_base + case * MESSAGES_PER_PUBLISHER_MAX as u64;
            let devices = creds
                .iter()
                .enumerate()
                .map(|(j, c)| (endpoints[j % k].clone(), c.clone()))
                .collect();
            let conns = connect_publishers_to(devices, &b.sources).await?;
            let stored0 = self
                .c
                .metric_sum("mooring_telemetry_messages_total")
                .await?;
            let bus0 = self.c.metric_sum("mooring_cluster_bus_sent_total").await?;
            let started = Instant::now();
            let (_, acked) = publish_all(conns, total, 1, &args, seq_base).await?;
            let elapsed = started.elapsed();
            let deadline = Instant::now() + STORE_CATCH_UP_TIMEOUT;
            let stored = loop {
                let now = self
                    .c
                    .metric_sum("mooring_telemetry_messages_total")
                    .await?;
                let stored = (now - stored0).max(0.0) as usize;
                if stored >= acked || Instant::now() >= deadline {
                    break stored;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let bus = self.c.metric_sum("mooring_cluster_bus_sent_total").await? - bus0;
            bus_per_msg.push(bus / acked.max(1) as f64);
            let rate = acked as f64 / elapsed.as_secs_f64();
            eprintln!(
                "  {rate:.0} msg/s; {stored} stored of {acked} acked; {bus} bus messages sent"
            );
            if stored != acked {
                notes.push(format!(
                    "MISMATCH (run {}): {stored} stored vs {acked} acked",
                    rep + 1
                ));
            }
            samples.entry("mooring").or_default().push(rate);
        }
        let (rates, spread) = medians(&samples);
        if notes.is_empty() {
            notes.push("verified each run: stored (summed over the nodes) = acked".to_owned());
        }
        notes.push(spread);
        notes.push(format!(
            "publisher j on node j mod {k}; ≤{} in flight each; bus messages sent (batches of \
             forwarded messages and notices) per 1,000 telemetry messages: {:.1} (every accepted \
             message is forwarded to the other nodes)",
            args.window,
            1000.0 * percentile(&sorted(bus_per_msg), 0.5)
        ));
        rows.push(
            Row::new(
                format!("ingest QoS 1, {p} publishers over {nodes}, msg/s (higher is better)"),
                rates.get("mooring").copied(),
                None,
            )
            .note(notes.join("; ")),
        );

        // Commands: the same devices answering, each command through another node's API.
        eprintln!(
            "cluster: commands over {nodes}: {} commands, {} in flight",
            args.commands, args.cluster_commands_in_flight
        );
        let fleet = Fleet::spawn_assigned(
            creds
                .iter()
                .enumerate()
                .map(|(j, c)| (Arc::new(endpoints[j % k].clone()), c.clone())),
            b.sources.clone(),
            FleetOpts {
                keepalive_secs: IDLE_KEEPALIVE_SECS,
                reconnect: false,
                attempts_max: 5,
                concurrency: args.connect_concurrency,
                respond_to_commands: true,
            },
        );
        let up = fleet
            .wait_until(args.timeout(), |s| s.connacked(0) + s.failed() >= p)
            .await;
        let connected = fleet.stats.connacked(0);
        let result = if up && connected == p {
            let apis: Vec<_> = self.c.running().map(|n| n.api.clone()).collect();
            let ids: Vec<String> = creds.iter().map(|c| c.id.clone()).collect();
            tokio::time::timeout(
                args.timeout(),
                send_commands(
                    apis,
                    ids,
                    args.commands,
                    args.cluster_commands_in_flight,
                    Route::OtherNode,
                ),
            )
            .await
            .map_err(|_| anyhow::anyhow!("commands timed out after {:?}", args.timeout()))
        } else {
            Err(anyhow::anyhow!(
                "only {connected} of {p} devices connected ({:?})",
                fleet.stats.first_error()
            ))
        };
        fleet.shutdown().await;
        let health = self.health_of().await;
        self.health.insert(format!("{nodes} (throughput)"), health);
        let mut row = Row::new(
            format!(
                "commands/s over {nodes}, {} in flight (higher is better)",
                args.cluster_commands_in_flight
            ),
            None,
            None,
        );
        match result {
            Ok(r) => {
                eprintln!(
                    "  {:.0} commands/s, p50 {:.2} ms, p99 {:.2} ms, {} failed",
                    r.per_sec(),
                    r.p(0.5),
                    r.p(0.99),
                    r.failed.len()
                );
                row.mooring = Some(r.per_sec());
                row.note = format!(
                    "{} of {} succeeded, RTT p50 {:.2} ms / p99 {:.2} ms; {}; {p} devices (device d on node d mod {k}); pool_size {pool}{}",
                    r.rtts_ms.len(),
                    args.commands,
                    r.p(0.5),
                    r.p(0.99),
                    if k > 1 {
                        "each POST …/commands?wait_ms through a node other than the device's"
                    } else {
                        "API and device on the one node"
                    },
                    r.failures_note()
                );
            }
            Err(e) => row.note = format!("failed: {e:#}"),
        }
        rows.push(row);
        Ok(rows)
    }

    /// All devices over all nodes: memory, connect time, command RTT across nodes.
    async fn connect_phase(&mut self, b: &mut Bench) -> anyhow::Result<Vec<Row>> {
        let args = b.args.clone();
        let (n, nodes) = (args.cluster_devices, args.cluster_nodes);
        let nn = fmt_count(n as f64);
        let usable = b.fd_limit.saturating_sub(target::FD_RESERVE) as usize;
        let per_node = n.div_ceil(nodes);
        if per_node > usable {
            anyhow::bail!(
                "not measured: {per_node} connections per node need more than the open-file limit \
                 of {} per process (a hard limit here); use more --cluster-nodes",
                b.fd_limit
            );
        }
        let per_worker_max = args.devices_per_worker.clamp(1, usable.max(1));
        let workers = n.div_ceil(per_worker_max);
        let per_worker = n.div_ceil(workers);
        self.workers_used = workers;
        let pool = self.pool_size(b, nodes).await?;
        self.c.set_pool_size(pool);
        eprintln!("cluster: starting {nodes} nodes (pool_size {pool})");
        self.c.start_first(nodes).await?;
        tokio::time::sleep(RSS_SETTLE).await;
        let rss0: Vec<u64> = self
            .c
            .running()
            .map(|node| node.rss_kib())
            .collect::<anyhow::Result<_>>()?;

        // The load generator: `workers` processes, each a range of the devices.
        let addrs: Vec<_> = self.c.running().map(|node| node.mqtt).collect();
        let concurrency = args.connect_concurrency.div_ceil(workers).max(1);
        let mut specs = Vec::with_capacity(workers);
        let mut block = WORKER_SOURCE_BLOCK_FIRST;
        for w in 0..workers {
            let first = w * per_worker;
            let count = per_worker.min(n - first);
            specs.push(WorkerSpec {
                creds_file: self.c.creds_file().to_owned(),
                first,
                count,
                nodes: addrs.clone(),
                ca_file: self.c.ca_file().to_owned(),
                source_block: block,
                concurrency,
                keepalive_secs: IDLE_KEEPALIVE_SECS,
                respond_to_commands: true,
                // Connect, settle, commands, stop: each bounded by the timeout.
                lifetime_secs: args.timeout_secs.saturating_mul(3).saturating_add(120),
            });
            block += count.div_ceil(CONNECTIONS_PER_SOURCE_ADDR);
        }
        let worker_bin = match &args.worker_bin {
            Some(p) => p.clone(),
            None => std::env::current_exe()?,
        };
        eprintln!(
            "cluster: {workers} load-generator processes × ≤{per_worker} devices, {concurrency} connects in flight each"
        );
        let mut w = Workers::spawn(&worker_bin, specs, b.fd_limit, self.c.dir()).await?;
        let worker_pids = w.pids();
        let node_pids: Vec<u32> = self.c.running().map(|node| node.pid()).collect();
        let cpu = CpuSample::take();
        w.go().await?;
        let started = Instant::now();
        let connect = self.wait_connected(&mut w, n, args.timeout()).await;
        let cpu = cpu.since(&node_pids, &worker_pids);
        let after_connect = w.total();
        // The last worker's own moment of "all up", else when the parent saw it.
        let connect_secs = match (after_connect.all_up_unix_ms, w.started_unix_ms) {
            (Some(up), Some(go)) if up >= go => (up - go) as f64 / 1000.0,
            _ => started.elapsed().as_secs_f64(),
        };
        tokio::time::sleep(RSS_SETTLE).await;
        let rss1: Vec<u64> = self
            .c
            .running()
            .map(|node| node.rss_kib())
            .collect::<anyhow::Result<_>>()?;
        let worker_rss = w.rss_kib();
        let mut per_node_conns = Vec::new();
        for node in self.c.running() {
            per_node_conns.push(node.metric("mooring_mqtt_connections").await.unwrap_or(0.0));
        }
        let up = after_connect.connected;
        let mut rows = Vec::new();
        let (sum0, sum1) = (rss0.iter().sum::<u64>(), rss1.iter().sum::<u64>());
        let mut conn_note = format!(
            "{up} of {n} up after {connect_secs:.1} s; {workers} load-generator processes, device i on node i mod {nodes}; \
             per node (connections per its /metrics): {}; {} connect attempts failed and were retried, {} devices gave up, {} sessions closed by a node",
            per_node_conns
                .iter()
                .map(|c| fmt_count(*c))
                .collect::<Vec<_>>()
                .join(" / "),
            after_connect.connect_errors,
            after_connect.failed,
            after_connect.dropped
        );
        if let Err(e) = &connect {
            conn_note.push_str(&format!("; {e:#}"));
        }
        if let Some(err) = &after_connect.first_error {
            conn_note.push_str(&format!("; first connect error: {err}"));
        }
        rows.push(
            Row::new(
                format!("devices connected over {nodes} nodes ({nn} asked)"),
                Some(up as f64),
                None,
            )
            .note(conn_note),
        );
        if up > 0 {
            rows.push(
                Row::new(
                    format!("server RSS per connection, KiB, summed over {nodes} nodes (lower is better)"),
                    Some((sum1 as f64 - sum0 as f64) / up as f64),
                    None,
                )
                .note(format!(
                    "(RSS with all connected − RSS before) ÷ connections; before {:.0} MiB, after {:.0} MiB; per node after: {} MiB",
                    sum0 as f64 / 1024.0,
                    sum1 as f64 / 1024.0,
                    rss1.iter()
                        .map(|r| format!("{:.0}", *r as f64 / 1024.0))
                        .collect::<Vec<_>>()
                        .join(" / ")
                )),
            );
        }
        rows.push(
            Row::new(
                format!("time to connect all {nn}, s (lower is better)"),
                connect.is_ok().then_some(connect_secs),
                None,
            )
            .note(format!(
                "from the first connect to the last SUBACK: TCP + TLS 1.3 + CONNECT + SUBSCRIBE devices/<id>/commands/+; \
                 {} connects in flight in all ({concurrency} per process); {}",
                concurrency * workers,
                cpu.note(connect_secs)
            )),
        );
        if up > 0 {
            rows.push(
                Row::new(
                    "load-generator RSS per connection, KiB (lower is better)",
                    Some(worker_rss as f64 / up as f64),
                    None,
                )
                .note(format!(
                    "{workers} processes, {:.0} MiB in all (credentials included)",
                    worker_rss as f64 / 1024.0
                )),
            );
        }

        // Command round trip across nodes, with every device online; then, for comparison,
        // through each device's own node.
        let mut runs = Vec::new();
        for route in [Route::OtherNode, Route::SameNode] {
            let r = if connect.is_ok() {
                eprintln!(
                    "cluster: {} commands, {} in flight, through {}",
                    args.commands,
                    args.command_concurrency,
                    match route {
                        Route::OtherNode => "another node than the device's",
                        Route::SameNode => "the device's own node",
                    }
                );
                let apis: Vec<_> = self.c.running().map(|node| node.api.clone()).collect();
                let ids: Vec<String> = self.c.creds(n)?.iter().map(|c| c.id.clone()).collect();
                tokio::time::timeout(
                    args.timeout(),
                    send_commands(apis, ids, args.commands, args.command_concurrency, route),
                )
                .await
                .map_err(|_| anyhow::anyhow!("commands timed out after {:?}", args.timeout()))
            } else {
                Err(anyhow::anyhow!("not measured: not every device connected"))
            };
            runs.push(r);
        }
        let same = runs
            .pop()
            .unwrap_or_else(|| Err(anyhow::anyhow!("not run")));
        let rtt = runs
            .pop()
            .unwrap_or_else(|| Err(anyhow::anyhow!("not run")));
        let still = w.total();
        let health = self.health_of().await;
        self.health
            .insert(format!("{nodes} nodes, {nn} devices"), health);
        let finals = w.stop(WORKER_STOP_TIMEOUT).await;
        let finals = crate::worker::WorkerReport::sum(&finals);
        let rtt_metric = |p: &str| {
            format!("command RTT {p}, ms, API node ≠ device's node, {nn} online (lower is better)")
        };
        match rtt {
            Ok(r) => {
                eprintln!(
                    "  p50 {:.2} ms, p99 {:.2} ms, {:.0} commands/s, {} failed",
                    r.p(0.5),
                    r.p(0.99),
                    r.per_sec(),
                    r.failed.len()
                );
                rows.push(Row::new(rtt_metric("p50"), Some(r.p(0.5)), None).note(
                    "POST /api/v1/devices/<id>/commands?wait_ms=10000 on node A → stored → kick over NATS → node B delivers (QoS 1) \
                     → device result → stored on B → final over NATS → A answers 200 succeeded",
                ));
                rows.push(
                    Row::new(rtt_metric("p99"), Some(r.p(0.99)), None).note(format!(
                    "{} of {} succeeded{}; device (i·7919) mod N, API node = another node in turn",
                    r.rtts_ms.len(),
                    args.commands,
                    r.failures_note()
                )),
                );
                rows.push(
                    Row::new(
                        format!(
                            "commands/s during the RTT run, {} in flight",
                            args.command_concurrency
                        ),
                        Some(r.per_sec()),
                        None,
                    )
                    .note(format!(
                        "{} sessions still up after the commands, {} closed by a node during the whole phase",
                        still.connected, finals.dropped
                    )),
                );
            }
            Err(e) => rows.push(Row::new(rtt_metric("p50"), None, None).note(format!("{e:#}"))),
        }
        let same_metric = format!(
            "command RTT p50, ms, API on the device's own node, {nn} online (for comparison)"
        );
        match same {
            Ok(r) => {
                eprintln!(
                    "  same node: p50 {:.2} ms, p99 {:.2} ms, {} failed",
                    r.p(0.5),
                    r.p(0.99),
                    r.failed.len()
                );
                rows.push(Row::new(same_metric, Some(r.p(0.5)), None).note(format!(
                    "p99 {:.2} ms; {} of {} succeeded{}; the same commands without the two bus hops, run after the row above",
                    r.p(0.99),
                    r.rtts_ms.len(),
                    args.commands,
                    r.failures_note()
                )));
            }
            Err(e) => rows.push(Row::new(same_metric, None, None).note(format!("{e:#}"))),
        }
        self.c.kill_all().await;
        Ok(rows)
    }

    /// Waits until `n` devices are up (or up + given up = n, which fails), printing progress.
    async fn wait_connected(
        &mut self,
        w: &mut Workers,
        n: usize,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let mut next_print = Instant::now() + PROGRESS_INTERVAL;
        loop {
            let t = w.total();
            if t.connected >= n && t.all_up_unix_ms.is_some() {
                return Ok(());
            }
            if t.connected + t.failed >= n {
                anyhow::bail!("{} devices gave up after 5 attempts each", t.failed);
            }
            w.check_alive()?;
            self.c.check_alive()?;
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "only {} of {n} connected within {timeout:?} ({} failed)",
                    t.connected,
                    t.failed
                );
            }
            if Instant::now() >= next_print {
                next_print += PROGRESS_INTERVAL;
                eprintln!(
                    "  {} of {n} connected, {} attempts failed, {} gave up, load generator {} MiB",
                    t.connected,
                    t.connect_errors,
                    t.failed,
                    t.rss_kib / 1024
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

/// Every process's CPU seconds and the machine's at one moment.
struct CpuSample {
    procs: BTreeMap<u32, (String, f64)>,
    machine: MachineCpu,
}

/// CPU seconds spent between two [`CpuSample`]s, by part of the system.
#[derive(Default)]
struct CpuUse {
    nodes: f64,
    workers: f64,
    postgres: f64,
    nats: f64,
    this: f64,
    /// Every other process alive at the end (ones that exited meanwhile are not counted).
    others: f64,
    machine: MachineCpu,
}

impl CpuSample {
    fn take() -> CpuSample {
        CpuSample {
            procs: all_processes_cpu_secs(),
            machine: machine_cpu_secs(),
        }
    }

    /// What each part used since `self` (`nodes` and `workers`: our pids).
    fn since(&self, nodes: &[u32], workers: &[u32]) -> CpuUse {
        let now = CpuSample::take();
        let me = std::process::id();
        let mut u = CpuUse {
            machine: MachineCpu {
                busy: now.machine.busy - self.machine.busy,
                irq: now.machine.irq - self.machine.irq,
                steal: now.machine.steal - self.machine.steal,
            },
            ..Default::default()
        };
        for (pid, (comm, secs)) in &now.procs {
            let before = self
                .procs
                .get(pid)
                .filter(|(c, _)| c == comm)
                .map_or(0.0, |(_, s)| *s);
            let d = (secs - before).max(0.0);
            let part = if nodes.contains(pid) {
                &mut u.nodes
            } else if workers.contains(pid) {
                &mut u.workers
            } else if *pid == me {
                &mut u.this
            } else if comm == "postgres" {
                &mut u.postgres
            } else if comm == "nats-server" {
                &mut u.nats
            } else {
                &mut u.others
            };
            *part += d;
        }
        u
    }
}

impl CpuUse {
    fn note(&self, wall_secs: f64) -> String {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        format!(
            "CPU core-seconds meanwhile: nodes {:.0}, load generator {:.0} (+ {:.0} this process), \
             PostgreSQL {:.0}, NATS {:.0}, interrupts/softirq {:.0}, other processes on the \
             machine {:.0} (at least: ones that ended are not counted), steal {:.0}; the machine \
             was {:.0} % busy ({:.0} of {:.0} core-seconds)",
            self.nodes,
            self.workers,
            self.this,
            self.postgres,
            self.nats,
            self.machine.irq,
            self.others,
            self.machine.steal,
            100.0 * self.machine.busy / (wall_secs * cpus).max(1e-9),
            self.machine.busy,
            wall_secs * cpus
        )
    }
}

/// What a run of commands measured.
struct CommandRun {
    rtts_ms: Vec<f64>,
    failed: Vec<String>,
    elapsed: Duration,
}

impl CommandRun {
    fn p(&self, q: f64) -> f64 {
        percentile(&self.rtts_ms, q)
    }

    fn per_sec(&self) -> f64 {
        super::per_sec(self.rtts_ms.len(), self.elapsed)
    }

    fn failures_note(&self) -> String {
        match self.failed.first() {
            None => String::new(),
            Some(first) => format!("; {} FAILED, first: {first}", self.failed.len()),
        }
    }
}

/// Through which node's API commands go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Another node than the device's, in turn (the only one when there is one).
    OtherNode,
    /// The device's own node (a comparison without the bus hops).
    SameNode,
}

/// Which node's API sends command `i` to device `d` (on node `d mod nodes`).
fn api_node_for(i: usize, d: usize, nodes: usize, route: Route) -> usize {
    if nodes <= 1 || route == Route::SameNode {
        return d % nodes.max(1);
    }
    (d % nodes + 1 + i % (nodes - 1)) % nodes
}

/// `total` commands (`{"name":"ping"}`, `wait_ms` [`COMMAND_WAIT_MS`]) to devices spread over
/// `ids`, `in_flight` at once, command `i` through `apis[api_node_for(i, d, apis.len(), route)]`.
async fn send_commands(
    apis: Vec<mooring_api::Client>,
    ids: Vec<String>,
    total: usize,
    in_flight: usize,
    route: Route,
) -> CommandRun {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (apis, ids) = (Arc::new(apis), Arc::new(ids));
    let started = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..in_flight.max(1) {
        let (next, apis, ids) = (next.clone(), apis.clone(), ids.clone());
        set.spawn(async move {
            let (mut rtts, mut failed) = (Vec::new(), Vec::new());
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= total || ids.is_empty() || apis.is_empty() {
                    return (rtts, failed);
                }
                let d = (i * 7_919) % ids.len();
                let api = &apis[api_node_for(i, d, apis.len(), route)];
                let id = &ids[d];
                let ping = mooring_api::CreateCommand {
                    name: "ping".to_owned(),
                    ..Default::default()
                };
                let sent = Instant::now();
                match api.create_command(id, &ping, Some(COMMAND_WAIT_MS)).await {
                    Ok((_, c)) if c.state == "succeeded" => {
                        rtts.push(sent.elapsed().as_secs_f64() * 1000.0);
                    }
                    Ok((_, c)) => failed.push(format!(
                        "{id}: state {} after {:.0} ms",
                        c.state,
                        sent.elapsed().as_secs_f64() * 1000.0
                    )),
                    Err(e) => failed.push(format!("{id}: {e}")),
                }
            }
        });
    }
    let (mut rtts_ms, mut failed) = (Vec::with_capacity(total), Vec::new());
    while let Some(r) = set.join_next().await {
        match r {
            Ok((r, f)) => {
                rtts_ms.extend(r);
                failed.extend(f);
            }
            Err(e) => failed.push(format!("command task: {e}")),
        }
    }
    let elapsed = started.elapsed();
    rtts_ms.sort_by(f64::total_cmp);
    CommandRun {
        rtts_ms,
        failed,
        elapsed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_go_through_another_node_than_the_devices_in_turn() {
        for nodes in 2..7 {
            let mut seen = std::collections::BTreeSet::new();
            for i in 0..100 {
                let d = 13;
                let a = api_node_for(i, d, nodes, Route::OtherNode);
                assert!(a < nodes);
                assert_ne!(a, d % nodes, "i {i} nodes {nodes}");
                seen.insert(a);
            }
            assert_eq!(seen.len(), nodes - 1, "every other node takes a turn");
        }
        assert_eq!(api_node_for(5, 3, 1, Route::OtherNode), 0);
        assert_eq!(api_node_for(5, 13, 6, Route::SameNode), 1);
    }
}
