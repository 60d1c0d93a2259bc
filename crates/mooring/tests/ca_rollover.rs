//! Fleet CA rollover (issue 16) against the real binary and the real agent: `mooring ca
//! rotate-fleet` adds a new fleet CA (both trusted), a throttled rotation moves running agents to
//! certificates from it (they store the new trust bundle), `rotate-fleet retire` is refused
//! while a device still holds a certificate from the previous CA, and with `--force` revokes it,
//! presents a server certificate from the new CA and stops trusting the previous one.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};
use support::{Creds, Server};

/// The CA certificates of a PEM bundle, as PEM blocks.
fn pem_blocks(pem: &str) -> Vec<String> {
    pem.split_inclusive("-----END CERTIFICATE-----\n")
        .filter(|b| b.contains("BEGIN CERTIFICATE"))
        .map(|b| b.trim_start().to_owned())
        .collect()
}

/// `creds` with `ca` as the CA file, in `dir`.
fn creds_trusting(creds: &Creds, dir: &Path, ca: &str) -> Creds {
    std::fs::create_dir_all(dir).expect("dir");
    for f in ["device.crt", "device.key"] {
        std::fs::copy(creds.dir.join(f), dir.join(f)).expect("copy");
    }
    std::fs::write(dir.join("ca.crt"), ca).expect("ca");
    Creds {
        dir: dir.to_owned(),
    }
}

