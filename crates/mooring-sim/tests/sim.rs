//! The simulator end to end: the real agents against the real in-process server on virtual
//! time, with assertions on what a fleet operator cares about (nothing acknowledged is lost,
//! every command runs exactly once) and on the simulator's own promise (same seed, same run).

use mooring_sim::report::Report;
use mooring_sim::scenario::Scenario;
use std::path::Path;

fn scenario(toml_text: &str) -> anyhow::Result<Scenario> {
    let s: Scenario = toml::from_str(toml_text)?;
    s.validate()?;
    Ok(s)
}

fn run(s: &Scenario) -> anyhow::Result<Report> {
    mooring_sim::quiet_injected_panics();
    let dir = mooring_sim::temp_data_dir()?;
    let report = mooring_sim::run::run_blocking(s, dir.path())?;
    eprintln!("{}", report.table());
    Ok(report)
}

fn failed(r: &Report) -> Vec<String> {
    r.expectations
        .iter()
        .filter(|e| !e.ok)
        .map(|e| format!("{}: expected {}, got {}", e.name, e.expected, e.actual))
        .collect()
}

#[test]
fn every_scenario_file_parses_and_validates() -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            let s = Scenario::load(&path)?;
            assert!(s.device_count() > 0, "{}", path.display());
            n += 1;
        }
    }
    assert!(n >= 8, "found {n} scenarios in {}", dir.display());
    Ok(())
}

/// A fleet of 10,000 devices for 30 simulated minutes: a 10-minute regional outage, a fleet
/// command sent while half the targets are offline, and a second command to the whole fleet.
#[test]
fn ten_thousand_devices_lose_no_acked_telemetry_and_run_every_command_once() -> anyhow::Result<()> {
    let s = scenario(
        r#"
        name = "ci-10k"
        seed = 11
        duration = "30m"
        sample_interval = "5m"

        [[cohort]]
        name = "eu"
        count = 5000
        region = "eu"
        tags = { hw = "rev-b" }
        telemetry_interval = "5m"
        connect_spread = "2m"
        keepalive = "300s"

        [[cohort]]
        name = "us"
        count = 5000
        region = "us"
        tags = { hw = "rev-a" }
        telemetry_interval = "5m"
        connect_spread = "2m"
        keepalive = "300s"

        [[event]]
        at = "8m"
        action = "cut_link"
        region = "eu"
        duration = "10m"

        [[event]]
        at = "10m"
        action = "command"
        to = "tag:hw=rev-b"
        name = "ping"
        ttl = "15m"

        [[event]]
        at = "12m"
        action = "command"
        to = "tag:hw=rev-a"
        name = "ping"
        ttl = "15m"

        [expect]
        lost_acked_telemetry = 0
        commands_executed_twice = 0
        min_online_at_end = 10000
        min_commands_succeeded = 10000
        "#,
    )?;
    let r = run(&s)?;
    assert_eq!(failed(&r), Vec::<String>::new());
    assert_eq!(r.devices, 10_000);
    assert_eq!(r.lost_acked_telemetry, 0, "{:?}", r.lost_examples);
    assert!(r.telemetry_acked > 0 && r.telemetry_stored >= r.telemetry_acked);
    assert_eq!(r.commands_sent, 10_000);
    assert_eq!(
        r.commands_succeeded, 10_000,
        "every command delivered and succeeded"
    );
    assert_eq!(
        r.commands_executed_once, 10_000,
        "every command executed exactly once"
    );
    assert_eq!(r.commands_executed_twice, 0);
    assert_eq!(r.online_at_end, 10_000);
    let cut = &r.faults["link_cut (drops, outages, cut_link)"];
    assert_eq!(
        cut.injected, 5_000,
        "the outage cut every eu device's live connection"
    );
    assert_eq!(cut.detected, 5_000, "and every agent noticed");
    Ok(())
}

/// Power loss, flash write failures, firmware crashes and panicking command handlers on one
/// small fleet: the agents' guarantees hold.
#[test]
fn power_loss_flash_failures_and_crashes_keep_acked_telemetry_and_run_commands_at_most_once(
) -> anyhow::Result<()> {
    let s = scenario(
        r#"
        name = "ci-faults"
        seed = 5
        duration = "2h"
        sample_interval = "10m"

        [[cohort]]
        name = "meter"
        count = 100
        tags = { kind = "meter" }
        telemetry_interval = "1m"
        power_loss_per_day = 48
        boot_delay = "10s"

        [[cohort]]
        name = "tag"
        count = 100
        tags = { kind = "tag" }
        telemetry_interval = "1m"
        flash_write_failure_rate = 0.02

        [[cohort]]
        name = "kiosk"
        count = 100
        tags = { kind = "kiosk" }
        telemetry_interval = "1m"
        crash_per_day = 48
        command_panic_rate = 0.3
        link = { latency_ms = 100, drops_per_day = 24 }

        [[event]]
        at = "20m"
        action = "command"
        to = "tag:kind=meter"
        name = "ping"
        ttl = "1h"

        [[event]]
        at = "25m"
        action = "command"
        to = "tag:kind=tag"
        name = "ping"
        ttl = "1h"

        [[event]]
        at = "30m"
        action = "command"
        to = "tag:kind=kiosk"
        name = "ping"
        ttl = "1h"

        [expect]
        lost_acked_telemetry = 0
        commands_executed_twice = 0
        "#,
    )?;
    let r = run(&s)?;
    assert_eq!(failed(&r), Vec::<String>::new());
    assert_eq!(r.lost_acked_telemetry, 0, "{:?}", r.lost_examples);
    assert_eq!(r.commands_executed_twice, 0);
    assert!(r.faults["power_loss"].injected > 50, "{:?}", r.faults);
    assert!(r.faults["firmware_crash"].injected > 50, "{:?}", r.faults);
    assert!(
        r.faults["flash_write_failure"].injected > 50,
        "{:?}",
        r.faults
    );
    let panics = &r.faults["command_handler_panic"];
    assert!(panics.injected > 0, "{:?}", r.faults);
    assert_eq!(
        panics.injected, panics.detected,
        "every panic ended its command failed"
    );
    assert_eq!(r.commands_sent, 300);
    // Every command ends final: a failed flash write while the agent records a result is
    // retried (FINISH_ATTEMPTS_MAX), so the server is never left waiting for a result.
    assert_eq!(
        r.commands_not_final, 0,
        "{:?}",
        r.commands_not_final_examples
    );
    assert_eq!(r.commands_succeeded + r.commands_failed, 300);
    Ok(())
}

