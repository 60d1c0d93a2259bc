//! The run report: raw numbers as JSON, a human table, and an HTML page with SVG plots of
//! online devices, telemetry rate and command states over simulated time.
//!
//! Here: the report's data and the table; `words.rs` says faults and events in plain language
//! (shared by the table and the page) and `html.rs` renders the page.

mod html;
mod words;

/// A simulated time as a clock reading since the start (`0:20`, `1:05:30`, `2d 6:00`).
pub use words::clock as clock_of;

use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// One sample of the fleet's state at a simulated time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    pub t_ms: u64,
    pub online: u64,
    /// Telemetry messages acknowledged to agents (so durably stored) since the previous sample,
    /// per simulated minute.
    pub telemetry_per_min: f64,
    /// Commands by state.
    pub commands: BTreeMap<String, u64>,
    /// Cluster mode: devices with a session on each live node, by node id.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, u64>,
    /// OTA: the deployments' devices by update state, as the server shows them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ota: BTreeMap<String, u64>,
}

/// A fault kind: how many were injected and how many the server or the agents noticed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultCount {
    pub injected: u64,
    pub detected: u64,
}

/// One `[expect]` line and whether it held.
#[derive(Debug, Clone, Serialize)]
pub struct ExpectationResult {
    pub name: String,
    pub expected: String,
    pub actual: String,
    pub ok: bool,
}

/// One scenario event as it was played: the report's chart markers and event lines.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TimelineEvent {
    /// Simulated ms since the start.
    pub at_ms: u64,
    /// When what the event started was over (the cut link restored, the restarted server
    /// accepting again); `None` for an instant event.
    pub until_ms: Option<u64>,
    /// The scenario action: `command`, `cut_link`, `delete_device`, `retag`, `restart_server`.
    pub action: String,
    /// What it was aimed at: a selector, `region <r>` or `all regions`, a device id.
    pub target: String,
    /// A command's name, a retag's new tags, a restart's downtime.
    pub detail: String,
    /// Devices it reached: targeted by the command, cut, deleted, re-tagged, or (a restart)
    /// every device not deleted.
    pub devices: u64,
    /// `cut_link` and `restart_server`: how the devices came back.
    pub reconnected: Option<Reconnected>,
    /// `command`: how fast its device commands succeeded.
    pub completed: Option<Completed>,
    /// `kill_node`: the leases (once-only work) the node held when it was killed, and which
    /// node took each over, how long after the kill.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<LeaseMove>,
    /// `command`: the fleet command's id (to match its device commands; not in the report).
    #[serde(skip)]
    pub fleet_command: Option<String>,
    /// Why the event could not be applied (it then fails the run).
    pub error: Option<String>,
}

/// How the devices an event cut off came back once it was over (`until_ms`): the first
/// connection the server accepted from each (its CONNACK, seen on the device's link).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Reconnected {
    /// Devices that connected again before the run ended.
    pub devices: u64,
    /// Devices expected to: those the event reached, minus devices deleted since.
    pub of: u64,
    /// Time from `until_ms` to the median device's reconnection.
    pub median_ms: u64,
    /// Time from `until_ms` to the slowest reconnection.
    pub max_ms: u64,
}

/// A lease a killed node held, and where it went.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LeaseMove {
    /// The lease (`commands.scheduler`, `presence.reaper`, ...).
    pub lease: String,
    /// The node that took it over; `None` if none did by the end of the run.
    pub to: Option<String>,
    /// Simulated ms from the kill until that node held it.
    pub after_ms: Option<u64>,
}

/// Cluster mode: one node over the whole run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeReport {
    pub id: String,
    /// Running at the end of the run.
    pub alive_at_end: bool,
    /// Times it was started (1 + `restart_node` events that started it).
    pub starts: u64,
    /// Times it was killed (`kill_node`).
    pub kills: u64,
    /// Devices with a session on it at the end.
    pub devices_at_end: u64,
    /// Leases it held at the end.
    pub leases_at_end: Vec<String>,
    /// Its cluster counters (`mooring_cluster_<name>_total`), summed over its runs (each
    /// killed run's as they were when it was killed).
    pub counters: BTreeMap<String, u64>,
}

