//! OTA deployments: one `mooring.update` command per matching device, each device's state from
//! its status reports (newest `seq` wins), link refresh, cancel, a device's history.

use super::Ota;
use crate::access::Access;
use crate::commands::NewCommand;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use mooring_proto::ota::{
    self, CancelParams, Link, LinkRequest, SignedManifest, StatusReport, UpdateParams, UpdateState,
};
use mooring_store::{
    ArtifactRecord, ArtifactState, DeploymentCreate, DeploymentDelete, DeploymentRecord,
    DeviceUpdateRecord,
};
use std::collections::BTreeMap;

/// Most devices one deployment reaches (the rollout engine, with waves, is the next issue).
pub const DEPLOYMENT_DEVICES_MAX: usize = 10_000;
/// Update commands a deployment creates at once.
const SEND_CONCURRENCY_MAX: usize = 16;
/// Devices read per page when a deployment selects or cancels.
const DEPLOYMENT_PAGE_LEN: usize = 500;
/// Most entries of a device's OTA history.
pub const DEVICE_HISTORY_LEN_MAX: usize = 100;
/// Most deployments a listing shows.
pub const DEPLOYMENT_LIST_LEN_MAX: usize = 100;

/// What [`Ota::deploy`] stored and [`Ota::send_updates`] sends.
pub struct PendingSends {
    deployment: DeploymentRecord,
    artifact: ArtifactRecord,
    devices: Vec<String>,
}

impl PendingSends {
    /// Updates already stored as pending in `deployment` (a rollout's devices as it starts
    /// them), for [`Ota::send_updates`].
    pub(crate) fn new(
        deployment: DeploymentRecord,
        artifact: ArtifactRecord,
        devices: Vec<String>,
    ) -> Self {
        Self {
            deployment,
            artifact,
            devices,
        }
    }
}

/// Marks a deployment as being sent by this node (so [`Ota::resume_sends`] leaves it alone)
/// until dropped.
struct SendingGuard<'a> {
    sending: &'a std::sync::Mutex<std::collections::HashSet<String>>,
    id: String,
}

impl<'a> SendingGuard<'a> {
    fn new(sending: &'a std::sync::Mutex<std::collections::HashSet<String>>, id: &str) -> Self {
        mooring_proto::sync::lock(sending).insert(id.to_owned());
        Self {
            sending,
            id: id.to_owned(),
        }
    }
}

impl Drop for SendingGuard<'_> {
    fn drop(&mut self) {
        mooring_proto::sync::lock(self.sending).remove(&self.id);
    }
}

/// Ends the update a `mooring.update` command carried when the command ended without success
/// before the device reported anything on it: `failed`, reason `command_failed: ...` (the device
/// answered with a failure, e.g. it has no updater, or did not answer within
/// `[ota] update_answer_timeout_ms`), `command_expired: ...` (never picked up within its time to
/// live) or `canceled: ...`. Written without a `seq`, so whatever the device reports afterwards
/// still wins. Called by the commands service once it stored such a command's final state.
pub(crate) async fn update_command_ended(
    core: &crate::app::Core,
    r: &mooring_store::CommandRecord,
) -> ServiceResult<()> {
    use mooring_store::CommandState;
    if r.name != ota::UPDATE_COMMAND {
        return Ok(());
    }
    let mut reason = match r.state {
        CommandState::Failed => {
            let output = r.result.as_ref().map(|o| &o.output);
            let said = output
                .and_then(|o| o.get("reason").or_else(|| o.get("error")))
                .and_then(|v| v.as_str().map(str::to_owned))
                .or_else(|| output.map(|o| o.to_string()))
                .unwrap_or_else(|| "no answer".to_owned());
            format!("{}: {said}", ota::reason::COMMAND_FAILED)
        }
        CommandState::Expired => format!(
            "{}: the device did not pick the update up before its command expired",
            ota::reason::COMMAND_EXPIRED
        ),
        CommandState::Canceled => format!(
            "{}: the update's command was canceled before the device picked it up",
            ota::reason::CANCELED
        ),
        _ => return Ok(()),
    };
    let Some(dep) = r.params.get("deployment_id").and_then(|v| v.as_str()) else {
        return Ok(());
    };
    let Some(mut u) = core.store.get_update(dep, r.device_id.as_str()).await? else {
        return Ok(());
    };
    let other_command = u.command_id.as_deref().is_some_and(|c| c != r.id);
    if u.seq.is_some() || u.state.is_final() || other_command {
        return Ok(());
    }
    u.state = UpdateState::Failed;
    reason.truncate(reason.floor_char_boundary(ota::REASON_LEN_MAX));
    u.reason = Some(reason);
    u.progress_pct = None;
    u.updated_at_ms = core.now_ms();
    core.store.apply_update_report(u).await?;
    Ok(())
}

