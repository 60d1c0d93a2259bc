//! The in-memory network: [`Net`] (the current broker), each device's [`DeviceLink`] (cuts,
//! outages, latency) and the [`SimConnector`] whose streams go through it.

use super::{inc, Stats};
use crate::clock::VirtualClock;
use futures::task::AtomicWaker;
use mooring_broker::{Broker, ConnInfo, ListenerKind};
use mooring_proto::sync::{lock, read, write};
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bytes buffered in each direction of an in-memory connection (allocated as used).
pub const PIPE_SIZE_BYTES: usize = 8 * 1024;
/// Bytes read at once from the pipe when latency is simulated (one chunk is delayed at a time).
pub const LATENCY_CHUNK_BYTES: usize = 2 * 1024;

/// The in-memory network between the devices and the (current) server, or the nodes of an
/// in-process cluster.
pub struct Net {
    /// Each node's broker (one for a single server), `None` while it is down.
    nodes: RwLock<Vec<Option<NodeLink>>>,
    /// The broker's side of every device connection.
    conns: TaskTracker,
    pub clock: VirtualClock,
    pub stats: Arc<Stats>,
}

/// A node on the network: its broker, and the token that drops every connection to it at once
/// when it is killed.
struct NodeLink {
    broker: Broker,
    killed: CancellationToken,
    /// The node's HTTP API (its router, called in process), for OTA downloads.
    http: Option<axum::Router>,
}

impl Net {
    /// A network with `nodes` server slots (1 for a single server), all down.
    pub fn new(clock: VirtualClock, stats: Arc<Stats>, nodes: usize) -> Self {
        Self {
            nodes: RwLock::new((0..nodes.max(1)).map(|_| None).collect()),
            conns: TaskTracker::new(),
            clock,
            stats,
        }
    }

    /// The single server's broker (slot 0); `None` while it is down.
    pub fn set_broker(&self, broker: Option<Broker>) {
        self.set_node(0, broker);
    }

    /// Node `i`'s broker (0-based slot); `None` while it is down. Connections to a broker that
    /// is replaced or removed here stay until it closes them (a graceful shutdown).
    pub fn set_node(&self, i: usize, broker: Option<Broker>) {
        if let Some(slot) = write(&self.nodes).get_mut(i) {
            *slot = broker.map(|broker| NodeLink {
                broker,
                killed: CancellationToken::new(),
                http: None,
            });
        }
    }

    /// Node `i`'s HTTP API (set after [`Net::set_node`]; gone with the node).
    pub fn set_http(&self, i: usize, router: axum::Router) {
        if let Some(Some(node)) = write(&self.nodes).get_mut(i) {
            node.http = Some(router);
        }
    }

    /// The HTTP API device `index` reaches (the node [`Net::route`] picks), if it is up.
    pub fn http_route(&self, index: usize) -> Option<axum::Router> {
        let (slot, _, _) = self.route(index)?;
        read(&self.nodes).get(slot)?.as_ref()?.http.clone()
    }

    /// Takes node `i` off the network and drops every connection to it where it is, as the
    /// death of its process would: the devices see their connection end.
    pub fn kill_node(&self, i: usize) {
        let link = write(&self.nodes).get_mut(i).and_then(Option::take);
        if let Some(link) = link {
            link.killed.cancel();
        }
    }

    /// Where device `index` connects: its home node (`index % nodes`) while that is up, else
    /// one of the live nodes (spread by index), as a load balancer would. The slot, the broker
    /// and the node's kill token.
    fn route(&self, index: usize) -> Option<(usize, Broker, CancellationToken)> {
        let nodes = read(&self.nodes);
        let n = nodes.len();
        let pick = |i: usize| {
            nodes[i]
                .as_ref()
                .map(|l| (i, l.broker.clone(), l.killed.clone()))
        };
        if let Some(home) = pick(index % n) {
            return Some(home);
        }
        let live: Vec<usize> = (0..n).filter(|i| nodes[*i].is_some()).collect();
        if live.is_empty() {
            return None;
        }
        pick(live[(index / n) % live.len()])
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
    /// Virtual ms since which the run waits for this device to be accepted by the server again
    /// (0: not waiting); see [`DeviceLink::await_reconnect`].
    reconnect_since_ms: AtomicU64,
    /// `(since_ms, accepted_at_ms)` of every wait that ended: one per `cut_link`,
    /// `restart_server` or `kill_node` event at most, so bounded by the scenario's events.
    reconnects: Mutex<Vec<(u64, u64)>>,
    /// The node slot + 1 of the last stream opened (0: none yet).
    node: AtomicUsize,
    /// An enrolled device's certificate; `None`: the simulated certificate the harness
    /// registered.
    identity: Mutex<Option<Certificate>>,
}

/// A certificate as the broker sees it after a verified TLS handshake.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// Its CN.
    pub cn: String,
    /// Lowercase hex SHA-256 of its DER.
    pub sha256: String,
    pub der: Arc<[u8]>,
}

