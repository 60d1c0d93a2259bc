//! What the broker keeps across restarts (retained messages, persistent sessions and their
//! messages) and how it is encoded. The embedder stores the values by key ([`Persistence`]); the
//! encoding is ours and versioned (the first byte of every value), pinned by golden tests.
//!
//! Rules (see ARCHITECTURE.md, mooring-broker):
//! * A session is persisted while its expiry is > 0; its key is `<namespace>:<client id>`
//!   (`d:` device, `s:` service, `x:` development listener). Ending it deletes it with its messages.
//! * A QoS 1/2 message queued for a persisted session gets a `seq` (broker-wide, increasing) and
//!   is written before the publisher's PUBACK/PUBREC (the connection waits for its ticket); its
//!   packet id towards the subscriber is derived from `seq`, so after a restart a QoS 2 message
//!   is sent again under the same packet id and the receiver recognises it (no write per send).
//!   It is deleted when the subscriber's PUBACK/PUBCOMP arrives, or when it expires or is dropped.
//! * Inbound QoS 2 packet ids (PUBREC sent, PUBREL not yet received) are part of the session
//!   value, written with the routed message before the PUBREC.
//! * Deadlines (session expiry of an offline session, message expiry) are stored as unix
//!   milliseconds from [`Persistence::now_ms`], so they keep running while the server is down.

use crate::broker::Owner;
use crate::hooks::{Message, MessageProps};
use crate::session::{InflightState, SubOptions};
use bytes::{Buf, BufMut, Bytes};
use mooring_proto::policy::Principal;
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::pin::Pin;

/// One change to the broker's durable state, in the order it must be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateOp {
    PutRetained {
        topic: String,
        value: Vec<u8>,
    },
    DeleteRetained {
        topic: String,
    },
    PutSession {
        key: String,
        value: Vec<u8>,
    },
    /// Deletes the session and every message stored for it.
    DeleteSession {
        key: String,
    },
    PutMessage {
        session: String,
        seq: u64,
        value: Vec<u8>,
    },
    DeleteMessage {
        session: String,
        seq: u64,
    },
}

/// Resolves to `true` once the submitted ops are durable (`false`: they may not be).
pub type Durable = Pin<Box<dyn Future<Output = bool> + Send>>;

/// Where the broker's durable state goes (the server: the store's group-commit writer).
pub trait Persistence: Send + Sync + 'static {
    /// Queues `ops` after everything submitted before; the future resolves once they are durable
    /// (and so is everything submitted before them: with no ops, it is a barrier).
    fn submit(&self, ops: Vec<StateOp>) -> Durable;
    /// Queues `ops` after everything submitted before; nobody waits for them.
    fn submit_detached(&self, ops: Vec<StateOp>);
    /// Wall-clock unix milliseconds (the embedder's clock), for deadlines that outlive the process.
    fn now_ms(&self) -> u64;
}

/// What the embedder loaded at start, to give to [`crate::Broker::restore`].
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// `(topic, value)`.
    pub retained: Vec<(String, Vec<u8>)>,
    pub sessions: Vec<RestoredSession>,
}

/// One stored session as [`Restored`] holds it.
#[derive(Debug, Clone, Default)]
pub struct RestoredSession {
    pub key: String,
    pub value: Vec<u8>,
    /// `(seq, value)`, ascending by seq.
    pub messages: Vec<(u64, Vec<u8>)>,
}

/// Format version of every value (first byte).
const FORMAT_V1: u8 = 1;

/// The persisted part of a session.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SessionValue {
    pub(crate) owner: Owner,
    pub(crate) principal: Principal,
    pub(crate) client_id: String,
    pub(crate) expiry_secs: u32,
    /// Unix ms after which the (offline) session is gone; 0: it was online (expiry counts from
    /// the next start).
    pub(crate) expires_at_ms: u64,
    pub(crate) subs: Vec<(String, SubOptions)>,
    pub(crate) qos2_in: Vec<u16>,
    pub(crate) will: Option<StoredWill>,
}

/// A persisted session's will: its connection ended without DISCONNECT and the will delay is
/// running (`fire_at_ms`), or it was connected when the server stopped (`fire_at_ms` 0: the will
/// fires `delay_secs` after the next start unless the client returns first).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredWill {
    pub(crate) msg: Message,
    pub(crate) delay_secs: u32,
    pub(crate) fire_at_ms: u64,
}

