//! The report as one self-contained HTML page: banner, events and faults in words, charts as inline SVG.
//!
//! Nothing is fetched and nothing runs: CSS is inline, charts are SVG drawn here (a `viewBox`
//! at 100 % width, so they use the page's width), and event details are SVG `<title>` tooltips.

use super::words::{self, clock, count};
use super::{Report, Sample, TimelineEvent};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;

const STYLE: &str = "\
:root{--ok:#1a7f37;--bad:#cf222e;--muted:#57606a;--line:#d0d7de}\
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1f2328;\
margin:0 auto;padding:1.2em 2em 3em;max-width:1280px}\
h1{font-size:1.6em;margin:.3em 0 .1em}h2{font-size:1.15em;margin:1.8em 0 .4em}\
.sub{color:var(--muted);margin:0}\
.banner{padding:.7em 1em;border-radius:6px;font-weight:600;font-size:1.2em;margin:1em 0 .6em}\
.banner.pass{background:#dafbe1;color:var(--ok);border:1px solid #4ac26b}\
.banner.fail{background:#ffebe9;color:var(--bad);border:1px solid #ff8182}\
.banner.none{background:#f6f8fa;color:var(--muted);border:1px solid var(--line)}\
table{border-collapse:collapse}td,th{padding:.25em .9em .25em 0;text-align:left;\
border-bottom:1px solid #eaeef2;vertical-align:top}th{font-weight:600;color:var(--muted)}\
.ok{color:var(--ok);font-weight:600}.bad{color:var(--bad);font-weight:600}\
.num{font-variant-numeric:tabular-nums}\
ol.events{padding-left:0;list-style:none}ol.events li,ul.faults li{margin:.25em 0}\
.n{display:inline-block;min-width:1.5em;height:1.5em;line-height:1.5em;border-radius:.75em;\
color:#fff;text-align:center;font-size:.8em;font-weight:600;margin-right:.5em}\
.t{font-variant-numeric:tabular-nums;color:var(--muted);margin-right:.4em}\
.legend{margin:.2em 0 .3em}.legend span{margin-right:1.3em;white-space:nowrap}\
.sw{display:inline-block;width:.9em;height:.9em;border-radius:2px;vertical-align:-1px;margin-right:.35em}\
svg.chart{width:100%;height:auto;display:block}\
.figs{display:grid;grid-template-columns:repeat(auto-fill,minmax(14em,1fr));gap:.6em}\
.fig{background:#f6f8fa;border-radius:6px;padding:.5em .8em;color:var(--muted)}\
.fig b{display:block;font-size:1.35em;color:#1f2328}\
details pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:13px}";

/// Colours of series without a colour of their own, in order.
const PALETTE: [&str; 4] = ["#1b7c83", "#bf8700", "#bc4c00", "#6e7781"];

/// Colours of cluster nodes, in order.
const NODE_PALETTE: [&str; 8] = [
    "#0969da", "#bf8700", "#8250df", "#1b7c83", "#bc4c00", "#2da44e", "#cf222e", "#6e7781",
];

/// A command state's colour: green for success, red and orange for the failures, blues and
/// greys for the way there.
fn state_color(state: &str) -> Option<&'static str> {
    Some(match state {
        "succeeded" => "#2da44e",
        "failed" => "#cf222e",
        "expired" => "#e16f24",
        "canceled" => "#6e7781",
        "queued" => "#afb8c1",
        "delivered" => "#54aeff",
        "acknowledged" => "#8250df",
        _ => return None,
    })
}

/// Text safe inside HTML/SVG element content and single- or double-quoted attributes.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&#39;")
        .replace('"', "&quot;")
}

/// The colour an event is marked with.
fn event_color(e: &TimelineEvent) -> &'static str {
    if e.error.is_some() {
        return "#1f2328";
    }
    match e.action.as_str() {
        "cut_link" => "#e16f24",
        "restart_server" | "kill_node" => "#cf222e",
        "restart_node" => "#2da44e",
        "command" => "#0969da",
        "delete_device" => "#8250df",
        "retag" | "tag_job" | "report_job" => "#1b7c83",
        _ => "#57606a",
    }
}

