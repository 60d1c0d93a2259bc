//! The command state machine: which event moves a command from which state to which. Pure.
//!
//! ```text
//! queued ──deliver──▶ delivered ──ack──▶ acknowledged ──result──▶ succeeded | failed
//!   │                    │ (redeliver: stays delivered, attempts + 1)
//!   ├─ ack / result ─────┴──▶ (a result with no earlier ack counts as both)
//!   ├─ cancel ──▶ canceled        (queued or delivered only; 409 once acknowledged)
//!   ├─ expire ──▶ expired         (queued or delivered only: TTL passed before it ran)
//!   └─ give up ─▶ failed          (max_attempts deliveries without an ack)
//! acknowledged ──result timeout──▶ failed {"reason": "timeout"}  (no result within
//!                                  result_timeout_ms of the ack; a later result changes nothing)
//! ```
//!
//! While a command is acknowledged, `next_attempt_at_ms` is its result deadline.
//!
//! Final states (`succeeded`, `failed`, `expired`, `canceled`) never change.

use mooring_store::{CommandOutcome, CommandRecord, CommandState};

/// Something that happens to a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Handed to the device's live session (again).
    Delivered,
    /// The device said "received, starting".
    Acked,
    /// The device reported how it ended.
    Finished(CommandOutcome),
    /// An operator canceled it.
    Cancel,
    /// Its TTL passed.
    Expire,
    /// It was delivered `max_attempts` times without an acknowledgement.
    GiveUp,
    /// Acknowledged, and no result came within its `result_timeout_ms`.
    ResultTimeout,
}

/// What an event does to a command in a given state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Moves to this state.
    To(CommandState),
    /// Allowed, but the state stays (a redelivery, a repeated ack).
    Stay,
    /// Not allowed in this state (cancel after ack, anything after a final state).
    Refused,
}

/// The transition table.
pub fn step(from: CommandState, event: &Event) -> Step {
    use CommandState::*;
    if from.is_final() {
        return Step::Refused;
    }
    match (from, event) {
        (Queued, Event::Delivered) => Step::To(Delivered),
        (Delivered, Event::Delivered) => Step::Stay,
        // Redelivered after a reconnect: the device answers from its own record.
        (Acknowledged, Event::Delivered) => Step::Stay,
        (Queued | Delivered, Event::Acked) => Step::To(Acknowledged),
        (Acknowledged, Event::Acked) => Step::Stay,
        (_, Event::Finished(o)) => Step::To(if o.succeeded { Succeeded } else { Failed }),
        (Queued | Delivered, Event::Cancel) => Step::To(Canceled),
        (Queued | Delivered, Event::Expire) => Step::To(Expired),
        (Acknowledged, Event::Cancel | Event::Expire) => Step::Refused,
        (Acknowledged, Event::ResultTimeout) => Step::To(Failed),
        (Queued | Delivered, Event::ResultTimeout) => Step::Refused,
        (_, Event::GiveUp) => Step::To(Failed),
        // Final states were handled above.
        (Succeeded | Failed | Expired | Canceled, _) => Step::Refused,
    }
}

