//! The API-facing commands (`mooring device|command|token ...`): arguments in, one typed
//! [`mooring_api::Client`] call out, the answer printed as a table or as the API's JSON.

mod cas;
mod certs;
pub mod health;
mod ota;
mod reports;
mod rollouts;
mod rules;
mod tickets;
pub use cas::{ca, CaCommand};
pub use certs::{cert, CertCommand};
pub use ota::{ota, OtaCommand};
pub use reports::{report, ReportCommand};
pub use rollouts::{rollout, RolloutCommand};
pub use rules::{alert, rule, AlertCommand, RuleCommand};
pub use tickets::{ticket, TicketCommand};

use crate::credentials::CredentialFiles;
use crate::output::{ago, print_fields, print_json, rfc3339, OutputArgs, Table};
use crate::{ClaimCommand, CommandCommand, DeviceCommand, JobCommand, TokenCommand, UserCommand};
use anyhow::Context;
use clap::Args;
use mooring_api::{AnyCommand, Command, Device, FleetCommand, Job};
use mooring_proto::selector::{Selector, Term};
use mooring_proto::DeviceId;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Exit status: success.
pub const EXIT_OK: u8 = 0;
/// Exit status: the server refused the call, or the awaited command failed, expired or was
/// canceled.
pub const EXIT_FAILED: u8 = 1;
/// Exit status: invalid arguments.
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the awaited command was not final within `--wait-ms`.
pub const EXIT_NOT_FINAL: u8 = 3;

/// An error in what the user typed: exit code 2.
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage<T>(msg: impl Into<String>) -> anyhow::Result<T> {
    Err(UsageError(msg.into()).into())
}

/// How to reach the server; shared by every API-facing command.
#[derive(Args)]
#[command(next_help_heading = "Connection options")]
pub struct ApiArgs {
    /// Server API URL.
    #[arg(
        long,
        env = "MOORING_SERVER",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    server: String,
    /// API token [default: read from <data-dir>/admin.token].
    #[arg(long, env = "MOORING_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Data directory holding admin.token (and ca.crt for https).
    #[arg(
        long,
        env = "MOORING_DATA_DIR",
        default_value = "./mooring-data",
        global = true
    )]
    data_dir: PathBuf,
    /// CA certificate to trust for an https server [default: <data-dir>/ca.crt].
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
}

impl ApiArgs {
    fn connect(&self) -> anyhow::Result<mooring_api::Client> {
        let token = match &self.token {
            Some(t) => t.clone(),
            None => {
                let path = self.data_dir.join("admin.token");
                std::fs::read_to_string(&path).with_context(|| {
                    format!(
                        "no --token given, MOORING_TOKEN unset, and cannot read {}",
                        path.display()
                    )
                })?
            }
        };
        let mut builder = mooring_api::Client::builder(&self.server, &token);
        if self.server.starts_with("https://") {
            let ca = self
                .ca
                .clone()
                .unwrap_or_else(|| self.data_dir.join("ca.crt"));
            builder = builder.ca_file(&ca)?;
        }
        Ok(builder.build()?)
    }
}

/// Adds "is `mooring serve` running?" to an unreachable server.
fn call<T>(r: Result<T, mooring_api::Error>) -> anyhow::Result<T> {
    r.map_err(|e| match e {
        e @ mooring_api::Error::Transport { .. } => {
            anyhow::Error::new(e).context("is `mooring serve` running? (--server, MOORING_SERVER)")
        }
        e => e.into(),
    })
}

fn parse_id(id: &str) -> anyhow::Result<DeviceId> {
    DeviceId::parse(id).map_err(|e| UsageError(e.to_string()).into())
}

fn parse_tags(tags: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for t in tags {
        let Some((k, v)) = t.split_once('=') else {
            return usage(format!("{what} {t:?} must be key=value"));
        };
        out.insert(k.to_owned(), v.to_owned());
    }
    Ok(out)
}

