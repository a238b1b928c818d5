//! One cached call, from the lookup to the store.
//!
//! With a local tier, a call looks there first (`tier.rs`, no network). A
//! Redis hit is one `MGET` of the entry and its namespace versions. On a
//! miss, concurrent callers in this process elect one leader (`flight.rs`);
//! the leader takes the stampede lock, which re-checks for an entry stored
//! meanwhile (`lead.rs`), computes, and stores the value bound to the
//! versions observed before computing, which also releases the lock
//! (`finish.rs`). Everyone else gets the leader's result, or takes over
//! when the leader fails, and nobody waits longer than the lock timeout.
//! Where the entries live, Redis or this process alone, is the backend's
//! business (`store/`): the flow is the same.
//!
//! A hit on an entry due for refresh-ahead returns at once and hands the
//! body to a background renewal (`renew.rs`). A miss that finds a stale
//! copy kept for `stale_if_error` returns that copy when the body fails.
//! What happens on the way is reported as events (`observe.rs`).

mod body;
mod bulk;
mod finish;
mod lead;
mod lock;
mod lookup;
mod renew;
mod tier;

pub use body::Renewable;
pub(crate) use body::{Body, Deferred, Now};
pub use bulk::Absent;
pub(crate) use bulk::Item;

use crate::Cache;
use crate::codec::EntryTimes;
use crate::error::{Error, Fault};
use crate::flight::{Role, Shared};
use crate::keys::canonical::Unencodable;
use crate::keys::{EntryKeys, KeyHash};
use crate::observe::{Event, Observer, Outcome};
use crate::output::Storage;
use crate::policy::Plan;
use crate::scope;
use crate::store::{StoreMode, digest};
use finish::Settle;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Whether a call may answer from an existing entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Intent {
    /// Cache-aside: a usable entry is returned.
    Read,
    /// Write-through: compute anyway and overwrite.
    Refresh,
}

/// What reading an entry found.
enum Lookup<R> {
    /// `renew`: the entry hit, when it is due for refresh-ahead.
    Hit {
        output: R,
        renew: Option<EntryTimes>,
    },
    Miss(Seen),
    /// The backend could not be asked; compute without storing.
    Unavailable,
}

/// What a miss saw.
struct Seen {
    /// The namespace versions at the read (`None`: the namespace has no
    /// version yet); empty for a memory-only cache.
    versions: Vec<Option<Vec<u8>>>,
    /// The digest of what the entry's key held (`store::digest`).
    entry: String,
    /// A stale copy bound to the current versions, kept for `stale_if_error`.
    stale: Option<Arc<Vec<u8>>>,
}

/// What a leader knows before it asks for the lock.
enum Before {
    /// Its lookup missed.
    Seen(Seen),
    /// The backend could not be asked.
    Unavailable,
    /// It did not look: the site expects a miss, and the lock script reads
    /// the entry in the same round trip as it takes the lock.
    Skipped,
}

/// The state a computation was based on, which its store expects to be
/// unchanged.
#[derive(Clone)]
pub(super) struct Observed {
    pub versions: Vec<Vec<u8>>,
    /// The entry's digest (`store::digest`).
    pub entry: String,
}

