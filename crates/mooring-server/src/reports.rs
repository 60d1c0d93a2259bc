//! Reports (issue 18): long reads run as jobs on the work queue (`crate::jobs`) instead of a
//! request the caller waits on; `POST /api/v1/reports` makes one, `GET /api/v1/jobs/{id}`
//! shows its progress and `GET /api/v1/jobs/{id}/result` downloads what it made.
//!
//! Kind `telemetry`: the points of the devices a selector matches (narrowed by the creator's
//! scope) in `[from_ms, to_ms)`, optionally of some metrics only, as CSV
//! (`device_id,ts_ms,time,metric,value`) or JSON lines (`{"device_id","ts_ms","metric","value"}`),
//! device by device in id order, each device's points oldest first. A turn reads at most
//! `[jobs] report_points_per_turn` points, appends their rows to the job's result at the stored
//! offset (only while the job is still this worker's: `JobStore::write_job_result` at the job's
//! rev), then stores its progress: the devices done (`done` of `total`), the cursor (the last
//! device finished; the device in progress, the timestamp reached in it and how many of its
//! points at that timestamp were read) and the result so far (`points`, `bytes`). A turn that
//! fails or whose worker dies is run again from the stored progress, rewriting the result from
//! the stored offset: every point is in the result once.
//!
//! Adding a kind is one [`ReportKind`] variant: its parameters, validation and turn.

mod fleet;

use crate::error::{ServiceError, ServiceResult};
use crate::jobs::{Jobs, Turn};
use mooring_proto::selector::Selector;
use mooring_proto::telemetry::MetricValue;
use mooring_store::{JobError, JobRecord, JobState, TelemetryQuery};
use serde_json::{json, Value};

/// The job action of a report.
pub const REPORT_ACTION: &str = "report";
/// The most points one turn reads (the largest `[jobs] report_points_per_turn`).
pub const POINTS_PER_TURN_MAX: usize = 100_000;
/// The most new points one store query of a report reads.
const QUERY_POINTS_MAX: usize = 10_000;
/// The most metrics a report names.
pub const METRICS_MAX: usize = 64;

/// What a report makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// Telemetry points of a selection of devices.
    Telemetry,
    /// The selection's health per cohort, its firmware versions and open alerts.
    Fleet,
}

/// How a report's rows are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Csv,
    Jsonl,
    Html,
}