/// Same seed, same run: two runs give the same report, wall time and memory aside.
#[test]
fn same_seed_same_report() -> anyhow::Result<()> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/server-restart.toml"),
    )?;
    let mut s = scenario(&text)?.scaled_to(60)?;
    for c in &mut s.cohorts {
        c.link.drops_per_day = 24.0;
        c.power_loss_per_day = 12.0;
    }
    let strip = |r: &Report| -> anyhow::Result<serde_json::Value> {
        let mut v = serde_json::to_value(r)?;
        if let Some(o) = v.as_object_mut() {
            for k in [
                "wall_ms",
                "rss_bytes",
                "rss_peak_bytes",
                "rss_bytes_per_device",
            ] {
                o.remove(k);
            }
            // How long a fleet command took in wall time.
            if let Some(events) = o.get_mut("timeline").and_then(|t| t.as_array_mut()) {
                for e in events {
                    if let Some(c) = e.get_mut("completed").and_then(|c| c.as_object_mut()) {
                        c.remove("wall_ms");
                    }
                }
            }
            // The store's batch latency is measured in wall time.
            if let Some(m) = o.get_mut("server_metrics").and_then(|m| m.as_object_mut()) {
                m.retain(|k, _| !k.contains("latency"));
            }
        }
        Ok(v)
    };
    let a = strip(&run(&s)?)?;
    let b = strip(&run(&s)?)?;
    if a != b {
        let (Some(ao), Some(bo)) = (a.as_object(), b.as_object()) else {
            anyhow::bail!("reports are not objects");
        };
        let differ: Vec<String> = ao
            .iter()
            .filter(|(k, v)| bo.get(*k) != Some(*v))
            .map(|(k, v)| match (v, &bo[k]) {
                (serde_json::Value::Array(x), serde_json::Value::Array(y)) => {
                    let at: Vec<String> = x
                        .iter()
                        .zip(y)
                        .enumerate()
                        .filter(|(_, (p, q))| p != q)
                        .take(3)
                        .map(|(i, (p, q))| format!("[{i}] {p} vs {q}"))
                        .collect();
                    format!("{k}: {at:?}")
                }
                (x, y) => format!("{k}: {x} vs {y}"),
            })
            .collect();
        panic!("same seed, different reports: {differ:#?}");
    }
    assert!(a["telemetry_stored"].as_u64().is_some_and(|n| n > 0));
    assert_eq!(a["deleted_devices"], 1);
    Ok(())
}

/// Remote mode: the fleet over real TCP + TLS (one client certificate per device) against a
/// server running in its own runtime, in real time, measured through the HTTP API.
#[test]
fn remote_mode_runs_real_agents_over_tls_against_a_running_server() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let config = mooring_server::ServerConfig {
        data_dir: data.path().to_owned(),
        mqtt_addr: "127.0.0.1:0".parse()?,
        http_addr: "127.0.0.1:0".parse()?,
        ..mooring_server::ServerConfig::default()
    };
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let server = server_rt.block_on(async {
        let listeners = mooring_server::Listeners::bind(&config).await?;
        mooring_server::RunningServer::start(
            config,
            listeners,
            std::sync::Arc::new(mooring_proto::SystemClock),
        )
        .await
    })?;
    let token_file = data.path().join(mooring_server::auth::ADMIN_TOKEN_FILE);
    let s = scenario(&format!(
        r#"
        name = "ci-remote"
        seed = 3
        duration = "12s"
        sample_interval = "2s"

        [server]
        mode = "remote"
        mqtt = "localhost:{mqtt}"
        api = "http://{http}"
        token_file = "{token}"

        [[cohort]]
        name = "rm"
        count = 20
        region = "eu"
        tags = {{ kind = "rm" }}
        telemetry_interval = "1s"
        connect_spread = "1s"
        keepalive = "5s"

        [[event]]
        at = "3s"
        action = "cut_link"
        region = "eu"
        duration = "2s"

        [[event]]
        at = "6s"
        action = "command"
        to = "tag:kind=rm"
        name = "ping"

        [[event]]
        at = "8s"
        action = "delete_device"
        device = "rm-3"

        [expect]
        lost_acked_telemetry = 0
        commands_executed_twice = 0
        min_online_at_end = 19
        "#,
        mqtt = server.mqtt_addr.port(),
        http = server.http_addr,
        token = token_file.display(),
    ))?;
    let r = run(&s);
    server_rt.block_on(server.shutdown());
    let r = r?;
    assert_eq!(failed(&r), Vec::<String>::new());
    assert_eq!(r.devices, 20);
    assert!(r.telemetry_acked > 100, "{}", r.telemetry_acked);
    assert_eq!(r.lost_acked_telemetry, 0, "{:?}", r.lost_examples);
    assert_eq!(r.commands_sent, 20);
    assert_eq!(r.commands_executed_twice, 0);
    assert_eq!(r.deleted_devices, 1);
    assert_eq!(r.faults["delete_device"].detected, 1, "{:?}", r.faults);
    Ok(())
}

