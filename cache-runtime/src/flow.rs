//! One cached call, from the lookup to the store.
//!
//! With a local tier, a call looks there first (no network). A Redis hit
//! is one `MGET` of the entry and its namespace versions. On a miss,
//! concurrent callers in this process elect one leader (`flight`); the
//! leader takes the Redis stampede lock (`scripts::LOCK`, which re-checks
//! for an entry stored meanwhile), computes, and stores the value bound to
//! the versions observed before computing (`scripts::STORE`, which also
//! releases the lock). Everyone else gets the leader's result, or takes
//! over when the leader fails, and nobody waits longer than the lock
//! timeout. A memory-only cache runs the same flow with the local tier as
//! its store and no Redis steps.
//!
//! A hit on an entry due for refresh-ahead returns at once and hands the
//! body to a background renewal (`renew`), which takes the same lock. A
//! miss that finds a stale copy kept for `stale_if_error` returns that copy
//! when the body fails.

use crate::batch;
use crate::body::Body;
use crate::cache::{Cache, Encoded, Intent, Plan, Storage};
use crate::canonical::Unencodable;
use crate::codec::{EntryTimes, StoredEntry};
use crate::connection::Connections;
use crate::error::Fault;
use crate::flight::{self, Leader, Role, Shared};
use crate::key::{EntryKeys, KeyHash};
use crate::local::{Capture, LocalEntry, LocalSite, LocalTier};
use crate::scope;
use crate::scripts::{self, fresh_seed};
use crate::site::SiteRef;
use crate::stats::{add, bump};
use crate::warnings::Cause;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

/// What a call came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Answered from Redis.
    Hit,
    /// Answered from the local tier.
    LocalHit,
    /// Looked in Redis, found nothing usable, computed.
    Miss,
    /// Computed without asking Redis (unavailable, breaker open, no TTL).
    Bypass,
    /// Answered by another caller's computation in this process.
    Coalesced,
    /// Write-through: computed whatever was stored.
    Refresh,
    /// A background refresh-ahead.
    Renewal,
}

impl Outcome {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::LocalHit => "local_hit",
            Outcome::Miss => "miss",
            Outcome::Bypass => "bypass",
            Outcome::Coalesced => "coalesced",
            Outcome::Refresh => "refresh",
            Outcome::Renewal => "renewal",
        }
    }
}

/// Counts a call's outcome and events in its prefix's counters, records
/// them on its `tracing` span and, with the `metrics` feature, emits them.
pub(crate) struct Observer<'c> {
    pub site: SiteRef<'c>,
    span: tracing::Span,
    #[cfg(feature = "metrics")]
    prefix: &'c str,
    #[cfg(feature = "metrics")]
    started: Instant,
}

impl<'c> Observer<'c> {
    fn new(site: SiteRef<'c>, prefix: &'c str) -> Self {
        let span = tracing::debug_span!(
            target: "cache_runtime",
            "cached",
            prefix,
            key = tracing::field::Empty,
            outcome = tracing::field::Empty,
        );
        Self {
            site,
            span,
            #[cfg(feature = "metrics")]
            prefix,
            #[cfg(feature = "metrics")]
            started: Instant::now(),
        }
    }

    fn key(&self, hash: KeyHash) {
        if !self.span.is_disabled() {
            let hex = hash.to_hex();
            self.span.record("key", String::from_utf8_lossy(&hex[..8]).as_ref());
        }
    }

    pub(crate) fn outcome(&self, outcome: Outcome) {
        let c = &self.site.counters;
        bump(match outcome {
            Outcome::Hit | Outcome::LocalHit => &c.hits,
            Outcome::Miss => &c.misses,
            Outcome::Bypass => &c.bypassed,
            Outcome::Coalesced => &c.coalesced,
            Outcome::Refresh => &c.refreshes,
            Outcome::Renewal => &c.renewals,
        });
        if outcome == Outcome::LocalHit {
            bump(&c.local_hits);
        }
        if matches!(outcome, Outcome::Miss | Outcome::Bypass | Outcome::Refresh | Outcome::Renewal) {
            bump(&c.computations);
        }
        // Recording on a disabled span still costs (more so with `tracing`'s
        // `log` feature, which many applications enable).
        if !self.span.is_disabled() {
            self.span.record("outcome", outcome.name());
        }
        #[cfg(feature = "metrics")]
        crate::metrics::outcome(self.prefix, outcome, self.started.elapsed());
    }
}

/// What reading an entry found.
enum Lookup<R> {
    /// `renew`: the entry hit, when it is due for refresh-ahead.
    Hit {
        output: R,
        renew: Option<EntryTimes>,
    },
    Miss(Seen),
    /// Redis could not be asked; compute without storing.
    Unavailable,
}

/// What a miss saw.
struct Seen {
    /// The namespace versions at the read (`None`: the namespace has no
    /// version yet); empty for a memory-only cache.
    versions: Vec<Option<Vec<u8>>>,
    /// A stale copy bound to the current versions, kept for `stale_if_error`.
    stale: Option<Arc<Vec<u8>>>,
}

/// What the stampede lock script answered.
enum Acquire {
    /// An entry bound to the current versions is there now.
    Hit(Vec<u8>),
    /// We hold the lock; the current versions.
    Lead(Vec<Vec<u8>>),
    /// Someone else holds it.
    Wait,
    Unavailable,
}

