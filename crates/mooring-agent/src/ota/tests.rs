//! The updater under power loss at random cut points, and the refusals.

use super::update::{Body, Env, FetchError, Next, UpdateSettings, Updater, DOWNLOAD_ATTEMPTS_MAX};
use super::*;
use mooring_proto::ota::{
    reason, CancelParams, Link, Manifest, SignedManifest, StatusReport, UpdateParams, UpdateState,
};
use rand::{Rng as _, SeedableRng as _};
use ring::signature::KeyPair as _;
use std::sync::{Arc, Mutex};

const HW: &str = "rev-b";

fn sha(b: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
}

struct Key(ring::signature::Ed25519KeyPair);

impl Key {
    fn new(seed: u8) -> Self {
        Key(ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("key"))
    }
    fn public(&self) -> [u8; 32] {
        self.0.public_key().as_ref().try_into().expect("32 bytes")
    }
    fn params(&self, dep: &str, version: &str, image: &[u8], hw: &str) -> UpdateParams {
        let m = Manifest {
            v: 1,
            artifact_id: "art_0123456789abcdef".into(),
            version: version.into(),
            sha256: sha(image),
            size: image.len() as u64,
            compatible: vec![hw.into()],
            created_at: 1,
        };
        let bytes = m.to_bytes();
        UpdateParams {
            v: 1,
            deployment_id: dep.into(),
            signed: SignedManifest {
                manifest: String::from_utf8(bytes.clone()).expect("utf8"),
                signature: hex::encode(self.0.sign(&bytes).as_ref()),
            },
            link: Link {
                url: "mem://artifact".into(),
                token: "t1".into(),
                expires_at: 1_000,
            },
            allow_downgrade: false,
        }
    }
}

/// The outside world: a server holding `served` bytes, a link that drops, preconditions that
/// defer at first, a health check, the outbox (reports, spending power like any write).
struct World {
    served: Vec<u8>,
    rng: rand::rngs::StdRng,
    drop_per_chunk: f64,
    chunk_bytes: usize,
    defer_first: u32,
    precondition_calls: u32,
    healthy: bool,
    now_ms: u64,
    seq: u64,
    power: Power,
    reports: Arc<Mutex<Vec<StatusReport>>>,
    resumed_opens: u32,
    refreshed: u32,
    /// Opens answered "busy" (429/503) before the server serves.
    busy_first: u32,
}

struct MemBody {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
    drop_at: Option<usize>,
    total: u64,
}

#[async_trait::async_trait]
impl Body for MemBody {
    fn total(&self) -> Option<u64> {
        Some(self.total)
    }
    async fn chunk(&mut self) -> Result<Option<Vec<u8>>, FetchError> {
        if self.drop_at.is_some_and(|d| self.pos >= d) {
            return Err(FetchError::Transient("link lost".into()));
        }
        if self.pos >= self.data.len() {
            return Ok(None);
        }
        let end = (self.pos + self.chunk).min(self.data.len());
        let c = self.data[self.pos..end].to_vec();
        self.pos = end;
        Ok(Some(c))
    }
}

#[async_trait::async_trait]
impl Env for World {
    async fn preconditions(&mut self) -> Result<(), String> {
        self.precondition_calls += 1;
        if self.precondition_calls <= self.defer_first {
            return Err(format!("{}: 12% is below 30%", reason::BATTERY_LOW));
        }
        Ok(())
    }
    async fn open(&mut self, link: &Link, offset: u64) -> Result<Box<dyn Body>, FetchError> {
        if link.expires_at <= self.now_ms {
            return Err(FetchError::Expired("401".into()));
        }
        if self.busy_first > 0 {
            self.busy_first -= 1;
            return Err(FetchError::Busy("503 from mem://artifact".into()));
        }
        if offset > self.served.len() as u64 {
            return Err(FetchError::RangeNotSatisfiable);
        }
        if offset > 0 {
            self.resumed_opens += 1;
        }
        let data = self.served[offset as usize..].to_vec();
        let drop_at = (self.rng.random::<f64>() < self.drop_per_chunk * 4.0)
            .then(|| self.rng.random_range(0..data.len().max(1)));
        Ok(Box::new(MemBody {
            data,
            pos: 0,
            chunk: self.chunk_bytes,
            drop_at,
            total: self.served.len() as u64,
        }))
    }
    async fn refresh_link(&mut self, _d: &str, _a: &str) -> Result<Link, FetchError> {
        self.refreshed += 1;
        Ok(Link {
            url: "mem://artifact".into(),
            token: "t2".into(),
            expires_at: self.now_ms + 3_600_000,
        })
    }
    async fn health_check(&mut self) -> Result<(), String> {
        if self.healthy {
            Ok(())
        } else {
            Err("health_command exited with 1".into())
        }
    }
    fn now_ms(&self) -> u64 {
        self.now_ms
    }
    fn random_below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.rng.random_range(0..n)
        }
    }
    fn report(&mut self, mut r: StatusReport) -> std::io::Result<()> {
        self.power.spend()?;
        self.seq += 1;
        r.seq = self.seq;
        r.at = self.now_ms;
        mooring_proto::sync::lock(&self.reports).push(r);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Good,
    BadHealth,
    Tampered,
    Truncated,
}