/// scenarios/broker-bounds.toml at 1,000 devices: link drops and outages (takeovers, resumed
/// sessions), a server restart, most of the fleet re-tagged (sessions re-checked against the new
/// tags), a deletion and commands to the moved devices. A well-behaved fleet never hits a broker
/// quota or timeout, loses nothing acknowledged and runs every command once.
#[test]
fn broker_bounds_never_refuse_a_well_behaved_fleet_under_faults() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/broker-bounds.toml");
    let s = Scenario::load(&path)?.scaled_to(1_000)?;
    let r = run(&s)?;
    assert_eq!(failed(&r), Vec::<String>::new());
    assert_eq!(r.lost_acked_telemetry, 0, "{:?}", r.lost_examples);
    assert_eq!(r.commands_executed_twice, 0);
    assert_eq!(r.faults["retag"].injected, 600, "every lock moved");
    // The moved devices got the command sent to their new tag.
    assert!(
        r.commands_succeeded >= 2 * 600 + 400 - 2,
        "{}",
        r.commands_succeeded
    );
    Ok(())
}

/// scenarios/fleet-health.toml at 300 devices (120, 90, 90 on sites a, b, c) for its 8
/// simulated hours: site b's fast battery drain and site c's 30-minute outage are each found by
/// the cohort sweeper once per signal (and nothing else), within the stated simulated time; the
/// rule on the battery's rate alerts exactly site b's devices; each problem's playbook opens one
/// ticket listing the right devices.
#[test]
fn fleet_health_finds_each_problem_once_and_nothing_else() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/fleet-health.toml");
    let s = Scenario::load(&path)?.scaled_to(300)?;
    let r = run(&s)?;
    assert_eq!(failed(&r), Vec::<String>::new());
    let health = r.health.as_ref().expect("a health report");
    let cohort: Vec<&str> = health
        .alerts
        .iter()
        .filter(|(_, a)| a.cohort)
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(
        cohort,
        [
            "site=b: battery_low",
            "site=c: disconnects",
            "site=c: telemetry_gaps"
        ]
    );
    // One alert per cohort and signal, counted at every sweep while it stays flagged.
    for (key, a) in health.alerts.iter().filter(|(_, a)| a.cohort) {
        assert_eq!(a.alerts, 1, "{key}: {a:?}");
    }
    assert_eq!(health.alerts["fast-drain"].devices, 90);
    // Each problem ran its playbook once: one ticket listing only the cohort's devices, with
    // the parts the signals suggest.
    let link = &health.tickets["link-visit"];
    assert_eq!(
        (
            link.tickets,
            link.devices_total,
            link.listed_outside_selector
        ),
        (1, 90, 0),
        "{link:?}"
    );
    assert!(link.title.starts_with("site=c: disconnects"), "{link:?}");
    assert!(
        link.parts.get("wireless repeater").is_some_and(|n| *n > 0),
        "{link:?}"
    );
    assert_eq!(
        link.steps[0], "diagnostics requested from 10 device(s)",
        "{link:?}"
    );
    let battery = &health.tickets["battery-visit"];
    assert_eq!(
        (
            battery.tickets,
            battery.devices_total,
            battery.listed_outside_selector
        ),
        (1, 90, 0),
        "{battery:?}"
    );
    assert!(
        battery.parts.get("battery pack").is_some_and(|n| *n > 0),
        "{battery:?}"
    );
    Ok(())
}

