//! `mooring report ...` and `mooring job result`: reports made in the background as jobs,
//! followed with their progress and downloaded (docs/reports.md).

use super::{call, job_exit, print_job, usage, wait_job, ApiArgs, UsageError, EXIT_OK};
use crate::output::{now_ms, OutputArgs};
use anyhow::Context;
use clap::Subcommand;
use mooring_proto::selector::Selector;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum ReportCommand {
    /// The telemetry of a selection of devices, as CSV or JSON lines, e.g.
    /// `mooring report telemetry --selector tag:site=berlin --from 24h -o berlin.csv`. Waits
    /// with progress on stderr, then writes the report to --out (or stdout).
    Telemetry {
        /// Which devices, e.g. 'tag:site=berlin' or d1,d2 (narrowed by your scope).
        #[arg(long)]
        selector: String,
        /// From (inclusive): a duration ago (24h, 30m, 7d), Unix ms, or RFC 3339
        /// (2026-12-01T00:00:00Z).
        #[arg(long, value_name = "TIME", default_value = "24h")]
        from: String,
        /// To (exclusive): `now`, a duration ago, Unix ms or RFC 3339.
        #[arg(long, value_name = "TIME", default_value = "now")]
        to: String,
        /// csv (device_id,ts_ms,time,metric,value) or jsonl.
        #[arg(long, default_value = "csv")]
        format: String,
        /// Only this metric (repeatable) [default: all].
        #[arg(long = "metric", value_name = "NAME")]
        metrics: Vec<String>,
        /// Write the report to this file (replaced only once complete) [default: stdout].
        #[arg(long = "out", value_name = "FILE")]
        out: Option<PathBuf>,
        /// Print the job and return at once; download it later with `mooring job result`.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// The fleet report: health per cohort over the last 24 hours, flagged cohorts, firmware
    /// versions and open alerts, as one HTML page (or the cohort table as CSV), e.g.
    /// `mooring report fleet --group-by tag:site,version --out fleet.html`.
    Fleet {
        /// Which devices, e.g. 'tag:customer=acme' [default: every device you may see].
        #[arg(long)]
        selector: Option<String>,
        /// Cohorts: up to 3 comma-separated keys, each tag:<key> or version [default: none,
        /// the whole selection].
        #[arg(long, value_name = "KEYS")]
        group_by: Option<String>,
        /// html (every section) or csv (the cohort table).
        #[arg(long, default_value = "html")]
        format: String,
        /// Write the report to this file (replaced only once complete) [default: stdout].
        #[arg(long = "out", value_name = "FILE")]
        out: Option<PathBuf>,
        /// Print the job and return at once; download it later with `mooring job result`.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
}

pub async fn report(args: ApiArgs, command: ReportCommand) -> anyhow::Result<u8> {
    match command {
        ReportCommand::Telemetry {
            selector,
            from,
            to,
            format,
            metrics,
            out,
            no_wait,
            output,
        } => {
            Selector::parse(&selector)
                .map_err(|e| UsageError(format!("invalid --selector: {e}")))?;
            if !matches!(format.as_str(), "csv" | "jsonl") {
                return usage(format!("--format {format:?} is not one of csv, jsonl"));
            }
            let now_ms = now_ms();
            let from_ms = parse_time_ms(&from, now_ms, "--from")?;
            let to_ms = parse_time_ms(&to, now_ms, "--to")?;
            if from_ms >= to_ms {
                return usage(format!("--from ({from}) must be before --to ({to})"));
            }
            let req = mooring_api::CreateReport {
                kind: "telemetry".to_owned(),
                selector,
                from_ms: Some(from_ms),
                to_ms: Some(to_ms),
                format: Some(format),
                metrics,
                group_by: None,
            };
            make(&args, &req, out.as_deref(), no_wait, output).await
        }
        ReportCommand::Fleet {
            selector,
            group_by,
            format,
            out,
            no_wait,
            output,
        } => {
            let selector = selector.unwrap_or_default();
            if !matches!(format.as_str(), "html" | "csv") {
                return usage(format!("--format {format:?} is not one of html, csv"));
            }
            let req = mooring_api::CreateReport {
                kind: "fleet".to_owned(),
                selector,
                format: Some(format),
                group_by,
                ..Default::default()
            };
            make(&args, &req, out.as_deref(), no_wait, output).await
        }
    }
}

/// Queues the report; unless `no_wait`, follows it and downloads it once it has succeeded.
async fn make(
    args: &ApiArgs,
    req: &mooring_api::CreateReport,
    out: Option<&Path>,
    no_wait: bool,
    output: OutputArgs,
) -> anyhow::Result<u8> {
    let api = args.connect()?;
    let job = call(api.create_report(req).await)?;
    if no_wait {
        print_job(&job, output)?;
        return Ok(EXIT_OK);
    }
    let job = wait_job(&api, job).await?;
    if job.state != "succeeded" {
        print_job(&job, output)?;
        return Ok(job_exit(&job));
    }
    download(&api, &job.id, out).await?;
    Ok(EXIT_OK)
}

/// `mooring job result ID [-o FILE]`.
pub async fn job_result(args: ApiArgs, id: &str, out: Option<&Path>) -> anyhow::Result<u8> {
    let api = args.connect()?;
    download(&api, id, out).await?;
    Ok(EXIT_OK)
}

/// Writes a succeeded job's result to `out` (through `<out>.part`, renamed once complete) or
/// stdout.
async fn download(api: &mooring_api::Client, id: &str, out: Option<&Path>) -> anyhow::Result<()> {
    let Some(path) = out else {
        let stdout = std::io::stdout();
        let mut w = std::io::BufWriter::new(stdout.lock());
        call(api.download_job_result(id, &mut w).await)?;
        w.flush().context("writing to stdout")?;
        return Ok(());
    };
    let mut part = path.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    // A new file of our own (a stale .part, or a link planted there, is replaced, not
    // followed), readable by its owner only: a report holds a fleet's telemetry.
    match std::fs::remove_file(&part) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot replace {}", part.display()));
        }
        _ => {}
    }
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&part)
            .with_context(|| format!("cannot create {}", part.display()))?
    };
    let written = write_part(api, id, file, &part, path).await;
    if written.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    eprintln!("{id}: {} bytes written to {}", written?, path.display());
    Ok(())
}