fn settings(key: &Key) -> UpdateSettings {
    UpdateSettings {
        public_key: key.public(),
        hw_revision: HW.into(),
        allow_downgrade: false,
    }
}

/// Checks what must hold whenever the device boots: the committed slot holds the old image
/// or the verified new one under its version; an armed trial holds the verified new one.
fn check_boot(slots: &MemSlots, old: &[u8], new: &[u8], new_version: &str) {
    let c = slots.control();
    let committed = slots.image(c.committed);
    let v = c.info(c.committed).version.clone();
    assert!(
        (committed == old && v.as_deref() == Some("1.0"))
            || (committed == new && v.as_deref() == Some(new_version)),
        "the committed slot must hold a verified image: {c:?}"
    );
    if let Some(t) = c.trial {
        assert_eq!(slots.image(t), new, "only a verified image is armed");
    }
}

async fn run_one(seed: u64) -> (Kind, UpdateState, u32, u32) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let key = Key::new(7);
    let old: Vec<u8> = (0..rng.random_range(1_000..5_000))
        .map(|_| rng.random())
        .collect();
    let new: Vec<u8> = (0..rng.random_range(2_000..30_000))
        .map(|_| rng.random())
        .collect();
    let kind = [
        Kind::Good,
        Kind::Good,
        Kind::BadHealth,
        Kind::Tampered,
        Kind::Truncated,
    ][rng.random_range(0..5)];
    let mut served = new.clone();
    match kind {
        Kind::Tampered => {
            let i = rng.random_range(0..served.len());
            served[i] ^= 0x55;
        }
        Kind::Truncated => served.truncate(rng.random_range(0..new.len())),
        _ => {}
    }
    let power = Power::on();
    let slots = MemSlots::new(Some("1.0".into()), old.clone(), power.clone());
    let files = MemUpdateFiles::new(power.clone());
    let reports = Arc::new(Mutex::new(Vec::new()));
    let mut world = World {
        served,
        rng: rand::rngs::StdRng::seed_from_u64(seed ^ 0xabcdef),
        drop_per_chunk: rng.random_range(0.0..0.2),
        chunk_bytes: rng.random_range(500..4_000),
        defer_first: rng.random_range(0..3),
        precondition_calls: 0,
        healthy: kind != Kind::BadHealth,
        now_ms: 10,
        seq: 0,
        power: power.clone(),
        reports: reports.clone(),
        resumed_opens: 0,
        refreshed: 0,
        busy_first: 0,
    };
    let params = key.params("dep_1", "2.0", &new, HW);
    {
        let mut up = Updater::start(
            settings(&key),
            Box::new(slots.clone()),
            Box::new(files.clone()),
        )
        .expect("start");
        up.accept(&mut world, params).expect("accepted");
    }
    // The first cut somewhere in the whole run; after each power loss maybe another.
    power.cut_after(rng.random_range(0..40));
    let mut cuts = 0u32;
    let mut restarts = 0;
    'device: loop {
        restarts += 1;
        assert!(restarts < 500, "seed {seed}: no end");
        let mut up = match Updater::start(
            settings(&key),
            Box::new(slots.clone()),
            Box::new(files.clone()),
        ) {
            Ok(up) => up,
            Err(_) => {
                cuts += 1;
                power.restore();
                continue;
            }
        };
        check_boot(&slots, &old, &new, "2.0");
        loop {
            match up.drive(&mut world).await {
                Ok(Next::Idle) => break 'device,
                Ok(Next::RetryAfterMs(ms)) => world.now_ms += ms.max(1),
                Ok(Next::Reboot) => continue 'device,
                Err(_) => {
                    assert!(power.is_out(), "seed {seed}: only power loss fails here");
                    cuts += 1;
                    power.restore();
                    if rng.random_bool(0.5) {
                        power.cut_after(rng.random_range(0..30));
                    }
                    continue 'device;
                }
            }
        }
    }
    power.restore();
    // The truth: the journal's final state, the slots and the last report agree.
    let up = Updater::start(
        settings(&key),
        Box::new(slots.clone()),
        Box::new(files.clone()),
    )
    .expect("start");
    check_boot(&slots, &old, &new, "2.0");
    let job = up.job().expect("job").clone();
    let Phase::Done { state, reason: why } = job.phase.clone() else {
        panic!("seed {seed}: not over: {job:?}");
    };
    assert!(job.final_reported);
    let reports = mooring_proto::sync::lock(&reports).clone();
    assert!(reports.windows(2).all(|w| w[0].seq < w[1].seq));
    let last = reports.last().expect("reports");
    assert_eq!(
        last.state, state,
        "seed {seed}: the last report is the final state"
    );
    assert_eq!(last.reason, why);
    let c = slots.control();
    assert_eq!(c.trial, None, "seed {seed}: no trial left armed");
    let running = c.info(c.running()).version.clone();
    assert_eq!(last.running_version, running);
    assert!(reports.iter().all(|r| r.state != UpdateState::Pending));
    let code = why
        .as_deref()
        .and_then(|w| w.split(':').next())
        .unwrap_or("");
    match (kind, state) {
        (Kind::Good, UpdateState::Committed) => {
            assert_eq!(running.as_deref(), Some("2.0"));
            assert_eq!(slots.image(c.committed), new);
        }
        // A power loss during the trial: the boot counter brought the old version back.
        (Kind::Good, UpdateState::RolledBack) => {
            assert!(cuts > 0, "seed {seed}");
            assert_eq!(code, reason::TRIAL_BOOT_FAILED);
            assert_eq!(running.as_deref(), Some("1.0"));
        }
        (Kind::BadHealth, UpdateState::RolledBack) => {
            assert!(
                code == reason::HEALTH_CHECK_FAILED || code == reason::TRIAL_BOOT_FAILED,
                "seed {seed}: {why:?}"
            );
            assert_eq!(running.as_deref(), Some("1.0"));
        }
        (Kind::Tampered, UpdateState::Failed) => {
            assert_eq!(code, reason::HASH_MISMATCH, "seed {seed}");
            assert_eq!(slots.image(c.committed), old);
        }
        (Kind::Truncated, UpdateState::Failed) => {
            assert_eq!(code, reason::SIZE_MISMATCH, "seed {seed}");
            assert_eq!(slots.image(c.committed), old);
        }
        other => panic!("seed {seed}: {other:?} {why:?} after {cuts} cuts"),
    }
    (kind, state, world.resumed_opens, cuts)
}

