//! The MQTT-over-mTLS link: identity and TLS setup, one rumqttc event loop per connection, reconnect backoff.
//!
//! [`drive`] owns the connection. Each attempt builds a fresh rumqttc client and event loop, so
//! nothing from a previous connection (queued requests, packet ids) leaks into the next one: the
//! outbox is the only source of truth for what still needs sending. The loop reports
//! [`LinkEvent`]s to the agent's main loop, which publishes through the [`AsyncClient`] it was
//! handed on [`LinkEvent::Connected`]. After a failed attempt or a lost connection it sleeps
//! for [`Backoff::next_delay`] (exponential, full jitter) on `tokio::time`.

use anyhow::Context as _;
use mooring_proto::telemetry::PAYLOAD_SIZE_BYTES_MAX;
use mooring_proto::DeviceId;
use rand::rngs::StdRng;
use rand::Rng as _;
use rumqttc::{
    AsyncClient, ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, TlsConfiguration,
    Transport,
};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// First reconnect delay ceiling.
pub const BACKOFF_BASE_MS: u64 = 500;
/// Largest reconnect delay.
pub const BACKOFF_CAP_MS: u64 = 30_000;
/// Capacity of rumqttc's request channel; larger than the send window so `try_publish` never
/// finds it full in normal operation.
pub const REQUEST_CHANNEL_CAP: usize = 64;
/// Largest MQTT packet accepted from the server.
pub const INCOMING_PACKET_BYTES_MAX: usize = 64 * 1024;
/// Largest MQTT packet sent: a full telemetry payload plus topic and header.
pub const OUTGOING_PACKET_BYTES_MAX: usize = PAYLOAD_SIZE_BYTES_MAX + 1024;

/// Exponential backoff with full jitter: the n-th delay is uniform in
/// `[0, min(cap, base * 2^n)]`.
#[derive(Debug)]
pub struct Backoff {
    base_ms: u64,
    cap_ms: u64,
    attempt: u32,
    rng: StdRng,
}

impl Backoff {
    pub fn new(base_ms: u64, cap_ms: u64, rng: StdRng) -> Self {
        assert!(base_ms > 0 && base_ms <= cap_ms, "0 < base <= cap");
        Self {
            base_ms,
            cap_ms,
            attempt: 0,
            rng,
        }
    }

    /// The agent's default: base 500 ms, cap 30 s.
    pub fn standard(rng: StdRng) -> Self {
        Self::new(BACKOFF_BASE_MS, BACKOFF_CAP_MS, rng)
    }

    /// Upper bound of the next delay.
    pub fn ceiling_ms(&self) -> u64 {
        // 2^attempt overflows long after the cap is reached; saturate.
        let factor = 1u64.checked_shl(self.attempt).unwrap_or(u64::MAX);
        self.base_ms.saturating_mul(factor).min(self.cap_ms)
    }

    /// The delay before the next attempt; each call raises the ceiling until the cap.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling_ms = self.ceiling_ms();
        if ceiling_ms < self.cap_ms {
            self.attempt += 1;
        }
        Duration::from_millis(self.rng.random_range(0..=ceiling_ms))
    }

    /// Called after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// Who the agent is and how it proves it.
#[derive(Clone)]
pub struct Identity {
    /// The subject CN of the client certificate.
    pub device_id: DeviceId,
    pub tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("device_id", &self.device_id)
            .finish_non_exhaustive()
    }
}

