//! Over-the-air updates (issue 17, schema v1): the signed artifact manifest, the update command's
//! parameters, the download-link refresh, and the status reports a device sends as its update
//! moves through the A/B state machine.
//!
//! * An artifact is a file with a **manifest** ([`Manifest`]): version, SHA-256, size, the
//!   hardware revisions it runs on, when it was made. The manifest travels as the exact JSON
//!   bytes that were signed ([`SignedManifest::manifest`]) with an Ed25519 signature over those
//!   bytes ([`SignedManifest::signature`], hex), so no canonical JSON is needed: a device
//!   verifies the bytes, then parses them.
//! * An update reaches a device as the reserved command [`UPDATE_COMMAND`] (durable, at most
//!   once, like any command) with [`UpdateParams`]: the signed manifest and a download link with
//!   a short-lived token scoped to that device and artifact. [`CANCEL_COMMAND`] asks the device to
//!   stop an update it has not started installing.
//! * Downloads are HTTPS `GET` with `Authorization: Bearer <token>` and `Range` (resumable). A
//!   device whose token expired asks for a new link on [`link_request_topic`] ([`LinkRequest`])
//!   and gets it on [`link_accepted_topic`] ([`Link`]) or a refusal on [`link_rejected_topic`]
//!   (`provision::EnrollRejected`-shaped: code + message).
//! * Every transition is reported on [`status_topic`] ([`StatusReport`], QoS 1), truthfully:
//!   [`UpdateState`] says where the update is, `reason` why it waits, failed or rolled back, and
//!   `running_version` what the device runs now. A device counts as updated only after
//!   [`UpdateState::Committed`].

use crate::DeviceId;
use serde::{Deserialize, Serialize};

/// Schema version of every payload here.
pub const SCHEMA_VERSION: u32 = 1;
/// The reserved command that starts an update ([`UpdateParams`]).
pub const UPDATE_COMMAND: &str = "mooring.update";
/// The reserved command that cancels an update not yet installing ([`CancelParams`]).
pub const CANCEL_COMMAND: &str = "mooring.update.cancel";
/// Longest version string.
pub const VERSION_LEN_MAX: usize = 64;
/// Most hardware revisions a manifest lists.
pub const COMPATIBLE_MAX: usize = 32;
/// Longest hardware revision name.
pub const HW_REVISION_LEN_MAX: usize = 64;
/// Longest manifest, in bytes of JSON.
pub const MANIFEST_LEN_MAX: usize = 4 * 1024;
/// Longest `reason` text in a status report.
pub const REASON_LEN_MAX: usize = 256;

/// What an artifact is; signed by the fleet's update key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub v: u32,
    /// `art_<hex>`.
    pub artifact_id: String,
    /// What the device runs after installing it (compared by [`compare_versions`]).
    pub version: String,
    /// Lowercase hex SHA-256 of the artifact file.
    pub sha256: String,
    /// Size of the artifact file in bytes.
    pub size: u64,
    /// Hardware revisions it runs on (a device installs only if its own is listed).
    pub compatible: Vec<String>,
    /// Unix ms.
    pub created_at: u64,
}

/// Why a manifest is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("the manifest is not valid JSON of schema v1: {0}")]
    Invalid(String),
    #[error("the manifest is larger than {MANIFEST_LEN_MAX} bytes")]
    TooLarge,
}

