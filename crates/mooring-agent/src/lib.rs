//! # mooring-agent: the device runtime
//!
//! The agent turns host metrics and lines of JSON into telemetry messages and delivers each of
//! them to the Mooring server at least once, in order, across server outages and agent
//! restarts.
//!
//! ```text
//!  metrics::HostSampler ──every interval──┐
//!                                          ├─> add seq+ts ─> outbox::Outbox (SQLite, fsync) ─┐
//!  input::read_lines ──one JSON obj/line──┘                                                  │
//!                                                                                            v
//!  server <── MQTT/mTLS ── link::drive (rumqttc, backoff) <── main loop: send window of 32 ──┘
//!                                     └── PUBACK(pkid) ──> main loop: pkid→seq ──> Outbox::ack
//! ```
//!
//! * [`config`]: [`AgentConfig`], the plain settings struct the CLI or the simulator builds.
//! * [`outbox`]: the durable bounded queue. A message is committed (WAL, `synchronous=FULL`)
//!   with its `seq` before any send is attempted; `seq` is persisted and never reused; an entry
//!   is deleted only after the server's PUBACK, and the server acknowledges only durable
//!   points, so "gone from the outbox" means "stored on the server". When full, the oldest
//!   entries are dropped and counted.
//! * [`link`]: identity (device id = client certificate CN), the rustls (ring) mTLS config,
//!   one rumqttc event loop per connection, and reconnect backoff (full jitter, 500 ms → 30 s).
//! * [`metrics`]: host sampler (load averages, memory, uptime).
//! * [`input`]: the `--input` line reader (bounded lines, bad lines logged and skipped).
//!
//! ## The main loop ([`run`])
//!
//! One task owns the outbox and the send window; it `select!`s over shutdown, input lines,
//! the metrics timer and [`link::LinkEvent`]s. On `Connected` it publishes (QoS 1) the oldest
//! entries, up to [`SEND_WINDOW_MAX`] unacknowledged at once, strictly in seq order. rumqttc
//! numbers publishes in the order they are requested, so each `Published(pkid)` event pairs
//! with the oldest sent-but-unnumbered seq, and `PubAck(pkid)` then names the seq to delete.
//! On `Disconnected` the window is forgotten and the next connection resends from the oldest
//! entry; duplicates are harmless because the server dedupes `(device, seq)`.
//!
//! Time: timers use `tokio::time` only and timestamps come from the injected
//! [`mooring_proto::Clock`], so the simulator can run agents on virtual time. Every task the
//! agent spawns lives in a `JoinSet` that [`run`] shuts down before returning.

pub mod config;
pub mod input;
pub mod link;
pub mod metrics;
pub mod outbox;

pub use config::{AgentConfig, InputSource};

use anyhow::Context as _;
use mooring_proto::telemetry::Telemetry;
use mooring_proto::{Clock, Topic};
use rand::SeedableRng as _;
use rumqttc::{AsyncClient, QoS};
use serde_json::{Map, Value};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// Most publishes awaiting PUBACK at once.
pub const SEND_WINDOW_MAX: usize = 32;
/// Parsed input lines buffered between the reader and the main loop.
pub const INPUT_CHANNEL_CAP: usize = 64;
/// Link events buffered between the connection task and the main loop.
pub const LINK_EVENT_CHANNEL_CAP: usize = 128;
/// Most input lines committed in one outbox transaction.
pub const PUSH_BATCH_MAX: usize = 64;
/// How long a clean shutdown waits for the DISCONNECT to be written.
pub const DISCONNECT_WAIT_MS: u64 = 2_000;