/// The whole page.
pub fn page(r: &Report) -> String {
    let mut out = String::new();
    let speed = r.simulated_ms as f64 / r.wall_ms.max(1) as f64;
    let _ = write!(
        out,
        "<!doctype html><html lang=en><meta charset=utf-8>\
         <meta name=viewport content='width=device-width,initial-scale=1'>\
         <title>mooring sim: {name}</title><style>{STYLE}</style>\
         <h1>Scenario {name}</h1><p class=sub>{devices} devices · {sim} simulated in {wall} \
         ({speed:.0}× real time) · seed {seed}</p>",
        name = escape(&r.scenario),
        devices = count(r.devices),
        sim = words::duration(r.simulated_ms),
        wall = words::duration(r.wall_ms),
        seed = r.seed,
    );
    banner(r, &mut out);
    enrollment(r, &mut out);
    events_and_faults(r, &mut out);
    rollouts(r, &mut out);
    charts(r, &mut out);
    figures(r, &mut out);
    let _ = write!(
        out,
        "<details><summary>Every number (as printed by <code>mooring sim run</code>; all of \
         them are in report.json)</summary><pre>{}</pre></details></html>",
        escape(&r.table())
    );
    out
}

/// One section per rollout: its state, each wave (when it started, its health window and gate,
/// its devices), the last gate's comparison, the cohorts it updated, and its event log.
fn rollouts(r: &Report, out: &mut String) {
    let t = |ms: Option<u64>| ms.map_or_else(|| "–".to_owned(), clock);
    for x in &r.rollouts {
        let _ = write!(
            out,
            "<h2>Rollout {version} <span class=sub>({id}, to <code>{sel}</code>, from {at})</span></h2>\
             <p><b>{state}</b> at {reached}{reason}</p><table><tr><th>wave</th><th>devices</th>\
             <th>started</th><th>window</th><th>gate</th><th>committed</th><th>failed</th>\
             <th>rolled back</th><th>updating</th><th>waiting</th></tr>",
            version = escape(&x.version),
            id = escape(&x.id),
            sel = escape(&x.selector),
            at = clock(x.at_ms),
            state = escape(&x.state),
            reached = if x.control_started {
                "the control cohort".to_owned()
            } else {
                format!("wave {} of {}", x.waves_started, x.waves_planned)
            },
            reason = x
                .reason
                .as_deref()
                .map_or_else(String::new, |why| format!(": {}", escape(why))),
        );
        for w in &x.waves {
            let name = match w.pct {
                Some(p) if !w.control => format!("{} ({p}%)", w.wave),
                _ => "control".to_owned(),
            };
            let gate = match (&w.gate, w.gate_ms) {
                (Some(v), Some(at)) => {
                    let class = if v == "pass" { "ok" } else { "bad" };
                    format!("<span class={class}>{v}</span> {}", clock(at))
                }
                _ => "–".to_owned(),
            };
            let _ = write!(
                out,
                "<tr class=num><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{gate}</td>\
                 <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                count(w.devices),
                t(w.started_ms),
                t(w.window_ms),
                count(w.committed),
                count(w.failed),
                count(w.rolled_back),
                count(w.in_flight),
                count(w.waiting),
            );
        }
        out.push_str("</table>");
        if let Some(g) = &x.gate {
            let _ = write!(
                out,
                "<p>Last gate, after wave {}: <b>{}</b> (a signal fails at {}× the control's rate \
                 with p ≤ {})</p><table><tr><th>signal</th><th>updated</th><th>control</th>\
                 <th>ratio</th><th>p</th><th>result</th></tr>",
                g.wave + 1,
                escape(&g.verdict),
                g.margin,
                g.alpha
            );
            for sig in &g.signals {
                let side = |c: &mooring_api::GateCounts| {
                    format!(
                        "{} on {} devices ({}/device-h)",
                        c.events,
                        c.devices,
                        c.rate.map_or_else(|| "–".to_owned(), |r| format!("{r:.3}"))
                    )
                };
                let _ = write!(
                    out,
                    "<tr class=num><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&sig.signal),
                    side(&sig.updated),
                    side(&sig.control),
                    sig.ratio.map_or_else(|| "–".to_owned(), |r| format!("{r:.2}×")),
                    sig.p_value.map_or_else(|| "–".to_owned(), |p| format!("{p:.4}")),
                    escape(&sig.verdict),
                );
            }
            out.push_str("</table>");
        }
        let cohorts: Vec<String> = x
            .cohorts
            .iter()
            .map(|(name, c)| {
                format!(
                    "{} {} of {} ({:.2} %)",
                    escape(name),
                    count(c.started),
                    count(c.devices),
                    c.updated_share * 100.0
                )
            })
            .collect();
        let _ = write!(
            out,
            "<p>Updated per cohort: {}</p><details><summary>Event log</summary><pre>{}</pre></details>",
            cohorts.join(", "),
            escape(&x.log.join("\n"))
        );
    }
}

