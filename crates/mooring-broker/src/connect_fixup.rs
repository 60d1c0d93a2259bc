//! A v5 CONNECT's Topic Alias Maximum of 0 is dropped before the protocol library sees it.
//!
//! MQTT 5.0 §3.1.2.11.5: a Topic Alias Maximum of 0 means the client accepts no topic aliases,
//! the same as leaving the property out. `mqtt-protocol-core` 0.7.9 builds its alias table from
//! the value and panics on 0 (`ValueAllocator::new(1, 0)`), so such a client got no CONNACK
//! (found by the Paho interoperability suite, `client_test5.py` topic alias tests). The CONNECT
//! phase collects the first packet whole ([`first_packet`]) and hands the library the same
//! packet without that property ([`without_zero_topic_alias_maximum`]).

/// What the start of a connection's bytes holds.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum First {
    /// Part of a CONNECT: read more.
    Incomplete,
    /// A whole CONNECT of this many bytes (more may follow it).
    Complete(usize),
    /// Not a CONNECT, a malformed length, or larger than the broker accepts: the library
    /// refuses it, so the bytes go to it unchecked.
    Unchecked,
}

/// Where the first packet in `buf` (the start of a connection) ends, if it is a CONNECT of at
/// most `size_max` bytes.
pub(crate) fn first_packet(buf: &[u8], size_max: u32) -> First {
    match buf.first() {
        None => return First::Incomplete,
        Some(&b) if b != 0x10 => return First::Unchecked,
        Some(_) => {}
    }
    match varint(&buf[1..]) {
        Varint::Incomplete => First::Incomplete,
        Varint::Malformed => First::Unchecked,
        Varint::Value(len, used) => {
            let total = 1 + used + len as usize;
            if total > size_max as usize {
                First::Unchecked
            } else if buf.len() < total {
                First::Incomplete
            } else {
                First::Complete(total)
            }
        }
    }
}

/// `packet` (a whole CONNECT) without its Topic Alias Maximum properties of value 0, or `None`
/// when it has none (or is not a well-formed v5 CONNECT: the library then judges it as it is).
pub(crate) fn without_zero_topic_alias_maximum(packet: &[u8]) -> Option<Vec<u8>> {
    let Varint::Value(remaining, hdr) = varint(packet.get(1..)?) else {
        return None;
    };
    let body = packet.get(1 + hdr..)?;
    if body.len() != remaining as usize {
        return None;
    }
    // Variable header: protocol name "MQTT", level 5, flags, keep alive (10 bytes), properties.
    if body.get(..7)? != [0, 4, b'M', b'Q', b'T', b'T', 5] {
        return None;
    }
    let Varint::Value(props_len, used) = varint(body.get(10..)?) else {
        return None;
    };
    let props_start = 10 + used;
    let props_end = props_start.checked_add(props_len as usize)?;
    let props = body.get(props_start..props_end)?;

    let mut kept = Vec::with_capacity(props.len());
    let mut removed = false;
    let mut at = 0;
    while at < props.len() {
        // The value's size for every property MQTT 5.0 §3.1.2.11 allows in CONNECT.
        let len_prefixed = |from: usize| -> Option<usize> {
            let n = props.get(from..from + 2)?;
            Some(2 + usize::from(u16::from_be_bytes([n[0], n[1]])))
        };
        let size = match props[at] {
            0x17 | 0x19 => 1,                     // request problem / response information
            0x21 | 0x22 => 2,                     // receive maximum, topic alias maximum
            0x11 | 0x27 => 4,                     // session expiry interval, maximum packet size
            0x15 | 0x16 => len_prefixed(at + 1)?, // authentication method / data
            0x26 => {
                // user property: a string pair
                let key = len_prefixed(at + 1)?;
                key + len_prefixed(at + 1 + key)?
            }
            _ => return None,
        };
        let prop = props.get(at..at + 1 + size)?;
        if prop == [0x22, 0, 0] {
            removed = true;
        } else {
            kept.extend_from_slice(prop);
        }
        at += 1 + size;
    }
    if !removed {
        return None;
    }
    let mut new_body = body[..10].to_vec();
    put_varint(&mut new_body, kept.len());
    new_body.extend_from_slice(&kept);
    new_body.extend_from_slice(&body[props_end..]);
    let mut out = vec![packet[0]];
    put_varint(&mut out, new_body.len());
    out.extend_from_slice(&new_body);
    Some(out)
}