/// The current time in Unix milliseconds: entry times are compared across
/// processes.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Cache {
    /// The cache-aside flow of one call; see the module docs.
    ///
    /// The flow is boxed: a `Box`'s layout does not depend on what it holds,
    /// so the compiler's layout queries for a caller's future stop here
    /// instead of recursing through every layer of the flow. Without it, a
    /// few nested async functions in the user's code exceed rustc's default
    /// query depth. The box holds the flow alone, or with its span when
    /// tracing wants it: entering a disabled span still costs a little on
    /// every poll, and a hit's box stays under 1 KiB, glibc's fast path.
    pub(crate) async fn fetch_or_compute<R, B>(
        &self,
        plan: &Plan<'_>,
        key: Result<KeyHash, Unencodable>,
        storage: Storage<R>,
        intent: Intent,
        body: B,
    ) -> R
    where
        B: Body<R>,
    {
        let observer = self.observer(plan);
        // A local hit needs neither the box nor the flow's state.
        if intent == Intent::Read
            && let Ok(hash) = key
            && let Some((output, renew)) = tier::hit(self, plan, &observer, hash, storage)
        {
            if let Some(seen) = renew {
                body.renew_later(self, hash, storage, seen);
            }
            return output;
        }
        if observer.span.is_disabled() {
            Box::pin(self.flow(plan, key, storage, intent, body, &observer)).await
        } else {
            let span = observer.span.clone();
            Box::pin(self.flow(plan, key, storage, intent, body, &observer).instrument(span)).await
        }
    }

    fn observer<'c>(&'c self, plan: &Plan<'c>) -> Observer<'c> {
        Observer::new(plan.site.get(self.view(), plan.prefix, plan.namespaces()), plan.prefix, self.warnings())
    }

    async fn flow<R, B>(
        &self,
        plan: &Plan<'_>,
        key: Result<KeyHash, Unencodable>,
        storage: Storage<R>,
        intent: Intent,
        body: B,
        observer: &Observer<'_>,
    ) -> R
    where
        B: Body<R>,
    {
        let ttl = plan.ttl.or(self.default_ttl());
        if let Some(why) = misconfiguration::<R>(plan, ttl, observer) {
            observer.outcome(Outcome::Bypass);
            observer.misconfigured(&why);
            if intent == Intent::Refresh {
                scope::report_refresh(Err(Error::InvalidConfig(why)));
            }
            // Boxed: the computation's future is not part of every hit's.
            return Box::pin(body.run()).await;
        }
        let (Some(ttl), Ok(hash)) = (ttl, key.as_ref()) else {
            observer.outcome(Outcome::Bypass);
            let why = match &key {
                Err(e) => format!("prefix `{}`: {e}; computing without the cache", plan.prefix),
                Ok(_) => String::new(),
            };
            observer.event(Event::Unencodable(&why));
            if intent == Intent::Refresh {
                scope::report_refresh(Err(Error::Encode(why)));
            }
            return Box::pin(body.run()).await;
        };
        let hash = *hash;
        observer.key(hash);
        if intent == Intent::Refresh
            && let Some((tier, _)) = self.local_for(plan)
        {
            // Gone before the refresh reads (and before its call captures
            // the tier's state), so the old value is not served here
            // meanwhile, and the new one can be kept.
            tier.forget(&hash);
        }
        let keys = EntryKeys::new(self.key_prefix(), plan.prefix, &observer.site.version_keys, hash);
        let call = Call::new(self, plan, ttl, storage, hash, &keys, observer);
        match intent {
            // The miss paths are boxed: a hit should not carry their size.
            Intent::Refresh => Box::pin(call.refresh(body)).await,
            Intent::Read if !plan.lock => match call.lookup().await {
                Lookup::Hit { output, renew } => call.hit(output, renew, body),
                Lookup::Miss(seen) => Box::pin(call.compute_unlocked(Some(seen), body)).await,
                Lookup::Unavailable => Box::pin(call.compute_unlocked(None, body)).await,
            },
            Intent::Read => call.coordinated(body).await,
        }
    }
}

/// Why a call site cannot use the cache at all, whatever its arguments.
/// Checked on every call; the checks cost a few loads when all is well.
fn misconfiguration<R>(plan: &Plan<'_>, ttl: Option<Duration>, observer: &Observer<'_>) -> Option<String> {
    if ttl.is_none() {
        return Some(format!(
            "prefix `{}` has no ttl and the cache no default_ttl, so its calls are never cached: add `ttl = ...` \
             to #[cached] (or Policy::ttl), or `.default_ttl(...)` to the cache builder",
            plan.prefix
        ));
    }
    if let Some(invalid) = &observer.site.invalid {
        return Some(format!("{invalid}, so its calls are never cached"));
    }
    if let Some((name, Some(why))) = observer.site.round_trip.get()
        && *name == std::any::type_name::<R>()
    {
        return Some(finish::no_round_trip(plan, name, why));
    }
    None
}