impl DeviceLink {
    pub(super) fn new(id: String, latency_ms: u64) -> Self {
        Self {
            id,
            epoch: AtomicU64::new(1),
            open_epoch: AtomicU64::new(0),
            down_until_ms: AtomicU64::new(0),
            waker: AtomicWaker::new(),
            rtt: Duration::from_millis(latency_ms.saturating_mul(2)),
            reconnect_since_ms: AtomicU64::new(0),
            reconnects: Mutex::new(Vec::new()),
            node: AtomicUsize::new(0),
            identity: Mutex::new(None),
        }
    }

    /// The enrolled certificate connections present (CN, SHA-256 of the DER), if any.
    pub fn identity(&self) -> Option<(String, String)> {
        lock(&self.identity)
            .as_ref()
            .map(|c| (c.cn.clone(), c.sha256.clone()))
    }

    /// From now on, connections present this certificate.
    pub fn set_identity(&self, cert: Certificate) {
        *lock(&self.identity) = Some(cert);
    }

    /// The node slot (0-based) this device's open connection goes to; `None` when no
    /// connection is open.
    pub fn connected_node(&self) -> Option<usize> {
        let open = self.open_epoch.load(Ordering::Relaxed);
        if open == 0 || open != self.epoch.load(Ordering::Relaxed) {
            return None;
        }
        self.node.load(Ordering::Relaxed).checked_sub(1)
    }

    /// From `since_ms` (virtual ms since the start) on, note when the server next accepts a
    /// connection of this device ([`DeviceLink::reconnected_after`]). A later call replaces a
    /// wait that has not ended.
    pub fn await_reconnect(&self, since_ms: u64) {
        self.reconnect_since_ms
            .store(since_ms.max(1), Ordering::Relaxed);
    }

    /// When the server first accepted this device's connection at or after `since_ms`, if it
    /// did (for a wait started with [`DeviceLink::await_reconnect`]`(since_ms)`).
    pub fn reconnected_after(&self, since_ms: u64) -> Option<u64> {
        lock(&self.reconnects)
            .iter()
            .find(|(since, _)| *since == since_ms.max(1))
            .map(|(_, at)| *at)
    }

    /// The server accepted a connection of this device (its CONNACK said so) at `now_ms`.
    fn accepted(&self, now_ms: u64) {
        let since = self.reconnect_since_ms.load(Ordering::Relaxed);
        if since == 0 || now_ms < since {
            return;
        }
        if self
            .reconnect_since_ms
            .compare_exchange(since, 0, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            lock(&self.reconnects).push((since, now_ms));
        }
    }

