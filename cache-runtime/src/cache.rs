//! The cache: its settings, counters, and public operations. The flow of
//! one cached call lives in `flow.rs`.

use crate::batch::Batcher;
use crate::body::Now;
use crate::builder::CacheBuilder;
use crate::canonical::Unencodable;
use crate::channel::{self, Channel};
use crate::codec::{Codec, CodecError};
use crate::connection::Connections;
use crate::error::{Error, Fault};
use crate::flight::Flights;
use crate::key::{KeyHash, KeyHasher, entry_key, version_key};
use crate::local::LocalTier;
use crate::policy::{Policy, check_namespace};
use crate::private::ResultOutput;
use crate::scripts::{self, fresh_seed};
use crate::site::{CacheView, SiteSlot};
use crate::stats::{Counters, Registry, Stats, bump};
use crate::warnings::{Cause, Warnings};
use serde::{Serialize, de::DeserializeOwned};
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// `None`: a memory-only cache.
    remote: Option<Remote>,
    /// The in-process tier: opted into, or the whole cache.
    local: Option<Arc<LocalTier>>,
    channel: Channel,
    listening: AtomicBool,
    /// Dropped with the cache, which stops the channel's subscriber.
    stop_listening: tokio::sync::watch::Sender<()>,
    /// Keys with a refresh-ahead under way, or failed recently: until when
    /// no other one starts.
    renewing: Mutex<HashMap<KeyHash, Instant>>,
    key_prefix: String,
    default_ttl: Option<Duration>,
    lock_timeout: Duration,
    max_value_bytes: usize,
    /// Tells caches apart in call sites' counter slots.
    id: u64,
    registry: Registry,
    warnings: Warnings,
    flights: Flights,
}

struct Remote {
    connections: Arc<Connections>,
    batcher: Arc<Batcher>,
    /// The nodes the invalidation channel may subscribe on, tried in turn:
    /// the server, or every cluster node; none behind Sentinel, where the
    /// local tier stays unused.
    channel_nodes: Arc<[redis::Client]>,
    connect_timeout: Duration,
}

pub(crate) struct Settings {
    /// `None`: memory-only.
    pub remote: Option<(Connections, Vec<redis::Client>, Duration)>,
    /// Entries the local tier holds; `None`: no local tier.
    pub local_capacity: Option<u64>,
    pub key_prefix: String,
    pub default_ttl: Option<Duration>,
    pub lock_timeout: Duration,
    pub max_value_bytes: usize,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("key_prefix", &self.inner.key_prefix)
            .field("default_ttl", &self.inner.default_ttl)
            .field("connections", &self.inner.remote.as_ref().map(|r| &r.connections))
            .field("local", &self.inner.local)
            .finish_non_exhaustive()
    }
}

/// What one call site asks of the cache.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan<'a> {
    pub prefix: &'a str,
    pub tags: &'a [Cow<'static, str>],
    pub ttl: Option<Duration>,
    pub jitter: f64,
    pub codec: Codec,
    /// Stampede protection: one computation per key at a time.
    pub lock: bool,
    /// How long callers wait for another's computation; `None`: the cache's.
    pub lock_timeout: Option<Duration>,
    /// Where the call site keeps its prefix's counters.
    pub slot: &'a SiteSlot,
    /// Use the local tier, keeping entries at most this long there.
    pub local_ttl: Option<Duration>,
    /// Renew an entry in the background once this share of its TTL has
    /// passed; 0: never.
    pub refresh_ahead: f64,
    /// Keep a stale copy this long past the TTL, for when computing fails.
    pub stale_if_error: Option<Duration>,
}

/// The stored TTL: uniform in `[ttl*(1-jitter), ttl*(1+jitter)]`, in ms.
pub(crate) fn jittered_ttl_ms(ttl: Duration, jitter: f64) -> u64 {
    let base = ttl.as_millis() as f64;
    let factor = if jitter > 0.0 { rand::random_range((1.0 - jitter)..=(1.0 + jitter)) } else { 1.0 };
    ((base * factor).round() as u64).max(1)
}

/// How a call's output maps to the value that is stored.
///
/// Implemented for `Result<T, E>` (only `Ok(T)` is stored) and for any
/// other type (stored as is); `#[cached]` picks one by the return type.
pub trait OutputKind<R> {
    /// The stored part of the output.
    type Value;
    /// The part to store, or `None` when this output must not be cached.
    fn stored(output: &R) -> Option<&Self::Value>;
    /// Rebuilds the output from a stored value.
    fn from_stored(value: Self::Value) -> R;
}

