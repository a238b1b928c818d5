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
//! Beyond the attribute: [`Cache::get_or_compute`] with a [`Policy`] for
//! dynamic keys, [`forget`] and [`refresh`] for one entry named by a call,
//! [`invalidate`] for a namespace.
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

mod batch;
mod body;
mod breaker;
mod builder;
mod cache;
mod canonical;
mod channel;
mod codec;
mod connection;
mod error;
mod flight;
mod flow;
mod key;
#[cfg(feature = "tower")]
mod layer;
mod local;
#[cfg(feature = "metrics")]
mod metrics;
mod policy;
mod private;
mod scope;
mod scripts;
mod site;
mod stats;
mod warnings;

/// What `#[cached]` expands to calls; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use crate::private::*;
}

pub use builder::CacheBuilder;
pub use cache::Cache;
pub use canonical::Unencodable;
pub use codec::Codec;
pub use error::Error;
pub use key::{KeyHash, KeyHasher};
#[cfg(feature = "tower")]
pub use layer::{CacheBody, CacheLayer, CacheService, Credentials};
pub use policy::Policy;
pub use scope::{forget, refresh};
pub use stats::{Counts, Stats};

/// Caches an async function in Redis. See the crate README for the
/// arguments; the function body runs only on a miss.
///
/// ```no_run
/// use cache_runtime::cached;
///
/// #[cached(ttl = 60, prefix = "greeting")]
/// async fn greeting(name: String) -> String {
///     format!("hello, {name}")
/// }
/// ```
pub use cache_macros::cached;

static GLOBAL: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();

/// Makes `cache` the process-wide cache that `#[cached]` functions use.
///
/// Call it once at startup. It does not connect: if Redis is unreachable
/// the application runs uncached until it is back. A second call is an
/// [`Error::AlreadyInitialized`] and leaves the first cache in place.
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
    GLOBAL.set(cache).map_err(|_| Error::AlreadyInitialized)
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

/// [`Cache::stats`] of the process-wide cache; all zero before [`init`].
///
/// ```
/// let stats = cache_runtime::stats();
/// assert_eq!(stats.total.hits, 0);
/// ```
pub fn stats() -> Stats {
    global().map(Cache::stats).unwrap_or_default()
}