/// Whether storing ran the store script, which releases the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stored {
    ScriptRan,
    Skipped,
}

/// How a leader goes on after trying the stampede lock.
enum Next {
    /// We hold the lock; the current versions.
    Locked(Vec<Vec<u8>>),
    /// Compute without the lock (waited too long), but store.
    Unlocked,
    /// Redis failed: compute, and leave Redis alone for this call.
    Offline,
}

/// Releases the Redis lock if the leader never got to store (an `Err`, a
/// panic, its future dropped): from a spawned task, since `Drop` cannot
/// wait. Should that fail, the lock expires by its TTL.
struct LockGuard {
    cache: Cache,
    lock: String,
    token: String,
    armed: bool,
}

impl LockGuard {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (cache, lock, token) =
            (self.cache.clone(), std::mem::take(&mut self.lock), std::mem::take(&mut self.token));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { cache.release_lock(&lock, &token).await });
        }
    }
}

const FIRST_POLL: Duration = Duration::from_millis(4);
const MAX_POLL: Duration = Duration::from_millis(50);
/// After a refresh-ahead whose body failed, the next waits this long.
const RENEWAL_BACK_OFF: Duration = Duration::from_secs(1);
/// While another process renews an entry, hits here ask again this often.
const RENEWAL_ELSEWHERE_BACK_OFF: Duration = Duration::from_millis(50);

/// How a refresh-ahead ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    /// Renewed, or nothing to do.
    Done,
    /// Another process holds the lock: it is renewing the entry.
    Elsewhere,
    /// The body's output was not cacheable (an `Err`), or it panicked.
    Failed,
}

/// The current time in Unix milliseconds: entry times are compared across
/// processes.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A call's use of the local tier.
struct Local<'c> {
    tier: &'c LocalTier,
    site: &'c LocalSite,
    /// Taken before the call's first read.
    capture: Capture,
    /// The most an entry may stay in the tier.
    keep_for: Duration,
}

/// Ends a refresh-ahead's claim on its key, also when the renewal panics
/// or its task is dropped before it ran (a runtime shutting down).
struct RenewalClaim {
    cache: Cache,
    hash: KeyHash,
    outcome: Renewal,
}

