//! Conversions between the library's packets and the broker's types: QoS, properties, PUBLISH.

use super::Conn;
use crate::hooks::{MessageProps, ProtocolVersion};
use crate::session::Delivery;
use bytes::Bytes;
use mqtt_protocol_core::mqtt;
use mqtt_protocol_core::mqtt::packet::{v3_1_1, v5_0, GenericPacket, Property, Qos};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

pub(super) fn qos_u8(q: Qos) -> u8 {
    match q {
        Qos::AtMostOnce => 0,
        Qos::AtLeastOnce => 1,
        Qos::ExactlyOnce => 2,
    }
}

pub(super) fn qos_of(q: u8) -> Qos {
    match q {
        0 => Qos::AtMostOnce,
        1 => Qos::AtLeastOnce,
        _ => Qos::ExactlyOnce,
    }
}

pub(super) fn props_to_message_props(props: &[Property]) -> MessageProps {
    let mut m = MessageProps::default();
    for p in props {
        match p {
            Property::PayloadFormatIndicator(v) => m.payload_utf8 = v.val() == 1,
            Property::MessageExpiryInterval(v) => m.message_expiry_secs = Some(v.val()),
            Property::ContentType(v) => m.content_type = Some(v.val().to_string()),
            Property::ResponseTopic(v) => m.response_topic = Some(v.val().to_string()),
            Property::CorrelationData(v) => {
                m.correlation_data = Some(Bytes::copy_from_slice(v.val()))
            }
            Property::UserProperty(v) => m
                .user_properties
                .push((v.key().to_string(), v.val().to_string())),
            _ => {}
        }
    }
    m
}

pub(super) fn message_props_to_props(m: &MessageProps, expiry_secs: Option<u32>) -> Vec<Property> {
    let mut v: Vec<Property> = Vec::new();
    if m.payload_utf8 {
        if let Ok(p) =
            mqtt::packet::PayloadFormatIndicator::new(mqtt::packet::PayloadFormat::String)
        {
            v.push(p.into());
        }
    }
    if let Some(e) = expiry_secs {
        if let Ok(p) = mqtt::packet::MessageExpiryInterval::new(e) {
            v.push(p.into());
        }
    }
    if let Some(ct) = &m.content_type {
        if let Ok(p) = mqtt::packet::ContentType::new(ct.as_str()) {
            v.push(p.into());
        }
    }
    if let Some(rt) = &m.response_topic {
        if let Ok(p) = mqtt::packet::ResponseTopic::new(rt.as_str()) {
            v.push(p.into());
        }
    }
    if let Some(cd) = &m.correlation_data {
        if let Ok(p) = mqtt::packet::CorrelationData::new(cd.to_vec()) {
            v.push(p.into());
        }
    }
    for (k, val) in &m.user_properties {
        if let Ok(p) = mqtt::packet::UserProperty::new(k.as_str(), val.as_str()) {
            v.push(p.into());
        }
    }
    v
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub(super) fn build_publish(
        &self,
        d: &Delivery,
        pid: Option<u16>,
        dup: bool,
    ) -> Option<GenericPacket<u16>> {
        let qos = qos_of(d.qos);
        match self.version {
            ProtocolVersion::V311 => {
                let mut b = v3_1_1::Publish::builder()
                    .topic_name(d.msg.topic.as_str())
                    .ok()?
                    .qos(qos)
                    .retain(d.retain)
                    .dup(dup)
                    .payload(d.msg.payload.to_vec());
                if let Some(pid) = pid {
                    b = b.packet_id(pid);
                }
                b.build().ok().map(Into::into)
            }
            ProtocolVersion::V5 => {
                let expiry = d.expires_at.map(|at| {
                    let left = at.saturating_duration_since(Instant::now()).as_secs();
                    u32::try_from(left).unwrap_or(u32::MAX).max(1)
                });
                let mut props = message_props_to_props(&d.msg.props, expiry);
                for id in &d.sub_ids {
                    if let Ok(p) = mqtt::packet::SubscriptionIdentifier::new(*id) {
                        props.push(p.into());
                    }
                }
                let mut b = v5_0::Publish::builder()
                    .topic_name(d.msg.topic.as_str())
                    .ok()?
                    .qos(qos)
                    .retain(d.retain)
                    .dup(dup)
                    .payload(d.msg.payload.to_vec());
                if !props.is_empty() {
                    b = b.props(props);
                }
                if let Some(pid) = pid {
                    b = b.packet_id(pid);
                }
                b.build().ok().map(Into::into)
            }
        }
    }
}
