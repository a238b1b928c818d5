//! A call site's caching rules: [`Policy`], the public builder for the
//! programmatic API, and [`Plan`], what the call flow reads, which
//! `#[cached]` emits directly as a `static`.

use crate::codec::Codec;
use crate::compress::Compression;
use crate::site::SiteCell;
use std::borrow::Cow;
use std::time::Duration;

/// What one call site asks of the cache: the attribute's arguments, or a
/// [`Policy`]'s. Not a public API: `#[cached]` builds it as a `static`.
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub struct Plan<'a> {
    pub prefix: &'a str,
    pub tags: &'a [Cow<'static, str>],
    /// `None`: the cache's `default_ttl`.
    pub ttl: Option<Duration>,
    pub jitter: f64,
    pub codec: Codec,
    /// How payloads over the cache's threshold are compressed in Redis;
    /// `None`: the cache's choice.
    pub compress: Option<Compression>,
    /// Stampede protection: one computation per key at a time.
    pub lock: bool,
    /// How long callers wait for another's computation; `None`: the cache's.
    pub lock_timeout: Option<Duration>,
    /// Use the local tier, keeping entries at most this long there
    /// (`Duration::MAX`: as long as they are fresh).
    pub local_ttl: Option<Duration>,
    /// Renew an entry in the background once this share of its TTL has
    /// passed; 0: never.
    pub refresh_ahead: f64,
    /// Keep a stale copy this long past the TTL, for when computing fails.
    pub stale_if_error: Option<Duration>,
    /// Where the call site keeps its state for the cache it is used with.
    pub site: &'a SiteCell,
}

impl Plan<'_> {
    /// The prefix, then the tags.
    pub(crate) fn namespaces(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.prefix).chain(self.tags.iter().map(|tag| &**tag))
    }
}

/// The caching rules of a namespace, for [`Cache::get_or_compute`] and
/// friends: what `#[cached(...)]`'s arguments are to the attribute.
///
/// ```
/// use cache_runtime::{Codec, Policy};
/// use std::time::Duration;
///
/// let policy = Policy::new("product_page")
///     .ttl(Duration::from_secs(600))
///     .jitter(0.1)
///     .tags(["products", "categories"])
///     .codec(Codec::Json);
/// assert_eq!(policy.prefix(), "product_page");
/// ```
///
/// [`Cache::get_or_compute`]: crate::Cache::get_or_compute
#[derive(Debug, Clone)]
pub struct Policy {
    prefix: Cow<'static, str>,
    tags: Vec<Cow<'static, str>>,
    ttl: Option<Duration>,
    jitter: f64,
    codec: Codec,
    compress: Option<Compression>,
    version: u32,
    lock: bool,
    lock_timeout: Option<Duration>,
    local_ttl: Option<Duration>,
    stale_if_error: Option<Duration>,
    absent: crate::Absent,
    site: SiteCell,
}

impl Policy {
    /// Entries in namespace `prefix`, with the cache's `default_ttl`, no
    /// jitter, no tags, the bincode codec, version 1, and stampede
    /// protection with the cache's lock timeout.
    pub fn new(prefix: impl Into<Cow<'static, str>>) -> Self {
        Self {
            prefix: prefix.into(),
            tags: Vec::new(),
            ttl: None,
            jitter: 0.0,
            codec: Codec::Bincode,
            compress: None,
            version: 1,
            lock: true,
            lock_timeout: None,
            local_ttl: None,
            stale_if_error: None,
            absent: crate::Absent::Cache,
            site: SiteCell::new(),
        }
    }