impl Manifest {
    /// The manifest as JSON bytes (what is signed).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks manifest bytes (after their signature was verified).
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MANIFEST_LEN_MAX {
            return Err(ManifestError::TooLarge);
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Invalid(e.to_string()))?;
        m.check().map_err(ManifestError::Invalid)?;
        Ok(m)
    }

    /// The rules every manifest keeps.
    pub fn check(&self) -> Result<(), String> {
        if self.v != SCHEMA_VERSION {
            return Err(format!(
                "schema version {} (this build reads {SCHEMA_VERSION})",
                self.v
            ));
        }
        if !is_valid_artifact_id(&self.artifact_id) {
            return Err("artifact_id is not art_<hex>".into());
        }
        if !is_valid_version(&self.version) {
            return Err(format!(
                "version must be 1..={VERSION_LEN_MAX} characters of [A-Za-z0-9._+-]"
            ));
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err("sha256 must be 64 lowercase hex digits".into());
        }
        if self.compatible.is_empty() || self.compatible.len() > COMPATIBLE_MAX {
            return Err(format!(
                "compatible must list 1..={COMPATIBLE_MAX} hardware revisions"
            ));
        }
        if let Some(bad) = self.compatible.iter().find(|r| !is_valid_hw_revision(r)) {
            return Err(format!(
                "hardware revision {bad:?} must be 1..={HW_REVISION_LEN_MAX} characters of [A-Za-z0-9._-]"
            ));
        }
        Ok(())
    }

    /// Whether hardware revision `hw` may install it.
    pub fn runs_on(&self, hw: &str) -> bool {
        self.compatible.iter().any(|r| r == hw)
    }
}

/// A manifest as signed: the exact bytes and the Ed25519 signature over them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// The manifest's JSON, exactly as signed.
    pub manifest: String,
    /// Lowercase hex of the 64-byte Ed25519 signature over `manifest`'s bytes.
    pub signature: String,
}

