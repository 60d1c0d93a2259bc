//! Rollouts (issue 19): what a caller asks for, and the one parser of its short forms (the
//! CLI's flags and the API's strings: waves `1,10,50,100`, percentages `5%`, a maintenance
//! window `02:00-05:00`, preconditions `battery>=30`, gate signals).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most waves a rollout has.
pub const WAVES_MAX: usize = 10;
/// Most `require` preconditions and `gate` signals a rollout names.
pub const CONDITIONS_MAX: usize = 8;
/// The waves when none are given: 1 %, 10 %, 50 %, then everyone.
pub const WAVES_DEFAULT_PCT: [f64; 4] = [1.0, 10.0, 50.0, 100.0];
/// The control cohort when none is given (5 % of the target).
pub const CONTROL_DEFAULT_PCT: f64 = 5.0;
/// The health window when none is given (30 minutes).
pub const HEALTH_WINDOW_DEFAULT_MS: u64 = 30 * 60 * 1000;
/// The abort threshold when none is given (5 % of the devices that tried).
pub const ABORT_FAILURE_RATE_DEFAULT_PCT: f64 = 5.0;
/// Devices that must have tried before the abort threshold counts (20).
pub const MIN_DEVICES_DEFAULT: u64 = 20;
/// What the gate compares when none is named: every health signal the cohort test takes.
pub const GATE_DEFAULT: [&str; 4] = ["disconnects", "crashes", "restarts", "telemetry_gaps"];
/// Every signal a gate may compare: the health signals of the cohort test and agent restarts.
pub const GATE_SIGNALS: [&str; 7] = [
    "disconnects",
    "telemetry_gaps",
    "command_failures",
    "command_timeouts",
    "crashes",
    "restarts",
    "update_rollbacks",
];

/// Hundredths of a percent (basis points): `5%` is 500, `0.25%` is 25, `100%` is 10,000.
pub type Bp = u32;
/// 100 %.
pub const BP_ALL: Bp = 10_000;

/// A percentage `5`, `5%` or `0.25%` (at most two decimals, 0..=100) as basis points.
pub fn parse_pct(text: &str) -> Result<Bp, String> {
    let t = text.trim();
    let t = t.strip_suffix('%').unwrap_or(t).trim();
    let bad = || format!("{text:?} is not a percentage like 5%, 0.5% or 100%");
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty()
        || whole.len() > 3
        || frac.len() > 2
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || (t.contains('.') && frac.is_empty())
    {
        return Err(bad());
    }
    let whole: u32 = whole.parse().map_err(|_| bad())?;
    let frac: u32 = format!("{frac:0<2}").parse().map_err(|_| bad())?;
    let bp = whole * 100 + frac;
    if bp > BP_ALL {
        return Err(format!("{text:?} is more than 100%"));
    }
    Ok(bp)
}

/// A percentage given as a number (the API's fields) as basis points.
pub fn pct_to_bp(what: &str, pct: f64) -> Result<Bp, String> {
    let bp = (pct * 100.0).round();
    if !pct.is_finite()
        || !(0.0..=f64::from(BP_ALL)).contains(&bp)
        || (bp - pct * 100.0).abs() > 1e-6
    {
        return Err(format!(
            "{what}: {pct} is not a percentage from 0 to 100 with at most two decimals"
        ));
    }
    Ok(bp as Bp)
}

/// Waves as cumulative percentages of the target (`1,10,50,100`): at most [`WAVES_MAX`],
/// each above 0 and above the one before, the last 100.
pub fn parse_waves(text: &str) -> Result<Vec<Bp>, String> {
    let waves = text
        .split(',')
        .map(parse_pct)
        .collect::<Result<Vec<_>, _>>()?;
    check_waves(&waves)?;
    Ok(waves)
}

/// The rules [`parse_waves`] checks, for waves given as numbers.
pub fn check_waves(waves: &[Bp]) -> Result<(), String> {
    if waves.is_empty() || waves.len() > WAVES_MAX {
        return Err(format!("waves: from 1 to {WAVES_MAX} of them"));
    }
    if waves[0] == 0 || waves.windows(2).any(|w| w[1] <= w[0]) {
        return Err(
            "waves: each a share of the target above 0 and above the one before \
                    (cumulative, like 1,10,50,100)"
                .to_owned(),
        );
    }
    if waves.last() != Some(&BP_ALL) {
        return Err("waves: the last one is 100 (every device of the target)".to_owned());
    }
    Ok(())
}

