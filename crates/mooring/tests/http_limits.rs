//! The HTTP API listener's bounds (header/idle/body timeouts, connection cap) and its error
//! shape, seen from raw sockets and real clients against the real binary.

mod support;

use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Instant;
use support::{config_args, MqttDevice, Server, WAIT};

/// Small limits so the tests are quick: every timeout 300 ms, at most 4 API connections.
const LIMITS: &str = "[http]\nheader_read_timeout_ms = 300\nrequest_body_timeout_ms = 300\nconnections_max = 4\n[limits]\ntls_handshake_timeout_ms = 300\n";

fn start(tmp: &Path, extra: &[&str]) -> Server {
    let mut args = config_args(tmp, LIMITS);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with(&tmp.join("data"), "127.0.0.1:0", "127.0.0.1:0", &args)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(WAIT)).expect("read timeout");
    s
}

/// Reads until the server closes the connection; returns what it sent. Panics if the
/// connection is still open after [`WAIT`].
fn read_until_closed(stream: &mut impl Read) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
            // rustls: the peer closed the TCP connection without close_notify.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return got,
            Err(e) => panic!(
                "connection still open after {WAIT:?} ({e}); received so far: {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// Splits a raw HTTP/1.1 response into (status, headers lowercased, body).
fn parse_response(raw: &[u8]) -> (u16, String, Value) {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .expect("a complete response head");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (
        status,
        head.to_ascii_lowercase(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

#[tokio::test]
async fn idle_half_sent_and_kept_alive_connections_are_closed_after_the_header_timeout() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start(tmp.path(), &[]);

    // A socket that never sends a byte.
    let mut idle = connect(server.http);
    read_until_closed(&mut idle);

    // A request header that stops half way.
    let mut half = connect(server.http);
    half.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .expect("write");
    let got = read_until_closed(&mut half);
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "a half-sent request was answered: {}",
        String::from_utf8_lossy(&got)
    );

    // A kept-alive connection that goes quiet after a complete request and its answer.
    let mut kept = connect(server.http);
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("write");
    let got = read_until_closed(&mut kept);
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.contains(r#""status":"ok""#),
        "{text}"
    );
    // Each of the three was counted as a header timeout.
    assert_eq!(
        server
            .metric("mooring_http_refusals_total{reason=\"header_timeout\"}")
            .await,
        3.0
    );
}

#[tokio::test]
async fn https_idle_and_half_sent_connections_are_closed_too() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start(tmp.path(), &["--http-tls"]);

    // No TLS handshake at all: closed after the handshake timeout.
    let mut raw = connect(server.http);
    read_until_closed(&mut raw);

    // A finished handshake, then a request header that stops half way.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(server.data_dir.join("ca.crt")).expect("ca.crt");
    use rustls_pki_types::pem::PemObject;
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls_pki_types::ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).expect("tls");
    let mut tls = rustls::StreamOwned::new(conn, connect(server.http));
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .expect("write");
    let got = read_until_closed(&mut tls);
    assert!(!String::from_utf8_lossy(&got).contains("200 OK"));
    // The silent socket was counted as a failed handshake (read /metrics over HTTPS).
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("ca"))
        .build()
        .expect("client");
    let text = client
        .get(format!("https://localhost:{}/metrics", server.http.port()))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("body");
    assert!(
        text.contains("mooring_http_refusals_total{reason=\"tls_handshake\"} 1\n"),
        "{text}"
    );
}

#[tokio::test]
async fn request_body_that_never_arrives_answers_408_json() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start(tmp.path(), &[]);
    let mut s = connect(server.http);
    let head = format!(
        "POST /api/v1/devices HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"id\":",
        server.token
    );
    s.write_all(head.as_bytes()).expect("write");
    let got = read_until_closed(&mut s);
    let (status, headers, body) = parse_response(&got);
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&got));
    assert!(
        headers.contains("content-type: application/json"),
        "{headers}"
    );
    assert_eq!(body["error"]["code"], "request_timeout", "{body}");
    assert_eq!(
        server
            .metric("mooring_http_refusals_total{reason=\"body_timeout\"}")
            .await,
        1.0
    );
}

/// The server's descriptor limit in the cap test: it needs about 25 to run.
const NOFILE: u32 = 48;
/// Idle API sockets the cap test opens: more than the descriptors the server has left.
const IDLERS: usize = 40;
/// Descriptors the server may open or close on its own meanwhile (a lingering CLI connection).
const SLACK: usize = 2;

