//! # mooring-proto: the wire format, defined once
//!
//! Everything a device and the server must agree on lives here and nowhere else:
//!
//! * [`id`]: device ids and their validation (`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`).
//! * [`topic`]: every MQTT topic Mooring uses, built and parsed in one place, plus MQTT
//!   topic-filter matching.
//! * [`telemetry`]: the telemetry payload (schema v1): reserved keys `seq` and `ts`, every other
//!   number or boolean is a metric point, nested objects flatten to `a.b`.
//! * [`policy`]: the topic policy evaluator (which principal may publish / subscribe where),
//!   with `{id}` and `{tag:<key>}` substitutions.
//! * [`command`]: command request / result payloads (schema v1) and command-id rules.
//! * [`shadow`]: shadow delta payload, merge-patch and delta rules (schema v1).
//! * [`provision`]: enrollment with a claim token and certificate renewal (schema v1).
//! * [`gateway`]: what a gateway may do for its children, and child presence (schema v1).
//! * [`ota`]: over-the-air updates: signed manifests, the update command, status reports (v1).
//! * [`selector`]: the fleet selector syntax (`tag:site=berlin and online`), parsed and evaluated.
//! * [`clock`]: the injected notion of "now" so business logic can run on virtual time.
//! * [`sync`]: poison-tolerant `std::sync` locking, the one helper every crate uses.
//!
//! The crate does no I/O and does not depend on tokio: the server, the agent and the simulator
//! all link it, so a change here is a change to the protocol promise made to devices in the
//! field. Golden tests in `tests/golden.rs` pin every payload version ever shipped.

pub mod clock;
pub mod command;
pub mod gateway;
pub mod id;
pub mod local;
pub mod ota;
pub mod policy;
pub mod provision;
pub mod selector;
pub mod shadow;
pub mod sync;
pub mod telemetry;
pub mod topic;

pub use clock::{Clock, ManualClock, SystemClock};
pub use id::{DeviceId, InvalidDeviceId};
pub use topic::Topic;