/// One persisted queued or unacknowledged message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct MessageValue {
    pub(crate) msg: Message,
    pub(crate) qos: u8,
    pub(crate) retain: bool,
    /// Unix ms; 0: never expires.
    pub(crate) expires_at_ms: u64,
    pub(crate) sub_ids: Vec<u32>,
    /// `None`: queued; otherwise the state of the unacknowledged delivery and its packet id.
    pub(crate) inflight: Option<(InflightState, u16)>,
    /// Came through this shared subscription (`$share/<group>/<filter>`); `true`: already moved
    /// once from a member that left.
    pub(crate) shared: Option<(String, bool)>,
}

/// A persisted retained message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RetainedValue {
    pub(crate) owner: Option<Owner>,
    pub(crate) msg: Message,
    /// Unix ms; 0: never expires.
    pub(crate) expires_at_ms: u64,
}

/// The storage key of a session.
/// The key under which the session of `principal`'s client `client_id` is stored (what an
/// embedder loads to hand to [`crate::Broker::adopt`]).
pub fn stored_session_key(principal: &Principal, client_id: &str) -> String {
    session_key(&Owner::of(principal), client_id)
}

pub(crate) fn session_key(owner: &Owner, client_id: &str) -> String {
    let ns = match owner {
        Owner::Device(_) => 'd',
        Owner::Service(_) => 's',
        Owner::Dev => 'x',
        Owner::Claim(_) => 'c',
    };
    format!("{ns}:{client_id}")
}

/// The table key of a stored session key (`None` if it is not one).
pub(crate) fn parse_session_key(key: &str) -> Option<crate::broker::SessionKey> {
    let (ns, client_id) = key.split_once(':')?;
    let ns = match ns {
        "d" => crate::broker::Namespace::Device,
        "s" => crate::broker::Namespace::Service,
        "x" => crate::broker::Namespace::Dev,
        "c" => crate::broker::Namespace::Claim,
        _ => return None,
    };
    Some((ns, client_id.to_owned()))
}

/// The packet id a persisted message is sent under (stable across restarts).
pub(crate) fn packet_id_for(seq: u64) -> u16 {
    u16::try_from(seq % 65_535).unwrap_or(0) + 1
}

// ---- encoding ----

fn put_str(b: &mut Vec<u8>, s: &str) {
    put_bytes(b, s.as_bytes());
}

fn put_bytes(b: &mut Vec<u8>, v: &[u8]) {
    b.put_u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
    b.put_slice(v);
}

fn put_opt_str(b: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => {
            b.put_u8(1);
            put_str(b, s);
        }
        None => b.put_u8(0),
    }
}

fn put_owner(b: &mut Vec<u8>, o: &Owner) {
    match o {
        Owner::Device(id) => {
            b.put_u8(0);
            put_str(b, id);
        }
        Owner::Service(id) => {
            b.put_u8(1);
            put_str(b, id);
        }
        Owner::Dev => b.put_u8(2),
        Owner::Claim(id) => {
            b.put_u8(3);
            put_str(b, id);
        }
    }
}

fn put_message(b: &mut Vec<u8>, m: &Message) {
    put_str(b, &m.topic);
    put_bytes(b, &m.payload);
    b.put_u8(m.qos);
    b.put_u8(u8::from(m.retain));
    let p = &m.props;
    b.put_u8(u8::from(p.payload_utf8));
    match p.message_expiry_secs {
        Some(s) => {
            b.put_u8(1);
            b.put_u32(s);
        }
        None => b.put_u8(0),
    }
    put_opt_str(b, p.content_type.as_deref());
    put_opt_str(b, p.response_topic.as_deref());
    match &p.correlation_data {
        Some(c) => {
            b.put_u8(1);
            put_bytes(b, c);
        }
        None => b.put_u8(0),
    }
    b.put_u32(u32::try_from(p.user_properties.len()).unwrap_or(u32::MAX));
    for (k, v) in &p.user_properties {
        put_str(b, k);
        put_str(b, v);
    }
}

/// A message carried to another node's broker: the owner of a retained message (so its
/// quota and removal with its principal work there too) and the message.
pub(crate) fn encode_forwarded(owner: Option<&Owner>, m: &Message) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + m.topic.len() + m.payload.len());
    b.put_u8(FORMAT_V1);
    match owner {
        Some(o) => {
            b.put_u8(1);
            put_owner(&mut b, o);
        }
        None => b.put_u8(0),
    }
    put_message(&mut b, m);
    b
}

/// Inverse of [`encode_forwarded`]; `None` for anything truncated or foreign.
pub(crate) fn decode_forwarded(v: &[u8]) -> Option<(Option<Owner>, Message)> {
    let mut r = Reader(v);
    r.version()?;
    let owner = match r.u8()? {
        0 => None,
        1 => Some(r.owner()?),
        _ => return None,
    };
    let msg = r.message()?;
    r.0.is_empty().then_some((owner, msg))
}

