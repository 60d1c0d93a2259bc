//! The behavioural contract of every backend, as async test cases plus [`conformance_tests!`](crate::conformance_tests).
//! A backend that implements only the device and token traits so far runs
//! [`conformance_device_token_tests!`](crate::conformance_device_token_tests) instead.
//!
//! Each case gets a fresh, empty store and panics on a violation. A backend's test file runs
//! them all with one line:
//!
//! ```ignore
//! async fn fresh_store() -> (std::sync::Arc<dyn mooring_store::Store>, tempfile::TempDir) { ... }
//! mooring_store::conformance_tests!(fresh_store);
//! ```
//!
//! The factory is anything callable with no arguments that returns a future of
//! `(Arc<dyn Store>, guard)`; the guard (a temp dir, a throwaway database) lives until the case
//! ends. The calling crate needs `tokio` (with `macros` and `rt`) and `mooring-store` with the
//! `conformance` feature (this module exists only with it) as dev-dependencies.
//!
//! The cases live one file per store trait (`devices.rs`, `tokens.rs`, `telemetry.rs`,
//! `commands.rs`, `shadows.rs`, `broker_state.rs`, `cluster.rs`, `accounts.rs`, `audit.rs`, `fleet.rs`, `health.rs`, `jobs.rs`, `rules.rs`, `certs.rs`, `claims.rs`, `cas.rs`, `artifacts.rs`, `rollouts.rs`, `gateways.rs`) plus `writer.rs` for the group-commit writer and
//! the retention pass; the helpers they share are here.

mod accounts;
mod artifacts;
mod audit;
mod broker_state;
mod cas;
mod certs;
mod claims;
mod cluster;
mod commands;
mod devices;
mod fleet;
mod gateways;
mod health;
mod jobs;
mod rollouts;
mod rules;
mod shadows;
mod telemetry;
mod tokens;
mod writer;

pub use accounts::*;
pub use artifacts::*;
pub use audit::*;
pub use broker_state::*;
pub use cas::*;
pub use certs::*;
pub use claims::*;
pub use cluster::*;
pub use commands::*;
pub use devices::*;
pub use fleet::*;
pub use gateways::*;
pub use health::*;
pub use jobs::*;
pub use rollouts::*;
pub use rules::*;
pub use shadows::*;
pub use telemetry::*;
pub use tokens::*;
pub use writer::*;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::{
    run_retention_pass, AppendOutcome, BrokerOp, BrokerState, BrokerStateWriter, CommandOutcome,
    CommandParentRecord, CommandRecord, CommandState, CreateOutcome, DeviceId, DeviceStore,
    MetricValue, NewDevice, Point, Role, ShadowRecord, Store, StoreError, StoredSession,
    TelemetryQuery, TelemetryRecord, TelemetryStore, TelemetryWriter, TelemetryWriterConfig,
    TokenRecord, TokenStore, TS_MS_MAX,
};

