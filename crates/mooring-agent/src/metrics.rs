//! Metrics sources: the [`MetricsSource`] trait and the host sampler (load averages, memory, uptime via sysinfo).

use serde_json::{json, Map, Value};
use sysinfo::System;

/// Something that produces one telemetry object per metrics tick (without `seq`/`ts`; the
/// agent adds those). Production: [`HostSampler`]; the simulator supplies synthetic metrics.
pub trait MetricsSource: Send + 'static {
    fn sample(&mut self) -> Map<String, Value>;
}

impl MetricsSource for HostSampler {
    fn sample(&mut self) -> Map<String, Value> {
        HostSampler::sample(self)
    }
}

/// Samples the host this agent runs on.
pub struct HostSampler {
    sys: System,
}

impl std::fmt::Debug for HostSampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostSampler").finish_non_exhaustive()
    }
}

impl Default for HostSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl HostSampler {
    pub fn new() -> Self {
        Self { sys: System::new() }
    }

    /// One sample, without `seq`/`ts` (the agent adds those):
    /// `{"load": {"1m", "5m", "15m"}, "mem": {"used_bytes", "total_bytes"}, "uptime_secs"}`.
    pub fn sample(&mut self) -> Map<String, Value> {
        self.sys.refresh_memory();
        let load = System::load_average();
        let value = json!({
            "load": { "1m": finite(load.one), "5m": finite(load.five), "15m": finite(load.fifteen) },
            "mem": { "used_bytes": self.sys.used_memory(), "total_bytes": self.sys.total_memory() },
            "uptime_secs": System::uptime(),
        });
        match value {
            Value::Object(map) => map,
            _ => Map::new(),
        }
    }
}

/// Load averages are finite on every platform sysinfo supports; guard anyway, JSON has no NaN.
fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_is_valid_v1_telemetry_with_expected_points() {
        let mut s = HostSampler::new();
        let map = s.sample();
        let bytes = serde_json::to_vec(&Value::Object(map)).expect("serializes");
        let t = mooring_proto::telemetry::Telemetry::parse(&bytes).expect("valid v1 telemetry");
        let names: Vec<&str> = t.points.iter().map(|(n, _)| n.as_str()).collect();
        for want in [
            "load.1m",
            "load.5m",
            "load.15m",
            "mem.used_bytes",
            "mem.total_bytes",
            "uptime_secs",
        ] {
            assert!(names.contains(&want), "{want} missing from {names:?}");
        }
    }
}
