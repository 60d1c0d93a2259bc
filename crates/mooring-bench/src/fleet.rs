//! Many devices at once: connect N with bounded concurrency from rotating source addresses, hold them idle, reconnect with jittered backoff, and count CONNACKs per epoch.

use crate::client::{self, Conn, Cred, Endpoint, Packet, SourceAddrs};
use rand::Rng;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Epochs a fleet counts CONNACKs in: 0 = first connect, 1 = after the server restart.
pub const EPOCHS: usize = 2;
/// First and largest reconnect backoff (full jitter: a uniform sleep in `0..min(cap, base·2^attempt)`).
pub const BACKOFF_BASE: Duration = Duration::from_millis(50);
pub const BACKOFF_CAP: Duration = Duration::from_millis(1000);
/// Longest [`Fleet::shutdown`] waits for device tasks before aborting them.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// How a fleet behaves.
#[derive(Clone, Copy, Debug)]
pub struct FleetOpts {
    pub keepalive_secs: u16,
    /// Reconnect forever (until shutdown) after a drop or a failed attempt; else give up.
    pub reconnect: bool,
    /// Attempts per device before it counts as failed (only without `reconnect`).
    pub attempts_max: u32,
    /// Connects (TCP + TLS + CONNECT) in flight at once.
    pub concurrency: usize,
    /// Subscribe to `devices/<id>/commands/+` before counting as connected, and answer every
    /// command with a `…/result` `{"status":"succeeded"}` (QoS 1).
    pub respond_to_commands: bool,
}

/// The result a responding device publishes for every command.
pub const COMMAND_RESULT: &[u8] = br#"{"status":"succeeded","output":{}}"#;

/// Live counters of a fleet.
#[derive(Default)]
pub struct FleetStats {
    /// Sessions currently up (CONNACK received, not yet closed).
    pub connected_now: AtomicUsize,
    /// Devices that gave up (no reconnect, `attempts_max` failed attempts).
    pub failed: AtomicUsize,
    /// Failed connect attempts (refused, timed out, handshake errors), retried or not.
    pub connect_errors: AtomicUsize,
    /// Sessions the server closed.
    pub dropped: AtomicUsize,
    /// The first failed connect attempt's error, for the report.
    first_error: std::sync::Mutex<Option<String>>,
    epoch: AtomicUsize,
    /// Devices that got a CONNACK in each epoch (each device counted once per epoch).
    connacked: [AtomicUsize; EPOCHS],
}

impl FleetStats {
    pub fn connacked(&self, epoch: usize) -> usize {
        self.connacked[epoch].load(Ordering::Acquire)
    }
    pub fn connected_now(&self) -> usize {
        self.connected_now.load(Ordering::Acquire)
    }
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Acquire)
    }
    pub fn connect_errors(&self) -> usize {
        self.connect_errors.load(Ordering::Acquire)
    }
    pub fn dropped(&self) -> usize {
        self.dropped.load(Ordering::Acquire)
    }
    /// The first failed connect attempt's error (`None` while every attempt succeeded).
    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().ok().and_then(|e| e.clone())
    }
}

/// A running fleet of device tasks; owns them (shut down with [`Fleet::shutdown`], aborted on drop).
pub struct Fleet {
    tasks: JoinSet<()>,
    pub stats: Arc<FleetStats>,
    cancel: CancellationToken,
    pub started: Instant,
}

impl Fleet {
    /// Spawns one task per credential; each connects and then holds its session.
    pub fn spawn(
        endpoint: Endpoint,
        creds: &[Cred],
        sources: Arc<SourceAddrs>,
        opts: FleetOpts,
    ) -> Fleet {
        let endpoint = Arc::new(endpoint);
        let devices = creds.iter().map(|c| (endpoint.clone(), c.clone()));
        Fleet::spawn_assigned(devices, sources, opts)
    }

    /// Like [`Fleet::spawn`], each device to the endpoint it is paired with (a cluster's nodes).
    pub fn spawn_assigned(
        devices: impl IntoIterator<Item = (Arc<Endpoint>, Cred)>,
        sources: Arc<SourceAddrs>,
        opts: FleetOpts,
    ) -> Fleet {
        let stats = Arc::new(FleetStats::default());
        let cancel = CancellationToken::new();
        let sem = Arc::new(Semaphore::new(opts.concurrency.max(1)));
        let mut tasks = JoinSet::new();
        for (endpoint, cred) in devices {
            let d = Device {
                cred,
                endpoint,
                sources: sources.clone(),
                sem: sem.clone(),
                stats: stats.clone(),
                cancel: cancel.clone(),
                opts,
            };
            tasks.spawn(d.run());
        }
        Fleet {
            tasks,
            stats,
            cancel,
            started: Instant::now(),
        }
    }

