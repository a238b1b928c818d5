//! What `#[cached]` expands to calls. Not a public API: names and
//! signatures here change without notice.

// Hidden from the docs and not a public API: the macro is its only user.
#![allow(missing_docs)]

use crate::Cache;
use crate::call::{Body, Deferred, Intent, Item};
use crate::keys::canonical::Unencodable;
use crate::scope::{self, Mode};
use crate::warnings::{Cause, PROCESS_WARNINGS};
use serde::{Serialize, de::DeserializeOwned};
use std::marker::PhantomData;
use std::sync::OnceLock;

pub use crate::Absent;
pub use crate::call::Renewable;
pub use crate::codec::Codec;
pub use crate::keys::{KeyHash, KeyHasher, KeyTail};
pub use crate::output::{
    ItemMap, ManyKind, ManyPlain, ManyResult, OutputKind, PlainOutput, ResultOutput, Split, Storage,
};
pub use crate::policy::Plan;
pub use crate::site::SiteCell;

/// Runs one cached call: `cache` or the process-wide cache, or the bare
/// computation when there is neither. `make` builds the computation, on a
/// miss only (`Deferred`).
pub async fn call<R, M, F>(
    cache: Option<&Cache>,
    plan: &'static Plan<'static>,
    key: Result<KeyHash, Unencodable>,
    storage: Storage<R>,
    make: M,
) -> R
where
    M: FnOnce() -> F,
    F: Future<Output = R>,
{
    run(cache, plan, key, storage, Deferred(make)).await
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
            // Boxed: inline, the body's future would be part of every
            // cached call's future, hits included.
            Box::pin(body.run()).await
        }
    }
}

/// A bulk call's items and how its output is taken apart and rebuilt,
/// resolved at the return type's span by [`many_kind`].
pub struct Many<R, K, V> {
    items: Vec<K>,
    storage: Storage<Option<V>>,
    split: fn(R) -> Split<K, V, R>,
    join: fn(Vec<(K, V)>) -> R,
    hash: fn(&mut KeyHasher, &K) -> Result<(), Unencodable>,
}

/// Checks a bulk call's output at the return type's span: a map (or
/// `Result` of one) from the batch parameter's items to storable values.
/// Every bound of a bulk call lives here, so a mistake is reported once.
pub fn many_kind<R, M, K>(_kind: M, items: Vec<K>) -> Many<R, K, M::Value>
where
    M: ManyKind<R, Item = K>,
    K: Serialize,
    M::Value: Serialize + DeserializeOwned,
{
    fn hash<K: Serialize>(hasher: &mut KeyHasher, item: &K) -> Result<(), Unencodable> {
        hasher.arg(item).map(drop)
    }
    Many {
        items,
        storage: Storage::of::<PlainOutput<Option<M::Value>>>(),
        split: M::split,
        join: M::join,
        hash: hash::<K>,
    }
}

/// Runs one bulk call (`#[cached(batch(..))]`): each item cached in an
/// entry keyed as a single call would be, the arguments before the items
/// hashed in `head`, those after in `tail`. `body` gets the items to
/// compute; it runs once, and again only for items whose computation by
/// another caller failed.
pub async fn call_many<R, K, V, F, Fut>(
    cache: Option<&Cache>,
    plan: &'static Plan<'static>,
    head: Result<KeyHasher, Unencodable>,
    tail: Result<KeyTail, Unencodable>,
    many: Many<R, K, V>,
    absent: Absent,
    mut body: F,
) -> R
where
    F: FnMut(Vec<K>) -> Fut,
    Fut: Future<Output = R>,
{
    let Many { items, storage, split, join, hash } = many;
    let key_of = |item: &K| -> Result<KeyHash, Unencodable> {
        let mut hasher = head.clone()?;
        hash(&mut hasher, item)?;
        hasher.tail(tail.as_ref().map_err(Clone::clone)?);
        Ok(hasher.finish())
    };
    #[allow(clippy::redundant_closure)]
    let cache = cache.or_else(|| crate::global());
    let Some(cache) = cache else {
        PROCESS_WARNINGS.warn(
            Cause::NotInitialized,
            format_args!("cached call before cache_runtime::init: computing without the cache"),
        );
        return body(items).await;
    };
    let items: Vec<Item<K>> = items.into_iter().map(|item| Item { key: key_of(&item), item }).collect();
    let compute = |missing: Vec<K>| {
        let output = body(missing);
        async move { split(output.await) }
    };
    match scope::current() {
        Mode::Forget(report) if scope::claim_forget(&report) => {
            let mut outcome = Ok(false);
            for item in &items {
                match Box::pin(cache.forget_entry(plan, item.key.clone())).await {
                    Ok(existed) => outcome = outcome.map(|any| any || existed),
                    Err(e) => outcome = Err(e),
                }
            }
            scope::report_forget(&report, outcome);
            std::future::pending().await
        }
        Mode::Refresh(_) => {
            // Write-through for many items: each entry is forgotten, then
            // computed and stored as a miss would be. A computation that
            // read before the forget never stores over it.
            let mut reached = Ok(());
            for item in &items {
                if let Err(e) = Box::pin(cache.forget_entry(plan, item.key.clone())).await {
                    reached = Err(e);
                }
            }
            let found = cache.fetch_or_compute_many(plan, items, storage, absent, &key_of, compute).await;
            scope::report_refresh(reached);
            found.map_or_else(|output| output, join)
        }
        _ => {
            let found = cache.fetch_or_compute_many(plan, items, storage, absent, &key_of, compute).await;
            found.map_or_else(|output| output, join)
        }
    }
}

/// A non-batch argument of a bulk call, for the body's next run: the body
/// may run again for items another caller failed to compute.
pub fn again<T: Clone>(value: &T) -> T {
    value.clone()
}

/// Picks the bulk output kind, as [`ResultTag`] and [`PlainTag`] do for
/// single calls.
pub trait ManyResultTag {
    type Kind;
    fn many_kind(&self) -> Self::Kind;
}

impl<M, E> ManyResultTag for Tag<Result<M, E>> {
    type Kind = ManyResult<M, E>;
    fn many_kind(&self) -> Self::Kind {
        ManyResult(PhantomData)
    }
}

pub trait ManyPlainTag {
    type Kind;
    fn many_kind(&self) -> Self::Kind;
}

impl<R> ManyPlainTag for &Tag<R> {
    type Kind = ManyPlain<R>;
    fn many_kind(&self) -> Self::Kind {
        ManyPlain(PhantomData)
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
