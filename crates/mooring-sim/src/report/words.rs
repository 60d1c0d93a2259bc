//! The report in plain language: events, faults, times, durations and counts as a reader says them.

use super::{FaultCount, LeaseMove, NodeReport, Reconnected, Report, TimelineEvent};

const SECOND_MS: u64 = 1_000;
const MINUTE_MS: u64 = 60 * SECOND_MS;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// A simulated time as a clock reading since the start: `0:20`, `1:05:30`, `2d 6:00`, `3d`.
pub fn clock(ms: u64) -> String {
    let days = ms / DAY_MS;
    let h = ms % DAY_MS / HOUR_MS;
    let m = ms % HOUR_MS / MINUTE_MS;
    let s = ms % MINUTE_MS / SECOND_MS;
    let time = if s > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{h}:{m:02}")
    };
    match days {
        0 => time,
        d if ms.is_multiple_of(DAY_MS) => format!("{d}d"),
        d => format!("{d}d {time}"),
    }
}

/// A length of time: `350 ms`, `42 s`, `1.5 s`, `10 min`, `2 min 30 s`, `1 h 5 min`, `2 d 3 h`.
pub fn duration(ms: u64) -> String {
    let two = |big: u64, big_unit: &str, small: u64, small_unit: &str| {
        if small == 0 {
            format!("{big} {big_unit}")
        } else {
            format!("{big} {big_unit} {small} {small_unit}")
        }
    };
    match ms {
        ms if ms < SECOND_MS => format!("{ms} ms"),
        ms if ms < MINUTE_MS => {
            // Tenths below 10 s (1.5 s), whole seconds above (42 s), rounded.
            let tenths = (ms + 50) / 100;
            if tenths < 100 && tenths % 10 != 0 {
                format!("{}.{} s", tenths / 10, tenths % 10)
            } else {
                format!("{} s", (ms + 500) / SECOND_MS)
            }
        }
        ms if ms < HOUR_MS => two(ms / MINUTE_MS, "min", ms % MINUTE_MS / SECOND_MS, "s"),
        ms if ms < DAY_MS => two(ms / HOUR_MS, "h", ms % HOUR_MS / MINUTE_MS, "min"),
        ms => two(ms / DAY_MS, "d", ms % DAY_MS / HOUR_MS, "h"),
    }
}

/// A count with thousands separators: `1,000`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1 device`, `500 devices`.
fn devices(n: u64) -> String {
    if n == 1 {
        "1 device".to_owned()
    } else {
        format!("{} devices", count(n))
    }
}

/// How the `reached` devices came back after `what` ("the link returning", "its return").
fn reconnected(r: &Reconnected, reached: u64, what: &str) -> String {
    let deleted = reached.saturating_sub(r.of);
    let note = match deleted {
        0 => String::new(),
        1 => "; 1 device deleted since is not counted".to_owned(),
        n => format!("; {} deleted since are not counted", devices(n)),
    };
    let within = |n: &str| {
        format!(
            "{n} reconnected within {} of {what} (median {}{note})",
            duration(r.max_ms),
            duration(r.median_ms)
        )
    };
    match (r.devices, r.of) {
        (_, 0) => "no device was left to reconnect".to_owned(),
        (0, of) => format!(
            "none of the {} reconnected by the end of the run",
            count(of)
        ),
        (1, 1) => format!("it reconnected {} after {what}", duration(r.max_ms)),
        (n, of) if n == of => within(&format!("all {}", devices(of))),
        (n, of) => format!(
            "{}; {} not by the end of the run",
            within(&format!("{} of {}", count(n), devices(of))),
            count(of - n)
        ),
    }
}

/// What one scenario event did, e.g. `cut_link (region eu) at 0:20: 500 devices cut for
/// 10 min; all 500 reconnected within 42 s of the link returning (median 12 s)`.
pub fn event_line(e: &TimelineEvent) -> String {
    event_said(e, &format!(" at {}", clock(e.at_ms)))
}

/// [`event_line`] without the time (for a list that shows it apart).
pub fn event_text(e: &TimelineEvent) -> String {
    event_said(e, "")
}

