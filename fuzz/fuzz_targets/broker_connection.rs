//! Fuzz target: a broker connection (`Broker::serve_connection`) fed arbitrary bytes.
//!
//! The first input byte picks the scenario, the rest is what the client sends:
//!
//! * bits 0-1, what precedes the fuzzed bytes: 0 nothing (the fuzzer writes the CONNECT too),
//!   1 a valid MQTT 3.1.1 CONNECT, 2 a valid MQTT 5 CONNECT, 3 a valid MQTT 5 CONNECT asking for
//!   a small Receive Maximum, Maximum Packet Size and Topic Alias Maximum;
//! * bit 2: that CONNECT asks for a persistent session (3.1.1 clean session 0, v5 expiry 3600 s);
//! * bit 3: the client is a device (`d1`, tags `site=s1`, `evil=x/+`) under a policy with tag
//!   substitutions, instead of the allow-all development principal;
//! * bit 4: the bytes are split in two (at the point the next byte names) and sent over two
//!   connections with the same CONNECT, so the second one resumes or takes over the session;
//! * bit 5: the two connections run at the same time (takeover) instead of one after the other;
//! * bit 6: a second client, connected and subscribed to `#` at QoS 2 with a small Receive
//!   Maximum and Maximum Packet Size, receives whatever is routed and never acknowledges it.
//!
//! Time is tokio's paused clock, so keep-alive, connect timeouts, will delays and session
//! expiry fire at once. The client closes its side after writing and reads (and drops) all the
//! server sends. Checked: no panic (the broker contains connection panics and counts them in
//! `stats().panics`, so the counter must stay 0; libFuzzer's panic hook also aborts on any),
//! every connection ends after its client closed, `on_disconnected` is called once for every
//! `on_connected`, and once every session has expired the broker holds no session and no
//! subscription. Memory is bounded by libFuzzer's `-rss_limit_mb` / `-malloc_limit_mb`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooring_broker::{
    Authenticated, Broker, BrokerConfig, ConnInfo, ConnectRefusal, ConnectRequest, Hooks,
    ListenerKind, Message, Principal, PublishVerdict,
};
use mooring_proto::policy::{Action, Policy, PrincipalKind, Rule};
use mooring_proto::telemetry::Telemetry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The subscriber client's id (always the allow-all principal).
const SUBSCRIBER: &str = "fuzz-sub";
/// Far longer than any broker timer (keep-alive 1.5 × 3600 s, session expiry 7 days).
const END_OF_TIME: Duration = Duration::from_secs(30 * 24 * 3600);

struct FuzzHooks {
    device: bool,
    policy: Policy,
    connected: AtomicU64,
    disconnected: AtomicU64,
}

impl FuzzHooks {
    fn new(device: bool) -> FuzzHooks {
        let rule = |principal, action, filter: &str| Rule {
            principal,
            action,
            filter: filter.into(),
        };
        let policy = Policy::with_rules(vec![
            rule(
                PrincipalKind::Device,
                Action::Subscribe,
                "fleet/broadcast/#",
            ),
            rule(PrincipalKind::Device, Action::Both, "sites/{tag:site}/+/#"),
            rule(PrincipalKind::Device, Action::Both, "evil/{tag:evil}/x"),
        ])
        .expect("valid fuzz policy");
        FuzzHooks {
            device,
            policy,
            connected: AtomicU64::new(0),
            disconnected: AtomicU64::new(0),
        }
    }
}

#[async_trait::async_trait]
impl Hooks for FuzzHooks {
    async fn authenticate(&self, req: ConnectRequest<'_>) -> Result<Authenticated, ConnectRefusal> {
        match (req.username, req.password) {
            (_, Some(b"wrong")) => return Err(ConnectRefusal::BadUsernameOrPassword),
            (Some("refuse"), _) => return Err(ConnectRefusal::NotAuthorized),
            _ => {}
        }
        let principal = if self.device && req.client_id != SUBSCRIBER {
            Principal::Device {
                id: mooring_proto::DeviceId::parse("d1").expect("a valid id"),
                tags: [
                    ("site".to_owned(), "s1".to_owned()),
                    ("evil".to_owned(), "x/+".to_owned()),
                ]
                .into(),
            }
        } else {
            Principal::Dev
        };
        // Username `rename` exercises the broker telling a v5 client another id.
        let client_id = if req.username == Some("rename") {
            "renamed".to_owned()
        } else {
            req.client_id.to_owned()
        };
        Ok(Authenticated {
            client_id,
            principal,
        })
    }

    fn may_publish(&self, principal: &Principal, topic: &str) -> bool {
        self.policy.may_publish(principal, topic)
    }

    fn may_subscribe(&self, principal: &Principal, filter: &str) -> bool {
        self.policy.may_subscribe(principal, filter)
    }

    async fn on_publish(&self, _: &Principal, _: &str, msg: &Message) -> PublishVerdict {
        if msg.topic.starts_with("slow/") {
            // Acks wait for this; the connection keeps reading meanwhile.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        if msg.topic.ends_with("/telemetry") && Telemetry::parse(&msg.payload).is_err() {
            return PublishVerdict::Reject(0x99);
        }
        if msg.topic == "verdict/disconnect" {
            return PublishVerdict::Disconnect;
        }
        PublishVerdict::Accept
    }

    fn on_connected(&self, _: &str, _: &Principal) {
        self.connected.fetch_add(1, Ordering::SeqCst);
    }

    fn on_disconnected(&self, _: &str, _: &Principal) {
        self.disconnected.fetch_add(1, Ordering::SeqCst);
    }
}