fn tags_text(tags: &BTreeMap<String, String>) -> String {
    if tags.is_empty() {
        return "-".to_owned();
    }
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn last_seen_text(d: &Device) -> String {
    d.last_seen.map_or_else(|| "never".to_owned(), ago)
}

fn print_device(d: &Device, out: OutputArgs) -> anyhow::Result<()> {
    if out.json() {
        return print_json(d);
    }
    print_fields(&[
        ("id", d.id.clone()),
        ("online", if d.online { "yes" } else { "no" }.to_owned()),
        (
            "last seen",
            match d.last_seen {
                Some(ms) => format!("{} ({})", ago(ms), rfc3339(ms)),
                None => "never".to_owned(),
            },
        ),
        ("created", rfc3339(d.created_at)),
        (
            "version",
            d.version
                .clone()
                .unwrap_or_else(|| "not reported".to_owned()),
        ),
        ("tags", tags_text(&d.tags)),
        ("cert serial", d.cert_serial.clone()),
        ("cert sha256", d.cert_sha256.clone()),
        ("cert expires", rfc3339(d.cert_not_after)),
        (
            "installed",
            match &d.installation {
                Some(i) if i.notes.is_empty() => {
                    format!("{} by {} at {}", rfc3339(i.at), i.by, i.location)
                }
                Some(i) => format!(
                    "{} by {} at {} ({})",
                    rfc3339(i.at),
                    i.by,
                    i.location,
                    i.notes
                ),
                None => "not yet".to_owned(),
            },
        ),
    ]);
    Ok(())
}

/// The pipeline steps under a device: one line each, state, time, last error.
fn print_pipeline(p: &mooring_api::Provisioning) {
    println!();
    println!("provisioning:");
    let mut table = Table::new(&["STEP", "STATE", "AT", "LAST ERROR"]);
    for s in &p.steps {
        let state = match s.state {
            mooring_api::StepState::Done => "done",
            mooring_api::StepState::Pending => "pending",
            mooring_api::StepState::Skipped => "skipped",
        };
        table.row(vec![
            s.step.clone(),
            state.to_owned(),
            s.at.map_or_else(|| "-".to_owned(), rfc3339),
            s.last_error.as_ref().map_or_else(
                || "-".to_owned(),
                |e| format!("{} {}", rfc3339(e.at), e.message),
            ),
        ]);
    }
    table.print();
}

pub async fn device(args: ApiArgs, command: DeviceCommand) -> anyhow::Result<u8> {
    match command {
        DeviceCommand::Create { id, out, tags, csr } => {
            let id = parse_id(&id)?;
            let tags = parse_tags(&tags, "--tag")?;
            let csr_pem = csr
                .as_deref()
                .map(|path| {
                    std::fs::read_to_string(path)
                        .map_err(|e| UsageError(format!("--csr {}: {e}", path.display())))
                })
                .transpose()?;
            let dir = out.unwrap_or_else(|| PathBuf::from(id.as_str()));
            let api = args.connect()?;
            // The files first: a refused write must not leave a device whose key is lost.
            let files = CredentialFiles::create(&dir, csr_pem.is_none())?;
            let with_key = csr_pem.is_none();
            let req = mooring_api::CreateDevice {
                id: id.as_str().to_owned(),
                tags,
                csr_pem,
            };
            let created = call(api.create_device(&req).await)?;
            let written = match (with_key, created.private_key_pem.as_deref()) {
                (true, Some(key)) => files.write(&[key, &created.certificate_pem, &created.ca_pem]),
                (true, None) => Err(anyhow::anyhow!("the server returned no private key")),
                (false, _) => files.write(&[&created.certificate_pem, &created.ca_pem]),
            };
            written.with_context(|| {
                format!("device {id} was created, but its credentials were not saved; delete it (`mooring device delete {id}`) and create it again")
            })?;
            let names = if with_key {
                "device.crt, device.key, ca.crt"
            } else {
                "device.crt, ca.crt; the key stays where the CSR was made"
            };
            println!(
                "created device {id}; credentials in {}/ ({names})",
                dir.display()
            );
        }
        DeviceCommand::List {
            json,
            selector,
            output,
        } => {
            if let Some(sel) = &selector {
                Selector::parse(sel).map_err(|e| UsageError(format!("invalid selector: {e}")))?;
            }
            let api = args.connect()?;
            let devices = call(api.list_all_devices(selector.as_deref()).await)?;
            if json || output.json() {
                // The API's body, every page in one.
                print_json(&mooring_api::DeviceList {
                    devices,
                    next_cursor: None,
                })?;
            } else {
                let mut t = Table::new(&["ID", "ONLINE", "LAST SEEN", "CREATED", "TAGS"]);
                for d in &devices {
                    t.row(vec![
                        d.id.clone(),
                        if d.online { "yes" } else { "no" }.to_owned(),
                        last_seen_text(d),
                        rfc3339(d.created_at),
                        tags_text(&d.tags),
                    ]);
                }
                t.print();
            }
        }
        DeviceCommand::Health { id, output } => {
            return health::device_health(args, &id, output).await;
        }
        DeviceCommand::Show { id, output } => {
            let id = parse_id(&id)?;
            let api = args.connect()?;
            let d = call(api.get_device(id.as_str()).await)?;
            // `-o json` is the API's device body, as for every command; the table adds the
            // provisioning pipeline (`GET /devices/{id}/provisioning`).
            print_device(&d, output)?;
            if !output.json() {
                print_pipeline(&call(api.provisioning(id.as_str()).await)?);
            }
        }
        DeviceCommand::Install {
            id,
            location,
            notes,
            output,
        } => {
            let id = parse_id(&id)?;
            let req = mooring_api::RecordInstallation { location, notes };
            let d = call(args.connect()?.record_installation(id.as_str(), &req).await)?;
            print_device(&d, output)?;
        }
        DeviceCommand::Tag {
            id,
            tags,
            remove,
            output,
        } => {
            let id = parse_id(&id)?;
            let set = parse_tags(&tags, "tag")?;
            if set.is_empty() && remove.is_empty() {
                return usage("give key=value tags to set or --remove KEY");
            }
            let api = args.connect()?;
            let mut current = call(api.get_device(id.as_str()).await)?.tags;
            for k in &remove {
                current.remove(k);
            }
            current.extend(set);
            let d = call(api.set_tags(id.as_str(), &current).await)?;
            print_device(&d, output)?;
        }
        DeviceCommand::Attach {
            child,
            gateway,
            output,
        } => {
            let child = parse_id(&child)?;
            let gateway = parse_id(&gateway)?;
            let a = call(
                args.connect()?
                    .attach_gateway(child.as_str(), gateway.as_str())
                    .await,
            )?;
            if output.json() {
                print_json(&a)?;
            } else {
                println!("attached {} to gateway {}", a.child, a.gateway);
            }
        }
        DeviceCommand::Detach { child } => {
            let child = parse_id(&child)?;
            call(args.connect()?.detach_gateway(child.as_str()).await)?;
            println!("detached {child} from its gateway");
        }
        DeviceCommand::Children { gateway, output } => {
            let gateway = parse_id(&gateway)?;
            let api = args.connect()?;
            let mut params = mooring_api::ChildrenParams {
                limit: Some(1000),
                cursor: None,
            };
            let mut all = Vec::new();
            loop {
                let page = call(api.gateway_children(gateway.as_str(), &params).await)?;
                all.extend(page.children);
                match page.next_cursor {
                    Some(c) => params.cursor = Some(c),
                    None => break,
                }
            }
            if output.json() {
                print_json(&all)?;
            } else {
                let mut t = Table::new(&["CHILD", "ONLINE", "ATTACHED"]);
                for c in &all {
                    t.row(vec![
                        c.id.clone(),
                        c.online.to_string(),
                        rfc3339(c.attached_at),
                    ]);
                }
                print!("{}", t.render());
            }
        }
        DeviceCommand::LocalKey { id, output } => {
            let id = parse_id(&id)?;
            let k = call(args.connect()?.local_key(id.as_str()).await)?;
            if output.json() {
                print_json(&k)?;
            } else {
                println!("{}", k.key);
                eprintln!(
                    "for certificate {} (until {}); it changes when the certificate does",
                    k.cert_serial,
                    rfc3339(k.cert_not_after)
                );
            }
        }
        DeviceCommand::Delete { id } => {
            let id = parse_id(&id)?;
            call(args.connect()?.delete_device(id.as_str()).await)?;
            println!("deleted device {id}");
        }
        DeviceCommand::Revoke { id, reason } => {
            return certs::revoke_device(args, &id, reason).await;
        }
    }
    Ok(EXIT_OK)
}

fn command_id(id: &str) -> anyhow::Result<&str> {
    if mooring_proto::command::is_valid_command_id(id) {
        Ok(id)
    } else {
        usage(format!("invalid command id {id:?}"))
    }
}

fn print_command(c: &Command, out: OutputArgs) -> anyhow::Result<()> {
    if out.json() {
        return print_json(c);
    }
    let mut fields = vec![
        ("id", c.id.clone()),
        ("device", c.device_id.clone()),
        ("name", c.name.clone()),
        ("state", c.state.clone()),
        ("attempts", format!("{}/{}", c.attempts, c.max_attempts)),
        ("params", c.params.to_string()),
        ("created", rfc3339(c.created_at)),
        ("expires", rfc3339(c.expires_at)),
    ];
    if let Some(p) = &c.parent_id {
        fields.push(("fleet command", p.clone()));
    }
    if let Some(k) = &c.idempotency_key {
        fields.push(("idempotency key", k.clone()));
    }
    if let Some(r) = &c.result {
        fields.push(("result", format!("{} {}", r.status, r.output)));
    }
    let history: Vec<String> = c
        .history
        .iter()
        .map(|h| format!("{} {}", h.state, rfc3339(h.at)))
        .collect();
    fields.push(("history", history.join(", ")));
    print_fields(&fields);
    Ok(())
}

fn print_fleet_command(f: &FleetCommand, out: OutputArgs) -> anyhow::Result<()> {
    if out.json() {
        return print_json(f);
    }
    let states: Vec<String> = f
        .counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| format!("{s} {n}"))
        .collect();
    print_fields(&[
        ("id", f.id.clone()),
        ("selector", f.selector.clone()),
        ("name", f.name.clone()),
        ("params", f.params.to_string()),
        ("devices", f.total.to_string()),
        (
            "states",
            if states.is_empty() {
                "-".to_owned()
            } else {
                states.join(", ")
            },
        ),
        ("done", if f.done { "yes" } else { "no" }.to_owned()),
        ("created", rfc3339(f.created_at)),
        ("expires", rfc3339(f.expires_at)),
    ]);
    Ok(())
}

