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

/// A `DeviceId` reads as the `&str` it holds (`&id` where a `&str` is wanted), so code that
/// only passes ids along needs no conversion; creating one always goes through [`DeviceId::parse`].
impl std::ops::Deref for DeviceId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Maps and sets keyed by `DeviceId` can be looked up with a `&str`.
impl std::borrow::Borrow<str> for DeviceId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for DeviceId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for DeviceId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl PartialEq<String> for DeviceId {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> String {
        id.0
    }
}

/// On the wire a device id is its string; reading one validates it.
impl serde::Serialize for DeviceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for DeviceId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        DeviceId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_is_the_plain_string_and_reading_validates() {
        let id = DeviceId::parse("lock-1").expect("valid");
        assert_eq!(
            serde_json::to_string(&id).ok().as_deref(),
            Some("\"lock-1\"")
        );
        assert_eq!(
            serde_json::from_str::<DeviceId>("\"lock-1\"").ok(),
            Some(id)
        );
        assert!(serde_json::from_str::<DeviceId>("\"a/b\"").is_err());
    }

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
