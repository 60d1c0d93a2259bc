//! Several `mooring serve` processes on loopback as one cluster, on the PostgreSQL and NATS
//! this machine runs (as CI does): one identity for all nodes, any node serving any device or
//! API call, a session moving between nodes, commands across nodes, kill -9 under QoS 1 load
//! with nothing acknowledged lost, leases moving off a dead node, a rolling restart with the
//! API polled every 100 ms, and a rollout that outlives the node running its controller.
//!
//! Needs PostgreSQL at `MOORING_TEST_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`; every test creates a database of its own and
//! drops it) and NATS with JetStream at `MOORING_TEST_NATS_URL` (default
//! `nats://127.0.0.1:4222`; every test uses a prefix of its own). Never skipped: an unreachable
//! server fails the test, saying so.

mod support;

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::{config_args, publish_series, Creds, MqttDevice, Server, WAIT};

fn postgres_admin_url() -> String {
    std::env::var("MOORING_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

fn nats_url() -> String {
    std::env::var("MOORING_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

async fn admin_execute(sql: &str) {
    let url = postgres_admin_url();
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL is unreachable at {url} ({e}): the cluster tests need it (CI has one at 127.0.0.1:5432); set MOORING_TEST_POSTGRES_URL to use another")
        });
    let driver = tokio::spawn(connection);
    client
        .batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    let _ = driver.await;
}

/// A cluster's shared pieces: a fresh database, a NATS prefix, the cluster key file, and a
/// temp dir with one data dir per node. The database is dropped with it.
struct Env {
    tmp: tempfile::TempDir,
    db: String,
    prefix: String,
    key_file: PathBuf,
}

impl Env {
    async fn new() -> Env {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let db = format!("mooring_cluster_{}_{nanos}_{n}", std::process::id());
        admin_execute(&format!("CREATE DATABASE \"{db}\"")).await;
        let tmp = tempfile::tempdir().expect("tempdir");
        let key_file = tmp.path().join("cluster.key");
        let key: [u8; 32] = rand::random();
        std::fs::write(&key_file, hex::encode(key)).expect("key file");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod key");
        Env {
            tmp,
            db,
            prefix: format!("t{}x{nanos}x{n}", std::process::id()),
            key_file,
        }
    }

    fn db_url(&self) -> String {
        let admin = postgres_admin_url();
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        format!("{base}/{}", self.db)
    }

    fn data_dir(&self, node: &str) -> PathBuf {
        self.tmp.path().join(node)
    }

    /// The config file of `node`: shared store and bus, fast heartbeats and command retries,
    /// and `extra` (TOML sections of its own) at its end.
    fn config_with(&self, node: &str, extra: &str) -> Vec<String> {
        let dir = self.data_dir(node);
        std::fs::create_dir_all(&dir).expect("node dir");
        config_args(
            &dir,
            &format!(
                "node_id = \"{node}\"\n\
                 [store]\nurl = \"{}\"\n\
                 [bus]\nurl = \"{}\"\nprefix = \"{}\"\n\
                 [cluster]\nsecret_key_file = \"{}\"\nheartbeat_interval_ms = 200\nnode_lease_ms = 1000\n\
                 [commands]\nretry_backoff_initial_ms = 100\nretry_backoff_max_ms = 200\nscheduler_tick_ms = 50\n\
                 [fleet]\nsample_interval_ms = 200\n\
                 [certificates]\nsession_sweep_interval_ms = 300\n\
                 [ota]\nsweep_interval_ms = 300\n{extra}",
                self.db_url(),
                nats_url(),
                self.prefix,
                self.key_file.display()
            ),
        )
    }

    /// Nodes a, b and c.
    fn start_three(&self) -> (Server, Server, Server) {
        (self.start("a"), self.start("b"), self.start("c"))
    }

    /// Starts `node` on port 0. Every node but the first finds the admin token the first one
    /// created (a cluster creates one) copied into its data dir, as an operator would.
    fn start(&self, node: &str) -> Server {
        self.start_on(node, "127.0.0.1:0", "127.0.0.1:0")
    }

    fn start_on(&self, node: &str, mqtt: &str, http: &str) -> Server {
        self.start_configured(node, mqtt, http, "")
    }

    fn start_configured(&self, node: &str, mqtt: &str, http: &str, extra: &str) -> Server {
        let args = self.config_with(node, extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let dir = self.data_dir(node);
        if !dir.join("admin.token").exists() {
            if let Some(token) = self.any_token() {
                std::fs::write(dir.join("admin.token"), token).expect("copy token");
            }
        }
        Server::start_with(&dir, mqtt, http, &args)
    }

    fn any_token(&self) -> Option<String> {
        std::fs::read_dir(self.tmp.path())
            .ok()?
            .filter_map(Result::ok)
            .find_map(|e| std::fs::read_to_string(e.path().join("admin.token")).ok())
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.db);
        // Drop runs outside any runtime the test may still be in: a thread of its own.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(admin_execute(&sql));
            }
        })
        .join();
    }
}

