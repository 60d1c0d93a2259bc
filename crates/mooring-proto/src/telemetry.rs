//! Telemetry payload, schema v1 (`devices/<id>/telemetry`): parse, flatten, encode.
//!
//! A message is one JSON object. Reserved keys: `seq` (u64, optional; a repeated
//! `(device, seq)` is stored once) and `ts` (unix milliseconds, optional; default the server's
//! receive time). Every other number or boolean is a metric point; nested objects flatten to
//! `a.b`; strings, arrays and nulls are ignored. The schema version is carried by the topic: a
//! future incompatible schema gets a new topic, so v1 devices keep working unchanged.

use serde_json::{Map, Value};

/// Telemetry schema version spoken on `devices/<id>/telemetry`.
pub const SCHEMA_VERSION: u32 = 1;
/// Largest telemetry payload accepted, in bytes.
pub const PAYLOAD_SIZE_BYTES_MAX: usize = 64 * 1024;
/// Most metric points one message may carry.
pub const POINTS_PER_MESSAGE_MAX: usize = 1024;
/// Deepest nesting of objects that is flattened.
pub const NESTING_DEPTH_MAX: usize = 8;
/// Longest flattened metric name, in bytes.
pub const METRIC_NAME_LEN_MAX: usize = 256;

/// A metric value: numbers are stored as `f64`, booleans as booleans.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MetricValue {
    Number(f64),
    Bool(bool),
}

impl MetricValue {
    pub fn to_json(self) -> Value {
        match self {
            MetricValue::Number(n) => serde_json::Number::from_f64(n)
                .map(Value::Number)
                .unwrap_or(Value::Null),
            MetricValue::Bool(b) => Value::Bool(b),
        }
    }
}

/// One parsed telemetry message.
#[derive(Debug, Clone, PartialEq)]
pub struct Telemetry {
    pub seq: Option<u64>,
    pub ts_ms: Option<u64>,
    /// `(flattened metric name, value)`, in document order.
    pub points: Vec<(String, MetricValue)>,
}

/// Why a telemetry payload was rejected. Maps to MQTT v5 reason 0x99 (payload format invalid).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TelemetryError {
    #[error("payload is {0} bytes, more than the 65536 allowed")]
    TooLarge(usize),
    #[error("payload is not valid JSON: {0}")]
    NotJson(String),
    #[error("payload must be a JSON object")]
    NotObject,
    #[error("`seq` must be a non-negative integer")]
    BadSeq,
    #[error("`ts` must be a non-negative integer (unix milliseconds)")]
    BadTs,
    #[error("more than {POINTS_PER_MESSAGE_MAX} metric points")]
    TooManyPoints,
    #[error("objects nested deeper than {NESTING_DEPTH_MAX} levels")]
    TooDeep,
    #[error("metric name longer than {METRIC_NAME_LEN_MAX} bytes")]
    NameTooLong,
}

impl Telemetry {
    /// Parses a v1 telemetry payload.
    pub fn parse(payload: &[u8]) -> Result<Telemetry, TelemetryError> {
        if payload.len() > PAYLOAD_SIZE_BYTES_MAX {
            return Err(TelemetryError::TooLarge(payload.len()));
        }
        let value: Value =
            serde_json::from_slice(payload).map_err(|e| TelemetryError::NotJson(e.to_string()))?;
        let Value::Object(map) = value else {
            return Err(TelemetryError::NotObject);
        };
        let mut out = Telemetry {
            seq: None,
            ts_ms: None,
            points: Vec::new(),
        };
        for (key, value) in &map {
            match key.as_str() {
                "seq" => out.seq = Some(value.as_u64().ok_or(TelemetryError::BadSeq)?),
                "ts" => out.ts_ms = Some(value.as_u64().ok_or(TelemetryError::BadTs)?),
                _ => flatten(key, value, 1, &mut out.points)?,
            }
        }
        Ok(out)
    }

    /// Encodes as a v1 payload. Nested names are emitted flat (`"a.b": 1`), which parses back
    /// to the same points.
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        if let Some(seq) = self.seq {
            map.insert("seq".into(), Value::from(seq));
        }
        if let Some(ts) = self.ts_ms {
            map.insert("ts".into(), Value::from(ts));
        }
        for (name, value) in &self.points {
            map.insert(name.clone(), value.to_json());
        }
        Value::Object(map)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_json().to_string().into_bytes()
    }
}

fn flatten(
    name: &str,
    value: &Value,
    depth: usize,
    out: &mut Vec<(String, MetricValue)>,
) -> Result<(), TelemetryError> {
    if name.len() > METRIC_NAME_LEN_MAX {
        return Err(TelemetryError::NameTooLong);
    }
    let point = match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.is_finite() => MetricValue::Number(f),
            _ => return Ok(()),
        },
        Value::Bool(b) => MetricValue::Bool(*b),
        Value::Object(map) => {
            if depth >= NESTING_DEPTH_MAX {
                return Err(TelemetryError::TooDeep);
            }
            for (k, v) in map {
                flatten(&format!("{name}.{k}"), v, depth + 1, out)?;
            }
            return Ok(());
        }
        Value::String(_) | Value::Array(_) | Value::Null => return Ok(()),
    };
    if out.len() >= POINTS_PER_MESSAGE_MAX {
        return Err(TelemetryError::TooManyPoints);
    }
    out.push((name.to_owned(), point));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_reserved_keys_and_flattens() {
        let t = Telemetry::parse(br#"{"seq":7,"ts":1700000000000,"temp":21.5,"ok":true,"name":"x","gps":{"lat":1,"fix":{"q":2}}}"#)
            .expect("valid");
        assert_eq!(t.seq, Some(7));
        assert_eq!(t.ts_ms, Some(1_700_000_000_000));
        assert_eq!(
            t.points,
            vec![
                ("temp".into(), MetricValue::Number(21.5)),
                ("ok".into(), MetricValue::Bool(true)),
                ("gps.lat".into(), MetricValue::Number(1.0)),
                ("gps.fix.q".into(), MetricValue::Number(2.0)),
            ]
        );
    }

    #[test]
    fn rejects_bad_payloads() {
        assert!(matches!(
            Telemetry::parse(b"nope"),
            Err(TelemetryError::NotJson(_))
        ));
        assert_eq!(Telemetry::parse(b"[1]"), Err(TelemetryError::NotObject));
        assert_eq!(
            Telemetry::parse(br#"{"seq":-1}"#),
            Err(TelemetryError::BadSeq)
        );
        assert_eq!(
            Telemetry::parse(br#"{"ts":"now"}"#),
            Err(TelemetryError::BadTs)
        );
        let big = vec![b' '; PAYLOAD_SIZE_BYTES_MAX + 1];
        assert!(matches!(
            Telemetry::parse(&big),
            Err(TelemetryError::TooLarge(_))
        ));
    }

    #[test]
    fn encode_roundtrip() {
        let t = Telemetry {
            seq: Some(3),
            ts_ms: None,
            points: vec![("a.b".into(), MetricValue::Number(2.5))],
        };
        assert_eq!(Telemetry::parse(&t.to_bytes()).expect("valid"), t);
    }
}
