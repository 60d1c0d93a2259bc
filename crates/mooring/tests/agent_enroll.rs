//! `mooring-agent enroll` against the real server: a claim token turns into a device whose key
//! was made by the agent, and whose telemetry arrives; enrollment killed after each step
//! resumes to exactly one device and one certificate; a used single-use claim is refused for
//! another key; an enrolled agent never contacts provisioning again.

mod support;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};
use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{Server, BIN, WAIT};

/// Env var of the agent's test hook: park right after the named step.
const HALT_ENV: &str = "MOORING_AGENT_TEST_HALT_AFTER";

/// A claim made through the API: (id, token).
async fn claim(server: &Server, body: Value) -> (String, String) {
    let (status, v) = server.api("POST", "/api/v1/claims", Some(body)).await;
    assert_eq!(status, 201, "{v}");
    let id = v["id"].as_str().expect("claim id").to_owned();
    let token = v["token"].as_str().expect("claim token").to_owned();
    (id, token)
}

/// `mooring-agent enroll` for `server`, state in `state`, proposing `device_id`; telemetry from
/// stdin, exiting once it is drained.
fn enroll_command(server: &Server, state: &Path, token: &str, device_id: &str) -> Command {
    let mut cmd = enroll_command_default_id(server, state, token);
    cmd.args(["--device-id", device_id]);
    cmd
}

/// [`enroll_command`] without `--device-id` (the agent proposes its default).
fn enroll_command_default_id(server: &Server, state: &Path, token: &str) -> Command {
    let bin = Path::new(BIN).with_file_name("mooring-agent");
    assert!(
        bin.exists(),
        "{} not built; run `cargo build -p mooring-agent`",
        bin.display()
    );
    let mut cmd = Command::new(bin);
    cmd.arg("enroll")
        .args(["--server", &server.mqtt.to_string()])
        .arg("--ca")
        .arg(server.data_dir.join("ca.crt"))
        .arg("--state-dir")
        .arg(state)
        .args([
            "--interval-secs",
            "0",
            "--input",
            "-",
            "--exit-when-drained",
        ])
        .env("MOORING_AGENT_CLAIM", token)
        .env("RUST_LOG", "info")
        .env_remove(HALT_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Starts the agent with the test hook parking it after `step`, waits until it says so, and
/// kills it with SIGKILL.
fn kill_after(mut cmd: Command, step: &str) {
    let mut child: Child = cmd.env(HALT_ENV, step).spawn().expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) if line.contains("halted after this step") => break,
            Ok(line) => seen.push(line),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "agent never halted after {step}; stderr:\n{}",
                    seen.join("\n")
                );
            }
        }
    }
    child.kill().expect("kill -9");
    let _ = child.wait();
}

fn points(v: &Value) -> Vec<f64> {
    v["points"]
        .as_array()
        .map(|p| p.iter().filter_map(|x| x["value"].as_f64()).collect())
        .unwrap_or_default()
}

/// SHA-256 (hex) of the certificate in a PEM file.
fn cert_sha256(path: &Path) -> String {
    let der = CertificateDer::from_pem_file(path).expect("certificate PEM");
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der.as_ref()))
}

fn state(tmp: &Path, name: &str) -> PathBuf {
    tmp.join(name)
}

/// The device exists once, pinned to the certificate the agent holds, and (where the server
/// keeps a certificate ledger) has exactly one certificate.
async fn assert_one_device_one_cert(server: &Server, id: &str, state: &Path) {
    let (status, d) = server
        .api("GET", &format!("/api/v1/devices/{id}"), None)
        .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(
        d["cert_sha256"].as_str().map(str::to_ascii_lowercase),
        Some(cert_sha256(&state.join("device.crt"))),
        "the device is pinned to the agent's certificate: {d}"
    );
    let (status, certs) = server
        .api("GET", &format!("/api/v1/devices/{id}/certificates"), None)
        .await;
    if status == 200 {
        let n = certs["certificates"]
            .as_array()
            .or(certs.as_array())
            .map_or(0, Vec::len);
        assert_eq!(n, 1, "one certificate: {certs}");
    }
}

