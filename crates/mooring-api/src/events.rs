//! Live events (`GET /api/v1/events`, Server-Sent Events): what one event says.
//!
//! Each SSE message is `event: <kind>`, `id: <cursor>` and `data: <Event as JSON>`. Adding a
//! kind is one variant of [`EventBody`] (and its name in [`EventBody::kind`], which the compiler
//! asks for); the server publishes it where the change happens.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use utoipa::{IntoParams, ToSchema};

/// The SSE `event:` name of a reset: the stream could not resume from the `Last-Event-ID` it was
/// given (older than the window, or events were lost on the way), so the client should reload
/// the state it shows. Its data is [`EventsReset`]; its `id:` is a fresh cursor.
pub const RESET_EVENT: &str = "reset";

/// One live event: when and about which device, then what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// When it happened (unix ms, the clock of the node where it happened).
    pub at: u64,
    /// The device it is about; absent for events about no device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    #[serde(flatten)]
    pub body: EventBody,
}

/// What happened; `kind` names the variant (it is also the SSE `event:` name).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventBody {
    /// A device's session opened (`online: true`) or its last session on a node closed.
    Presence {
        online: bool,
        /// The node that holds (or held) the session.
        node: String,
    },
    /// The points of one telemetry message, once stored.
    Telemetry {
        /// The message's sequence number (the device's dedupe key), if it carried one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<u64>,
        /// The message's time (unix ms).
        ts: u64,
        /// Metric name (flattened, e.g. `gps.lat`) → a number or a boolean.
        #[schema(value_type = Object)]
        points: BTreeMap<String, serde_json::Value>,
    },
    /// A command was created or changed state (stored first).
    Command {
        command_id: String,
        name: String,
        /// `queued`, `delivered`, `acknowledged`, `succeeded`, `failed`, `expired`, `canceled`.
        state: String,
        /// The fleet command it belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent_id: Option<String>,
    },
    /// A device's shadow changed (stored first): the whole new state.
    Shadow {
        #[schema(value_type = Object)]
        desired: serde_json::Map<String, serde_json::Value>,
        #[schema(value_type = Object)]
        reported: serde_json::Map<String, serde_json::Value>,
        version: u64,
    },
    /// A device reported a new state of an over-the-air update (stored first).
    Update {
        deployment_id: String,
        artifact_id: String,
        version: String,
        /// `deferred`, `downloading`, ..., `committed`, `rolled_back`, `failed`.
        state: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
}

impl EventBody {
    /// The SSE `event:` name (the JSON `kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::Presence { .. } => "presence",
            EventBody::Telemetry { .. } => "telemetry",
            EventBody::Command { .. } => "command",
            EventBody::Shadow { .. } => "shadow",
            EventBody::Update { .. } => "update",
        }
    }
}

/// The data of an `event: reset` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventsReset {
    /// Why: `cursor_too_old` (events after it left this node's window, or the node restarted),
    /// `events_lost` (events from another node did not arrive), `invalid_cursor`.
    pub reason: String,
}

/// Query of `GET /api/v1/events`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EventsParams {
    /// Only events about devices matching this selector (evaluated against each device's
    /// current tags), e.g. `tag:site=berlin`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// One message of the stream, as [`crate::Client::events`] reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamItem {
    Event {
        /// The cursor after this event (send it back as `Last-Event-ID` to resume).
        id: String,
        event: Event,
    },
    /// See [`RESET_EVENT`].
    Reset { id: String, reset: EventsReset },
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one_of_each() -> Vec<Event> {
        let d = Some("d1".to_owned());
        vec![
            Event {
                at: 1,
                device_id: d.clone(),
                body: EventBody::Presence {
                    online: true,
                    node: "n1".into(),
                },
            },
            Event {
                at: 2,
                device_id: d.clone(),
                body: EventBody::Telemetry {
                    seq: Some(7),
                    ts: 1_700_000_000_000,
                    points: [
                        ("temp".to_owned(), json!(21.5)),
                        ("door".into(), json!(true)),
                    ]
                    .into_iter()
                    .collect(),
                },
            },
            Event {
                at: 3,
                device_id: d.clone(),
                body: EventBody::Command {
                    command_id: "c1".into(),
                    name: "reboot".into(),
                    state: "queued".into(),
                    parent_id: None,
                },
            },
            Event {
                at: 4,
                device_id: d.clone(),
                body: EventBody::Shadow {
                    desired: json!({"led": "on"})
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    reported: serde_json::Map::new(),
                    version: 2,
                },
            },
            Event {
                at: 5,
                device_id: d,
                body: EventBody::Update {
                    deployment_id: "dep1".into(),
                    artifact_id: "art1".into(),
                    version: "1.4.0".into(),
                    state: "rolled_back".into(),
                    reason: Some("health check failed".into()),
                },
            },
        ]
    }

    /// Pins the JSON of one event of each kind: clients parse these.
    #[test]
    fn every_event_kind_has_a_pinned_json_shape() {
        let got: Vec<String> = one_of_each()
            .iter()
            .map(|e| serde_json::to_string(e).unwrap_or_default())
            .collect();
        let want = [
            r#"{"at":1,"device_id":"d1","kind":"presence","online":true,"node":"n1"}"#,
            r#"{"at":2,"device_id":"d1","kind":"telemetry","seq":7,"ts":1700000000000,"points":{"door":true,"temp":21.5}}"#,
            r#"{"at":3,"device_id":"d1","kind":"command","command_id":"c1","name":"reboot","state":"queued"}"#,
            r#"{"at":4,"device_id":"d1","kind":"shadow","desired":{"led":"on"},"reported":{},"version":2}"#,
            r#"{"at":5,"device_id":"d1","kind":"update","deployment_id":"dep1","artifact_id":"art1","version":"1.4.0","state":"rolled_back","reason":"health check failed"}"#,
        ];
        assert_eq!(got, want);
        for (e, text) in one_of_each().into_iter().zip(want) {
            assert_eq!(serde_json::from_str::<Event>(text).ok(), Some(e.clone()));
            let v: serde_json::Value = serde_json::from_str(text).unwrap_or_default();
            assert_eq!(v["kind"], e.body.kind());
        }
    }
}
