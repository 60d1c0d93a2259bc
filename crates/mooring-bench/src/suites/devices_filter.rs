//! Suite `devices-filter` (ours only; issue 15): the dashboard's devices page with a large
//! fleet. On each filter change the page asks for `GET /api/v1/devices?selector=S&limit=50`
//! and `GET /api/v1/fleet/summary?selector=S`; this measures that pair's latency, p50 and p99,
//! for several selectors (everything, a tag matching about 10 %, a rare tag, `version=`,
//! `online`, a tag and `online`).
//!
//! Seeding: [`ONLINE`] devices are provisioned through the API (they need certificates, and
//! connect for real, so `online` has something to count); the server is stopped and the rest of
//! [`DEVICES`] are written straight into its store (no certificates: they never connect), with
//! tags and reported versions spread as a real fleet's are: `site` one of 10 sites (10 % each),
//! `hw` one of 3 revisions, `rare=yes` on 0.1 %; version `1.4.0` on 60 %, `1.3.2` on 30 %,
//! `1.2.0` on 9 %, none on 1 %. Then the server starts and the online devices connect.

use super::{fresh_start, percentile, spawn_connected, IDLE_KEEPALIVE_SECS};
use crate::fleet::FleetOpts;
use crate::report::{Row, Table};
use crate::target::{device_id, Kind};
use crate::Bench;
use anyhow::Context;
use mooring_store::{DeviceId, DeviceStore, NewDevice, ShadowRecord, ShadowStore, SqliteStore};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Devices in the fleet.
pub const DEVICES: usize = 100_000;
/// Of those, connected during the measurement (provisioned through the API with certificates).
pub const ONLINE: usize = 1_000;
/// Request pairs timed per selector.
const ROUNDS: usize = 40;
/// Store writes in flight while seeding (the store group-commits them).
const SEED_CONCURRENCY: usize = 256;

/// The selectors measured, as the page would send them.
const SELECTORS: &[(&str, &str)] = &[
    ("all devices", ""),
    ("tag ~10 %", "tag:site=site-3"),
    ("rare tag (0.1 %)", "tag:rare=yes"),
    ("version=1.3.2 (~30 %)", "version=1.3.2"),
    ("online (1 %)", "online"),
    ("tag and online", "tag:site=site-3 and online"),
];

fn tags_of(i: usize) -> BTreeMap<String, String> {
    let mut t = BTreeMap::new();
    t.insert("site".to_owned(), format!("site-{}", i % 10));
    t.insert("hw".to_owned(), format!("rev-{}", (i / 10) % 3));
    if i % 1000 == 7 {
        t.insert("rare".to_owned(), "yes".to_owned());
    }
    t
}

fn version_of(i: usize) -> Option<&'static str> {
    match (i * 7919) % 100 {
        0..=59 => Some("1.4.0"),
        60..=89 => Some("1.3.2"),
        90..=98 => Some("1.2.0"),
        _ => None,
    }
}

