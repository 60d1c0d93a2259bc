//! Test harness: a broker with test hooks on a TCP port or in-memory streams, and a client driven
//! through mqtt-protocol-core (the byte-level one is `mooring_broker::test_support::raw3`).
#![allow(dead_code)]

pub mod mem_persist;
pub mod principals;

use mooring_broker::{
    Authenticated, Broker, BrokerConfig, ConnInfo, ConnectRefusal, ConnectRequest, Hooks,
    ListenerKind, Message, Principal, PublishVerdict,
};
use mqtt_protocol_core::mqtt;
use mqtt_protocol_core::mqtt::common::Cursor;
use mqtt_protocol_core::mqtt::connection::Event;
use mqtt_protocol_core::mqtt::packet::{v3_1_1, v5_0, GenericPacket, Qos, SubEntry, SubOpts};
use mqtt_protocol_core::mqtt::prelude::*;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// Allows everything except: publish to `forbidden/#`, subscribe to `secret/#`; rejects payload
/// `bad` on `check/#` with 0x99; refuses CONNECT with password `wrong`; panics on `panic/now`.
#[derive(Default)]
pub struct TestHooks {
    pub events: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Hooks for TestHooks {
    async fn authenticate(&self, req: ConnectRequest<'_>) -> Result<Authenticated, ConnectRefusal> {
        if req.password == Some(b"wrong".as_slice()) {
            return Err(ConnectRefusal::BadUsernameOrPassword);
        }
        Ok(Authenticated {
            client_id: req.client_id.to_string(),
            principal: Principal::Dev,
        })
    }
    fn may_publish(&self, _: &Principal, topic: &str) -> bool {
        !topic.starts_with("forbidden/")
    }
    fn may_subscribe(&self, _: &Principal, filter: &str) -> bool {
        !filter.starts_with("secret/")
    }
    async fn on_publish(&self, _: &Principal, _: &str, msg: &Message) -> PublishVerdict {
        assert!(msg.topic != "panic/now", "test hook panics on purpose");
        if msg.topic.starts_with("check/") && msg.payload.as_ref() == b"bad" {
            PublishVerdict::Reject(0x99)
        } else {
            PublishVerdict::Accept
        }
    }
    fn on_connected(&self, client_id: &str, _: &Principal) {
        self.events
            .lock()
            .expect("events lock")
            .push(format!("connected {client_id}"));
    }
    fn on_disconnected(&self, client_id: &str, _: &Principal) {
        self.events
            .lock()
            .expect("events lock")
            .push(format!("disconnected {client_id}"));
    }
}

pub fn dev_info() -> ConnInfo {
    ConnInfo {
        peer: None,
        cert_identity: None,
        cert_sha256: None,
        cert_der: None,
        listener: ListenerKind::Dev,
    }
}

pub fn broker() -> (Broker, Arc<TestHooks>) {
    broker_with(BrokerConfig::default())
}

pub fn broker_with(config: BrokerConfig) -> (Broker, Arc<TestHooks>) {
    let hooks = Arc::new(TestHooks::default());
    (Broker::new(config, hooks.clone()), hooks)
}

/// Bind 127.0.0.1:0 and serve every accepted TCP connection. Returns the port.
pub async fn serve_tcp(broker: &Broker) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let broker = broker.clone();
    tokio::spawn(async move {
        while let Ok((sock, peer)) = listener.accept().await {
            let b = broker.clone();
            tokio::spawn(async move {
                b.serve_connection(
                    sock,
                    ConnInfo {
                        peer: Some(peer),
                        cert_identity: None,
                        cert_sha256: None,
                        cert_der: None,
                        listener: ListenerKind::Dev,
                    },
                )
                .await
            });
        }
    });
    port
}

/// Wait (bounded) until `cond` holds; panics with `what` otherwise.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..500 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

pub fn qos(q: u8) -> Qos {
    match q {
        0 => Qos::AtMostOnce,
        1 => Qos::AtLeastOnce,
        _ => Qos::ExactlyOnce,
    }
}

