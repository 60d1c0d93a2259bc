//! Server counters and the Prometheus text rendering behind `GET /metrics`.
//!
//! Counters are plain atomics owned by one server instance (no global recorder), so several
//! servers in one test process never mix their numbers.

use crate::app::App;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct Counters {
    /// Telemetry messages accepted and stored (or recognised as duplicates).
    pub telemetry_messages: AtomicU64,
    /// Telemetry points stored.
    pub telemetry_points: AtomicU64,
    /// MQTT PUBLISH packets this node's clients sent that the policy accepted (fleet history).
    pub mqtt_publishes_received: AtomicU64,
    /// Telemetry messages whose `(device, seq)` was already stored.
    pub telemetry_duplicates: AtomicU64,
    /// Telemetry messages dropped because the payload was invalid.
    pub telemetry_invalid: AtomicU64,
    /// Telemetry messages not acknowledged because the store failed.
    pub telemetry_store_errors: AtomicU64,
    /// Telemetry rows (points, dedupe keys, chunks) the retention task deleted.
    pub telemetry_retention_rows: AtomicU64,
    /// Retention passes that ran to the end (nothing older than the cutoff left).
    pub telemetry_retention_passes: AtomicU64,
    /// Telemetry messages refused because they would give a device more than
    /// `telemetry.metrics_per_device_max` distinct metrics.
    pub telemetry_metrics_limited: AtomicU64,
    /// CONNECTs refused by authentication.
    pub connects_refused: AtomicU64,
    /// Of those, device certificates the ledger refused (revoked, expired, not the device's).
    pub connects_refused_certificate: AtomicU64,
    /// TLS handshakes that failed (no/foreign certificate, timeouts, garbage).
    pub tls_handshake_failures: AtomicU64,
    /// Device commands created (fleet commands count once per device).
    pub commands_created: AtomicU64,
    /// OTA artifacts whose upload completed (checked and signed).
    pub ota_artifacts_ready: AtomicU64,
    /// OTA downloads served (whole or a range).
    pub ota_downloads: AtomicU64,
    /// OTA downloads refused for their token (missing, forged, expired, another artifact's).
    pub ota_downloads_refused: AtomicU64,
    /// OTA downloads ended because their client stopped taking the body
    /// (`[ota] download_idle_timeout_ms`).
    pub ota_downloads_idle: AtomicU64,
    /// OTA downloads ended because their client took the body slower than
    /// `[ota] download_min_rate_bytes_per_s`.
    pub ota_downloads_slow: AtomicU64,
    /// Bytes of artifacts sent.
    pub ota_download_bytes: AtomicU64,
    /// OTA status reports stored (older ones ignored are not counted).
    pub ota_status_reports: AtomicU64,
    /// OTA status reports refused: no such update for the device, another artifact or version,
    /// or `committed` to a version that is not the update's.
    pub ota_status_reports_refused: AtomicU64,
    /// OTA status reports and link requests over `[ota] reports_per_minute_max`.
    pub ota_reports_rate_limited: AtomicU64,
    /// Commands handed to a device session for the first time.
    pub commands_delivered: AtomicU64,
    /// Redeliveries of unacknowledged commands.
    pub commands_retried: AtomicU64,
    pub commands_succeeded: AtomicU64,
    /// Failed by the device, or after `max_attempts` deliveries without an ack.
    pub commands_failed: AtomicU64,
    pub commands_expired: AtomicU64,
    pub commands_canceled: AtomicU64,
    /// Acks / results for unknown, foreign or already-final commands, or with invalid payloads.
    pub command_replies_ignored: AtomicU64,
    /// Results that arrived after their command failed with `timeout` (kept as `late_result`).
    pub commands_late_results: AtomicU64,
    /// Shadow reported updates applied.
    pub shadow_reports: AtomicU64,
    /// HTTP connections closed because no (next) request head arrived in time.
    pub http_header_timeouts: AtomicU64,
    /// HTTP requests answered 408: the body did not arrive in time.
    pub http_body_timeouts: AtomicU64,
    /// HTTP requests answered 413: the body was too large.
    pub http_body_too_large: AtomicU64,
    /// HTTP requests answered 401: no valid token.
    pub http_unauthorized: AtomicU64,
    /// HTTP requests answered 403 (role lacks the permission, CSRF token missing, scope).
    pub http_forbidden: AtomicU64,
    /// HTTP requests answered 429 (login throttling).
    pub http_throttled: AtomicU64,
    /// Audit log entries that could not be stored (logged as errors).
    pub audit_write_failures: AtomicU64,
    /// HTTP connections that waited for a slot (`[http] connections_max` reached).
    pub http_connection_cap: AtomicU64,
    /// HTTPS handshakes that failed or timed out.
    pub http_tls_handshake_failures: AtomicU64,
}

