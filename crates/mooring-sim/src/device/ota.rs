//! A simulated device's A/B updater (issue 17): in-memory slots and journal that live on the
//! device's "flash" (they survive power losses and reboots, as partitions and a bootloader
//! environment would), and the [`SimPlatform`] the agent's real updater runs on: downloads
//! through the in-process server's HTTP router (the production download handler: token,
//! `Range`, `[ota] downloads_max`) over the device's link at the cohort's speed, broken by
//! link cuts; a reboot of the simulated device; the cohort's battery model; trial-boot checks
//! that fail for the cohort's bad versions.

use super::{derive_seed, inc, DeviceLink, DeviceState, Net, Stats};
use crate::scenario::CohortOta;
use mooring_agent::ota::{Body, FetchError, MemSlots, MemUpdateFiles, Platform, Power, Slots as _};
use mooring_proto::ota::Link;
use mooring_proto::sync::lock;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use sha2::Digest as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Size of the image every updating device ships with in slot A.
pub const FACTORY_IMAGE_BYTES: u64 = 1024;
/// Bytes a simulated download delivers at a time (each delayed by the link's speed).
pub const DOWNLOAD_CHUNK_BYTES: usize = 4 * 1024;
/// No power loss planned (or the planned one is spent).
const NO_LOSS: u64 = u64::MAX;

const SALT_OTA: u64 = 5;

