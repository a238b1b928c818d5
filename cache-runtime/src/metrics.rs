//! The counters through the `metrics` facade (feature `metrics`), so any
//! installed recorder (Prometheus, OpenTelemetry) picks them up:
//!
//! - `cache_runtime_calls_total{prefix, outcome}`: outcome is `hit`,
//!   `local_hit`, `miss`, `bypass`, `coalesced`, `refresh` or `renewal`;
//! - `cache_runtime_call_duration_seconds{prefix, outcome}`: a histogram of
//!   the cache's part of each call, up to its outcome;
//! - `cache_runtime_errors_total{kind}`: kind is `timeout`, `connection`,
//!   `server`, `breaker_open`, `decode`, `encode` or `oversize`.
//!
//! The `prefix` label takes at most [`Stats::MAX_PREFIXES`] values in a
//! process; later prefixes are labelled [`Stats::OTHER`], so prefixes built
//! from data cannot grow a recorder's series without end.

use crate::stats::Stats;
use std::collections::HashSet;
use std::sync::{LazyLock, RwLock};
use std::time::Duration;

/// The prefixes given a label of their own so far, process-wide like the
/// recorder.
static LABELLED: LazyLock<RwLock<HashSet<String>>> = LazyLock::new(RwLock::default);

/// The `prefix` label for `prefix`: itself, or `Stats::OTHER` once the cap
/// is reached.
fn prefix_label(prefix: &str) -> String {
    if let Ok(labelled) = LABELLED.read()
        && labelled.contains(prefix)
    {
        return prefix.to_owned();
    }
    let Ok(mut labelled) = LABELLED.write() else { return Stats::OTHER.to_owned() };
    if labelled.len() < Stats::MAX_PREFIXES {
        labelled.insert(prefix.to_owned());
    }
    if labelled.contains(prefix) { prefix.to_owned() } else { Stats::OTHER.to_owned() }
}

pub(crate) fn outcome(prefix: &str, outcome: &'static str, elapsed: Duration) {
    let labels = [("prefix", prefix_label(prefix)), ("outcome", outcome.to_owned())];
    metrics::counter!("cache_runtime_calls_total", &labels).increment(1);
    metrics::histogram!("cache_runtime_call_duration_seconds", &labels).record(elapsed.as_secs_f64());
}

pub(crate) fn error(kind: &'static str) {
    metrics::counter!("cache_runtime_errors_total", "kind" => kind).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_labels_are_capped() {
        let labels: HashSet<String> = (0..3 * Stats::MAX_PREFIXES).map(|n| prefix_label(&format!("dyn-{n}"))).collect();
        assert!(labels.len() <= Stats::MAX_PREFIXES + 1, "{} label values", labels.len());
        assert!(labels.contains(Stats::OTHER));
    }
}