/// The event's line with `at` (` at 0:20` or nothing) after its name.
fn event_said(e: &TimelineEvent, at: &str) -> String {
    let lasted = e.until_ms.map(|u| duration(u.saturating_sub(e.at_ms)));
    if let Some(err) = &e.error {
        let target = if e.target.is_empty() {
            String::new()
        } else {
            format!(" ({})", e.target)
        };
        return format!("{}{target}{at} failed: {err}", e.action);
    }
    match e.action.as_str() {
        "command" => {
            let mut line = format!(
                "command {} to {}{at}: sent to {}",
                e.detail,
                e.target,
                devices(e.devices)
            );
            if let Some(c) = &e.completed {
                line.push_str(&format!(
                    "; {} of {} succeeded, the last {} after it was sent (median {}, p99 {})",
                    count(c.succeeded),
                    count(c.of),
                    duration(c.max_ms),
                    duration(c.median_ms),
                    duration(c.p99_ms)
                ));
                if let Some(wall) = c.wall_ms {
                    line.push_str(&format!(", all final in {} of wall time", duration(wall)));
                }
            }
            line
        }
        "cut_link" => {
            let mut line = format!(
                "cut_link ({}){at}: {} cut for {}",
                e.target,
                devices(e.devices),
                lasted.unwrap_or_default()
            );
            if let Some(r) = &e.reconnected {
                line.push_str("; ");
                line.push_str(&reconnected(r, e.devices, "the link returning"));
            }
            line
        }
        "restart_server" => {
            let mut line = format!(
                "restart_server{at}: the server was down for {}",
                lasted.unwrap_or_default()
            );
            if let Some(r) = &e.reconnected {
                line.push_str("; ");
                line.push_str(&reconnected(r, e.devices, "its return"));
            }
            line
        }
        "kill_node" => {
            let mut line = format!(
                "kill_node ({}){at}: killed (no shutdown) with {} connected",
                e.target,
                devices(e.devices)
            );
            if let Some(r) = &e.reconnected {
                line.push_str("; ");
                line.push_str(&reconnected(r, e.devices, "the kill, to the other nodes"));
            }
            if !e.leases.is_empty() {
                line.push_str("; its leases: ");
                line.push_str(&leases(&e.leases));
            }
            line
        }
        "restart_node" => format!(
            "restart_node ({}){at}: started again with the same node id (devices come to it as \
             they connect anew)",
            e.target
        ),
        "delete_device" => format!("delete_device {}{at}: deleted", e.target),
        "retag" => format!(
            "retag {}{at}: {} re-tagged ({})",
            e.target,
            devices(e.devices),
            e.detail
        ),
        "tag_job" => format!("tag_job {}{at}: set {}", e.target, e.detail),
        "report_job" => format!("report_job {}{at}: {}", e.target, e.detail),
        "rollout" => format!(
            "rollout {} to {}{at}: {} targeted in waves (see the rollout's section)",
            e.detail,
            e.target,
            devices(e.devices)
        ),
        other => format!("{other} {}{at}: {}", e.target, devices(e.devices)),
    }
}

