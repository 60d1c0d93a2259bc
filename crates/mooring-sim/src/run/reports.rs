//! A `report_job`'s file checked against the store at the end of the run: every stored point
//! of its devices and range is in it, none twice and none that is not stored.

use crate::report::JobReport;
use mooring_proto::selector::Selector;
use mooring_server::app::App;
use mooring_server::reports::ReportSpec;
use mooring_store::{JobRecord, TelemetryQuery};
use std::collections::HashSet;

/// Bytes of the file read at once.
const READ_BYTES: usize = 1 << 20;
/// Devices of the selection read at once.
const PAGE_LEN: usize = 1_000;
/// The most points of one device the check reads.
const POINTS_PER_DEVICE_MAX: usize = 1_000_000;

/// Fills `r.points`, `r.duplicate_points` and `r.missing_points` of the succeeded report
/// `job`; a check that cannot run marks the job `unverified` (not succeeded).
pub(super) async fn check(app: &App, job: &JobRecord, r: &mut JobReport) {
    if let Err(e) = try_check(app, job, r).await {
        r.state = format!("unverified: {e}");
    }
}

async fn try_check(app: &App, job: &JobRecord, r: &mut JobReport) -> Result<(), String> {
    let spec = ReportSpec::from_json(&job.params["report"])?;
    let len = job
        .result
        .as_ref()
        .and_then(|res| res["bytes"].as_u64())
        .ok_or("the job has no result")?;
    let mut file = Vec::new();
    while (file.len() as u64) < len {
        let piece = app
            .jobs
            .read_result(&job.id, file.len() as u64, READ_BYTES)
            .await
            .map_err(|e| e.to_string())?;
        if piece.is_empty() {
            return Err(format!("the file ends at {} of {len} bytes", file.len()));
        }
        file.extend_from_slice(&piece);
    }
    let text = String::from_utf8(file).map_err(|e| e.to_string())?;
    let mut rows = 0u64;
    let mut seen: HashSet<(String, u64, String)> = HashSet::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let [device, ts, _time, metric, _value] = f.as_slice() else {
            return Err(format!("a row that is not 5 fields: {line}"));
        };
        let ts = ts.parse().map_err(|_| format!("a bad ts_ms: {line}"))?;
        rows += 1;
        seen.insert(((*device).to_owned(), ts, (*metric).to_owned()));
    }
    let sel = if job.selector.is_empty() {
        Selector { terms: Vec::new() }
    } else {
        Selector::parse(&job.selector).map_err(|e| e.to_string())?
    };
    let readback = app.readback();
    let (mut expected, mut missing) = (0u64, 0u64);
    let mut cursor: Option<String> = None;
    loop {
        let (page, next) = app
            .registry
            .select_devices(&sel, cursor.as_deref(), PAGE_LEN)
            .await
            .map_err(|e| e.to_string())?;
        for d in page {
            let points = readback
                .telemetry(TelemetryQuery {
                    device_id: d.record.id.clone(),
                    metric: None,
                    from_ms: Some(spec.from_ms),
                    to_ms: Some(spec.to_ms),
                    limit: POINTS_PER_DEVICE_MAX,
                })
                .await
                .map_err(|e| e.to_string())?;
            for p in points {
                if !spec.metrics.is_empty() && !spec.metrics.contains(&p.metric) {
                    continue;
                }
                expected += 1;
                if !seen.contains(&(d.record.id.to_string(), p.ts_ms, p.metric)) {
                    missing += 1;
                }
            }
        }
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    r.points = Some(rows);
    // In the file twice, or not a stored point of the range.
    r.duplicate_points = rows.saturating_sub(expected - missing);
    r.missing_points = missing;
    Ok(())
}