/// scenarios/rollout-bad-rev-b.toml at 400 devices (200 rev-a, 200 rev-b) for 45 simulated
/// minutes: a staged rollout of a version whose rev-b devices, once they committed it, drop their
/// link 50 times as often. At this size a first wave of 1 % would be 4 devices, fewer than a gate
/// can judge, so the test's rollout has waves 10, 50, 100 % and a 10 % control cohort (36
/// devices in the first wave, 40 in the control). The first wave's gate must fail on the
/// disconnects and pause the rollout: no second wave, and rev-b untouched beyond its part of the
/// first wave.
#[test]
fn a_rollout_of_a_version_bad_on_one_hardware_stops_at_the_first_gate() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/rollout-bad-rev-b.toml");
    let mut s = Scenario::load(&path)?.scaled_to(400)?;
    s.duration = mooring_sim::scenario::DurationMs(45 * 60_000);
    for e in &mut s.events {
        if let mooring_sim::scenario::Action::Rollout(r) = &mut e.action {
            r.waves = Some(vec![10.0, 50.0, 100.0]);
            r.control_pct = Some(10.0);
            r.min_devices = Some(10);
        }
    }
    s.expect
        .rollouts
        .get_mut("1.1.0")
        .expect("a rollout expectation")
        .cohort_updated_share_max
        .insert("rev-b".into(), 0.15);
    s.validate()?;
    let r = run(&s)?;
    assert_eq!(failed(&r), Vec::<String>::new());
    let x = &r.rollouts[0];
    assert_eq!((x.state.as_str(), x.waves_started), ("paused", 1), "{x:?}");
    assert_eq!((x.devices, x.waves.len()), (400, 4), "{x:?}");
    let first = &x.waves[0];
    assert_eq!(first.devices, 36, "{x:?}");
    assert_eq!(first.committed, 36, "{x:?}");
    assert_eq!(first.started_ms, Some(5 * 60_000), "{x:?}");
    // The gate failed after the whole health window, on the disconnects.
    assert_eq!(first.gate.as_deref(), Some("fail"), "{x:?}");
    let (window, gate) = (
        first.window_ms.expect("window"),
        first.gate_ms.expect("gate"),
    );
    assert!(gate >= window + 30 * 60_000, "{x:?}");
    assert!(x.waves[1..]
        .iter()
        .all(|w| w.started_ms.is_none() && w.committed == 0));
    let g = x.gate.as_ref().expect("the gate");
    let disconnects = g
        .signals
        .iter()
        .find(|s| s.signal == "disconnects")
        .expect("disconnects compared");
    assert_eq!(disconnects.verdict, "fail", "{g:?}");
    assert!(
        x.reason
            .as_deref()
            .is_some_and(|r| r.contains("disconnects")),
        "{x:?}"
    );
    // rev-b got the update only as part of the first wave; rev-a likewise.
    let b = &x.cohorts["rev-b"];
    let a = &x.cohorts["rev-a"];
    assert_eq!(a.started + b.started, 36, "{x:?}");
    assert!(b.started > 0 && b.updated_share <= 0.15, "{b:?}");
    assert!(r.table().contains("rollout 1.1.0 (rol_"), "{}", r.table());
    assert!(r.html().contains("<h2>Rollout 1.1.0"));
    Ok(())
}

/// scenarios/bulk-tag-job.toml at 1,000 devices, with batches far enough apart that the
/// server restart falls between the job's two batches: the job resumes from its cursor after
/// the restart and ends with every device tagged and counted once.
#[test]
fn a_bulk_tag_job_survives_a_server_restart_in_its_middle() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/bulk-tag-job.toml");
    let mut s = Scenario::load(&path)?.scaled_to(1_000)?;
    s.job_batch_pause = mooring_sim::scenario::DurationMs(20_000);
    let r = run(&s)?;
    assert_eq!(failed(&r), Vec::<String>::new());
    assert!(
        r.events
            .iter()
            .any(|e| e.contains("is running at 500/1000 devices as the server stops")),
        "{:#?}",
        r.events
    );
    let job = r.jobs.first().expect("the job");
    assert_eq!(
        (job.state.as_str(), job.total, job.done, job.failed),
        ("succeeded", Some(1_000), 1_000, 0)
    );
    Ok(())
}

