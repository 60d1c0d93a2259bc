//! A/B slots: the [`Slots`] trait (two image slots + a boot-control record), [`FileSlots`] in the state dir and [`MemSlots`] for tests and the simulator.
//!
//! The boot-control record ([`BootControl`]) stands in for a bootloader environment
//! (U-Boot / RAUC style):
//!
//! | [`BootControl`] field | U-Boot env        | meaning                                            |
//! |-----------------------|-------------------|----------------------------------------------------|
//! | `committed`           | `boot_slot`       | the slot that boots when no trial is armed         |
//! | `trial`               | `upgrade_available=1` + the other slot | a slot armed for ONE trial boot |
//! | `trial_boots`         | `bootcount` (`bootlimit=1`) | boots of the armed trial so far          |
//! | `reverted`            | (`altbootcmd` ran) | the last trial was abandoned by the boot counter  |
//!
//! [`Slots::boot`] is what the bootloader does at power-on: a trial armed and not yet booted
//! is booted (its counter goes to 1); a trial that already booted once and was never committed
//! is abandoned and the committed slot boots. So a crash, a hang or a power loss during the
//! trial always ends on the committed slot.

use serde::{Deserialize, Serialize};
use std::io::{Read, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Bytes moved per read/write while copying an image.
pub const COPY_CHUNK_BYTES: usize = 64 * 1024;

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
    fn idx(self) -> usize {
        match self {
            Slot::A => 0,
            Slot::B => 1,
        }
    }
}

/// What a slot holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// The version of the image, once completely written; `None` while being written or empty.
    pub version: Option<String>,
    /// Size of the image in bytes (0 when none).
    pub size: u64,
}

/// The boot-control record (the bootloader environment; module doc for the mapping).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootControl {
    pub committed: Slot,
    pub trial: Option<Slot>,
    pub trial_boots: u32,
    /// The slot of the last trial that the boot counter abandoned (cleared when a trial is armed).
    pub reverted: Option<Slot>,
    pub slots: [SlotInfo; 2],
}

impl BootControl {
    /// A device that runs `version` from slot A; B is empty.
    pub fn initial(version: Option<String>) -> Self {
        Self {
            committed: Slot::A,
            trial: None,
            trial_boots: 0,
            reverted: None,
            slots: [SlotInfo { version, size: 0 }, SlotInfo::default()],
        }
    }
    /// The slot running now: the trial once it booted, else the committed one.
    pub fn running(&self) -> Slot {
        match self.trial {
            Some(t) if self.trial_boots >= 1 => t,
            _ => self.committed,
        }
    }
    /// The slot an update may be written to: the other one than running, none during a trial.
    pub fn inactive(&self) -> Option<Slot> {
        self.trial.is_none().then(|| self.committed.other())
    }
    pub fn info(&self, slot: Slot) -> &SlotInfo {
        &self.slots[slot.idx()]
    }
    /// What the agent reports in the shadow (`reported.ota`): `{"active", "committed",
    /// "slots": {"a": {"version", "size", "state"}, "b": {...}}}`.
    pub fn to_reported(&self) -> serde_json::Value {
        let slot = |s: Slot| {
            let i = self.info(s);
            serde_json::json!({"version": i.version, "size": i.size, "state": self.state_of(s)})
        };
        serde_json::json!({
            "active": self.running().as_str(),
            "committed": self.committed.as_str(),
            "slots": {"a": slot(Slot::A), "b": slot(Slot::B)},
        })
    }
    /// `active`, `trial`, `inactive` or `trial (armed)`.
    pub fn state_of(&self, slot: Slot) -> &'static str {
        match self.trial {
            Some(t) if t == slot && self.trial_boots == 0 => "trial (armed, boots next)",
            Some(t) if t == slot => "trial (running, not committed)",
            _ if slot == self.committed => "active (committed)",
            _ => "inactive",
        }
    }
}

/// What [`Slots::boot`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootOutcome {
    /// The committed slot booted.
    Committed(Slot),
    /// An armed trial booted (its one chance).
    Trial(Slot),
    /// A trial that booted before and never committed was abandoned; the committed slot booted.
    Reverted { abandoned: Slot, booted: Slot },
}

#[derive(Debug, thiserror::Error)]
pub enum SlotError {
    #[error("slot storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Refused(String),
}

