//! The real agent binary against the local Mosquitto (127.0.0.1:1883, plain MQTT) behind a
//! throwaway mTLS-terminating proxy: delivery order, buffering through an outage, restarts.
//!
//! The proxy requires a client certificate signed by the test CA (like the Mooring server
//! does) and splices the decrypted bytes to Mosquitto. A plain MQTT subscriber on Mosquitto
//! sees what the server would receive. Every device CN is unique per run, so tests do not see
//! each other's messages on the shared broker.

use anyhow::{bail, Context as _};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};

const MOSQUITTO: &str = "127.0.0.1:1883";
/// Upper bound for any single wait in these tests; a healthy run needs a fraction of it.
const WAIT_SECS_MAX: u64 = 60;

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(Duration::from_secs(WAIT_SECS_MAX), fut)
        .await
        .with_context(|| format!("timed out after {WAIT_SECS_MAX}s waiting for {what}"))
}

fn unique_cn(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("agent-test-{test}-{}-{nanos}", std::process::id())
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate whose CN is the device id,
/// written as PEM files.
struct Pki {
    dir: tempfile::TempDir,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivateKeyDer<'static>,
    ca_der: CertificateDer<'static>,
}

impl Pki {
    fn new(cn: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mooring agent test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut server_params = CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "mooring test server");
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server_cert = server_params.signed_by(&server_key, &ca)?;

        let mut client_params = CertificateParams::new(Vec::<String>::new())?;
        client_params
            .distinguished_name
            .push(DnType::CommonName, cn);
        client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate()?;
        let client_cert = client_params.signed_by(&client_key, &ca)?;

        std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
        std::fs::write(dir.path().join("client.pem"), client_cert.pem())?;
        std::fs::write(dir.path().join("client.key"), client_key.serialize_pem())?;
        Ok(Self {
            server_chain: vec![server_cert.der().clone()],
            server_key: PrivateKeyDer::try_from(server_key.serialize_der())
                .map_err(|e| anyhow::anyhow!("server key: {e}"))?,
            ca_der: ca.der().clone(),
            dir,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn acceptor(&self) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()?;
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.server_chain.clone(), self.server_key.clone_key())?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

/// mTLS on `127.0.0.1:port`, spliced to Mosquitto. Dropping or stopping it closes the
/// listener and every proxied connection.
struct Proxy {
    port: u16,
    task: JoinHandle<()>,
}

impl Proxy {
    async fn start(acceptor: tokio_rustls::TlsAcceptor, port: u16) -> anyhow::Result<Self> {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(([127, 0, 0, 1], port).into())?;
        let listener = socket.listen(64)?;
        let port = listener.local_addr()?.port();
        let task = tokio::spawn(async move {
            // Owns every connection: aborting the accept loop drops the set, which aborts them.
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((tcp, _)) = accepted else { continue };
                        let acceptor = acceptor.clone();
                        conns.spawn(async move {
                            let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                            let Ok(mut upstream) = TcpStream::connect(MOSQUITTO).await else { return };
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut upstream).await;
                        });
                    }
                    Some(_) = conns.join_next() => {}
                }
            }
        });
        Ok(Self { port, task })
    }

    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A plain MQTT subscriber on Mosquitto for `devices/<cn>/telemetry`; ready when returned.
struct Subscriber {
    rx: mpsc::Receiver<Value>,
    task: JoinHandle<()>,
}

