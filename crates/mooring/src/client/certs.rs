//! `mooring cert ...` and `mooring device revoke`: the certificate ledger (issue 16).

use super::{call, parse_duration_ms, parse_id, usage, ApiArgs, EXIT_OK};
use crate::output::{print_json, rfc3339, OutputArgs, Table};
use clap::Subcommand;
use mooring_api::{
    Certificate, CertificateList, CreateRotation, ExpiringParams, RevokeRequest, RotateRequest,
    Rotation,
};

/// Most certificates `cert expiring` prints (pages of 1000 are followed up to this).
const EXPIRING_SHOWN_MAX: usize = 100_000;

#[derive(Subcommand)]
pub enum CertCommand {
    /// Revoke one certificate by serial (hex): refused at the next handshake, and a live
    /// session using it closed within a second, on every node.
    Revoke {
        /// Certificate serial number (hex, as `cert list` shows it).
        serial: String,
        /// Why (kept with the certificate; at most 256 characters).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Tell a device to renew its certificate now (--device; its agent makes a new key, gets
    /// a certificate for it, reconnects with it; then the old one is revoked), or start a
    /// fleet rotation of every certificate expiring soon (--expiring-within, throttled by
    /// --max-per-minute, resumable; see `cert rotation status`).
    #[command(group(clap::ArgGroup::new("what").required(true).args(["device", "expiring_within"])))]
    Rotate {
        /// Device id.
        #[arg(long, value_name = "ID")]
        device: Option<String>,
        /// How long the request waits for an offline device, e.g. 7d, 12h (default: the
        /// server's command TTL). With --device only.
        #[arg(long, value_name = "DURATION", requires = "device")]
        ttl: Option<String>,
        /// Fleet rotation: the devices whose certificate expires within this, e.g. 30d.
        #[arg(long, value_name = "DURATION", requires = "max_per_minute")]
        expiring_within: Option<String>,
        /// Fleet rotation: renewal requests per minute at most (evenly spaced).
        #[arg(long, value_name = "N", requires = "expiring_within")]
        max_per_minute: Option<u32>,
    },
    /// Fleet rotations.
    Rotation {
        #[command(subcommand)]
        command: RotationCommand,
    },
    /// List a device's certificates, newest issued first.
    List {
        /// Device id.
        #[arg(long, value_name = "ID")]
        device: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List active certificates expiring within a duration (expired ones included), soonest
    /// first: the devices at risk.
    Expiring {
        /// How far ahead, e.g. 30d, 12h, 90m.
        #[arg(long, value_name = "DURATION", default_value = "30d")]
        within: String,
        #[command(flatten)]
        output: OutputArgs,
    },
}

#[derive(Subcommand)]
pub enum RotationCommand {
    /// A fleet rotation's progress (the newest without ID): devices selected, requested,
    /// confirmed, pending, failed.
    Status {
        /// Rotation (job) id, as `cert rotate --expiring-within` printed it.
        id: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
}

fn print_rotation(r: &Rotation, output: &OutputArgs) -> anyhow::Result<()> {
    if output.json() {
        return print_json(r);
    }
    println!("rotation {} ({})", r.job.id, r.job.state);
    let selected = r
        .selected
        .map_or_else(|| "(counting)".to_owned(), |n| n.to_string());
    println!("  selected   {selected}");
    println!("  requested  {}", r.requested);
    println!("  confirmed  {}", r.confirmed);
    println!("  pending    {}", r.pending);
    println!("  failed     {}", r.failed);
    for e in &r.job.errors {
        println!("  error {}: {}", e.device_id, e.message);
    }
    Ok(())
}

fn print_certs(certs: Vec<Certificate>, output: OutputArgs) -> anyhow::Result<()> {
    if output.json() {
        return print_json(&CertificateList {
            certificates: certs,
            next_cursor: None,
        });
    }
    let mut t = Table::new(&[
        "SERIAL",
        "DEVICE",
        "STATE",
        "NOT AFTER",
        "ISSUER",
        "REVOKED",
    ]);
    for c in certs {
        let revoked = match (c.revoked_at, c.revoke_reason) {
            (Some(at), Some(reason)) => format!("{} ({reason})", rfc3339(at)),
            (Some(at), None) => rfc3339(at),
            (None, _) => String::new(),
        };
        t.row(vec![
            c.serial,
            c.device_id,
            c.state,
            rfc3339(c.not_after),
            c.issuer,
            revoked,
        ]);
    }
    t.print();
    Ok(())
}

fn print_revoked(what: &str, revoked: &[String]) {
    if revoked.is_empty() {
        println!("{what}: nothing to revoke (already revoked)");
    } else {
        println!("{what}: revoked {}", revoked.join(", "));
    }
}

pub async fn cert(args: ApiArgs, command: CertCommand) -> anyhow::Result<u8> {
    match command {
        CertCommand::Revoke { serial, reason } => {
            if serial.is_empty() || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
                return usage(format!("{serial:?} is not a serial number (hex)"));
            }
            let req = RevokeRequest { reason };
            let done = call(args.connect()?.revoke_certificate(&serial, &req).await)?;
            print_revoked(&format!("certificate {serial}"), &done.revoked);
        }
        CertCommand::Rotate {
            expiring_within: Some(within),
            max_per_minute: Some(max_per_minute),
            ..
        } => {
            let req = CreateRotation {
                expiring_within_ms: parse_duration_ms(&within)?,
                max_per_minute,
            };
            let r = call(args.connect()?.create_rotation(&req).await)?;
            println!(
                "rotation {} started: devices with a certificate expiring within {within}, at most {max_per_minute} a minute (mooring cert rotation status {})",
                r.job.id, r.job.id
            );
        }
        CertCommand::Rotate { device: None, .. } => {
            return usage("--device or --expiring-within with --max-per-minute is required");
        }
        CertCommand::Rotation {
            command: RotationCommand::Status { id, output },
        } => {
            let api = args.connect()?;
            let r = match id {
                Some(id) => call(api.rotation(&id).await)?,
                None => match call(api.rotations().await)?.rotations.into_iter().next() {
                    Some(r) => r,
                    None => return usage("no fleet rotation yet".to_owned()),
                },
            };
            print_rotation(&r, &output)?;
        }
        CertCommand::Rotate {
            device: Some(device),
            ttl,
            ..
        } => {
            let id = parse_id(&device)?;
            let ttl_secs = ttl
                .as_deref()
                .map(parse_duration_ms)
                .transpose()?
                .map(|ms| ms.div_ceil(1000));
            let req = RotateRequest { ttl_secs };
            let c = call(args.connect()?.rotate_certificate(id.as_str(), &req).await)?;
            println!(
                "device {id} told to renew its certificate (command {}, {})",
                c.id, c.state
            );
        }
        CertCommand::List { device, output } => {
            let id = parse_id(&device)?;
            let list = call(args.connect()?.device_certificates(id.as_str()).await)?;
            print_certs(list.certificates, output)?;
        }
        CertCommand::Expiring { within, output } => {
            let within_ms = parse_duration_ms(&within)?;
            let api = args.connect()?;
            let mut certs = Vec::new();
            let mut after = None;
            loop {
                let params = ExpiringParams {
                    expiring_within_ms: within_ms,
                    limit: Some(1000),
                    after: after.take(),
                };
                let page = call(api.expiring_certificates(&params).await)?;
                certs.extend(page.certificates);
                match page.next_cursor {
                    Some(c) if certs.len() < EXPIRING_SHOWN_MAX => after = Some(c),
                    _ => break,
                }
            }
            print_certs(certs, output)?;
        }
    }
    Ok(EXIT_OK)
}

/// `mooring device revoke <ID>`.
pub async fn revoke_device(args: ApiArgs, id: &str, reason: Option<String>) -> anyhow::Result<u8> {
    let id = parse_id(id)?;
    let req = RevokeRequest { reason };
    let done = call(args.connect()?.revoke_device(id.as_str(), &req).await)?;
    print_revoked(&format!("device {id}"), &done.revoked);
    Ok(EXIT_OK)
}
