//! Test harness: a real `mooring_broker::Broker` served over in-memory streams with the broker's
//! `AllowAll` hooks (recording), a connector the test can cut, a clock on tokio's (paused)
//! timeline, and an agent the test can start and stop.
#![allow(dead_code)]

use mooring_agent::{AgentConfig, AgentDeps, Connector, Handlers, MemStore, Stream};
use mooring_broker::test_support::AllowAll;
use mooring_broker::{Broker, BrokerConfig, ConnInfo, ListenerKind, Message};
use mooring_proto::{Clock, DeviceId};
use serde_json::Value;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

/// Unix ms at virtual time zero.
pub const EPOCH_MS: u64 = 1_800_000_000_000;
/// Bound on any wait, in (virtual) seconds.
pub const WAIT_SECS_MAX: u64 = 600;

/// "Now" = EPOCH_MS + time elapsed on tokio's clock (virtual when paused).
pub struct TokioClock {
    start: tokio::time::Instant,
}

impl TokioClock {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: tokio::time::Instant::now(),
        })
    }
}

impl Clock for TokioClock {
    fn now_ms(&self) -> u64 {
        EPOCH_MS + self.start.elapsed().as_millis() as u64
    }
}

/// Opens in-memory connections served by the broker; `set_online(false)` refuses new ones and
/// `cut()` drops the live ones.
pub struct MemConnector {
    pub broker: Broker,
    online: AtomicBool,
    /// The splices between agent and broker (what `cut` aborts).
    conns: Mutex<JoinSet<()>>,
    /// The broker's side of each connection.
    servers: Mutex<JoinSet<()>>,
}

impl MemConnector {
    pub fn new(broker: Broker) -> Arc<Self> {
        Arc::new(Self {
            broker,
            online: AtomicBool::new(true),
            conns: Mutex::new(JoinSet::new()),
            servers: Mutex::new(JoinSet::new()),
        })
    }

    pub fn set_online(&self, online: bool) {
        self.online.store(online, Ordering::SeqCst);
    }

    pub fn cut(&self) {
        self.conns.lock().expect("conns lock").abort_all();
    }
}

#[async_trait::async_trait]
impl Connector for MemConnector {
    async fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        if !self.online.load(Ordering::SeqCst) {
            return Err(std::io::ErrorKind::ConnectionRefused.into());
        }
        // agent <-> splice (ours, abortable) <-> broker: aborting the splice closes both ends.
        let (client, mut near) = tokio::io::duplex(64 * 1024);
        let (mut far, server) = tokio::io::duplex(64 * 1024);
        let broker = self.broker.clone();
        let info = ConnInfo {
            peer: None,
            cert_identity: None,
            cert_sha256: None,
            cert_der: None,
            listener: ListenerKind::Dev,
        };
        {
            let mut servers = self.servers.lock().expect("servers lock");
            while servers.try_join_next().is_some() {}
            servers.spawn(async move { broker.serve_connection(server, info).await });
        }
        let mut conns = self.conns.lock().expect("conns lock");
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut near, &mut far).await;
        });
        Ok(Box::new(client))
    }

    fn describe(&self) -> String {
        "in-memory broker".into()
    }
}

/// A broker, its hooks and a connector to it.
pub struct World {
    pub broker: Broker,
    /// Allows everything and records every publish.
    pub hooks: Arc<AllowAll>,
    pub connector: Arc<MemConnector>,
    pub clock: Arc<TokioClock>,
}

impl World {
    /// JSON payloads of the messages published on `topic`, in order.
    pub fn on(&self, topic: &str) -> Vec<Value> {
        self.hooks
            .published()
            .iter()
            .filter(|m| m.topic == topic)
            .map(|m| serde_json::from_slice(&m.payload).unwrap_or(Value::Null))
            .collect()
    }

    /// Waits (bounded, on tokio's clock) until `cond` holds, checking after each recorded publish.
    pub async fn wait_for(&self, what: &str, cond: impl Fn(&World) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(WAIT_SECS_MAX);
        loop {
            let changed = self.hooks.changed();
            if cond(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!("timed out waiting for {what}");
            }
        }
    }

    pub fn new() -> Self {
        let hooks = Arc::new(AllowAll::new().recording());
        let broker = Broker::new(BrokerConfig::default(), hooks.clone());
        Self {
            connector: MemConnector::new(broker.clone()),
            broker,
            hooks,
            clock: TokioClock::new(),
        }
    }

    pub fn deps(&self, id: &DeviceId, store: &MemStore, handlers: Handlers) -> AgentDeps {
        let mut deps = AgentDeps::new(
            id.clone(),
            self.connector.clone(),
            Box::new(store.clone()),
            self.clock.clone(),
        );
        deps.rng_seed = 7;
        deps.handlers = handlers;
        deps
    }

    /// Publishes a message as the server would (QoS 1).
    pub fn publish(&self, topic: &str, payload: &[u8], retain: bool) {
        self.broker
            .publish(Message::new(topic, payload.to_vec(), 1, retain));
    }
}

/// A config for in-memory runs: no host metrics unless asked, nothing from files.
pub fn config(interval_secs: u64) -> AgentConfig {
    AgentConfig {
        interval_secs,
        ..AgentConfig::new("sim", 1, "-", "-", "-", "-")
    }
}

/// A running agent.
pub struct Agent {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    pub fn start(deps: AgentDeps, config: AgentConfig) -> Self {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(mooring_agent::run_with(deps, config, async {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            task,
        }
    }

    /// Clean shutdown; returns what `run_with` returned.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        within("the agent to stop", &mut self.task)
            .await
            .map_err(|e| anyhow::anyhow!("agent task: {e}"))?
    }

    /// Waits (bounded) for the agent to end on its own.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        within("the agent to end", &mut self.task)
            .await
            .map_err(|e| anyhow::anyhow!("agent task: {e}"))?
    }

    /// Kill: the task is aborted wherever it is (no goodbye, no flush).
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(WAIT_SECS_MAX), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

pub fn device(id: &str) -> DeviceId {
    DeviceId::parse(id).expect("valid device id")
}
