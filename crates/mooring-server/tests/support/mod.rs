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
