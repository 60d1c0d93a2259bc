//! Devices that start unenrolled (a cohort's `enroll`): the agent's real `enroll` (key →
//! request → certificate, resumable from the device's state dir) over a claim session, then
//! the normal agent with the certificate it received.
//!
//! [`EnrollProbe`] is the device's view of its pipeline: when each step was reached (virtual
//! ms) and the faults planned for it. The faults fire in the device's stream
//! (`link.rs`), where the bytes of the request and of the answer pass: the link drops before
//! the request reaches the server, or after the server answered and before the answer reaches
//! the device; the process is killed after the answer arrived and before the certificate is
//! stored; the link is down when the device first connects with its certificate.

use super::{derive_seed, inc, CohortModel, DeviceState, Net, SimConnector};
use crate::scenario::Enroll;
use mooring_agent::enroll::{EnrollConfig, EnrollError};
use mooring_proto::sync::lock;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// The funnel's steps, in the order they happen: the server registers the device when it
/// issues the certificate, before the answer reaches the device.
pub const STEPS: [&str; 6] = [
    "key_made",
    "request_sent",
    "registered",
    "certificate_received",
    "first_connect",
    "first_telemetry",
];
pub const STEP_KEY: usize = 0;
pub const STEP_REQUEST: usize = 1;
pub const STEP_REGISTERED: usize = 2;
pub const STEP_CERT: usize = 3;
pub const STEP_FIRST_CONNECT: usize = 4;
pub const STEP_FIRST_TELEMETRY: usize = 5;

/// The enrollment faults (names as in the report's fault table), by bit of
/// [`EnrollProbe::fired`].
pub const FAULTS: [&str; 4] = [
    "enroll: link drop before the request",
    "enroll: link drop after the request, before the reply",
    "enroll: process kill after the reply, before storing",
    "enroll: link down before the first connect",
];
pub(super) const FAULT_BEFORE_REQUEST: u8 = 1;
pub(super) const FAULT_BEFORE_REPLY: u8 = 2;
pub(super) const FAULT_KILL_BEFORE_STORE: u8 = 4;
const FAULT_BEFORE_FIRST_CONNECT: u8 = 8;

const SALT_ENROLL_FAULTS: u64 = 5;
const SALT_ENROLL: u64 = 6;

/// One enrolling device's pipeline.
pub struct EnrollProbe {
    /// Index of the claim it enrolls with.
    pub claim: usize,
    token: String,
    pub state_dir: PathBuf,
    request_topic: Vec<u8>,
    accepted_topic: Vec<u8>,
    /// Planned faults, each fired once (cleared when it fires).
    pub(super) drop_before_request: AtomicBool,
    pub(super) drop_before_reply: AtomicBool,
    pub(super) kill_before_store: AtomicBool,
    drop_before_first_connect: AtomicBool,
    /// The faults that fired (bits: 1 << index in [`FAULTS`]).
    fired: AtomicU8,
    /// Fired by the stream: the process dies now.
    kill: Notify,
    /// Virtual ms + 1 at which each of [`STEPS`] was first reached (0: not reached).
    steps: [AtomicU64; STEPS.len()],
    /// The final refusal that ended the enrollment, if one did.
    pub refusal: Mutex<Option<String>>,
    /// Times the process was killed during the enrollment and resumed.
    pub restarts: AtomicU64,
}