/// A daily maintenance window in a device's local time, `HH:MM-HH:MM`; one that ends before it
/// starts runs over midnight (`22:00-04:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Minutes after local midnight, 0..1440.
    pub start_min: u16,
    pub end_min: u16,
}

impl Window {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a window like 02:00-05:00");
        let (a, b) = text.trim().split_once('-').ok_or_else(bad)?;
        let minute = |t: &str| -> Option<u16> {
            let (h, m) = t.trim().split_once(':')?;
            if h.is_empty() || h.len() > 2 || m.len() != 2 {
                return None;
            }
            let (h, m): (u16, u16) = (h.parse().ok()?, m.parse().ok()?);
            (h < 24 && m < 60).then_some(h * 60 + m)
        };
        let (start_min, end_min) = (minute(a).ok_or_else(bad)?, minute(b).ok_or_else(bad)?);
        if start_min == end_min {
            return Err(format!(
                "{text:?}: a window that ends when it starts is empty"
            ));
        }
        Ok(Self { start_min, end_min })
    }

    /// Whether `minute` (after local midnight) is inside: the start is, the end is not.
    pub fn contains(&self, minute: u16) -> bool {
        if self.start_min < self.end_min {
            (self.start_min..self.end_min).contains(&minute)
        } else {
            minute >= self.start_min || minute < self.end_min
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:02}:{:02}-{:02}:{:02}",
            self.start_min / 60,
            self.start_min % 60,
            self.end_min / 60,
            self.end_min % 60
        )
    }
}

/// How a precondition compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Ge,
    Gt,
    Le,
    Lt,
}

impl Cmp {
    pub fn holds(self, value: f64, level: f64) -> bool {
        match self {
            Self::Ge => value >= level,
            Self::Gt => value > level,
            Self::Le => value <= level,
            Self::Lt => value < level,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Ge => ">=",
            Self::Gt => ">",
            Self::Le => "<=",
            Self::Lt => "<",
        }
    }
}

/// A per-device precondition on the latest value of a telemetry metric (`battery>=30`,
/// `temp<60`); `battery` means the fleet's battery metric (`[health] battery_metric`). A device
/// that does not meet it (or has no such value) is deferred, never failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Requirement {
    pub metric: String,
    pub cmp: Cmp,
    pub level: f64,
}

impl Requirement {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let bad = || format!("{text:?} is not a precondition like battery>=30 or temp<60");
        let at = t.find(['<', '>']).ok_or_else(bad)?;
        let (metric, rest) = t.split_at(at);
        let (cmp, level) = if let Some(l) = rest.strip_prefix(">=") {
            (Cmp::Ge, l)
        } else if let Some(l) = rest.strip_prefix("<=") {
            (Cmp::Le, l)
        } else if let Some(l) = rest.strip_prefix('>') {
            (Cmp::Gt, l)
        } else if let Some(l) = rest.strip_prefix('<') {
            (Cmp::Lt, l)
        } else {
            return Err(bad());
        };
        let metric = metric.trim();
        let name_ok = is_metric_name(metric);
        let level: f64 = level.trim().parse().map_err(|_| bad())?;
        if !name_ok || !level.is_finite() {
            return Err(bad());
        }
        Ok(Self {
            metric: metric.to_owned(),
            cmp,
            level,
        })
    }
}

impl std::fmt::Display for Requirement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}{}", self.metric, self.cmp.as_str(), self.level)
    }
}

/// A gate signal's canonical name: one of [`GATE_SIGNALS`], also by its short names
/// `reconnects` (disconnects), `gaps` (telemetry_gaps) and `rollbacks` (update_rollbacks); or
/// why not.
pub fn gate_signal(name: &str) -> Result<&'static str, String> {
    let canonical = match name.trim() {
        "reconnects" => "disconnects",
        "gaps" => "telemetry_gaps",
        "rollbacks" => "update_rollbacks",
        other => other,
    };
    GATE_SIGNALS
        .iter()
        .find(|s| **s == canonical)
        .copied()
        .ok_or_else(|| {
            format!(
                "gate signal {name:?}: one of reconnects, {}, or a telemetry metric's name \
                 (battery.v, temp:up)",
                GATE_SIGNALS.join(", ")
            )
        })
}

