//! The cache: its settings, its parts, and the operations that change
//! entries outside a call (`invalidate`, forgetting one entry). The flow of
//! one cached call lives in `call/`.

use crate::builder::CacheBuilder;
use crate::compress::Compression;
use crate::connection::Connections;
use crate::error::Error;
use crate::flight::{Flights, Renewals};
use crate::keys::canonical::Unencodable;
use crate::keys::{CACHE_WIDE, KeyHash, check_namespace, entry_key, version_key};
use crate::local::{LocalTier, channel};
use crate::observe::{Event, note};
use crate::policy::Plan;
use crate::site::CacheView;
use crate::stats::{Registry, Stats};
use crate::store::{Backend, Redis};
use crate::warnings::Warnings;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::time::Duration;

static NEXT_CACHE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A cache: Redis (a connection pool), an optional in-process tier, a key
/// namespace and counters; or, built without a URL, the in-process tier
/// alone.
///
/// Cheap to clone (one `Arc`); clones share everything. Build one with
/// [`Cache::builder`], then either hand it to [`init`](crate::init) for
/// `#[cached]` functions or name it with `#[cached(cache = ...)]`.
///
/// ```
/// use cache_runtime::Cache;
///
/// let cache = Cache::builder().url("redis://127.0.0.1:6379").key_prefix("myapp").build()?;
/// let clone = cache.clone();
/// assert_eq!(clone.key_prefix(), "myapp");
/// # Ok::<(), cache_runtime::Error>(())
/// ```
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

struct Inner {
    topology: String,
    backend: Backend,
    /// The in-process tier: opted into, or the whole cache.
    local: Option<Arc<LocalTier>>,
    /// A listener task is alive (see `channel::Listener::running`).
    listening: Arc<AtomicBool>,
    /// Dropped with the cache, which stops the channel's subscriber.
    stop_listening: tokio::sync::watch::Sender<()>,
    renewals: Renewals,
    /// Bumped after every write this process makes or learns of
    /// (`invalidate`, a forget, a write-through, a channel message): a
    /// value no store checked is handed to coalesced callers only if it
    /// did not move while the value was computed.
    fence: Arc<AtomicU64>,
    key_prefix: String,
    default_ttl: Option<Duration>,
    lock_timeout: Duration,
    max_value_bytes: usize,
    compression: Compression,
    compress_threshold: usize,
    /// Tells caches apart in call sites' counter slots.
    id: u64,
    registry: Registry,
    warnings: Warnings,
    flights: Flights,
    purging: crate::purge::Purging,
}

pub(crate) struct Settings {
    /// What the cache is, for logs: the topology, URLs with passwords masked.
    pub topology: String,
    /// `None`: memory-only.
    pub remote: Option<(Connections, Vec<redis::Client>, Duration)>,
    /// How the local tier is bounded; `None`: no local tier.
    pub local: Option<crate::local::Bounds>,
    pub key_prefix: String,
    pub default_ttl: Option<Duration>,
    pub lock_timeout: Duration,
    pub max_value_bytes: usize,
    /// How payloads of at least `compress_threshold` bytes are stored.
    pub compression: Compression,
    pub compress_threshold: usize,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("topology", &self.inner.topology)
            .field("key_prefix", &self.inner.key_prefix)
            .field("default_ttl", &self.inner.default_ttl)
            .field("connections", &self.inner.backend.redis().map(|r| &r.connections))
            .field("local", &self.inner.local)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Starts configuring a cache.
    ///
    /// ```
    /// let builder = cache_runtime::Cache::builder().url("redis://127.0.0.1:6379");
    /// assert!(builder.build().is_ok());
    /// ```
    pub fn builder() -> CacheBuilder {
        CacheBuilder::default()
    }

    pub(crate) fn from_settings(settings: Settings) -> Self {
        let backend = match settings.remote {
            Some((connections, channel_nodes, connect_timeout)) => Backend::Redis(Redis {
                connections: Arc::new(connections),
                batcher: Arc::default(),
                channel: channel::Channel::new(&settings.key_prefix),
                channel_nodes: channel_nodes.into(),
                connect_timeout,
            }),
            None => Backend::Memory,
        };
        let needs_channel = matches!(backend, Backend::Redis(_));
        let local = settings.local.map(|bounds| Arc::new(LocalTier::new(bounds, needs_channel)));
        Self {
            inner: Arc::new(Inner {
                topology: settings.topology,
                backend,
                local,
                listening: Arc::default(),
                stop_listening: tokio::sync::watch::channel(()).0,
                renewals: Renewals::default(),
                fence: Arc::default(),
                key_prefix: settings.key_prefix,
                default_ttl: settings.default_ttl,
                lock_timeout: settings.lock_timeout,
                max_value_bytes: settings.max_value_bytes,
                compression: settings.compression,
                compress_threshold: settings.compress_threshold,
                id: NEXT_CACHE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                registry: Registry::default(),
                warnings: Warnings::default(),
                flights: Flights::default(),
                purging: Default::default(),
            }),
        }
    }