/// The deterministic bytes of a firmware image: `version` at `size_bytes`, from the run's seed
/// (the run makes the artifacts and the devices' factory images with it, so it knows every
/// whole image's hash).
pub fn image_bytes(seed: u64, version: &str, size_bytes: u64) -> Vec<u8> {
    let mut h = sha2::Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(version.as_bytes());
    let mut rng = StdRng::from_seed(h.finalize().into());
    let mut out = vec![0u8; size_bytes as usize];
    rng.fill(&mut out[..]);
    out
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The updater's state on one device: what survives its reboots and power losses.
pub struct DeviceOta {
    pub model: CohortOta,
    pub slots: MemSlots,
    pub files: MemUpdateFiles,
    /// The version slot A shipped with.
    pub factory_version: String,
    /// Set by the updater's reboot; the device task reboots the device.
    pub reboot: tokio::sync::Notify,
    /// The battery level in percent (f64 bits; NaN without a battery model), kept by the device
    /// task.
    battery_bits: AtomicU64,
    /// This device loses power this long after its first download opens (drawn up front), if
    /// it is one of the cohort's `power_loss_rate`.
    loss_after_ms: Option<u64>,
    /// When (virtual ms since the start) the planned loss fires; [`NO_LOSS`] until planned.
    pub power_loss_at_ms: AtomicU64,
    planned: AtomicBool,
    /// Reboots the updater asked for.
    pub reboots: AtomicU64,
}

impl DeviceOta {
    pub fn new(model: &CohortOta, version: &str, seed: u64, index: u64) -> Self {
        let image = image_bytes(seed, version, FACTORY_IMAGE_BYTES);
        let mut rng = StdRng::seed_from_u64(derive_seed(seed, index, SALT_OTA));
        let hit = rng.random_bool(model.power_loss_rate.clamp(0.0, 1.0));
        let after = rng.random_range(0..model.power_loss_within.0.max(1));
        Self {
            model: model.clone(),
            slots: MemSlots::new(Some(version.to_owned()), image, Power::on()),
            files: MemUpdateFiles::new(Power::on()),
            factory_version: version.to_owned(),
            reboot: tokio::sync::Notify::new(),
            battery_bits: AtomicU64::new(f64::NAN.to_bits()),
            loss_after_ms: hit.then_some(after),
            power_loss_at_ms: AtomicU64::new(NO_LOSS),
            planned: AtomicBool::new(false),
            reboots: AtomicU64::new(0),
        }
    }

    pub fn set_battery(&self, pct: Option<f64>) {
        self.battery_bits
            .store(pct.unwrap_or(f64::NAN).to_bits(), Ordering::Relaxed);
    }

    fn battery(&self) -> Option<f64> {
        let v = f64::from_bits(self.battery_bits.load(Ordering::Relaxed));
        (!v.is_nan()).then_some(v)
    }

    /// The planned power loss, if it is due at `now_ms`: taken (it fires once).
    pub fn take_due_loss(&self, now_ms: u64) -> bool {
        let at = self.power_loss_at_ms.load(Ordering::Relaxed);
        at != NO_LOSS
            && now_ms >= at
            && self
                .power_loss_at_ms
                .compare_exchange(at, NO_LOSS, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// When the planned loss fires (virtual ms since the start), if one is planned.
    pub fn loss_at_ms(&self) -> Option<u64> {
        let at = self.power_loss_at_ms.load(Ordering::Relaxed);
        (at != NO_LOSS).then_some(at)
    }

    /// The phase of the update in progress (`None` when none is, or it is done).
    pub fn phase_in_progress(&self) -> Option<String> {
        use mooring_agent::ota::UpdateFiles as _;
        let job = self.files.load_journal().ok()??;
        (!job.phase.is_done()).then(|| job.phase.state().as_str().to_owned())
    }

    /// The version the device committed (the slot it boots when no trial is pending).
    pub fn committed_version(&self) -> Option<String> {
        let c = self.slots.control();
        c.info(c.committed).version.clone()
    }

    /// The version the slots run now.
    pub fn running_version(&self) -> Option<String> {
        let c = self.slots.control();
        c.info(c.running()).version.clone()
    }
}

/// What the agent's updater runs on in the simulator (module doc).
pub struct SimPlatform {
    pub dev: Arc<DeviceState>,
    pub net: Arc<Net>,
}

impl SimPlatform {
    fn ota(&self) -> Option<&DeviceOta> {
        self.dev.ota.as_ref()
    }
}

#[async_trait::async_trait]
impl Platform for SimPlatform {
    async fn open(&self, link: &Link, offset: u64) -> Result<Box<dyn Body>, FetchError> {
        let Some(ota) = self.ota() else {
            return Err(FetchError::Fatal("no updater".into()));
        };
        let stats = &self.net.stats;
        let now_ms = self.net.clock.elapsed_ms();
        if self.dev.link.is_down(now_ms) {
            return Err(FetchError::Transient("sim: the link is down".into()));
        }
        let Some(router) = self.net.http_route(self.dev.index) else {
            return Err(FetchError::Transient("sim: the server is down".into()));
        };
        let path = link
            .url
            .find("/api/")
            .map_or(link.url.as_str(), |i| &link.url[i..]);
        let mut req = axum::http::Request::get(path)
            .header(
                axum::http::header::AUTHORIZATION,
                format!("Bearer {}", link.token),
            )
            .body(axum::body::Body::empty())
            .map_err(|e| FetchError::Fatal(format!("sim: {e}")))?;
        if offset > 0 {
            let v = axum::http::HeaderValue::from_str(&format!("bytes={offset}-"))
                .map_err(|e| FetchError::Fatal(format!("sim: {e}")))?;
            req.headers_mut().insert(axum::http::header::RANGE, v);
        }
        // The download handler reads the peer address like every route: a loopback device.
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                40_000,
            ))));
        let epoch = self.dev.link.epoch();
        let resp = tower::ServiceExt::oneshot(router, req)
            .await
            .map_err(|e| FetchError::Transient(format!("sim: {e}")))?;
        let header = |name: axum::http::HeaderName| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let length = header(axum::http::header::CONTENT_LENGTH).and_then(|v| v.parse().ok());
        let range = header(axum::http::header::CONTENT_RANGE);
        let status = resp.status().as_u16();
        let total = match mooring_agent::ota::fetch::answer(
            status,
            range.as_deref(),
            length,
            offset,
            &link.url,
        ) {
            Ok(total) => total,
            Err(e) => {
                if matches!(e, FetchError::Busy(_)) {
                    inc(&stats.ota_downloads_busy);
                }
                return Err(e);
            }
        };
        inc(&stats.ota_downloads);
        // The planned power loss counts from the first download that started.
        if let Some(after) = ota.loss_after_ms {
            if !ota.planned.swap(true, Ordering::Relaxed) {
                ota.power_loss_at_ms
                    .store(now_ms.saturating_add(after), Ordering::Relaxed);
            }
        }
        if offset > 0 {
            inc(&stats.ota_downloads_resumed);
        }
        Ok(Box::new(SimBody {
            stream: Box::pin(resp.into_body().into_data_stream()),
            pending: Vec::new(),
            at: 0,
            total,
            link: self.dev.link.clone(),
            epoch,
            bytes_per_s: ota.model.download_bytes_per_s,
            stats: self.net.stats.clone(),
        }))
    }

    async fn reboot(&self) {
        if let Some(ota) = self.ota() {
            ota.reboots.fetch_add(1, Ordering::Relaxed);
            inc(&self.net.stats.ota_reboots);
            ota.reboot.notify_one();
            // The device task takes the agent down; this never returns.
            std::future::pending::<()>().await;
        }
    }

    fn battery_pct(&self) -> Option<f64> {
        self.ota().and_then(DeviceOta::battery)
    }

    async fn health_check(&self) -> Result<(), String> {
        let Some(ota) = self.ota() else {
            return Ok(());
        };
        match ota.running_version() {
            Some(v) if ota.model.fails_health.contains(&v) => Err(format!(
                "sim: version {v} fails its checks on hardware {}",
                ota.model.hw_revision
            )),
            _ => Ok(()),
        }
    }
}

type DataStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<axum::body::Bytes, axum::Error>> + Send>>;

/// A download in flight over the device's link: delivered [`DOWNLOAD_CHUNK_BYTES`] at a time at
/// the cohort's speed; fails once the link is cut.
struct SimBody {
    stream: DataStream,
    pending: Vec<u8>,
    at: usize,
    total: Option<u64>,
    link: Arc<DeviceLink>,
    epoch: u64,
    bytes_per_s: u64,
    stats: Arc<Stats>,
}

impl SimBody {
    fn cut(&self) -> Option<FetchError> {
        (self.link.epoch() != self.epoch).then(|| {
            inc(&self.stats.ota_downloads_cut);
            FetchError::Transient("sim: the link was cut".into())
        })
    }
}

#[async_trait::async_trait]
impl Body for SimBody {
    fn total(&self) -> Option<u64> {
        self.total
    }

    async fn chunk(&mut self) -> Result<Option<Vec<u8>>, FetchError> {
        use futures::StreamExt as _;
        if let Some(e) = self.cut() {
            return Err(e);
        }
        if self.at >= self.pending.len() {
            match self.stream.next().await {
                None => return Ok(None),
                Some(Err(e)) => return Err(FetchError::Transient(format!("sim: {e}"))),
                Some(Ok(b)) => {
                    self.pending = b.to_vec();
                    self.at = 0;
                }
            }
        }
        let end = (self.at + DOWNLOAD_CHUNK_BYTES).min(self.pending.len());
        let piece = self.pending[self.at..end].to_vec();
        self.at = end;
        let ms = (piece.len() as u64 * 1000).div_ceil(self.bytes_per_s.max(1));
        tokio::time::sleep(Duration::from_millis(ms)).await;
        // A cut while the bytes were on the way loses them.
        if let Some(e) = self.cut() {
            return Err(e);
        }
        Ok(Some(piece))
    }
}

/// Power losses that hit an update, by the phase they interrupted.
#[derive(Debug, Default)]
pub struct LossesByPhase(pub Mutex<std::collections::BTreeMap<String, u64>>);

impl LossesByPhase {
    pub fn add(&self, phase: &str) {
        *lock(&self.0).entry(phase.to_owned()).or_default() += 1;
    }
}
