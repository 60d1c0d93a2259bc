//! Device shadows: desired state from the API, reported state from the device, and the delta
//! published retained on `devices/<id>/shadow/delta`.
//!
//! Every change (a desired patch, a reported update that changes something) bumps `version` and
//! is stored before it is answered or published. After each change the server publishes the
//! delta, retained, QoS 1: `ShadowDelta {version, delta}` while desired and reported differ, and
//! an empty retained message (which clears the retained delta) once they agree. At startup the
//! retained deltas of every out-of-sync shadow are published again (retained messages live in the
//! broker's memory).

use crate::access::Access;
use crate::app::Core;
use crate::error::{ErrorKind, ServiceError, ServiceResult};
use crate::metrics::Counters;
use crate::registry::Registry;
use mooring_broker::Message;
use mooring_proto::shadow::{self, ShadowDelta, SHADOW_SIZE_BYTES_MAX};
use mooring_proto::{DeviceId, Topic};
use mooring_store::ShadowRecord;
use serde_json::{Map, Value};
use std::sync::Arc;

/// Shadows read per store call when republishing deltas at startup.
pub const REPUBLISH_PAGE_LEN: usize = 1000;

/// A shadow as the API shows it.
#[derive(Debug, Clone)]
pub struct ShadowView {
    pub desired: Map<String, Value>,
    pub reported: Map<String, Value>,
    pub version: u64,
    pub delta: Map<String, Value>,
}

impl From<ShadowRecord> for ShadowView {
    fn from(r: ShadowRecord) -> Self {
        ShadowView {
            delta: shadow::delta(&r.desired, &r.reported),
            desired: r.desired,
            reported: r.reported,
            version: r.version,
        }
    }
}

fn check_document(what: &str, doc: &Map<String, Value>) -> ServiceResult<()> {
    let len = serde_json::to_vec(doc).map_or(usize::MAX, |v| v.len());
    if len > SHADOW_SIZE_BYTES_MAX {
        return Err(ServiceError::invalid(
            "shadow_too_large",
            format!("{what} would be {len} bytes; at most {SHADOW_SIZE_BYTES_MAX}"),
        ));
    }
    shadow::check_depth(&Value::Object(doc.clone()), 0)
        .map_err(|e| ServiceError::invalid("shadow_too_deep", format!("{what}: {e}")))
}

/// The shadow service: the shadow store and the lock that orders changes to it.
pub struct Shadows {
    core: Arc<Core>,
    registry: Arc<Registry>,
    /// One change at a time: read, merge, compare-and-set, publish.
    lock: tokio::sync::Mutex<()>,
}

impl Shadows {
    pub(crate) fn new(core: Arc<Core>, registry: Arc<Registry>) -> Self {
        Self {
            core,
            registry,
            lock: tokio::sync::Mutex::new(()),
        }
    }

    async fn load_shadow(&self, device_id: &DeviceId) -> ServiceResult<ShadowRecord> {
        Ok(self
            .core
            .store
            .get_shadow(device_id)
            .await?
            .unwrap_or_else(|| ShadowRecord::empty(device_id.clone())))
    }

    pub async fn get(&self, access: &Access, id: &str) -> ServiceResult<ShadowView> {
        let device = self.registry.get_device(access, id).await?;
        Ok(self.load_shadow(&device.record.id).await?.into())
    }

    /// Merges `patch` (JSON merge patch) into desired. With `if_match`, only if the shadow is
    /// still at that version (`412 version_mismatch` otherwise).
    pub async fn patch_desired(
        &self,
        access: &Access,
        id: &str,
        patch: Value,
        if_match: Option<u64>,
    ) -> ServiceResult<ShadowView> {
        let device = self.registry.get_device(access, id).await?;
        let Value::Object(patch) = patch else {
            return Err(ServiceError::invalid(
                "invalid_shadow",
                "desired must be a JSON object (a merge patch)",
            ));
        };
        check_document("the patch", &patch)?;
        let _guard = self.lock.lock().await;
        let current = self.load_shadow(&device.record.id).await?;
        if let Some(v) = if_match {
            if v != current.version {
                return Err(ServiceError::new(
                    ErrorKind::PreconditionFailed,
                    "version_mismatch",
                    format!("shadow is at version {}, not {v}", current.version),
                ));
            }
        }
        let mut next = current.clone();
        shadow::merge(&mut next.desired, &patch);
        check_document("desired", &next.desired)?;
        if next.desired == current.desired {
            return Ok(current.into());
        }
        self.save_and_publish(current, next).await.map(Into::into)
    }

    /// A reported update from the device (merge patch). `Err` if the store failed.
    pub async fn on_reported(&self, device_id: &DeviceId, payload: &[u8]) -> ServiceResult<bool> {
        let patch = match shadow::parse_update(payload) {
            Ok(p) => p,
            Err(e) => {
                tracing::info!(device = %device_id, error = %e, "invalid shadow report refused");
                return Ok(false);
            }
        };
        let _guard = self.lock.lock().await;
        let current = self.load_shadow(device_id).await?;
        let mut next = current.clone();
        shadow::merge(&mut next.reported, &patch);
        if check_document("reported", &next.reported).is_err() {
            return Ok(false);
        }
        Counters::inc(&self.core.counters.shadow_reports);
        if next.reported != current.reported {
            self.save_and_publish(current, next).await?;
        }
        Ok(true)
    }

    async fn save_and_publish(
        &self,
        current: ShadowRecord,
        mut next: ShadowRecord,
    ) -> ServiceResult<ShadowRecord> {
        next.version = current.version + 1;
        next.updated_at_ms = self.core.now_ms();
        if !self
            .core
            .store
            .save_shadow(next.clone(), current.version)
            .await?
        {
            return Err(ServiceError::new(
                ErrorKind::PreconditionFailed,
                "version_mismatch",
                "the shadow changed concurrently; read it again",
            ));
        }
        self.core.events.publish(
            Some(&next.device_id),
            mooring_api::EventBody::Shadow {
                desired: next.desired.clone(),
                reported: next.reported.clone(),
                version: next.version,
            },
        );
        let before = shadow::delta(&current.desired, &current.reported);
        let after = shadow::delta(&next.desired, &next.reported);
        if before != after || !after.is_empty() {
            self.publish_delta(&next);
        }
        Ok(next)
    }

    /// Publishes the retained delta of `s` (or clears it when in sync).
    fn publish_delta(&self, s: &ShadowRecord) {
        let Some(broker) = self.core.broker() else {
            return;
        };
        let id = &s.device_id;
        let delta = shadow::delta(&s.desired, &s.reported);
        let payload = if delta.is_empty() {
            Vec::new()
        } else {
            ShadowDelta {
                version: s.version,
                delta: Value::Object(delta),
            }
            .to_bytes()
        };
        broker.publish(Message::new(Topic::shadow_delta(id), payload, 1, true));
    }

    /// Publishes the retained delta of every out-of-sync shadow (at startup).
    pub async fn republish_deltas(&self) -> ServiceResult<usize> {
        let mut after: Option<String> = None;
        let mut published = 0;
        loop {
            let page = self
                .core
                .store
                .list_shadows(REPUBLISH_PAGE_LEN, after.as_deref())
                .await?;
            for s in &page {
                if !shadow::delta(&s.desired, &s.reported).is_empty() {
                    self.publish_delta(s);
                    published += 1;
                }
            }
            if page.len() < REPUBLISH_PAGE_LEN {
                return Ok(published);
            }
            after = page.last().map(|s| s.device_id.to_string());
        }
    }
}
