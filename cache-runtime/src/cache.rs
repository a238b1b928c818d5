//! The cache: one pool, the namespace versions, and the cache-aside flow
//! every cached call goes through.

use crate::builder::CacheBuilder;
use crate::canonical::Unencodable;
use crate::codec::{Codec, CodecError, StoredEntry};
use crate::connection::Connections;
use crate::error::{Error, Fault};
use crate::key::{KeyHash, KeyHasher};
use crate::policy::{Policy, check_namespace};
use crate::private::ResultOutput;
use crate::scope;
use crate::stats::{Counters, Stats, add, bump};
use crate::warnings::{Cause, Warnings};
use serde::{Serialize, de::DeserializeOwned};
use std::borrow::Cow;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

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
    connections: Connections,
    key_prefix: String,
    default_ttl: Option<Duration>,
    max_value_bytes: usize,
    counters: Counters,
    warnings: Warnings,
}

pub(crate) struct Settings {
    pub connections: Connections,
    pub key_prefix: String,
    pub default_ttl: Option<Duration>,
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
}

/// Stores `payload` under the entry key only if every namespace still has
/// the version the computation started from, so a value computed from data
/// read before an invalidation is never stored under the new version.
///
/// A `fill` (a miss) leaves alone an entry already bound to the current
/// versions: someone stored a value at least as fresh meanwhile, perhaps a
/// write-through. A `put` (a refresh) overwrites. Anything else at the key
/// (a stale or foreign value, another Redis type) is overwritten.
///
/// KEYS: entry, then one version key per namespace.
/// ARGV: ttl ms, header, payload, 'fill' or 'put', then the observed versions.
/// Returns 1 stored, 0 a version changed, 2 a current entry was there.
static STORE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local versions = {}
for i = 2, #KEYS do
  local current = redis.call('GET', KEYS[i])
  if current ~= ARGV[3 + i] then return 0 end
  versions[i - 1] = current
end
local head = ARGV[2] .. table.concat(versions, ',') .. '|'
if ARGV[4] == 'fill' then
  local existing = redis.pcall('GET', KEYS[1])
  if type(existing) == 'string' and string.sub(existing, 1, #head) == head then return 2 end
end
redis.call('SET', KEYS[1], head .. ARGV[3], 'PX', ARGV[1])
return 1
",
    )
});

/// Gives namespaces that have no version yet a random one, and returns the
/// versions of all KEYS. A namespace gets its version before anything is
/// computed under it, so every computation is bound to a version it
/// observed; and a version key that was evicted or flushed comes back as a
/// value no old entry is bound to.
///
/// KEYS: version keys. ARGV: one fresh seed per key.
static SEED_VERSIONS_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[i], 'NX') end
return redis.call('MGET', unpack(KEYS))
",
    )
});

/// Bumps a namespace's version; a missing version starts from a random
/// seed rather than from 1, which an evicted version key may have had.
/// Returns the version as Redis's string: Lua numbers are doubles.
static INVALIDATE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('INCR', KEYS[1])
return redis.call('GET', KEYS[1])
",
    )
});