/// Two image slots and their boot control. Every method that changes something is durable
/// when it returns (and crash-safe: a crash leaves the previous or the new state).
pub trait Slots: Send {
    fn control(&self) -> BootControl;
    /// Writes `src` (streamed) to the inactive slot as `version`; refused during a trial. The
    /// slot reads as empty until the image is completely written.
    fn write_inactive(&mut self, version: &str, src: &mut dyn Read) -> Result<Slot, SlotError>;
    /// Streams a slot's bytes to `sink` (to verify what was written).
    fn read(&self, slot: Slot, sink: &mut dyn FnMut(&[u8])) -> Result<(), SlotError>;
    /// Arms the inactive slot (which must hold a complete image) for ONE trial boot.
    fn arm_trial(&mut self) -> Result<Slot, SlotError>;
    /// Makes the running trial the committed slot.
    fn commit(&mut self) -> Result<(), SlotError>;
    /// Abandons the trial: the committed slot boots next.
    fn revert(&mut self) -> Result<(), SlotError>;
    /// How this power-on booted, called once as the agent starts. `FileSlots` and `MemSlots`
    /// have no bootloader, so they do its part here (count the trial boot, abandon a trial that
    /// booted before; module doc). An implementation over a real bootloader must only READ what
    /// the bootloader did (its environment and the running slot), never count or switch again
    /// (docs/ota.md, "The slots on disk and a real bootloader").
    fn boot(&mut self) -> Result<BootOutcome, SlotError>;
}

/// Pure transitions shared by both implementations.
///
/// A slot about to receive a new image: it holds nothing, and `reverted` (the last abandoned
/// trial) no longer names it, or a crash before the new image is armed would read as this
/// update's trial having been abandoned.
fn forget_slot(c: &mut BootControl, slot: Slot) {
    c.slots[slot.idx()] = SlotInfo::default();
    if c.reverted == Some(slot) {
        c.reverted = None;
    }
}

fn do_arm(c: &mut BootControl) -> Result<Slot, SlotError> {
    let slot = c
        .inactive()
        .ok_or_else(|| SlotError::Refused("a trial is already armed".into()))?;
    if c.info(slot).version.is_none() {
        return Err(SlotError::Refused(format!(
            "slot {} holds no complete image",
            slot.as_str()
        )));
    }
    c.trial = Some(slot);
    c.trial_boots = 0;
    c.reverted = None;
    Ok(slot)
}

fn do_commit(c: &mut BootControl) -> Result<(), SlotError> {
    match c.trial {
        Some(t) if c.trial_boots >= 1 => {
            c.committed = t;
            c.trial = None;
            c.trial_boots = 0;
            Ok(())
        }
        Some(_) => Err(SlotError::Refused("the trial has not booted yet".into())),
        None => Err(SlotError::Refused("no trial to commit".into())),
    }
}

fn do_revert(c: &mut BootControl) {
    if c.trial.take().is_some() {
        c.trial_boots = 0;
    }
}

fn do_boot(c: &mut BootControl) -> BootOutcome {
    match c.trial {
        Some(t) if c.trial_boots == 0 => {
            c.trial_boots = 1;
            BootOutcome::Trial(t)
        }
        Some(t) => {
            c.trial = None;
            c.trial_boots = 0;
            c.reverted = Some(t);
            BootOutcome::Reverted {
                abandoned: t,
                booted: c.committed,
            }
        }
        None => BootOutcome::Committed(c.committed),
    }
}

/// Slots as files in `<state dir>/slots/`: `a.img`, `b.img` (the partitions) and
/// `bootctl.json` (the bootloader environment, replaced atomically).
#[derive(Debug)]
pub struct FileSlots {
    dir: PathBuf,
    control: BootControl,
}

impl FileSlots {
    /// Opens (or creates, with slot A committed holding `initial_version`) the slots in `dir`.
    pub fn open(dir: &Path, initial_version: Option<String>) -> Result<Self, SlotError> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("bootctl.json");
        let control = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| SlotError::Refused(format!("{} is damaged: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let c = BootControl::initial(initial_version);
                write_control(dir, &c)?;
                c
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Self {
            dir: dir.to_owned(),
            control,
        })
    }

    /// Reads the control record without changing anything (`slots status`).
    pub fn peek(dir: &Path) -> Result<Option<BootControl>, SlotError> {
        match std::fs::read(dir.join("bootctl.json")) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
                SlotError::Refused(format!("bootctl.json is damaged: {e}"))
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn image(&self, slot: Slot) -> PathBuf {
        self.dir.join(format!("{}.img", slot.as_str()))
    }

    fn update(&mut self, f: impl FnOnce(&mut BootControl)) -> Result<(), SlotError> {
        let mut next = self.control.clone();
        f(&mut next);
        write_control(&self.dir, &next)?;
        self.control = next;
        Ok(())
    }
}

fn write_control(dir: &Path, c: &BootControl) -> Result<(), SlotError> {
    let bytes = serde_json::to_vec_pretty(c).map_err(|e| SlotError::Refused(e.to_string()))?;
    crate::enroll::write_atomic(&dir.join("bootctl.json"), &bytes, 0o600)
        .map_err(|e| SlotError::Io(std::io::Error::other(format!("{e:#}"))))
}

impl Slots for FileSlots {
    fn control(&self) -> BootControl {
        self.control.clone()
    }

