//! `mooring ca ...`: registered manufacturer CAs and just-in-time registration, and the fleet
//! CA's rollover (`ca rotate-fleet`) (issue 16).

use super::{call, parse_tags, ApiArgs, UsageError, EXIT_OK};
use crate::output::{print_fields, print_json, rfc3339, OutputArgs, Table};
use clap::{Args, Subcommand};
use mooring_api::{BeginRollover, Ca, FleetCas, RegisterCa, RetireCa};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum CaCommand {
    /// Register a manufacturer's CA: the MQTT listener then trusts device certificates it
    /// issued (CN = device id). Admins only.
    Register {
        /// The CA certificate (PEM file with exactly one certificate, no key).
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// Register a device on its first connection with a certificate from this CA (without
        /// it, such devices are refused and the server log says why).
        #[arg(long)]
        auto_register: bool,
        /// Tag every device this CA registers gets, as key=value (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List the registered CAs, oldest first.
    List {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Disable a CA: its certificates fail the TLS handshake from the next connection on
    /// (devices it registered stay registered but cannot connect).
    Disable {
        /// CA id (`ca_...`, as `ca list` shows it).
        id: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Enable a disabled CA again.
    Enable {
        /// CA id (`ca_...`, as `ca list` shows it).
        id: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Roll the fleet CA over: a new CA issues every certificate from now on, both are trusted
    /// during the overlap, and a throttled rotation moves the devices to certificates from the
    /// new one (they receive the new trust bundle with them). `rotate-fleet status` follows it;
    /// `rotate-fleet retire` ends it. Admins only.
    #[command(name = "rotate-fleet", args_conflicts_with_subcommands = true)]
    RotateFleet {
        #[command(subcommand)]
        step: Option<RolloverStep>,
        #[command(flatten)]
        begin: BeginArgs,
    },
}

/// `mooring ca rotate-fleet` without a step: begin.
#[derive(Args)]
pub struct BeginArgs {
    /// Renewal requests per minute of the rotation (default 100).
    #[arg(long, value_name = "N")]
    max_per_minute: Option<u32>,
    /// Only add the new CA; start no rotation.
    #[arg(long, conflicts_with = "max_per_minute")]
    no_rotation: bool,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Subcommand)]
pub enum RolloverStep {
    /// The fleet CA(s) and how many devices still hold certificates from the previous one.
    Status {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Retire the previous CA: the server presents a certificate from the new one and the
    /// previous one is no longer trusted. Refused while devices still hold live certificates
    /// from it, unless --force.
    Retire {
        /// Retire anyway: revoke the previous CA's remaining certificates (those devices can
        /// no longer connect).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
}

fn print_fleet(f: &FleetCas, extra: &[(&str, String)]) {
    let mut fields = vec![
        ("issuing_ca", f.issuing.sha256.clone()),
        ("issuing_subject", f.issuing.subject.clone()),
        ("issuing_not_after", rfc3339(f.issuing.not_after)),
        ("rolling_over", f.rolling_over.to_string()),
    ];
    if let Some(p) = &f.previous {
        fields.push(("previous_ca", p.sha256.clone()));
        fields.push(("previous_not_after", rfc3339(p.not_after)));
        fields.push(("previous_certificates", f.previous_certificates.to_string()));
    }
    if let Some(id) = &f.rotation_id {
        fields.push(("rotation", id.clone()));
    }
    fields.extend(extra.iter().cloned());
    print_fields(&fields);
}

fn print_ca(ca: &Ca, output: &OutputArgs) -> anyhow::Result<()> {
    if output.json() {
        return print_json(ca);
    }
    let tags: Vec<String> = ca.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    print_fields(&[
        ("id", ca.id.clone()),
        ("subject", ca.subject.clone()),
        ("sha256", ca.sha256.clone()),
        ("enabled", ca.enabled.to_string()),
        ("auto_register", ca.auto_register.to_string()),
        ("tags", tags.join(",")),
        ("not_after", rfc3339(ca.not_after)),
        (
            "created",
            format!("{} by {}", rfc3339(ca.created_at), ca.created_by),
        ),
    ]);
    Ok(())
}

pub async fn ca(args: ApiArgs, command: CaCommand) -> anyhow::Result<u8> {
    match command {
        CaCommand::Register {
            cert,
            auto_register,
            tags,
            output,
        } => {
            let tags = parse_tags(&tags, "--tag")?;
            let cert_pem = std::fs::read_to_string(&cert)
                .map_err(|e| UsageError(format!("--cert {}: {e}", cert.display())))?;
            let req = RegisterCa {
                cert_pem,
                auto_register,
                tags,
            };
            let ca = call(args.connect()?.register_ca(&req).await)?;
            print_ca(&ca, &output)?;
        }
        CaCommand::List { output } => {
            let list = call(args.connect()?.list_cas().await)?;
            if output.json() {
                return print_json(&list).map(|()| EXIT_OK);
            }
            let mut t = Table::new(&[
                "ID",
                "SUBJECT",
                "ENABLED",
                "AUTO-REGISTER",
                "TAGS",
                "NOT AFTER",
            ]);
            for c in list.cas {
                let tags: Vec<String> = c.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                t.row(vec![
                    c.id,
                    c.subject,
                    c.enabled.to_string(),
                    c.auto_register.to_string(),
                    tags.join(","),
                    rfc3339(c.not_after),
                ]);
            }
            t.print();
        }
        CaCommand::Disable { id, output } => {
            let ca = call(args.connect()?.set_ca_enabled(&id, false).await)?;
            print_ca(&ca, &output)?;
        }
        CaCommand::Enable { id, output } => {
            let ca = call(args.connect()?.set_ca_enabled(&id, true).await)?;
            print_ca(&ca, &output)?;
        }
        CaCommand::RotateFleet { step: None, begin } => {
            let req = BeginRollover {
                max_per_minute: begin.max_per_minute,
                no_rotation: begin.no_rotation,
            };
            let f = call(args.connect()?.begin_rollover(&req).await)?;
            if begin.output.json() {
                return print_json(&f).map(|()| EXIT_OK);
            }
            print_fleet(&f, &[]);
            eprintln!(
                "both CAs are trusted now; follow with `mooring ca rotate-fleet status`, then \
                 `mooring ca rotate-fleet retire` once previous_certificates is 0"
            );
        }
        CaCommand::RotateFleet {
            step: Some(RolloverStep::Status { output }),
            ..
        } => {
            let f = call(args.connect()?.fleet_cas().await)?;
            if output.json() {
                return print_json(&f).map(|()| EXIT_OK);
            }
            print_fleet(&f, &[]);
        }
        CaCommand::RotateFleet {
            step: Some(RolloverStep::Retire { force, output }),
            ..
        } => {
            let r = call(args.connect()?.retire_ca(&RetireCa { force }).await)?;
            if output.json() {
                return print_json(&r).map(|()| EXIT_OK);
            }
            print_fleet(
                &r.fleet,
                &[
                    ("revoked", r.revoked.to_string()),
                    ("retired", r.retired.to_string()),
                ],
            );
            if !r.retired {
                eprintln!(
                    "revoked {} certificates of the previous CA; {} left: run `mooring ca rotate-fleet retire --force` again",
                    r.revoked, r.fleet.previous_certificates
                );
            }
        }
    }
    Ok(EXIT_OK)
}