/// PASSED / FAILED with every expectation and what was measured.
fn banner(r: &Report, out: &mut String) {
    let failed = r.expectations.iter().filter(|e| !e.ok).count();
    let total = r.expectations.len();
    let (class, text) = match (total, failed) {
        (0, _) => (
            "none",
            "No expectations: this scenario has no [expect] section".to_owned(),
        ),
        (1, 0) => ("pass", "PASSED — the expectation held".to_owned()),
        (1, _) => ("fail", "FAILED — the expectation failed".to_owned()),
        (n, 0) => ("pass", format!("PASSED — all {n} expectations held")),
        (n, f) => ("fail", format!("FAILED — {f} of {n} expectations failed")),
    };
    let _ = write!(out, "<div class='banner {class}'>{text}</div>");
    if total == 0 {
        return;
    }
    out.push_str(
        "<table class=expect><tr><th></th><th>expectation</th><th>expected</th>\
         <th>measured</th></tr>",
    );
    for e in &r.expectations {
        let (class, mark) = if e.ok { ("ok", "✓") } else { ("bad", "✗") };
        let expected = e.expected.replace("<=", "≤").replace(">=", "≥");
        let _ = write!(
            out,
            "<tr class={class}><td class={class}>{mark}</td><td>{}</td><td class=num>{}</td>\
             <td class='num {class}'>{}</td></tr>",
            escape(&e.name),
            escape(&expected),
            escape(&e.actual)
        );
    }
    out.push_str("</table>");
}

/// The numbered events (the numbers mark the charts) and the faults, in words.
fn events_and_faults(r: &Report, out: &mut String) {
    let faults = r.fault_lines();
    if r.timeline.is_empty() && faults.is_empty() {
        return;
    }
    out.push_str("<h2>What happened</h2>");
    if !r.timeline.is_empty() {
        out.push_str("<ol class=events>");
        for (i, e) in r.timeline.iter().enumerate() {
            let _ = write!(
                out,
                "<li class=event><span class=n style='background:{}'>{}</span>\
                 <span class=t>{}</span>{}</li>",
                event_color(e),
                i + 1,
                clock(e.at_ms),
                escape(&words::event_text(e))
            );
        }
        out.push_str("</ol>");
    }
    if !faults.is_empty() {
        out.push_str(
            "<p class=sub>Faults over the whole run (the cohorts' own rates and the events \
             above) and what the agents and the server made of them:</p><ul class=faults>",
        );
        for f in &faults {
            let _ = write!(out, "<li class=fault>{}</li>", escape(f));
        }
        out.push_str("</ul>");
    }
    let nodes = r.node_lines();
    if !nodes.is_empty() {
        out.push_str(
            "<p class=sub>The cluster's nodes over the whole run (counters summed over each \
             node's runs):</p><ul class=faults>",
        );
        for n in &nodes {
            let _ = write!(out, "<li class=fault>{}</li>", escape(n));
        }
        out.push_str("</ul>");
    }
}

