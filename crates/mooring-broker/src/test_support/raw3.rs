//! A byte-level MQTT 3.1.1 client for tests: the test decides what is sent and when anything is acknowledged.
//!
//! It runs over any stream: [`Raw3::open`] serves an in-memory pipe with a [`Broker`] (dev
//! listener), [`Raw3::new`] takes a stream the test opened (e.g. TCP to a running server).
//! Packets the test needs to shape itself are built with [`packet`] and [`string`]; what comes
//! back is a [`Pkt`].

use crate::{Broker, ConnInfo, ListenerKind};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};

/// How long [`Raw3::next`] waits for one packet unless told otherwise ([`Raw3::wait_each`]).
pub const PACKET_WAIT: Duration = Duration::from_secs(10);
/// Bytes the in-memory pipe of [`Raw3::open`] buffers: a test can send a burst the broker is
/// not reading yet.
pub const PIPE_BYTES: usize = 1 << 20;

/// A packet from the broker, decoded as far as tests look at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pkt {
    ConnAck {
        session_present: bool,
        code: u8,
    },
    SubAck,
    Publish {
        qos: u8,
        dup: bool,
        pid: u16,
        topic: String,
        payload: Vec<u8>,
    },
    PubRel {
        pid: u16,
    },
    /// Any other packet, by type (4 PUBACK, 5 PUBREC, 7 PUBCOMP, 11 UNSUBACK, 13 PINGRESP).
    Other(u8),
}

