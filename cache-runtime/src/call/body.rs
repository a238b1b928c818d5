//! What a cached call runs on a miss: a future to await now or, for
//! `refresh_ahead`, a maker whose future may also run after the call has
//! returned, in a task of its own.

use super::renew;
use crate::Cache;
use crate::codec::EntryTimes;
use crate::keys::KeyHash;
use crate::output::Storage;
use crate::policy::Plan;

/// A call's computation.
pub(crate) trait Body<R> {
    type Run: Future<Output = R>;

    /// The computation, to await in the call.
    fn run(self) -> Self::Run;

    /// On a hit that is due for refresh-ahead: recompute in the background,
    /// if this body can outlive the call. `seen`: the entry that was hit.
    fn renew_later(self, cache: &Cache, hash: KeyHash, storage: Storage<R>, seen: EntryTimes);
}

/// A future that borrows from the call: it runs in the call or not at all.
pub(crate) struct Now<F>(pub F);

impl<R, F: Future<Output = R>> Body<R> for Now<F> {
    type Run = F;

    fn run(self) -> F {
        self.0
    }

    fn renew_later(self, _: &Cache, _: KeyHash, _: Storage<R>, _: EntryTimes) {}
}

/// A maker of a computation that borrows from the call: made, and run,
/// only on a miss. Until then the call carries the maker's captures (the
/// function's arguments), not the computation's future, whose size is its
/// deepest state: every hit moves the call into a box (`fetch_or_compute`),
/// and a body holding a large buffer or a database query's future would
/// make every hit allocate and copy it.
pub(crate) struct Deferred<M>(pub M);

impl<R, M, F> Body<R> for Deferred<M>
where
    M: FnOnce() -> F,
    F: Future<Output = R>,
{
    type Run = F;

    fn run(self) -> F {
        (self.0)()
    }

    fn renew_later(self, _: &Cache, _: KeyHash, _: Storage<R>, _: EntryTimes) {}
}

/// A `'static` maker of the computation: `#[cached(refresh_ahead = ...)]`.
pub struct Renewable<M> {
    pub(crate) plan: &'static Plan<'static>,
    pub(crate) make: M,
}

impl<R, M, F> Body<R> for Renewable<M>
where
    M: FnOnce() -> F,
    F: Future<Output = R> + Send + 'static,
    R: Send + 'static,
{
    type Run = F;

    fn run(self) -> F {
        (self.make)()
    }

    fn renew_later(self, cache: &Cache, hash: KeyHash, storage: Storage<R>, seen: EntryTimes) {
        renew::spawn(cache, self.plan, hash, storage, seen, (self.make)());
    }
}
