//! Routing cost against fleet size: `cargo run --release -p mooring-broker --example route_scale -- [N ...] [--messages M] [--retained]`.
//!
//! For each N: N in-memory device sessions, each subscribed (QoS 0) to `devices/<id>/commands/+`
//! and `devices/<id>/shadow/delta`; then one publisher sends M QoS 0 messages to
//! `devices/<id>/telemetry` (no subscriber) and M to `devices/<id>/commands/x` (one subscriber),
//! rotating over the devices. Reports the setup time (CONNECT + SUBSCRIBE of every device) and
//! msg/s from the first byte written until every message was routed and every command was written
//! to its subscriber. With `--retained`, a retained delta is published for every device before it
//! subscribes (so each SUBSCRIBE gets one retained message), as after a server restart.
//! Runs on a current-thread runtime: the simulator's one core.

use mooring_broker::test_support::AllowAll;
use mooring_broker::{Broker, BrokerConfig, ConnInfo, ListenerKind, Message};
use mqtt_protocol_core::mqtt::packet::{
    v3_1_1, GenericPacket, GenericPacketTrait, Qos, SubEntry, SubOpts,
};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

fn info() -> ConnInfo {
    ConnInfo {
        peer: None,
        cert_identity: None,
        cert_sha256: None,
        cert_der: None,
        listener: ListenerKind::Dev,
    }
}

fn encode(p: impl Into<GenericPacket<u16>>) -> Vec<u8> {
    p.into().to_continuous_buffer()
}

fn connect_bytes(client_id: &str) -> Vec<u8> {
    encode(
        v3_1_1::Connect::builder()
            .client_id(client_id)
            .expect("client id")
            .clean_session(true)
            .keep_alive(0)
            .build()
            .expect("connect"),
    )
}

fn subscribe_bytes(filters: &[String]) -> Vec<u8> {
    let entries: Vec<SubEntry> = filters
        .iter()
        .map(|f| SubEntry::new(f.as_str(), SubOpts::new().set_qos(Qos::AtMostOnce)).expect("entry"))
        .collect();
    encode(
        v3_1_1::Subscribe::builder()
            .packet_id(1)
            .entries(entries)
            .build()
            .expect("subscribe"),
    )
}

fn publish_bytes(topic: &str, payload: &[u8]) -> Vec<u8> {
    encode(
        v3_1_1::Publish::builder()
            .topic_name(topic)
            .expect("topic")
            .payload(payload.to_vec())
            .build()
            .expect("publish"),
    )
}

fn open(broker: &Broker) -> DuplexStream {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let b = broker.clone();
    tokio::spawn(async move { b.serve_connection(server, info()).await });
    client
}

fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(3600);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

async fn run(n: usize, messages: usize, retained: bool) {
    let config = BrokerConfig {
        sessions_max: n + 16,
        retained_messages_max: n + 16,
        session_queue_len_max: messages + 16,
        ..Default::default()
    };
    let broker = Broker::new(config, Arc::new(AllowAll::new()));
    let rss_before = rss_mib();
    if retained {
        for i in 0..n {
            broker.publish(Message::new(
                format!("devices/d{i}/shadow/delta"),
                "{\"fan\":true}",
                1,
                true,
            ));
        }
    }

    let setup = Instant::now();
    let mut devices = Vec::with_capacity(n);
    let mut ack = [0u8; 10]; // CONNACK (4) + SUBACK with two return codes (6)
    for i in 0..n {
        let mut io = open(&broker);
        let mut out = connect_bytes(&format!("d{i}"));
        out.extend(subscribe_bytes(&[
            format!("devices/d{i}/commands/+"),
            format!("devices/d{i}/shadow/delta"),
        ]));
        io.write_all(&out).await.expect("write connect");
        io.read_exact(&mut ack).await.expect("connack + suback");
        devices.push(io);
    }
    let out_base = if retained { n as u64 } else { 0 };
    wait_until("retained deliveries", || {
        broker.stats().messages_out >= out_base
    })
    .await;
    let setup = setup.elapsed();
    let rss_sessions = rss_mib();

    let mut publisher = open(&broker);
    publisher
        .write_all(&connect_bytes("publisher"))
        .await
        .expect("publisher connect");
    publisher
        .read_exact(&mut ack[..4])
        .await
        .expect("publisher connack");
    let mut stream = Vec::new();
    for m in 0..messages {
        let id = m % n;
        stream.extend(publish_bytes(
            &format!("devices/d{id}/telemetry"),
            b"{\"t\":21.5}",
        ));
        stream.extend(publish_bytes(
            &format!("devices/d{id}/commands/x"),
            b"{\"op\":\"reboot\"}",
        ));
    }
    let base = broker.stats();
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        publisher.write_all(&stream).await.expect("publish");
        publisher
    });
    let total_in = base.messages_in + 2 * messages as u64;
    let total_out = base.messages_out + messages as u64;
    wait_until("all messages routed and written", || {
        let s = broker.stats();
        s.messages_in >= total_in && s.messages_out >= total_out
    })
    .await;
    let elapsed = start.elapsed();
    let _publisher = writer.await.expect("writer task");
    let s = broker.stats();
    println!(
        "N={n:>7} setup {setup:>10.2?} ({:>6.0} conn/s) | {} msgs in {elapsed:>9.2?}: {:>9.0} msg/s | rss +{:.0} MiB for sessions | dropped {}",
        n as f64 / setup.as_secs_f64(),
        2 * messages,
        (2 * messages) as f64 / elapsed.as_secs_f64(),
        rss_sessions - rss_before,
        s.dropped,
    );
    broker.shutdown().await;
    drop(devices);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut sizes = Vec::new();
    let mut messages = 20_000;
    let mut retained = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--messages" => {
                messages = args
                    .next()
                    .and_then(|m| m.parse().ok())
                    .expect("--messages <count>");
            }
            "--retained" => retained = true,
            n => sizes.push(n.parse::<usize>().expect("N: number of devices")),
        }
    }
    if sizes.is_empty() {
        sizes = vec![1_000, 10_000, 100_000];
    }
    for n in sizes {
        run(n, messages, retained).await;
    }
}
