//! Group commit for the broker's durable state: ops from many connections, one transaction per batch.
//!
//! [`BrokerStateWriter::submit`] queues ops in submission order and returns a ticket that is
//! answered once they are durable; one task takes everything queued (up to `batch_ops_max` ops),
//! applies it with one [`BrokerStateStore::apply_broker_ops`] (one transaction, one fsync), then
//! answers every ticket. Order is what makes it correct: a `DeleteMessage` submitted after the
//! `PutMessage` of the same message is applied after it, in the same batch or a later one.
//!
//! The queue is unbounded in length but not in practice: everything in it was submitted by the
//! broker for state it holds within its own bounds (a session queue, the retained table, the
//! inflight window), and the connection that waits for durability stops reading its client
//! while it waits. `queued_ops` is exported as a gauge.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::error::{Result, StoreError};
use crate::model::BrokerOp;
use crate::store::BrokerStateStore;
use crate::writer::FAILED_BATCH_LOG_INTERVAL;

/// Most ops applied by one transaction.
pub const BROKER_BATCH_OPS_MAX: usize = 4096;

type Request = (Vec<BrokerOp>, Option<oneshot::Sender<Result<()>>>);

/// Counters for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BrokerWriterStats {
    /// Transactions written.
    pub batches: u64,
    /// Ops applied.
    pub ops: u64,
    /// Transactions that failed (their tickets were answered with the error).
    pub batches_failed: u64,
    /// Ops submitted and not yet applied (gauge).
    pub queued_ops: usize,
}

#[derive(Default)]
struct Counters {
    batches: AtomicU64,
    ops: AtomicU64,
    batches_failed: AtomicU64,
    queued_ops: AtomicUsize,
}

/// Handle to the broker-state writer task; clone freely. The task stops once every clone is
/// dropped and the queue is drained.
#[derive(Clone)]
pub struct BrokerStateWriter {
    tx: mpsc::UnboundedSender<Request>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for BrokerStateWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerStateWriter")
            .field("stats", &self.stats())
            .finish()
    }
}

impl BrokerStateWriter {
    /// Starts the writer task on the current tokio runtime.
    pub fn spawn(
        store: Arc<dyn BrokerStateStore>,
    ) -> (BrokerStateWriter, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(run(store, rx, Arc::clone(&counters)));
        (BrokerStateWriter { tx, counters }, task)
    }

    /// Queues `ops` after everything submitted before and returns a ticket answered once they
    /// are durable (`Err`: they may not be; `Closed` if the writer is gone).
    pub fn submit(&self, ops: Vec<BrokerOp>) -> oneshot::Receiver<Result<()>> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.send(ops, Some(reply_tx));
        reply_rx
    }

    /// Queues `ops` without a ticket (nobody waits for them; order is still kept).
    pub fn submit_detached(&self, ops: Vec<BrokerOp>) {
        if !ops.is_empty() {
            self.send(ops, None);
        }
    }

    /// Waits until everything submitted so far is durable.
    pub async fn flush(&self) -> Result<()> {
        self.submit(Vec::new())
            .await
            .map_err(|_| StoreError::Closed)?
    }

    fn send(&self, ops: Vec<BrokerOp>, reply: Option<oneshot::Sender<Result<()>>>) {
        let n = ops.len();
        self.counters.queued_ops.fetch_add(n, Ordering::Relaxed);
        if let Err(mpsc::error::SendError((_, reply))) = self.tx.send((ops, reply)) {
            self.counters.queued_ops.fetch_sub(n, Ordering::Relaxed);
            if let Some(reply) = reply {
                let _ = reply.send(Err(StoreError::Closed));
            }
        }
    }

    pub fn stats(&self) -> BrokerWriterStats {
        let c = &self.counters;
        BrokerWriterStats {
            batches: c.batches.load(Ordering::Relaxed),
            ops: c.ops.load(Ordering::Relaxed),
            batches_failed: c.batches_failed.load(Ordering::Relaxed),
            queued_ops: c.queued_ops.load(Ordering::Relaxed),
        }
    }
}