/// A random starting version: far from 0, and below 2^52 so that no tool
/// that reads versions as doubles (Lua, JSON) ever rounds one.
fn fresh_seed() -> u64 {
    rand::random_range((1u64 << 32)..(1u64 << 52))
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

type Encoded = Result<Vec<u8>, CodecError>;

/// How outputs of type `R` are encoded and decoded: the serde bounds,
/// resolved once into two function pointers.
pub struct Storage<R> {
    /// `None`: this output is not stored (an `Err`).
    encode: fn(&R, Codec) -> Option<Encoded>,
    decode: fn(&[u8], Codec) -> Result<R, CodecError>,
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

/// The Redis keys of one entry: the entry itself and the version key of
/// each of its namespaces, prefix first.
pub(crate) struct EntryKeys {
    entry: String,
    versions: Vec<String>,
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

/// What reading an entry found.
enum Lookup<V> {
    Hit(V),
    /// Not usable; carries the namespace versions observed at the read
    /// (`None`: the namespace has no version yet).
    Miss(Vec<Option<Vec<u8>>>),
    /// Redis could not be asked; compute without storing.
    Unavailable,
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
                connections: settings.connections,
                key_prefix: settings.key_prefix,
                default_ttl: settings.default_ttl,
                max_value_bytes: settings.max_value_bytes,
                counters: Counters::default(),
                warnings: Warnings::default(),
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
    /// assert_eq!(cache.stats().hits, 0);
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    pub fn stats(&self) -> Stats {
        self.inner.counters.snapshot()
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
        let key = self.version_key(namespace);
        let mut invocation = INVALIDATE_SCRIPT.key(&key);
        invocation.arg(fresh_seed());
        self.inner.connections.run_unguarded(|conn| conn.invoke::<u64>(&invocation)).await.map_err(|fault| {
            self.note_fault(&fault);
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
        let hash = programmatic_key::<K, T>(policy, key);
        self.fetch_or_compute(&policy.plan(), hash, Storage::of::<ResultOutput<T, E>>(), Intent::Read, compute).await
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
        let hash = programmatic_key::<K, T>(policy, key);
        self.fetch_or_compute(&policy.plan(), hash, Storage::of::<ResultOutput<T, E>>(), Intent::Refresh, compute).await
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
        let entry = self.entry_key(plan.prefix, hash);
        let mut del = redis::cmd("DEL");
        del.arg(&entry);
        let deleted = self.inner.connections.run_unguarded(|conn| conn.query::<u64>(&del)).await.map_err(|fault| {
            self.note_fault(&fault);
            Error::from(fault)
        })?;
        Ok(deleted > 0)
    }

    /// `app:prefix:{prefix}<hex>`: readable first, so `app:prefix:*` finds
    /// a namespace; the hash tag puts a namespace's entries and its version
    /// key in one Redis Cluster slot. Braces are refused in prefixes, so the
    /// first `{` is always this one.
    fn entry_key(&self, prefix: &str, hash: KeyHash) -> String {
        let hex = hash.to_hex();
        let mut key = self.namespace_head(prefix, hex.len());
        key.extend(hex.iter().map(|&b| char::from(b)));
        key
    }

    /// `app:namespace:{namespace}#v`, in the namespace's slot.
    fn version_key(&self, namespace: &str) -> String {
        let mut key = self.namespace_head(namespace, 2);
        key.push_str("#v");
        key
    }

    /// `app:namespace:{namespace}`, with room for `extra` more bytes.
    fn namespace_head(&self, namespace: &str, extra: usize) -> String {
        let app = &self.inner.key_prefix;
        let mut key = String::with_capacity(app.len() + 2 * namespace.len() + 4 + extra);
        key.push_str(app);
        key.push(':');
        key.push_str(namespace);
        key.push_str(":{");
        key.push_str(namespace);
        key.push('}');
        key
    }

    fn entry_keys(&self, plan: &Plan<'_>, hash: KeyHash) -> EntryKeys {
        EntryKeys {
            entry: self.entry_key(plan.prefix, hash),
            versions: plan.namespaces().map(|ns| self.version_key(ns)).collect(),
        }
    }

    fn warn(&self, cause: Cause, message: std::fmt::Arguments<'_>) {
        self.inner.warnings.warn(cause, message);
    }

    fn note_fault(&self, fault: &Fault) {
        let c = &self.inner.counters;
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

    /// The cache-aside flow: one MGET of the entry and its namespace
    /// versions; on a hit decode and return; otherwise compute, and store
    /// successes bound to the versions observed before computing.
    pub(crate) async fn fetch_or_compute<R, F>(
        &self,
        plan: &Plan<'_>,
        key: Result<KeyHash, Unencodable>,
        storage: Storage<R>,
        intent: Intent,
        compute: F,
    ) -> R
    where
        F: Future<Output = R>,
    {
        let counters = &self.inner.counters;
        let Some(ttl) = plan.ttl.or(self.inner.default_ttl) else {
            bump(&counters.bypassed);
            self.warn(
                Cause::NoTtl,
                format_args!("prefix `{}` has no ttl and the cache no default_ttl: not caching it", plan.prefix),
            );
            return compute.await;
        };
        let hash = match key {
            Ok(hash) => hash,
            Err(e) => {
                bump(&counters.encode_errors);
                self.warn(Cause::Encode, format_args!("prefix `{}`: {e}; computing without the cache", plan.prefix));
                return compute.await;
            }
        };
        if let Err(why) = plan.namespaces().try_for_each(check_namespace) {
            bump(&counters.encode_errors);
            self.warn(Cause::Encode, format_args!("{why}; computing without the cache"));
            return compute.await;
        }
        let keys = self.entry_keys(plan, hash);
        let observed = match self.lookup(plan, storage, intent, &keys).await {
            Lookup::Hit(output) => return output,
            Lookup::Miss(observed) => self.seed_missing_versions(&keys, observed).await,
            Lookup::Unavailable => None,
        };
        let output = match intent {
            Intent::Read => compute.await,
            Intent::Refresh => scope::normally(compute).await,
        };
        if let Some(observed) = observed
            && let Some(encoded) = (storage.encode)(&output, plan.codec)
        {
            self.store(plan, ttl, intent, &keys, &observed, encoded).await;
        }
        output
    }

    /// The observed versions, after giving any namespace without one its
    /// first version; `None` when Redis could not be asked.
    async fn seed_missing_versions(&self, keys: &EntryKeys, observed: Vec<Option<Vec<u8>>>) -> Option<Vec<Vec<u8>>> {
        if let Some(all) = observed.iter().cloned().collect::<Option<Vec<_>>>() {
            return Some(all);
        }
        let mut invocation = SEED_VERSIONS_SCRIPT.prepare_invoke();
        invocation.key(&keys.versions);
        for _ in &keys.versions {
            invocation.arg(fresh_seed());
        }
        match self.inner.connections.run(|conn| conn.invoke::<Vec<Option<Vec<u8>>>>(&invocation)).await {
            Ok(seeded) => seeded.into_iter().collect::<Option<Vec<_>>>().filter(|v| v.len() == keys.versions.len()),
            Err(fault) => {
                self.note_fault(&fault);
                None
            }
        }
    }

    async fn lookup<R>(&self, plan: &Plan<'_>, storage: Storage<R>, intent: Intent, keys: &EntryKeys) -> Lookup<R> {
        let counters = &self.inner.counters;
        let (entry_key, version_keys) = (&keys.entry, &keys.versions);
        let mut mget = redis::cmd("MGET");
        mget.arg(entry_key).arg(version_keys);
        let mut values = match self.inner.connections.run(|conn| conn.query::<Vec<Option<Vec<u8>>>>(&mget)).await {
            Ok(values) if values.len() == version_keys.len() + 1 => values,
            Ok(values) => {
                self.note_fault(&Fault::Server(format!("MGET returned {} values", values.len())));
                bump(&counters.bypassed);
                return Lookup::Unavailable;
            }
            Err(fault) => {
                self.note_fault(&fault);
                bump(&counters.bypassed);
                return Lookup::Unavailable;
            }
        };
        let entry = values[0].take();
        let versions = values.split_off(1);
        if intent == Intent::Refresh {
            bump(&counters.refreshes);
            return Lookup::Miss(versions);
        }
        let miss = |versions| {
            bump(&counters.misses);
            Lookup::Miss(versions)
        };
        let Some(bytes) = entry else { return miss(versions) };
        let Some(stored) = StoredEntry::parse(&bytes).filter(|e| e.is_codec(plan.codec)) else {
            bump(&counters.decode_errors);
            self.warn(
                Cause::Decode,
                format_args!("`{entry_key}` holds no {} entry of this cache; recomputing", plan.codec.name()),
            );
            return miss(versions);
        };
        if !stored.is_bound_to(versions.iter().map(Option::as_deref)) {
            bump(&counters.stale);
            return miss(versions);
        }
        match (storage.decode)(stored.payload, plan.codec) {
            Ok(value) => {
                bump(&counters.hits);
                add(&counters.bytes_read, stored.payload.len() as u64);
                Lookup::Hit(value)
            }
            Err(e) => {
                bump(&counters.decode_errors);
                self.warn(Cause::Decode, format_args!("`{entry_key}` could not be decoded ({e}); recomputing"));
                miss(versions)
            }
        }
    }

    async fn store(
        &self,
        plan: &Plan<'_>,
        ttl: Duration,
        intent: Intent,
        keys: &EntryKeys,
        observed: &[Vec<u8>],
        encoded: Encoded,
    ) {
        let counters = &self.inner.counters;
        let payload = match encoded {
            Ok(payload) => payload,
            Err(e) => {
                bump(&counters.encode_errors);
                self.warn(Cause::Encode, format_args!("a value of prefix `{}` could not be encoded: {e}", plan.prefix));
                return;
            }
        };
        if payload.len() > self.inner.max_value_bytes {
            bump(&counters.oversize);
            self.warn(
                Cause::Oversize,
                format_args!(
                    "a value of prefix `{}` is {} bytes, over max_value_bytes ({}): returned but not stored",
                    plan.prefix,
                    payload.len(),
                    self.inner.max_value_bytes
                ),
            );
            return;
        }
        let mut invocation = STORE_SCRIPT.key(&keys.entry);
        invocation
            .key(&keys.versions)
            .arg(jittered_ttl_ms(ttl, plan.jitter))
            .arg(&plan.codec.head()[..])
            .arg(&payload[..])
            .arg(if intent == Intent::Refresh { "put" } else { "fill" });
        for version in observed {
            invocation.arg(&version[..]);
        }
        match self.inner.connections.run(|conn| conn.invoke::<i64>(&invocation)).await {
            Ok(1) => {
                bump(&counters.writes);
                add(&counters.bytes_written, payload.len() as u64);
            }
            Ok(_) => bump(&counters.writes_skipped),
            Err(fault) => self.note_fault(&fault),
        }
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

    /// The part of a key Redis Cluster hashes: the first non-empty `{...}`.
    fn hash_tag(key: &str) -> &str {
        key.find('{')
            .and_then(|open| key[open + 1..].find('}').map(|len| &key[open + 1..open + 1 + len]))
            .filter(|tag| !tag.is_empty())
            .unwrap_or(key)
    }

    #[test]
    fn a_namespace_lives_in_one_cluster_slot() {
        let cache = Cache::builder().url("redis://127.0.0.1:1").key_prefix("myapp").build().unwrap();
        let plan = Plan { prefix: "products", tags: &[], ttl: None, jitter: 0.0, codec: Codec::Bincode };
        let keys = cache.entry_keys(&plan, KeyHasher::new("f", 1).finish());
        assert!(keys.entry.starts_with("myapp:products:{products}"), "{}", keys.entry);
        assert_eq!(keys.entry.len(), "myapp:products:{products}".len() + 32);
        assert_eq!(keys.versions, ["myapp:products:{products}#v"]);
        assert_eq!(hash_tag(&keys.entry), "products");
        assert_eq!(hash_tag(&keys.versions[0]), hash_tag(&keys.entry));
    }

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
