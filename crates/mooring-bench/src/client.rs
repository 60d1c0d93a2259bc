//! The load generator's device: a minimal MQTT 3.1.1 client over mTLS (CONNECT, PUBLISH, PUBACK, PINGREQ), hand-rolled to stay small per connection; also a backend's login (token as password, persistent session).
//!
//! Hand-rolled rather than `mqtt-protocol-core`: the benchmark needs five packet types, and a
//! connection here must cost as little memory as possible so 50k of them fit beside the server.

use anyhow::{anyhow, bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// Longest one TCP connect + TLS handshake + CONNECT/CONNACK may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest packet the client accepts from a server (it only expects acks).
pub const PACKET_LEN_MAX: usize = 64 * 1024;
/// Connections bound to one source address before moving to the next (ephemeral ports: ~28k/address).
pub const CONNECTIONS_PER_SOURCE_ADDR: usize = 5_000;

/// A device identity: id (= certificate CN = MQTT client id) and its PEM certificate and key.
#[derive(Clone, Debug)]
pub struct Cred {
    pub id: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Where and how to reach one target's MQTT/TLS listener.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    roots: Arc<RootCertStore>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl Endpoint {
    /// `ca_pem`: the CA that signed the server certificate (which must name `addr`'s IP).
    pub fn new(addr: SocketAddr, ca_pem: &str) -> anyhow::Result<Endpoint> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(cert.context("parsing CA PEM")?)?;
        }
        anyhow::ensure!(!roots.is_empty(), "no CA certificate in PEM");
        Ok(Endpoint {
            addr,
            roots: Arc::new(roots),
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// A TLS client config presenting `cred` (no session resumption: every connect is a full handshake).
    pub fn tls_config(&self, cred: &Cred) -> anyhow::Result<Arc<ClientConfig>> {
        let chain = CertificateDer::pem_slice_iter(cred.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing device certificate")?;
        let key =
            PrivateKeyDer::from_pem_slice(cred.key_pem.as_bytes()).context("parsing device key")?;
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(chain, key)
            .context("device certificate and key")?;
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// A TLS client config without a client certificate (a backend that logs in with a password).
    pub fn tls_config_without_cert(&self) -> anyhow::Result<Arc<ClientConfig>> {
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.roots.clone())
            .with_no_client_auth();
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// Hands out loopback source addresses 127.0.0.2, 127.0.0.3, … so that many connections to one
/// port do not exhaust one address's ephemeral ports.
#[derive(Default)]
pub struct SourceAddrs {
    next: AtomicUsize,
}

impl SourceAddrs {
    /// Starts at the `block`-th address (127.0.0.(2 + block)), so several load-generator
    /// processes can each take addresses of their own.
    pub fn from_block(block: usize) -> SourceAddrs {
        SourceAddrs {
            next: AtomicUsize::new(block * CONNECTIONS_PER_SOURCE_ADDR),
        }
    }

    pub fn next(&self) -> IpAddr {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        let octet = 2 + (k / CONNECTIONS_PER_SOURCE_ADDR) % 250;
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, octet as u8))
    }
}

/// What the client reads from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    ConnAck {
        return_code: u8,
        /// The server resumed a stored session (CONNACK flags bit 0).
        session_present: bool,
    },
    PubAck {
        packet_id: u16,
    },
    /// First return code only (the client subscribes to one filter at a time).
    SubAck {
        packet_id: u16,
        return_code: u8,
    },
    /// A message for us (the payload is not kept: commands are identified by their topic).
    Publish {
        topic: String,
        qos: u8,
        packet_id: u16,
    },
    PingResp,
    /// Any other packet type (upper nibble of the first byte).
    Other(u8),
}

/// One connected MQTT session over TLS.
pub struct Conn {
    tls: TlsStream<TcpStream>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
}

/// What a CONNECT says besides the client id.
#[derive(Clone, Debug)]
pub struct ConnectOpts {
    pub keepalive_secs: u16,
    /// `false` asks the server to keep the session (subscriptions, queued QoS 1) across connections.
    pub clean_session: bool,
    /// User name and password (a backend's token); devices log in with their certificate only.
    pub login: Option<(String, String)>,
}

impl ConnectOpts {
    /// A device's CONNECT: clean session, no user name or password.
    pub fn device(keepalive_secs: u16) -> ConnectOpts {
        ConnectOpts {
            keepalive_secs,
            clean_session: true,
            login: None,
        }
    }
}

/// TCP connect from `src`, TLS handshake with `config`, CONNECT (clean session, client id `id`)
/// and CONNACK; bounded by [`CONNECT_TIMEOUT`].
pub async fn connect(
    endpoint: &Endpoint,
    config: Arc<ClientConfig>,
    id: &str,
    src: IpAddr,
    keepalive_secs: u16,
) -> anyhow::Result<Conn> {
    let (conn, _) = connect_with(
        endpoint,
        config,
        id,
        src,
        &ConnectOpts::device(keepalive_secs),
    )
    .await?;
    Ok(conn)
}

/// [`connect`] with any [`ConnectOpts`]; also returns CONNACK's session-present flag.
pub async fn connect_with(
    endpoint: &Endpoint,
    config: Arc<ClientConfig>,
    id: &str,
    src: IpAddr,
    opts: &ConnectOpts,
) -> anyhow::Result<(Conn, bool)> {
    tokio::time::timeout(
        CONNECT_TIMEOUT,
        connect_inner(endpoint, config, id, src, opts),
    )
    .await
    .map_err(|_| anyhow!("connect timed out after {CONNECT_TIMEOUT:?}"))?
}

async fn connect_inner(
    endpoint: &Endpoint,
    config: Arc<ClientConfig>,
    id: &str,
    src: IpAddr,
    opts: &ConnectOpts,
) -> anyhow::Result<(Conn, bool)> {
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::new(src, 0))
        .with_context(|| format!("bind {src}"))?;
    let tcp = socket.connect(endpoint.addr).await.context("tcp connect")?;
    tcp.set_nodelay(true)?;
    let name = ServerName::IpAddress(endpoint.addr.ip().into());
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .context("tls handshake")?;
    let mut conn = Conn {
        tls,
        rbuf: Vec::new(),
        wbuf: Vec::with_capacity(64),
    };
    encode_connect_with(&mut conn.wbuf, id, opts);
    conn.flush().await?;
    let session_present = match conn.read_packet().await? {
        Some(Packet::ConnAck {
            return_code: 0,
            session_present,
        }) => session_present,
        Some(Packet::ConnAck { return_code, .. }) => {
            bail!("CONNACK refused, return code {return_code}")
        }
        Some(p) => bail!("expected CONNACK, got {p:?}"),
        None => bail!("closed before CONNACK"),
    };
    conn.rbuf.shrink_to(256);
    conn.wbuf = Vec::new();
    Ok((conn, session_present))
}