/// A raw MQTT client driven through `mqtt-protocol-core` over an in-memory stream.
pub struct RawClient {
    pub mqtt: mqtt::Connection<mqtt::role::Client>,
    pub io: DuplexStream,
    pub v5: bool,
    inbox: VecDeque<GenericPacket<u16>>,
    pub closed: bool,
}

impl RawClient {
    /// Open an in-memory connection served by `broker` (not yet CONNECTed).
    pub fn open(broker: &Broker, v5: bool) -> RawClient {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let b = broker.clone();
        tokio::spawn(async move { b.serve_connection(server, dev_info()).await });
        let version = if v5 {
            mqtt::Version::V5_0
        } else {
            mqtt::Version::V3_1_1
        };
        let mut mqtt = mqtt::Connection::<mqtt::role::Client>::new(version);
        mqtt.set_auto_pub_response(true);
        RawClient {
            mqtt,
            io: client,
            v5,
            inbox: VecDeque::new(),
            closed: false,
        }
    }

    async fn apply(&mut self, events: Vec<Event>) {
        for ev in events {
            match ev {
                Event::RequestSendPacket { packet, .. } => {
                    let _ = self.io.write_all(&packet.to_continuous_buffer()).await;
                }
                Event::NotifyPacketReceived(p) => self.inbox.push_back(p),
                _ => {}
            }
        }
    }

    pub async fn send(&mut self, p: GenericPacket<u16>) {
        let events = self.mqtt.send(p);
        self.apply(events).await;
    }