#[tokio::test]
async fn power_loss_at_1000_random_cut_points_never_bricks_and_ends_truthfully() {
    let mut committed = 0;
    let mut rolled_back = 0;
    let mut resumed = 0;
    let mut cut_total = 0;
    for seed in 0..1_200 {
        let (_, state, resumes, cuts) = run_one(seed).await;
        cut_total += cuts;
        committed += u32::from(state == UpdateState::Committed);
        rolled_back += u32::from(state == UpdateState::RolledBack);
        resumed += resumes;
    }
    assert!(committed > 100, "{committed}");
    assert!(rolled_back > 100, "{rolled_back}");
    assert!(resumed > 100, "downloads resumed with Range: {resumed}");
    assert!(cut_total >= 1_000, "power lost {cut_total} times");
}

fn fresh(key: &Key) -> (Updater, World, MemSlots) {
    let power = Power::on();
    let slots = MemSlots::new(Some("1.0".into()), b"old".to_vec(), power.clone());
    let up = Updater::start(
        settings(key),
        Box::new(slots.clone()),
        Box::new(MemUpdateFiles::new(power.clone())),
    )
    .expect("start");
    let world = World {
        served: Vec::new(),
        rng: rand::rngs::StdRng::seed_from_u64(1),
        drop_per_chunk: 0.0,
        chunk_bytes: 1000,
        defer_first: 0,
        precondition_calls: 0,
        healthy: true,
        now_ms: 10,
        seq: 0,
        power,
        reports: Arc::default(),
        resumed_opens: 0,
        refreshed: 0,
        busy_first: 0,
    };
    (up, world, slots)
}

