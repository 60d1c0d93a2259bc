//! Every topic Mooring uses: built and parsed here, nowhere else; plus MQTT filter matching.

use crate::id::DeviceId;
use std::fmt;

/// Root of every per-device topic.
pub const DEVICES_ROOT: &str = "devices";
/// Telemetry suffix: `devices/<id>/telemetry`.
pub const TELEMETRY: &str = "telemetry";
/// Commands level: `devices/<id>/commands/<cmd>[/ack|/result]`.
pub const COMMANDS: &str = "commands";
/// Shadow level: `devices/<id>/shadow/reported`, `devices/<id>/shadow/delta`.
pub const SHADOW: &str = "shadow";

/// A topic Mooring gives meaning to. Topics under `devices/<id>/` that are not listed here are
/// still allowed by the default policy (devices may use their own subtree freely), they just
/// have no server-side meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// `devices/<id>/telemetry`: device → server, JSON telemetry (schema v1).
    Telemetry(DeviceId),
    /// `devices/<id>/commands/<cmd>`: server → device, a command (QoS 1).
    Command(DeviceId, String),
    /// `devices/<id>/commands/<cmd>/ack`: device → server, "received, starting".
    CommandAck(DeviceId, String),
    /// `devices/<id>/commands/<cmd>/result`: device → server, `{status, output}`.
    CommandResult(DeviceId, String),
    /// `devices/<id>/shadow/reported`: device → server, a reported-state update (merge patch).
    ShadowReported(DeviceId),
    /// `devices/<id>/shadow/delta`: server → device, retained; desired minus reported.
    ShadowDelta(DeviceId),
    /// `devices/<id>/cert/request`: device → server, a certificate renewal
    /// ([`crate::provision::RenewRequest`]).
    CertRequest(DeviceId),
    /// `devices/<id>/ota/status`: device → server, an update's transition
    /// ([`crate::ota::StatusReport`]).
    OtaStatus(DeviceId),
    /// `devices/<id>/ota/link/request`: device → server, a fresh download link
    /// ([`crate::ota::LinkRequest`]).
    OtaLinkRequest(DeviceId),
    /// Any other topic under `devices/<id>/`; the string is the rest after `devices/<id>/`.
    DeviceOther(DeviceId, String),
}

impl Topic {
    /// Parses a concrete topic name (no wildcards). Returns `None` for topics outside
    /// `devices/<valid id>/...`.
    pub fn parse(topic: &str) -> Option<Topic> {
        let rest = topic.strip_prefix(DEVICES_ROOT)?.strip_prefix('/')?;
        let (id, rest) = rest.split_once('/')?;
        let id = DeviceId::parse(id).ok()?;
        if rest.is_empty() {
            return None;
        }
        let levels: Vec<&str> = rest.split('/').collect();
        Some(match levels.as_slice() {
            [TELEMETRY] => Topic::Telemetry(id),
            [COMMANDS, cmd] if crate::command::is_valid_command_id(cmd) => {
                Topic::Command(id, (*cmd).to_owned())
            }
            [COMMANDS, cmd, "ack"] if crate::command::is_valid_command_id(cmd) => {
                Topic::CommandAck(id, (*cmd).to_owned())
            }
            [COMMANDS, cmd, "result"] if crate::command::is_valid_command_id(cmd) => {
                Topic::CommandResult(id, (*cmd).to_owned())
            }
            [SHADOW, "reported"] => Topic::ShadowReported(id),
            [SHADOW, "delta"] => Topic::ShadowDelta(id),
            ["cert", "request"] => Topic::CertRequest(id),
            ["ota", "status"] => Topic::OtaStatus(id),
            ["ota", "link", "request"] => Topic::OtaLinkRequest(id),
            _ => Topic::DeviceOther(id, rest.to_owned()),
        })
    }

    /// `devices/<id>/commands/<cmd>`.
    pub fn command(id: &DeviceId, cmd: &str) -> String {
        format!("{DEVICES_ROOT}/{id}/{COMMANDS}/{cmd}")
    }

    /// `devices/<id>/commands/+`: what a device subscribes to for its commands.
    pub fn commands_filter(id: &DeviceId) -> String {
        format!("{DEVICES_ROOT}/{id}/{COMMANDS}/+")
    }

    /// `devices/<id>/commands/<cmd>/ack`.
    pub fn command_ack(id: &DeviceId, cmd: &str) -> String {
        format!("{DEVICES_ROOT}/{id}/{COMMANDS}/{cmd}/ack")
    }

    /// `devices/<id>/commands/<cmd>/result`.
    pub fn command_result(id: &DeviceId, cmd: &str) -> String {
        format!("{DEVICES_ROOT}/{id}/{COMMANDS}/{cmd}/result")
    }