impl Drop for RenewalClaim {
    fn drop(&mut self) {
        let back_off = match self.outcome {
            Renewal::Done => None,
            Renewal::Elsewhere => Some(RENEWAL_ELSEWHERE_BACK_OFF),
            Renewal::Failed => Some(RENEWAL_BACK_OFF),
        };
        self.cache.release_renewal(self.hash, back_off);
    }
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
        let observer = Observer::new(plan.slot.get(self.view(), plan.prefix, plan.namespaces()), plan.prefix);
        // A local hit needs neither the box nor the flow's state.
        if intent == Intent::Read
            && let Ok(hash) = key
            && let Some((output, renew)) = self.local_hit(plan, &observer, hash, storage)
        {
            if let Some(seen) = renew {
                body.renew(self, hash, storage, seen);
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
        {
            let counters = &*observer.site.counters;
            let Some(ttl) = plan.ttl.or(self.default_ttl()) else {
                observer.outcome(Outcome::Bypass);
                self.warn(
                    Cause::NoTtl,
                    format_args!("prefix `{}` has no ttl and the cache no default_ttl: not caching it", plan.prefix),
                );
                return body.run().await;
            };
            let hash = match key {
                Ok(hash) => hash,
                Err(e) => {
                    bump(&counters.encode_errors);
                    observer.outcome(Outcome::Bypass);
                    self.warn(
                        Cause::Encode,
                        format_args!("prefix `{}`: {e}; computing without the cache", plan.prefix),
                    );
                    return body.run().await;
                }
            };
            if let Some(why) = &observer.site.invalid {
                bump(&counters.encode_errors);
                observer.outcome(Outcome::Bypass);
                self.warn(Cause::Encode, format_args!("{why}; computing without the cache"));
                return body.run().await;
            }
            observer.key(hash);
            if intent == Intent::Refresh
                && let Some((tier, _)) = self.local_for(plan)
            {
                // Gone before the refresh reads, so that even if its own
                // fill is refused the old value is not served here.
                tier.forget(&hash);
            }
            let keys = EntryKeys::new(self.key_prefix(), plan.prefix, &observer.site.version_keys, hash);
            let call = Call::new(self, plan, ttl, storage, hash, &keys, observer);
            if intent == Intent::Refresh {
                return Box::pin(call.refresh(body)).await;
            }
            if !plan.lock {
                return match call.lookup().await {
                    Lookup::Hit { output, renew } => call.hit(output, renew, body),
                    Lookup::Miss(seen) => Box::pin(call.compute_unlocked(Some(seen), body)).await,
                    Lookup::Unavailable => Box::pin(call.compute_unlocked(None, body)).await,
                };
            }
            call.coordinated(body).await
        }
    }

    /// A fresh entry of the local tier, decoded, and the refresh-ahead it is
    /// due for; `None` sends the call down the full flow, which also deals
    /// with stale copies and undecodable entries.
    fn local_hit<R>(
        &self,
        plan: &Plan<'_>,
        observer: &Observer<'_>,
        hash: KeyHash,
        storage: Storage<R>,
    ) -> Option<(R, Option<EntryTimes>)> {
        if observer.site.invalid.is_some() || plan.ttl.or(self.default_ttl()).is_none() {
            return None;
        }
        let (tier, _) = self.local_for(plan)?;
        let Found::Fresh(entry, now) = find_local(self, plan, tier, observer.site.local.as_ref()?, hash) else {
            return None;
        };
        let output = (storage.decode)(&entry.payload, plan.codec).ok()?;
        add(&observer.site.counters.bytes_read, entry.payload.len() as u64);
        observer.key(hash);
        observer.outcome(Outcome::LocalHit);
        Some((output, due(plan, entry.times, now)))
    }

    /// Starts a refresh-ahead of `hash` in a task of its own, unless one is
    /// under way in this process.
    pub(crate) fn spawn_renewal<R, F>(
        &self,
        plan: Plan<'static>,
        hash: KeyHash,
        storage: Storage<R>,
        seen: EntryTimes,
        compute: F,
    ) where
        F: Future<Output = R> + Send + 'static,
        R: Send + 'static,
    {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if !self.claim_renewal(hash) {
            return;
        }
        let mut claim = RenewalClaim { cache: self.clone(), hash, outcome: Renewal::Failed };
        runtime.spawn(async move {
            claim.outcome = Box::pin(claim.cache.renew(&plan, hash, storage, seen, compute)).await;
            // Releases the claim, with a back-off that depends on the outcome.
            drop(claim);
        });
    }

    /// Recomputes an entry that is still fresh, under the stampede lock, and
    /// overwrites it.
    async fn renew<R, F: Future<Output = R>>(
        &self,
        plan: &Plan<'_>,
        hash: KeyHash,
        storage: Storage<R>,
        seen: EntryTimes,
        compute: F,
    ) -> Renewal {
        let Some(ttl) = plan.ttl.or(self.default_ttl()) else { return Renewal::Done };
        let observer = Observer::new(plan.slot.get(self.view(), plan.prefix, plan.namespaces()), plan.prefix);
        observer.key(hash);
        let span = observer.span.clone();
        let keys = EntryKeys::new(self.key_prefix(), plan.prefix, &observer.site.version_keys, hash);
        let call = Call::new(self, plan, ttl, storage, hash, &keys, &observer);
        call.renew(seen, compute).instrument(span).await
    }

    pub(crate) async fn release_lock(&self, lock: &str, token: &str) {
        let Some(connections) = self.connections() else { return };
        let mut invocation = scripts::RELEASE.key(lock);
        invocation.arg(token);
        if let Err(fault) = connections.run(|conn| conn.invoke::<i64>(&invocation)).await {
            self.note_fault(&self.registry().general, &fault);
        }
    }
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
    local: Option<Local<'c>>,
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
        let local = cache.local_for(plan).and_then(|(tier, keep_for)| {
            let site = observer.site.local.as_ref()?;
            Some(Local { tier, site, capture: tier.capture(site, &hash), keep_for })
        });
        Call { cache, plan, ttl, storage, hash, keys, observer, local }
    }

    /// Returns a hit's output, first handing the body to a refresh-ahead if
    /// the entry is due for one.
    fn hit<B: Body<R>>(&self, output: R, renew: Option<EntryTimes>, body: B) -> R {
        if let Some(seen) = renew {
            body.renew(self.cache, self.hash, self.storage, seen);
        }
        output
    }

    /// With stampede protection: one computation per key in this process,
    /// and across processes while the lock is held.
    async fn coordinated<B: Body<R>>(&self, body: B) -> R {
        let counters = &*self.observer.site.counters;
        let lock_timeout = self.plan.lock_timeout.unwrap_or(self.cache.lock_timeout());
        let deadline = Instant::now() + lock_timeout;
        loop {
            let seen = match self.lookup().await {
                Lookup::Hit { output, renew } => return self.hit(output, renew, body),
                Lookup::Miss(seen) => Some(seen),
                Lookup::Unavailable => None,
            };
            if Instant::now() >= deadline {
                bump(&counters.lock_timeouts);
                return Box::pin(self.compute_unlocked(seen, body)).await;
            }
            match self.cache.flights().join(self.keys.entry()) {
                // The miss paths are boxed: a hit should not carry their size.
                Role::Leader(leader) => return Box::pin(self.lead(leader, seen, deadline, body)).await,
                Role::Waiter(mut waiter) => {
                    match Box::pin(self.wait_for_leader(&mut waiter, deadline, lock_timeout)).await {
                        Ok(Some(Shared::Value(payload))) => {
                            if let Ok(output) = (self.storage.decode)(&payload, self.plan.codec) {
                                self.observer.outcome(Outcome::Coalesced);
                                return output;
                            }
                        }
                        // The leader's value is stale, or it gave up: look again;
                        // the first to get here leads.
                        Ok(Some(Shared::Stale) | None) => {}
                        Err(_) => {
                            bump(&counters.lock_timeouts);
                            return Box::pin(self.compute_unlocked(seen, body)).await;
                        }
                    }
                }
            }
        }
    }