/// `<created_at_ms>.<id>` (a deployment list's cursor) → its parts; `400 invalid_cursor`.
fn parse_deployment_cursor(cursor: &str) -> ServiceResult<(u64, String)> {
    let bad = || ServiceError::invalid("invalid_cursor", "cursor is not valid");
    let (at, id) = cursor.split_once('.').ok_or_else(bad)?;
    let at: u64 = at.parse().map_err(|_| bad())?;
    let id_ok = id.strip_prefix("dep_").is_some_and(|h| {
        !h.is_empty() && h.len() <= 32 && h.bytes().all(|b| b.is_ascii_hexdigit())
    });
    if !id_ok {
        return Err(bad());
    }
    Ok((at, id.to_owned()))
}

/// A deployment and its devices' states.
#[derive(Debug, Clone)]
pub struct DeploymentView {
    pub deployment: DeploymentRecord,
    pub version: String,
    /// Devices per update state (`pending`, `downloading`, ..., `committed`).
    pub counts: BTreeMap<String, u64>,
    pub total: u64,
}

/// Whether a scoped caller sees (and may cancel) a deployment: its selector carries every term
/// of the caller's scope (a scoped caller's own deployments do: `deploy` narrows by the scope).
pub fn deployment_visible(access: &Access, d: &DeploymentRecord) -> bool {
    match access.scope() {
        None => true,
        Some(scope) => mooring_proto::selector::Selector::parse(&d.selector)
            .is_ok_and(|s| scope.terms.iter().all(|t| s.terms.contains(t))),
    }
}

/// Artifacts are fleet-wide: a caller limited to a scope may deploy them, not upload or delete.
pub fn artifacts_unscoped(access: &Access) -> ServiceResult<()> {
    if access.scope().is_some() {
        return Err(ServiceError::new(
            ErrorKind::Forbidden,
            "forbidden",
            "artifacts are fleet-wide: a caller limited to a scope cannot upload, sign or delete them",
        ));
    }
    Ok(())
}

impl Ota {
    fn deployment_not_found(id: &str) -> ServiceError {
        ServiceError::not_found("deployment_not_found", format!("no deployment {id}"))
    }