/// The HTML report from a real run says what a reader needs first: whether the run passed
/// (every expectation with what was measured), what each event did in plain words (a link cut
/// and a server restart with how the devices came back), and charts with an axis in simulated
/// time, value ticks with units and a marker per event, in one file that needs no network.
#[test]
fn the_html_report_shows_the_verdict_the_events_in_words_and_marked_charts() -> anyhow::Result<()> {
    let s = scenario(
        r#"
        name = "ci-report"
        seed = 7
        duration = "30m"
        sample_interval = "1m"

        [[cohort]]
        name = "eu"
        count = 10
        region = "eu"
        tags = { hw = "a" }
        telemetry_interval = "1m"
        connect_spread = "30s"

        [[cohort]]
        name = "us"
        count = 10
        region = "us"
        tags = { hw = "b" }
        telemetry_interval = "1m"
        connect_spread = "30s"
        power_loss_per_day = 96

        [[event]]
        at = "5m"
        action = "cut_link"
        region = "eu"
        duration = "5m"

        [[event]]
        at = "8m"
        action = "command"
        to = "tag:hw=a"
        name = "ping"
        ttl = "15m"

        [[event]]
        at = "15m"
        action = "restart_server"
        downtime = "1m"

        [[event]]
        at = "20m"
        action = "delete_device"
        device = "us-3"

        [expect]
        lost_acked_telemetry = 0
        commands_executed_twice = 0
        # One device is deleted: 20 cannot be online at the end, so this one fails.
        min_online_at_end = 20
        "#,
    )?;
    let r = run(&s)?;
    let html = r.html();

    // The verdict, and every expectation with its measured value.
    assert_eq!(
        failed(&r),
        vec!["min_online_at_end: expected >= 20, got 19"]
    );
    assert!(
        html.contains("FAILED — 1 of 3 expectations failed"),
        "{html}"
    );
    assert!(html
        .contains("<td>min_online_at_end</td><td class=num>≥ 20</td><td class='num bad'>19</td>"));
    assert!(html
        .contains("<td>lost_acked_telemetry</td><td class=num>≤ 0</td><td class='num ok'>0</td>"));

    // Each event in words, the cut and the restart with how the devices came back.
    let cut = &r.timeline[0];
    let back = cut.reconnected.as_ref().expect("the cut's reconnections");
    assert_eq!(
        (back.devices, back.of),
        (10, 10),
        "every eu device came back"
    );
    // The agents' reconnect backoff is capped at 30 s (plus jitter), in simulated time.
    assert!(
        back.median_ms <= back.max_ms && back.max_ms <= 60_000,
        "{back:?}"
    );
    let lines = r.event_lines();
    assert!(
        lines[0].starts_with(
            "cut_link (region eu) at 0:05: 10 devices cut for 5 min; all 10 devices \
             reconnected within "
        ),
        "{lines:#?}"
    );
    assert!(
        lines[0].contains(" of the link returning (median "),
        "{lines:#?}"
    );
    assert!(
        lines[1].starts_with(
            "command ping to tag:hw=a at 0:08: sent to 10 devices; 10 of 10 succeeded, the last "
        ),
        "{lines:#?}"
    );
    assert!(lines[1].contains(" of wall time"), "{lines:#?}");
    let completed = r.timeline[1]
        .completed
        .as_ref()
        .expect("a command's completion");
    assert!(
        completed.succeeded == 10 && completed.median_ms <= completed.max_ms,
        "{completed:?}"
    );
    assert!(
        lines[2].starts_with(
            "restart_server at 0:15: the server was down for 1 min; all 19 devices reconnected \
             within "
        ) && lines[2].contains("1 device deleted since is not counted"),
        "{lines:#?}"
    );
    assert_eq!(lines[3], "delete_device us-3 at 0:20: deleted");
    let faults = r.fault_lines();
    assert!(
        faults.iter().any(|l| l.starts_with("power loss: ")
            && l.ends_with(" times a device lost power and rebooted on the same flash")),
        "{faults:#?}"
    );
    assert!(
        faults.contains(
            &"deleted devices: the deleted device was offline at the end (session ended, \
              reconnects refused)"
                .to_owned()
        ),
        "{faults:#?}"
    );
    // On the page: numbered, with the time apart.
    assert!(html.contains(
        "<span class=t>0:05</span>cut_link (region eu): 10 devices cut for 5 min; all 10 \
         devices reconnected within "
    ));
    assert!(html.contains("<span class=t>0:20</span>delete_device us-3: deleted</li>"));
    for line in &faults {
        assert!(html.contains(line.as_str()), "the page says {line:?}");
    }

    // Charts: as wide as the page, simulated time on the x axis, units on the y axis, and a
    // numbered marker for each event on every chart.
    let charts = html.matches("<svg class=chart").count();
    assert_eq!(charts, 3, "online, telemetry, commands");
    assert_eq!(
        html.matches("viewBox='0 0 1000 300' width='100%'").count(),
        charts
    );
    assert_eq!(
        html.matches("<g class=marker>").count(),
        charts * r.timeline.len()
    );
    for tick in ["0:00", "0:05", "0:15", "0:30"] {
        assert!(
            html.contains(&format!(">{tick}</text>")),
            "time tick {tick}"
        );
    }
    for unit in ["devices", "messages / min", "commands"] {
        assert!(html.contains(&format!(">{unit}</text>")), "unit {unit}");
    }
    assert!(html.contains("class=ytick"));

    // One self-contained file.
    for external in ["<script", "http://", "https://", "src=", "<link"] {
        assert!(!html.contains(external), "the page contains {external}");
    }
    Ok(())
}

/// Cluster mode: three server nodes in one process on one store and one bus. A node is killed
/// (no shutdown) while a fleet command is being delivered, the lease holder later too, the
/// first one started again: nothing acknowledged is lost, every command runs once, every
/// device is online again on the surviving nodes, and no notice between nodes is dropped.
#[test]
fn a_cluster_loses_nodes_under_load_and_keeps_every_promise() -> anyhow::Result<()> {
    let s = scenario(
        r#"
        name = "ci-cluster"
        seed = 13
        duration = "15m"
        sample_interval = "1m"

        [server]
        mode = "cluster"
        nodes = 3

        [[cohort]]
        name = "meter"
        count = 240
        tags = { kind = "meter" }
        telemetry_interval = "1m"
        connect_spread = "30s"

        [[event]]
        at = "3m"
        action = "command"
        to = "tag:kind=meter"
        name = "ping"
        ttl = "15m"

        [[event]]
        at = "5m"
        action = "command"
        to = "tag:kind=meter"
        name = "ping"
        ttl = "10m"

        [[event]]
        at = "5m"
        action = "kill_node"
        node = 2

        [[event]]
        at = "8m"
        action = "restart_node"
        node = 2

        [[event]]
        at = "10m"
        action = "kill_node"
        node = 1

        [[event]]
        at = "12m"
        action = "command"
        to = "tag:kind=meter"
        name = "ping"
        ttl = "3m"

        [expect]
        lost_acked_telemetry = 0
        commands_executed_twice = 0
        min_online_at_end = 240
        min_commands_succeeded = 720
        max_reconnect_time = "10s"
        max_cluster_counters = { bus_dropped = 0, bus_rejected = 0, outbox_dropped = 0 }
        "#,
    )?;
    let r = run(&s)?;
    assert_eq!(failed(&r), Vec::<String>::new());
    assert_eq!(r.lost_acked_telemetry, 0, "{:?}", r.lost_examples);
    assert!(r.telemetry_acked > 0 && r.telemetry_stored >= r.telemetry_acked);
    assert_eq!(r.commands_succeeded, 720);
    assert_eq!(r.commands_executed_once, 720);
    // Every device online again, on the nodes alive at the end, as the cluster answers too.
    assert_eq!(r.online_at_end, 240);
    assert_eq!(r.cluster_online_at_end, Some(240));
    let ids: Vec<&str> = r.nodes.iter().map(|n| n.id.as_str()).collect();
    assert_eq!(ids, ["node-1", "node-2", "node-3"]);
    let node = |id: &str| r.nodes.iter().find(|n| n.id == id);
    let (Some(n1), Some(n2), Some(n3)) = (node("node-1"), node("node-2"), node("node-3")) else {
        anyhow::bail!("nodes missing: {:?}", r.nodes);
    };
    assert!(!n1.alive_at_end && n1.kills == 1 && n1.devices_at_end == 0);
    assert!(n2.alive_at_end && n2.kills == 1 && n2.starts == 2);
    assert!(n3.alive_at_end && n3.devices_at_end > 0);
    assert_eq!(n2.devices_at_end + n3.devices_at_end, 240);
    // Node 1 held the once-only work; it moved to a surviving node.
    let kill1 = r
        .timeline
        .iter()
        .find(|e| e.action == "kill_node" && e.target == "node-1")
        .ok_or_else(|| anyhow::anyhow!("no kill of node-1 on the timeline"))?;
    let scheduler = kill1
        .leases
        .iter()
        .find(|l| l.lease == "commands.scheduler")
        .ok_or_else(|| anyhow::anyhow!("node-1 held no scheduler lease: {:?}", kill1.leases))?;
    assert!(
        scheduler.to.as_deref().is_some_and(|to| to != "node-1"),
        "{scheduler:?}"
    );
    // Taken over once the dead node's lease ran out: node_lease (5 s) after its last renewal
    // (heartbeat every 1 s), at another node's next scheduler tick (1 s).
    assert!(
        scheduler
            .after_ms
            .is_some_and(|ms| (4_000..=6_100).contains(&ms)),
        "{scheduler:?}"
    );
    for kill in r.timeline.iter().filter(|e| e.action == "kill_node") {
        let back = kill
            .reconnected
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("{kill:?}"))?;
        assert!(kill.devices > 0, "{kill:?}");
        assert_eq!(back.devices, kill.devices, "{kill:?}");
    }
    // Per-node counts were sampled over the run, and the page shows them and each node.
    assert!(r.samples.iter().all(|s| !s.nodes.is_empty()));
    let html = r.html();
    assert!(html.contains("Devices per node"));
    assert!(html.contains("node node-2: alive (started 2 times, killed once)"));
    Ok(())
}

