//! A server started in-process on port 0 with a temporary data dir, for the service-level tests.

use std::sync::Arc;

use mooring_server::{Listeners, RunningServer, ServerConfig};

/// Starts a server in `dir`; `dev_listener` also opens the plain development listener.
pub async fn start(dir: &std::path::Path, dev_listener: bool) -> RunningServer {
    let config = ServerConfig {
        data_dir: dir.to_owned(),
        mqtt_addr: "127.0.0.1:0".parse().expect("addr"),
        mqtt_dev_addr: dev_listener.then(|| "127.0.0.1:0".parse().expect("addr")),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        ..ServerConfig::default()
    };
    let listeners = Listeners::bind(&config).await.expect("bind");
    RunningServer::start(config, listeners, Arc::new(mooring_proto::SystemClock))
        .await
        .expect("start")
}

/// Registers device `id` with a pinned certificate whose fingerprint is `fingerprint_byte`
/// repeated (distinct per device), as the simulator does.
#[allow(dead_code)]
pub async fn pinned_device(app: &mooring_server::app::App, id: &str, fingerprint_byte: u8) {
    app.registry
        .create_device_pinned(
            id,
            Default::default(),
            mooring_server::registry::PinnedCert {
                sha256_hex: format!("{fingerprint_byte:02x}").repeat(32),
                serial_hex: format!("{fingerprint_byte:02x}"),
                not_after_ms: u64::MAX / 2,
                issuer: mooring_store::CERT_ISSUER_FLEET.to_owned(),
            },
        )
        .await
        .expect("device");
}

/// Uploads `bytes` as artifact `version` for hardware `rev-a` (in 4 MiB chunks) and completes
/// it, the server signing: a ready artifact.
#[allow(dead_code)]
pub async fn ready_artifact(
    app: &mooring_server::app::App,
    version: &str,
    bytes: &[u8],
) -> mooring_store::ArtifactRecord {
    use sha2::Digest as _;
    const CHUNK_BYTES: usize = 4 * 1024 * 1024;
    let a = app
        .ota
        .create_artifact(
            "test",
            mooring_server::ota::NewArtifact {
                version: version.into(),
                compatible: vec!["rev-a".into()],
                notes: None,
                sha256: hex::encode(sha2::Sha256::digest(bytes)),
                size: bytes.len() as u64,
            },
        )
        .await
        .expect("artifact");
    for (i, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
        app.ota
            .put_content(&a.id, (i * CHUNK_BYTES) as u64, chunk.to_vec())
            .await
            .expect("chunk");
    }
    app.ota.complete(&a.id, None).await.expect("complete")
}
