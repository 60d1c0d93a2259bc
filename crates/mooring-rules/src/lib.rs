//! # mooring-rules: what a rule says and how it is evaluated, without I/O
//!
//! A rule is a **condition** on one device's stream (its telemetry points and its events) and a
//! list of **actions** to take when the condition starts to hold. This crate parses both (errors
//! carry the column where the text went wrong) and evaluates a condition one device at a time:
//! [`Condition::on_point`], [`Condition::on_event`] and [`Condition::tick`] take what the server
//! sees and return a [`Change`] when the condition starts ([`Change::Fire`]) or stops
//! ([`Change::Clear`]) holding. The state per (rule, device) is a small [`DeviceState`], bounded
//! whatever the device sends; the caller owns it, so nothing here reads a database.
//!
//! ```text
//! condition := metric op number [ "for" duration ]          battery < 15 for 10m
//!            | "rate(" metric "," duration ")" op number     rate(battery, 1h) < -5
//!            | "no telemetry for" duration                   no telemetry for 30m
//!            | "no" metric "for" duration                    no temp for 30m
//!            | "on" event                                    on update_rolled_back
//!            | "count(" event "," duration ")" op number      count(disconnected, 1h) > 3
//! op        := "<" | "<=" | ">" | ">=" | "==" | "!="
//! event     := connected | disconnected | command_failed | update_rolled_back | health_alert
//! duration  := a whole number and ms, s, m, h or d          (at most 30 days)
//!
//! actions   := action ( "," action )*
//! action    := "alert:" ( info | warning | critical )
//!            | "command:" command-name
//!            | "tag:" key "=" value
//!            | "webhook:" name | "nats:" subject | "job:" kind
//! ```
//!
//! Time is the caller's (milliseconds, the injected clock), so the simulator runs the same
//! evaluation on virtual time.

mod eval;
mod parse;

pub use eval::{Change, DeviceState, RATE_POINTS_MAX};
pub use parse::{parse_actions, ParseError};

/// Longest condition or action text, in bytes.
pub const RULE_TEXT_LEN_MAX: usize = 1024;
/// Longest `for`, window or absence duration (30 days).
pub const RULE_DURATION_MS_MAX: u64 = 30 * 86_400_000;
/// Most actions one rule takes.
pub const ACTIONS_MAX: usize = 8;
/// Largest `count(...)` threshold (the evaluator keeps that many event times per device).
pub const COUNT_THRESHOLD_MAX: f64 = 1000.0;

/// A comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    pub fn holds(self, left: f64, right: f64) -> bool {
        match self {
            Op::Lt => left < right,
            Op::Le => left <= right,
            Op::Gt => left > right,
            Op::Ge => left >= right,
            Op::Eq => left == right,
            Op::Ne => left != right,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Eq => "==",
            Op::Ne => "!=",
        }
    }
}

/// What the server sees happen to a device, besides telemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    Connected,
    Disconnected,
    CommandFailed,
    UpdateRolledBack,
    HealthAlert,
}

impl Event {
    pub const ALL: [Event; 5] = [
        Event::Connected,
        Event::Disconnected,
        Event::CommandFailed,
        Event::UpdateRolledBack,
        Event::HealthAlert,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Connected => "connected",
            Event::Disconnected => "disconnected",
            Event::CommandFailed => "command_failed",
            Event::UpdateRolledBack => "update_rolled_back",
            Event::HealthAlert => "health_alert",
        }
    }
    pub fn parse(text: &str) -> Option<Event> {
        Event::ALL.into_iter().find(|e| e.as_str() == text)
    }
}

/// A parsed condition (see the crate doc for the syntax).
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// `metric op threshold [for d]`: every point of `metric` over `for_ms` holds (0: one point).
    Threshold {
        metric: String,
        op: Op,
        threshold: f64,
        for_ms: u64,
    },
    /// `rate(metric, window) op threshold`: the change of `metric` over the last `window_ms`
    /// (scaled to the window from the points seen in it, once they span half of it).
    Rate {
        metric: String,
        window_ms: u64,
        op: Op,
        threshold: f64,
    },
    /// `no telemetry for d` (`metric` None) or `no metric for d`.
    Absent { metric: Option<String>, for_ms: u64 },
    /// `on event`: fires at each occurrence (never clears by itself).
    On { event: Event },
    /// `count(event, window) op threshold`.
    Count {
        event: Event,
        window_ms: u64,
        op: Op,
        threshold: f64,
    },
}

impl Condition {
    /// Parses a condition; the error says where and what.
    pub fn parse(text: &str) -> Result<Condition, ParseError> {
        parse::condition(text)
    }

    /// The metric whose points this condition reads (`None`: events, or any telemetry).
    pub fn metric(&self) -> Option<&str> {
        match self {
            Condition::Threshold { metric, .. } | Condition::Rate { metric, .. } => Some(metric),
            Condition::Absent { metric, .. } => metric.as_deref(),
            Condition::On { .. } | Condition::Count { .. } => None,
        }
    }

    /// Whether it needs [`Condition::tick`] (a duration that runs out without a message).
    pub fn needs_tick(&self) -> bool {
        matches!(
            self,
            Condition::Threshold { for_ms: 1.., .. }
                | Condition::Absent { .. }
                | Condition::Count { .. }
        )
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = parse::duration_text;
        match self {
            Condition::Threshold {
                metric,
                op,
                threshold,
                for_ms: 0,
            } => write!(f, "{metric} {} {threshold}", op.as_str()),
            Condition::Threshold {
                metric,
                op,
                threshold,
                for_ms,
            } => write!(f, "{metric} {} {threshold} for {}", op.as_str(), d(*for_ms)),
            Condition::Rate {
                metric,
                window_ms,
                op,
                threshold,
            } => write!(
                f,
                "rate({metric}, {}) {} {threshold}",
                d(*window_ms),
                op.as_str()
            ),
            Condition::Absent {
                metric: None,
                for_ms,
            } => write!(f, "no telemetry for {}", d(*for_ms)),
            Condition::Absent {
                metric: Some(m),
                for_ms,
            } => write!(f, "no {m} for {}", d(*for_ms)),
            Condition::On { event } => write!(f, "on {}", event.as_str()),
            Condition::Count {
                event,
                window_ms,
                op,
                threshold,
            } => write!(
                f,
                "count({}, {}) {} {threshold}",
                event.as_str(),
                d(*window_ms),
                op.as_str()
            ),
        }
    }
}

/// How loud an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
    pub fn parse(text: &str) -> Option<Severity> {
        [Severity::Info, Severity::Warning, Severity::Critical]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// What a rule does when its condition starts to hold for a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Alert(Severity),
    Command(String),
    Tag { key: String, value: String },
    Webhook(String),
    Nats(String),
    Job(String),
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Alert(s) => write!(f, "alert:{}", s.as_str()),
            Action::Command(c) => write!(f, "command:{c}"),
            Action::Tag { key, value } => write!(f, "tag:{key}={value}"),
            Action::Webhook(n) => write!(f, "webhook:{n}"),
            Action::Nats(s) => write!(f, "nats:{s}"),
            Action::Job(k) => write!(f, "job:{k}"),
        }
    }
}