/// Online devices (per node in cluster mode), telemetry rate and commands by state over
/// simulated time.
fn charts(r: &Report, out: &mut String) {
    let x: Vec<u64> = r.samples.iter().map(|s| s.t_ms).collect();
    let frame = Frame {
        x_ms: &x,
        duration_ms: r.simulated_ms.max(x.last().copied().unwrap_or(0)).max(1),
        events: &r.timeline,
    };
    let online: Vec<f64> = r.samples.iter().map(|s| s.online as f64).collect();
    out.push_str("<h2>Online devices</h2>");
    out.push_str(&frame.chart(
        "devices online (as the server's presence sees them)",
        "devices",
        &[("online", "#0969da", &online)],
        true,
    ));
    let node_ids: Vec<&str> = r.nodes.iter().map(|n| n.id.as_str()).collect();
    if !node_ids.is_empty() {
        let per_node: Vec<Vec<f64>> = node_ids
            .iter()
            .map(|id| {
                r.samples
                    .iter()
                    .map(|s| s.nodes.get(*id).copied().unwrap_or(0) as f64)
                    .collect()
            })
            .collect();
        let refs: Vec<(&str, &str, &[f64])> = node_ids
            .iter()
            .zip(&per_node)
            .enumerate()
            .map(|(i, (id, v))| (*id, NODE_PALETTE[i % NODE_PALETTE.len()], v.as_slice()))
            .collect();
        out.push_str("<h2>Devices per node</h2>");
        legend(&refs, out);
        out.push_str(&frame.chart(
            "devices with a session on each cluster node (0 while a node is dead)",
            "devices",
            &refs,
            true,
        ));
    }
    let rate: Vec<f64> = r.samples.iter().map(|s| s.telemetry_per_min).collect();
    out.push_str("<h2>Telemetry acknowledged (durably stored)</h2>");
    out.push_str(&frame.chart(
        "telemetry messages acknowledged per simulated minute",
        "messages / min",
        &[("messages / min", "#2da44e", &rate)],
        false,
    ));
    // The OTA deployments' devices by update state, in the updater's order.
    let present: BTreeSet<&String> = r.samples.iter().flat_map(|s| s.ota.keys()).collect();
    let order: Vec<&str> = mooring_proto::ota::UpdateState::ALL
        .iter()
        .map(|s| s.as_str())
        .filter(|s| present.iter().any(|p| p.as_str() == *s))
        .collect();
    states_chart(
        &frame,
        &r.samples,
        out,
        &order,
        |s| &s.ota,
        ota_color,
        (
            "Updates by state",
            "devices of the OTA deployments by update state, as the server shows them",
            "devices",
        ),
    );
    let states: BTreeSet<&String> = r.samples.iter().flat_map(|s| s.commands.keys()).collect();
    let order: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
    states_chart(
        &frame,
        &r.samples,
        out,
        &order,
        |s| &s.commands,
        state_color,
        (
            "Commands by state",
            "commands of the scenario's fleet commands, by state",
            "commands",
        ),
    );
}

/// A chart of counts by state over time (one series per state in `order`, none if empty):
/// (heading, caption, unit).
fn states_chart(
    frame: &Frame<'_>,
    samples: &[Sample],
    out: &mut String,
    order: &[&str],
    counts: impl Fn(&Sample) -> &BTreeMap<String, u64>,
    color: fn(&str) -> Option<&'static str>,
    (heading, caption, unit): (&str, &str, &str),
) {
    if order.is_empty() {
        return;
    }
    let series: Vec<(&str, &str, Vec<f64>)> = order
        .iter()
        .enumerate()
        .map(|(i, st)| {
            (
                *st,
                color(st).unwrap_or(PALETTE[i % PALETTE.len()]),
                samples
                    .iter()
                    .map(|s| counts(s).get(*st).copied().unwrap_or(0) as f64)
                    .collect(),
            )
        })
        .collect();
    let refs: Vec<(&str, &str, &[f64])> = series
        .iter()
        .map(|(n, c, v)| (*n, *c, v.as_slice()))
        .collect();
    let _ = write!(out, "<h2>{}</h2>", escape(heading));
    legend(&refs, out);
    out.push_str(&frame.chart(caption, unit, &refs, true));
}

fn ota_color(state: &str) -> Option<&'static str> {
    Some(match state {
        "committed" => "#2da44e",
        "rolled_back" => "#cf222e",
        "failed" => "#1f2328",
        "downloading" => "#0969da",
        "deferred" => "#bf8700",
        "pending" => "#8c959f",
        _ => return None,
    })
}

/// A chart's legend: a swatch and the name of each series.
fn legend(series: &[(&str, &str, &[f64])], out: &mut String) {
    out.push_str("<div class=legend>");
    for (name, color, _) in series {
        let _ = write!(
            out,
            "<span><i class=sw style='background:{color}'></i>{}</span>",
            escape(name)
        );
    }
    out.push_str("</div>");
}

