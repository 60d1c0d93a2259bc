//! The in-process server: a real `mooring` server on the simulator's virtual clock, whose
//! MQTT sessions are served over in-memory streams instead of TCP + TLS.
//!
//! Everything above the transport is the production code path: the broker, the hooks
//! (device lookup and certificate pin check, policy, telemetry ingest with group commit), the
//! store, presence, commands. What is skipped is the TLS handshake: each simulated device is
//! registered with a certificate fingerprint, and its in-memory connection presents that
//! identity as if the handshake had verified it. The devices' connections are opened by
//! [`crate::device::SimConnector`] against the broker of whichever server is running.

use anyhow::Context;
use mooring_proto::Clock;
use mooring_server::registry::PinnedCert;
use mooring_server::{Listeners, RunningServer, ServerConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A running in-process server and the data dir it was started on.
pub struct InProcessServer {
    pub server: RunningServer,
    data_dir: PathBuf,
}

/// The fingerprint a simulated device's "certificate" has.
pub fn sim_cert_sha256(device_id: &str) -> String {
    format!("sim-{device_id}")
}

impl InProcessServer {
    /// Starts a server with its data in `data_dir` on `clock`. TCP listeners are bound on
    /// loopback port 0 (the HTTP API stays usable for inspection) but devices use
    /// [`crate::device::SimConnector`].
    pub async fn start(data_dir: &Path, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let config = ServerConfig {
            data_dir: data_dir.to_owned(),
            mqtt_addr: "127.0.0.1:0".parse()?,
            http_addr: "127.0.0.1:0".parse()?,
            ..ServerConfig::default()
        };
        let listeners = Listeners::bind(&config).await?;
        let server = RunningServer::start(config, listeners, clock)
            .await
            .context("starting the in-process server")?;
        Ok(Self {
            server,
            data_dir: data_dir.to_owned(),
        })
    }

    /// Stops the server gracefully (sessions closed, writer drained) and starts it again on the
    /// same data dir.
    pub async fn restart(self, clock: Arc<dyn Clock>) -> anyhow::Result<Self> {
        let dir = self.data_dir.clone();
        self.server.shutdown().await;
        Self::start(&dir, clock).await
    }

    pub async fn shutdown(self) {
        self.server.shutdown().await;
    }

    /// Registers a device with a simulated certificate.
    pub async fn register(&self, id: &str, tags: BTreeMap<String, String>) -> anyhow::Result<()> {
        self.server
            .app
            .registry
            .create_device_pinned(
                id,
                tags,
                PinnedCert {
                    sha256_hex: sim_cert_sha256(id),
                    serial_hex: "00".into(),
                    not_after_ms: u64::MAX / 2,
                },
            )
            .await
            .with_context(|| format!("registering {id}"))?;
        Ok(())
    }
}