/// The fleet's numbers across nodes: a summary on one node counts a device online on another,
/// and the history sums both nodes' samples (online, points, messages) per interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_history_sums_the_samples_of_every_node() {
    let env = Env::new().await;
    let (a, b) = (env.start("a"), env.start("b"));
    let c1 = a.create_device("d1", env.tmp.path());
    let c2 = a.create_device("d2", env.tmp.path());
    let mut d1 = MqttDevice::connect(&a, &c1, "d1").await;
    let mut d2 = MqttDevice::connect(&b, &c2, "d2").await;
    d1.publish("devices/d1/telemetry", r#"{"seq":1,"t":1}"#)
        .await;
    d2.publish("devices/d2/telemetry", r#"{"seq":1,"t":1,"u":2}"#)
        .await;

    // d2 is held by b; a counts it online through the session rows.
    let summary = a
        .wait_for("/api/v1/fleet/summary?selector=online", |v| {
            v["devices"] == 2
        })
        .await;
    assert_eq!(summary["online"], 2, "{summary}");
    // One interval with both nodes' samples: online 1 + 1; devices the same count, not summed.
    let history = a
        .wait_for("/api/v1/fleet/history", |v| {
            let samples = v["samples"].as_array().cloned().unwrap_or_default();
            let points: u64 = samples.iter().filter_map(|s| s["points"].as_u64()).sum();
            points >= 3 && samples.iter().any(|s| s["online"] == 2)
        })
        .await;
    let samples = history["samples"].as_array().expect("samples");
    assert!(
        samples
            .iter()
            .filter(|s| s["online"] == 2)
            .all(|s| s["devices"] == 2),
        "{history}"
    );
    let messages: u64 = samples.iter().filter_map(|s| s["messages"].as_u64()).sum();
    assert!(messages >= 2, "{history}");
    // Both nodes answer the same history.
    let (_, from_b) = b.api("GET", "/api/v1/fleet/history", None).await;
    assert!(
        !from_b["samples"].as_array().expect("samples").is_empty(),
        "{from_b}"
    );
}

/// Connects as `id` to `server` and subscribes to its commands.
async fn online(server: &Server, creds: &Creds, id: &str) -> MqttDevice {
    let mut dev = MqttDevice::connect(server, creds, id).await;
    dev.subscribe(&format!("devices/{id}/commands/+")).await;
    dev
}

async fn device_online(server: &Server, id: &str) -> bool {
    let (status, v) = server
        .api("GET", &format!("/api/v1/devices/{id}"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    v["online"] == json!(true)
}

async fn wait_online(server: &Server, id: &str, want: bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while device_online(server, id).await != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "device {id} never became online={want} as node {} sees it",
            server.url()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a command through `server` and waits (up to 15 s) for it to end; `dev` answers it.
async fn command_round_trip(server: &Server, dev: &mut MqttDevice, name: &str) -> Value {
    let id = dev.id.clone();
    command_round_trip_for(server, dev, &id, name).await
}

/// [`command_round_trip`] for `device`, answered by `dev` (the device, or its gateway).
async fn command_round_trip_for(
    server: &Server,
    dev: &mut MqttDevice,
    device: &str,
    name: &str,
) -> Value {
    let url = format!("/api/v1/devices/{device}/commands?wait_ms=15000");
    let post = server.api("POST", &url, Some(json!({ "name": name })));
    let answer = async {
        let (topic, req) = dev.next_json().await;
        assert_eq!(req["name"], json!(name), "{topic}");
        let cmd = topic.rsplit('/').next().unwrap_or_default().to_owned();
        dev.publish(&format!("devices/{device}/commands/{cmd}/ack"), "{}")
            .await;
        dev.publish(
            &format!("devices/{device}/commands/{cmd}/result"),
            r#"{"status":"succeeded"}"#,
        )
        .await;
    };
    let ((status, body), ()) = tokio::join!(post, answer);
    assert!(status == 200 || status == 202, "{status} {body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_share_one_identity_and_a_device_moves_between_them_with_its_commands() {
    let env = Env::new().await;
    let (a, b, c) = env.start_three();

    // One CA for all: a device created on a is accepted by b and c; a device created on b gets
    // the same CA.
    let creds = a.create_device("lock-1", env.tmp.path());
    let (status, created) = b
        .api("POST", "/api/v1/devices", Some(json!({ "id": "lock-2" })))
        .await;
    assert_eq!(status, 201, "{created}");
    let ca = std::fs::read_to_string(creds.ca()).expect("ca");
    assert_eq!(created["ca_pem"].as_str(), Some(ca.as_str()));
    for node in [&a, &b, &c] {
        let (_, health) = node.api("GET", "/healthz", None).await;
        assert_eq!(health["status"], json!("ok"));
    }

    // On b; every node sees it online; a command through a reaches it.
    let mut dev_b = online(&b, &creds, "lock-1").await;
    for node in [&a, &b, &c] {
        wait_online(node, "lock-1", true).await;
    }
    let done = command_round_trip(&a, &mut dev_b, "unlock").await;
    assert_eq!(done["state"], json!("succeeded"), "{done}");

    // It moves to c: b hands its session over (v5 0x8E to a v5 client; this one is 3.1.1 and
    // sees its connection closed), and a command through b now reaches it on c.
    let mut dev_c = online(&c, &creds, "lock-1").await;
    b.wait_metric("mooring_cluster_takeovers_total", |v| v >= 1.0)
        .await;
    assert_eq!(b.metric("mooring_mqtt_connections").await, 0.0);
    let done = command_round_trip(&b, &mut dev_c, "lock").await;
    assert_eq!(done["state"], json!("succeeded"), "{done}");
    wait_online(&a, "lock-1", true).await;

    // Telemetry published on c is stored once and readable through a.
    dev_c
        .publish(
            "devices/lock-1/telemetry",
            &format!(r#"{{"seq":1,"ts":{},"battery":87}}"#, now_ms()),
        )
        .await;
    let points = a
        .wait_for("/api/v1/devices/lock-1/telemetry?metric=battery", |v| {
            v["points"].as_array().is_some_and(|p| p.len() == 1)
        })
        .await;
    assert_eq!(points["points"][0]["value"].as_f64(), Some(87.0));

    // A shadow change through a reaches the device on c as its retained delta.
    dev_c.subscribe("devices/lock-1/shadow/delta").await;
    let (status, body) = a
        .api(
            "PATCH",
            "/api/v1/devices/lock-1/shadow",
            Some(json!({ "desired": { "mode": "eco" } })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (topic, delta) = dev_c.next_json().await;
    assert_eq!(topic, "devices/lock-1/shadow/delta");
    assert_eq!(delta["delta"]["mode"], json!("eco"), "{delta}");

    // Gone from c: offline everywhere.
    drop(dev_c);
    drop(dev_b);
    for node in [&a, &b, &c] {
        wait_online(node, "lock-1", false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_starting_together_on_an_empty_database_create_one_ca_and_one_admin_token() {
    let env = Arc::new(Env::new().await);
    let (e1, e2) = (env.clone(), env.clone());
    let t1 = std::thread::spawn(move || e1.start("x"));
    let t2 = std::thread::spawn(move || e2.start("y"));
    let (x, y) = (t1.join().expect("x"), t2.join().expect("y"));
    let tokens: Vec<bool> = ["x", "y"]
        .iter()
        .map(|n| env.data_dir(n).join("admin.token").exists())
        .collect();
    assert_eq!(
        tokens.iter().filter(|t| **t).count(),
        1,
        "exactly one node wrote the cluster's admin token"
    );
    // The node without the file uses the one the other wrote.
    let token = env.any_token().expect("a token").trim().to_owned();
    let mut cas = Vec::new();
    for (node, id) in [(&x, "d-x"), (&y, "d-y")] {
        let resp = support::http()
            .post(format!("{}/api/v1/devices", node.url()))
            .bearer_auth(&token)
            .json(&json!({ "id": id }))
            .send()
            .await
            .expect("create");
        assert_eq!(resp.status().as_u16(), 201);
        let v: Value = resp.json().await.expect("json");
        cas.push(v["ca_pem"].as_str().expect("ca").to_owned());
    }
    assert_eq!(cas[0], cas[1], "both nodes issue under one CA");
    drop((x, y));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistent_session_moves_with_its_device_and_keeps_what_was_queued_for_it() {
    let env = Env::new().await;
    let (a, b, c) = env.start_three();
    let creds = a.create_device("cart-1", env.tmp.path());
    let sub = |node: &Server, extra: &[&str]| {
        let mut args = creds.mosquitto_args(node.mqtt);
        args.extend(support::s(&[
            "-i",
            "cart-1",
            "-c",
            "-q",
            "1",
            "-t",
            "devices/cart-1/inbox",
        ]));
        args.extend(support::s(extra));
        std::process::Command::new("mosquitto_sub")
            .args(&args)
            .output()
            .expect("mosquitto_sub")
    };
    // A persistent session with a QoS 1 subscription on b; then the device goes away.
    let out = sub(&b, &["-W", "1"]);
    assert!(out.stdout.is_empty(), "{out:?}");
    wait_online(&a, "cart-1", false).await;
    // Published through a while the device is offline: queued in its session on b.
    let mut pub_args = support::dev_args(&a);
    pub_args.extend(support::s(&[
        "-q",
        "1",
        "-t",
        "devices/cart-1/inbox",
        "-m",
        "while you were away",
    ]));
    let out = support::mosquitto_pub(&pub_args);
    assert!(out.status.success(), "{out:?}");
    b.wait_metric("mooring_mqtt_messages_in_total", |v| v >= 1.0)
        .await;
    // The device comes back on c and resumes its session there, queued message included.
    let out = sub(&c, &["-C", "1", "-W", "15"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "while you were away",
        "{out:?}"
    );
    b.wait_metric("mooring_cluster_takeovers_total", |v| v >= 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_clients_persistent_session_moves_between_nodes_too() {
    let env = Env::new().await;
    let (a, b, c) = env.start_three();
    let creds = a.create_device("probe-1", env.tmp.path());
    let token = support::service_token(&a, "pipeline");
    let sub = |node: &Server, extra: &[&str]| {
        let mut args = support::service_args(node, &creds, &token, "pipeline-1");
        args.extend(support::s(&["-c", "-q", "1", "-t", "devices/+/telemetry"]));
        args.extend(support::s(extra));
        std::process::Command::new("mosquitto_sub")
            .args(&args)
            .output()
            .expect("mosquitto_sub")
    };
    // The pipeline's persistent session on b; it goes away.
    let out = sub(&b, &["-W", "1"]);
    assert!(out.stdout.is_empty(), "{out:?}");
    // Telemetry stored through a while the pipeline is away: queued in its session on b.
    let mut dev = MqttDevice::connect(&a, &creds, "probe-1").await;
    dev.publish(
        "devices/probe-1/telemetry",
        &format!(r#"{{"seq":1,"ts":{},"t":21.5}}"#, now_ms()),
    )
    .await;
    b.wait_metric("mooring_mqtt_messages_in_total", |v| v >= 1.0)
        .await;
    // The pipeline comes back on c: b hands its session over, c resumes it.
    let out = sub(&c, &["-C", "1", "-W", "15"]);
    let line = String::from_utf8_lossy(&out.stdout);
    assert!(line.contains("21.5"), "{out:?}");
    b.wait_metric("mooring_cluster_takeovers_total", |v| v >= 1.0)
        .await;
    drop(dev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_bus_messages_are_refused_and_a_revoked_bootstrap_token_stays_revoked() {
    let env = Env::new().await;
    let a = env.start("a");
    let creds = a.create_device("lock-9", env.tmp.path());
    let dev = online(&a, &creds, "lock-9").await;
    wait_online(&a, "lock-9", true).await;

    // Someone else on the NATS server, without the cluster key, tries to take the device's
    // session away and to inject a message: both are dropped and counted.
    let rogue =
        mooring_bus::NatsBus::connect(mooring_bus::NatsConfig::new(nats_url(), env.prefix.clone()))
            .await
            .expect("rogue NATS client");
    use mooring_bus::Bus;
    let mut forged = vec![5u8];
    forged.extend_from_slice(b"rogue");
    forged.extend_from_slice(&now_ms().to_be_bytes());
    forged.extend_from_slice(&[0u8; 32]);
    forged.extend_from_slice(br#"[["lock-9", 18446744073709551615, false]]"#);
    rogue
        .publish("cluster.session", forged.clone().into())
        .await
        .expect("publish");
    rogue
        .publish("cluster.mqtt", b"garbage".to_vec().into())
        .await
        .expect("publish");
    a.wait_metric("mooring_cluster_bus_rejected_total", |v| v >= 2.0)
        .await;
    assert_eq!(a.metric("mooring_cluster_takeovers_total").await, 0.0);
    assert!(device_online(&a, "lock-9").await);
    assert_eq!(a.metric("mooring_mqtt_connections").await, 1.0);
    drop(dev);

    // The admin token the cluster made once is revoked (in the database: the token API comes
    // with accounts); a restart does not make another.
    let (client, connection) = tokio_postgres::connect(&env.db_url(), tokio_postgres::NoTls)
        .await
        .expect("connect to the cluster's database");
    let driver = tokio::spawn(connection);
    let revoked = client
        .execute("DELETE FROM tokens WHERE role = 'admin'", &[])
        .await
        .expect("revoke");
    assert_eq!(revoked, 1, "one admin token in the cluster");
    let dir = a.data_dir.clone();
    a.stop();
    std::fs::remove_file(dir.join("admin.token")).expect("remove old token file");
    let _a = env.start("a");
    assert!(
        !dir.join("admin.token").exists(),
        "a restarted node must not create a new admin token"
    );
    let admins: i64 = client
        .query_one("SELECT count(*) FROM tokens WHERE role = 'admin'", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(admins, 0);
    drop(client);
    let _ = driver.await;
}

/// Publishes QoS 1 telemetry with increasing `seq` until told to stop, reconnecting to the next
/// node when its connection dies; records every seq whose PUBACK arrived.
async fn publish_until(
    nodes: Vec<SocketAddr>,
    creds: PathBuf,
    id: String,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<Mutex<Vec<u64>>>,
) {
    let read = |p: &Path| std::fs::read(p).expect("credential file");
    let mut seq = 0u64;
    let mut node = 0usize;
    let t0 = now_ms();
    while !stop.load(Ordering::Relaxed) {
        let addr = nodes[node % nodes.len()];
        node += 1;
        let mut opts = rumqttc::MqttOptions::new(&id, addr.ip().to_string(), addr.port());
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Simple {
                ca: read(&creds.join("ca.crt")),
                alpn: None,
                client_auth: Some((
                    read(&creds.join("device.crt")),
                    read(&creds.join("device.key")),
                )),
            },
        ));
        opts.set_inflight(16);
        let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
        // pkid -> seq of what is in flight on this connection.
        let mut in_flight: std::collections::HashMap<u16, u64> = Default::default();
        let mut pending_seqs: std::collections::VecDeque<u64> = Default::default();
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if pending_seqs.len() < 16 {
                seq += 1;
                let payload = format!(r#"{{"seq":{seq},"ts":{},"n":{seq}}}"#, t0 + seq);
                if client
                    .try_publish(
                        format!("devices/{id}/telemetry"),
                        rumqttc::QoS::AtLeastOnce,
                        false,
                        payload,
                    )
                    .is_ok()
                {
                    pending_seqs.push_back(seq);
                } else {
                    seq -= 1;
                }
            }
            let ev = tokio::time::timeout(Duration::from_secs(2), events.poll()).await;
            match ev {
                Ok(Ok(rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(pkid)))) => {
                    if let Some(s) = pending_seqs.pop_front() {
                        in_flight.insert(pkid, s);
                    }
                }
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(ack)))) => {
                    if let Some(s) = in_flight.remove(&ack.pkid) {
                        acked.lock().expect("acked").push(s);
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(_)) | Err(_) => break,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_a_node_under_qos1_load_loses_nothing_acknowledged_and_its_leases_move() {
    let env = Env::new().await;
    let (a, b, c) = env.start_three();
    let creds = a.create_device("meter-1", env.tmp.path());

    // Whoever holds the scheduler lease (the first node asking: a, b or c) is the one to kill,
    // together with the device's node: b carries the load and is killed.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let publisher = tokio::spawn(publish_until(
        vec![b.mqtt, c.mqtt],
        creds.dir.clone(),
        "meter-1".to_owned(),
        stop.clone(),
        acked.clone(),
    ));
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked.lock().expect("acked").len() < 300 {
        assert!(tokio::time::Instant::now() < deadline, "no QoS 1 load");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut holders = Vec::new();
    for (name, node) in [("a", &a), ("b", &b), ("c", &c)] {
        if node
            .metric("mooring_cluster_lease_held{lease=\"commands.scheduler\"}")
            .await
            == 1.0
        {
            holders.push(name);
        }
    }
    assert_eq!(holders.len(), 1, "one scheduler: {holders:?}");
    // A device that stays with b alone: online until b dies.
    let lone = a.create_device("meter-lone", env.tmp.path());
    let lone_dev = online(&b, &lone, "meter-lone").await;
    wait_online(&a, "meter-lone", true).await;
    b.kill9();
    // The killed node's devices go offline once its lease (1 s here) runs out; a command for
    // one is kept, and delivered when it is back (on another node).
    wait_online(&a, "meter-lone", false).await;
    drop(lone_dev);
    let (status, cmd) = a
        .api(
            "POST",
            "/api/v1/devices/meter-lone/commands",
            Some(json!({ "name": "ping" })),
        )
        .await;
    assert_eq!(status, 202, "{cmd}");
    let mut back = online(&c, &lone, "meter-lone").await;
    let (topic, req) = back.next_json().await;
    assert_eq!(req["name"], json!("ping"), "{topic}");
    // The publisher moves to c and keeps going.
    let before = acked.lock().expect("acked").len();
    let deadline = tokio::time::Instant::now() + WAIT;
    while acked.lock().expect("acked").len() < before + 300 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "publishing did not resume on c"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = publisher.await;

    // Every acknowledged seq is stored, read through a.
    let acked = acked.lock().expect("acked").clone();
    let max = acked.iter().copied().max().unwrap_or(0);
    let (status, body) = a
        .api(
            "GET",
            &format!(
                "/api/v1/devices/meter-1/telemetry?metric=n&limit={}",
                max + 10
            ),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let stored: std::collections::BTreeSet<u64> = body["points"]
        .as_array()
        .expect("points")
        .iter()
        .filter_map(|p| p["value"].as_f64())
        .map(|v| v as u64)
        .collect();
    let lost: Vec<u64> = acked
        .iter()
        .filter(|s| !stored.contains(s))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged messages lost: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(20)]
    );

    // The scheduler lease is held by a live node (moved if b held it).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut held = 0.0;
        for node in [&a, &c] {
            held += node
                .metric("mooring_cluster_lease_held{lease=\"commands.scheduler\"}")
                .await;
        }
        if held == 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "scheduler lease never moved to a live node"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A device connected to the killed node only goes offline once b's lease ran out.
    let creds2 = a.create_device("meter-2", env.tmp.path());
    let dev = online(&c, &creds2, "meter-2").await;
    wait_online(&a, "meter-2", true).await;
    drop(dev);
    wait_online(&a, "meter-2", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_keeps_the_api_answering() {
    let env = Env::new().await;
    let mut nodes: Vec<Option<Server>> = vec![
        Some(env.start("a")),
        Some(env.start("b")),
        Some(env.start("c")),
    ];
    let token = nodes[0]
        .as_ref()
        .map(|n| n.token.clone())
        .unwrap_or_default();
    let addrs: Arc<Mutex<Vec<Option<SocketAddr>>>> = Arc::new(Mutex::new(
        nodes.iter().map(|n| n.as_ref().map(|s| s.http)).collect(),
    ));
    // A client behind a load balancer: every 100 ms, the first node that answers.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticks = Arc::new(AtomicU64::new(0));
    let poller = {
        let (addrs, stop, ticks) = (addrs.clone(), stop.clone(), ticks.clone());
        tokio::spawn(async move {
            let client = support::http();
            let mut unanswered = 0u32;
            let mut next = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let candidates: Vec<SocketAddr> = addrs
                    .lock()
                    .expect("addrs")
                    .iter()
                    .flatten()
                    .copied()
                    .collect();
                let mut answered = false;
                for i in 0..candidates.len() {
                    let addr = candidates[(next + i) % candidates.len()];
                    let resp = client
                        .get(format!("http://{addr}/api/v1/devices?limit=1"))
                        .bearer_auth(&token)
                        .timeout(Duration::from_millis(500))
                        .send()
                        .await;
                    if resp.is_ok_and(|r| r.status().is_success()) {
                        answered = true;
                        break;
                    }
                }
                next += 1;
                if !answered {
                    unanswered += 1;
                }
                ticks.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            unanswered
        })
    };
    let env = Arc::new(env);
    let wait_ticks = |n: u64| {
        let ticks = ticks.clone();
        async move {
            let until = ticks.load(Ordering::Relaxed) + n;
            let deadline = tokio::time::Instant::now() + WAIT;
            while ticks.load(Ordering::Relaxed) < until {
                assert!(tokio::time::Instant::now() < deadline, "the poller stalled");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_ticks(5).await;
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        // A load balancer's health check takes the node out first.
        addrs.lock().expect("addrs")[i] = None;
        let old = nodes[i].take();
        let env2 = env.clone();
        let node = tokio::task::spawn_blocking(move || {
            if let Some(node) = old {
                node.stop();
            }
            env2.start(name)
        })
        .await
        .expect("restart");
        addrs.lock().expect("addrs")[i] = Some(node.http);
        nodes[i] = Some(node);
        wait_ticks(5).await;
    }
    stop.store(true, Ordering::Relaxed);
    let unanswered = poller.await.expect("poller");
    let ticks = ticks.load(Ordering::Relaxed);
    assert_eq!(
        unanswered, 0,
        "{unanswered} of {ticks} polls found no node answering"
    );
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_events_cross_nodes_and_a_stream_resumes_on_another_node_without_loss() {
    use support::Sse;
    let env = Env::new().await;
    let a = env.start("a");
    let b = env.start("b");
    let creds = a.create_device("d1", env.tmp.path());
    let mut on_b = Sse::open(&b, Some("d1"), None).await;
    let mut on_a = Sse::open(&a, Some("d1"), None).await;

    // The device is on node A; the stream on node B sees its telemetry.
    let mut dev = MqttDevice::connect(&a, &creds, "d1").await;
    let seqs = |msgs: &[support::Msg]| -> Vec<u64> {
        msgs.iter()
            .filter(|m| m.event == "telemetry")
            .filter_map(|m| m.data["seq"].as_u64())
            .collect()
    };
    for seq in 1..=3 {
        dev.publish(
            "devices/d1/telemetry",
            &format!(r#"{{"seq": {seq}, "t": 1}}"#),
        )
        .await;
    }
    let seen = on_b.until(|m| m.data["seq"] == 3).await;
    assert_eq!(seqs(&seen), [1, 2, 3]);
    assert!(seen
        .iter()
        .any(|m| m.event == "presence" && m.data["node"] == "a"));

    // The stream on A breaks off after seq 2; it resumes on B with A's cursor.
    let seen = on_a.until(|m| m.data["seq"] == 2).await;
    let cursor = seen[seen.len() - 1].id.clone();
    drop(on_a);
    for seq in 4..=6 {
        dev.publish(
            "devices/d1/telemetry",
            &format!(r#"{{"seq": {seq}, "t": 1}}"#),
        )
        .await;
    }
    on_b.until(|m| m.data["seq"] == 6).await;
    // A command created through B (its events originate on B and on A, which delivers it).
    let (status, c) = b
        .api(
            "POST",
            "/api/v1/devices/d1/commands",
            Some(json!({"name": "ping"})),
        )
        .await;
    assert_eq!(status, 202, "{c}");
    on_b.until(|m| m.event == "command").await;
    let mut resumed = Sse::open(&b, Some("d1"), Some(&cursor)).await;
    let seen = resumed.until(|m| m.event == "command").await;
    assert_eq!(seqs(&seen), [3, 4, 5, 6], "{seen:?}");
    assert!(seen.iter().all(|m| m.event != "reset"), "{seen:?}");
    assert_eq!(b.metric("mooring_cluster_outbox_dropped_total").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_session_and_a_token_revocation_hold_on_every_node() {
    use support::call;
    let env = Env::new().await;
    let a = env.start("a");
    let b = env.start("b");
    let user = json!({"email": "ann@example.com", "role": "operator", "password": "correct horse battery"});
    let (status, v) = a.api("POST", "/api/v1/users", Some(user)).await;
    assert_eq!(status, 201, "{v}");

    // Log in on a, use the cookie on b, log out on b: refused on a.
    let creds = json!({"email": "ann@example.com", "password": "correct horse battery"});
    let login = call(
        &a,
        "POST",
        "/api/v1/auth/login",
        None,
        None,
        &[],
        Some(creds),
    )
    .await;
    assert_eq!(login.status, 200, "{}", login.body);
    let cookie = support::cookie_header(&login.cookies);
    let csrf = login.body["csrf_token"].as_str().expect("csrf").to_owned();
    let csrf = [("x-csrf-token", csrf.as_str())];
    let me = call(&b, "GET", "/api/v1/auth/me", None, Some(&cookie), &[], None).await;
    assert_eq!(
        (me.status, me.body["name"].as_str()),
        (200, Some("ann@example.com")),
        "{}",
        me.body
    );
    let dev = Some(json!({"id": "lock-9"}));
    let r = call(
        &b,
        "POST",
        "/api/v1/devices",
        None,
        Some(&cookie),
        &csrf,
        dev,
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = call(
        &b,
        "POST",
        "/api/v1/auth/logout",
        None,
        Some(&cookie),
        &csrf,
        None,
    )
    .await;
    assert_eq!(r.status, 204);
    let r = call(&a, "GET", "/api/v1/auth/me", None, Some(&cookie), &[], None).await;
    assert_eq!(r.status, 401, "the session ended on b, so on a too");

    // A token revoked on b is refused on a at once; its MQTT session on a is closed.
    let creds = a.create_device("probe-1", env.tmp.path());
    let service = support::service_token(&a, "pipeline");
    let mut sub = support::Sub::start(&{
        let mut args = support::service_args(&a, &creds, &service, "pipeline-1");
        args.extend(support::s(&["-t", "devices/+/telemetry"]));
        args
    });
    let (status, v) = a.api("GET", "/api/v1/tokens?limit=1000", None).await;
    assert_eq!(status, 200, "{v}");
    let id = v["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .find(|t| t["name"] == "pipeline")
        .and_then(|t| t["id"].as_str())
        .expect("pipeline token")
        .to_owned();
    let devices = |node| {
        call(
            node,
            "GET",
            "/api/v1/devices",
            Some(&service),
            None,
            &[],
            None,
        )
    };
    assert_eq!(devices(&a).await.status, 200);
    let revoke = format!("/api/v1/tokens/{id}");
    let r = call(&b, "DELETE", &revoke, Some(&b.token), None, &[], None).await;
    assert_eq!(r.status, 204);
    let revoked_at = std::time::Instant::now();
    assert_eq!(devices(&a).await.status, 401);
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    sub.wait_exit();
    // The audit log (one table for the cluster) has both nodes' writes.
    let (_, audit) = a.api("GET", "/api/v1/audit?limit=100", None).await;
    let nodes: std::collections::BTreeSet<&str> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["node"].as_str())
        .collect();
    assert!(nodes.contains("a") && nodes.contains("b"), "{audit}");
}

/// Revoking a device's certificate on node a closes its session on node b within a second
/// (the `cluster.device` notice: b re-reads the ledger), and b refuses it from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_on_one_node_closes_the_session_on_another_within_a_second() {
    let env = Env::new().await;
    let (a, b) = (env.start("a"), env.start("b"));
    let creds = a.create_device("d1", env.tmp.path());
    let mut args = creds.mosquitto_args(b.mqtt);
    args.extend(support::s(&[
        "-V",
        "mqttv5",
        "-i",
        "d1",
        "-t",
        "devices/d1/#",
    ]));
    let mut sub = support::Sub::start(&args);
    wait_online(&a, "d1", true).await;
    let (status, v) = a
        .api(
            "POST",
            "/api/v1/devices/d1/revoke",
            Some(json!({"reason": "lost"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let revoked_at = std::time::Instant::now();
    // MQTT 5: DISCONNECT 0x87 (not authorized).
    sub.wait_line(|l| l.contains("DISCONNECT (135)"));
    let closed_after = revoked_at.elapsed();
    assert!(
        closed_after < Duration::from_secs(1),
        "closed {closed_after:?} after the revocation on another node"
    );
    sub.wait_exit();
    let mut args = creds.mosquitto_args(b.mqtt);
    args.extend(support::s(&[
        "-i",
        "d1",
        "-q",
        "1",
        "-t",
        "devices/d1/telemetry",
        "-m",
        "{}",
    ]));
    assert!(!support::mosquitto_pub(&args).status.success());
}

/// A new EC key `<name>.key` in `dir` and its CSR (PEM), made with openssl as a device would.
fn device_key_and_csr(dir: &Path, name: &str) -> String {
    for args in [
        vec![
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &format!("{name}.key"),
        ],
        vec![
            "req",
            "-new",
            "-key",
            &format!("{name}.key"),
            "-subj",
            "/CN=ignored",
            "-out",
            &format!("{name}.csr"),
        ],
    ] {
        let out = std::process::Command::new("openssl")
            .args(&args)
            .current_dir(dir)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    std::fs::read_to_string(dir.join(format!("{name}.csr"))).expect("csr")
}

/// Enrollment across nodes (issue 16): a claim made on one node enrolls on another; of six
/// devices enrolling at once on two nodes with one single-use claim, exactly one wins; an
/// enrollment over MQTT on one node gives a certificate another node accepts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_use_claim_enrolls_exactly_one_device_across_nodes() {
    let env = Env::new().await;
    let a = env.start("a");
    let b = env.start("b");
    let (status, claim) = a.api("POST", "/api/v1/claims", Some(json!({}))).await;
    assert_eq!(status, 201, "{claim}");
    let token = claim["token"].as_str().expect("token").to_owned();

    let mut attempts = Vec::new();
    for i in 0..6 {
        let node = if i % 2 == 0 { &a } else { &b };
        let csr = device_key_and_csr(env.tmp.path(), &format!("k{i}"));
        let url = format!("{}/api/v1/provision/enroll", node.url());
        let body = json!({"claim_token": token, "csr_pem": csr, "device_id": format!("sn-{i}")});
        attempts.push(async move {
            let resp = support::http()
                .post(url)
                .json(&body)
                .send()
                .await
                .expect("http");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        });
    }
    let answers = futures::future::join_all(attempts).await;
    let won: Vec<&Value> = answers
        .iter()
        .filter(|(s, _)| *s == 201)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(won.len(), 1, "{answers:?}");
    for (status, body) in answers.iter().filter(|(s, _)| *s != 201) {
        assert_eq!(
            (*status, body["error"]["code"].as_str()),
            (409, Some("claim_used")),
            "{body}"
        );
    }
    let (_, devices) = b.api("GET", "/api/v1/devices", None).await;
    assert_eq!(
        devices["devices"].as_array().map(Vec::len),
        Some(1),
        "{devices}"
    );

    // Over MQTT on b with a claim made on a; the device then connects to a.
    let (_, claim) = a
        .api(
            "POST",
            "/api/v1/claims",
            Some(json!({"tags": {"site": "x"}})),
        )
        .await;
    let token = claim["token"].as_str().expect("token");
    let csr = device_key_and_csr(env.tmp.path(), "m");
    // The fleet CA lives in the database in a cluster: the one the first enrollment answered.
    let ca = env.tmp.path().join("fleet-ca.crt");
    std::fs::write(&ca, won[0]["ca_pem"].as_str().expect("ca_pem")).expect("ca");
    let request = json!({"v": 1, "csr_pem": csr, "device_id": "sn-m"}).to_string();
    let port = b.mqtt.port().to_string();
    let out = std::process::Command::new("mosquitto_rr")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "--cafile",
            ca.to_str().expect("utf8"),
            "-V",
            "mqttv5",
            "-u",
            "claim",
            "-P",
            token,
            "-i",
            "sn-m",
            "-q",
            "1",
            "-t",
            "provision/sn-m/request",
            "-e",
            "provision/sn-m/accepted",
            "-m",
            &request,
            "-W",
            "20",
        ])
        .output()
        .expect("mosquitto_rr");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: Value = serde_json::from_slice(&out.stdout).expect("answer");
    let dir = env.tmp.path().join("sn-m");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(
        dir.join("device.crt"),
        answer["certificate_pem"].as_str().expect("pem"),
    )
    .expect("crt");
    std::fs::copy(env.tmp.path().join("m.key"), dir.join("device.key")).expect("key");
    std::fs::copy(&ca, dir.join("ca.crt")).expect("ca");
    let creds = Creds { dir };
    let _dev = online(&a, &creds, "sn-m").await;
    wait_online(&b, "sn-m", true).await;
}

/// Just-in-time registration (issue 16) across nodes: a manufacturer CA registered on a is
/// trusted by b (which re-reads the registered CAs every second), the device registered on its
/// first connection there; disabled on a, b closes the device's live session and refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_registered_on_one_node_is_trusted_by_another() {
    let env = Env::new().await;
    let (a, b) = (env.start("a"), env.start("b"));
    // Any device's credentials carry the cluster's fleet CA, which the device checks b with.
    let fleet = a.create_device("probe-0", env.tmp.path()).ca();
    let acme = support::manufacturer::Manufacturer::new(env.tmp.path(), "Acme");
    let creds = acme.make_device("tracker-1", &fleet);
    let publish = |node: &Server| {
        let mut args = creds.mosquitto_args(node.mqtt);
        args.extend(support::s(&[
            "-i",
            "tracker-1",
            "-q",
            "1",
            "-t",
            "devices/tracker-1/telemetry",
            "-m",
            "{\"x\":1}",
        ]));
        support::mosquitto_pub(&args).status.success()
    };
    let wait = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + WAIT;
        while !cond() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(!publish(&b), "not trusted before the CA is registered");

    let (status, ca) = a
        .api(
            "POST",
            "/api/v1/cas",
            Some(json!({"cert_pem": acme.ca_pem(), "auto_register": true, "tags": {"vendor": "acme"}})),
        )
        .await;
    assert_eq!(status, 201, "{ca}");
    wait("b trusts the CA registered on a", &|| publish(&b));
    let (status, device) = a.api("GET", "/api/v1/devices/tracker-1", None).await;
    assert_eq!(status, 200, "{device}");
    assert_eq!(device["tags"], json!({"vendor": "acme"}));

    // Disabled on a: the device's live session on b is closed, and b refuses it from then on.
    let mut args = creds.mosquitto_args(b.mqtt);
    args.extend(support::s(&[
        "-V",
        "mqttv5",
        "-i",
        "tracker-1",
        "-t",
        "devices/tracker-1/#",
    ]));
    let mut live = support::Sub::start(&args);
    let id = ca["id"].as_str().expect("id");
    let (status, v) = a
        .api("POST", &format!("/api/v1/cas/{id}/disable"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    live.wait_line(|l| l.contains("DISCONNECT (135)"));
    wait("b refuses the CA disabled on a", &|| !publish(&b));
}

/// Certificate rotation across nodes (issue 16): a device renews over its session on one node
/// and connects with the new certificate to another, which confirms the rotation: the old
/// certificate is revoked ("rotated") and refused on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_requested_on_one_node_is_confirmed_on_another() {
    let env = Env::new().await;
    let (a, b) = (env.start("a"), env.start("b"));
    let creds = a.create_device("r1", env.tmp.path());
    let (_, dev) = a.api("GET", "/api/v1/devices/r1", None).await;
    let old_serial = dev["cert_serial"].as_str().expect("serial").to_owned();
    let csr = device_key_and_csr(env.tmp.path(), "r1-next");
    let mut d = MqttDevice::connect(&a, &creds, "r1").await;
    d.subscribe("devices/r1/cert/#").await;
    d.publish(
        "devices/r1/cert/request",
        &json!({"v": 1, "csr_pem": csr}).to_string(),
    )
    .await;
    let (topic, accepted) = d.next_json().await;
    assert_eq!(topic, "devices/r1/cert/accepted", "{accepted}");
    drop(d);
    let next = env.tmp.path().join("r1-next-creds");
    std::fs::create_dir_all(&next).expect("dir");
    std::fs::copy(creds.ca(), next.join("ca.crt")).expect("ca");
    std::fs::copy(env.tmp.path().join("r1-next.key"), next.join("device.key")).expect("key");
    std::fs::write(
        next.join("device.crt"),
        accepted["certificate_pem"].as_str().expect("pem"),
    )
    .expect("crt");
    let next = Creds { dir: next };
    let mut d = MqttDevice::connect(&b, &next, "r1").await;
    d.publish("devices/r1/telemetry", r#"{"seq":1,"t":1}"#)
        .await;
    let (_, certs) = a.api("GET", "/api/v1/devices/r1/certificates", None).await;
    let old = certs["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .find(|c| c["serial"] == old_serial.as_str())
        .cloned()
        .expect("old certificate");
    assert_eq!(old["state"], "revoked", "{certs}");
    assert_eq!(old["revoke_reason"], "rotated", "{certs}");
    let (_, dev) = a.api("GET", "/api/v1/devices/r1", None).await;
    assert_ne!(dev["cert_serial"], old_serial.as_str());
    drop(d);
    for node in [&a, &b] {
        let mut args = creds.mosquitto_args(node.mqtt);
        args.extend(support::s(&[
            "-i",
            "r1",
            "-q",
            "1",
            "-t",
            "devices/r1/telemetry",
            "-m",
            "{}",
        ]));
        assert!(
            !support::mosquitto_pub(&args).status.success(),
            "the old certificate still works"
        );
    }
}

/// A fleet CA rollover across nodes (issue 16): begun on one node, the other issues with the
/// new CA and trusts both within a second; retired (forced) on the other, the first stops
/// trusting the previous CA and presents a server certificate from the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_ca_rollover_begun_on_one_node_is_in_force_on_another() {
    let env = Env::new().await;
    let (a, b) = (env.start("a"), env.start("b"));
    let old = a.create_device("roll-old", env.tmp.path());
    let (status, begun) = a
        .api(
            "POST",
            "/api/v1/cas/fleet/rollover",
            Some(json!({"no_rotation": true})),
        )
        .await;
    assert_eq!(status, 201, "{begun}");
    assert_eq!(begun["rotation_id"], Value::Null, "{begun}");
    let bundle = begun["ca_pem"].as_str().expect("ca_pem").to_owned();
    b.wait_for("/api/v1/cas/fleet", |v| v["ca_pem"] == bundle.as_str())
        .await;
    // b issues with the new CA; a trusts it; b still trusts the previous CA's certificate.
    let new = b.create_device("roll-new", env.tmp.path());
    assert_eq!(std::fs::read_to_string(new.ca()).expect("ca"), bundle);
    assert!(support::device_can_publish(&a, &new, "roll-new"));
    assert!(support::device_can_publish(&b, &old, "roll-old"));
    let (_, fleet) = a.api("GET", "/api/v1/cas/fleet", None).await;
    assert_eq!(fleet["previous_certificates"], 1, "{fleet}");

    // Retired on b (forced: roll-old never moved).
    let (status, v) = b
        .api("POST", "/api/v1/cas/fleet/retire", Some(json!({})))
        .await;
    assert_eq!(status, 409, "{v}");
    assert_eq!(v["error"]["code"], "rollover_incomplete", "{v}");
    let (status, retired) = b
        .api(
            "POST",
            "/api/v1/cas/fleet/retire",
            Some(json!({"force": true})),
        )
        .await;
    assert_eq!(status, 200, "{retired}");
    assert_eq!(retired["revoked"], 1, "{retired}");
    let new_ca = retired["fleet"]["ca_pem"].as_str().expect("ca").to_owned();
    a.wait_for("/api/v1/cas/fleet", |v| v["ca_pem"] == new_ca.as_str())
        .await;
    // a presents the new server certificate: a client trusting only the new CA gets in.
    let only_new = env.tmp.path().join("roll-new-only");
    std::fs::create_dir_all(&only_new).expect("dir");
    for f in ["device.crt", "device.key"] {
        std::fs::copy(new.dir.join(f), only_new.join(f)).expect("copy");
    }
    std::fs::write(only_new.join("ca.crt"), &new_ca).expect("ca");
    let only_new = support::Creds { dir: only_new };
    let deadline = std::time::Instant::now() + WAIT;
    while !support::device_can_publish(&a, &only_new, "roll-new") {
        assert!(
            std::time::Instant::now() < deadline,
            "a presents the new server certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!support::device_can_publish(&a, &old, "roll-old"));
}

/// The live-session sweep (issue 16): a revocation whose cluster notice never came (written to
/// the database behind the nodes' backs) still closes the session within a sweep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_without_its_notice_closes_the_session_at_the_next_sweep() {
    let env = Env::new().await;
    let a = env.start("a");
    let creds = a.create_device("sw1", env.tmp.path());
    let mut args = creds.mosquitto_args(a.mqtt);
    args.extend(support::s(&[
        "-V",
        "mqttv5",
        "-i",
        "sw1",
        "-t",
        "devices/sw1/#",
    ]));
    let mut sub = support::Sub::start(&args);
    wait_online(&a, "sw1", true).await;
    // No API call, no bus notice: only the store knows.
    let (client, connection) = tokio_postgres::connect(&env.db_url(), tokio_postgres::NoTls)
        .await
        .expect("database");
    let driver = tokio::spawn(connection);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let n = client
        .execute(
            "UPDATE device_certs SET state = 'revoked', revoked_at_ms = $1, revoke_reason = 'behind their backs' WHERE device_id = 'sw1'",
            &[&now_ms],
        )
        .await
        .expect("revoke in the database");
    assert_eq!(n, 1);
    drop(client);
    let _ = driver.await;
    sub.wait_line(|l| l.contains("DISCONNECT (135)"));
    sub.wait_exit();
    assert!(!support::device_can_publish(&a, &creds, "sw1"));
}

/// OTA artifacts in a cluster (issue 17): an upload through one node is stored in the database
/// (chunks), both nodes hold the same update key (sealed in the store), and a download link
/// minted on one node works, resumed with `Range`, on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_uploaded_on_one_node_downloads_from_another_with_its_token() {
    let env = Env::new().await;
    let (a, b) = (env.start("a"), env.start("b"));
    let bytes: Vec<u8> = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    let file = env.tmp.path().join("fw.img");
    std::fs::write(&file, &bytes).expect("write");
    let out = a.cli(&[
        "ota",
        "upload",
        file.to_str().expect("utf8"),
        "--version",
        "1.0.0",
        "--compatible",
        "rev-b",
        "--chunk-bytes",
        "500000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(
        !env.data_dir("a").join("artifacts").exists(),
        "bytes in the database"
    );
    let (_, ka) = a.api("GET", "/api/v1/ota/update-key", None).await;
    let (_, kb) = b.api("GET", "/api/v1/ota/update-key", None).await;
    assert_eq!(
        ka["public_key"], kb["public_key"],
        "one update key for the cluster"
    );
    a.create_device("d1", env.tmp.path());
    let (status, link) = a
        .api(
            "POST",
            &format!("/api/v1/ota/artifacts/{id}/links"),
            Some(json!({"device_id": "d1"})),
        )
        .await;
    assert_eq!(status, 201, "{link}");
    let token = link["token"].as_str().expect("token");
    let got = support::http()
        .get(format!("{}/api/v1/ota/artifacts/{id}/download", b.url()))
        .bearer_auth(token)
        .header("range", "bytes=700000-")
        .send()
        .await
        .expect("download");
    assert_eq!(got.status().as_u16(), 206);
    assert!(got.bytes().await.expect("body").as_ref() == &bytes[700_000..]);
    let (status, shown) = b
        .api("GET", &format!("/api/v1/ota/artifacts/{id}"), None)
        .await;
    assert_eq!((status, shown["state"].as_str()), (200, Some("ready")));
}

/// A deployment whose sending node dies midway (kill -9) is finished by the live node that holds
/// (or takes over) the OTA sweeper's lease: every device ends with exactly one update command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_cut_short_by_a_dead_node_is_sent_by_a_live_one() {
    const DEVICES: usize = 200;
    let env = Env::new().await;
    let (a, b) = (env.start("a"), env.start("b"));
    let ids: Vec<String> = (0..DEVICES).map(|i| format!("m{i:04}")).collect();
    for id in &ids {
        let (status, v) = b
            .api(
                "POST",
                "/api/v1/devices",
                Some(json!({"id": id, "tags": {"site": "m"}})),
            )
            .await;
        assert_eq!(status, 201, "{v}");
    }
    let art = b.ota_upload(&env.tmp.path().join("fw.img"), &[3u8; 4096], "2.0.0");
    let (status, dep) = a
        .api(
            "POST",
            "/api/v1/ota/deployments",
            Some(json!({"artifact_id": art, "selector": "tag:site=m"})),
        )
        .await;
    assert_eq!(status, 201, "{dep}");
    let dep_id = dep["id"].as_str().expect("id").to_owned();
    // a dies once its first update went out.
    b.wait_for(&format!("/api/v1/devices/{}/ota", ids[0]), |v| {
        v["updates"][0]["command_id"].is_string()
    })
    .await;
    a.kill9();

    for id in &ids {
        let history = b
            .wait_for(&format!("/api/v1/devices/{id}/ota"), |v| {
                v["updates"][0]["command_id"].is_string()
            })
            .await;
        assert_eq!(history["updates"][0]["deployment_id"], dep_id.as_str());
        let (_, cmds) = b
            .api("GET", &format!("/api/v1/devices/{id}/commands"), None)
            .await;
        let updates: Vec<&Value> = cmds["commands"]
            .as_array()
            .expect("commands")
            .iter()
            .filter(|c| c["name"] == "mooring.update")
            .collect();
        assert_eq!(updates.len(), 1, "{id}: {cmds}");
    }
    b.wait_metric("mooring_cluster_lease_held{lease=\"ota.sweeper\"}", |v| {
        v == 1.0
    })
    .await;
    eprintln!(
        "b after a died: {}",
        b.log_text()
            .lines()
            .find(|l| l.contains("resumed sending updates"))
            .unwrap_or("nothing to resume (a sent every update before it died)")
    );
}

/// `mooring worker` with the cluster's config and `extra`: job workers only, no listeners.
/// Killed (SIGKILL) when dropped.
struct Worker {
    child: std::process::Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    /// Starts it; returns once it logged `ready`.
    fn start(env: &Env, name: &str, extra: &str) -> Worker {
        use std::io::BufRead;
        let args = env.config_with(name, extra);
        let mut child = std::process::Command::new(support::BIN)
            .arg("worker")
            .args(&args)
            .arg("--data-dir")
            .arg(env.data_dir(name))
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn mooring worker");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let ready = line.contains(" ready");
                log2.lock().expect("log").push(line);
                if ready {
                    let _ = tx.send(());
                }
            }
        });
        if rx.recv_timeout(WAIT).is_err() {
            panic!(
                "worker {name} did not start: {:#?}",
                log.lock().expect("log")
            );
        }
        Worker { child, log }
    }

    fn logged(&self, text: &str) -> bool {
        self.log
            .lock()
            .expect("log")
            .iter()
            .any(|l| l.contains(text))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The work queue across processes: a node that runs no jobs itself queues a report; a
/// `mooring worker` runs it turn by turn and is killed (-9) mid-report; another worker takes
/// the job over (at once if it was between turns, after the lease ran out if it was mid-turn)
/// and finishes it from the stored progress. The report holds every point exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_survives_its_worker_killed_mid_way_and_holds_every_point_once() {
    let env = Env::new().await;
    let a = env.start_configured("a", "127.0.0.1:0", "127.0.0.1:0", "[jobs]\nworkers = 0\n");
    let t0 = (now_ms() - 3_600_000) / 1000 * 1000;
    let ids = ["r1", "r2", "r3", "r4"];
    for id in ids {
        let creds = a.create_device(id, env.tmp.path());
        publish_series(&a, &creds, id, t0, 60).await;
    }
    let worker_config = "[jobs]\nworkers = 1\nreport_points_per_turn = 10\nbatch_pause_ms = 50\n\
                         lease_ms = 1000\npoll_interval_ms = 100\nretry_backoff_ms = 100\n";
    let (status, job) = a
        .api(
            "POST",
            "/api/v1/reports",
            Some(json!({"kind": "telemetry", "selector": "r1,r2,r3,r4",
                "from_ms": t0, "to_ms": t0 + 60_000})),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().expect("id").to_owned();
    let path = format!("/api/v1/jobs/{id}");
    // Nobody runs it on the node itself.
    let (_, still) = a.api("GET", &path, None).await;
    assert_eq!(still["state"], "queued", "{still}");

    // w1 takes the job again at once after each turn: killed, it most likely held it.
    let fast = worker_config.replace("batch_pause_ms = 50", "batch_pause_ms = 0");
    let w1 = Worker::start(&env, "w1", &fast);
    a.wait_for(&path, |j| {
        j["result"]["points"].as_u64().unwrap_or(0) >= 100
    })
    .await;
    drop(w1); // SIGKILL
    let (_, part) = a.api("GET", &path, None).await;
    assert_eq!(part["state"], "running", "{part}");
    assert!(
        part["result"]["points"].as_u64().unwrap_or(0) < 720,
        "{part}"
    );
    let held = part["worker"] == "w1/0";

    let w2 = Worker::start(&env, "w2", worker_config);
    let done = a
        .wait_for(&path, |j| {
            !["queued", "running"].contains(&j["state"].as_str().unwrap_or(""))
        })
        .await;
    assert_eq!(done["state"], "succeeded", "{done}");
    assert_eq!(
        (&done["done"], &done["total"]),
        (&json!(4), &json!(4)),
        "{done}"
    );
    assert_eq!(done["result"]["points"], 720, "{done}");
    assert!(w2.logged("job finished"), "the second worker finished it");
    // Taken over after w1's lease ran out (the attempt counted, then reset by the turn that
    // succeeded), or simply claimed if w1 died between turns.
    let taken_over = json!("worker w1/0 stopped mid-turn (its lease ran out)");
    assert_eq!(done["last_error"] == taken_over, held, "{part}\n{done}");
    eprintln!("w1 killed while holding the job: {held}");

    let (status, text) = a.api("GET", &format!("{path}/result"), None).await;
    assert_eq!(status, 200);
    let text = text.as_str().expect("CSV text");
    let mut rows = std::collections::BTreeSet::new();
    for line in text.lines().skip(1) {
        assert!(rows.insert(line.to_owned()), "a point twice: {line}");
    }
    assert_eq!(rows.len(), 720);
    for id in ids {
        for i in 0..60 {
            let ts = t0 + i * 1000;
            assert!(
                rows.iter()
                    .any(|r| r.starts_with(&format!("{id},{ts},"))
                        && r.ends_with(&format!(",temp,{i}"))),
                "{id} point {i} missing"
            );
        }
    }
}

/// A rule's `nats:SUBJECT` action on a cluster: the notification is published on the
/// cluster's NATS as `<prefix>.rules.<subject>`, where any NATS client can take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_nats_action_publishes_on_the_clusters_nats() {
    let env = Env::new().await;
    let a = env.start("a");
    use mooring_bus::Bus;
    let listener =
        mooring_bus::NatsBus::connect(mooring_bus::NatsConfig::new(nats_url(), env.prefix.clone()))
            .await
            .expect("a NATS client");
    let mut sub = listener
        .subscribe("rules.fleet.hot")
        .await
        .expect("subscribe");
    let (status, v) = a
        .api(
            "POST",
            "/api/v1/rules",
            Some(json!({"name": "hot", "when": "temp > 50", "then": "nats:fleet.hot"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let (status, v) = a
        .api(
            "POST",
            "/api/v1/rules",
            Some(json!({"name": "bad", "when": "temp > 50", "then": "nats:fleet.*"})),
        )
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (400, Some("invalid_rule")),
        "{v}"
    );
    // NATS subjects are shared by every scope: a scoped caller may not publish on them.
    let scoped = support::scoped_token(&a, "acme-ops", "operator", "tag:customer=acme");
    let resp = support::http()
        .post(format!("{}/api/v1/rules", a.url()))
        .bearer_auth(&scoped)
        .json(&json!({"name": "acme", "when": "temp > 50", "then": "nats:acme.hot"}))
        .send()
        .await
        .expect("create rule");
    assert_eq!(resp.status(), 403);
    let creds = a.create_device("n1", env.tmp.path());
    let mut dev = MqttDevice::connect(&a, &creds, "n1").await;
    dev.publish("devices/n1/telemetry", r#"{"temp": 70}"#).await;
    let msg = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("published within the wait")
        .expect("a message");
    assert_eq!(msg.subject, "rules.fleet.hot");
    let body: Value = serde_json::from_slice(&msg.payload).expect("JSON");
    assert_eq!(
        (&body["event"], &body["rule"], &body["device_id"]),
        (&json!("rule.fired"), &json!("hot"), &json!("n1")),
        "{body}"
    );
    a.wait_metric("mooring_rule_nats_total{outcome=\"published\"}", |n| {
        n >= 1.0
    })
    .await;
}

/// Rollouts (issue 19) on a cluster: a rollout created on one node is moved on by whichever
/// node holds the lease `rollouts.controller`. That node is killed (kill -9) in the middle of
/// the rollout (a node taking its addresses if it served the agents): the lease moves, the
/// rollout completes from what the store holds, and no device was started twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_survives_the_death_of_its_controller_node_and_starts_no_device_twice() {
    use support::agents::{agent_config, Supervised};
    let env = Env::new().await;
    let extra = "[rollouts]\ntick_ms = 200\n[health]\nflush_interval_ms = 200\n";
    let a = env.start_configured("a", "127.0.0.1:0", "127.0.0.1:0", extra);
    let b = env.start_configured("b", "127.0.0.1:0", "127.0.0.1:0", extra);
    let (_, key) = a.api("GET", "/api/v1/ota/update-key", None).await;
    let public_key = key["public_key"].as_str().expect("public key").to_owned();
    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for i in 0..6 {
        let id = format!("node-dev-{i}");
        let creds = a.create_device(&id, env.tmp.path());
        let cfg = agent_config(env.tmp.path(), &id, &public_key, None);
        let state = env.tmp.path().join(format!("{id}-state"));
        agents.push(Supervised::start(&a, &creds, &state, &cfg));
        ids.push(id);
    }
    for id in &ids {
        a.wait_for(&format!("/api/v1/devices/{id}"), |v| v["online"] == true)
            .await;
    }
    let image: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let art = a.ota_upload(&env.tmp.path().join("fw-2.img"), &image, "2.0.0");
    let (status, r) = b
        .api(
            "POST",
            "/api/v1/rollouts",
            Some(json!({
                "artifact_id": art, "selector": format!("id:{}", ids.join(",")),
                "waves": [50, 100], "control_pct": 34, "min_devices": 1, "health_window_ms": 3000
            })),
        )
        .await;
    assert_eq!(status, 201, "{r}");
    let id = r["id"].as_str().expect("id").to_owned();
    // The first wave ended: its health window runs.
    a.wait_for(&format!("/api/v1/rollouts/{id}"), |v| {
        v["window_started_at"].is_u64()
    })
    .await;
    let held = |text: &str| {
        text.lines()
            .any(|l| l == "mooring_cluster_lease_held{lease=\"rollouts.controller\"} 1")
    };
    let a_holds = held(&a.metrics_text().await);
    let b_holds = held(&b.metrics_text().await);
    assert!(a_holds ^ b_holds, "exactly one node runs the controller");
    let survivor = if b_holds {
        b.kill9();
        a
    } else {
        // a served the agents: c takes its addresses, as a restarted node would.
        let (mqtt, http) = (a.mqtt.to_string(), a.http.to_string());
        a.kill9();
        let c = env.start_configured("c", &mqtt, &http, extra);
        drop(b);
        c
    };
    let done = survivor
        .wait_for(&format!("/api/v1/rollouts/{id}"), |v| {
            v["state"] == "completed"
        })
        .await;
    assert_eq!(done["committed"], 6, "{done}");
    for d in &ids {
        let (_, cmds) = survivor
            .api("GET", &format!("/api/v1/devices/{d}/commands"), None)
            .await;
        let updates = cmds["commands"].as_array().map_or(0, |cs| {
            cs.iter().filter(|c| c["name"] == "mooring.update").count()
        });
        assert_eq!(updates, 1, "{d} was started once: {cmds}");
    }
    drop(agents);
}

/// Gateways across nodes (issue 20): a child relayed by its gateway connected to node b is
/// online on every node through it, a command created on node a reaches it through the gateway
/// on b, and a detach through a ends the gateway's rights on b at once (b hears of it): the
/// child goes offline everywhere and the gateway's next publish for it is refused, storing
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_attached_on_one_node_is_relayed_by_its_gateway_on_another() {
    let env = Env::new().await;
    let (a, b) = (env.start("a"), env.start("b"));
    let gw = a.create_device("gw-1", env.tmp.path());
    a.create_device("lock-9", env.tmp.path());
    let (status, v) = b
        .api(
            "PUT",
            "/api/v1/devices/lock-9/gateway",
            Some(json!({"gateway": "gw-1"})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    let mut g = MqttDevice::connect(&b, &gw, "gw-1").await;
    g.subscribe("devices/lock-9/commands/+").await;
    g.publish("devices/lock-9/presence", r#"{"v":1,"online":true}"#)
        .await;
    for node in [&a, &b] {
        wait_online(node, "lock-9", true).await;
    }
    g.publish(
        "devices/lock-9/telemetry",
        &format!(r#"{{"seq":1,"ts":{},"battery":55}}"#, now_ms()),
    )
    .await;
    a.wait_for("/api/v1/devices/lock-9/telemetry", |v| {
        v["points"].as_array().is_some_and(|p| p.len() == 1)
    })
    .await;
    let done = command_round_trip_for(&a, &mut g, "lock-9", "unlock").await;
    assert_eq!(done["state"], json!("succeeded"), "{done}");

    // Detached through a: on b the gateway loses the child at once.
    let (status, _) = a
        .api("DELETE", "/api/v1/devices/lock-9/gateway", None)
        .await;
    assert_eq!(status, 204);
    for node in [&a, &b] {
        wait_online(node, "lock-9", false).await;
    }
    g.publish_no_wait(
        "devices/lock-9/telemetry",
        &format!(r#"{{"seq":2,"ts":{},"battery":54}}"#, now_ms()),
    )
    .await;
    g.closed().await;
    let (_, t) = a.api("GET", "/api/v1/devices/lock-9/telemetry", None).await;
    assert_eq!(t["points"].as_array().map(Vec::len), Some(1), "{t}");
}