/// The exit status for a command someone waited on: 0 succeeded, 1 failed/expired/canceled,
/// 3 still running.
fn waited_exit(c: &Command) -> u8 {
    match c.state.as_str() {
        "succeeded" => EXIT_OK,
        _ if c.is_final() => EXIT_FAILED,
        _ => EXIT_NOT_FINAL,
    }
}

pub async fn command(args: ApiArgs, command: CommandCommand) -> anyhow::Result<u8> {
    match command {
        CommandCommand::Send {
            to,
            name,
            params,
            ttl_secs,
            max_attempts,
            result_timeout_secs,
            wait_ms,
            idempotency_key,
            output,
        } => {
            if !mooring_proto::command::is_valid_command_name(&name) {
                return usage(format!("invalid command name {name:?}"));
            }
            let params: serde_json::Value = match params {
                Some(p) => serde_json::from_str(&p)
                    .map_err(|e| UsageError(format!("--params is not valid JSON: {e}")))?,
                None => serde_json::Value::Object(serde_json::Map::new()),
            };
            let selector =
                Selector::parse(&to).map_err(|e| UsageError(format!("invalid --to: {e}")))?;
            let single = match selector.terms.as_slice() {
                [Term::Ids(ids)] if ids.len() == 1 && !to.starts_with("id:") => {
                    Some(ids[0].clone())
                }
                _ => None,
            };
            let api = args.connect()?;
            match single {
                Some(device) => {
                    let req = mooring_api::CreateCommand {
                        name,
                        params,
                        ttl_secs,
                        max_attempts,
                        idempotency_key,
                        result_timeout_secs,
                    };
                    let (_, c) = call(api.create_command(device.as_str(), &req, wait_ms).await)?;
                    print_command(&c, output)?;
                    if wait_ms.is_some() {
                        return Ok(waited_exit(&c));
                    }
                }
                None => {
                    if wait_ms.is_some() || idempotency_key.is_some() {
                        return usage(
                            "--wait-ms and --idempotency-key apply to one device; follow a fleet command with `mooring command show <id>`",
                        );
                    }
                    let req = mooring_api::CreateFleetCommand {
                        selector: to,
                        name,
                        params,
                        ttl_secs,
                        max_attempts,
                        result_timeout_secs,
                    };
                    let f = call(api.create_fleet_command(&req).await)?;
                    print_fleet_command(&f, output)?;
                }
            }
        }
        CommandCommand::Show {
            id,
            wait_ms,
            output,
        } => {
            let id = command_id(&id)?;
            let api = args.connect()?;
            match call(api.get_any_command(id).await)? {
                AnyCommand::Fleet(_) if wait_ms.is_some() => {
                    return usage(format!(
                        "--wait-ms applies to one device's command; {id} is a fleet command (without --wait-ms, `done` says whether it has ended)"
                    ));
                }
                AnyCommand::Fleet(f) => print_fleet_command(&f, output)?,
                AnyCommand::Device(c) => {
                    let c = match wait_ms {
                        Some(w) if !c.is_final() => {
                            call(api.get_command(&c.device_id, id, Some(w)).await)?
                        }
                        _ => c,
                    };
                    print_command(&c, output)?;
                    if wait_ms.is_some() {
                        return Ok(waited_exit(&c));
                    }
                }
            }
        }
        CommandCommand::List {
            device,
            state,
            output,
        } => {
            let device = parse_id(&device)?;
            let api = args.connect()?;
            let params = mooring_api::CommandListParams {
                state,
                limit: Some(mooring_api::COMMAND_PAGE_LEN_MAX),
                cursor: None,
            };
            let page = call(api.list_commands(device.as_str(), &params).await)?;
            if output.json() {
                print_json(&page)?;
            } else {
                let mut t = Table::new(&["ID", "NAME", "STATE", "ATTEMPTS", "CREATED", "ORIGIN"]);
                for c in &page.commands {
                    t.row(vec![
                        c.id.clone(),
                        c.name.clone(),
                        c.state.clone(),
                        format!("{}/{}", c.attempts, c.max_attempts),
                        rfc3339(c.created_at),
                        // Executed on the device's local API: its time, then when it synced.
                        match c.synced_at {
                            Some(at) => format!("local (synced {})", rfc3339(at)),
                            None => c.origin.clone(),
                        },
                    ]);
                }
                t.print();
                if page.next_cursor.is_some() {
                    eprintln!(
                        "(the {} newest shown; filter with --state)",
                        page.commands.len()
                    );
                }
            }
        }
        CommandCommand::Cancel { device, id, output } => {
            let device = parse_id(&device)?;
            let id = command_id(&id)?;
            let c = call(args.connect()?.cancel_command(device.as_str(), id).await)?;
            print_command(&c, output)?;
        }
    }
    Ok(EXIT_OK)
}

