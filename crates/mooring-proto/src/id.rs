//! Device ids: the one validation rule every entry point (API, CLI, MQTT, certificates) uses.

use std::fmt;

/// Longest device id, in bytes.
pub const DEVICE_ID_LEN_MAX: usize = 64;

/// A validated device id: `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`.
///
/// Because ids never contain `/`, `+`, `#` or NUL they are safe to splice into topics and
/// topic filters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

/// Why a string is not a device id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid device id {id:?}: {reason} (ids match ^[A-Za-z0-9][A-Za-z0-9._-]{{0,63}}$)")]
pub struct InvalidDeviceId {
    pub id: String,
    pub reason: &'static str,
}

impl DeviceId {
    pub fn parse(s: &str) -> Result<Self, InvalidDeviceId> {
        let err = |reason| InvalidDeviceId {
            id: s.chars().take(80).collect(),
            reason,
        };
        let mut chars = s.chars();
        let first = chars.next().ok_or_else(|| err("empty"))?;
        if !first.is_ascii_alphanumeric() {
            return Err(err("must start with a letter or digit"));
        }
        if s.len() > DEVICE_ID_LEN_MAX {
            return Err(err("longer than 64 characters"));
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return Err(err("only letters, digits, '.', '_' and '-' are allowed"));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DeviceId {
    type Err = InvalidDeviceId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for DeviceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        for id in ["a", "d1", "Lock-01.site_3", "0", &"x".repeat(64)] {
            assert!(DeviceId::parse(id).is_ok(), "{id}");
        }
    }

    #[test]
    fn rejects_invalid_ids() {
        for id in [
            "",
            "-a",
            ".a",
            "_a",
            "a/b",
            "a+",
            "a#",
            "a b",
            "é",
            &"x".repeat(65),
            "a\0",
        ] {
            assert!(DeviceId::parse(id).is_err(), "{id:?}");
        }
    }
}
