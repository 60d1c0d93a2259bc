//! The MQTT hooks: who a connecting client is, what it may do, and telemetry ingest.
//!
//! Devices are identified by the TLS client certificate (CN = device id; its SHA-256 must be an
//! active, unexpired certificate of that device in the registry's ledger). Services have no certificate and present an API token of role `service` as the
//! MQTT password. The development listener admits anyone with unrestricted access and ingests
//! nothing (no identity). Telemetry from a device on its own `devices/<id>/telemetry` topic is
//! acknowledged only once the group-commit writer reports it durable; command acks/results and
//! shadow reports on its own topics only once the state change is stored. Connects and
//! subscriptions covering `devices/<id>/commands/+` wake the command dispatcher. A device with
//! no certificate yet connects with username `claim` and a claim token as the password
//! (`Principal::Claim`) and enrolls by publishing to `provision/<client id>/request`.

use crate::app::App;
use crate::cas::Jitp;
use crate::metrics::Counters;
use crate::pipeline::Step;
use crate::registry::CertVerdict;
use crate::telemetry::Ingest;
use mooring_broker::{
    Authenticated, ConnectRefusal, ConnectRequest, Hooks, ListenerKind, Message, PublishVerdict,
};
use mooring_proto::policy::Principal;
use mooring_proto::Topic;
use mooring_store::Role;
use std::sync::{Arc, Weak};

/// MQTT v5 reason code: payload format invalid.
pub const REASON_PAYLOAD_FORMAT_INVALID: u8 = 0x99;
/// MQTT v5 reason code: implementation specific error (store unavailable).
pub const REASON_IMPLEMENTATION_SPECIFIC_ERROR: u8 = 0x83;
/// MQTT v5 reason code: unspecified error (the store failed; send again later).
pub const REASON_UNSPECIFIED_ERROR: u8 = 0x80;
/// MQTT v5 reason code: quota exceeded (the store is full or busy; send again later).
pub const REASON_QUOTA_EXCEEDED: u8 = 0x97;
/// A repeated store failure on the MQTT path is logged at most once per this interval.
pub const STORE_FAILURE_LOG_INTERVAL_MS: u64 = 10_000;

/// Acknowledge a command or shadow message only once its effect is stored; otherwise v5 clients
/// are told per message (see [`not_stored`]).
fn store_verdict(r: crate::error::ServiceResult<()>, device: &str) -> PublishVerdict {
    match r {
        Ok(()) => PublishVerdict::Accept,
        Err(e) => {
            tracing::debug!(device, error = %e, "command/shadow update not stored; not acknowledged");
            not_stored(matches!(
                e.kind,
                crate::error::ErrorKind::Unavailable | crate::error::ErrorKind::TooManyRequests
            ))
        }
    }
}

/// The verdict on a message the store could not take: 0x97 when the store is unavailable (full,
/// busy; send again later), 0x80 for other failures.
fn not_stored(unavailable: bool) -> PublishVerdict {
    PublishVerdict::Failed(if unavailable {
        REASON_QUOTA_EXCEEDED
    } else {
        REASON_UNSPECIFIED_ERROR
    })
}

/// A failure that can repeat for every message (the store is full): logged at most once per
/// [`STORE_FAILURE_LOG_INTERVAL_MS`], with how many happened since the last line.
#[derive(Default)]
struct FailureLog {
    since_last: std::sync::atomic::AtomicU64,
    last_ms: std::sync::atomic::AtomicU64,
}

impl FailureLog {
    fn record(&self, now_ms: u64, error: &dyn std::fmt::Display) {
        use std::sync::atomic::Ordering::Relaxed;
        self.since_last.fetch_add(1, Relaxed);
        let last = self.last_ms.load(Relaxed);
        let due = last == 0 || now_ms >= last.saturating_add(STORE_FAILURE_LOG_INTERVAL_MS);
        if due
            && self
                .last_ms
                .compare_exchange(last, now_ms.max(1), Relaxed, Relaxed)
                .is_ok()
        {
            let n = self.since_last.swap(0, Relaxed);
            tracing::error!(
                messages = n,
                error = %error,
                "telemetry not stored and not acknowledged (count since the last such line); devices send it again"
            );
        }
    }
}

