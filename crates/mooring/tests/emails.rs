//! Alert emails (issue 18): `[rules] alert_emails` sends every rule alert's changes through an
//! `[[email]]` channel to a local SMTP sink the test runs (port 0). The sink refuses the first
//! message with a temporary error, so the email is retried by the work queue until it is taken.
//! A real device (rumqttc over mutual TLS) publishes the telemetry that raises the alert.

mod support;

use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{MqttDevice, Server, WAIT};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// What the sink took: each message's DATA.
type Taken = Arc<Mutex<Vec<String>>>;

/// A minimal SMTP server: answers the commands a client sends for one message, refuses the
/// first `refuse` messages after their DATA with `451`, takes the others.
async fn smtp_sink(refuse: usize) -> (std::net::SocketAddr, Taken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let taken: Taken = Arc::default();
    let seen = Arc::new(Mutex::new(0usize));
    let state = taken.clone();
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let (taken, seen) = (state.clone(), seen.clone());
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                let _ = w.write_all(b"220 sink ESMTP\r\n").await;
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
                    let answer: &[u8] = match verb.as_str() {
                        "EHLO" | "HELO" => b"250-sink\r\n250 8BITMIME\r\n",
                        "DATA" => {
                            let _ = w.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await;
                            let mut data = String::new();
                            while let Ok(Some(l)) = lines.next_line().await {
                                if l == "." {
                                    break;
                                }
                                data.push_str(&l);
                                data.push('\n');
                            }
                            let n = {
                                let mut seen = seen.lock().expect("lock");
                                *seen += 1;
                                *seen
                            };
                            if n <= refuse {
                                b"451 try again later\r\n"
                            } else {
                                taken.lock().expect("lock").push(data);
                                b"250 queued\r\n"
                            }
                        }
                        "QUIT" => {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            break;
                        }
                        _ => b"250 OK\r\n",
                    };
                    if w.write_all(answer).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, taken)
}

async fn wait_taken(taken: &Taken, n: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = taken.lock().expect("lock").clone();
        if got.len() >= n {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} emails: {got:?}",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alert_changes_are_emailed_and_a_refused_email_is_retried() {
    let (addr, taken) = smtp_sink(1).await;
    let tmp = tempfile::tempdir().expect("tmp");
    let config = format!(
        "[jobs]\nretry_backoff_ms = 100\npoll_interval_ms = 100\n\
         [rules]\nalert_emails = [\"oncall\"]\n\
         [[email]]\nname = \"oncall\"\nsmtp_url = \"smtp://{addr}\"\n\
         from = \"Mooring <mooring@example.com>\"\nto = [\"ops@example.com\", \"lead@example.com\"]\n"
    );
    let server = Server::start_configured(tmp.path(), &config);
    let (status, v) = server
        .api(
            "POST",
            "/api/v1/rules",
            Some(json!({"name": "hot", "when": "temp > 50", "then": "alert:critical"})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let creds = server.create_device("e1", tmp.path());
    let mut dev = MqttDevice::connect(&server, &creds, "e1").await;
    dev.publish("devices/e1/telemetry", r#"{"temp": 66}"#).await;

    // Refused once (451), then taken: one email for the alert raised.
    let got = wait_taken(&taken, 1).await;
    let mail = &got[0];
    assert!(
        mail.contains("Subject: [Mooring] critical firing: hot on e1"),
        "{mail}"
    );
    assert!(
        mail.contains("ops@example.com") && mail.contains("lead@example.com"),
        "{mail}"
    );
    assert!(mail.contains("mooring@example.com"), "{mail}");
    let (_, open) = server.api("GET", "/api/v1/alerts?state=open", None).await;
    let alert_id = open["alerts"][0]["id"]
        .as_str()
        .expect("an alert")
        .to_owned();
    assert!(mail.contains(&alert_id), "{mail}");

    // Resolved by hand: one more email, saying by whom.
    let (status, v) = server
        .api("POST", &format!("/api/v1/alerts/{alert_id}/resolve"), None)
        .await;
    assert_eq!(status, 200, "{v}");
    let got = wait_taken(&taken, 2).await;
    assert!(
        got[1].contains("Subject: [Mooring] critical resolved: hot on e1"),
        "{}",
        got[1]
    );
    server
        .wait_metric("mooring_alert_emails_total{outcome=\"sent\"}", |n| n == 2.0)
        .await;
    assert!(
        server
            .metric("mooring_alert_emails_total{outcome=\"failed\"}")
            .await
            >= 1.0
    );
}

/// A channel named by `[rules] alert_emails` must exist, and a login's password stays out of
/// the URL: a bad config stops the start, saying why.
#[test]
fn bad_email_channels_stop_the_start() {
    for (toml, why) in [
        ("[rules]\nalert_emails = [\"nobody\"]\n", "no [[email]] defines"),
        (
            "[[email]]\nname = \"x\"\nsmtp_url = \"smtps://u:p@mail.example.com\"\nfrom = \"m@example.com\"\nto = [\"a@example.com\"]\n",
            "username and password_file",
        ),
        (
            "[[email]]\nname = \"x\"\nsmtp_url = \"smtp://mail.example.com:25\"\nfrom = \"m@example.com\"\nto = [\"a@example.com\"]\nusername = \"u\"\npassword_file = \"/nonexistent\"\n",
            "a login needs TLS",
        ),
        (
            "[[email]]\nname = \"x\"\nsmtp_url = \"smtps://mail.example.com\"\nfrom = \"m@example.com\"\nto = [\"a@example.com\"]\ntimeout_ms = 20000\n",
            "at most half of jobs.lease_ms",
        ),
    ] {
        let stderr = support::serve_refused(toml);
        assert!(stderr.contains(why), "{why}: {stderr}");
    }
}
