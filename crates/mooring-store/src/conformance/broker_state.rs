//! Conformance cases for [`BrokerStateStore`](crate::BrokerStateStore) and the [`BrokerStateWriter`](crate::BrokerStateWriter) over it.

use super::*;

fn put_message(session: &str, seq: u64, value: &[u8]) -> BrokerOp {
    BrokerOp::PutMessage {
        session: session.into(),
        seq,
        value: value.to_vec(),
    }
}

pub async fn broker_state_ops_apply_in_order_and_load_back(store: &dyn Store) {
    assert_eq!(
        store.load_broker_state().await.expect("load empty"),
        BrokerState::default()
    );
    store
        .apply_broker_ops(vec![
            BrokerOp::PutRetained {
                topic: "b/t".into(),
                value: b"old".to_vec(),
            },
            BrokerOp::PutRetained {
                topic: "b/t".into(),
                value: b"new".to_vec(),
            },
            BrokerOp::PutRetained {
                topic: "a/t".into(),
                value: vec![0, 255, 1],
            },
            BrokerOp::PutRetained {
                topic: "gone".into(),
                value: b"x".to_vec(),
            },
            BrokerOp::DeleteRetained {
                topic: "gone".into(),
            },
            BrokerOp::DeleteRetained {
                topic: "never-there".into(),
            },
            BrokerOp::PutSession {
                key: "s:pipeline".into(),
                value: b"v1".to_vec(),
            },
            put_message("s:pipeline", 10, b"m10"),
            put_message("s:pipeline", 2, b"m2"),
            put_message("s:pipeline", 7, b"m7"),
            BrokerOp::DeleteMessage {
                session: "s:pipeline".into(),
                seq: 7,
            },
            put_message("s:pipeline", 2, b"m2-sent"),
            BrokerOp::PutSession {
                key: "s:pipeline".into(),
                value: b"v2".to_vec(),
            },
            BrokerOp::PutSession {
                key: "d:lock-1".into(),
                value: b"d".to_vec(),
            },
            // A message whose session is not stored is never loaded.
            put_message("s:orphan", 1, b"lost"),
        ])
        .await
        .expect("apply");
    let state = store.load_broker_state().await.expect("load");
    assert_eq!(
        state.retained,
        vec![
            ("a/t".to_owned(), vec![0, 255, 1]),
            ("b/t".to_owned(), b"new".to_vec())
        ]
    );
    assert_eq!(
        state.sessions,
        vec![
            StoredSession {
                key: "d:lock-1".into(),
                value: b"d".to_vec(),
                messages: vec![],
            },
            StoredSession {
                key: "s:pipeline".into(),
                value: b"v2".to_vec(),
                messages: vec![(2, b"m2-sent".to_vec()), (10, b"m10".to_vec())],
            },
        ]
    );
    store
        .apply_broker_ops(vec![BrokerOp::PutSession {
            key: "s:orphan".into(),
            value: b"late".to_vec(),
        }])
        .await
        .expect("apply");
    let state = store.load_broker_state().await.expect("load");
    let orphan = state.sessions.iter().find(|s| s.key == "s:orphan");
    assert_eq!(
        orphan.map(|s| s.messages.len()),
        Some(0),
        "orphaned messages are dropped at load"
    );
    assert!(store.apply_broker_ops(Vec::new()).await.is_ok());
}

pub async fn broker_state_delete_session_takes_its_messages(store: &dyn Store) {
    store
        .apply_broker_ops(vec![
            BrokerOp::PutSession {
                key: "s:a".into(),
                value: b"a".to_vec(),
            },
            put_message("s:a", 1, b"1"),
            put_message("s:a", 2, b"2"),
            BrokerOp::PutSession {
                key: "s:b".into(),
                value: b"b".to_vec(),
            },
            put_message("s:b", 1, b"b1"),
        ])
        .await
        .expect("apply");
    store
        .apply_broker_ops(vec![
            BrokerOp::DeleteSession { key: "s:a".into() },
            // A clean start under the same key: a new session with nothing queued.
            BrokerOp::PutSession {
                key: "s:a".into(),
                value: b"a2".to_vec(),
            },
        ])
        .await
        .expect("apply");
    let state = store.load_broker_state().await.expect("load");
    assert_eq!(state.sessions.len(), 2);
    assert_eq!(state.sessions[0].value, b"a2".to_vec());
    assert!(state.sessions[0].messages.is_empty());
    assert_eq!(state.sessions[1].messages, vec![(1, b"b1".to_vec())]);
}

pub async fn broker_state_loads_one_session_by_key(store: &dyn Store) {
    assert_eq!(
        store.load_broker_session("d:x").await.expect("load none"),
        None
    );
    store
        .apply_broker_ops(vec![
            BrokerOp::PutSession {
                key: "d:x".into(),
                value: b"x".to_vec(),
            },
            put_message("d:x", 9, b"9"),
            put_message("d:x", 3, b"3"),
            BrokerOp::PutSession {
                key: "d:y".into(),
                value: b"y".to_vec(),
            },
            put_message("d:y", 1, b"y1"),
        ])
        .await
        .expect("apply");
    let x = store
        .load_broker_session("d:x")
        .await
        .expect("load x")
        .expect("stored");
    assert_eq!(
        x,
        StoredSession {
            key: "d:x".into(),
            value: b"x".to_vec(),
            messages: vec![(3, b"3".to_vec()), (9, b"9".to_vec())],
        }
    );
    store
        .apply_broker_ops(vec![BrokerOp::DeleteSession { key: "d:x".into() }])
        .await
        .expect("delete");
    assert_eq!(store.load_broker_session("d:x").await.expect("load"), None);
}

pub async fn broker_writer_applies_submissions_in_order_and_answers_tickets(store: Arc<dyn Store>) {
    let (writer, task) = BrokerStateWriter::spawn(store.clone());
    writer.submit_detached(vec![BrokerOp::PutSession {
        key: "s:w".into(),
        value: b"s".to_vec(),
    }]);
    let mut tickets = Vec::new();
    for seq in 0..200u64 {
        tickets.push(writer.submit(vec![put_message("s:w", seq, b"m")]));
        if seq % 2 == 0 {
            writer.submit_detached(vec![BrokerOp::DeleteMessage {
                session: "s:w".into(),
                seq,
            }]);
        }
    }
    for t in tickets {
        t.await.expect("answered").expect("durable");
    }
    writer.flush().await.expect("flush");
    let state = store.load_broker_state().await.expect("load");
    let seqs: Vec<u64> = state.sessions[0].messages.iter().map(|m| m.0).collect();
    assert_eq!(seqs, (0..200).filter(|s| s % 2 == 1).collect::<Vec<_>>());
    let stats = writer.stats();
    assert_eq!(stats.queued_ops, 0);
    assert_eq!(stats.ops, 301);
    assert!(stats.batches >= 1 && stats.batches <= 202, "{stats:?}");
    drop(writer);
    task.await.expect("writer stops once every handle is gone");
}