const ROLES: [&str; 5] = ["admin", "operator", "installer", "viewer", "service"];

fn check_role(role: &str) -> anyhow::Result<()> {
    if ROLES.contains(&role) {
        Ok(())
    } else {
        usage(format!(
            "--role {role:?} must be one of {}",
            ROLES.join(", ")
        ))
    }
}

/// A duration like `90d`, `12h`, `30m`, `3600s` or `500ms`, in milliseconds.
pub fn parse_duration_ms(text: &str) -> anyhow::Result<u64> {
    mooring_api::parse_duration_ms(text).or_else(usage)
}

pub async fn claim(args: ApiArgs, command: ClaimCommand) -> anyhow::Result<u8> {
    match command {
        ClaimCommand::Create {
            count,
            ttl,
            tags,
            assign_ids,
            name,
            output,
        } => {
            let req = mooring_api::CreateClaim {
                count: Some(count),
                ttl_ms: Some(parse_duration_ms(&ttl)?),
                ttl: None,
                tags: parse_tags(&tags, "--tag")?,
                assign_ids,
                name,
            };
            let c = call(args.connect()?.create_claim(&req).await)?;
            if output.json() {
                print_json(&c)?;
            } else {
                println!("{}", c.token);
                eprintln!(
                    "claim {}: {} use{}, expires {}{}",
                    c.claim.id,
                    c.claim.uses_max,
                    if c.claim.uses_max == 1 { "" } else { "s" },
                    rfc3339(c.claim.expires_at),
                    if c.claim.assign_ids {
                        ", the server assigns device ids"
                    } else {
                        ""
                    }
                );
            }
        }
        ClaimCommand::List { output } => {
            let all = call(args.connect()?.list_all_claims().await)?;
            if output.json() {
                print_json(&all)?;
            } else {
                let mut t = Table::new(&[
                    "ID",
                    "NAME",
                    "STATE",
                    "USES",
                    "TAGS",
                    "IDS",
                    "EXPIRES",
                    "CREATED BY",
                ]);
                for c in &all {
                    t.row(vec![
                        c.id.clone(),
                        c.name.clone().unwrap_or_else(|| "-".into()),
                        c.state.clone(),
                        format!("{}/{}", c.uses, c.uses_max),
                        tags_text(&c.tags),
                        if c.assign_ids { "assigned" } else { "proposed" }.into(),
                        rfc3339(c.expires_at),
                        c.created_by.clone(),
                    ]);
                }
                t.print();
            }
        }
        ClaimCommand::Revoke { id } => {
            call(args.connect()?.revoke_claim(&id).await)?;
            eprintln!("claim {id} revoked");
        }
    }
    Ok(EXIT_OK)
}

