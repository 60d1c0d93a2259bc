//! CONNECT: reading it, authenticating, attaching the session (taking over), CONNACK.

use super::convert::{props_to_message_props, qos_u8};
use super::driver::poll_read_chunk;
use super::{Conn, Will};
use crate::broker::{lock, Control, Owner, Refusal, SessionKey};
use crate::hooks::{
    Authenticated, ConnInfo, ConnectRefusal, ConnectRequest, Message, ProtocolVersion,
};
use crate::persist::StoredWill;
use crate::session::{Inflight, Link, Session};
use mooring_proto::policy::Principal;
use mooring_proto::topic::is_valid_topic_name;
use mqtt_protocol_core::mqtt;
use mqtt_protocol_core::mqtt::common::Cursor;
use mqtt_protocol_core::mqtt::packet::{v3_1_1, v5_0, GenericPacket, Property, Qos};
use mqtt_protocol_core::mqtt::result_code::{ConnectReasonCode, ConnectReturnCode, MqttError};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

/// A CONNECT as the broker uses it, decoded once whatever its protocol version (v3.1.1 has no
/// properties: those fields keep their defaults).
pub(super) struct Connect {
    /// As sent; may be empty.
    client_id: String,
    /// Clean Session (v3.1.1) / Clean Start (v5).
    clean: bool,
    keep_alive_secs: u16,
    username: Option<String>,
    password: Option<Vec<u8>>,
    /// Not yet authorized (see `will_allowed`).
    will: Option<Will>,
    /// Session Expiry Interval asked for (v5; 0 when absent).
    session_expiry_secs: u32,
    /// Receive Maximum (v5).
    receive_max: u16,
    /// Maximum Packet Size (v5).
    packet_size_max: u32,
}

impl Connect {
    fn v3(p: &v3_1_1::Connect) -> Connect {
        Connect {
            client_id: p.client_id().to_string(),
            clean: p.clean_session(),
            keep_alive_secs: p.keep_alive(),
            username: p.user_name().map(str::to_string),
            password: p.password().map(<[u8]>::to_vec),
            will: p.will_topic().map(|t| {
                will(
                    t,
                    p.will_payload().unwrap_or_default(),
                    p.will_qos(),
                    p.will_retain(),
                    &[],
                )
            }),
            session_expiry_secs: 0,
            receive_max: u16::MAX,
            packet_size_max: u32::MAX,
        }
    }

    fn v5(p: &v5_0::Connect) -> Connect {
        let mut c = Connect {
            client_id: p.client_id().to_string(),
            clean: p.clean_start(),
            keep_alive_secs: p.keep_alive(),
            username: p.user_name().map(str::to_string),
            password: p.password().map(<[u8]>::to_vec),
            will: p.will_topic().map(|t| {
                will(
                    t,
                    p.will_payload().unwrap_or_default(),
                    p.will_qos(),
                    p.will_retain(),
                    p.will_props(),
                )
            }),
            session_expiry_secs: 0,
            receive_max: u16::MAX,
            packet_size_max: u32::MAX,
        };
        for prop in p.props() {
            match prop {
                Property::SessionExpiryInterval(v) => c.session_expiry_secs = v.val(),
                Property::ReceiveMaximum(v) => c.receive_max = v.val(),
                Property::MaximumPacketSize(v) => c.packet_size_max = v.val(),
                _ => {}
            }
        }
        c
    }

    /// The CONNECT as the hooks see it.
    fn request<'a>(&'a self, info: &'a ConnInfo, version: ProtocolVersion) -> ConnectRequest<'a> {
        ConnectRequest {
            info,
            client_id: &self.client_id,
            username: self.username.as_deref(),
            password: self.password.as_deref(),
            protocol_version: version,
            clean_start: self.clean,
        }
    }
}

/// A will as the CONNECT carries it (v3.1.1: no properties).
fn will(topic: &str, payload: &[u8], qos: Qos, retain: bool, props: &[Property]) -> Will {
    let delay_secs = props
        .iter()
        .find_map(|p| {
            if let Property::WillDelayInterval(v) = p {
                Some(v.val())
            } else {
                None
            }
        })
        .unwrap_or(0);
    Will {
        msg: Message {
            topic: topic.to_string(),
            payload: payload.to_vec().into(),
            qos: qos_u8(qos),
            retain,
            props: props_to_message_props(props),
        },
        delay_secs,
    }
}

