//! Counters, kept with relaxed atomics so counting costs the hit path
//! almost nothing.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub stale: AtomicU64,
    pub refreshes: AtomicU64,
    pub coalesced: AtomicU64,
    pub lock_waits: AtomicU64,
    pub lock_timeouts: AtomicU64,
    pub writes: AtomicU64,
    pub writes_skipped: AtomicU64,
    pub bypassed: AtomicU64,
    pub timeouts: AtomicU64,
    pub connection_errors: AtomicU64,
    pub server_errors: AtomicU64,
    pub breaker_rejections: AtomicU64,
    pub decode_errors: AtomicU64,
    pub encode_errors: AtomicU64,
    pub oversize: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

/// A snapshot of a cache's counters since it was built.
///
/// ```
/// use cache_runtime::Cache;
///
/// let cache = Cache::builder().url("redis://127.0.0.1:1").build().unwrap();
/// let stats = cache.stats();
/// assert_eq!(stats.hits + stats.misses, 0);
/// assert_eq!(stats.hit_rate(), 0.0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Calls answered from Redis.
    pub hits: u64,
    /// Calls that ran the function after looking in Redis.
    pub misses: u64,
    /// Misses whose entry existed but was bound to an older namespace version.
    pub stale: u64,
    /// Write-through computations (`refresh`), which neither hit nor miss.
    pub refreshes: u64,
    /// Calls answered by another caller's computation of the same key in
    /// this process (stampede protection), without a Redis round trip.
    pub coalesced: u64,
    /// Times a leader found another process computing the same key and
    /// waited for its value.
    pub lock_waits: u64,
    /// Callers that waited the whole lock timeout and then computed
    /// themselves.
    pub lock_timeouts: u64,
    /// Values stored.
    pub writes: u64,
    /// Values not stored because a namespace was invalidated while they were
    /// being computed, or a fresher entry was stored meanwhile.
    pub writes_skipped: u64,
    /// Calls that ran the function without asking Redis: not initialized, no
    /// TTL, breaker open, or Redis unreachable.
    pub bypassed: u64,
    /// Redis operations past their deadline.
    pub timeouts: u64,
    /// Redis operations that could not connect or lost the connection.
    pub connection_errors: u64,
    /// Redis operations the server refused (OOM, READONLY, WRONGTYPE).
    pub server_errors: u64,
    /// Redis operations skipped because the circuit breaker was open.
    pub breaker_rejections: u64,
    /// Stored values that could not be decoded: corrupt, foreign or written
    /// for another layout. Each was treated as a miss and overwritten.
    pub decode_errors: u64,
    /// Values or arguments that could not be encoded.
    pub encode_errors: u64,
    /// Values larger than `max_value_bytes`, returned but not stored.
    pub oversize: u64,
    /// Payload bytes read on hits.
    pub bytes_read: u64,
    /// Payload bytes written on misses.
    pub bytes_written: u64,
}

impl Stats {
    /// The share of lookups that did not run the function:
    /// `(hits + coalesced) / (hits + coalesced + misses)`, or 0 before any.
    pub fn hit_rate(&self) -> f64 {
        let served = self.hits + self.coalesced;
        let lookups = served + self.misses;
        if lookups == 0 { 0.0 } else { served as f64 / lookups as f64 }
    }

    /// All failed Redis operations and bad values, whatever the kind.
    pub fn errors(&self) -> u64 {
        self.timeouts
            + self.connection_errors
            + self.server_errors
            + self.breaker_rejections
            + self.decode_errors
            + self.encode_errors
    }
}

impl Counters {
    pub(crate) fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Relaxed);
        Stats {
            hits: get(&self.hits),
            misses: get(&self.misses),
            stale: get(&self.stale),
            refreshes: get(&self.refreshes),
            coalesced: get(&self.coalesced),
            lock_waits: get(&self.lock_waits),
            lock_timeouts: get(&self.lock_timeouts),
            writes: get(&self.writes),
            writes_skipped: get(&self.writes_skipped),
            bypassed: get(&self.bypassed),
            timeouts: get(&self.timeouts),
            connection_errors: get(&self.connection_errors),
            server_errors: get(&self.server_errors),
            breaker_rejections: get(&self.breaker_rejections),
            decode_errors: get(&self.decode_errors),
            encode_errors: get(&self.encode_errors),
            oversize: get(&self.oversize),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
        }
    }
}
