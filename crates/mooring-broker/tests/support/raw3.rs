//! A raw MQTT 3.1.1 client over an in-memory stream: the test decides what is sent and when
//! anything is acknowledged.
#![allow(dead_code)]

use mooring_broker::Broker;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

#[derive(Debug, PartialEq)]
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
    Other(u8),
}

fn remaining_length(mut n: usize, out: &mut Vec<u8>) {
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
}

pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

pub fn string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

pub struct Raw3 {
    io: DuplexStream,
    buf: Vec<u8>,
    next_pid: u16,
}

impl Raw3 {
    /// CONNECT (keep-alive 60 s) under `client_id`; returns the client and session present.
    pub async fn connect(broker: &Broker, client_id: &str, clean: bool) -> (Raw3, bool) {
        // A large pipe: a test can send a burst the broker is not reading yet.
        let (io, server) = tokio::io::duplex(1 << 20);
        let b = broker.clone();
        tokio::spawn(async move { b.serve_connection(server, super::dev_info()).await });
        let mut raw = Raw3 {
            io,
            buf: Vec::new(),
            next_pid: 1,
        };
        let mut body = Vec::new();
        string("MQTT", &mut body);
        body.extend_from_slice(&[4, if clean { 0x02 } else { 0x00 }, 0, 60]);
        string(client_id, &mut body);
        raw.send(&packet(0x10, &body)).await;
        match raw.next().await {
            Some(Pkt::ConnAck {
                session_present,
                code: 0,
            }) => (raw, session_present),
            other => panic!("CONNACK: {other:?}"),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        let _ = self.io.write_all(bytes).await;
    }

    pub async fn subscribe(&mut self, filter: &str, qos: u8) {
        let mut body = self.next_pid.to_be_bytes().to_vec();
        self.next_pid = self.next_pid.wrapping_add(1).max(1);
        string(filter, &mut body);
        body.push(qos);
        self.send(&packet(0x82, &body)).await;
        assert_eq!(self.next().await, Some(Pkt::SubAck));
    }

    pub async fn disconnect(&mut self) {
        self.send(&[0xE0, 0]).await;
    }

    /// The next packet; None on EOF. Panics if none comes within 10 s.
    pub async fn next(&mut self) -> Option<Pkt> {
        match tokio::time::timeout(Duration::from_secs(10), self.read_packet()).await {
            Ok(p) => p,
            Err(_) => panic!("no packet from the broker in time"),
        }
    }

    /// The next packet within `limit`; None on EOF or if none came.
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
        let pid_at = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
        Some(match first >> 4 {
            2 => Pkt::ConnAck {
                session_present: body[0] & 1 == 1,
                code: body[1],
            },
            9 => Pkt::SubAck,
            3 => {
                let qos = (first >> 1) & 3;
                let tlen = usize::from(pid_at(0));
                let topic = String::from_utf8_lossy(&body[2..2 + tlen]).into_owned();
                let mut at = 2 + tlen;
                let pid = if qos > 0 {
                    at += 2;
                    pid_at(at - 2)
                } else {
                    0
                };
                Pkt::Publish {
                    qos,
                    dup: first & 0x08 != 0,
                    pid,
                    topic,
                    payload: body[at..].to_vec(),
                }
            }
            6 => Pkt::PubRel { pid: pid_at(0) },
            t => Pkt::Other(t),
        })
    }
}