/// One turn of attaching a session (see `Conn::attach`).
enum Attach {
    /// A live connection holds the session: wait (once) for it to end.
    Wait(watch::Receiver<()>),
    Refuse(Refusal),
    Done(Arc<Mutex<Session>>, bool),
}

/// A session attached to this connection.
struct Attached {
    session: Arc<Mutex<Session>>,
    /// It was resumed (CONNACK Session Present).
    present: bool,
    /// The principal it was attached for (re-asked if it changed while the CONNECT waited).
    principal: Arc<Principal>,
    key: SessionKey,
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub(super) async fn read_connect(&mut self) -> Option<Connect> {
        use crate::connect_fixup::{first_packet, without_zero_topic_alias_maximum, First};
        let mut buf = Vec::new();
        // The CONNECT is collected whole first (see `connect_fixup`); anything that is not a
        // CONNECT the broker accepts goes to the library as it arrives (`unchecked`).
        let mut pending = Vec::new();
        let mut unchecked = false;
        loop {
            let n = std::future::poll_fn(|cx| poll_read_chunk(&mut self.stream, cx, &mut buf))
                .await
                .ok()?;
            if n == 0 {
                return None;
            }
            if !unchecked {
                pending.extend_from_slice(&buf[..n]);
                match first_packet(&pending, self.shared.config.packet_size_bytes_max) {
                    First::Incomplete => continue,
                    First::Complete(len) => {
                        let rest = pending.split_off(len);
                        buf = without_zero_topic_alias_maximum(&pending).unwrap_or(pending);
                        buf.extend_from_slice(&rest);
                    }
                    First::Unchecked => buf = pending,
                }
                pending = Vec::new();
                unchecked = true;
            }
            let n = buf.len();
            let mut cur = Cursor::new(&buf[..n]);
            while (cur.position() as usize) < n {
                let events = self.mqtt.recv(&mut cur);
                let first = self.apply(events).into_iter().next();
                let connect = match first {
                    Some(GenericPacket::V3_1_1Connect(p)) => {
                        self.version = ProtocolVersion::V311;
                        Connect::v3(&p)
                    }
                    Some(GenericPacket::V5_0Connect(p)) => {
                        self.version = ProtocolVersion::V5;
                        Connect::v5(&p)
                    }
                    Some(_) => return None,
                    None if self.close => return None,
                    None => continue,
                };
                // Bytes pipelined after CONNECT are processed once the session is attached.
                let used = usize::try_from(cur.position()).unwrap_or(n).min(n);
                self.leftover = buf[used..n].to_vec();
                return Some(connect);
            }
        }
    }

    pub(super) fn refuse(&mut self, v3: ConnectReturnCode, v5: ConnectReasonCode) {
        let events = match self.version {
            ProtocolVersion::V311 => match v3_1_1::Connack::builder()
                .session_present(false)
                .return_code(v3)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
            ProtocolVersion::V5 => match v5_0::Connack::builder()
                .session_present(false)
                .reason_code(v5)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
        };
        self.apply(events);
        self.close = true;
    }

    /// Ask the embedder who is connecting; on a refusal the CONNACK is queued (the connection
    /// closes) and `None` is returned.
    pub(super) async fn authenticate(&mut self, req: ConnectRequest<'_>) -> Option<Authenticated> {
        let refusal = match self.shared.hooks.authenticate(req).await {
            Ok(a) => return Some(a),
            Err(refusal) => refusal,
        };
        self.shared.counters.deny(match refusal {
            ConnectRefusal::BadClientId => Refusal::ClientIdInvalid,
            _ => Refusal::Authentication,
        });
        let (v3c, v5c) = match refusal {
            ConnectRefusal::BadClientId => (
                ConnectReturnCode::IdentifierRejected,
                ConnectReasonCode::ClientIdentifierNotValid,
            ),
            ConnectRefusal::BadUsernameOrPassword => (
                ConnectReturnCode::BadUserNameOrPassword,
                ConnectReasonCode::BadUserNameOrPassword,
            ),
            ConnectRefusal::NotAuthorized => (
                ConnectReturnCode::NotAuthorized,
                ConnectReasonCode::NotAuthorized,
            ),
            ConnectRefusal::ServerUnavailable => (
                ConnectReturnCode::ServerUnavailable,
                ConnectReasonCode::ServerUnavailable,
            ),
        };
        self.refuse(v3c, v5c);
        None
    }