    /// From now on CONNACKs count in `epoch`.
    pub fn set_epoch(&self, epoch: usize) {
        assert!(epoch < EPOCHS, "epoch {epoch} out of range");
        self.stats.epoch.store(epoch, Ordering::Release);
    }

    /// Polls until `done` holds; `false` if `timeout` passed first.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&FleetStats) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(&self.stats) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Cancels every device (sessions are dropped) and waits for the tasks (bounded).
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        let joined = tokio::time::timeout(SHUTDOWN_TIMEOUT, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if joined.is_err() {
            self.tasks.abort_all();
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.cancel.cancel();
        self.tasks.abort_all();
    }
}

struct Device {
    cred: Cred,
    endpoint: Arc<Endpoint>,
    sources: Arc<SourceAddrs>,
    sem: Arc<Semaphore>,
    stats: Arc<FleetStats>,
    cancel: CancellationToken,
    opts: FleetOpts,
}

impl Device {
    async fn run(self) {
        let mut counted_epoch = usize::MAX;
        let mut attempt: u32 = 0;
        loop {
            let Some(result) = self.connect_once().await else {
                return; // cancelled
            };
            match result {
                Ok(conn) => {
                    attempt = 0;
                    let epoch = self.stats.epoch.load(Ordering::Acquire);
                    if counted_epoch != epoch {
                        counted_epoch = epoch;
                        self.stats.connacked[epoch].fetch_add(1, Ordering::AcqRel);
                    }
                    self.stats.connected_now.fetch_add(1, Ordering::AcqRel);
                    let cancelled = self.hold(conn).await;
                    self.stats.connected_now.fetch_sub(1, Ordering::AcqRel);
                    if cancelled {
                        return;
                    }
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    if !self.opts.reconnect {
                        return;
                    }
                }
                Err(e) => {
                    self.stats.connect_errors.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut first) = self.stats.first_error.lock() {
                        first.get_or_insert_with(|| format!("{}: {e:#}", self.cred.id));
                    }
                    attempt += 1;
                    if !self.opts.reconnect && attempt >= self.opts.attempts_max {
                        self.stats.failed.fetch_add(1, Ordering::AcqRel);
                        return;
                    }
                    let sleep = backoff(attempt);
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(sleep) => {}
                    }
                }
            }
        }
    }

    /// One connect attempt under the concurrency limit; `None` when cancelled.
    async fn connect_once(&self) -> Option<anyhow::Result<Conn>> {
        let _permit = tokio::select! {
            _ = self.cancel.cancelled() => return None,
            p = self.sem.acquire() => p.ok()?,
        };
        let config = match self.endpoint.tls_config(&self.cred) {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let connect = async {
            let mut conn = client::connect(
                &self.endpoint,
                config,
                &self.cred.id,
                self.sources.next(),
                self.opts.keepalive_secs,
            )
            .await?;
            if self.opts.respond_to_commands {
                conn.subscribe(&format!("devices/{}/commands/+", self.cred.id), 1)
                    .await?;
            }
            anyhow::Ok(conn)
        };
        tokio::select! {
            _ = self.cancel.cancelled() => None,
            r = connect => Some(r),
        }
    }

    /// Holds an idle session, pinging at ¾ of the keep-alive; `true` if cancelled, `false` if closed.
    async fn hold(&self, mut conn: Conn) -> bool {
        let ping_every = Duration::from_secs(u64::from(self.opts.keepalive_secs.max(4)) * 3 / 4);
        let commands = format!("devices/{}/commands/", self.cred.id);
        let mut packet_id: u16 = 1;
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return true,
                r = conn.read_packet() => match r {
                    Ok(Some(Packet::Publish { topic, qos, packet_id: id })) => {
                        if qos > 0 {
                            conn.queue_puback(id);
                        }
                        let is_command = topic
                            .strip_prefix(&commands)
                            .is_some_and(|cmd| !cmd.is_empty() && !cmd.contains('/'));
                        if self.opts.respond_to_commands && is_command {
                            packet_id = packet_id.checked_add(1).unwrap_or(1);
                            conn.queue_publish(&format!("{topic}/result"), COMMAND_RESULT, 1, packet_id);
                        }
                        if conn.flush().await.is_err() {
                            return false;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => return false,
                },
                _ = tokio::time::sleep(ping_every) => {
                    conn.queue_pingreq();
                    if conn.flush().await.is_err() {
                        return false;
                    }
                }
            }
        }
    }
}

/// Full-jitter exponential backoff for retry `attempt` (1-based).
pub fn backoff(attempt: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16));
    let cap = exp.min(BACKOFF_CAP);
    let ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(rand::rng().random_range(0..ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_bounded_by_the_cap() {
        for attempt in 1..40 {
            assert!(backoff(attempt) < BACKOFF_CAP);
        }
        assert!(backoff(1) < BACKOFF_BASE * 2);
    }
}