/// Downloads into `file` (at `part`), then renames it to `path`; the bytes written.
async fn write_part(
    api: &mooring_api::Client,
    id: &str,
    file: std::fs::File,
    part: &Path,
    path: &Path,
) -> anyhow::Result<u64> {
    let mut w = std::io::BufWriter::new(file);
    let written = call(api.download_job_result(id, &mut w).await)?;
    w.flush()
        .and_then(|()| w.get_ref().sync_all())
        .with_context(|| format!("writing {}", part.display()))?;
    std::fs::rename(part, path)
        .with_context(|| format!("cannot rename {} to {}", part.display(), path.display()))?;
    Ok(written)
}

/// A point in time: `now`, a duration ago (`24h`), Unix ms, or RFC 3339.
fn parse_time_ms(text: &str, now_ms: u64, flag: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    if text == "now" {
        return Ok(now_ms);
    }
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        // Unix ms have 13 digits today; a short number is more likely a duration without
        // its unit than a time in 1970.
        if text.len() < 10 {
            return usage(format!(
                "{flag} {text:?}: a duration needs a unit (e.g. {text}d, {text}h); Unix ms have 13 digits"
            ));
        }
        return text
            .parse()
            .or_else(|_| usage(format!("{flag} {text:?} is too large")));
    }
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        let ms = t.unix_timestamp_nanos() / 1_000_000;
        return u64::try_from(ms).or_else(|_| usage(format!("{flag} {text:?} is before 1970")));
    }
    match mooring_api::parse_duration_ms(text) {
        Ok(d) => Ok(now_ms.saturating_sub(d)),
        Err(_) => usage(format!(
            "{flag} {text:?} is not `now`, a duration ago (24h), Unix ms or RFC 3339 (2026-12-01T00:00:00Z)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::parse_time_ms;

    #[test]
    fn times_are_now_durations_ago_unix_ms_or_rfc3339() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time_ms("now", now, "--to").ok(), Some(now));
        assert_eq!(
            parse_time_ms("24h", now, "--from").ok(),
            Some(now - 86_400_000)
        );
        assert_eq!(
            parse_time_ms("1700000000000", now, "--from").ok(),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            parse_time_ms("2023-11-14T22:13:20Z", now, "--from").ok(),
            Some(1_700_000_000_000)
        );
        for bad in ["", "yesterday", "-5", "7", "1969-12-31T00:00:00Z"] {
            assert!(parse_time_ms(bad, now, "--from").is_err(), "{bad}");
        }
    }
}
