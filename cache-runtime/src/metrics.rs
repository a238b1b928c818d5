//! The counters through the `metrics` facade (feature `metrics`), so any
//! installed recorder (Prometheus, OpenTelemetry) picks them up:
//!
//! - `cache_runtime_calls_total{prefix, outcome}`: outcome is `hit`,
//!   `local_hit`, `miss`, `bypass`, `coalesced`, `refresh` or `renewal`;
//! - `cache_runtime_call_duration_seconds{prefix, outcome}`: a histogram of
//!   the cache's part of each call, up to its outcome;
//! - `cache_runtime_errors_total{kind}`: kind is `timeout`, `connection`,
//!   `server`, `breaker_open`, `decode`, `encode` or `oversize`.

use std::time::Duration;

pub(crate) fn outcome(prefix: &str, outcome: &'static str, elapsed: Duration) {
    let labels = [("prefix", prefix.to_owned()), ("outcome", outcome.to_owned())];
    metrics::counter!("cache_runtime_calls_total", &labels).increment(1);
    metrics::histogram!("cache_runtime_call_duration_seconds", &labels).record(elapsed.as_secs_f64());
}

pub(crate) fn error(kind: &'static str) {
    metrics::counter!("cache_runtime_errors_total", "kind" => kind).increment(1);
}