impl ReportFormat {
    pub fn parse(s: &str) -> ServiceResult<Self> {
        match s {
            "csv" => Ok(ReportFormat::Csv),
            "jsonl" => Ok(ReportFormat::Jsonl),
            "html" => Ok(ReportFormat::Html),
            other => Err(ServiceError::invalid(
                "invalid_format",
                format!("format {other:?} is not one of csv, jsonl, html"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReportFormat::Csv => "csv",
            ReportFormat::Jsonl => "jsonl",
            ReportFormat::Html => "html",
        }
    }

    /// The result's media type.
    pub fn content_type(self) -> &'static str {
        match self {
            ReportFormat::Csv => "text/csv; charset=utf-8",
            ReportFormat::Jsonl => "application/x-ndjson",
            ReportFormat::Html => "text/html; charset=utf-8",
        }
    }
}

/// A report's parameters, as stored with its job (the selector is the job's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportSpec {
    pub kind: ReportKind,
    pub format: ReportFormat,
    /// Inclusive.
    pub from_ms: u64,
    /// Exclusive.
    pub to_ms: u64,
    /// Only these metrics (empty: every metric).
    pub metrics: Vec<String>,
    /// Kind `fleet`: the cohorts (`tag:site,version`, as `GET /api/v1/health`).
    pub group_by: Option<String>,
}

impl ReportSpec {
    /// Builds a spec from a request's fields, validated.
    pub fn from_request(
        kind: &str,
        format: &str,
        from_ms: u64,
        to_ms: u64,
        metrics: Vec<String>,
    ) -> ServiceResult<Self> {
        let kind = match kind {
            "telemetry" => ReportKind::Telemetry,
            other => {
                return Err(ServiceError::invalid(
                    "invalid_kind",
                    format!("report kind {other:?} is not one of telemetry, fleet"),
                ))
            }
        };
        let spec = ReportSpec {
            kind,
            format: ReportFormat::parse(format)?,
            from_ms,
            to_ms,
            metrics,
            group_by: None,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// A fleet report (`csv` or `html`), its cohorts by `group_by`.
    pub fn fleet(format: &str, group_by: Option<String>) -> ServiceResult<Self> {
        let spec = ReportSpec {
            kind: ReportKind::Fleet,
            format: ReportFormat::parse(format)?,
            from_ms: 0,
            to_ms: 0,
            metrics: Vec::new(),
            group_by,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// A spec from `POST /api/v1/reports`'s fields: `telemetry` needs `from_ms` and `to_ms`
    /// (format `csv` by default), `fleet` takes `group_by` (format `html` by default).
    pub fn from_api(
        kind: &str,
        format: Option<&str>,
        from_ms: Option<u64>,
        to_ms: Option<u64>,
        metrics: Vec<String>,
        group_by: Option<String>,
    ) -> ServiceResult<Self> {
        match kind {
            "fleet" => {
                if from_ms.is_some() || to_ms.is_some() || !metrics.is_empty() {
                    return Err(ServiceError::invalid(
                        "invalid_params",
                        "a fleet report takes no from_ms, to_ms or metrics (its window is the health signals' last 24 hours)",
                    ));
                }
                ReportSpec::fleet(format.unwrap_or("html"), group_by)
            }
            _ => {
                if group_by.is_some() {
                    return Err(ServiceError::invalid(
                        "invalid_params",
                        "group_by is for fleet reports",
                    ));
                }
                let (Some(from_ms), Some(to_ms)) = (from_ms, to_ms) else {
                    return Err(ServiceError::invalid(
                        "invalid_range",
                        "a telemetry report needs from_ms and to_ms",
                    ));
                };
                ReportSpec::from_request(kind, format.unwrap_or("csv"), from_ms, to_ms, metrics)
            }
        }
    }

    pub fn validate(&self) -> ServiceResult<()> {
        if self.kind == ReportKind::Fleet {
            if !matches!(self.format, ReportFormat::Csv | ReportFormat::Html) {
                return Err(ServiceError::invalid(
                    "invalid_format",
                    "a fleet report is csv or html",
                ));
            }
            crate::health::check_group_by(self.group_by.as_deref())?;
            return Ok(());
        }
        if self.format == ReportFormat::Html {
            return Err(ServiceError::invalid(
                "invalid_format",
                "a telemetry report is csv or jsonl",
            ));
        }
        if self.from_ms >= self.to_ms || self.to_ms > mooring_store::TS_MS_MAX {
            return Err(ServiceError::invalid(
                "invalid_range",
                format!(
                    "from_ms must be before to_ms (and to_ms at most {})",
                    mooring_store::TS_MS_MAX
                ),
            ));
        }
        if self.metrics.len() > METRICS_MAX
            || self.metrics.iter().any(|m| {
                m.is_empty()
                    || m.len() > mooring_proto::telemetry::METRIC_NAME_LEN_MAX
                    || m.chars().any(|c| c.is_control() || c == ' ')
            })
        {
            return Err(ServiceError::invalid(
                "invalid_metrics",
                format!("metrics must be at most {METRICS_MAX} valid metric names"),
            ));
        }
        Ok(())
    }

    pub fn to_json(&self) -> Value {
        if self.kind == ReportKind::Fleet {
            return json!({"kind": "fleet", "format": self.format.as_str(), "group_by": self.group_by});
        }
        json!({
            "kind": "telemetry",
            "format": self.format.as_str(),
            "from_ms": self.from_ms,
            "to_ms": self.to_ms,
            "metrics": self.metrics,
        })
    }

    /// The spec of a stored job.
    pub fn from_json(v: &Value) -> Result<Self, String> {
        if v["kind"] == "fleet" {
            return ReportSpec::fleet(
                v["format"].as_str().ok_or("no report format")?,
                v["group_by"].as_str().map(str::to_owned),
            )
            .map_err(|e| e.message);
        }
        let metrics = match &v["metrics"] {
            Value::Null => Vec::new(),
            m => serde_json::from_value(m.clone()).map_err(|e| e.to_string())?,
        };
        ReportSpec::from_request(
            v["kind"].as_str().ok_or("no report kind")?,
            v["format"].as_str().ok_or("no report format")?,
            v["from_ms"].as_u64().ok_or("no from_ms")?,
            v["to_ms"].as_u64().ok_or("no to_ms")?,
            metrics,
        )
        .map_err(|e| e.message)
    }
}

/// Where a telemetry report is, as stored in the job's cursor.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Cursor {
    /// The last device finished.
    after: Option<String>,
    /// The device in progress.
    device: Option<String>,
    /// In it: the timestamp reached…
    from_ms: u64,
    /// …and how many of its points at exactly that timestamp were read.
    skip: usize,
}

/// The result so far, as stored in the job's `result`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Written {
    points: u64,
    bytes: u64,
}

impl Written {
    fn of(job: &JobRecord) -> Self {
        let r = job.result.as_ref();
        let n = |k: &str| r.and_then(|r| r[k].as_u64()).unwrap_or(0);
        Written {
            points: n("points"),
            bytes: n("bytes"),
        }
    }

    fn to_json(&self, format: ReportFormat) -> Value {
        json!({
            "format": format.as_str(),
            "content_type": format.content_type(),
            "points": self.points,
            "bytes": self.bytes,
        })
    }
}

/// The CSV header.
const CSV_HEADER: &str = "device_id,ts_ms,time,metric,value\n";

/// One row of the result.
fn write_row(
    out: &mut String,
    format: ReportFormat,
    device: &str,
    ts_ms: u64,
    metric: &str,
    value: MetricValue,
) {
    match format {
        ReportFormat::Csv => {
            let time =
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts_ms) * 1_000_000)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_default();
            let value = match value {
                MetricValue::Number(n) => n.to_string(),
                MetricValue::Bool(b) => b.to_string(),
            };
            out.push_str(&csv_field(device));
            out.push(',');
            out.push_str(&ts_ms.to_string());
            out.push(',');
            out.push_str(&time);
            out.push(',');
            out.push_str(&csv_field(metric));
            out.push(',');
            out.push_str(&value);
            out.push('\n');
        }
        ReportFormat::Jsonl | ReportFormat::Html => {
            let row = json!({"device_id": device, "ts_ms": ts_ms, "metric": metric, "value": value.to_json()});
            out.push_str(&row.to_string());
            out.push('\n');
        }
    }
}

/// A CSV text field (a device id, a metric name: what a device chose), quoted when it must be
/// (RFC 4180). One a spreadsheet would take for a formula (`=`, `+`, `-`, `@`, a tab or CR
/// first) gets a leading `'`, so opening a report never runs what a device sent.
fn csv_field(s: &str) -> std::borrow::Cow<'_, str> {
    let s: std::borrow::Cow<'_, str> = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        format!("'{s}").into()
    } else {
        s.into()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\"")).into()
    } else {
        s
    }
}

