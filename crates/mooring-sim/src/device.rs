//! One simulated device: its link (cut, outages, latency), its flash (a counting `MemStore`), its
//! injected command handlers, and the task that runs the real agent through power losses,
//! crashes and an empty battery while feeding it telemetry on the virtual clock.
//!
//! Measurement hooks live here too: [`LedgerStore`] records which `sim.n` values the agent
//! deleted from its outbox because their PUBACK arrived (the set that must be in the server's
//! store at the end), and [`SimHandler`] counts executions per command.

use crate::clock::VirtualClock;
use crate::scenario::{Cohort, MetricModel, SEQ_METRIC};
use futures::task::AtomicWaker;
use mooring_agent::store::{CommandRecord, Entry, Pushed, StoreError};
use mooring_agent::{
    AgentConfig, AgentDeps, AgentStore, CommandHandler, Diagnostics, MemStore, Outcome,
};
use mooring_broker::{Broker, ConnInfo, ListenerKind};
use mooring_proto::sync::{lock, read, write};
use mooring_proto::{Clock, DeviceId};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Map, Value};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;

/// Bytes buffered in each direction of an in-memory connection (allocated as used).
pub const PIPE_SIZE_BYTES: usize = 8 * 1024;
/// Telemetry objects buffered between a device's generator and its agent; more and the
/// message is counted in `telemetry_input_dropped` instead of sent.
pub const INPUT_QUEUE_MAX: usize = 8;
/// Bytes read at once from the pipe when latency is simulated (one chunk is delayed at a time).
pub const LATENCY_CHUNK_BYTES: usize = 2 * 1024;
/// Recent errors each agent keeps for `diagnostics` in the simulator (production: 32).
pub const SIM_ERRORS_MAX: usize = 8;
/// Key added to a command's params: the index of the scenario event that sent it, so the
/// injected handlers count executions per command.
pub const SIM_CMD_KEY: &str = "sim_cmd";
/// What an injected handler panics with (the simulator's panic hook keeps these quiet).
pub const INJECTED_PANIC: &str = "mooring-sim: injected command handler panic";

/// Devices boot on this grid (ms) within their cohort's `connect_spread`. Devices whose
/// timers coincide reach the server in the same virtual instant and share its group commits,
/// as many devices do in a real fleet where a commit takes milliseconds; with boot times at
/// arbitrary milliseconds every message would be a transaction of its own.
pub const BOOT_GRID_MS: u64 = 100;

