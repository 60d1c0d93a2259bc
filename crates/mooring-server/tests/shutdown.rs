//! Shutdown is deterministic and frees the server: nothing (no reference cycle through the
//! broker's hooks) keeps the app, its store connections or its writers alive afterwards, which
//! is what lets the simulator restart a server in one process without leaking the old one.

mod support;

use mooring_server::RunningServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start(dir: &std::path::Path) -> RunningServer {
    support::start(dir, true).await
}

/// A v3.1.1 client on the dev listener with a persistent session and a subscription.
async fn connected_client(server: &RunningServer) -> tokio::net::TcpStream {
    let addr = server.mqtt_dev_addr.expect("dev listener");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // CONNECT: protocol "MQTT" level 4, clean session 0, keep-alive 60, client id "c1".
    tcp.write_all(&[
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x00, 0, 60, 0, 2, b'c', b'1',
    ])
    .await
    .expect("CONNECT");
    let mut connack = [0u8; 4];
    tcp.read_exact(&mut connack).await.expect("CONNACK");
    assert_eq!(connack[..2], [0x20, 2]);
    assert_eq!(connack[3], 0, "accepted");
    // SUBSCRIBE id 1 to "a/#" QoS 1.
    tcp.write_all(&[0x82, 8, 0, 1, 0, 3, b'a', b'/', b'#', 1])
        .await
        .expect("SUBSCRIBE");
    let mut suback = [0u8; 5];
    tcp.read_exact(&mut suback).await.expect("SUBACK");
    assert_eq!(suback, [0x90, 3, 0, 1, 1]);
    tcp
}

#[tokio::test]
async fn shutdown_with_a_connected_client_frees_the_app_its_store_and_its_writers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let probe = server.state_probe();
    let mut client = connected_client(&server).await;
    server.shutdown().await;
    assert!(
        probe.upgrade().is_none(),
        "the app (store, writers) must be freed by shutdown"
    );
    // The client was told and disconnected (EOF after whatever the server sent).
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.read_to_end(&mut rest),
    )
    .await
    .expect("connection closed by the shutdown");

    // The same data dir opens again at once (nothing holds it), with the session still there.
    let server = start(dir.path()).await;
    let probe = server.state_probe();
    let addr = server.mqtt_dev_addr.expect("dev listener");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.write_all(&[
        0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x00, 0, 60, 0, 2, b'c', b'1',
    ])
    .await
    .expect("CONNECT");
    let mut connack = [0u8; 4];
    tcp.read_exact(&mut connack).await.expect("CONNACK");
    assert_eq!(
        connack,
        [0x20, 2, 1, 0],
        "session present after the restart"
    );
    drop(tcp);
    server.shutdown().await;
    assert!(probe.upgrade().is_none());
}

/// A download in progress whose client stopped reading does not keep the server alive: its
/// feeder task is the OTA service's, aborted by the shutdown (not left holding the app until
/// `[ota] download_idle_timeout_ms`).
#[tokio::test]
async fn shutdown_during_a_stalled_download_frees_the_app() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path()).await;
    let probe = server.state_probe();
    let app = server.app.clone();
    support::pinned_device(&app, "dl-1", 0xab).await;
    // Larger than the socket buffers, so the server is left waiting on its client.
    let a = support::ready_artifact(&app, "2.0.0", &vec![7u8; 16 * 1024 * 1024]).await;
    let registered_at_ms = app
        .registry
        .lookup("dl-1")
        .await
        .expect("lookup")
        .expect("device")
        .created_at_ms;
    let link = app.ota.link_for("dl-1", registered_at_ms, &a.id, 60_000);
    let path = link
        .url
        .find("/api/")
        .map(|i| &link.url[i..])
        .expect("path");
    let mut tcp = tokio::net::TcpStream::connect(server.http_addr)
        .await
        .expect("connect");
    tcp.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            link.token
        )
        .as_bytes(),
    )
    .await
    .expect("request");
    let mut head = [0u8; 12];
    tcp.read_exact(&mut head).await.expect("status line");
    assert_eq!(&head, b"HTTP/1.1 200");
    // The client reads nothing more; the app is referenced by the download meanwhile.
    drop(app);
    server.shutdown().await;
    assert!(
        probe.upgrade().is_none(),
        "a stalled download must not keep the app alive after shutdown"
    );
    drop(tcp);
}