/// How a fleet command's device commands succeeded: times from the event (the fleet command's
/// creation) to each one's `succeeded` (the device's result stored), in simulated time.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Completed {
    /// Device commands that succeeded.
    pub succeeded: u64,
    /// Device commands the fleet command created (those of devices deleted since included).
    pub of: u64,
    pub median_ms: u64,
    pub p99_ms: u64,
    /// The last one to succeed.
    pub max_ms: u64,
    /// In-process: wall-clock ms from the fleet command's creation until every device command
    /// was final (what the simulated times cost this machine); `None` if that never happened
    /// before the run ended, or in remote mode.
    pub wall_ms: Option<u64>,
}

/// A `tag_job` or `report_job` event's job as it was at the end of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JobReport {
    pub id: String,
    /// `tag` or `report`.
    pub action: String,
    /// `queued`, `running`, `succeeded`, `failed`, `canceled`, or `unknown` (the server was
    /// down at the end).
    pub state: String,
    pub total: Option<u64>,
    pub done: u64,
    pub failed: u64,
    /// Simulated ms from its start to its end (pauses and restarts included).
    pub run_ms: Option<u64>,
    /// A succeeded report: the points in its file, those in it twice, and the points stored
    /// for its devices and range that it lacks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub points: Option<u64>,
    pub duplicate_points: u64,
    pub missing_points: u64,
}

impl JobReport {
    /// Succeeded on every device it counted.
    pub fn succeeded(&self) -> bool {
        self.state == "succeeded"
            && self.failed == 0
            && self.total == Some(self.done)
            && self.duplicate_points == 0
            && self.missing_points == 0
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub devices: u64,
    pub simulated_ms: u64,
    pub wall_ms: u64,
    /// Resident memory of the simulator process at the end (server + all agents), bytes.
    pub rss_bytes: u64,
    /// Peak resident memory of the process (VmHWM), bytes.
    pub rss_peak_bytes: u64,
    /// (RSS at the end - RSS after the server started and the fleet was registered) / devices.
    pub rss_bytes_per_device: u64,
    /// Telemetry messages handed to the agents (each with a unique `sim.n`).
    pub telemetry_sent: u64,
    /// Messages not handed over because the agent's input queue was full.
    pub telemetry_input_dropped: u64,
    /// Messages whose PUBACK reached the agent (deleted from its outbox).
    pub telemetry_acked: u64,
    /// Distinct messages in the server's store at the end (deleted devices excluded).
    pub telemetry_stored: u64,
    /// Acknowledged messages missing from the store at the end: must be 0.
    pub lost_acked_telemetry: u64,
    /// The first few lost messages (`device sim.n=N`).
    pub lost_examples: Vec<String>,
    pub commands_sent: u64,
    pub commands_succeeded: u64,
    pub commands_failed: u64,
    pub commands_expired: u64,
    pub commands_not_final: u64,
    /// Commands deleted with their device (`delete_device` events).
    pub commands_deleted: u64,
    /// The first few commands not final at the end (`device state`).
    pub commands_not_final_examples: Vec<String>,
    /// Commands (device, command) whose handler ran exactly once.
    pub commands_executed_once: u64,
    pub commands_executed_twice: u64,
    /// The `tag_job` and `report_job` events' jobs at the end.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<JobReport>,
    /// Connections the agents lost or failed to open (their `reconnects_total`).
    pub reconnects: u64,
    /// Connection attempts refused because the device's link was down.
    pub connects_refused_link_down: u64,
    /// Devices with a session at the end (in cluster mode: summed over the live nodes).
    pub online_at_end: u64,
    /// Cluster mode: devices online at the end as the cluster answers (a node's own sessions
    /// and, through the store, those of every live node), asked of one node.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_online_at_end: Option<u64>,
    /// Cluster mode: every node over the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeReport>,
    pub deleted_devices: u64,
    pub faults: BTreeMap<String, FaultCount>,
    /// The server's own `/metrics` numbers at the end.
    pub server_metrics: BTreeMap<String, f64>,
    pub samples: Vec<Sample>,
    /// What each scenario event did, in order.
    pub events: Vec<String>,
    /// Each scenario event with its time, reach and outcome, in the order played.
    pub timeline: Vec<TimelineEvent>,
    /// Cohorts that enroll with claims: the pipeline funnel and the exactly-once checks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enrollment: Option<EnrollmentReport>,
    /// Cohorts with `[cohort.ota]`: the deployments' outcome and every device checked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ota: Option<OtaReport>,
    /// Scenarios with `[health]`, `[[rule]]`s or health expectations: the alerts at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthReport>,
    /// Gateway cohorts (`[cohort.gateway]`): the children's telemetry at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateways: Option<GatewayReport>,
    /// Each `rollout` event's rollout as it stood at the end, in the order played.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rollouts: Vec<RolloutReport>,
    pub expectations: Vec<ExpectationResult>,
}

/// The alerts at the end of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HealthReport {
    /// By cohort alert (`<cohort>: <signal>`) or rule name.
    pub alerts: BTreeMap<String, AlertSummary>,
    /// `expect.rule_alerts`: per rule, (devices the selector names, of those without an alert,
    /// alerted devices it does not name).
    pub rule_mismatches: BTreeMap<String, (u64, u64, u64)>,
    /// Per playbook, the tickets it opened.
    pub tickets: BTreeMap<String, TicketSummary>,
}