impl Counters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Builds a Prometheus text exposition (version 0.0.4).
#[derive(Default)]
pub struct Exposition {
    out: String,
}

impl Exposition {
    pub fn counter(&mut self, name: &str, help: &str, value: u64) -> &mut Self {
        self.metric(name, help, "counter", value as f64)
    }

    /// One counter with a series per label value: `name{label="value"} n`.
    pub fn labeled_counters<'a>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: impl IntoIterator<Item = (&'a str, u64)>,
    ) -> &mut Self {
        self.labeled(name, help, "counter", label, series)
    }

    /// One gauge with a series per label value: `name{label="value"} x`.
    pub fn labeled_gauges<'a>(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        series: impl IntoIterator<Item = (&'a str, f64)>,
    ) -> &mut Self {
        self.labeled(name, help, "gauge", label, series)
    }

    fn labeled<'a, V: std::fmt::Display>(
        &mut self,
        name: &str,
        help: &str,
        kind: &str,
        label: &str,
        series: impl IntoIterator<Item = (&'a str, V)>,
    ) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        for (value, x) in series {
            let _ = writeln!(self.out, "{name}{{{label}=\"{value}\"}} {x}");
        }
        self
    }

    pub fn gauge(&mut self, name: &str, help: &str, value: f64) -> &mut Self {
        self.metric(name, help, "gauge", value)
    }

    fn metric(&mut self, name: &str, help: &str, kind: &str, value: f64) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        let _ = writeln!(self.out, "{name} {value}");
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