impl SessionValue {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64);
        b.put_u8(FORMAT_V1);
        put_owner(&mut b, &self.owner);
        match &self.principal {
            Principal::Device { id, tags } => {
                b.put_u8(0);
                put_str(&mut b, id);
                b.put_u32(u32::try_from(tags.len()).unwrap_or(u32::MAX));
                for (k, v) in tags {
                    put_str(&mut b, k);
                    put_str(&mut b, v);
                }
            }
            Principal::Service { id, name } => {
                b.put_u8(1);
                put_str(&mut b, id);
                put_str(&mut b, name);
            }
            Principal::Dev => b.put_u8(2),
            Principal::Claim {
                client_id,
                claim_id,
            } => {
                b.put_u8(3);
                put_str(&mut b, client_id);
                put_str(&mut b, claim_id);
            }
        }
        put_str(&mut b, &self.client_id);
        b.put_u32(self.expiry_secs);
        b.put_u64(self.expires_at_ms);
        b.put_u32(u32::try_from(self.subs.len()).unwrap_or(u32::MAX));
        for (filter, o) in &self.subs {
            put_str(&mut b, filter);
            b.put_u8(o.qos);
            b.put_u8(
                u8::from(o.no_local)
                    | (u8::from(o.retain_as_published) << 1)
                    | (u8::from(o.sub_id.is_some()) << 2),
            );
            b.put_u32(o.sub_id.unwrap_or(0));
        }
        b.put_u32(u32::try_from(self.qos2_in.len()).unwrap_or(u32::MAX));
        for pid in &self.qos2_in {
            b.put_u16(*pid);
        }
        match &self.will {
            Some(w) => {
                b.put_u8(1);
                put_message(&mut b, &w.msg);
                b.put_u32(w.delay_secs);
                b.put_u64(w.fire_at_ms);
            }
            None => b.put_u8(0),
        }
        b
    }

    pub(crate) fn decode(v: &[u8]) -> Option<SessionValue> {
        let mut r = Reader(v);
        r.version()?;
        let owner = r.owner()?;
        let principal = match r.u8()? {
            0 => {
                let id = mooring_proto::DeviceId::parse(&r.string()?).ok()?;
                let n = r.u32()?;
                let mut tags = BTreeMap::new();
                for _ in 0..n {
                    tags.insert(r.string()?, r.string()?);
                }
                Principal::Device { id, tags }
            }
            1 => Principal::Service {
                id: r.string()?,
                name: r.string()?,
            },
            2 => Principal::Dev,
            3 => Principal::Claim {
                client_id: r.string()?,
                claim_id: r.string()?,
            },
            _ => return None,
        };
        let client_id = r.string()?;
        let expiry_secs = r.u32()?;
        let expires_at_ms = r.u64()?;
        let n = r.u32()?;
        let mut subs = Vec::new();
        for _ in 0..n {
            let filter = r.string()?;
            let qos = r.u8()?.min(2);
            let flags = r.u8()?;
            let id = r.u32()?;
            subs.push((
                filter,
                SubOptions {
                    qos,
                    no_local: flags & 1 != 0,
                    retain_as_published: flags & 2 != 0,
                    sub_id: (flags & 4 != 0).then_some(id),
                },
            ));
        }
        let n = r.u32()?;
        let mut qos2_in = Vec::new();
        for _ in 0..n {
            qos2_in.push(r.u16()?);
        }
        let will = match r.u8()? {
            0 => None,
            1 => Some(StoredWill {
                msg: r.message()?,
                delay_secs: r.u32()?,
                fire_at_ms: r.u64()?,
            }),
            _ => return None,
        };
        Some(SessionValue {
            owner,
            principal,
            client_id,
            expiry_secs,
            expires_at_ms,
            subs,
            qos2_in,
            will,
        })
    }

    /// The value of a session from its live parts.
    pub(crate) fn of(
        owner: &Owner,
        s: &crate::session::Session,
        expires_at_ms: u64,
    ) -> SessionValue {
        let mut subs: Vec<(String, SubOptions)> =
            s.subs.iter().map(|(f, o)| (f.clone(), *o)).collect();
        subs.sort_by(|a, b| a.0.cmp(&b.0));
        let mut qos2_in: Vec<u16> = s.qos2_in.iter().copied().collect();
        qos2_in.sort_unstable();
        SessionValue {
            owner: owner.clone(),
            principal: (*s.principal).clone(),
            client_id: s.client_id.clone(),
            expiry_secs: s.expiry_secs,
            expires_at_ms,
            subs,
            qos2_in,
            will: s.will.as_deref().cloned(),
        }
    }

    pub(crate) fn qos2_set(&self) -> HashSet<u16> {
        self.qos2_in.iter().copied().collect()
    }
}