/// The suite: see the module docs.
pub async fn devices_filter(b: &mut Bench) -> anyhow::Result<Table> {
    let mut table = Table::new(format!(
        "devices page with {} devices: list (limit 50) + fleet summary, same selector (ours only)",
        crate::report::fmt_value(Some(DEVICES as f64))
    ));
    let Some(t) = b.targets.iter_mut().find(|t| t.kind == Kind::Mooring) else {
        table.push(Row::new("list + summary p50, ms", None, None).note("needs --targets mooring"));
        return Ok(table);
    };
    fresh_start(t, ONLINE).await?;
    t.kill().await;
    let data_dir = t.data_dir().context("mooring data dir")?.to_owned();
    let started = Instant::now();
    seed(&data_dir).await?;
    eprintln!(
        "devices-filter: seeded {DEVICES} devices in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    t.start().await?;
    let opts = FleetOpts {
        keepalive_secs: IDLE_KEEPALIVE_SECS,
        reconnect: false,
        attempts_max: 5,
        concurrency: b.args.connect_concurrency,
        respond_to_commands: false,
    };
    let mut notes = Vec::new();
    let Some(fleet) = spawn_connected(
        t,
        ONLINE,
        b.sources.clone(),
        opts,
        b.args.timeout(),
        "devices connected",
        &mut notes,
    )
    .await?
    else {
        table.push(Row::new("list + summary p50, ms", None, None).note(notes.join("; ")));
        return Ok(table);
    };
    let api = t.api_client()?;
    // Presence is in memory at once; wait until the summary counts every connection.
    let deadline = Instant::now() + b.args.timeout();
    loop {
        let s = api
            .fleet_summary(&mooring_api::FleetSummaryParams { selector: None })
            .await?;
        if s.online >= ONLINE as u64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (name, selector) in SELECTORS {
        let sel = (!selector.is_empty()).then(|| (*selector).to_owned());
        let list_params = mooring_api::ListDevicesParams {
            limit: Some(50),
            cursor: None,
            selector: sel.clone(),
        };
        let summary_params = mooring_api::FleetSummaryParams {
            selector: sel.clone(),
        };
        let mut pair_ms = Vec::with_capacity(ROUNDS);
        let (mut listed, mut matched) = (0, 0);
        // One warm-up pair, then the timed ones.
        for round in 0..=ROUNDS {
            let t0 = Instant::now();
            let (list, summary) = tokio::try_join!(
                api.list_devices(&list_params),
                api.fleet_summary(&summary_params)
            )?;
            let ms = t0.elapsed().as_secs_f64() * 1000.0;
            if round > 0 {
                pair_ms.push(ms);
            }
            listed = list.devices.len();
            matched = summary.devices;
        }
        pair_ms.sort_by(f64::total_cmp);
        let note = format!("{matched} devices match, page of {listed}");
        table.push(
            Row::new(
                format!("{name}: p50, ms"),
                Some(percentile(&pair_ms, 0.5)),
                None,
            )
            .note(note),
        );
        table.push(Row::new(
            format!("{name}: p99, ms"),
            Some(percentile(&pair_ms, 0.99)),
            None,
        ));
    }
    fleet.shutdown().await;
    if !notes.is_empty() {
        table.push(Row::new("notes", None, None).note(notes.join("; ")));
    }
    Ok(table)
}

/// Tags (and versions) for the provisioned devices, and the rest of the fleet, straight into
/// the store of the stopped server.
async fn seed(data_dir: &std::path::Path) -> anyhow::Result<()> {
    let dir = data_dir.to_owned();
    let store = tokio::task::spawn_blocking(move || SqliteStore::open(&dir))
        .await
        .context("open task")??;
    let store = Arc::new(store);
    let mut set = tokio::task::JoinSet::new();
    for i in 0..DEVICES {
        if set.len() >= SEED_CONCURRENCY {
            if let Some(r) = set.join_next().await {
                r.context("seed task")??;
            }
        }
        let store = store.clone();
        set.spawn(async move {
            let id = if i < ONLINE {
                let id = device_id(i);
                store.set_tags(&id, tags_of(i)).await?;
                DeviceId::parse(&id)?
            } else {
                let id = DeviceId::parse(&format!("fd-{i:06}"))?;
                store
                    .create_device(NewDevice {
                        id: id.clone(),
                        tags: tags_of(i),
                        created_at_ms: 1,
                        cert_sha256: format!("{i:064x}"),
                        cert_serial: format!("{i:x}"),
                        cert_not_after_ms: u64::MAX / 4,
                        cert_issuer: mooring_store::CERT_ISSUER_FLEET.to_owned(),
                    })
                    .await?;
                id
            };
            if let Some(v) = version_of(i) {
                let mut reported = serde_json::Map::new();
                reported.insert("version".into(), serde_json::Value::String(v.into()));
                store
                    .save_shadow(
                        ShadowRecord {
                            reported,
                            version: 1,
                            updated_at_ms: 1,
                            ..ShadowRecord::empty(id)
                        },
                        0,
                    )
                    .await?;
            }
            anyhow::Ok(())
        });
        if i % 20_000 == 19_999 {
            eprintln!("  {} devices written", i + 1);
        }
    }
    while let Some(r) = set.join_next().await {
        r.context("seed task")??;
    }
    Ok(())
}
