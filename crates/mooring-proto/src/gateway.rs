//! Gateways (issue 20): one device's connection relaying for child devices that cannot speak
//! MQTT/TLS themselves.
//!
//! A gateway publishes and subscribes on its children's own topics (`devices/<child>/...`):
//! the same telemetry, command, shadow and update topics and payloads a child connected by
//! itself would use, so everything the server does for a device it does for a child. The server
//! allows it only for a child attached to that gateway (`mooring device attach <child>
//! --gateway <gw>`), and never a child's certificate renewal (a child has no certificate of its
//! own on the gateway's link).
//!
//! Child presence: the gateway says when it sees a child come and go, on
//! `devices/<child>/presence` (QoS 1, `{"v":1,"online":true}`). The server marks the child
//! online while its gateway says so and the gateway is connected.

use crate::topic::Topic;
use serde::{Deserialize, Serialize};

/// The presence level: `devices/<child>/presence`.
pub const PRESENCE: &str = "presence";

/// `devices/<child>/presence`: gateway → server.
pub fn presence_topic(child: &crate::DeviceId) -> String {
    format!("{}/{child}/{PRESENCE}", crate::topic::DEVICES_ROOT)
}

/// A child's presence as its gateway sees it (schema v1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildPresence {
    pub v: u32,
    pub online: bool,
}

/// What a child's presence payload may not be.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PresenceError {
    #[error("presence payload is not {{\"v\":1,\"online\":true|false}}: {0}")]
    Invalid(String),
    #[error("presence payload version {0} is not supported (1 is)")]
    Version(u32),
}

impl ChildPresence {
    pub fn new(online: bool) -> Self {
        Self { v: 1, online }
    }

    pub fn parse(payload: &[u8]) -> Result<Self, PresenceError> {
        let p: Self =
            serde_json::from_slice(payload).map_err(|e| PresenceError::Invalid(e.to_string()))?;
        if p.v != 1 {
            return Err(PresenceError::Version(p.v));
        }
        Ok(p)
    }

    pub fn to_json(self) -> String {
        // Two plain fields: serializing cannot fail.
        serde_json::to_string(&self).unwrap_or_default()
    }
}

/// May a gateway publish `topic`, parsed, for an attached child? What the child itself would
/// send the server: telemetry, command acks and results, reported shadow state, update status
/// and link requests, and its presence. Never its certificate renewal (a child has no
/// certificate of its own on the gateway's link), and never what the server sends a device
/// (commands, shadow deltas, answers): a gateway must not forge those for anyone, not even
/// retained for a later session.
pub fn may_relay(topic: &Topic) -> bool {
    match topic {
        Topic::Telemetry(_)
        | Topic::CommandAck(..)
        | Topic::CommandResult(..)
        | Topic::ShadowReported(_)
        | Topic::OtaStatus(_)
        | Topic::OtaLinkRequest(_) => true,
        Topic::DeviceOther(_, rest) => rest == PRESENCE,
        Topic::Command(..) | Topic::ShadowDelta(_) | Topic::CertRequest(_) => false,
    }
}

/// May a gateway subscribe to `filter` for `child`? Only within the child's subtree
/// (`devices/<child>/#`), and not as a shared subscription.
pub fn may_relay_filter(child: &crate::DeviceId, filter: &str) -> bool {
    !crate::topic::is_shared_filter(filter)
        && crate::topic::filter_covers(&crate::topic::device_subtree_filter(child), filter)
}

/// The child a filter names: `devices/<child>/...` with a concrete child id (no wildcard).
pub fn filter_device(filter: &str) -> Option<crate::DeviceId> {
    let rest = filter
        .strip_prefix(crate::topic::DEVICES_ROOT)?
        .strip_prefix('/')?;
    let id = rest.split('/').next()?;
    crate::DeviceId::parse(id).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceId;

    #[test]
    fn presence_round_trips_and_refuses_other_shapes() {
        let p = ChildPresence::new(true);
        assert_eq!(p.to_json(), r#"{"v":1,"online":true}"#);
        assert_eq!(ChildPresence::parse(p.to_json().as_bytes()), Ok(p));
        for bad in [
            &br#"{"v":2,"online":true}"#[..],
            br#"{"v":1}"#,
            br#"{"v":1,"online":"yes"}"#,
            br#"{"v":1,"online":true,"x":1}"#,
            b"on",
        ] {
            assert!(ChildPresence::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_gateway_relays_a_childs_subtree_but_not_its_renewal_or_a_wildcard() {
        let c = DeviceId::parse("lock-7").expect("id");
        let t = |s: &str| Topic::parse(s).expect("topic");
        assert!(may_relay(&t("devices/lock-7/telemetry")));
        assert!(may_relay(&t("devices/lock-7/presence")));
        assert!(!may_relay(&t("devices/lock-7/cert/request")));
        assert!(!may_relay(&t("devices/lock-7/commands/c1")));
        assert!(!may_relay(&t("devices/lock-7/shadow/delta")));
        assert!(!may_relay(&t("devices/lock-7/ota/link/accepted")));
        assert!(may_relay(&t("devices/lock-7/ota/status")));
        assert!(may_relay_filter(&c, "devices/lock-7/commands/+"));
        assert!(may_relay_filter(&c, "devices/lock-7/#"));
        assert!(!may_relay_filter(&c, "devices/+/commands/+"));
        assert!(!may_relay_filter(&c, "devices/#"));
        assert!(!may_relay_filter(&c, "$share/g/devices/lock-7/#"));
        assert_eq!(filter_device("devices/lock-7/commands/+"), Some(c));
        assert_eq!(filter_device("devices/+/commands/+"), None);
        assert_eq!(filter_device("other/lock-7"), None);
    }
}
