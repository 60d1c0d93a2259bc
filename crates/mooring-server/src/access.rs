//! Who may do what (issue 14): the permissions each role grants, and the device scope a user or
//! token may be limited to.
//!
//! Every API route declares one [`Permission`] in the route table (`http/routes.rs`); the HTTP
//! layer checks it against the caller's [`Role`] before the handler runs. The *scope* (a fleet
//! selector such as `tag:customer=acme`) is enforced by the services themselves: each service
//! method that reads or acts on devices takes an [`Access`] and answers "not found" for a device
//! outside it (so a scoped caller cannot even learn that a device exists), and a selector it is
//! given is narrowed to the scope.

use crate::error::{ServiceError, ServiceResult};
use mooring_proto::selector::{DeviceFacts, Selector, Term};
use mooring_store::{DeviceRecord, Role};
use std::sync::Arc;

/// What a route needs. Declared once per route in the route table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Permission {
    /// No credentials needed (health, metrics, the OpenAPI document, logging in).
    Public,
    /// Any authenticated caller (who am I, log out).
    Authenticated,
    /// Read devices, their tags and presence.
    DevicesRead,
    /// Create, tag and delete devices.
    DevicesWrite,
    /// Read telemetry.
    TelemetryRead,
    /// Read commands.
    CommandsRead,
    /// Send and cancel commands.
    CommandsWrite,
    /// Read shadows.
    ShadowRead,
    /// Change desired state.
    ShadowWrite,
    /// Subscribe to live events (what they show is limited by the read permissions and scope).
    EventsRead,
    /// Record installations (the provisioning issue adds the routes).
    InstallationsWrite,
    /// Create, list and revoke API tokens.
    TokensManage,
    /// Create, change and delete users.
    UsersManage,
    /// Read the audit log.
    AuditRead,
    /// Register, list, enable and disable manufacturer CAs (admins only: a registered CA can
    /// register devices).
    PkiManage,
}

impl Permission {
    pub fn as_str(self) -> &'static str {
        match self {
            Permission::Public => "public",
            Permission::Authenticated => "authenticated",
            Permission::DevicesRead => "devices.read",
            Permission::DevicesWrite => "devices.write",
            Permission::TelemetryRead => "telemetry.read",
            Permission::CommandsRead => "commands.read",
            Permission::CommandsWrite => "commands.write",
            Permission::ShadowRead => "shadow.read",
            Permission::ShadowWrite => "shadow.write",
            Permission::EventsRead => "events.read",
            Permission::InstallationsWrite => "installations.write",
            Permission::TokensManage => "tokens.manage",
            Permission::UsersManage => "users.manage",
            Permission::AuditRead => "audit.read",
            Permission::PkiManage => "pki.manage",
        }
    }
}

/// The one table of which role holds which permission.
pub fn role_allows(role: Role, permission: Permission) -> bool {
    use Permission as P;
    let read = matches!(
        permission,
        P::Public
            | P::Authenticated
            | P::DevicesRead
            | P::TelemetryRead
            | P::CommandsRead
            | P::ShadowRead
            | P::EventsRead
    );
    match role {
        Role::Admin => true,
        Role::Operator => {
            read || matches!(
                permission,
                P::DevicesWrite | P::CommandsWrite | P::ShadowWrite | P::InstallationsWrite
            )
        }
        Role::Installer => read || permission == P::InstallationsWrite,
        Role::Viewer | Role::Service => read,
    }
}

/// Which devices a caller reaches: all, or those matching its scope selector.
#[derive(Debug, Clone, Default)]
pub struct Access {
    scope: Option<Arc<Selector>>,
}

impl Access {
    /// Every device (admins, unscoped callers, the server's own work).
    pub fn all() -> Self {
        Self { scope: None }
    }

    /// Only the devices matching `scope` (see [`parse_scope`]).
    pub fn scoped(scope: Selector) -> Self {
        Self {
            scope: Some(Arc::new(scope)),
        }
    }

    pub fn scope(&self) -> Option<&Selector> {
        self.scope.as_deref()
    }

    /// Whether the device is inside the scope.
    pub fn sees(&self, device: &DeviceRecord) -> bool {
        self.sees_facts(device.id.as_str(), &device.tags)
    }

    /// Whether a device with this id and these tags is inside the scope.
    pub fn sees_facts(&self, id: &str, tags: &std::collections::BTreeMap<String, String>) -> bool {
        self.scope.as_deref().is_none_or(|s| {
            s.matches(&DeviceFacts {
                id,
                tags,
                online: false,
                version: None,
            })
        })
    }

    /// `selector` narrowed to the scope (`None` and unscoped: everything).
    /// What a caller asks for with an optional selector text (`?selector=`): parsed, narrowed
    /// to the scope; every device it reaches when absent.
    pub fn selection(&self, selector: Option<&str>) -> ServiceResult<Selector> {
        let sel = selector.map(crate::commands::parse_selector).transpose()?;
        Ok(self.narrow(sel).unwrap_or(Selector { terms: Vec::new() }))
    }