/// One packet: the fixed header byte `first`, the remaining length, then `body`.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// Appends an MQTT string (length-prefixed UTF-8) to `out`.
pub fn string(s: &str, out: &mut Vec<u8>) {
    let len = u16::try_from(s.len()).expect("an MQTT string is at most 65535 bytes");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// The client: a stream, what was read of it and not yet decoded, the next SUBSCRIBE packet id.
pub struct Raw3<S> {
    io: S,
    buf: Vec<u8>,
    next_pid: u16,
    wait: Duration,
}

impl Raw3<DuplexStream> {
    /// Serves an in-memory connection with `broker` (as the dev listener) and CONNECTs
    /// (keep-alive 60 s) under `client_id`; returns the client and session present.
    pub async fn open(broker: &Broker, client_id: &str, clean: bool) -> (Self, bool) {
        let (io, server) = tokio::io::duplex(PIPE_BYTES);
        let b = broker.clone();
        let info = ConnInfo {
            peer: None,
            cert_identity: None,
            cert_sha256: None,
            cert_der: None,
            listener: ListenerKind::Dev,
        };
        tokio::spawn(async move { b.serve_connection(server, info).await });
        let mut raw = Raw3::new(io);
        let present = raw.connect(client_id, clean).await;
        (raw, present)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw3<S> {
    /// A client on `io`, not yet connected.
    pub fn new(io: S) -> Self {
        Raw3 {
            io,
            buf: Vec::new(),
            next_pid: 1,
            wait: PACKET_WAIT,
        }
    }

    /// Wait up to `wait` for each packet in [`Raw3::next`] (default [`PACKET_WAIT`]).
    pub fn wait_each(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    /// CONNECT (keep-alive 60 s, `clean` session or not) under `client_id`; returns session
    /// present. Panics unless the CONNACK accepts.
    pub async fn connect(&mut self, client_id: &str, clean: bool) -> bool {
        let mut body = Vec::new();
        string("MQTT", &mut body);
        body.extend_from_slice(&[4, if clean { 0x02 } else { 0x00 }, 0, 60]);
        string(client_id, &mut body);
        self.send(&packet(0x10, &body)).await;
        match self.next().await {
            Some(Pkt::ConnAck {
                session_present,
                code: 0,
            }) => session_present,
            other => panic!("CONNACK for {client_id}: {other:?}"),
        }
    }

    /// Writes `bytes` as they are. A write error is ignored: the next read shows the
    /// connection closed.
    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.io.write_all(bytes).await;
    }

    /// SUBSCRIBE one filter and wait for its SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) {
        let mut body = self.next_pid.to_be_bytes().to_vec();
        self.next_pid = self.next_pid.wrapping_add(1).max(1);
        string(filter, &mut body);
        body.push(qos);
        self.send(&packet(0x82, &body)).await;
        assert_eq!(self.next().await, Some(Pkt::SubAck), "SUBACK for {filter}");
    }

    /// An acknowledgement packet (`first`: 0x40 PUBACK, 0x50 PUBREC, 0x62 PUBREL, 0x70 PUBCOMP)
    /// for `pid`.
    pub async fn ack(&mut self, first: u8, pid: u16) {
        self.send(&packet(first, &pid.to_be_bytes())).await;
    }

    /// PINGREQ, then the next packet must be its PINGRESP. The broker handles a connection's
    /// packets in order, so everything sent before has been read once this returns.
    pub async fn ping(&mut self) {
        self.send(&[0xC0, 0x00]).await;
        assert_eq!(self.next().await, Some(Pkt::Other(13)), "PINGRESP");
    }

    pub async fn disconnect(&mut self) {
        self.send(&[0xE0, 0]).await;
    }

    /// The next packet must be a QoS 2 PUBLISH of `payload`; returns its packet id.
    pub async fn expect_qos2(&mut self, payload: &[u8]) -> u16 {
        match self.next().await {
            Some(Pkt::Publish {
                pid,
                qos: 2,
                payload: got,
                ..
            }) if got == payload => pid,
            other => panic!("expected a QoS 2 PUBLISH of {payload:?}: {other:?}"),
        }
    }

    /// The next packet; `None` on EOF. Panics if none comes within the wait ([`Raw3::wait_each`]).
    pub async fn next(&mut self) -> Option<Pkt> {
        match tokio::time::timeout(self.wait, self.read_packet()).await {
            Ok(p) => p,
            Err(_) => panic!("no packet from the broker within {:?}", self.wait),
        }
    }

    /// The next packet within `limit`; `None` on EOF or if none came.
    pub async fn next_within(&mut self, limit: Duration) -> Option<Pkt> {
        tokio::time::timeout(limit, self.read_packet())
            .await
            .ok()
            .flatten()
    }

    async fn read_packet(&mut self) -> Option<Pkt> {
        loop {
            if let Some(p) = self.parse() {
                return Some(p);
            }
            let mut chunk = [0u8; 4096];
            let n = self.io.read(&mut chunk).await.unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Takes one whole packet off the buffer, if there is one.
    fn parse(&mut self) -> Option<Pkt> {
        let mut len = 0usize;
        let mut mult = 1usize;
        let mut i = 1;
        loop {
            let b = *self.buf.get(i)?;
            len += usize::from(b & 0x7f) * mult;
            mult *= 128;
            i += 1;
            if b & 0x80 == 0 {
                break;
            }
        }
        if self.buf.len() < i + len {
            return None;
        }
        let first = self.buf[0];
        let body: Vec<u8> = self.buf[i..i + len].to_vec();
        self.buf.drain(..i + len);
        Some(
            decode(first, &body).unwrap_or_else(|| {
                panic!("malformed packet from the broker: {first:#04x} {body:?}")
            }),
        )
    }
}

/// A packet from its fixed header byte and body; `None` if the body is too short for its type.
fn decode(first: u8, body: &[u8]) -> Option<Pkt> {
    let u16_at = |at: usize| Some(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
    Some(match first >> 4 {
        2 => Pkt::ConnAck {
            session_present: body.first()? & 1 == 1,
            code: *body.get(1)?,
        },
        9 => Pkt::SubAck,
        3 => {
            let qos = (first >> 1) & 3;
            let tlen = usize::from(u16_at(0)?);
            let topic = String::from_utf8_lossy(body.get(2..2 + tlen)?).into_owned();
            let mut at = 2 + tlen;
            let pid = if qos > 0 {
                at += 2;
                u16_at(at - 2)?
            } else {
                0
            };
            Pkt::Publish {
                qos,
                dup: first & 0x08 != 0,
                pid,
                topic,
                payload: body.get(at..)?.to_vec(),
            }
        }
        6 => Pkt::PubRel { pid: u16_at(0)? },
        t => Pkt::Other(t),
    })
}
