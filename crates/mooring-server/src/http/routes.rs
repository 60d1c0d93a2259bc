//! The route table: every HTTP route with the one [`Permission`] it needs and the audit action
//! its writes are logged as. The router is built only from this table, so a route cannot exist
//! without a declared permission; `tests/access.rs` walks every row × every role against a
//! running server.

use super::{
    accounts, api, cas, certs, commands, events, fleet, gateways, health, jobs, ota, pipeline,
    provision, rollouts, rules, tickets,
};
use crate::access::{role_allows, Permission};
use crate::app::App;
use axum::routing::{delete, get, patch, post, put, MethodRouter};
use mooring_store::Role;
use std::sync::Arc;

/// One row of the route table (without its handler).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteSpec {
    pub method: &'static str,
    /// The axum path, `{name}` for a parameter.
    pub path: &'static str,
    pub permission: Permission,
    /// What the audit log calls a write to this route (e.g. `device.create`).
    pub action: &'static str,
}

type Handler = MethodRouter<Arc<App>>;

macro_rules! row {
    ($method:ident, $path:expr, $perm:ident, $action:expr, $handler:expr) => {
        (
            RouteSpec {
                method: stringify!($method),
                path: $path,
                permission: Permission::$perm,
                action: $action,
            },
            $method($handler),
        )
    };
}

