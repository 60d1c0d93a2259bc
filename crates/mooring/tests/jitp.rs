//! Registered manufacturer CAs and just-in-time registration (issue 16) against the real
//! binary: `openssl` plays the manufacturer (its own CA, device keys and certificates with
//! CN = device id), `mooring ca ...` registers the CA, `mosquitto_pub` is the device.

mod support;

use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Command;
use support::manufacturer::{hex_name, openssl, Manufacturer, OPENSSL_CNF};
use support::{s, Server};

fn register(server: &Server, m: &Manufacturer, extra: &[&str]) -> Value {
    let cert = m.ca_cert();
    let mut args = vec!["ca", "register", "--cert", cert.to_str().expect("utf8")];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-o", "json"]);
    server.cli_json(&args)
}

fn fleet_ca(server: &Server) -> PathBuf {
    server.data_dir.join("ca.crt")
}

#[tokio::test]
async fn auto_register_ca_registers_its_device_on_first_connect_and_disable_refuses_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let acme = Manufacturer::new(tmp.path(), "Acme");
    let ca = register(&server, &acme, &["--auto-register", "--tag", "vendor=acme"]);
    let ca_id = ca["id"].as_str().expect("id").to_owned();
    assert!(ca_id.starts_with("ca_"), "{ca}");
    assert_eq!(ca["enabled"], true);
    assert_eq!(ca["auto_register"], true);
    assert_eq!(ca["tags"], json!({"vendor": "acme"}));
    assert!(
        ca["subject"]
            .as_str()
            .expect("subject")
            .contains("Acme Manufacturing CA"),
        "{ca}"
    );

    let (status, _) = server.api("GET", "/api/v1/devices/sensor-1", None).await;
    assert_eq!(status, 404, "not registered before it connects");
    let creds = acme.make_device("sensor-1", &fleet_ca(&server));
    assert!(
        support::device_can_publish(&server, &creds, "sensor-1"),
        "first connection admitted; log:\n{}",
        server.log_text()
    );
    let (status, device) = server.api("GET", "/api/v1/devices/sensor-1", None).await;
    assert_eq!(status, 200, "{device}");
    assert_eq!(device["tags"], json!({"vendor": "acme"}), "the CA's tags");
    server
        .wait_for("/api/v1/devices/sensor-1/telemetry/latest", |v| {
            v.to_string().contains("21.5")
        })
        .await;

    // The ledger has the manufacturer's certificate, from the CA.
    let (_, certs) = server
        .api("GET", "/api/v1/devices/sensor-1/certificates", None)
        .await;
    let certs = certs["certificates"].as_array().expect("certs").clone();
    assert_eq!(certs.len(), 1, "{certs:?}");
    assert_eq!(certs[0]["issuer"], format!("ca:{ca_id}"));
    assert_eq!(certs[0]["serial"], hex_name("sensor-1"));
    // The pipeline: certificate issued at its not-before (by the manufacturer), registered
    // at the first connection.
    let (_, p) = server
        .api("GET", "/api/v1/devices/sensor-1/provisioning", None)
        .await;
    let step = |name: &str| -> Value {
        p["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .find(|s| s["step"] == name)
            .cloned()
            .expect("step")
    };
    assert_eq!(step("certificate_issued")["at"], certs[0]["not_before"]);
    assert_eq!(step("registered")["at"], device["created_at"], "{p}");
    assert_eq!(step("registered")["state"], "done");

    // Known now: the next connection is an ordinary one.
    assert!(support::device_can_publish(&server, &creds, "sensor-1"));
    assert_eq!(
        server.log_text().matches("registered just in time").count(),
        1
    );

    // `ca list` shows it; disabled, its device fails the handshake; enabled, it is back.
    let list = server.cli_json(&["ca", "list", "-o", "json"]);
    assert_eq!(list["cas"][0]["id"], ca_id.as_str());
    // A live session of its device is closed (MQTT 5: DISCONNECT 0x87, not authorized).
    let mut args = creds.mosquitto_args(server.mqtt);
    args.extend(s(&[
        "-V",
        "mqttv5",
        "-i",
        "sensor-1",
        "-t",
        "devices/sensor-1/#",
    ]));
    let mut live = support::Sub::start(&args);
    let disabled = server.cli_json(&["ca", "disable", &ca_id, "-o", "json"]);
    assert_eq!(disabled["enabled"], false);
    live.wait_line(|l| l.contains("DISCONNECT (135)"));
    server.wait_log("its certificate's CA is no longer trusted");
    assert!(
        !support::device_can_publish(&server, &creds, "sensor-1"),
        "a disabled CA's device is refused"
    );
    server.wait_log("TLS handshake failed");
    let enabled = server.cli_json(&["ca", "enable", &ca_id, "-o", "json"]);
    assert_eq!(enabled["enabled"], true);
    assert!(support::device_can_publish(&server, &creds, "sensor-1"));

    // The audit log names the actions.
    let (_, audit) = server.api("GET", "/api/v1/audit", None).await;
    let actions = audit.to_string();
    for action in ["ca.register", "ca.disable", "ca.enable"] {
        assert!(actions.contains(action), "{action} in {audit}");
    }
}