/// Loads the client certificate, key and CA, reads the device id from the certificate's CN
/// and builds the mTLS client config (ring provider, roots = only the given CA).
pub fn load_identity(
    cert_path: &Path,
    key_path: &Path,
    ca_path: &Path,
) -> anyhow::Result<Identity> {
    // Other crates may have installed a provider already; either way ring is what we use.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading client certificate {}", cert_path.display()))?;
    let leaf = certs
        .first()
        .with_context(|| format!("no certificate in {}", cert_path.display()))?;
    let device_id = device_id_from_cert(leaf)
        .with_context(|| format!("client certificate {}", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .with_context(|| format!("reading private key {}", key_path.display()))?;

    let mut roots = rustls::RootCertStore::empty();
    let cas = CertificateDer::pem_file_iter(ca_path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading CA certificate {}", ca_path.display()))?;
    anyhow::ensure!(!cas.is_empty(), "no certificate in {}", ca_path.display());
    for ca in cas {
        roots
            .add(ca)
            .with_context(|| format!("CA certificate {}", ca_path.display()))?;
    }

    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots)
    .with_client_auth_cert(certs, key)
    .context("client certificate and key do not form a usable identity")?;
    Ok(Identity {
        device_id,
        tls: Arc::new(tls),
    })
}

/// The device id carried in a certificate's subject CN.
pub fn device_id_from_cert(der: &CertificateDer<'_>) -> anyhow::Result<DeviceId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| anyhow::anyhow!("not a valid X.509 certificate: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .context("subject has no CN (the CN is the device id)")?
        .as_str()
        .map_err(|e| anyhow::anyhow!("subject CN is not a string: {e}"))?;
    Ok(DeviceId::parse(cn)?)
}

/// What the link reports to the main loop, in the order it happened.
#[derive(Debug)]
pub enum LinkEvent {
    /// CONNACK received; publish through this client until [`LinkEvent::Disconnected`].
    Connected(AsyncClient),
    /// A publish request left, numbered `pkid`. These arrive in the order the publishes were
    /// requested, which is how the main loop pairs packet ids with seqs.
    Published(u16),
    /// The server acknowledged packet `pkid`.
    PubAck(u16),
    /// The connection announced by the last `Connected` is gone; its unacked publishes are void.
    Disconnected,
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct LinkSettings {
    pub host: String,
    pub port: u16,
    pub identity: Identity,
    pub keepalive: Duration,
    /// Most QoS1 publishes awaiting PUBACK.
    pub inflight_max: u16,
}

impl LinkSettings {
    fn mqtt_options(&self) -> MqttOptions {
        let mut o = MqttOptions::new(
            self.identity.device_id.as_str(),
            self.host.as_str(),
            self.port,
        );
        o.set_keep_alive(self.keepalive)
            .set_clean_session(true)
            .set_inflight(self.inflight_max)
            .set_max_packet_size(INCOMING_PACKET_BYTES_MAX, OUTGOING_PACKET_BYTES_MAX)
            .set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                self.identity.tls.clone(),
            )));
        o
    }
}

/// Connects, reports events, reconnects with backoff; returns when `events` is closed or after
/// the main loop asked for a clean DISCONNECT.
pub async fn drive(settings: LinkSettings, mut backoff: Backoff, events: mpsc::Sender<LinkEvent>) {
    let options = settings.mqtt_options();
    let server = format!("{}:{}", settings.host, settings.port);
    loop {
        let (client, mut eventloop) = AsyncClient::new(options.clone(), REQUEST_CHANNEL_CAP);
        let mut connected = false;
        let why = loop {
            let event = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    if ack.code != ConnectReturnCode::Success {
                        break format!("connection refused: {:?}", ack.code);
                    }
                    connected = true;
                    backoff.reset();
                    tracing::info!(%server, "connected");
                    LinkEvent::Connected(client.clone())
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => LinkEvent::Published(pkid),
                Ok(Event::Incoming(Packet::PubAck(ack))) => LinkEvent::PubAck(ack.pkid),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => {
                    tracing::info!(%server, "disconnected");
                    return;
                }
                Ok(Event::Incoming(Packet::Disconnect)) => break "server sent DISCONNECT".into(),
                Ok(_) => continue,
                Err(e) => break e.to_string(),
            };
            if events.send(event).await.is_err() {
                return;
            }
        };
        drop(client);
        if connected && events.send(LinkEvent::Disconnected).await.is_err() {
            return;
        }
        let delay = backoff.next_delay();
        tracing::warn!(
            %server,
            error = %why,
            retry_in_ms = delay.as_millis() as u64,
            "connection {}",
            if connected { "lost" } else { "failed" }
        );
        tokio::time::sleep(delay).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let mut b = Backoff::new(500, 30_000, StdRng::seed_from_u64(7));
        let expected_ceilings = [500, 1000, 2000, 4000, 8000, 16_000, 30_000, 30_000, 30_000];
        for ceiling in expected_ceilings {
            assert_eq!(b.ceiling_ms(), ceiling);
            let d = b.next_delay().as_millis() as u64;
            assert!(d <= ceiling, "{d} > {ceiling}");
        }
        // Stays capped for a long time without overflowing.
        for _ in 0..1000 {
            assert!(b.next_delay() <= Duration::from_millis(30_000));
        }
        assert_eq!(b.ceiling_ms(), 30_000);
        b.reset();
        assert_eq!(b.ceiling_ms(), 500);
    }

    #[test]
    fn backoff_is_jittered_and_deterministic_per_seed() {
        let delays = |seed| {
            let mut b = Backoff::new(500, 30_000, StdRng::seed_from_u64(seed));
            for _ in 0..10 {
                b.next_delay();
            }
            // At the cap: 200 draws from [0, 30 s].
            (0..200).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        let a = delays(1);
        assert_eq!(a, delays(1), "same seed, same delays");
        assert_ne!(a, delays(2));
        let distinct: std::collections::BTreeSet<_> = a.iter().collect();
        assert!(distinct.len() > 100, "full jitter spreads delays");
        assert!(a.iter().any(|d| *d < Duration::from_millis(10_000)));
        assert!(a.iter().any(|d| *d > Duration::from_millis(20_000)));
    }
}