fn info() -> ConnInfo {
    ConnInfo {
        peer: None,
        cert_identity: None,
        cert_sha256: None,
        cert_der: None,
        listener: ListenerKind::Dev,
    }
}

/// MQTT variable byte integer.
fn push_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn push_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    push_varint(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// A CONNECT (keep-alive 60 s). `props` is `None` for 3.1.1, the v5 properties otherwise.
fn connect(client_id: &str, clean: bool, props: Option<&[u8]>) -> Vec<u8> {
    let mut body = Vec::new();
    push_str(&mut body, "MQTT");
    body.push(if props.is_some() { 5 } else { 4 });
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&60u16.to_be_bytes());
    if let Some(props) = props {
        push_varint(&mut body, props.len());
        body.extend_from_slice(props);
    }
    push_str(&mut body, client_id);
    packet(0x10, &body)
}

/// The CONNECT the scenario byte asks for, if any.
fn prefix(mode: u8) -> Vec<u8> {
    let persistent = mode & 0x04 != 0;
    let mut props = Vec::new();
    if persistent {
        props.push(0x11); // Session Expiry Interval
        props.extend_from_slice(&3600u32.to_be_bytes());
    }
    match mode & 0x03 {
        0 => Vec::new(),
        1 => connect("c1", !persistent, None),
        2 => connect("c1", !persistent, Some(&props)),
        _ => {
            props.extend_from_slice(&[0x21, 0, 2]); // Receive Maximum 2
            props.extend_from_slice(&[0x27, 0, 0, 1, 0]); // Maximum Packet Size 256
            props.extend_from_slice(&[0x22, 0, 2]); // Topic Alias Maximum 2
            connect("c1", !persistent, Some(&props))
        }
    }
}

/// The subscriber's CONNECT + SUBSCRIBE `#` (QoS 2).
fn subscriber_hello() -> Vec<u8> {
    let mut props = Vec::new();
    props.extend_from_slice(&[0x21, 0, 2]); // Receive Maximum 2
    props.extend_from_slice(&[0x27, 0, 0, 0, 128]); // Maximum Packet Size 128
    let mut out = connect(SUBSCRIBER, true, Some(&props));
    let mut sub = vec![0, 1, 0]; // packet id 1, no properties
    push_str(&mut sub, "#");
    sub.push(0x02);
    out.extend(packet(0x82, &sub));
    out
}

/// One client: writes `bytes`, closes its side once `close` resolves, reads until the server
/// closes. Returns when the broker has finished with the connection.
async fn client(broker: &Broker, bytes: Vec<u8>, close: impl std::future::Future<Output = ()>) {
    let (client, server) = tokio::io::duplex(16 * 1024);
    let (mut rd, mut wr) = tokio::io::split(client);
    let write = async move {
        let _ = wr.write_all(&bytes).await;
        close.await;
        let _ = wr.shutdown().await;
    };
    let read = async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::join!(broker.serve_connection(server, info()), write, read);
}

/// Whether the subscriber client's SUBSCRIBE is in (its session holds a subscription).
fn subscribed(broker: &Broker) -> bool {
    broker
        .session_info(SUBSCRIBER)
        .is_some_and(|i| i.connected && i.subscriptions > 0)
}

async fn scenario(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let hooks = Arc::new(FuzzHooks::new(mode & 0x08 != 0));
    let broker = Broker::new(BrokerConfig::default(), hooks.clone());

    let (sub_close_tx, sub_close_rx) = tokio::sync::oneshot::channel::<()>();
    let subscriber = (mode & 0x40 != 0).then(|| {
        let broker = broker.clone();
        tokio::spawn(async move {
            let close = async move {
                let _ = sub_close_rx.await;
            };
            client(&broker, subscriber_hello(), close).await;
        })
    });
    if subscriber.is_some() {
        for _ in 0..100 {
            if subscribed(&broker) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert!(subscribed(&broker), "subscriber never got its SUBSCRIBE in");
    }

    let hello = prefix(mode);
    let with_hello = |part: &[u8]| [hello.as_slice(), part].concat();
    let done = async {};
    if mode & 0x10 != 0 && !rest.is_empty() {
        let at = usize::from(rest[0]) * (rest.len() - 1) / 255 + 1;
        let (a, b) = rest[1..].split_at(at - 1);
        let (a, b) = (with_hello(a), with_hello(b));
        if mode & 0x20 != 0 {
            tokio::join!(client(&broker, a, done), client(&broker, b, async {}));
        } else {
            client(&broker, a, done).await;
            client(&broker, b, async {}).await;
        }
    } else {
        client(&broker, with_hello(rest), done).await;
    }

    drop(sub_close_tx);
    if let Some(subscriber) = subscriber {
        subscriber.await.expect("subscriber task");
    }

    let stats = broker.stats();
    assert_eq!(
        stats.panics, 0,
        "a connection task panicked (contained by the broker)"
    );
    assert_eq!(stats.connections, 0, "a connection outlived its client");
    assert_eq!(
        hooks.connected.load(Ordering::SeqCst),
        hooks.disconnected.load(Ordering::SeqCst),
        "on_disconnected not called exactly once per on_connected"
    );

    // Let every session expire and every delayed will fire.
    tokio::time::sleep(END_OF_TIME).await;
    let stats = broker.stats();
    assert_eq!(stats.panics, 0, "a broker timer task panicked");
    assert_eq!(stats.sessions, 0, "a session outlived its expiry");
    assert_eq!(
        stats.subscriptions, 0,
        "the subscription index kept entries of dead sessions"
    );
    broker.shutdown().await;
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        tokio::time::timeout(END_OF_TIME * 2, scenario(data))
            .await
            .expect("the scenario did not end: a connection survived its client closing");
    });
});
