//! Configuring a [`Cache`](crate::Cache): the builder and its settings. Building and
//! checking them is in `build.rs`, URLs in `url.rs`.

mod build;
mod storage;
mod url;

pub(crate) use url::redact_url;

use std::time::Duration;

/// Builds a [`Cache`](crate::Cache). `build` validates everything and needs no running
/// Redis: connections are made on first use. Without a [`url`](Self::url)
/// it builds a memory-only cache, which needs no Redis at all.
///
/// ```
/// use cache_runtime::Cache;
/// use std::time::Duration;
///
/// let cache = Cache::builder()
///     .url("redis://127.0.0.1:6379/0")
///     .key_prefix("myapp")
///     .pool_size(32)
///     .default_ttl(Duration::from_secs(60))
///     .command_timeout(Duration::from_millis(50))
///     .build()?;
/// # Ok::<(), cache_runtime::Error>(())
/// ```
#[derive(Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct CacheBuilder {
    url: Option<String>,
    key_prefix: String,
    pool_size: usize,
    kept_connections: Option<usize>,
    default_ttl: Option<Duration>,
    connect_timeout: Duration,
    command_timeout: Duration,
    breaker_failures: u32,
    breaker_cool_down: Duration,
    lock_timeout: Duration,
    max_value_bytes: usize,
    compression: crate::Compression,
    compress_threshold: usize,
    local_capacity: Option<u64>,
    local_bytes: Option<u64>,
    #[cfg(feature = "tls")]
    tls: Tls,
    #[cfg(feature = "sentinel")]
    sentinel: Option<(Vec<String>, String)>,
    #[cfg(feature = "cluster")]
    cluster: Option<Vec<String>>,
}

/// Certificates for `rediss://`, in PEM.
#[cfg(feature = "tls")]
#[derive(Clone, Default)]
struct Tls {
    root: Option<Vec<u8>>,
    client: Option<(Vec<u8>, Vec<u8>)>,
}

#[cfg(feature = "tls")]
impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("custom_root", &self.root.is_some())
            .field("client_certificate", &self.client.is_some())
            .finish()
    }
}

/// Entries a memory-only cache holds when `local` does not say.
const MEMORY_ONLY_CAPACITY: u64 = 10_000;

/// The longest lock timeout: also the `PX` of the Redis stampede lock, and
/// the bound `#[cached(lock_timeout = ...)]` checks at compile time.
pub(crate) const MAX_LOCK_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);
/// The shortest lock timeout: `PX` counts whole milliseconds, and `PX 0`
/// is refused by Redis, so nothing would ever be stored.
pub(crate) const MIN_LOCK_TIMEOUT: Duration = Duration::from_millis(1);
/// The longest TTL (and stale window, and local TTL): ten years. Redis
/// refuses expiries past its clock's range, and deadlines built from a
/// TTL must not overflow.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// The shortest TTL: entries live for whole milliseconds.
pub(crate) const MIN_TTL: Duration = Duration::from_millis(1);
/// Connect and command timeouts longer than this are treated as this: a
/// cache that waits longer than an hour has stopped being one, and sums of
/// deadlines must not overflow.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// The longest circuit-breaker cool-down: longer would switch the cache
/// off for good after one bad minute.
pub(crate) const MAX_COOL_DOWN: Duration = Duration::from_secs(60 * 60);
/// The largest pool: a pool pre-allocates its slots, and Redis's default
/// `maxclients` is 10,000 for all clients together.
pub(crate) const MAX_POOL_SIZE: usize = 1024;
/// The smallest byte budget of the local tier: a few entries' overhead.
pub(crate) const MIN_LOCAL_BYTES: u64 = 1 << 10;
/// The largest byte budget of the local tier: 1 TiB, past any machine the
/// tier would run on; more is a unit mistake (bits, or a size in KiB
/// multiplied twice).
pub(crate) const MAX_LOCAL_BYTES: u64 = 1 << 40;
/// The largest value: Redis's own limit on a string (`proto-max-bulk-len`).
pub(crate) const MAX_VALUE_BYTES: usize = 512 << 20;