    /// Waits for the leader to start computing, then one more lock timeout
    /// for its result. The leader joined first, so its deadline is no later
    /// than ours; it starts at the latest one Redis round trip after it.
    async fn wait_for_leader(
        &self,
        waiter: &mut tokio::sync::watch::Receiver<flight::Progress>,
        deadline: Instant,
        lock_timeout: Duration,
    ) -> Result<Option<Shared>, tokio::time::error::Elapsed> {
        let round_trip = self.cache.connections().map_or(Duration::ZERO, |c| c.longest_round_trip());
        if !tokio::time::timeout_at((deadline + round_trip).into(), flight::started(waiter)).await? {
            return Ok(None);
        }
        tokio::time::timeout(lock_timeout, flight::done(waiter)).await
    }

    /// The process's leader for this key: takes the Redis lock (or waits
    /// for its holder's value), computes, stores, shares.
    async fn lead<B: Body<R>>(&self, leader: Leader<'_>, seen: Option<Seen>, deadline: Instant, body: B) -> R {
        let counters = &*self.observer.site.counters;
        let Some(seen) = seen else {
            // Redis is unavailable: coalesce in this process only.
            return self.lead_offline(leader, Outcome::Bypass, None, body).await;
        };
        if self.cache.connections().is_none() {
            // Memory-only: this process is the whole cache.
            return self.lead_offline(leader, Outcome::Miss, Some(seen), body).await;
        }
        let token = format!("{:032x}", rand::random::<u128>());
        let lock = self.keys.lock();
        let mut poll = FIRST_POLL;
        let mut waited = false;
        let mut discarded = false;
        let next = loop {
            match self.acquire(&lock, &token, now_ms()).await {
                Acquire::Lead(versions) => break Next::Locked(versions),
                Acquire::Hit(entry) => {
                    if let Some(stored) = self.parse(&entry) {
                        if let Some(output) = self.decode_payload(stored.payload) {
                            self.observer.outcome(Outcome::Hit);
                            let payload = Arc::new(stored.payload.to_vec());
                            self.keep_locally(&payload, stored.times);
                            leader.finish(Shared::Value(payload));
                            return output;
                        }
                        if !discarded {
                            // Current header, undecodable payload: remove it so
                            // the lock (and the store) can replace it.
                            discarded = true;
                            Box::pin(self.discard_corrupt()).await;
                            continue;
                        }
                    }
                    break Next::Unlocked;
                }
                Acquire::Wait if Instant::now() + poll < deadline => {
                    if !waited {
                        bump(&counters.lock_waits);
                        waited = true;
                    }
                    tokio::time::sleep(jittered(poll).min(deadline.saturating_duration_since(Instant::now()))).await;
                    poll = (poll * 2).min(MAX_POLL);
                }
                Acquire::Wait => {
                    bump(&counters.lock_timeouts);
                    break Next::Unlocked;
                }
                Acquire::Unavailable => break Next::Offline,
            }
        };
        let Seen { versions, stale } = seen;
        let (observed, guard) = match next {
            Next::Locked(versions) => {
                let guard =
                    LockGuard { cache: self.cache.clone(), lock: lock.clone(), token: token.clone(), armed: true };
                (Some(versions), Some(guard))
            }
            Next::Unlocked => (self.seed_missing_versions(versions).await, None),
            // Redis just failed this call: do not make it wait on Redis again.
            Next::Offline => {
                let seen = Seen { versions: Vec::new(), stale };
                return self.lead_offline(leader, Outcome::Miss, Some(seen), body).await;
            }
        };
        // From here until the lock is released, a panic or a dropped future
        // releases it through the guard, and the waiters through `leader`.
        leader.computing();
        let output = self.compute(Outcome::Miss, body.run()).await;
        let (output, stale_shared) = self.or_stale(output, stale);
        let encoded = if stale_shared.is_some() { None } else { (self.storage.encode)(&output, self.plan.codec) };
        let shared = self.store_and_unlock(Intent::Read, observed, guard, encoded).await;
        // Nothing to share (an `Err`): dropping the leader lets a waiter
        // take over at once.
        if let Some(shared) = shared.or(stale_shared) {
            leader.finish(shared);
        }
        output
    }

    /// Computes without Redis, sharing the result with waiters in this
    /// process; a memory-only cache also stores it.
    async fn lead_offline<B: Body<R>>(&self, leader: Leader<'_>, outcome: Outcome, seen: Option<Seen>, body: B) -> R {
        leader.computing();
        let output = self.compute(outcome, body.run()).await;
        let (output, stale_shared) = self.or_stale(output, seen.and_then(|seen| seen.stale));
        if let Some(shared) = stale_shared {
            leader.finish(shared);
        } else if self.cache.connections().is_none() {
            let encoded = (self.storage.encode)(&output, self.plan.codec);
            if let (_, Some(shared)) = self.store(Intent::Read, Some(Vec::new()), None, encoded).await {
                leader.finish(shared);
            }
        } else if leader.has_waiters()
            && let Some(Ok(payload)) = (self.storage.encode)(&output, self.plan.codec)
        {
            // Encoded only when someone is waiting for it.
            leader.finish(Shared::Value(Arc::new(payload)));
        }
        output
    }