/// The tickets one playbook opened by the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TicketSummary {
    pub tickets: u64,
    /// Of the first ticket: its title, when it was opened (ms into the run), the devices it
    /// lists, how many of the cohort showed the signal, the cohort's size, and its parts.
    pub title: String,
    pub first_opened_ms: u64,
    pub devices_listed: u64,
    pub devices_affected: u64,
    pub devices_total: u64,
    pub parts: BTreeMap<String, u64>,
    pub steps: Vec<String>,
    /// `expect.tickets`: (devices the selector names, listed devices it does not name).
    pub selector_devices: u64,
    pub listed_outside_selector: u64,
}

/// One cohort alert, or one rule's alerts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AlertSummary {
    pub cohort: bool,
    /// Alerts raised (a rule's: one per device and firing; a cohort's: one while flagged).
    pub alerts: u64,
    /// A rule's: distinct devices.
    pub devices: u64,
    /// Times fired, counted on open alerts.
    pub occurrences: u64,
    pub open_at_end: u64,
    /// Simulated time of the first (ms into the run).
    pub first_raised_ms: u64,
    /// What the first said.
    pub detail: String,
}

impl HealthReport {
    /// As lines of the printed summary.
    pub fn lines(&self) -> Vec<String> {
        if self.alerts.is_empty() {
            return vec!["health: no alert raised".to_owned()];
        }
        self.alerts
            .iter()
            .map(|(key, a)| {
                let what = if a.cohort {
                    format!("cohort alert {key}")
                } else {
                    format!("rule {key}: {} alerts on {} devices", a.alerts, a.devices)
                };
                format!(
                    "health: {what}, first at {} ({}), {} fired, {} open at the end",
                    crate::run::fmt_ms(a.first_raised_ms),
                    a.detail,
                    a.occurrences,
                    a.open_at_end
                )
            })
            .collect()
    }
}