pub async fn token(args: ApiArgs, command: TokenCommand) -> anyhow::Result<u8> {
    match command {
        TokenCommand::Create {
            name,
            name_flag,
            role,
            expires,
            scope,
        } => {
            check_role(&role)?;
            let expires_in_ms = expires.as_deref().map(parse_duration_ms).transpose()?;
            let name = name.or(name_flag).unwrap_or_default();
            let req = mooring_api::CreateToken {
                name,
                role,
                scope,
                expires_in_ms,
            };
            let t = call(args.connect()?.create_token(&req).await)?;
            println!("{}", t.token);
        }
        TokenCommand::List { output } => {
            let all = call(args.connect()?.list_all_tokens().await)?;
            if output.json() {
                print_json(&all)?;
            } else {
                let mut t = Table::new(&[
                    "ID",
                    "NAME",
                    "ROLE",
                    "SCOPE",
                    "EXPIRES",
                    "LAST USED",
                    "CREATED",
                ]);
                for k in &all {
                    t.row(vec![
                        k.id.clone(),
                        k.name.clone(),
                        k.role.clone(),
                        k.scope.clone().unwrap_or_else(|| "-".into()),
                        k.expires_at.map_or_else(|| "never".into(), rfc3339),
                        k.last_used_at.map_or_else(|| "never".into(), ago),
                        rfc3339(k.created_at),
                    ]);
                }
                t.print();
            }
        }
        TokenCommand::Revoke { id } => {
            call(args.connect()?.revoke_token(&id).await)?;
            eprintln!("token {id} revoked");
        }
        TokenCommand::RotateAdmin => {
            let t = call(args.connect()?.rotate_admin_token().await)?;
            println!("{}", t.token);
            eprintln!("the previous admin token is revoked; the server rewrote its admin.token");
        }
    }
    Ok(EXIT_OK)
}

pub async fn user(args: ApiArgs, command: UserCommand) -> anyhow::Result<u8> {
    let client = args.connect()?;
    let update = |role: Option<String>, scope: Option<Option<String>>, disabled: Option<bool>| {
        mooring_api::UpdateUser {
            role,
            scope,
            disabled,
        }
    };
    match command {
        UserCommand::Create {
            email,
            role,
            scope,
            password_stdin,
        } => {
            check_role(&role)?;
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .context("reading the password from stdin")?;
                let p = line.trim_end_matches(['\r', '\n']).to_owned();
                if p.is_empty() {
                    return usage("--password-stdin: standard input held no password");
                }
                Some(p)
            } else {
                None
            };
            let created = call(
                client
                    .create_user(&mooring_api::CreateUser {
                        email,
                        role,
                        scope,
                        password,
                    })
                    .await,
            )?;
            match created.password_link {
                Some(link) => {
                    eprintln!(
                        "user {} created; send them this one-time link to set a password:",
                        created.user.email
                    );
                    println!("{link}");
                }
                None => eprintln!("user {} created", created.user.email),
            }
        }
        UserCommand::List { output } => {
            let all = call(client.list_all_users().await)?;
            if output.json() {
                print_json(&all)?;
            } else {
                let mut t = Table::new(&["EMAIL", "ROLE", "SCOPE", "STATE", "LOGIN", "CREATED"]);
                for u in &all {
                    t.row(vec![
                        u.email.clone(),
                        u.role.clone(),
                        u.scope.clone().unwrap_or_else(|| "-".into()),
                        if u.disabled { "disabled" } else { "active" }.into(),
                        match (u.has_password, u.oidc) {
                            (true, true) => "password, oidc",
                            (true, false) => "password",
                            (false, true) => "oidc",
                            (false, false) => "link pending",
                        }
                        .into(),
                        rfc3339(u.created_at),
                    ]);
                }
                t.print();
            }
        }
        UserCommand::Disable { user } => {
            call(
                client
                    .update_user(&user, &update(None, None, Some(true)))
                    .await,
            )?;
            eprintln!("user {user} disabled; its sessions ended");
        }
        UserCommand::Enable { user } => {
            call(
                client
                    .update_user(&user, &update(None, None, Some(false)))
                    .await,
            )?;
            eprintln!("user {user} enabled");
        }
        UserCommand::Delete { user } => {
            call(client.delete_user(&user).await)?;
            eprintln!("user {user} deleted");
        }
        UserCommand::SetRole { user, role } => {
            check_role(&role)?;
            call(
                client
                    .update_user(&user, &update(Some(role.clone()), None, None))
                    .await,
            )?;
            eprintln!("user {user} is now {role}; its sessions ended");
        }
        UserCommand::SetScope { user, scope, clear } => {
            let scope = if clear { None } else { scope };
            call(
                client
                    .update_user(&user, &update(None, Some(scope), None))
                    .await,
            )?;
            eprintln!("user {user}'s scope changed; its sessions ended");
        }
        UserCommand::PasswordLink { user } => {
            let l = call(client.password_link(&user).await)?;
            println!("{}", l.password_link);
        }
    }
    Ok(EXIT_OK)
}

