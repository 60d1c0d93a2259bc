//! Enrollment with a claim token (issue 16): a device with no certificate makes its own key and
//! CSR (`openssl`), enrolls over MQTT (`mosquitto_sub`/`mosquitto_pub` with username `claim` and
//! the token as password) or HTTPS (`POST /api/v1/provision/enroll`), and then publishes with
//! its own key. Retries answer the same certificate; used, exhausted, expired, revoked and
//! unknown claims are refused with their codes and change nothing.

mod support;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use support::{mosquitto_pub, s, Server};

fn openssl(args: &[&str], dir: &Path) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A device's own EC P-256 key `<name>.key` and a CSR `<name>.csr` for it that asks for what it
/// must not get (another CN, a CA flag, a DNS name); returns the CSR's PEM.
fn key_and_csr(dir: &Path, name: &str) -> String {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            &key,
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-new",
            "-key",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=admin/O=Evil",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "subjectAltName=DNS:server.example.com",
        ],
        dir,
    );
    std::fs::read_to_string(dir.join(csr)).expect("csr")
}

/// `POST /api/v1/claims` with `body`; the answer (201 expected).
async fn create_claim(server: &Server, body: Value) -> Value {
    let (status, claim) = server.api("POST", "/api/v1/claims", Some(body)).await;
    assert_eq!(status, 201, "{claim}");
    assert!(claim["token"]
        .as_str()
        .is_some_and(|t| t.starts_with("mct_")));
    claim
}

fn ca_file(server: &Server) -> PathBuf {
    server.data_dir.join("ca.crt")
}

/// mosquitto arguments for a claim client: server-authenticated TLS, no client certificate,
/// username `claim`, the token as password.
fn claim_args(server: &Server, token: &str, client_id: &str) -> Vec<String> {
    s(&[
        "-h",
        "127.0.0.1",
        "-p",
        &server.mqtt.port().to_string(),
        "--cafile",
        ca_file(server).to_str().expect("utf8"),
        "-u",
        "claim",
        "-P",
        token,
        "-i",
        client_id,
        "-V",
        "mqttv5",
    ])
}

/// One enrollment request with `mosquitto_rr` (one connection: it subscribes to the answer
/// topic, publishes the request and prints the answer); the accepted answer.
fn mosquitto_enroll(server: &Server, token: &str, cid: &str, request: &Value) -> Value {
    let mut rr = claim_args(server, token, cid);
    rr.extend(s(&[
        "-q",
        "1",
        "-t",
        &format!("provision/{cid}/request"),
        "-e",
        &format!("provision/{cid}/accepted"),
        "-m",
        &request.to_string(),
        "-W",
        "20",
    ]));
    let out = Command::new("mosquitto_rr")
        .args(&rr)
        .output()
        .expect("mosquitto_rr");
    assert!(
        out.status.success(),
        "mosquitto_rr: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("accepted answer is JSON")
}

/// A claim client over rumqttc (MQTT 3.1.1): one connection that subscribes to its
/// `provision/<cid>/#`, sends requests and reads the answers.
struct ClaimClient {
    client: rumqttc::AsyncClient,
    events: tokio::sync::mpsc::UnboundedReceiver<Result<rumqttc::Packet, String>>,
    task: tokio::task::JoinHandle<()>,
    cid: String,
}

impl ClaimClient {
    /// Connects; `Err` with the connection error if refused.
    async fn connect(server: &Server, token: &str, cid: &str) -> Result<ClaimClient, String> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let ca = std::fs::read(ca_file(server)).expect("ca");
        let mut opts = rumqttc::MqttOptions::new(cid, "127.0.0.1", server.mqtt.port());
        opts.set_credentials("claim", token);
        opts.set_clean_session(true);
        opts.set_max_packet_size(64 * 1024, 64 * 1024);
        opts.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Simple {
                ca,
                alpn: None,
                client_auth: None,
            },
        ));
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 16);
        let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                let ev = match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(p)) => Ok(p),
                    Ok(_) => continue,
                    Err(e) => Err(e.to_string()),
                };
                let end = ev.is_err();
                if tx.send(ev).is_err() || end {
                    return;
                }
            }
        });
        let deadline = tokio::time::Instant::now() + support::WAIT;
        loop {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(Ok(rumqttc::Packet::ConnAck(_)))) => break,
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => {
                    task.abort();
                    return Err(e);
                }
                other => panic!("no CONNACK: {other:?}"),
            }
        }
        let mut c = ClaimClient {
            client,
            events,
            task,
            cid: cid.to_owned(),
        };
        c.client
            .subscribe(format!("provision/{cid}/#"), rumqttc::QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        c.next(|p| matches!(p, rumqttc::Packet::SubAck(_))).await;
        Ok(c)
    }

    async fn next(&mut self, pred: impl Fn(&rumqttc::Packet) -> bool) -> rumqttc::Packet {
        let deadline = tokio::time::Instant::now() + support::WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Ok(p))) if pred(&p) => return p,
                Ok(Some(Ok(_))) => {}
                other => panic!("claim client {}: {other:?}", self.cid),
            }
        }
    }

    /// Sends one request; the answer's last topic level (`accepted`/`rejected`) and payload.
    async fn enroll(&mut self, request: &Value) -> (String, Value) {
        self.client
            .publish(
                format!("provision/{}/request", self.cid),
                rumqttc::QoS::AtLeastOnce,
                false,
                request.to_string().into_bytes(),
            )
            .await
            .expect("publish");
        match self
            .next(|p| matches!(p, rumqttc::Packet::Publish(_)))
            .await
        {
            rumqttc::Packet::Publish(p) => {
                let kind = p.topic.rsplit('/').next().unwrap_or("").to_owned();
                (
                    kind,
                    serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                )
            }
            _ => unreachable!(),
        }
    }
}

