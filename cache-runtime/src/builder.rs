//! Configuring a [`Cache`].

use crate::breaker::Breaker;
use crate::cache::{Cache, Settings};
use crate::connection::{Connections, Deadlines, Source};
use crate::error::Error;
use redis::IntoConnectionInfo;
use std::time::Duration;

/// Builds a [`Cache`]. `build` validates everything and needs no running
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
    local_capacity: Option<u64>,
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
            .field("local_capacity", &self.local_capacity);
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
            local_capacity: None,
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
    /// 1024, else `build` returns [`Error::InvalidConfig`].
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
    /// years, else `build` returns [`Error::InvalidConfig`].
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
    /// an [`Error::InvalidConfig`]; more than an hour counts as an hour.
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
    /// the cache. Default: 50 ms. Zero is an [`Error::InvalidConfig`]; more
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
    /// returns [`Error::InvalidConfig`].
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
    /// attribute's range too), else `build` returns [`Error::InvalidConfig`]:
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
    /// string), else `build` returns [`Error::InvalidConfig`].
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
    /// [`Error::InvalidConfig`].
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

    /// Validates the settings and builds the cache. Does not connect.
    ///
    /// Every setting out of its range (see each method) is an
    /// [`Error::InvalidConfig`] naming the setting and the range.
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let err = cache_runtime::Cache::builder().lock_timeout(Duration::MAX).build().unwrap_err();
    /// assert!(err.to_string().contains("lock_timeout"));
    /// ```
    pub fn build(mut self) -> Result<Cache, Error> {
        self.validate()?;
        let deadlines = Deadlines { connect: self.connect_timeout, command: self.command_timeout };
        let breaker = Breaker::new(self.breaker_failures, self.breaker_cool_down);
        #[cfg(feature = "sentinel")]
        if let Some((sentinels, master)) = &self.sentinel {
            if self.url.is_some() {
                return Err(Error::InvalidConfig("give either a URL or sentinels, not both".to_owned()));
            }
            let nodes = redis::sentinel::SentinelNodeConnectionInfo::default()
                .set_tcp_settings(crate::connection::tcp_settings(&Default::default()));
            let client = redis::sentinel::SentinelClient::build(
                sentinels.clone(),
                master.clone(),
                Some(nodes),
                redis::sentinel::SentinelServerType::Master,
            )
            .map_err(|e| Error::InvalidConfig(format!("invalid Sentinel settings: {e}")))?;
            let source = Source::Sentinel(tokio::sync::Mutex::new(client));
            let connections = Connections::new(
                source,
                self.pool_size,
                self.kept_connections,
                deadlines,
                breaker,
                self.max_value_bytes,
            )?;
            let urls: Vec<String> = sentinels.iter().map(|url| redact_url(url)).collect();
            let topology = format!("Redis behind Sentinel (master `{master}`, sentinels {})", urls.join(", "));
            return Ok(Cache::from_settings(Settings {
                topology,
                remote: Some((connections, Vec::new(), self.connect_timeout)),
                local_capacity: self.local_capacity,
                key_prefix: self.key_prefix,
                default_ttl: self.default_ttl,
                lock_timeout: self.lock_timeout,
                max_value_bytes: self.max_value_bytes,
            }));
        }
        #[cfg(feature = "cluster")]
        if let Some(nodes) = &self.cluster {
            #[cfg(feature = "sentinel")]
            let sentinel = self.sentinel.is_some();
            #[cfg(not(feature = "sentinel"))]
            let sentinel = false;
            if self.url.is_some() || sentinel {
                return Err(Error::InvalidConfig("give one of a URL, sentinels or cluster nodes".to_owned()));
            }
            let (cluster, channel_nodes) = self.cluster_clients(nodes)?;
            let connections = Connections::new(
                Source::Cluster(cluster),
                self.pool_size,
                self.kept_connections,
                deadlines,
                breaker,
                self.max_value_bytes,
            )?;
            let urls: Vec<String> = nodes.iter().map(|url| redact_url(url)).collect();
            let topology = format!("Redis Cluster (nodes {})", urls.join(", "));
            return Ok(Cache::from_settings(Settings {
                topology,
                remote: Some((connections, channel_nodes, self.connect_timeout)),
                local_capacity: self.local_capacity,
                key_prefix: self.key_prefix,
                default_ttl: self.default_ttl,
                lock_timeout: self.lock_timeout,
                max_value_bytes: self.max_value_bytes,
            }));
        }
        let remote = match &self.url {
            Some(url) => {
                let info = parse_url(url)?;
                let client = self.client_for(url, info.clone())?;
                // With TLS, the client's settings carry the certificates.
                let info = client.get_connection_info().clone();
                let connections = Connections::new(
                    Source::Direct(info),
                    self.pool_size,
                    self.kept_connections,
                    deadlines,
                    breaker,
                    self.max_value_bytes,
                )?;
                Some((connections, vec![client], self.connect_timeout))
            }
            None => None,
        };
        let local_capacity = match remote {
            Some(_) => self.local_capacity,
            None => Some(self.local_capacity.unwrap_or(MEMORY_ONLY_CAPACITY)),
        };
        let topology = match &self.url {
            Some(url) => format!("Redis at {}", redact_url(url)),
            None => "memory-only: entries live in this process alone".to_owned(),
        };
        Ok(Cache::from_settings(Settings {
            topology,
            remote,
            local_capacity,
            key_prefix: self.key_prefix,
            default_ttl: self.default_ttl,
            lock_timeout: self.lock_timeout,
            max_value_bytes: self.max_value_bytes,
        }))
    }
}