pub fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The `/metrics` body.
pub fn render_metrics(app: &App) -> String {
    let c = app.counters();
    let certs = app.registry.cached_cert_gauges();
    let mut e = Exposition::default();
    e.labeled_gauges(
        "mooring_node_info",
        "This node (its --node-id); always 1",
        "node",
        [(app.config().node_id.as_str(), 1.0)],
    );
    if let Some(cluster) = app.cluster() {
        let k = &cluster.counters;
        let held = cluster.held_leases();
        e.counter(
            "mooring_cluster_bus_sent_total",
            "Bus messages this node published (batches of notices or forwarded MQTT messages)",
            load(&k.bus_sent),
        )
        .counter(
            "mooring_cluster_bus_received_total",
            "Bus messages from other nodes this node handled",
            load(&k.bus_received),
        )
        .counter(
            "mooring_cluster_outbox_dropped_total",
            "Notices or forwarded messages not sent: the outbox was full or the bus refused",
            load(&k.outbox_dropped),
        )
        .counter(
            "mooring_cluster_bus_dropped_total",
            "Bus messages this node's subscription dropped because it fell behind ([bus] buffer_len)",
            load(&k.bus_dropped),
        )
        .counter(
            "mooring_cluster_bus_rejected_total",
            "Bus messages dropped: malformed, not signed with the cluster key, or too old",
            load(&k.bus_rejected),
        )
        .counter(
            "mooring_cluster_takeovers_total",
            "Sessions this node handed over because their device connected to another node",
            load(&k.takeovers),
        )
        .counter(
            "mooring_cluster_reaped_sessions_total",
            "Session rows of dead nodes this node removed (reaper lease)",
            load(&k.reaped_sessions),
        )
        .labeled_gauges(
            "mooring_cluster_lease_held",
            "1 for each once-only job whose lease this node holds",
            "lease",
            [
                crate::cluster::LEASE_SCHEDULER,
                crate::cluster::LEASE_RETENTION,
                crate::cluster::LEASE_COMPACTION,
                crate::cluster::LEASE_REAPER,
                crate::cluster::LEASE_JOBS,
                crate::cluster::LEASE_OTA,
                crate::cluster::LEASE_RULES,
                crate::cluster::LEASE_HEALTH,
                crate::cluster::LEASE_ROLLOUTS,
            ]
            .into_iter()
            .map(|l| (l, if held.contains(&l) { 1.0 } else { 0.0 })),
        );
    }
    if let Some(broker) = app.broker() {
        let s = broker.stats();
        e.gauge(
            "mooring_mqtt_connections",
            "Open MQTT connections",
            s.connections as f64,
        )
        .gauge(
            "mooring_mqtt_sessions",
            "MQTT sessions (connected and persistent)",
            s.sessions as f64,
        )
        .gauge(
            "mooring_mqtt_subscriptions",
            "Subscriptions held by all MQTT sessions",
            s.subscriptions as f64,
        )
        .gauge(
            "mooring_mqtt_shared_groups",
            "Shared subscription groups ($share/<group>/<filter>, per principal)",
            s.shared_groups as f64,
        )
        .counter(
            "mooring_mqtt_shared_redelivered_total",
            "Messages moved from a shared subscription member that left to another member",
            s.shared_redelivered,
        )
        .counter(
            "mooring_mqtt_messages_in_total",
            "PUBLISH packets received",
            s.messages_in,
        )
        .counter(
            "mooring_mqtt_messages_out_total",
            "PUBLISH packets sent",
            s.messages_out,
        )
        .counter(
            "mooring_mqtt_denied_total",
            "PUBLISH packets and subscription filters denied by the topic policy",
            s.denied,
        )
        .counter(
            "mooring_mqtt_messages_dropped_total",
            "Messages dropped (full session queue, too large for the client)",
            s.dropped,
        )
        .gauge(
            "mooring_mqtt_retained_messages",
            "Retained messages held",
            s.retained as f64,
        )
        .counter(
            "mooring_mqtt_connection_panics_total",
            "Connection tasks that panicked (contained)",
            s.panics,
        )
        .gauge(
            "mooring_mqtt_retained_bytes",
            "Topic + payload bytes of the retained messages clients published",
            s.retained_bytes as f64,
        )
        .labeled_counters(
            "mooring_mqtt_refusals_total",
            "MQTT refusals and removals by reason (connects, publishes, subscriptions, quotas, dropped messages, closed connections)",
            "reason",
            s.refusals.iter().map(|(r, n)| (r.name(), *n)),
        );
    }
    let bs = app.broker_state_stats();
    e.gauge(
        "mooring_broker_state_queued_ops",
        "Broker state changes (retained, sessions, queued messages) waiting for the group commit",
        bs.queued_ops as f64,
    )
    .counter(
        "mooring_broker_state_batches_total",
        "Broker state group-commit transactions written",
        bs.batches,
    )
    .counter(
        "mooring_broker_state_batches_failed_total",
        "Broker state group-commit transactions that failed",
        bs.batches_failed,
    );
    let w = app.telemetry.writer_stats();
    e.gauge(
        "mooring_devices_online",
        "Devices with a live session on this node (in a cluster: sum over the nodes)",
        app.presence.online_count() as f64,
    )
    .gauge(
        "mooring_events_streams",
        "Live event streams open on this node (GET /api/v1/events)",
        app.events.streams() as f64,
    )
    .counter(
        "mooring_events_published_total",
        "Live events this node originated",
        load(&app.events.counters.published),
    )
    .counter(
        "mooring_rules_events_dropped_total",
        "Events not evaluated by rules: the evaluation queue ([rules] queue_len) was full",
        load(&app.rules.counters.events_dropped),
    )
    .counter(
        "mooring_rules_evaluated_total",
        "Events evaluated against a rule that applies to their device",
        load(&app.rules.counters.evaluated),
    )
    .counter(
        "mooring_rules_fired_total",
        "Times a rule's condition started to hold for a device",
        load(&app.rules.counters.fired),
    )
    .counter(
        "mooring_rules_cleared_total",
        "Times a rule's condition stopped holding for a device",
        load(&app.rules.counters.cleared),
    )
    .counter(
        "mooring_rules_states_dropped_total",
        "Devices a rule could not follow: [rules] states_max (rule, device) states were held",
        load(&app.rules.counters.states_dropped),
    )
    .counter(
        "mooring_rules_alerts_dropped_total",
        "Alerts not raised: [rules] alerts_open_max alerts were open",
        load(&app.rules.counters.alerts_dropped),
    )
    .counter(
        "mooring_rules_actions_failed_total",
        "Rule actions that failed (see the log)",
        load(&app.rules.counters.actions_failed),
    )
    .counter(
        "mooring_rules_actions_suppressed_total",
        "Command and tag actions not taken: the rule acted on the device within [rules] action_cooldown_ms",
        load(&app.rules.counters.actions_suppressed),
    )
    .gauge(
        "mooring_rules_states",
        "(rule, device) states this node holds",
        app.rules.states_len() as f64,
    )
    .labeled_counters(
        "mooring_webhook_deliveries_total",
        "Webhook notification tries by outcome: delivered (2xx), failed (retried, or dead after [jobs] attempts_max), dropped (the rule had 1000 unfinished)",
        "outcome",
        [
            ("delivered", load(&app.jobs.webhooks().counters.delivered)),
            ("failed", load(&app.jobs.webhooks().counters.failed)),
            ("dropped", load(&app.jobs.webhooks().counters.dropped)),
        ],
    )
    .labeled_counters(
        "mooring_alert_emails_total",
        "Alert emails by outcome: sent (the SMTP server took it), failed (retried, or dead after [jobs] attempts_max), dropped (the channel had 1000 unfinished)",
        "outcome",
        [
            ("sent", load(&app.jobs.emails().counters.sent)),
            ("failed", load(&app.jobs.emails().counters.failed)),
            ("dropped", load(&app.jobs.emails().counters.dropped)),
        ],
    )
    .labeled_counters(
        "mooring_playbook_runs_total",
        "Playbook runs by outcome: succeeded, failed (retried, or dead after [jobs] attempts_max), dropped (the playbook or rule had 1000 unfinished)",
        "outcome",
        [
            ("succeeded", load(&app.jobs.playbooks().counters.succeeded)),
            ("failed", load(&app.jobs.playbooks().counters.failed)),
            ("dropped", load(&app.jobs.playbooks().counters.dropped)),
        ],
    )
    .labeled_counters(
        "mooring_tickets_total",
        "Tickets playbooks opened, and refused (1000 were open)",
        "outcome",
        [
            ("opened", load(&app.jobs.playbooks().counters.tickets_opened)),
            ("refused", load(&app.jobs.playbooks().counters.tickets_refused)),
        ],
    )
    .labeled_counters(
        "mooring_rule_nats_total",
        "Rules' NATS notifications by outcome: published, failed (retried, or dead after [jobs] attempts_max)",
        "outcome",
        [
            ("published", load(&app.jobs.webhooks().counters.nats_published)),
            ("failed", load(&app.jobs.webhooks().counters.nats_failed)),
        ],
    )
    .counter(
        "mooring_health_flushed_total",
        "Per-device health deltas this node wrote to the store",
        load(&app.health.tracker().counters.flushed),
    )
    .counter(
        "mooring_health_dropped_total",
        "Device events not tracked for health: [health] pending_devices_max devices were waiting for a flush",
        load(&app.health.tracker().counters.dropped),
    )
    .counter(
        "mooring_events_received_total",
        "Live events received from other nodes",
        load(&app.events.counters.received),
    )
    .counter(
        "mooring_events_streams_refused_total",
        "Event streams refused: [events] streams_max reached",
        load(&app.events.counters.streams_refused),
    )
    .counter(
        "mooring_events_streams_slow_total",
        "Event streams closed because their client stopped reading (it may resume)",
        load(&app.events.counters.streams_slow),
    )
    .counter(
        "mooring_events_resets_total",
        "Resets sent: a resume from a cursor older than the window, or events lost between nodes",
        load(&app.events.counters.resets),
    )
    .gauge(
        "mooring_command_waiters",
        "Commands being waited on by wait_ms requests",
        app.commands.waited_commands() as f64,
    )
    .counter(
        "mooring_telemetry_messages_total",
        "Telemetry messages stored",
        load(&c.telemetry_messages),
    )
    .counter(
        "mooring_ota_artifacts_ready_total",
        "OTA artifacts whose upload completed (size, SHA-256 and signature checked)",
        load(&c.ota_artifacts_ready),
    )
    .counter(
        "mooring_ota_downloads_total",
        "OTA downloads served (whole files or ranges)",
        load(&c.ota_downloads),
    )
    .counter(
        "mooring_ota_downloads_refused_total",
        "OTA downloads refused for their token (missing, forged, expired, another artifact's)",
        load(&c.ota_downloads_refused),
    )
    .counter(
        "mooring_ota_downloads_idle_total",
        "OTA downloads ended because their client stopped reading ([ota] download_idle_timeout_ms)",
        load(&c.ota_downloads_idle),
    )
    .counter(
        "mooring_ota_downloads_slow_total",
        "OTA downloads ended because their client read slower than [ota] download_min_rate_bytes_per_s",
        load(&c.ota_downloads_slow),
    )
    .counter(
        "mooring_ota_download_bytes_total",
        "Bytes of OTA artifacts sent",
        load(&c.ota_download_bytes),
    )
    .counter(
        "mooring_ota_status_reports_total",
        "OTA status reports from devices stored (older ones by seq are ignored, not counted)",
        load(&c.ota_status_reports),
    )
    .counter(
        "mooring_ota_status_reports_refused_total",
        "OTA status reports refused (no such update for the device, another artifact or version, committed to another version)",
        load(&c.ota_status_reports_refused),
    )
    .counter(
        "mooring_ota_reports_rate_limited_total",
        "OTA status reports and link requests refused over [ota] reports_per_minute_max",
        load(&c.ota_reports_rate_limited),
    )
    .counter(
        "mooring_commands_created_total",
        "Device commands created (a fleet command counts once per device)",
        load(&c.commands_created),
    )
    .counter(
        "mooring_commands_delivered_total",
        "Commands handed to a device session for the first time",
        load(&c.commands_delivered),
    )
    .counter(
        "mooring_commands_retried_total",
        "Redeliveries of unacknowledged commands",
        load(&c.commands_retried),
    )
    .counter(
        "mooring_commands_succeeded_total",
        "Commands the device reported succeeded",
        load(&c.commands_succeeded),
    )
    .counter(
        "mooring_commands_failed_total",
        "Commands failed (by the device, or after max_attempts deliveries)",
        load(&c.commands_failed),
    )
    .counter(
        "mooring_commands_expired_total",
        "Commands whose TTL passed before they ran",
        load(&c.commands_expired),
    )
    .counter(
        "mooring_commands_canceled_total",
        "Commands canceled before acknowledgement",
        load(&c.commands_canceled),
    )
    .counter(
        "mooring_command_replies_ignored_total",
        "Acks/results for unknown, foreign or finished commands, or invalid results",
        load(&c.command_replies_ignored),
    )
    .counter(
        "mooring_commands_late_results_total",
        "Results that came after their command failed with timeout (kept as late_result)",
        load(&c.commands_late_results),
    )
    .counter(
        "mooring_shadow_reports_total",
        "Shadow reported updates applied",
        load(&c.shadow_reports),
    )
    .counter(
        "mooring_telemetry_points_total",
        "Telemetry points stored",
        load(&c.telemetry_points),
    )
    .counter(
        "mooring_mqtt_publishes_received_total",
        "MQTT PUBLISH packets received from clients and accepted by the policy",
        load(&c.mqtt_publishes_received),
    )
    .counter(
        "mooring_telemetry_duplicates_total",
        "Telemetry messages already stored (same device and seq)",
        load(&c.telemetry_duplicates),
    )
    .counter(
        "mooring_telemetry_invalid_total",
        "Telemetry messages dropped as invalid",
        load(&c.telemetry_invalid),
    )
    .counter(
        "mooring_telemetry_metrics_limited_total",
        "Telemetry messages refused: the device already has telemetry.metrics_per_device_max metrics",
        load(&c.telemetry_metrics_limited),
    )
    .counter(
        "mooring_telemetry_retention_rows_total",
        "Telemetry rows (points, dedupe keys, chunks) deleted by retention",
        load(&c.telemetry_retention_rows),
    )
    .counter(
        "mooring_telemetry_retention_passes_total",
        "Retention passes completed (nothing older than the cutoff left)",
        load(&c.telemetry_retention_passes),
    )
    .counter(
        "mooring_telemetry_store_errors_total",
        "Telemetry messages not stored because the store failed",
        load(&c.telemetry_store_errors),
    )
    .counter(
        "mooring_mqtt_connects_refused_total",
        "CONNECTs refused by authentication",
        load(&c.connects_refused),
    )
    .gauge(
        "mooring_certificates_expiring",
        "Active device certificates whose not_after is within [certificates] expiring_warn_days (expired ones included)",
        certs.expiring as f64,
    )
    .gauge(
        "mooring_certificates_revoked",
        "Device certificates revoked (in the ledger)",
        certs.revoked as f64,
    )
    .counter(
        "mooring_mqtt_connects_refused_certificate_total",
        "CONNECTs refused because the device certificate is revoked, expired or not the device's",
        load(&c.connects_refused_certificate),
    )
    .counter(
        "mooring_audit_write_failures_total",
        "Audit log entries that could not be stored",
        load(&c.audit_write_failures),
    )
    .counter(
        "mooring_tls_handshake_failures_total",
        "TLS handshakes that failed or timed out",
        load(&c.tls_handshake_failures),
    )
    .labeled_counters(
        "mooring_http_refusals_total",
        "HTTP API refusals by reason (timeouts, size, token, connection cap, TLS handshake)",
        "reason",
        [
            ("header_timeout", load(&c.http_header_timeouts)),
            ("body_timeout", load(&c.http_body_timeouts)),
            ("body_too_large", load(&c.http_body_too_large)),
            ("unauthorized", load(&c.http_unauthorized)),
            ("forbidden", load(&c.http_forbidden)),
            ("throttled", load(&c.http_throttled)),
            ("connection_cap", load(&c.http_connection_cap)),
            ("tls_handshake", load(&c.http_tls_handshake_failures)),
        ],
    )
    .counter(
        "mooring_store_batches_total",
        "Group-commit transactions written",
        w.batches,
    )
    .gauge(
        "mooring_store_batch_latency_seconds_last",
        "Latency of the last group-commit batch",
        w.last_batch_latency_ms as f64 / 1000.0,
    )
    .counter(
        "mooring_store_batch_latency_seconds_sum_ms",
        "Sum of group-commit batch latencies, ms",
        w.total_batch_latency_ms,
    );
    e.finish()
}
