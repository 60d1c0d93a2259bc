//! Enrollment with a claim token (issue 16): a device with no certificate makes its own key and
//! CSR (`openssl`), enrolls over MQTT (`mosquitto_sub`/`mosquitto_pub` with username `claim` and
//! the token as password) or HTTPS (`POST /api/v1/provision/enroll`), and then publishes with
//! its own key. Retries answer the same certificate; used, exhausted, expired, revoked and
//! unknown claims are refused with their codes and change nothing.

mod support;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use support::{mosquitto_pub, openssl, s, Server};

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
    // Its pipeline: claimed, then every later step done.
    let (_, pipeline) = server
        .api("GET", "/api/v1/devices/sn-0042/provisioning", None)
        .await;
    assert_eq!(pipeline["steps"][0]["step"], "claimed", "{pipeline}");
    assert_eq!(pipeline["steps"][0]["state"], "done", "{pipeline}");
    assert!(pipeline["steps"][0]["at"].as_u64().is_some(), "{pipeline}");

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

/// `POST /api/v1/provision/enroll` without an API token (the claim token is the credential).
async fn https_enroll(server: &Server, body: Value) -> (u16, Value) {
    let resp = support::http()
        .post(format!("{}/api/v1/provision/enroll", server.url()))
        .json(&body)
        .send()
        .await
        .expect("http");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn https_enrollment_is_idempotent_per_key_and_refusals_change_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let claim = create_claim(
        &server,
        json!({"count": 2, "ttl": "1h", "tags": {"batch": "b7"}, "name": "batch 7"}),
    )
    .await;
    let token = claim["token"].as_str().expect("token");
    let claim_id = claim["id"].as_str().expect("id");
    assert_eq!(
        (claim["uses_max"].clone(), claim["state"].clone()),
        (json!(2), json!("live"))
    );
    let csrs: Vec<String> = (0..3)
        .map(|i| key_and_csr(tmp.path(), &format!("k{i}")))
        .collect();

    let (status, first) = https_enroll(
        &server,
        json!({"claim_token": token, "csr_pem": csrs[0], "device_id": "meter-1"}),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["device_id"], "meter-1");
    let (subject, _) = cert_text(tmp.path(), first["certificate_pem"].as_str().expect("pem"));
    assert_eq!(subject, "subject=CN=meter-1,O=Mooring");
    let (_, device) = server.api("GET", "/api/v1/devices/meter-1", None).await;
    assert_eq!(device["tags"]["batch"], "b7", "{device}");
    publish_as_device(
        &server,
        tmp.path(),
        "meter-1",
        "k0.key",
        first["certificate_pem"].as_str().expect("pem"),
    )
    .await;

    // The same key again (another proposed id too): the same certificate, 200, no use taken.
    let (status, again) = https_enroll(
        &server,
        json!({"claim_token": token, "csr_pem": csrs[0], "device_id": "meter-9"}),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, first);

    // A proposed id that is taken: device_exists, no use taken.
    let (status, taken) = https_enroll(
        &server,
        json!({"claim_token": token, "csr_pem": csrs[1], "device_id": "meter-1"}),
    )
    .await;
    assert_eq!((status, code(&taken)), (409, "device_exists"), "{taken}");
    // Bad input: invalid_csr, invalid_device_id, a missing id.
    for (body, want) in [
        (
            json!({"claim_token": token, "csr_pem": "nope", "device_id": "meter-2"}),
            "invalid_csr",
        ),
        (
            json!({"claim_token": token, "csr_pem": csrs[1], "device_id": "bad/id"}),
            "invalid_device_id",
        ),
        (
            json!({"claim_token": token, "csr_pem": csrs[1]}),
            "invalid_device_id",
        ),
    ] {
        let (status, refused) = https_enroll(&server, body).await;
        assert_eq!((status, code(&refused)), (400, want), "{refused}");
    }

    // The second use, then the claim is exhausted.
    let (status, second) = https_enroll(
        &server,
        json!({"claim_token": token, "csr_pem": csrs[1], "device_id": "meter-2"}),
    )
    .await;
    assert_eq!(status, 201, "{second}");
    let (status, exhausted) = https_enroll(
        &server,
        json!({"claim_token": token, "csr_pem": csrs[2], "device_id": "meter-3"}),
    )
    .await;
    assert_eq!(
        (status, code(&exhausted)),
        (409, "claim_exhausted"),
        "{exhausted}"
    );
    let (status, _) = server.api("GET", "/api/v1/devices/meter-3", None).await;
    assert_eq!(status, 404);
    let (_, shown) = server
        .api("GET", &format!("/api/v1/claims/{claim_id}"), None)
        .await;
    assert_eq!(
        (
            shown["uses"].clone(),
            shown["state"].clone(),
            shown["devices"].clone()
        ),
        (json!(2), json!("used"), json!(["meter-1", "meter-2"])),
        "{shown}"
    );
    // The token is never shown again.
    let (_, list) = server.api("GET", "/api/v1/claims", None).await;
    assert!(!list.to_string().contains(token), "{list}");
    assert_eq!(list["claims"][0]["id"], claim_id, "{list}");

    // Unknown and revoked tokens: the same answer, claim_invalid.
    let (status, unknown) = https_enroll(
        &server,
        json!({"claim_token": format!("mct_{}", "0".repeat(64)), "csr_pem": csrs[2], "device_id": "x1"}),
    )
    .await;
    assert_eq!(
        (status, code(&unknown)),
        (401, "claim_invalid"),
        "{unknown}"
    );
    let (status, revoked) = server
        .api("DELETE", &format!("/api/v1/claims/{claim_id}"), None)
        .await;
    assert_eq!(
        (status, revoked["state"].clone()),
        (200, json!("revoked")),
        "{revoked}"
    );
    // A new key: refused like an unknown token. A key that enrolled: its answer again (a
    // device whose reply was lost before the claim ended resumes), nothing new.
    let (status, after) = https_enroll(
        &server,
        json!({"claim_token": token, "csr_pem": csrs[2], "device_id": "meter-3"}),
    )
    .await;
    assert_eq!(
        (status, after["error"].clone()),
        (401, unknown["error"].clone())
    );
    let (status, again) = https_enroll(
        &server,
        json!({"claim_token": token, "csr_pem": csrs[0], "device_id": "meter-1"}),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, first, "the same certificate, re-answered");
    let (status, _) = server.api("GET", "/api/v1/devices/meter-3", None).await;
    assert_eq!(status, 404);
    // The enrolled devices keep working.
    let (status, _) = server.api("GET", "/api/v1/devices/meter-2", None).await;
    assert_eq!(status, 200);

    // The audit log: the claim's creation and revocation, every enrollment with its outcome.
    let (_, audit) = server.api("GET", "/api/v1/audit?action=claim.", None).await;
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(actions, ["claim.revoke", "claim.create"], "{audit}");
    let (_, audit) = server
        .api("GET", "/api/v1/audit?action=provision.enroll", None)
        .await;
    let entries = audit["entries"].as_array().expect("entries");
    let first = entries.last().expect("an entry");
    assert_eq!(
        (first["actor"].as_str(), first["status"].as_u64()),
        (Some(format!("claim:{claim_id}").as_str()), Some(201)),
        "{first}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["actor"] == "anonymous" && e["detail"] == "claim_invalid"),
        "{audit}"
    );
}

