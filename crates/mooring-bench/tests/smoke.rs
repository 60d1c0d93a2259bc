//! Smoke tests: tiny runs of the real suites against the real `mooring` binary and a private Mosquitto.
//!
//! They need `target/<profile>/mooring` (built by `cargo test --workspace`, or `cargo build -p
//! mooring`) and `/usr/sbin/mosquitto` (Debian package `mosquitto`); without either they skip.
//! The cluster suite's test needs no Mosquitto but PostgreSQL and NATS (JetStream) on loopback,
//! as `crates/mooring/tests/cluster.rs` does (`MOORING_BENCH_POSTGRES_URL`,
//! `MOORING_BENCH_NATS_URL` point elsewhere): without them it fails, never skips.

use clap::Parser;
use mooring_bench::{BenchArgs, Suite};
use serde_json::Value;
use std::path::PathBuf;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: BenchArgs,
}

/// `target/<profile>/mooring`, next to this test's `deps/` dir.
fn mooring_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let profile_dir = exe.parent()?.parent()?;
    let bin = profile_dir.join("mooring");
    bin.is_file().then_some(bin)
}

fn prerequisites() -> Option<PathBuf> {
    let Some(bin) = mooring_bin() else {
        eprintln!("skipped: no mooring binary next to the test (cargo build -p mooring)");
        return None;
    };
    if !std::path::Path::new("/usr/sbin/mosquitto").is_file() {
        eprintln!("skipped: /usr/sbin/mosquitto missing (apt-get install mosquitto)");
        return None;
    }
    Some(bin)
}

async fn run_json(suite_args: &[&str], bin: PathBuf) -> anyhow::Result<Value> {
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("out.json");
    let mut argv = vec!["mooring-bench"];
    argv.extend_from_slice(suite_args);
    let mut args = Cli::try_parse_from(argv)?.args;
    args.mooring_bin = Some(bin);
    args.json = Some(json.clone());
    args.work_dir = Some(dir.path().join("work"));
    args.timeout_secs = 60;
    mooring_bench::run(args).await?;
    Ok(serde_json::from_str(&std::fs::read_to_string(json)?)?)
}

fn row<'a>(doc: &'a Value, metric_prefix: &str) -> &'a Value {
    doc["tables"][0]["rows"]
        .as_array()
        .and_then(|rows| {
            rows.iter().find(|r| {
                r["metric"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(metric_prefix))
            })
        })
        .unwrap_or(&Value::Null)
}