#[tokio::test]
async fn connection_cap_keeps_descriptors_for_devices_and_healthz_answers_when_idlers_time_out() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let args = config_args(tmp.path(), LIMITS);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Few descriptors: without the cap, the idle sockets below would take all of them.
    let server = Server::start_after_shell(&data, &format!("ulimit -n {NOFILE}"), &args);
    let creds = server.create_device("d1", tmp.path());
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let baseline = fds();

    let idlers: Vec<TcpStream> = (0..IDLERS).map(|_| connect(server.http)).collect();
    // The server has taken as many of them as it will (the cap) before the device comes.
    let deadline = Instant::now() + WAIT;
    while fds() < baseline + 4 {
        assert!(
            Instant::now() < deadline,
            "the server never accepted 4 idle sockets"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    // A device can still connect and publish while the idle sockets queue up.
    let mut device = MqttDevice::connect(&server, &creds, "d1").await;
    device
        .publish("devices/d1/telemetry", r#"{"seq":1,"n":1}"#)
        .await;
    // The server holds at most the cap (4) of the idle sockets, plus the device's.
    let now = fds();
    assert!(
        now <= baseline + 4 + 1 + SLACK,
        "{now} descriptors open, baseline {baseline}, cap 4"
    );

    // /healthz on a new connection answers once the idle ones ahead of it have timed out.
    let started = Instant::now();
    let mut s = connect(server.http);
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("write");
    let got = read_until_closed(&mut s);
    let (status, _, body) = parse_response(&got);
    assert_eq!(status, 200, "after {:?}", started.elapsed());
    assert_eq!(body["status"], "ok");
    assert!(
        server
            .metric("mooring_http_refusals_total{reason=\"connection_cap\"}")
            .await
            >= 1.0
    );
    let now = fds();
    assert!(
        now <= baseline + 4 + 1 + SLACK,
        "{now}, baseline {baseline}"
    );
    drop(idlers);
}

#[tokio::test]
async fn router_rejections_are_json_errors() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start(tmp.path(), &[]);
    let client = support::http();
    let url = server.url();
    let check = |resp: reqwest::Response, status: u16, code: &'static str| async move {
        assert_eq!(resp.status().as_u16(), status, "{code}");
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        assert!(ct.starts_with("application/json"), "{code}: {ct}");
        let body: Value = resp.json().await.expect("json body");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"].is_string(), "{body}");
    };
    let auth = |r: reqwest::RequestBuilder| r.bearer_auth(&server.token);

    // A path segment that is not UTF-8 once percent-decoded.
    let r = auth(client.get(format!("{url}/api/v1/devices/%ff")))
        .send()
        .await
        .expect("http");
    check(r, 400, "invalid_path").await;
    let r = auth(client.get(format!("{url}/api/v1/devices/%ff/commands/%fe")))
        .send()
        .await
        .expect("http");
    check(r, 400, "invalid_path").await;
    let r = auth(client.get(format!("{url}/api/v1/devices?limit=many")))
        .send()
        .await
        .expect("http");
    check(r, 400, "invalid_query").await;
    let r = auth(client.get(format!("{url}/nope")))
        .send()
        .await
        .expect("http");
    check(r, 404, "route_not_found").await;
    let r = auth(client.patch(format!("{url}/api/v1/devices")))
        .send()
        .await
        .expect("http");
    check(r, 405, "method_not_allowed").await;
    let r = auth(client.post(format!("{url}/api/v1/devices")))
        .body(r#"{"id":"x"}"#)
        .send()
        .await
        .expect("http");
    check(r, 415, "unsupported_media_type").await;
    let r = auth(client.post(format!("{url}/api/v1/devices")))
        .header("content-type", "application/json")
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .expect("http");
    check(r, 413, "payload_too_large").await;
}

#[tokio::test]
async fn storage_errors_answer_503_with_an_id_not_the_backend_text() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = start(tmp.path(), &[]);
    // Another process holds the database's write lock, so the server's write fails (after its
    // busy timeout) with SQLite's "database is locked".
    let db = rusqlite::Connection::open(server.data_dir.join("mooring.db")).expect("open db");
    db.execute_batch("BEGIN EXCLUSIVE").expect("lock");
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/devices",
            Some(serde_json::json!({"id": "d1"})),
        )
        .await;
    db.execute_batch("ROLLBACK").expect("unlock");
    // A store that cannot take the write now is a 503 with a stable code (retry later), not a
    // 500; internal errors use the same id scheme (unit-tested in mooring-server's error.rs).
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "storage_unavailable");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(!message.contains("locked"), "{message}");
    let id = message
        .strip_prefix("storage unavailable; retry later (server log id ")
        .and_then(|m| m.strip_suffix(')'))
        .expect("message names a log id");
    // The server writes the line before answering; our reader thread may not have it yet.
    server.wait_log(id);
    let log = server.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(id) && l.contains("database is locked")),
        "the log line with id {id} and the backend text: {log}"
    );
}