/// One turn of a report: at most `[jobs] report_points_per_turn` points read and appended,
/// the progress stored (module doc).
pub(crate) async fn run_turn(
    jobs: &Jobs,
    job: &mut JobRecord,
    spec: &ReportSpec,
    sel: &Selector,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> ServiceResult<Turn> {
    if spec.kind == ReportKind::Fleet {
        return fleet::run(jobs, job, spec).await;
    }
    let core = jobs.core();
    let budget = core
        .config
        .jobs
        .report_points_per_turn
        .clamp(1, POINTS_PER_TURN_MAX);
    let mut cursor: Cursor = match job.cursor.as_deref() {
        None => Cursor::default(),
        Some(c) => serde_json::from_str(c)
            .map_err(|e| ServiceError::internal(format!("stored report cursor: {e}")))?,
    };
    let mut written = Written::of(job);
    let mut out = String::new();
    if written.bytes == 0 && spec.format == ReportFormat::Csv {
        out.push_str(CSV_HEADER);
    }
    let one_metric = match spec.metrics.as_slice() {
        [m] => Some(m.clone()),
        _ => None,
    };
    // A turn also ends after [jobs] batch_len devices (most may have no points in range) and
    // a third of the lease, so it never outlives its lease, and when the worker stops.
    let devices_max = core
        .config
        .jobs
        .batch_len
        .clamp(1, crate::jobs::BATCH_LEN_MAX);
    let began_ms = core.now_ms();
    let time_max_ms = core.config.jobs.lease_ms / 3;
    let mut devices = 0usize;
    let mut read = 0usize;
    let mut finished = false;
    while read < budget
        && devices < devices_max
        && core.now_ms().saturating_sub(began_ms) < time_max_ms
        && !*stop.borrow()
    {
        devices += 1;
        let device = match &cursor.device {
            Some(d) => d.clone(),
            None => {
                let (page, _) = jobs
                    .registry()
                    .select_devices(sel, cursor.after.as_deref(), 1)
                    .await?;
                let Some(d) = page.into_iter().next() else {
                    finished = true;
                    break;
                };
                let id = d.record.id.to_string();
                cursor.device = Some(id.clone());
                cursor.from_ms = spec.from_ms;
                cursor.skip = 0;
                id
            }
        };
        // One query reads at most QUERY_POINTS_MAX new points (as the API's page).
        let limit = (budget - read)
            .min(QUERY_POINTS_MAX)
            .saturating_add(cursor.skip);
        let device_id = mooring_proto::DeviceId::parse(&device)
            .map_err(|e| ServiceError::internal(format!("stored report cursor: {e}")))?;
        let points = core
            .store
            .query(TelemetryQuery {
                device_id,
                metric: one_metric.clone(),
                from_ms: Some(cursor.from_ms),
                to_ms: Some(spec.to_ms),
                limit,
            })
            .await?;
        let full = points.len() == limit;
        for p in points.iter().skip(cursor.skip) {
            read += 1;
            if spec.metrics.is_empty() || spec.metrics.contains(&p.metric) {
                write_row(&mut out, spec.format, &device, p.ts_ms, &p.metric, p.value);
                written.points += 1;
            }
        }
        match points.last() {
            Some(last) if full => {
                let at_last = points.iter().filter(|p| p.ts_ms == last.ts_ms).count();
                cursor.skip = at_last;
                cursor.from_ms = last.ts_ms;
            }
            _ => {
                // This device is done.
                cursor.after = cursor.device.take();
                job.done += 1;
            }
        }
        if points.len() <= cursor.skip && full {
            // A page of one timestamp: the next turn reads past it (its limit grows by the
            // points skipped).
            break;
        }
    }
    let bytes = out.into_bytes();
    let len = bytes.len() as u64;
    if written.bytes.saturating_add(len) > core.config.jobs.report_bytes_max {
        job.errors.push(JobError {
            device_id: String::new(),
            message: format!(
                "the report is larger than [jobs] report_bytes_max ({} bytes); ask for a shorter range, fewer devices or metrics",
                core.config.jobs.report_bytes_max
            ),
        });
        return jobs.finish_turn(job, JobState::Failed).await;
    }
    if !bytes.is_empty()
        && !core
            .store
            .write_job_result(&job.id, job.rev, written.bytes, bytes)
            .await?
    {
        return Ok(Turn::Lost);
    }
    written.bytes += len;
    job.result = Some(written.to_json(spec.format));
    job.cursor = Some(
        serde_json::to_string(&cursor)
            .map_err(|e| ServiceError::internal(format!("report cursor: {e}")))?,
    );
    if finished {
        return jobs.finish_turn(job, JobState::Succeeded).await;
    }
    jobs.save_progress(job).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_bad_ones_say_why() {
        let spec = ReportSpec::from_request("telemetry", "csv", 10, 20, vec!["temp".into()])
            .expect("valid");
        assert_eq!(ReportSpec::from_json(&spec.to_json()), Ok(spec));
        let fleet = ReportSpec::fleet("html", Some("tag:site,version".into())).expect("valid");
        assert_eq!(ReportSpec::from_json(&fleet.to_json()), Ok(fleet));
        assert_eq!(
            ReportSpec::fleet("jsonl", None).expect_err("jsonl").code,
            "invalid_format"
        );
        for (kind, format, from, to, code) in [
            ("uptime", "csv", 1, 2, "invalid_kind"),
            ("telemetry", "html", 1, 2, "invalid_format"),
            ("telemetry", "xml", 1, 2, "invalid_format"),
            ("telemetry", "csv", 2, 2, "invalid_range"),
        ] {
            let e = ReportSpec::from_request(kind, format, from, to, vec![]).expect_err(code);
            assert_eq!(e.code, code);
        }
        let e = ReportSpec::from_request("telemetry", "jsonl", 1, 2, vec!["a b".into()])
            .expect_err("bad metric");
        assert_eq!(e.code, "invalid_metrics");
    }

    #[test]
    fn rows_are_csv_with_quoting_or_json_lines() {
        let mut out = String::new();
        write_row(
            &mut out,
            ReportFormat::Csv,
            "d1",
            1_700_000_000_000,
            "temp",
            MetricValue::Number(21.5),
        );
        write_row(
            &mut out,
            ReportFormat::Csv,
            "a,\"b",
            0,
            "on",
            MetricValue::Bool(true),
        );
        assert_eq!(
            out,
            "d1,1700000000000,2023-11-14T22:13:20Z,temp,21.5\n\"a,\"\"b\",0,1970-01-01T00:00:00Z,on,true\n"
        );
        let mut out = String::new();
        write_row(
            &mut out,
            ReportFormat::Csv,
            "d1",
            0,
            "=HYPERLINK(\"x\")",
            MetricValue::Number(-1.0),
        );
        assert_eq!(
            out,
            "d1,0,1970-01-01T00:00:00Z,\"'=HYPERLINK(\"\"x\"\")\",-1\n"
        );
        let mut out = String::new();
        write_row(
            &mut out,
            ReportFormat::Jsonl,
            "d1",
            5,
            "on",
            MetricValue::Bool(false),
        );
        assert_eq!(
            out,
            "{\"device_id\":\"d1\",\"ts_ms\":5,\"metric\":\"on\",\"value\":false}\n"
        );
    }
}
