//! The public contract between the broker and its embedder: messages, connection info, and [`Hooks`].

use bytes::Bytes;
use mooring_proto::policy::Principal;

/// Which listener accepted a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// Mutual-TLS listener: `cert_identity` carries the proven client certificate identity.
    Tls,
    /// Development listener (plain TCP, or in-memory in tests).
    Dev,
}

/// What the transport knows about a connection before any MQTT byte is read.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: Option<std::net::SocketAddr>,
    pub cert_identity: Option<String>,
    /// SHA-256 (lower-case hex) of the client certificate, for embedders that pin certificates.
    pub cert_sha256: Option<String>,
    /// The client certificate (DER), for embedders that register certificates they have not
    /// seen before (just-in-time registration). Dropped once the CONNECT is handled.
    pub cert_der: Option<std::sync::Arc<[u8]>>,
    pub listener: ListenerKind,
}

/// MQTT protocol level of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolVersion {
    V311,
    V5,
}

/// v5 PUBLISH properties the broker forwards end to end.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProps {
    /// Payload Format Indicator = 1 (UTF-8).
    pub payload_utf8: bool,
    pub message_expiry_secs: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: Vec<(String, String)>,
}

impl MessageProps {
    /// Bytes these properties hold (what they cost a queue or the retained table).
    pub fn size_bytes(&self) -> usize {
        self.content_type.as_ref().map_or(0, String::len)
            + self.response_topic.as_ref().map_or(0, String::len)
            + self.correlation_data.as_ref().map_or(0, Bytes::len)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// An application message, as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub props: MessageProps,
}

impl Message {
    /// What the message costs a queue or the retained table: topic, payload and v5 properties.
    pub fn size_bytes(&self) -> usize {
        self.topic.len() + self.payload.len() + self.props.size_bytes()
    }

    /// A message without v5 properties.
    pub fn new(
        topic: impl Into<String>,
        payload: impl Into<Bytes>,
        qos: u8,
        retain: bool,
    ) -> Message {
        Message {
            topic: topic.into(),
            payload: payload.into(),
            qos: qos.min(2),
            retain,
            props: MessageProps::default(),
        }
    }
}

/// The CONNECT as the hooks see it.
#[derive(Debug)]
pub struct ConnectRequest<'a> {
    pub info: &'a ConnInfo,
    /// As sent; may be empty.
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub protocol_version: ProtocolVersion,
    /// v3.1.1 clean session / v5 clean start: the client does not resume a stored session.
    pub clean_start: bool,
}

/// A successful authentication.
#[derive(Debug, Clone)]
pub struct Authenticated {
    /// Client id to use. Empty means "let the broker assign one" (only valid when the client sent
    /// an empty id); a v5 client is told an id that differs from what it sent.
    pub client_id: String,
    pub principal: Principal,
}

/// Why a CONNECT is refused (v3.1.1 return code / v5 reason code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// v3 0x02 / v5 0x85
    BadClientId,
    /// v3 0x04 / v5 0x86
    BadUsernameOrPassword,
    /// v3 0x05 / v5 0x87
    NotAuthorized,
    /// v3 0x03 / v5 0x88
    ServerUnavailable,
}

/// The embedder's decision on an authorized inbound PUBLISH.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishVerdict {
    Accept,
    /// Do not route. v5 QoS 1/2: PUBACK/PUBREC carries this reason code (e.g. 0x99); otherwise the
    /// message is dropped silently and the session stays up.
    Reject(u8),
    /// Not accepted, and the client should send it again later (e.g. the store could not make
    /// it durable: disk full, I/O error). v5 QoS 1/2: PUBACK/PUBREC with this reason code (0x80
    /// or 0x97), the session stays up. v3.1.1 cannot carry a failure, and acknowledging would
    /// claim it was stored: like `Disconnect`. QoS 0: dropped.
    Failed(u8),
    /// Do not route and do not acknowledge: close the connection (v5: DISCONNECT 0x83). For
    /// failures where the client must resend later, e.g. the store could not make it durable.
    Disconnect,
}

/// What the embedder decides. Called from connection tasks; must not block. `may_publish` and
/// `may_subscribe` may be called while the broker holds its session locks (re-authorization on
/// resume, `update_principal`, `reauthorize_all`): they must not call back into the [`crate::Broker`].
#[async_trait::async_trait]
pub trait Hooks: Send + Sync + 'static {
    async fn authenticate(&self, req: ConnectRequest<'_>) -> Result<Authenticated, ConnectRefusal>;
    fn may_publish(&self, principal: &Principal, topic: &str) -> bool;
    fn may_subscribe(&self, principal: &Principal, filter: &str) -> bool;
    /// Called for every authorized inbound PUBLISH (and every will when it fires) before it is
    /// routed. For QoS 1/2 the PUBACK/PUBREC is sent only after this completes.
    async fn on_publish(
        &self,
        principal: &Principal,
        client_id: &str,
        msg: &Message,
    ) -> PublishVerdict;
    /// After a successful CONNACK was queued for the client.
    fn on_connected(&self, client_id: &str, principal: &Principal);
    /// Exactly once per connection that got `on_connected`, after will handling.
    fn on_disconnected(&self, client_id: &str, principal: &Principal);
    /// After a SUBACK was queued for the client, with the filters that were granted (the
    /// subscriptions exist now). Must not block.
    fn on_subscribed(&self, _client_id: &str, _principal: &Principal, _filters: &[String]) {}
    /// Whether [`Hooks::on_routed`] wants messages (a cluster node does; a single broker does
    /// not, and then nothing is encoded). Asked once per routed message.
    fn forwards(&self) -> bool {
        false
    }
    /// After a message accepted here (from a client, a will, or [`crate::Broker::publish`]) was
    /// retained and routed locally: the message as another node's broker takes it
    /// ([`crate::Broker::route_forwarded`]), for the embedder to carry there. Must not block.
    /// Never called for a message that itself arrived through `route_forwarded`.
    fn on_routed(&self, _forwarded: Vec<u8>) {}
}
