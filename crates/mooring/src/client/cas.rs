//! `mooring ca ...`: registered manufacturer CAs and just-in-time registration (issue 16).

use super::{call, parse_tags, ApiArgs, UsageError, EXIT_OK};
use crate::output::{print_fields, print_json, rfc3339, OutputArgs, Table};
use clap::Subcommand;
use mooring_api::{Ca, RegisterCa};
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
    }
    Ok(EXIT_OK)
}