    /// A background refresh-ahead: leads the key in this process and takes
    /// the stampede lock, unless someone renewed the entry since `seen` or
    /// is renewing it now; then computes and overwrites.
    async fn renew<F: Future<Output = R>>(&self, seen: EntryTimes, compute: F) -> Renewal {
        let Role::Leader(leader) = self.cache.flights().join(self.keys.entry()) else { return Renewal::Done };
        let token = format!("{:032x}", rand::random::<u128>());
        let (observed, guard) = if self.cache.connections().is_none() {
            (Some(Vec::new()), None)
        } else {
            let lock = self.keys.lock();
            match self.acquire(&lock, &token, seen.fresh_until_ms).await {
                Acquire::Lead(versions) => {
                    (Some(versions), Some(LockGuard { cache: self.cache.clone(), lock, token, armed: true }))
                }
                Acquire::Wait => return Renewal::Elsewhere,
                // Renewed already, or Redis is unavailable: the entry stays
                // until its TTL.
                Acquire::Hit(_) | Acquire::Unavailable => return Renewal::Done,
            }
        };
        leader.computing();
        let output = self.compute(Outcome::Renewal, compute).await;
        let encoded = (self.storage.encode)(&output, self.plan.codec);
        drop(output);
        let cacheable = encoded.is_some();
        if let Some(shared) = self.store_and_unlock(Intent::Refresh, observed, guard, encoded).await {
            leader.finish(shared);
        }
        if cacheable { Renewal::Done } else { Renewal::Failed }
    }

    /// Stores under the stampede lock `guard` holds, if any, and makes sure
    /// the lock is released: by the store script, or here when the script
    /// did not run. Returns what waiters may be given.
    async fn store_and_unlock(
        &self,
        intent: Intent,
        observed: Option<Vec<Vec<u8>>>,
        mut guard: Option<LockGuard>,
        encoded: Option<Encoded>,
    ) -> Option<Shared> {
        let held = guard.as_ref().map(|g| (g.lock.as_str(), g.token.as_str()));
        let (stored, shared) = self.store(intent, observed, held, encoded).await;
        if let Some(guard) = guard.as_mut() {
            if stored != Stored::ScriptRan {
                self.cache.release_lock(&guard.lock, &guard.token).await;
            }
            guard.disarm();
        }
        shared
    }

    /// Write-through: compute now, overwrite.
    async fn refresh<B: Body<R>>(&self, body: B) -> R {
        let observed = match self.read().await {
            Some((_, versions)) => self.seed_missing_versions(versions).await,
            None => None,
        };
        // Nested cached calls in the body behave normally.
        let output = self.compute(Outcome::Refresh, scope::normally(body.run())).await;
        let encoded = (self.storage.encode)(&output, self.plan.codec);
        self.store(Intent::Refresh, observed, None, encoded).await;
        output
    }

    /// Without coordination: `lock = false`, or past the lock timeout.
    async fn compute_unlocked<B: Body<R>>(&self, seen: Option<Seen>, body: B) -> R {
        let (outcome, observed, stale) = match seen {
            Some(Seen { versions, stale }) => (Outcome::Miss, self.seed_missing_versions(versions).await, stale),
            None => (Outcome::Bypass, None, None),
        };
        let output = self.compute(outcome, body.run()).await;
        let (output, stale_shared) = self.or_stale(output, stale);
        let encoded = if stale_shared.is_some() { None } else { (self.storage.encode)(&output, self.plan.codec) };
        self.store(Intent::Read, observed, None, encoded).await;
        output
    }

    async fn compute<F: Future<Output = R>>(&self, outcome: Outcome, compute: F) -> R {
        self.observer.outcome(outcome);
        compute.await
    }

    /// An output that is not stored (an `Err`) gives way to the stale copy
    /// kept for `stale_if_error`, if there is one; returns what to share
    /// with waiters in that case.
    fn or_stale(&self, output: R, stale: Option<Arc<Vec<u8>>>) -> (R, Option<Shared>) {
        let Some(stale) = stale.filter(|_| !(self.storage.cacheable)(&output)) else { return (output, None) };
        match (self.storage.decode)(&stale, self.plan.codec) {
            Ok(kept) => {
                bump(&self.observer.site.counters.stale_served);
                self.cache.warn(
                    Cause::Stale,
                    format_args!("prefix `{}`: the function failed; serving the stale copy", self.plan.prefix),
                );
                (kept, Some(Shared::Value(stale)))
            }
            Err(_) => (output, None),
        }
    }

    /// One `MGET` of the entry and its namespace versions, batched with
    /// concurrent lookups under load. A memory-only cache reads nothing.
    async fn read(&self) -> Option<(Option<Vec<u8>>, Vec<Option<Vec<u8>>>)> {
        let Some((connections, batcher)) = self.cache.batcher() else { return Some((None, Vec::new())) };
        // A half-moved cluster slot refuses multi-key reads: then key by
        // key. (Two steps, so the refused read is not kept in this future,
        // which every hit allocates.)
        let read = match batcher.mget(connections, self.keys.entry(), self.keys.versions).await {
            Err(Fault::SlotMigrating(_)) => None,
            values => Some(values),
        };
        let values = match read {
            Some(values) => values,
            None => Box::pin(batch::one_by_one(connections, self.keys.entry(), self.keys.versions)).await,
        };
        match values {
            Ok(mut values) => {
                // Shifting one slot of a short vector beats allocating another.
                let entry = values.remove(0);
                Some((entry, values))
            }
            Err(fault) => {
                self.cache.note_fault(&self.observer.site.counters, &fault);
                None
            }
        }
    }