#[tokio::test]
async fn agent_enrolls_with_a_claim_and_its_telemetry_arrives_and_never_asks_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let (claim_id, token) = claim(&server, json!({"tags": {"site": "lab"}})).await;
    let st = state(tmp.path(), "pump-1");

    let (status, err) = support::run_agent_to_end(
        enroll_command(&server, &st, &token, "pump-1"),
        &[r#"{"n":1}"#, r#"{"n":2}"#],
    );
    assert!(status.success(), "{status}: {err}");
    let v = server
        .wait_for("/api/v1/devices/pump-1/telemetry?metric=n", |v| {
            points(v).len() == 2
        })
        .await;
    assert_eq!(points(&v), [1.0, 2.0]);
    let (_, d) = server.api("GET", "/api/v1/devices/pump-1", None).await;
    assert_eq!(d["tags"]["site"], "lab", "the claim's tags: {d}");
    assert_one_device_one_cert(&server, "pump-1", &st).await;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(st.join("device.key"))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the key is private");
    }

    // Revoke the claim: an agent that went back to provisioning would now be refused. An
    // enrolled one just runs.
    let (status, v) = server
        .api("DELETE", &format!("/api/v1/claims/{claim_id}"), None)
        .await;
    assert!((200..300).contains(&status), "{status} {v}");
    let cert_before = std::fs::read(st.join("device.crt")).expect("cert");
    let (status, err) = support::run_agent_to_end(
        enroll_command(&server, &st, &token, "pump-1"),
        &[r#"{"n":3}"#],
    );
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("already enrolled"), "{err}");
    assert!(!err.contains("enrollment request sent"), "{err}");
    server
        .wait_for("/api/v1/devices/pump-1/telemetry?metric=n", |v| {
            points(v).len() == 3
        })
        .await;
    assert_eq!(
        std::fs::read(st.join("device.crt")).expect("cert"),
        cert_before
    );
}

#[tokio::test]
async fn enrollment_killed_after_each_step_resumes_to_one_device_and_one_certificate() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    // key: the key is on disk; request: the CSR too; sent: the server has the request (and
    // has answered it: the answer is lost with the killed agent).
    for (n, step) in ["key", "request", "sent"].into_iter().enumerate() {
        let (claim_id, token) = claim(&server, json!({})).await;
        let id = format!("resume-{step}");
        let st = state(tmp.path(), &id);
        kill_after(enroll_command(&server, &st, &token, &id), step);
        assert!(!st.join("device.crt").exists(), "{step}: not enrolled yet");
        let key = std::fs::read(st.join("device.key")).expect("key kept");

        let line = format!(r#"{{"n":{n}}}"#);
        let (status, err) =
            support::run_agent_to_end(enroll_command(&server, &st, &token, &id), &[&line]);
        assert!(status.success(), "{step}: {status}: {err}");
        assert_eq!(
            std::fs::read(st.join("device.key")).expect("key"),
            key,
            "{step}: the same key"
        );
        server
            .wait_for(&format!("/api/v1/devices/{id}/telemetry?metric=n"), |v| {
                points(v).len() == 1
            })
            .await;
        assert_one_device_one_cert(&server, &id, &st).await;
        let (_, c) = server
            .api("GET", &format!("/api/v1/claims/{claim_id}"), None)
            .await;
        assert_eq!(c["uses"], 1, "{step}: one use of the claim: {c}");
    }
    let (_, list) = server.api("GET", "/api/v1/devices", None).await;
    assert_eq!(
        list["devices"].as_array().map(Vec::len),
        Some(3),
        "one device per enrollment: {list}"
    );
}