    /// Bumped by every cut: a transfer that began under another epoch was cut.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Whether connections are refused at `now_ms` (virtual ms since the start).
    pub fn is_down(&self, now_ms: u64) -> bool {
        self.down_until_ms.load(Ordering::Relaxed) > now_ms
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
    /// The device's index in the run (which node it prefers, see [`Net`]).
    pub index: usize,
    pub link: Arc<DeviceLink>,
    pub net: Arc<Net>,
    /// Remote mode: TCP + TLS with the device's certificate instead of the in-process broker.
    pub tls: Option<mooring_agent::transport::TlsConnector>,
    /// A claim session (enrollment): no client certificate; the claim is in the CONNECT.
    pub claim: bool,
    /// An enrolling device's pipeline: where its steps are noted and its faults fire.
    pub probe: Option<Arc<super::EnrollProbe>>,
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
                let Some((node, broker, killed)) = self.net.route(self.index) else {
                    return Err(io::ErrorKind::ConnectionRefused.into());
                };
                let (device_end, server_end) = tokio::io::duplex(PIPE_SIZE_BYTES);
                let (cert_identity, cert_sha256, cert_der) = if self.claim {
                    (None, None, None)
                } else {
                    match lock(&self.link.identity).clone() {
                        Some(c) => (Some(c.cn), Some(c.sha256), Some(c.der)),
                        None => (
                            Some(self.link.id.clone()),
                            Some(crate::harness::sim_cert_sha256(&self.link.id)),
                            None,
                        ),
                    }
                };
                let info = ConnInfo {
                    peer: None,
                    cert_identity,
                    cert_sha256,
                    cert_der,
                    listener: ListenerKind::Tls,
                };
                self.net.conns.spawn(async move {
                    tokio::select! {
                        biased;
                        // The node was killed: the connection ends where it is (the server's
                        // end of the pipe is dropped; nothing of the broker's cleanup runs).
                        () = killed.cancelled() => {}
                        () = broker.serve_connection(server_end, info) => {}
                    }
                });
                self.link.node.store(node + 1, Ordering::Relaxed);
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
            clock: self.net.clock,
            epoch,
            observed: false,
            delay,
            connack: ConnackWatch::default(),
            claim: self.claim,
            probe: self.probe.clone(),
            tail: Vec::new(),
            answered: false,
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
    clock: VirtualClock,
    epoch: u64,
    observed: bool,
    delay: Option<Box<Delay>>,
    connack: ConnackWatch,
    /// A claim session (see [`SimConnector::claim`]).
    claim: bool,
    probe: Option<Arc<super::EnrollProbe>>,
    /// Claim session: the last bytes received, so a topic split over two reads is seen.
    tail: Vec<u8>,
    /// Claim session: the accepted answer was seen on this connection.
    answered: bool,
}

/// The first four bytes the device receives on a connection: an MQTT 3.1.1 server sends its
/// CONNACK first (`0x20 0x02 <flags> <return code>`), so they say whether (and when) the server
/// accepted the connection.
#[derive(Default)]
struct ConnackWatch {
    head: [u8; 4],
    len: usize,
}

impl ConnackWatch {
    /// Feeds received bytes; true once, when they complete a CONNACK that accepts.
    fn feed(&mut self, bytes: &[u8]) -> bool {
        if self.len == self.head.len() || bytes.is_empty() {
            return false;
        }
        let n = bytes.len().min(self.head.len() - self.len);
        self.head[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self.len == self.head.len()
            && self.head[0] == 0x20
            && self.head[1] == 2
            && self.head[3] == 0
    }
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
        let before = out.filled().len();
        let polled = self.as_mut().poll_read_link(cx, out);
        let this = &mut *self;
        if matches!(polled, Poll::Ready(Ok(()))) && this.connack.feed(&out.filled()[before..]) {
            let now_ms = this.clock.elapsed_ms();
            this.link.accepted(now_ms);
            if let (Some(p), false) = (&this.probe, this.claim) {
                p.reached(super::enroll::STEP_FIRST_CONNECT, now_ms);
            }
        }
        if let (Some(p), true, Poll::Ready(Ok(()))) = (this.probe.clone(), this.claim, &polled) {
            if !this.answered {
                let new = &out.filled()[before..];
                this.tail.extend_from_slice(new);
                if p.is_accepted(&this.tail) {
                    this.answered = true;
                    if p.drop_before_reply.swap(false, Ordering::Relaxed) {
                        // The server answered; the answer is lost with the link.
                        inc(&this.stats.enroll_drops_before_reply);
                        p.fire(super::enroll::FAULT_BEFORE_REPLY);
                        out.set_filled(before);
                        this.link.cut(0, &this.stats);
                        this.observed = true;
                        inc(&this.stats.cuts_observed);
                        return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
                    }
                    if p.kill_before_store.swap(false, Ordering::Relaxed) {
                        p.kill_now();
                    }
                }
                let keep = p.topic_tail_len();
                if this.tail.len() > keep {
                    this.tail.drain(..this.tail.len() - keep);
                }
            }
        }
        polled
    }
}

impl SimStream {
    /// Reads through the link: fails once it is cut, delays by its latency.
    fn poll_read_link(
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
        if let (Some(p), true) = (self.probe.clone(), self.claim) {
            if p.is_request(buf) {
                if p.drop_before_request.swap(false, Ordering::Relaxed) {
                    // The link drops as the request goes out: the server never gets it.
                    inc(&self.stats.enroll_drops_before_request);
                    p.fire(super::enroll::FAULT_BEFORE_REQUEST);
                    self.link.cut(0, &self.stats);
                    self.observed = true;
                    inc(&self.stats.cuts_observed);
                    return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
                }
                let written = Pin::new(&mut self.inner).poll_write(cx, buf);
                if matches!(written, Poll::Ready(Ok(_))) {
                    p.reached(super::enroll::STEP_REQUEST, self.clock.elapsed_ms());
                }
                return written;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_accepting_connack_is_seen_across_chunks_and_only_once() {
        let mut w = ConnackWatch::default();
        assert!(!w.feed(&[0x20]));
        assert!(!w.feed(&[0x02, 0x00]));
        assert!(w.feed(&[0x00, 0x30, 0x01]), "CONNACK, return code 0");
        assert!(
            !w.feed(&[0x20, 0x02, 0x00, 0x00]),
            "only the first packet counts"
        );
        let mut refused = ConnackWatch::default();
        assert!(!refused.feed(&[0x20, 0x02, 0x00, 0x05]), "not authorized");
    }
}