/// The main numbers as tiles.
/// Enrolling cohorts: the exactly-once verdict and the pipeline funnel (how many devices
/// reached each step, and when), with a bar per step.
fn enrollment(r: &Report, out: &mut String) {
    let Some(e) = &r.enrollment else {
        return;
    };
    let _ = write!(
        out,
        "<h2>Enrollment funnel</h2><p>{devices} devices enrolling with {claims} claims: \
         <b>{enrolled} enrolled exactly once</b> ({verdict}); {dups} with two active \
         certificates; {wrong} claims whose uses differ from their devices; {stored} of \
         {expected} devices in the registry; {restarts} processes killed and resumed.</p>\
         <table><tr><th>step</th><th>devices</th><th></th><th>p50</th><th>p99</th>\
         <th>max</th><th>after its key: p50</th><th>p99</th><th>max</th></tr>",
        devices = count(e.devices),
        claims = count(e.claims),
        enrolled = count(e.enrolled),
        verdict = if e.enrolled_exactly_once {
            "every device"
        } else {
            "NOT every device"
        },
        dups = count(e.duplicate_certificates),
        wrong = count(e.claims_uses_mismatched),
        stored = count(e.devices_in_store),
        expected = count(e.devices_expected),
        restarts = count(e.process_restarts),
    );
    for f in &e.funnel {
        let pct = f.devices as f64 * 100.0 / e.devices.max(1) as f64;
        let _ = write!(
            out,
            "<tr><td>{step}</td><td>{n}</td><td><svg width=200 height=12>\
             <rect width='{w:.1}' height=12 fill='#4a7'/></svg></td><td>{p50}</td>\
             <td>{p99}</td><td>{max}</td><td>{k50}</td><td>{k99}</td><td>{kmax}</td></tr>",
            step = escape(&f.step.replace('_', " ")),
            n = count(f.devices),
            w = pct * 2.0,
            p50 = words::duration(f.p50_ms),
            p99 = words::duration(f.p99_ms),
            max = words::duration(f.max_ms),
            k50 = words::duration(f.since_key_p50_ms),
            k99 = words::duration(f.since_key_p99_ms),
            kmax = words::duration(f.since_key_max_ms),
        );
    }
    out.push_str("</table>");
    if !e.refusals.is_empty() {
        out.push_str("<p>Enrollments refused, by code:</p><ul>");
        for (code, n) in &e.refusals {
            let _ = write!(out, "<li><code>{}</code>: {}</li>", escape(code), count(*n));
        }
        out.push_str("</ul>");
    }
    out.push_str(
        "<p class=sub>Virtual time from the start of the run, and after each device made its \
         key (the device's own pipeline, faults and retries included).</p>",
    );
}

fn figures(r: &Report, out: &mut String) {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1_048_576.0);
    let figs = [
        ("telemetry sent", count(r.telemetry_sent)),
        ("telemetry acknowledged", count(r.telemetry_acked)),
        ("telemetry stored", count(r.telemetry_stored)),
        ("acknowledged but lost", count(r.lost_acked_telemetry)),
        ("commands sent", count(r.commands_sent)),
        ("commands succeeded", count(r.commands_succeeded)),
        ("commands run twice", count(r.commands_executed_twice)),
        ("online at the end", count(r.online_at_end)),
        ("reconnects", count(r.reconnects)),
        ("memory (process)", mib(r.rss_bytes)),
        (
            "memory per device",
            format!("{:.1} KiB", r.rss_bytes_per_device as f64 / 1024.0),
        ),
    ];
    out.push_str("<h2>Numbers</h2><div class=figs>");
    for (k, v) in figs {
        let _ = write!(out, "<div class=fig><b>{v}</b>{k}</div>");
    }
    out.push_str("</div>");
}

/// Chart geometry (SVG user units; the SVG scales to the page width).
const W: f64 = 1000.0;
const H: f64 = 300.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 34.0;
const BOTTOM: f64 = 46.0;
/// Radius of an event's numbered label.
const MARKER_R: f64 = 10.0;
/// At most this many ticks on the time axis.
const X_TICKS_MAX: u64 = 10;
/// About this many ticks on a value axis.
const Y_TICKS: f64 = 5.0;

