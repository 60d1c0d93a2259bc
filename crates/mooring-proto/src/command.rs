//! Commands (schema v1): the down payload on `devices/<id>/commands/<cmd>` and the ack / result
//! payloads the device sends back on `.../ack` and `.../result`.
//!
//! A command id is server-generated (`c` + hex, at most [`COMMAND_ID_LEN_MAX`] characters of
//! `[A-Za-z0-9_-]`), so it is safe in a topic level. A device executes a given command id at most
//! once: it keeps the ids it executed (persisted, bounded) and answers a redelivery with the
//! stored result.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Command schema version spoken on `devices/<id>/commands/...`.
pub const SCHEMA_VERSION: u32 = 1;
pub const COMMAND_ID_LEN_MAX: usize = 64;
pub const COMMAND_NAME_LEN_MAX: usize = 64;
/// Largest encoded params or output, in bytes.
pub const COMMAND_BODY_SIZE_BYTES_MAX: usize = 64 * 1024;

/// Is `id` a valid command id (one topic level, `[A-Za-z0-9_-]{1,64}`)?
pub fn is_valid_command_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= COMMAND_ID_LEN_MAX
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Is `name` a valid command name (`[A-Za-z0-9_.-]{1,64}`, starting with a letter or digit)?
pub fn is_valid_command_name(name: &str) -> bool {
    name.len() <= COMMAND_NAME_LEN_MAX
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Server → device, on `devices/<id>/commands/<cmd>` (QoS 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandRequest {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub params: Value,
    /// Unix ms after which the device must not start it (it answers `failed` with `expired`).
    pub expires_at: u64,
}

/// How a command ended, as the device reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResultStatus {
    Succeeded,
    Failed,
}

/// Device → server, on `devices/<id>/commands/<cmd>/result`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandResult {
    pub status: ResultStatus,
    #[serde(default)]
    pub output: Value,
    /// Set when the command was asked for on the device's local API (issue 20), not by the
    /// server: what ran and when, on the device's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<crate::local::LocalExecution>,
}

/// Device → server, on `devices/<id>/commands/<cmd>/ack`: "received, starting". The payload may
/// be empty or any JSON object; it carries nothing the server needs.
pub fn ack_payload() -> Vec<u8> {
    b"{}".to_vec()
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandPayloadError {
    #[error("command payload is not valid: {0}")]
    Invalid(String),
    #[error("command payload is larger than 65536 bytes")]
    TooLarge,
}

impl CommandRequest {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn parse(payload: &[u8]) -> Result<Self, CommandPayloadError> {
        if payload.len() > COMMAND_BODY_SIZE_BYTES_MAX * 2 {
            return Err(CommandPayloadError::TooLarge);
        }
        let req: CommandRequest = serde_json::from_slice(payload)
            .map_err(|e| CommandPayloadError::Invalid(e.to_string()))?;
        if !is_valid_command_id(&req.id) || !is_valid_command_name(&req.name) {
            return Err(CommandPayloadError::Invalid("bad id or name".into()));
        }
        Ok(req)
    }
}

impl CommandResult {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn parse(payload: &[u8]) -> Result<Self, CommandPayloadError> {
        if payload.len() > COMMAND_BODY_SIZE_BYTES_MAX {
            return Err(CommandPayloadError::TooLarge);
        }
        serde_json::from_slice(payload).map_err(|e| CommandPayloadError::Invalid(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names() {
        assert!(is_valid_command_id("c0123abcd"));
        assert!(!is_valid_command_id("a/b"));
        assert!(!is_valid_command_id(""));
        assert!(!is_valid_command_id(&"x".repeat(65)));
        assert!(is_valid_command_name("set_config"));
        assert!(!is_valid_command_name("-x"));
        assert!(!is_valid_command_name("a b"));
    }

    #[test]
    fn roundtrip() {
        let r = CommandRequest {
            id: "c1".into(),
            name: "reboot".into(),
            params: serde_json::json!({"delay_secs": 5}),
            expires_at: 10,
        };
        assert_eq!(CommandRequest::parse(&r.to_bytes()).expect("valid"), r);
        let res =
            CommandResult::parse(br#"{"status":"failed","output":{"reason":"unknown command"}}"#)
                .expect("valid");
        assert_eq!(res.status, ResultStatus::Failed);
        assert_eq!(
            CommandResult::parse(br#"{"status":"succeeded"}"#)
                .expect("valid")
                .output,
            Value::Null
        );
        assert!(CommandResult::parse(br#"{"status":"maybe"}"#).is_err());
    }
}