    fn write_inactive(&mut self, version: &str, src: &mut dyn Read) -> Result<Slot, SlotError> {
        let slot = self
            .control
            .inactive()
            .ok_or_else(|| SlotError::Refused("a trial is armed; no slot is free".into()))?;
        // Empty first: a crash mid-write leaves a slot that says it holds nothing. An older
        // trial's abandonment is forgotten with the old image (it says nothing of this one).
        self.update(|c| forget_slot(c, slot))?;
        let mut f = std::fs::File::create(self.image(slot))?;
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        let mut size = 0u64;
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            f.write_all(&buf[..n])?;
            size += n as u64;
        }
        f.sync_all()?;
        drop(f);
        let version = version.to_owned();
        self.update(|c| {
            c.slots[slot.idx()] = SlotInfo {
                version: Some(version),
                size,
            }
        })?;
        Ok(slot)
    }

    fn read(&self, slot: Slot, sink: &mut dyn FnMut(&[u8])) -> Result<(), SlotError> {
        let mut f = std::fs::File::open(self.image(slot))?;
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                return Ok(());
            }
            sink(&buf[..n]);
        }
    }

    fn arm_trial(&mut self) -> Result<Slot, SlotError> {
        let mut next = self.control.clone();
        let slot = do_arm(&mut next)?;
        self.update(|c| *c = next)?;
        Ok(slot)
    }

    fn commit(&mut self) -> Result<(), SlotError> {
        let mut next = self.control.clone();
        do_commit(&mut next)?;
        self.update(|c| *c = next)
    }

    fn revert(&mut self) -> Result<(), SlotError> {
        self.update(do_revert)
    }

    fn boot(&mut self) -> Result<BootOutcome, SlotError> {
        let mut next = self.control.clone();
        let out = do_boot(&mut next);
        if next != self.control {
            self.update(|c| *c = next)?;
        }
        Ok(out)
    }
}

/// A power budget for fault injection: every durable operation spends one unit; when it is
/// spent the operation fails (and so do all after it) as if the power went out.
#[derive(Debug, Clone, Default)]
pub struct Power(Arc<Mutex<Option<u64>>>);

impl Power {
    /// Unlimited.
    pub fn on() -> Self {
        Self::default()
    }
    /// Fails the operation after `n` more succeed.
    pub fn cut_after(&self, n: u64) {
        *mooring_proto::sync::lock(&self.0) = Some(n);
    }
    pub fn restore(&self) {
        *mooring_proto::sync::lock(&self.0) = None;
    }
    pub fn is_out(&self) -> bool {
        *mooring_proto::sync::lock(&self.0) == Some(0)
    }
    /// Spends one unit; `Err` when the power is out.
    pub fn spend(&self) -> std::io::Result<()> {
        let mut left = mooring_proto::sync::lock(&self.0);
        match &mut *left {
            None => Ok(()),
            Some(0) => Err(std::io::Error::other("power lost")),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
        }
    }
}

#[derive(Debug)]
struct MemInner {
    control: BootControl,
    images: [Vec<u8>; 2],
}

/// Slots in memory (the simulator's, tests'): clones share the same "flash", which survives
/// dropping the agent; every durable step spends [`Power`].
#[derive(Debug, Clone)]
pub struct MemSlots {
    inner: Arc<Mutex<MemInner>>,
    power: Power,
}

impl MemSlots {
    pub fn new(initial_version: Option<String>, initial_image: Vec<u8>, power: Power) -> Self {
        let mut control = BootControl::initial(initial_version);
        control.slots[0].size = initial_image.len() as u64;
        Self {
            inner: Arc::new(Mutex::new(MemInner {
                control,
                images: [initial_image, Vec::new()],
            })),
            power,
        }
    }
    /// The bytes in a slot.
    pub fn image(&self, slot: Slot) -> Vec<u8> {
        mooring_proto::sync::lock(&self.inner).images[slot.idx()].clone()
    }
    fn update(&self, f: impl FnOnce(&mut BootControl)) -> Result<(), SlotError> {
        self.power.spend()?;
        f(&mut mooring_proto::sync::lock(&self.inner).control);
        Ok(())
    }
}

impl Slots for MemSlots {
    fn control(&self) -> BootControl {
        mooring_proto::sync::lock(&self.inner).control.clone()
    }