/// scenarios/enroll-claims.toml at 500 devices (5 claims of 100 uses): every device starts
/// without a certificate and runs the agent's real enrollment over a claim session while its
/// link drops before the request, after the request before the reply, before the first connect
/// with its certificate, and its process is killed after the reply before storing it. Every
/// device ends registered with the certificate it stored, one active certificate each, each
/// claim used exactly by its devices; then they connect with that certificate and report.
#[test]
fn devices_enrolling_with_claims_under_faults_end_enrolled_exactly_once() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/enroll-claims.toml");
    let s = Scenario::load(&path)?.scaled_to(500)?;
    let r = run(&s)?;
    assert_eq!(failed(&r), Vec::<String>::new());
    let e = r.enrollment.as_ref().expect("an enrollment report");
    assert!(e.enrolled_exactly_once, "{:?}", e.not_enrolled_examples);
    assert_eq!((e.devices, e.enrolled, e.claims), (500, 500, 5));
    assert_eq!(e.duplicate_certificates, 0);
    assert_eq!(e.devices_in_store, 500);
    assert!(e.refusals.is_empty(), "{:?}", e.refusals);
    // Every step reached by every device, in order.
    let steps: Vec<(&str, u64)> = e
        .funnel
        .iter()
        .map(|f| (f.step.as_str(), f.devices))
        .collect();
    assert_eq!(
        steps,
        [
            ("key_made", 500),
            ("request_sent", 500),
            ("registered", 500),
            ("certificate_received", 500),
            ("first_connect", 500),
            ("first_telemetry", 500),
        ]
    );
    for w in e.funnel.windows(2) {
        assert!(w[0].p50_ms <= w[1].p50_ms, "{:?}", e.funnel);
        assert!(
            w[0].since_key_max_ms <= w[1].since_key_max_ms,
            "{:?}",
            e.funnel
        );
    }
    assert_eq!(e.funnel[0].since_key_max_ms, 0, "key_made is the origin");
    // Each fault point fired for about a quarter of the devices, and every device it hit still
    // ended enrolled exactly once ("detected" counts those for the enrollment faults).
    let enroll_faults: Vec<_> = r
        .faults
        .iter()
        .filter(|(kind, _)| kind.starts_with("enroll:"))
        .collect();
    assert_eq!(enroll_faults.len(), 4, "{:?}", r.faults);
    for (kind, f) in enroll_faults {
        assert!((60..=190).contains(&f.injected), "{kind}: {f:?}");
        assert_eq!(f.detected, f.injected, "{kind}");
    }
    assert_eq!(
        e.process_restarts,
        r.faults["enroll: process kill after the reply, before storing"].injected
    );
    assert_eq!(r.lost_acked_telemetry, 0);
    assert_eq!(r.online_at_end, 500);
    // The printed summary and the HTML report show the funnel.
    assert!(r.table().contains("certificate_received"), "{}", r.table());
    let html = r.html();
    assert!(html.contains("<h2>Enrollment funnel</h2>"), "{html}");
    assert!(
        html.contains("<b>500 enrolled exactly once</b> (every device)"),
        "{html}"
    );
    assert!(
        html.contains("<td>first telemetry</td><td>500</td>"),
        "{html}"
    );
    Ok(())
}

