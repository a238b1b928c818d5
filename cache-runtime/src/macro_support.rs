//! What `#[cached]` expands to calls. Not a public API: names and
//! signatures here change without notice.

// Hidden from the docs and not a public API: the macro is its only user.
#![allow(missing_docs)]

use crate::Cache;
use crate::call::{Body, Intent, Now};
use crate::keys::canonical::Unencodable;
use crate::scope::{self, Mode};
use crate::warnings::{Cause, PROCESS_WARNINGS};
use serde::{Serialize, de::DeserializeOwned};
use std::marker::PhantomData;
use std::sync::OnceLock;

pub use crate::call::Renewable;
pub use crate::codec::Codec;
pub use crate::keys::{KeyHash, KeyHasher};
pub use crate::output::{OutputKind, PlainOutput, ResultOutput, Storage};
pub use crate::policy::Plan;
pub use crate::site::SiteCell;

/// Runs one cached call: `cache` or the process-wide cache, or the bare
/// computation when there is neither.
pub async fn call<R, F>(
    cache: Option<&Cache>,
    plan: &'static Plan<'static>,
    key: Result<KeyHash, Unencodable>,
    storage: Storage<R>,
    compute: F,
) -> R
where
    F: Future<Output = R>,
{
    run(cache, plan, key, storage, Now(compute)).await
}

/// [`call`] for `refresh_ahead`: `make` builds the computation, which may
/// also run in the background after the call has returned.
pub async fn call_renewable<R, M, F>(
    cache: Option<&Cache>,
    plan: &'static Plan<'static>,
    key: Result<KeyHash, Unencodable>,
    storage: Storage<R>,
    make: M,
) -> R
where
    M: FnOnce() -> F,
    F: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    run(cache, plan, key, storage, Renewable { plan, make }).await
}

async fn run<R, B: Body<R>>(
    cache: Option<&Cache>,
    plan: &'static Plan<'static>,
    key: Result<KeyHash, Unencodable>,
    storage: Storage<R>,
    body: B,
) -> R {
    // The closure lets `global()`'s `&'static` shorten to `cache`'s lifetime;
    // the bare function would demand that `cache` be `'static` too.
    #[allow(clippy::redundant_closure)]
    let cache = cache.or_else(|| crate::global());
    match (cache, scope::current()) {
        (Some(cache), Mode::Normal) => cache.fetch_or_compute(plan, key, storage, Intent::Read, body).await,
        (Some(cache), Mode::Refresh(_)) => cache.fetch_or_compute(plan, key, storage, Intent::Refresh, body).await,
        // A cached call started after the one that took the forget (inside
        // its wrapper's future) behaves normally.
        (Some(cache), Mode::Forget(report)) if !scope::claim_forget(&report) => {
            cache.fetch_or_compute(plan, key, storage, Intent::Read, body).await
        }
        (cache, Mode::Forget(report)) => {
            let outcome = match cache {
                // Boxed: a rare path that should not grow every call's future.
                Some(cache) => Box::pin(cache.forget_entry(plan, key)).await,
                None => Err(crate::Error::NotInitialized),
            };
            scope::report_forget(&report, outcome);
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
