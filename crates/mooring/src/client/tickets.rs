//! `mooring ticket ...`: the field-service tickets playbooks open (docs/health.md#playbooks).

use super::{call, ApiArgs, EXIT_OK};
use crate::output::{ago, print_fields, print_json, rfc3339, OutputArgs, Table};
use clap::Subcommand;
use mooring_api::{Ticket, TicketListParams};

#[derive(Subcommand)]
pub enum TicketCommand {
    /// List tickets, newest first (open ones by default).
    List {
        /// open, closed or all.
        #[arg(long, default_value = "open")]
        state: String,
        /// Only this playbook's.
        #[arg(long)]
        playbook: Option<String>,
        /// Only the ticket of this alert.
        #[arg(long)]
        alert: Option<String>,
        /// At most this many (1-100).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show one ticket: its devices, their sites and installations, and the parts to bring.
    Show {
        /// Ticket id (`ticket_...`, as `ticket list` shows it).
        id: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Close a ticket: the visit is done.
    Close {
        /// Ticket id (`ticket_...`, as `ticket list` shows it).
        id: String,
        #[command(flatten)]
        output: OutputArgs,
    },
}

fn parts_line(t: &Ticket) -> String {
    if t.parts.is_empty() {
        return "-".to_owned();
    }
    t.parts
        .iter()
        .map(|(p, n)| format!("{p} ×{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_ticket(t: &Ticket, output: &OutputArgs) -> anyhow::Result<()> {
    if output.json() {
        return print_json(t);
    }
    let mut fields = vec![
        ("id", t.id.clone()),
        ("title", t.title.clone()),
        ("state", t.state.clone()),
        ("playbook", t.playbook.clone()),
        ("alert", t.alert_id.clone().unwrap_or_else(|| "-".into())),
        (
            "opened",
            format!("{} ({})", rfc3339(t.created_at), ago(t.created_at)),
        ),
    ];
    if let (Some(at), Some(by)) = (t.closed_at, &t.closed_by) {
        fields.push(("closed", format!("{} by {by}", rfc3339(at))));
    }
    if let Some(c) = &t.cohort {
        fields.push(("cohort", c.clone()));
    }
    fields.push((
        "devices",
        format!(
            "{} listed, {} affected of {}",
            t.devices.len(),
            t.devices_affected,
            t.devices_total
        ),
    ));
    fields.push(("parts", parts_line(t)));
    fields.push(("steps", t.steps.join("; ")));
    print_fields(&fields);
    println!();
    let signal = t
        .signal
        .clone()
        .unwrap_or_else(|| "VALUE".into())
        .to_uppercase();
    let mut table = Table::new(&["DEVICE", "SITE", &signal, "INSTALLED", "PARTS"]);
    for d in &t.devices {
        table.row(vec![
            d.device_id.clone(),
            d.site.clone().unwrap_or_else(|| "-".into()),
            d.value.map_or_else(|| "-".into(), |v| format!("{v:.1}")),
            d.installation
                .as_ref()
                .map_or_else(|| "-".into(), |i| format!("{} by {}", i.location, i.by)),
            if d.parts.is_empty() {
                "-".into()
            } else {
                d.parts.join(", ")
            },
        ]);
    }
    table.print();
    Ok(())
}

pub async fn ticket(args: ApiArgs, command: TicketCommand) -> anyhow::Result<u8> {
    let api = args.connect()?;
    match command {
        TicketCommand::List {
            state,
            playbook,
            alert,
            limit,
            output,
        } => {
            let params = TicketListParams {
                state: (state != "all").then_some(state),
                playbook,
                alert_id: alert,
                limit: Some(limit),
                cursor: None,
            };
            let list = call(api.list_tickets(&params).await)?;
            if output.json() {
                print_json(&list)?;
                return Ok(EXIT_OK);
            }
            let mut t = Table::new(&[
                "ID", "STATE", "PLAYBOOK", "DEVICES", "OPENED", "PARTS", "TITLE",
            ]);
            for k in &list.tickets {
                t.row(vec![
                    k.id.clone(),
                    k.state.clone(),
                    k.playbook.clone(),
                    format!("{}/{}", k.devices.len(), k.devices_total),
                    ago(k.created_at),
                    parts_line(k),
                    k.title.clone(),
                ]);
            }
            t.print();
        }
        TicketCommand::Show { id, output } => {
            print_ticket(&call(api.get_ticket(&id).await)?, &output)?;
        }
        TicketCommand::Close { id, output } => {
            print_ticket(&call(api.close_ticket(&id).await)?, &output)?;
        }
    }
    Ok(EXIT_OK)
}