#[tokio::test]
async fn without_auto_register_and_for_taken_or_invalid_ids_devices_are_refused_and_nothing_created(
) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let fleet = fleet_ca(&server);

    // A CA that does not auto-register: its devices are refused, with the reason logged.
    let quiet = Manufacturer::new(tmp.path(), "Quiet");
    let ca = register(&server, &quiet, &[]);
    let ca_id = ca["id"].as_str().expect("id").to_owned();
    assert_eq!(ca["auto_register"], false);
    let creds = quiet.make_device("meter-2", &fleet);
    assert!(!support::device_can_publish(&server, &creds, "meter-2"));
    server.wait_log(&format!(
        "refused: certificate of meter-2 chains to registered CA {ca_id}, which does not auto-register"
    ));
    let (status, _) = server.api("GET", "/api/v1/devices/meter-2", None).await;
    assert_eq!(status, 404, "no device created");

    // An auto-registering CA, but the id is an existing device's (with other certificates).
    let acme = Manufacturer::new(tmp.path(), "Acme");
    let acme_id = register(&server, &acme, &["--auto-register"])["id"]
        .as_str()
        .expect("id")
        .to_owned();
    server.create_device("meter-3", tmp.path());
    let (_, before) = server
        .api("GET", "/api/v1/devices/meter-3/certificates", None)
        .await;
    let creds = acme.make_device("meter-3", &fleet);
    assert!(!support::device_can_publish(&server, &creds, "meter-3"));
    server.wait_log(&format!(
        "device meter-3 exists; its certificate from CA {acme_id} is not registered"
    ));
    let (_, after) = server
        .api("GET", "/api/v1/devices/meter-3/certificates", None)
        .await;
    assert_eq!(before, after, "the device's certificates are unchanged");
    // The device's pipeline says why its connection was refused.
    server
        .wait_for("/api/v1/devices/meter-3/provisioning", |p| {
            p.to_string().contains("its certificate from CA ")
        })
        .await;

    // A CN that is not a valid device id.
    let creds = acme.make_device("bad id!", &fleet);
    assert!(!support::device_can_publish(&server, &creds, "bad id!"));
    server.wait_log("is not a valid device id");
    let (_, list) = server.api("GET", "/api/v1/devices", None).await;
    let ids: Vec<&str> = list["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["meter-3"], "nothing else was registered");
}

#[tokio::test]
async fn concurrent_first_connections_register_the_device_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let acme = Manufacturer::new(tmp.path(), "Acme");
    register(&server, &acme, &["--auto-register"]);
    let creds = acme.make_device("valve-7", &fleet_ca(&server));
    let children: Vec<_> = (0..6)
        .map(|_| {
            let mut args = creds.mosquitto_args(server.mqtt);
            args.extend(s(&[
                "-V",
                "mqttv5",
                "-i",
                "valve-7",
                "-t",
                "devices/valve-7/telemetry",
                "-m",
                r#"{"x":1}"#,
            ]));
            Command::new("mosquitto_pub")
                .args(&args)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("mosquitto_pub")
        })
        .collect();
    let mut ok = 0;
    for mut c in children {
        if c.wait().expect("wait").success() {
            ok += 1;
        }
    }
    assert!(ok >= 1, "at least one connection got in");
    let (_, certs) = server
        .api("GET", "/api/v1/devices/valve-7/certificates", None)
        .await;
    assert_eq!(
        certs["certificates"].as_array().expect("certs").len(),
        1,
        "{certs}"
    );
    assert_eq!(
        server.log_text().matches("registered just in time").count(),
        1,
        "one registration"
    );
    assert!(support::device_can_publish(&server, &creds, "valve-7"));
}

