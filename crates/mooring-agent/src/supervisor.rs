//! A small Erlang-style supervisor: children are task factories, restarted on failure by strategy, with a restart-intensity limit that escalates.
//!
//! A child is a factory returning a fresh future each time it is (re)started. A child that
//! returns `Ok(())` is done and is not restarted (unless a sibling's failure restarts the group
//! under one-for-all / rest-for-one); one that returns `Err` or panics has failed (a panic is
//! caught through `JoinError::is_panic`, never unwinding into the supervisor). On a failure:
//!
//! * [`Strategy::OneForOne`]: restart only the failed child;
//! * [`Strategy::OneForAll`]: stop every other child, restart all, in declaration order;
//! * [`Strategy::RestForOne`]: stop the children declared after it, restart it and them.
//!
//! More than [`Intensity::restarts_max`] restarts within [`Intensity::period_ms`] means
//! restarting does not help: the supervisor stops every child and returns
//! [`SupervisorError::Escalated`]. Nested inside another supervisor (through
//! [`Supervisor::into_factory`]) that is a failure of the child the parent supervises; at the
//! top, the agent's `run` returns the error and the process exits non-zero so the service
//! manager (systemd) restarts it. All timing is `tokio::time`, so tests and the simulator run it
//! on a paused clock. Every child task lives in the supervisor's `JoinSet`: dropping the
//! supervisor's future aborts them all.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

/// The future a child runs.
pub type ChildFuture = Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;
/// Makes a fresh child future for each (re)start.
pub type ChildFactory = Arc<dyn Fn() -> ChildFuture + Send + Sync>;
/// Told about every child failure: (child name, error text).
pub type FailureHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Which children restart when one fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    OneForOne,
    OneForAll,
    RestForOne,
}

/// Restart intensity: at most `restarts_max` restarts within any `period_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    pub restarts_max: u32,
    pub period_ms: u64,
}

/// The supervisor gave up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    #[error("supervisor {supervisor}: child {child} failed more than {restarts_max} times within {period_ms} ms; giving up (last error: {last_error})")]
    Escalated {
        supervisor: String,
        child: String,
        restarts_max: u32,
        period_ms: u64,
        last_error: String,
    },
}

struct Child {
    name: String,
    factory: ChildFactory,
}