    pub fn narrow(&self, selector: Option<Selector>) -> Option<Selector> {
        match (selector, self.scope.as_deref()) {
            (s, None) => s,
            (None, Some(scope)) => Some(scope.clone()),
            (Some(mut s), Some(scope)) => {
                s.terms.extend(scope.terms.iter().cloned());
                Some(s)
            }
        }
    }
}

/// Parses a scope: a fleet selector made only of `tag:` and `id:` terms. `online` and
/// `version=` are refused: a scope must not change with what a device reports or whether it
/// is connected.
pub fn parse_scope(text: &str) -> ServiceResult<Selector> {
    let sel = Selector::parse(text).map_err(|e| {
        ServiceError::invalid("invalid_scope", format!("scope {text:?} is not valid: {e}"))
    })?;
    if sel
        .terms
        .iter()
        .any(|t| matches!(t, Term::Online | Term::Version(_)))
    {
        return Err(ServiceError::invalid(
            "invalid_scope",
            "a scope may only use tag: and id: terms (online and version= change with the device)",
        ));
    }
    Ok(sel)
}

/// The role and scope (as stored: the parsed selector's text) that `principal` holds now: a
/// user (an email) must exist and be enabled, a token (its id) exist, unrevoked and unexpired.
/// `Err` says why it holds none. Work that outlives its request (jobs, rules) re-checks its
/// creator with this, so it stops when the creator could no longer start it.
pub(crate) async fn principal_now(
    store: &dyn mooring_store::Store,
    principal: &str,
    now_ms: u64,
) -> ServiceResult<Result<(Role, Option<String>), String>> {
    let (role, scope) = if principal.contains('@') {
        match store.find_user_by_email(principal).await? {
            Some(u) if !u.disabled => (u.role, u.scope),
            Some(_) => return Ok(Err(format!("{principal} was disabled"))),
            None => return Ok(Err(format!("{principal} was deleted"))),
        }
    } else {
        match store.get_token(principal).await? {
            Some(t) if !t.is_live(now_ms) => return Ok(Err(format!("token {principal} expired"))),
            Some(t) => (t.role, t.scope),
            None => return Ok(Err(format!("token {principal} was revoked"))),
        }
    };
    let scope = scope.map(|s| Selector::parse(&s).map_or(s, |sel| sel.to_string()));
    Ok(Ok((role, scope)))
}

/// The access of a stored scope text (already validated when it was stored). A stored scope
/// that no longer parses grants no device rather than every device.
pub fn access_of(scope: Option<&str>) -> Access {
    match scope {
        None => Access::all(),
        Some(text) => match parse_scope(text) {
            Ok(sel) => Access::scoped(sel),
            Err(_) => {
                tracing::warn!(scope = %text, "a stored scope does not parse; it reaches no device");
                Access::scoped(Selector {
                    terms: vec![Term::Ids(Vec::new())],
                })
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_holds_every_permission_and_readers_only_read() {
        for p in [
            Permission::DevicesWrite,
            Permission::TokensManage,
            Permission::UsersManage,
            Permission::AuditRead,
        ] {
            assert!(role_allows(Role::Admin, p));
            assert!(!role_allows(Role::Viewer, p));
            assert!(!role_allows(Role::Service, p));
            assert!(!role_allows(Role::Installer, p));
        }
        assert!(role_allows(Role::Operator, Permission::CommandsWrite));
        assert!(!role_allows(Role::Operator, Permission::TokensManage));
        assert!(role_allows(Role::Installer, Permission::InstallationsWrite));
        assert!(!role_allows(Role::Installer, Permission::CommandsWrite));
    }

    #[test]
    fn scopes_refuse_terms_that_change_with_the_device() {
        assert!(parse_scope("tag:customer=acme and id:a,b").is_ok());
        assert!(parse_scope("online").is_err());
        assert!(parse_scope("tag:a=b and version=1.0").is_err());
        assert!(parse_scope("").is_err());
        let a = access_of(Some("tag:customer=acme"));
        let mut tags = std::collections::BTreeMap::new();
        assert!(!a.sees_facts("x", &tags));
        tags.insert("customer".to_owned(), "acme".to_owned());
        assert!(a.sees_facts("x", &tags));
        assert!(access_of(None).sees_facts("x", &Default::default()));
        assert!(!access_of(Some("online")).sees_facts("x", &tags));
        let narrowed = a.narrow(Some(Selector::parse("online").expect("sel")));
        assert_eq!(
            narrowed.map(|s| s.to_string()).as_deref(),
            Some("online and tag:customer=acme")
        );
    }
}