/// Tick steps of the time axis, in ms.
const TIME_STEPS_MS: [u64; 22] = [
    1_000,
    2_000,
    5_000,
    10_000,
    15_000,
    30_000,
    60_000,
    120_000,
    300_000,
    600_000,
    900_000,
    1_800_000,
    3_600_000,
    7_200_000,
    10_800_000,
    21_600_000,
    43_200_000,
    86_400_000,
    172_800_000,
    432_000_000,
    604_800_000,
    1_209_600_000,
];

/// What every chart of one report shares: sample times, the run's length and its events.
struct Frame<'a> {
    x_ms: &'a [u64],
    duration_ms: u64,
    events: &'a [TimelineEvent],
}

impl Frame<'_> {
    fn x(&self, t_ms: u64) -> f64 {
        LEFT + t_ms.min(self.duration_ms) as f64 / self.duration_ms as f64 * (W - LEFT - RIGHT)
    }

    /// A line chart over simulated time with ticked axes and a marker per event.
    fn chart(
        &self,
        title: &str,
        unit: &str,
        series: &[(&str, &str, &[f64])],
        integer: bool,
    ) -> String {
        let data_max = series
            .iter()
            .flat_map(|(_, _, v)| v.iter().copied())
            .fold(0.0_f64, f64::max);
        let (y_step, y_top) = value_ticks(data_max, integer);
        let bottom = H - BOTTOM;
        let y = |v: f64| bottom - v / y_top * (bottom - TOP);
        let mut out = String::new();
        let _ = write!(
            out,
            "<svg class=chart viewBox='0 0 {W} {H}' width='100%' role=img \
             aria-label='{}' font-size='13' font-family='system-ui,sans-serif'>\
             <title>{}</title>",
            escape(title),
            escape(title)
        );
        // Value axis: grid line and label per tick, the unit along it.
        let mut v = 0.0;
        while v <= y_top + y_step / 2.0 {
            let py = y(v);
            let _ = write!(
                out,
                "<line x1='{LEFT}' y1='{py:.1}' x2='{:.1}' y2='{py:.1}' stroke='#eaeef2'/>\
                 <text class=ytick x='{:.1}' y='{:.1}' text-anchor='end' fill='#57606a'>{}</text>",
                W - RIGHT,
                LEFT - 8.0,
                py + 4.0,
                axis_value(v)
            );
            v += y_step;
        }
        let _ = write!(
            out,
            "<text class=unit transform='rotate(-90)' x='{:.1}' y='18' text-anchor='middle' \
             fill='#57606a'>{}</text>",
            -(TOP + bottom) / 2.0,
            escape(unit)
        );
        // Time axis: a tick and a clock reading per step, in simulated time.
        let step = TIME_STEPS_MS
            .iter()
            .copied()
            .find(|s| self.duration_ms / s <= X_TICKS_MAX)
            .unwrap_or(self.duration_ms);
        let mut t = 0;
        while t <= self.duration_ms {
            let px = self.x(t);
            let _ = write!(
                out,
                "<line x1='{px:.1}' y1='{TOP}' x2='{px:.1}' y2='{bottom}' stroke='#f3f4f6'/>\
                 <line x1='{px:.1}' y1='{bottom}' x2='{px:.1}' y2='{:.1}' stroke='#57606a'/>\
                 <text class=xtick x='{px:.1}' y='{:.1}' text-anchor='middle' fill='#57606a'>{}</text>",
                bottom + 5.0,
                bottom + 19.0,
                clock(t)
            );
            t += step;
        }
        let _ = write!(
            out,
            "<line x1='{LEFT}' y1='{bottom}' x2='{:.1}' y2='{bottom}' stroke='#57606a'/>\
             <line x1='{LEFT}' y1='{TOP}' x2='{LEFT}' y2='{bottom}' stroke='#57606a'/>\
             <text x='{:.1}' y='{:.1}' text-anchor='middle' fill='#57606a'>simulated time \
             (h:mm since the start)</text>",
            W - RIGHT,
            (LEFT + W - RIGHT) / 2.0,
            H - 6.0
        );
        self.markers(&mut out);
        if self.x_ms.is_empty() {
            let _ = write!(
                out,
                "<text x='{:.1}' y='{:.1}' text-anchor='middle' fill='#57606a'>no samples: \
                 the run was shorter than its sample interval</text>",
                (LEFT + W - RIGHT) / 2.0,
                (TOP + bottom) / 2.0
            );
        }
        for (name, color, values) in series {
            let points: Vec<String> = self
                .x_ms
                .iter()
                .zip(values.iter())
                .map(|(t, v)| format!("{:.1},{:.1}", self.x(*t), y(*v)))
                .collect();
            let _ = write!(
                out,
                "<polyline fill='none' stroke='{color}' stroke-width='2' \
                 stroke-linejoin='round' points='{}'><title>{}</title></polyline>",
                points.join(" "),
                escape(name)
            );
        }
        out.push_str("</svg>");
        out
    }

    /// A numbered marker per event: a line at its time, a band while it lasted, the event's
    /// line of text as a tooltip.
    fn markers(&self, out: &mut String) {
        let bottom = H - BOTTOM;
        let mut last_label_x = f64::NEG_INFINITY;
        for (i, e) in self.events.iter().enumerate() {
            let color = event_color(e);
            let x0 = self.x(e.at_ms);
            let _ = write!(
                out,
                "<g class=marker><title>{}</title>",
                escape(&words::event_line(e))
            );
            if let Some(until) = e.until_ms {
                let x1 = self.x(until).max(x0 + 1.0);
                let _ = write!(
                    out,
                    "<rect x='{x0:.1}' y='{TOP}' width='{:.1}' height='{:.1}' fill='{color}' \
                     fill-opacity='0.13'/>",
                    x1 - x0,
                    bottom - TOP
                );
            }
            // A label too close to the previous one moves right, tied to its line.
            let lx = x0.max(last_label_x + 2.0 * MARKER_R + 2.0);
            last_label_x = lx;
            let ly = TOP - MARKER_R - 6.0;
            let _ = write!(
                out,
                "<line x1='{x0:.1}' y1='{TOP}' x2='{x0:.1}' y2='{bottom}' stroke='{color}' \
                 stroke-width='1.5' stroke-dasharray='5 3'/>\
                 <line x1='{lx:.1}' y1='{ly:.1}' x2='{x0:.1}' y2='{TOP}' stroke='{color}'/>\
                 <circle cx='{lx:.1}' cy='{ly:.1}' r='{MARKER_R}' fill='{color}'/>\
                 <text x='{lx:.1}' y='{:.1}' text-anchor='middle' fill='#fff' font-size='12' \
                 font-weight='600'>{}</text></g>",
                ly + 4.0,
                i + 1
            );
        }
    }
}