/// Expands to one `#[tokio::test]` per conformance case. See the [module docs](crate::conformance).
#[macro_export]
macro_rules! conformance_tests {
    ($factory:expr) => {
        $crate::conformance_device_token_tests!($factory);
        $crate::conformance_cluster_tests!($factory);
        $crate::conformance_account_audit_tests!($factory);
        $crate::conformance_tests!(@by_ref $factory;
            artifact_create_get_list_round_trip,
            artifact_advance_is_compare_and_set_and_ready_once,
            artifact_chunks_replace_read_by_range_and_go_with_the_artifact,
            artifact_expire_uploads_deletes_only_old_uploading_ones_with_their_chunks,
            deployment_updates_follow_newer_reports_and_hold_the_artifact,
            deployment_unsent_updates_skip_sent_reported_and_canceled,
            deployment_ended_update_commands_list_unreported_updates_of_ended_commands,
            deployment_count_bound_and_delete_only_when_over,
            claim_create_get_find_list_revoke_round_trip,
            claim_live_bounds_per_creator_and_in_total,
            enrollment_reservations_take_uses_once_per_key,
            claim_prune_deletes_dead_claims_with_their_enrollments,
            health_deltas_fold_into_one_record_per_device,
            health_batches_are_bounded,
            rules_are_bounded_unique_by_name_and_deleted_with_their_open_alerts,
            alerts_open_once_per_rule_and_device_and_follow_their_lifecycle,
            a_rules_alert_needs_its_rule_enabled,
            tickets_open_once_by_id_bounded_close_list_and_prune,
            rollouts_start_each_device_once_progress_cas_and_event_log,
            gateways_attach_detach_bounds_and_no_chains,
            job_create_get_round_trips,
            job_update_is_compare_and_set_on_rev,
            job_list_is_newest_first_with_cursor,
            job_unfinished_count_per_creator,
            job_prune_keeps_unfinished_and_the_newest,
            job_prune_of_one_creator_leaves_the_others,
            job_claims_lease_one_worker_and_take_over_expired_leases,
            job_results_are_written_by_offset_and_go_with_the_job,
            device_delete_removes_device_telemetry_latest_and_dedupe_keys,
            telemetry_append_then_query_round_trips,
            telemetry_duplicate_seq_in_one_batch_is_stored_once,
            telemetry_duplicate_seq_across_batches_is_stored_once,
            telemetry_seq_is_per_device_and_none_is_always_stored,
            telemetry_query_filters_and_orders,
            telemetry_latest_is_newest_point_per_metric,
            telemetry_booleans_round_trip_distinct_from_numbers,
            telemetry_retention_deletes_only_old_rows_in_chunks,
            telemetry_retention_prunes_dedupe_keys_with_points,
            telemetry_invalid_records_are_refused_whole,
            telemetry_empty_batch_is_ok,
            telemetry_query_spans_compacted_and_recent_points,
            telemetry_late_points_into_a_compacted_window_are_merged,
            telemetry_retention_across_chunks_is_exact,
            telemetry_device_delete_removes_compacted_chunks,
            telemetry_limit_cuts_inside_a_chunk,
            telemetry_metrics_per_device_bound_refuses_new_names_only,
            command_create_get_and_compare_and_set_update,
            command_idempotency_key_returns_the_existing_command,
            command_executed_locally_is_stored_once_with_its_sync_time,
            command_for_a_missing_device_is_not_found_and_nothing_is_stored,
            command_list_is_newest_first_with_state_filter_and_cursor,
            command_pending_and_due_queries_follow_state_and_times,
            command_fleet_parent_counts_children_per_state,
            command_and_shadow_are_deleted_with_their_device,
            shadow_save_is_compare_and_set_on_version,
            broker_state_ops_apply_in_order_and_load_back,
            broker_state_delete_session_takes_its_messages,
            broker_state_loads_one_session_by_key,
            fleet_samples_sum_per_interval_and_prune_in_chunks,
            device_selection_matches_selector_semantics,
            cert_created_with_its_device_and_deleted_with_it,
            cert_taken_by_another_device_fails_the_whole_creation,
            cert_add_lists_newest_first_and_refuses_taken_or_orphan,
            cert_revoke_is_idempotent_and_per_device_revokes_only_active,
            cert_expiring_lists_active_ones_soonest_first_in_pages,
            cert_old_fleet_ones_are_the_active_certs_of_other_fleet_cas_in_pages,
            cert_revoked_since_lists_revocations_oldest_first_in_pages,
            cert_renewal_is_one_pending_per_device_and_confirmation_revokes_the_others,
            ca_add_get_list_and_enable_round_trip,
            ca_taken_fingerprint_or_id_is_refused,
            ca_count_is_bounded,
            device_with_cert_is_created_whole_or_not_at_all,
        );
        $crate::conformance_tests!(@by_arc $factory;
            concurrent_reservations_of_a_single_use_claim_have_one_winner,
            writer_group_commits_concurrent_appends_and_reports_duplicates,
            writer_drains_queue_and_stops_when_handles_are_dropped,
            writer_refuses_invalid_record_without_failing_others,
            retention_pass_deletes_everything_old_in_chunks,
            broker_writer_applies_submissions_in_order_and_answers_tickets,
            concurrent_writes_that_fail_roll_back_alone,
        );
    };
    (@by_ref $factory:expr; $($case:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $case() {
            let (store, _guard) = ($factory)().await;
            $crate::conformance::$case(&*store).await;
        }
    )*};
    (@by_arc $factory:expr; $($case:ident),* $(,)?) => {$(
        #[tokio::test]
        async fn $case() {
            let (store, _guard) = ($factory)().await;
            $crate::conformance::$case(store).await;
        }
    )*};
}

/// Expands to one `#[tokio::test]` per [`DeviceStore`] and [`TokenStore`] case that needs no
/// other trait, for a backend that implements only those two so far (as the PostgreSQL one did
/// at first). The
/// factory returns `(Arc<S>, guard)` with `S: DeviceStore + TokenStore`. The full suite
/// ([`conformance_tests!`](crate::conformance_tests)) runs these too, and adds
/// `device_delete_removes_device_telemetry_latest_and_dedupe_keys`, which needs telemetry.
#[macro_export]
macro_rules! conformance_device_token_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@by_ref $factory;
            device_create_then_get_round_trips,
            device_duplicate_id_is_already_exists,
            device_find_by_cert_returns_the_owner,
            device_list_is_ordered_by_id_with_keyset_pagination,
            device_delete_removes_only_that_device,
            device_set_tags_replaces_all_and_missing_is_not_found,
            device_last_seen_keeps_the_maximum_and_skips_unknown_ids,
            device_activity_sets_firsts_once_and_keeps_the_newest_telemetry,
            device_installation_and_step_errors_round_trip,
            device_pipeline_counts_follow_activity_and_filters,
            token_create_find_list_delete,
            token_duplicate_id_or_secret_is_already_exists,
            token_scope_expiry_and_last_use_round_trip,
            token_touch_keeps_the_latest_use,
            token_list_pages_by_id,
            token_text_with_nul_is_invalid_input,
        );
    };
}

