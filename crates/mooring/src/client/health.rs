//! `mooring device health ID` and `mooring health`: fleet health (docs/health.md).

use super::{call, parse_id, ApiArgs, EXIT_OK};
use crate::output::{ago, print_fields, print_json, OutputArgs, Table};
use mooring_api::{HealthCounts, HealthParams};

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{:.1} h", s as f64 / 3600.0),
        _ => format!("{:.1} d", s as f64 / 86_400.0),
    }
}

fn counts_row(c: &HealthCounts) -> Vec<String> {
    [
        c.connects,
        c.disconnects,
        c.telemetry_gaps,
        c.command_failures,
        c.command_timeouts,
        c.restarts,
        c.crashes,
        c.update_rollbacks,
        c.update_failures,
    ]
    .iter()
    .map(u64::to_string)
    .collect()
}

const COUNT_HEADERS: [&str; 9] = [
    "CONNECTS",
    "DISCONNECTS",
    "GAPS",
    "CMD_FAILED",
    "CMD_TIMEOUTS",
    "RESTARTS",
    "CRASHES",
    "ROLLBACKS",
    "UPD_FAILED",
];

/// `mooring device health ID`.
pub async fn device_health(args: ApiArgs, id: &str, output: OutputArgs) -> anyhow::Result<u8> {
    let id = parse_id(id)?;
    let h = call(args.connect()?.device_health(id.as_str()).await)?;
    if output.json() {
        print_json(&h)?;
        return Ok(EXIT_OK);
    }
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
    print_fields(&[
        ("device", h.device_id.clone()),
        ("online", h.online.to_string()),
        ("since", opt(h.since_ms.map(ago))),
        ("online for", duration(h.online_ms)),
        ("reconnects/h", format!("{:.2}", h.reconnects_per_hour)),
        ("telemetry", opt(h.telemetry.last_ms.map(ago))),
        ("longest gap", duration(h.telemetry.longest_gap_ms)),
        (
            "battery",
            opt(h.battery.as_ref().map(|b| match b.trend_per_hour {
                Some(t) => format!("{:.1} ({t:+.2}/h, {})", b.level, ago(b.at_ms)),
                None => format!("{:.1} ({})", b.level, ago(b.at_ms)),
            })),
        ),
        (
            "hours to empty",
            opt(h
                .battery
                .as_ref()
                .and_then(|b| b.hours_to_empty)
                .map(|x| format!("{x:.1}"))),
        ),
        (
            "agent boots",
            opt(h
                .agent
                .boots
                .map(|b| format!("{b} ({} unclean)", h.agent.unclean_stops.unwrap_or(0)))),
        ),
        (
            "diagnostics",
            opt(h
                .last_diagnostics
                .as_ref()
                .map(|d| format!("{} {} ({})", d.command_id, d.state, ago(d.at_ms)))),
        ),
        (
            "update problem",
            opt(h.last_update_problem.as_ref().map(|u| {
                format!(
                    "{} {} {}{} ({})",
                    u.deployment_id,
                    u.version,
                    u.state,
                    u.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default(),
                    ago(u.at_ms)
                )
            })),
        ),
    ]);
    println!();
    let mut header = vec!["PERIOD"];
    header.extend(COUNT_HEADERS);
    let mut t = Table::new(&header);
    let mut last = vec![format!("last {:.1} h", h.window_hours)];
    last.extend(counts_row(&h.last_24h));
    t.row(last);
    let mut total = vec!["total".to_owned()];
    total.extend(counts_row(&h.totals));
    t.row(total);
    t.print();
    Ok(EXIT_OK)
}

/// `mooring health`.
pub async fn summary(
    args: ApiArgs,
    selector: Option<String>,
    group_by: Option<String>,
    output: OutputArgs,
) -> anyhow::Result<u8> {
    let params = HealthParams { selector, group_by };
    let s = call(args.connect()?.health_summary(&params).await)?;
    if output.json() {
        print_json(&s)?;
        return Ok(EXIT_OK);
    }
    let mut t = Table::new(&[
        "COHORT",
        "DEVICES",
        "ONLINE",
        "DISCONNECTS/H",
        "GAPS/H",
        "CMD_FAILED",
        "CRASHES",
        "ROLLBACKS",
        "BATTERY",
        "LOW",
    ]);
    for g in &s.groups {
        let rate = |k: &str| format!("{:.3}", g.rates.get(k).copied().unwrap_or(0.0));
        t.row(vec![
            g.label.clone(),
            g.devices.to_string(),
            g.online.to_string(),
            rate("disconnects"),
            rate("telemetry_gaps"),
            g.last_24h.command_failures.to_string(),
            g.last_24h.crashes.to_string(),
            g.last_24h.update_rollbacks.to_string(),
            g.battery_mean
                .map_or_else(|| "-".to_owned(), |b| format!("{b:.1}")),
            g.battery_low.to_string(),
        ]);
    }
    t.print();
    println!();
    if s.anomalies.is_empty() {
        println!(
            "no cohort is significantly worse than the rest (last {} h)",
            s.window_hours
        );
    } else {
        println!("anomalies (last {} h):", s.window_hours);
        for a in &s.anomalies {
            println!("  {}", a.description);
        }
    }
    Ok(EXIT_OK)
}