    /// Stores a deployment of `artifact_id` to every device `selector` matches (narrowed by
    /// the caller's scope), each device's update pending; [`Ota::send_updates`] then sends one
    /// `mooring.update` command each (the caller runs it apart from the request, so a client
    /// that goes away does not cut it short), tracked per device from its reports.
    pub async fn deploy(
        &self,
        access: &Access,
        created_by: &str,
        artifact_id: &str,
        selector: &str,
        allow_downgrade: bool,
    ) -> ServiceResult<(DeploymentView, PendingSends)> {
        let a = self.get_artifact(artifact_id).await?;
        if a.state != ArtifactState::Ready {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "artifact_not_ready",
                format!("artifact {artifact_id} is still uploading"),
            ));
        }
        let given = crate::commands::parse_selector(selector)?;
        let sel = access.narrow(Some(given.clone())).unwrap_or(given);
        let mut devices = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let (page, next) = self
                .registry
                .select_devices(&sel, cursor.as_deref(), DEPLOYMENT_PAGE_LEN)
                .await?;
            devices.extend(page.into_iter().map(|d| d.record.id.to_string()));
            if devices.len() > DEPLOYMENT_DEVICES_MAX {
                return Err(ServiceError::invalid(
                    "too_many_devices",
                    format!("the selector matches more than {DEPLOYMENT_DEVICES_MAX} devices; narrow it"),
                ));
            }
            match next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        if devices.is_empty() {
            return Err(ServiceError::invalid(
                "no_matching_devices",
                format!("no device matches {sel}"),
            ));
        }
        let now = self.core.now_ms();
        let d = DeploymentRecord {
            id: format!("dep_{:016x}", rand::random::<u64>()),
            artifact_id: a.id.clone(),
            selector: sel.to_string(),
            allow_downgrade,
            created_by: created_by.to_owned(),
            created_at_ms: now,
            canceled_at_ms: None,
        };
        let updates = devices
            .iter()
            .map(|device| DeviceUpdateRecord {
                deployment_id: d.id.clone(),
                device_id: device.clone(),
                artifact_id: a.id.clone(),
                version: a.version.clone(),
                command_id: None,
                state: UpdateState::Pending,
                reason: None,
                progress_pct: None,
                running_version: None,
                seq: None,
                updated_at_ms: now,
            })
            .collect();
        let max = self.core.config.ota.deployments_max;
        match self
            .core
            .store
            .create_deployment(d.clone(), updates, max)
            .await?
        {
            DeploymentCreate::Created => {}
            DeploymentCreate::Full => {
                return Err(ServiceError::new(
                    ErrorKind::Unavailable,
                    "too_many_deployments",
                    format!("the server holds its maximum of {max} deployments ([ota] deployments_max); delete one that is over first"),
                ))
            }
        }
        let view = self.deployment(&d.id).await?;
        Ok((
            view,
            PendingSends {
                deployment: d,
                artifact: a,
                devices,
            },
        ))
    }

    /// Sends the stored deployment's update commands, a few at once (the store commits them in
    /// groups). A device that fails (deleted meanwhile, say) is logged and skipped: the others
    /// still get theirs. Stops sending once the deployment is canceled. A crash meanwhile leaves
    /// the rest pending without a command: [`Ota::resume_sends`] sends them at the next start
    /// (on one node of a cluster). Each command is idempotent per deployment and device (its
    /// idempotency key), so sending one twice creates it once.
    pub async fn send_updates(&self, p: PendingSends) {
        use futures::stream::StreamExt;
        let PendingSends {
            deployment: d,
            artifact: a,
            devices,
        } = p;
        let _sending = SendingGuard::new(&self.sending, &d.id);
        futures::stream::iter(devices.iter())
            .for_each_concurrent(SEND_CONCURRENCY_MAX, |device| {
                let (d, a) = (&d, &a);
                async move {
                    match self.core.store.get_deployment(&d.id).await {
                        Ok(Some(now)) if now.canceled_at_ms.is_some() => return,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(deployment = %d.id, device, error = %e, "update not sent");
                            return;
                        }
                    }
                    if let Err(e) = self.send_update(d, a, device).await {
                        tracing::warn!(deployment = %d.id, device, error = %e.message, "update not sent");
                    }
                }
            })
            .await;
    }

    /// Fails every update a crash left pending after its command ended without success (the
    /// commands service stores the command's end, then [`update_command_ended`]; a stop between
    /// the two is finished here). How many it looked at.
    pub async fn fail_ended_updates(&self) -> ServiceResult<usize> {
        let mut after: Option<(String, String)> = None;
        let mut seen = 0;
        loop {
            let page = self
                .core
                .store
                .ended_update_commands(
                    after.as_ref().map(|(d, u)| (d.as_str(), u.as_str())),
                    DEPLOYMENT_PAGE_LEN,
                )
                .await?;
            let Some((dep, device, _)) = page.last() else {
                break;
            };
            after = Some((dep.clone(), device.clone()));
            for (_, _, command) in page {
                if let Some(record) = self.core.store.get_command(&command).await? {
                    update_command_ended(&self.core, &record).await?;
                    seen += 1;
                }
            }
        }
        Ok(seen)
    }

    /// Sends what a crash cut short: every update still pending without a command, of
    /// deployments not canceled (except those this node is sending now). Runs at start and then
    /// every `[ota] sweep_interval_ms` (on the holder of the lease `ota.sweeper`
    /// in a cluster); a command another node sends at the same time is created once (its
    /// idempotency key). The number of updates it tried to send.
    pub async fn resume_sends(&self) -> ServiceResult<usize> {
        let mut after: Option<(String, String)> = None;
        let mut tried = 0;
        loop {
            let page = self
                .core
                .store
                .unsent_updates(
                    after.as_ref().map(|(d, u)| (d.as_str(), u.as_str())),
                    DEPLOYMENT_PAGE_LEN,
                )
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.clone());
            let mut groups: Vec<(String, Vec<String>)> = Vec::new();
            for (dep, device) in page {
                match groups.last_mut() {
                    Some((d, devices)) if *d == dep => devices.push(device),
                    _ => groups.push((dep, vec![device])),
                }
            }
            for (dep, devices) in groups {
                if mooring_proto::sync::lock(&self.sending).contains(&dep) {
                    continue;
                }
                let Some(deployment) = self.core.store.get_deployment(&dep).await? else {
                    continue;
                };
                let Some(artifact) = self
                    .core
                    .store
                    .get_artifact(&deployment.artifact_id)
                    .await?
                else {
                    continue;
                };
                tracing::info!(deployment = %dep, devices = devices.len(), "sending updates a restart found unsent");
                tried += devices.len();
                self.send_updates(PendingSends {
                    deployment,
                    artifact,
                    devices,
                })
                .await;
            }
        }
        Ok(tried)
    }

    async fn send_update(
        &self,
        d: &DeploymentRecord,
        a: &ArtifactRecord,
        device: &str,
    ) -> ServiceResult<()> {
        let registered_at_ms = self
            .registry
            .lookup(device)
            .await?
            .ok_or_else(|| {
                ServiceError::not_found("device_not_found", format!("no device {device}"))
            })?
            .created_at_ms;
        let params = UpdateParams {
            v: ota::SCHEMA_VERSION,
            deployment_id: d.id.clone(),
            signed: SignedManifest {
                manifest: String::from_utf8_lossy(&a.manifest).into_owned(),
                signature: a.signature.clone().unwrap_or_default(),
            },
            link: self.link_for(
                device,
                registered_at_ms,
                &a.id,
                self.core.config.ota.download_token_ttl_ms,
            ),
            allow_downgrade: d.allow_downgrade,
        };
        let (_, cmd) = self
            .commands
            .create_command(
                &Access::all(),
                device,
                NewCommand {
                    name: ota::UPDATE_COMMAND.to_owned(),
                    params: serde_json::to_value(&params).map_err(ServiceError::internal)?,
                    ttl_secs: Some(crate::commands::TTL_SECS_MAX),
                    max_attempts: None,
                    idempotency_key: Some(format!("ota:{}", d.id)),
                    result_timeout_secs: Some(
                        self.core.config.ota.update_answer_timeout_ms.div_ceil(1000),
                    ),
                },
                None,
            )
            .await?;
        self.core
            .store
            .set_update_command(&d.id, device, &cmd.id)
            .await?;
        Ok(())
    }

    /// A deployment `access` sees, with its counts per state.
    pub async fn visible_deployment(
        &self,
        access: &Access,
        id: &str,
    ) -> ServiceResult<DeploymentView> {
        match self.core.store.get_deployment(id).await? {
            Some(d) if deployment_visible(access, &d) => self.deployment(id).await,
            _ => Err(Self::deployment_not_found(id)),
        }
    }

    /// A deployment with its counts per state.
    pub async fn deployment(&self, id: &str) -> ServiceResult<DeploymentView> {
        let d = self
            .core
            .store
            .get_deployment(id)
            .await?
            .ok_or_else(|| Self::deployment_not_found(id))?;
        let counts = self.core.store.count_updates(id).await?;
        let version = self
            .core
            .store
            .get_artifact(&d.artifact_id)
            .await?
            .map(|a| a.version)
            .unwrap_or_default();
        Ok(DeploymentView {
            total: counts.values().sum(),
            deployment: d,
            version,
            counts,
        })
    }

    /// The deployments `access` sees, newest first, a page of at most `limit` (default and
    /// most [`DEPLOYMENT_LIST_LEN_MAX`]) after `cursor` (the previous page's next cursor); the
    /// cursor of the page after this one, if there may be one. A scoped caller's page is filled
    /// from as many stored deployments as it takes (at most `[ota] deployments_max`).
    pub async fn list_deployments(
        &self,
        access: &Access,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> ServiceResult<(Vec<DeploymentView>, Option<String>)> {
        let limit = limit.unwrap_or(DEPLOYMENT_LIST_LEN_MAX);
        if limit == 0 || limit > DEPLOYMENT_LIST_LEN_MAX {
            return Err(ServiceError::invalid(
                "invalid_limit",
                format!("limit must be between 1 and {DEPLOYMENT_LIST_LEN_MAX}"),
            ));
        }
        let mut before = cursor.map(parse_deployment_cursor).transpose()?;
        let mut out = Vec::new();
        loop {
            let page = self
                .core
                .store
                .list_deployments(
                    before.as_ref().map(|(at, id)| (*at, id.as_str())),
                    DEPLOYMENT_LIST_LEN_MAX,
                )
                .await?;
            let more = page.len() == DEPLOYMENT_LIST_LEN_MAX;
            for d in page {
                before = Some((d.created_at_ms, d.id.clone()));
                if !deployment_visible(access, &d) {
                    continue;
                }
                out.push(self.deployment(&d.id).await?);
                if out.len() == limit {
                    let next = format!("{}.{}", d.created_at_ms, d.id);
                    return Ok((out, Some(next)));
                }
            }
            if !more {
                return Ok((out, None));
            }
        }
    }

    /// Cancels a deployment: updates not yet picked up lose their command (and are `failed`,
    /// reason `canceled`); devices that started get `mooring.update.cancel` (a device that is
    /// installing already finishes and reports truthfully).
    pub async fn cancel(&self, access: &Access, id: &str) -> ServiceResult<DeploymentView> {
        self.visible_deployment(access, id).await?;
        let d = self
            .core
            .store
            .cancel_deployment(id, self.core.now_ms())
            .await?
            .ok_or_else(|| Self::deployment_not_found(id))?;
        let mut after: Option<String> = None;
        loop {
            let page = self
                .core
                .store
                .list_updates(id, after.as_deref(), DEPLOYMENT_PAGE_LEN)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.device_id.clone());
            for u in page {
                if u.state.is_final() {
                    continue;
                }
                // Withdrawn only if its command was still queued (never sent to the device): a
                // delivered one may be starting on the device, which the cancel command below
                // stops before it installs, and which reports truthfully either way.
                let withdrawn = match (&u.command_id, u.state) {
                    (Some(cmd), UpdateState::Pending) => {
                        let queued = self
                            .commands
                            .get_command(&Access::all(), &u.device_id, cmd, None)
                            .await
                            .is_ok_and(|c| c.state == mooring_store::CommandState::Queued);
                        queued
                            && self
                                .commands
                                .cancel_command(&Access::all(), &u.device_id, cmd)
                                .await
                                .is_ok()
                    }
                    // Not sent yet (the sending stops on seeing the cancel).
                    (None, UpdateState::Pending) => true,
                    _ => false,
                };
                if withdrawn {
                    let mut failed = u.clone();
                    failed.state = UpdateState::Failed;
                    failed.reason = Some(format!(
                        "{}: the deployment was canceled before the device picked it up",
                        ota::reason::CANCELED
                    ));
                    failed.updated_at_ms = self.core.now_ms();
                    self.core.store.apply_update_report(failed).await?;
                } else {
                    let params = CancelParams {
                        v: ota::SCHEMA_VERSION,
                        deployment_id: d.id.clone(),
                    };
                    self.commands
                        .create_command(
                            &Access::all(),
                            &u.device_id,
                            NewCommand {
                                name: ota::CANCEL_COMMAND.to_owned(),
                                params: serde_json::to_value(&params)
                                    .map_err(ServiceError::internal)?,
                                // As long as the update command: a device that comes back
                                // late gets the cancel with the update.
                                ttl_secs: Some(crate::commands::TTL_SECS_MAX),
                                max_attempts: None,
                                idempotency_key: Some(format!("ota-cancel:{}", d.id)),
                                result_timeout_secs: None,
                            },
                            None,
                        )
                        .await?;
                }
            }
        }
        self.deployment(id).await
    }

    /// Deletes a deployment `access` sees, with its devices' updates (their history goes), if
    /// every device's update is final, or it is canceled and every update is final or still
    /// pending (a device that started stops at the cancel or finishes; either way its report
    /// must land); else `409 deployment_active`. Its artifact may be deleted once no other deployment names
    /// it.
    pub async fn delete_deployment(&self, access: &Access, id: &str) -> ServiceResult<()> {
        self.visible_deployment(access, id).await?;
        // A running or paused rollout's deployment goes with the rollout (the store deletes a
        // rollout with its deployment): abort the rollout first.
        let mut after: Option<String> = None;
        loop {
            let page = self
                .core
                .store
                .active_rollouts(after.as_deref(), DEPLOYMENT_PAGE_LEN)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.clone());
            if let Some(r) = page.iter().find(|r| r.deployment_id == id) {
                return Err(ServiceError::new(
                    ErrorKind::Conflict,
                    "deployment_active",
                    format!(
                        "deployment {id} carries rollout {}, which is {}: abort the rollout first",
                        r.id, r.state
                    ),
                ));
            }
        }
        match self.core.store.delete_deployment(id).await? {
            DeploymentDelete::Deleted => Ok(()),
            DeploymentDelete::NotFound => Err(Self::deployment_not_found(id)),
            DeploymentDelete::Active => Err(ServiceError::new(
                ErrorKind::Conflict,
                "deployment_active",
                format!("deployment {id} is still going: an update is not final (cancel it first or wait), or, canceled, a device that started it has not reported how it ended (wait for it; a device that never comes back goes with `mooring device delete`)"),
            )),
        }
    }

    /// A device's updates, newest first.
    pub async fn device_history(
        &self,
        access: &Access,
        device: &str,
    ) -> ServiceResult<Vec<DeviceUpdateRecord>> {
        let id = self.registry.get_device(access, device).await?.record.id;
        Ok(self
            .core
            .store
            .device_updates(id.as_str(), DEVICE_HISTORY_LEN_MAX)
            .await?)
    }

    /// A device's status report (`devices/<id>/ota/status`): stored if newer than what is
    /// stored for its deployment and that is not a final state the device reported (final is
    /// sticky). `Err(invalid)` for a malformed report, and for one that does not describe an
    /// update the server sent this device: no such update, another artifact or version (but for
    /// `failed`: a refusal names what it could read of the manifest), or
    /// `committed` with a running version that is not the update's (counted in
    /// `mooring_ota_status_reports_refused_total`); `Err(rate_limited)` past
    /// `[ota] reports_per_minute_max`.
    pub async fn on_status(&self, device: &str, payload: &[u8]) -> ServiceResult<bool> {
        self.count_report(device)?;
        let r =
            StatusReport::parse(payload).map_err(|e| ServiceError::invalid("invalid_report", e))?;
        // Stored as a signed 64-bit number: a larger one would freeze the update's state.
        if i64::try_from(r.seq).is_err() {
            return Err(ServiceError::invalid(
                "invalid_report",
                "seq is above 9223372036854775807",
            ));
        }
        let refuse = |why: String| {
            crate::metrics::Counters::inc(&self.core.counters.ota_status_reports_refused);
            ServiceError::invalid("report_refused", why)
        };
        let Some(u) = self.core.store.get_update(&r.deployment_id, device).await? else {
            return Err(refuse(format!(
                "no update of deployment {} for this device",
                r.deployment_id
            )));
        };
        // A refusal names what the device could read of the manifest (maybe nothing): the
        // deployment alone says which update failed.
        let names_other = u.artifact_id != r.artifact_id || u.version != r.version;
        if names_other && r.state != UpdateState::Failed {
            return Err(refuse(format!(
                "the report names artifact {} version {}; the update is artifact {} version {}",
                r.artifact_id, r.version, u.artifact_id, u.version
            )));
        }
        if r.state == UpdateState::Committed && r.running_version.as_deref() != Some(&u.version) {
            return Err(refuse(format!(
                "committed must report running_version {} (the update's version)",
                u.version
            )));
        }
        let event = mooring_api::EventBody::Update {
            deployment_id: r.deployment_id.clone(),
            artifact_id: r.artifact_id.clone(),
            version: r.version.clone(),
            state: r.state.as_str().to_owned(),
            reason: r.reason.clone(),
        };
        let stored = self
            .core
            .store
            .apply_update_report(DeviceUpdateRecord {
                deployment_id: r.deployment_id,
                device_id: device.to_owned(),
                artifact_id: r.artifact_id,
                version: r.version,
                command_id: None,
                state: r.state,
                reason: r.reason,
                progress_pct: r.progress_pct,
                running_version: r.running_version,
                seq: Some(r.seq),
                updated_at_ms: self.core.now_ms(),
            })
            .await?;
        if stored {
            crate::metrics::Counters::inc(&self.core.counters.ota_status_reports);
            if let Ok(id) = mooring_proto::DeviceId::parse(device) {
                self.core.events.publish(Some(&id), event);
            }
        }
        Ok(stored)
    }

    /// A device's request for a new download link: the link, or why not (code + message).
    pub async fn on_link_request(&self, device: &str, payload: &[u8]) -> ServiceResult<Link> {
        self.count_report(device)?;
        let req: LinkRequest = serde_json::from_slice(payload)
            .map_err(|e| ServiceError::invalid("invalid_request", e.to_string()))?;
        let refused = || {
            ServiceError::not_found(
                "update_not_found",
                format!(
                    "no update of artifact {} in deployment {} for this device",
                    req.artifact_id, req.deployment_id
                ),
            )
        };
        let u = self
            .core
            .store
            .get_update(&req.deployment_id, device)
            .await?
            .filter(|u| u.artifact_id == req.artifact_id)
            .ok_or_else(refused)?;
        let d = self
            .core
            .store
            .get_deployment(&u.deployment_id)
            .await?
            .ok_or_else(refused)?;
        if d.canceled_at_ms.is_some() {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "deployment_canceled",
                format!("deployment {} was canceled", d.id),
            ));
        }
        // Over only if the device said so: a `failed` the server wrote (its command failed,
        // say) yields to a device that is downloading after all.
        if u.state.is_final() && u.seq.is_some() {
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "update_over",
                format!(
                    "the update of deployment {} is over on this device ({})",
                    d.id,
                    u.state.as_str()
                ),
            ));
        }
        self.downloadable(&u.artifact_id).await?;
        let registered_at_ms = self
            .registry
            .lookup(device)
            .await?
            .ok_or_else(refused)?
            .created_at_ms;
        Ok(self.link_for(
            device,
            registered_at_ms,
            &u.artifact_id,
            self.core.config.ota.download_token_ttl_ms,
        ))
    }
}