impl CacheBuilder {
    /// Refuses settings out of range; clamps timeouts that are merely
    /// extreme.
    fn validate(&mut self) -> Result<(), Error> {
        let refuse = |setting: &str, range: &str, given: &dyn std::fmt::Debug| {
            Err(Error::InvalidConfig(format!("{setting} must be {range}, got {given:?}")))
        };
        validate_key_prefix(&self.key_prefix)?;
        if self.local_capacity == Some(0) {
            return refuse("local capacity", "at least 1 entry", &0);
        }
        if !(1..=MAX_POOL_SIZE).contains(&self.pool_size) {
            return refuse("pool_size", "from 1 to 1024", &self.pool_size);
        }
        if self.connect_timeout.is_zero() {
            return refuse("connect_timeout", "longer than zero (at most an hour)", &self.connect_timeout);
        }
        if self.command_timeout.is_zero() {
            return refuse("command_timeout", "longer than zero (at most an hour)", &self.command_timeout);
        }
        self.connect_timeout = self.connect_timeout.min(MAX_TIMEOUT);
        self.command_timeout = self.command_timeout.min(MAX_TIMEOUT);
        if !(MIN_LOCK_TIMEOUT..=MAX_LOCK_TIMEOUT).contains(&self.lock_timeout) {
            return refuse("lock_timeout", "from 1 ms to 24 hours", &self.lock_timeout);
        }
        if self.breaker_failures == 0 {
            return refuse("circuit_breaker failures", "at least 1", &0);
        }
        if self.breaker_cool_down > MAX_COOL_DOWN {
            return refuse("circuit_breaker cool_down", "at most an hour", &self.breaker_cool_down);
        }
        if let Some(ttl) = self.default_ttl
            && !(MIN_TTL..=MAX_TTL).contains(&ttl)
        {
            return refuse("default_ttl", "from 1 ms to ten years", &ttl);
        }
        if !(1..=MAX_VALUE_BYTES).contains(&self.max_value_bytes) {
            return refuse("max_value_bytes", "from 1 byte to 512 MiB", &self.max_value_bytes);
        }
        Ok(())
    }

    /// A client for `url`, with the certificates when it is `rediss://`.
    fn client_for(&self, url: &str, info: redis::ConnectionInfo) -> Result<redis::Client, Error> {
        let invalid = |e: redis::RedisError| Error::InvalidConfig(format!("invalid Redis connection settings: {e}"));
        #[cfg(feature = "tls")]
        if let Some(certificates) = self.tls.certificates_for(url)? {
            return redis::Client::build_with_tls(info, certificates).map_err(invalid);
        }
        let _ = url;
        redis::Client::open(info).map_err(invalid)
    }

