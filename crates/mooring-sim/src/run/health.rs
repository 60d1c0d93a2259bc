//! Fleet health in a run: the scenario's `[[rule]]`s created before the devices boot, and at the
//! end (the server still up) every alert read back: cohort alerts by `<cohort>: <signal>`, rule
//! alerts by rule with the devices they named, each with when it was first raised.

use crate::report::{AlertSummary, HealthReport, TicketSummary};
use crate::scenario::Scenario;
use mooring_server::access::Access;
use mooring_server::app::App;
use std::collections::{BTreeMap, BTreeSet};

/// Devices listed per page when a `rule_alerts` selector is checked.
const PAGE_LEN: usize = 1000;

/// Creates the scenario's rules as an admin token `sim-rules` (a rule acts only while its
/// creator still exists with the role it had).
pub async fn create_rules(s: &Scenario, app: &App) -> anyhow::Result<()> {
    if s.rules.is_empty() {
        return Ok(());
    }
    let (token, _secret) = app
        .tokens
        .create(mooring_server::auth::NewToken {
            name: "sim-rules".to_owned(),
            role: mooring_store::Role::Admin,
            scope: None,
            expires_in_ms: None,
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating the rules' token: {}", e.message))?;
    for r in &s.rules {
        app.rules
            .create(
                &Access::all(),
                mooring_store::Role::Admin,
                &token.id,
                mooring_api::CreateRule {
                    name: r.name.clone(),
                    when: r.when.clone(),
                    selector: r.selector.clone(),
                    then: r.then.clone(),
                    enabled: Some(true),
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("rule {}: {}", r.name, e.message))?;
    }
    Ok(())
}

/// The cohort alert's name `<cohort>: <signal>` from its rule id
/// `cohort:<group_by>:<signal>:<cohort>`.
fn cohort_key(rule_id: &str) -> Option<String> {
    let rest = rule_id.strip_prefix("cohort:")?;
    let signals = mooring_api::HEALTH_TESTED_SIGNALS
        .iter()
        .chain(std::iter::once(&mooring_api::HEALTH_BATTERY_SIGNAL));
    for signal in signals {
        let marker = format!(":{signal}:");
        if let Some(i) = rest.find(&marker) {
            return Some(format!("{}: {signal}", &rest[i + marker.len()..]));
        }
    }
    None
}

/// Every alert at the end, summarised; `None` when the scenario has no health part.
pub async fn report(
    s: &Scenario,
    app: &App,
    epoch_ms: u64,
) -> anyhow::Result<Option<HealthReport>> {
    let e = &s.expect;
    if s.health.is_none()
        && s.rules.is_empty()
        && e.cohort_alerts.is_none()
        && e.rule_alerts.is_empty()
        && s.playbooks.is_empty()
    {
        return Ok(None);
    }
    let mut by_key: BTreeMap<String, AlertSummary> = BTreeMap::new();
    let mut rule_devices: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let params = mooring_api::AlertListParams {
            limit: Some(mooring_server::rules::ALERT_PAGE_LEN_MAX),
            cursor: cursor.clone(),
            ..Default::default()
        };
        let (page, next) = app
            .rules
            .list_alerts(&Access::all(), &params)
            .await
            .map_err(|e| anyhow::anyhow!("listing alerts: {}", e.message))?;
        for a in page {
            let (key, cohort) = match cohort_key(&a.rule_id) {
                Some(k) => (k, true),
                None => (a.rule_name.clone(), false),
            };
            let at = a.first_fired_at.saturating_sub(epoch_ms);
            let sum = by_key.entry(key).or_insert_with(|| AlertSummary {
                cohort,
                alerts: 0,
                devices: 0,
                occurrences: 0,
                open_at_end: 0,
                first_raised_ms: at,
                detail: a.detail.clone(),
            });
            sum.alerts += 1;
            sum.occurrences += a.count;
            sum.open_at_end += u64::from(a.state != "resolved");
            if at <= sum.first_raised_ms {
                sum.first_raised_ms = at;
                sum.detail = a.detail.clone();
            }
            if let Some(d) = a.device_id {
                rule_devices
                    .entry(a.rule_name.clone())
                    .or_default()
                    .insert(d);
            }
        }
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    for (rule, devices) in &rule_devices {
        if let Some(sum) = by_key.get_mut(rule) {
            sum.devices = devices.len() as u64;
        }
    }
    // `rule_alerts`: the devices alerted against those the selector names.
    let mut rule_mismatches = BTreeMap::new();
    for (rule, selector) in &e.rule_alerts {
        let want = selected(app, selector)
            .await
            .map_err(|e| anyhow::anyhow!("expect.rule_alerts.{rule}: {e}"))?;
        let got = rule_devices.get(rule).cloned().unwrap_or_default();
        let missing = want.difference(&got).count() as u64;
        let extra = got.difference(&want).count() as u64;
        rule_mismatches.insert(rule.clone(), (want.len() as u64, missing, extra));
    }
    let tickets = tickets(s, app, epoch_ms).await?;
    Ok(Some(HealthReport {
        alerts: by_key,
        rule_mismatches,
        tickets,
    }))
}

/// The devices `selector` names.
async fn selected(app: &App, selector: &str) -> anyhow::Result<BTreeSet<String>> {
    let sel = mooring_proto::selector::Selector::parse(selector)?;
    let mut want = BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let (page, next) = app
            .registry
            .select_devices(&sel, cursor.as_deref(), PAGE_LEN)
            .await
            .map_err(|e| anyhow::anyhow!("selecting {selector}: {}", e.message))?;
        want.extend(page.into_iter().map(|v| v.record.id.to_string()));
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    Ok(want)
}

/// Every ticket at the end, per playbook; `expect.tickets` checked against its selector.
async fn tickets(
    s: &Scenario,
    app: &App,
    epoch_ms: u64,
) -> anyhow::Result<BTreeMap<String, TicketSummary>> {
    let mut out: BTreeMap<String, TicketSummary> = BTreeMap::new();
    let mut listed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut cursor: Option<String> = None;
    loop {
        let params = mooring_api::TicketListParams {
            limit: Some(mooring_server::playbooks::TICKET_PAGE_LEN_MAX),
            cursor: cursor.clone(),
            ..Default::default()
        };
        let (page, next) = app
            .jobs
            .playbooks()
            .list(&Access::all(), &params)
            .await
            .map_err(|e| anyhow::anyhow!("listing tickets: {}", e.message))?;
        // Newest first: the last one seen of a playbook is its first.
        for t in page {
            let sum = out.entry(t.playbook.clone()).or_default();
            sum.tickets += 1;
            sum.title = t.title.clone();
            sum.first_opened_ms = t.created_at.saturating_sub(epoch_ms);
            sum.devices_listed = t.devices.len() as u64;
            sum.devices_affected = t.devices_affected;
            sum.devices_total = t.devices_total;
            sum.parts = t.parts.clone();
            sum.steps = t.steps.clone();
            listed.insert(
                t.playbook.clone(),
                t.devices.iter().map(|d| d.device_id.clone()).collect(),
            );
        }
        match next {
            Some(n) => cursor = Some(n),
            None => break,
        }
    }
    for (playbook, selector) in &s.expect.tickets {
        let want = selected(app, selector)
            .await
            .map_err(|e| anyhow::anyhow!("expect.tickets.{playbook}: {e}"))?;
        let sum = out.entry(playbook.clone()).or_default();
        sum.selector_devices = want.len() as u64;
        sum.listed_outside_selector = listed
            .get(playbook)
            .map_or(0, |l| l.difference(&want).count() as u64);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::cohort_key;

    #[test]
    fn cohort_keys_read_back_from_rule_ids() {
        assert_eq!(
            cohort_key("cohort:tag:site:disconnects:site=c").as_deref(),
            Some("site=c: disconnects")
        );
        assert_eq!(
            cohort_key("cohort:tag:hw,version:battery_low:hw=rev-b on 1.4.0").as_deref(),
            Some("hw=rev-b on 1.4.0: battery_low")
        );
        assert_eq!(cohort_key("rule_0001"), None);
    }
}