/// Drops every `PutMessage` that a later `DeleteMessage` of the same message in the same batch
/// undoes (a subscriber that acknowledged a message before its batch was written): the
/// `DeleteMessage` stays (an earlier batch may have stored the message), so the result is the
/// same, minus the insert.
fn skip_overwritten(mut ops: Vec<BrokerOp>) -> Vec<BrokerOp> {
    let mut deleted: HashSet<(&str, u64)> = HashSet::new();
    let mut skip = vec![false; ops.len()];
    for (i, op) in ops.iter().enumerate().rev() {
        match op {
            BrokerOp::DeleteMessage { session, seq } => {
                deleted.insert((session.as_str(), *seq));
            }
            BrokerOp::PutMessage { session, seq, .. } => {
                skip[i] = deleted.contains(&(session.as_str(), *seq));
            }
            _ => {}
        }
    }
    if !skip.contains(&true) {
        return ops;
    }
    let mut i = 0;
    ops.retain(|_| {
        let keep = !skip[i];
        i += 1;
        keep
    });
    ops
}

async fn run(
    store: Arc<dyn BrokerStateStore>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    counters: Arc<Counters>,
) {
    let mut last_failure_log: Option<Instant> = None;
    let mut failed_since_log = 0u64;
    let mut carry: Option<Request> = None;
    loop {
        let first = match carry.take() {
            Some(r) => r,
            None => match rx.recv().await {
                Some(r) => r,
                None => break,
            },
        };
        let (mut ops, reply) = first;
        let mut waiters: Vec<oneshot::Sender<Result<()>>> = reply.into_iter().collect();
        // Take what else is queued, up to the batch bound (a request is never split).
        while ops.len() < BROKER_BATCH_OPS_MAX {
            match rx.try_recv() {
                Ok((more, reply)) if ops.len() + more.len() <= BROKER_BATCH_OPS_MAX => {
                    ops.extend(more);
                    waiters.extend(reply);
                }
                Ok(req) => {
                    carry = Some(req);
                    break;
                }
                Err(_) => break,
            }
        }
        let n = ops.len();
        let result = store.apply_broker_ops(skip_overwritten(ops)).await;
        counters.queued_ops.fetch_sub(n, Ordering::Relaxed);
        match &result {
            Ok(()) => {
                counters.batches.fetch_add(1, Ordering::Relaxed);
                counters
                    .ops
                    .fetch_add(u64::try_from(n).unwrap_or(u64::MAX), Ordering::Relaxed);
            }
            Err(e) => {
                counters.batches_failed.fetch_add(1, Ordering::Relaxed);
                failed_since_log += 1;
                if last_failure_log.is_none_or(|at| at.elapsed() >= FAILED_BATCH_LOG_INTERVAL) {
                    tracing::error!(
                        error = %e,
                        ops = n,
                        batches = failed_since_log,
                        "broker state batches failed (count since the last such line)"
                    );
                    last_failure_log = Some(Instant::now());
                    failed_since_log = 0;
                }
            }
        }
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
    tracing::debug!("broker state writer drained and stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(seq: u64) -> BrokerOp {
        BrokerOp::PutMessage {
            session: "s:a".into(),
            seq,
            value: vec![1],
        }
    }

    fn delete(seq: u64) -> BrokerOp {
        BrokerOp::DeleteMessage {
            session: "s:a".into(),
            seq,
        }
    }

    #[test]
    fn a_put_undone_by_a_later_delete_in_the_batch_is_skipped_and_the_delete_kept() {
        let ops = vec![put(1), put(2), put(1), delete(1), put(3), delete(2)];
        assert_eq!(skip_overwritten(ops), vec![delete(1), put(3), delete(2)]);
        // A delete before the put does not undo it.
        let ops = vec![delete(4), put(4)];
        assert_eq!(skip_overwritten(ops.clone()), ops);
    }
}
