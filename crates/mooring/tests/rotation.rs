//! Certificate rotation (issue 16) against the real binary: a device renews its certificate by CSR
//! over its own session (`devices/<id>/cert/request`); the new certificate is active beside the
//! old one until the device connects with it, which makes it current and revokes the old one
//! ("rotated"), on whatever node. At most one unconfirmed renewal per device.

mod support;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use support::{Creds, MqttDevice, Server};

/// A new EC P-256 key `<name>.key` in `dir` and a CSR for it (PEM) whose subject names another
/// device: the server must use only the key.
fn new_key_and_csr(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(format!("{name}.key"));
    let csr = dir.join(format!("{name}.csr"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .args(["-subj", "/CN=forged-other-device"])
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (key, std::fs::read_to_string(&csr).expect("csr"))
}

/// Credentials made of the old ones' CA, `key` and the PEM `cert`, in `dir`.
fn creds_with(old: &Creds, dir: &Path, key: &Path, cert: &str) -> Creds {
    std::fs::create_dir_all(dir).expect("dir");
    std::fs::copy(old.ca(), dir.join("ca.crt")).expect("ca");
    std::fs::copy(key, dir.join("device.key")).expect("key");
    std::fs::write(dir.join("device.crt"), cert).expect("cert");
    Creds {
        dir: dir.to_owned(),
    }
}

/// The renewal request for `csr` and the answer: (topic, payload).
async fn renew(dev: &mut MqttDevice, id: &str, csr: &str) -> (String, Value) {
    dev.publish(
        &format!("devices/{id}/cert/request"),
        &json!({"v": 1, "csr_pem": csr}).to_string(),
    )
    .await;
    dev.next_json().await
}

/// The device's certificates: serial -> (state, revoke_reason).
async fn ledger(server: &Server, id: &str) -> Vec<(String, String, Value)> {
    let (status, v) = server
        .api("GET", &format!("/api/v1/devices/{id}/certificates"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    v["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .map(|c| {
            (
                c["serial"].as_str().expect("serial").to_owned(),
                c["state"].as_str().expect("state").to_owned(),
                c["revoke_reason"].clone(),
            )
        })
        .collect()
}

async fn current_serial(server: &Server, id: &str) -> String {
    let (status, v) = server
        .api("GET", &format!("/api/v1/devices/{id}"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    v["cert_serial"].as_str().expect("cert_serial").to_owned()
}

async fn telemetry_count(server: &Server, id: &str, metric: &str) -> usize {
    let (status, v) = server
        .api(
            "GET",
            &format!("/api/v1/devices/{id}/telemetry?metric={metric}&limit=1000"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{v}");
    v["points"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn a_device_renews_over_its_session_and_connecting_with_the_new_certificate_revokes_the_old()
{
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let old = server.create_device("r1", tmp.path());
    let old_serial = current_serial(&server, "r1").await;
    let mut dev = MqttDevice::connect(&server, &old, "r1").await;
    dev.subscribe("devices/r1/cert/#").await;
    let mut sent = 0u32;
    for _ in 0..5 {
        sent += 1;
        dev.publish(
            "devices/r1/telemetry",
            &json!({"seq": sent, "temp": sent}).to_string(),
        )
        .await;
    }

    // A CSR with a forged subject: the certificate names the device, for the CSR's key.
    let (key, csr) = new_key_and_csr(tmp.path(), "next");
    let (topic, accepted) = renew(&mut dev, "r1", &csr).await;
    assert_eq!(topic, "devices/r1/cert/accepted", "{accepted}");
    assert_eq!(accepted["device_id"], "r1");
    let cert_pem = accepted["certificate_pem"]
        .as_str()
        .expect("pem")
        .to_owned();
    assert!(accepted["ca_pem"]
        .as_str()
        .expect("ca")
        .contains("BEGIN CERTIFICATE"));
    // The same key again: the same certificate.
    let (topic, again) = renew(&mut dev, "r1", &csr).await;
    assert_eq!(topic, "devices/r1/cert/accepted");
    assert_eq!(again["certificate_pem"], cert_pem.as_str());
    for _ in 0..5 {
        sent += 1;
        dev.publish(
            "devices/r1/telemetry",
            &json!({"seq": sent, "temp": sent}).to_string(),
        )
        .await;
    }
    // Both certificates are active until the device connects with the new one.
    let before = ledger(&server, "r1").await;
    assert_eq!(before.len(), 2, "{before:?}");
    assert!(
        before.iter().all(|(_, state, _)| state == "active"),
        "{before:?}"
    );
    assert_eq!(current_serial(&server, "r1").await, old_serial);
    let new_serial = before
        .iter()
        .map(|(serial, _, _)| serial.clone())
        .find(|serial| *serial != old_serial)
        .expect("new serial");

    // The device reconnects with its new pair and goes on sending.
    let new = creds_with(&old, &tmp.path().join("r1-next"), &key, &cert_pem);
    drop(dev);
    let mut dev = MqttDevice::connect(&server, &new, "r1").await;
    for _ in 0..5 {
        sent += 1;
        dev.publish(
            "devices/r1/telemetry",
            &json!({"seq": sent, "temp": sent}).to_string(),
        )
        .await;
    }
    assert_eq!(current_serial(&server, "r1").await, new_serial);
    let after = ledger(&server, "r1").await;
    let state_of = |serial: &str| {
        after
            .iter()
            .find(|(s, _, _)| s == serial)
            .map(|(_, state, reason)| (state.clone(), reason.clone()))
            .expect("in the ledger")
    };
    assert_eq!(
        state_of(&old_serial),
        ("revoked".to_owned(), json!("rotated"))
    );
    assert_eq!(state_of(&new_serial).0, "active");
    // No telemetry lost across the rotation; the old certificate is refused from now on.
    assert_eq!(telemetry_count(&server, "r1", "temp").await, sent as usize);
    assert!(
        !support::device_can_publish(&server, &old, "r1"),
        "the old certificate still works"
    );
    assert!(support::device_can_publish(&server, &new, "r1"));
    // The rotation is in the audit log.
    let (_, audit) = server
        .api("GET", "/api/v1/audit?action=cert.rotated&limit=10", None)
        .await;
    assert_eq!(
        audit["entries"].as_array().map_or(0, Vec::len),
        1,
        "{audit}"
    );
}

#[tokio::test]
async fn a_renewal_with_another_key_replaces_the_unconfirmed_one_and_bad_requests_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let old = server.create_device("r2", tmp.path());
    let mut dev = MqttDevice::connect(&server, &old, "r2").await;
    dev.subscribe("devices/r2/cert/#").await;

    let (topic, rejected) = renew(&mut dev, "r2", "not a csr").await;
    assert_eq!(topic, "devices/r2/cert/rejected", "{rejected}");
    assert_eq!(rejected["code"], "invalid_csr");
    assert_eq!(ledger(&server, "r2").await.len(), 1);

    let (key_a, csr_a) = new_key_and_csr(tmp.path(), "a");
    let (_, a) = renew(&mut dev, "r2", &csr_a).await;
    let cert_a = a["certificate_pem"].as_str().expect("pem").to_owned();
    let (key_b, csr_b) = new_key_and_csr(tmp.path(), "b");
    let (_, b) = renew(&mut dev, "r2", &csr_b).await;
    let cert_b = b["certificate_pem"].as_str().expect("pem").to_owned();
    assert_ne!(cert_a, cert_b);
    // One unconfirmed certificate at most: a's is revoked, b's is active.
    let certs = ledger(&server, "r2").await;
    assert_eq!(certs.len(), 3, "{certs:?}");
    let replaced: Vec<_> = certs.iter().filter(|(_, st, _)| st == "revoked").collect();
    assert_eq!(replaced.len(), 1, "{certs:?}");
    assert_eq!(replaced[0].2, json!("renewal replaced"));
    let with_a = creds_with(&old, &tmp.path().join("r2-a"), &key_a, &cert_a);
    let with_b = creds_with(&old, &tmp.path().join("r2-b"), &key_b, &cert_b);
    drop(dev);
    assert!(
        !support::device_can_publish(&server, &with_a, "r2"),
        "the replaced certificate works"
    );
    assert!(support::device_can_publish(&server, &with_b, "r2"));
    assert!(
        !support::device_can_publish(&server, &old, "r2"),
        "the old certificate still works"
    );
    // The rotated device can renew again.
    let mut dev = MqttDevice::connect(&server, &with_b, "r2").await;
    dev.subscribe("devices/r2/cert/#").await;
    let (_, csr_c) = new_key_and_csr(tmp.path(), "c");
    let (topic, _) = renew(&mut dev, "r2", &csr_c).await;
    assert_eq!(topic, "devices/r2/cert/accepted");
}

/// The `n` values stored for the device.
async fn stored_ns(server: &Server, id: &str) -> Vec<f64> {
    let (_, v) = server
        .api(
            "GET",
            &format!("/api/v1/devices/{id}/telemetry?metric=n&limit=10000"),
            None,
        )
        .await;
    v["points"]
        .as_array()
        .map(|p| p.iter().filter_map(|x| x["value"].as_f64()).collect())
        .unwrap_or_default()
}

/// A copy of `creds` in `dir` (the agent replaces its files when it rotates).
fn copy_creds(creds: &Creds, dir: &Path) -> Creds {
    std::fs::create_dir_all(dir).expect("dir");
    for f in ["ca.crt", "device.crt", "device.key"] {
        std::fs::copy(creds.dir.join(f), dir.join(f)).expect("copy");
    }
    Creds {
        dir: dir.to_owned(),
    }
}

/// Polls the device's current serial until it is not `old`; panics after 60 s.
async fn wait_serial_change(server: &Server, id: &str, old: &str) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let now = current_serial(server, id).await;
        if now != old {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the device's certificate did not change"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn an_agent_past_the_lifetime_fraction_renews_under_a_live_session_without_losing_telemetry()
{
    use std::io::Write as _;
    let tmp = tempfile::tempdir().expect("tmp");
    // One-day certificates, issued 5 minutes back-dated: 0.0035 of their life is past ~3.5 s
    // after issue.
    let cfg = support::config_args(tmp.path(), "[certificates]\ndevice_validity_days = 1\n");
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let server = Server::start_with(&tmp.path().join("data"), "127.0.0.1:0", "127.0.0.1:0", &cfg);
    let creds = server.create_device("a1", tmp.path());
    let old = copy_creds(&creds, &tmp.path().join("a1-old"));
    let old_serial = current_serial(&server, "a1").await;
    let agent_cfg = tmp.path().join("agent.toml");
    std::fs::write(&agent_cfg, "renew_at_lifetime_fraction = 0.0035\n").expect("agent config");
    let state = tmp.path().join("a1-state");
    let mut agent = support::agent_command(&server, &creds, &state)
        .args([
            "--interval-secs",
            "0",
            "--input",
            "-",
            "--exit-when-drained",
        ])
        .arg("--config")
        .arg(&agent_cfg)
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn mooring-agent");
    let mut stdin = agent.stdin.take().expect("stdin");
    // Telemetry flows all along: before, during and after the rotation.
    let mut sent = 0u32;
    let mut new_serial = None;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while new_serial.is_none() || sent < 80 {
        writeln!(stdin, "{{\"n\":{sent}}}").expect("write");
        stdin.flush().expect("flush");
        sent += 1;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if new_serial.is_none() {
            let now = current_serial(&server, "a1").await;
            if now != old_serial {
                new_serial = Some(now);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not rotate its certificate"
        );
    }
    drop(stdin);
    let exit_deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = agent.try_wait().expect("try_wait") {
            break status;
        }
        if std::time::Instant::now() > exit_deadline {
            let _ = agent.kill();
            panic!("agent did not drain its outbox and exit");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(status.success(), "agent exit: {status}");
    // Every point once, none lost.
    let mut ns = stored_ns(&server, "a1").await;
    ns.sort_by(f64::total_cmp);
    let expected: Vec<f64> = (0..sent).map(f64::from).collect();
    assert_eq!(ns, expected);
    // The old certificate is revoked ("rotated") and refused; the agent's files are a pair the
    // server accepts.
    let certs = ledger(&server, "a1").await;
    let old_row = certs
        .iter()
        .find(|(s, _, _)| *s == old_serial)
        .expect("old certificate in the ledger");
    assert_eq!(
        (old_row.1.as_str(), &old_row.2),
        ("revoked", &json!("rotated"))
    );
    assert!(
        !support::device_can_publish(&server, &old, "a1"),
        "the old certificate still works"
    );
    assert!(
        support::device_can_publish(&server, &creds, "a1"),
        "the agent's rotated files do not work"
    );
    drop(state);
}

#[tokio::test]
async fn cert_rotate_makes_a_healthy_agent_renew_even_when_told_while_it_was_offline() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let creds = server.create_device("a2", tmp.path());
    let old = copy_creds(&creds, &tmp.path().join("a2-old"));
    let old_serial = current_serial(&server, "a2").await;
    // Told while offline: the request waits for the device.
    let out = server.cli(&["cert", "rotate", "--device", "a2", "--ttl", "1h"]);
    assert!(
        out.status.success(),
        "cert rotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("told to renew"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Unknown devices are not found.
    let out = server.cli(&["cert", "rotate", "--device", "nope"]);
    assert!(!out.status.success());
    let state = tmp.path().join("a2-state");
    let mut agent = support::agent_command(&server, &creds, &state)
        .args(["--interval-secs", "0"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn mooring-agent");
    let new_serial = wait_serial_change(&server, "a2", &old_serial).await;
    // The command succeeded; the old certificate is revoked, refused; the agent's files work.
    let (_, cmds) = server.api("GET", "/api/v1/devices/a2/commands", None).await;
    assert_eq!(cmds["commands"][0]["name"], "mooring.cert.rotate", "{cmds}");
    let certs = ledger(&server, "a2").await;
    assert!(
        certs
            .iter()
            .any(|(s, st, r)| *s == old_serial && st == "revoked" && *r == json!("rotated")),
        "{certs:?}"
    );
    assert!(certs
        .iter()
        .any(|(s, st, _)| *s == new_serial && st == "active"));
    assert!(
        !support::device_can_publish(&server, &old, "a2"),
        "the old certificate still works"
    );
    // The agent swapped its files (after its CONNACK with the new pair): wait for that, then
    // a client with them gets in, and no renewed pair is left waiting.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read(creds.cert()).expect("cert") == std::fs::read(old.cert()).expect("cert")
        || state.join("device.next.key").exists()
    {
        assert!(std::time::Instant::now() < deadline, "files not swapped");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(support::device_can_publish(&server, &creds, "a2"));
    assert!(!state.join("device.next.crt").exists());
}

/// The `mooring.cert.rotate` commands of each device: device -> created_at (ms) of each.
async fn rotate_commands(server: &Server, ids: &[String]) -> Vec<(String, Vec<u64>)> {
    let mut out = Vec::new();
    for id in ids {
        let (_, v) = server
            .api("GET", &format!("/api/v1/devices/{id}/commands"), None)
            .await;
        let times = v["commands"]
            .as_array()
            .map(|cs| {
                cs.iter()
                    .filter(|c| c["name"] == "mooring.cert.rotate")
                    .filter_map(|c| c["created_at"].as_u64())
                    .collect()
            })
            .unwrap_or_default();
        out.push((id.clone(), times));
    }
    out
}

/// `mooring cert rotation status <id> --json`.
fn rotation_status(server: &Server, id: &str) -> Value {
    let out = server.cli(&["cert", "rotation", "status", id, "-o", "json"]);
    assert!(
        out.status.success(),
        "rotation status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

/// Starts a fleet rotation with the CLI; returns its id.
fn start_rotation(server: &Server, within: &str, per_minute: &str) -> String {
    let out = server.cli(&[
        "cert",
        "rotate",
        "--expiring-within",
        within,
        "--max-per-minute",
        per_minute,
    ]);
    assert!(
        out.status.success(),
        "cert rotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .find(|w| w.starts_with("job_"))
        .expect("rotation id")
        .to_owned()
}

/// Polls the rotation until `pred` holds; panics after 90 s.
async fn wait_rotation(server: &Server, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(90);
    loop {
        let v = rotation_status(server, id);
        if pred(&v) {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "rotation stuck: {v}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_fleet_rotation_is_throttled_as_asked_and_every_agent_confirms() {
    let tmp = tempfile::tempdir().expect("tmp");
    // 10-day certificates; the rotation picks those expiring within 10 days of its start: all
    // of them, and none of the ones it causes (issued later).
    let cfg = support::config_args(tmp.path(), "[certificates]\ndevice_validity_days = 10\n");
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let server = Server::start_with(&tmp.path().join("data"), "127.0.0.1:0", "127.0.0.1:0", &cfg);
    let ids: Vec<String> = (1..=4).map(|i| format!("f{i}")).collect();
    let mut agents = Vec::new();
    for id in &ids {
        let creds = server.create_device(id, tmp.path());
        agents.push(
            support::agent_command(&server, &creds, &tmp.path().join(format!("{id}-state")))
                .args(["--interval-secs", "0"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn mooring-agent"),
        );
    }
    let old: Vec<String> = {
        let mut v = Vec::new();
        for id in &ids {
            v.push(current_serial(&server, id).await);
        }
        v
    };
    // 60 a minute: one a second.
    let rot = start_rotation(&server, "10d", "60");
    let done = wait_rotation(&server, &rot, |v| {
        v["job"]["state"] == "succeeded" && v["confirmed"] == 4
    })
    .await;
    assert_eq!(done["selected"], 4, "{done}");
    assert_eq!(done["requested"], 4, "{done}");
    assert_eq!(done["pending"], 0, "{done}");
    assert_eq!(done["failed"], 0, "{done}");
    // One request per device, spaced by a second at least (some slack for the clock).
    let cmds = rotate_commands(&server, &ids).await;
    let mut times: Vec<u64> = cmds
        .iter()
        .map(|(id, t)| {
            assert_eq!(t.len(), 1, "{id}: {t:?}");
            t[0]
        })
        .collect();
    times.sort_unstable();
    for pair in times.windows(2) {
        assert!(pair[1] - pair[0] >= 900, "requests too close: {times:?}");
    }
    // Every device rotated: a new current certificate, the old one revoked.
    for (id, old_serial) in ids.iter().zip(&old) {
        assert_ne!(&current_serial(&server, id).await, old_serial);
        let certs = ledger(&server, id).await;
        assert!(
            certs
                .iter()
                .any(|(s, st, r)| s == old_serial && st == "revoked" && *r == json!("rotated")),
            "{id}: {certs:?}"
        );
    }
    for mut a in agents {
        let _ = a.kill();
        let _ = a.wait();
    }
}

/// A fleet rotation of 1,000 devices (offline: their requests wait for them) keeps to the rate
/// it was given: at 6,000 a minute, never more than 100 requests within a second, one per
/// device, all of them.
#[tokio::test]
async fn a_fleet_rotation_of_a_thousand_devices_keeps_to_its_rate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = support::config_args(tmp.path(), "[certificates]\ndevice_validity_days = 10\n");
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let server = Server::start_with(&tmp.path().join("data"), "127.0.0.1:0", "127.0.0.1:0", &cfg);
    let ids: Vec<String> = (0..1000).map(|i| format!("k{i:04}")).collect();
    for id in &ids {
        let (status, v) = server
            .api("POST", "/api/v1/devices", Some(json!({"id": id})))
            .await;
        assert_eq!(status, 201, "{v}");
    }
    let rot = start_rotation(&server, "10d", "6000");
    let done = wait_rotation(&server, &rot, |v| v["job"]["state"] == "succeeded").await;
    assert_eq!(done["selected"], 1000, "{done}");
    assert_eq!(done["requested"], 1000, "{done}");
    assert_eq!(done["failed"], 0, "{done}");
    let mut times: Vec<u64> = rotate_commands(&server, &ids)
        .await
        .into_iter()
        .map(|(id, t)| {
            assert_eq!(t.len(), 1, "{id}: {t:?}");
            t[0]
        })
        .collect();
    times.sort_unstable();
    // 100 a second: the 101st request comes a second (less timer slack) after the first.
    for w in times.windows(101) {
        assert!(
            w[100] - w[0] >= 950,
            "101 requests within {} ms",
            w[100] - w[0]
        );
    }
}

#[tokio::test]
async fn a_fleet_rotation_resumes_after_a_server_restart_without_asking_twice() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let cfg = support::config_args(tmp.path(), "[certificates]\ndevice_validity_days = 10\n");
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &cfg);
    let ids: Vec<String> = (1..=3).map(|i| format!("g{i}")).collect();
    for id in &ids {
        server.create_device(id, tmp.path());
    }
    // 20 a minute: one every 3 s. The devices are offline: the requests wait for them.
    let rot = start_rotation(&server, "10d", "20");
    wait_rotation(&server, &rot, |v| v["requested"] == 1).await;
    let (mqtt, http) = (server.mqtt.to_string(), server.http.to_string());
    server.stop();
    let server = Server::start_with(&data, &mqtt, &http, &cfg);
    let done = wait_rotation(&server, &rot, |v| v["job"]["state"] == "succeeded").await;
    assert_eq!(done["selected"], 3, "{done}");
    assert_eq!(done["requested"], 3, "{done}");
    assert_eq!(done["confirmed"], 0, "{done}");
    assert_eq!(done["pending"], 3, "{done}");
    for (id, t) in rotate_commands(&server, &ids).await {
        assert_eq!(t.len(), 1, "{id} asked {} times", t.len());
    }
    // Without an id: the newest rotation.
    let out = server.cli(&["cert", "rotation", "status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains(&rot), "{text}");
    assert!(text.contains("pending    3"), "{text}");
}

#[tokio::test]
async fn an_agent_killed_with_its_renewed_pair_waiting_resumes_with_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let creds = server.create_device("a3", tmp.path());
    let old = copy_creds(&creds, &tmp.path().join("a3-old"));
    let old_serial = current_serial(&server, "a3").await;
    // What a kill right after step 2 leaves: the new key and its certificate in the state dir.
    let state = tmp.path().join("a3-state");
    std::fs::create_dir_all(&state).expect("state");
    let (key, csr) = new_key_and_csr(tmp.path(), "a3-next");
    let mut dev = MqttDevice::connect(&server, &creds, "a3").await;
    dev.subscribe("devices/a3/cert/#").await;
    let (_, accepted) = renew(&mut dev, "a3", &csr).await;
    drop(dev);
    let cert_pem = accepted["certificate_pem"]
        .as_str()
        .expect("pem")
        .to_owned();
    std::fs::copy(&key, state.join("device.next.key")).expect("key");
    std::fs::write(state.join("device.next.crt"), &cert_pem).expect("crt");
    let mut agent = support::agent_command(&server, &creds, &state)
        .args(["--interval-secs", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn mooring-agent");
    let new_serial = wait_serial_change(&server, "a3", &old_serial).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while state.join("device.next.key").exists() || state.join("device.next.crt").exists() {
        assert!(std::time::Instant::now() < deadline, "files not swapped");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(
        std::fs::read_to_string(creds.cert()).expect("crt"),
        cert_pem
    );
    assert_eq!(
        std::fs::read(creds.key()).expect("key"),
        std::fs::read(&key).expect("key")
    );
    let certs = ledger(&server, "a3").await;
    assert!(certs
        .iter()
        .any(|(s, st, _)| *s == new_serial && st == "active"));
    assert!(
        !support::device_can_publish(&server, &old, "a3"),
        "the old certificate still works"
    );
    assert!(support::device_can_publish(&server, &creds, "a3"));
}

#[tokio::test]
async fn renewal_requests_are_rate_limited_per_device() {
    let tmp = tempfile::tempdir().expect("tmp");
    let cfg = support::config_args(tmp.path(), "[provisioning]\nrequests_per_minute_max = 2\n");
    let cfg: Vec<&str> = cfg.iter().map(String::as_str).collect();
    let server = Server::start_with(&tmp.path().join("data"), "127.0.0.1:0", "127.0.0.1:0", &cfg);
    let creds = server.create_device("r4", tmp.path());
    let other = server.create_device("r5", tmp.path());
    let mut dev = MqttDevice::connect(&server, &creds, "r4").await;
    dev.subscribe("devices/r4/cert/#").await;
    let (_, csr) = new_key_and_csr(tmp.path(), "r4-next");
    for _ in 0..2 {
        let (topic, _) = renew(&mut dev, "r4", &csr).await;
        assert_eq!(topic, "devices/r4/cert/accepted");
    }
    let (topic, rejected) = renew(&mut dev, "r4", &csr).await;
    assert_eq!(topic, "devices/r4/cert/rejected", "{rejected}");
    assert_eq!(rejected["code"], "rate_limited");
    // Per device: another one is not held back; nothing more was issued to the first.
    assert_eq!(ledger(&server, "r4").await.len(), 2);
    let mut dev5 = MqttDevice::connect(&server, &other, "r5").await;
    dev5.subscribe("devices/r5/cert/#").await;
    let (_, csr5) = new_key_and_csr(tmp.path(), "r5-next");
    let (topic, _) = renew(&mut dev5, "r5", &csr5).await;
    assert_eq!(topic, "devices/r5/cert/accepted");
}