    /// The application namespace that starts every key.
    pub fn key_prefix(&self) -> &str {
        &self.inner.key_prefix
    }

    /// A snapshot of this cache's counters.
    ///
    /// ```
    /// let cache = cache_runtime::Cache::builder().url("redis://127.0.0.1:6379").build()?;
    /// assert_eq!(cache.stats().total.hits, 0);
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    pub fn stats(&self) -> Stats {
        let mut stats = self.inner.registry.snapshot();
        if let Some(local) = &self.inner.local {
            stats.total.local_evictions += local.evictions();
            (stats.local.entries, stats.local.bytes) = local.size();
        }
        stats.in_flight.computations = self.inner.flights.len() as u64;
        if let Backend::Redis(remote) = &self.inner.backend {
            (stats.in_flight.redis_operations, stats.in_flight.breaker_probe) = remote.connections.in_flight();
            (stats.in_flight.lookups, stats.in_flight.queued_lookups) = remote.batcher.in_flight();
        }
        stats
    }

    /// True for a cache built without a Redis URL: entries live in this
    /// process only.
    ///
    /// ```
    /// let cache = cache_runtime::Cache::builder().build()?;
    /// assert!(cache.is_memory_only());
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    pub fn is_memory_only(&self) -> bool {
        matches!(self.inner.backend, Backend::Memory)
    }

    /// Makes every entry of `namespace` stale, in this process and every
    /// other one using the same Redis and key prefix, by bumping the
    /// namespace's version: one atomic command, no scan. Returns the new
    /// version. Local tiers drop the namespace's entries as the
    /// announcement reaches them; this process's at once.
    ///
    /// A namespace is a `prefix` or a `tags(...)` name of `#[cached]`. Old
    /// entries are never returned again and expire by their TTL.
    ///
    /// Unlike cached calls, this reports failure: when it returns `Err`,
    /// other processes may still serve the old entries until their TTL
    /// ends, so retry or surface the error on the write path.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), cache_runtime::Error> {
    /// let cache = cache_runtime::Cache::builder().build()?; // memory-only
    /// let before = cache.invalidate("products").await?;
    /// assert_eq!(cache.invalidate("products").await?, before + 1);
    /// # Ok(()) }
    /// ```
    pub async fn invalidate(&self, namespace: &str) -> Result<u64, Error> {
        check_namespace(namespace).map_err(Error::InvalidConfig)?;
        self.bump_version(namespace).await
    }

    /// Makes every entry of this cache stale (every prefix, every tag,
    /// and the pages of a [`CacheLayer`](crate::CacheLayer) on it), in this
    /// process and every other one using the same Redis and key prefix:
    /// one atomic command, no scan, whatever the number of entries. Every
    /// entry is bound to a cache-wide namespace besides its own, and this
    /// bumps its version, as [`invalidate`](Self::invalidate) does a
    /// namespace's, with the same promise: once it returns `Ok`, no caller
    /// in any process gets an entry stored before it, and a computation
    /// that began before it is not stored.
    ///
    /// Old entries stay in Redis until their TTL ends;
    /// [`purge`](Self::purge) deletes them sooner. A memory-only cache
    /// empties its tier.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), cache_runtime::Error> {
    /// let cache = cache_runtime::Cache::builder().build()?; // memory-only
    /// cache.clear().await?;
    /// # Ok(()) }
    /// ```
    pub async fn clear(&self) -> Result<(), Error> {
        self.bump_version(CACHE_WIDE).await.map(drop)
    }

    async fn bump_version(&self, namespace: &str) -> Result<u64, Error> {
        let Backend::Redis(redis) = &self.inner.backend else {
            let epoch = self.inner.local.as_ref().map_or(0, |local| local.invalidate(namespace));
            self.bump_fence();
            return Ok(epoch);
        };
        // After the bump, so that a read that began before it cannot fill
        // the local tier with what it read; on drop, so that a caller
        // cancelled once Redis had the bump does not leave this process's
        // tier serving what it invalidated (this process ignores its own
        // channel messages).
        let _after = AfterWrite { cache: self, forgets: Forgets::Namespace(namespace) };
        let outcome = redis.invalidate(&version_key(self.key_prefix(), namespace), namespace).await;
        outcome.map_err(|fault| self.write_failed(fault))
    }