fn refused_with(r: Result<serde_json::Value, serde_json::Value>, code: &str) {
    let e = r.expect_err("refused");
    let text = e["reason"].as_str().expect("reason");
    assert!(text.starts_with(&format!("{code}: ")), "{text}");
}

#[tokio::test]
async fn bad_signature_wrong_hardware_and_downgrade_are_refused_with_their_reason() {
    let key = Key::new(7);
    let (mut up, mut w, _) = fresh(&key);
    let other = Key::new(8);
    refused_with(
        up.accept(&mut w, other.params("dep_1", "2.0", b"x", HW)),
        reason::BAD_SIGNATURE,
    );
    let mut tampered = key.params("dep_2", "2.0", b"x", HW);
    tampered.signed.manifest = tampered.signed.manifest.replace("2.0", "9.0");
    refused_with(up.accept(&mut w, tampered), reason::BAD_SIGNATURE);
    refused_with(
        up.accept(&mut w, key.params("dep_3", "2.0", b"x", "rev-z")),
        reason::INCOMPATIBLE_HARDWARE,
    );
    refused_with(
        up.accept(&mut w, key.params("dep_4", "0.9", b"x", HW)),
        reason::DOWNGRADE_REFUSED,
    );
    let reports = mooring_proto::sync::lock(&w.reports).clone();
    assert_eq!(reports.len(), 4, "each refusal is reported");
    assert!(reports.iter().all(|r| r.state == UpdateState::Failed));
    assert_eq!(up.job(), None, "nothing journaled");
    // Allowed by the deployment: accepted.
    let mut down = key.params("dep_5", "0.9", b"x", HW);
    down.allow_downgrade = true;
    up.accept(&mut w, down).expect("an allowed downgrade");
}

#[tokio::test]
async fn one_update_at_a_time_redelivery_is_idempotent_and_cancel_stops_before_installing() {
    let key = Key::new(7);
    let (mut up, mut w, slots) = fresh(&key);
    w.defer_first = 100;
    up.accept(&mut w, key.params("dep_1", "2.0", b"new", HW))
        .expect("accepted");
    up.accept(&mut w, key.params("dep_1", "2.0", b"new", HW))
        .expect("the same one again");
    refused_with(
        up.accept(&mut w, key.params("dep_2", "3.0", b"n3", HW)),
        reason::ANOTHER_UPDATE,
    );
    assert_eq!(
        up.drive(&mut w).await.expect("drive"),
        Next::RetryAfterMs(update::DEFERRED_RETRY_MS)
    );
    assert_eq!(up.job().expect("job").phase.state(), UpdateState::Deferred);
    up.cancel(
        &mut w,
        &CancelParams {
            v: 1,
            deployment_id: "dep_1".into(),
        },
    )
    .expect("canceled");
    let last = mooring_proto::sync::lock(&w.reports)
        .last()
        .cloned()
        .expect("report");
    assert_eq!(last.state, UpdateState::Failed);
    assert!(last
        .reason
        .as_deref()
        .is_some_and(|r| r.starts_with(reason::CANCELED)));
    assert_eq!(slots.control().trial, None);
    // Over: a new one is taken.
    up.accept(&mut w, key.params("dep_2", "3.0", b"n3", HW))
        .expect("accepted after the end");
}

#[tokio::test]
async fn an_expired_link_is_refreshed_and_the_update_commits_after_the_reboot() {
    let key = Key::new(7);
    let (_, mut w, _) = fresh(&key);
    let power = Power::on();
    let slots = MemSlots::new(Some("1.0".into()), b"old".to_vec(), power.clone());
    let files = MemUpdateFiles::new(power);
    let start = || {
        Updater::start(
            settings(&key),
            Box::new(slots.clone()),
            Box::new(files.clone()),
        )
        .expect("start")
    };
    let image = b"the new image".to_vec();
    w.served = image.clone();
    w.now_ms = 5_000; // past the link's expiry
    let mut up = start();
    up.accept(&mut w, key.params("dep_1", "2.0", &image, HW))
        .expect("accepted");
    assert_eq!(up.drive(&mut w).await.expect("drive"), Next::Reboot);
    assert_eq!(w.refreshed, 1);
    let mut up = start();
    assert_eq!(up.booted(), BootOutcome::Trial(Slot::B));
    assert_eq!(up.drive(&mut w).await.expect("drive"), Next::Idle);
    assert_eq!(up.running_version().as_deref(), Some("2.0"));
    let states: Vec<_> = mooring_proto::sync::lock(&w.reports)
        .iter()
        .map(|r| r.state)
        .collect();
    use UpdateState::*;
    assert_eq!(
        states,
        [
            Downloading,
            Downloading,
            Verifying,
            Installing,
            Rebooting,
            HealthChecking,
            Committed
        ],
        "{states:?}"
    );
    assert_eq!(start().booted(), BootOutcome::Committed(Slot::B));
}

