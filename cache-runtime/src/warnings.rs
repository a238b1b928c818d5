//! Warnings rate-limited per cause, so a dead Redis does not flood the logs.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Why the cache stepped aside; each cause is warned about on its own.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cause {
    NotInitialized,
    Redis,
    Decode,
    Encode,
    Oversize,
    Stale,
    /// A reply from Redis longer than any entry the cache stores.
    LongReply,
}

const CAUSES: usize = 7;
const INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(crate) struct Warnings {
    epoch: Instant,
    /// Per cause: seconds since `epoch` of the last warning, plus one (0: never).
    last: [AtomicU64; CAUSES],
    suppressed: [AtomicU64; CAUSES],
}

impl Default for Warnings {
    fn default() -> Self {
        Self { epoch: Instant::now(), last: Default::default(), suppressed: Default::default() }
    }
}

impl Warnings {
    /// Logs `message` unless this cause was logged in the last 30 seconds.
    pub(crate) fn warn(&self, cause: Cause, message: std::fmt::Arguments<'_>) {
        let slot = cause as usize;
        let now = self.epoch.elapsed().as_secs() + 1;
        let last = self.last[slot].load(Relaxed);
        let due = last == 0 || now >= last + INTERVAL.as_secs();
        if due && self.last[slot].compare_exchange(last, now, Relaxed, Relaxed).is_ok() {
            let suppressed = self.suppressed[slot].swap(0, Relaxed);
            tracing::warn!(target: "cache_runtime", cause = ?cause, suppressed, "{message}");
        } else {
            self.suppressed[slot].fetch_add(1, Relaxed);
        }
    }
}

/// Warnings for calls made before `init`, which have no cache to hold them.
pub(crate) static PROCESS_WARNINGS: std::sync::LazyLock<Warnings> = std::sync::LazyLock::new(Warnings::default);