/// `mooring audit` filters.
#[derive(Args)]
pub struct AuditArgs {
    /// Only this actor, e.g. user:ann@example.com or "token:grafana (tok_...)".
    #[arg(long)]
    actor: Option<String>,
    /// Only this action, or a prefix ending in "." (device.).
    #[arg(long)]
    action: Option<String>,
    /// Only targets starting with this path, e.g. /api/v1/devices/lock-1.
    #[arg(long)]
    target: Option<String>,
    /// Only entries from the last DURATION (e.g. 24h, 7d).
    #[arg(long, value_name = "DURATION")]
    since: Option<String>,
    /// At most this many entries, newest first.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    #[command(flatten)]
    output: OutputArgs,
}

pub async fn audit(args: ApiArgs, a: AuditArgs) -> anyhow::Result<u8> {
    let since = match a.since.as_deref() {
        None => None,
        Some(d) => Some(crate::output::now_ms().saturating_sub(parse_duration_ms(d)?)),
    };
    if a.limit == 0 || a.limit > 1000 {
        return usage("--limit must be between 1 and 1000");
    }
    let params = mooring_api::AuditParams {
        actor: a.actor,
        action: a.action,
        target: a.target,
        since,
        until: None,
        limit: Some(a.limit),
        cursor: None,
    };
    let page = call(args.connect()?.audit(&params).await)?;
    if a.output.json() {
        print_json(&page.entries)?;
    } else {
        let mut t = Table::new(&["TIME", "ACTOR", "ACTION", "TARGET", "STATUS", "SOURCE"]);
        for e in &page.entries {
            t.row(vec![
                rfc3339(e.at),
                e.actor.clone(),
                e.action.clone(),
                e.target.clone(),
                if e.detail.is_empty() {
                    e.status.to_string()
                } else {
                    format!("{} {}", e.status, e.detail)
                },
                e.source.clone(),
            ]);
        }
        t.print();
    }
    Ok(EXIT_OK)
}

/// `mooring events`.
#[derive(Args)]
pub struct EventsArgs {
    /// Only events about devices matching this selector, e.g. `tag:site=berlin`.
    #[arg(long)]
    selector: Option<String>,
    /// Resume after this event id (a previous run's `id`, printed with --with-ids).
    #[arg(long)]
    last_event_id: Option<String>,
    /// Exit after this many events (resets included).
    #[arg(long)]
    count: Option<u64>,
    /// Print `{"id": <cursor>, "event": <event>}` instead of the bare event.
    #[arg(long)]
    with_ids: bool,
}

/// Longest pause between reconnects of `mooring events`.
const EVENTS_RECONNECT_MAX_MS: u64 = 10_000;

/// Prints events as JSON lines until `--count` or the server refuses; a broken stream is
/// resumed from its last id (a reset says when that could not be done without a gap).
pub async fn events(api: ApiArgs, args: EventsArgs) -> anyhow::Result<u8> {
    use std::io::Write;
    if let Some(s) = &args.selector {
        Selector::parse(s).map_err(|e| UsageError(format!("--selector: {e}")))?;
    }
    let client = api.connect()?;
    let params = mooring_api::EventsParams {
        selector: args.selector.clone(),
    };
    let mut last = args.last_event_id.clone();
    let mut printed = 0u64;
    let mut backoff_ms = 500;
    loop {
        let mut stream = match client.events(&params, last.as_deref()).await {
            Ok(s) => s,
            Err(e @ (mooring_api::Error::Transport { .. } | mooring_api::Error::Stream(_)))
                if printed > 0 || last.is_some() =>
            {
                eprintln!("events: {e}; reconnecting");
                tokio::time::sleep(std::time::Duration::from_millis(backoff_ms)).await;
                backoff_ms = (backoff_ms * 2).min(EVENTS_RECONNECT_MAX_MS);
                continue;
            }
            Err(e) => {
                call::<()>(Err(e))?;
                return Ok(EXIT_FAILED);
            }
        };
        loop {
            let item = match stream.next().await {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(e) => {
                    eprintln!("events: {e}; resuming");
                    break;
                }
            };
            backoff_ms = 500;
            let (id, value) = match item {
                mooring_api::StreamItem::Event { id, event } => (id, serde_json::to_value(event)?),
                mooring_api::StreamItem::Reset { id, reset } => (
                    id,
                    serde_json::json!({"kind": "reset", "reason": reset.reason}),
                ),
            };
            let line = if args.with_ids {
                serde_json::json!({"id": id, "event": value})
            } else {
                value
            };
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}")?;
            out.flush()?;
            printed += 1;
            if args.count.is_some_and(|n| printed >= n) {
                return Ok(EXIT_OK);
            }
        }
        last = stream.last_event_id().map(str::to_owned).or(last);
        tokio::time::sleep(std::time::Duration::from_millis(backoff_ms)).await;
    }
}