    fn write_inactive(&mut self, version: &str, src: &mut dyn Read) -> Result<Slot, SlotError> {
        let slot = self
            .control()
            .inactive()
            .ok_or_else(|| SlotError::Refused("a trial is armed; no slot is free".into()))?;
        self.update(|c| forget_slot(c, slot))?;
        mooring_proto::sync::lock(&self.inner).images[slot.idx()].clear();
        let mut buf = vec![0u8; COPY_CHUNK_BYTES];
        loop {
            let n = src.read(&mut buf)?;
            if n == 0 {
                break;
            }
            self.power.spend()?;
            mooring_proto::sync::lock(&self.inner).images[slot.idx()].extend_from_slice(&buf[..n]);
        }
        let size = mooring_proto::sync::lock(&self.inner).images[slot.idx()].len() as u64;
        let version = version.to_owned();
        self.update(|c| {
            c.slots[slot.idx()] = SlotInfo {
                version: Some(version),
                size,
            }
        })?;
        Ok(slot)
    }

    fn read(&self, slot: Slot, sink: &mut dyn FnMut(&[u8])) -> Result<(), SlotError> {
        let image = self.image(slot);
        for chunk in image.chunks(COPY_CHUNK_BYTES) {
            sink(chunk);
        }
        Ok(())
    }

    fn arm_trial(&mut self) -> Result<Slot, SlotError> {
        let mut next = self.control();
        let slot = do_arm(&mut next)?;
        self.update(|c| *c = next)?;
        Ok(slot)
    }

    fn commit(&mut self) -> Result<(), SlotError> {
        let mut next = self.control();
        do_commit(&mut next)?;
        self.update(|c| *c = next)
    }

    fn revert(&mut self) -> Result<(), SlotError> {
        self.update(do_revert)
    }

    fn boot(&mut self) -> Result<BootOutcome, SlotError> {
        let mut next = self.control();
        let out = do_boot(&mut next);
        self.update(|c| *c = next)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cycle(s: &mut dyn Slots) {
        assert_eq!(s.boot().expect("boot"), BootOutcome::Committed(Slot::A));
        assert!(s.arm_trial().is_err(), "B is empty");
        let b = s
            .write_inactive("2.0", &mut &b"new image"[..])
            .expect("write");
        assert_eq!(b, Slot::B);
        let mut read = Vec::new();
        s.read(b, &mut |c| read.extend_from_slice(c)).expect("read");
        assert_eq!(read, b"new image");
        s.arm_trial().expect("arm");
        assert!(
            s.write_inactive("x", &mut &b""[..]).is_err(),
            "busy during a trial"
        );
        assert!(s.commit().is_err(), "not booted yet");
        assert_eq!(s.boot().expect("boot"), BootOutcome::Trial(Slot::B));
        assert_eq!(s.control().running(), Slot::B);
        // Never committed: the next boot goes back.
        assert_eq!(
            s.boot().expect("boot"),
            BootOutcome::Reverted {
                abandoned: Slot::B,
                booted: Slot::A
            }
        );
        assert_eq!(s.control().running(), Slot::A);
        assert_eq!(s.control().reverted, Some(Slot::B));
        // Again, committed this time.
        s.arm_trial().expect("arm");
        assert_eq!(s.boot().expect("boot"), BootOutcome::Trial(Slot::B));
        s.commit().expect("commit");
        assert_eq!(s.boot().expect("boot"), BootOutcome::Committed(Slot::B));
        assert_eq!(s.control().info(Slot::B).version.as_deref(), Some("2.0"));
        assert_eq!(s.control().inactive(), Some(Slot::A));
        // A revert before the trial boots.
        s.write_inactive("3.0", &mut &b"three"[..]).expect("write");
        s.arm_trial().expect("arm");
        s.revert().expect("revert");
        assert_eq!(s.boot().expect("boot"), BootOutcome::Committed(Slot::B));
    }

    #[test]
    fn file_slots_boot_trial_revert_and_commit_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = FileSlots::open(dir.path(), Some("1.0".into())).expect("open");
        cycle(&mut s);
        let again = FileSlots::open(dir.path(), None).expect("reopen");
        assert_eq!(again.control(), s.control());
        assert_eq!(again.control().committed, Slot::B);
        assert_eq!(
            FileSlots::peek(dir.path()).expect("peek"),
            Some(s.control())
        );
    }

    #[test]
    fn mem_slots_do_the_same_and_lose_power() {
        let power = Power::on();
        let mut s = MemSlots::new(Some("1.0".into()), b"one".to_vec(), power.clone());
        cycle(&mut s);
        power.cut_after(1);
        let before = s.control();
        assert!(s
            .write_inactive("4.0", &mut &vec![7u8; 200_000][..])
            .is_err());
        // The slot being written reads as empty; the committed one is untouched.
        let after = s.control();
        assert_eq!(after.committed, before.committed);
        assert_eq!(after.info(Slot::A).version, None);
    }
}