enum Varint {
    Incomplete,
    Malformed,
    /// The value and the bytes it took.
    Value(u32, usize),
}

/// An MQTT variable byte integer (at most 4 bytes) at the start of `buf`.
fn varint(buf: &[u8]) -> Varint {
    let mut value = 0u32;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return Varint::Incomplete;
        };
        value |= u32::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            return Varint::Value(value, i + 1);
        }
    }
    Varint::Malformed
}

fn put_varint(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let b = (value & 0x7F) as u8;
        value >>= 7;
        if value == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqtt_protocol_core::mqtt;
    use mqtt_protocol_core::mqtt::packet::{v5_0, Property, Qos};

    fn connect(props: Vec<Property>, payload_len: usize) -> Vec<u8> {
        v5_0::Connect::builder()
            .client_id("c1")
            .expect("id")
            .clean_start(true)
            .keep_alive(30)
            .props(props)
            .will_message(
                "w/t",
                "x".repeat(payload_len).as_str(),
                Qos::AtLeastOnce,
                false,
            )
            .expect("will")
            .user_name("u")
            .expect("user")
            .build()
            .expect("connect")
            .to_continuous_buffer()
    }

    fn tam(v: u16) -> Property {
        mqtt::packet::TopicAliasMaximum::new(v).expect("tam").into()
    }

    fn others() -> Vec<Property> {
        vec![
            mqtt::packet::SessionExpiryInterval::new(60)
                .expect("sei")
                .into(),
            mqtt::packet::UserProperty::new("k", "v")
                .expect("up")
                .into(),
            mqtt::packet::ReceiveMaximum::new(5).expect("rm").into(),
        ]
    }

    #[test]
    fn a_zero_topic_alias_maximum_is_removed_and_nothing_else_changes() {
        // Payload sizes put the remaining length on both sides of the one/two-byte boundary.
        for payload_len in [10, 90, 97, 98, 99, 100, 300] {
            let mut with = others();
            with.insert(1, tam(0));
            let fixed =
                without_zero_topic_alias_maximum(&connect(with, payload_len)).expect("rewritten");
            assert_eq!(
                fixed,
                connect(others(), payload_len),
                "payload {payload_len}"
            );
            assert_eq!(first_packet(&fixed, u32::MAX), First::Complete(fixed.len()));
        }
    }

    #[test]
    fn other_connects_are_left_alone() {
        assert_eq!(
            without_zero_topic_alias_maximum(&connect(others(), 5)),
            None
        );
        let mut with = others();
        with.push(tam(3));
        assert_eq!(without_zero_topic_alias_maximum(&connect(with, 5)), None);
        let v3 = mqtt::packet::v3_1_1::Connect::builder()
            .client_id("c1")
            .expect("id")
            .build()
            .expect("connect")
            .to_continuous_buffer();
        assert_eq!(without_zero_topic_alias_maximum(&v3), None);
        // Truncated or garbled: the library decides.
        let whole = connect(vec![tam(0)], 5);
        for cut in 0..whole.len() {
            assert_eq!(
                without_zero_topic_alias_maximum(&whole[..cut]),
                None,
                "cut {cut}"
            );
        }
    }

    #[test]
    fn the_first_packet_is_framed_across_reads() {
        let whole = connect(vec![tam(0)], 200);
        for cut in 0..whole.len() {
            assert_eq!(first_packet(&whole[..cut], u32::MAX), First::Incomplete);
        }
        let mut more = whole.clone();
        more.extend_from_slice(&[0xC0, 0x00]);
        assert_eq!(first_packet(&more, u32::MAX), First::Complete(whole.len()));
        assert_eq!(
            first_packet(&whole, whole.len() as u32 - 1),
            First::Unchecked
        );
        assert_eq!(first_packet(&[0x30, 0x00], u32::MAX), First::Unchecked);
        assert_eq!(
            first_packet(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF], u32::MAX),
            First::Unchecked
        );
    }
}
