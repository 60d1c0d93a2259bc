//! The conformance suite against [`NatsBus`] on a real NATS server with JetStream
//! (`MOORING_TEST_NATS_URL`, default `nats://127.0.0.1:4222`; CI and the dev machine run one).
//! Each case uses its own random prefix and deletes its streams when it ends, pass or fail.
//! Without a server these tests fail, saying so: they are never skipped.

use std::sync::Arc;

use futures::StreamExt;
use mooring_bus::{Bus, BusConfig, BusError, NatsBus, NatsConfig};

fn nats_url() -> String {
    std::env::var("MOORING_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

fn unique_prefix() -> String {
    format!("mooring-t{:016x}", rand::random::<u64>())
}

/// Deletes every stream under its prefix when dropped (on its own thread and runtime: it also
/// runs while a failed case unwinds).
struct Cleanup {
    url: String,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, stream_prefix) = (self.url.clone(), format!("{}_", self.prefix));
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let client = async_nats::connect(url).await.map_err(|e| e.to_string())?;
                let js = async_nats::jetstream::new(client);
                let mut names = js.stream_names();
                let mut mine = Vec::new();
                while let Some(name) = names.next().await {
                    let name = name.map_err(|e| e.to_string())?;
                    if name.starts_with(&stream_prefix) {
                        mine.push(name);
                    }
                }
                for name in mine {
                    js.delete_stream(&name).await.map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            })
        })
        .join();
        match cleaned {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cleaning up NATS prefix {}: {e}", self.prefix),
            Err(_) => eprintln!("cleaning up NATS prefix {} panicked", self.prefix),
        }
    }
}

async fn connect(config: NatsConfig) -> NatsBus {
    let url = config.url.clone();
    match NatsBus::connect(config).await {
        Ok(bus) => bus,
        Err(e) => panic!(
            "these tests need a NATS server with JetStream at {url} \
             (set MOORING_TEST_NATS_URL, or start one: nats-server -js): {e}"
        ),
    }
}

async fn fresh_bus(bus: BusConfig) -> (Arc<dyn Bus>, Cleanup) {
    let config = NatsConfig {
        bus,
        ..NatsConfig::new(nats_url(), unique_prefix())
    };
    let cleanup = Cleanup {
        url: config.url.clone(),
        prefix: config.prefix.clone(),
    };
    (Arc::new(connect(config).await), cleanup)
}

mooring_bus::conformance_tests!(fresh_bus);

#[tokio::test]
async fn unreachable_server_is_unavailable() {
    let config = NatsConfig {
        connect_timeout_ms: 2_000,
        // Port 1 on loopback: nothing listens there, the connection is refused at once.
        ..NatsConfig::new("nats://127.0.0.1:1", unique_prefix())
    };
    match NatsBus::connect(config).await {
        Err(BusError::Unavailable(msg)) => assert!(msg.contains("127.0.0.1:1"), "{msg}"),
        other => panic!("expected Unavailable, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn buses_with_different_prefixes_do_not_see_each_other() {
    let (one, _c1) = fresh_bus(mooring_bus::conformance::config()).await;
    let (two, _c2) = fresh_bus(mooring_bus::conformance::config()).await;
    let mut sub_two = two.subscribe(">").await.expect("subscribe");
    one.publish("p", "from one".into()).await.expect("publish");
    two.publish("p", "from two".into()).await.expect("publish");
    let m = tokio::time::timeout(mooring_bus::conformance::WAIT, sub_two.next())
        .await
        .expect("a message")
        .expect("open");
    assert_eq!(&m.payload[..], b"from two");

    one.enqueue("q", "from one".into()).await.expect("enqueue");
    two.enqueue("q", "from two".into()).await.expect("enqueue");
    let mut consumer = two.consume("q").await.expect("consume");
    let d = tokio::time::timeout(mooring_bus::conformance::WAIT, consumer.next())
        .await
        .expect("a delivery")
        .expect("delivery");
    assert_eq!(&d.payload[..], b"from two");
}

#[tokio::test]
async fn invalid_prefix_and_oversized_payload_maximum_are_refused() {
    let err = NatsBus::connect(NatsConfig::new(nats_url(), "has_underscore"))
        .await
        .err();
    assert!(
        matches!(err, Some(BusError::InvalidQueue { .. })),
        "{err:?}"
    );

    let config = NatsConfig {
        bus: BusConfig {
            payload_bytes_max: 1 << 30,
            ..BusConfig::default()
        },
        ..NatsConfig::new(nats_url(), unique_prefix())
    };
    let err = NatsBus::connect(config).await.err();
    assert!(matches!(err, Some(BusError::InvalidConfig(_))), "{err:?}");
}