/// The enrollment funnel is part of the simulator's promise: the same seed gives the same
/// funnel, faults and verdict.
#[test]
fn enrollment_with_the_same_seed_gives_the_same_funnel() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/enroll-claims.toml");
    let s = Scenario::load(&path)?.scaled_to(100)?;
    let a = run(&s)?;
    let b = run(&s)?;
    let json = |r: &Report| serde_json::to_string(&r.enrollment).expect("json");
    assert_eq!(json(&a), json(&b));
    assert_eq!(
        serde_json::to_string(&a.faults)?,
        serde_json::to_string(&b.faults)?
    );
    assert!(a
        .enrollment
        .as_ref()
        .is_some_and(|e| e.enrolled_exactly_once));
    Ok(())
}

/// The checks catch what goes wrong: devices proposing ids that are taken are refused
/// (`device_exists`, final), counted by code, and the run fails `enrolled_exactly_once` while
/// the claim is charged only for the devices it enrolled.
#[test]
fn refused_enrollments_are_counted_by_code_and_fail_the_exactly_once_check() -> anyhow::Result<()> {
    let s = scenario(
        r#"
        name = "enroll-refused"
        duration = "5m"
        [[cohort]]
        name = "old"
        count = 3
        id_prefix = "x-"
        connect_spread = "10s"
        [[cohort]]
        name = "new"
        count = 6
        id_prefix = "x-"
        connect_spread = "10s"
        [cohort.enroll]
        claim_uses = 10
        [expect]
        enrolled_exactly_once = true
        max_duplicate_certificates = 0
        "#,
    )?;
    let r = run(&s)?;
    let e = r.enrollment.as_ref().expect("an enrollment report");
    assert_eq!((e.devices, e.claims, e.enrolled), (6, 1, 3));
    assert_eq!(
        e.refusals,
        [("device_exists".to_owned(), 3)].into_iter().collect()
    );
    assert_eq!(e.claims_uses_mismatched, 0, "{:?}", e.not_enrolled_examples);
    assert!(!e.enrolled_exactly_once);
    assert_eq!(
        failed(&r),
        ["enrolled_exactly_once: expected true, got false"]
    );
    assert!(
        e.not_enrolled_examples
            .iter()
            .any(|x| x.starts_with("x-0: ") && x.contains("device_exists")),
        "{:?}",
        e.not_enrolled_examples
    );
    // The refused devices stopped at the request; the others went all the way.
    let reached: Vec<u64> = e.funnel.iter().map(|f| f.devices).collect();
    assert_eq!(reached, [6, 6, 3, 3, 3, 3]);
    Ok(())
}

/// scenarios/enroll-claims.toml at full size (10,000 devices; about 50 s in a release build,
/// longer in a debug one): `cargo test --release -p mooring-sim --test sim -- --ignored
/// enroll_claims_at_full_size`.
#[test]
#[ignore = "full size: run on demand (see docs/simulator.md)"]
fn enroll_claims_at_full_size() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/enroll-claims.toml");
    let r = run(&Scenario::load(&path)?)?;
    assert_eq!(failed(&r), Vec::<String>::new());
    let e = r.enrollment.as_ref().expect("an enrollment report");
    assert!(e.enrolled_exactly_once, "{:?}", e.not_enrolled_examples);
    assert_eq!(e.enrolled, 10_000);
    Ok(())
}

/// scenarios/ota-update.toml at 300 devices: one update deployed to the whole fleet through
/// the server's OTA service while links drop (downloads cut mid-transfer and resumed with
/// `Range`), 30 % of the
/// devices lose power in the middle of their update, a cohort's hardware fails the new
/// version's health check and a cohort waits for its battery. At the end every device's slots
/// and journal are checked against what the server shows.
#[test]
fn an_update_to_the_fleet_under_link_drops_and_power_losses_ends_bootable_and_truthful(
) -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/ota-update.toml");
    let s = Scenario::load(&path)?.scaled_to(300)?;
    let r = run(&s)?;
    assert_eq!(failed(&r), Vec::<String>::new());
    let o = r.ota.as_ref().expect("an ota report");
    assert_eq!((o.devices, o.targeted, o.deployments.len()), (300, 300, 1));
    assert_eq!(o.unbootable, 0, "{:?}", o.unbootable_examples);
    assert_eq!(o.untruthful, 0, "{:?}", o.untruthful_examples);
    // Every device finished: committed, or rolled back with the reason.
    assert_eq!(o.committed + o.rolled_back, 300, "{:?}", o.final_states);
    assert_eq!(
        o.running_versions.get("1.1.0").copied().unwrap_or(0),
        o.committed
    );
    assert_eq!(
        o.running_versions.get("1.0.0").copied().unwrap_or(0),
        o.rolled_back
    );
    // The 30 locks (fails_health) all rolled back because their health check failed ...
    assert!(
        o.reasons.get("rolled_back: health_check_failed").copied() >= Some(30),
        "{:?}",
        o.reasons
    );
    // ... and every other rollback is a trial boot a power loss interrupted.
    let other: u64 = o
        .reasons
        .iter()
        .filter(|(k, _)| k.as_str() != "rolled_back: health_check_failed")
        .map(|(k, n)| {
            assert_eq!(k, "rolled_back: trial_boot_not_committed");
            *n
        })
        .sum();
    assert!(other <= o.power_losses, "{other} > {}", o.power_losses);
    // The faults really happened: downloads cut and resumed, power lost mid-update. (At 300
    // devices the server's download bound is rarely reached; the 10,000-device run in
    // docs/simulator.md shows devices turned away and waiting their turn.)
    assert!(o.downloads_cut > 0 && o.downloads_resumed > 0, "{o:?}");
    assert!(o.power_losses > 0, "{o:?}");
    assert!(o.reboots >= 300, "{o:?}");
    // The states over time: the carts waited for their battery (deferred), everyone ended.
    assert!(
        r.samples
            .iter()
            .any(|s| s.ota.get("deferred").copied().unwrap_or(0) >= 15),
        "{:?}",
        r.samples
    );
    let last = r.samples.last().expect("samples");
    assert_eq!(last.ota.values().sum::<u64>(), 300, "{:?}", last.ota);
    assert_eq!(r.lost_acked_telemetry, 0);
    let html = r.html();
    assert!(html.contains("<h2>Updates by state</h2>"), "{html}");
    assert!(r.table().contains("ota: unbootable 0, untruthful 0"));
    Ok(())
}

