//! Test doubles and a raw MQTT client for tests (feature `test-support`, for dev-dependencies only).
//!
//! [`AllowAll`] is the one allow-everything [`Hooks`]: tests that are not about policy use it
//! instead of writing their own. Hooks that refuse something (the subject of a test) stay in
//! that test.
//!
//! [`raw3`] is the byte-level MQTT 3.1.1 client tests use when they must decide exactly what is
//! sent and when anything is acknowledged (the broker's tests in memory, mooring's over TCP).

pub mod raw3;

use crate::{Authenticated, ConnectRefusal, ConnectRequest, Hooks, Message, PublishVerdict};
use mooring_proto::policy::Principal;
use mooring_proto::sync::lock;
use std::collections::BTreeMap;
use std::sync::Mutex;
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

/// Accepts every CONNECT (with the client's own id), allows every publish and subscription and
/// accepts every message. Built with [`AllowAll::new`] every client is the dev principal; see
/// [`AllowAll::as_devices`] and [`AllowAll::recording`] for the variants.
#[derive(Default)]
pub struct AllowAll {
    as_devices: bool,
    recording: bool,
    published: Mutex<Vec<Message>>,
    changed: Notify,
}

impl AllowAll {
    /// Every client is [`Principal::Dev`]; nothing is recorded.
    pub fn new() -> Self {
        Self::default()
    }

    /// Client id `<device>[.<anything>]` authenticates as device `<device>` (no tags), so one
    /// device can hold several sessions.
    pub fn as_devices(mut self) -> Self {
        self.as_devices = true;
        self
    }

    /// Keeps every accepted publish, in order ([`AllowAll::published`]) and wakes
    /// [`AllowAll::changed`] after each. Unbounded: for tests, not benchmarks.
    pub fn recording(mut self) -> Self {
        self.recording = true;
        self
    }

    /// The publishes accepted so far (empty unless [`AllowAll::recording`]).
    pub fn published(&self) -> Vec<Message> {
        lock(&self.published).clone()
    }

    /// Completes after the next recorded publish. Create it before checking
    /// [`AllowAll::published`], then await it, so no publish is missed in between.
    pub fn changed(&self) -> Notified<'_> {
        self.changed.notified()
    }
}

#[async_trait::async_trait]
impl Hooks for AllowAll {
    async fn authenticate(&self, req: ConnectRequest<'_>) -> Result<Authenticated, ConnectRefusal> {
        let principal = if self.as_devices {
            let device = req.client_id.split('.').next().unwrap_or_default();
            Principal::Device {
                id: mooring_proto::DeviceId::parse(device)
                    .map_err(|_| ConnectRefusal::BadClientId)?,
                tags: BTreeMap::new(),
            }
        } else {
            Principal::Dev
        };
        Ok(Authenticated {
            client_id: req.client_id.to_string(),
            principal,
        })
    }

    fn may_publish(&self, _: &Principal, _: &str) -> bool {
        true
    }

    fn may_subscribe(&self, _: &Principal, _: &str) -> bool {
        true
    }

    async fn on_publish(&self, _: &Principal, _: &str, msg: &Message) -> PublishVerdict {
        if self.recording {
            lock(&self.published).push(msg.clone());
            self.changed.notify_waiters();
        }
        PublishVerdict::Accept
    }

    fn on_connected(&self, _: &str, _: &Principal) {}

    fn on_disconnected(&self, _: &str, _: &Principal) {}
}