/// Why a certificate was refused, as the log and the device's pipeline say it.
fn certificate_refusal_text(device: &str, verdict: &CertVerdict) -> String {
    let at = crate::pipeline::utc;
    match verdict {
        CertVerdict::Revoked { serial, at_ms } => format!(
            "refused: certificate {serial} of {device} was revoked at {}",
            at(*at_ms)
        ),
        CertVerdict::Expired { serial, at_ms } => format!(
            "refused: certificate {serial} of {device} expired at {}",
            at(*at_ms)
        ),
        CertVerdict::Unknown | CertVerdict::Valid => {
            format!("refused: certificate is not one issued to {device}")
        }
    }
}

/// In a cluster: the node that held this client's session hands it over first (and a
/// resuming client gets it from the store); a single node has nothing to do.
async fn take_over(app: &App, principal: &Principal, client_id: &str, clean_start: bool) {
    if let (Some(cluster), Some(broker)) = (app.cluster(), app.broker()) {
        cluster
            .take_over(broker, &app.presence, principal, client_id, clean_start)
            .await;
    }
}

/// MQTT v5 reason code: not authorized (a claim client may not retain; PUBACK cannot carry
/// 0x9A, retain not supported).
pub const REASON_NOT_AUTHORIZED: u8 = 0x87;
/// MQTT v5 reason code: no matching subscribers (a handled enrollment request: answered on its
/// own topic, routed to nobody).
pub const REASON_NO_MATCHING_SUBSCRIBERS: u8 = 0x10;

/// An enrollment request from a claim client (the policy let it publish only to its own
/// `provision/<client id>/request`): enroll, and answer on `.../accepted` or `.../rejected` to
/// that client only. The request itself is routed to nobody (its PUBACK: 0x10), never retained.
async fn on_claim_request(
    app: &App,
    principal: &Principal,
    client_id: &str,
    claim_id: &str,
    msg: &Message,
) -> PublishVerdict {
    use mooring_proto::provision::{self as p, EnrollAccepted, EnrollRejected, EnrollRequest};
    if msg.retain {
        return PublishVerdict::Reject(REASON_NOT_AUTHORIZED);
    }
    let mut verdict = PublishVerdict::Reject(REASON_NO_MATCHING_SUBSCRIBERS);
    let outcome = match app.provisioning.count_request(client_id) {
        Err(e) => Err(e),
        Ok(()) => match EnrollRequest::parse(&msg.payload) {
            Err(e) => {
                verdict = PublishVerdict::Reject(REASON_PAYLOAD_FORMAT_INVALID);
                Err(crate::error::ServiceError::invalid(
                    "invalid_request",
                    e.to_string(),
                ))
            }
            Ok(req) => {
                app.provisioning
                    .enroll_with_claim(claim_id, &req.csr_pem, req.device_id.as_deref())
                    .await
            }
        },
    };
    let (topic, payload, status, detail) = match outcome {
        Ok(e) => (
            p::accepted_topic(client_id),
            EnrollAccepted {
                v: p::SCHEMA_VERSION,
                device_id: e.device_id,
                certificate_pem: e.certificate_pem,
                ca_pem: e.ca_pem,
            }
            .to_bytes(),
            if e.created { 201 } else { 200 },
            String::new(),
        ),
        Err(e) => {
            if e.kind == crate::error::ErrorKind::Unavailable {
                verdict = not_stored(true);
            }
            (
                p::rejected_topic(client_id),
                EnrollRejected::new(e.code, e.message).to_bytes(),
                e.kind.http_status(),
                e.code.to_owned(),
            )
        }
    };
    if let Some(broker) = app.broker() {
        let reply = Message::new(topic, payload, 1, false);
        broker.publish_to(&mooring_broker::PrincipalKey::of(principal), reply);
    }
    if detail != "rate_limited" {
        app.audit
            .record(crate::audit::AuditEntryIn {
                actor: format!("claim:{claim_id}"),
                action: "provision.enroll",
                target: p::request_topic(client_id),
                source: "mqtt".to_owned(),
                status,
                detail,
            })
            .await;
    }
    verdict
}