pub(crate) type Encoded = Result<Vec<u8>, CodecError>;

/// How outputs of type `R` are encoded and decoded: the serde bounds,
/// resolved once into two function pointers.
pub struct Storage<R> {
    /// `None`: this output is not stored (an `Err`).
    pub(crate) encode: fn(&R, Codec) -> Option<Encoded>,
    pub(crate) decode: fn(&[u8], Codec) -> Result<R, CodecError>,
    /// Whether this output would be stored, without encoding it.
    pub(crate) cacheable: fn(&R) -> bool,
}

impl<R> Clone for Storage<R> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<R> Copy for Storage<R> {}

impl<R> Storage<R> {
    pub(crate) fn of<K>() -> Self
    where
        K: OutputKind<R>,
        K::Value: Serialize + DeserializeOwned,
    {
        fn encode<R, K>(output: &R, codec: Codec) -> Option<Encoded>
        where
            K: OutputKind<R>,
            K::Value: Serialize,
        {
            K::stored(output).map(|value| codec.encode(value))
        }
        fn decode<R, K>(payload: &[u8], codec: Codec) -> Result<R, CodecError>
        where
            K: OutputKind<R>,
            K::Value: DeserializeOwned,
        {
            codec.decode::<K::Value>(payload).map(K::from_stored)
        }
        fn cacheable<R, K: OutputKind<R>>(output: &R) -> bool {
            K::stored(output).is_some()
        }
        Self { encode: encode::<R, K>, decode: decode::<R, K>, cacheable: cacheable::<R, K> }
    }
}

impl Plan<'_> {
    /// The prefix, then the tags.
    pub(crate) fn namespaces(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.prefix).chain(self.tags.iter().map(|tag| &**tag))
    }
}

