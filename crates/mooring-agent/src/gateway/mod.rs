//! Gateway mode (issue 20): the agent relays for child devices that cannot speak MQTT/TLS.
//!
//! The gateway keeps its one MQTT connection (its own certificate) and speaks for each child
//! attached to it on the child's own topics (`devices/<child>/...`,
//! [`mooring_proto::gateway`]). Children reach the gateway through a [`ChildTransport`]; the
//! one shipped is [`unix::UnixTransport`], a line protocol over a Unix socket
//! (`--gateway-socket PATH`, or `[gateway] socket = "..."` in the config file).
//!
//! ## The line protocol
//!
//! One JSON object per line (at most [`LINE_BYTES_MAX`] bytes; longer lines, lines that are
//! not JSON and unknown messages are logged and skipped, answered with `{"error": ...}`).
//!
//! child → gateway:
//!
//! * first `{"hello":"<child id>"}` (a valid device id; anything else is answered with
//!   `{"error":"..."}` and the connection is closed);
//! * `{"telemetry":{<metrics>, "seq"?: n, "ts"?: ms}}`: telemetry v1 of the child;
//! * `{"result":{"id":"<command id>","status":"succeeded"|"failed","output":...}}`: the result
//!   of a command ([`mooring_proto::command::CommandResult`] plus the command id);
//! * `{"reported":{...}}`: a shadow reported-state update (merge patch).
//!
//! gateway → child:
//!
//! * `{"command":{"id":...,"name":...,"params":...,"expires_at":...}}`: a command request as
//!   the server sent it ([`mooring_proto::command::CommandRequest`]);
//! * `{"delta":{"version":...,"delta":{...}}}`: a shadow delta as the server sent it;
//! * `{"error":"..."}`.
//!
//! A second connection with a child id already connected replaces the first (the old one gets
//! `{"error":"replaced by a new connection"}` and is closed). At most `children_max` children
//! are connected at once; each child's outgoing queue holds [`CHILD_QUEUE_MAX`] lines, and a
//! child that lets it fill up is disconnected: one slow child never holds up the gateway.
//!
//! The relay itself (presence, subscriptions, the outbox) is [`relay`].

pub mod child;
pub mod relay;
pub mod unix;

use mooring_proto::command::{is_valid_command_id, CommandResult};
use mooring_proto::DeviceId;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::PathBuf;
use tokio::io::{AsyncBufReadExt as _, AsyncRead, BufReader};
use tokio::sync::mpsc;

/// Default bound on children connected at once.
pub const CHILDREN_MAX_DEFAULT: usize = 256;
/// Largest `children_max` accepted.
pub const CHILDREN_MAX_LIMIT: usize = 65_536;
/// Longest line accepted from a child: a full telemetry payload plus its envelope.
pub const LINE_BYTES_MAX: usize = crate::input::LINE_BYTES_MAX + 1024;
/// Lines queued for one child; a child that lets them pile up is disconnected.
pub const CHILD_QUEUE_MAX: usize = 32;
/// Events queued from all the children's connections to the relay.
pub const EVENTS_QUEUE_MAX: usize = 256;
/// Messages from the server for children queued between the link and the relay.
pub const INBOUND_QUEUE_MAX: usize = 64;
/// Time a new connection has to say hello.
pub const HELLO_TIMEOUT_MS: u64 = 10_000;
/// Time one line to a child may take to write; a child that does not read is disconnected.
pub const WRITE_TIMEOUT_MS: u64 = 5_000;

/// `[gateway]` in the agent config file (and `--gateway-socket`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The Unix socket children connect to (a stale socket file is replaced at start).
    pub socket: PathBuf,
    /// Most children connected at once.
    #[serde(default = "children_max_default")]
    pub children_max: usize,
}

fn children_max_default() -> usize {
    CHILDREN_MAX_DEFAULT
}

impl GatewayConfig {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            children_max: CHILDREN_MAX_DEFAULT,
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.socket.as_os_str().is_empty() {
            return Err("gateway.socket is empty".into());
        }
        if self.children_max == 0 || self.children_max > CHILDREN_MAX_LIMIT {
            return Err(format!(
                "gateway.children_max must be 1..={CHILDREN_MAX_LIMIT}"
            ));
        }
        Ok(())
    }
}

