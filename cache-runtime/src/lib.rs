//! Redis caching of async functions, one attribute away.
//!
//! ```no_run
//! use cache_runtime::{Cache, cached};
//! # #[derive(serde::Serialize, serde::Deserialize)] struct Product;
//! # struct Db; #[derive(Debug)] struct DbError;
//! # impl Db { async fn products(&self, page: u32) -> Result<Vec<Product>, DbError> { Ok(vec![]) } }
//!
//! #[cached(ttl = 300, prefix = "products", jitter = 0.1, skip(db))]
//! async fn list_products(db: &Db, page: u32) -> Result<Vec<Product>, DbError> {
//!     db.products(page).await
//! }
//!
//! # async fn run(db: Db) -> Result<(), Box<dyn std::error::Error>> {
//! let cache = Cache::builder().url("redis://127.0.0.1:6379/0").key_prefix("myapp").build()?;
//! cache_runtime::init(cache)?;
//! let first = list_products(&db, 1).await;  // miss: runs the body, stores Ok values
//! let again = list_products(&db, 1).await;  // hit: one Redis round trip
//! cache_runtime::invalidate("products").await?; // from the write path
//! # Ok(()) }
//! ```
//!
//! The cache is optional by construction: before [`init`], while Redis is
//! down, slow or full, or when an entry cannot be decoded, a cached call
//! runs its body and returns what it returns. Such events are counted in
//! [`Stats`] and logged through `tracing`, rate-limited.
//!
//! [`cached`] documents each of the attribute's arguments, with an example.
//!
//! Beyond the attribute: [`Cache::get_or_compute`] with a [`Policy`] for
//! dynamic keys, [`forget`] and [`refresh`] for one entry named by a call,
//! [`invalidate`] for a namespace, [`clear`] for the whole cache.
//!
//! Cargo features:
//! - `metrics`: the counters and a latency histogram through the `metrics`
//!   facade;
//! - `tower`: `CacheLayer`, whole `GET` responses cached as a tower layer
//!   (axum's `Router::route_layer`);
//! - `tls`: `rediss://` URLs over rustls, with a private CA
//!   (`CacheBuilder::tls_root_certificate`) and mutual TLS
//!   (`CacheBuilder::tls_client_certificate`);
//! - `sentinel`: Redis behind Sentinel (`CacheBuilder::sentinel`), following
//!   failovers;
//! - `cluster`: Redis Cluster (`CacheBuilder::cluster`), following slot
//!   moves.

#![warn(missing_docs)]
// On docs.rs (`--cfg docsrs`, see Cargo.toml) every feature-gated item
// carries a badge naming the feature it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

// The flow of a call and what it runs on.
mod call;
mod flight;
mod observe;
mod output;
mod scope;
mod store;
// The cache, its settings and its public operations.
mod builder;
mod cache;
mod policy;
mod programmatic;
mod purge;
mod recent;
mod site;
// Keys, values and the local tier.
mod bounded;
mod codec;
mod compress;
mod keys;
mod local;
// Connections and what guards them.
mod batch;
mod breaker;
mod connection;
// Reporting.
mod error;
#[cfg(feature = "metrics")]
mod metrics;
mod stats;
mod warnings;
// Integrations.
#[cfg(feature = "tower")]
mod layer;
mod macro_support;

/// What `#[cached]` expands to calls; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::macro_support::*;
}

pub use builder::CacheBuilder;
pub use cache::Cache;
pub use call::Absent;
pub use codec::Codec;
pub use compress::Compression;
pub use error::Error;
pub use keys::canonical::Unencodable;
#[cfg(feature = "tower")]
pub use layer::{CacheBody, CacheLayer, CacheService, Credentials};
pub use policy::Policy;
pub use purge::{Purge, PurgeRate};
pub use scope::{forget, refresh, try_refresh};
pub use stats::{Counts, InFlight, Stats, TierSize};

// The attribute's reference lives here, where docs.rs shows it and its
// examples run against this crate.
#[doc = include_str!("cached.md")]
#[doc(inline)]
pub use cache_macros::cached;

static GLOBAL: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();

/// Makes `cache` the process-wide cache that `#[cached]` functions use.
///
/// Call it once at startup. It does not connect: if Redis is unreachable
/// the application runs uncached until it is back. A second call is an
/// [`Error::AlreadyInitialized`] and leaves the first cache in place.
///
/// The cache (this one, or any [`Cache`] shared between runtimes) works
/// from any number of Tokio runtimes, multi-thread or current-thread,
/// created and dropped while the process runs (a runtime per
/// `#[tokio::test]`, per thread, per job). Nothing it needs lives on a
/// caller's runtime: a batch of lookups is flushed by the calls themselves,
/// and a flush dropped with its runtime gives its place back; connections
/// whose runtime went away are replaced by the next call that finds them
/// dead; the local tier's invalidation listener runs on a thread and
/// runtime of its own. A call dropped at any point (a timeout, a
/// `select!`, a client that hung up) gives back what it held: its place in
/// a batch, the circuit breaker's probe, its stampede lock.
///
/// ```
/// use cache_runtime::{Cache, Error};
///
/// let cache = Cache::builder().url("redis://127.0.0.1:6379").build()?;
/// cache_runtime::init(cache.clone())?;
/// assert_eq!(cache_runtime::init(cache), Err(Error::AlreadyInitialized));
/// assert!(cache_runtime::global().is_some());
/// # Ok::<(), Error>(())
/// ```
pub fn init(cache: Cache) -> Result<(), Error> {
    let described = format!("{cache:?}");
    let memory_only = cache.is_memory_only();
    GLOBAL.set(cache).map_err(|_| Error::AlreadyInitialized)?;
    // Once, so that a process running on a cache other than the one meant
    // (a memory-only one in production, say) says so where it is seen.
    if memory_only {
        tracing::warn!(target: "cache_runtime", "process-wide cache: {described}; nothing is shared between processes");
    } else {
        tracing::info!(target: "cache_runtime", "process-wide cache: {described}");
    }
    Ok(())
}

/// The process-wide cache, once [`init`] has run.
///
/// ```
/// assert!(cache_runtime::global().is_none());
/// ```
pub fn global() -> Option<&'static Cache> {
    GLOBAL.get()
}

/// [`Cache::invalidate`] on the process-wide cache.
///
/// ```no_run
/// # async fn write_path() -> Result<(), cache_runtime::Error> {
/// // after committing a product to the database:
/// cache_runtime::invalidate("products").await?;
/// # Ok(()) }
/// ```
pub async fn invalidate(namespace: &str) -> Result<u64, Error> {
    global().ok_or(Error::NotInitialized)?.invalidate(namespace).await
}

/// [`Cache::clear`] on the process-wide cache: every entry of every
/// prefix goes stale, in every process.
///
/// ```no_run
/// # async fn after_migration() -> Result<(), cache_runtime::Error> {
/// // after a data migration that touched everything:
/// cache_runtime::clear().await?;
/// # Ok(()) }
/// ```
pub async fn clear() -> Result<(), Error> {
    global().ok_or(Error::NotInitialized)?.clear().await
}

/// [`Cache::stats`] of the process-wide cache; all zero before [`init`].
///
/// ```
/// let stats = cache_runtime::stats();
/// assert_eq!(stats.total.hits, 0);
/// ```
pub fn stats() -> Stats {
    global().map(Cache::stats).unwrap_or_default()
}