/// Which way a gated metric's shift is bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worse {
    /// `metric:down`: lower is worse.
    Down,
    /// `metric:up`: higher is worse.
    Up,
    /// `metric`: a shift either way is.
    Either,
}

/// A gate on a telemetry metric's values (`battery.v`, `battery.v:down`, `temp:up`): each
/// compared device's mean of it over the health window, updated against control; `battery`
/// means the fleet's battery metric (`[health] battery_metric`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricGate {
    pub metric: String,
    pub worse: Worse,
}

impl MetricGate {
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let (metric, worse) = match t.rsplit_once(':') {
            Some((m, "down")) => (m, Worse::Down),
            Some((m, "up")) => (m, Worse::Up),
            Some(_) => {
                return Err(format!(
                    "gate {text:?}: a metric's direction is :down (lower is worse) or :up \
                     (higher is worse)"
                ))
            }
            None => (t, Worse::Either),
        };
        if !is_metric_name(metric) {
            return Err(gate_signal(text).err().unwrap_or_default());
        }
        Ok(Self {
            metric: metric.to_owned(),
            worse,
        })
    }
}

impl std::fmt::Display for MetricGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = match self.worse {
            Worse::Down => ":down",
            Worse::Up => ":up",
            Worse::Either => "",
        };
        write!(f, "{}{dir}", self.metric)
    }
}

/// A metric name a rollout may name (preconditions, gates): 1 to 64 of `A-Z a-z 0-9 . _ -`.
fn is_metric_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// `POST /api/v1/rollouts`: update the devices a selector matches in waves, each gated on the
/// health of the devices already updated against a control cohort kept on the old version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    pub artifact_id: String,
    /// The target: a device selector, narrowed by the caller's scope.
    pub selector: String,
    /// Cumulative percentages of the target per wave, the last 100 (default `[1, 10, 50, 100]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waves: Option<Vec<f64>>,
    /// Share of the target kept on the old version until the end (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_pct: Option<f64>,
    /// Most devices started per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_per_minute: Option<u32>,
    /// Most devices updating at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Abort when this share of the devices that tried failed or rolled back (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_failure_rate_pct: Option<f64>,
    /// Devices that must have tried before the abort threshold counts (default 20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_devices: Option<u64>,
    /// How long a wave's devices are watched after they committed (default 30 minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_window_ms: Option<u64>,
    /// Health signals compared against the control cohort (default: disconnects, crashes,
    /// restarts, telemetry_gaps), and telemetry metrics whose values are (`battery.v:down`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<Vec<String>>,
    /// Per-device preconditions (`battery>=30`); unmet ones defer the device.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub require: Vec<String>,
    /// A daily maintenance window (`02:00-05:00`) in the device's time zone (its `tz` tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Abort and roll the updated devices back when the gate fails (otherwise: pause).
    #[serde(default)]
    pub auto_abort: bool,
    /// Devices install it even if it is older than what they run.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// The seed of the random choice of waves (default: random, kept in the rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// A [`CreateRollout`] checked, with its defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSpec {
    pub waves: Vec<Bp>,
    pub control: Bp,
    pub max_per_minute: Option<u32>,
    pub max_concurrent: Option<u32>,
    pub abort_failure_rate: Bp,
    pub min_devices: u64,
    pub health_window_ms: u64,
    pub gate: Vec<&'static str>,
    pub gate_metrics: Vec<MetricGate>,
    pub require: Vec<Requirement>,
    pub window: Option<Window>,
    pub auto_abort: bool,
}