/// The updating cohorts at the end of the run: what the server shows, checked against every
/// device's slots and journal.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OtaReport {
    /// The `ota_deploy` events' deployment ids, then the rollouts' deployments.
    pub deployments: Vec<String>,
    /// Devices the deployments reached (a rollout's: the devices whose update it started).
    pub targeted: u64,
    /// Devices with the updater (deleted ones aside).
    pub devices: u64,
    /// The deployments' devices by final update state, as the server shows them.
    pub final_states: BTreeMap<String, u64>,
    pub committed: u64,
    pub rolled_back: u64,
    /// Devices whose final state came with a reason, by `state: reason code`.
    pub reasons: BTreeMap<String, u64>,
    /// What the devices run at the end (their slots), by version.
    pub running_versions: BTreeMap<String, u64>,
    /// Devices whose committed slot, or the slot that boots next, does not hold a whole image
    /// of a known version: must be 0.
    pub unbootable: u64,
    pub unbootable_examples: Vec<String>,
    /// Devices the server shows in a state they are not in (see the simulator docs): must be 0.
    pub untruthful: u64,
    pub untruthful_examples: Vec<String>,
    /// Devices with a status report still in their outbox at the end (their newest report may
    /// not have reached the server: only lies that cannot be explained by that count above).
    pub unsettled: u64,
    /// Updates the deployments sent to devices without the updater (no `[cohort.ota]`).
    pub targeted_without_updater: u64,
    /// Downloads the server served (whole or from an offset).
    pub downloads: u64,
    /// ... resumed from an offset after a link cut or a power loss.
    pub downloads_resumed: u64,
    /// Download attempts refused because the server served as many as it may.
    pub downloads_busy: u64,
    /// Downloads broken by a link cut.
    pub downloads_cut: u64,
    /// Reboots the updaters made (into a trial, or back from a failed one).
    pub reboots: u64,
    /// Power losses in the middle of an update, and the phase each interrupted.
    pub power_losses: u64,
    pub power_losses_by_phase: BTreeMap<String, u64>,
}

impl OtaReport {
    /// As lines of the printed summary.
    pub fn lines(&self) -> Vec<String> {
        let join = |m: &BTreeMap<String, u64>| {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = vec![
            format!(
                "ota: {} devices, {} targeted by {} deployment(s); final states: {}",
                self.devices,
                self.targeted,
                self.deployments.len(),
                join(&self.final_states)
            ),
            format!("ota: running at the end: {}", join(&self.running_versions)),
            format!("ota: reasons given: {}", join(&self.reasons)),
            format!(
                "ota: unbootable {}, untruthful {} (unsettled outboxes {}, targeted without the updater {})",
                self.unbootable, self.untruthful, self.unsettled, self.targeted_without_updater
            ),
            format!(
                "ota: downloads {} ({} resumed, {} cut by the link, {} refused busy), reboots {}",
                self.downloads,
                self.downloads_resumed,
                self.downloads_cut,
                self.downloads_busy,
                self.reboots
            ),
            format!(
                "ota: power losses during an update {} ({})",
                self.power_losses,
                join(&self.power_losses_by_phase)
            ),
        ];
        for e in &self.unbootable_examples {
            out.push(format!("UNBOOTABLE {e}"));
        }
        for e in &self.untruthful_examples {
            out.push(format!("UNTRUTHFUL {e}"));
        }
        out
    }
}

/// A `rollout` event's rollout at the end of the run, as the server shows it, with when each
/// wave started (from its event log) and how many devices of each cohort it updated.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RolloutReport {
    /// Simulated ms of its event.
    pub at_ms: u64,
    pub id: String,
    pub version: String,
    pub selector: String,
    /// `running`, `paused`, `aborted` or `completed` (`unknown`: no server to ask at the end).
    pub state: String,
    /// Why it is paused or aborted.
    pub reason: Option<String>,
    /// Waves planned (the control cohort aside).
    pub waves_planned: u32,
    /// Waves started (the control cohort aside): the wave it reached.
    pub waves_started: u32,
    /// Every wave passed its gate and the control cohort's update started.
    pub control_started: bool,
    /// Its devices: the target, and how their updates stand.
    pub devices: u64,
    pub committed: u64,
    pub failed: u64,
    pub rolled_back: u64,
    pub in_flight: u64,
    pub waiting: u64,
    pub deferred: u64,
    /// Each wave, then the control cohort.
    pub waves: Vec<RolloutWaveReport>,
    /// The last gate comparison (updated devices against the control cohort).
    pub gate: Option<mooring_api::Gate>,
    /// Per cohort (of the scenario): its devices and what the rollout did to them.
    pub cohorts: BTreeMap<String, RolloutCohort>,
    /// Its event log: `<simulated time> [wall <s>] <kind> (<by>): <detail>` (the wall time at
    /// which the simulator saw the entry, in-process).
    pub log: Vec<String>,
}

