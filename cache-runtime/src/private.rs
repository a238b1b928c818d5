//! What `#[cached]` expands to calls. Not a public API: names and
//! signatures here change without notice.

// Hidden from the docs and not a public API: the macro is its only user.
#![allow(missing_docs)]

use crate::Cache;
use crate::body::{Body, Now};
use crate::cache::{Intent, Plan, Storage};
use crate::canonical::Unencodable;
use crate::codec::Codec;
use crate::key::KeyHash;
use crate::scope::{self, Mode};
use crate::warnings::{Cause, PROCESS_WARNINGS};
use serde::{Serialize, de::DeserializeOwned};
use std::borrow::Cow;
use std::marker::PhantomData;
use std::sync::OnceLock;
use std::time::Duration;

pub use crate::body::Renewable;
pub use crate::cache::OutputKind;
pub use crate::key::KeyHasher;
pub use crate::site::SiteSlot;

/// The attribute's arguments, one `static` per cached function.
#[derive(Debug)]
pub struct CallSite {
    pub prefix: &'static str,
    pub tags: &'static [Cow<'static, str>],
    /// 0: use the cache's `default_ttl`.
    pub ttl_secs: u64,
    pub jitter: f64,
    pub codec: Codec,
    pub lock: bool,
    /// 0: use the cache's lock timeout.
    pub lock_timeout_ms: u64,
    /// 0: not in the local tier; `u64::MAX`: as long as the entry is fresh.
    pub local_ttl_ms: u64,
    /// 0: no refresh-ahead.
    pub refresh_ahead: f64,
    /// 0: no stale copies.
    pub stale_if_error_secs: u64,
    pub site: SiteSlot,
}

impl CallSite {
    pub(crate) fn plan(&'static self) -> Plan<'static> {
        Plan {
            prefix: self.prefix,
            tags: self.tags,
            ttl: (self.ttl_secs > 0).then(|| Duration::from_secs(self.ttl_secs)),
            jitter: self.jitter,
            codec: self.codec,
            lock: self.lock,
            lock_timeout: (self.lock_timeout_ms > 0).then(|| Duration::from_millis(self.lock_timeout_ms)),
            slot: &self.site,
            local_ttl: match self.local_ttl_ms {
                0 => None,
                u64::MAX => Some(Duration::MAX),
                ms => Some(Duration::from_millis(ms)),
            },
            refresh_ahead: self.refresh_ahead,
            stale_if_error: (self.stale_if_error_secs > 0).then(|| Duration::from_secs(self.stale_if_error_secs)),
        }
    }
}

/// Runs one cached call: `cache` or the process-wide cache, or the bare
/// computation when there is neither.
pub async fn call<R, F>(
    cache: Option<&Cache>,
    site: &'static CallSite,
    key: Result<KeyHash, Unencodable>,
    storage: Storage<R>,
    compute: F,
) -> R
where
    F: Future<Output = R>,
{
    run(cache, site, key, storage, Now(compute)).await
}

/// [`call`] for `refresh_ahead`: `make` builds the computation, which may
/// also run in the background after the call has returned.
pub async fn call_renewable<R, M, F>(
    cache: Option<&Cache>,
    site: &'static CallSite,
    key: Result<KeyHash, Unencodable>,
    storage: Storage<R>,
    make: M,
) -> R
where
    M: FnOnce() -> F,
    F: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    run(cache, site, key, storage, Renewable { site, make }).await
}

async fn run<R, B: Body<R>>(
    cache: Option<&Cache>,
    site: &'static CallSite,
    key: Result<KeyHash, Unencodable>,
    storage: Storage<R>,
    body: B,
) -> R {
    // The closure lets `global()`'s `&'static` shorten to `cache`'s lifetime;
    // the bare function would demand that `cache` be `'static` too.
    #[allow(clippy::redundant_closure)]
    let cache = cache.or_else(|| crate::global());
    match (cache, scope::current()) {
        (Some(cache), Mode::Normal) => cache.fetch_or_compute(&site.plan(), key, storage, Intent::Read, body).await,
        (Some(cache), Mode::Refresh) => cache.fetch_or_compute(&site.plan(), key, storage, Intent::Refresh, body).await,
        (cache, Mode::Forget(slot)) => {
            let outcome = match cache {
                // Boxed: a rare path that should not grow every call's future.
                Some(cache) => Box::pin(cache.forget_entry(&site.plan(), key)).await,
                None => Err(crate::Error::NotInitialized),
            };
            scope::report_forget(&slot, outcome);
            // `forget` stops polling once the outcome is reported: the body
            // never runs.
            std::future::pending().await
        }
        (None, _) => {
            PROCESS_WARNINGS.warn(
                Cause::NotInitialized,
                format_args!("cached call before cache_runtime::init: computing without the cache"),
            );
            body.run().await
        }
    }
}