impl CreateRollout {
    /// The spec it asks for, or what is wrong with it (one message, naming the field).
    pub fn spec(&self) -> Result<RolloutSpec, String> {
        let waves = match &self.waves {
            None => WAVES_DEFAULT_PCT
                .iter()
                .map(|p| pct_to_bp("waves", *p))
                .collect::<Result<Vec<_>, _>>()?,
            Some(w) => w
                .iter()
                .map(|p| pct_to_bp("waves", *p))
                .collect::<Result<Vec<_>, _>>()?,
        };
        check_waves(&waves)?;
        let control = pct_to_bp(
            "control_pct",
            self.control_pct.unwrap_or(CONTROL_DEFAULT_PCT),
        )?;
        if control > 5_000 {
            return Err("control_pct: at most 50 (half the target)".to_owned());
        }
        let abort_failure_rate = pct_to_bp(
            "abort_failure_rate_pct",
            self.abort_failure_rate_pct
                .unwrap_or(ABORT_FAILURE_RATE_DEFAULT_PCT),
        )?;
        for (what, v) in [
            ("max_per_minute", self.max_per_minute),
            ("max_concurrent", self.max_concurrent),
        ] {
            if v == Some(0) {
                return Err(format!("{what}: at least 1"));
            }
        }
        let health_window_ms = self.health_window_ms.unwrap_or(HEALTH_WINDOW_DEFAULT_MS);
        if health_window_ms > 7 * 86_400_000 {
            return Err("health_window_ms: at most 7 days".to_owned());
        }
        let (mut gate, mut gate_metrics) = (Vec::new(), Vec::<MetricGate>::new());
        match &self.gate {
            None => gate = GATE_DEFAULT.to_vec(),
            Some(g) => {
                for name in g {
                    match gate_signal(name) {
                        Ok(s) if !gate.contains(&s) => gate.push(s),
                        Ok(_) => {}
                        Err(_) => {
                            let m = MetricGate::parse(name)?;
                            if gate_metrics.iter().any(|x| x.metric == m.metric) {
                                return Err(format!("gate: {} named twice", m.metric));
                            }
                            gate_metrics.push(m);
                        }
                    }
                }
            }
        }
        if gate.len() + gate_metrics.len() > CONDITIONS_MAX || self.require.len() > CONDITIONS_MAX {
            return Err(format!("gate and require: at most {CONDITIONS_MAX} each"));
        }
        let require = self
            .require
            .iter()
            .map(|r| Requirement::parse(r))
            .collect::<Result<Vec<_>, _>>()?;
        let window = self.window.as_deref().map(Window::parse).transpose()?;
        Ok(RolloutSpec {
            waves,
            control,
            max_per_minute: self.max_per_minute,
            max_concurrent: self.max_concurrent,
            abort_failure_rate,
            min_devices: self.min_devices.unwrap_or(MIN_DEVICES_DEFAULT),
            health_window_ms,
            gate,
            gate_metrics,
            require,
            window,
            auto_abort: self.auto_abort,
        })
    }
}

/// One wave of a rollout (the last entry, `control: true`, is the control cohort, updated
/// after every wave passed).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RolloutWave {
    /// 0, 1, ...
    pub wave: u32,
    /// The share of the target updated once this wave is done (cumulative); `null` for the
    /// control cohort.
    pub pct: Option<f64>,
    pub control: bool,
    /// Devices in it.
    pub total: u64,
    /// Not started yet (of those, `deferred`: a precondition was unmet at the last try).
    pub waiting: u64,
    pub deferred: u64,
    /// Started devices by update state (`pending`, `downloading`, ..., `committed`,
    /// `rolled_back`, `failed`).
    pub states: std::collections::BTreeMap<String, u64>,
}

/// One group's counts of a gate signal over the health window (for a metric: `events` is the
/// points read, `hours` 0, `rate` null, and `mean` the mean of the devices' means).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GateCounts {
    pub devices: u64,
    pub events: u64,
    /// Device-hours watched.
    pub hours: f64,
    /// Events per device-hour (`null` without exposure).
    pub rate: Option<f64>,
    /// A metric gate's mean value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<f64>,
}

/// One gate signal: the updated devices against the control cohort.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GateSignal {
    pub signal: String,
    /// `rate` (a health signal's events per device-hour) or `metric` (a telemetry metric's
    /// values: `mean` and `effect` instead of `rate` and `ratio`).
    #[serde(default = "rate_kind")]
    pub kind: String,
    pub updated: GateCounts,
    pub control: GateCounts,
    /// `updated.rate / control.rate` (`null` when the control's rate is 0 or unknown).
    pub ratio: Option<f64>,
    /// The one-sided p-value that the updated devices fail more, when tested (a metric: that
    /// its values shifted the bad way, by the Mann-Whitney U test).
    pub p_value: Option<f64>,
    /// A metric gate's shift: the rank-biserial correlation, -1..=1, `2 P(updated > control)
    /// - 1` over every pair of devices (negative: lower); the gate fails at 0.3 the bad way,
    /// with `p <= alpha`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effect: Option<f64>,
    /// `pass`, `fail` or `unclear`.
    pub verdict: String,
    /// Why it is unclear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn rate_kind() -> String {
    "rate".to_owned()
}