    /// The cluster's client, and a client of each given node for the
    /// invalidation channel: Redis Cluster forwards every `PUBLISH` to all
    /// nodes, so a subscription on any one hears them all.
    #[cfg(feature = "cluster")]
    fn cluster_clients(&self, nodes: &[String]) -> Result<(redis::cluster::ClusterClient, Vec<redis::Client>), Error> {
        let Some(first) = nodes.first() else {
            return Err(Error::InvalidConfig("cluster needs the URL of at least one node".to_owned()));
        };
        let infos = nodes.iter().map(|url| parse_url(url)).collect::<Result<Vec<_>, _>>()?;
        let channel_nodes =
            nodes.iter().zip(&infos).map(|(url, info)| self.client_for(url, info.clone())).collect::<Result<_, _>>()?;
        let cluster = redis::cluster::ClusterClientBuilder::new(infos)
            .connection_timeout(self.connect_timeout)
            // Redirections are followed at once. Nothing is retried after a
            // wait (redis-rs waits a second and more by default): a cache
            // answers within its command deadline or not at all, and a
            // multi-key read refused during a slot migration is read key
            // by key instead (see `batch`).
            .retries(16)
            .min_retry_wait(0)
            .max_retry_wait(1)
            .tcp_settings(crate::connection::tcp_settings(&Default::default()));
        #[cfg(feature = "tls")]
        let cluster = match self.tls.certificates_for(first)? {
            Some(certificates) => cluster.certs(certificates),
            None => cluster,
        };
        let cluster =
            cluster.build().map_err(|e| Error::InvalidConfig(format!("invalid Redis Cluster settings: {e}")))?;
        Ok((cluster, channel_nodes))
    }
}

#[cfg(feature = "tls")]
impl Tls {
    /// The certificates to use for `url`: `None` for the system roots and
    /// no client certificate, or for a plain `redis://` URL.
    fn certificates_for(&self, url: &str) -> Result<Option<redis::TlsCertificates>, Error> {
        let is_tls = url.starts_with("rediss://");
        if !is_tls && (self.root.is_some() || self.client.is_some()) {
            return Err(Error::InvalidConfig("TLS certificates were given for a URL that is not rediss://".to_owned()));
        }
        if !is_tls || (self.root.is_none() && self.client.is_none()) {
            return Ok(None);
        }
        Ok(Some(redis::TlsCertificates {
            client_tls: self
                .client
                .clone()
                .map(|(client_cert, client_key)| redis::ClientTlsConfig { client_cert, client_key }),
            root_cert: self.root.clone(),
        }))
    }
}

fn parse_url(url: &str) -> Result<redis::ConnectionInfo, Error> {
    let refuse = |reason: String| Error::InvalidUrl { url: redact_url(url), reason };
    let scheme = url.split_once("://").map(|(scheme, _)| scheme);
    match scheme {
        Some("redis" | "redis+unix" | "unix") => {}
        #[cfg(feature = "tls")]
        Some("rediss") => {}
        #[cfg(not(feature = "tls"))]
        Some("rediss") => {
            return Err(refuse("TLS (`rediss://`) needs cache-runtime's `tls` feature".to_owned()));
        }
        // Named only when masking would show it: the text before `://`
        // of a malformed URL can be part of a password.
        Some(other) if SHOWN_SCHEMES.contains(&other) => {
            return Err(refuse(format!("unknown scheme `{other}`, expected redis:// or redis+unix://")));
        }
        Some(_) => return Err(refuse("unknown scheme, expected redis:// or redis+unix://".to_owned())),
        None => return Err(refuse("expected a URL such as redis://127.0.0.1:6379".to_owned())),
    }
    url.into_connection_info().map_err(|e| refuse(e.to_string()))
}

/// Where a URL's authority starts: after a known `scheme:` and the
/// slashes that follow, else at 0; and whether it is a `scheme://` URL.
fn authority_start(url: &str) -> (usize, bool) {
    let Some((scheme, rest)) = url.split_once(':') else { return (0, false) };
    if !SHOWN_SCHEMES.contains(&scheme) {
        return (0, false);
    }
    let slashes = rest.bytes().take_while(|&b| b == b'/').count();
    (scheme.len() + 1 + slashes, slashes == 2)
}