/// Applies `event` at `now_ms` to `record`: state, history (a result straight from
/// queued/delivered records `acknowledged` first) and result. Returns the step taken.
pub fn apply(record: &mut CommandRecord, event: Event, now_ms: u64) -> Step {
    let s = step(record.state, &event);
    if let Step::To(next) = s {
        if matches!(event, Event::Finished(_)) && record.state != CommandState::Acknowledged {
            record.history.push((CommandState::Acknowledged, now_ms));
        }
        record.history.push((next, now_ms));
        record.state = next;
        if next == CommandState::Acknowledged && record.result_timeout_ms > 0 {
            record.next_attempt_at_ms = now_ms.saturating_add(record.result_timeout_ms);
        }
        match event {
            Event::Finished(o) => record.result = Some(o),
            Event::GiveUp => {
                record.result = Some(CommandOutcome {
                    succeeded: false,
                    output: serde_json::json!({"reason": "max_attempts"}),
                })
            }
            Event::ResultTimeout => {
                record.result = Some(CommandOutcome {
                    succeeded: false,
                    output: serde_json::json!({"reason": "timeout"}),
                })
            }
            _ => {}
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use CommandState::*;

    fn record(state: CommandState) -> CommandRecord {
        CommandRecord {
            id: "c1".into(),
            device_id: mooring_proto::DeviceId::parse("d1").expect("test device id"),
            name: "reboot".into(),
            params: serde_json::Value::Null,
            state,
            attempts: 0,
            max_attempts: 5,
            created_at_ms: 1,
            expires_at_ms: 100,
            next_attempt_at_ms: 1,
            parent_id: None,
            idempotency_key: None,
            history: vec![(Queued, 1)],
            result: None,
            result_timeout_ms: 0,
            synced_at_ms: None,
        }
    }

    fn ok() -> Event {
        Event::Finished(CommandOutcome {
            succeeded: true,
            output: serde_json::json!({}),
        })
    }

    #[test]
    fn result_timeout_fails_only_acknowledged_commands_and_sets_the_deadline_at_the_ack() {
        let mut r = record(Delivered);
        r.result_timeout_ms = 5_000;
        assert_eq!(apply(&mut r, Event::Acked, 10), Step::To(Acknowledged));
        assert_eq!(r.next_attempt_at_ms, 5_010, "deadline counts from the ack");
        assert_eq!(apply(&mut r, Event::ResultTimeout, 5_010), Step::To(Failed));
        assert_eq!(
            r.result.as_ref().map(|o| o.output["reason"].clone()),
            Some(serde_json::json!("timeout"))
        );
        // A late result does not change it back.
        assert_eq!(apply(&mut r, ok(), 6_000), Step::Refused);
        for s in [Queued, Delivered, Succeeded, Expired, Canceled] {
            assert_eq!(step(s, &Event::ResultTimeout), Step::Refused, "{s:?}");
        }
    }

    #[test]
    fn table() {
        let cases: &[(CommandState, Event, Step)] = &[
            (Queued, Event::Delivered, Step::To(Delivered)),
            (Delivered, Event::Delivered, Step::Stay),
            (Acknowledged, Event::Delivered, Step::Stay),
            (Queued, Event::Acked, Step::To(Acknowledged)),
            (Delivered, Event::Acked, Step::To(Acknowledged)),
            (Acknowledged, Event::Acked, Step::Stay),
            (Delivered, ok(), Step::To(Succeeded)),
            (Acknowledged, ok(), Step::To(Succeeded)),
            (Queued, Event::Cancel, Step::To(Canceled)),
            (Delivered, Event::Cancel, Step::To(Canceled)),
            (Acknowledged, Event::Cancel, Step::Refused),
            (Queued, Event::Expire, Step::To(Expired)),
            (Delivered, Event::Expire, Step::To(Expired)),
            (Acknowledged, Event::Expire, Step::Refused),
            (Delivered, Event::GiveUp, Step::To(Failed)),
        ];
        for (from, ev, want) in cases {
            assert_eq!(step(*from, ev), *want, "{from} {ev:?}");
        }
    }

    #[test]
    fn final_states_never_change() {
        for from in [Succeeded, Failed, Expired, Canceled] {
            for ev in [
                Event::Delivered,
                Event::Acked,
                ok(),
                Event::Cancel,
                Event::Expire,
                Event::GiveUp,
            ] {
                assert_eq!(step(from, &ev), Step::Refused, "{from} {ev:?}");
            }
        }
    }

    #[test]
    fn result_without_ack_counts_as_both_and_history_is_timestamped() {
        let mut r = record(Queued);
        assert_eq!(apply(&mut r, Event::Delivered, 5), Step::To(Delivered));
        assert_eq!(apply(&mut r, ok(), 9), Step::To(Succeeded));
        assert_eq!(
            r.history,
            vec![
                (Queued, 1),
                (Delivered, 5),
                (Acknowledged, 9),
                (Succeeded, 9)
            ]
        );
        assert!(r.result.as_ref().is_some_and(|o| o.succeeded));
        assert_eq!(apply(&mut r, Event::Cancel, 10), Step::Refused);
        assert_eq!(r.state, Succeeded);
    }

    #[test]
    fn give_up_records_the_reason() {
        let mut r = record(Delivered);
        apply(&mut r, Event::GiveUp, 7);
        assert_eq!(r.state, Failed);
        assert_eq!(
            r.result.map(|o| o.output),
            Some(serde_json::json!({"reason": "max_attempts"}))
        );
    }
}