/// Derives an independent seed for (`seed`, device `index`, `salt`): splitmix64.
pub fn derive_seed(seed: u64, index: u64, salt: u64) -> u64 {
    let mut z = seed
        .wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(salt.wrapping_mul(0xD1B5_4A32_D192_ED69));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Counters shared by every device (one per run).
#[derive(Debug, Default)]
pub struct Stats {
    pub telemetry_sent: AtomicU64,
    pub telemetry_input_dropped: AtomicU64,
    pub telemetry_acked: AtomicU64,
    /// Link cuts (spontaneous drops, outages, `cut_link` events) that hit a live connection.
    pub cuts_injected: AtomicU64,
    /// Connections whose agent got the cut as an I/O error.
    pub cuts_observed: AtomicU64,
    /// Connection attempts refused because the device's link was down.
    pub connects_refused_link_down: AtomicU64,
    pub drops_injected: AtomicU64,
    pub outages_injected: AtomicU64,
    pub power_losses_injected: AtomicU64,
    pub crashes_injected: AtomicU64,
    /// Agent restarts (after a power loss, crash or empty battery) that connected again.
    pub restarts_recovered: AtomicU64,
    /// Times an agent stopped on its own (its supervisor gave up) and was restarted.
    pub agent_exits: AtomicU64,
    pub battery_empty: AtomicU64,
    pub battery_recharged: AtomicU64,
    pub handler_panics_injected: AtomicU64,
    /// Store writes that returned an error to the agent (injected flash failures).
    pub store_errors_surfaced: AtomicU64,
    /// Telemetry acknowledged, per sample interval of simulated time.
    pub acked_per_bucket: Vec<AtomicU64>,
    pub bucket_ms: u64,
}

impl Stats {
    pub fn new(duration_ms: u64, bucket_ms: u64) -> Self {
        let buckets = (duration_ms / bucket_ms.max(1) + 2) as usize;
        Self {
            acked_per_bucket: (0..buckets).map(|_| AtomicU64::new(0)).collect(),
            bucket_ms: bucket_ms.max(1),
            ..Self::default()
        }
    }

    fn acked_at(&self, elapsed_ms: u64, n: u64) {
        let i = ((elapsed_ms / self.bucket_ms) as usize).min(self.acked_per_bucket.len() - 1);
        self.acked_per_bucket[i].fetch_add(n, Ordering::Relaxed);
    }
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The in-memory network between the devices and the (current) server.
pub struct Net {
    /// The server's broker; `None` while the server is down.
    broker: RwLock<Option<Broker>>,
    /// The broker's side of every device connection.
    conns: TaskTracker,
    pub clock: VirtualClock,
    pub stats: Arc<Stats>,
}

impl Net {
    pub fn new(clock: VirtualClock, stats: Arc<Stats>) -> Self {
        Self {
            broker: RwLock::new(None),
            conns: TaskTracker::new(),
            clock,
            stats,
        }
    }

    pub fn set_broker(&self, broker: Option<Broker>) {
        *write(&self.broker) = broker;
    }

    fn broker(&self) -> Option<Broker> {
        read(&self.broker).clone()
    }

    /// Waits for every connection task to end (after the broker shut down).
    pub async fn close(&self) {
        self.conns.close();
        self.conns.wait().await;
    }
}

/// A device's link: cut by bumping the epoch (live streams fail), down until a virtual time.
pub struct DeviceLink {
    id: String,
    epoch: AtomicU64,
    /// Streams opened with this epoch and still open (0 or 1).
    open_epoch: AtomicU64,
    /// Virtual ms (since the start) until which connection attempts are refused.
    down_until_ms: AtomicU64,
    /// Wakes the live stream's reader when the link is cut.
    waker: AtomicWaker,
    /// Added to every chunk the device receives (round trip = 2 x one-way latency).
    rtt: Duration,
}

impl DeviceLink {
    fn new(id: String, latency_ms: u64) -> Self {
        Self {
            id,
            epoch: AtomicU64::new(1),
            open_epoch: AtomicU64::new(0),
            down_until_ms: AtomicU64::new(0),
            waker: AtomicWaker::new(),
            rtt: Duration::from_millis(latency_ms.saturating_mul(2)),
        }
    }

    /// Cuts the live connection (if any) and refuses new ones until `until_ms` (virtual ms since
    /// the start; 0 = only the cut).
    pub fn cut(&self, until_ms: u64, stats: &Stats) {
        self.down_until_ms.fetch_max(until_ms, Ordering::Relaxed);
        let old = self.epoch.fetch_add(1, Ordering::Relaxed);
        if self.open_epoch.load(Ordering::Relaxed) == old {
            inc(&stats.cuts_injected);
        }
        self.waker.wake();
    }
}

/// Opens in-memory connections for one device, through its [`DeviceLink`], to the current
/// broker, as if the device's TLS client certificate had been verified.
pub struct SimConnector {
    pub link: Arc<DeviceLink>,
    pub net: Arc<Net>,
    /// Remote mode: TCP + TLS with the device's certificate instead of the in-process broker.
    pub tls: Option<mooring_agent::transport::TlsConnector>,
}

#[async_trait::async_trait]
impl mooring_agent::Connector for SimConnector {
    async fn connect(&self) -> io::Result<Box<dyn mooring_agent::Stream>> {
        let now_ms = self.net.clock.elapsed_ms();
        if self.link.down_until_ms.load(Ordering::Relaxed) > now_ms {
            inc(&self.net.stats.connects_refused_link_down);
            return Err(io::ErrorKind::NetworkUnreachable.into());
        }
        let device_end: Box<dyn mooring_agent::Stream> = match &self.tls {
            Some(tls) => tls.connect().await?,
            None => {
                let Some(broker) = self.net.broker() else {
                    return Err(io::ErrorKind::ConnectionRefused.into());
                };
                let (device_end, server_end) = tokio::io::duplex(PIPE_SIZE_BYTES);
                let info = ConnInfo {
                    peer: None,
                    cert_identity: Some(self.link.id.clone()),
                    cert_sha256: Some(crate::harness::sim_cert_sha256(&self.link.id)),
                    listener: ListenerKind::Tls,
                };
                self.net
                    .conns
                    .spawn(async move { broker.serve_connection(server_end, info).await });
                Box::new(device_end)
            }
        };
        let epoch = self.link.epoch.load(Ordering::Relaxed);
        self.link.open_epoch.store(epoch, Ordering::Relaxed);
        let delay = (!self.link.rtt.is_zero()).then(|| {
            Box::new(Delay {
                buf: Vec::new(),
                pos: 0,
                sleep: None,
            })
        });
        Ok(Box::new(SimStream {
            inner: device_end,
            link: self.link.clone(),
            stats: self.net.stats.clone(),
            epoch,
            observed: false,
            delay,
        }))
    }

    fn describe(&self) -> String {
        "in-process server (simulated link)".into()
    }
}

/// The device's end of a connection: fails once the link is cut; optionally delays what the
/// device receives.
struct SimStream {
    inner: Box<dyn mooring_agent::Stream>,
    link: Arc<DeviceLink>,
    stats: Arc<Stats>,
    epoch: u64,
    observed: bool,
    delay: Option<Box<Delay>>,
}

struct Delay {
    buf: Vec<u8>,
    pos: usize,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl SimStream {
    fn check(&mut self) -> io::Result<()> {
        if self.link.epoch.load(Ordering::Relaxed) != self.epoch {
            if !self.observed {
                self.observed = true;
                inc(&self.stats.cuts_observed);
            }
            return Err(io::ErrorKind::ConnectionReset.into());
        }
        Ok(())
    }
}

impl Drop for SimStream {
    fn drop(&mut self) {
        let _ = self.link.open_epoch.compare_exchange(
            self.epoch,
            0,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

impl AsyncRead for SimStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        this.link.waker.register(cx.waker());
        this.check()?;
        let Some(d) = this.delay.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, out);
        };
        if d.pos >= d.buf.len() {
            d.buf.resize(LATENCY_CHUNK_BYTES, 0);
            let mut rb = ReadBuf::new(&mut d.buf);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    d.buf.truncate(n);
                    d.pos = 0;
                    if n == 0 {
                        return Poll::Ready(Ok(())); // EOF
                    }
                    d.sleep = Some(Box::pin(tokio::time::sleep(this.link.rtt)));
                }
                Poll::Ready(Err(e)) => {
                    d.buf.clear();
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    d.buf.clear();
                    d.pos = 0;
                    return Poll::Pending;
                }
            }
        }
        if let Some(s) = d.sleep.as_mut() {
            if s.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            d.sleep = None;
        }
        let n = out.remaining().min(d.buf.len() - d.pos);
        out.put_slice(&d.buf[d.pos..d.pos + n]);
        d.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

use std::future::Future as _;

/// Everything the run keeps about one device, readable at the end.
pub struct DeviceState {
    pub index: usize,
    pub id: DeviceId,
    pub cohort: usize,
    pub link: Arc<DeviceLink>,
    /// The device's flash; clones share it, so it survives agent restarts.
    pub flash: MemStore,
    pub diag: Diagnostics,
    /// Remote mode: how this device reaches the server (its own certificate).
    pub tls: Option<mooring_agent::transport::TlsConnector>,
    /// `sim.n` values whose PUBACK reached the agent (deleted from its outbox).
    pub acked: Mutex<Vec<u32>>,
    /// Messages generated (the highest `sim.n`).
    pub generated: AtomicU64,
    /// Executions per scenario event index (command), counted by the injected handlers.
    pub executions: Mutex<Vec<(u32, u32)>>,
}

impl DeviceState {
    pub fn new(
        index: usize,
        id: DeviceId,
        cohort_index: usize,
        cohort: &Cohort,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let mut flash = MemStore::new(cohort.outbox_max, 1)?;
        if cohort.flash_write_failure_rate > 0.0 || cohort.flash_unsynced_writes > 0 {
            flash = flash.with_faults(mooring_agent::store::Faults {
                write_fail_rate: cohort.flash_write_failure_rate,
                unsynced_ops: cohort.flash_unsynced_writes,
                seed: derive_seed(seed, index as u64, SALT_FLASH),
            });
        }
        let diag = Diagnostics {
            errors: mooring_agent::diag::Ring::new(SIM_ERRORS_MAX),
            logs: mooring_agent::diag::Ring::new(1),
            link: Default::default(),
        };
        Ok(Self {
            index,
            link: Arc::new(DeviceLink::new(
                id.as_str().to_owned(),
                cohort.link.latency_ms,
            )),
            id,
            cohort: cohort_index,
            flash,
            diag,
            tls: None,
            acked: Mutex::new(Vec::new()),
            generated: AtomicU64::new(0),
            executions: Mutex::new(Vec::new()),
        })
    }

    fn record_execution(&self, event: u32) {
        let mut ex = lock(&self.executions);
        match ex.iter_mut().find(|(e, _)| *e == event) {
            Some((_, n)) => *n += 1,
            None => ex.push((event, 1)),
        }
    }

    pub fn connects_total(&self) -> u64 {
        self.diag.link.connects_total.load(Ordering::Relaxed)
    }

    pub fn reconnects_total(&self) -> u64 {
        self.diag.link.reconnects_total.load(Ordering::Relaxed)
    }
}

const SALT_FLASH: u64 = 1;
const SALT_DEVICE: u64 = 2;
const SALT_AGENT: u64 = 3;
const SALT_HANDLER: u64 = 4;

/// The agent's store as the simulator hands it over: the device's [`MemStore`], plus a ledger
/// of the `sim.n` values whose PUBACK arrived (recorded only when the deletion succeeded).
pub struct LedgerStore {
    inner: MemStore,
    dev: Arc<DeviceState>,
    stats: Arc<Stats>,
    clock: VirtualClock,
}

impl LedgerStore {
    fn surfaced<T>(&self, r: Result<T, StoreError>) -> Result<T, StoreError> {
        if r.is_err() {
            inc(&self.stats.store_errors_surfaced);
        }
        r
    }
}

/// The `sim.n` value in a telemetry payload the agent built (`{"sim.n":12,...}`).
fn sim_n(payload: &[u8]) -> Option<u32> {
    let key = b"\"sim.n\":";
    let at = payload.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = payload[at..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&payload[at..at + digits])
        .ok()?
        .parse()
        .ok()
}

impl AgentStore for LedgerStore {
    fn next_seq(&self) -> u64 {
        self.inner.next_seq()
    }
    fn push(&mut self, entries: Vec<Entry>) -> Result<Pushed, StoreError> {
        let r = self.inner.push(entries);
        self.surfaced(r)
    }
    fn peek_after(&self, after: u64, n: usize) -> Result<Vec<Entry>, StoreError> {
        self.inner.peek_after(after, n)
    }
    fn ack(&mut self, seqs: &[u64]) -> Result<u64, StoreError> {
        let mut ns = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            if let Some(e) = self
                .inner
                .peek_after(seq.saturating_sub(1), 1)?
                .into_iter()
                .next()
            {
                if e.seq == seq && e.topic.is_none() {
                    if let Some(n) = sim_n(&e.payload) {
                        ns.push(n);
                    }
                }
            }
        }
        let r = self.inner.ack(seqs);
        let removed = self.surfaced(r)?;
        if !ns.is_empty() {
            self.stats
                .telemetry_acked
                .fetch_add(ns.len() as u64, Ordering::Relaxed);
            self.stats
                .acked_at(self.clock.elapsed_ms(), ns.len() as u64);
            lock(&self.dev.acked).extend(ns);
        }
        Ok(removed)
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn dropped_total(&self) -> u64 {
        self.inner.dropped_total()
    }
    fn command(&self, id: &str) -> Result<Option<CommandRecord>, StoreError> {
        self.inner.command(id)
    }
    fn command_started(&mut self, id: &str) -> Result<(), StoreError> {
        let r = self.inner.command_started(id);
        self.surfaced(r)
    }
    fn command_done(
        &mut self,
        id: &str,
        result: Vec<u8>,
        entry: Entry,
    ) -> Result<Pushed, StoreError> {
        let r = self.inner.command_done(id, result, entry);
        self.surfaced(r)
    }
    fn doc(&self, name: &str) -> Result<Option<Value>, StoreError> {
        self.inner.doc(name)
    }
    fn put_doc(&mut self, name: &str, value: &Value) -> Result<(), StoreError> {
        let r = self.inner.put_doc(name, value);
        self.surfaced(r)
    }
}

/// The handler injected for every command name a scenario sends: counts the execution (by
/// the `sim_cmd` param), then panics with the cohort's `command_panic_rate` or succeeds.
pub struct SimHandler {
    dev: Arc<DeviceState>,
    panic_rate: f64,
    rng: Mutex<StdRng>,
    stats: Arc<Stats>,
}

#[async_trait::async_trait]
impl CommandHandler for SimHandler {
    async fn run(&self, params: Value) -> Outcome {
        if let Some(ev) = params.get(SIM_CMD_KEY).and_then(Value::as_u64) {
            self.dev.record_execution(ev as u32);
        }
        let panic = self.panic_rate > 0.0 && {
            let mut rng = lock(&self.rng);
            rng.random_bool(self.panic_rate)
        };
        if panic {
            inc(&self.stats.handler_panics_injected);
            std::panic::panic_any(INJECTED_PANIC);
        }
        Ok(serde_json::json!({"ok": true}))
    }
}

/// What a device task needs besides its own state (shared by the devices of one cohort).
pub struct CohortModel {
    pub cohort: Cohort,
    pub clock: Arc<dyn Clock>,
    pub agent_config: AgentConfig,
    /// Names of the commands the scenario sends (each gets a [`SimHandler`]).
    pub command_names: Vec<String>,
}

/// Poisson arrivals: the time until the next one, for `per_day` expected per simulated day.
fn next_arrival(rng: &mut StdRng, per_day: f64) -> Option<Duration> {
    if per_day <= 0.0 {
        return None;
    }
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    let ms = -u.ln() * 86_400_000.0 / per_day;
    Some(Duration::from_millis(ms.max(1.0) as u64))
}

struct Agent {
    task: JoinSet<anyhow::Result<()>>,
    input: mpsc::Sender<Map<String, Value>>,
    boots: u64,
    /// `connects_total` when the current agent started (to see that a restart recovered).
    connects_at_boot: u64,
    recovered: bool,
}

/// The device's life: boot, generate telemetry, suffer faults, until the run ends (the caller
/// aborts the task). `start` is virtual time zero; `end` stops telemetry generation.
pub async fn run_device(
    dev: Arc<DeviceState>,
    model: Arc<CohortModel>,
    net: Arc<Net>,
    seed: u64,
    start: Instant,
    end: Instant,
) {
    let c = &model.cohort;
    let mut rng = StdRng::seed_from_u64(derive_seed(seed, dev.index as u64, SALT_DEVICE));
    let offset = rng.random_range(0..=c.connect_spread.0 / BOOT_GRID_MS) * BOOT_GRID_MS;
    tokio::time::sleep_until(start + Duration::from_millis(offset)).await;
    let stats = net.stats.clone();
    let mut agent = Agent {
        task: JoinSet::new(),
        input: mpsc::channel(1).0,
        boots: 0,
        connects_at_boot: 0,
        recovered: true,
    };
    boot(&mut agent, &dev, &model, &net, seed);
    let never = end + Duration::from_secs(86_400 * 365);
    let after = |rng: &mut StdRng, per_day: f64| {
        next_arrival(rng, per_day).map_or(never, |d| Instant::now() + d)
    };
    let mut next_msg = Instant::now();
    let mut next_drop = after(&mut rng, c.link.drops_per_day);
    let mut next_outage = after(&mut rng, c.link.outages_per_day);
    let mut next_power_loss = after(&mut rng, c.power_loss_per_day);
    let mut next_crash = after(&mut rng, c.crash_per_day);
    let mut battery = c.battery.as_ref().map(|b| b.start_pct);
    let mut battery_at = Instant::now();
    let mut powered = true;
    let interval = c.telemetry_interval.as_std();
    loop {
        // When the battery crosses a threshold (empty while on, 5 % while off).
        let next_battery = match (&c.battery, battery) {
            (Some(b), Some(level)) => {
                let rate = if powered {
                    b.charge_pct_per_hour - b.drain_pct_per_hour
                } else {
                    b.charge_pct_per_hour
                };
                let target = if powered { 0.0 } else { BATTERY_ON_PCT };
                let hours = if powered && rate < 0.0 {
                    Some(level / -rate)
                } else if !powered && rate > 0.0 {
                    Some(((target - level) / rate).max(0.0))
                } else {
                    None
                };
                hours.map_or(never, |h| {
                    battery_at + Duration::from_millis((h * 3_600_000.0).ceil() as u64 + 1)
                })
            }
            _ => never,
        };
        let msg_at = if powered { next_msg } else { never };
        let wake = [
            msg_at,
            next_drop,
            next_outage,
            next_power_loss,
            next_crash,
            next_battery,
        ]
        .into_iter()
        .min()
        .unwrap_or(never);
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            joined = agent.task.join_next(), if !agent.task.is_empty() => {
                // The agent stopped on its own (its supervisor gave up): the service manager
                // restarts it, like systemd's Restart=always.
                if let Some(Ok(Err(e))) = &joined {
                    tracing::debug!(device = %dev.id, error = %e, "agent exited");
                }
                inc(&stats.agent_exits);
                tokio::time::sleep(c.boot_delay.as_std()).await;
                if powered {
                    boot(&mut agent, &dev, &model, &net, seed);
                }
                continue;
            }
        }
        let now = Instant::now();
        if !agent.recovered && dev.connects_total() > agent.connects_at_boot {
            agent.recovered = true;
            inc(&stats.restarts_recovered);
        }
        if let (Some(b), Some(level)) = (&c.battery, battery.as_mut()) {
            let hours = now.duration_since(battery_at).as_secs_f64() / 3600.0;
            let rate = if powered {
                b.charge_pct_per_hour - b.drain_pct_per_hour
            } else {
                b.charge_pct_per_hour
            };
            *level = (*level + rate * hours).clamp(0.0, 100.0);
            battery_at = now;
            if powered && *level <= 0.0 {
                inc(&stats.battery_empty);
                powered = false;
                kill(&mut agent).await;
                dev.flash.power_loss();
            } else if !powered && *level >= BATTERY_ON_PCT {
                inc(&stats.battery_recharged);
                powered = true;
                tokio::time::sleep(c.boot_delay.as_std()).await;
                boot(&mut agent, &dev, &model, &net, seed);
                next_msg = Instant::now();
            }
        }
        if now >= next_drop {
            inc(&stats.drops_injected);
            dev.link.cut(0, &stats);
            next_drop = after(&mut rng, c.link.drops_per_day);
        }
        if now >= next_outage {
            inc(&stats.outages_injected);
            let until = net.clock.elapsed_ms() + c.link.outage_duration.0;
            dev.link.cut(until, &stats);
            next_outage = after(&mut rng, c.link.outages_per_day);
        }
        if now >= next_power_loss {
            next_power_loss = after(&mut rng, c.power_loss_per_day);
            if powered {
                inc(&stats.power_losses_injected);
                kill(&mut agent).await;
                dev.flash.power_loss();
                tokio::time::sleep(c.boot_delay.as_std()).await;
                boot(&mut agent, &dev, &model, &net, seed);
            }
        }
        if now >= next_crash {
            next_crash = after(&mut rng, c.crash_per_day);
            if powered {
                inc(&stats.crashes_injected);
                kill(&mut agent).await;
                tokio::time::sleep(c.boot_delay.as_std()).await;
                boot(&mut agent, &dev, &model, &net, seed);
            }
        }
        if powered && Instant::now() >= next_msg {
            next_msg += interval;
            while next_msg <= Instant::now() {
                next_msg += interval; // slept through (rebooting): those readings never existed
            }
            if Instant::now() < end {
                let n = dev.generated.fetch_add(1, Ordering::Relaxed) + 1;
                let obj = telemetry(c, &mut rng, n, battery);
                match agent.input.try_send(obj) {
                    Ok(()) => inc(&stats.telemetry_sent),
                    Err(_) => inc(&stats.telemetry_input_dropped),
                }
            }
        }
    }
}

/// A device whose battery was empty turns on again above this level.
pub const BATTERY_ON_PCT: f64 = 5.0;

fn telemetry(c: &Cohort, rng: &mut StdRng, n: u64, battery: Option<f64>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(SEQ_METRIC.into(), Value::from(n));
    for (name, model) in &c.metrics {
        let v = match model {
            MetricModel::Gauge { mean, jitter } => {
                let x = if *jitter > 0.0 {
                    rng.random_range(-jitter..=*jitter)
                } else {
                    0.0
                };
                Value::from(((mean + x) * 1000.0).round() / 1000.0)
            }
            MetricModel::Counter { per_message } => Value::from(per_message * n as f64),
            MetricModel::Flag { rate } => Value::from(rng.random_bool(rate.clamp(0.0, 1.0))),
        };
        m.insert(name.clone(), v);
    }
    if let Some(b) = battery {
        m.insert("battery.pct".into(), Value::from((b * 10.0).round() / 10.0));
    }
    m
}

/// Aborts the agent wherever it is (no goodbye, no flush) and waits until it is gone.
async fn kill(agent: &mut Agent) {
    agent.task.abort_all();
    while agent.task.join_next().await.is_some() {}
}

fn boot(
    agent: &mut Agent,
    dev: &Arc<DeviceState>,
    model: &Arc<CohortModel>,
    net: &Arc<Net>,
    seed: u64,
) {
    debug_assert!(agent.task.is_empty(), "one agent per device");
    let (tx, rx) = mpsc::channel(INPUT_QUEUE_MAX);
    let boot_no = agent.boots;
    agent.boots += 1;
    if boot_no > 0 {
        agent.recovered = false;
        agent.connects_at_boot = dev.connects_total();
    }
    let mut handlers = mooring_agent::Handlers::new();
    for name in &model.command_names {
        let h: Arc<dyn CommandHandler> = Arc::new(SimHandler {
            dev: dev.clone(),
            panic_rate: model.cohort.command_panic_rate,
            rng: Mutex::new(StdRng::seed_from_u64(derive_seed(
                seed,
                dev.index as u64,
                SALT_HANDLER.wrapping_add(boot_no << 8),
            ))),
            stats: net.stats.clone(),
        });
        handlers.insert(name.clone(), h);
    }
    let deps = AgentDeps {
        device_id: dev.id.clone(),
        connector: Arc::new(SimConnector {
            link: dev.link.clone(),
            net: net.clone(),
            tls: dev.tls.clone(),
        }),
        store: Box::new(LedgerStore {
            inner: dev.flash.clone(),
            dev: dev.clone(),
            stats: net.stats.clone(),
            clock: net.clock,
        }),
        clock: model.clock.clone(),
        rng_seed: derive_seed(
            seed,
            dev.index as u64,
            SALT_AGENT.wrapping_add(boot_no << 8),
        ),
        metrics: Box::new(mooring_agent::NoMetrics),
        input: Some(rx),
        handlers,
        diagnostics: dev.diag.clone(),
    };
    agent.input = tx;
    agent.task.spawn(mooring_agent::run_with(
        deps,
        model.agent_config.clone(),
        std::future::pending(),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_n_is_read_from_the_agents_payload() {
        let mut m = Map::new();
        m.insert(SEQ_METRIC.into(), Value::from(1234));
        m.insert("temp".into(), Value::from(2.5));
        let p = mooring_agent::telemetry_payload(m, 99, 5);
        assert_eq!(sim_n(&p), Some(1234));
        assert_eq!(sim_n(b"{\"seq\":1}"), None);
    }

    #[test]
    fn derived_seeds_differ_and_repeat() {
        assert_eq!(derive_seed(1, 2, 3), derive_seed(1, 2, 3));
        assert_ne!(derive_seed(1, 2, 3), derive_seed(1, 3, 3));
        assert_ne!(derive_seed(1, 2, 3), derive_seed(1, 2, 4));
    }
}
