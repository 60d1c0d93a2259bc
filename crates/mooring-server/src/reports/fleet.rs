//! Kind `fleet`: the selection's health per cohort over the last 24 hours (devices, online,
//! device-hours, each tested signal's rate per device-hour, battery), the cohorts the cohort
//! test flags, its firmware versions and its open alerts, as HTML (every section) or CSV (the
//! cohort table). One turn: the same reads as `GET /api/v1/health`, `GET /api/v1/fleet/summary`
//! and the alert list, done by a worker instead of a request.

use super::ReportFormat;
use super::ReportSpec;
use crate::error::{ServiceError, ServiceResult};
use crate::jobs::{Jobs, Turn};
use mooring_api::{FleetSummary, HealthSummary, HEALTH_TESTED_SIGNALS};
use mooring_store::{AlertFilter, AlertRecord, JobRecord, JobState};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::fmt::Write;

/// Open alerts read at most (newest first).
const ALERTS_READ_MAX: usize = 10_000;
/// Open alerts listed in the HTML at most (all are counted).
const ALERTS_LISTED_MAX: usize = 50;
/// Devices read per page while collecting the selection's ids.
const PAGE_LEN: usize = 1_000;

pub(super) async fn run(
    jobs: &Jobs,
    job: &mut JobRecord,
    spec: &ReportSpec,
) -> ServiceResult<Turn> {
    let core = jobs.core();
    let access = crate::access::access_of(job.scope.as_deref());
    let src = jobs.sources();
    // The stored selector is already narrowed by the creator's scope; empty: every device.
    let selector = Some(job.selector.as_str()).filter(|s| !s.is_empty());
    let health = match src
        .health
        .summary(&access, selector, spec.group_by.as_deref())
        .await
    {
        Ok(h) => h,
        // Not worth a retry (e.g. more cohorts than the test takes): failed, saying why.
        Err(e) if e.kind == crate::error::ErrorKind::InvalidArgument => {
            job.errors.push(mooring_store::JobError {
                device_id: String::new(),
                message: e.message,
            });
            return jobs.finish_turn(job, JobState::Failed).await;
        }
        Err(e) => return Err(e),
    };
    let fleet = src.fleet.summary(&access, selector).await?;
    let alerts = open_alerts(jobs, &job.selector).await?;
    let text = match spec.format {
        ReportFormat::Html => html(&job.selector, &health, &fleet, &alerts),
        _ => csv(&health),
    };
    let bytes = text.into_bytes();
    let len = bytes.len() as u64;
    if !core
        .store
        .write_job_result(&job.id, job.rev, 0, bytes)
        .await?
    {
        return Ok(Turn::Lost);
    }
    job.total = Some(health.devices);
    job.done = health.devices;
    job.result = Some(json!({
        "format": spec.format.as_str(),
        "content_type": spec.format.content_type(),
        "devices": health.devices,
        "points": 0,
        "bytes": len,
    }));
    jobs.finish_turn(job, JobState::Succeeded).await
}

/// The open alerts of the selection's devices, newest first.
async fn open_alerts(jobs: &Jobs, selector: &str) -> ServiceResult<Vec<AlertRecord>> {
    let sel = crate::jobs::stored_selector(selector)
        .map_err(|e| ServiceError::internal(format!("stored selector {selector:?}: {e}")))?;
    let mut ids = HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let (page, next) = jobs
            .registry()
            .select_devices(&sel, cursor.as_deref(), PAGE_LEN)
            .await?;
        ids.extend(page.into_iter().map(|d| d.record.id.to_string()));
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    let filter = AlertFilter {
        open: true,
        ..AlertFilter::default()
    };
    let all = jobs
        .core()
        .store
        .list_alerts(&filter, ALERTS_READ_MAX, None)
        .await?;
    Ok(all
        .into_iter()
        .filter(|a| ids.contains(&a.device_id))
        .collect())
}

/// The cohort table: one row per cohort.
fn csv(h: &HealthSummary) -> String {
    let mut out = String::from("cohort,devices,online,reporting,device_hours");
    for s in HEALTH_TESTED_SIGNALS {
        let _ = write!(out, ",{s}_per_device_hour");
    }
    out.push_str(",battery_mean,battery_low\n");
    for g in &h.groups {
        let _ = write!(
            out,
            "{},{},{},{},{:.1}",
            super::csv_field(&g.label),
            g.devices,
            g.online,
            g.reporting,
            g.device_hours
        );
        for s in HEALTH_TESTED_SIGNALS {
            let _ = write!(out, ",{:.6}", g.rates.get(s).copied().unwrap_or(0.0));
        }
        let mean = g.battery_mean.map_or(String::new(), |m| format!("{m:.1}"));
        let _ = writeln!(out, ",{mean},{}", g.battery_low);
    }
    out
}