    /// The refresh-ahead due on a hit of an entry with these times.
    fn due(&self, times: EntryTimes, now: u64) -> Option<EntryTimes> {
        due(self.plan, times, now)
    }

    async fn lookup(&self) -> Lookup<R> {
        let counters = &*self.observer.site.counters;
        let mut stale = None;
        if let Some(local) = &self.local {
            match find_local(self.cache, self.plan, local.tier, local.site, self.hash) {
                Found::Fresh(entry, now) => match self.decode_payload(&entry.payload) {
                    Some(output) => {
                        self.observer.outcome(Outcome::LocalHit);
                        return Lookup::Hit { output, renew: self.due(entry.times, now) };
                    }
                    None => {
                        local.tier.forget(&self.hash);
                    }
                },
                Found::Stale(payload) => stale = Some(payload),
                Found::Nothing => {}
            }
        }
        let Some((entry, versions)) = self.read().await else { return Lookup::Unavailable };
        let Some(bytes) = entry else { return Lookup::Miss(Seen { versions, stale }) };
        let Some(stored) = self.parse(&bytes) else { return Lookup::Miss(Seen { versions, stale }) };
        if !stored.is_bound_to(versions.iter().map(Option::as_deref)) {
            bump(&counters.stale);
            return Lookup::Miss(Seen { versions, stale });
        }
        let now = now_ms();
        if !stored.times.is_fresh(now) {
            // A copy kept past its TTL for `stale_if_error`.
            if within_stale_window(self.plan, stored.times, now) {
                stale = Some(Arc::new(stored.payload.to_vec()));
            }
            return Lookup::Miss(Seen { versions, stale });
        }
        match self.decode_payload(stored.payload) {
            Some(output) => {
                self.observer.outcome(Outcome::Hit);
                if self.local.is_some() {
                    self.keep_locally(&Arc::new(stored.payload.to_vec()), stored.times);
                }
                Lookup::Hit { output, renew: self.due(stored.times, now) }
            }
            None => {
                Box::pin(self.discard_corrupt()).await;
                Lookup::Miss(Seen { versions, stale })
            }
        }
    }

    /// Puts a payload in the local tier, if this call uses it: for as long
    /// as the entry is fresh (plus its stale window, when the tier is the
    /// whole cache), at most the plan's local TTL.
    fn keep_locally(&self, payload: &Arc<Vec<u8>>, times: EntryTimes) {
        let Some(local) = &self.local else { return };
        let until = if self.cache.connections().is_none() {
            times.fresh_until_ms.saturating_add(self.plan.stale_if_error.map_or(0, |w| w.as_millis() as u64))
        } else {
            times.fresh_until_ms
        };
        let keep_for = Duration::from_millis(until.saturating_sub(now_ms())).min(local.keep_for);
        local.tier.insert(self.hash, local.site, local.capture, (payload.clone(), self.plan.codec, times), keep_for);
    }

    /// Deletes an entry whose header is current but whose payload does not
    /// decode (corrupt, or written for another layout): left in place, a
    /// miss would not overwrite it, since it looks current.
    async fn discard_corrupt(&self) {
        let Some(connections) = self.cache.connections() else { return };
        let mut del = redis::cmd("DEL");
        del.arg(self.keys.entry());
        if let Err(fault) = connections.run(|conn| conn.query::<i64>(&del)).await {
            self.cache.note_fault(&self.observer.site.counters, &fault);
        }
    }