#[tokio::test]
async fn bad_ca_certificates_are_400_with_nothing_stored_and_only_admins_may_register() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let server = Server::start(&tmp.path().join("data"));
    let acme = Manufacturer::new(tmp.path(), "Acme");
    let device = acme.make_device("dev-1", &fleet_ca(&server));
    let device_pem = std::fs::read_to_string(device.cert()).expect("device.crt");
    let key_pem = std::fs::read_to_string(device.key()).expect("device.key");
    let other = Manufacturer::new(tmp.path(), "Other");
    let fleet_pem = std::fs::read_to_string(fleet_ca(&server)).expect("fleet ca");

    // An expired CA: `openssl ca -selfsign` can set the dates.
    let old = tmp.path().join("old");
    std::fs::create_dir_all(&old).expect("dir");
    std::fs::write(old.join("openssl.cnf"), OPENSSL_CNF).expect("cnf");
    std::fs::write(old.join("index.txt"), "").expect("index");
    std::fs::write(old.join("serial"), "0a\n").expect("serial");
    openssl(
        &old,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "ca.key",
        ],
    );
    openssl(
        &old,
        &[
            "req",
            "-new",
            "-config",
            "openssl.cnf",
            "-key",
            "ca.key",
            "-subj",
            "/CN=Old CA",
            "-out",
            "ca.csr",
        ],
    );
    openssl(
        &old,
        &[
            "ca",
            "-batch",
            "-selfsign",
            "-config",
            "openssl.cnf",
            "-extensions",
            "v3_ca",
            "-keyfile",
            "ca.key",
            "-in",
            "ca.csr",
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200201000000Z",
            "-out",
            "ca.crt",
        ],
    );
    let expired_pem = std::fs::read_to_string(old.join("ca.crt")).expect("old ca");
    // A CA certificate whose key usage lacks keyCertSign.
    openssl(
        &old,
        &[
            "req",
            "-x509",
            "-new",
            "-config",
            "openssl.cnf",
            "-extensions",
            "v3_ca_nosign",
            "-key",
            "ca.key",
            "-subj",
            "/CN=No Sign CA",
            "-days",
            "30",
            "-out",
            "nosign.crt",
        ],
    );
    let nosign_pem = std::fs::read_to_string(old.join("nosign.crt")).expect("nosign ca");

    let cases: Vec<(&str, String, &str)> = vec![
        ("garbage", "hello".to_owned(), "no certificate"),
        (
            "a device certificate",
            device_pem.clone(),
            "not a CA certificate",
        ),
        (
            "two certificates",
            format!("{}{}", acme.ca_pem(), other.ca_pem()),
            "2 certificates",
        ),
        (
            "a private key",
            format!("{}{key_pem}", acme.ca_pem()),
            "private key",
        ),
        ("an expired CA", expired_pem, "expired"),
        ("no keyCertSign", nosign_pem, "keyCertSign"),
        ("the fleet CA", fleet_pem, "fleet CA"),
        ("too long", "x".repeat(16 * 1024 + 1), "longer than"),
    ];
    for (what, pem, reason) in cases {
        let (status, v) = server
            .api("POST", "/api/v1/cas", Some(json!({"cert_pem": pem})))
            .await;
        assert_eq!(status, 400, "{what}: {v}");
        assert_eq!(v["error"]["code"], "invalid_ca", "{what}: {v}");
        let message = v["error"]["message"].as_str().expect("message");
        assert!(message.contains(reason), "{what}: {message}");
    }
    let (_, list) = server.api("GET", "/api/v1/cas", None).await;
    assert_eq!(list["cas"], json!([]), "nothing stored");

    // The CLI says why and exits non-zero.
    let bad = tmp.path().join("device.pem");
    std::fs::write(&bad, &device_pem).expect("write");
    let out = server.cli(&["ca", "register", "--cert", bad.to_str().expect("utf8")]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a CA certificate"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The same CA twice: 409.
    let body = json!({"cert_pem": acme.ca_pem(), "auto_register": true});
    let (status, first) = server.api("POST", "/api/v1/cas", Some(body.clone())).await;
    assert_eq!(status, 201, "{first}");
    let (status, v) = server.api("POST", "/api/v1/cas", Some(body.clone())).await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (409, Some("ca_exists")),
        "{v}"
    );
    let (status, v) = server
        .api("POST", "/api/v1/cas/ca_missing/disable", None)
        .await;
    assert_eq!(
        (status, v["error"]["code"].as_str()),
        (404, Some("ca_not_found")),
        "{v}"
    );

    // Not an admin: 403, for an operator as for a viewer.
    for role in ["operator", "viewer"] {
        let (status, t) = server
            .api(
                "POST",
                "/api/v1/tokens",
                Some(json!({"name": format!("t-{role}"), "role": role})),
            )
            .await;
        assert_eq!(status, 201, "{t}");
        let token = t["token"].as_str().expect("token");
        let other_body = json!({"cert_pem": other.ca_pem()});
        for (method, path, body) in [
            ("POST", "/api/v1/cas".to_owned(), Some(&other_body)),
            ("GET", "/api/v1/cas".to_owned(), None),
            (
                "POST",
                format!("/api/v1/cas/{}/disable", first["id"].as_str().expect("id")),
                None,
            ),
        ] {
            let mut req = support::http()
                .request(
                    method.parse().expect("method"),
                    format!("{}{path}", server.url()),
                )
                .bearer_auth(token);
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await.expect("http");
            assert_eq!(resp.status().as_u16(), 403, "{role} {method} {path}");
        }
    }
    let (_, list) = server.api("GET", "/api/v1/cas", None).await;
    let cas = list["cas"].as_array().expect("cas");
    assert_eq!(cas.len(), 1, "{list}");
    assert_eq!(cas[0]["enabled"], true, "not disabled by the non-admins");
}
