//! A streaming check that every packet which must carry a non-zero packet id does.
//!
//! MQTT 3.1.1 §2.3.1 / 5.0 §2.2.1: PUBLISH with QoS 1 or 2, PUBACK, PUBREC, PUBREL, PUBCOMP,
//! SUBSCRIBE and UNSUBSCRIBE carry a packet id that is never 0. `mqtt-protocol-core` 0.7.9
//! accepts 0 when it parses a PUBLISH and later panics building the reply to a repeated one, so
//! the connection checks the bytes first and closes on a zero id (a malformed packet). The check
//! follows packet boundaries across reads with a few integers of state and buffers nothing, so an
//! idle connection pays nothing for it; payload bytes are skipped in bulk.

/// Where, in the variable header, the packet id of the current packet is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdAt {
    /// No packet id to check (or already checked).
    Nowhere,
    /// The first two bytes (acks, SUBSCRIBE, UNSUBSCRIBE).
    Start,
    /// After the topic name (PUBLISH QoS 1/2); `topic_len` once its two bytes are read.
    AfterTopic { topic_len: Option<u16> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting the first byte of a fixed header.
    Header,
    /// Reading the remaining-length varint.
    Length { id_at: IdAt, len: u32, shift: u32 },
    /// Inside the packet body: `off` bytes read of `len`; `hi` holds the first byte of a
    /// two-byte field being read.
    Body {
        id_at: IdAt,
        len: u32,
        off: u32,
        hi: u8,
    },
    /// The framing itself is malformed: the protocol library rejects it; stop checking.
    Done,
}

/// See the module docs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PacketIdCheck {
    state: State,
}

impl Default for PacketIdCheck {
    fn default() -> Self {
        PacketIdCheck {
            state: State::Header,
        }
    }
}