impl Subscriber {
    async fn start(cn: &str) -> anyhow::Result<Self> {
        let mut opts = MqttOptions::new(format!("sub-{cn}"), "127.0.0.1", 1883);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_max_packet_size(128 * 1024, 128 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 16);
        client
            .subscribe(format!("devices/{cn}/telemetry"), QoS::AtLeastOnce)
            .await?;
        within(
            "SUBACK from Mosquitto (is it running on 127.0.0.1:1883?)",
            async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::SubAck(_))) => return Ok(()),
                        Ok(_) => {}
                        Err(e) => bail!("subscriber cannot reach Mosquitto at {MOSQUITTO}: {e}"),
                    }
                }
            },
        )
        .await??;
        let (tx, rx) = mpsc::channel(10_000);
        let task = tokio::spawn(async move {
            let _client = client;
            while let Ok(event) = eventloop.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    let v = serde_json::from_slice(&p.payload).unwrap_or(Value::Null);
                    if tx.send(v).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(Self { rx, task })
    }

    async fn next(&mut self) -> anyhow::Result<Value> {
        within("a telemetry message", self.rx.recv())
            .await?
            .context("subscriber stopped")
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn seq_of(v: &Value) -> anyhow::Result<u64> {
    v["seq"].as_u64().with_context(|| format!("no seq in {v}"))
}

fn line_of(v: &Value) -> anyhow::Result<u64> {
    v["line"]
        .as_u64()
        .with_context(|| format!("no line in {v}"))
}

fn agent(pki: &Pki, port: u16, state_dir: &Path, extra: &[&str]) -> anyhow::Result<Child> {
    let child = Command::new(env!("CARGO_BIN_EXE_mooring-agent"))
        .arg("--server")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--cert")
        .arg(pki.path("client.pem"))
        .arg("--key")
        .arg(pki.path("client.key"))
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .arg("--state-dir")
        .arg(state_dir)
        .args(["--interval-secs", "0"])
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    Ok(child)
}

/// Waits until the outbox in `state_dir` holds the message for input line `line` (proof that
/// it was buffered durably while the server was unreachable).
async fn wait_until_outbox_holds_line(state_dir: &Path, line: u64) -> anyhow::Result<()> {
    let db = state_dir.join("outbox.sqlite3");
    let holds = |db: &Path| -> anyhow::Result<bool> {
        let conn = rusqlite::Connection::open_with_flags(
            db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(Duration::from_secs(5))?;
        let mut stmt = conn.prepare("SELECT payload FROM outbox ORDER BY seq")?;
        let payloads = stmt
            .query_map([], |r| r.get::<_, Vec<u8>>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(payloads.iter().any(|p| {
            serde_json::from_slice::<Value>(p)
                .map(|v| v["line"].as_u64() == Some(line))
                .unwrap_or(false)
        }))
    };
    within(&format!("line {line} in the outbox"), async {
        // The agent may not have created the file or its tables yet: errors mean "not yet".
        while !(db.exists() && holds(&db).unwrap_or(false)) {
            // Polling a condition, not waiting for time to pass.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

async fn write_lines(child: &mut Child, lines: &[String]) -> anyhow::Result<()> {
    let stdin = child.stdin.as_mut().context("agent stdin")?;
    for l in lines {
        stdin.write_all(l.as_bytes()).await?;
        stdin.write_all(b"\n").await?;
    }
    stdin.flush().await?;
    Ok(())
}

fn json_lines(range: std::ops::Range<u64>) -> Vec<String> {
    range
        .map(|i| format!(r#"{{"line": {i}, "temp": {{"c": 20.5}}}}"#))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_arrive_once_in_order_and_buffer_through_a_server_outage() -> anyhow::Result<()> {
    let cn = unique_cn("outage");
    let pki = Pki::new(&cn)?;
    let state = tempfile::tempdir()?;
    let mut sub = Subscriber::start(&cn).await?;
    let proxy = Proxy::start(pki.acceptor()?, 0).await?;
    let port = proxy.port;

    let mut child = agent(
        &pki,
        port,
        state.path(),
        &["--input", "-", "--exit-when-drained"],
    )?;

    // Phase 1: connected. Bad lines are skipped, not fatal.
    let mut first = json_lines(0..5);
    first.insert(2, "this is not json".into());
    first.insert(4, "[1, 2, 3]".into());
    write_lines(&mut child, &first).await?;
    let mut last_seq = 0;
    for want in 0..5 {
        let msg = sub.next().await?;
        assert_eq!(line_of(&msg)?, want, "message {msg}");
        assert_eq!(
            msg["temp"]["c"],
            serde_json::json!(20.5),
            "nested objects kept"
        );
        assert!(msg["ts"].as_u64().is_some(), "ts added: {msg}");
        let seq = seq_of(&msg)?;
        assert!(seq > last_seq, "seq {seq} after {last_seq}");
        last_seq = seq;
    }

    // Phase 2: the server goes away; new lines are buffered durably.
    proxy.stop().await;
    write_lines(&mut child, &json_lines(5..10)).await?;
    wait_until_outbox_holds_line(state.path(), 9).await?;

    // Phase 3: the server is back on the same port; the backlog drains in order.
    let proxy = Proxy::start(pki.acceptor()?, port).await?;
    let mut next_line = 5;
    while next_line < 10 {
        let msg = sub.next().await?;
        let seq = seq_of(&msg)?;
        if seq <= last_seq {
            // A redelivery of a phase-1 message whose PUBACK was cut off: allowed, the server
            // dedupes (device, seq).
            assert!(
                line_of(&msg)? < 5,
                "old seq {seq} carries a new line: {msg}"
            );
            continue;
        }
        assert_eq!(line_of(&msg)?, next_line, "message {msg}");
        last_seq = seq;
        next_line += 1;
    }

    // End of input + empty outbox => exit 0.
    drop(child.stdin.take());
    let status = within("the agent to exit after draining", child.wait()).await??;
    assert!(status.success(), "agent exited with {status}");
    proxy.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_survives_a_killed_agent_and_seq_continues() -> anyhow::Result<()> {
    let cn = unique_cn("restart");
    let pki = Pki::new(&cn)?;
    let state = tempfile::tempdir()?;
    // Reserve a port, then take the server down.
    let proxy = Proxy::start(pki.acceptor()?, 0).await?;
    let port = proxy.port;
    proxy.stop().await;

    // Run 1: server unreachable; three lines are buffered; the agent is killed (SIGKILL).
    let input1 = pki.path("input1.jsonl");
    std::fs::write(&input1, json_lines(0..3).join("\n"))?;
    let input1_arg = input1.to_str().context("utf-8 path")?;
    let mut child = agent(&pki, port, state.path(), &["--input", input1_arg])?;
    wait_until_outbox_holds_line(state.path(), 2).await?;
    child.kill().await?;

    // Run 2: server back; the restarted agent drains the backlog in order and exits.
    let mut sub = Subscriber::start(&cn).await?;
    let proxy = Proxy::start(pki.acceptor()?, port).await?;
    let mut child = agent(&pki, port, state.path(), &["--exit-when-drained"])?;
    let mut last_seq = 0;
    for want in 0..3 {
        let msg = sub.next().await?;
        assert_eq!(line_of(&msg)?, want, "message {msg}");
        let seq = seq_of(&msg)?;
        assert!(seq > last_seq, "seq {seq} after {last_seq}");
        last_seq = seq;
    }
    let status = within("the agent to exit after draining", child.wait()).await??;
    assert!(status.success(), "agent exited with {status}");

    // Run 3: a new message continues the seq; nothing old is resent.
    let input3 = pki.path("input3.jsonl");
    std::fs::write(&input3, "{\"line\": 3}\n")?;
    let input3_arg = input3.to_str().context("utf-8 path")?;
    let mut child = agent(
        &pki,
        port,
        state.path(),
        &["--input", input3_arg, "--exit-when-drained"],
    )?;
    let msg = sub.next().await?;
    assert_eq!(line_of(&msg)?, 3, "message {msg}");
    assert!(
        seq_of(&msg)? > last_seq,
        "seq continues after a restart: {msg}"
    );
    let status = within("the agent to exit after draining", child.wait()).await??;
    assert!(status.success(), "agent exited with {status}");
    proxy.stop().await;
    Ok(())
}

#[tokio::test]
async fn run_fails_fast_on_a_certificate_without_a_valid_device_id() -> anyhow::Result<()> {
    let pki = Pki::new("not a valid id!")?;
    let state = tempfile::tempdir()?;
    let config = mooring_agent::AgentConfig::new(
        "127.0.0.1",
        1,
        pki.path("client.pem"),
        pki.path("client.key"),
        pki.path("ca.pem"),
        state.path(),
    );
    let clock = Arc::new(mooring_proto::SystemClock);
    let err = mooring_agent::run(config, clock, std::future::pending())
        .await
        .expect_err("invalid CN must be refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("invalid device id"), "{msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_backlog_drains_exactly_once_in_order_through_the_send_window() -> anyhow::Result<()>
{
    const LINES: u64 = 2_000;
    let cn = unique_cn("backlog");
    let pki = Pki::new(&cn)?;
    let state = tempfile::tempdir()?;
    let input = pki.path("input.jsonl");
    std::fs::write(&input, json_lines(0..LINES).join("\n"))?;
    let input_arg = input.to_str().context("utf-8 path")?;
    let mut sub = Subscriber::start(&cn).await?;
    let proxy = Proxy::start(pki.acceptor()?, 0).await?;
    let mut child = agent(
        &pki,
        proxy.port,
        state.path(),
        &["--input", input_arg, "--exit-when-drained"],
    )?;
    let mut last_seq = 0;
    for want in 0..LINES {
        let msg = sub.next().await?;
        assert_eq!(line_of(&msg)?, want, "message {msg}");
        let seq = seq_of(&msg)?;
        // Strictly increasing; not necessarily consecutive, since shadow reports and command
        // results share the outbox (and its seq) with telemetry.
        assert!(seq > last_seq, "increasing seqs: {msg}");
        last_seq = seq;
    }
    let status = within("the agent to exit after draining", child.wait()).await??;
    assert!(status.success(), "agent exited with {status}");
    proxy.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_metrics_are_sent_at_start() -> anyhow::Result<()> {
    let cn = unique_cn("metrics");
    let pki = Pki::new(&cn)?;
    let state = tempfile::tempdir()?;
    let mut sub = Subscriber::start(&cn).await?;
    let proxy = Proxy::start(pki.acceptor()?, 0).await?;
    // No input: with --exit-when-drained the agent sends its first sample and exits.
    let mut child = Command::new(env!("CARGO_BIN_EXE_mooring-agent"))
        .arg("--server")
        .arg(format!("127.0.0.1:{}", proxy.port))
        .arg("--cert")
        .arg(pki.path("client.pem"))
        .arg("--key")
        .arg(pki.path("client.key"))
        .arg("--ca")
        .arg(pki.path("ca.pem"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("--exit-when-drained")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let msg = sub.next().await?;
    for key in ["seq", "ts", "uptime_secs"] {
        assert!(msg[key].as_u64().is_some(), "{key} in {msg}");
    }
    assert!(msg["load"]["1m"].as_f64().is_some(), "{msg}");
    let total = msg["mem"]["total_bytes"]
        .as_u64()
        .context("mem.total_bytes")?;
    let used = msg["mem"]["used_bytes"]
        .as_u64()
        .context("mem.used_bytes")?;
    assert!(total > 0 && used <= total, "{msg}");
    let status = within("the agent to exit after draining", child.wait()).await??;
    assert!(status.success(), "agent exited with {status}");
    proxy.stop().await;
    Ok(())
}

#[tokio::test]
async fn run_returns_on_shutdown_while_the_server_is_unreachable() -> anyhow::Result<()> {
    let cn = unique_cn("shutdown");
    let pki = Pki::new(&cn)?;
    let state = tempfile::tempdir()?;
    let proxy = Proxy::start(pki.acceptor()?, 0).await?;
    let port = proxy.port;
    proxy.stop().await;
    let input = pki.path("input.jsonl");
    std::fs::write(&input, "{\"line\": 0}\n")?;
    let mut config = mooring_agent::AgentConfig::new(
        "127.0.0.1",
        port,
        pki.path("client.pem"),
        pki.path("client.key"),
        pki.path("ca.pem"),
        state.path(),
    );
    config.interval_secs = 0;
    config.input = Some(mooring_agent::InputSource::File(input));
    config.jitter_seed = Some(1);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let clock = Arc::new(mooring_proto::SystemClock);
    let agent = tokio::spawn(mooring_agent::run(config, clock, async {
        let _ = stop_rx.await;
    }));
    wait_until_outbox_holds_line(state.path(), 0).await?;
    let _ = stop_tx.send(());
    within("run() to return after shutdown", agent).await???;
    // The unsent message is still queued for the next start.
    use mooring_agent::AgentStore as _;
    let outbox = mooring_agent::sqlite_store::SqliteStore::open(state.path(), 10, 1)?;
    assert_eq!(outbox.len(), 1);
    Ok(())
}
