//! Fuzz target: `Telemetry::parse` on arbitrary payload bytes (what a device publishes on
//! `devices/<id>/telemetry`).
//!
//! Besides "no panic, bounded memory", a parsed message must encode (`to_bytes`) to a payload that
//! parses again with the same `seq` and `ts`, no more points (names that repeat collapse into
//! one), only finite numbers, and names within the length bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooring_proto::telemetry::{
    MetricValue, Telemetry, METRIC_NAME_LEN_MAX, POINTS_PER_MESSAGE_MAX,
};

fuzz_target!(|data: &[u8]| {
    let Ok(t) = Telemetry::parse(data) else {
        return;
    };
    assert!(t.points.len() <= POINTS_PER_MESSAGE_MAX);
    for (name, value) in &t.points {
        assert!(name.len() <= METRIC_NAME_LEN_MAX, "{name}");
        if let MetricValue::Number(n) = value {
            assert!(n.is_finite(), "{name}: {n}");
        }
    }
    let again = Telemetry::parse(&t.to_bytes()).expect("an encoded message parses");
    assert_eq!((again.seq, again.ts_ms), (t.seq, t.ts_ms));
    assert!(again.points.len() <= t.points.len());
    for (name, _) in &again.points {
        assert!(t.points.iter().any(|(n, _)| n == name), "{name}");
    }
});