/// One wave of a rollout (or its control cohort).
#[derive(Debug, Clone, Default, Serialize)]
pub struct RolloutWaveReport {
    /// 1-based; the control cohort is `waves_planned + 1`.
    pub wave: u32,
    /// Its cumulative share of the target in percent (`None` for the control cohort).
    pub pct: Option<f64>,
    pub control: bool,
    pub devices: u64,
    pub committed: u64,
    pub failed: u64,
    pub rolled_back: u64,
    /// Started, not ended yet.
    pub in_flight: u64,
    /// Not started yet (deferred ones included).
    pub waiting: u64,
    pub deferred: u64,
    /// Simulated ms when it started (`None`: not started).
    pub started_ms: Option<u64>,
    /// Simulated ms when its health window last opened (every device of the waves so far ended).
    pub window_ms: Option<u64>,
    /// Simulated ms and verdict (`pass`, `fail`) of its gate, if it was decided.
    pub gate_ms: Option<u64>,
    pub gate: Option<String>,
    /// In-process: wall ms since the run started at which the simulator saw it start, its
    /// window open and its gate decided (its event log is polled every simulated 10 s): what
    /// each phase cost this machine.
    pub started_wall_ms: Option<u64>,
    pub window_wall_ms: Option<u64>,
    pub gate_wall_ms: Option<u64>,
}

/// What a rollout did to one cohort's devices.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RolloutCohort {
    /// The cohort's devices (deleted ones aside).
    pub devices: u64,
    /// Devices whose update the rollout started (whatever came of it).
    pub started: u64,
    pub committed: u64,
    pub rolled_back: u64,
    pub failed: u64,
    /// `started / devices`.
    pub updated_share: f64,
}

impl RolloutReport {
    /// As lines of the printed summary.
    pub fn lines(&self) -> Vec<String> {
        let t = |ms: Option<u64>| ms.map_or_else(|| "-".to_owned(), words::clock);
        let wave_reached = if self.control_started {
            "the control cohort".to_owned()
        } else {
            format!("wave {} of {}", self.waves_started, self.waves_planned)
        };
        let mut out = vec![format!(
            "rollout {} ({}) to {:?} at {}: {} at {}{}",
            self.version,
            self.id,
            self.selector,
            words::clock(self.at_ms),
            self.state,
            wave_reached,
            self.reason
                .as_deref()
                .map_or_else(String::new, |r| format!(" ({r})"))
        )];
        out.push(format!(
            "rollout {}: {} devices: committed {}, failed {}, rolled back {}, updating {}, waiting {} ({} deferred)",
            self.version,
            self.devices,
            self.committed,
            self.failed,
            self.rolled_back,
            self.in_flight,
            self.waiting,
            self.deferred
        ));
        for w in &self.waves {
            let name = match w.pct {
                Some(p) if !w.control => format!("wave {} ({p}%)", w.wave),
                _ => "control".to_owned(),
            };
            let wall = |ms: Option<u64>| {
                ms.map_or_else(
                    || "-".to_owned(),
                    |ms| format!("{:.0}s", ms as f64 / 1000.0),
                )
            };
            out.push(format!(
                "rollout {}:   {name:<16} {:>6} devices  started {:>8}  window {:>8}  gate {:>8} {:<4}  committed {}, failed {}, rolled back {}, updating {}, waiting {}  (wall: started {}, window {}, gate {})",
                self.version,
                w.devices,
                t(w.started_ms),
                t(w.window_ms),
                t(w.gate_ms),
                w.gate.as_deref().unwrap_or(""),
                w.committed,
                w.failed,
                w.rolled_back,
                w.in_flight,
                w.waiting,
                wall(w.started_wall_ms),
                wall(w.window_wall_ms),
                wall(w.gate_wall_ms)
            ));
        }
        if let Some(g) = &self.gate {
            out.push(format!(
                "rollout {}: last gate, after wave {}: {} (fails at {}x the control's rate with p <= {})",
                self.version,
                g.wave + 1,
                g.verdict,
                g.margin,
                g.alpha
            ));
            for s in &g.signals {
                let rate = |r: Option<f64>| r.map_or_else(|| "-".to_owned(), |r| format!("{r:.3}"));
                out.push(format!(
                    "rollout {}:   {:<15} updated {} on {} devices ({}/device-h)  control {} on {} devices ({}/device-h)  ratio {}  p {}  {}{}",
                    self.version,
                    s.signal,
                    s.updated.events,
                    s.updated.devices,
                    rate(s.updated.rate),
                    s.control.events,
                    s.control.devices,
                    rate(s.control.rate),
                    s.ratio.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}x")),
                    s.p_value.map_or_else(|| "-".to_owned(), |p| format!("{p:.4}")),
                    s.verdict,
                    s.reason.as_deref().map_or_else(String::new, |r| format!(" ({r})"))
                ));
            }
        }
        let cohorts: Vec<String> = self
            .cohorts
            .iter()
            .map(|(name, c)| {
                format!(
                    "{name} {} of {} ({:.2}%; committed {}, rolled back {}, failed {})",
                    c.started,
                    c.devices,
                    c.updated_share * 100.0,
                    c.committed,
                    c.rolled_back,
                    c.failed
                )
            })
            .collect();
        out.push(format!(
            "rollout {}: updated per cohort: {}",
            self.version,
            cohorts.join(", ")
        ));
        out
    }
}