impl MessageValue {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + self.msg.size_bytes());
        b.put_u8(FORMAT_V1);
        put_message(&mut b, &self.msg);
        b.put_u8(self.qos);
        b.put_u8(u8::from(self.retain));
        b.put_u64(self.expires_at_ms);
        b.put_u32(u32::try_from(self.sub_ids.len()).unwrap_or(u32::MAX));
        for id in &self.sub_ids {
            b.put_u32(*id);
        }
        match self.inflight {
            None => b.put_u8(0),
            Some((InflightState::AwaitAck, pid)) => {
                b.put_u8(1);
                b.put_u16(pid);
            }
            Some((InflightState::AwaitComp, pid)) => {
                b.put_u8(2);
                b.put_u16(pid);
            }
        }
        match &self.shared {
            Some((subscription, redelivered)) => {
                b.put_u8(1);
                put_str(&mut b, subscription);
                b.put_u8(u8::from(*redelivered));
            }
            None => b.put_u8(0),
        }
        b
    }

    pub(crate) fn decode(v: &[u8]) -> Option<MessageValue> {
        let mut r = Reader(v);
        r.version()?;
        let msg = r.message()?;
        let qos = r.u8()?.min(2);
        let retain = r.u8()? != 0;
        let expires_at_ms = r.u64()?;
        let n = r.u32()?;
        let mut sub_ids = Vec::new();
        for _ in 0..n {
            sub_ids.push(r.u32()?);
        }
        let inflight = match r.u8()? {
            0 => None,
            1 => Some((InflightState::AwaitAck, r.u16()?)),
            2 => Some((InflightState::AwaitComp, r.u16()?)),
            _ => return None,
        };
        let shared = match r.u8()? {
            0 => None,
            1 => Some((r.string()?, r.u8()? != 0)),
            _ => return None,
        };
        Some(MessageValue {
            msg,
            qos,
            retain,
            expires_at_ms,
            sub_ids,
            inflight,
            shared,
        })
    }
}

impl RetainedValue {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(32 + self.msg.size_bytes());
        b.put_u8(FORMAT_V1);
        match &self.owner {
            Some(o) => {
                b.put_u8(1);
                put_owner(&mut b, o);
            }
            None => b.put_u8(0),
        }
        put_message(&mut b, &self.msg);
        b.put_u64(self.expires_at_ms);
        b
    }

    pub(crate) fn decode(v: &[u8]) -> Option<RetainedValue> {
        let mut r = Reader(v);
        r.version()?;
        let owner = match r.u8()? {
            0 => None,
            1 => Some(r.owner()?),
            _ => return None,
        };
        let msg = r.message()?;
        let expires_at_ms = r.u64()?;
        Some(RetainedValue {
            owner,
            msg,
            expires_at_ms,
        })
    }
}