    /// An entry's parts, if it is one of ours in this call's codec.
    fn parse<'b>(&self, bytes: &'b [u8]) -> Option<StoredEntry<'b>> {
        let stored = StoredEntry::parse(bytes).filter(|e| e.is_codec(self.plan.codec));
        if stored.is_none() {
            bump(&self.observer.site.counters.decode_errors);
            self.cache.warn(
                Cause::Decode,
                format_args!(
                    "`{}` holds no {} entry of this cache; recomputing",
                    self.keys.entry(),
                    self.plan.codec.name()
                ),
            );
        }
        stored
    }

    fn decode_payload(&self, payload: &[u8]) -> Option<R> {
        match (self.storage.decode)(payload, self.plan.codec) {
            Ok(output) => {
                add(&self.observer.site.counters.bytes_read, payload.len() as u64);
                Some(output)
            }
            Err(e) => {
                bump(&self.observer.site.counters.decode_errors);
                #[cfg(feature = "metrics")]
                crate::metrics::error("decode");
                self.cache.warn(
                    Cause::Decode,
                    format_args!("`{}` could not be decoded ({e}); recomputing", self.keys.entry()),
                );
                None
            }
        }
    }

    /// Runs the lock script. `min_fresh_ms`: an entry fresh past this time
    /// answers as a hit instead.
    async fn acquire(&self, lock: &str, token: &str, min_fresh_ms: u64) -> Acquire {
        let Some(connections) = self.cache.connections() else { return Acquire::Unavailable };
        let in_script = self.versions_in_script(connections);
        let pinned = match &self.keys.versions[in_script.len()..] {
            [] => Vec::new(),
            others => match self.seed_versions(connections, others).await {
                Some(versions) => versions,
                None => return Acquire::Unavailable,
            },
        };
        let mut invocation = scripts::LOCK.key(self.keys.entry());
        invocation
            .key(lock)
            .key(in_script)
            .arg(&self.plan.codec.head()[..])
            .arg(token)
            .arg(self.plan.lock_timeout.unwrap_or(self.cache.lock_timeout()).as_millis() as u64)
            .arg(min_fresh_ms);
        for _ in in_script {
            invocation.arg(fresh_seed());
        }
        for version in &pinned {
            invocation.arg(&version[..]);
        }
        match connections.run(|conn| conn.invoke::<Vec<Vec<u8>>>(&invocation)).await {
            Ok(mut reply) if !reply.is_empty() => match reply[0].as_slice() {
                b"hit" if reply.len() == 2 => Acquire::Hit(reply.swap_remove(1)),
                b"lead" if reply.len() == self.keys.versions.len() + 1 => Acquire::Lead(reply.split_off(1)),
                b"wait" => Acquire::Wait,
                _ => Acquire::Unavailable,
            },
            Ok(_) => Acquire::Unavailable,
            Err(fault) => {
                self.cache.note_fault(&self.observer.site.counters, &fault);
                Acquire::Unavailable
            }
        }
    }

    /// The observed versions, after giving any namespace without one its
    /// first version; `None` when Redis could not be asked.
    async fn seed_missing_versions(&self, observed: Vec<Option<Vec<u8>>>) -> Option<Vec<Vec<u8>>> {
        if let Some(all) = observed.iter().cloned().collect::<Option<Vec<_>>>() {
            return Some(all);
        }
        self.seed_versions(self.cache.connections()?, self.keys.versions).await
    }

    /// The versions of `keys`, seeding those that have none: one script,
    /// or on a cluster one per key, since each lives in its own slot.
    async fn seed_versions(&self, connections: &Connections, keys: &[String]) -> Option<Vec<Vec<u8>>> {
        let per_script = if connections.is_cluster() { 1 } else { keys.len().max(1) };
        let mut seeded = Vec::with_capacity(keys.len());
        for group in keys.chunks(per_script) {
            let mut invocation = scripts::SEED_VERSIONS.prepare_invoke();
            invocation.key(group);
            for _ in group {
                invocation.arg(fresh_seed());
            }
            match connections.run(|conn| conn.invoke::<Vec<Option<Vec<u8>>>>(&invocation)).await {
                Ok(versions) if versions.len() == group.len() => {
                    for version in versions {
                        seeded.push(version?);
                    }
                }
                Ok(_) => return None,
                Err(fault) => {
                    self.cache.note_fault(&self.observer.site.counters, &fault);
                    return None;
                }
            }
        }
        Some(seeded)
    }

    /// The version keys the scripts read themselves: all of them, or on a
    /// cluster only the prefix's, which shares the entry's slot. The others
    /// are pinned (see `scripts`).
    fn versions_in_script<'k>(&'k self, connections: &Connections) -> &'k [String] {
        let versions = &self.keys.versions[..];
        if connections.is_cluster() { &versions[..versions.len().min(1)] } else { versions }
    }

    /// Whether pinned versions are still current after a store: a script
    /// could not check them, and coalesced waiters must not be handed a
    /// value computed before a tag was invalidated. A failed read counts
    /// as changed, so the waiters compute for themselves.
    async fn pinned_still_current(&self, connections: &Connections, keys: &[String], pinned: &[Vec<u8>]) -> bool {
        let mut mget = redis::cmd("MGET");
        mget.arg(keys);
        match connections.run(|conn| conn.query::<Vec<Option<Vec<u8>>>>(&mget)).await {
            Ok(current) => {
                current.len() == pinned.len() && current.iter().zip(pinned).all(|(c, p)| c.as_ref() == Some(p))
            }
            Err(fault) => {
                self.cache.note_fault(&self.observer.site.counters, &fault);
                false
            }
        }
    }

    /// Stores an output, encoded by the caller (`None`: not cacheable), in
    /// Redis and the local tier, or in the local tier alone for a
    /// memory-only cache. `lock`: the stampede lock and token we hold.
    /// Taking the bytes rather than `&R` keeps the output out of the
    /// future's state across the round trip, so outputs need not be `Sync`.
    /// Returns whether the store script ran, and what waiters may be given:
    /// the payload, `Stale` if a namespace was invalidated while computing,
    /// or nothing when the output is not cacheable.
    async fn store(
        &self,
        intent: Intent,
        observed: Option<Vec<Vec<u8>>>,
        lock: Option<(&str, &str)>,
        encoded: Option<Encoded>,
    ) -> (Stored, Option<Shared>) {
        let counters = &*self.observer.site.counters;
        let payload = match encoded {
            None => return (Stored::Skipped, None),
            Some(Ok(payload)) => Arc::new(payload),
            Some(Err(e)) => {
                bump(&counters.encode_errors);
                self.cache.warn(
                    Cause::Encode,
                    format_args!("a value of prefix `{}` could not be encoded: {e}", self.plan.prefix),
                );
                return (Stored::Skipped, None);
            }
        };
        let max = self.cache.max_value_bytes();
        if payload.len() > max {
            bump(&counters.oversize);
            #[cfg(feature = "metrics")]
            crate::metrics::error("oversize");
            self.cache.warn(
                Cause::Oversize,
                format_args!(
                    "a value of prefix `{}` is {} bytes, over max_value_bytes ({max}): returned but not stored",
                    self.plan.prefix,
                    payload.len(),
                ),
            );
            return (Stored::Skipped, Some(Shared::Value(payload)));
        }
        let Some(observed) = observed else { return (Stored::Skipped, Some(Shared::Value(payload))) };
        let now = now_ms();
        let fresh_ms = crate::cache::jittered_ttl_ms(self.ttl, self.plan.jitter);
        let times = EntryTimes { stored_ms: now, fresh_until_ms: now.saturating_add(fresh_ms) };
        let Some(connections) = self.cache.connections() else {
            self.keep_locally(&payload, times);
            bump(&counters.writes);
            add(&counters.bytes_written, payload.len() as u64);
            return (Stored::Skipped, Some(Shared::Value(payload)));
        };
        let stale_ms = self.plan.stale_if_error.map_or(0, |window| window.as_millis() as u64);
        let (lock, token) = lock.unwrap_or((self.keys.entry(), ""));
        let (channel, message) = match intent {
            // Other processes drop their local copy of what was overwritten.
            Intent::Refresh => (self.cache.channel().name.as_str(), self.cache.channel().entry_message(self.hash)),
            Intent::Read => ("", String::new()),
        };
        let in_script = self.versions_in_script(connections);
        let mut invocation = scripts::STORE.key(self.keys.entry());
        invocation
            .key(lock)
            .key(in_script)
            .arg(fresh_ms.saturating_add(stale_ms))
            .arg(&self.plan.codec.head()[..])
            .arg(&payload[..])
            .arg(if intent == Intent::Refresh { "put" } else { "fill" })
            .arg(token)
            .arg(times.field())
            .arg(now)
            .arg(channel)
            .arg(message);
        for version in &observed {
            invocation.arg(&version[..]);
        }
        let mut result = connections.run(|conn| conn.invoke::<i64>(&invocation)).await;
        let pinned_keys = &self.keys.versions[in_script.len()..];
        if let Ok(1) = result
            && !pinned_keys.is_empty()
            && !self
                .pinned_still_current(connections, pinned_keys, observed.get(in_script.len()..).unwrap_or_default())
                .await
        {
            // Stored, but bound to a tag version that is gone: no reader
            // will take it, and neither may the waiters.
            result = Ok(0);
        }
        match result {
            Ok(1) => {
                bump(&counters.writes);
                add(&counters.bytes_written, payload.len() as u64);
                self.keep_locally(&payload, times);
                (Stored::ScriptRan, Some(Shared::Value(payload)))
            }
            // A value at least as fresh was already there.
            Ok(2) => {
                bump(&counters.writes_skipped);
                (Stored::ScriptRan, Some(Shared::Value(payload)))
            }
            Ok(_) => {
                bump(&counters.writes_skipped);
                (Stored::ScriptRan, Some(Shared::Stale))
            }
            Err(fault) => {
                self.cache.note_fault(&self.observer.site.counters, &fault);
                (Stored::Skipped, Some(Shared::Value(payload)))
            }
        }
    }
}