#[tokio::test]
async fn the_cli_creates_lists_and_revokes_claims_and_assign_ids_ignores_proposed_ids() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let out = server.cli(&[
        "claim",
        "create",
        "--count",
        "3",
        "--ttl",
        "2h",
        "--tag",
        "site=oslo",
        "--tag",
        "line=4",
        "--assign-ids",
        "--name",
        "oslo line 4",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(token.starts_with("mct_"), "{token}");
    let info = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        info.contains("3 uses") && info.contains("assigns device ids"),
        "{info}"
    );

    let csr = key_and_csr(tmp.path(), "a");
    let (status, enrolled) = https_enroll(
        &server,
        json!({"claim_token": token, "csr_pem": csr, "device_id": "my-own-id"}),
    )
    .await;
    assert_eq!(status, 201, "{enrolled}");
    let id = enrolled["device_id"].as_str().expect("id");
    assert!(
        id.len() == 14 && id.starts_with("d-") && id[2..].chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    let (_, device) = server
        .api("GET", &format!("/api/v1/devices/{id}"), None)
        .await;
    assert_eq!(
        device["tags"],
        json!({"site": "oslo", "line": "4"}),
        "{device}"
    );
    let (status, _) = server.api("GET", "/api/v1/devices/my-own-id", None).await;
    assert_eq!(status, 404);

    let out = server.cli(&["claim", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table.contains("oslo line 4") && table.contains("1/3"),
        "{table}"
    );
    assert!(!table.contains(&token), "{table}");
    let out = server.cli(&["claim", "list", "--output", "json"]);
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    let claim_id = list[0]["id"].as_str().expect("id").to_owned();
    let out = server.cli(&["claim", "revoke", &claim_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.cli(&["claim", "list", "--output", "json"]);
    let list: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list[0]["state"], "revoked", "{list}");
    // Unknown claim: an error message, a failing exit.
    let out = server.cli(&["claim", "revoke", "clm_nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    // Bad arguments are refused before anything is sent.
    let out = server.cli(&["claim", "create", "--ttl", "forever"]);
    assert!(!out.status.success());
}

#[tokio::test]
async fn a_scoped_caller_creates_claims_only_for_devices_inside_its_scope() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let scoped = support::scoped_token(&server, "acme-ops", "operator", "tag:customer=acme");
    let post = |body: Value| {
        let scoped = scoped.clone();
        let url = format!("{}/api/v1/claims", server.url());
        async move {
            let resp = support::http()
                .post(url)
                .bearer_auth(scoped)
                .json(&body)
                .send()
                .await
                .expect("http");
            let status = resp.status().as_u16();
            (status, resp.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let (status, refused) = post(json!({"tags": {"customer": "other"}})).await;
    assert_eq!(
        (status, code(&refused)),
        (403, "outside_scope"),
        "{refused}"
    );
    let (status, refused) = post(json!({})).await;
    assert_eq!(
        (status, code(&refused)),
        (403, "outside_scope"),
        "{refused}"
    );
    let (status, ok) = post(json!({"tags": {"customer": "acme"}})).await;
    assert_eq!(status, 201, "{ok}");
    // The admin's claim for another customer is invisible to the scoped caller.
    create_claim(&server, json!({"tags": {"customer": "other"}})).await;
    let resp = support::http()
        .get(format!("{}/api/v1/claims", server.url()))
        .bearer_auth(&scoped)
        .send()
        .await
        .expect("http");
    let list: Value = resp.json().await.expect("json");
    assert_eq!(list["claims"].as_array().map(Vec::len), Some(1), "{list}");
    // Pages are filled past claims outside the scope: with one per page, each page holds one
    // of the caller's claims, and the walk ends without empty pages in between.
    for _ in 0..4 {
        create_claim(&server, json!({"tags": {"customer": "other"}})).await;
    }
    let (status, second) = post(json!({"tags": {"customer": "acme"}})).await;
    assert_eq!(status, 201, "{second}");
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..5 {
        let mut url = format!("{}/api/v1/claims?limit=1", server.url());
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = support::http()
            .get(url)
            .bearer_auth(&scoped)
            .send()
            .await
            .expect("http")
            .json()
            .await
            .expect("json");
        let claims = page["claims"].as_array().expect("claims").clone();
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if claims.is_empty() {
            assert!(cursor.is_none(), "an empty page ends the walk: {page}");
            break;
        }
        assert!(
            claims.iter().all(|c| c["tags"]["customer"] == "acme"),
            "{page}"
        );
        seen.extend(claims.iter().map(|c| c["id"].clone()));
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "both of the caller's claims, one per page: {seen:?}"
    );
}

#[tokio::test]
async fn a_claim_client_is_confined_to_its_provision_topics_and_a_wrong_token_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let claim = create_claim(&server, json!({})).await;
    let token = claim["token"].as_str().expect("token");

    // Publishing outside provision/<cid>/request: v5 PUBACK 0x87 (not authorized).
    for topic in [
        "devices/sn-1/telemetry",
        "provision/sn-2/request",
        "provision/sn-1/accepted",
    ] {
        let mut args = claim_args(&server, token, "sn-1");
        args.extend(s(&["-q", "1", "-t", topic, "-m", "{}"]));
        let out = mosquitto_pub(&args);
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(err.contains("not authorized"), "{topic}: {err}");
    }
    // Subscribing outside provision/<cid>/#: SUBACK 0x87.
    for filter in ["devices/#", "provision/+/accepted", "#"] {
        let mut args = claim_args(&server, token, "sn-1");
        args.extend(s(&["-t", filter, "-C", "1", "-W", "10", "-d"]));
        let out = Command::new("mosquitto_sub")
            .args(&args)
            .output()
            .expect("sub");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("Subscribed (mid: 1): 135"),
            "{filter}: {text}"
        );
    }
    // A retained request is refused (0x87) and starts no enrollment.
    let mut args = claim_args(&server, token, "sn-1");
    args.extend(s(&[
        "-q",
        "1",
        "-r",
        "-t",
        "provision/sn-1/request",
        "-m",
        "{}",
    ]));
    let out = mosquitto_pub(&args);
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("not authorized"), "{err}");

    // A wrong token (and none at all): bad user name or password at CONNECT.
    for password in [format!("mct_{}", "f".repeat(64)), "nonsense".to_owned()] {
        let mut args = claim_args(&server, &password, "sn-1");
        args.extend(s(&["-q", "1", "-t", "provision/sn-1/request", "-m", "{}"]));
        let out = mosquitto_pub(&args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(err.contains("bad user name or password"), "{err}");
    }
    let refused = ClaimClient::connect(&server, "mct_wrong", "sn-1").await;
    assert!(refused.is_err());

    // A claim client's session is not kept, whatever it asked for (v5 session expiry 3600 s,
    // no clean start): once it is gone the broker holds no session.
    let mut args = claim_args(&server, token, "sn-1");
    args.extend(s(&[
        "-x",
        "3600",
        "-c",
        "-t",
        "provision/sn-1/#",
        "-C",
        "1",
        "-W",
        "1",
    ]));
    Command::new("mosquitto_sub")
        .args(&args)
        .output()
        .expect("sub");
    server
        .wait_metric("mooring_mqtt_sessions", |v| v == 0.0)
        .await;

    // The holder of another claim cannot take over an enrolling device's session by using its
    // client id (its serial is easy to guess): refused as "client identifier not valid" while
    // the first is connected, which keeps its session.
    let other = create_claim(&server, json!({})).await;
    let mut first = support::Sub::start(&{
        let mut a = claim_args(&server, token, "sn-7");
        a.extend(s(&["-t", "provision/sn-7/#"]));
        a
    });
    let mut args = claim_args(&server, other["token"].as_str().expect("token"), "sn-7");
    args.extend(s(&["-q", "1", "-t", "provision/sn-7/request", "-m", "{}"]));
    let out = mosquitto_pub(&args);
    assert!(!out.status.success(), "a second claim took the client id");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("client identifier"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(first.is_running(), "the first session was closed");
}

#[tokio::test]
async fn mqtt_rejections_carry_the_http_error_codes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let claim = create_claim(&server, json!({"count": 1})).await;
    let token = claim["token"].as_str().expect("token");
    let mut client = ClaimClient::connect(&server, token, "sn-7")
        .await
        .expect("connect");
    let csr = key_and_csr(tmp.path(), "k");
    for (request, want) in [
        (
            json!({"v": 1, "csr_pem": "nope", "device_id": "sn-7"}),
            "invalid_csr",
        ),
        (
            json!({"v": 1, "csr_pem": csr, "device_id": "bad/id"}),
            "invalid_device_id",
        ),
        (json!({"v": 1, "csr_pem": csr}), "invalid_device_id"),
        (json!({"v": 2, "csr_pem": csr}), "invalid_request"),
    ] {
        let (kind, answer) = client.enroll(&request).await;
        assert_eq!(
            (kind.as_str(), answer["code"].as_str()),
            ("rejected", Some(want)),
            "{answer}"
        );
    }
    // Revoked while connected: the next request is refused with claim_invalid.
    server
        .api(
            "DELETE",
            &format!("/api/v1/claims/{}", claim["id"].as_str().expect("id")),
            None,
        )
        .await;
    let (kind, answer) = client
        .enroll(&json!({"v": 1, "csr_pem": csr, "device_id": "sn-7"}))
        .await;
    assert_eq!(
        (kind.as_str(), answer["code"].as_str()),
        ("rejected", Some("claim_invalid"))
    );
    let (status, _) = server.api("GET", "/api/v1/devices/sn-7", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn claim_connections_and_requests_are_bounded() {
    let tmp = tempfile::tempdir().expect("tmp");
    let args = support::config_args(
        tmp.path(),
        "[provisioning]\nconnections_per_claim_max = 1\nrequests_per_minute_max = 2\n",
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start_with(
        &tmp.path().join("data"),
        "127.0.0.1:0",
        "127.0.0.1:0",
        &args,
    );
    let claim = create_claim(&server, json!({"count": 5})).await;
    let token = claim["token"].as_str().expect("token");
    let other = create_claim(&server, json!({})).await;

    let mut first = ClaimClient::connect(&server, token, "sn-a")
        .await
        .expect("first");
    // A second connection with the same claim: refused (server unavailable), another claim's
    // is not.
    let refused = ClaimClient::connect(&server, token, "sn-b").await;
    assert!(refused.is_err());
    let _other = ClaimClient::connect(&server, other["token"].as_str().expect("token"), "sn-c")
        .await
        .expect("another claim");

    // Two requests a minute per client: the third is rejected with rate_limited.
    let bad = json!({"v": 1, "csr_pem": "nope", "device_id": "sn-a"});
    for want in ["invalid_csr", "invalid_csr", "rate_limited"] {
        let (kind, answer) = first.enroll(&bad).await;
        assert_eq!(
            (kind.as_str(), answer["code"].as_str()),
            ("rejected", Some(want))
        );
    }

    // Once the first is gone, the claim's place is free again.
    drop(first);
    let deadline = std::time::Instant::now() + support::WAIT;
    loop {
        if ClaimClient::connect(&server, token, "sn-b").await.is_ok() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "place never freed");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A revoked and deleted device does not come back when its key enrolls again with the same
/// claim (a stolen unit replaying its request): the stored enrollment went with the device.
/// Failed attempts from one address do not lock out a live token from the same address (many
/// devices share a factory NAT or a load balancer).
#[tokio::test]
async fn a_deleted_device_is_not_revived_by_replaying_its_enrollment_and_a_live_token_is_never_throttled(
) {
    let tmp = tempfile::tempdir().expect("tmp");
    let server = Server::start(&tmp.path().join("data"));
    let claim = create_claim(&server, json!({"count": 1, "ttl": "1h"})).await;
    let token = claim["token"].as_str().expect("token");
    let csr = key_and_csr(tmp.path(), "stolen");
    let request = json!({"claim_token": token, "csr_pem": csr, "device_id": "lock-5"});
    let (status, first) = https_enroll(&server, request.clone()).await;
    assert_eq!(status, 201, "{first}");
    let out = server.cli(&["device", "revoke", "lock-5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = server.cli(&["device", "delete", "lock-5"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, again) = https_enroll(&server, request).await;
    assert_eq!((status, code(&again)), (409, "claim_used"), "{again}");
    let (status, _) = server.api("GET", "/api/v1/devices/lock-5", None).await;
    assert_eq!(status, 404, "the deleted device stays deleted");

    // Unknown tokens from this address until it is throttled; a live token still enrolls.
    let live = create_claim(&server, json!({"count": 1, "ttl": "1h"})).await;
    let bogus = json!({"claim_token": "mct_0000", "csr_pem": "x", "device_id": "x-1"});
    let mut throttled = false;
    for _ in 0..100 {
        let (status, body) = https_enroll(&server, bogus.clone()).await;
        if status == 429 {
            throttled = true;
            break;
        }
        assert_eq!(code(&body), "claim_invalid", "{body}");
    }
    assert!(throttled, "unknown tokens are throttled per address");
    let csr = key_and_csr(tmp.path(), "fresh");
    let (status, ok) = https_enroll(
        &server,
        json!({"claim_token": live["token"], "csr_pem": csr, "device_id": "lock-6"}),
    )
    .await;
    assert_eq!(status, 201, "{ok}");

    // A claim acts for its creator: once the operator's token is revoked, it enrolls no one.
    let (status, op) = server
        .api(
            "POST",
            "/api/v1/tokens",
            Some(json!({"name": "line-3", "role": "operator"})),
        )
        .await;
    assert_eq!(status, 201, "{op}");
    let secret = op["token"].as_str().expect("secret");
    let made = support::call(
        &server,
        "post",
        "/api/v1/claims",
        Some(secret),
        None,
        &[],
        Some(json!({"count": 5})),
    )
    .await;
    assert_eq!(made.status, 201, "{}", made.body);
    let line_token = made.body["token"].as_str().expect("claim token").to_owned();
    let csr = key_and_csr(tmp.path(), "line-1");
    let (status, body) = https_enroll(
        &server,
        json!({"claim_token": line_token, "csr_pem": csr, "device_id": "line-1"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = server
        .api(
            "DELETE",
            &format!("/api/v1/tokens/{}", op["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let csr = key_and_csr(tmp.path(), "line-2");
    let (status, body) = https_enroll(
        &server,
        json!({"claim_token": line_token, "csr_pem": csr, "device_id": "line-2"}),
    )
    .await;
    assert_eq!((status, code(&body)), (401, "claim_invalid"), "{body}");
}