/// A bounds-checked reader: every getter returns `None` on truncated or invalid input.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn version(&mut self) -> Option<()> {
        (self.u8()? == FORMAT_V1).then_some(())
    }
    fn u8(&mut self) -> Option<u8> {
        (self.0.remaining() >= 1).then(|| self.0.get_u8())
    }
    fn u16(&mut self) -> Option<u16> {
        (self.0.remaining() >= 2).then(|| self.0.get_u16())
    }
    fn u32(&mut self) -> Option<u32> {
        (self.0.remaining() >= 4).then(|| self.0.get_u32())
    }
    fn u64(&mut self) -> Option<u64> {
        (self.0.remaining() >= 8).then(|| self.0.get_u64())
    }
    fn bytes(&mut self) -> Option<&[u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
    fn opt_string(&mut self) -> Option<Option<String>> {
        match self.u8()? {
            0 => Some(None),
            1 => Some(Some(self.string()?)),
            _ => None,
        }
    }
    fn owner(&mut self) -> Option<Owner> {
        match self.u8()? {
            0 => Some(Owner::Device(self.string()?)),
            1 => Some(Owner::Service(self.string()?)),
            2 => Some(Owner::Dev),
            3 => Some(Owner::Claim(self.string()?)),
            _ => None,
        }
    }
    fn message(&mut self) -> Option<Message> {
        let topic = self.string()?;
        let payload = Bytes::copy_from_slice(self.bytes()?);
        let qos = self.u8()?.min(2);
        let retain = self.u8()? != 0;
        let payload_utf8 = self.u8()? != 0;
        let message_expiry_secs = match self.u8()? {
            0 => None,
            1 => Some(self.u32()?),
            _ => return None,
        };
        let content_type = self.opt_string()?;
        let response_topic = self.opt_string()?;
        let correlation_data = match self.u8()? {
            0 => None,
            1 => Some(Bytes::copy_from_slice(self.bytes()?)),
            _ => return None,
        };
        let n = self.u32()?;
        let mut user_properties = Vec::new();
        for _ in 0..n {
            user_properties.push((self.string()?, self.string()?));
        }
        Some(Message {
            topic,
            payload,
            qos,
            retain,
            props: MessageProps {
                payload_utf8,
                message_expiry_secs,
                content_type,
                response_topic,
                correlation_data,
                user_properties,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(v: &[u8]) -> String {
        v.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn message() -> Message {
        Message {
            topic: "a/b".into(),
            payload: Bytes::from_static(b"hi"),
            qos: 2,
            retain: true,
            props: MessageProps {
                payload_utf8: true,
                message_expiry_secs: Some(60),
                content_type: Some("t".into()),
                response_topic: None,
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: vec![("k".into(), "v".into())],
            },
        }
    }

    /// Golden: the stored formats never change silently (a change needs a new version byte
    /// and a decoder for the old one).
    #[test]
    fn values_round_trip_and_their_encoding_is_pinned() {
        let s = SessionValue {
            owner: Owner::Service("tok1".into()),
            principal: Principal::Service {
                id: "tok1".into(),
                name: "pipe".into(),
            },
            client_id: "c".into(),
            expiry_secs: 3600,
            expires_at_ms: 5,
            subs: vec![(
                "x/#".into(),
                SubOptions {
                    qos: 1,
                    no_local: true,
                    retain_as_published: false,
                    sub_id: Some(9),
                },
            )],
            qos2_in: vec![7],
            will: Some(StoredWill {
                msg: Message::new("w", "x", 1, false),
                delay_secs: 30,
                fire_at_ms: 9,
            }),
        };
        let enc = s.encode();
        assert_eq!(
            hex(&enc),
            "010100000004746f6b310100000004746f6b310000000470697065000000016300000e1000000000000000050000000100000003782f23010500000009000000010007010000000177000000017801000000000000000000000000001e0000000000000009"
        );
        assert_eq!(SessionValue::decode(&enc), Some(s));

        let m = MessageValue {
            msg: message(),
            qos: 1,
            retain: false,
            expires_at_ms: 1000,
            sub_ids: vec![3, 4],
            inflight: Some((InflightState::AwaitComp, 42)),
            shared: Some(("$share/g/x".into(), true)),
        };
        let enc = m.encode();
        assert_eq!(
            hex(&enc),
            "0100000003612f62000000026869020101010000003c0100000001740001000000016300000001000000016b0000000176010000000000000003e800000002000000030000000402002a010000000a2473686172652f672f7801"
        );
        assert_eq!(MessageValue::decode(&enc), Some(m));

        let r = RetainedValue {
            owner: Some(Owner::Device("d1".into())),
            msg: Message::new("t", "p", 1, true),
            expires_at_ms: 0,
        };
        let enc = r.encode();
        assert_eq!(
            hex(&enc),
            "0101000000000264310000000174000000017001010000000000000000000000000000000000"
        );
        assert_eq!(RetainedValue::decode(&enc), Some(r));
    }

    #[test]
    fn truncated_or_foreign_values_decode_to_none_without_panicking() {
        let m = MessageValue {
            msg: message(),
            qos: 2,
            retain: true,
            expires_at_ms: 0,
            sub_ids: vec![],
            inflight: None,
            shared: None,
        }
        .encode();
        for n in 0..m.len() {
            assert_eq!(MessageValue::decode(&m[..n]), None, "prefix {n}");
        }
        let mut other = m.clone();
        other[0] = 2;
        assert_eq!(MessageValue::decode(&other), None);
        assert_eq!(SessionValue::decode(&[1, 9]), None);
        assert_eq!(
            RetainedValue::decode(&[1, 1, 0, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    #[test]
    fn packet_ids_for_seqs_are_never_zero() {
        assert_eq!(packet_id_for(0), 1);
        assert_eq!(packet_id_for(65_534), 65_535);
        assert_eq!(packet_id_for(65_535), 1);
        assert_eq!(
            packet_id_for(u64::MAX),
            u16::try_from(u64::MAX % 65_535).expect("below 65535") + 1
        );
    }
}