/// The gateway cohorts' children at the end of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GatewayReport {
    pub gateways: u64,
    /// Gateways with a session at the end.
    pub gateways_online_at_end: u64,
    pub children: u64,
    /// Children the server shows online at the end (announced by their gateway).
    pub children_online_at_end: u64,
    /// Telemetry messages the children handed to their gateway.
    pub telemetry_sent: u64,
    /// Distinct child messages in the server's store at the end.
    pub telemetry_stored: u64,
    /// Child messages still in a gateway's outbox at the end (not yet acknowledged).
    pub telemetry_in_outbox_at_end: u64,
    /// Handed over, but neither stored nor in an outbox: must be 0.
    pub telemetry_lost: u64,
    /// Stored points beyond the first of the same child and seq.
    pub telemetry_duplicated: u64,
    /// Children whose stored seqs, oldest first, are not exactly 1, 2, 3, ...
    pub children_out_of_order: u64,
    /// The first few lost messages and out-of-order children.
    pub examples: Vec<String>,
}

impl GatewayReport {
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![
            format!(
                "gateways: {} ({} online at the end), {} children ({} online at the end)",
                self.gateways,
                self.gateways_online_at_end,
                self.children,
                self.children_online_at_end
            ),
            format!(
                "children's telemetry sent / stored / in outbox at end / lost / duplicated: {} / {} / {} / {} / {}",
                self.telemetry_sent,
                self.telemetry_stored,
                self.telemetry_in_outbox_at_end,
                self.telemetry_lost,
                self.telemetry_duplicated
            ),
            format!(
                "children stored exactly once and in order: {} of {}",
                self.children.saturating_sub(self.children_out_of_order),
                self.children
            ),
        ];
        for e in &self.examples {
            out.push(format!("  {e}"));
        }
        out
    }
}

/// The enrolling cohorts at the end of the run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EnrollmentReport {
    /// Devices that started unenrolled.
    pub devices: u64,
    /// Claims the harness created for them.
    pub claims: u64,
    /// Devices registered with the very certificate they stored, and with exactly one active
    /// certificate in the ledger.
    pub enrolled: u64,
    /// Devices with more than one active certificate in the ledger.
    pub duplicate_certificates: u64,
    /// Claims whose `uses` differ from the devices enrolled with them.
    pub claims_uses_mismatched: u64,
    /// Devices in the server's registry at the end, and how many there should be (every
    /// cohort's devices, deleted ones aside).
    pub devices_in_store: u64,
    pub devices_expected: u64,
    /// `enrolled == devices`, no duplicate certificate, every claim's uses right, no device
    /// beyond the cohorts.
    pub enrolled_exactly_once: bool,
    /// How many devices reached each step and when (virtual ms from the start).
    pub funnel: Vec<FunnelStep>,
    /// Enrollments that ended refused, by code.
    pub refusals: BTreeMap<String, u64>,
    /// Processes killed during the enrollment (and resumed from their state dir).
    pub process_restarts: u64,
    /// Per enrollment fault (as named in `faults`): the devices it hit that still ended
    /// enrolled exactly once (the fault table's "detected" column for these).
    pub survived_faults: BTreeMap<String, u64>,
    /// The first few devices not enrolled exactly once, with why.
    pub not_enrolled_examples: Vec<String>,
}