    /// How long entries live; clamped to [1 ms, ten years] (Redis counts
    /// whole milliseconds, and refuses expiries past its clock's range).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let policy = cache_runtime::Policy::new("rates").ttl(Duration::MAX); // ten years
    /// ```
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl.clamp(crate::builder::MIN_TTL, crate::builder::MAX_TTL));
        self
    }

    /// Spread each TTL uniformly over ±`jitter` of it; clamped to [0, 0.5].
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_nan() { 0.0 } else { jitter.clamp(0.0, 0.5) };
        self
    }

    /// More namespaces the entries belong to: invalidating any of them
    /// makes the entries stale.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<Cow<'static, str>>,
    {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// How values are stored.
    pub fn codec(mut self, codec: Codec) -> Self {
        self.codec = codec;
        self
    }

    /// How values at least the cache's threshold long are compressed in
    /// Redis, instead of the cache's
    /// [`compression`](crate::CacheBuilder::compression). Entries stored
    /// otherwise (uncompressed, or by another algorithm) still read.
    ///
    /// ```
    /// use cache_runtime::{Compression, Policy};
    ///
    /// // Already-compressed images: not worth another pass.
    /// let policy = Policy::new("thumbnails").compress(Compression::None);
    /// ```
    pub fn compress(mut self, compression: Compression) -> Self {
        self.compress = Some(compression);
        self
    }

    /// Bump when the cached type's layout changes: old entries are ignored.
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Stampede protection (default on): concurrent misses of one key, in
    /// this process and across processes, run one computation.
    pub fn lock(mut self, lock: bool) -> Self {
        self.lock = lock;
        self
    }

    /// How long callers wait for another's computation of the same key;
    /// clamped to [1 ms, 24 h], the range of
    /// [`CacheBuilder::lock_timeout`](crate::CacheBuilder::lock_timeout).
    ///
    /// ```
    /// use std::time::Duration;
    ///
    /// let policy = cache_runtime::Policy::new("rates").lock_timeout(Duration::from_millis(300));
    /// ```
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = Some(timeout.clamp(crate::builder::MIN_LOCK_TIMEOUT, crate::builder::MAX_LOCK_TIMEOUT));
        self
    }

    /// Keep entries in the cache's local tier too (see
    /// [`CacheBuilder::local`](crate::CacheBuilder::local)), for at most
    /// `local_ttl`: hits then cost no network. Invalidations reach the
    /// local tiers of all processes; `local_ttl` bounds how stale a copy can
    /// get should one be missed. Clamped to at most ten years.
    ///
    /// ```
    /// use cache_runtime::Policy;
    /// use std::time::Duration;
    ///
    /// let policy = Policy::new("rates").ttl(Duration::from_secs(60)).local_ttl(Duration::from_secs(5));
    /// ```
    pub fn local_ttl(mut self, local_ttl: Duration) -> Self {
        self.local_ttl = Some(local_ttl.min(crate::builder::MAX_TTL));
        self
    }

    /// Keep each entry `window` past its TTL, and return that stale copy
    /// when the computation fails (an `Err`), instead of the error. An
    /// entry invalidated through its namespace is never served stale.
    /// Clamped to at most ten years; zero means none.
    ///
    /// ```
    /// use cache_runtime::Policy;
    /// use std::time::Duration;
    ///
    /// let policy = Policy::new("prices").ttl(Duration::from_secs(60)).stale_if_error(Duration::from_secs(3600));
    /// ```
    pub fn stale_if_error(mut self, window: Duration) -> Self {
        self.stale_if_error = Some(window.min(crate::builder::MAX_TTL)).filter(|w| !w.is_zero());
        self
    }

    /// What [`Cache::get_or_compute_many`](crate::Cache::get_or_compute_many)
    /// does with an item its computation did not return: cache that it is
    /// absent (the default), or nothing.
    ///
    /// ```
    /// use cache_runtime::{Absent, Policy};
    ///
    /// let policy = Policy::new("users").absent(Absent::Skip);
    /// ```
    pub fn absent(mut self, absent: crate::Absent) -> Self {
        self.absent = absent;
        self
    }

    pub(crate) fn absent_items(&self) -> crate::Absent {
        self.absent
    }

    /// The namespace.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub(crate) fn version_number(&self) -> u32 {
        self.version
    }

    pub(crate) fn plan(&self) -> Plan<'_> {
        Plan {
            prefix: &self.prefix,
            tags: &self.tags,
            ttl: self.ttl,
            jitter: self.jitter,
            codec: self.codec,
            compress: self.compress,
            lock: self.lock,
            lock_timeout: self.lock_timeout,
            site: &self.site,
            local_ttl: self.local_ttl,
            // Renewing needs a computation that outlives the call, which
            // `get_or_compute`'s borrowed future is not.
            refresh_ahead: 0.0,
            stale_if_error: self.stale_if_error,
        }
    }
}