/// The table.
#[rustfmt::skip]
pub(super) fn table() -> Vec<(RouteSpec, Handler)> {
    vec![
        row!(get, "/healthz", Public, "health", super::healthz),
        row!(get, "/metrics", Public, "metrics", super::metrics),
        row!(get, "/api/v1/openapi.json", Public, "openapi", super::openapi_json),
        // People.
        row!(post, "/api/v1/auth/login", Public, "auth.login", accounts::login),
        row!(post, "/api/v1/auth/password", Public, "auth.password_set", accounts::set_password),
        row!(get, "/api/v1/auth/oidc/login", Public, "auth.oidc_begin", accounts::oidc_login),
        row!(get, "/api/v1/auth/oidc/callback", Public, "auth.oidc_login", accounts::oidc_callback),
        row!(post, "/api/v1/auth/logout", Authenticated, "auth.logout", accounts::logout),
        row!(get, "/api/v1/auth/me", Authenticated, "auth.me", accounts::me),
        row!(post, "/api/v1/users", UsersManage, "user.create", accounts::create_user),
        row!(get, "/api/v1/users", UsersManage, "user.list", accounts::list_users),
        row!(get, "/api/v1/users/{id}", UsersManage, "user.get", accounts::get_user),
        row!(patch, "/api/v1/users/{id}", UsersManage, "user.update", accounts::update_user),
        row!(delete, "/api/v1/users/{id}", UsersManage, "user.delete", accounts::delete_user),
        row!(post, "/api/v1/users/{id}/password-link", UsersManage, "user.password_link", accounts::password_link),
        // Apps and machines.
        row!(post, "/api/v1/tokens", TokensManage, "token.create", accounts::create_token),
        row!(get, "/api/v1/tokens", TokensManage, "token.list", accounts::list_tokens),
        row!(post, "/api/v1/tokens/rotate-admin", TokensManage, "token.rotate_admin", accounts::rotate_admin),
        row!(get, "/api/v1/tokens/{id}", TokensManage, "token.get", accounts::get_token),
        row!(delete, "/api/v1/tokens/{id}", TokensManage, "token.revoke", accounts::revoke_token),
        row!(get, "/api/v1/audit", AuditRead, "audit.list", accounts::list_audit),
        row!(get, "/api/v1/events", EventsRead, "events.stream", events::events),
        // Devices.
        row!(post, "/api/v1/devices", DevicesWrite, "device.create", api::create_device),
        row!(get, "/api/v1/devices", DevicesRead, "device.list", api::list_devices),
        row!(get, "/api/v1/devices/{id}", DevicesRead, "device.get", api::get_device),
        row!(delete, "/api/v1/devices/{id}", DevicesWrite, "device.delete", api::delete_device),
        row!(put, "/api/v1/devices/{id}/tags", DevicesWrite, "device.tag", commands::put_tags),
        row!(put, "/api/v1/devices/{id}/gateway", DevicesWrite, "device.attach", gateways::attach_gateway),
        row!(get, "/api/v1/devices/{id}/gateway", DevicesRead, "device.gateway", gateways::get_gateway),
        row!(delete, "/api/v1/devices/{id}/gateway", DevicesWrite, "device.detach", gateways::detach_gateway),
        row!(get, "/api/v1/devices/{id}/children", DevicesRead, "device.children", gateways::list_children),
        row!(get, "/api/v1/devices/{id}/local-key", CommandsWrite, "device.local_key", gateways::local_key),
        row!(get, "/api/v1/devices/{id}/telemetry", TelemetryRead, "telemetry.query", api::device_telemetry),
        row!(get, "/api/v1/devices/{id}/telemetry/latest", TelemetryRead, "telemetry.latest", api::device_telemetry_latest),
        // Certificates (issue 16).
        row!(get, "/api/v1/devices/{id}/certificates", DevicesRead, "cert.list", certs::device_certificates),
        row!(post, "/api/v1/devices/{id}/revoke", DevicesWrite, "device.revoke", certs::revoke_device),
        row!(post, "/api/v1/devices/{id}/certificates/rotate", DevicesWrite, "cert.rotate", certs::rotate_certificate),
        row!(get, "/api/v1/certificates", DevicesRead, "cert.expiring", certs::expiring_certificates),
        row!(post, "/api/v1/certificates/{serial}/revoke", DevicesWrite, "cert.revoke", certs::revoke_certificate),
        row!(post, "/api/v1/certificates/rotations", DevicesWrite, "cert.rotate_fleet", certs::create_rotation),
        row!(get, "/api/v1/certificates/rotations", DevicesRead, "cert.rotations", certs::list_rotations),
        row!(get, "/api/v1/certificates/rotations/{id}", DevicesRead, "cert.rotation", certs::get_rotation),
        // Registered manufacturer CAs, just-in-time registration (issue 16).
        row!(post, "/api/v1/cas", PkiManage, "ca.register", cas::register_ca),
        row!(get, "/api/v1/cas", PkiManage, "ca.list", cas::list_cas),
        row!(post, "/api/v1/cas/{id}/disable", PkiManage, "ca.disable", cas::disable_ca),
        row!(post, "/api/v1/cas/{id}/enable", PkiManage, "ca.enable", cas::enable_ca),
        // The fleet CA and its rollover.
        row!(get, "/api/v1/cas/fleet", PkiManage, "ca.fleet", cas::fleet_cas),
        row!(post, "/api/v1/cas/fleet/rollover", PkiManage, "ca.rotate_fleet", cas::begin_rollover),
        row!(post, "/api/v1/cas/fleet/retire", PkiManage, "ca.retire", cas::retire_ca),
        // Provisioning pipeline and installations.
        row!(get, "/api/v1/devices/{id}/provisioning", DevicesRead, "device.provisioning", pipeline::provisioning),
        row!(post, "/api/v1/devices/{id}/installation", InstallationsWrite, "device.install", pipeline::record_installation),
        row!(get, "/api/v1/provisioning/funnel", DevicesRead, "provisioning.funnel", pipeline::funnel),
        // Fleet statistics.
        row!(get, "/api/v1/fleet/summary", DevicesRead, "fleet.summary", fleet::summary),
        row!(get, "/api/v1/fleet/history", DevicesRead, "fleet.history", fleet::history),
        // Fleet health.
        row!(get, "/api/v1/devices/{id}/health", DevicesRead, "device.health", health::device_health),
        row!(get, "/api/v1/health", DevicesRead, "health.summary", health::summary),
        // Rules and alerts.
        row!(post, "/api/v1/rules", DevicesWrite, "rule.create", rules::create_rule),
        row!(get, "/api/v1/rules", DevicesRead, "rule.list", rules::list_rules),
        row!(get, "/api/v1/rules/{id}", DevicesRead, "rule.get", rules::get_rule),
        row!(patch, "/api/v1/rules/{id}", DevicesWrite, "rule.update", rules::update_rule),
        row!(delete, "/api/v1/rules/{id}", DevicesWrite, "rule.delete", rules::delete_rule),
        row!(get, "/api/v1/alerts", DevicesRead, "alert.list", rules::list_alerts),
        row!(get, "/api/v1/alerts/{id}", DevicesRead, "alert.get", rules::get_alert),
        row!(post, "/api/v1/alerts/{id}/acknowledge", DevicesWrite, "alert.acknowledge", rules::acknowledge_alert),
        row!(post, "/api/v1/alerts/{id}/resolve", DevicesWrite, "alert.resolve", rules::resolve_alert),
        row!(get, "/api/v1/tickets", DevicesRead, "ticket.list", tickets::list_tickets),
        row!(get, "/api/v1/tickets/{id}", DevicesRead, "ticket.get", tickets::get_ticket),
        row!(post, "/api/v1/tickets/{id}/close", DevicesWrite, "ticket.close", tickets::close_ticket),
        // Commands and shadows.
        row!(post, "/api/v1/devices/{id}/commands", CommandsWrite, "command.create", commands::create_command),
        row!(get, "/api/v1/devices/{id}/commands", CommandsRead, "command.list", commands::list_commands),
        row!(get, "/api/v1/devices/{id}/commands/{cmd}", CommandsRead, "command.get", commands::get_command),
        row!(post, "/api/v1/devices/{id}/commands/{cmd}/cancel", CommandsWrite, "command.cancel", commands::cancel_command),
        row!(post, "/api/v1/commands", CommandsWrite, "fleet_command.create", commands::create_fleet_command),
        row!(get, "/api/v1/commands/{id}", CommandsRead, "command.get", commands::get_any_command),
        row!(get, "/api/v1/devices/{id}/shadow", ShadowRead, "shadow.get", commands::get_shadow),
        row!(patch, "/api/v1/devices/{id}/shadow", ShadowWrite, "shadow.update", commands::patch_shadow),
        // Bulk actions as background jobs (action command also needs commands.write).
        row!(post, "/api/v1/jobs", DevicesWrite, "job.create", jobs::create_job),
        row!(get, "/api/v1/jobs", DevicesRead, "job.list", jobs::list_jobs),
        row!(get, "/api/v1/jobs/{id}", DevicesRead, "job.get", jobs::get_job),
        row!(get, "/api/v1/jobs/{id}/result", TelemetryRead, "job.result", jobs::get_job_result),
        row!(post, "/api/v1/reports", TelemetryRead, "report.create", jobs::create_report),
        row!(post, "/api/v1/jobs/{id}/cancel", DevicesWrite, "job.cancel", jobs::cancel_job),
        // Provisioning (issue 16): claim tokens; enrollment is Public (the claim token is the
        // credential, failures are throttled per address).
        row!(post, "/api/v1/claims", DevicesWrite, "claim.create", provision::create_claim),
        row!(get, "/api/v1/claims", DevicesRead, "claim.list", provision::list_claims),
        row!(get, "/api/v1/claims/{id}", DevicesRead, "claim.get", provision::get_claim),
        row!(delete, "/api/v1/claims/{id}", DevicesWrite, "claim.revoke", provision::revoke_claim),
        row!(post, "/api/v1/provision/enroll", Public, "provision.enroll", provision::enroll),
        // Over-the-air updates (issue 17): artifacts; the download is Public (its token, scoped
        // to one device and one artifact, is the credential); so is the update key (a public
        // key: an installer pins it into a device's config without a token).
        row!(get, "/api/v1/ota/update-key", Public, "ota.update_key", ota::update_key),
        row!(post, "/api/v1/ota/artifacts", DevicesWrite, "ota.artifact_create", ota::create_artifact),
        row!(get, "/api/v1/ota/artifacts", DevicesRead, "ota.artifact_list", ota::list_artifacts),
        row!(get, "/api/v1/ota/artifacts/{id}", DevicesRead, "ota.artifact_get", ota::get_artifact),
        row!(delete, "/api/v1/ota/artifacts/{id}", DevicesWrite, "ota.artifact_delete", ota::delete_artifact),
        row!(put, "/api/v1/ota/artifacts/{id}/content", DevicesWrite, "ota.artifact_upload", ota::put_content),
        row!(post, "/api/v1/ota/artifacts/{id}/complete", DevicesWrite, "ota.artifact_complete", ota::complete_artifact),
        row!(post, "/api/v1/ota/artifacts/{id}/links", DevicesWrite, "ota.link_create", ota::create_link),
        row!(get, "/api/v1/ota/artifacts/{id}/download", Public, "ota.download", ota::download),
        row!(post, "/api/v1/ota/deployments", DevicesWrite, "ota.deploy", ota::create_deployment),
        row!(get, "/api/v1/ota/deployments", DevicesRead, "ota.deployment_list", ota::list_deployments),
        row!(get, "/api/v1/ota/deployments/{id}", DevicesRead, "ota.deployment_get", ota::get_deployment),
        row!(delete, "/api/v1/ota/deployments/{id}", DevicesWrite, "ota.deployment_delete", ota::delete_deployment),
        row!(post, "/api/v1/ota/deployments/{id}/cancel", DevicesWrite, "ota.deployment_cancel", ota::cancel_deployment),
        // Rollouts: waves gated on fleet health.
        row!(post, "/api/v1/rollouts", DevicesWrite, "rollout.create", rollouts::create_rollout),
        row!(get, "/api/v1/rollouts", DevicesRead, "rollout.list", rollouts::list_rollouts),
        row!(get, "/api/v1/rollouts/{id}", DevicesRead, "rollout.get", rollouts::get_rollout),
        row!(get, "/api/v1/rollouts/{id}/events", DevicesRead, "rollout.events", rollouts::rollout_events),
        row!(get, "/api/v1/rollouts/{id}/stream", DevicesRead, "rollout.stream", rollouts::rollout_stream),
        row!(post, "/api/v1/rollouts/{id}/pause", DevicesWrite, "rollout.pause", rollouts::pause_rollout),
        row!(post, "/api/v1/rollouts/{id}/resume", DevicesWrite, "rollout.resume", rollouts::resume_rollout),
        row!(post, "/api/v1/rollouts/{id}/abort", DevicesWrite, "rollout.abort", rollouts::abort_rollout),
        row!(post, "/api/v1/rollouts/{id}/devices", DevicesWrite, "rollout.add_devices", rollouts::add_rollout_devices),
        row!(get, "/api/v1/devices/{id}/ota", DevicesRead, "ota.device_history", ota::device_updates),
    ]
}

/// Every route with its permission (for tests, docs and `GET /api/v1/auth/me`).
pub fn route_specs() -> Vec<RouteSpec> {
    table().into_iter().map(|(spec, _)| spec).collect()
}

/// The names of the permissions a role holds.
pub fn permissions_of(role: Role) -> Vec<String> {
    let mut perms: Vec<Permission> = route_specs()
        .into_iter()
        .map(|r| r.permission)
        .filter(|p| !matches!(p, Permission::Public) && role_allows(role, *p))
        .collect();
    perms.sort();
    perms.dedup();
    perms.into_iter().map(|p| p.as_str().to_owned()).collect()
}