    /// `devices/<id>/shadow/reported`.
    pub fn shadow_reported(id: &DeviceId) -> String {
        format!("{DEVICES_ROOT}/{id}/{SHADOW}/reported")
    }

    /// `devices/<id>/shadow/delta`.
    pub fn shadow_delta(id: &DeviceId) -> String {
        format!("{DEVICES_ROOT}/{id}/{SHADOW}/delta")
    }

    pub fn telemetry(id: &DeviceId) -> String {
        format!("{DEVICES_ROOT}/{id}/{TELEMETRY}")
    }

    /// The device this topic belongs to.
    pub fn device(&self) -> &DeviceId {
        match self {
            Topic::Telemetry(id)
            | Topic::Command(id, _)
            | Topic::CommandAck(id, _)
            | Topic::CommandResult(id, _)
            | Topic::ShadowReported(id)
            | Topic::ShadowDelta(id)
            | Topic::CertRequest(id)
            | Topic::OtaStatus(id)
            | Topic::OtaLinkRequest(id)
            | Topic::DeviceOther(id, _) => id,
        }
    }
}

impl fmt::Display for Topic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Topic::Telemetry(id) => write!(f, "{DEVICES_ROOT}/{id}/{TELEMETRY}"),
            Topic::Command(id, c) => f.write_str(&Topic::command(id, c)),
            Topic::CommandAck(id, c) => f.write_str(&Topic::command_ack(id, c)),
            Topic::CommandResult(id, c) => f.write_str(&Topic::command_result(id, c)),
            Topic::ShadowReported(id) => f.write_str(&Topic::shadow_reported(id)),
            Topic::ShadowDelta(id) => f.write_str(&Topic::shadow_delta(id)),
            Topic::CertRequest(id) => f.write_str(&crate::provision::renew_request_topic(id)),
            Topic::OtaStatus(id) => f.write_str(&crate::ota::status_topic(id)),
            Topic::OtaLinkRequest(id) => f.write_str(&crate::ota::link_request_topic(id)),
            Topic::DeviceOther(id, rest) => write!(f, "{DEVICES_ROOT}/{id}/{rest}"),
        }
    }
}

/// The text every topic of one device starts with (`devices/<id>/`).
pub fn device_topic_prefix(id: &DeviceId) -> String {
    format!("{DEVICES_ROOT}/{id}/")
}

/// The filter covering a device's whole subtree: `devices/<id>/#`.
pub fn device_subtree_filter(id: &DeviceId) -> String {
    format!("{DEVICES_ROOT}/{id}/#")
}

/// Is `filter` a syntactically valid MQTT topic filter (MQTT 3.1.1 §4.7)?
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    levels.iter().enumerate().all(|(i, level)| match *level {
        "#" => i == last,
        "+" => true,
        l => !l.contains('#') && !l.contains('+'),
    })
}

/// What every shared subscription filter starts with (MQTT 5 §4.8.2; v3.1.1 clients may use it too).
pub const SHARED_PREFIX: &str = "$share/";

/// A shared subscription filter `$share/<group>/<filter>`, split (see [`parse_shared_filter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedFilter<'a> {
    /// The share name: not empty, no `/`, `+`, `#` or NUL.
    pub group: &'a str,
    /// The topic filter the group subscribes to: a valid filter.
    pub filter: &'a str,
}

/// Does `filter` ask for a shared subscription (start with `$share/`)? Such a filter is either
/// a valid [`SharedFilter`] or invalid: it is never an ordinary filter.
pub fn is_shared_filter(filter: &str) -> bool {
    filter.starts_with(SHARED_PREFIX)
}

/// Splits `$share/<group>/<filter>`; `None` if `filter` is not a valid shared subscription
/// filter (not `$share/`, an empty group or one with `+`, `#` or NUL, no or an invalid filter).
pub fn parse_shared_filter(filter: &str) -> Option<SharedFilter<'_>> {
    let (group, inner) = filter.strip_prefix(SHARED_PREFIX)?.split_once('/')?;
    let group_ok = !group.is_empty() && !group.contains(['+', '#', '\0']);
    (group_ok && is_valid_filter(inner)).then_some(SharedFilter {
        group,
        filter: inner,
    })
}

