//! Golden tests: the exact bytes of every payload version ever shipped. Devices in the field
//! run old firmware for years; if one of these fails, the change broke them. Add a new case for
//! a new version; never edit an old one.

use mooring_proto::telemetry::{MetricValue, Telemetry, TelemetryError};
use mooring_proto::{DeviceId, Topic};

fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).expect("valid id")
}

#[test]
fn topics_v1() {
    assert_eq!(
        Topic::telemetry(&id("lock-01")),
        "devices/lock-01/telemetry"
    );
    assert_eq!(
        Topic::parse("devices/lock-01/telemetry"),
        Some(Topic::Telemetry(id("lock-01")))
    );
    assert_eq!(
        mooring_proto::topic::device_subtree_filter(&id("lock-01")),
        "devices/lock-01/#"
    );
}

#[test]
fn telemetry_v1_minimal_c_device_payload() {
    // What the docs/protocol.md C example produces with snprintf.
    let t = Telemetry::parse(b"{\"seq\":17,\"temp\":21.5,\"door\":1}").expect("valid");
    assert_eq!(t.seq, Some(17));
    assert_eq!(t.ts_ms, None);
    assert_eq!(
        t.points,
        vec![
            ("temp".to_owned(), MetricValue::Number(21.5)),
            ("door".to_owned(), MetricValue::Number(1.0)),
        ]
    );
}

#[test]
fn telemetry_v1_full_payload() {
    let payload = br#"{"seq":18446744073709551615,"ts":1767225600000,"bat":{"v":3.71,"charging":false},"rssi":-71,"fw":"1.4.0","tags":[1,2],"nothing":null}"#;
    let t = Telemetry::parse(payload).expect("valid");
    assert_eq!(t.seq, Some(u64::MAX));
    assert_eq!(t.ts_ms, Some(1_767_225_600_000));
    assert_eq!(
        t.points,
        vec![
            ("bat.v".to_owned(), MetricValue::Number(3.71)),
            ("bat.charging".to_owned(), MetricValue::Bool(false)),
            ("rssi".to_owned(), MetricValue::Number(-71.0)),
        ]
    );
}

#[test]
fn telemetry_v1_encoding_is_stable() {
    let t = Telemetry {
        seq: Some(5),
        ts_ms: Some(1_767_225_600_000),
        points: vec![
            ("load.1m".to_owned(), MetricValue::Number(0.25)),
            ("online".to_owned(), MetricValue::Bool(true)),
        ],
    };
    assert_eq!(
        String::from_utf8(t.to_bytes()).expect("utf8"),
        r#"{"seq":5,"ts":1767225600000,"load.1m":0.25,"online":true}"#
    );
}

#[test]
fn telemetry_v1_rejections() {
    assert!(matches!(
        Telemetry::parse(b"21.5"),
        Err(TelemetryError::NotObject)
    ));
    assert!(matches!(
        Telemetry::parse(b"{\"seq\":1.5}"),
        Err(TelemetryError::BadSeq)
    ));
    assert!(matches!(
        Telemetry::parse(b"{\"temp\":"),
        Err(TelemetryError::NotJson(_))
    ));
}