/// One call's context.
struct Call<'c, R> {
    cache: &'c Cache,
    plan: &'c Plan<'c>,
    ttl: Duration,
    storage: Storage<R>,
    hash: KeyHash,
    keys: &'c EntryKeys<'c>,
    observer: &'c Observer<'c>,
    local: Option<tier::Local<'c>>,
    /// The cache's write fence before the call's first read: a value that
    /// no store checked is shared only if no write happened since.
    fence: u64,
}

impl<'c, R> Call<'c, R> {
    fn new(
        cache: &'c Cache,
        plan: &'c Plan<'c>,
        ttl: Duration,
        storage: Storage<R>,
        hash: KeyHash,
        keys: &'c EntryKeys<'c>,
        observer: &'c Observer<'c>,
    ) -> Self {
        let fence = cache.fence();
        let local = tier::Local::for_call(cache, plan, observer, hash);
        Call { cache, plan, ttl, storage, hash, keys, observer, local, fence }
    }

    /// The value of `result`, or `None` after counting its fault.
    fn absorb<T>(&self, result: Result<T, Fault>) -> Option<T> {
        result.map_err(|fault| self.observer.event(Event::Fault(&fault))).ok()
    }

    /// Returns a hit's output, first handing the body to a refresh-ahead if
    /// the entry is due for one.
    fn hit<B: Body<R>>(&self, output: R, renew: Option<EntryTimes>, body: B) -> R {
        if let Some(seen) = renew {
            body.renew_later(self.cache, self.hash, self.storage, seen);
        }
        output
    }

    /// With stampede protection: one computation per key in this process,
    /// and across processes while the lock is held.
    async fn coordinated<B: Body<R>>(&self, body: B) -> R {
        let lock_timeout = self.lock_timeout();
        let deadline = Instant::now() + lock_timeout;
        let mut skip = self.miss_likely();
        loop {
            let before = if skip {
                skip = false;
                Before::Skipped
            } else {
                match self.lookup().await {
                    Lookup::Hit { output, renew } => return self.hit(output, renew, body),
                    Lookup::Miss(seen) => Before::Seen(seen),
                    Lookup::Unavailable => Before::Unavailable,
                }
            };
            if Instant::now() >= deadline {
                self.observer.event(Event::LockTimeout);
                return Box::pin(self.compute_unlocked_after(before, body)).await;
            }
            match self.cache.flights().join(self.keys.entry()) {
                // The miss paths are boxed: a hit should not carry their size.
                Role::Leader(leader) => return Box::pin(self.lead(leader, before, deadline, body)).await,
                Role::Waiter(mut waiter) => {
                    match Box::pin(self.wait_for_leader(&mut waiter, deadline, lock_timeout)).await {
                        Ok(Some(Shared::Value(payload))) => {
                            // The leader's own encoding: it may be over max_value_bytes.
                            if let Ok(output) = (self.storage.decode)(&payload, self.plan.codec, usize::MAX) {
                                self.observer.outcome(Outcome::Coalesced);
                                return output;
                            }
                        }
                        // The leader's value is stale, or it gave up: look again;
                        // the first to get here leads.
                        Ok(Some(Shared::Stale) | None) => {}
                        Err(_) => {
                            self.observer.event(Event::LockTimeout);
                            return Box::pin(self.compute_unlocked_after(before, body)).await;
                        }
                    }
                }
            }
        }
    }

    /// Whether this call asks for the lock without looking first: its site
    /// missed `Site::MISS_LIKELY` times in a row in Redis. The lock script
    /// answers with the entry when there is a current one, so a wrong guess
    /// costs a script instead of an `MGET`, not a round trip. Not with a
    /// local tier (looked at first anyway) nor `stale_if_error` (the lock
    /// script does not return stale copies).
    fn miss_likely(&self) -> bool {
        self.local.is_none()
            && self.plan.stale_if_error.is_none()
            && self.cache.backend().redis().is_some()
            && self.observer.site.miss_likely()
    }

