//! The QoS 0/1 publishers the ingest and fan-out suites drive: connect them, publish, count acks.

use crate::client::{self, Packet};
use crate::target::Target;
use anyhow::{bail, Context};

/// Bytes queued by a QoS 0 publisher before it writes them out.
const QOS0_WRITE_CHUNK_BYTES: usize = 16 * 1024;
/// Publishers connecting at once before an ingest case.
const PUBLISHER_CONNECT_CONCURRENCY: usize = 32;
/// Largest message count one publisher sends in one case (keeps `seq` values unique per case).
pub const MESSAGES_PER_PUBLISHER_MAX: usize = 10_000_000;

/// Connects the first `publishers` devices of `t` (32 at a time); returns (device id, connection).
pub(super) async fn connect_publishers(
    t: &Target,
    sources: &std::sync::Arc<client::SourceAddrs>,
    publishers: usize,
) -> anyhow::Result<Vec<(String, client::Conn)>> {
    let endpoint = t.endpoint()?;
    let devices = t
        .creds(publishers)?
        .iter()
        .map(|c| (endpoint.clone(), c.clone()));
    connect_publishers_to(devices.collect(), sources).await
}

/// Connects each device to the endpoint it is paired with (32 at a time); returns (device id,
/// connection) in order.
pub(super) async fn connect_publishers_to(
    devices: Vec<(client::Endpoint, client::Cred)>,
    sources: &std::sync::Arc<client::SourceAddrs>,
) -> anyhow::Result<Vec<(String, client::Conn)>> {
    let mut conns = Vec::with_capacity(devices.len());
    for chunk in devices.chunks(PUBLISHER_CONNECT_CONCURRENCY) {
        let mut set = tokio::task::JoinSet::new();
        for (i, (ep, cred)) in chunk.iter().enumerate() {
            let (ep, cred, src) = (ep.clone(), cred.clone(), sources.next());
            set.spawn(async move {
                let config = ep.tls_config(&cred)?;
                let conn = client::connect(&ep, config, &cred.id, src, 60).await?;
                anyhow::Ok((i, cred.id, conn))
            });
        }
        let mut done = Vec::with_capacity(chunk.len());
        while let Some(r) = set.join_next().await {
            done.push(r.context("connect task")??);
        }
        done.sort_by_key(|(i, _, _)| *i);
        conns.extend(done.into_iter().map(|(_, id, conn)| (id, conn)));
    }
    Ok(conns)
}

/// Sends `total` messages split evenly over `conns`, all publishers at once, each bounded by
/// `--timeout-secs`; returns (sent, acknowledged).
pub(super) async fn publish_all(
    conns: Vec<(String, client::Conn)>,
    total: usize,
    qos: u8,
    args: &crate::BenchArgs,
    seq_base: u64,
) -> anyhow::Result<(usize, usize)> {
    let publishers = conns.len().max(1);
    let mut set = tokio::task::JoinSet::new();
    for (i, (id, conn)) in conns.into_iter().enumerate() {
        let n = total / publishers + usize::from(i < total % publishers);
        anyhow::ensure!(
            n <= MESSAGES_PER_PUBLISHER_MAX,
            "too many messages per publisher"
        );
        let window = args.window.max(1);
        let timeout = args.timeout();
        set.spawn(async move {
            tokio::time::timeout(timeout, publish(conn, id, qos, n, window, seq_base))
                .await
                .context("publisher timed out")?
        });
    }
    let (mut sent, mut acked) = (0usize, 0usize);
    while let Some(r) = set.join_next().await {
        let (s, a) = r.context("publisher task")??;
        sent += s;
        acked += a;
    }
    Ok((sent, acked))
}

/// Publishes `n` telemetry messages; returns (sent, acknowledged). QoS 1 keeps ≤ `window` in
/// flight; QoS 0 ends with a PINGREQ/PINGRESP so everything sent was read by the server.
async fn publish(
    mut conn: client::Conn,
    id: String,
    qos: u8,
    n: usize,
    window: usize,
    seq_base: u64,
) -> anyhow::Result<(usize, usize)> {
    let topic = format!("devices/{id}/telemetry");
    let payload = |k: usize| format!("{{\"seq\":{},\"v\":1.0}}", seq_base + k as u64);
    if qos == 0 {
        for k in 0..n {
            conn.queue_publish(&topic, payload(k).as_bytes(), 0, 0);
            if conn.queued_len() >= QOS0_WRITE_CHUNK_BYTES {
                conn.flush().await?;
            }
        }
        conn.queue_pingreq();
        conn.flush().await?;
        loop {
            match conn.read_packet().await? {
                Some(Packet::PingResp) => break,
                Some(_) => {}
                None => bail!("closed before PINGRESP"),
            }
        }
        conn.close().await;
        return Ok((n, 0));
    }
    let (mut sent, mut acked, mut in_flight) = (0usize, 0usize, 0usize);
    let mut packet_id: u16 = 1;
    while acked < n {
        while in_flight < window && sent < n {
            conn.queue_publish(&topic, payload(sent).as_bytes(), 1, packet_id);
            packet_id = packet_id.checked_add(1).unwrap_or(1);
            sent += 1;
            in_flight += 1;
        }
        conn.flush().await?;
        match conn.read_packet().await? {
            Some(Packet::PubAck { .. }) => {
                acked += 1;
                in_flight -= 1;
            }
            Some(_) => {}
            None => bail!("closed after {acked} PUBACKs"),
        }
    }
    conn.close().await;
    Ok((sent, acked))
}
