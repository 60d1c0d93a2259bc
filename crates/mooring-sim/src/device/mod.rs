//! One simulated device: its link (cut, outages, latency), its flash (a counting `MemStore`), its
//! injected command handlers, and the task that runs the real agent through power losses,
//! crashes and an empty battery while feeding it telemetry on the virtual clock.
//!
//! Measurement hooks live here too: [`LedgerStore`] records which `sim.n` values the agent
//! deleted from its outbox because their PUBACK arrived (the set that must be in the server's
//! store at the end), and [`SimHandler`] counts executions per command.
//!
//! Here: the device's state and the run-wide [`Stats`]; `link.rs` is the in-memory network,
//! `probes.rs` the measurement hooks and `lifecycle.rs` the device task.

mod enroll;
pub mod gateway;
mod lifecycle;
mod link;
pub mod ota;
mod probes;

pub use enroll::{enroll_device, EnrollProbe, FAULTS, STEPS, STEP_KEY, STEP_REGISTERED};
pub use lifecycle::{run_device, BATTERY_ON_PCT};
pub use link::{DeviceLink, Net, SimConnector, LATENCY_CHUNK_BYTES, PIPE_SIZE_BYTES};
pub use probes::{LedgerStore, SimHandler};

use crate::scenario::Cohort;
use mooring_agent::{AgentConfig, Diagnostics, MemStore};
use mooring_proto::sync::lock;
use mooring_proto::{Clock, DeviceId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Telemetry objects buffered between a device's generator and its agent; more and the
/// message is counted in `telemetry_input_dropped` instead of sent.
pub const INPUT_QUEUE_MAX: usize = 8;
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
    /// Enrollment faults fired: the link dropped before the request reached the server.
    pub enroll_drops_before_request: AtomicU64,
    /// ... after the server answered, before the answer reached the device.
    pub enroll_drops_before_reply: AtomicU64,
    /// The process was killed after the answer arrived, before the certificate was stored.
    pub enroll_kills: AtomicU64,
    /// The link was down when the device first connected with its certificate.
    pub enroll_drops_before_first_connect: AtomicU64,
    /// OTA downloads the server answered with the artifact's bytes (whole or from an offset).
    pub ota_downloads: AtomicU64,
    /// ... of them from an offset (a resumed download).
    pub ota_downloads_resumed: AtomicU64,
    /// Downloads refused because the server served as many as it may (429/503).
    pub ota_downloads_busy: AtomicU64,
    /// Downloads broken by a link cut.
    pub ota_downloads_cut: AtomicU64,
    /// Reboots the updaters asked for (into a trial, or back after a failed one).
    pub ota_reboots: AtomicU64,
    /// Power losses injected during an update (`[cohort.ota] power_loss_rate`), by phase.
    pub ota_power_losses: ota::LossesByPhase,
    /// Telemetry messages gateways' children handed to their gateway (`[cohort.gateway]`).
    pub children_telemetry_sent: AtomicU64,
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
    /// An enrolling cohort's device: its pipeline (set before the run starts).
    pub enroll: Option<Arc<EnrollProbe>>,
    /// An updating cohort's device: its slots and journal (`[cohort.ota]`).
    pub ota: Option<ota::DeviceOta>,
    /// A gateway cohort's device: its children (set before the run starts).
    pub gateway: Option<Arc<gateway::GatewayChildren>>,
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
            enroll: None,
            ota: cohort
                .ota
                .as_ref()
                .map(|o| ota::DeviceOta::new(o, &cohort.version, seed, index as u64)),
            gateway: None,
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

/// What a device task needs besides its own state (shared by the devices of one cohort).
pub struct CohortModel {
    pub cohort: Cohort,
    pub clock: Arc<dyn Clock>,
    pub agent_config: AgentConfig,
    /// Names of the commands the scenario sends (each gets a [`SimHandler`]).
    pub command_names: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_seeds_differ_and_repeat() {
        assert_eq!(derive_seed(1, 2, 3), derive_seed(1, 2, 3));
        assert_ne!(derive_seed(1, 2, 3), derive_seed(1, 3, 3));
        assert_ne!(derive_seed(1, 2, 3), derive_seed(1, 2, 4));
    }
}