/// Expands to one `#[tokio::test]` per [`ClusterStore`](crate::ClusterStore) case; the factory
/// returns `(Arc<S>, guard)` with `S: DeviceStore + ClusterStore`. Part of the full suite.
#[macro_export]
macro_rules! conformance_cluster_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@by_ref $factory;
            cluster_lease_is_exclusive_until_it_expires_or_is_released,
            cluster_lease_race_has_one_winner,
            cluster_sessions_follow_open_close_and_node_liveness,
            cluster_value_is_created_once,
            cluster_value_is_replaced_only_from_what_it_is,
        );
    };
}

/// Expands to one `#[tokio::test]` per [`AccountStore`](crate::AccountStore) and
/// [`AuditStore`](crate::AuditStore) case; the factory returns `(Arc<S>, guard)` with
/// `S: AccountStore + AuditStore`. Part of the full suite. A backend for several servers also
/// runs [`login_failures_counted_at_once_are_all_counted`] with two stores on one database.
#[macro_export]
macro_rules! conformance_account_audit_tests {
    ($factory:expr) => {
        $crate::conformance_tests!(@by_ref $factory;
            user_create_then_find_by_each_key,
            user_unique_keys_are_already_exists,
            user_update_replaces_the_row_and_refuses_a_taken_key,
            user_list_pages_by_email,
            user_delete_removes_its_sessions,
            user_text_with_nul_is_invalid_input,
            session_create_find_touch_delete,
            session_for_a_missing_user_is_not_found,
            session_cap_keeps_the_most_recently_used,
            session_expiry_by_idle_time_and_absolute_deadline_in_chunks,
            login_failures_count_within_a_fixed_window,
            login_failures_clear_and_prune,
            audit_append_assigns_increasing_ids_listed_newest_first,
            audit_filters_by_actor_action_target_and_time,
            audit_target_and_action_prefixes_match_literally,
            audit_cursor_pages_through_everything_once,
            audit_prune_deletes_old_entries_in_chunks,
            audit_text_round_trips_exactly,
        );
        #[tokio::test]
        async fn login_failures_counted_at_once_are_all_counted() {
            let (store, _guard) = ($factory)().await;
            $crate::conformance::login_failures_counted_at_once_are_all_counted(&*store, &*store)
                .await;
        }
    };
}

/// A device id for a test (every literal here is valid).
fn id(s: &str) -> DeviceId {
    DeviceId::parse(s).expect("test device id")
}

fn tags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn new_device(id: &str) -> NewDevice {
    NewDevice {
        id: self::id(id),
        tags: tags(&[("site", "north")]),
        created_at_ms: 1_700_000_000_000,
        cert_sha256: format!("sha-{id}"),
        cert_serial: format!("serial-{id}"),
        cert_not_after_ms: 1_800_000_000_000,
        cert_issuer: crate::CERT_ISSUER_FLEET.to_owned(),
    }
}

fn rec(
    device: &str,
    seq: Option<u64>,
    ts_ms: u64,
    points: &[(&str, MetricValue)],
) -> TelemetryRecord {
    TelemetryRecord {
        device_id: id(device),
        seq,
        ts_ms,
        points: points.iter().map(|(m, v)| ((*m).to_owned(), *v)).collect(),
    }
}

fn num(n: f64) -> MetricValue {
    MetricValue::Number(n)
}

fn all_points(device: &str) -> TelemetryQuery {
    TelemetryQuery {
        device_id: id(device),
        metric: None,
        from_ms: None,
        to_ms: None,
        limit: 10_000,
    }
}

async fn count_points(store: &dyn Store, device: &str) -> usize {
    store
        .query(all_points(device))
        .await
        .expect("query all points")
        .len()
}

async fn append(store: &dyn Store, batch: Vec<TelemetryRecord>) -> Vec<AppendOutcome> {
    let len = batch.len();
    let outcomes = store.append_batch(batch).await.expect("append_batch");
    assert_eq!(outcomes.len(), len, "one outcome per record");
    outcomes
}

fn token(id: &str, role: Role) -> TokenRecord {
    TokenRecord {
        id: id.to_owned(),
        name: format!("token {id}"),
        role,
        token_sha256: format!("hash-{id}"),
        created_at_ms: 1_700_000_000_000,
        scope: None,
        expires_at_ms: None,
        last_used_at_ms: None,
    }
}