/// The refresh-ahead due on a hit of an entry with these times.
fn due(plan: &Plan<'_>, times: EntryTimes, now: u64) -> Option<EntryTimes> {
    (plan.refresh_ahead > 0.0 && times.is_due(now, plan.refresh_ahead)).then_some(times)
}

/// Whether a stale entry may still stand in for a failed computation.
fn within_stale_window(plan: &Plan<'_>, times: EntryTimes, now: u64) -> bool {
    plan.stale_if_error.is_some_and(|window| now < times.fresh_until_ms.saturating_add(window.as_millis() as u64))
}

/// What the local tier holds for a call.
enum Found {
    /// A fresh entry, and the time it was judged at (0 when the clock was
    /// not needed).
    Fresh(Arc<LocalEntry>, u64),
    /// A stale copy kept for `stale_if_error` (memory-only caches).
    Stale(Arc<Vec<u8>>),
    Nothing,
}

fn find_local(cache: &Cache, plan: &Plan<'_>, tier: &LocalTier, site: &LocalSite, hash: KeyHash) -> Found {
    let Some(entry) = tier.get(&hash, site).filter(|entry| entry.codec == plan.codec) else { return Found::Nothing };
    // The tier keeps an entry no longer than it is fresh, unless it is the
    // whole cache and keeps stale copies: only then, or for a refresh-ahead,
    // does a local hit need the clock.
    let keeps_stale = cache.connections().is_none() && plan.stale_if_error.is_some();
    let now = if keeps_stale || plan.refresh_ahead > 0.0 { now_ms() } else { 0 };
    if !keeps_stale || entry.times.is_fresh(now) {
        Found::Fresh(entry, now)
    } else if within_stale_window(plan, entry.times, now) {
        Found::Stale(entry.payload.clone())
    } else {
        Found::Nothing
    }
}

/// `base` plus up to a quarter more, so pollers in many processes spread out.
fn jittered(base: Duration) -> Duration {
    base + base.mul_f64(rand::random_range(0.0..0.25))
}