impl Drop for ClaimClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes telemetry with the device's own key and certificate; waits until it is stored.
async fn publish_as_device(server: &Server, dir: &Path, id: &str, key: &str, cert_pem: &str) {
    let cert = dir.join(format!("{id}.crt"));
    std::fs::write(&cert, cert_pem).expect("write cert");
    let args: Vec<String> = s(&[
        "-h",
        "127.0.0.1",
        "-p",
        &server.mqtt.port().to_string(),
        "--cafile",
        ca_file(server).to_str().expect("utf8"),
        "--cert",
        cert.to_str().expect("utf8"),
        "--key",
        dir.join(key).to_str().expect("utf8"),
        "-i",
        id,
        "-V",
        "mqttv5",
        "-q",
        "1",
        "-t",
        &format!("devices/{id}/telemetry"),
        "-m",
        r#"{"temp": 21.5}"#,
    ]);
    let out = mosquitto_pub(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server
        .wait_for(
            &format!("/api/v1/devices/{id}/telemetry?metric=temp"),
            |v| v["points"][0]["value"] == 21.5,
        )
        .await;
}

/// The certificate's subject (RFC 2253) and full text.
fn cert_text(dir: &Path, pem: &str) -> (String, String) {
    let file = dir.join("check.crt");
    std::fs::write(&file, pem).expect("write");
    let subject = openssl(
        &[
            "x509",
            "-in",
            "check.crt",
            "-noout",
            "-subject",
            "-nameopt",
            "RFC2253",
        ],
        dir,
    );
    let text = openssl(&["x509", "-in", "check.crt", "-noout", "-text"], dir);
    (subject.trim().to_owned(), text)
}

#[tokio::test]
async fn a_device_enrolls_over_mqtt_with_a_claim_and_publishes_with_its_own_key() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let claim = create_claim(&server, json!({"tags": {"site": "berlin"}})).await;
    let token = claim["token"].as_str().expect("token");
    assert_eq!(claim["uses_max"], 1, "{claim}");
    let csr = key_and_csr(tmp.path(), "own");

    let request = json!({"v": 1, "csr_pem": csr, "device_id": "sn-0042"});
    let answer = mosquitto_enroll(&server, token, "sn-0042", &request);
    assert_eq!(answer["device_id"], "sn-0042", "{answer}");
    let cert = answer["certificate_pem"].as_str().expect("certificate");
    assert!(answer["ca_pem"]
        .as_str()
        .is_some_and(|c| c.contains("BEGIN CERTIFICATE")));

    // The server decided what the certificate says: CN = the device id, nothing of the CSR's.
    let (subject, text) = cert_text(tmp.path(), cert);
    assert_eq!(subject, "subject=CN=sn-0042,O=Mooring", "{text}");
    assert!(
        !text.contains("Evil") && !text.contains("CA:TRUE"),
        "{text}"
    );
    assert!(!text.contains("server.example.com"), "{text}");

    // The device exists with the claim's tags and publishes with its own key.
    let (status, device) = server.api("GET", "/api/v1/devices/sn-0042", None).await;
    assert_eq!(status, 200, "{device}");
    assert_eq!(device["tags"]["site"], "berlin", "{device}");
    publish_as_device(&server, tmp.path(), "sn-0042", "own.key", cert).await;

    // It lost the answer and asks again: the same certificate, no use taken.
    let mut client = ClaimClient::connect(&server, token, "sn-0042")
        .await
        .expect("connect");
    let (kind, again) = client.enroll(&request).await;
    assert_eq!(kind, "accepted", "{again}");
    assert_eq!(again["certificate_pem"], answer["certificate_pem"]);

    // Another key under the used single-use claim: refused, nothing changed.
    let other_csr = key_and_csr(tmp.path(), "other");
    let (kind, refused) = client
        .enroll(&json!({"v": 1, "csr_pem": other_csr, "device_id": "sn-0043"}))
        .await;
    assert_eq!(kind, "rejected", "{refused}");
    assert_eq!(refused["code"], "claim_used", "{refused}");
    let (status, _) = server.api("GET", "/api/v1/devices/sn-0043", None).await;
    assert_eq!(status, 404);
    let (_, claim_now) = server
        .api(
            "GET",
            &format!("/api/v1/claims/{}", claim["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(claim_now["uses"], 1, "{claim_now}");
    assert_eq!(claim_now["devices"], json!(["sn-0042"]), "{claim_now}");
}