/// The value axis: a round step (1, 2, 2.5 or 5 × 10ⁿ; whole numbers for counts) giving about
/// [`Y_TICKS`] ticks, and the top of the axis (a multiple of the step, at least the data's maximum).
fn value_ticks(max: f64, integer: bool) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / Y_TICKS;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|f| f * magnitude)
        .filter(|s| !integer || s.fract() == 0.0)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * magnitude);
    let step = if integer { step.max(1.0) } else { step };
    (step, (max / step).ceil() * step)
}

/// A value-axis label: `0`, `250`, `1,500`, `12.5k`, `1.2M`, `0.25`.
fn axis_value(v: f64) -> String {
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    if v >= 1e6 {
        format!("{}M", trim(format!("{:.2}", v / 1e6)))
    } else if v >= 1e4 {
        format!("{}k", trim(format!("{:.1}", v / 1e3)))
    } else if v.fract() == 0.0 {
        count(v as u64)
    } else {
        trim(format!("{v:.2}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_axes_use_round_steps_that_cover_the_data() {
        assert_eq!(value_ticks(1000.0, true), (200.0, 1000.0));
        assert_eq!(value_ticks(1003.0, true), (250.0, 1250.0));
        assert_eq!(value_ticks(3.0, true), (1.0, 3.0));
        assert_eq!(value_ticks(0.0, true), (1.0, 1.0));
        assert_eq!(value_ticks(1.2, false), (0.25, 1.25));
        assert_eq!(axis_value(0.0), "0");
        assert_eq!(axis_value(1500.0), "1,500");
        assert_eq!(axis_value(12_500.0), "12.5k");
        assert_eq!(axis_value(1_250_000.0), "1.25M");
        assert_eq!(axis_value(0.25), "0.25");
    }

    #[test]
    fn escape_covers_markup_and_both_quotes() {
        assert_eq!(
            escape("<a href='x'>\"&"),
            "&lt;a href=&#39;x&#39;&gt;&quot;&amp;"
        );
    }
}
