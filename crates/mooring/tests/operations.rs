//! Operating the server: `mooring backup` / `restore` while it runs, a data dir from a newer
//! Mooring refused at start, busy ports naming their flag, no rustls SNI warning in the log.

mod support;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::{device_pub, get, Server, BIN, WAIT};

/// Runs `mooring` with `args` (no server flags added) and returns its output.
fn mooring(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("MOORING_DATA_DIR")
        .output()
        .expect("run mooring")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o777
}

/// Runs `mooring serve` with `args`, expecting it to fail at start; returns its output once it
/// exited (bounded by [`WAIT`]: a server that starts instead is killed and the test fails).
fn serve_expecting_failure(args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("MOORING_DATA_DIR")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mooring serve");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("mooring serve did not exit: {}", text(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[tokio::test]
async fn backup_of_a_running_server_restores_into_a_new_server_with_its_devices_and_telemetry() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let creds = server.create_device("lock-1", tmp.path());
    device_pub(
        &server,
        &creds,
        "lock-1",
        "devices/lock-1/telemetry",
        r#"{"temp": 21.5, "battery": {"v": 3.7}}"#,
    );

    // While the server runs (its last writes are in the WAL).
    let backup = tmp.path().join("backup.tar");
    let out = mooring(&[
        "backup",
        "--data-dir",
        data.to_str().expect("utf8"),
        "--out",
        backup.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "backup: {}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("backed up") && said.contains("backup.tar"),
        "the CLI says what it wrote: {said}"
    );
    assert_eq!(mode(&backup), 0o600, "the backup holds the CA key: private");

    // A second backup never overwrites the first.
    let again = mooring(&[
        "backup",
        "--data-dir",
        data.to_str().expect("utf8"),
        "--out",
        backup.to_str().expect("utf8"),
    ]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr).contains("exists"),
        "{}",
        text(&again.stderr)
    );

    // Writes after the backup are not in it.
    device_pub(
        &server,
        &creds,
        "lock-1",
        "devices/lock-1/telemetry",
        r#"{"temp": 30.0}"#,
    );
    let old_token = server.token.clone();
    server.stop();

    let restored = tmp.path().join("restored");
    let out = mooring(&[
        "restore",
        "--from",
        backup.to_str().expect("utf8"),
        "--data-dir",
        restored.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "restore: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("restored"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(mode(&restored), 0o700);
    for file in [
        "ca.crt",
        "ca.key",
        "server.crt",
        "server.key",
        "admin.token",
        "mooring.db",
    ] {
        assert_eq!(mode(&restored.join(file)), 0o600, "{file}");
    }

    let server = Server::start(&restored);
    assert_eq!(server.token, old_token, "the admin token came back");
    let (status, device) = server.api("GET", "/api/v1/devices/lock-1", None).await;
    assert_eq!(status, 200, "{device}");
    assert_eq!(device["id"], "lock-1");
    let (status, body) = server
        .api("GET", "/api/v1/devices/lock-1/telemetry?metric=temp", None)
        .await;
    assert_eq!(status, 200, "{body}");
    let values: Vec<f64> = body["points"]
        .as_array()
        .expect("points")
        .iter()
        .filter_map(|p| p["value"].as_f64())
        .collect();
    assert_eq!(values, vec![21.5], "the point from before the backup, only");
    let (_, latest) = server
        .api("GET", "/api/v1/devices/lock-1/telemetry/latest", None)
        .await;
    assert_eq!(latest["metrics"]["battery.v"]["value"], 3.7);

    // The fleet CA and the device's pinned certificate came back: it connects with its old
    // credentials, and what it sends is stored.
    device_pub(
        &server,
        &creds,
        "lock-1",
        "devices/lock-1/telemetry",
        r#"{"temp": 22.0}"#,
    );
    server
        .wait_for("/api/v1/devices/lock-1/telemetry?metric=temp", |v| {
            v["points"].as_array().is_some_and(|p| p.len() == 2)
        })
        .await;
}

#[test]
fn backup_and_restore_refuse_what_they_cannot_do_safely() {
    let tmp = tempfile::tempdir().expect("tmp");
    let path = |name: &str| tmp.path().join(name).to_str().expect("utf8").to_owned();

    // Not a data dir.
    std::fs::create_dir(tmp.path().join("empty")).expect("mkdir");
    let out = mooring(&[
        "backup",
        "--data-dir",
        &path("empty"),
        "--out",
        &path("b.tar"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("is not a Mooring data directory"),
        "{}",
        text(&out.stderr)
    );
    assert!(!tmp.path().join("b.tar").exists());

    // Not a backup.
    std::fs::write(tmp.path().join("junk.tar"), b"not a tar archive at all").expect("write");
    let out = mooring(&[
        "restore",
        "--from",
        &path("junk.tar"),
        "--data-dir",
        &path("r1"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("is not a Mooring backup"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !tmp.path().join("r1").exists(),
        "a failed restore leaves nothing"
    );

    // An archive whose entry would land outside the data dir.
    let mut evil = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    let name = b"../evil";
    header.as_gnu_mut().expect("gnu").name[..name.len()].copy_from_slice(name);
    header.set_size(3);
    header.set_mode(0o600);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    evil.append(&header, &b"bad"[..]).expect("append");
    std::fs::write(tmp.path().join("evil.tar"), evil.into_inner().expect("tar")).expect("write");
    std::fs::create_dir(tmp.path().join("inner")).expect("mkdir");
    let target = tmp.path().join("inner").join("r2");
    let out = mooring(&[
        "restore",
        "--from",
        &path("evil.tar"),
        "--data-dir",
        target.to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("unexpected entry ../evil"),
        "{}",
        text(&out.stderr)
    );
    assert!(!tmp.path().join("evil").exists());
    assert!(!target.exists());

    // Never into a data dir that holds something.
    std::fs::create_dir(tmp.path().join("full")).expect("mkdir");
    std::fs::write(tmp.path().join("full").join("mooring.db"), b"live").expect("write");
    let out = mooring(&[
        "restore",
        "--from",
        &path("evil.tar"),
        "--data-dir",
        &path("full"),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("is not empty"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read(tmp.path().join("full").join("mooring.db")).expect("read"),
        b"live"
    );
}

#[test]
fn a_data_dir_from_a_newer_mooring_is_refused_at_start_naming_both_schema_versions() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    Server::start(&data).stop();
    let known = mooring_store::sqlite::schema_version();
    let newer = known + 1;
    {
        let conn = rusqlite::Connection::open(data.join("mooring.db")).expect("open");
        conn.pragma_update(None, "user_version", newer)
            .expect("bump the schema version");
    }
    let out = serve_expecting_failure(&[
        "--data-dir",
        data.to_str().expect("utf8"),
        "--mqtt-addr",
        "127.0.0.1:0",
        "--http-addr",
        "127.0.0.1:0",
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "database schema version {newer} was written by a newer Mooring"
        )) && stderr.contains(&format!("knows schema versions up to {known}"))
            && stderr.contains("never downgrades"),
        "{stderr}"
    );
    // Nothing was changed: the version is still the newer one.
    let conn = rusqlite::Connection::open(data.join("mooring.db")).expect("open");
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .expect("version");
    assert_eq!(version, newer);
}

#[test]
fn a_busy_port_error_names_the_flag_that_moves_the_listener() {
    let tmp = tempfile::tempdir().expect("tmp");
    let busy = TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy_addr = busy.local_addr().expect("addr").to_string();
    for flag in ["--mqtt-addr", "--http-addr", "--mqtt-dev-addr"] {
        let mut args = vec![
            "--data-dir".to_owned(),
            tmp.path().join("data").display().to_string(),
        ];
        for other in ["--mqtt-addr", "--http-addr"] {
            if other != flag {
                args.extend([other.to_owned(), "127.0.0.1:0".to_owned()]);
            }
        }
        args.extend([flag.to_owned(), busy_addr.clone()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = serve_expecting_failure(&args);
        assert!(!out.status.success(), "{flag}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains(&format!(
                "on {busy_addr}; choose another address with {flag}"
            )) && stderr.contains("in use"),
            "{flag}: {stderr}"
        );
    }
}

#[tokio::test]
async fn the_node_id_names_the_node_in_healthz_and_metrics_and_a_bad_one_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start_with(
        &tmp.path().join("data"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &["--node-id", "node-a.eu_1"],
    );
    let health: serde_json::Value = get(format!("{}/healthz", server.url()))
        .await
        .json()
        .await
        .expect("json");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["node"], "node-a.eu_1");
    assert_eq!(
        server
            .metric("mooring_node_info{node=\"node-a.eu_1\"}")
            .await,
        1.0
    );
    drop(server);
    for bad in ["a b", "", "x\"y", &"n".repeat(65)] {
        let out = serve_expecting_failure(&[
            "--data-dir",
            &tmp.path().join("data2").display().to_string(),
            "--mqtt-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--node-id",
            bad,
        ]);
        assert!(!out.status.success(), "{bad:?}");
        assert!(
            text(&out.stderr).contains("--node-id") && text(&out.stderr).contains("refused"),
            "{bad:?}: {}",
            text(&out.stderr)
        );
    }
}

/// Sends SIGHUP and waits for the server's answer in its log: every line logged before it (the
/// TLS handshakes of earlier connections) has then been read.
fn log_barrier(server: &Server) {
    let status = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    server.wait_log("SIGHUP: no --config file");
}

#[test]
fn a_device_connecting_to_127_0_0_1_leaves_no_rustls_sni_warning_in_the_log() {
    let tmp = tempfile::tempdir().expect("tmp");
    // The harness runs the server with RUST_LOG=info.
    let server = Server::start(&tmp.path().join("data"));
    let creds = server.create_device("lock-1", tmp.path());
    assert_eq!(server.mqtt.ip().to_string(), "127.0.0.1");
    device_pub(
        &server,
        &creds,
        "lock-1",
        "devices/lock-1/telemetry",
        r#"{"temp": 1}"#,
    );
    log_barrier(&server);
    assert!(
        !server.log_text().contains("Illegal SNI"),
        "{}",
        server.log_text()
    );
    server.stop();

    // Naming rustls in RUST_LOG brings its warnings back (and shows this test would see one).
    let data = tmp.path().join("data");
    let server = Server::start_custom(&data, |cmd| {
        cmd.arg("--data-dir")
            .arg(&data)
            .args(["--mqtt-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .args(["--mqtt-dev-addr", "127.0.0.1:0"])
            .env("RUST_LOG", "info,rustls=warn");
    });
    device_pub(
        &server,
        &creds,
        "lock-1",
        "devices/lock-1/telemetry",
        r#"{"temp": 2}"#,
    );
    log_barrier(&server);
    assert!(
        server.log_text().contains("Illegal SNI"),
        "{}",
        server.log_text()
    );
}
