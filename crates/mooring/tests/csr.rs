//! A device whose private key never leaves it: the key and a certificate signing request made
//! with `openssl` (as a device or a factory station would), `mooring device create --csr`, the
//! certificate checked with `openssl x509`, and `mosquitto_pub` publishing with the device's own
//! key. Bad and forged CSRs are refused with a reason and create nothing.

mod support;

use std::path::Path;
use support::{mosquitto_pub, openssl, Server};

/// An EC P-256 key and a CSR for it that asks for things it must not get: another CN, a CA
/// flag, a DNS name.
fn key_and_csr(dir: &Path) {
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "own.key",
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-new",
            "-key",
            "own.key",
            "-out",
            "own.csr",
            "-subj",
            "/CN=someone-else/O=Evil",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "subjectAltName=DNS:server.example.com",
        ],
        dir,
    );
}

#[tokio::test]
async fn a_device_enrolls_with_its_own_key_and_the_server_decides_what_the_certificate_says() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    key_and_csr(tmp.path());

    let out = server.cli(&[
        "device",
        "create",
        "lock-9",
        "--csr",
        tmp.path().join("own.csr").to_str().expect("utf8"),
        "--out",
        tmp.path().join("lock-9").to_str().expect("utf8"),
        "--tag",
        "site=berlin",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tmp.path().join("lock-9");
    assert!(dir.join("device.crt").exists() && dir.join("ca.crt").exists());
    assert!(
        !dir.join("device.key").exists(),
        "no key is written: it stays on the device"
    );

    // What the certificate says is the server's: CN = the id, a client certificate, no CA.
    let text = openssl(
        &["x509", "-in", "lock-9/device.crt", "-noout", "-text"],
        tmp.path(),
    );
    let subject = openssl(
        &[
            "x509",
            "-in",
            "lock-9/device.crt",
            "-noout",
            "-subject",
            "-nameopt",
            "RFC2253",
        ],
        tmp.path(),
    );
    // The same subject as a server-made key gets (the fleet's O), nothing of the CSR's.
    assert_eq!(subject.trim(), "subject=CN=lock-9,O=Mooring", "{text}");
    assert!(
        !text.contains("Evil") && !text.contains("someone-else"),
        "{text}"
    );
    assert!(!text.contains("CA:TRUE"), "{text}");
    assert!(!text.contains("server.example.com"), "{text}");
    assert!(text.contains("TLS Web Client Authentication"), "{text}");
    // Issued for the CSR's key.
    let cert_key = openssl(
        &["x509", "-in", "lock-9/device.crt", "-noout", "-pubkey"],
        tmp.path(),
    );
    let own_key = openssl(&["pkey", "-in", "own.key", "-pubout"], tmp.path());
    assert_eq!(cert_key, own_key);
    openssl(
        &["verify", "-CAfile", "lock-9/ca.crt", "lock-9/device.crt"],
        tmp.path(),
    );

    // The device connects with its own key and its telemetry is stored.
    let args: Vec<String> = [
        "-h".to_owned(),
        server.mqtt.ip().to_string(),
        "-p".to_owned(),
        server.mqtt.port().to_string(),
        "--cafile".to_owned(),
        dir.join("ca.crt").display().to_string(),
        "--cert".to_owned(),
        dir.join("device.crt").display().to_string(),
        "--key".to_owned(),
        tmp.path().join("own.key").display().to_string(),
        "-i".to_owned(),
        "lock-9".to_owned(),
        "-V".to_owned(),
        "mqttv5".to_owned(),
        "-q".to_owned(),
        "1".to_owned(),
        "-t".to_owned(),
        "devices/lock-9/telemetry".to_owned(),
        "-m".to_owned(),
        r#"{"temp": 20.5}"#.to_owned(),
    ]
    .into();
    let out = mosquitto_pub(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server
        .wait_for("/api/v1/devices/lock-9/telemetry?metric=temp", |v| {
            v["points"][0]["value"] == 20.5
        })
        .await;
    let (_, device) = server.api("GET", "/api/v1/devices/lock-9", None).await;
    assert_eq!(device["tags"]["site"], "berlin", "{device}");
}

#[tokio::test]
async fn bad_and_forged_csrs_are_refused_and_create_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    key_and_csr(tmp.path());

    // Not a CSR at all.
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/devices",
            Some(serde_json::json!({"id": "d1", "csr_pem": "hello"})),
        )
        .await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (400, &"invalid_csr".into()),
        "{body}"
    );

    // A CSR whose signature was tampered with (the requester does not hold the key).
    let der = tmp.path().join("own.der");
    openssl(
        &[
            "req", "-in", "own.csr", "-outform", "DER", "-out", "own.der",
        ],
        tmp.path(),
    );
    let mut bytes = std::fs::read(&der).expect("der");
    let last = bytes.len() - 2;
    bytes[last] ^= 0x55;
    std::fs::write(&der, &bytes).expect("write der");
    openssl(
        &[
            "req",
            "-inform",
            "DER",
            "-in",
            "own.der",
            "-out",
            "forged.csr",
        ],
        tmp.path(),
    );
    let forged = std::fs::read_to_string(tmp.path().join("forged.csr")).expect("forged");
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/devices",
            Some(serde_json::json!({"id": "d2", "csr_pem": forged})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_csr");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("signature")),
        "{body}"
    );

    // The CLI: a clear message, a non-zero exit, no files left behind.
    let out = server.cli(&[
        "device",
        "create",
        "d3",
        "--csr",
        tmp.path().join("forged.csr").to_str().expect("utf8"),
        "--out",
        tmp.path().join("d3").to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("signature"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!tmp.path().join("d3").exists());
    let out = server.cli(&["device", "create", "d4", "--csr", "/nonexistent.csr"]);
    assert_eq!(out.status.code(), Some(2));

    for id in ["d1", "d2", "d3", "d4"] {
        let (status, _) = server
            .api("GET", &format!("/api/v1/devices/{id}"), None)
            .await;
        assert_eq!(status, 404, "{id} was not created");
    }
}