/// `mooring fleet summary`.
pub async fn fleet_summary(
    args: ApiArgs,
    selector: Option<String>,
    output: OutputArgs,
) -> anyhow::Result<u8> {
    let params = mooring_api::FleetSummaryParams { selector };
    let s = call(args.connect()?.fleet_summary(&params).await)?;
    if output.json() {
        print_json(&s)?;
        return Ok(EXIT_OK);
    }
    print_fields(&[
        (
            "selector",
            s.selector.clone().unwrap_or_else(|| "(all)".into()),
        ),
        ("devices", s.devices.to_string()),
        ("online", s.online.to_string()),
    ]);
    println!();
    let mut t = Table::new(&["VERSION", "DEVICES"]);
    for v in &s.versions {
        t.row(vec![
            v.version.clone().unwrap_or_else(|| "(none)".into()),
            v.devices.to_string(),
        ]);
    }
    if s.versions_other > 0 {
        t.row(vec!["(other)".into(), s.versions_other.to_string()]);
    }
    t.print();
    Ok(EXIT_OK)
}

/// `mooring fleet funnel`.
pub async fn fleet_funnel(
    args: ApiArgs,
    selector: Option<String>,
    output: OutputArgs,
) -> anyhow::Result<u8> {
    let params = mooring_api::FunnelParams { selector };
    let f = call(args.connect()?.provisioning_funnel(&params).await)?;
    if output.json() {
        print_json(&f)?;
        return Ok(EXIT_OK);
    }
    let mut t = Table::new(&["STEP", "DEVICES"]);
    for s in &f.stages {
        t.row(vec![s.step.clone(), s.devices.to_string()]);
    }
    t.print();
    Ok(EXIT_OK)
}

/// `mooring fleet history`.
pub async fn fleet_history(args: ApiArgs, since: &str, output: OutputArgs) -> anyhow::Result<u8> {
    let window_ms = parse_duration_ms(since)?;
    let now_ms = crate::output::now_ms();
    let params = mooring_api::FleetHistoryParams {
        from_ms: Some(now_ms.saturating_sub(window_ms)),
        to_ms: Some(now_ms.saturating_add(1)),
    };
    let h = call(args.connect()?.fleet_history(&params).await)?;
    if output.json() {
        print_json(&h)?;
        return Ok(EXIT_OK);
    }
    let step_secs = (h.step_ms as f64 / 1000.0).max(0.001);
    let mut t = Table::new(&[
        "TIME", "DEVICES", "ONLINE", "POINTS", "POINTS/S", "MESSAGES",
    ]);
    for s in &h.samples {
        t.row(vec![
            rfc3339(s.ts_ms),
            s.devices.to_string(),
            s.online.to_string(),
            s.points.to_string(),
            format!("{:.1}", s.points as f64 / step_secs),
            s.messages.to_string(),
        ]);
    }
    t.print();
    Ok(EXIT_OK)
}

fn job_progress(j: &Job) -> String {
    let total = j.total.map_or_else(|| "?".to_owned(), |t| t.to_string());
    let mut p = format!("{}/{total} done, {} failed", j.done, j.failed);
    if let Some(points) = j.result.as_ref().and_then(|r| r["points"].as_u64()) {
        p.push_str(&format!(", {points} points"));
    }
    if j.attempts > 0 {
        p.push_str(&format!(", attempt {} failed", j.attempts));
    }
    p
}