/// An update built for other hardware is refused by every device before it downloads a byte,
/// each refusal reported with its reason: nothing installed, every device still runs what it
/// ran, and the run's expectation of commits fails as it should.
#[test]
fn an_update_for_other_hardware_is_refused_by_every_device_with_its_reason() -> anyhow::Result<()> {
    let s = scenario(
        r#"
        name = "ota-wrong-hardware"
        duration = "10m"
        [[artifact]]
        version = "2.0.0"
        size_bytes = 4096
        compatible = ["rev-b"]
        [[cohort]]
        name = "m"
        count = 20
        tags = { kind = "m" }
        [cohort.ota]
        hw_revision = "rev-a"
        [[event]]
        at = "2m"
        action = "ota_deploy"
        version = "2.0.0"
        to = "tag:kind=m"
        [expect]
        max_ota_unbootable = 0
        max_ota_untruthful = 0
        min_ota_committed = 1
        "#,
    )?;
    let r = run(&s)?;
    assert_eq!(
        failed(&r),
        ["min_ota_committed: expected >= 1, got 0".to_owned()]
    );
    let o = r.ota.as_ref().expect("an ota report");
    assert_eq!(o.final_states.get("failed").copied(), Some(20), "{o:?}");
    assert_eq!(o.running_versions.get("1.0.0").copied(), Some(20));
    assert_eq!(o.downloads, 0);
    assert_eq!(o.reboots, 0);
    assert_eq!(o.reasons.len(), 1, "{:?}", o.reasons);
    Ok(())
}

/// scenarios/report-job.toml at 300 devices, in turns of 200 points 20 simulated seconds apart
/// so the server restart falls inside the report: it resumes from its stored progress and its
/// file holds every stored point of its range exactly once (read back against the store).
#[test]
fn a_report_job_survives_a_server_restart_and_holds_every_point_once() -> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scenarios/report-job.toml");
    let mut s = Scenario::load(&path)?.scaled_to(300)?;
    s.job_batch_pause = mooring_sim::scenario::DurationMs(2_000);
    s.job_report_points_per_turn = Some(200);
    let r = run(&s)?;
    assert_eq!(failed(&r), Vec::<String>::new());
    assert!(
        r.events
            .iter()
            .any(|e| e.contains("is running at") && e.contains("as the server stops")),
        "{:#?}",
        r.events
    );
    let job = r.jobs.first().expect("the job");
    assert_eq!(
        (job.action.as_str(), job.state.as_str(), job.total, job.done),
        ("report", "succeeded", Some(300), 300)
    );
    assert!(job.points.unwrap_or(0) >= 300, "{job:?}");
    assert_eq!((job.duplicate_points, job.missing_points), (0, 0));
    Ok(())
}

/// Issue 20 at CI size: 20 gateways × 5 children, a regional uplink outage of 20 minutes in
/// the middle. The children keep handing telemetry to their gateways during the outage; after
/// it every child message is in the store exactly once and in order, every gateway back.
#[test]
fn gateways_children_sync_exactly_once_in_order_after_a_regional_outage() -> anyhow::Result<()> {
    let s = scenario(
        r#"
        name = "ci-gateways-outage"
        seed = 20
        duration = "1h"
        sample_interval = "5m"

        [[cohort]]
        name = "gw"
        count = 20
        region = "eu"
        telemetry_interval = "5m"
        connect_spread = "30s"
        gateway = { children = 5, child_telemetry_interval = "1m" }

        [[event]]
        at = "20m"
        action = "cut_link"
        region = "eu"
        duration = "20m"

        [expect]
        lost_acked_telemetry = 0
        children_telemetry_lost = 0
        children_out_of_order = 0
        min_gateways_online_at_end = 20
        max_reconnect_time = "2m"
        "#,
    )?;
    let r = run(&s)?;
    assert_eq!(failed(&r), Vec::<String>::new());
    let g = r.gateways.clone().expect("a gateway report");
    assert_eq!((g.gateways, g.children), (20, 100));
    assert_eq!(g.gateways_online_at_end, 20);
    assert_eq!(g.children_online_at_end, 100);
    // Every child sends once a minute from its gateway's start until the end: ~59 each.
    assert!(g.telemetry_sent >= 100 * 55, "{g:?}");
    assert_eq!(g.telemetry_stored, g.telemetry_sent, "{g:?}");
    assert_eq!(
        (
            g.telemetry_lost,
            g.telemetry_duplicated,
            g.telemetry_in_outbox_at_end
        ),
        (0, 0, 0),
        "{:?}",
        g.examples
    );
    assert_eq!(g.children_out_of_order, 0, "{:?}", g.examples);
    assert_eq!(r.lost_acked_telemetry, 0, "{:?}", r.lost_examples);
    Ok(())
}