/// A device asks for its local key (issue 20, `local.rs`) on its own
/// `devices/<id>/local/key/request`: answered on `devices/<id>/local/key` to that device only
/// (the key of the certificate it last connected with); routed to nobody (PUBACK 0x10), never
/// retained. Past the per-device rate, or for a device gone, there is no answer.
async fn on_local_key_request(
    app: &App,
    id: &mooring_proto::DeviceId,
    msg: &Message,
    now_ms: u64,
) -> PublishVerdict {
    if msg.retain {
        return PublishVerdict::Reject(REASON_NOT_AUTHORIZED);
    }
    match app.local.key_for_device(id.as_str(), now_ms).await {
        Ok(Some(key)) => {
            if let Some(broker) = app.broker() {
                let reply = Message::new(
                    mooring_proto::local::key_topic(id),
                    key.to_bytes(),
                    1,
                    false,
                );
                broker.publish_to_device(id.as_str(), reply);
            }
            PublishVerdict::Reject(REASON_NO_MATCHING_SUBSCRIBERS)
        }
        Ok(None) => PublishVerdict::Reject(REASON_QUOTA_EXCEEDED),
        Err(e) => {
            tracing::debug!(device = %id, error = %e, "local key request not answered");
            not_stored(e.kind == crate::error::ErrorKind::Unavailable)
        }
    }
}

/// A renewal request from an enrolled device on its own `devices/<id>/cert/request` (issue 16,
/// `registry/rotation.rs`): answered on `.../cert/accepted` or `.../cert/rejected` to that
/// device only; the request itself is routed to nobody (its PUBACK: 0x10), never retained.
async fn on_renew_request(
    app: &App,
    id: &mooring_proto::DeviceId,
    msg: &Message,
) -> PublishVerdict {
    use mooring_proto::provision::{self as p, EnrollAccepted, EnrollRejected, RenewRequest};
    if msg.retain {
        return PublishVerdict::Reject(REASON_NOT_AUTHORIZED);
    }
    let mut verdict = PublishVerdict::Reject(REASON_NO_MATCHING_SUBSCRIBERS);
    let outcome = match RenewRequest::parse(&msg.payload) {
        Err(e) => {
            verdict = PublishVerdict::Reject(REASON_PAYLOAD_FORMAT_INVALID);
            Err(crate::error::ServiceError::invalid(
                "invalid_request",
                e.to_string(),
            ))
        }
        Ok(req) => app.registry.renew_certificate(id, &req.csr_pem).await,
    };
    let (topic, payload, status, detail) = match outcome {
        Ok(r) => (
            p::renew_accepted_topic(id),
            EnrollAccepted {
                v: p::SCHEMA_VERSION,
                device_id: id.to_string(),
                certificate_pem: r.certificate_pem,
                ca_pem: r.ca_pem,
            }
            .to_bytes(),
            if r.created { 201 } else { 200 },
            match r.replaced {
                Some(old) => format!("serial {} (replaces unconfirmed {old})", r.serial),
                None => format!("serial {}", r.serial),
            },
        ),
        Err(e) => {
            if e.kind == crate::error::ErrorKind::Unavailable {
                verdict = not_stored(true);
            }
            tracing::info!(device = %id, code = e.code, error = %e.message, "certificate renewal refused");
            (
                p::renew_rejected_topic(id),
                EnrollRejected::new(e.code, e.message).to_bytes(),
                e.kind.http_status(),
                e.code.to_owned(),
            )
        }
    };
    if let Some(broker) = app.broker() {
        let reply = Message::new(topic, payload, 1, false);
        broker.publish_to(&mooring_broker::PrincipalKey::device(id.as_str()), reply);
    }
    if detail != "rate_limited" {
        app.audit
            .record(crate::audit::AuditEntryIn {
                actor: format!("device:{id}"),
                action: "cert.renew",
                target: id.to_string(),
                source: "mqtt".to_owned(),
                status,
                detail,
            })
            .await;
    }
    verdict
}

