//! The update journal (the job in progress and its phase, replaced atomically: temp, fsync, rename, fsync dir) and the partial download, behind [`UpdateFiles`]: [`FileUpdateFiles`] in `<state dir>/ota/`, [`MemUpdateFiles`] for tests.

use super::slots::{Power, Slot};
use mooring_proto::ota::{Link, UpdateState};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Largest journal file read back.
pub const JOURNAL_BYTES_MAX: u64 = 64 * 1024;

/// Where an update is (the device-side superset of [`UpdateState`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
    /// Accepted; preconditions not checked yet, or unmet (`deferred` holds the reason).
    Waiting {
        deferred: Option<String>,
    },
    Downloading,
    Verifying,
    /// Writing the inactive slot and reading it back.
    Installing,
    /// Written and verified; waiting for the preconditions to reboot (`deferred`: why not yet).
    Installed {
        deferred: Option<String>,
    },
    /// The trial of `slot` is (being) armed; the device reboots into it.
    Rebooting {
        slot: Slot,
    },
    /// Running the trial of `slot`; checks in progress.
    HealthChecking {
        slot: Slot,
    },
    /// A failed check: reverting, then rebooting into the previous slot.
    RollingBack {
        reason: String,
    },
    /// Over.
    Done {
        state: UpdateState,
        reason: Option<String>,
    },
}

impl Phase {
    /// What is reported for it.
    pub fn state(&self) -> UpdateState {
        match self {
            Phase::Waiting { deferred: None } => UpdateState::Pending,
            Phase::Waiting { .. } | Phase::Installed { deferred: Some(_) } => UpdateState::Deferred,
            Phase::Downloading => UpdateState::Downloading,
            Phase::Verifying => UpdateState::Verifying,
            Phase::Installing | Phase::Installed { deferred: None } => UpdateState::Installing,
            Phase::Rebooting { .. } | Phase::RollingBack { .. } => UpdateState::Rebooting,
            Phase::HealthChecking { .. } => UpdateState::HealthChecking,
            Phase::Done { state, .. } => *state,
        }
    }
    pub fn reason(&self) -> Option<&str> {
        match self {
            Phase::Waiting { deferred } | Phase::Installed { deferred } => deferred.as_deref(),
            Phase::RollingBack { reason } => Some(reason),
            Phase::Done { reason, .. } => reason.as_deref(),
            _ => None,
        }
    }
    pub fn is_done(&self) -> bool {
        matches!(self, Phase::Done { .. })
    }
    /// Whether a cancel can still stop it (nothing written to a slot yet).
    pub fn cancellable(&self) -> bool {
        matches!(
            self,
            Phase::Waiting { .. } | Phase::Downloading | Phase::Verifying
        )
    }
}

/// The update in progress (or the last one), as journaled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub deployment_id: String,
    pub artifact_id: String,
    pub version: String,
    pub sha256: String,
    pub size: u64,
    pub link: Link,
    /// What ran when the update was accepted.
    pub from_version: Option<String>,
    pub phase: Phase,
    /// Complete downloads that failed their hash (one more try is allowed).
    #[serde(default)]
    pub hash_failures: u32,
    /// The final state was queued for the server.
    #[serde(default)]
    pub final_reported: bool,
}

/// Durable storage of the journal and the partial download.
pub trait UpdateFiles: Send {
    fn load_journal(&self) -> std::io::Result<Option<Job>>;
    /// Replaces the journal atomically.
    fn store_journal(&mut self, job: &Job) -> std::io::Result<()>;
    /// Bytes of the partial download on disk.
    fn partial_len(&self) -> std::io::Result<u64>;
    /// Appends to the partial download (durable when it returns).
    fn append_partial(&mut self, data: &[u8]) -> std::io::Result<()>;
    /// Deletes the partial download.
    fn clear_partial(&mut self) -> std::io::Result<()>;
    /// Reads the partial download.
    fn open_partial(&self) -> std::io::Result<Box<dyn Read + Send>>;
}

/// `<state dir>/ota/journal.json` and `<state dir>/ota/download.part`.
#[derive(Debug)]
pub struct FileUpdateFiles {
    dir: PathBuf,
    part: Option<std::fs::File>,
}

impl FileUpdateFiles {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_owned(),
            part: None,
        })
    }
    pub fn journal_path(dir: &Path) -> PathBuf {
        dir.join("journal.json")
    }
    fn part_path(&self) -> PathBuf {
        self.dir.join("download.part")
    }
    /// Reads a journal without opening anything for writing (`slots status`).
    pub fn peek(dir: &Path) -> std::io::Result<Option<Job>> {
        read_journal(&Self::journal_path(dir))
    }
}

fn read_journal(path: &Path) -> std::io::Result<Option<Job>> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut bytes = Vec::new();
    f.take(JOURNAL_BYTES_MAX).read_to_end(&mut bytes)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| std::io::Error::other(format!("{} is damaged: {e}", path.display())))
}