    /// [`compute_unlocked`](Self::compute_unlocked) after the lock timeout:
    /// a call that did not look yet looks now.
    async fn compute_unlocked_after<B: Body<R>>(&self, before: Before, body: B) -> R {
        let seen = match before {
            Before::Seen(seen) => Some(seen),
            Before::Unavailable => None,
            Before::Skipped => match self.lookup().await {
                Lookup::Hit { output, renew } => return self.hit(output, renew, body),
                Lookup::Miss(seen) => Some(seen),
                Lookup::Unavailable => None,
            },
        };
        self.compute_unlocked(seen, body).await
    }

    /// Write-through: compute now, and replace the entry read before
    /// computing. An output that is not cacheable (an `Err`) forgets the
    /// entry instead: the write path asked for the old value to go. The
    /// outcome is reported to `try_refresh`.
    async fn refresh<B: Body<R>>(&self, body: B) -> R {
        let observed = self.observe_for_refresh().await;
        // Nested cached calls in the body behave normally.
        let output = self.compute(Outcome::Refresh, scope::normally(body.run())).await;
        let reached = if (self.storage.cacheable)(&output) {
            let settle = Settle {
                observed: observed.as_ref().ok().cloned(),
                guard: None,
                stale: None,
                mode: StoreMode::Replace,
                share: false,
            };
            let settled = self.settle(output, settle).await;
            let reached = match (observed, settled.fault) {
                (Err(fault), _) | (Ok(_), Some(fault)) => Err(fault.into()),
                // Another write got there since this one read the entry:
                // which of the two read the newer data is unknown, so
                // neither value stays, and readers compute afresh.
                (Ok(_), None) if settled.superseded => {
                    self.cache.forget_entry(self.plan, Ok(self.hash)).await.map(drop)
                }
                (Ok(_), None) => Ok(()),
            };
            (settled.output, reached)
        } else {
            (output, self.cache.forget_entry(self.plan, Ok(self.hash)).await.map(drop))
        };
        // Coalesced callers must not be handed a value computed before
        // this write.
        self.cache.bump_fence();
        scope::report_refresh(reached.1);
        reached.0
    }

    /// What a write-through's store is bound to, or why it cannot store.
    async fn observe_for_refresh(&self) -> Result<Observed, Fault> {
        let backend = self.cache.backend();
        let result = async {
            let read = backend.read(self.keys).await?;
            let versions = backend.seed_missing(self.keys, read.versions).await?;
            Ok(Observed { versions, entry: digest(read.entry.as_deref()) })
        }
        .await;
        if let Err(fault) = &result {
            self.observer.event(Event::Fault(fault));
        }
        result
    }

    /// Without coordination: `lock = false`, or past the lock timeout.
    async fn compute_unlocked<B: Body<R>>(&self, seen: Option<Seen>, body: B) -> R {
        let (outcome, observed, stale) = match seen {
            Some(Seen { versions, entry, stale }) => (Outcome::Miss, self.observed(versions, entry).await, stale),
            None => (Outcome::Bypass, None, None),
        };
        let output = self.compute(outcome, body.run()).await;
        let settle = Settle { observed, guard: None, stale, mode: StoreMode::Fill, share: false };
        self.settle(output, settle).await.output
    }

    async fn compute<F: Future<Output = R>>(&self, outcome: Outcome, compute: F) -> R {
        self.observer.outcome(outcome);
        compute.await
    }

    fn lock_timeout(&self) -> Duration {
        self.plan.lock_timeout.unwrap_or(self.cache.lock_timeout())
    }

    /// What was observed, after giving any namespace without a version its
    /// first; `None` when the backend could not be asked.
    async fn observed(&self, versions: Vec<Option<Vec<u8>>>, entry: String) -> Option<Observed> {
        let seeded = self.cache.backend().seed_missing(self.keys, versions).await;
        Some(Observed { versions: self.absorb(seeded)?, entry })
    }
}