/// A first update whose trial boot loses power is rolled back (the boot counter abandons slot
/// B). A second update then writes B again, and the power goes at every point of it in turn:
/// whatever the cut, the second update is reported rolled back only if its own trial booted
/// (never because of the first one's abandonment), and a device that got through commits it.
#[tokio::test]
async fn an_older_abandoned_trial_is_never_taken_for_a_later_update() {
    let key = Key::new(7);
    let first = b"version two".to_vec();
    let second = b"version three".to_vec();
    for cut in 0..40u64 {
        let (_, mut w, _) = fresh(&key);
        let power = Power::on();
        let slots = MemSlots::new(Some("1.0".into()), b"old".to_vec(), power.clone());
        let files = MemUpdateFiles::new(power.clone());
        let start = || {
            Updater::start(
                settings(&key),
                Box::new(slots.clone()),
                Box::new(files.clone()),
            )
        };
        // Update 1: armed, booted once, power lost during the trial: abandoned.
        w.served = first.clone();
        let mut up = start().expect("start");
        up.accept(&mut w, key.params("dep_1", "2.0", &first, HW))
            .expect("accepted");
        assert_eq!(up.drive(&mut w).await.expect("drive"), Next::Reboot);
        assert_eq!(
            start().expect("start").booted(),
            BootOutcome::Trial(Slot::B)
        );
        let mut up = start().expect("start");
        assert!(matches!(up.booted(), BootOutcome::Reverted { .. }));
        assert_eq!(up.drive(&mut w).await.expect("drive"), Next::Idle);
        assert_eq!(slots.control().reverted, Some(Slot::B));
        // Update 2, with the power cut after `cut` durable steps.
        w.served = second.clone();
        up.accept(&mut w, key.params("dep_2", "3.0", &second, HW))
            .expect("accepted");
        power.cut_after(cut);
        let _ = up.drive(&mut w).await;
        power.restore();
        let mut trial_booted = false;
        for _ in 0..10 {
            let Ok(mut up) = start() else { continue };
            trial_booted |= up.booted() == BootOutcome::Trial(Slot::B);
            match up.drive(&mut w).await.expect("drive") {
                Next::Reboot => continue,
                Next::RetryAfterMs(_) => continue,
                Next::Idle => break,
            }
        }
        let last = mooring_proto::sync::lock(&w.reports)
            .iter()
            .rev()
            .find(|r| r.deployment_id == "dep_2")
            .cloned()
            .expect("a report of update 2");
        match last.state {
            UpdateState::Committed => {
                assert_eq!(
                    slots
                        .control()
                        .info(slots.control().committed)
                        .version
                        .as_deref(),
                    Some("3.0")
                );
            }
            UpdateState::RolledBack => assert!(
                trial_booted,
                "cut {cut}: update 2 reported rolled back ({:?}) though its trial never booted",
                last.reason
            ),
            other => panic!("cut {cut}: update 2 ended {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_busy_server_is_waited_for_without_giving_up() {
    let key = Key::new(9);
    let (mut up, mut w, _) = fresh(&key);
    let image = b"the new image".to_vec();
    w.served = image.clone();
    // More busy answers in a row than the attempts without progress that fail a download.
    w.busy_first = DOWNLOAD_ATTEMPTS_MAX * 3;
    up.accept(&mut w, key.params("dep_1", "2.0", &image, HW))
        .expect("accepted");
    let mut waits = 0;
    loop {
        match up.drive(&mut w).await.expect("drive") {
            Next::RetryAfterMs(ms) => {
                waits += 1;
                w.now_ms += ms;
                assert!(waits < 1_000, "never finished");
            }
            Next::Reboot => break,
            other => panic!(
                "{other:?} before the reboot: {:?}",
                mooring_proto::sync::lock(&w.reports).last()
            ),
        }
    }
    assert!(waits >= (DOWNLOAD_ATTEMPTS_MAX * 3) as usize, "{waits}");
    assert!(
        mooring_proto::sync::lock(&w.reports)
            .iter()
            .all(|r| r.state != UpdateState::Failed),
        "busy is not a failure"
    );
}