/// The last gate comparison of a rollout.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Gate {
    /// The wave whose health it judged.
    pub wave: u32,
    /// `pass` (the next wave started), `fail` (paused or aborted) or `wait` (not clear yet).
    pub verdict: String,
    /// Unix ms.
    pub checked_at: u64,
    /// The margin: the updated devices fail the gate only at this many times the control's
    /// rate or more (and significantly, `p <= alpha`).
    pub margin: f64,
    pub alpha: f64,
    pub signals: Vec<GateSignal>,
}

/// A rollout with its waves' progress and its last gate comparison.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Rollout {
    /// `rol_<hex>`.
    pub id: String,
    pub artifact_id: String,
    pub version: String,
    /// The deployment carrying its updates (`mooring ota status` shows it too).
    pub deployment_id: String,
    /// The target as applied (with the creator's scope).
    pub selector: String,
    /// `running`, `paused`, `aborted` or `completed`.
    pub state: String,
    /// Why it is paused or aborted.
    pub reason: Option<String>,
    /// The wave being rolled out (`waves.len() - 1` is the control cohort).
    pub wave: u32,
    pub waves: Vec<RolloutWave>,
    /// Devices by where they are, over every wave.
    pub total: u64,
    pub committed: u64,
    pub failed: u64,
    pub rolled_back: u64,
    /// Started and not ended yet.
    pub in_flight: u64,
    pub waiting: u64,
    pub deferred: u64,
    /// When the current wave's health window began and ends (Unix ms), while it runs.
    pub window_started_at: Option<u64>,
    pub window_ends_at: Option<u64>,
    pub gate: Option<Gate>,
    /// The request as checked, defaults filled in.
    pub spec: CreateRollout,
    pub seed: u64,
    /// The rollout this one rolls back.
    pub rollback_of: Option<String>,
    pub created_by: String,
    pub created_at: u64,
    pub updated_at: u64,
}

/// `GET /api/v1/rollouts`: newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutList {
    pub rollouts: Vec<Rollout>,
    pub next_cursor: Option<String>,
}

/// An entry of a rollout's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RolloutEvent {
    pub seq: u64,
    /// Unix ms.
    pub at: u64,
    /// Who: a user's email, a token's name, `server` (the rollout controller).
    pub by: String,
    /// `created`, `wave_started`, `window_started`, `gate_passed`, `gate_failed`, `paused`,
    /// `resumed`, `aborted`, `completed`, `devices_added`, `rollback_created`.
    pub kind: String,
    pub detail: String,
}

/// `GET /api/v1/rollouts/{id}/events`: oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RolloutEventList {
    pub events: Vec<RolloutEvent>,
}

/// `POST /api/v1/rollouts/{id}/pause|resume|abort`: an optional note for the event log; an
/// abort may roll the updated devices back.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutAction {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Abort only: also roll the devices that committed back to what they ran.
    #[serde(default)]
    pub rollback: bool,
}