impl EnrollProbe {
    /// The probe of device `index` (id `id`) enrolling with claim `claim` (`token`), its state
    /// in `state_dir`, with faults drawn from (`seed`, `index`) at `spec.fault_rate`.
    pub fn new(
        id: &str,
        index: usize,
        claim: usize,
        token: String,
        state_dir: PathBuf,
        spec: &Enroll,
        seed: u64,
    ) -> Self {
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, index as u64, SALT_ENROLL_FAULTS));
        let mut draw = || AtomicBool::new(rng.random_bool(spec.fault_rate.clamp(0.0, 1.0)));
        Self {
            claim,
            token,
            state_dir,
            request_topic: mooring_proto::provision::request_topic(id).into_bytes(),
            accepted_topic: mooring_proto::provision::accepted_topic(id).into_bytes(),
            drop_before_request: draw(),
            drop_before_reply: draw(),
            kill_before_store: draw(),
            drop_before_first_connect: draw(),
            fired: AtomicU8::new(0),
            kill: Notify::new(),
            steps: Default::default(),
            refusal: Mutex::new(None),
            restarts: AtomicU64::new(0),
        }
    }

    /// Notes that step `i` was reached at `ms` (virtual ms since the start), unless it was
    /// reached before.
    pub fn reached(&self, i: usize, ms: u64) {
        if let Some(s) = self.steps.get(i) {
            let _ = s.compare_exchange(0, ms + 1, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// When step `i` was first reached (virtual ms since the start).
    pub fn reached_at(&self, i: usize) -> Option<u64> {
        self.steps.get(i)?.load(Ordering::Relaxed).checked_sub(1)
    }

    /// Notes that a fault (one of the `FAULT_` bits) fired.
    pub(super) fn fire(&self, bit: u8) {
        self.fired.fetch_or(bit, Ordering::Relaxed);
    }

    /// Whether fault `i` (index in [`FAULTS`]) fired for this device.
    pub fn fired(&self, i: usize) -> bool {
        self.fired.load(Ordering::Relaxed) & (1 << i) != 0
    }

    pub(super) fn is_request(&self, bytes: &[u8]) -> bool {
        contains(bytes, &self.request_topic)
    }

    pub(super) fn is_accepted(&self, bytes: &[u8]) -> bool {
        contains(bytes, &self.accepted_topic)
    }

    /// The device's process dies now (the device task drops the enrollment where it is).
    pub(super) fn kill_now(&self) {
        self.kill.notify_one();
    }

    /// Bytes of an accepted-answer topic that may straddle two reads.
    pub(super) fn topic_tail_len(&self) -> usize {
        self.accepted_topic.len().saturating_sub(1)
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The device's certificate as the broker sees it after a verified TLS handshake: its CN, the
/// SHA-256 of its DER and the DER.
fn identity_of(cert_path: &std::path::Path) -> anyhow::Result<super::link::Certificate> {
    let pem = std::fs::read(cert_path)?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: not PEM: {e}", cert_path.display()))?;
    let der = rustls_pki_types::CertificateDer::from(pem.contents.clone());
    let cn = mooring_agent::transport::device_id_from_cert(&der)?;
    Ok(super::link::Certificate {
        cn: cn.into_string(),
        sha256: mooring_server::pki::cert_sha256_hex(&pem.contents),
        der: Arc::from(pem.contents.as_slice()),
    })
}

/// Enrolls the device (resuming from its state dir after each kill) and leaves its link with the
/// identity of the certificate it stored. False when the enrollment ended refused (the reason
/// is in the probe): the device then never runs its agent.
pub async fn enroll_device(
    dev: &Arc<DeviceState>,
    model: &CohortModel,
    net: &Arc<Net>,
    seed: u64,
) -> bool {
    let (Some(p), Some(spec)) = (dev.enroll.clone(), model.cohort.enroll.as_ref()) else {
        return true;
    };
    let stats = net.stats.clone();
    let config = EnrollConfig {
        // Only read if the server's answer carried no trust bundle (it always does).
        ca_path: p.state_dir.join("operator-ca.pem"),
        claim_token: p.token.clone(),
        state_dir: p.state_dir.clone(),
        device_id: Some(dev.id.clone()),
        key: None,
    };
    let fail = |why: String| {
        tracing::debug!(device = %dev.id, why, "enrollment ended");
        *lock(&p.refusal) = Some(why);
        false
    };
    let mut attempt = 0u64;
    loop {
        // The agent's own first step (enroll() finds the key and reuses it).
        if let Err(e) = std::fs::create_dir_all(&p.state_dir) {
            return fail(format!("local: {e}"));
        }
        if let Err(e) = mooring_agent::enroll::ensure_key(&p.state_dir) {
            return fail(format!("local: {e:#}"));
        }
        p.reached(STEP_KEY, net.clock.elapsed_ms());
        let connector: Arc<dyn mooring_agent::Connector> = Arc::new(SimConnector {
            index: dev.index,
            link: dev.link.clone(),
            net: net.clone(),
            tls: None,
            claim: true,
            probe: Some(p.clone()),
        });
        let rng_seed = derive_seed(seed, dev.index as u64, SALT_ENROLL + (attempt << 8));
        let run = mooring_agent::enroll::enroll(&config, move || Ok(connector), rng_seed);
        tokio::select! {
            biased;
            () = p.kill.notified() => {
                // Killed where it was: the answer arrived, the certificate is not stored.
                p.restarts.fetch_add(1, Ordering::Relaxed);
                p.fire(FAULT_KILL_BEFORE_STORE);
                inc(&stats.enroll_kills);
                attempt += 1;
                tokio::time::sleep(model.cohort.boot_delay.as_std()).await;
                continue;
            }
            r = run => match r {
                Ok(enrolled) => match identity_of(&enrolled.cert_path) {
                    Ok(identity) => {
                        dev.link.set_identity(identity);
                        p.reached(STEP_CERT, net.clock.elapsed_ms());
                        break;
                    }
                    Err(e) => return fail(format!("local: {e:#}")),
                },
                Err(EnrollError::Rejected { code, .. }) => return fail(code),
                Err(EnrollError::Refused(code)) => return fail(format!("connect_refused_{code:?}")),
                Err(EnrollError::Local(e)) => return fail(format!("local: {e:#}")),
            }
        }
    }
    if p.drop_before_first_connect.swap(false, Ordering::Relaxed) {
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, dev.index as u64, SALT_ENROLL));
        let down_ms = rng.random_range(1..=spec.first_connect_outage.0.max(1));
        inc(&stats.enroll_drops_before_first_connect);
        p.fire(FAULT_BEFORE_FIRST_CONNECT);
        dev.link.cut(net.clock.elapsed_ms() + down_ms, &net.stats);
    }
    true
}
