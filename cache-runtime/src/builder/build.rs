//! Building a cache from its settings, after checking each of them.

use super::url::{parse_url, redact_url};
use super::*;
use crate::breaker::Breaker;
use crate::cache::{Cache, Settings};
use crate::connection::{Connections, Deadlines, Source};
use crate::error::Error;

impl CacheBuilder {
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
        let breaker = Breaker::new(self.breaker_failures, self.breaker_cool_down, deadlines.longest_call());
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
            let connections = self.connections(source, deadlines, breaker)?;
            let urls: Vec<String> = sentinels.iter().map(|url| redact_url(url)).collect();
            let topology = format!("Redis behind Sentinel (master `{master}`, sentinels {})", urls.join(", "));
            let (local, remote) = (self.local_bounds(false), Some((connections, Vec::new(), self.connect_timeout)));
            return Ok(self.into_cache(topology, remote, local));
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
            let connections = self.connections(Source::Cluster(cluster), deadlines, breaker)?;
            let urls: Vec<String> = nodes.iter().map(|url| redact_url(url)).collect();
            let topology = format!("Redis Cluster (nodes {})", urls.join(", "));
            let (local, remote) = (self.local_bounds(false), Some((connections, channel_nodes, self.connect_timeout)));
            return Ok(self.into_cache(topology, remote, local));
        }
        let remote = match &self.url {
            Some(url) => {
                let info = parse_url(url)?;
                let client = self.client_for(url, info.clone())?;
                // With TLS, the client's settings carry the certificates.
                let info = client.get_connection_info().clone();
                let connections = self.connections(Source::Direct(info), deadlines, breaker)?;
                Some((connections, vec![client], self.connect_timeout))
            }
            None => None,
        };
        let local = self.local_bounds(remote.is_none());
        let topology = match &self.url {
            Some(url) => format!("Redis at {}", redact_url(url)),
            None => "memory-only: entries live in this process alone".to_owned(),
        };
        Ok(self.into_cache(topology, remote, local))
    }
    /// The connections to `source`, with this builder's pool settings.
    fn connections(&self, source: Source, deadlines: Deadlines, breaker: Breaker) -> Result<Connections, Error> {
        Connections::new(source, self.pool_size, self.kept_connections, deadlines, breaker, self.max_value_bytes)
    }

    /// The cache, once its topology and connections are settled.
    fn into_cache(
        self,
        topology: String,
        remote: Option<(Connections, Vec<redis::Client>, std::time::Duration)>,
        local: Option<crate::local::Bounds>,
    ) -> Cache {
        Cache::from_settings(Settings {
            topology,
            remote,
            local,
            key_prefix: self.key_prefix,
            default_ttl: self.default_ttl,
            lock_timeout: self.lock_timeout,
            max_value_bytes: self.max_value_bytes,
            compression: self.compression,
            compress_threshold: self.compress_threshold,
        })
    }

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
        if let Some(bytes) = self.local_bytes
            && !(MIN_LOCAL_BYTES..=MAX_LOCAL_BYTES).contains(&bytes)
        {
            return refuse("local_bytes", "from 1 KiB to 1 TiB", &bytes);
        }
        if let (Some(bytes), Some(capacity)) = (self.local_bytes, self.local_capacity)
            && bytes.div_ceil(capacity) > u64::from(u32::MAX)
        {
            return refuse("local_bytes", "at most 4 GiB per entry of the local capacity", &(bytes, capacity));
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
        // The first node's scheme decides TLS for the whole cluster.
        #[cfg(not(feature = "tls"))]
        let _ = first;
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

#[cfg(test)]
mod tests {
    use super::*;

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
            (url().local_bytes(0), "local_bytes must be from 1 KiB to 1 TiB, got 0"),
            (url().local_bytes(1023), "local_bytes must be from 1 KiB to 1 TiB"),
            (url().local_bytes(u64::MAX), "local_bytes must be from 1 KiB to 1 TiB"),
            (CacheBuilder::default().local_bytes(2 << 40), "local_bytes must be"),
            (url().local(1).local_bytes(8 << 30), "local_bytes must be at most 4 GiB per entry of the local capacity"),
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
}
