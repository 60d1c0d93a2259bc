//! The agent's device key behind PKCS#11, with SoftHSM2 as the token (Debian `softhsm2`; CI
//! installs it): `mooring-agent enroll --key pkcs11:...` makes the key inside the token, never
//! extractable, enrolls with a CSR the token signed, connects over mTLS signing in the token,
//! its telemetry arrives, and no key file is written; a forced rotation makes the new key in the
//! token too and swaps it in under the same label; a wrong PIN or an unknown token is a clear
//! error and a failing exit.

mod support;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::{Server, BIN};

/// Where Debian's softhsm2 puts its PKCS#11 module.
const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const PIN: &str = "1234";
const SO_PIN: &str = "5678";
/// The marker of a token key swap in progress (the agent's `rotate::PROMOTING_FILE`).
const PROMOTING_FILE: &str = "rotate.promoting";
/// How long an agent run may take.
const RUN_MAX: Duration = Duration::from_secs(60);

/// A SoftHSM2 configuration with its own token dir under `dir`, and a token `label` in it.
/// Fails (never skips) when softhsm2 is missing.
fn softhsm(dir: &Path, label: &str) -> PathBuf {
    assert!(
        Path::new(MODULE).exists(),
        "{MODULE} is missing: install softhsm2 (`apt-get install softhsm2`) to run tests/pkcs11.rs"
    );
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens).expect("token dir");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )
    .expect("softhsm2.conf");
    let out = Command::new("softhsm2-util")
        .args([
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            PIN,
            "--so-pin",
            SO_PIN,
        ])
        .env("SOFTHSM2_CONF", &conf)
        .output()
        .unwrap_or_else(|e| {
            panic!("softhsm2-util: {e}: install softhsm2 (`apt-get install softhsm2`)")
        });
    assert!(
        out.status.success(),
        "softhsm2-util --init-token: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    conf
}

fn uri(token: &str, pin: &str) -> String {
    format!("pkcs11:token={token};object=device?module-path={MODULE}&pin-value={pin}")
}

fn agent_bin() -> PathBuf {
    let bin = Path::new(BIN).with_file_name("mooring-agent");
    assert!(
        bin.exists(),
        "{} not built; run `cargo build -p mooring-agent`",
        bin.display()
    );
    bin
}

/// `mooring-agent enroll --key <key>` as `id`, telemetry from stdin, exiting once drained.
fn enroll_command(server: &Server, conf: &Path, state: &Path, token: &str, key: &str) -> Command {
    let mut cmd = Command::new(agent_bin());
    cmd.arg("enroll")
        .args(["--server", &server.mqtt.to_string()])
        .arg("--ca")
        .arg(server.data_dir.join("ca.crt"))
        .arg("--state-dir")
        .arg(state)
        .args(["--device-id", "hsm-1", "--key", key])
        .args([
            "--interval-secs",
            "0",
            "--input",
            "-",
            "--exit-when-drained",
        ])
        .env("MOORING_AGENT_CLAIM", token)
        .env("SOFTHSM2_CONF", conf)
        .env("RUST_LOG", "info");
    cmd
}

/// The flat invocation with the enrolled certificate and `key`.
fn run_command(server: &Server, conf: &Path, state: &Path, key: &str) -> Command {
    let mut cmd = Command::new(agent_bin());
    cmd.args(["--server", &server.mqtt.to_string()])
        .arg("--cert")
        .arg(state.join("device.crt"))
        .args(["--key", key])
        .arg("--ca")
        .arg(state.join("ca.crt"))
        .arg("--state-dir")
        .arg(state)
        .env("SOFTHSM2_CONF", conf)
        .env("RUST_LOG", "info");
    cmd
}

async fn points(server: &Server, n: usize) -> Vec<f64> {
    let v = server
        .wait_for("/api/v1/devices/hsm-1/telemetry?metric=n", |v| {
            v["points"].as_array().is_some_and(|p| p.len() == n)
        })
        .await;
    v["points"]
        .as_array()
        .map(|p| p.iter().filter_map(|x| x["value"].as_f64()).collect())
        .unwrap_or_default()
}

async fn current_serial(server: &Server) -> String {
    let (status, v) = server.api("GET", "/api/v1/devices/hsm-1", None).await;
    assert_eq!(status, 200, "{v}");
    v["cert_serial"].as_str().expect("cert_serial").to_owned()
}

