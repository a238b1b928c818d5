//! One cached call, from the lookup to the store.
//!
//! A hit is one `MGET` of the entry and its namespace versions. On a miss,
//! concurrent callers in this process elect one leader (`flight`); the
//! leader takes the Redis stampede lock (`scripts::LOCK`, which re-checks
//! for an entry stored meanwhile), computes, and stores the value bound to
//! the versions observed before computing (`scripts::STORE`, which also
//! releases the lock). Everyone else gets the leader's result, or takes
//! over when the leader fails, and nobody waits longer than the lock
//! timeout.

use crate::cache::{Cache, Encoded, Intent, Plan, Storage};
use crate::canonical::Unencodable;
use crate::codec::StoredEntry;
use crate::flight::{self, Leader, Role, Shared};
use crate::key::{EntryKeys, KeyHash};
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
    /// Looked in Redis, found nothing usable, computed.
    Miss,
    /// Computed without asking Redis (unavailable, breaker open, no TTL).
    Bypass,
    /// Answered by another caller's computation in this process.
    Coalesced,
    /// Write-through: computed whatever was stored.
    Refresh,
}

impl Outcome {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Bypass => "bypass",
            Outcome::Coalesced => "coalesced",
            Outcome::Refresh => "refresh",
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
            Outcome::Hit => &c.hits,
            Outcome::Miss => &c.misses,
            Outcome::Bypass => &c.bypassed,
            Outcome::Coalesced => &c.coalesced,
            Outcome::Refresh => &c.refreshes,
        });
        if matches!(outcome, Outcome::Miss | Outcome::Bypass | Outcome::Refresh) {
            bump(&c.computations);
        }
        self.span.record("outcome", outcome.name());
        #[cfg(feature = "metrics")]
        crate::metrics::outcome(self.prefix, outcome, self.started.elapsed());
    }
}

/// What reading an entry found.
enum Lookup<R> {
    Hit(R),
    /// Not usable; carries the namespace versions observed at the read
    /// (`None`: the namespace has no version yet).
    Miss(Vec<Option<Vec<u8>>>),
    /// Redis could not be asked; compute without storing.
    Unavailable,
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

impl Cache {
    /// The cache-aside flow of one call; see the module docs.
    ///
    /// The flow is boxed: a `Box`'s layout does not depend on what it holds,
    /// so the compiler's layout queries for a caller's future stop here
    /// instead of recursing through every layer of the flow. Without it, a
    /// few nested async functions in the user's code exceed rustc's default
    /// query depth.
    pub(crate) async fn fetch_or_compute<R, F>(
        &self,
        plan: &Plan<'_>,
        key: Result<KeyHash, Unencodable>,
        storage: Storage<R>,
        intent: Intent,
        compute: F,
    ) -> R
    where
        F: Future<Output = R>,
    {
        Box::pin(self.flow(plan, key, storage, intent, compute)).await
    }

    async fn flow<R, F>(
        &self,
        plan: &Plan<'_>,
        key: Result<KeyHash, Unencodable>,
        storage: Storage<R>,
        intent: Intent,
        compute: F,
    ) -> R
    where
        F: Future<Output = R>,
    {
        let observer = Observer::new(plan.slot.get(self.view(), plan.prefix, plan.namespaces()), plan.prefix);
        let span = observer.span.clone();
        async move {
            let counters = &*observer.site.counters;
            let Some(ttl) = plan.ttl.or(self.default_ttl()) else {
                observer.outcome(Outcome::Bypass);
                self.warn(
                    Cause::NoTtl,
                    format_args!("prefix `{}` has no ttl and the cache no default_ttl: not caching it", plan.prefix),
                );
                return compute.await;
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
                    return compute.await;
                }
            };
            if let Some(why) = &observer.site.invalid {
                bump(&counters.encode_errors);
                observer.outcome(Outcome::Bypass);
                self.warn(Cause::Encode, format_args!("{why}; computing without the cache"));
                return compute.await;
            }
            observer.key(hash);
            let keys = EntryKeys::new(self.key_prefix(), plan.prefix, &observer.site.version_keys, hash);
            let call = Call { cache: self, plan, ttl, storage, keys: &keys, observer: &observer };
            if intent == Intent::Refresh {
                return Box::pin(call.refresh(compute)).await;
            }
            if !plan.lock {
                return match call.lookup().await {
                    Lookup::Hit(output) => output,
                    Lookup::Miss(observed) => Box::pin(call.compute_unlocked(Some(observed), compute)).await,
                    Lookup::Unavailable => Box::pin(call.compute_unlocked(None, compute)).await,
                };
            }
            call.coordinated(compute).await
        }
        .instrument(span)
        .await
    }

