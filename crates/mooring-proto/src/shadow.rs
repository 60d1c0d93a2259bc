//! Device shadow (schema v1): reported state up on `devices/<id>/shadow/reported`, the delta
//! down on `devices/<id>/shadow/delta` (retained), and the merge / delta rules both sides use.
//!
//! State documents are JSON objects. A reported update is merged into the stored reported state:
//! objects merge key by key, any other value replaces, and `null` deletes the key (JSON Merge
//! Patch, RFC 7396). The delta holds every key of `desired` whose value differs from `reported`
//! (recursively for objects); an empty delta means the device is in sync.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest shadow document or update, in bytes.
pub const SHADOW_SIZE_BYTES_MAX: usize = 64 * 1024;
/// Deepest nesting of a shadow document.
pub const SHADOW_DEPTH_MAX: usize = 8;

/// Server → device, retained on `devices/<id>/shadow/delta`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowDelta {
    /// Shadow version the delta was computed at.
    pub version: u64,
    /// Desired keys whose value differs from reported.
    pub delta: Value,
}

impl ShadowDelta {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn parse(payload: &[u8]) -> Result<Self, ShadowError> {
        serde_json::from_slice(payload).map_err(|e| ShadowError::Invalid(e.to_string()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShadowError {
    #[error("shadow document must be a JSON object: {0}")]
    Invalid(String),
    #[error("shadow document is larger than 65536 bytes")]
    TooLarge,
    #[error("shadow document nests deeper than 8 levels")]
    TooDeep,
}

/// Parses a reported update (device → server): a JSON object, size and depth bounded.
pub fn parse_update(payload: &[u8]) -> Result<Map<String, Value>, ShadowError> {
    if payload.len() > SHADOW_SIZE_BYTES_MAX {
        return Err(ShadowError::TooLarge);
    }
    match serde_json::from_slice(payload) {
        Ok(Value::Object(m)) => {
            check_depth(&Value::Object(m.clone()), 0)?;
            Ok(m)
        }
        Ok(_) => Err(ShadowError::Invalid("not an object".into())),
        Err(e) => Err(ShadowError::Invalid(e.to_string())),
    }
}

/// Checks a document's nesting depth.
pub fn check_depth(v: &Value, depth: usize) -> Result<(), ShadowError> {
    if depth > SHADOW_DEPTH_MAX {
        return Err(ShadowError::TooDeep);
    }
    match v {
        Value::Object(m) => m.values().try_for_each(|v| check_depth(v, depth + 1)),
        Value::Array(a) => a.iter().try_for_each(|v| check_depth(v, depth + 1)),
        _ => Ok(()),
    }
}

/// JSON Merge Patch (RFC 7396) of `patch` into `target`.
pub fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => {
                let entry = target
                    .entry(k.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !entry.is_object() {
                    *entry = Value::Object(Map::new());
                }
                if let Value::Object(t) = entry {
                    merge(t, p);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// The keys of `desired` whose values differ from `reported` (recursing into objects).
pub fn delta(desired: &Map<String, Value>, reported: &Map<String, Value>) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, d) in desired {
        match (d, reported.get(k)) {
            (Value::Object(dm), Some(Value::Object(rm))) => {
                let sub = delta(dm, rm);
                if !sub.is_empty() {
                    out.insert(k.clone(), Value::Object(sub));
                }
            }
            (d, Some(r)) if d == r => {}
            (d, _) => {
                out.insert(k.clone(), d.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn merge_patch_semantics() {
        let mut t = obj(json!({"a": 1, "b": {"c": 2, "d": 3}, "e": 5}));
        merge(&mut t, &obj(json!({"a": null, "b": {"c": 9}, "f": [1]})));
        assert_eq!(
            Value::Object(t),
            json!({"b": {"c": 9, "d": 3}, "e": 5, "f": [1]})
        );
    }

    #[test]
    fn delta_only_differences() {
        let d = obj(json!({"fw": "1.4", "led": {"on": true, "hz": 2}, "mode": "eco"}));
        let r = obj(json!({"fw": "1.4", "led": {"on": false, "hz": 2}}));
        assert_eq!(
            Value::Object(delta(&d, &r)),
            json!({"led": {"on": true}, "mode": "eco"})
        );
        assert!(delta(&d, &d).is_empty());
    }

    #[test]
    fn update_bounds() {
        assert!(parse_update(b"[1]").is_err());
        assert!(parse_update(br#"{"a":1}"#).is_ok());
        let deep = "{\"a\":".repeat(12) + "1" + &"}".repeat(12);
        assert_eq!(parse_update(deep.as_bytes()), Err(ShadowError::TooDeep));
    }
}
