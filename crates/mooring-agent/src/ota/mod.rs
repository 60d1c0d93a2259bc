//! Over-the-air updates on the device: A/B [`slots`], the crash-safe [`journal`], the [`update`] state machine, HTTP downloads ([`fetch`]) and the agent's wiring ([`agent`]).
//!
//! ```text
//!  mooring.update ──accept (journal)──> Waiting ─preconditions─> Downloading (Range resume,
//!       link refresh over MQTT) ─> Verifying (size, SHA-256) ─> Installing (inactive slot,
//!       read back) ─> Installed ─preconditions─> Rebooting (arm ONE trial boot) ─reboot─>
//!  boot() ─> HealthChecking (connected + health_command) ─> commit ─> Committed
//!                                 └─ failed ─> RollingBack (revert) ─reboot─> RolledBack
//! ```
//!
//! The manifest's signature (pinned Ed25519 key), hardware revision and version are checked
//! when the command arrives; size and hash after the download; the written slot is read back
//! and hashed before it is armed. Nothing unverified is ever armed or committed. A trial
//! that crashes, hangs or loses power is abandoned by the next [`slots::Slots::boot`].

pub mod agent;
pub mod fetch;
pub mod journal;
pub mod slots;
pub mod update;

#[cfg(test)]
mod tests;

pub use agent::Platform;
pub use journal::{FileUpdateFiles, Job, MemUpdateFiles, Phase, UpdateFiles};
pub use slots::{BootControl, BootOutcome, FileSlots, MemSlots, Power, Slot, Slots};
pub use update::{Body, Env, FetchError, Next, UpdateSettings, Updater};

/// Exit status of the agent when an update needs a reboot and no `reboot_command` is
/// configured: the service manager restarts it (systemd: `Restart=always` or
/// `RestartForceExitStatus=75`), which is the "reboot" of the slot simulation. 75 is
/// `EX_TEMPFAIL`.
pub const EXIT_REBOOT: i32 = 75;

/// `<state dir>/slots`.
pub fn slots_dir(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("slots")
}

/// `<state dir>/ota`.
pub fn journal_dir(state_dir: &std::path::Path) -> std::path::PathBuf {
    state_dir.join("ota")
}