    pub(crate) async fn release_lock(&self, lock: &str, token: &str) {
        let mut invocation = scripts::RELEASE.key(lock);
        invocation.arg(token);
        if let Err(fault) = self.connections().run(|conn| conn.invoke::<i64>(&invocation)).await {
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
    keys: &'c EntryKeys<'c>,
    observer: &'c Observer<'c>,
}

impl<R> Call<'_, R> {
    /// With stampede protection: one computation per key in this process,
    /// and across processes while the lock is held.
    async fn coordinated<F: Future<Output = R>>(&self, compute: F) -> R {
        let counters = &*self.observer.site.counters;
        let lock_timeout = self.plan.lock_timeout.unwrap_or(self.cache.lock_timeout());
        let deadline = Instant::now() + lock_timeout;
        loop {
            let observed = match self.lookup().await {
                Lookup::Hit(output) => return output,
                Lookup::Miss(observed) => Some(observed),
                Lookup::Unavailable => None,
            };
            if Instant::now() >= deadline {
                bump(&counters.lock_timeouts);
                return Box::pin(self.compute_unlocked(observed, compute)).await;
            }
            match self.cache.flights().join(&self.keys.entry) {
                // The miss paths are boxed: a hit should not carry their size.
                Role::Leader(leader) => return Box::pin(self.lead(leader, observed, deadline, compute)).await,
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
                            return Box::pin(self.compute_unlocked(observed, compute)).await;
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
        let start_by = deadline + self.cache.connections().longest_round_trip();
        if !tokio::time::timeout_at(start_by.into(), flight::started(waiter)).await? {
            return Ok(None);
        }
        tokio::time::timeout(lock_timeout, flight::done(waiter)).await
    }

    /// The process's leader for this key: takes the Redis lock (or waits
    /// for its holder's value), computes, stores, shares.
    async fn lead<F: Future<Output = R>>(
        &self,
        leader: Leader<'_>,
        observed: Option<Vec<Option<Vec<u8>>>>,
        deadline: Instant,
        compute: F,
    ) -> R {
        let counters = &*self.observer.site.counters;
        let Some(observed) = observed else {
            // Redis is unavailable: coalesce in this process only.
            return self.lead_offline(leader, Outcome::Bypass, compute).await;
        };
        let token = format!("{:032x}", rand::random::<u128>());
        let lock = self.keys.lock();
        let mut poll = FIRST_POLL;
        let mut waited = false;
        let mut discarded = false;
        let next = loop {
            match self.acquire(&lock, &token).await {
                Acquire::Lead(versions) => break Next::Locked(versions),
                Acquire::Hit(entry) => {
                    if let Some(stored) = self.parse(&entry) {
                        if let Some(output) = self.decode_payload(stored.payload) {
                            self.observer.outcome(Outcome::Hit);
                            leader.finish(Shared::Value(Arc::new(stored.payload.to_vec())));
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
        let (observed, mut guard) = match next {
            Next::Locked(versions) => {
                let guard =
                    LockGuard { cache: self.cache.clone(), lock: lock.clone(), token: token.clone(), armed: true };
                (Some(versions), Some(guard))
            }
            Next::Unlocked => (self.seed_missing_versions(observed).await, None),
            // Redis just failed this call: do not make it wait on Redis again.
            Next::Offline => return self.lead_offline(leader, Outcome::Miss, compute).await,
        };
        // From here until the lock is released, a panic or a dropped future
        // releases it through the guard, and the waiters through `leader`.
        leader.computing();
        let output = self.compute(Outcome::Miss, compute).await;
        let token = if guard.is_some() { token.as_str() } else { "" };
        let encoded = (self.storage.encode)(&output, self.plan.codec);
        let (stored, shared) = self.store(Intent::Read, observed, &lock, token, encoded).await;
        if let Some(guard) = guard.as_mut() {
            if stored != Stored::ScriptRan {
                self.cache.release_lock(&guard.lock, &guard.token).await;
            }
            guard.disarm();
        }
        // Nothing to share (an `Err`): dropping the leader lets a waiter
        // take over at once.
        if let Some(shared) = shared {
            leader.finish(shared);
        }
        output
    }

    /// Computes without Redis, sharing the result with waiters in this
    /// process (encoded only if someone is waiting).
    async fn lead_offline<F: Future<Output = R>>(&self, leader: Leader<'_>, outcome: Outcome, compute: F) -> R {
        leader.computing();
        let output = self.compute(outcome, compute).await;
        if leader.has_waiters()
            && let Some(Ok(payload)) = (self.storage.encode)(&output, self.plan.codec)
        {
            leader.finish(Shared::Value(Arc::new(payload)));
        }
        output
    }

    /// Write-through: compute now, overwrite.
    async fn refresh<F: Future<Output = R>>(&self, compute: F) -> R {
        let observed = match self.read().await {
            Some((_, versions)) => self.seed_missing_versions(versions).await,
            None => None,
        };
        // Nested cached calls in the body behave normally.
        let output = self.compute(Outcome::Refresh, scope::normally(compute)).await;
        let encoded = (self.storage.encode)(&output, self.plan.codec);
        self.store(Intent::Refresh, observed, &self.keys.lock(), "", encoded).await;
        output
    }

    /// Without coordination: `lock = false`, or past the lock timeout.
    async fn compute_unlocked<F: Future<Output = R>>(&self, observed: Option<Vec<Option<Vec<u8>>>>, compute: F) -> R {
        let (outcome, observed) = match observed {
            Some(observed) => (Outcome::Miss, self.seed_missing_versions(observed).await),
            None => (Outcome::Bypass, None),
        };
        let output = self.compute(outcome, compute).await;
        let encoded = (self.storage.encode)(&output, self.plan.codec);
        self.store(Intent::Read, observed, &self.keys.lock(), "", encoded).await;
        output
    }

    async fn compute<F: Future<Output = R>>(&self, outcome: Outcome, compute: F) -> R {
        self.observer.outcome(outcome);
        compute.await
    }

    /// One `MGET` of the entry and its namespace versions, batched with
    /// concurrent lookups under load.
    async fn read(&self) -> Option<(Option<Vec<u8>>, Vec<Option<Vec<u8>>>)> {
        let connections = self.cache.connections();
        match self.cache.batcher().mget(connections, &self.keys.entry, self.keys.versions).await {
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

    async fn lookup(&self) -> Lookup<R> {
        let counters = &*self.observer.site.counters;
        let Some((entry, versions)) = self.read().await else { return Lookup::Unavailable };
        let Some(bytes) = entry else { return Lookup::Miss(versions) };
        let Some(stored) = self.parse(&bytes) else { return Lookup::Miss(versions) };
        if !stored.is_bound_to(versions.iter().map(Option::as_deref)) {
            bump(&counters.stale);
            return Lookup::Miss(versions);
        }
        match self.decode_payload(stored.payload) {
            Some(output) => {
                self.observer.outcome(Outcome::Hit);
                Lookup::Hit(output)
            }
            None => {
                Box::pin(self.discard_corrupt()).await;
                Lookup::Miss(versions)
            }
        }
    }

    /// Deletes an entry whose header is current but whose payload does not
    /// decode (corrupt, or written for another layout): left in place, a
    /// miss would not overwrite it, since it looks current.
    async fn discard_corrupt(&self) {
        let mut del = redis::cmd("DEL");
        del.arg(&self.keys.entry);
        if let Err(fault) = self.cache.connections().run(|conn| conn.query::<i64>(&del)).await {
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
                    self.keys.entry,
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
                self.cache
                    .warn(Cause::Decode, format_args!("`{}` could not be decoded ({e}); recomputing", self.keys.entry));
                None
            }
        }
    }

    async fn acquire(&self, lock: &str, token: &str) -> Acquire {
        let mut invocation = scripts::LOCK.key(&self.keys.entry);
        invocation
            .key(lock)
            .key(self.keys.versions)
            .arg(&self.plan.codec.head()[..])
            .arg(token)
            .arg(self.plan.lock_timeout.unwrap_or(self.cache.lock_timeout()).as_millis() as u64);
        for _ in self.keys.versions.iter() {
            invocation.arg(fresh_seed());
        }
        match self.cache.connections().run(|conn| conn.invoke::<Vec<Vec<u8>>>(&invocation)).await {
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
        let mut invocation = scripts::SEED_VERSIONS.prepare_invoke();
        invocation.key(self.keys.versions);
        for _ in self.keys.versions.iter() {
            invocation.arg(fresh_seed());
        }
        match self.cache.connections().run(|conn| conn.invoke::<Vec<Option<Vec<u8>>>>(&invocation)).await {
            Ok(seeded) => {
                seeded.into_iter().collect::<Option<Vec<_>>>().filter(|v| v.len() == self.keys.versions.len())
            }
            Err(fault) => {
                self.cache.note_fault(&self.observer.site.counters, &fault);
                None
            }
        }
    }

    /// Stores an output, encoded by the caller (`None`: not cacheable).
    /// Taking the bytes rather than `&R` keeps the output out of the
    /// future's state across the round trip, so outputs need not be `Sync`.
    /// Returns whether the store script ran, and what waiters may be given:
    /// the payload, `Stale` if a namespace was invalidated while computing,
    /// or nothing when the output is not cacheable.
    async fn store(
        &self,
        intent: Intent,
        observed: Option<Vec<Vec<u8>>>,
        lock: &str,
        lock_token: &str,
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
        let mut invocation = scripts::STORE.key(&self.keys.entry);
        invocation
            .key(lock)
            .key(self.keys.versions)
            .arg(crate::cache::jittered_ttl_ms(self.ttl, self.plan.jitter))
            .arg(&self.plan.codec.head()[..])
            .arg(&payload[..])
            .arg(if intent == Intent::Refresh { "put" } else { "fill" })
            .arg(lock_token);
        for version in &observed {
            invocation.arg(&version[..]);
        }
        match self.cache.connections().run(|conn| conn.invoke::<i64>(&invocation)).await {
            Ok(1) => {
                bump(&counters.writes);
                add(&counters.bytes_written, payload.len() as u64);
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

/// `base` plus up to a quarter more, so pollers in many processes spread out.
fn jittered(base: Duration) -> Duration {
    base + base.mul_f64(rand::random_range(0.0..0.25))
}