/// `devices/<child>/presence` from the child's gateway: the child is online while its gateway
/// says so (and is connected). A payload other than `{"v":1,"online":...}` is refused.
fn on_child_presence(
    app: &App,
    gateway: &mooring_proto::DeviceId,
    child: &mooring_proto::DeviceId,
    payload: &[u8],
    now_ms: u64,
) -> PublishVerdict {
    let Ok(p) = mooring_proto::gateway::ChildPresence::parse(payload) else {
        return PublishVerdict::Reject(REASON_PAYLOAD_FORMAT_INVALID);
    };
    if p.online && !app.presence.is_here(gateway) {
        // A will or a late message of a gateway no longer connected here: its children went
        // offline with it, and only a live session brings them back.
        return PublishVerdict::Accept;
    }
    if !app
        .registry
        .gateways()
        .child_presence(gateway.as_str(), child.as_str(), p.online)
    {
        return PublishVerdict::Accept;
    }
    if p.online {
        app.presence.connected(child, now_ms);
        tracing::debug!(device = %child, gateway = %gateway, "online through its gateway");
        app.events.publish(
            Some(child),
            mooring_api::EventBody::Presence {
                online: true,
                node: app.events.node().to_owned(),
            },
        );
        app.commands.kick_local(child, true);
    } else {
        app.registry.session_ended(child);
    }
    PublishVerdict::Accept
}

/// A device asks for a new download link (`devices/<id>/ota/link/request`): the link on
/// `.../ota/link/accepted`, or the refusal (code + message) on `.../ota/link/rejected`.
async fn on_link_request(
    app: &App,
    id: &mooring_proto::DeviceId,
    msg: &mooring_broker::Message,
) -> PublishVerdict {
    use mooring_proto::ota;
    use mooring_proto::provision::EnrollRejected;
    let mut verdict = PublishVerdict::Accept;
    let (topic, payload) = match app.ota.on_link_request(id.as_str(), &msg.payload).await {
        Ok(link) => (
            ota::link_accepted_topic(id),
            serde_json::to_vec(&link).unwrap_or_default(),
        ),
        Err(e) => {
            match e.kind {
                crate::error::ErrorKind::InvalidArgument => {
                    verdict = PublishVerdict::Reject(REASON_PAYLOAD_FORMAT_INVALID)
                }
                crate::error::ErrorKind::Unavailable | crate::error::ErrorKind::Internal => {
                    verdict = not_stored(true)
                }
                _ => {}
            }
            (
                ota::link_rejected_topic(id),
                EnrollRejected::new(e.code, e.message).to_bytes(),
            )
        }
    };
    if let Some(broker) = app.broker() {
        let reply = Message::new(topic, payload, 1, false);
        broker.publish_to(&mooring_broker::PrincipalKey::device(id.as_str()), reply);
    }
    verdict
}

/// The broker's hooks. They hold the server only weakly: the app holds the broker, the broker
/// holds its hooks, so a strong reference here would be a cycle that keeps the app (its store,
/// its writers) alive after shutdown. Once the app is gone, every question is answered "no".
pub struct ServerHooks {
    app: Weak<App>,
    telemetry_failures: FailureLog,
    /// The cluster this node forwards accepted messages to (held weakly, like the app).
    cluster: Option<Weak<crate::cluster::Cluster>>,
}

impl ServerHooks {
    pub fn new(app: &Arc<App>) -> Self {
        Self {
            app: Arc::downgrade(app),
            telemetry_failures: FailureLog::default(),
            cluster: app.cluster().map(Arc::downgrade),
        }
    }

    fn app(&self) -> Option<Arc<App>> {
        self.app.upgrade()
    }

    /// A device enrolling: username `claim`, the claim token as the password, a client id of
    /// device-id syntax (empty: `claim-<hex>`). Its session is a [`Principal::Claim`], which the
    /// policy confines to `provision/<client id>/`.
    async fn authenticate_claim(
        &self,
        app: &App,
        req: &ConnectRequest<'_>,
    ) -> Result<Authenticated, ConnectRefusal> {
        use crate::provision::ClaimConnectRefusal as R;
        let token = req
            .password
            .and_then(|p| std::str::from_utf8(p).ok())
            .unwrap_or("");
        let peer = req
            .info
            .peer
            .map_or_else(|| "unknown".to_owned(), |p| p.ip().to_string());
        match app
            .provisioning
            .authenticate_claim(token, req.client_id, &peer)
            .await
        {
            Ok((claim, client_id)) => {
                let principal = Principal::Claim {
                    client_id: client_id.clone(),
                    claim_id: claim.id,
                };
                // Claim sessions are never resumed: always a clean start.
                take_over(app, &principal, &client_id, true).await;
                Ok(Authenticated {
                    client_id,
                    principal,
                })
            }
            Err(refusal) => {
                Counters::inc(&app.counters().connects_refused);
                Err(match refusal {
                    R::BadToken => ConnectRefusal::BadUsernameOrPassword,
                    R::BadClientId => ConnectRefusal::BadClientId,
                    R::Busy | R::Unavailable => ConnectRefusal::ServerUnavailable,
                })
            }
        }
    }