/// Runs the agent until `shutdown` completes, or, with `exit_when_drained`, until the input
/// is at EOF and the outbox is empty. Errors are setup failures (bad certificate, unusable
/// state dir, unreadable input file) or a failing outbox disk; network trouble is retried
/// forever.
pub async fn run(
    config: AgentConfig,
    clock: Arc<dyn Clock>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    config.validate()?;
    let identity = link::load_identity(&config.cert_path, &config.key_path, &config.ca_path)?;
    let device_id = identity.device_id.clone();
    let topic = Topic::telemetry(&device_id);

    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("creating state dir {}", config.state_dir.display()))?;
    // A brand-new outbox starts its seq at unix-ms × 1000, so a device whose state dir was
    // wiped does not reuse seqs the server has already stored (and would dedupe away).
    let first_seq = clock.now_ms().saturating_mul(1000);
    let mut outbox = outbox::Outbox::open(&config.state_dir, config.outbox_max, first_seq)
        .with_context(|| format!("opening outbox in {}", config.state_dir.display()))?;
    tracing::info!(
        device = %device_id,
        queued = outbox.len(),
        next_seq = outbox.next_seq(),
        "agent starting"
    );

    let mut tasks = JoinSet::new();

    // Input lines.
    let (input_tx, mut input_rx) = mpsc::channel(INPUT_CHANNEL_CAP);
    let mut input_done = match &config.input {
        None => true,
        Some(InputSource::Stdin) => {
            tasks.spawn(input::read_lines(tokio::io::stdin(), input_tx));
            false
        }
        Some(InputSource::File(path)) => {
            let file = tokio::fs::File::open(path)
                .await
                .with_context(|| format!("opening input {}", path.display()))?;
            tasks.spawn(input::read_lines(file, input_tx));
            false
        }
    };

    // Host metrics: one sample right away, then every interval.
    let mut sampler = metrics::HostSampler::new();
    let mut metrics_tick = (config.interval_secs > 0).then(|| {
        let mut i = tokio::time::interval(Duration::from_secs(config.interval_secs));
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    if let Some(tick) = &mut metrics_tick {
        tick.tick().await;
        enqueue(&mut outbox, clock.as_ref(), vec![sampler.sample()])?;
    }

    // The connection.
    let rng = match config.jitter_seed {
        Some(seed) => rand::rngs::StdRng::seed_from_u64(seed),
        None => rand::rngs::StdRng::from_os_rng(),
    };
    let settings = link::LinkSettings {
        host: config.server_host.clone(),
        port: config.server_port,
        identity,
        keepalive: Duration::from_secs(config.keepalive_secs),
        inflight_max: SEND_WINDOW_MAX as u16,
    };
    let (link_tx, mut link_rx) = mpsc::channel(LINK_EVENT_CHANNEL_CAP);
    tasks.spawn(link::drive(settings, link::Backoff::standard(rng), link_tx));

    let mut window: Option<Window> = None;
    let mut acks = Vec::with_capacity(LINK_EVENT_CHANNEL_CAP);
    tokio::pin!(shutdown);
    let result: anyhow::Result<()> = async {
        loop {
            if let Some(w) = &mut window {
                w.fill(&outbox, &topic)?;
            }
            if config.exit_when_drained && input_done && outbox.is_empty() {
                tracing::info!("input drained and outbox empty; exiting");
                return Ok(());
            }
            tokio::select! {
                () = &mut shutdown => {
                    tracing::info!(queued = outbox.len(), "shutting down");
                    return Ok(());
                }
                line = input_rx.recv(), if !input_done => match line {
                    Some(first) => {
                        // Everything already waiting goes into the same transaction.
                        let mut batch = vec![first];
                        while batch.len() < PUSH_BATCH_MAX {
                            match input_rx.try_recv() {
                                Ok(obj) => batch.push(obj),
                                Err(_) => break,
                            }
                        }
                        enqueue(&mut outbox, clock.as_ref(), batch)?;
                    }
                    None => {
                        tracing::info!("input at end");
                        input_done = true;
                    }
                },
                () = next_tick(&mut metrics_tick) => {
                    enqueue(&mut outbox, clock.as_ref(), vec![sampler.sample()])?;
                }
                event = link_rx.recv() => {
                    let Some(event) = event else {
                        anyhow::bail!("connection task ended unexpectedly");
                    };
                    // Everything already waiting is handled together: one fsync for its acks.
                    on_link_event(event, &mut window, &mut acks);
                    for _ in 1..LINK_EVENT_CHANNEL_CAP {
                        match link_rx.try_recv() {
                            Ok(event) => on_link_event(event, &mut window, &mut acks),
                            Err(_) => break,
                        }
                    }
                    outbox.ack_many(&acks)?;
                    acks.clear();
                }
            }
        }
    }
    .await;

    // Say goodbye cleanly if connected, bounded in time, still recording late PUBACKs; then
    // stop every task.
    if let Some(client) = window.as_ref().map(|w| w.client.clone()) {
        if client.try_disconnect().is_ok() {
            let drained = async {
                while let Some(event) = link_rx.recv().await {
                    on_link_event(event, &mut window, &mut acks);
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(DISCONNECT_WAIT_MS), drained).await;
            if let Err(e) = outbox.ack_many(&acks) {
                tracing::warn!(error = %e, "recording final acknowledgements failed");
            }
        }
    }
    tasks.shutdown().await;
    tracing::info!(
        queued = outbox.len(),
        dropped_total = outbox.dropped_total(),
        "agent stopped"
    );
    result
}

/// Applies one link event to the send window; seqs acknowledged by the server go to `acks`.
fn on_link_event(event: link::LinkEvent, window: &mut Option<Window>, acks: &mut Vec<u64>) {
    match event {
        link::LinkEvent::Connected(client) => *window = Some(Window::new(client)),
        link::LinkEvent::Published(pkid) => {
            if let Some(w) = window {
                w.published(pkid);
            }
        }
        link::LinkEvent::PubAck(pkid) => {
            if let Some(seq) = window.as_mut().and_then(|w| w.acked(pkid)) {
                acks.push(seq);
            }
        }
        link::LinkEvent::Disconnected => *window = None,
    }
}

/// The next metrics tick; never, when metrics are off.
async fn next_tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// Adds `seq` and `ts` to each object, keeps those that are valid v1 telemetry (others are
/// logged and skipped) and commits them to the outbox in one transaction. Only an outbox
/// failure is an error.
fn enqueue(
    outbox: &mut outbox::Outbox,
    clock: &dyn Clock,
    objs: Vec<Map<String, Value>>,
) -> anyhow::Result<()> {
    let now_ms = clock.now_ms();
    let valid: Vec<_> = objs
        .into_iter()
        .filter(|obj| {
            // The largest possible seq makes the size check conservative.
            let probe = telemetry_payload(obj.clone(), u64::MAX, now_ms);
            match Telemetry::parse(&probe) {
                Ok(_) => true,
                Err(e) => {
                    tracing::warn!(error = %e, "message is not valid telemetry; skipped");
                    false
                }
            }
        })
        .collect();
    if valid.is_empty() {
        return Ok(());
    }
    let pushed = outbox.push_batch(
        valid
            .into_iter()
            .map(|obj| move |seq| telemetry_payload(obj, seq, now_ms)),
    )?;
    if pushed.dropped > 0 {
        tracing::warn!(
            dropped = pushed.dropped,
            dropped_total = outbox.dropped_total(),
            capacity = outbox.capacity(),
            "outbox full; oldest messages dropped"
        );
    }
    Ok(())
}

/// A v1 telemetry payload: `obj` plus `seq` (always the agent's) and `ts` (kept if the line
/// carried one, else `now_ms`).
pub fn telemetry_payload(mut obj: Map<String, Value>, seq: u64, now_ms: u64) -> Vec<u8> {
    obj.insert("seq".into(), Value::from(seq));
    obj.entry("ts").or_insert_with(|| Value::from(now_ms));
    Value::Object(obj).to_string().into_bytes()
}

/// The send window of one connection: which seqs are in flight and under which packet id.
struct Window {
    client: AsyncClient,
    /// Requested but not yet numbered by rumqttc, oldest first.
    unnumbered: VecDeque<u64>,
    by_pkid: HashMap<u16, u64>,
    /// Highest seq requested on this connection.
    last_sent: u64,
}

impl Window {
    fn new(client: AsyncClient) -> Self {
        Self {
            client,
            unnumbered: VecDeque::new(),
            by_pkid: HashMap::new(),
            last_sent: 0,
        }
    }

    fn in_flight(&self) -> usize {
        self.unnumbered.len() + self.by_pkid.len()
    }

    /// Requests publishes of the next entries until the window is full or the outbox has
    /// nothing newer.
    fn fill(&mut self, outbox: &outbox::Outbox, topic: &str) -> anyhow::Result<()> {
        let room = SEND_WINDOW_MAX.saturating_sub(self.in_flight());
        // Nothing to do when the window is full or every entry has been requested already.
        if room == 0 || self.last_sent.saturating_add(1) >= outbox.next_seq() {
            return Ok(());
        }
        for entry in outbox.peek_batch_after(self.last_sent, room)? {
            // Full or closed request channel: the link is going away; the next connection
            // resends from the outbox.
            if self
                .client
                .try_publish(topic, QoS::AtLeastOnce, false, entry.payload)
                .is_err()
            {
                break;
            }
            debug_assert!(entry.seq > self.last_sent);
            self.unnumbered.push_back(entry.seq);
            self.last_sent = entry.seq;
        }
        Ok(())
    }

    fn published(&mut self, pkid: u16) {
        match self.unnumbered.pop_front() {
            Some(seq) => {
                if let Some(old) = self.by_pkid.insert(pkid, seq) {
                    tracing::warn!(
                        pkid,
                        old_seq = old,
                        seq,
                        "packet id reused before its PUBACK"
                    );
                }
            }
            None => tracing::warn!(pkid, "publish event without a pending seq"),
        }
    }

    fn acked(&mut self, pkid: u16) -> Option<u64> {
        let seq = self.by_pkid.remove(&pkid);
        if seq.is_none() {
            tracing::debug!(pkid, "PUBACK for an unknown packet id");
        }
        seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payload_gets_agent_seq_and_clock_ts() {
        let obj = json!({"temp": 21.5, "seq": 9, "nested": {"ok": true}});
        let Value::Object(obj) = obj else {
            unreachable!()
        };
        let bytes = telemetry_payload(obj, 42, 1_700_000_000_000);
        let v: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(
            v,
            json!({"temp": 21.5, "seq": 42, "nested": {"ok": true}, "ts": 1_700_000_000_000u64})
        );
        let t = Telemetry::parse(&bytes).expect("valid v1");
        assert_eq!(t.seq, Some(42));
    }

    #[test]
    fn payload_keeps_a_ts_from_the_line() {
        let Value::Object(obj) = json!({"ts": 5, "x": 1}) else {
            unreachable!()
        };
        let v: Value = serde_json::from_slice(&telemetry_payload(obj, 1, 99)).expect("json");
        assert_eq!(v["ts"], json!(5));
    }
}
