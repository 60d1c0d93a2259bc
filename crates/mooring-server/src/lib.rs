//! # mooring-server: one process that runs a fleet
//!
//! `mooring serve` builds a [`ServerConfig`], binds [`Listeners`] and calls [`run`]; tests bind
//! port 0 and call the same function (or run the binary). The pieces:
//!
//! * [`pki`]: the fleet CA and server certificate in the data dir; device certificates.
//! * [`mooring_broker`] (its own crate): the MQTT 3.1.1/5 session layer, over any stream.
//! * [`hooks`]: the broker's view of Mooring: certificate → device identity, the topic policy,
//!   telemetry ingest (PUBACK only after the group-commit writer made the point durable).
//! * [`app`]: [`app::App`], the bundle of services one server is made of; each service has
//!   private state and a narrow interface, and HTTP, MQTT, the CLI and the simulator use only
//!   those methods (no SQL, no HTTP in a service):
//!   * [`registry`]: devices, certificates, tags, selectors, delete.
//!   * [`telemetry`]: ingest through the group-commit writer, queries, retention.
//!   * [`commands`]: the device command model (idempotent create, ordered MQTT delivery,
//!     retries with backoff, expiry, cancel, acks/results, fleet fan-out, `wait_ms` waiters);
//!     the pure transition rules are in [`commands::state`].
//!   * [`shadow`]: device shadows (desired via the API, reported via MQTT, retained delta).
//!   * [`presence`]: online/offline and `last_seen`, flushed to the store in batches.
//!   * [`auth`]: API and service tokens.
//!   * [`oidc`]: OpenID Connect login (authorization code + PKCE, sealed state cookie, ID token
//!     claims → role and fleet scope), handing the identity to the accounts service.
//!   * [`fleet`]: fleet statistics: a selection's summary (online, per version), the sampled
//!     history of devices, online, points and messages per interval.
//!   * [`jobs`]: background jobs: bulk actions (tag, untag, command, delete) on a selection
//!     of devices, run once across a cluster with their progress stored per batch.
//!   * [`provision`]: claim tokens and enrollment (a device's own key, a certificate from the
//!     fleet CA, the device created with the claim's tags), over HTTPS and MQTT.
//!   * [`events`]: live events (presence, telemetry, commands, shadows) for SSE streams,
//!     resumable on any node.
//! * [`http`]: the JSON API (`/api/v1`), `/healthz`, `/metrics`, `/api/v1/openapi.json`.
//! * [`mooring_store`] (its own crate): storage traits + SQLite, group-commit writer.
//!
//! Data flow of one telemetry point: TLS accept → broker CONNECT → [`hooks::ServerHooks`]
//! authenticates the certificate → PUBLISH `devices/<id>/telemetry` → policy check → parse
//! (`mooring_proto::telemetry`) → `TelemetryWriter::append` (batched transaction + fsync) →
//! PUBACK → routed to subscribers.
//!
//! Every background task is owned: listeners and periodic jobs live in a `JoinSet`, connection
//! tasks in a `TaskTracker`; shutdown stops accepting, closes sessions, flushes presence and
//! drains the writer.

pub mod access;
pub mod accounts;
pub mod app;
pub mod audit;
pub mod auth;
pub mod broker_state;
pub mod cas;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod emails;
pub mod error;
pub mod events;
pub mod fleet;
pub mod gateways;
pub mod health;
pub mod hooks;
pub mod http;
pub mod jobs;
pub mod local;
pub mod metrics;
pub mod oidc;
pub mod ota;
pub mod pipeline;
pub mod pki;
pub mod playbooks;
pub mod presence;
pub mod provision;
pub mod ratelimit;
pub mod registry;
pub mod reports;
pub mod rollouts;
pub mod rules;
mod serve;
pub mod shadow;
pub mod telemetry;
pub mod webhooks;

pub use config::ServerConfig;
pub use metrics::render_metrics;
pub use serve::{run, Listeners, RunningServer};