/// `art_` followed by 8..=32 lowercase hex digits.
pub fn is_valid_artifact_id(id: &str) -> bool {
    id.strip_prefix("art_").is_some_and(|h| {
        (8..=32).contains(&h.len())
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// A version: 1..=64 characters of `[A-Za-z0-9._+-]`, starting with a letter or digit.
pub fn is_valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= VERSION_LEN_MAX
        && v.starts_with(|c: char| c.is_ascii_alphanumeric())
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-'))
}

/// A hardware revision: 1..=64 characters of `[A-Za-z0-9._-]`.
pub fn is_valid_hw_revision(r: &str) -> bool {
    !r.is_empty()
        && r.len() <= HW_REVISION_LEN_MAX
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Orders two versions: dot-separated parts (a `+build` suffix ignored, a `-pre` suffix sorting
/// before the release, pre-release identifiers compared one by one as semver does), the digit
/// runs of every part as numbers and the rest as text. `1.10.0 > 1.9.2`, `1.4.0-rc1 < 1.4.0`,
/// `1.4.0-rc9 < 1.4.0-rc10`, `1.4.0-rc.2 < 1.4.0-rc.10`.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let split = |v: &str| -> (Vec<String>, Option<String>) {
        let v = v.split('+').next().unwrap_or(v);
        match v.split_once('-') {
            Some((core, pre)) => (
                core.split('.').map(str::to_owned).collect(),
                Some(pre.to_owned()),
            ),
            None => (v.split('.').map(str::to_owned).collect(), None),
        }
    };
    let ((ca, pa), (cb, pb)) = (split(a), split(b));
    for i in 0..ca.len().max(cb.len()) {
        let (x, y) = (
            ca.get(i).map_or("0", String::as_str),
            cb.get(i).map_or("0", String::as_str),
        );
        match natural(x, y) {
            Ordering::Equal => {}
            o => return o,
        }
    }
    match (pa, pb) {
        (None, None) => Ordering::Equal,
        (None, Some(_)) => Ordering::Greater,
        (Some(_), None) => Ordering::Less,
        // Semver: identifier by identifier; all equal, the one with more is greater.
        (Some(x), Some(y)) => {
            let (xs, ys): (Vec<&str>, Vec<&str>) = (x.split('.').collect(), y.split('.').collect());
            for (p, q) in xs.iter().zip(&ys) {
                match natural(p, q) {
                    Ordering::Equal => {}
                    o => return o,
                }
            }
            xs.len().cmp(&ys.len())
        }
    }
}

/// One part of a version against another, in runs: digits as numbers (`rc9` < `rc10`,
/// `1.9` < `1.10`), other characters as text, a number before text (semver: numeric
/// identifiers sort before alphanumeric ones); a part that is a prefix of the other is less.
fn natural(x: &str, y: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    fn runs(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let b = s.as_bytes();
        for i in 1..=b.len() {
            if i == b.len() || b[i].is_ascii_digit() != b[start].is_ascii_digit() {
                out.push((b[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (rx, ry) = (runs(x), runs(y));
    for (&(dx, px), &(dy, py)) in rx.iter().zip(&ry) {
        let o = match (dx, dy) {
            (true, true) => {
                // Numbers of any length: without leading zeros, longer is larger.
                let (tx, ty) = (px.trim_start_matches('0'), py.trim_start_matches('0'));
                tx.len().cmp(&ty.len()).then_with(|| tx.cmp(ty))
            }
            (true, false) => Ordering::Less,
            (false, true) => Ordering::Greater,
            (false, false) => px.cmp(py),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    rx.len().cmp(&ry.len())
}

/// Where to download an artifact from, with a token scoped to one device and one artifact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// `https://<server>/api/v1/ota/artifacts/<id>/download` (any node serves it).
    pub url: String,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: String,
    /// Unix ms; after it the device asks for a new link ([`LinkRequest`]).
    pub expires_at: u64,
}

/// The parameters of [`UPDATE_COMMAND`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateParams {
    pub v: u32,
    /// `dep_<hex>`: which deployment this update belongs to (echoed in every report).
    pub deployment_id: String,
    #[serde(flatten)]
    pub signed: SignedManifest,
    pub link: Link,
    /// Install even if the version is older than the running one.
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// The parameters of [`CANCEL_COMMAND`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelParams {
    pub v: u32,
    pub deployment_id: String,
}

/// Device → server on [`link_request_topic`]: a new download link for an artifact of an update
/// the device was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkRequest {
    pub v: u32,
    pub deployment_id: String,
    pub artifact_id: String,
}

/// Where an update is, as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    /// Sent, not yet picked up by the device (server side only).
    Pending,
    /// A precondition is unmet (battery, busy, maintenance window); `reason` says which. Not a
    /// failure: the device tries again.
    Deferred,
    Downloading,
    Verifying,
    Installing,
    Rebooting,
    HealthChecking,
    /// Final: the device runs the new version.
    Committed,
    /// Final: the new version was tried and the device went back to the previous one
    /// (`reason`: failed health check, crash, trial boot never committed).
    RolledBack,
    /// Final: refused or given up before switching (`reason`: bad signature, hash mismatch,
    /// incompatible hardware, downgrade refused, canceled, ...). The device runs what it ran.
    Failed,
}

impl UpdateState {
    /// Whether the update is over.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Committed | Self::RolledBack | Self::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Deferred => "deferred",
            Self::Downloading => "downloading",
            Self::Verifying => "verifying",
            Self::Installing => "installing",
            Self::Rebooting => "rebooting",
            Self::HealthChecking => "health_checking",
            Self::Committed => "committed",
            Self::RolledBack => "rolled_back",
            Self::Failed => "failed",
        }
    }

    /// Every state, in pipeline order.
    pub const ALL: [UpdateState; 10] = [
        Self::Pending,
        Self::Deferred,
        Self::Downloading,
        Self::Verifying,
        Self::Installing,
        Self::Rebooting,
        Self::HealthChecking,
        Self::Committed,
        Self::RolledBack,
        Self::Failed,
    ];
}

/// Machine-readable reasons a report may carry (the text after `: ` says more).
pub mod reason {
    pub const BATTERY_LOW: &str = "battery_low";
    pub const BUSY: &str = "busy";
    pub const OUTSIDE_WINDOW: &str = "outside_maintenance_window";
    pub const BAD_SIGNATURE: &str = "bad_signature";
    pub const HASH_MISMATCH: &str = "hash_mismatch";
    pub const SIZE_MISMATCH: &str = "size_mismatch";
    pub const INCOMPATIBLE_HARDWARE: &str = "incompatible_hardware";
    pub const DOWNGRADE_REFUSED: &str = "downgrade_refused";
    pub const DOWNLOAD_FAILED: &str = "download_failed";
    pub const WRITE_FAILED: &str = "write_failed";
    pub const HEALTH_CHECK_FAILED: &str = "health_check_failed";
    pub const TRIAL_BOOT_FAILED: &str = "trial_boot_not_committed";
    pub const CANCELED: &str = "canceled";
    /// Server side: the update command failed before the device reported anything (the device
    /// refused it, e.g. it has no updater, or did not answer within the server's timeout).
    pub const COMMAND_FAILED: &str = "command_failed";
    /// Server side: the update command expired before the device picked it up.
    pub const COMMAND_EXPIRED: &str = "command_expired";
    pub const ANOTHER_UPDATE: &str = "another_update_in_progress";
}

/// Device → server on [`status_topic`] (QoS 1), at every transition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub v: u32,
    pub deployment_id: String,
    pub artifact_id: String,
    /// The version being installed.
    pub version: String,
    pub state: UpdateState,
    /// While downloading: 0..=100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress_pct: Option<u8>,
    /// `<code>: <text>` ([`reason`]) for deferred, rolled back and failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// What the device runs now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_version: Option<String>,
    /// Device time of the transition, unix ms.
    pub at: u64,
    /// Increases with every report of the device (the server ignores one older than the last it
    /// stored for the deployment).
    pub seq: u64,
}

impl StatusReport {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a report; `Err` says what is wrong.
    pub fn parse(payload: &[u8]) -> Result<StatusReport, String> {
        if payload.len() > 4 * 1024 {
            return Err("a status report is at most 4096 bytes".into());
        }
        let r: StatusReport = serde_json::from_slice(payload).map_err(|e| e.to_string())?;
        if r.v != SCHEMA_VERSION {
            return Err(format!("schema version {}", r.v));
        }
        if r.progress_pct.is_some_and(|p| p > 100) {
            return Err("progress_pct is above 100".into());
        }
        if r.reason.as_ref().is_some_and(|t| t.len() > REASON_LEN_MAX) {
            return Err(format!("reason is longer than {REASON_LEN_MAX} bytes"));
        }
        if r.state == UpdateState::Pending {
            return Err("a device does not report pending".into());
        }
        Ok(r)
    }
}

/// `devices/<id>/ota/status`.
pub fn status_topic(id: &DeviceId) -> String {
    format!("devices/{id}/ota/status")
}

/// The code of a link request refused for now (`[ota] reports_per_minute_max`): the device asks
/// again later. Every other refusal on `.../ota/link/rejected` is final for that update.
pub const LINK_RATE_LIMITED: &str = "rate_limited";

/// `devices/<id>/ota/link/request`.
pub fn link_request_topic(id: &DeviceId) -> String {
    format!("devices/{id}/ota/link/request")
}

/// `devices/<id>/ota/link/accepted`.
pub fn link_accepted_topic(id: &DeviceId) -> String {
    format!("devices/{id}/ota/link/accepted")
}

/// `devices/<id>/ota/link/rejected`.
pub fn link_rejected_topic(id: &DeviceId) -> String {
    format!("devices/{id}/ota/link/rejected")
}

/// `devices/<id>/ota/link/#`: what the agent subscribes to.
pub fn link_filter(id: &DeviceId) -> String {
    format!("devices/{id}/ota/link/#")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    fn manifest() -> Manifest {
        Manifest {
            v: 1,
            artifact_id: "art_0123456789abcdef".into(),
            version: "1.4.0".into(),
            sha256: "a".repeat(64),
            size: 10,
            compatible: vec!["rev-b".into()],
            created_at: 1,
        }
    }

    #[test]
    fn manifests_round_trip_and_bad_ones_are_refused_with_a_reason() {
        let m = manifest();
        assert_eq!(Manifest::parse(&m.to_bytes()).expect("parse"), m);
        assert!(m.runs_on("rev-b") && !m.runs_on("rev-c"));
        let bad = |f: &dyn Fn(&mut Manifest)| {
            let mut m = manifest();
            f(&mut m);
            Manifest::parse(&m.to_bytes()).expect_err("refused")
        };
        assert!(bad(&|m| m.v = 2).to_string().contains("schema version"));
        assert!(bad(&|m| m.artifact_id = "x".into())
            .to_string()
            .contains("artifact_id"));
        assert!(bad(&|m| m.version = "1/2".into())
            .to_string()
            .contains("version"));
        assert!(bad(&|m| m.sha256 = "A".repeat(64))
            .to_string()
            .contains("sha256"));
        assert!(bad(&|m| m.compatible.clear())
            .to_string()
            .contains("compatible"));
        assert!(bad(&|m| m.compatible = vec!["a b".into()])
            .to_string()
            .contains("hardware"));
        let mut extra: serde_json::Value = serde_json::from_slice(&m.to_bytes()).expect("json");
        extra["evil"] = 1.into();
        assert!(
            Manifest::parse(extra.to_string().as_bytes()).is_err(),
            "unknown fields"
        );
        assert_eq!(
            Manifest::parse(&vec![b' '; MANIFEST_LEN_MAX + 1]),
            Err(ManifestError::TooLarge)
        );
    }

    #[test]
    fn versions_order_numerically_with_prereleases_first() {
        assert_eq!(compare_versions("1.10.0", "1.9.2"), Ordering::Greater);
        assert_eq!(compare_versions("1.4", "1.4.0"), Ordering::Equal);
        assert_eq!(compare_versions("1.4.0-rc1", "1.4.0"), Ordering::Less);
        assert_eq!(compare_versions("1.4.0+b7", "1.4.0"), Ordering::Equal);
        assert_eq!(compare_versions("2.0.0", "10.0.0"), Ordering::Less);
        // Pre-releases and parts with letters order their numbers as numbers (semver-like).
        assert_eq!(compare_versions("1.4.0-rc9", "1.4.0-rc10"), Ordering::Less);
        assert_eq!(
            compare_versions("1.4.0-rc.2", "1.4.0-rc.10"),
            Ordering::Less
        );
        assert_eq!(
            compare_versions("1.4.0-rc.1", "1.4.0-rc.1.1"),
            Ordering::Less
        );
        assert_eq!(compare_versions("1.4.0-1", "1.4.0-alpha"), Ordering::Less);
        assert_eq!(
            compare_versions("1.4.0-alpha", "1.4.0-beta"),
            Ordering::Less
        );
        assert_eq!(compare_versions("1.4.0_1", "1.4.9"), Ordering::Less);
        assert_eq!(compare_versions("1.4.10a", "1.4.9b"), Ordering::Greater);
        assert_eq!(compare_versions("1.007", "1.7"), Ordering::Equal);
        assert_eq!(
            compare_versions("1.99999999999999999999999", "1.100000000000000000000000"),
            Ordering::Less
        );
        assert_eq!(
            compare_versions("1.4.0-rc2", "1.4.0-rc1"),
            Ordering::Greater
        );
    }

    #[test]
    fn ids_versions_and_revisions() {
        assert!(is_valid_artifact_id("art_0123abcd"));
        assert!(!is_valid_artifact_id("art_0123ABCD"));
        assert!(!is_valid_artifact_id("art_01"));
        assert!(is_valid_version("1.4.0-rc1+build.7"));
        assert!(!is_valid_version(".1"));
        assert!(!is_valid_version(""));
        assert!(is_valid_hw_revision("rev-b"));
        assert!(!is_valid_hw_revision("rev b"));
    }

    #[test]
    fn status_reports_are_checked() {
        let r = StatusReport {
            v: 1,
            deployment_id: "dep_1".into(),
            artifact_id: "art_0123456789abcdef".into(),
            version: "1.4.0".into(),
            state: UpdateState::Downloading,
            progress_pct: Some(42),
            reason: None,
            running_version: Some("1.3.0".into()),
            at: 5,
            seq: 9,
        };
        assert_eq!(StatusReport::parse(&r.to_bytes()).expect("parse"), r);
        let mut bad = r.clone();
        bad.progress_pct = Some(101);
        assert!(StatusReport::parse(&bad.to_bytes()).is_err());
        bad = r.clone();
        bad.state = UpdateState::Pending;
        assert!(StatusReport::parse(&bad.to_bytes()).is_err());
        assert!(UpdateState::Committed.is_final() && !UpdateState::Rebooting.is_final());
        assert_eq!(
            serde_json::to_string(&UpdateState::HealthChecking).expect("json"),
            "\"health_checking\""
        );
        for s in UpdateState::ALL {
            assert_eq!(
                serde_json::to_string(&s).expect("json"),
                format!("\"{}\"", s.as_str())
            );
        }
    }
}