/// Text for HTML: every character that could open markup escaped (labels, tags, versions and
/// alert details come from devices).
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// The whole report as one self-contained page (no script, no external resource).
fn html(selector: &str, h: &HealthSummary, f: &FleetSummary, alerts: &[AlertRecord]) -> String {
    let mut o = String::new();
    let _ = write!(
        o,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <title>Fleet report</title><style>\
         body{{font:14px system-ui,sans-serif;margin:2em;color:#222}}\
         table{{border-collapse:collapse;margin:.5em 0 1.5em}}\
         th,td{{border:1px solid #ccc;padding:.25em .6em;text-align:right}}\
         th:first-child,td:first-child{{text-align:left}}\
         .flag{{background:#fde8e8}}</style></head><body>\n\
         <h1>Fleet report</h1>\n<p>Devices: {}, generated {}. Health over the last {} hours.</p>\n",
        if selector.is_empty() {
            "every device".to_owned()
        } else {
            format!("<code>{}</code>", esc(selector))
        },
        esc(&time(h.generated_ms)),
        h.window_hours
    );
    let uptime = h
        .groups
        .iter()
        .map(|g| (g.online, g.devices))
        .fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    let _ = write!(
        o,
        "<h2>Summary</h2>\n<table><tr><th>devices</th><td>{}</td></tr>\
         <tr><th>online now</th><td>{} ({:.1}%)</td></tr>\
         <tr><th>open alerts</th><td>{}</td></tr>\
         <tr><th>flagged cohorts</th><td>{}</td></tr></table>\n",
        f.devices,
        f.online,
        if uptime.1 > 0 {
            100.0 * uptime.0 as f64 / uptime.1 as f64
        } else {
            0.0
        },
        alerts.len(),
        h.anomalies.len()
    );
    let flagged: HashSet<&str> = h.anomalies.iter().map(|a| a.cohort.as_str()).collect();
    o.push_str("<h2>Health per cohort</h2>\n<table><tr><th>cohort</th><th>devices</th><th>online</th><th>reporting</th><th>device-hours</th>");
    for s in HEALTH_TESTED_SIGNALS {
        let _ = write!(o, "<th>{} / device-hour</th>", esc(s));
    }
    o.push_str("<th>battery mean</th><th>battery low</th></tr>\n");
    for g in &h.groups {
        let class = if flagged.contains(g.label.as_str()) {
            " class=\"flag\""
        } else {
            ""
        };
        let _ = write!(
            o,
            "<tr{class}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td>",
            esc(&g.label),
            g.devices,
            g.online,
            g.reporting,
            g.device_hours
        );
        for s in HEALTH_TESTED_SIGNALS {
            let _ = write!(o, "<td>{:.4}</td>", g.rates.get(s).copied().unwrap_or(0.0));
        }
        let mean = g.battery_mean.map_or("-".to_owned(), |m| format!("{m:.1}"));
        let _ = writeln!(o, "<td>{mean}</td><td>{}</td></tr>", g.battery_low);
    }
    o.push_str("</table>\n<h2>Flagged cohorts</h2>\n");
    if h.anomalies.is_empty() {
        o.push_str("<p>None: no cohort's failure rate is significantly above the rest.</p>\n");
    } else {
        o.push_str("<ul>\n");
        for a in &h.anomalies {
            let _ = writeln!(o, "<li>{}</li>", esc(&a.description));
        }
        o.push_str("</ul>\n");
    }
    o.push_str("<h2>Firmware versions</h2>\n<table><tr><th>version</th><th>devices</th></tr>\n");
    for v in &f.versions {
        let _ = writeln!(
            o,
            "<tr><td>{}</td><td>{}</td></tr>",
            esc(v.version.as_deref().unwrap_or("(none reported)")),
            v.devices
        );
    }
    if f.versions_other > 0 {
        let _ = writeln!(o, "<tr><td>(others)</td><td>{}</td></tr>", f.versions_other);
    }
    o.push_str("</table>\n<h2>Open alerts</h2>\n");
    let mut by_severity: BTreeMap<&str, usize> = BTreeMap::new();
    for a in alerts {
        *by_severity.entry(a.severity.as_str()).or_default() += 1;
    }
    if alerts.is_empty() {
        o.push_str("<p>None.</p>\n");
    } else {
        let counts: Vec<String> = by_severity
            .iter()
            .map(|(s, n)| format!("{n} {}", esc(s)))
            .collect();
        let _ = writeln!(o, "<p>{}.</p>", counts.join(", "));
        o.push_str("<table><tr><th>device</th><th>severity</th><th>rule</th><th>state</th><th>last fired</th><th>detail</th></tr>\n");
        for a in alerts.iter().take(ALERTS_LISTED_MAX) {
            let _ = writeln!(
                o,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&a.device_id),
                esc(&a.severity),
                esc(&a.rule_name),
                esc(a.state.as_str()),
                esc(&time(a.last_fired_ms)),
                esc(&a.detail)
            );
        }
        o.push_str("</table>\n");
    }
    o.push_str("</body></html>\n");
    o
}

#[cfg(test)]
mod tests {
    use super::esc;

    #[test]
    fn text_from_devices_cannot_open_markup() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }
}