/// One step of the enrollment funnel.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FunnelStep {
    pub step: String,
    pub devices: u64,
    /// When the devices reached it: virtual ms since the start of the run.
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
    /// How long after its own `key_made` each device reached it (its pipeline's duration so
    /// far, faults and retries included), virtual ms.
    pub since_key_p50_ms: u64,
    pub since_key_p99_ms: u64,
    pub since_key_max_ms: u64,
}

impl EnrollmentReport {
    /// The funnel and the checks, as lines of the printed summary.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "enrollment: {} devices, {} claims, {} enrolled exactly once: {} (duplicate certificates {}, claims with wrong uses {}, devices in store {} of {}), {} process restarts",
            self.devices,
            self.claims,
            self.enrolled,
            self.enrolled_exactly_once,
            self.duplicate_certificates,
            self.claims_uses_mismatched,
            self.devices_in_store,
            self.devices_expected,
            self.process_restarts,
        )];
        out.push(format!(
            "{:<24} {:>8} {:>9} {:>9} {:>9}   {:>9} {:>9} {:>9}",
            "funnel step", "devices", "p50", "p99", "max", "from key:", "p99", "max"
        ));
        for f in &self.funnel {
            out.push(format!(
                "{:<24} {:>8} {:>9} {:>9} {:>9}   {:>9} {:>9} {:>9}",
                f.step,
                f.devices,
                fmt_secs(f.p50_ms),
                fmt_secs(f.p99_ms),
                fmt_secs(f.max_ms),
                fmt_secs(f.since_key_p50_ms),
                fmt_secs(f.since_key_p99_ms),
                fmt_secs(f.since_key_max_ms),
            ));
        }
        for (code, n) in &self.refusals {
            out.push(format!("enrollment refused ({code}): {n}"));
        }
        for e in &self.not_enrolled_examples {
            out.push(format!("NOT ENROLLED {e}"));
        }
        out
    }
}

fn fmt_secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