/// What a child sends after its hello.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ChildMsg {
    /// Telemetry v1 of the child (`seq` and `ts` optional).
    Telemetry(Map<String, Value>),
    /// The result of a command the gateway handed to the child.
    Result(ChildResult),
    /// A shadow reported-state update (merge patch).
    Reported(Map<String, Value>),
}

/// `{"id": ..., "status": ..., "output": ...}`: a [`CommandResult`] and its command id.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ChildResult {
    pub id: String,
    #[serde(flatten)]
    pub result: CommandResult,
}

/// What the gateway sends a child.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToChild {
    /// A command request as the server sent it.
    Command(Value),
    /// A shadow delta as the server sent it.
    Delta(Value),
    Error(String),
}

impl ToChild {
    /// The line to write (with its `\n`).
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_else(|_| b"{}".to_vec());
        line.push(b'\n');
        line
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Hello {
    hello: String,
}

/// Parses the first line of a connection: `{"hello":"<child id>"}`.
pub fn parse_hello(line: &[u8]) -> Result<DeviceId, String> {
    let hello: Hello = serde_json::from_slice(line.trim_ascii())
        .map_err(|e| format!("expected {{\"hello\":\"<child id>\"}}: {e}"))?;
    DeviceId::parse(&hello.hello).map_err(|e| format!("child id {:?}: {e}", hello.hello))
}

/// Parses a line after the hello: `Ok(None)` for a blank line, `Err` for anything that is
/// not one of the child's messages.
pub fn parse_child_line(line: &[u8]) -> Result<Option<ChildMsg>, String> {
    let line = line.trim_ascii();
    if line.is_empty() {
        return Ok(None);
    }
    let msg: ChildMsg = serde_json::from_slice(line).map_err(|e| {
        format!("expected one of {{\"telemetry\":{{...}}}}, {{\"result\":{{...}}}}, {{\"reported\":{{...}}}}: {e}")
    })?;
    if let ChildMsg::Result(r) = &msg {
        if !is_valid_command_id(&r.id) {
            return Err(format!("result id {:?} is not a command id", r.id));
        }
    }
    Ok(Some(msg))
}

/// One line read by [`LineReader`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line (without its `\n`).
    Full(Vec<u8>),
    /// A line longer than the bound, skipped.
    TooLong,
}

/// Reads lines of at most `max` bytes without ever holding more; cancel-safe (the partial
/// line lives in the reader).
#[derive(Debug)]
pub struct LineReader<R> {
    inner: BufReader<R>,
    max: usize,
    line: Vec<u8>,
    too_long: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(reader: R, max: usize) -> Self {
        Self {
            inner: BufReader::new(reader),
            max,
            line: Vec::new(),
            too_long: false,
        }
    }

    /// The next line; `None` at EOF (a last line without `\n` still counts).
    pub async fn next_line(&mut self) -> std::io::Result<Option<Line>> {
        loop {
            let buf = self.inner.fill_buf().await?;
            if buf.is_empty() {
                if self.line.is_empty() && !self.too_long {
                    return Ok(None);
                }
                return Ok(Some(self.take()));
            }
            let (chunk, complete) = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (&buf[..i], true),
                None => (buf, false),
            };
            if !self.too_long {
                if self.line.len() + chunk.len() <= self.max {
                    self.line.extend_from_slice(chunk);
                } else {
                    self.too_long = true;
                    self.line = Vec::new();
                }
            }
            let consumed = chunk.len() + usize::from(complete);
            self.inner.consume(consumed);
            if complete {
                return Ok(Some(self.take()));
            }
        }
    }

    fn take(&mut self) -> Line {
        if std::mem::take(&mut self.too_long) {
            self.line.clear();
            Line::TooLong
        } else {
            Line::Full(std::mem::take(&mut self.line))
        }
    }
}

/// What a [`ChildTransport`] reports to the relay. `conn` numbers connections, so the relay
/// tells a replaced connection's late events from the current one's.
#[derive(Debug)]
// Events sit in a bounded channel briefly; boxing the message would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum ChildEvent {
    /// A child said hello; `tx` reaches it (bounded: use `try_send`). Dropping every clone of
    /// `tx` closes the connection.
    Connected {
        child: DeviceId,
        conn: u64,
        tx: mpsc::Sender<ToChild>,
    },
    /// A message from a connected child.
    Message {
        child: DeviceId,
        conn: u64,
        msg: ChildMsg,
    },
    /// The connection ended (either side closed it).
    Disconnected { child: DeviceId, conn: u64 },
}

