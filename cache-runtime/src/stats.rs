//! Counters: one set of relaxed atomics per prefix, found without a lock
//! on the hit path, summed only when someone asks for a snapshot.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// The live counters of one prefix.
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $( pub $name: AtomicU64, )*
        }

        /// The counts of one prefix, or of all of them.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Counts {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl Counters {
            fn snapshot(&self) -> Counts {
                Counts { $( $name: self.$name.load(Relaxed), )* }
            }
        }

        impl std::ops::AddAssign for Counts {
            fn add_assign(&mut self, other: Counts) {
                $( self.$name += other.$name; )*
            }
        }
    };
}

counters! {
    /// Calls answered from the cache: from Redis or from the local tier.
    hits,
    /// Of `hits`, those answered from the in-process tier, with no network.
    local_hits,
    /// Calls that looked in Redis, found no usable entry, and ran the function.
    misses,
    /// Calls that ran the function without asking Redis: Redis unreachable
    /// or refused by the breaker, no TTL, or an argument that cannot be encoded.
    bypassed,
    /// Calls answered by another caller's computation of the same key in this
    /// process (stampede protection), without a Redis round trip.
    coalesced,
    /// Write-through calls (`refresh`), which compute whatever is stored.
    refreshes,
    /// Background recomputations started by `refresh_ahead`.
    renewals,
    /// Calls whose function returned an error and that got the stale copy
    /// `stale_if_error` kept instead.
    stale_served,
    /// Times the function body ran: misses, bypasses, refreshes, renewals.
    computations,
    /// Misses whose entry existed but was bound to an older namespace version.
    stale,
    /// Times a leader found another process computing the same key and waited.
    lock_waits,
    /// Callers that waited the whole lock timeout, then computed themselves.
    lock_timeouts,
    /// Values stored.
    writes,
    /// Values not stored because a namespace was invalidated while they were
    /// being computed, or a fresher entry was stored meanwhile. (On one
    /// server, a miss's value that nobody waited for and no local tier
    /// keeps is written without reading the versions back: stored bound to
    /// the versions it was computed under, which no reader takes once they
    /// changed, it counts as a write.)
    writes_skipped,
    /// Redis operations past their deadline.
    timeouts,
    /// Redis operations that could not connect or lost the connection.
    connection_errors,
    /// Redis operations the server refused (OOM, READONLY, NOPERM).
    server_errors,
    /// Redis operations skipped because the circuit breaker was open.
    breaker_rejections,
    /// Stored values that could not be decoded: corrupt, foreign or written
    /// for another layout. Each was treated as a miss and replaced.
    decode_errors,
    /// Values or arguments that could not be encoded.
    encode_errors,
    /// Values larger than `max_value_bytes`, returned but not stored.
    oversize,
    /// Calls that could not use the cache because of how their call site or
    /// the cache is set up: no `ttl` and no `default_ttl`, an invalid
    /// namespace, `local = true` on a cache without a local tier, or a type
    /// that does not decode what its codec encoded. The first of each call
    /// site is logged at error level with the reason.
    misconfigured,
    /// Entries the local tier dropped to stay within its capacity.
    local_evictions,
    /// Payload bytes read on hits, as encoded (after decompression).
    bytes_read,
    /// Payload bytes written on misses, as encoded (before compression).
    bytes_written,
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Relaxed);
}

pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Relaxed);
}

impl Counts {
    /// The share of calls answered without running the function:
    /// `(hits + coalesced) / (hits + coalesced + misses + bypassed)`, or 0
    /// before any call.
    ///
    /// ```
    /// let counts = cache_runtime::Counts::default();
    /// assert_eq!(counts.hit_rate(), 0.0);
    /// ```
    pub fn hit_rate(&self) -> f64 {
        let served = self.hits + self.coalesced;
        let calls = served + self.misses + self.bypassed;
        if calls == 0 { 0.0 } else { served as f64 / calls as f64 }
    }

    /// Failed Redis operations and bad values, whatever the kind.
    pub fn errors(&self) -> u64 {
        self.timeouts
            + self.connection_errors
            + self.server_errors
            + self.breaker_rejections
            + self.decode_errors
            + self.encode_errors
    }
}

/// A snapshot of a cache's counters: in total, and per prefix.
///
/// At most [`Stats::MAX_PREFIXES`] prefixes are counted apart (a
/// [`Policy`](crate::Policy) prefix built from data could otherwise grow
/// the registry without end); calls of later prefixes are counted together
/// under [`Stats::OTHER`], a name no namespace can have. The `prefix` label
/// of the `metrics` feature is capped the same way.
///
/// ```
/// use cache_runtime::Cache;
///
/// let cache = Cache::builder().url("redis://127.0.0.1:6379").build()?;
/// let stats = cache.stats();
/// assert_eq!(stats.total.hits, 0);
/// assert_eq!(stats.hit_rate(), 0.0);
/// assert!(stats.prefix("products").is_none());
/// # Ok::<(), cache_runtime::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Everything this cache counted, including events outside any prefix
    /// (such as a failed `invalidate`).
    pub total: Counts,
    /// Per prefix (the `prefix` of `#[cached]` or of a `Policy`).
    pub prefixes: BTreeMap<String, Counts>,
    /// What was under way when the snapshot was taken.
    pub in_flight: InFlight,
    /// What the local tier holds (zero without one).
    pub local: TierSize,
}