    /// Deletes one entry; for `forget(f(args))` and [`Cache::forget`].
    pub(crate) async fn forget_entry(&self, plan: &Plan<'_>, key: Result<KeyHash, Unencodable>) -> Result<bool, Error> {
        let hash = key.map_err(|e| Error::Encode(e.to_string()))?;
        check_namespace(plan.prefix).map_err(Error::InvalidConfig)?;
        let held_locally = self.inner.local.as_ref().is_some_and(|local| local.forget(&hash));
        // Again after Redis, even if this call is dropped there: a reader
        // that read the entry before it was replaced must not keep it in
        // this process's tier.
        let _after = AfterWrite { cache: self, forgets: Forgets::Entry(hash) };
        match &self.inner.backend {
            Backend::Redis(redis) => {
                let entry = entry_key(self.key_prefix(), plan.prefix, hash);
                redis.forget(&entry, hash, self.tombstone_ttl(plan)).await.map_err(|fault| self.write_failed(fault))
            }
            Backend::Memory => Ok(held_locally),
        }
    }

    /// How long a tombstone left at one of `plan`'s entries lives: longer
    /// than any computation that could still store what it read before
    /// the tombstone: an entry's life, or a lock's.
    pub(crate) fn tombstone_ttl(&self, plan: &Plan<'_>) -> Duration {
        let ttl = plan.ttl.or(self.default_ttl()).unwrap_or_default().max(self.lock_timeout());
        ttl.saturating_add(plan.stale_if_error.unwrap_or_default())
    }

    /// The write fence; see `Inner::fence`.
    pub(crate) fn fence(&self) -> u64 {
        self.inner.fence.load(SeqCst)
    }

    pub(crate) fn bump_fence(&self) {
        self.inner.fence.fetch_add(1, SeqCst);
    }

    /// A write path's failure: counted outside any prefix, and returned.
    fn write_failed(&self, fault: crate::error::Fault) -> Error {
        note(&self.inner.registry.general, &self.inner.warnings, Event::Fault(&fault));
        Error::from(fault)
    }

    /// The local tier, when this plan uses it, and how long it may keep an
    /// entry. The first use starts listening for other processes'
    /// invalidations.
    pub(crate) fn local_for(&self, plan: &Plan<'_>) -> Option<(&LocalTier, Duration)> {
        let local = self.inner.local.as_deref()?;
        let Backend::Redis(remote) = &self.inner.backend else { return Some((local, Duration::MAX)) };
        let keep_for = plan.local_ttl?;
        if !self.inner.listening.load(Relaxed) && !self.inner.listening.swap(true, Relaxed) {
            let tier = self.inner.local.as_ref()?;
            if remote.channel_nodes.is_empty() {
                tracing::warn!(
                    target: "cache_runtime",
                    "the local tier needs a direct Redis URL for its invalidation channel; behind Sentinel it stays unused"
                );
                return Some((local, keep_for));
            }
            let listener = channel::Listener {
                tier: Arc::downgrade(tier),
                fence: self.inner.fence.clone(),
                running: self.inner.listening.clone(),
            };
            let started = channel::listen(
                listener,
                remote.channel_nodes.clone(),
                remote.channel.clone(),
                remote.connect_timeout.max(remote.connections.longest_round_trip()),
                self.inner.stop_listening.subscribe(),
            );
            if !started {
                // No runtime here: try again on a later call.
                self.inner.listening.store(false, Relaxed);
            }
        }
        Some((local, keep_for))
    }

    pub(crate) fn renewals(&self) -> &Renewals {
        &self.inner.renewals
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub(crate) fn view(&self) -> CacheView<'_> {
        CacheView {
            id: self.inner.id,
            key_prefix: &self.inner.key_prefix,
            registry: &self.inner.registry,
            local: self.inner.local.as_deref(),
        }
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    pub(crate) fn warnings(&self) -> &Warnings {
        &self.inner.warnings
    }

    pub(crate) fn flights(&self) -> &Flights {
        &self.inner.flights
    }

    pub(crate) fn purging(&self) -> &crate::purge::Purging {
        &self.inner.purging
    }

    pub(crate) fn default_ttl(&self) -> Option<Duration> {
        self.inner.default_ttl
    }

    pub(crate) fn lock_timeout(&self) -> Duration {
        self.inner.lock_timeout
    }

    pub(crate) fn max_value_bytes(&self) -> usize {
        self.inner.max_value_bytes
    }

    /// How a payload is stored: `plan`'s compression, else the cache's;
    /// and from how many bytes on.
    pub(crate) fn compression(&self, plan: Option<Compression>) -> (Compression, usize) {
        (plan.unwrap_or(self.inner.compression), self.inner.compress_threshold)
    }
}

/// What a write path does to this process after Redis, when it returns or
/// is dropped: the local tier forgets, and the write fence moves.
struct AfterWrite<'c> {
    cache: &'c Cache,
    forgets: Forgets<'c>,
}

enum Forgets<'c> {
    Namespace(&'c str),
    Entry(KeyHash),
}

impl Drop for AfterWrite<'_> {
    fn drop(&mut self) {
        if let Some(local) = &self.cache.inner.local {
            match &self.forgets {
                Forgets::Namespace(namespace) => {
                    local.invalidate(namespace);
                }
                Forgets::Entry(hash) => {
                    local.forget(hash);
                }
            }
        }
        self.cache.bump_fence();
    }
}