    /// Next packet from the broker, or None if the connection closed. Bounded wait.
    pub async fn recv(&mut self) -> Option<GenericPacket<u16>> {
        let deadline = Duration::from_secs(60);
        tokio::time::timeout(deadline, async {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                if let Some(p) = self.inbox.pop_front() {
                    return Some(p);
                }
                let n = match self.io.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        self.closed = true;
                        return None;
                    }
                    Ok(n) => n,
                };
                let mut cur = Cursor::new(&buf[..n]);
                while (cur.position() as usize) < n {
                    let events = self.mqtt.recv(&mut cur);
                    self.apply(events).await;
                }
            }
        })
        .await
        .expect("broker did not answer in time")
    }

    pub async fn connect_with(
        &mut self,
        client_id: &str,
        clean: bool,
        keepalive_secs: u16,
        will: Option<(&str, &str)>,
        session_expiry_secs: u32,
    ) -> GenericPacket<u16> {
        let p: GenericPacket<u16> = if self.v5 {
            let mut b = v5_0::Connect::builder()
                .client_id(client_id)
                .expect("id")
                .clean_start(clean)
                .keep_alive(keepalive_secs);
            if session_expiry_secs > 0 {
                b = b.props(vec![mqtt::packet::SessionExpiryInterval::new(
                    session_expiry_secs,
                )
                .expect("sei")
                .into()]);
            }
            if let Some((t, m)) = will {
                b = b.will_message(t, m, Qos::AtLeastOnce, false).expect("will");
            }
            b.build().expect("connect").into()
        } else {
            let mut b = v3_1_1::Connect::builder()
                .client_id(client_id)
                .expect("id")
                .clean_session(clean)
                .keep_alive(keepalive_secs);
            if let Some((t, m)) = will {
                b = b.will_message(t, m, Qos::AtLeastOnce, false).expect("will");
            }
            b.build().expect("connect").into()
        };
        self.send(p).await;
        self.recv().await.expect("CONNACK")
    }

    pub async fn connect(&mut self, client_id: &str) -> GenericPacket<u16> {
        self.connect_with(client_id, true, 0, None, 0).await
    }

    pub async fn subscribe(&mut self, filter: &str, q: u8) -> GenericPacket<u16> {
        self.subscribe_opts(filter, SubOpts::new().set_qos(qos(q)))
            .await
    }

    /// SUBSCRIBE one filter with explicit options (v5: no-local, retain-as-published, ...).
    pub async fn subscribe_opts(&mut self, filter: &str, opts: SubOpts) -> GenericPacket<u16> {
        let pid = self.mqtt.acquire_packet_id().expect("pid");
        let entry = SubEntry::new(filter, opts).expect("entry");
        let p: GenericPacket<u16> = if self.v5 {
            v5_0::Subscribe::builder()
                .packet_id(pid)
                .entries(vec![entry])
                .build()
                .expect("sub")
                .into()
        } else {
            v3_1_1::Subscribe::builder()
                .packet_id(pid)
                .entries(vec![entry])
                .build()
                .expect("sub")
                .into()
        };
        self.send(p).await;
        self.recv().await.expect("SUBACK")
    }

    pub async fn publish(&mut self, topic: &str, payload: &str, q: u8, retain: bool) {
        let pid = if q > 0 {
            Some(self.mqtt.acquire_packet_id().expect("pid"))
        } else {
            None
        };
        let p: GenericPacket<u16> = if self.v5 {
            let mut b = v5_0::Publish::builder()
                .topic_name(topic)
                .expect("topic")
                .qos(qos(q))
                .retain(retain)
                .payload(payload);
            if let Some(pid) = pid {
                b = b.packet_id(pid);
            }
            b.build().expect("publish").into()
        } else {
            let mut b = v3_1_1::Publish::builder()
                .topic_name(topic)
                .expect("topic")
                .qos(qos(q))
                .retain(retain)
                .payload(payload);
            if let Some(pid) = pid {
                b = b.packet_id(pid);
            }
            b.build().expect("publish").into()
        };
        self.send(p).await;
    }

    /// UNSUBSCRIBE one filter; returns the UNSUBACK.
    pub async fn unsubscribe(&mut self, filter: &str) -> GenericPacket<u16> {
        let pid = self.mqtt.acquire_packet_id().expect("pid");
        let p: GenericPacket<u16> = if self.v5 {
            v5_0::Unsubscribe::builder()
                .packet_id(pid)
                .entries(vec![filter])
                .expect("entries")
                .build()
                .expect("unsub")
                .into()
        } else {
            v3_1_1::Unsubscribe::builder()
                .packet_id(pid)
                .entries(vec![filter])
                .expect("entries")
                .build()
                .expect("unsub")
                .into()
        };
        self.send(p).await;
        self.recv().await.expect("UNSUBACK")
    }

    /// The next PUBLISH as (topic, payload, qos, retain, dup), skipping other packets.
    pub async fn next_publish(&mut self) -> (String, String, u8, bool, bool) {
        loop {
            let p = self
                .recv()
                .await
                .expect("a PUBLISH before the connection closed");
            if let Some(p) = as_publish(&p) {
                return p;
            }
        }
    }

    pub async fn ping(&mut self) -> Option<GenericPacket<u16>> {
        let p: GenericPacket<u16> = if self.v5 {
            v5_0::Pingreq::new().into()
        } else {
            v3_1_1::Pingreq::new().into()
        };
        self.send(p).await;
        self.recv().await
    }

    pub async fn disconnect(&mut self) {
        let p: GenericPacket<u16> = if self.v5 {
            v5_0::Disconnect::builder()
                .build()
                .expect("disconnect")
                .into()
        } else {
            v3_1_1::Disconnect::new().into()
        };
        self.send(p).await;
    }
}

/// (topic, payload, qos, retain, dup) of a received PUBLISH.
pub fn as_publish(p: &GenericPacket<u16>) -> Option<(String, String, u8, bool, bool)> {
    let q = |q: Qos| match q {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    };
    match p {
        GenericPacket::V3_1_1Publish(p) => Some((
            p.topic_name().to_string(),
            String::from_utf8_lossy(p.payload().as_slice()).to_string(),
            q(p.qos()),
            p.retain(),
            p.dup(),
        )),
        GenericPacket::V5_0Publish(p) => Some((
            p.topic_name().to_string(),
            String::from_utf8_lossy(p.payload().as_slice()).to_string(),
            q(p.qos()),
            p.retain(),
            p.dup(),
        )),
        _ => None,
    }
}