#[test]
fn defaults_match_the_documented_suites() -> anyhow::Result<()> {
    let a = Cli::try_parse_from(["mooring-bench", "all"])?.args;
    assert_eq!(a.suite, Suite::All);
    assert_eq!(a.idle_connections(), vec![10_000, 50_000]);
    assert_eq!(a.storm_connections(), vec![10_000]);
    assert_eq!(a.publishers, vec![1, 100]);
    assert_eq!(a.qos, vec![0, 1]);
    let a = Cli::try_parse_from(["mooring-bench", "connect-storm", "--connections", "500"])?.args;
    assert_eq!(a.storm_connections(), vec![500]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_of_ten_messages_runs_against_both_and_ours_stores_every_ack() -> anyhow::Result<()>
{
    let Some(bin) = prerequisites() else {
        return Ok(());
    };
    let doc = run_json(
        &[
            "ingest",
            "--publishers",
            "1,2",
            "--qos",
            "0,1",
            "--messages",
            "10",
        ],
        bin,
    )
    .await?;
    assert_eq!(doc["completed"], true, "{doc:#}");
    for metric in [
        "QoS0, 1 publisher",
        "QoS1, 1 publisher",
        "QoS1, 2 publishers",
    ] {
        let r = row(&doc, metric);
        assert!(
            r["mooring"].as_f64().is_some_and(|v| v > 0.0),
            "{metric}: {r}"
        );
        assert!(
            r["mosquitto"].as_f64().is_some_and(|v| v > 0.0),
            "{metric}: {r}"
        );
        assert!(r["ratio"].is_number(), "{metric}: {r}");
    }
    let qos1 = row(&doc, "QoS1, 2 publishers");
    assert!(
        qos1["note"]
            .as_str()
            .is_some_and(|n| n.contains("verified: 10 stored = 10 acked")),
        "{qos1}"
    );
    // The fair peer: Mosquitto relaying to one subscriber, next to ours stored.
    let relay = row(
        &doc,
        "QoS0, 1 publisher, mosquitto relaying to 1 subscriber",
    );
    assert!(
        relay["mosquitto"].as_f64().is_some_and(|v| v > 0.0),
        "{relay}"
    );
    assert!(
        relay["mooring"].as_f64().is_some_and(|v| v > 0.0),
        "{relay}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "heavier: 300 connections per target, two restarts"]
async fn idle_memory_and_connect_storm_with_300_devices() -> anyhow::Result<()> {
    let Some(bin) = prerequisites() else {
        return Ok(());
    };
    let doc = run_json(&["idle-memory", "--connections", "300"], bin.clone()).await?;
    let r = row(&doc, "KiB per idle connection");
    assert!(
        r["mooring"].is_number() && r["mosquitto"].is_number(),
        "{r}"
    );
    let doc = run_json(&["connect-storm", "--connections", "300"], bin).await?;
    let r = row(&doc, "kill -9 → all");
    assert!(
        r["mooring"].is_number() && r["mosquitto"].is_number(),
        "{r}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_rtt_with_20_devices_measures_both_or_says_not_yet_available() -> anyhow::Result<()>
{
    let Some(bin) = prerequisites() else {
        return Ok(());
    };
    let doc = run_json(
        &["command-rtt", "--command-devices", "20", "--commands", "20"],
        bin,
    )
    .await?;
    assert_eq!(doc["completed"], true, "{doc:#}");
    let p50 = row(&doc, "command RTT p50");
    assert!(p50["mosquitto"].as_f64().is_some_and(|v| v > 0.0), "{p50}");
    let rate = row(&doc, "commands/s");
    // A server built before the commands API says so instead of a number.
    let unavailable = rate["note"]
        .as_str()
        .is_some_and(|n| n.contains("mooring: not yet available"));
    assert!(
        unavailable || p50["mooring"].as_f64().is_some_and(|v| v > 0.0),
        "{doc:#}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_of_ten_messages_reaches_the_persistent_subscriber_online_and_offline(
) -> anyhow::Result<()> {
    let Some(bin) = prerequisites() else {
        return Ok(());
    };
    let doc = run_json(
        &[
            "fanout",
            "--publishers",
            "1,2",
            "--messages",
            "10",
            "--repeat",
            "1",
            "--mosquitto-persistence",
        ],
        bin,
    )
    .await?;
    assert_eq!(doc["completed"], true, "{doc:#}");
    for metric in [
        "online subscriber, 1 publisher: delivered",
        "online subscriber, 2 publishers: publisher PUBACKs",
        "offline subscriber, 1 publisher: queued",
        "offline subscriber, 2 publishers: drained",
    ] {
        let r = row(&doc, metric);
        for target in ["mooring", "mosquitto"] {
            assert!(
                r[target].as_f64().is_some_and(|v| v > 0.0),
                "{metric}: {target}: {r}"
            );
        }
        // Every acknowledged message reached the subscriber (a loss is noted as "only").
        assert!(
            r["note"]
                .as_str()
                .is_some_and(|n| !n.contains("only") && !n.contains("failed")),
            "{metric}: {r}"
        );
        let persist = r["metric"]
            .as_str()
            .map(|m| format!("{m}, mosquitto persistence true"))
            .unwrap_or_default();
        let p = row(&doc, &persist);
        assert!(
            p["mosquitto"].as_f64().is_some_and(|v| v > 0.0),
            "{persist}: {p}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_of_two_nodes_connects_50_devices_from_three_processes_and_commands_cross_nodes(
) -> anyhow::Result<()> {
    let Some(bin) = mooring_bin() else {
        eprintln!("skipped: no mooring binary next to the test (cargo build -p mooring)");
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let json = dir.path().join("out.json");
    let mut args = Cli::try_parse_from([
        "mooring-bench",
        "cluster",
        "--cluster-nodes",
        "2",
        "--cluster-devices",
        "50",
        "--devices-per-worker",
        "20",
        "--cluster-scaling",
        "1,2",
        "--cluster-publishers",
        "5",
        "--messages",
        "200",
        "--commands",
        "20",
        "--repeat",
        "1",
    ])?
    .args;
    args.mooring_bin = Some(bin);
    args.worker_bin = Some(PathBuf::from(env!("CARGO_BIN_EXE_mooring-bench")));
    args.json = Some(json.clone());
    args.timeout_secs = 60;
    // No --work-dir: the suite's database is dropped at the end.
    let postgres_url = args.postgres_url.clone();
    mooring_bench::run(args).await?;
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(json)?)?;
    assert_eq!(doc["completed"], true, "{doc:#}");

    let connected = row(&doc, "devices connected over 2 nodes");
    assert_eq!(connected["mooring"].as_f64(), Some(50.0), "{doc:#}");
    assert!(
        connected["note"]
            .as_str()
            .is_some_and(|n| n.contains("3 load-generator processes") && n.contains("25 / 25")),
        "{connected}"
    );
    for metric in [
        "server RSS per connection",
        "time to connect all 50",
        "command RTT p50",
        "ingest QoS 1, 5 publishers over 1 node",
        "ingest QoS 1, 5 publishers over 2 nodes",
        "commands/s over 1 node",
        "commands/s over 2 nodes",
    ] {
        let r = row(&doc, metric);
        assert!(r["mooring"].is_number(), "{metric}: {doc:#}");
    }
    let p99 = row(&doc, "command RTT p99");
    assert!(
        p99["note"]
            .as_str()
            .is_some_and(|n| n.starts_with("20 of 20 succeeded")),
        "{p99}"
    );
    for k in ["1 node", "2 nodes"] {
        let ingest = row(&doc, &format!("ingest QoS 1, 5 publishers over {k}"));
        assert!(
            ingest["note"]
                .as_str()
                .is_some_and(|n| n.starts_with("verified each run")),
            "{ingest}"
        );
    }
    let setup = row(&doc, "setup");
    let note = setup["note"].as_str().unwrap_or_default();
    assert!(note.contains("share this machine's"), "{setup}");

    // The suite's database is gone.
    let db = note
        .split_whitespace()
        .find(|w| w.starts_with("mooring_bench_"))
        .unwrap_or_default()
        .to_owned();
    assert!(!db.is_empty(), "{setup}");
    let (client, connection) =
        tokio_postgres::connect(&postgres_url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(connection);
    let left = client
        .query_one(
            "SELECT count(*) FROM pg_database WHERE datname = $1",
            &[&db],
        )
        .await?;
    assert_eq!(left.get::<_, i64>(0), 0, "database {db} was not dropped");
    drop(client);
    let _ = driver.await;
    Ok(())
}
