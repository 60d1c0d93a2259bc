//! Rough QoS 0 throughput through in-memory connections: `cargo run --release -p mooring-broker --example throughput`.

#[path = "../tests/support/mod.rs"]
mod support;

use mqtt_protocol_core::mqtt::packet::GenericPacketTrait;
use support::*;
use tokio::io::AsyncWriteExt;

const MESSAGES: usize = 200_000;

#[tokio::main]
async fn main() {
    // A queue large enough that no QoS 0 message is dropped: this measures the pipeline, not the
    // drop policy (with the default 1000 the publisher outruns the subscriber and drops are counted).
    let config = mooring_broker::BrokerConfig {
        session_queue_len_max: MESSAGES,
        ..Default::default()
    };
    let (broker, _) = broker_with(config);
    let mut sub = RawClient::open(&broker, false);
    sub.connect("sub").await;
    sub.subscribe("bench/#", 0).await;
    let mut publisher = RawClient::open(&broker, false);
    publisher.connect("pub").await;

    let one = mqtt_protocol_core::mqtt::packet::v3_1_1::Publish::builder()
        .topic_name("bench/t")
        .expect("topic")
        .payload(vec![b'x'; 64])
        .build()
        .expect("publish");
    let encoded =
        mqtt_protocol_core::mqtt::packet::GenericPacket::<u16>::from(one).to_continuous_buffer();
    let start = std::time::Instant::now();
    let writer = tokio::spawn(async move {
        for _ in 0..MESSAGES {
            publisher.io.write_all(&encoded).await.expect("write");
        }
        publisher
    });
    let mut got = 0;
    while got < MESSAGES {
        match sub.recv().await {
            Some(p) if as_publish(&p).is_some() => got += 1,
            Some(_) => {}
            None => break,
        }
    }
    let elapsed = start.elapsed();
    let _publisher = writer.await.expect("writer");
    println!(
        "{got} QoS0 messages (64 B payload) pub -> broker -> sub in {elapsed:?}: {:.0} msg/s",
        got as f64 / elapsed.as_secs_f64()
    );
    println!("stats: {:?}", broker.stats());
}
