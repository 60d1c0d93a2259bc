//! `mooring rule ...` and `mooring alert ...`: rules and the alerts they raise (docs/health.md).

use super::{call, ApiArgs, EXIT_OK};
use crate::output::{ago, print_fields, print_json, rfc3339, OutputArgs, Table};
use clap::Subcommand;
use mooring_api::{Alert, AlertListParams, CreateRule, Rule, UpdateRule};

#[derive(Subcommand)]
pub enum RuleCommand {
    /// Create a rule: `mooring rule create --name low-battery --when "battery < 15 for 10m"
    /// --selector tag:hw=rev-b --then alert:warning,command:diagnostics`.
    Create {
        /// Unique name: letters, digits, '.', '_', '-' (at most 64).
        #[arg(long)]
        name: String,
        /// The condition, e.g. 'battery < 15 for 10m', 'rate(battery, 1h) < -5',
        /// 'no telemetry for 30m', 'on update_rolled_back', 'count(disconnected, 1h) > 3'.
        #[arg(long)]
        when: String,
        /// The devices it watches, e.g. 'tag:hw=rev-b' [default: every device you may see].
        #[arg(long)]
        selector: Option<String>,
        /// The actions, comma-separated: alert:info|warning|critical, command:<name>, tag:<k>=<v>,
        /// webhook:<name>, nats:<subject>, job:<playbook>.
        #[arg(long)]
        then: String,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List the rules, by name.
    List {
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show one rule (id or name).
    Show {
        /// Rule id (`rule_...`) or name.
        rule: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Enable a rule (id or name).
    Enable {
        /// Rule id (`rule_...`) or name.
        rule: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Disable a rule (id or name): it stops acting; its open alerts stay open.
    Disable {
        /// Rule id (`rule_...`) or name.
        rule: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Delete a rule (id or name); its open alerts are resolved.
    Delete {
        /// Rule id (`rule_...`) or name.
        rule: String,
    },
}

#[derive(Subcommand)]
pub enum AlertCommand {
    /// List alerts, newest first (open ones by default).
    List {
        /// firing, acknowledged, resolved, open or all.
        #[arg(long, default_value = "open")]
        state: String,
        /// Only this rule's (id).
        #[arg(long)]
        rule: Option<String>,
        /// Only this device's.
        #[arg(long)]
        device: Option<String>,
        /// At most this many (1-500).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Show one alert.
    Show {
        /// Alert id (`alert_...`, as `alert list` shows it).
        id: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Acknowledge an alert: someone is on it (it resolves when its condition clears).
    Ack {
        /// Alert id (`alert_...`, as `alert list` shows it).
        id: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Resolve an alert by hand.
    Resolve {
        /// Alert id (`alert_...`, as `alert list` shows it).
        id: String,
        #[command(flatten)]
        output: OutputArgs,
    },
}

fn print_rule(r: &Rule, output: &OutputArgs) -> anyhow::Result<()> {
    if output.json() {
        return print_json(r);
    }
    let mut fields = vec![
        ("id", r.id.clone()),
        ("name", r.name.clone()),
        ("when", r.when.clone()),
        (
            "selector",
            r.selector.clone().unwrap_or_else(|| "(all)".into()),
        ),
        ("then", r.then.clone()),
        ("status", r.status.clone()),
    ];
    if let Some(reason) = &r.status_reason {
        fields.push(("reason", reason.clone()));
    }
    if let Some(scope) = &r.scope {
        fields.push(("scope", scope.clone()));
    }
    fields.push((
        "created",
        format!("{} by {}", rfc3339(r.created_at), r.created_by),
    ));
    print_fields(&fields);
    Ok(())
}

fn print_alert(a: &Alert, output: &OutputArgs) -> anyhow::Result<()> {
    if output.json() {
        return print_json(a);
    }
    let mut fields = vec![
        ("id", a.id.clone()),
        ("rule", a.rule_name.clone()),
        ("device", a.device_id.clone().unwrap_or_else(|| "-".into())),
        ("severity", a.severity.clone()),
        ("state", a.state.clone()),
        ("detail", a.detail.clone()),
        ("count", a.count.to_string()),
        ("first fired", rfc3339(a.first_fired_at)),
        (
            "last fired",
            format!("{} ({})", rfc3339(a.last_fired_at), ago(a.last_fired_at)),
        ),
    ];
    if let (Some(at), Some(by)) = (a.acknowledged_at, &a.acknowledged_by) {
        fields.push(("acknowledged", format!("{} by {by}", rfc3339(at))));
    }
    if let (Some(at), Some(by)) = (a.resolved_at, &a.resolved_by) {
        fields.push(("resolved", format!("{} by {by}", rfc3339(at))));
    }
    print_fields(&fields);
    Ok(())
}

/// A rule's id from its id or name.
async fn rule_id(api: &mooring_api::Client, rule: &str) -> anyhow::Result<String> {
    if rule.starts_with("rule_") {
        return Ok(rule.to_owned());
    }
    let list = call(api.list_rules().await)?;
    list.rules
        .into_iter()
        .find(|r| r.name == rule)
        .map(|r| r.id)
        .ok_or_else(|| anyhow::anyhow!("no rule named {rule}"))
}

pub async fn rule(args: ApiArgs, command: RuleCommand) -> anyhow::Result<u8> {
    let api = args.connect()?;
    match command {
        RuleCommand::Create {
            name,
            when,
            selector,
            then,
            disabled,
            output,
        } => {
            let req = CreateRule {
                name,
                when,
                selector,
                then,
                enabled: Some(!disabled),
            };
            print_rule(&call(api.create_rule(&req).await)?, &output)?;
        }
        RuleCommand::List { output } => {
            let list = call(api.list_rules().await)?;
            if output.json() {
                print_json(&list)?;
                return Ok(EXIT_OK);
            }
            let mut t = Table::new(&["NAME", "WHEN", "SELECTOR", "THEN", "STATUS"]);
            for r in &list.rules {
                t.row(vec![
                    r.name.clone(),
                    r.when.clone(),
                    r.selector.clone().unwrap_or_else(|| "(all)".into()),
                    r.then.clone(),
                    r.status.clone(),
                ]);
            }
            t.print();
        }
        RuleCommand::Show { rule, output } => {
            let id = rule_id(&api, &rule).await?;
            print_rule(&call(api.get_rule(&id).await)?, &output)?;
        }
        RuleCommand::Enable { rule, output } => {
            let id = rule_id(&api, &rule).await?;
            let r = call(api.update_rule(&id, &UpdateRule { enabled: true }).await)?;
            print_rule(&r, &output)?;
        }
        RuleCommand::Disable { rule, output } => {
            let id = rule_id(&api, &rule).await?;
            let r = call(api.update_rule(&id, &UpdateRule { enabled: false }).await)?;
            print_rule(&r, &output)?;
        }
        RuleCommand::Delete { rule } => {
            let id = rule_id(&api, &rule).await?;
            call(api.delete_rule(&id).await)?;
            println!("deleted rule {rule}");
        }
    }
    Ok(EXIT_OK)
}

pub async fn alert(args: ApiArgs, command: AlertCommand) -> anyhow::Result<u8> {
    let api = args.connect()?;
    match command {
        AlertCommand::List {
            state,
            rule,
            device,
            limit,
            output,
        } => {
            let params = AlertListParams {
                state: (state != "all").then_some(state),
                rule_id: rule,
                device_id: device,
                limit: Some(limit),
                cursor: None,
            };
            let list = call(api.list_alerts(&params).await)?;
            if output.json() {
                print_json(&list)?;
                return Ok(EXIT_OK);
            }
            let mut t = Table::new(&[
                "ID",
                "SEVERITY",
                "STATE",
                "RULE",
                "DEVICE",
                "COUNT",
                "LAST FIRED",
                "DETAIL",
            ]);
            for a in &list.alerts {
                t.row(vec![
                    a.id.clone(),
                    a.severity.clone(),
                    a.state.clone(),
                    a.rule_name.clone(),
                    a.device_id.clone().unwrap_or_else(|| "-".into()),
                    a.count.to_string(),
                    ago(a.last_fired_at),
                    a.detail.clone(),
                ]);
            }
            t.print();
        }
        AlertCommand::Show { id, output } => {
            print_alert(&call(api.get_alert(&id).await)?, &output)?;
        }
        AlertCommand::Ack { id, output } => {
            print_alert(&call(api.acknowledge_alert(&id).await)?, &output)?;
        }
        AlertCommand::Resolve { id, output } => {
            print_alert(&call(api.resolve_alert(&id).await)?, &output)?;
        }
    }
    Ok(EXIT_OK)
}
