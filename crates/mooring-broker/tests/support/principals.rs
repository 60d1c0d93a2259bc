//! Hooks with real principals for ownership and bounds tests: the username names the principal.
#![allow(dead_code)]

use super::RawClient;
use mooring_broker::{
    Authenticated, Broker, BrokerConfig, ConnectRefusal, ConnectRequest, Hooks, Message, Principal,
    PublishVerdict,
};
use mqtt_protocol_core::mqtt;
use mqtt_protocol_core::mqtt::packet::{v5_0, GenericPacket};
use mqtt_protocol_core::mqtt::result_code::ConnectReasonCode;
use std::collections::BTreeMap;
use std::sync::Arc;

/// `svc:<name>` a service, `dev:<id>[@site]` a device (tag `site`), anything else the dev
/// listener. Devices may subscribe to `devices/<id>/#` and `sites/<site>/#`, and share (`$share/<g>/...`)
/// only within `devices/<id>/#` (as mooring's policy says); everything else is allowed.
/// A device listed in `registry` is authenticated as the registry says, like the server does
/// from its store: `None` = deleted (refused), `Some(site)` = its current site tag.
#[derive(Default)]
pub struct PrincipalHooks {
    pub registry: std::sync::Mutex<std::collections::HashMap<String, Option<String>>>,
}

#[async_trait::async_trait]
impl Hooks for PrincipalHooks {
    async fn authenticate(&self, req: ConnectRequest<'_>) -> Result<Authenticated, ConnectRefusal> {
        let user = req.username.unwrap_or_default();
        let principal = if let Some(name) = user.strip_prefix("svc:") {
            Principal::Service {
                id: name.into(),
                name: name.into(),
            }
        } else if let Some(rest) = user.strip_prefix("dev:") {
            let (id, site) = rest.split_once('@').unwrap_or((rest, ""));
            let current = mooring_proto::sync::lock(&self.registry).get(id).cloned();
            let site = match &current {
                Some(None) => return Err(ConnectRefusal::NotAuthorized),
                Some(Some(s)) => s.as_str(),
                None => site,
            };
            let mut tags = BTreeMap::new();
            if !site.is_empty() {
                tags.insert("site".to_string(), site.to_string());
            }
            Principal::Device {
                id: mooring_proto::DeviceId::parse(id).expect("test device id"),
                tags,
            }
        } else {
            Principal::Dev
        };
        Ok(Authenticated {
            client_id: req.client_id.to_string(),
            principal,
        })
    }
    fn may_publish(&self, _: &Principal, _: &str) -> bool {
        true
    }
    fn may_subscribe(&self, who: &Principal, filter: &str) -> bool {
        let shared = mooring_proto::topic::parse_shared_filter(filter);
        let filter = shared.map_or(filter, |s| s.filter);
        match who {
            Principal::Device { id, tags } => {
                filter.starts_with(&format!("devices/{id}/"))
                    || (shared.is_none()
                        && tags
                            .get("site")
                            .is_some_and(|s| filter.starts_with(&format!("sites/{s}/"))))
            }
            _ => true,
        }
    }
    async fn on_publish(&self, _: &Principal, _: &str, _: &Message) -> PublishVerdict {
        PublishVerdict::Accept
    }
    fn on_connected(&self, _: &str, _: &Principal) {}
    fn on_disconnected(&self, _: &str, _: &Principal) {}
}

pub fn broker_with_principals(config: BrokerConfig) -> Broker {
    broker_with_registry(config).0
}

pub fn broker_with_registry(config: BrokerConfig) -> (Broker, Arc<PrincipalHooks>) {
    let hooks = Arc::new(PrincipalHooks::default());
    (Broker::new(config, hooks.clone()), hooks)
}

pub fn connect_packet(
    user: &str,
    client_id: &str,
    clean: bool,
    session_expiry_secs: u32,
    keepalive: u16,
) -> GenericPacket<u16> {
    let mut b = v5_0::Connect::builder()
        .client_id(client_id)
        .expect("id")
        .clean_start(clean)
        .user_name(user)
        .expect("user")
        .keep_alive(keepalive);
    if session_expiry_secs > 0 {
        b = b.props(vec![mqtt::packet::SessionExpiryInterval::new(
            session_expiry_secs,
        )
        .expect("sei")
        .into()]);
    }
    b.build().expect("connect").into()
}

/// v5 CONNECT as `user`; returns the CONNACK reason code.
pub async fn connect_as(
    c: &mut RawClient,
    user: &str,
    client_id: &str,
    clean: bool,
    session_expiry_secs: u32,
) -> ConnectReasonCode {
    c.send(connect_packet(
        user,
        client_id,
        clean,
        session_expiry_secs,
        0,
    ))
    .await;
    match c.recv().await {
        Some(GenericPacket::V5_0Connack(a)) => a.reason_code(),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// Polls `cond` on virtual time (auto-advanced while everything else is idle), bounded.
pub async fn wait_until(broker: &Broker, cond: impl Fn(&Broker) -> bool) {
    for _ in 0..100_000 {
        if cond(broker) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("condition not reached");
}