/// A call site's identity, hashed once: its function's full path, layout
/// version and return type as written.
pub struct IdentityCell(OnceLock<(&'static str, [u8; 32])>);

impl IdentityCell {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        Self(OnceLock::new())
    }

    /// A hasher for the arguments of a call. `anchor` is the type name of a
    /// closure in the function: it names the function's full path with
    /// every generic parameter instantiated, of the function and of its
    /// impl. A `static` is shared by all instantiations, so the cached
    /// digest is used only for the very same name.
    pub fn hasher(&self, anchor: &'static str, version: u32, output: &str) -> KeyHasher {
        if let Some((cached, digest)) = self.0.get()
            && std::ptr::eq(*cached, anchor)
        {
            return KeyHasher::keyed(digest);
        }
        let mut identity = KeyHasher::new(anchor, version);
        identity.part(output.as_bytes());
        let digest = identity.seal();
        let _ = self.0.set((anchor, digest));
        KeyHasher::keyed(&digest)
    }
}

/// Resolves `#[cached(cache = EXPR)]`: anything that borrows as a `Cache`.
pub fn resolve_cache<C: std::borrow::Borrow<Cache>>(cache: &C) -> Cache {
    cache.borrow().clone()
}

/// How outputs of type `R` are stored, checked once at the return type's
/// span: the serde bounds live here only, so a type that is not
/// serializable is reported there, not again inside generated code.
pub fn cacheable<R, K>(_kind: K) -> Storage<R>
where
    K: OutputKind<R>,
    K::Value: Serialize + DeserializeOwned,
{
    Storage::of::<K>()
}

// Picking the output kind by the return type, on stable Rust: method
// resolution tries `&Tag<R>` before `&&Tag<R>`, so `Result` outputs find
// `ResultTag` first and everything else falls back to `PlainTag`. This sees
// through type aliases, which a syntactic check of the return type cannot.

/// A type-level marker for the output type `R`.
pub struct Tag<R>(PhantomData<fn() -> R>);

impl<R> Tag<R> {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Self {
        Tag(PhantomData)
    }
}

/// `Result<T, E>`: store `T` from `Ok`, never an `Err`.
pub struct ResultOutput<T, E>(PhantomData<fn() -> (T, E)>);
/// Any other output: store it as is (so `None` is cached too).
pub struct PlainOutput<R>(PhantomData<fn() -> R>);

pub trait ResultTag {
    type Kind;
    fn kind(&self) -> Self::Kind;
}

impl<T, E> ResultTag for Tag<Result<T, E>> {
    type Kind = ResultOutput<T, E>;
    fn kind(&self) -> Self::Kind {
        ResultOutput(PhantomData)
    }
}

pub trait PlainTag {
    type Kind;
    fn kind(&self) -> Self::Kind;
}

impl<R> PlainTag for &Tag<R> {
    type Kind = PlainOutput<R>;
    fn kind(&self) -> Self::Kind {
        PlainOutput(PhantomData)
    }
}

impl<T, E> OutputKind<Result<T, E>> for ResultOutput<T, E> {
    type Value = T;
    fn stored(output: &Result<T, E>) -> Option<&T> {
        output.as_ref().ok()
    }
    fn from_stored(value: T) -> Result<T, E> {
        Ok(value)
    }
}

impl<R> OutputKind<R> for PlainOutput<R> {
    type Value = R;
    fn stored(output: &R) -> Option<&R> {
        Some(output)
    }
    fn from_stored(value: R) -> R {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type MyResult<T> = Result<T, String>;

    fn stores<R, K: OutputKind<R>>(_: K, output: &R) -> bool {
        K::stored(output).is_some()
    }

    #[test]
    // The borrow is the mechanism: it makes `&Tag<R>` the first candidate.
    #[allow(clippy::needless_borrow)]
    fn results_store_only_ok_even_through_aliases() {
        assert!(stores((&Tag::<MyResult<u8>>::new()).kind(), &Ok(1)));
        assert!(!stores((&Tag::<MyResult<u8>>::new()).kind(), &Err("no".into())));
        assert!(stores((&Tag::<Option<u8>>::new()).kind(), &None));
        assert!(stores((&Tag::<u8>::new()).kind(), &7));
    }
}