/// What a cache's local tier holds at the moment of a [`Stats`] snapshot:
/// entries, and their weight in bytes as
/// [`CacheBuilder::local_bytes`](crate::CacheBuilder::local_bytes) counts
/// it (each payload plus a fixed overhead), whether or not the tier is
/// bounded in bytes. Taking the snapshot applies the evictions the tier
/// had pending, so the figures are exact at that moment.
///
/// ```
/// let cache = cache_runtime::Cache::builder().local_bytes(1 << 20).build()?;
/// let size = cache.stats().local;
/// assert_eq!((size.entries, size.bytes), (0, 0));
/// # Ok::<(), cache_runtime::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TierSize {
    /// Entries held.
    pub entries: u64,
    /// What they weigh: payloads plus the per-entry overhead.
    pub bytes: u64,
}

/// Work under way at the moment of a [`Stats`] snapshot. Once callers are
/// done (or have given up: a dropped call gives back whatever it held),
/// everything here is back to zero.
///
/// ```
/// let cache = cache_runtime::Cache::builder().url("redis://127.0.0.1:6379").build()?;
/// let in_flight = cache.stats().in_flight;
/// assert_eq!(in_flight, cache_runtime::InFlight::default());
/// assert!(!in_flight.breaker_probe);
/// # Ok::<(), cache_runtime::Error>(())
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InFlight {
    /// Redis operations started and not yet finished.
    pub redis_operations: u64,
    /// Lookups on the wire that later lookups may batch behind.
    pub lookups: u64,
    /// Lookups queued for the next batched `MGET`.
    pub queued_lookups: u64,
    /// Keys being computed by a caller of this process that others wait on
    /// (stampede protection's in-process part).
    pub computations: u64,
    /// Whether the circuit breaker has let one call through to probe Redis
    /// and is waiting for its outcome.
    pub breaker_probe: bool,
}

impl Stats {
    /// Prefixes counted apart, per cache; later ones go to [`OTHER`](Self::OTHER).
    ///
    /// ```
    /// assert_eq!(cache_runtime::Stats::MAX_PREFIXES, 1000);
    /// ```
    pub const MAX_PREFIXES: usize = 1000;

    /// Where the prefixes past [`MAX_PREFIXES`](Self::MAX_PREFIXES) are
    /// counted: `#` cannot appear in a namespace, so no prefix is named so.
    ///
    /// ```
    /// let stats = cache_runtime::stats();
    /// assert!(stats.prefix(cache_runtime::Stats::OTHER).is_none());
    /// ```
    pub const OTHER: &'static str = "#other";

    /// The hit rate of all calls; see [`Counts::hit_rate`].
    pub fn hit_rate(&self) -> f64 {
        self.total.hit_rate()
    }

    /// The counts of one prefix, if it has been called.
    pub fn prefix(&self, prefix: &str) -> Option<&Counts> {
        self.prefixes.get(prefix)
    }
}

/// Every prefix's counters, plus those for events outside any prefix.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    by_prefix: RwLock<HashMap<String, Arc<Counters>>>,
    pub general: Counters,
}

impl Registry {
    pub(crate) fn of(&self, prefix: &str) -> Arc<Counters> {
        if let Ok(map) = self.by_prefix.read()
            && let Some(counters) = map.get(prefix)
        {
            return counters.clone();
        }
        match self.by_prefix.write() {
            Ok(mut map) => {
                // One more than the cap: the named prefixes, and `OTHER`.
                let key =
                    if map.len() < Stats::MAX_PREFIXES || map.contains_key(prefix) { prefix } else { Stats::OTHER };
                map.entry(key.to_owned()).or_default().clone()
            }
            // A poisoned map only loses per-prefix detail.
            Err(_) => Arc::default(),
        }
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let mut stats = Stats { total: self.general.snapshot(), prefixes: BTreeMap::new(), ..Stats::default() };
        if let Ok(map) = self.by_prefix.read() {
            for (prefix, counters) in map.iter() {
                let counts = counters.snapshot();
                stats.total += counts;
                stats.prefixes.insert(prefix.clone(), counts);
            }
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_the_prefixes() {
        let registry = Registry::default();
        bump(&registry.of("a").hits);
        bump(&registry.of("a").hits);
        bump(&registry.of("b").misses);
        bump(&registry.general.timeouts);
        let stats = registry.snapshot();
        assert_eq!(stats.prefix("a").map(|c| c.hits), Some(2));
        assert_eq!((stats.total.hits, stats.total.misses, stats.total.timeouts), (2, 1, 1));
        assert!((stats.hit_rate() - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn prefixes_past_the_cap_are_counted_together() {
        let registry = Registry::default();
        for n in 0..3 * Stats::MAX_PREFIXES {
            bump(&registry.of(&format!("report-{n}")).misses);
        }
        let stats = registry.snapshot();
        assert!(stats.prefixes.len() <= Stats::MAX_PREFIXES + 1, "{} prefixes", stats.prefixes.len());
        assert_eq!(stats.total.misses, 3 * Stats::MAX_PREFIXES as u64, "nothing is lost");
        assert_eq!(stats.prefix(Stats::OTHER).map(|c| c.misses), Some(2 * Stats::MAX_PREFIXES as u64));
        assert_eq!(stats.prefix("report-0").map(|c| c.misses), Some(1), "early prefixes keep their own");
    }
}