    fn generated_client_id(prefix: &str) -> String {
        let bytes: [u8; 8] = rand::random();
        format!("{prefix}-{}", hex::encode(bytes))
    }
}

#[async_trait::async_trait]
impl Hooks for ServerHooks {
    async fn authenticate(&self, req: ConnectRequest<'_>) -> Result<Authenticated, ConnectRefusal> {
        let Some(app) = self.app() else {
            return Err(ConnectRefusal::ServerUnavailable);
        };
        if let Some(cn) = req.info.cert_identity.as_deref() {
            let sha256 = req.info.cert_sha256.as_deref().unwrap_or("");
            let record = match app.registry.lookup(cn).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    // Just-in-time registration: a certificate from a registered CA.
                    let jitp = match req.info.cert_der.as_deref() {
                        Some(der) => app.cas.just_in_time(cn, sha256, der).await,
                        None => Ok(Jitp::NotApplicable),
                    };
                    match jitp {
                        Ok(Jitp::Registered(r)) => *r,
                        Ok(Jitp::Refused(why)) => {
                            Counters::inc(&app.counters().connects_refused);
                            Counters::inc(&app.counters().connects_refused_certificate);
                            tracing::info!(device = cn, "{why}");
                            return Err(ConnectRefusal::NotAuthorized);
                        }
                        Ok(Jitp::NotApplicable) => {
                            Counters::inc(&app.counters().connects_refused);
                            tracing::info!(device = cn, "refused: no such device (deleted?)");
                            return Err(ConnectRefusal::NotAuthorized);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "just-in-time registration failed");
                            return Err(ConnectRefusal::ServerUnavailable);
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "device lookup failed");
                    return Err(ConnectRefusal::ServerUnavailable);
                }
            };
            match app.registry.check_certificate(cn, sha256).await {
                Ok(CertVerdict::Valid) => {}
                Ok(refused) => {
                    Counters::inc(&app.counters().connects_refused);
                    Counters::inc(&app.counters().connects_refused_certificate);
                    let from_ca = match (&refused, req.info.cert_der.as_deref()) {
                        (CertVerdict::Unknown, Some(der)) => app.cas.issuing_ca_id(der),
                        _ => None,
                    };
                    let why = match from_ca {
                        Some(ca) => format!(
                            "refused: device {cn} exists; its certificate from CA {ca} is not registered"
                        ),
                        None => certificate_refusal_text(cn, &refused),
                    };
                    tracing::info!(device = cn, "{why}");
                    app.pipeline.step_failed(cn, Step::FirstConnect, why);
                    return Err(ConnectRefusal::NotAuthorized);
                }
                Err(e) => {
                    tracing::error!(error = %e, "certificate lookup failed");
                    return Err(ConnectRefusal::ServerUnavailable);
                }
            }
            if !req.client_id.is_empty() && req.client_id != cn {
                Counters::inc(&app.counters().connects_refused);
                tracing::info!(
                    device = cn,
                    client_id = req.client_id,
                    "refused: client id is not the device id"
                );
                app.pipeline.step_failed(
                    cn,
                    Step::FirstConnect,
                    format!(
                        "refused: client id {:?} is not the device id",
                        req.client_id
                    ),
                );
                return Err(ConnectRefusal::BadClientId);
            }
            if let Err(why) = app
                .cas
                .admit_session(&record.id, req.info.cert_der.as_deref())
            {
                Counters::inc(&app.counters().connects_refused);
                Counters::inc(&app.counters().connects_refused_certificate);
                tracing::info!(device = cn, "{why}");
                app.pipeline.step_failed(cn, Step::FirstConnect, why);
                return Err(ConnectRefusal::NotAuthorized);
            }
            app.registry
                .note_session_cert(&record.id, sha256, req.info.cert_der.as_deref());
            // A device connecting with its pending renewal certificate: rotation confirmed.
            if let Some(rotated) = app
                .registry
                .confirm_rotation(&record.id, sha256, &record.cert_sha256)
                .await
            {
                app.audit
                    .record(crate::audit::AuditEntryIn {
                        actor: format!("device:{}", record.id),
                        action: "cert.rotated",
                        target: record.id.to_string(),
                        source: "mqtt".to_owned(),
                        status: 200,
                        detail: format!(
                            "serial {} current; revoked {}",
                            rotated.serial,
                            rotated.revoked.join(", ")
                        ),
                    })
                    .await;
            }
            let principal = Principal::Device {
                id: record.id,
                tags: record.tags,
            };
            take_over(&app, &principal, cn, req.clean_start).await;
            return Ok(Authenticated {
                client_id: cn.to_owned(),
                principal,
            });
        }
        if req.info.listener == ListenerKind::Dev {
            let client_id = if req.client_id.is_empty() {
                Self::generated_client_id("dev")
            } else {
                req.client_id.to_owned()
            };
            let principal = Principal::Dev;
            take_over(&app, &principal, &client_id, req.clean_start).await;
            return Ok(Authenticated {
                client_id,
                principal,
            });
        }
        if req.username == Some(mooring_proto::provision::CLAIM_USERNAME) {
            return self.authenticate_claim(&app, &req).await;
        }
        // TLS without a client certificate: only services, with a token as the password.
        let token = req
            .password
            .and_then(|p| std::str::from_utf8(p).ok())
            .unwrap_or("");
        match app.tokens.verify(token).await {
            Some(t) if t.role == Role::Service && t.scope.is_some() => {
                // The topic policy is not scope-aware: a scoped token would read beyond its
                // scope over MQTT, so it may use the API only.
                Counters::inc(&app.counters().connects_refused);
                tracing::info!(service = %t.name, "refused: a scoped token cannot use MQTT");
                Err(ConnectRefusal::NotAuthorized)
            }
            Some(t) if t.role == Role::Service => {
                let client_id = if req.client_id.is_empty() {
                    Self::generated_client_id("svc")
                } else {
                    req.client_id.to_owned()
                };
                // A service client id never equals a device id: nobody mistakes a service's
                // session for a device's (in logs, in tools, in the broker's namespaces).
                match app.registry.lookup(&client_id).await {
                    Ok(None) => {}
                    Ok(Some(_)) => {
                        Counters::inc(&app.counters().connects_refused);
                        tracing::info!(
                            service = %t.name,
                            client_id,
                            "refused: a service client id may not be a device id"
                        );
                        return Err(ConnectRefusal::BadClientId);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "device lookup failed");
                        return Err(ConnectRefusal::ServerUnavailable);
                    }
                }
                if let Some(expires_at_ms) = t.expires_at_ms {
                    // The token's sessions end when it does.
                    app.tokens.watch_expiry(&t.id, expires_at_ms);
                }
                let principal = Principal::Service {
                    id: t.id,
                    name: t.name,
                };
                take_over(&app, &principal, &client_id, req.clean_start).await;
                Ok(Authenticated {
                    client_id,
                    principal,
                })
            }
            Some(_) => {
                Counters::inc(&app.counters().connects_refused);
                Err(ConnectRefusal::NotAuthorized)
            }
            None => {
                Counters::inc(&app.counters().connects_refused);
                if req.password.is_none() {
                    Err(ConnectRefusal::NotAuthorized)
                } else {
                    Err(ConnectRefusal::BadUsernameOrPassword)
                }
            }
        }
    }

    fn may_publish(&self, principal: &Principal, topic: &str) -> bool {
        self.app().is_some_and(|app| {
            app.policy().may_publish(principal, topic)
                || app.registry.gateways().may_publish(principal, topic)
        })
    }

    fn may_subscribe(&self, principal: &Principal, filter: &str) -> bool {
        self.app().is_some_and(|app| {
            app.policy().may_subscribe(principal, filter)
                || app.registry.gateways().may_subscribe(principal, filter)
        })
    }

    async fn on_publish(
        &self,
        principal: &Principal,
        _client_id: &str,
        msg: &Message,
    ) -> PublishVerdict {
        if let Some(app) = self.app() {
            crate::metrics::Counters::inc(&app.counters().mqtt_publishes_received);
        }
        if let Principal::Claim {
            client_id,
            claim_id,
        } = principal
        {
            let Some(app) = self.app() else {
                return PublishVerdict::Disconnect;
            };
            return on_claim_request(&app, principal, client_id, claim_id, msg).await;
        }
        let Principal::Device { id: sender, .. } = principal else {
            return PublishVerdict::Accept;
        };
        let Some(app) = self.app() else {
            return PublishVerdict::Disconnect;
        };
        let now_ms = app.now_ms();
        // A gateway relays on its children's topics: the message is the child's (the hooks'
        // `may_publish` let it through only for a child attached to the sender).
        let parsed = Topic::parse(&msg.topic);
        let acting = parsed
            .as_ref()
            .and_then(|t| app.registry.gateways().acting_for(sender, t));
        if parsed.as_ref().is_some_and(|t| t.device() != sender) && acting.is_none() {
            // Detached between the broker's check and here: not the sender's to publish.
            return PublishVerdict::Reject(REASON_NOT_AUTHORIZED);
        }
        let topic = parsed.filter(|_| acting.is_some());
        let id = acting.as_ref().unwrap_or(sender);
        if id != sender {
            if msg.retain {
                // Nothing a gateway relays outlives it on the broker.
                return PublishVerdict::Reject(REASON_NOT_AUTHORIZED);
            }
            app.presence.seen(sender, now_ms);
            if let Some(Topic::DeviceOther(child, rest)) = &topic {
                if rest == mooring_proto::gateway::PRESENCE {
                    return on_child_presence(&app, sender, child, &msg.payload, now_ms);
                }
            }
        }
        // Telemetry marks the device seen after ingest, in the same presence update.
        if !matches!(topic, Some(Topic::Telemetry(_))) {
            app.presence.seen(id, now_ms);
        }
        match topic {
            Some(Topic::Telemetry(_)) => {}
            Some(Topic::CertRequest(_)) => return on_renew_request(&app, id, msg).await,
            Some(Topic::DeviceOther(_, rest))
                if rest == mooring_proto::local::KEY_REQUEST && id == sender =>
            {
                return on_local_key_request(&app, id, msg, now_ms).await;
            }
            Some(Topic::CommandAck(_, cmd)) => {
                return store_verdict(app.commands.on_reply(id, &cmd, None).await, id);
            }
            Some(Topic::CommandResult(_, cmd)) => {
                return store_verdict(
                    app.commands.on_reply(id, &cmd, Some(&msg.payload)).await,
                    id,
                );
            }
            Some(Topic::OtaStatus(_)) => {
                return match app.ota.on_status(id.as_str(), &msg.payload).await {
                    Ok(_) => PublishVerdict::Accept,
                    // Not acknowledged (v3.1.1: the connection closes), so the device's outbox
                    // sends it again later: a report is never lost to the limit.
                    Err(e) if e.kind == crate::error::ErrorKind::TooManyRequests => {
                        PublishVerdict::Failed(REASON_QUOTA_EXCEEDED)
                    }
                    Err(e) if e.kind == crate::error::ErrorKind::InvalidArgument => {
                        tracing::debug!(device = %id, error = %e, "invalid OTA status report");
                        PublishVerdict::Reject(REASON_PAYLOAD_FORMAT_INVALID)
                    }
                    Err(e) => {
                        tracing::warn!(device = %id, error = %e, "OTA status report not stored");
                        not_stored(e.kind == crate::error::ErrorKind::Unavailable)
                    }
                };
            }
            Some(Topic::OtaLinkRequest(_)) => return on_link_request(&app, id, msg).await,
            Some(Topic::ShadowReported(_)) => {
                return match app.shadows.on_reported(id, &msg.payload).await {
                    Ok(true) => PublishVerdict::Accept,
                    Ok(false) => PublishVerdict::Reject(REASON_PAYLOAD_FORMAT_INVALID),
                    Err(e) => store_verdict(Err(e), id),
                };
            }
            _ => return PublishVerdict::Accept,
        }
        let ingested = app.telemetry.ingest(id, &msg.payload, now_ms).await;
        if matches!(ingested, Ingest::Stored | Ingest::Duplicate) {
            app.presence.telemetry(id, now_ms);
        } else {
            app.presence.seen(id, now_ms);
        }
        match ingested {
            Ingest::Stored | Ingest::Duplicate => PublishVerdict::Accept,
            Ingest::Invalid(e) => {
                tracing::debug!(device = %id, error = %e, "invalid telemetry dropped");
                app.pipeline.step_failed(
                    id,
                    Step::FirstTelemetry,
                    format!("telemetry refused (payload format invalid): {e}"),
                );
                PublishVerdict::Reject(REASON_PAYLOAD_FORMAT_INVALID)
            }
            Ingest::MetricsLimit => {
                tracing::debug!(device = %id, "telemetry over the device's metric bound dropped");
                PublishVerdict::Reject(REASON_QUOTA_EXCEEDED)
            }
            Ingest::Failed(e) => {
                self.telemetry_failures.record(now_ms, &e);
                not_stored(matches!(e, mooring_store::StoreError::Unavailable(_)))
            }
        }
    }

    fn on_connected(&self, _client_id: &str, principal: &Principal) {
        if let (Principal::Claim { claim_id, .. }, Some(app)) = (principal, self.app()) {
            app.provisioning.connected(claim_id);
            return;
        }
        if let (Principal::Device { id, .. }, Some(app)) = (principal, self.app()) {
            if !app.presence.connected(id, app.now_ms()) {
                // A newer session of this device opened on another node while this one was
                // connecting: it goes, as an older one would have.
                if let Some(broker) = app.broker() {
                    broker.hand_over(&mooring_broker::PrincipalKey::device(id));
                }
                tracing::debug!(device = %id, "superseded by a newer session elsewhere");
                return;
            }
            tracing::debug!(device = %id, "online");
            app.events.publish(
                Some(id),
                mooring_api::EventBody::Presence {
                    online: true,
                    node: app.events.node().to_owned(),
                },
            );
            // A persistent session may already hold the commands subscription.
            app.commands.kick_local(id, true);
        }
    }

    fn on_subscribed(&self, _client_id: &str, principal: &Principal, filters: &[String]) {
        let (Principal::Device { id, .. }, Some(app)) = (principal, self.app()) else {
            return;
        };
        let commands = Topic::command(id, "c");
        if filters
            .iter()
            .any(|f| mooring_proto::topic::filter_matches(f, &commands))
        {
            app.commands.kick_local(id, true);
        }
        // A gateway subscribing to a child's commands: the child's queued commands go out.
        for f in filters {
            if let Some(child) = mooring_proto::gateway::filter_device(f) {
                if &child != id
                    && app
                        .registry
                        .gateways()
                        .is_attached(child.as_str(), id.as_str())
                    && mooring_proto::topic::filter_matches(f, &Topic::command(&child, "c"))
                {
                    app.commands.kick_local(&child, true);
                }
            }
        }
    }

    fn forwards(&self) -> bool {
        self.cluster.is_some()
    }

    fn on_routed(&self, forwarded: Vec<u8>) {
        if let Some(cluster) = self.cluster.as_ref().and_then(Weak::upgrade) {
            cluster.forward(forwarded);
        }
    }

    fn on_disconnected(&self, _client_id: &str, principal: &Principal) {
        if let (Principal::Claim { claim_id, .. }, Some(app)) = (principal, self.app()) {
            app.provisioning.disconnected(claim_id);
            return;
        }
        if let (Principal::Device { id, .. }, Some(app)) = (principal, self.app()) {
            tracing::debug!(device = %id, "offline");
            // A gateway gone: the children it said were online here are not any more (unless
            // a newer session of it here took over: that one keeps them, and says again).
            if app.registry.session_ended(id) {
                for child in app.registry.gateways().gateway_gone(id.as_str()) {
                    if let Ok(child) = mooring_proto::DeviceId::parse(&child) {
                        app.registry.session_ended(&child);
                    }
                }
            }
        }
    }
}