/// Where children come from. [`unix::UnixTransport`] is the production one; a test or the
/// simulator can bring another.
#[async_trait::async_trait]
pub trait ChildTransport: Send + 'static {
    /// Accepts children and reports them on `events` until `events` is closed. Never fails:
    /// a broken connection is that child's problem, logged.
    async fn serve(self: Box<Self>, events: mpsc::Sender<ChildEvent>);
}

#[cfg(test)]
mod tests {
    use super::*;
    use mooring_proto::command::ResultStatus;
    use serde_json::json;

    #[test]
    fn hello_needs_a_valid_device_id() {
        assert_eq!(
            parse_hello(br#" {"hello":"lock-7"} "#),
            Ok(DeviceId::parse("lock-7").expect("id"))
        );
        for bad in [
            &br#"{"hello":"a/b"}"#[..],
            br#"{"hello":""}"#,
            br#"{"hello":7}"#,
            br#"{"hello":"x","more":1}"#,
            br#"{"telemetry":{}}"#,
            b"hello",
            b"",
        ] {
            assert!(parse_hello(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn child_lines_parse_or_say_why_not() {
        assert_eq!(parse_child_line(b"  \r"), Ok(None));
        let Ok(Some(ChildMsg::Telemetry(t))) =
            parse_child_line(br#"{"telemetry":{"temp":21.5,"seq":3}}"#)
        else {
            panic!("telemetry")
        };
        assert_eq!(Value::Object(t), json!({"temp":21.5,"seq":3}));
        let Ok(Some(ChildMsg::Result(r))) =
            parse_child_line(br#"{"result":{"id":"c1","status":"succeeded","output":{"echo":1}}}"#)
        else {
            panic!("result")
        };
        assert_eq!(r.id, "c1");
        assert_eq!(r.result.status, ResultStatus::Succeeded);
        assert_eq!(r.result.output, json!({"echo":1}));
        assert!(matches!(
            parse_child_line(br#"{"reported":{"fw":"1.2"}}"#),
            Ok(Some(ChildMsg::Reported(_)))
        ));
        for bad in [
            &br#"{"result":{"id":"a/b","status":"succeeded"}}"#[..],
            br#"{"result":{"id":"c1","status":"ok"}}"#,
            br#"{"telemetry":[1]}"#,
            br#"{"telemetry":{},"reported":{}}"#,
            br#"{"other":{}}"#,
            b"not json",
            b"[1]",
        ] {
            assert!(parse_child_line(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn lines_to_a_child_are_one_object_each() {
        assert_eq!(
            ToChild::Error("x".into()).to_line(),
            b"{\"error\":\"x\"}\n".to_vec()
        );
        assert_eq!(
            ToChild::Command(json!({"id":"c1"})).to_line(),
            b"{\"command\":{\"id\":\"c1\"}}\n".to_vec()
        );
        assert_eq!(
            ToChild::Delta(json!({"version":2})).to_line(),
            b"{\"delta\":{\"version\":2}}\n".to_vec()
        );
    }

    #[tokio::test]
    async fn line_reader_skips_overlong_lines_and_keeps_the_last_one() {
        let mut input = b"{\"a\":1}\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 40));
        input.extend_from_slice(b"\n\n{\"b\":2}");
        let mut r = LineReader::new(input.as_slice(), 16);
        let mut got = Vec::new();
        while let Some(l) = r.next_line().await.expect("read") {
            got.push(l);
        }
        assert_eq!(
            got,
            vec![
                Line::Full(b"{\"a\":1}".to_vec()),
                Line::TooLong,
                Line::Full(Vec::new()),
                Line::Full(b"{\"b\":2}".to_vec()),
            ]
        );
    }

    #[test]
    fn config_bounds() {
        assert!(GatewayConfig::new("/run/gw.sock").validate().is_ok());
        let c = GatewayConfig {
            children_max: 0,
            ..GatewayConfig::new("/run/gw.sock")
        };
        assert!(c.validate().is_err());
        assert!(GatewayConfig::new("").validate().is_err());
    }
}
