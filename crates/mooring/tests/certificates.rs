//! The certificate ledger (issue 16) against the real binary: revocation of a device's
//! certificates or of one by serial (a live session closed within a second, the certificate
//! refused from then on, also after a restart), expiry, the expiring list and its metric, scope.

mod support;

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use support::{config_args, s, Creds, Server, Sub};

/// MQTT v5 DISCONNECT reason 0x87 (not authorized), as mosquitto_sub -d prints it.
const DISCONNECT_NOT_AUTHORIZED: &str = "DISCONNECT (135)";

/// A device's MQTT 5 subscription that stays up until the server closes it.
fn live_session(server: &Server, creds: &Creds, id: &str) -> Sub {
    let mut args = creds.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-V",
        "mqttv5",
        "-i",
        id,
        "-t",
        &format!("devices/{id}/#"),
    ]));
    Sub::start(&args)
}

fn cli_ok(server: &Server, args: &[&str]) -> String {
    let out = server.cli(args);
    assert!(
        out.status.success(),
        "mooring {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn serial_of(server: &Server, id: &str) -> String {
    let (status, v) = server
        .api("GET", &format!("/api/v1/devices/{id}"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    v["cert_serial"].as_str().expect("cert_serial").to_owned()
}

/// Revokes with the CLI and asserts the live session is closed (v5: DISCONNECT 0x87) within a
/// second of the command returning.
fn revoke_and_see_the_session_closed(server: &Server, sub: &mut Sub, args: &[&str]) -> String {
    let out = cli_ok(server, args);
    let returned = Instant::now();
    sub.wait_line(|l| l.contains(DISCONNECT_NOT_AUTHORIZED));
    let closed_after = returned.elapsed();
    assert!(
        closed_after < Duration::from_secs(1),
        "session closed {closed_after:?} after the revocation"
    );
    sub.wait_exit();
    out
}

#[tokio::test]
async fn device_revoke_kicks_the_live_session_and_its_certificate_stays_refused_after_a_restart() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let d1 = server.create_device("d1", tmp.path());
    let d2 = server.create_device("d2", tmp.path());
    let serial = serial_of(&server, "d1").await;
    let mut sub = live_session(&server, &d1, "d1");
    server
        .wait_for("/api/v1/devices/d1", |v| v["online"] == true)
        .await;

    let out = revoke_and_see_the_session_closed(
        &server,
        &mut sub,
        &["device", "revoke", "d1", "--reason", "stolen"],
    );
    assert!(out.contains(&serial), "{out}");
    assert!(
        !support::device_can_publish(&server, &d1, "d1"),
        "a revoked certificate connected"
    );
    server.wait_log(&format!(
        "refused: certificate {serial} of d1 was revoked at "
    ));
    assert!(
        support::device_can_publish(&server, &d2, "d2"),
        "another device is not affected"
    );

    // The ledger shows it, the device stays registered, a second revoke changes nothing.
    let list = server.cli_json(&["cert", "list", "--device", "d1", "-o", "json"]);
    let cert = &list["certificates"][0];
    assert_eq!(cert["serial"], serial.as_str());
    assert_eq!(cert["state"], "revoked");
    assert_eq!(cert["revoke_reason"], "stolen");
    assert!(cert["revoked_at"].as_u64().is_some(), "{cert}");
    let table = cli_ok(&server, &["cert", "list", "--device", "d1"]);
    assert!(table.starts_with("SERIAL"), "{table}");
    assert!(
        table.contains("revoked") && table.contains("(stolen)"),
        "{table}"
    );
    let again = cli_ok(&server, &["device", "revoke", "d1"]);
    assert!(again.contains("already revoked"), "{again}");
    server
        .wait_metric("mooring_certificates_revoked", |v| v == 1.0)
        .await;
    assert!(
        server
            .metric("mooring_mqtt_connects_refused_certificate_total")
            .await
            >= 1.0
    );
    let (status, audit) = server
        .api("GET", "/api/v1/audit?action=device.revoke", None)
        .await;
    assert_eq!(status, 200, "{audit}");
    assert_eq!(
        audit["entries"].as_array().map_or(0, Vec::len),
        2,
        "{audit}"
    );

    // Stored: still refused after a restart.
    server.stop();
    let server = Server::start(&data);
    assert!(
        !support::device_can_publish(&server, &d1, "d1"),
        "revocation lost in a restart"
    );
    assert!(support::device_can_publish(&server, &d2, "d2"));
}

#[tokio::test]
async fn cert_revoke_by_serial_kicks_its_session_and_an_unknown_serial_is_404() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let d1 = server.create_device("d1", tmp.path());
    let serial = serial_of(&server, "d1").await;
    let mut sub = live_session(&server, &d1, "d1");
    server
        .wait_for("/api/v1/devices/d1", |v| v["online"] == true)
        .await;
    // Any case: serials are hex.
    let upper = serial.to_ascii_uppercase();
    let out = revoke_and_see_the_session_closed(&server, &mut sub, &["cert", "revoke", &upper]);
    assert!(out.contains(&serial), "{out}");
    assert!(!support::device_can_publish(&server, &d1, "d1"));
    let (status, v) = server
        .api(
            "POST",
            &format!("/api/v1/certificates/{serial}/revoke"),
            Some(json!({})),
        )
        .await;
    assert_eq!(
        (status, v["revoked"].clone()),
        (200, json!([])),
        "idempotent"
    );

    // Unknown: 404 JSON through the API, exit status 1 from the CLI.
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/certificates/00ff/revoke",
            Some(json!({"reason": "x"})),
        )
        .await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(v["error"]["code"], "certificate_not_found", "{v}");
    let out = server.cli(&["cert", "revoke", "00ff"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("certificate_not_found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a serial at all: a usage error.
    assert_eq!(
        server.cli(&["cert", "revoke", "nope!"]).status.code(),
        Some(2)
    );
    let (status, _) = server
        .api("POST", "/api/v1/devices/nope/revoke", Some(json!({})))
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        server.cli(&["device", "revoke", "nope"]).status.code(),
        Some(1)
    );
    let (status, v) = server
        .api("GET", "/api/v1/audit?action=cert.revoke", None)
        .await;
    assert_eq!(status, 200);
    assert!(
        v["entries"].as_array().is_some_and(|e| !e.is_empty()),
        "{v}"
    );
}

/// Signs a certificate for the device's key with the data dir's CA key whose validity ended
/// yesterday (openssl ca, which can set the dates).
fn sign_expired(data: &Path, creds: &Creds, id: &str, out: &Path) -> Creds {
    std::fs::create_dir_all(out).expect("dir");
    let run = |args: &[&str]| {
        let o = Command::new("openssl")
            .args(args)
            .current_dir(out)
            .output()
            .expect("openssl");
        assert!(
            o.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    std::fs::write(out.join("index.txt"), "").expect("index");
    std::fs::write(out.join("serial"), "7e57\n").expect("serial");
    std::fs::write(
        out.join("ca.cnf"),
        "[ca]\ndefault_ca = c\n[c]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
         default_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n",
    )
    .expect("cnf");
    let key = creds.key();
    let key = key.to_str().expect("utf8");
    run(&[
        "req",
        "-new",
        "-key",
        key,
        "-subj",
        &format!("/CN={id}"),
        "-out",
        "d.csr",
    ]);
    let ca_crt = data.join("ca.crt");
    let ca_key = data.join("ca.key");
    run(&[
        "ca",
        "-batch",
        "-notext",
        "-config",
        "ca.cnf",
        "-in",
        "d.csr",
        "-out",
        "device.crt",
        "-cert",
        ca_crt.to_str().expect("utf8"),
        "-keyfile",
        ca_key.to_str().expect("utf8"),
        "-startdate",
        "20200101000000Z",
        "-enddate",
        "20200102000000Z",
    ]);
    std::fs::copy(creds.key(), out.join("device.key")).expect("key");
    std::fs::copy(creds.ca(), out.join("ca.crt")).expect("ca");
    Creds {
        dir: out.to_owned(),
    }
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    let server = Server::start(&data);
    let d1 = server.create_device("d1", tmp.path());
    let expired = sign_expired(&data, &d1, "d1", &tmp.path().join("expired"));
    assert!(
        !support::device_can_publish(&server, &expired, "d1"),
        "an expired certificate connected"
    );
    assert!(
        support::device_can_publish(&server, &d1, "d1"),
        "the device's current certificate works"
    );
}

#[tokio::test]
async fn expiring_lists_the_devices_at_risk_and_the_metric_counts_them() {
    let tmp = tempfile::tempdir().expect("tmp");
    let data = tmp.path().join("data");
    // e1 and e2 get certificates for 10 days, e3 (after a restart) for the default 10 years.
    let short = config_args(tmp.path(), "[certificates]\ndevice_validity_days = 10\n");
    let short: Vec<&str> = short.iter().map(String::as_str).collect();
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &short);
    server.create_device("e1", tmp.path());
    server.create_device("e2", tmp.path());
    server.stop();
    let warn_dir = tmp.path().join("warn");
    std::fs::create_dir_all(&warn_dir).expect("dir");
    let warn = config_args(&warn_dir, "[certificates]\nexpiring_warn_days = 20\n");
    let warn: Vec<&str> = warn.iter().map(String::as_str).collect();
    let server = Server::start_with(&data, "127.0.0.1:0", "127.0.0.1:0", &warn);
    server.create_device("e3", tmp.path());

    // Sorted: e1 and e2 may expire in the same millisecond (then the order is by serial).
    let devices = |v: &Value| -> Vec<String> {
        let mut ids: Vec<String> = v["certificates"]
            .as_array()
            .expect("certificates")
            .iter()
            .map(|c| c["device_id"].as_str().expect("device_id").to_owned())
            .collect();
        ids.sort();
        ids
    };
    let within_30d = server.cli_json(&["cert", "expiring", "--within", "30d", "-o", "json"]);
    assert_eq!(devices(&within_30d), ["e1", "e2"], "{within_30d}");
    let everything = server.cli_json(&["cert", "expiring", "--within", "3651d", "-o", "json"]);
    assert_eq!(devices(&everything), ["e1", "e2", "e3"]);
    assert!(
        devices(&server.cli_json(&["cert", "expiring", "--within", "90m", "-o", "json"]))
            .is_empty()
    );
    let table = cli_ok(&server, &["cert", "expiring", "--within", "12h"]);
    assert!(table.starts_with("SERIAL"), "{table}");
    let table = cli_ok(&server, &["cert", "expiring"]);
    let mut listed: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    listed.sort();
    assert_eq!(listed, ["e1", "e2"], "{table}");
    assert_eq!(
        server
            .cli(&["cert", "expiring", "--within", "30x"])
            .status
            .code(),
        Some(2)
    );
    // Paging through the API: one per page, the cursor carries on.
    let (status, page) = server
        .api(
            "GET",
            "/api/v1/certificates?expiring_within_ms=2592000000&limit=1",
            None,
        )
        .await;
    assert_eq!(status, 200, "{page}");
    let mut paged = devices(&page);
    assert_eq!(paged.len(), 1);
    let cursor = page["next_cursor"].as_str().expect("cursor").to_owned();
    let (_, page) = server
        .api(
            "GET",
            &format!("/api/v1/certificates?expiring_within_ms=2592000000&limit=1&after={cursor}"),
            None,
        )
        .await;
    paged.extend(devices(&page));
    paged.sort();
    assert_eq!(paged, ["e1", "e2"]);

    server
        .wait_metric("mooring_certificates_expiring", |v| v == 2.0)
        .await;
    // Revoked certificates are no longer "at risk".
    cli_ok(&server, &["device", "revoke", "e1"]);
    let within_30d = server.cli_json(&["cert", "expiring", "--within", "30d", "-o", "json"]);
    assert_eq!(devices(&within_30d), ["e2"]);
    server
        .wait_metric("mooring_certificates_expiring", |v| v == 1.0)
        .await;
}

#[tokio::test]
async fn a_scoped_operator_reaches_only_the_certificates_in_its_scope() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let out = server.cli(
        &["device", "create", "in1", "--tag", "site=berlin", "--out"]
            .iter()
            .copied()
            .chain([tmp.path().join("in1").to_str().expect("utf8")])
            .collect::<Vec<_>>(),
    );
    assert!(out.status.success());
    let paris = server.create_device("out1", tmp.path());
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/tokens",
            Some(json!({"name": "berlin-ops", "role": "operator", "scope": "tag:site=berlin"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let token = v["token"].as_str().expect("token").to_owned();
    let as_scoped = |method: &'static str, path: String, body: Option<Value>| {
        let server = &server;
        let token = token.clone();
        async move { support::call(server, method, &path, Some(&token), None, &[], body).await }
    };
    let out_serial = serial_of(&server, "out1").await;
    let r = as_scoped(
        "POST",
        "/api/v1/devices/out1/revoke".into(),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (404, Some("device_not_found"))
    );
    let r = as_scoped(
        "POST",
        format!("/api/v1/certificates/{out_serial}/revoke"),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (404, Some("certificate_not_found"))
    );
    let r = as_scoped("GET", "/api/v1/devices/out1/certificates".into(), None).await;
    assert_eq!(r.status, 404);
    let r = as_scoped(
        "GET",
        "/api/v1/certificates?expiring_within_ms=999999999999".into(),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let ids: Vec<&str> = r.body["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .filter_map(|c| c["device_id"].as_str())
        .collect();
    assert_eq!(ids, ["in1"]);
    // Nothing of out1 changed; in1 is the operator's to revoke.
    assert!(support::device_can_publish(&server, &paris, "out1"));
    let r = as_scoped("POST", "/api/v1/devices/in1/revoke".into(), Some(json!({}))).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["revoked"].as_array().map_or(0, Vec::len), 1);
}