impl std::fmt::Debug for CacheBuilder {
    /// URLs with their passwords masked, and certificates only as present
    /// or not: builders end up in logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_struct("CacheBuilder");
        out.field("url", &self.url.as_deref().map(redact_url))
            .field("key_prefix", &self.key_prefix)
            .field("pool_size", &self.pool_size)
            .field("default_ttl", &self.default_ttl)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_timeout", &self.command_timeout)
            .field("breaker_failures", &self.breaker_failures)
            .field("breaker_cool_down", &self.breaker_cool_down)
            .field("lock_timeout", &self.lock_timeout)
            .field("max_value_bytes", &self.max_value_bytes)
            .field("compression", &self.compression)
            .field("compress_threshold", &self.compress_threshold)
            .field("local_capacity", &self.local_capacity)
            .field("local_bytes", &self.local_bytes);
        #[cfg(feature = "tls")]
        out.field("tls", &self.tls);
        #[cfg(feature = "sentinel")]
        out.field(
            "sentinel",
            &self
                .sentinel
                .as_ref()
                .map(|(urls, master)| (urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>(), master)),
        );
        #[cfg(feature = "cluster")]
        out.field("cluster", &self.cluster.as_ref().map(|urls| urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>()));
        out.finish()
    }
}

impl Default for CacheBuilder {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: "cache".to_owned(),
            pool_size: 8,
            kept_connections: None,
            default_ttl: None,
            connect_timeout: Duration::from_millis(50),
            command_timeout: Duration::from_millis(50),
            breaker_failures: 5,
            breaker_cool_down: Duration::from_secs(1),
            lock_timeout: Duration::from_secs(5),
            max_value_bytes: 1 << 20,
            compression: crate::Compression::default(),
            compress_threshold: crate::compress::DEFAULT_THRESHOLD,
            local_capacity: None,
            local_bytes: None,
            #[cfg(feature = "tls")]
            tls: Tls::default(),
            #[cfg(feature = "sentinel")]
            sentinel: None,
            #[cfg(feature = "cluster")]
            cluster: None,
        }
    }
}

impl CacheBuilder {
    /// The Redis server: `redis://[user:password@]host[:port][/db]`, or
    /// `redis+unix:///path/to/socket[?db=N&user=U&pass=P]`. The password
    /// never appears in this builder's `Debug`, nor in any error, log line
    /// or span: it is shown as `***`, even in a URL that does not parse.
    ///
    /// ```
    /// let builder = cache_runtime::Cache::builder().url("redis://app:s3cret@10.0.0.1:6379/0");
    /// assert!(!format!("{builder:?}").contains("s3cret"));
    /// ```
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// The application's namespace, first in every key: two applications
    /// sharing one Redis never see each other's entries. Default: `cache`.
    /// Not empty; no whitespace, control characters or braces (`build`
    /// refuses them).
    ///
    /// ```
    /// assert!(cache_runtime::Cache::builder().key_prefix("shop:v2").build().is_ok());
    /// assert!(cache_runtime::Cache::builder().key_prefix("my shop").build().is_err());
    /// ```
    pub fn key_prefix(mut self, key_prefix: impl Into<String>) -> Self {
        self.key_prefix = key_prefix.into();
        self
    }

    /// The most connections the pool opens. Connections are multiplexed:
    /// calls pipeline over one kept connection per CPU core (at most this
    /// many; on a cluster one, itself a connection to each node); the rest
    /// of the pool replaces connections that fail. Default: 8; from 1 to
    /// 1024, else `build` returns [`Error::InvalidConfig`](crate::Error::InvalidConfig).
    ///
    /// ```
    /// assert!(cache_runtime::Cache::builder().pool_size(0).build().is_err());
    /// ```
    pub fn pool_size(mut self, pool_size: usize) -> Self {
        self.pool_size = pool_size;
        self
    }

    /// How many connections the cache keeps checked out and spreads calls
    /// over; by default one per core, at most [`pool_size`](Self::pool_size)
    /// (and always at most that). Hidden: it exists so that tests on a
    /// small machine can behave like a large one, where the kept
    /// connections hold every permit of the default pool.
    ///
    /// ```
    /// let cache = cache_runtime::Cache::builder()
    ///     .url("redis://127.0.0.1:6379")
    ///     .pool_size(4)
    ///     .kept_connections(4)
    ///     .build()?;
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    #[doc(hidden)]
    pub fn kept_connections(mut self, kept: usize) -> Self {
        self.kept_connections = Some(kept);
        self
    }