impl Conn {
    /// Queues a PUBLISH (QoS 0 or 1; `packet_id` is ignored for QoS 0). Sent by [`Conn::flush`].
    pub fn queue_publish(&mut self, topic: &str, payload: &[u8], qos: u8, packet_id: u16) {
        encode_publish(&mut self.wbuf, topic, payload, qos, packet_id);
    }

    /// Queues SUBSCRIBE for one filter.
    pub fn queue_subscribe(&mut self, packet_id: u16, filter: &str, qos: u8) {
        encode_subscribe(&mut self.wbuf, packet_id, filter, qos);
    }

    pub fn queue_puback(&mut self, packet_id: u16) {
        self.wbuf.push(0x40);
        self.wbuf.push(2);
        self.wbuf.extend_from_slice(&packet_id.to_be_bytes());
    }

    /// Subscribes to `filter` and waits (bounded) for a successful SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: u8) -> anyhow::Result<()> {
        self.queue_subscribe(1, filter, qos);
        self.flush().await?;
        tokio::time::timeout(CONNECT_TIMEOUT, async {
            loop {
                match self.read_packet().await? {
                    Some(Packet::SubAck { return_code, .. }) if return_code < 0x80 => return Ok(()),
                    Some(Packet::SubAck { return_code, .. }) => {
                        bail!("SUBSCRIBE {filter} refused ({return_code:#x})")
                    }
                    Some(_) => {}
                    None => bail!("closed before SUBACK"),
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no SUBACK within {CONNECT_TIMEOUT:?}"))?
    }

    pub fn queue_pingreq(&mut self) {
        self.wbuf.extend_from_slice(&[0xC0, 0x00]);
    }

    pub fn queue_disconnect(&mut self) {
        self.wbuf.extend_from_slice(&[0xE0, 0x00]);
    }

    /// Whether a whole packet is already buffered, so [`Conn::read_packet`] returns without
    /// reading the socket (a reader flushes its acks only when this is false).
    pub fn has_buffered_packet(&self) -> bool {
        packet_len(&self.rbuf)
            .is_ok_and(|h| h.is_some_and(|(head, body)| self.rbuf.len() >= head + body))
    }

    /// Bytes queued and not yet flushed.
    pub fn queued_len(&self) -> usize {
        self.wbuf.len()
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        if !self.wbuf.is_empty() {
            self.tls.write_all(&self.wbuf).await?;
            self.wbuf.clear();
        }
        self.tls.flush().await?;
        Ok(())
    }

    /// The next packet, or `None` when the server closed the connection. Cancel-safe (bytes read
    /// so far stay buffered); not bounded in time: callers wrap it in a timeout or a `select!`.
    pub async fn read_packet(&mut self) -> anyhow::Result<Option<Packet>> {
        loop {
            if let Some((packet, used)) = decode(&self.rbuf)? {
                self.rbuf.drain(..used);
                return Ok(Some(packet));
            }
            self.rbuf.reserve(1024);
            match self.tls.read_buf(&mut self.rbuf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends DISCONNECT and TLS close_notify (best effort, bounded).
    pub async fn close(mut self) {
        self.queue_disconnect();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            let _ = self.flush().await;
            let _ = self.tls.shutdown().await;
        })
        .await;
    }
}

/// Appends MQTT's variable-length "remaining length".
fn put_remaining_len(buf: &mut Vec<u8>, mut len: usize) {
    debug_assert!(len < 268_435_456, "MQTT remaining length limit");
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.push(byte);
        if len == 0 {
            break;
        }
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u16).to_be_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// CONNECT, MQTT 3.1.1, clean session, no will, no username/password (identity is the certificate).
pub fn encode_connect(buf: &mut Vec<u8>, client_id: &str, keepalive_secs: u16) {
    encode_connect_with(buf, client_id, &ConnectOpts::device(keepalive_secs));
}

/// CONNECT, MQTT 3.1.1, no will; clean session and user name + password as `opts` say.
pub fn encode_connect_with(buf: &mut Vec<u8>, client_id: &str, opts: &ConnectOpts) {
    let mut flags = 0u8;
    let mut len = 10 + 2 + client_id.len();
    if opts.clean_session {
        flags |= 0x02;
    }
    if let Some((user, password)) = &opts.login {
        flags |= 0xC0;
        len += 2 + user.len() + 2 + password.len();
    }
    buf.push(0x10);
    put_remaining_len(buf, len);
    put_str(buf, "MQTT");
    buf.push(4); // protocol level 3.1.1
    buf.push(flags);
    buf.extend_from_slice(&opts.keepalive_secs.to_be_bytes());
    put_str(buf, client_id);
    if let Some((user, password)) = &opts.login {
        put_str(buf, user);
        put_str(buf, password);
    }
}

pub fn encode_publish(buf: &mut Vec<u8>, topic: &str, payload: &[u8], qos: u8, packet_id: u16) {
    debug_assert!(qos <= 1, "the load generator publishes QoS 0 or 1");
    buf.push(0x30 | (qos << 1));
    let pid_len = if qos > 0 { 2 } else { 0 };
    put_remaining_len(buf, 2 + topic.len() + pid_len + payload.len());
    put_str(buf, topic);
    if qos > 0 {
        buf.extend_from_slice(&packet_id.to_be_bytes());
    }
    buf.extend_from_slice(payload);
}

pub fn encode_subscribe(buf: &mut Vec<u8>, packet_id: u16, filter: &str, qos: u8) {
    buf.push(0x82);
    put_remaining_len(buf, 2 + 2 + filter.len() + 1);
    buf.extend_from_slice(&packet_id.to_be_bytes());
    put_str(buf, filter);
    buf.push(qos);
}

/// The lengths of the fixed header and of the rest of the packet at the front of `buf`, once
/// its fixed header is complete; `None` before. Errors on a malformed or oversized length.
fn packet_len(buf: &[u8]) -> anyhow::Result<Option<(usize, usize)>> {
    if buf.is_empty() {
        return Ok(None);
    }
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            bail!("malformed remaining length");
        }
    }
    if len > PACKET_LEN_MAX {
        bail!("packet of {len} bytes from server exceeds {PACKET_LEN_MAX}");
    }
    Ok(Some((i, len)))
}

/// Decodes one packet from the front of `buf`: `Some((packet, bytes used))`, or `None` if incomplete.
pub fn decode(buf: &[u8]) -> anyhow::Result<Option<(Packet, usize)>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let Some((i, len)) = packet_len(buf)? else {
        return Ok(None);
    };
    let total = i + len;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[i..total];
    let packet = match first >> 4 {
        2 if body.len() >= 2 => Packet::ConnAck {
            return_code: body[1],
            session_present: body[0] & 0x01 != 0,
        },
        4 if body.len() >= 2 => Packet::PubAck {
            packet_id: u16::from_be_bytes([body[0], body[1]]),
        },
        3 => {
            let qos = (first >> 1) & 0x03;
            let topic_len = match body {
                [a, b, ..] => usize::from(u16::from_be_bytes([*a, *b])),
                _ => bail!("PUBLISH without a topic"),
            };
            let topic = body
                .get(2..2 + topic_len)
                .context("PUBLISH topic past the packet end")?;
            let topic = String::from_utf8(topic.to_vec()).context("PUBLISH topic not UTF-8")?;
            let packet_id = if qos > 0 {
                let id = body
                    .get(2 + topic_len..4 + topic_len)
                    .context("PUBLISH without a packet id")?;
                u16::from_be_bytes([id[0], id[1]])
            } else {
                0
            };
            Packet::Publish {
                topic,
                qos,
                packet_id,
            }
        }
        9 if body.len() >= 3 => Packet::SubAck {
            packet_id: u16::from_be_bytes([body[0], body[1]]),
            return_code: body[2],
        },
        13 => Packet::PingResp,
        t => Packet::Other(t),
    };
    Ok(Some((packet, total)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_packet_matches_the_3_1_1_layout() {
        let mut b = Vec::new();
        encode_connect(&mut b, "d1", 300);
        assert_eq!(
            b,
            [0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0x01, 0x2C, 0, 2, b'd', b'1']
        );
    }

    #[test]
    fn persistent_connect_with_login_sets_its_flags_and_appends_user_and_password() {
        let mut b = Vec::new();
        let opts = ConnectOpts {
            keepalive_secs: 60,
            clean_session: false,
            login: Some(("u".into(), "pw".into())),
        };
        encode_connect_with(&mut b, "p", &opts);
        assert_eq!(
            b,
            [
                0x10, 20, 0, 4, b'M', b'Q', b'T', b'T', 4, 0xC0, 0, 60, 0, 1, b'p', 0, 1, b'u', 0,
                2, b'p', b'w'
            ]
        );
    }

    #[test]
    fn connack_session_present_flag_is_decoded() -> anyhow::Result<()> {
        assert_eq!(
            decode(&[0x20, 2, 1, 0])?,
            Some((
                Packet::ConnAck {
                    return_code: 0,
                    session_present: true
                },
                4
            ))
        );
        Ok(())
    }

    #[test]
    fn publish_qos1_carries_packet_id_and_long_lengths_use_two_bytes() {
        let mut b = Vec::new();
        encode_publish(&mut b, "t", &[7u8; 200], 1, 0x0102);
        assert_eq!(b[0], 0x32);
        assert_eq!(&b[1..3], &[0x80 | (205 % 128) as u8, 1]);
        assert_eq!(&b[3..8], &[0, 1, b't', 1, 2]);
        assert_eq!(b.len(), 3 + 205);
    }

    #[test]
    fn decode_handles_partial_and_back_to_back_packets() -> anyhow::Result<()> {
        let bytes = [0x20, 2, 0, 0, 0x40, 2, 0, 9, 0xD0, 0];
        assert_eq!(decode(&bytes[..3])?, None);
        assert_eq!(
            decode(&bytes)?,
            Some((
                Packet::ConnAck {
                    return_code: 0,
                    session_present: false
                },
                4
            ))
        );
        assert_eq!(
            decode(&bytes[4..])?,
            Some((Packet::PubAck { packet_id: 9 }, 4))
        );
        assert_eq!(decode(&bytes[8..])?, Some((Packet::PingResp, 2)));
        assert!(decode(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
        Ok(())
    }

    #[test]
    fn decodes_publish_and_suback_and_encodes_subscribe() -> anyhow::Result<()> {
        let mut b = Vec::new();
        encode_publish(&mut b, "devices/d/commands/c1", b"{}", 1, 7);
        let (p, used) = decode(&b)?.context("complete")?;
        assert_eq!(used, b.len());
        assert_eq!(
            p,
            Packet::Publish {
                topic: "devices/d/commands/c1".into(),
                qos: 1,
                packet_id: 7
            }
        );
        assert_eq!(
            decode(&[0x90, 3, 0, 1, 1])?,
            Some((
                Packet::SubAck {
                    packet_id: 1,
                    return_code: 1
                },
                5
            ))
        );
        let mut s = Vec::new();
        encode_subscribe(&mut s, 1, "a/+", 1);
        assert_eq!(s, [0x82, 8, 0, 1, 0, 3, b'a', b'/', b'+', 1]);
        Ok(())
    }

    #[test]
    fn source_addresses_rotate_in_blocks() {
        let s = SourceAddrs::default();
        let first = s.next();
        for _ in 1..CONNECTIONS_PER_SOURCE_ADDR {
            assert_eq!(s.next(), first);
        }
        assert_eq!(s.next(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        let third = SourceAddrs::from_block(2);
        assert_eq!(third.next(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 4)));
    }
}