/// The answer lost, then the claim revoked (or expired) before the agent came back: the agent
/// still finishes, with the certificate issued to it; a new key under that claim is refused.
#[tokio::test]
async fn an_agent_whose_answer_was_lost_finishes_after_its_claim_was_revoked() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let (claim_id, token) = claim(&server, json!({"count": 2})).await;
    let st = state(tmp.path(), "late-1");
    kill_after(enroll_command(&server, &st, &token, "late-1"), "sent");
    assert!(!st.join("device.crt").exists());
    let (status, c) = server
        .api("DELETE", &format!("/api/v1/claims/{claim_id}"), None)
        .await;
    assert_eq!(status, 200, "{c}");
    let (status, err) = support::run_agent_to_end(
        enroll_command(&server, &st, &token, "late-1"),
        &[r#"{"n":1}"#],
    );
    assert!(status.success(), "{status}: {err}");
    server
        .wait_for("/api/v1/devices/late-1/telemetry?metric=n", |v| {
            points(v).len() == 1
        })
        .await;
    assert_one_device_one_cert(&server, "late-1", &st).await;
    // Another device (another key) under the revoked claim: refused, final, nothing created.
    let other = state(tmp.path(), "late-2");
    let (status, err) =
        support::run_agent_to_end(enroll_command(&server, &other, &token, "late-2"), &[]);
    assert!(!status.success());
    assert!(err.contains("claim_invalid"), "{err}");
    let (status, _) = server.api("GET", "/api/v1/devices/late-2", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_used_single_use_claim_is_refused_for_another_key_with_a_clear_message() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let (_, token) = claim(&server, json!({})).await;
    let (status, err) = support::run_agent_to_end(
        enroll_command(&server, &state(tmp.path(), "a"), &token, "first-1"),
        &[r#"{"n":1}"#],
    );
    assert!(status.success(), "{status}: {err}");

    // Another agent (another state dir, so another key) with the same token.
    let second = state(tmp.path(), "b");
    let (status, err) = support::run_agent_to_end(
        enroll_command(&server, &second, &token, "second-1"),
        &[r#"{"n":1}"#],
    );
    assert_eq!(status.code(), Some(3), "refused: {err}");
    assert!(
        err.contains("enrollment refused: claim_used"),
        "a clear reason: {err}"
    );
    assert!(!second.join("device.crt").exists());
    let (status, _) = server.api("GET", "/api/v1/devices/second-1", None).await;
    assert_eq!(status, 404, "nothing was created");
    let (_, list) = server.api("GET", "/api/v1/devices", None).await;
    assert_eq!(list["devices"].as_array().map(Vec::len), Some(1), "{list}");
}

#[tokio::test]
async fn enrollment_killed_at_random_points_ends_enrolled_exactly_once() {
    use rand::{Rng as _, SeedableRng as _};
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let (claim_id, token) = claim(&server, json!({})).await;
    let st = state(tmp.path(), "rnd");
    let seed: u64 = rand::random();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..6 {
        let mut child = enroll_command(&server, &st, &token, "rnd-1")
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        // Not a wait for readiness: a random point of the pipeline to kill it at.
        std::thread::sleep(Duration::from_millis(rng.random_range(0..400)));
        child.kill().expect("kill -9");
        let _ = child.wait();
    }
    let (status, err) = support::run_agent_to_end(
        enroll_command(&server, &st, &token, "rnd-1"),
        &[r#"{"n":7}"#],
    );
    assert!(status.success(), "seed {seed}: {status}: {err}");
    server
        .wait_for("/api/v1/devices/rnd-1/telemetry?metric=n", |v| {
            points(v).len() == 1
        })
        .await;
    assert_one_device_one_cert(&server, "rnd-1", &st).await;
    let (_, c) = server
        .api("GET", &format!("/api/v1/claims/{claim_id}"), None)
        .await;
    assert_eq!(c["uses"], 1, "seed {seed}: one use of the claim: {c}");
}

#[tokio::test]
async fn a_claim_that_assigns_ids_names_the_device_and_the_agent_runs_as_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let (_, token) = claim(&server, json!({"assign_ids": true})).await;
    let st = state(tmp.path(), "assigned");
    // No --device-id: whatever the agent proposes (machine serial or nothing), the server names it.
    let (status, err) = support::run_agent_to_end(
        enroll_command_default_id(&server, &st, &token),
        &[r#"{"n":5}"#],
    );
    assert!(status.success(), "{status}: {err}");
    let (_, list) = server.api("GET", "/api/v1/devices", None).await;
    let devices = list["devices"].as_array().expect("devices");
    assert_eq!(devices.len(), 1, "{list}");
    let id = devices[0]["id"].as_str().expect("id").to_owned();
    server
        .wait_for(&format!("/api/v1/devices/{id}/telemetry?metric=n"), |v| {
            points(v).len() == 1
        })
        .await;
    assert_one_device_one_cert(&server, &id, &st).await;
}

#[tokio::test]
async fn an_unknown_token_is_refused_at_connect_and_nothing_is_retried() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let st = state(tmp.path(), "x");
    let (status, err) = support::run_agent_to_end(
        enroll_command(&server, &st, "mct_not-a-real-token", "x-1"),
        &[],
    );
    assert_eq!(status.code(), Some(3), "{err}");
    assert!(
        err.contains("the claim token is unknown, expired or revoked"),
        "a clear reason: {err}"
    );
    assert!(!st.join("device.crt").exists());
    let (status, _) = server.api("GET", "/api/v1/devices/x-1", None).await;
    assert_eq!(status, 404);
}