    /// The TTL of functions whose `#[cached]` gives none. From 1 ms to ten
    /// years, else `build` returns [`Error::InvalidConfig`](crate::Error::InvalidConfig).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// assert!(cache_runtime::Cache::builder().default_ttl(Duration::from_secs(60)).build().is_ok());
    /// assert!(cache_runtime::Cache::builder().default_ttl(Duration::MAX).build().is_err());
    /// ```
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = Some(ttl);
        self
    }

    /// How long a call may wait for a connection, including connecting a new
    /// one, before it computes without the cache. Default: 50 ms. Zero is
    /// an [`Error::InvalidConfig`](crate::Error::InvalidConfig); more than an hour counts as an hour.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// assert!(cache_runtime::Cache::builder().connect_timeout(Duration::ZERO).build().is_err());
    /// assert!(cache_runtime::Cache::builder().connect_timeout(Duration::MAX).build().is_ok());
    /// ```
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one Redis command may take before the call computes without
    /// the cache. Default: 50 ms. Zero is an [`Error::InvalidConfig`](crate::Error::InvalidConfig); more
    /// than an hour counts as an hour.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// assert!(cache_runtime::Cache::builder().command_timeout(Duration::from_millis(20)).build().is_ok());
    /// ```
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// After `failures` consecutive failed Redis operations, skip Redis for
    /// `cool_down`, then let one call probe it. Default: 5 failures, 1 s.
    /// `failures` at least 1 and `cool_down` at most an hour, else `build`
    /// returns [`Error::InvalidConfig`](crate::Error::InvalidConfig).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let builder = cache_runtime::Cache::builder();
    /// assert!(builder.clone().circuit_breaker(3, Duration::from_millis(500)).build().is_ok());
    /// assert!(builder.circuit_breaker(3, Duration::MAX).build().is_err());
    /// ```
    pub fn circuit_breaker(mut self, failures: u32, cool_down: Duration) -> Self {
        self.breaker_failures = failures;
        self.breaker_cool_down = cool_down;
        self
    }

    /// How long a caller waits for another caller (in this process or
    /// another) that is computing the same key, before computing itself. It
    /// is also the TTL of the Redis stampede lock, so a crashed process
    /// delays others at most this long. Default: 5 s; `#[cached(lock_timeout
    /// = ...)]` overrides it per function. From 1 ms to 24 hours (the
    /// attribute's range too), else `build` returns [`Error::InvalidConfig`](crate::Error::InvalidConfig):
    /// Redis counts the lock's TTL in whole milliseconds.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// assert!(cache_runtime::Cache::builder().lock_timeout(Duration::from_secs(2)).build().is_ok());
    /// assert!(cache_runtime::Cache::builder().lock_timeout(Duration::from_micros(500)).build().is_err());
    /// ```
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// Values whose encoding is larger than this are returned but not
    /// stored. Default: 1 MiB; from 1 byte to 512 MiB (Redis's limit on a
    /// string), else `build` returns [`Error::InvalidConfig`](crate::Error::InvalidConfig).
    ///
    /// It bounds reading too: an entry read from Redis longer than this
    /// plus 16 KiB of header is not decoded (a counted decode error, and
    /// the function runs), and decoding never allocates more than the
    /// entry holds, whatever lengths a corrupt entry claims.
    ///
    /// ```
    /// assert!(cache_runtime::Cache::builder().max_value_bytes(64 << 10).build().is_ok());
    /// assert!(cache_runtime::Cache::builder().max_value_bytes(0).build().is_err());
    /// ```
    pub fn max_value_bytes(mut self, bytes: usize) -> Self {
        self.max_value_bytes = bytes;
        self
    }

    /// An in-process tier of at most `capacity` entries: functions that opt
    /// in with `#[cached(local = true)]` or `local_ttl`, and policies with
    /// [`Policy::local_ttl`](crate::Policy::local_ttl), are answered from
    /// memory, with no network, while their entries are fresh.
    ///
    /// It stays coherent across processes: `invalidate`, `forget` and
    /// `refresh` announce themselves on a Redis pub/sub channel,
    /// `<key_prefix>:invalidations`, and every process's tier drops what
    /// they name as the message arrives (one network hop). While that
    /// channel is down, the tier is not used at all, and whatever it held
    /// before is never trusted again. An ACL user needs `&<key_prefix>:*`
    /// for it.
    ///
    /// For a memory-only cache (no URL), this is the cache's size; default
    /// 10,000 entries. At least 1, else `build` returns
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig).
    ///
    /// ```
    /// let cache = cache_runtime::Cache::builder()
    ///     .url("redis://127.0.0.1:6379")
    ///     .local(50_000)
    ///     .build()?;
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    pub fn local(mut self, capacity: u64) -> Self {
        self.local_capacity = Some(capacity);
        self
    }

    /// An in-process tier (as [`local`](Self::local)) bounded by what its
    /// entries weigh: each counts its encoded payload plus a fixed
    /// overhead for its key and bookkeeping (about 250 bytes). When an
    /// insert would exceed the budget, moka's TinyLFU policy decides:
    /// it evicts entries used less often, or refuses the new entry if it
    /// is used less often than they are; a single entry larger than the
    /// budget is not kept. The
    /// size in entries and bytes is in [`Stats::local`](crate::Stats::local).
    ///
    /// With [`local`](Self::local) too, both bounds hold: every entry
    /// weighs at least `bytes / capacity`, so the tier never holds more
    /// than `capacity` entries nor more than `bytes` bytes (with entries
    /// of mixed sizes it may hold fewer than either alone would allow).
    /// For a memory-only cache, this bounds the cache itself (the default
    /// 10,000 entries then no longer applies unless `local` says so).
    ///
    /// From 1 KiB to 1 TiB, else `build` returns [`Error::InvalidConfig`](crate::Error::InvalidConfig).
    ///
    /// ```
    /// let cache = cache_runtime::Cache::builder()
    ///     .url("redis://127.0.0.1:6379")
    ///     .local_bytes(64 << 20) // 64 MiB
    ///     .build()?;
    /// assert!(cache_runtime::Cache::builder().local_bytes(0).build().is_err());
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    pub fn local_bytes(mut self, bytes: u64) -> Self {
        self.local_bytes = Some(bytes);
        self
    }

    /// The local tier's bounds, if it has one; `memory_only`: the tier is
    /// the cache, and has one whatever was asked.
    pub(crate) fn local_bounds(&self, memory_only: bool) -> Option<crate::local::Bounds> {
        let bounds = crate::local::Bounds { entries: self.local_capacity, bytes: self.local_bytes };
        match bounds {
            crate::local::Bounds { entries: None, bytes: None } if memory_only => {
                Some(crate::local::Bounds { entries: Some(MEMORY_ONLY_CAPACITY), bytes: None })
            }
            crate::local::Bounds { entries: None, bytes: None } => None,
            bounds => Some(bounds),
        }
    }

    /// With `rediss://`: trust the server certificates this CA (PEM) signed,
    /// instead of the system's roots. Feature `tls`.
    ///
    /// ```no_run
    /// let ca = std::fs::read("/etc/redis/ca.crt")?;
    /// let cache = cache_runtime::Cache::builder()
    ///     .url("rediss://redis.internal:6380")
    ///     .tls_root_certificate(ca)
    ///     .build()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "tls")]
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.tls.root = Some(pem.into());
        self
    }

    /// With `rediss://`: present this client certificate and key (PEM), for
    /// servers that require mutual TLS (`tls-auth-clients yes`). Feature `tls`.
    ///
    /// ```no_run
    /// let cache = cache_runtime::Cache::builder()
    ///     .url("rediss://redis.internal:6380")
    ///     .tls_root_certificate(std::fs::read("ca.crt")?)
    ///     .tls_client_certificate(std::fs::read("client.crt")?, std::fs::read("client.key")?)
    ///     .build()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[cfg(feature = "tls")]
    pub fn tls_client_certificate(mut self, cert_pem: impl Into<Vec<u8>>, key_pem: impl Into<Vec<u8>>) -> Self {
        self.tls.client = Some((cert_pem.into(), key_pem.into()));
        self
    }

    /// Redis behind Sentinel: the sentinels' URLs and the name they monitor
    /// the master under. Every new connection asks them for the current
    /// master, so after a failover the cache follows the new master by
    /// itself; calls during the switch compute without the cache. Instead
    /// of [`url`](Self::url). The local tier's invalidation channel needs a
    /// direct URL: with Sentinel the tier stays unused. Feature `sentinel`.
    ///
    /// ```
    /// let cache = cache_runtime::Cache::builder()
    ///     .sentinel(["redis://10.0.0.1:26379", "redis://10.0.0.2:26379"], "mymaster")
    ///     .build()?;
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    #[cfg(feature = "sentinel")]
    pub fn sentinel<I, S>(mut self, sentinels: I, master_name: impl Into<String>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.sentinel = Some((sentinels.into_iter().map(Into::into).collect(), master_name.into()));
        self
    }

    /// A Redis Cluster: the URLs of some of its nodes (one is enough; more
    /// let the cache start while one is down). Connections learn the slot
    /// map from the nodes and follow `MOVED` and `ASK` redirections, so hits
    /// go on while a slot moves (misses meeting a half-moved slot compute
    /// and are not stored) and after a replica takes over; while a dead
    /// master is not yet replaced, calls for its slots compute without the
    /// cache. Tags whose versions live in other slots work as on one
    /// server. Instead of [`url`](Self::url). Feature `cluster`.
    ///
    /// ```
    /// let cache = cache_runtime::Cache::builder()
    ///     .cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000", "redis://10.0.0.3:7000"])
    ///     .key_prefix("shop")
    ///     .build()?;
    /// # Ok::<(), cache_runtime::Error>(())
    /// ```
    #[cfg(feature = "cluster")]
    pub fn cluster<I, S>(mut self, nodes: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cluster = Some(nodes.into_iter().map(Into::into).collect());
        self
    }
}