impl Report {
    pub fn passed(&self) -> bool {
        self.expectations.iter().all(|e| e.ok)
    }

    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let sim_h = self.simulated_ms as f64 / 3_600_000.0;
        let _ = writeln!(
            out,
            "scenario {} (seed {}): {} devices, {:.2} simulated h in {:.1} s wall ({:.0}x)",
            self.scenario,
            self.seed,
            self.devices,
            sim_h,
            self.wall_ms as f64 / 1000.0,
            self.simulated_ms as f64 / self.wall_ms.max(1) as f64
        );
        let rows: Vec<(&str, String)> = vec![
            (
                "memory (RSS of the simulator process)",
                format!("{:.1} MiB", self.rss_bytes as f64 / 1048576.0),
            ),
            (
                "memory peak (VmHWM)",
                format!("{:.1} MiB", self.rss_peak_bytes as f64 / 1048576.0),
            ),
            (
                "memory per simulated device",
                format!("{:.1} KiB", self.rss_bytes_per_device as f64 / 1024.0),
            ),
            (
                "telemetry sent / acked / stored",
                format!(
                    "{} / {} / {}",
                    self.telemetry_sent, self.telemetry_acked, self.telemetry_stored
                ),
            ),
            (
                "telemetry not handed over (agent input full)",
                self.telemetry_input_dropped.to_string(),
            ),
            (
                "acked telemetry lost",
                self.lost_acked_telemetry.to_string(),
            ),
            ("commands sent", self.commands_sent.to_string()),
            (
                "commands succeeded / failed / expired / not final / deleted",
                format!(
                    "{} / {} / {} / {} / {}",
                    self.commands_succeeded,
                    self.commands_failed,
                    self.commands_expired,
                    self.commands_not_final,
                    self.commands_deleted
                ),
            ),
            (
                "commands executed once / twice or more",
                format!(
                    "{} / {}",
                    self.commands_executed_once, self.commands_executed_twice
                ),
            ),
            (
                "reconnects (refused while link down)",
                format!("{} ({})", self.reconnects, self.connects_refused_link_down),
            ),
            ("online at end", self.online_at_end.to_string()),
            ("devices deleted", self.deleted_devices.to_string()),
        ];
        for (k, v) in rows {
            let _ = writeln!(out, "  {k:<52} {v}");
        }
        if let Some(n) = self.cluster_online_at_end {
            let _ = writeln!(out, "  {:<52} {n}", "online at end (the cluster's answer)");
        }
        for line in self.node_lines() {
            let _ = writeln!(out, "  {line}");
        }
        if !self.faults.is_empty() {
            let _ = writeln!(
                out,
                "  {:<52} {:>10} {:>10}",
                "fault", "injected", "detected"
            );
            for (k, f) in &self.faults {
                let _ = writeln!(out, "  {k:<52} {:>10} {:>10}", f.injected, f.detected);
            }
        }
        if let Some(e) = &self.enrollment {
            for line in e.lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        if let Some(o) = &self.ota {
            for line in o.lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        if let Some(h) = &self.health {
            for line in h.lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        if let Some(g) = &self.gateways {
            for line in g.lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        for r in &self.rollouts {
            for line in r.lines() {
                let _ = writeln!(out, "  {line}");
            }
        }
        for line in self.event_lines().iter().chain(&self.fault_lines()) {
            let _ = writeln!(out, "  * {line}");
        }
        for e in &self.events {
            let _ = writeln!(out, "  event {e}");
        }
        for l in &self.lost_examples {
            let _ = writeln!(out, "  LOST {l}");
        }
        for c in &self.commands_not_final_examples {
            let _ = writeln!(out, "  NOT FINAL {c}");
        }
        for e in &self.expectations {
            let _ = writeln!(
                out,
                "  expect {:<45} {} (expected {}, got {})",
                e.name,
                if e.ok { "ok" } else { "FAILED" },
                e.expected,
                e.actual
            );
        }
        out
    }

    /// A self-contained HTML page: a pass/fail banner with every expectation, the events and
    /// faults in plain words, and charts (inline SVG, no scripts, nothing fetched).
    pub fn html(&self) -> String {
        html::page(self)
    }

    /// One line per scenario event, in the order played: what it did and, for a link cut or a
    /// server restart, how the devices came back.
    pub fn event_lines(&self) -> Vec<String> {
        self.timeline.iter().map(words::event_line).collect()
    }

    /// Cluster mode: one line per node (state, devices and leases at the end, counters).
    pub fn node_lines(&self) -> Vec<String> {
        self.nodes.iter().map(words::node_line).collect()
    }

    /// One line per kind of fault counted over the run (drops, outages, power losses, crashes,
    /// ...; the events' own are in [`Report::event_lines`]) and what the agents and the server
    /// made of it.
    pub fn fault_lines(&self) -> Vec<String> {
        words::fault_lines(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_table_json_and_html() {
        let mut r = Report {
            scenario: "smoke".into(),
            devices: 3,
            simulated_ms: 3_600_000,
            wall_ms: 1000,
            ..Report::default()
        };
        r.samples.push(Sample {
            t_ms: 60_000,
            online: 3,
            telemetry_per_min: 3.0,
            commands: BTreeMap::from([("succeeded".to_owned(), 2)]),
            ..Sample::default()
        });
        r.expectations.push(ExpectationResult {
            name: "lost_acked_telemetry".into(),
            expected: "= 0".into(),
            actual: "0".into(),
            ok: true,
        });
        assert!(r.passed());
        assert!(r.table().contains("3600x"));
        let html = r.html();
        assert!(html.contains("<polyline"));
        assert!(html.contains("PASSED — the expectation held"), "{html}");
        r.expectations.push(ExpectationResult {
            name: "min_online_at_end".into(),
            expected: ">= 4".into(),
            actual: "3".into(),
            ok: false,
        });
        assert!(r.html().contains("FAILED — 1 of 2 expectations failed"));
        r.expectations.clear();
        assert!(r.html().contains("No expectations"));
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["devices"], 3);
    }
}