fn print_job(j: &Job, out: OutputArgs) -> anyhow::Result<()> {
    if out.json() {
        return print_json(j);
    }
    let mut fields = vec![
        ("id", j.id.clone()),
        ("action", j.action.clone()),
        ("selector", j.selector.clone()),
        ("params", j.params.to_string()),
        ("state", j.state.clone()),
        ("progress", job_progress(j)),
        (
            "created",
            format!("{} by {}", rfc3339(j.created_ms), j.created_by),
        ),
    ];
    if let Some(c) = &j.command_id {
        fields.push(("command", format!("{c} (mooring command show {c})")));
    }
    if let Some(f) = j.finished_ms {
        fields.push(("finished", rfc3339(f)));
    }
    if let Some(w) = &j.worker {
        fields.push(("worker", w.clone()));
    }
    if let Some(e) = &j.last_error {
        fields.push(("last error", format!("{e} ({} attempts)", j.attempts)));
    }
    if let Some(r) = &j.result {
        let bytes = r["bytes"].as_u64().unwrap_or(0);
        let fetch = if j.state == "succeeded" {
            format!(" (mooring job result {} -o FILE)", j.id)
        } else {
            String::new()
        };
        fields.push(("result", format!("{bytes} bytes{fetch}")));
    }
    for e in &j.errors {
        let what = if e.device_id.is_empty() {
            "job".to_owned()
        } else {
            e.device_id.clone()
        };
        fields.push(("error", format!("{what}: {}", e.message)));
    }
    print_fields(&fields);
    Ok(())
}

/// How often `--wait` asks for a job's progress.
const JOB_POLL_MS: u64 = 500;

/// Polls the job until it finishes, printing its progress to stderr when it changes.
async fn wait_job(api: &mooring_api::Client, mut job: Job) -> anyhow::Result<Job> {
    let mut shown = String::new();
    loop {
        let line = format!("{} {}: {}", job.id, job.state, job_progress(&job));
        if line != shown {
            eprintln!("{line}");
            shown = line;
        }
        if job.is_finished() {
            return Ok(job);
        }
        tokio::time::sleep(std::time::Duration::from_millis(JOB_POLL_MS)).await;
        job = call(api.get_job(&job.id).await)?;
    }
}

/// 0 if the job succeeded on every device, else 1.
fn job_exit(j: &Job) -> u8 {
    if j.state == "succeeded" && j.failed == 0 {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

fn job_id(id: &str) -> anyhow::Result<&str> {
    if !id.starts_with("job_")
        || id.len() > 64
        || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return usage(format!("{id:?} is not a job id (job_...)"));
    }
    Ok(id)
}

pub async fn job(args: ApiArgs, command: JobCommand) -> anyhow::Result<u8> {
    match command {
        JobCommand::Create {
            selector,
            tags,
            untag,
            command,
            params,
            ttl_ms,
            delete,
            wait,
            output,
        } => {
            Selector::parse(&selector)
                .map_err(|e| UsageError(format!("invalid --selector: {e}")))?;
            let mut req = mooring_api::CreateJob {
                selector,
                ..Default::default()
            };
            if !tags.is_empty() {
                req.action = "tag".to_owned();
                req.tags = Some(parse_tags(&tags, "--tag")?);
            } else if !untag.is_empty() {
                req.action = "untag".to_owned();
                req.keys = Some(untag);
            } else if let Some(name) = command {
                if !mooring_proto::command::is_valid_command_name(&name) {
                    return usage(format!("invalid command name {name:?}"));
                }
                let params: serde_json::Value = match params {
                    Some(p) => serde_json::from_str(&p)
                        .map_err(|e| UsageError(format!("--params is not valid JSON: {e}")))?,
                    None => serde_json::Value::Object(serde_json::Map::new()),
                };
                req.action = "command".to_owned();
                req.command = Some(mooring_api::JobCommand {
                    name,
                    params,
                    ttl_ms,
                });
            } else if delete {
                req.action = "delete".to_owned();
            } else {
                return usage("one of --tag, --untag, --command or --delete is needed");
            }
            let api = args.connect()?;
            let job = call(api.create_job(&req).await)?;
            if !wait {
                print_job(&job, output)?;
                return Ok(EXIT_OK);
            }
            let job = wait_job(&api, job).await?;
            print_job(&job, output)?;
            Ok(job_exit(&job))
        }
        JobCommand::Result { id, out } => {
            let id = job_id(&id)?;
            reports::job_result(args, id, out.as_deref()).await
        }
        JobCommand::List { state, output } => {
            let api = args.connect()?;
            let page = call(
                api.list_jobs(&mooring_api::JobListParams {
                    limit: Some(200),
                    cursor: None,
                    state,
                })
                .await,
            )?;
            if output.json() {
                print_json(&page)?;
            } else {
                let mut t =
                    Table::new(&["ID", "ACTION", "STATE", "PROGRESS", "SELECTOR", "CREATED"]);
                for j in &page.jobs {
                    t.row(vec![
                        j.id.clone(),
                        j.action.clone(),
                        j.state.clone(),
                        job_progress(j),
                        j.selector.clone(),
                        ago(j.created_ms),
                    ]);
                }
                t.print();
            }
            Ok(EXIT_OK)
        }
        JobCommand::Show { id, wait, output } => {
            let id = job_id(&id)?;
            let api = args.connect()?;
            let job = call(api.get_job(id).await)?;
            if !wait {
                print_job(&job, output)?;
                return Ok(EXIT_OK);
            }
            let job = wait_job(&api, job).await?;
            print_job(&job, output)?;
            Ok(job_exit(&job))
        }
        JobCommand::Cancel { id, output } => {
            let id = job_id(&id)?;
            let api = args.connect()?;
            let job = call(api.cancel_job(id).await)?;
            print_job(&job, output)?;
            Ok(EXIT_OK)
        }
    }
}
