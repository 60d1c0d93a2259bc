//! `mooring rollout ...`: staged rollouts gated on fleet health (docs/ota.md#rollouts).

use super::{call, usage, ApiArgs, EXIT_FAILED, EXIT_OK};
use crate::output::{ago, print_json, rfc3339, OutputArgs, Table};
use clap::Subcommand;
use mooring_api::{CreateRollout, PageParams, Rollout, RolloutAction};

#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Roll an artifact out to the devices a selector matches, in waves, each gated on the
    /// health of the devices already updated against a control cohort left on the old version.
    Create(Box<CreateArgs>),
    /// List rollouts, newest first.
    List {
        /// At most this many (1-100).
        #[arg(long, default_value_t = 20)]
        limit: usize,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// One rollout: its waves, the devices per state, and the last gate comparison.
    Show {
        /// Rollout id (`rol_...`).
        id: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Follow a rollout live (progress per wave, the gate) until it completes or aborts.
    Watch {
        /// Rollout id (`rol_...`).
        id: String,
        /// How often to ask, in milliseconds.
        #[arg(long, default_value_t = 2000)]
        interval_ms: u64,
    },
    /// The rollout's event log: every change, when and by whom.
    Events {
        /// Rollout id (`rol_...`).
        id: String,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Pause: no device starts until it is resumed (those updating finish).
    Pause {
        /// Rollout id (`rol_...`).
        id: String,
        /// A note for the event log.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Resume a paused rollout (after a failed gate: on to the next wave).
    Resume {
        /// Rollout id (`rol_...`).
        id: String,
        /// A note for the event log.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Abort: no device starts again and the updates not begun are withdrawn.
    Abort {
        /// Rollout id (`rol_...`).
        id: String,
        /// A note for the event log.
        #[arg(long)]
        reason: Option<String>,
        /// Also roll the devices that committed back to the version they ran.
        #[arg(long)]
        rollback: bool,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Add the devices a selector matches now; each joins the wave the rollout's order gives it.
    AddDevices {
        /// Rollout id (`rol_...`).
        id: String,
        /// The devices to add: a selector, narrowed by the rollout's target and your scope.
        #[arg(long)]
        target: String,
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// `mooring rollout create`'s flags.
#[derive(clap::Args)]
pub struct CreateArgs {
    /// The artifact (`art_...`, as `mooring ota list` shows it).
    #[arg(long)]
    artifact: String,
    /// The devices: a selector (`tag:site=berlin`, `id:d1,d2`, `version=1.3.0 and tag:hw=rev-b`).
    #[arg(long)]
    target: String,
    /// Cumulative shares of the target per wave, the last 100 (default 1,10,50,100).
    #[arg(long)]
    waves: Option<String>,
    /// Most devices started per minute.
    #[arg(long)]
    max_per_minute: Option<u32>,
    /// Most devices updating at once.
    #[arg(long)]
    max_concurrent: Option<u32>,
    /// Abort when this share of the devices that tried failed or rolled back (default 5%).
    #[arg(long)]
    abort_failure_rate: Option<String>,
    /// Devices that must have tried before the abort threshold counts, and the fewest
    /// the gate compares (default 20).
    #[arg(long)]
    min_devices: Option<u64>,
    /// How long each wave's devices are watched before the next wave (default 30m).
    #[arg(long)]
    health_window: Option<String>,
    /// Health signals compared with the control cohort (default
    /// disconnects,crashes,restarts,telemetry_gaps; `reconnects` is disconnects), and
    /// telemetry metrics whose values are: `battery.v` (a shift either way fails),
    /// `battery.v:down` (lower is worse), `temp:up` (higher is worse).
    #[arg(long)]
    gate: Option<String>,
    /// A per-device precondition on its latest telemetry (`battery>=30`); repeat for
    /// more. A device that fails one waits.
    #[arg(long)]
    require: Vec<String>,
    /// A daily maintenance window in each device's time zone (its `tz` tag), 02:00-05:00.
    #[arg(long)]
    window: Option<String>,
    /// Share of the target kept on the old version until the end (default 5%).
    #[arg(long)]
    control: Option<String>,
    /// Abort and roll the updated devices back when the gate fails (default: pause).
    #[arg(long)]
    auto_abort: bool,
    /// Install even on devices running a newer version.
    #[arg(long)]
    allow_downgrade: bool,
    /// Seed of the random choice of waves (default: random; shown by `rollout show`).
    #[arg(long)]
    seed: Option<u64>,
    #[command(flatten)]
    output: OutputArgs,
}

/// A bar of `width` cells for `done` of `total`.
fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((done as f64 / total as f64) * width as f64).round() as usize
    }
    .min(width);
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

/// What `rollout show` and `watch` print: the header, one line per wave, the gate.
fn render(r: &Rollout) -> String {
    let mut out = String::new();
    let state = match &r.reason {
        Some(why) => format!("{} ({why})", r.state),
        None => r.state.clone(),
    };
    out.push_str(&format!(
        "{}  {} -> {}  {}\n",
        r.id, r.selector, r.version, state
    ));
    out.push_str(&format!(
        "devices {}: committed {}, failed {}, rolled back {}, updating {}, waiting {} ({} deferred)\n",
        r.total, r.committed, r.failed, r.rolled_back, r.in_flight, r.waiting, r.deferred
    ));
    for w in &r.waves {
        let done: u64 = ["committed", "failed", "rolled_back"]
            .iter()
            .filter_map(|s| w.states.get(*s))
            .sum();
        let name = if w.control {
            "control".to_owned()
        } else {
            format!("wave {} ({}%)", w.wave + 1, w.pct.unwrap_or(0.0))
        };
        let marker = if w.wave == r.wave && matches!(r.state.as_str(), "running" | "paused") {
            ">"
        } else {
            " "
        };
        let states: Vec<String> = mooring_proto::ota::UpdateState::ALL
            .into_iter()
            .filter_map(|s| {
                w.states
                    .get(s.as_str())
                    .map(|n| format!("{} {n}", s.as_str()))
            })
            .collect();
        out.push_str(&format!(
            "{marker} {name:<16} {} {done}/{}  {}{}\n",
            bar(done, w.total, 30),
            w.total,
            if states.is_empty() {
                "-".to_owned()
            } else {
                states.join(", ")
            },
            if w.waiting > 0 {
                format!("; waiting {} ({} deferred)", w.waiting, w.deferred)
            } else {
                String::new()
            }
        ));
    }
    if let (Some(_), Some(end)) = (r.window_started_at, r.window_ends_at) {
        out.push_str(&format!("health window until {}\n", rfc3339(end)));
    }
    if let Some(g) = &r.gate {
        out.push_str(&format!(
            "gate after wave {}: {} (a signal fails at {}x the control's rate, a metric at \
             r=0.3 the bad way, with p <= {})\n",
            g.wave + 1,
            g.verdict,
            g.margin,
            g.alpha
        ));
        let mut t = Table::new(&["SIGNAL", "UPDATED", "CONTROL", "RATIO", "P", "RESULT"]);
        for s in &g.signals {
            // A metric gate (`battery.v:down`) compares values, its "ratio" is the shift as
            // the rank-biserial correlation r (-1..1).
            let metric = s.kind == "metric";
            let side = |c: &mooring_api::GateCounts| match (metric, c.mean) {
                (true, Some(m)) => format!("mean {m:.3} on {} devices", c.devices),
                (true, None) => format!("no values on {} devices", c.devices),
                (false, _) => format!(
                    "{} on {} devices ({}/device-h)",
                    c.events,
                    c.devices,
                    c.rate.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"))
                ),
            };
            t.row(vec![
                s.signal.clone(),
                side(&s.updated),
                side(&s.control),
                match s.ratio {
                    _ if metric => s
                        .effect
                        .map_or_else(|| "-".to_owned(), |e| format!("r={e:+.2}")),
                    Some(r) => format!("{r:.2}x"),
                    None if s.updated.events > 0 => "inf".to_owned(),
                    None => "1.00x".to_owned(),
                },
                match s.p_value {
                    Some(p) if p < 0.001 => "<0.001".to_owned(),
                    Some(p) => format!("{p:.3}"),
                    None => "-".to_owned(),
                },
                match &s.reason {
                    Some(r) => format!("{} ({r})", s.verdict),
                    None => s.verdict.clone(),
                },
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

fn print_rollout(r: &Rollout, output: &OutputArgs) -> anyhow::Result<()> {
    if output.json() {
        return print_json(r);
    }
    print!("{}", render(r));
    Ok(())
}

fn percent(what: &str, v: Option<String>) -> anyhow::Result<Option<f64>> {
    v.map(|t| match mooring_api::parse_pct(&t) {
        Ok(bp) => Ok(f64::from(bp) / 100.0),
        Err(e) => usage(format!("--{what}: {e}")),
    })
    .transpose()
}

pub async fn rollout(args: ApiArgs, command: RolloutCommand) -> anyhow::Result<u8> {
    let api = args.connect()?;
    match command {
        RolloutCommand::Create(args) => {
            let CreateArgs {
                artifact,
                target,
                waves,
                max_per_minute,
                max_concurrent,
                abort_failure_rate,
                min_devices,
                health_window,
                gate,
                require,
                window,
                control,
                auto_abort,
                allow_downgrade,
                seed,
                output,
            } = *args;
            let waves = match waves {
                None => None,
                Some(w) => match mooring_api::parse_waves(&w) {
                    Ok(bp) => Some(bp.into_iter().map(|b| f64::from(b) / 100.0).collect()),
                    Err(e) => return usage(format!("--waves: {e}")),
                },
            };
            let health_window_ms = match health_window {
                None => None,
                Some(t) => match mooring_api::parse_duration_ms(&t) {
                    Ok(ms) => Some(ms),
                    Err(e) => return usage(format!("--health-window: {e}")),
                },
            };
            let req = CreateRollout {
                artifact_id: artifact,
                selector: target,
                waves,
                control_pct: percent("control", control)?,
                max_per_minute,
                max_concurrent,
                abort_failure_rate_pct: percent("abort-failure-rate", abort_failure_rate)?,
                min_devices,
                health_window_ms,
                gate: gate.map(|g| g.split(',').map(|s| s.trim().to_owned()).collect()),
                require,
                window,
                auto_abort,
                allow_downgrade,
                seed,
            };
            if let Err(e) = req.spec() {
                return usage(e);
            }
            let r = call(api.create_rollout(&req).await)?;
            if output.json() {
                print_json(&r)?;
            } else {
                println!("{}", r.id);
            }
        }
        RolloutCommand::List { limit, output } => {
            let list = call(
                api.list_rollouts(&PageParams {
                    limit: Some(limit),
                    cursor: None,
                })
                .await,
            )?;
            if output.json() {
                print_json(&list)?;
                return Ok(EXIT_OK);
            }
            let mut t = Table::new(&[
                "ID",
                "STATE",
                "VERSION",
                "TARGET",
                "WAVE",
                "COMMITTED",
                "FAILED",
                "CREATED",
            ]);
            for r in &list.rollouts {
                let wave = if r.wave as usize + 1 >= r.waves.len() {
                    "control".to_owned()
                } else {
                    format!("{}/{}", r.wave + 1, r.waves.len() - 1)
                };
                t.row(vec![
                    r.id.clone(),
                    r.state.clone(),
                    r.version.clone(),
                    r.selector.clone(),
                    wave,
                    format!("{}/{}", r.committed, r.total),
                    (r.failed + r.rolled_back).to_string(),
                    ago(r.created_at),
                ]);
            }
            t.print();
        }
        RolloutCommand::Show { id, output } => {
            print_rollout(&call(api.get_rollout(&id).await)?, &output)?;
        }
        RolloutCommand::Watch { id, interval_ms } => {
            use std::io::{IsTerminal, Write};
            let interval = std::time::Duration::from_millis(interval_ms.max(200));
            let tty = std::io::stdout().is_terminal();
            let mut last = String::new();
            loop {
                let r = call(api.get_rollout(&id).await)?;
                let text = render(&r);
                if tty {
                    // Redraw in place: back to the first line printed last time, clear below.
                    let lines = last.lines().count();
                    if lines > 0 {
                        print!("\x1b[{lines}F\x1b[J");
                    }
                    print!("{text}");
                } else if text != last {
                    // Piped: each change once, apart from the one before.
                    if !last.is_empty() {
                        println!();
                    }
                    print!("{text}");
                }
                let _ = std::io::stdout().flush();
                last = text;
                match r.state.as_str() {
                    "completed" => return Ok(EXIT_OK),
                    "aborted" => return Ok(EXIT_FAILED),
                    _ => {}
                }
                tokio::time::sleep(interval).await;
            }
        }
        RolloutCommand::Events { id, output } => {
            let list = call(api.rollout_events(&id, 0).await)?;
            if output.json() {
                print_json(&list)?;
                return Ok(EXIT_OK);
            }
            let mut t = Table::new(&["SEQ", "AT", "BY", "EVENT", "DETAIL"]);
            for e in &list.events {
                t.row(vec![
                    e.seq.to_string(),
                    rfc3339(e.at),
                    e.by.clone(),
                    e.kind.clone(),
                    e.detail.clone(),
                ]);
            }
            t.print();
        }
        RolloutCommand::Pause { id, reason, output } => {
            let a = RolloutAction {
                reason,
                rollback: false,
            };
            print_rollout(&call(api.rollout_action(&id, "pause", &a).await)?, &output)?;
        }
        RolloutCommand::Resume { id, reason, output } => {
            let a = RolloutAction {
                reason,
                rollback: false,
            };
            print_rollout(&call(api.rollout_action(&id, "resume", &a).await)?, &output)?;
        }
        RolloutCommand::Abort {
            id,
            reason,
            rollback,
            output,
        } => {
            let a = RolloutAction { reason, rollback };
            print_rollout(&call(api.rollout_action(&id, "abort", &a).await)?, &output)?;
        }
        RolloutCommand::AddDevices { id, target, output } => {
            print_rollout(&call(api.add_rollout_devices(&id, &target).await)?, &output)?;
        }
    }
    Ok(EXIT_OK)
}
