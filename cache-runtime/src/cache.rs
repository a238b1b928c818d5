//! The cache: its settings, counters, and public operations. The flow of
//! one cached call lives in `flow.rs`.

use crate::batch::Batcher;
use crate::builder::CacheBuilder;
use crate::canonical::Unencodable;
use crate::codec::{Codec, CodecError};
use crate::connection::Connections;
use crate::error::{Error, Fault};
use crate::flight::Flights;
use crate::key::{KeyHash, KeyHasher, entry_key, version_key};
use crate::policy::{Policy, check_namespace};
use crate::private::ResultOutput;
use crate::scripts::{self, fresh_seed};
use crate::site::{CacheView, SiteSlot};
use crate::stats::{Counters, Registry, Stats, bump};
use crate::warnings::{Cause, Warnings};
use serde::{Serialize, de::DeserializeOwned};
use std::borrow::Cow;
use std::sync::Arc;
use std::time::Duration;

static NEXT_CACHE_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A Redis-backed cache: a connection pool, a key namespace and counters.
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
    connections: Arc<Connections>,
    batcher: Arc<Batcher>,
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

pub(crate) struct Settings {
    pub connections: Connections,
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
            .field("connections", &self.inner.connections)
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
        Self { encode: encode::<R, K>, decode: decode::<R, K> }
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
        Self {
            inner: Arc::new(Inner {
                connections: Arc::new(settings.connections),
                batcher: Arc::default(),
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
        self.inner.registry.snapshot()
    }

    /// Makes every entry of `namespace` stale, in this process and every
    /// other one using the same Redis and key prefix, by bumping the
    /// namespace's version: one atomic command, no scan. Returns the new
    /// version.
    ///
    /// A namespace is a `prefix` or a `tags(...)` name of `#[cached]`. Old
    /// entries are never returned again and expire by their TTL.
    ///
    /// Unlike cached calls, this reports failure: when it returns `Err`,
    /// other processes may still serve the old entries until their TTL
    /// ends, so retry or surface the error on the write path.
    ///
    /// ```no_run
    /// # async fn demo(cache: cache_runtime::Cache) -> Result<(), cache_runtime::Error> {
    /// let version = cache.invalidate("products").await?;
    /// # Ok(()) }
    /// ```
    pub async fn invalidate(&self, namespace: &str) -> Result<u64, Error> {
        check_namespace(namespace).map_err(Error::InvalidConfig)?;
        let key = version_key(self.key_prefix(), namespace);
        let mut invocation = scripts::INVALIDATE.key(&key);
        invocation.arg(fresh_seed());
        self.inner.connections.run_unguarded(|conn| conn.invoke::<u64>(&invocation)).await.map_err(|fault| {
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
        self.fetch_or_compute(&policy.plan(), hash, Storage::of::<ResultOutput<T, E>>(), intent, compute).await
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
        let mut del = redis::cmd("DEL");
        del.arg(entry_key(self.key_prefix(), plan.prefix, hash));
        let deleted = self.inner.connections.run_unguarded(|conn| conn.query::<u64>(&del)).await.map_err(|fault| {
            self.note_fault(&self.inner.registry.general, &fault);
            Error::from(fault)
        })?;
        Ok(deleted > 0)
    }

    pub(crate) fn warn(&self, cause: Cause, message: std::fmt::Arguments<'_>) {
        self.inner.warnings.warn(cause, message);
    }

    pub(crate) fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    pub(crate) fn view(&self) -> CacheView<'_> {
        CacheView { id: self.inner.id, key_prefix: &self.inner.key_prefix, registry: &self.inner.registry }
    }

    pub(crate) fn connections(&self) -> &Arc<Connections> {
        &self.inner.connections
    }

    pub(crate) fn batcher(&self) -> &Arc<Batcher> {
        &self.inner.batcher
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
            Fault::Server(_) => "server",
        });
        match fault {
            Fault::Timeout => bump(&c.timeouts),
            Fault::BreakerOpen => {
                bump(&c.breaker_rejections);
                return;
            }
            Fault::Connection(_) => bump(&c.connection_errors),
            Fault::Server(_) => bump(&c.server_errors),
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