/// `commands.scheduler to node-1 after 5.2 s, telemetry.retention not taken over by the end
/// of the run`.
fn leases(moves: &[LeaseMove]) -> String {
    moves
        .iter()
        .map(|m| match (&m.to, m.after_ms) {
            (Some(to), Some(after)) => format!("{} to {to} after {}", m.lease, duration(after)),
            _ => format!(
                "{} not taken over by the end of the run (a node takes it when it next runs that \
                 work)",
                m.lease
            ),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One cluster node over the run, e.g. `node node-2: alive (started 2 times, killed once),
/// 1,650 devices at the end, leases: none; bus_dropped 0, ...`.
pub fn node_line(n: &NodeReport) -> String {
    let times = |k: u64| match k {
        1 => "once".to_owned(),
        k => format!("{k} times"),
    };
    let mut history = Vec::new();
    if n.starts > 1 {
        history.push(format!("started {}", times(n.starts)));
    }
    if n.kills > 0 {
        history.push(format!("killed {}", times(n.kills)));
    }
    let history = if history.is_empty() {
        String::new()
    } else {
        format!(" ({})", history.join(", "))
    };
    let counters: Vec<String> = n
        .counters
        .iter()
        .map(|(k, v)| format!("{k} {}", count(*v)))
        .collect();
    format!(
        "node {}: {}{history}, {} at the end, leases: {}; {}",
        n.id,
        if n.alive_at_end { "alive" } else { "dead" },
        devices(n.devices_at_end),
        if n.leases_at_end.is_empty() {
            "none".to_owned()
        } else {
            n.leases_at_end.join(", ")
        },
        counters.join(", ")
    )
}

/// `all 40` when every one of `of` happened, `the 1` for one, else `31 of 40`.
fn all_or(n: u64, of: u64) -> String {
    match (n, of) {
        (1, 1) => "the 1".to_owned(),
        (n, of) if n == of => format!("all {}", count(of)),
        (n, of) => format!("{} of {}", count(n), count(of)),
    }
}

/// Fault kinds in the order a reader follows them: the link, power and restarts, storage,
/// commands, deletions; kinds not listed come after, by name.
const FAULT_ORDER: [&str; 12] = [
    "link_cut (drops, outages, cut_link)",
    "link_drop",
    "link_outage",
    "power_loss",
    "firmware_crash",
    "battery_empty",
    "ota_power_loss (during an update)",
    "restart_recovered (power loss + crash + battery)",
    "agent_exit (supervisor gave up)",
    "flash_write_failure",
    "command_handler_panic",
    "delete_device",
];

/// One line per fault kind the report counted, in plain words. Kinds that scenario events
/// caused (`cut_link`, `server_restart`, `retag`, `node_kill`, `node_restart`) are said per
/// event by [`event_line`].
pub fn fault_lines(r: &Report) -> Vec<String> {
    let mut out = Vec::new();
    let mut kinds: Vec<(&String, &FaultCount)> = r.faults.iter().collect();
    kinds.sort_by_key(|(k, _)| {
        FAULT_ORDER
            .iter()
            .position(|o| o == k)
            .unwrap_or(FAULT_ORDER.len())
    });
    for (kind, f) in kinds {
        let FaultCount { injected, detected } = *f;
        let (i, d) = (count(injected), count(detected));
        let line = match kind.as_str() {
            "cut_link (devices)" | "server_restart" | "retag" | "node_kill" | "node_restart" => {
                continue
            }
            "link_drop" => format!("link drops: {i} spontaneous connection drops"),
            "link_outage" => format!("link outages: {i} spontaneous outages"),
            "link_cut (drops, outages, cut_link)" => format!(
                "{i} live connections were cut (drops, outages, cut_link); the agents noticed {}",
                if detected == injected {
                    "every one".to_owned()
                } else {
                    format!("{d} of them")
                }
            ),
            "power_loss" => {
                format!("power loss: {i} times a device lost power and rebooted on the same flash")
            }
            "firmware_crash" => {
                format!("firmware crashes: {i} times an agent crashed and was restarted")
            }
            "restart_recovered (power loss + crash + battery)" => format!(
                "restarts (power loss, crash, battery, update reboots): {} restarted agents connected again",
                all_or(detected, injected)
            ),
            "battery_empty" => {
                format!("battery: {i} times a device ran flat; {d} recharged and booted again")
            }
            "ota_power_loss (during an update)" => format!(
                "updates: {i} times a device lost power in the middle of its update (see the ota lines for where)"
            ),
            "flash_write_failure" => {
                format!("flash: {i} writes failed; {d} reached the agent as store errors")
            }
            "command_handler_panic" => format!(
                "command handlers: {i} panics; {} ended their command failed (handler panicked)",
                all_or(detected.min(injected), injected)
            ),
            "agent_exit (supervisor gave up)" => {
                format!("agent exits: {d} times an agent gave up (supervisor) and was restarted")
            }
            "delete_device" => format!(
                "deleted devices: {} offline at the end (session ended, reconnects refused)",
                match (detected, injected) {
                    (1, 1) => "the deleted device was".to_owned(),
                    (d, i) => format!("{} were", all_or(d, i)),
                }
            ),
            other => format!("{other}: {i} injected, {d} detected"),
        };
        out.push(line);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Completed;

    #[test]
    fn times_read_like_a_clock_and_durations_like_speech() {
        assert_eq!(clock(0), "0:00");
        assert_eq!(clock(20 * MINUTE_MS), "0:20");
        assert_eq!(clock(HOUR_MS + 5 * MINUTE_MS + 30 * SECOND_MS), "1:05:30");
        assert_eq!(clock(2 * DAY_MS + 6 * HOUR_MS), "2d 6:00");
        assert_eq!(clock(3 * DAY_MS), "3d");
        assert_eq!(duration(350), "350 ms");
        assert_eq!(duration(1_500), "1.5 s");
        assert_eq!(duration(42 * SECOND_MS), "42 s");
        assert_eq!(duration(9_960), "10 s");
        assert_eq!(duration(9_940), "9.9 s");
        assert_eq!(duration(10 * MINUTE_MS), "10 min");
        assert_eq!(duration(150 * SECOND_MS), "2 min 30 s");
        assert_eq!(duration(HOUR_MS + 5 * MINUTE_MS), "1 h 5 min");
        assert_eq!(duration(2 * DAY_MS + 3 * HOUR_MS), "2 d 3 h");
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
    }

    #[test]
    fn a_fleet_command_says_how_fast_its_devices_answered() {
        let e = TimelineEvent {
            at_ms: 6 * HOUR_MS,
            action: "command".into(),
            target: "tag:fleet=demo".into(),
            detail: "ping".into(),
            devices: 100_000,
            completed: Some(Completed {
                succeeded: 100_000,
                of: 100_000,
                median_ms: 1_200,
                p99_ms: 4_100,
                max_ms: 5_300,
                wall_ms: Some(8_200),
            }),
            ..TimelineEvent::default()
        };
        assert_eq!(
            event_line(&e),
            "command ping to tag:fleet=demo at 6:00: sent to 100,000 devices; 100,000 of \
             100,000 succeeded, the last 5.3 s after it was sent (median 1.2 s, p99 4.1 s), \
             all final in 8.2 s of wall time"
        );
    }

    #[test]
    fn a_killed_node_says_where_its_devices_and_leases_went() {
        let e = TimelineEvent {
            at_ms: HOUR_MS,
            action: "kill_node".into(),
            target: "node-2".into(),
            devices: 3_334,
            reconnected: Some(Reconnected {
                devices: 3_334,
                of: 3_334,
                median_ms: 250,
                max_ms: 510,
            }),
            leases: vec![
                LeaseMove {
                    lease: "commands.scheduler".into(),
                    to: Some("node-1".into()),
                    after_ms: Some(5_200),
                },
                LeaseMove {
                    lease: "telemetry.retention".into(),
                    to: None,
                    after_ms: None,
                },
            ],
            ..TimelineEvent::default()
        };
        assert_eq!(
            event_line(&e),
            "kill_node (node-2) at 1:00: killed (no shutdown) with 3,334 devices connected; all \
             3,334 devices reconnected within 510 ms of the kill, to the other nodes (median \
             250 ms); its leases: commands.scheduler to node-1 after 5.2 s, telemetry.retention \
             not taken over by the end of the run (a node takes it when it next runs that work)"
        );
        let n = NodeReport {
            id: "node-2".into(),
            alive_at_end: true,
            starts: 2,
            kills: 1,
            devices_at_end: 12,
            leases_at_end: vec![],
            counters: [("bus_dropped".to_owned(), 0), ("takeovers".to_owned(), 3)].into(),
        };
        assert_eq!(
            node_line(&n),
            "node node-2: alive (started 2 times, killed once), 12 devices at the end, leases: \
             none; bus_dropped 0, takeovers 3"
        );
    }

    #[test]
    fn a_cut_link_says_how_many_came_back_and_how_fast() {
        let mut e = TimelineEvent {
            at_ms: 20 * MINUTE_MS,
            until_ms: Some(30 * MINUTE_MS),
            action: "cut_link".into(),
            target: "region eu".into(),
            devices: 500,
            reconnected: Some(Reconnected {
                devices: 500,
                of: 500,
                median_ms: 12_000,
                max_ms: 42_000,
            }),
            ..TimelineEvent::default()
        };
        assert_eq!(
            event_line(&e),
            "cut_link (region eu) at 0:20: 500 devices cut for 10 min; all 500 devices \
             reconnected within 42 s of the link returning (median 12 s)"
        );
        e.reconnected = Some(Reconnected {
            devices: 498,
            of: 500,
            median_ms: 12_000,
            max_ms: 42_000,
        });
        assert!(
            event_line(&e).ends_with(
                "498 of 500 devices reconnected within 42 s of the link returning (median \
                 12 s); 2 not by the end of the run"
            ),
            "{}",
            event_line(&e)
        );
        e.error = Some("the server is down".into());
        assert_eq!(
            event_line(&e),
            "cut_link (region eu) at 0:20 failed: the server is down"
        );
    }
}