/// What the token itself says of the private key labelled `device`: (CKA_SENSITIVE,
/// CKA_EXTRACTABLE, CKA_NEVER_EXTRACTABLE, CKA_VALUE readable, number of such keys, number of
/// key objects labelled `device.next`).
fn token_key_protection(conf: &Path, token: &str) -> (bool, bool, bool, bool, usize, usize) {
    // SoftHSM2 reads its configuration when the module is initialized; only this test opens it
    // in this process.
    std::env::set_var("SOFTHSM2_CONF", conf);
    let ctx = Pkcs11::new(MODULE).expect("load softhsm2");
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .expect("initialize");
    let slot = ctx
        .get_slots_with_token()
        .expect("slots")
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|i| i.label().trim_end() == token)
        })
        .expect("the token");
    let session = ctx.open_ro_session(slot).expect("session");
    session
        .login(UserType::User, Some(&AuthPin::new(PIN.into())))
        .expect("login");
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"device".to_vec()),
        ])
        .expect("find");
    let key = *keys.first().expect("the device key is in the token");
    let next_keys = session
        .find_objects(&[Attribute::Label(b"device.next".to_vec())])
        .expect("find")
        .len();
    let attrs = session
        .get_attributes(
            key,
            &[
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::NeverExtractable,
            ],
        )
        .expect("attributes");
    let flag = |t: AttributeType| {
        attrs.iter().find_map(|a| match (a, t) {
            (Attribute::Sensitive(v), AttributeType::Sensitive)
            | (Attribute::Extractable(v), AttributeType::Extractable)
            | (Attribute::NeverExtractable(v), AttributeType::NeverExtractable) => Some(*v),
            _ => None,
        })
    };
    let value_readable = session
        .get_attributes(key, &[AttributeType::Value])
        .is_ok_and(|v| v.iter().any(|a| matches!(a, Attribute::Value(_))));
    (
        flag(AttributeType::Sensitive).expect("CKA_SENSITIVE"),
        flag(AttributeType::Extractable).expect("CKA_EXTRACTABLE"),
        flag(AttributeType::NeverExtractable).expect("CKA_NEVER_EXTRACTABLE"),
        value_readable,
        keys.len(),
        next_keys,
    )
}