/// Whether a call may answer from an existing entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Intent {
    /// Cache-aside: a usable entry is returned.
    Read,
    /// Write-through: compute anyway and overwrite.
    Refresh,
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
        let memory_only = settings.remote.is_none();
        let remote = settings.remote.map(|(connections, channel_nodes, connect_timeout)| Remote {
            connections: Arc::new(connections),
            batcher: Arc::default(),
            channel_nodes: channel_nodes.into(),
            connect_timeout,
        });
        let local = settings.local_capacity.map(|capacity| Arc::new(LocalTier::new(capacity, !memory_only)));
        Self {
            inner: Arc::new(Inner {
                remote,
                local,
                channel: Channel::new(&settings.key_prefix),
                listening: AtomicBool::new(false),
                stop_listening: tokio::sync::watch::channel(()).0,
                renewing: Mutex::default(),
                key_prefix: settings.key_prefix,
                default_ttl: settings.default_ttl,
                lock_timeout: settings.lock_timeout,
                max_value_bytes: settings.max_value_bytes,
                id: NEXT_CACHE_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                registry: Registry::default(),
                warnings: Warnings::default(),
                flights: Flights::default(),
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
        }
        stats.in_flight.computations = self.inner.flights.len() as u64;
        if let Some(remote) = &self.inner.remote {
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
        self.inner.remote.is_none()
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
        let Some(remote) = &self.inner.remote else {
            return Ok(self.inner.local.as_ref().map_or(0, |local| local.invalidate(namespace)));
        };
        let key = version_key(self.key_prefix(), namespace);
        let mut invocation = scripts::INVALIDATE.key(&key);
        invocation.arg(fresh_seed()).arg(&self.inner.channel.name).arg(self.inner.channel.namespace_message(namespace));
        let outcome = remote.connections.run_unguarded(|conn| conn.invoke::<u64>(&invocation)).await;
        // After the bump, so that a read that began before it cannot fill
        // the local tier with what it read.
        if let Some(local) = &self.inner.local {
            local.invalidate(namespace);
        }
        outcome.map_err(|fault| {
            self.note_fault(&self.inner.registry.general, &fault);
            Error::from(fault)
        })
    }

    /// Cache-aside for code where the attribute does not fit: returns the
    /// cached value for `key` in `policy`'s namespace, or awaits `compute`
    /// and stores its `Ok`. Same keys, versions, TTL, jitter and failure
    /// handling as `#[cached]`: when Redis is unavailable this is just
    /// `compute.await`.
    ///
    /// The entry is identified by the namespace, `key`, `T` and the
    /// policy's version.
    ///
    /// ```no_run
    /// use cache_runtime::{Cache, Policy};
    /// use std::time::Duration;
    ///
    /// # async fn load_report(_: &str, _: u32) -> Result<Vec<u64>, std::io::Error> { Ok(vec![]) }
    /// # async fn demo(cache: Cache) -> Result<(), std::io::Error> {
    /// let policy = Policy::new("reports").ttl(Duration::from_secs(300)).tags(["orders"]);
    /// let (region, year) = ("emea", 2026);
    /// let report = cache.get_or_compute(&policy, &(region, year), load_report(region, year)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn get_or_compute<K, T, E, F>(&self, policy: &Policy, key: &K, compute: F) -> Result<T, E>
    where
        K: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: Future<Output = Result<T, E>>,
    {
        self.programmatic(policy, key, Intent::Read, compute).await
    }

    /// Write-through for [`get_or_compute`](Self::get_or_compute) entries:
    /// awaits `compute` and stores its `Ok` over any existing entry.
    ///
    /// ```no_run
    /// # use cache_runtime::{Cache, Policy};
    /// # async fn demo(cache: Cache) {
    /// let policy = Policy::new("profiles");
    /// let fresh = cache.refresh(&policy, &42u64, async { Ok::<_, std::io::Error>("new name".to_owned()) }).await;
    /// # }
    /// ```
    pub async fn refresh<K, T, E, F>(&self, policy: &Policy, key: &K, compute: F) -> Result<T, E>
    where
        K: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: Future<Output = Result<T, E>>,
    {
        self.programmatic(policy, key, Intent::Refresh, compute).await
    }

    /// The flow of `#[cached]`, for a `Result` computed under a `Policy`.
    async fn programmatic<K, T, E, F>(&self, policy: &Policy, key: &K, intent: Intent, compute: F) -> Result<T, E>
    where
        K: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
        F: Future<Output = Result<T, E>>,
    {
        let hash = programmatic_key::<K, T>(policy, key);
        self.fetch_or_compute(&policy.plan(), hash, Storage::of::<ResultOutput<T, E>>(), intent, Now(compute)).await
    }

    /// Deletes the [`get_or_compute`](Self::get_or_compute) entry of `key`
    /// holding a `T`. Returns whether there was one.
    ///
    /// ```no_run
    /// # use cache_runtime::{Cache, Policy};
    /// # async fn demo(cache: Cache) -> Result<(), cache_runtime::Error> {
    /// let existed = cache.forget::<_, String>(&Policy::new("profiles"), &42u64).await?;
    /// # Ok(()) }
    /// ```
    pub async fn forget<K, T>(&self, policy: &Policy, key: &K) -> Result<bool, Error>
    where
        K: Serialize + ?Sized,
        T: Serialize + DeserializeOwned,
    {
        let hash = programmatic_key::<K, T>(policy, key);
        self.forget_entry(&policy.plan(), hash).await
    }

    /// Deletes one entry; for `forget(f(args))` and [`Cache::forget`].
    pub(crate) async fn forget_entry(&self, plan: &Plan<'_>, key: Result<KeyHash, Unencodable>) -> Result<bool, Error> {
        let hash = key.map_err(|e| Error::Encode(e.to_string()))?;
        check_namespace(plan.prefix).map_err(Error::InvalidConfig)?;
        let held_locally = self.inner.local.as_ref().is_some_and(|local| local.forget(&hash));
        let Some(remote) = &self.inner.remote else { return Ok(held_locally) };
        let entry = entry_key(self.key_prefix(), plan.prefix, hash);
        let mut invocation = scripts::FORGET.key(&entry);
        invocation.arg(&self.inner.channel.name).arg(self.inner.channel.entry_message(hash));
        let outcome = remote.connections.run_unguarded(|conn| conn.invoke::<u64>(&invocation)).await;
        let deleted = outcome.map_err(|fault| {
            self.note_fault(&self.inner.registry.general, &fault);
            Error::from(fault)
        })?;
        Ok(deleted > 0)
    }

    /// The local tier, when this plan uses it, and how long it may keep an
    /// entry. The first use starts listening for other processes'
    /// invalidations.
    pub(crate) fn local_for(&self, plan: &Plan<'_>) -> Option<(&LocalTier, Duration)> {
        let Some(local) = self.inner.local.as_deref() else {
            if plan.local_ttl.is_some() {
                self.warn(
                    Cause::NoLocalTier,
                    format_args!(
                        "prefix `{}` asks for the local tier, but the cache has none: enable it with \
                         Cache::builder().local(capacity)",
                        plan.prefix
                    ),
                );
            }
            return None;
        };
        let Some(remote) = &self.inner.remote else { return Some((local, Duration::MAX)) };
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
            let started = channel::listen(
                tier,
                remote.channel_nodes.clone(),
                self.inner.channel.clone(),
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

    pub(crate) fn channel(&self) -> &Channel {
        &self.inner.channel
    }

    /// Claims `hash` for a refresh-ahead; false if one is under way or
    /// failed recently.
    pub(crate) fn claim_renewal(&self, hash: KeyHash) -> bool {
        let Ok(mut renewing) = self.inner.renewing.lock() else { return false };
        let now = Instant::now();
        if renewing.get(&hash).is_some_and(|until| *until > now) {
            return false;
        }
        if renewing.len() > 1024 {
            renewing.retain(|_, until| *until > now);
        }
        // Far enough ahead to cover the renewal, which releases it.
        renewing.insert(hash, now + Duration::from_secs(86_400));
        true
    }

    /// Ends a refresh-ahead claim; after a failure, no other renewal of the
    /// key starts for `back_off`.
    pub(crate) fn release_renewal(&self, hash: KeyHash, back_off: Option<Duration>) {
        if let Ok(mut renewing) = self.inner.renewing.lock() {
            match back_off {
                Some(back_off) => renewing.insert(hash, Instant::now() + back_off),
                None => renewing.remove(&hash),
            };
        }
    }

    pub(crate) fn warn(&self, cause: Cause, message: std::fmt::Arguments<'_>) {
        self.inner.warnings.warn(cause, message);
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

    /// Redis, unless this is a memory-only cache.
    pub(crate) fn connections(&self) -> Option<&Arc<Connections>> {
        self.inner.remote.as_ref().map(|remote| &remote.connections)
    }

    pub(crate) fn batcher(&self) -> Option<(&Arc<Connections>, &Arc<Batcher>)> {
        self.inner.remote.as_ref().map(|remote| (&remote.connections, &remote.batcher))
    }

    pub(crate) fn flights(&self) -> &Flights {
        &self.inner.flights
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

    pub(crate) fn note_fault(&self, c: &Counters, fault: &Fault) {
        #[cfg(feature = "metrics")]
        crate::metrics::error(match fault {
            Fault::Timeout => "timeout",
            Fault::BreakerOpen => "breaker_open",
            Fault::Connection(_) => "connection",
            Fault::Server(_) | Fault::SlotMigrating(_) => "server",
        });
        match fault {
            Fault::Timeout => bump(&c.timeouts),
            Fault::BreakerOpen => {
                bump(&c.breaker_rejections);
                return;
            }
            Fault::Connection(_) => bump(&c.connection_errors),
            Fault::Server(_) | Fault::SlotMigrating(_) => bump(&c.server_errors),
        }
        self.warn(Cause::Redis, format_args!("Redis operation failed, computing without the cache: {fault:?}"));
    }
}

/// The key of a programmatic entry: namespace, value type, user key.
fn programmatic_key<K: Serialize + ?Sized, T>(policy: &Policy, key: &K) -> Result<KeyHash, Unencodable> {
    let mut hasher = KeyHasher::new("cache_runtime::Cache::get_or_compute", policy.version_number());
    hasher.part(policy.prefix().as_bytes()).part(std::any::type_name::<T>().as_bytes());
    hasher.arg(key).map(|h| h.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_bounds() {
        let ttl = Duration::from_secs(100);
        let samples: Vec<u64> = (0..1000).map(|_| jittered_ttl_ms(ttl, 0.1)).collect();
        assert!(samples.iter().all(|&ms| (90_000..=110_000).contains(&ms)));
        assert!(samples.iter().any(|&ms| ms != samples[0]));
        assert_eq!(jittered_ttl_ms(ttl, 0.0), 100_000);
        assert_eq!(jittered_ttl_ms(Duration::from_micros(10), 0.0), 1);
    }
}
