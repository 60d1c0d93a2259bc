//! SUBSCRIBE and UNSUBSCRIBE.

use super::Conn;
use crate::broker::{lock, Refusal};
use crate::hooks::ProtocolVersion;
use crate::session::{Delivery, SubOptions};
use mooring_proto::topic::{is_shared_filter, is_valid_filter, parse_shared_filter};
use mqtt_protocol_core::mqtt::packet::{v3_1_1, v5_0};
use mqtt_protocol_core::mqtt::result_code::{
    DisconnectReasonCode, SubackReasonCode, SubackReturnCode, UnsubackReasonCode,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub(super) fn subscribe(&mut self, pid: u16, entries: Vec<(String, SubOptions, u8)>) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let v5 = self.version == ProtocolVersion::V5;
        let mut codes: Vec<u8> = Vec::with_capacity(entries.len());
        let mut retained_for: Vec<(String, u8, Option<u32>)> = Vec::new();
        let mut granted: Vec<String> = Vec::new();
        let principal = self.principal();
        if entries
            .iter()
            .any(|(f, o, _)| o.no_local && is_shared_filter(f))
        {
            // v5 §3.8.3.1: No Local on a shared subscription is a Protocol Error.
            self.disconnect_v5(DisconnectReasonCode::ProtocolError);
            self.close = true;
            return;
        }
        for (filter, opts, rh) in entries {
            let shared_sub = is_shared_filter(&filter);
            let valid = if shared_sub {
                parse_shared_filter(&filter).is_some()
            } else {
                is_valid_filter(&filter)
            };
            let code = if !self.shared.config.topic_within_limits(&filter) {
                self.shared.counters.refuse(Refusal::TopicTooLong);
                if v5 {
                    0x8F
                } else {
                    0x80
                }
            } else if !valid {
                if v5 {
                    0x8F
                } else {
                    0x80
                }
            } else if !self.shared.hooks.may_subscribe(&principal, &filter) {
                self.shared.counters.deny(Refusal::SubscribeDenied);
                if v5 {
                    0x87
                } else {
                    0x80
                }
            } else {
                let mut s = lock(&session);
                let existed = s.subs.contains_key(&filter);
                if !existed && s.subs.len() >= self.shared.config.subscriptions_per_session_max {
                    self.shared.counters.refuse(Refusal::SubscriptionQuota);
                    if v5 {
                        0x97
                    } else {
                        0x80
                    }
                } else {
                    let qos = opts.qos.min(2);
                    self.shared.add_subscription(
                        &session,
                        &mut s,
                        filter.clone(),
                        SubOptions { qos, ..opts },
                    );
                    granted.push(filter.clone());
                    // No retained messages for a shared subscription (v5 §4.8.2).
                    if !shared_sub && (rh == 0 || (rh == 1 && !existed)) {
                        retained_for.push((filter, qos, opts.sub_id));
                    }
                    qos
                }
            };
            codes.push(code);
        }
        let events = if v5 {
            let rcs = codes
                .iter()
                .map(|c| {
                    SubackReasonCode::try_from(*c).unwrap_or(SubackReasonCode::UnspecifiedError)
                })
                .collect();
            match v5_0::Suback::builder()
                .packet_id(pid)
                .reason_codes(rcs)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            }
        } else {
            let rcs = codes
                .iter()
                .map(|c| SubackReturnCode::try_from(*c).unwrap_or(SubackReturnCode::Failure))
                .collect();
            match v3_1_1::Suback::builder()
                .packet_id(pid)
                .return_codes(rcs)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            }
        };
        self.apply(events);
        if !granted.is_empty() {
            let client_id = lock(&session).client_id.clone();
            self.shared
                .hooks
                .on_subscribed(&client_id, &principal, &granted);
        }
        self.session_dirty = true;
        // Retained messages go after the SUBACK (same write buffer, so in order).
        for (filter, qos, sub_id) in retained_for {
            for (msg, expires_at) in self.shared.retained_matching(&filter) {
                if expires_at.is_some_and(|at| at <= Instant::now()) {
                    continue;
                }
                let d = Delivery {
                    qos: qos.min(msg.qos),
                    msg,
                    retain: true,
                    expires_at,
                    sub_ids: sub_id.into_iter().collect(),
                    seq: 0,
                    shared: None,
                };
                self.shared.enqueue(&mut lock(&session), d, &mut false);
            }
        }
    }

    pub(super) fn unsubscribe(&mut self, pid: u16, filters: Vec<String>) {
        let Some(session) = self.session.clone() else {
            return;
        };
        let mut codes = Vec::with_capacity(filters.len());
        {
            let mut s = lock(&session);
            for f in &filters {
                codes.push(if self.shared.remove_subscription(&mut s, f) {
                    UnsubackReasonCode::Success
                } else {
                    UnsubackReasonCode::NoSubscriptionExisted
                });
            }
        }
        self.session_dirty = true;
        let events = match self.version {
            ProtocolVersion::V311 => match v3_1_1::Unsuback::builder().packet_id(pid).build() {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
            ProtocolVersion::V5 => match v5_0::Unsuback::builder()
                .packet_id(pid)
                .reason_codes(codes)
                .build()
            {
                Ok(p) => self.mqtt.send(p.into()),
                Err(_) => Vec::new(),
            },
        };
        self.apply(events);
    }
}