fn validate_key_prefix(prefix: &str) -> Result<(), Error> {
    if prefix.is_empty() {
        return Err(Error::InvalidConfig("key_prefix must not be empty".to_owned()));
    }
    if let Some(c) = prefix.chars().find(|c| c.is_whitespace() || c.is_control() || matches!(c, '{' | '}')) {
        return Err(Error::InvalidConfig(format!(
            "key_prefix {prefix:?} contains {c:?}: use letters, digits and punctuation other than braces"
        )));
    }
    Ok(())
}

/// Query parameters whose values are shown as given; every other value
/// (`pass`, `password`, anything misspelt or percent-encoded) is masked.
const SHOWN_PARAMETERS: [&str; 4] = ["db", "protocol", "user", "insecure"];

/// Schemes shown in messages. Any other text before a `:` may be part of
/// a password in a malformed URL (`secret@host`), so it is masked.
const SHOWN_SCHEMES: [&str; 10] =
    ["redis", "rediss", "redis+unix", "unix", "valkey", "valkeys", "valkey+unix", "http", "https", "tcp"];

/// The URL with anything that may be a secret replaced by `***`, for
/// messages. Works on the text, not on a parse, so a malformed URL is
/// masked as well as a good one: everything between the authority's start
/// (after a known `scheme:` and its slashes, else the very start) and the
/// last `@`, except a user name before a `:` in a `scheme://` URL; and the
/// value of every query parameter not known to be harmless. Where readings
/// disagree (a `?` or `@` inside a password), both are masked.
pub(crate) fn redact_url(url: &str) -> String {
    let (authority, well_formed) = authority_start(url);
    let mut masked: Vec<(usize, usize)> = Vec::new();
    if let Some(at) = url.rfind('@').filter(|&at| at >= authority) {
        let credentials = &url[authority..at];
        let from = match credentials.find(':') {
            Some(colon) if well_formed => authority + colon + 1,
            _ => authority,
        };
        masked.push((from, at));
    }
    if let Some(question) = url[authority..].find('?') {
        let mut position = authority + question + 1;
        for parameter in url[position..].split('&') {
            let end = position + parameter.len();
            match parameter.split_once('=') {
                Some((name, _)) if SHOWN_PARAMETERS.contains(&name) => {}
                Some((name, _)) => masked.push((position + name.len() + 1, end)),
                None => masked.push((position, end)),
            }
            position = end + 1;
        }
    }
    masked.retain(|(from, to)| from < to);
    masked.sort_unstable();
    let mut out = String::with_capacity(url.len());
    let mut shown = 0;
    for (from, to) in masked {
        if to <= shown {
            continue;
        }
        if from > shown {
            out.push_str(&url[shown..from]);
            out.push_str("***");
        } else if !out.ends_with("***") {
            out.push_str("***");
        }
        shown = to;
    }
    out.push_str(&url[shown..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_urls_are_clear_errors() {
        for (url, needle) in [
            ("http://x", "unknown scheme `http`"),
            ("localhost:6379", "expected a URL"),
            #[cfg(not(feature = "tls"))]
            ("rediss://x", "`tls` feature"),
            ("redis://:hunter2@host:notaport", "invalid Redis URL `redis://:***@host:notaport`"),
        ] {
            let err = CacheBuilder::default().url(url).build().unwrap_err().to_string();
            assert!(err.contains(needle), "{url}: {err}");
            assert!(!err.contains("hunter2"), "password leaked: {err}");
        }
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn cluster_settings_are_checked() {
        let nodes = ["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"];
        assert!(CacheBuilder::default().cluster(nodes).build().is_ok_and(|cache| !cache.is_memory_only()));
        let err = CacheBuilder::default().cluster(Vec::<String>::new()).build().unwrap_err().to_string();
        assert!(err.contains("at least one node"), "{err}");
        let err = CacheBuilder::default().cluster(nodes).url("redis://127.0.0.1").build().unwrap_err().to_string();
        assert!(err.contains("one of a URL, sentinels or cluster nodes"), "{err}");
        let err = CacheBuilder::default().cluster(["redis://127.0.0.1:7000", "http://x"]).build().unwrap_err();
        assert!(err.to_string().contains("unknown scheme `http`"), "{err}");
    }

    #[test]
    fn good_settings_build_without_redis() {
        let cache = CacheBuilder::default().url("redis://user:pw@127.0.0.1:1/3").key_prefix("app:v2").build();
        assert!(cache.is_ok());
        let err = CacheBuilder::default().url("redis://127.0.0.1").key_prefix("a b").build().unwrap_err();
        assert!(matches!(err, Error::InvalidConfig(_)));
        assert!(CacheBuilder::default().url("redis://127.0.0.1").pool_size(0).build().is_err());
    }

    #[test]
    fn every_setting_out_of_range_is_refused_by_name() {
        let url = || CacheBuilder::default().url("redis://127.0.0.1:1");
        let cases: Vec<(CacheBuilder, &str)> = vec![
            (url().lock_timeout(Duration::MAX), "lock_timeout must be from 1 ms to 24 hours"),
            (url().lock_timeout(Duration::from_micros(999)), "lock_timeout must be from 1 ms to 24 hours"),
            (url().circuit_breaker(1, Duration::MAX), "cool_down must be at most an hour"),
            (url().circuit_breaker(0, Duration::ZERO), "failures must be at least 1"),
            (url().pool_size(usize::MAX), "pool_size must be from 1 to 1024"),
            (url().max_value_bytes(0), "max_value_bytes must be from 1 byte to 512 MiB"),
            (url().max_value_bytes(usize::MAX), "max_value_bytes must be from 1 byte to 512 MiB"),
            (url().default_ttl(Duration::MAX), "default_ttl must be from 1 ms to ten years"),
            (url().default_ttl(Duration::from_micros(10)), "default_ttl must be from 1 ms to ten years"),
            (url().command_timeout(Duration::ZERO), "command_timeout must be longer than zero"),
            (url().connect_timeout(Duration::ZERO), "connect_timeout must be longer than zero"),
            (url().local(0), "local capacity must be at least 1"),
        ];
        for (builder, needle) in cases {
            let shown = format!("{builder:?}");
            match builder.build() {
                Err(err @ Error::InvalidConfig(_)) => assert!(err.to_string().contains(needle), "{err} / {needle}"),
                other => panic!("{shown}: expected {needle:?}, got {other:?}"),
            }
        }
        // Merely extreme: clamped, not refused.
        let cache = url().command_timeout(Duration::MAX).connect_timeout(Duration::MAX).build();
        assert!(cache.is_ok_and(|cache| !cache.is_memory_only()));
        assert!(url().circuit_breaker(1, Duration::ZERO).local(u64::MAX).build().is_ok());
    }

    #[test]
    fn urls_are_redacted_whatever_their_shape() {
        for (url, shown) in [
            ("redis://user:pw@host:6379/0", "redis://user:***@host:6379/0"),
            ("redis://:pw@host", "redis://:***@host"),
            ("redis//:pw@host:6379/0", "***@host:6379/0"),
            ("redis:pw@host", "redis:***@host"),
            ("pw@host", "***@host"),
            ("redis://host:6379", "redis://host:6379"),
            ("redis+unix:///tmp/r.sock?db=2&pass=pw", "redis+unix:///tmp/r.sock?db=2&pass=***"),
            ("redis+unix:///tmp/r.sock?%70ass=pw&user=me", "redis+unix:///tmp/r.sock?%70ass=***&user=me"),
            ("redis://host/0?pass=se@cret", "redis://***"),
            ("redis://:pa?ss@host", "redis://:***"),
            ("redis://:p@ss@host", "redis://:***@host"),
            ("redis:ab//cd@host", "redis:***@host"),
            ("Q:1Y=Xd:@host", "***@host"),
            ("redis:/:pw@host", "redis:/***@host"),
            ("redis://:x?db=1@host", "redis://:***@host"),
            ("user:pw@host", "***@host"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
        }
    }
}