async fn serial(server: &Server, id: &str) -> String {
    let (status, v) = server
        .api("GET", &format!("/api/v1/devices/{id}"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    v["cert_serial"].as_str().expect("serial").to_owned()
}

fn spawn_agent(server: &Server, creds: &Creds, state: &Path) -> std::process::Child {
    support::agent_command(server, creds, state)
        .args(["--interval-secs", "1"])
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn mooring-agent")
}

#[tokio::test]
async fn a_fleet_ca_rollover_moves_agents_to_the_new_ca_then_retires_the_previous_one() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let old_ca = std::fs::read_to_string(data.join("ca.crt")).expect("ca.crt");
    let status = server.cli_json(&["ca", "rotate-fleet", "status", "--output", "json"]);
    assert_eq!(status["rolling_over"], false, "{status}");

    // "ra" runs the agent; "rb" is registered but never comes online.
    let a = server.create_device("ra", tmp.path());
    let b = server.create_device("rb", tmp.path());
    let (a_serial, b_serial) = (serial(&server, "ra").await, serial(&server, "rb").await);
    let a_cert_before = std::fs::read_to_string(a.cert()).expect("cert");
    let state = tmp.path().join("ra-state");
    let mut agent = spawn_agent(&server, &a, &state);
    server
        .wait_for("/api/v1/devices/ra", |v| v["online"] == true)
        .await;

    // Begin: both CAs trusted, the new one issues, a rotation moves the devices.
    let begun = server.cli_json(&[
        "ca",
        "rotate-fleet",
        "--max-per-minute",
        "600",
        "--output",
        "json",
    ]);
    assert_eq!(begun["rolling_over"], true, "{begun}");
    assert_eq!(begun["previous_certificates"], 2, "{begun}");
    let rotation = begun["rotation_id"].as_str().expect("rotation").to_owned();
    let bundle = begun["ca_pem"].as_str().expect("ca_pem").to_owned();
    let blocks = pem_blocks(&bundle);
    assert_eq!(blocks.len(), 2, "{bundle}");
    assert_eq!(blocks[0], old_ca, "the previous CA comes first");
    let new_ca = blocks[1].clone();
    // A second rollover while this one runs is refused, with a reason.
    let out = server.cli(&["ca", "rotate-fleet"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in progress"), "{err}");
    // Every answer that carries the fleet's trust bundle carries both CAs.
    let (st, v) = server.api("GET", "/api/v1/cas/fleet", None).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["ca_pem"], bundle.as_str());

    // The running agent renews onto the new CA; the offline one stays behind.
    let status = server
        .wait_for("/api/v1/cas/fleet", |v| v["previous_certificates"] == 1)
        .await;
    assert_eq!(status["rotation_id"], rotation.as_str(), "{status}");
    assert_ne!(serial(&server, "ra").await, a_serial);
    assert_eq!(serial(&server, "rb").await, b_serial);
    let trust = std::fs::read_to_string(state.join("trust.crt")).expect("the agent's trust.crt");
    assert_eq!(pem_blocks(&trust), blocks, "the agent stored the bundle");
    // Wait for the agent's file swap (after its CONNACK with the new certificate).
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(a.cert()).expect("cert") == a_cert_before
        || state.join("device.next.key").exists()
    {
        assert!(Instant::now() < deadline, "files not swapped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let only_new = creds_trusting(&a, &tmp.path().join("ra-new"), &new_ca);
    let only_old = creds_trusting(&a, &tmp.path().join("ra-old"), &old_ca);
    assert!(
        support::device_can_publish(&server, &only_old, "ra"),
        "during the overlap the server certificate is still the previous CA's"
    );

    // Retire: refused while "rb" holds a live certificate from the previous CA.
    let out = server.cli(&["ca", "rotate-fleet", "retire"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1 device certificate(s) from the previous fleet CA"),
        "{err}"
    );
    let (_, still) = server.api("GET", "/api/v1/cas/fleet", None).await;
    assert_eq!(still["rolling_over"], true, "nothing changed: {still}");
    // Forced: rb's certificate is revoked, one CA is left, the server's certificate is new.
    let retired = server.cli_json(&[
        "ca",
        "rotate-fleet",
        "retire",
        "--force",
        "--output",
        "json",
    ]);
    assert_eq!(retired["revoked"], 1, "{retired}");
    assert_eq!(retired["fleet"]["rolling_over"], false, "{retired}");
    assert_eq!(retired["fleet"]["ca_pem"], new_ca.as_str());
    assert_eq!(
        std::fs::read_to_string(data.join("ca.crt")).expect("ca.crt"),
        new_ca
    );
    let (_, certs) = server
        .api("GET", "/api/v1/devices/rb/certificates", None)
        .await;
    assert_eq!(certs["certificates"][0]["state"], "revoked", "{certs}");
    assert_eq!(certs["certificates"][0]["revoke_reason"], "ca_retired");
    assert!(!support::device_can_publish(&server, &b, "rb"));
    // The agent stops first: connected as `ra`, it would take the session back from the
    // checks below (and they from it) mid-publish.
    let _ = agent.kill();
    let _ = agent.wait();
    // A client trusting only the previous CA no longer accepts the server; the new CA does.
    assert!(!support::device_can_publish(&server, &only_old, "ra"));
    assert!(support::device_can_publish(&server, &only_new, "ra"));

    // The agent, restarted, connects with its trust bundle (its --ca file is the old CA).
    server
        .wait_for("/api/v1/devices/ra", |v| v["online"] == false)
        .await;
    let mut agent = spawn_agent(&server, &a, &state);
    server
        .wait_for("/api/v1/devices/ra", |v| v["online"] == true)
        .await;
    let _ = agent.kill();
    let _ = agent.wait();
    // Nothing left to retire.
    let out = server.cli(&["ca", "rotate-fleet", "retire"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no fleet CA rollover"), "{err}");
}

/// Over an HTTPS API (`--http-tls`), the CLI trusts the data dir's `ca.crt`: after retirement
/// that is the new CA, and the listener presents a certificate from it without a restart.
#[tokio::test]
async fn the_https_api_presents_the_new_server_certificate_after_retirement() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &["--http-tls"]);
    let url = format!("https://localhost:{}", server.http.port());
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(support::BIN)
            .args(args)
            .args(["--server", &url, "--data-dir"])
            .arg(&data)
            .env_remove("MOORING_TOKEN")
            .output()
            .expect("cli");
        assert!(
            out.status.success(),
            "mooring {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let old_ca = std::fs::read_to_string(data.join("ca.crt")).expect("ca.crt");
    cli(&["ca", "rotate-fleet", "--no-rotation"]);
    let text = cli(&["ca", "rotate-fleet", "retire"]);
    assert!(text.contains("retired"), "{text}");
    assert_ne!(
        std::fs::read_to_string(data.join("ca.crt")).expect("ca.crt"),
        old_ca
    );
    // The CLI now trusts only the new CA; the listener answers with a certificate from it.
    let text = cli(&["ca", "rotate-fleet", "status"]);
    assert!(text.contains("rolling_over"), "{text}");
    assert!(text.contains("false"), "{text}");
}
