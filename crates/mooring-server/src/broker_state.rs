//! The broker's durable state on the store: [`mooring_broker::Persistence`] over the store's
//! group-commit [`BrokerStateWriter`], and loading it at start.

use std::sync::Arc;

use mooring_broker::{Durable, Persistence, Restored, RestoredSession, StateOp};
use mooring_proto::Clock;
use mooring_store::{BrokerOp, BrokerState, BrokerStateWriter};

/// The broker's [`Persistence`]: ops go to the store's group-commit writer, in order.
pub struct StorePersistence {
    writer: BrokerStateWriter,
    clock: Arc<dyn Clock>,
}

impl StorePersistence {
    pub fn new(writer: BrokerStateWriter, clock: Arc<dyn Clock>) -> StorePersistence {
        StorePersistence { writer, clock }
    }
}

fn to_store(ops: Vec<StateOp>) -> Vec<BrokerOp> {
    ops.into_iter()
        .map(|op| match op {
            StateOp::PutRetained { topic, value } => BrokerOp::PutRetained { topic, value },
            StateOp::DeleteRetained { topic } => BrokerOp::DeleteRetained { topic },
            StateOp::PutSession { key, value } => BrokerOp::PutSession { key, value },
            StateOp::DeleteSession { key } => BrokerOp::DeleteSession { key },
            StateOp::PutMessage {
                session,
                seq,
                value,
            } => BrokerOp::PutMessage {
                session,
                seq,
                value,
            },
            StateOp::DeleteMessage { session, seq } => BrokerOp::DeleteMessage { session, seq },
        })
        .collect()
}

impl Persistence for StorePersistence {
    fn submit(&self, ops: Vec<StateOp>) -> Durable {
        let ticket = self.writer.submit(to_store(ops));
        Box::pin(async move { matches!(ticket.await, Ok(Ok(()))) })
    }

    fn submit_detached(&self, ops: Vec<StateOp>) {
        self.writer.submit_detached(to_store(ops));
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }
}

/// What the store holds, as the broker restores it.
pub fn restored(state: BrokerState) -> Restored {
    Restored {
        retained: state.retained,
        sessions: state
            .sessions
            .into_iter()
            .map(|s| RestoredSession {
                key: s.key,
                value: s.value,
                messages: s.messages,
            })
            .collect(),
    }
}