/// No file in `state` holds a private key.
fn assert_no_key_file(state: &Path) {
    for entry in std::fs::read_dir(state).expect("state dir") {
        let path = entry.expect("entry").path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        assert!(
            !name.as_deref().is_some_and(|n| n.ends_with(".key")),
            "a key file was written: {}",
            path.display()
        );
        if path.is_file() {
            let bytes = std::fs::read(&path).expect("read");
            assert!(
                !String::from_utf8_lossy(&bytes).contains("PRIVATE KEY"),
                "{} holds a private key",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn a_token_key_enrolls_connects_rotates_and_never_leaves_the_token() {
    let tmp = tempfile::tempdir().expect("tmp");
    let conf = softhsm(tmp.path(), "mooring");
    let server = Server::start(&tmp.path().join("data"));
    let out = server.cli(&["claim", "create", "--count", "2"]);
    assert!(
        out.status.success(),
        "claim create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let state = tmp.path().join("state");

    // A wrong PIN: a clear error, a failing exit, nothing asked of the server.
    let (status, err) = support::run_agent_to_end(
        enroll_command(&server, &conf, &state, &token, &uri("mooring", "0000")),
        &[],
    );
    assert!(!status.success(), "{err}");
    assert!(err.contains("wrong PIN"), "{err}");
    assert!(!state.join("device.crt").exists());
    // An unknown token: named, with the tokens there are.
    let (status, err) = support::run_agent_to_end(
        enroll_command(&server, &conf, &state, &token, &uri("nope", PIN)),
        &[],
    );
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("no PKCS#11 token labelled \"nope\"") && err.contains("mooring"),
        "{err}"
    );

    // Enrolled with the key made in the token; its telemetry arrives over mTLS signed there.
    let key = uri("mooring", PIN);
    let (status, err) = support::run_agent_to_end(
        enroll_command(&server, &conf, &state, &token, &key),
        &[r#"{"n":1}"#, r#"{"n":2}"#],
    );
    assert!(status.success(), "{status}: {err}");
    assert!(
        err.contains("made the device key inside the token"),
        "{err}"
    );
    assert_eq!(points(&server, 2).await, [1.0, 2.0]);
    assert!(state.join("device.crt").exists());
    assert_no_key_file(&state);

    // The flat invocation with the same token key (the PIN from a file this time).
    let pin_file = tmp.path().join("pin");
    std::fs::write(&pin_file, format!("{PIN}\n")).expect("pin file");
    let key_from_file = format!(
        "pkcs11:token=mooring;object=device?module-path={MODULE}&pin-source=file:{}",
        pin_file.display()
    );
    {
        // Readable by others: refused, like a key file would be.
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let mut cmd = run_command(&server, &conf, &state, &key_from_file);
        cmd.args(["--interval-secs", "0", "--exit-when-drained"]);
        let (status, err) = support::run_agent_to_end(cmd, &[]);
        assert!(!status.success());
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    let mut cmd = run_command(&server, &conf, &state, &key_from_file);
    cmd.args([
        "--interval-secs",
        "0",
        "--input",
        "-",
        "--exit-when-drained",
    ]);
    let (status, err) = support::run_agent_to_end(cmd, &[r#"{"n":3}"#]);
    assert!(status.success(), "{status}: {err}");
    assert_eq!(points(&server, 3).await, [1.0, 2.0, 3.0]);
    // ... and with a wrong PIN: refused before connecting.
    let (status, err) = support::run_agent_to_end(
        run_command(&server, &conf, &state, &uri("mooring", "0000")),
        &[],
    );
    assert!(!status.success(), "{err}");
    assert!(err.contains("wrong PIN"), "{err}");

    // A forced rotation: a new key in the token, a new certificate for it, the same label.
    let old_spki = support::openssl(&["x509", "-in", "device.crt", "-noout", "-pubkey"], &state);
    let old_serial = current_serial(&server).await;
    let old_cert = std::fs::read(state.join("device.crt")).expect("cert");
    let out = server.cli(&["cert", "rotate", "--device", "hsm-1", "--ttl", "1h"]);
    assert!(
        out.status.success(),
        "cert rotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut agent = run_command(&server, &conf, &state, &key)
        .args(["--interval-secs", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mooring-agent");
    let deadline = Instant::now() + RUN_MAX;
    while current_serial(&server).await == old_serial
        || std::fs::read(state.join("device.crt")).expect("cert") == old_cert
        || state.join("device.next.crt").exists()
    {
        assert!(Instant::now() < deadline, "the agent did not rotate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = agent.kill();
    let _ = agent.wait();
    let (_, certs) = server
        .api("GET", "/api/v1/devices/hsm-1/certificates", None)
        .await;
    let revoked: Vec<&Value> = certs["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .filter(|c| c["serial"] == old_serial.as_str())
        .collect();
    assert_eq!(revoked.len(), 1, "{certs}");
    assert_eq!(revoked[0]["state"], "revoked", "{certs}");
    let new_spki = support::openssl(&["x509", "-in", "device.crt", "-noout", "-pubkey"], &state);
    assert_ne!(old_spki, new_spki, "the rotation made a new key");
    assert!(!state.join(PROMOTING_FILE).exists());
    // The renewed certificate works with the token key now labelled `device`.
    let mut cmd = run_command(&server, &conf, &state, &key);
    cmd.args([
        "--interval-secs",
        "0",
        "--input",
        "-",
        "--exit-when-drained",
    ]);
    let (status, err) = support::run_agent_to_end(cmd, &[r#"{"n":4}"#]);
    assert!(status.success(), "{status}: {err}");
    assert_eq!(points(&server, 4).await, [1.0, 2.0, 3.0, 4.0]);
    assert_no_key_file(&state);

    // The key never left the token: sensitive, never extractable, its value unreadable; and
    // the old key is gone, the new one relabelled.
    let (sensitive, extractable, never_extractable, value_readable, keys, next_keys) =
        token_key_protection(&conf, "mooring");
    assert_eq!(next_keys, 0, "no device.next key left");
    assert!(sensitive, "CKA_SENSITIVE");
    assert!(!extractable, "CKA_EXTRACTABLE");
    assert!(never_extractable, "CKA_NEVER_EXTRACTABLE");
    assert!(!value_readable, "CKA_VALUE readable");
    assert_eq!(keys, 1);
}