/// A supervisor; build it with [`Supervisor::new`] and [`Supervisor::child`], then
/// [`Supervisor::run`] it.
pub struct Supervisor {
    name: String,
    strategy: Strategy,
    intensity: Intensity,
    children: Vec<Child>,
    on_failure: Option<FailureHook>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("name", &self.name)
            .field("strategy", &self.strategy)
            .field("intensity", &self.intensity)
            .field(
                "children",
                &self.children.iter().map(|c| &c.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Supervisor {
    pub fn new(name: impl Into<String>, strategy: Strategy, intensity: Intensity) -> Self {
        assert!(intensity.period_ms > 0, "intensity period must be positive");
        Self {
            name: name.into(),
            strategy,
            intensity,
            children: Vec::new(),
            on_failure: None,
        }
    }

    /// Adds a child, started after the ones already added.
    pub fn child<F, Fut>(mut self, name: impl Into<String>, factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        self.children.push(Child {
            name: name.into(),
            factory: Arc::new(move || Box::pin(factory()) as ChildFuture),
        });
        self
    }

    /// Calls `hook` on every child failure (for logs and diagnostics).
    pub fn on_failure(mut self, hook: FailureHook) -> Self {
        self.on_failure = Some(hook);
        self
    }

    /// This supervisor as a child of another: each start runs it afresh; escalation is a
    /// failure of that child.
    pub fn into_factory(self) -> ChildFactory {
        let me = Arc::new(self);
        Arc::new(move || {
            let me = me.clone();
            Box::pin(async move {
                me.run(std::future::pending()).await?;
                Ok(())
            }) as ChildFuture
        })
    }

    /// Runs the children until all are done (`Ok`), `shutdown` completes (children are
    /// aborted and awaited, `Ok`), or the intensity limit is exceeded (`Err`).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<(), SupervisorError> {
        let n = self.children.len();
        let mut set: JoinSet<anyhow::Result<()>> = JoinSet::new();
        let mut running: HashMap<tokio::task::Id, usize> = HashMap::new();
        let mut handles: Vec<Option<AbortHandle>> = vec![None; n];
        let mut restarts: VecDeque<Instant> = VecDeque::new();
        // Exits seen while waiting for stopped children; handled next.
        let mut deferred: VecDeque<Exit> = VecDeque::new();
        let period = Duration::from_millis(self.intensity.period_ms);
        for i in 0..n {
            self.start(i, &mut set, &mut running, &mut handles);
        }
        tokio::pin!(shutdown);
        loop {
            let exit = match deferred.pop_front() {
                Some(exit) => exit,
                None => {
                    if running.is_empty() {
                        return Ok(());
                    }
                    let joined = tokio::select! {
                        () = &mut shutdown => {
                            set.shutdown().await;
                            return Ok(());
                        }
                        j = set.join_next_with_id() => j,
                    };
                    match joined {
                        Some(j) => Exit::from(j),
                        None => return Ok(()),
                    }
                }
            };
            let Some(i) = running.remove(&exit.id) else {
                continue;
            };
            handles[i] = None;
            let child = &self.children[i].name;
            let why = match exit.result {
                Ok(()) => {
                    tracing::debug!(supervisor = %self.name, %child, "child done");
                    continue;
                }
                Err(why) => why,
            };
            tracing::warn!(supervisor = %self.name, %child, error = %why, "child failed");
            if let Some(hook) = &self.on_failure {
                hook(child, &why);
            }
            let now = Instant::now();
            while restarts
                .front()
                .is_some_and(|t| now.duration_since(*t) >= period)
            {
                restarts.pop_front();
            }
            if restarts.len() >= self.intensity.restarts_max as usize {
                tracing::error!(supervisor = %self.name, %child, "restart intensity exceeded; escalating");
                set.shutdown().await;
                return Err(SupervisorError::Escalated {
                    supervisor: self.name.clone(),
                    child: child.clone(),
                    restarts_max: self.intensity.restarts_max,
                    period_ms: self.intensity.period_ms,
                    last_error: why,
                });
            }
            restarts.push_back(now);
            let group: Vec<usize> = match self.strategy {
                Strategy::OneForOne => vec![i],
                Strategy::OneForAll => (0..n).collect(),
                Strategy::RestForOne => (i..n).collect(),
            };
            // Stop the rest of the group and wait until each has ended.
            let mut stopping: HashSet<tokio::task::Id> = HashSet::new();
            for &j in &group {
                if let Some(h) = handles[j].take() {
                    h.abort();
                    stopping.insert(h.id());
                }
            }
            while !stopping.is_empty() {
                let Some(j) = set.join_next_with_id().await else {
                    break;
                };
                let exit = Exit::from(j);
                if stopping.remove(&exit.id) {
                    running.remove(&exit.id);
                } else {
                    deferred.push_back(exit);
                }
            }
            for &j in &group {
                tracing::info!(supervisor = %self.name, child = %self.children[j].name, "restarting child");
                self.start(j, &mut set, &mut running, &mut handles);
            }
        }
    }

    fn start(
        &self,
        i: usize,
        set: &mut JoinSet<anyhow::Result<()>>,
        running: &mut HashMap<tokio::task::Id, usize>,
        handles: &mut [Option<AbortHandle>],
    ) {
        let fut = (self.children[i].factory)();
        let h = set.spawn(fut);
        running.insert(h.id(), i);
        handles[i] = Some(h);
    }
}

/// How one child task ended.
struct Exit {
    id: tokio::task::Id,
    result: Result<(), String>,
}

impl From<Result<(tokio::task::Id, anyhow::Result<()>), tokio::task::JoinError>> for Exit {
    fn from(j: Result<(tokio::task::Id, anyhow::Result<()>), tokio::task::JoinError>) -> Self {
        match j {
            Ok((id, r)) => Exit {
                id,
                result: r.map_err(|e| format!("{e:#}")),
            },
            Err(e) => {
                let id = e.id();
                let why = if e.is_panic() {
                    format!("panicked: {}", panic_text(e.try_into_panic().ok()))
                } else {
                    "cancelled".to_owned()
                };
                Exit {
                    id,
                    result: Err(why),
                }
            }
        }
    }
}

fn panic_text(p: Option<Box<dyn std::any::Any + Send>>) -> String {
    match p {
        Some(p) => match p.downcast::<String>() {
            Ok(s) => *s,
            Err(p) => match p.downcast::<&'static str>() {
                Ok(s) => (*s).to_owned(),
                Err(_) => "non-string panic payload".to_owned(),
            },
        },
        None => "unknown".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn intensity(restarts_max: u32, period_ms: u64) -> Intensity {
        Intensity {
            restarts_max,
            period_ms,
        }
    }

    /// A child that counts its starts and fails (by panicking, or with an error) on its first
    /// `fail_times` starts after `after_ms`, then runs until stopped.
    fn flaky(
        starts: Arc<AtomicU32>,
        fail_times: u32,
        after_ms: u64,
        panic: bool,
    ) -> impl Fn() -> ChildFuture + Send + Sync + 'static {
        move || {
            let n = starts.fetch_add(1, Ordering::SeqCst) + 1;
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(after_ms)).await;
                if n <= fail_times {
                    if panic {
                        panic!("injected panic {n}");
                    }
                    anyhow::bail!("injected failure {n}");
                }
                std::future::pending::<()>().await;
                Ok(())
            })
        }
    }

    fn counters(n: usize) -> Vec<Arc<AtomicU32>> {
        (0..n).map(|_| Arc::new(AtomicU32::new(0))).collect()
    }

    fn starts(c: &[Arc<AtomicU32>]) -> Vec<u32> {
        c.iter().map(|c| c.load(Ordering::SeqCst)).collect()
    }

    /// Runs `sup` for `secs` of (virtual) time, then shuts it down.
    async fn run_for(sup: &Supervisor, secs: u64) -> Result<(), SupervisorError> {
        sup.run(tokio::time::sleep(Duration::from_secs(secs))).await
    }

    #[tokio::test(start_paused = true)]
    async fn one_for_one_restarts_only_the_failed_child_and_catches_panics() {
        let c = counters(3);
        let failures = Arc::new(AtomicU32::new(0));
        let f = failures.clone();
        let sup = Supervisor::new("t", Strategy::OneForOne, intensity(5, 60_000))
            .child("a", flaky(c[0].clone(), 0, 0, false))
            .child("b", flaky(c[1].clone(), 2, 100, true))
            .child("c", flaky(c[2].clone(), 0, 0, false))
            .on_failure(Arc::new(move |child, why| {
                assert_eq!(child, "b");
                assert!(why.contains("injected panic"), "{why}");
                f.fetch_add(1, Ordering::SeqCst);
            }));
        assert_eq!(run_for(&sup, 10).await, Ok(()));
        assert_eq!(starts(&c), vec![1, 3, 1]);
        assert_eq!(failures.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn one_for_all_restarts_every_child() {
        let c = counters(3);
        let sup = Supervisor::new("t", Strategy::OneForAll, intensity(5, 60_000))
            .child("a", flaky(c[0].clone(), 0, 0, false))
            .child("b", flaky(c[1].clone(), 1, 100, false))
            .child("c", flaky(c[2].clone(), 0, 0, false));
        assert_eq!(run_for(&sup, 10).await, Ok(()));
        assert_eq!(starts(&c), vec![2, 2, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn rest_for_one_restarts_the_failed_child_and_those_after_it() {
        let c = counters(3);
        let sup = Supervisor::new("t", Strategy::RestForOne, intensity(5, 60_000))
            .child("a", flaky(c[0].clone(), 0, 0, false))
            .child("b", flaky(c[1].clone(), 1, 100, true))
            .child("c", flaky(c[2].clone(), 0, 0, false));
        assert_eq!(run_for(&sup, 10).await, Ok(()));
        assert_eq!(starts(&c), vec![1, 2, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn too_many_restarts_in_the_period_escalate() {
        let c = counters(2);
        let sup = Supervisor::new("top", Strategy::OneForOne, intensity(3, 10_000))
            .child("ok", flaky(c[0].clone(), 0, 0, false))
            .child("crashy", flaky(c[1].clone(), u32::MAX, 1_000, true));
        let err = run_for(&sup, 3600).await.expect_err("escalates");
        let SupervisorError::Escalated {
            supervisor, child, ..
        } = &err;
        assert_eq!((supervisor.as_str(), child.as_str()), ("top", "crashy"));
        // Three restarts allowed; the fourth failure escalates.
        assert_eq!(starts(&c), vec![1, 4]);
        assert!(err.to_string().contains("injected panic"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_spread_out_over_time_do_not_escalate() {
        let c = counters(1);
        // One failure every 6 s, limit 1 restart per 5 s: never exceeded.
        let sup = Supervisor::new("t", Strategy::OneForOne, intensity(1, 5_000))
            .child("slow-crash", flaky(c[0].clone(), 20, 6_000, false));
        assert_eq!(run_for(&sup, 600).await, Ok(()));
        assert_eq!(starts(&c), vec![21]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_escalating_child_supervisor_is_restarted_by_its_parent() {
        let c = counters(2);
        let inner = Supervisor::new("inner", Strategy::OneForOne, intensity(1, 60_000))
            .child("crashy", flaky(c[0].clone(), 4, 100, false));
        let inner_factory = inner.into_factory();
        let outer = Supervisor::new("outer", Strategy::OneForOne, intensity(5, 60_000))
            .child("inner", move || inner_factory())
            .child("sibling", flaky(c[1].clone(), 0, 0, false));
        assert_eq!(run_for(&outer, 60).await, Ok(()));
        // Inner runs 1: crash, restart, crash → escalates; run 2 the same; run 3: 5th start is fine.
        assert_eq!(starts(&c), vec![5, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn children_that_finish_are_not_restarted() {
        let n = Arc::new(AtomicU32::new(0));
        let n2 = n.clone();
        let sup = Supervisor::new("t", Strategy::OneForOne, intensity(1, 1_000)).child(
            "once",
            move || {
                n2.fetch_add(1, Ordering::SeqCst);
                async { Ok(()) }
            },
        );
        assert_eq!(sup.run(std::future::pending()).await, Ok(()));
        assert_eq!(n.load(Ordering::SeqCst), 1);
    }
}