impl PacketIdCheck {
    /// Feeds the next received bytes (the stream continues where the last call ended, at a
    /// packet boundary the first time). False if a packet in them carries packet id 0.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            match self.state {
                State::Done => return true,
                State::Header => {
                    let kind = data[0] >> 4;
                    let qos = (data[0] >> 1) & 0x03;
                    let id_at = match kind {
                        3 if qos > 0 => IdAt::AfterTopic { topic_len: None },
                        4..=8 | 10 => IdAt::Start,
                        _ => IdAt::Nowhere,
                    };
                    self.state = State::Length {
                        id_at,
                        len: 0,
                        shift: 0,
                    };
                    data = &data[1..];
                }
                State::Length { id_at, len, shift } => {
                    let b = data[0];
                    data = &data[1..];
                    let len = len | (u32::from(b & 0x7F) << shift);
                    self.state = if b & 0x80 == 0 {
                        if len == 0 {
                            State::Header
                        } else {
                            State::Body {
                                id_at,
                                len,
                                off: 0,
                                hi: 0,
                            }
                        }
                    } else if shift >= 21 {
                        State::Done
                    } else {
                        State::Length {
                            id_at,
                            len,
                            shift: shift + 7,
                        }
                    };
                }
                State::Body {
                    id_at: IdAt::Nowhere,
                    len,
                    off,
                    ..
                } => {
                    let left = len - off;
                    let take = (left as usize).min(data.len());
                    data = &data[take..];
                    self.state = if take as u32 == left {
                        State::Header
                    } else {
                        State::Body {
                            id_at: IdAt::Nowhere,
                            len,
                            off: off + take as u32,
                            hi: 0,
                        }
                    };
                }
                State::Body {
                    id_at: IdAt::AfterTopic { topic_len: Some(t) },
                    len,
                    off,
                    hi,
                } if off < 2 + u32::from(t) => {
                    // The topic name: nothing to check until the packet id after it; skip it in
                    // bulk (within this read and this packet).
                    let to_id = 2 + u32::from(t) - off;
                    let take = (to_id.min(len - off) as usize).min(data.len());
                    data = &data[take..];
                    let off = off + take as u32;
                    self.state = if off == len {
                        State::Header
                    } else {
                        State::Body {
                            id_at: IdAt::AfterTopic { topic_len: Some(t) },
                            len,
                            off,
                            hi,
                        }
                    };
                }
                State::Body {
                    mut id_at,
                    len,
                    off,
                    mut hi,
                } => {
                    let b = data[0];
                    data = &data[1..];
                    let field = |at: u32| match off.checked_sub(at) {
                        Some(0) => Some(false),
                        Some(1) => Some(true),
                        _ => None,
                    };
                    let id_offset = match id_at {
                        IdAt::Start => Some(0),
                        IdAt::AfterTopic { topic_len: Some(t) } => Some(2 + u32::from(t)),
                        _ => None,
                    };
                    match (id_at, id_offset) {
                        (_, Some(at)) => match field(at) {
                            Some(false) => hi = b,
                            Some(true) => {
                                if hi == 0 && b == 0 {
                                    return false;
                                }
                                id_at = IdAt::Nowhere;
                            }
                            None => {}
                        },
                        (IdAt::AfterTopic { topic_len: None }, None) => match field(0) {
                            Some(false) => hi = b,
                            Some(true) => {
                                id_at = IdAt::AfterTopic {
                                    topic_len: Some(u16::from_be_bytes([hi, b])),
                                }
                            }
                            None => {}
                        },
                        _ => {}
                    }
                    let off = off + 1;
                    self.state = if off == len {
                        State::Header
                    } else {
                        State::Body {
                            id_at,
                            len,
                            off,
                            hi,
                        }
                    };
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// PUBLISH QoS `qos`, topic `t`, packet id `id`, payload `p`.
    fn publish(qos: u8, t: &str, id: u16, p: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(t.len() as u16).to_be_bytes());
        body.extend_from_slice(t.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&id.to_be_bytes());
        }
        body.extend_from_slice(p);
        let mut v = vec![0x30 | (qos << 1)];
        let mut len = body.len();
        loop {
            let mut b = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            v.push(b);
            if len == 0 {
                break;
            }
        }
        v.extend_from_slice(&body);
        v
    }

    /// The check's verdict on `stream` fed in pieces of `step` bytes.
    fn ok_in_pieces(stream: &[u8], step: usize) -> bool {
        let mut c = PacketIdCheck::default();
        stream.chunks(step).all(|piece| c.feed(piece))
    }

    #[test]
    fn zero_ids_are_found_wherever_the_reads_split_the_stream() {
        let big = vec![b'x'; 300];
        let good = [
            publish(0, "a/b", 0, b"qos0 has no id"),
            publish(1, "a/b", 1, &big),
            vec![0x40, 0x02, 0x00, 0x07], // PUBACK 7
            vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'#', 0x01], // SUBSCRIBE 1 "#"
            vec![0xC0, 0x00],             // PINGREQ
            publish(2, "", 0x0100, b"id 256 has a zero low byte"),
        ]
        .concat();
        let bad_publish = [good.clone(), publish(2, "a/b", 0, b"x")].concat();
        let bad_ack = [good.clone(), vec![0x62, 0x02, 0x00, 0x00]].concat(); // PUBREL 0
        let bad_sub = [
            good.clone(),
            vec![0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'#', 0x01],
        ]
        .concat();
        // A long topic (skipped in bulk) before the id, and a zero id after one.
        let long_topic = "devices/lock-1/telemetry/".repeat(12);
        let good = [good, publish(1, &long_topic, 0x0001, b"p")].concat();
        let bad_long = [good.clone(), publish(1, &long_topic, 0, b"p")].concat();
        for step in [1, 2, 3, 5, 7, 64, 301, 4096] {
            assert!(ok_in_pieces(&good, step), "step {step}");
            assert!(!ok_in_pieces(&bad_publish, step), "step {step}");
            assert!(!ok_in_pieces(&bad_ack, step), "step {step}");
            assert!(!ok_in_pieces(&bad_sub, step), "step {step}");
            assert!(!ok_in_pieces(&bad_long, step), "step {step}");
        }
    }

    #[test]
    fn the_fuzzers_reproducer_is_refused() {
        // After CONNECT: twice PUBLISH QoS 2, topic "a/b", packet id 0, payload "x".
        let stream = [
            0x34, 0x08, 0x00, 0x03, 0x61, 0x2f, 0x62, 0x00, 0x00, 0x78, 0x34, 0x08, 0x00, 0x03,
            0x61, 0x2f, 0x62, 0x00, 0x00, 0x78,
        ];
        assert!(!ok_in_pieces(&stream, 64));
    }

    #[test]
    fn malformed_lengths_stop_the_check_without_a_verdict() {
        let mut c = PacketIdCheck::default();
        assert!(c.feed(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00]));
        assert_eq!(c.state, State::Done);
    }
}