    /// Whether `principal` may leave a will on `topic`; if not, the refusal is counted and the
    /// CONNACK (not authorized) queued.
    pub(super) fn will_allowed(&mut self, principal: &Principal, topic: &str) -> bool {
        let too_long = !self.shared.config.topic_within_limits(topic);
        if !too_long
            && is_valid_topic_name(topic)
            && self.shared.hooks.may_publish(principal, topic)
        {
            return true;
        }
        self.shared.counters.deny(if too_long {
            Refusal::TopicTooLong
        } else {
            Refusal::PublishDenied
        });
        self.refuse(
            ConnectReturnCode::NotAuthorized,
            ConnectReasonCode::NotAuthorized,
        );
        false
    }

    /// Authenticate, attach the session (taking over any live connection), send CONNACK.
    pub(super) async fn handle_connect(
        &mut self,
        mut c: Connect,
        info: &ConnInfo,
        link: Link,
    ) -> bool {
        let cfg = self.shared.config.clone();
        let v5 = self.version == ProtocolVersion::V5;
        if self.version == ProtocolVersion::V311 && c.client_id.is_empty() && !c.clean {
            self.refuse(
                ConnectReturnCode::IdentifierRejected,
                ConnectReasonCode::ClientIdentifierNotValid,
            );
            return false;
        }
        // A device deleted or re-tagged while this CONNECT waits (authentication, takeover) must
        // not attach with the old view: the attach step compares this epoch and, if it moved,
        // asks the embedder again.
        let epoch = self.shared.principal_epoch.load(Ordering::SeqCst);
        let Some(auth) = self.authenticate(c.request(info, self.version)).await else {
            return false;
        };
        let mut client_id = auth.client_id;
        if client_id.is_empty() {
            client_id = if c.client_id.is_empty() {
                format!("mooring-auto-{}", link.conn_id)
            } else {
                c.client_id.clone()
            };
        }
        let principal = auth.principal;

        // Will: authorized at CONNECT like Mosquitto does (refuse the connection if forbidden).
        if let Some(w) = &c.will {
            if !self.will_allowed(&principal, &w.msg.topic) {
                return false;
            }
        }

        let expiry_secs = if matches!(principal, Principal::Claim { .. }) {
            // An enrolling device's session never outlives its connection (nothing of it is
            // stored); a v5 client is told so in the CONNACK.
            0
        } else if v5 {
            c.session_expiry_secs.min(cfg.session_expiry_secs_max)
        } else if c.clean {
            0
        } else {
            cfg.session_expiry_secs_max
        };
        self.client_packet_size_max = c.packet_size_max;
        self.send_window = usize::from(c.receive_max.min(cfg.inflight_max.max(1)));

        let Some(Attached {
            session,
            present,
            principal,
            key,
        }) = self
            .attach(&c, info, epoch, &client_id, principal, expiry_secs, &link)
            .await
        else {
            return false;
        };
        self.client_id = client_id.clone();
        self.principal = principal.clone();
        self.session = Some(session.clone());
        {
            let mut r = lock(&self.record);
            r.key = Some(key);
            r.principal = Some((*principal).clone());
            r.session = Some(session.clone());
            r.will = c.will.take();
        }
        if present {
            let q = lock(&session).qos2_in.clone();
            self.mqtt
                .restore_qos2_publish_handled(q.into_iter().collect());
        }

        if !self.connack(&c, &client_id, expiry_secs, present) {
            return false;
        }
        if self.keepalive.is_none() {
            // Keepalive 0: the client asked for no supervision; the server still closes a
            // connection that stays silent for 1.5 × keepalive_secs_max.
            let cap_ms = self.idle_cap_ms();
            self.self_supervised = true;
            self.keepalive_ms = cap_ms;
            self.keepalive = Some(Box::pin(tokio::time::sleep(Duration::from_millis(cap_ms))));
        }
        lock(&self.record).connected = true;
        self.shared.hooks.on_connected(&client_id, &principal);

        // Unacknowledged outbound messages are resent, in order, with DUP, by `pump` (within
        // the write buffer bound); their packet ids are taken now so new messages never reuse one.
        let inflight: Vec<Inflight> = lock(&session).inflight.iter().cloned().collect();
        for i in inflight {
            if self.mqtt.register_packet_id(i.packet_id).is_ok() {
                self.resend.push_back(i);
            }
        }
        self.pump();
        true
    }
    /// Attach the session under `client_id` for `principal` (authenticated at `epoch`), taking
    /// over any live connection with this client id; `None` if refused (the CONNACK is queued).
    #[allow(clippy::too_many_arguments)]
    async fn attach(
        &mut self,
        c: &Connect,
        info: &ConnInfo,
        mut epoch: u64,
        client_id: &str,
        principal: Principal,
        expiry_secs: u32,
        link: &Link,
    ) -> Option<Attached> {
        let cfg = self.shared.config.clone();
        let version = self.version;
        // Attach the session, taking over any live connection with this client id. Sessions
        // live in one namespace per kind of principal (devices, services, the dev listener), and
        // within it a session belongs to the principal that created it: another principal using
        // the same client id is refused, never given the session, and never kicks its connection.
        let mut owner = Owner::of(&principal);
        let mut key: SessionKey = (owner.namespace(), client_id.to_owned());
        let persistent = expiry_secs > 0;
        let mut principal = Arc::new(principal);
        let mut waited = false;
        loop {
            let step = {
                let mut table = lock(&self.shared.sessions);
                if self.shared.principal_epoch.load(Ordering::SeqCst) != epoch {
                    // Checked under the table lock, which `remove_principal` and
                    // `update_principal` hold while they move the epoch.
                    drop(table);
                    epoch = self.shared.principal_epoch.load(Ordering::SeqCst);
                    match self.authenticate(c.request(info, version)).await {
                        Some(auth) if auth.client_id.is_empty() || auth.client_id == client_id => {
                            if let Some(w) = &c.will {
                                if !self.will_allowed(&auth.principal, &w.msg.topic) {
                                    return None;
                                }
                            }
                            owner = Owner::of(&auth.principal);
                            key = (owner.namespace(), client_id.to_owned());
                            principal = Arc::new(auth.principal);
                            continue;
                        }
                        Some(_) => {
                            self.refuse(
                                ConnectReturnCode::IdentifierRejected,
                                ConnectReasonCode::ClientIdentifierNotValid,
                            );
                            return None;
                        }
                        None => return None,
                    }
                }
                let existing = table.get(&key);
                let foreign = existing.is_some_and(|e| e.owner != owner);
                let was_persistent = existing.is_some_and(|e| e.persistent);
                let existing = existing.map(|e| e.session.clone());
                let resumes = existing.is_some() && !c.clean;
                let old_done = if foreign {
                    None
                } else {
                    existing.as_ref().and_then(|e| {
                        let s = lock(e);
                        s.link.as_ref().map(|old| {
                            let _ = old.control.try_send(Control::TakenOver);
                            old.done.clone()
                        })
                    })
                };
                let bounded = owner.quota_bound();
                match old_done {
                    _ if foreign => Attach::Refuse(Refusal::ClientIdInUse),
                    Some(done) if !waited => Attach::Wait(done),
                    _ if bounded && existing.is_none() && table.others() >= cfg.sessions_max => {
                        Attach::Refuse(Refusal::SessionsFull)
                    }
                    _ if bounded
                        && existing.is_none()
                        && table.sessions_of(&owner) >= cfg.sessions_per_principal_max =>
                    {
                        Attach::Refuse(Refusal::SessionQuota)
                    }
                    _ if bounded
                        && persistent
                        && !was_persistent
                        && table.persistent_of(&owner)
                            >= cfg.persistent_sessions_per_principal_max =>
                    {
                        Attach::Refuse(Refusal::SessionQuota)
                    }
                    _ => {
                        let (session, present) = match existing {
                            Some(s) if resumes => (s, true),
                            _ => {
                                let id = self.shared.session_seq.fetch_add(1, Ordering::Relaxed);
                                let s = Arc::new(Mutex::new(Session::new(
                                    id,
                                    client_id.to_owned(),
                                    principal.clone(),
                                )));
                                // Clean start: the old session (if any) ends here.
                                if let Some(old) =
                                    table.insert(&key, s.clone(), owner.clone(), persistent)
                                {
                                    self.shared.retire(&mut lock(&old));
                                    self.shared.redeliver_shared(&old);
                                }
                                (s, false)
                            }
                        };
                        table.set_persistent(&key, persistent);
                        {
                            let mut s = lock(&session);
                            s.principal = principal.clone();
                            s.expiry_secs = expiry_secs;
                            s.generation += 1;
                            s.offline_until_ms = 0;
                            s.link = Some(Link {
                                conn_id: link.conn_id,
                                control: link.control.clone(),
                                done: link.done.clone(),
                            });
                            if present {
                                // What a resumed session holds is authorized again, against
                                // this principal and the current policy.
                                self.shared.revoke_disallowed(&mut s, true);
                            }
                            // Stored while connected, so a server that dies fires it after
                            // its restart (the connection was cut without DISCONNECT).
                            let persisted = expiry_secs > 0 && self.shared.persist.is_some();
                            s.will = c.will.as_ref().filter(|_| persisted).map(|w| {
                                Box::new(StoredWill {
                                    msg: w.msg.clone(),
                                    delay_secs: w.delay_secs.min(expiry_secs),
                                    fire_at_ms: 0,
                                })
                            });
                            let ops = self.shared.persist_session(&mut s, &owner);
                            self.shared.detach(ops);
                        }
                        Attach::Done(session, present)
                    }
                }
            };
            match step {
                Attach::Wait(mut done) => {
                    let wait = async move { while done.changed().await.is_ok() {} };
                    if tokio::time::timeout(Duration::from_millis(cfg.connect_timeout_ms), wait)
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            client_id,
                            "previous connection did not end in time; taking its session anyway"
                        );
                    }
                    waited = true;
                }
                Attach::Refuse(reason) => {
                    self.shared.counters.deny(reason);
                    tracing::info!(client_id, reason = reason.name(), "CONNECT refused");
                    let (v3, v5) = match reason {
                        Refusal::ClientIdInUse => (
                            ConnectReturnCode::IdentifierRejected,
                            ConnectReasonCode::ClientIdentifierNotValid,
                        ),
                        _ => (
                            ConnectReturnCode::ServerUnavailable,
                            ConnectReasonCode::QuotaExceeded,
                        ),
                    };
                    self.refuse(v3, v5);
                    return None;
                }
                Attach::Done(session, present) => {
                    return Some(Attached {
                        session,
                        present,
                        principal,
                        key,
                    })
                }
            }
        }
    }

    /// Queue the CONNACK of an accepted CONNECT; false if the connection closes instead.
    fn connack(&mut self, c: &Connect, client_id: &str, expiry_secs: u32, present: bool) -> bool {
        let cfg = self.shared.config.clone();
        let events = if self.version == ProtocolVersion::V5 {
            let mut cprops: Vec<Property> = Vec::new();
            let mut push = |r: Result<Property, MqttError>| {
                if let Ok(p) = r {
                    cprops.push(p);
                }
            };
            if c.client_id.is_empty() || c.client_id != client_id {
                push(mqtt::packet::AssignedClientIdentifier::new(client_id).map(Into::into));
            }
            if c.session_expiry_secs != expiry_secs {
                push(mqtt::packet::SessionExpiryInterval::new(expiry_secs).map(Into::into));
            }
            if c.keep_alive_secs > cfg.keepalive_secs_max
                || (c.keep_alive_secs == 0 && cfg.keepalive_secs_max > 0)
            {
                push(mqtt::packet::ServerKeepAlive::new(cfg.keepalive_secs_max).map(Into::into));
            }
            if cfg.topic_alias_max > 0 {
                push(mqtt::packet::TopicAliasMaximum::new(cfg.topic_alias_max).map(Into::into));
            }
            push(mqtt::packet::ReceiveMaximum::new(cfg.inflight_max.max(1)).map(Into::into));
            push(mqtt::packet::SharedSubscriptionAvailable::new(1).map(Into::into));
            match v5_0::Connack::builder()
                .session_present(present)
                .reason_code(ConnectReasonCode::Success)
                .props(cprops)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => return false,
            }
        } else {
            match v3_1_1::Connack::builder()
                .session_present(present)
                .return_code(ConnectReturnCode::Accepted)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => return false,
            }
        };
        self.apply(events);
        !self.close
    }
}
