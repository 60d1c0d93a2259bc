//! Enrolling cohorts: their claims at the start, and at the end the exactly-once checks against
//! the server (registry, certificate ledger, claims) and the pipeline funnel.

use crate::device::{DeviceState, EnrollProbe, FAULTS, STEPS, STEP_KEY, STEP_REGISTERED};
use crate::harness::InProcessServer;
use crate::report::{EnrollmentReport, FunnelStep};
use crate::scenario::Scenario;
use anyhow::Context as _;
use mooring_proto::sync::lock;
use mooring_server::access::Access;
use mooring_server::app::App;
use mooring_store::CertState;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Devices listed by name when not enrolled exactly once (the count is always exact).
const NOT_ENROLLED_EXAMPLES_MAX: usize = 20;

/// The claims of the enrolling cohorts: their ids (all cohorts, in order) and, per cohort,
/// (claim index, token) of each of its claims.
#[derive(Default)]
pub(super) struct Claims {
    pub(super) ids: Vec<String>,
    pub(super) per_cohort: Vec<Vec<(usize, String)>>,
}

impl Claims {
    /// Creates `ceil(count / claim_uses)` claims per enrolling cohort, with the cohort's tags,
    /// through the server's provisioning service (as `POST /api/v1/claims` does).
    pub(super) async fn create(s: &Scenario, server: &InProcessServer) -> anyhow::Result<Self> {
        let mut claims = Claims::default();
        for c in &s.cohorts {
            let mut mine = Vec::new();
            if let Some(e) = &c.enroll {
                let per = e.claim_uses as usize;
                for k in 0..c.count.div_ceil(per) {
                    let uses = per.min(c.count - k * per) as u32;
                    let (claim, token) = server
                        .server
                        .app
                        .provisioning
                        .create_claim(
                            &Access::all(),
                            "mooring-sim",
                            mooring_server::provision::NewClaim {
                                uses_max: Some(uses),
                                tags: c.tags.clone(),
                                name: Some(format!("{}-{k}", c.name)),
                                ..Default::default()
                            },
                        )
                        .await
                        .map_err(|e| {
                            anyhow::anyhow!("creating claim {k} of cohort {}: {e}", c.name)
                        })?;
                    mine.push((claims.ids.len(), token));
                    claims.ids.push(claim.id);
                }
            }
            claims.per_cohort.push(mine);
        }
        Ok(claims)
    }

    /// The probe of device `n` (index `index`, id `id`) of cohort `ci`, if that cohort enrolls.
    pub(super) fn probe(
        &self,
        s: &Scenario,
        ci: usize,
        n: usize,
        index: usize,
        id: &str,
        data_dir: &Path,
    ) -> Option<Arc<EnrollProbe>> {
        let e = s.cohorts.get(ci)?.enroll.as_ref()?;
        let (claim, token) = self.per_cohort.get(ci)?.get(n / e.claim_uses as usize)?;
        Some(Arc::new(EnrollProbe::new(
            id,
            index,
            *claim,
            token.clone(),
            data_dir.join("enroll-state").join(id),
            e,
            s.seed,
        )))
    }
}

fn quantile(sorted: &[u64], q: f64) -> u64 {
    let i = ((sorted.len().saturating_sub(1)) as f64 * q).round() as usize;
    sorted.get(i).copied().unwrap_or(0)
}