impl UpdateFiles for FileUpdateFiles {
    fn load_journal(&self) -> std::io::Result<Option<Job>> {
        read_journal(&Self::journal_path(&self.dir))
    }

    fn store_journal(&mut self, job: &Job) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(job).map_err(std::io::Error::other)?;
        crate::enroll::write_atomic(&Self::journal_path(&self.dir), &bytes, 0o600)
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
    }

    fn partial_len(&self) -> std::io::Result<u64> {
        match std::fs::metadata(self.part_path()) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn append_partial(&mut self, data: &[u8]) -> std::io::Result<()> {
        if self.part.is_none() {
            self.part = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.part_path())?,
            );
        }
        let f = self
            .part
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no file"))?;
        f.write_all(data)?;
        // Durable before the next chunk is asked for: what is on disk is what resumes.
        f.sync_data()
    }

    fn clear_partial(&mut self) -> std::io::Result<()> {
        self.part = None;
        match std::fs::remove_file(self.part_path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn open_partial(&self) -> std::io::Result<Box<dyn Read + Send>> {
        match std::fs::File::open(self.part_path()) {
            Ok(f) => Ok(Box::new(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Box::new(std::io::empty())),
            Err(e) => Err(e),
        }
    }
}

#[derive(Debug, Default)]
struct MemFilesInner {
    journal: Option<Job>,
    part: Vec<u8>,
}

/// The journal and partial download in memory; clones share them (they survive dropping the
/// updater), every write spends [`Power`].
#[derive(Debug, Clone)]
pub struct MemUpdateFiles {
    inner: Arc<Mutex<MemFilesInner>>,
    power: Power,
}

impl MemUpdateFiles {
    pub fn new(power: Power) -> Self {
        Self {
            inner: Arc::default(),
            power,
        }
    }
}

impl UpdateFiles for MemUpdateFiles {
    fn load_journal(&self) -> std::io::Result<Option<Job>> {
        Ok(mooring_proto::sync::lock(&self.inner).journal.clone())
    }
    fn store_journal(&mut self, job: &Job) -> std::io::Result<()> {
        self.power.spend()?;
        mooring_proto::sync::lock(&self.inner).journal = Some(job.clone());
        Ok(())
    }
    fn partial_len(&self) -> std::io::Result<u64> {
        Ok(mooring_proto::sync::lock(&self.inner).part.len() as u64)
    }
    fn append_partial(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.power.spend()?;
        mooring_proto::sync::lock(&self.inner)
            .part
            .extend_from_slice(data);
        Ok(())
    }
    fn clear_partial(&mut self) -> std::io::Result<()> {
        self.power.spend()?;
        mooring_proto::sync::lock(&self.inner).part.clear();
        Ok(())
    }
    fn open_partial(&self) -> std::io::Result<Box<dyn Read + Send>> {
        let part = mooring_proto::sync::lock(&self.inner).part.clone();
        Ok(Box::new(std::io::Cursor::new(part)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job {
            deployment_id: "dep_1".into(),
            artifact_id: "art_0123456789abcdef".into(),
            version: "2.0".into(),
            sha256: "a".repeat(64),
            size: 3,
            link: Link {
                url: "http://x/".into(),
                token: "t".into(),
                expires_at: 1,
            },
            from_version: Some("1.0".into()),
            phase: Phase::Downloading,
            hash_failures: 0,
            final_reported: false,
        }
    }

    #[test]
    fn the_file_journal_and_partial_download_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut f = FileUpdateFiles::open(dir.path()).expect("open");
        assert_eq!(f.load_journal().expect("load"), None);
        f.store_journal(&job()).expect("store");
        f.append_partial(b"ab").expect("append");
        f.append_partial(b"c").expect("append");
        drop(f);
        let f = FileUpdateFiles::open(dir.path()).expect("reopen");
        assert_eq!(f.load_journal().expect("load"), Some(job()));
        assert_eq!(f.partial_len().expect("len"), 3);
        let mut s = String::new();
        f.open_partial()
            .expect("open")
            .read_to_string(&mut s)
            .expect("read");
        assert_eq!(s, "abc");
        assert_eq!(
            FileUpdateFiles::peek(dir.path()).expect("peek"),
            Some(job())
        );
        std::fs::write(dir.path().join("journal.json"), "{").expect("damage");
        assert!(
            f.load_journal().is_err(),
            "a damaged journal is an error, not a fresh start"
        );
    }

    #[test]
    fn phases_map_to_reported_states() {
        assert_eq!(
            Phase::Waiting {
                deferred: Some("battery_low: 5%".into())
            }
            .state(),
            UpdateState::Deferred
        );
        assert_eq!(
            Phase::Installed { deferred: None }.state(),
            UpdateState::Installing
        );
        assert!(Phase::Verifying.cancellable() && !Phase::Installing.cancellable());
    }
}