/// Is `topic` a valid MQTT topic name for PUBLISH (no wildcards, not empty)?
pub fn is_valid_topic_name(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// Does the concrete `topic` match `filter`? Implements MQTT wildcard rules including the
/// rule that `+` / `#` at the first level do not match topics starting with `$`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Does `outer` match every topic that `inner` matches? Used to decide whether a requested
/// subscription stays inside what a policy allows. Conservative: may say `false` for exotic
/// equivalent filters, never `true` wrongly.
pub fn filter_covers(outer: &str, inner: &str) -> bool {
    // A first-level `+` / `#` matches no topic starting with `$` (see [`filter_matches`]), so it
    // covers no filter that names such a topic.
    if inner.starts_with('$') && (outer.starts_with('+') || outer.starts_with('#')) {
        return false;
    }
    let mut o = outer.split('/');
    let mut i = inner.split('/');
    loop {
        match (o.next(), i.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(il)) if il != "#" => {}
            (Some(ol), Some(il)) if ol == il && ol != "+" && ol != "#" => {}
            (Some("+"), Some("+")) => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::parse(s).expect("valid id")
    }

    #[test]
    fn parse_roundtrip() {
        let t = Topic::parse("devices/d1/telemetry").expect("parses");
        assert_eq!(t, Topic::Telemetry(id("d1")));
        assert_eq!(t.to_string(), "devices/d1/telemetry");
        assert_eq!(Topic::telemetry(&id("d1")), "devices/d1/telemetry");
        let o = Topic::parse("devices/d1/a/b").expect("parses");
        assert_eq!(o, Topic::DeviceOther(id("d1"), "a/b".into()));
        assert_eq!(Topic::parse("devices/-x/telemetry"), None);
        assert_eq!(Topic::parse("devices/d1/"), None);
        for t in [
            "devices/d1/commands/c1",
            "devices/d1/commands/c1/ack",
            "devices/d1/commands/c1/result",
            "devices/d1/shadow/reported",
            "devices/d1/shadow/delta",
        ] {
            let parsed = Topic::parse(t).expect("parses");
            assert!(!matches!(parsed, Topic::DeviceOther(..)), "{t}");
            assert_eq!(parsed.to_string(), t);
        }
        assert_eq!(
            Topic::parse("devices/d1/commands/c1/other"),
            Some(Topic::DeviceOther(id("d1"), "commands/c1/other".into()))
        );
        assert_eq!(Topic::parse("other/d1/telemetry"), None);
    }

    #[test]
    fn matching() {
        assert!(filter_matches(
            "devices/+/telemetry",
            "devices/d1/telemetry"
        ));
        assert!(filter_matches("devices/#", "devices/d1/telemetry"));
        assert!(filter_matches("devices/d1/#", "devices/d1"));
        assert!(!filter_matches("devices/d1/#", "devices/d2/x"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(!filter_matches("devices/+", "devices/d1/telemetry"));
    }

    #[test]
    fn covering() {
        assert!(filter_covers("devices/d1/#", "devices/d1/#"));
        assert!(filter_covers("devices/d1/#", "devices/d1/+/x"));
        assert!(filter_covers("devices/+/telemetry", "devices/d1/telemetry"));
        assert!(!filter_covers("devices/d1/#", "devices/+/telemetry"));
        assert!(!filter_covers("devices/d1/#", "devices/#"));
        assert!(!filter_covers("devices/d1/#", "#"));
        assert!(!filter_covers("devices/d1/x", "devices/d1/+"));
    }

    #[test]
    fn wildcard_first_filters_do_not_cover_dollar_topics() {
        // Found by fuzz/policy_eval: `+/x` does not match `$SYS/x`, so it must not cover it.
        for (outer, inner) in [
            ("+/x", "$SYS/x"),
            ("#", "$SYS/#"),
            ("#", "$x"),
            ("+/+", "$a/+"),
        ] {
            assert!(!filter_covers(outer, inner), "{outer} covers {inner}");
        }
        assert!(!filter_matches("+/x", "$SYS/x"));
        assert!(filter_covers("$SYS/#", "$SYS/x"));
        assert!(filter_covers("$SYS/+", "$SYS/x"));
        assert!(filter_covers("#", "+/x"));
    }

    #[test]
    fn shared_filters_split_into_group_and_filter() {
        let s = parse_shared_filter("$share/workers/devices/+/telemetry").expect("valid");
        assert_eq!(s.group, "workers");
        assert_eq!(s.filter, "devices/+/telemetry");
        assert_eq!(
            parse_shared_filter("$share/g/#").map(|s| s.filter),
            Some("#")
        );
        for bad in [
            "$share/",
            "$share/g",
            "$share/g/",
            "$share//a",
            "$share/g+/a",
            "$share/+/a",
            "$share/#/a",
            "$share/g#x/a",
            "$share/g/a/#/b",
            "$share/g/a+",
            "$SHARE/g/a",
            "devices/+/telemetry",
        ] {
            assert_eq!(parse_shared_filter(bad), None, "{bad}");
        }
        assert!(is_shared_filter("$share/g"));
        assert!(!is_shared_filter("$share"));
        assert!(!is_shared_filter("share/g/a"));
    }

    #[test]
    fn validity() {
        assert!(is_valid_filter("a/+/#"));
        assert!(!is_valid_filter("a/#/b"));
        assert!(!is_valid_filter("a/b+"));
        assert!(is_valid_topic_name("a/b"));
        assert!(!is_valid_topic_name("a/+"));
    }
}
