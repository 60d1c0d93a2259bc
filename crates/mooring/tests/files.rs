//! Files on disk: `device create --out` never follows a planted symbolic link nor truncates a
//! file, and the server keeps its data dir private (0700, files 0600) whatever the umask.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use support::{MqttDevice, Server};

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .expect("metadata")
        .permissions()
        .mode()
        & 0o7777
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn device_create_refuses_planted_symlinks_and_existing_files() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, "victim contents").expect("victim");
    let attacker_key = tmp.path().join("attacker-chosen.key");

    // device.crt -> a victim file, device.key -> a path the attacker will read.
    let out = tmp.path().join("planted");
    std::fs::create_dir(&out).expect("out dir");
    std::os::unix::fs::symlink(&victim, out.join("device.crt")).expect("symlink");
    std::os::unix::fs::symlink(&attacker_key, out.join("device.key")).expect("symlink");
    let run = server.cli(&[
        "device",
        "create",
        "d1",
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    assert!(stderr(&run).contains("device.key"), "{}", stderr(&run));
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "victim contents"
    );
    assert!(
        !attacker_key.exists(),
        "a private key was written through the symlink"
    );
    let (status, _) = server.api("GET", "/api/v1/devices/d1", None).await;
    assert_eq!(status, 404, "a refused write leaves no device behind");

    // Only the certificate planted: named in the error, the victim untouched.
    let out = tmp.path().join("planted-crt");
    std::fs::create_dir(&out).expect("out dir");
    std::os::unix::fs::symlink(&victim, out.join("device.crt")).expect("symlink");
    let run = server.cli(&[
        "device",
        "create",
        "d1",
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    assert!(stderr(&run).contains("device.crt"), "{}", stderr(&run));
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "victim contents"
    );
    assert!(
        !out.join("device.key").exists(),
        "files created before the refusal are removed"
    );

    // An existing regular file is not truncated.
    let out = tmp.path().join("existing");
    std::fs::create_dir(&out).expect("out dir");
    std::fs::write(out.join("ca.crt"), "keep me").expect("ca.crt");
    let run = server.cli(&[
        "device",
        "create",
        "d1",
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    assert!(stderr(&run).contains("ca.crt"), "{}", stderr(&run));
    assert_eq!(
        std::fs::read_to_string(out.join("ca.crt")).expect("ca.crt"),
        "keep me"
    );

    // The output directory itself is a symbolic link.
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("dir");
    let out = tmp.path().join("linked-dir");
    std::os::unix::fs::symlink(&elsewhere, &out).expect("symlink");
    let run = server.cli(&[
        "device",
        "create",
        "d1",
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    assert!(stderr(&run).contains("linked-dir"), "{}", stderr(&run));
    assert_eq!(std::fs::read_dir(&elsewhere).expect("dir").count(), 0);

    // Nothing was created on the server along the way; a clean directory works.
    let (status, _) = server.api("GET", "/api/v1/devices/d1", None).await;
    assert_eq!(status, 404);
    let creds = server.create_device("d1", tmp.path());
    assert_eq!(mode(&creds.key()), 0o600);
}

#[tokio::test]
async fn device_key_is_0600_at_creation_whatever_the_umask() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let out = tmp.path().join("k1");
    let run = std::process::Command::new("sh")
        .args(["-c", "umask 000 && exec \"$@\"", "sh", support::BIN])
        .args([
            "device",
            "create",
            "k1",
            "--out",
            out.to_str().expect("utf8"),
        ])
        .args(["--server", &server.url(), "--token", &server.token])
        .output()
        .expect("cli");
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(mode(&out.join("device.key")), 0o600);
    assert_eq!(mode(&out.join("device.crt")), 0o644);
}

#[tokio::test]
async fn data_dir_is_private_whoever_created_it() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).expect("data dir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let server = Server::start_after_shell(&data, "umask 022", &[]);
    let creds = server.create_device("d1", tmp.path());
    let mut device = MqttDevice::connect(&server, &creds, "d1").await;
    device
        .publish("devices/d1/telemetry", r#"{"seq":1,"n":1}"#)
        .await;
    server
        .wait_for("/api/v1/devices/d1/telemetry?metric=n", |v| {
            v["points"].as_array().is_some_and(|p| !p.is_empty())
        })
        .await;

    assert_eq!(mode(&data), 0o700, "the data dir");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&data).expect("read data dir") {
        let entry = entry.expect("entry");
        names.push(entry.file_name().to_string_lossy().into_owned());
        assert_eq!(mode(&entry.path()), 0o600, "{}", entry.path().display());
    }
    for expected in [
        "mooring.db",
        "mooring.db-wal",
        "mooring.db-shm",
        "ca.key",
        "admin.token",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} in {names:?}"
        );
    }
}