/// `POST /api/v1/rollouts/{id}/devices`: add the devices a selector matches now (those in the
/// rollout already stay where they are).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddRolloutDevices {
    pub selector: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages_parse_to_basis_points_and_refuse_the_rest() {
        assert_eq!(parse_pct("5%"), Ok(500));
        assert_eq!(parse_pct("5"), Ok(500));
        assert_eq!(parse_pct("0.25%"), Ok(25));
        assert_eq!(parse_pct("0.5"), Ok(50));
        assert_eq!(parse_pct("100%"), Ok(10_000));
        for bad in ["", "%", "101%", "1.234", "-1", "5.%", "a", "1e2", "1000"] {
            assert!(parse_pct(bad).is_err(), "{bad:?}");
        }
        assert_eq!(pct_to_bp("x", 2.5), Ok(250));
        assert!(pct_to_bp("x", 0.125).is_err());
        assert!(pct_to_bp("x", f64::NAN).is_err());
        assert!(pct_to_bp("x", 100.01).is_err());
    }

    #[test]
    fn waves_are_cumulative_and_end_at_everyone() {
        assert_eq!(
            parse_waves("1,10,50,100"),
            Ok(vec![100, 1_000, 5_000, 10_000])
        );
        assert_eq!(parse_waves("100"), Ok(vec![10_000]));
        assert_eq!(parse_waves("0.1%,1%,100%"), Ok(vec![10, 100, 10_000]));
        for bad in [
            "",
            "10,5,100",
            "0,100",
            "10,50",
            "10,10,100",
            "1,2,3,4,5,6,7,8,9,10,100",
        ] {
            assert!(parse_waves(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn windows_hold_their_start_not_their_end_and_may_run_over_midnight() {
        let w = Window::parse("02:00-05:00").expect("window");
        assert_eq!((w.start_min, w.end_min), (120, 300));
        assert!(w.contains(120) && w.contains(299));
        assert!(!w.contains(300) && !w.contains(119));
        let night = Window::parse("22:30-04:00").expect("window");
        assert!(night.contains(22 * 60 + 30) && night.contains(0) && night.contains(239));
        assert!(!night.contains(240) && !night.contains(22 * 60 + 29));
        assert_eq!(night.to_string(), "22:30-04:00");
        for bad in [
            "",
            "2-5",
            "02:00",
            "24:00-01:00",
            "02:60-03:00",
            "02:00-02:00",
            "2:0-3:00",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn preconditions_name_a_metric_a_comparison_and_a_level() {
        let r = Requirement::parse("battery>=30").expect("requirement");
        assert_eq!(
            (r.metric.as_str(), r.cmp, r.level),
            ("battery", Cmp::Ge, 30.0)
        );
        assert!(r.cmp.holds(30.0, r.level) && !r.cmp.holds(29.9, r.level));
        let r = Requirement::parse(" temp < 60.5 ").expect("requirement");
        assert_eq!((r.metric.as_str(), r.cmp, r.level), ("temp", Cmp::Lt, 60.5));
        assert_eq!(r.to_string(), "temp<60.5");
        for bad in [
            "battery",
            ">=30",
            "battery>=",
            "battery=30",
            "bat tery>1",
            "x>inf",
            "x>NaN",
        ] {
            assert!(Requirement::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_request_is_checked_with_its_defaults_filled_in() {
        let spec = CreateRollout {
            artifact_id: "art_1".into(),
            selector: "all".into(),
            ..Default::default()
        }
        .spec()
        .expect("spec");
        assert_eq!(spec.waves, [100, 1_000, 5_000, 10_000]);
        assert_eq!(spec.control, 500);
        assert_eq!(spec.abort_failure_rate, 500);
        assert_eq!(spec.min_devices, 20);
        assert_eq!(spec.health_window_ms, 1_800_000);
        assert_eq!(spec.gate, GATE_DEFAULT);
        let spec = CreateRollout {
            gate: Some(vec![
                "reconnects".into(),
                "crashes".into(),
                "disconnects".into(),
            ]),
            require: vec!["battery>=30".into()],
            window: Some("02:00-05:00".into()),
            ..Default::default()
        }
        .spec()
        .expect("spec");
        assert_eq!(spec.gate, ["disconnects", "crashes"]);
        assert!(spec.gate_metrics.is_empty());
        assert_eq!(spec.require.len(), 1);
        assert!(spec.window.is_some());
        let metric_spec = CreateRollout {
            gate: Some(vec![
                "reconnects".into(),
                "battery.v".into(),
                "temp:up".into(),
            ]),
            ..Default::default()
        }
        .spec()
        .expect("metric gates");
        assert_eq!(metric_spec.gate, ["disconnects"]);
        let metrics: Vec<String> = metric_spec
            .gate_metrics
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(metrics, ["battery.v", "temp:up"]);
        assert_eq!(metric_spec.gate_metrics[0].worse, Worse::Either);
        for bad in [
            CreateRollout {
                waves: Some(vec![50.0, 10.0, 100.0]),
                ..Default::default()
            },
            CreateRollout {
                control_pct: Some(60.0),
                ..Default::default()
            },
            CreateRollout {
                max_per_minute: Some(0),
                ..Default::default()
            },
            CreateRollout {
                gate: Some(vec!["battery.v:sideways".into()]),
                ..Default::default()
            },
            CreateRollout {
                gate: Some(vec!["battery v".into()]),
                ..Default::default()
            },
            CreateRollout {
                gate: Some(vec!["temp".into(), "temp:up".into()]),
                ..Default::default()
            },
            CreateRollout {
                require: vec!["battery".into()],
                ..Default::default()
            },
            CreateRollout {
                window: Some("25:00-01:00".into()),
                ..Default::default()
            },
        ] {
            assert!(bad.spec().is_err(), "{bad:?}");
        }
    }
}