/// Checks every enrolling device against the server as it is now and builds the funnel.
/// `expected_devices`: devices the registry should hold (every cohort's, deleted ones aside).
pub(super) async fn report(
    app: &App,
    devices: &[Arc<DeviceState>],
    claims: &Claims,
    epoch_ms: u64,
    expected_devices: u64,
) -> anyhow::Result<Option<EnrollmentReport>> {
    let enrolling: Vec<(&Arc<DeviceState>, &Arc<EnrollProbe>)> = devices
        .iter()
        .filter_map(|d| Some((d, d.enroll.as_ref()?)))
        .collect();
    if enrolling.is_empty() {
        return Ok(None);
    }
    let all = Access::all();
    let mut r = EnrollmentReport {
        devices: enrolling.len() as u64,
        claims: claims.ids.len() as u64,
        devices_expected: expected_devices,
        ..Default::default()
    };
    let mut per_claim = vec![0u32; claims.ids.len()];
    let mut refusals: BTreeMap<String, u64> = BTreeMap::new();
    for (d, p) in &enrolling {
        let id = d.id.as_str();
        let record = app
            .registry
            .lookup(id)
            .await
            .with_context(|| format!("looking up {id}"))?;
        let identity = d.link.identity();
        if let Some(rec) = &record {
            // Registered by this device's enrollment: the record holds the certificate the
            // device stored, or (answer not stored yet) the server's pipeline says a claim
            // enrollment named it. A record of that id made otherwise is someone else's.
            let by_enrollment = match &identity {
                Some((_, sha256)) if *sha256 == rec.cert_sha256 => true,
                _ => app
                    .pipeline
                    .steps(&all, id)
                    .await
                    .map_err(|e| anyhow::anyhow!("{id}'s pipeline: {e}"))?
                    .steps
                    .iter()
                    .any(|s| s.step == "claimed" && s.at.is_some()),
            };
            if by_enrollment {
                p.reached(STEP_REGISTERED, rec.created_at_ms.saturating_sub(epoch_ms));
            }
        }
        let active = match &record {
            Some(_) => app
                .registry
                .device_certificates(&all, id)
                .await
                .map_err(|e| anyhow::anyhow!("{id}'s certificates: {e}"))?
                .iter()
                .filter(|c| c.state == CertState::Active)
                .count(),
            None => 0,
        };
        if active > 1 {
            r.duplicate_certificates += 1;
        }
        let why = match (&record, identity) {
            (None, _) => Some("not in the registry".to_owned()),
            (Some(_), None) => Some("no certificate stored on the device".to_owned()),
            (Some(rec), Some((cn, sha256))) if rec.cert_sha256 != sha256 || cn != id => {
                Some("registered with another certificate than the one it stored".to_owned())
            }
            _ if active != 1 => Some(format!("{active} active certificates")),
            _ => None,
        };
        match why {
            None => {
                r.enrolled += 1;
                for (i, fault) in FAULTS.iter().enumerate() {
                    if p.fired(i) {
                        *r.survived_faults.entry((*fault).to_owned()).or_default() += 1;
                    }
                }
                if let Some(n) = per_claim.get_mut(p.claim) {
                    *n += 1;
                }
            }
            Some(why) => {
                if r.not_enrolled_examples.len() < NOT_ENROLLED_EXAMPLES_MAX {
                    let refusal = lock(&p.refusal).clone();
                    r.not_enrolled_examples.push(match refusal {
                        Some(code) => format!("{id}: {why} (refused: {code})"),
                        None => format!("{id}: {why}"),
                    });
                }
            }
        }
        if let Some(code) = lock(&p.refusal).clone() {
            *refusals.entry(code).or_default() += 1;
        }
        r.process_restarts += p.restarts.load(Ordering::Relaxed);
    }
    for (i, claim_id) in claims.ids.iter().enumerate() {
        let (claim, _) = app
            .provisioning
            .get_claim(&all, claim_id)
            .await
            .map_err(|e| anyhow::anyhow!("claim {claim_id}: {e}"))?;
        if claim.uses != per_claim[i] {
            r.claims_uses_mismatched += 1;
            if r.not_enrolled_examples.len() < NOT_ENROLLED_EXAMPLES_MAX {
                r.not_enrolled_examples.push(format!(
                    "claim {claim_id}: {} uses, {} devices enrolled with it",
                    claim.uses, per_claim[i]
                ));
            }
        }
    }
    let funnel = app
        .pipeline
        .funnel(&all, None)
        .await
        .map_err(|e| anyhow::anyhow!("the pipeline funnel: {e}"))?;
    r.devices_in_store = funnel
        .stages
        .iter()
        .find(|s| s.step == "registered")
        .map_or(0, |s| s.devices);
    r.refusals = refusals;
    r.enrolled_exactly_once = r.enrolled == r.devices
        && r.duplicate_certificates == 0
        && r.claims_uses_mismatched == 0
        && r.devices_in_store == r.devices_expected;
    for (i, step) in STEPS.iter().enumerate() {
        let mut at: Vec<u64> = Vec::new();
        let mut since_key: Vec<u64> = Vec::new();
        for (_, p) in &enrolling {
            if let Some(t) = p.reached_at(i) {
                at.push(t);
                if let Some(k) = p.reached_at(STEP_KEY) {
                    since_key.push(t.saturating_sub(k));
                }
            }
        }
        at.sort_unstable();
        since_key.sort_unstable();
        r.funnel.push(FunnelStep {
            step: (*step).to_owned(),
            devices: at.len() as u64,
            p50_ms: quantile(&at, 0.5),
            p99_ms: quantile(&at, 0.99),
            max_ms: at.last().copied().unwrap_or(0),
            since_key_p50_ms: quantile(&since_key, 0.5),
            since_key_p99_ms: quantile(&since_key, 0.99),
            since_key_max_ms: since_key.last().copied().unwrap_or(0),
        });
    }
    Ok(Some(r))
}
