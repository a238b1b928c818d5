//! A bulk call: one call for many items (`#[cached(batch(ids))]`,
//! `Cache::get_or_compute_many`), each item cached in an entry of its own,
//! keyed as a single call with that item would be.
//!
//! A round looks up every item still wanted: the local tier, then one
//! read of all entries and the shared version keys. On one server, while
//! the site's bulk reads miss, that read also takes the stampede locks of
//! the items it misses (`claim.rs`): with plain commands for the items the
//! site has not read lately (`recent.rs`), or with a script that judges
//! every entry; otherwise (a cluster, a site whose last read hit
//! everything, `lock = false`) it is an `MGET`. Each missing
//! item joins its flight in this process (`flight.rs`); the items this
//! call leads and has no lock for yet take them in one pipeline of `LOCK`
//! scripts. The body then runs once, with the items this call holds the
//! lock of (and, in the first round, those that cannot be cached), and
//! their entries are stored in one pipeline of `STORE` scripts
//! (`settle.rs`). Only then does the call wait for items that another
//! caller is computing: it never waits while holding flights others wait
//! for, so bulk calls with overlapping items cannot wait for each other in
//! a circle. An item whose other caller failed, or whose lock another
//! process holds, is looked up again in the next round; past the lock
//! timeout the rest are computed without the lock. Usually there is one
//! round and one body run.
//!
//! Each per-item step is the single call's own (`Call::judge`, the scripts,
//! `Call::stored`), so entries, versions, digests and what waiters may be
//! handed follow docs/CONSISTENCY.md exactly as for single calls.

mod claim;
mod settle;

use super::lock::LockGuard;
use super::{Call, Lookup, Observed, misconfiguration};
use crate::Cache;
use crate::flight::{Leader, Role, Shared};
use crate::keys::canonical::Unencodable;
use crate::keys::{EntryKeys, KeyHash};
use crate::observe::{Event, Observer, Outcome};
use crate::output::Storage;
use crate::policy::Plan;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// What becomes of an item the body did not return.
///
/// ```
/// use cache_runtime::{Absent, Policy};
///
/// // Unknown ids are asked for again on every call.
/// let policy = Policy::new("users").absent(Absent::Skip);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Absent {
    /// Cache that it is absent, like a value (the default): an id that
    /// does not exist does not reach the body again until its entry
    /// expires, is forgotten or invalidated.
    #[default]
    Cache,
    /// Cache nothing for it: the next call asks the body again.
    Skip,
}

/// One item of a bulk call and its key: the key a single call with this
/// item in place of the items would have.
pub(crate) struct Item<K> {
    pub item: K,
    pub key: Result<KeyHash, Unencodable>,
}

/// What a bulk call's body returned: the items it found, with their values.
pub(crate) type Found<K, V, E> = Result<Vec<(K, V)>, E>;

/// An item of the call, once duplicates are gone.
struct Want<K, V> {
    /// Ours until it is handed to the body.
    item: Option<K>,
    /// `None`: the item could not be encoded, so it is always computed.
    hash: Option<KeyHash>,
    /// `Some(None)`: known to be absent.
    answer: Option<Option<V>>,
}

/// What one round decided for an item it led.
pub(super) struct Led<'f> {
    pub want: usize,
    pub leader: Option<Leader<'f>>,
    pub guard: Option<LockGuard>,
    /// What the store is bound to; `None`: do not store.
    pub observed: Option<Observed>,
}

const FIRST_POLL: Duration = Duration::from_millis(4);
const MAX_POLL: Duration = Duration::from_millis(50);

impl Cache {
    /// The flow of a bulk call; see the module docs. Returns the distinct
    /// items found, in the order first asked for.
    pub(crate) async fn fetch_or_compute_many<K, V, E, F, Fut>(
        &self,
        plan: &Plan<'_>,
        items: Vec<Item<K>>,
        storage: Storage<Option<V>>,
        absent: Absent,
        key_of: &(dyn Fn(&K) -> Result<KeyHash, Unencodable> + Sync),
        body: F,
    ) -> Found<K, V, E>
    where
        F: FnMut(Vec<K>) -> Fut,
        Fut: Future<Output = Found<K, V, E>>,
    {
        let mut wants: Vec<Want<K, V>> = Vec::with_capacity(items.len());
        let mut seen: HashMap<KeyHash, usize> = HashMap::with_capacity(items.len());
        let site = plan.site.get(self.view(), plan.prefix, plan.namespaces());
        let mut unencodable = Vec::new();
        for Item { item, key } in items {
            match key {
                Ok(hash) if seen.contains_key(&hash) => {}
                Ok(hash) => {
                    seen.insert(hash, wants.len());
                    wants.push(Want { item: Some(item), hash: Some(hash), answer: None });
                }
                Err(e) => {
                    unencodable.push(e.to_string());
                    wants.push(Want { item: Some(item), hash: None, answer: None });
                }
            }
        }
        let observer = Observer::many(site, plan.prefix, self.warnings(), wants.len());
        for why in unencodable {
            let why = format!("prefix `{}`: {why}; computing this item without the cache", plan.prefix);
            observer.event(Event::Unencodable(&why));
        }
        let span = observer.span.clone();
        let hits = AtomicUsize::new(0);
        let flow = Bulk { cache: self, plan, observer: &observer, seen, absent, key_of, storage, hits: &hits };
        let found = if span.is_disabled() {
            Box::pin(flow.run(wants, body)).await
        } else {
            tracing::Instrument::instrument(Box::pin(flow.run(wants, body)), span).await
        };
        if !observer.span.is_disabled() {
            observer.span.record("hits", hits.load(Relaxed));
        }
        found
    }
}

/// A bulk call's context.
struct Bulk<'c, K, V> {
    cache: &'c Cache,
    plan: &'c Plan<'c>,
    observer: &'c Observer<'c>,
    /// Where each distinct key's item is.
    seen: HashMap<KeyHash, usize>,
    absent: Absent,
    key_of: &'c (dyn Fn(&K) -> Result<KeyHash, Unencodable> + Sync),
    storage: Storage<Option<V>>,
    /// Items answered from the cache, for the span.
    hits: &'c AtomicUsize,
}

impl<K, V> Bulk<'_, K, V> {
    /// Records an item's answer from the cache.
    fn hit(&self, want: &mut Want<K, V>, output: Option<V>) {
        want.answer = Some(output);
        self.hits.fetch_add(1, Relaxed);
    }

    async fn run<E, F, Fut>(self, mut wants: Vec<Want<K, V>>, mut body: F) -> Found<K, V, E>
    where
        F: FnMut(Vec<K>) -> Fut,
        Fut: Future<Output = Found<K, V, E>>,
    {
        let ttl = self.plan.ttl.or(self.cache.default_ttl());
        let why = misconfiguration::<Option<V>>(self.plan, ttl, self.observer);
        let (Some(ttl), None) = (ttl, &why) else {
            if let Some(why) = why {
                self.observer.misconfigured(&why);
            }
            let all: Vec<usize> = (0..wants.len()).collect();
            self.compute(&mut wants, &all, Outcome::Bypass, &mut body).await?;
            return Ok(self.merge(wants));
        };
        let storage = self.storage;
        let (keyed, hashes): (Vec<usize>, Vec<KeyHash>) =
            wants.iter().enumerate().filter_map(|(i, want)| Some((i, want.hash?))).unzip();
        let loose: Vec<usize> = (0..wants.len()).filter(|&i| wants[i].hash.is_none()).collect();
        let version_keys = &self.observer.site.version_keys;
        let keys: Vec<EntryKeys<'_>> = hashes
            .into_iter()
            .map(|hash| EntryKeys::new(self.cache.key_prefix(), self.plan.prefix, version_keys, hash))
            .collect();
        let calls: Vec<Call<'_, Option<V>>> = keys
            .iter()
            .map(|keys| Call::new(self.cache, self.plan, ttl, storage, keys.hash(), keys, self.observer))
            .collect();
        let lock_timeout = self.plan.lock_timeout.unwrap_or(self.cache.lock_timeout());
        let deadline = Instant::now() + lock_timeout;
        let mut pending: Vec<usize> = (0..keyed.len()).collect();
        let mut first = true;
        let mut poll = FIRST_POLL;
        while !pending.is_empty() || first {
            // This round's lookup: the local tier, then one read of the rest,
            // which on one server also takes the locks of what it misses.
            let mut unread = Vec::new();
            for &c in &pending {
                match calls[c].look_locally() {
                    Ok(Lookup::Hit { output, .. }) => self.hit(&mut wants[keyed[c]], output),
                    _ => unread.push(c),
                }
            }
            let claim = self.plan.lock && Instant::now() < deadline && self.observer.site.bulk_misses_likely();
            let mut judged = match self.read_and_judge(&calls, &keys, &keyed, &mut wants, &unread, claim).await {
                Ok(judged) => judged,
                Err(fault) => {
                    // Redis is unavailable: everything left is computed,
                    // and nothing is stored.
                    self.observer.event(Event::Fault(&fault));
                    let rest: Vec<usize> = unread
                        .iter()
                        .map(|&c| keyed[c])
                        .chain(if first { loose.clone() } else { Vec::new() })
                        .collect();
                    self.compute(&mut wants, &rest, Outcome::Bypass, &mut body).await?;
                    return Ok(self.merge(wants));
                }
            };
            let missed = std::mem::take(&mut judged.missed);
            let mut retry = std::mem::take(&mut judged.retry);
            let past_deadline = Instant::now() >= deadline;
            if past_deadline && !missed.is_empty() {
                for _ in &missed {
                    self.observer.event(Event::LockTimeout);
                }
            }
            let mut led: Vec<Led<'_>> = Vec::new();
            let mut waiting = Vec::new();
            if !self.plan.lock || past_deadline {
                let observed = self.observed_all(&calls, &missed).await;
                for ((c, _), observed) in missed.into_iter().zip(observed) {
                    led.push(Led { want: c, leader: None, guard: None, observed });
                }
            } else {
                let mut leaders = Vec::new();
                for (c, _) in missed {
                    match self.cache.flights().join(keys[c].entry()) {
                        Role::Leader(leader) => leaders.push((c, leader)),
                        Role::Waiter(waiter) => waiting.push((c, waiter)),
                    }
                }
                let locked = self.lock_all(&calls, &keys, leaders).await;
                for outcome in locked {
                    match outcome {
                        settle::Locked::Compute(item) => led.push(item),
                        settle::Locked::Hit(c, output) => self.hit(&mut wants[keyed[c]], output),
                        settle::Locked::Retry(c, guard) => {
                            retry.push(c);
                            judged.spare.extend(guard);
                        }
                    }
                }
            }
            self.lead_claimed(&keys, &mut judged, &mut led, &mut waiting, &mut retry);
            self.release_guards(std::mem::take(&mut judged.spare)).await;
            // The body, once, for everything this round computes.
            let mut run: Vec<usize> = led.iter().map(|item| keyed[item.want]).collect();
            if first {
                run.extend(&loose);
            }
            if !run.is_empty() {
                for item in &led {
                    if let Some(leader) = &item.leader {
                        leader.computing();
                    }
                }
                if let Err(e) = self.compute(&mut wants, &run, Outcome::Miss, &mut body).await {
                    // Nothing to store: the locks go now, and dropping the
                    // leaders lets their waiters take over.
                    self.release(led).await;
                    return Err(e);
                }
                self.settle(&calls, &keyed, &mut wants, led).await;
            }
            first = false;
            // Only now, holding nothing anyone waits for: the items other
            // callers in this process are computing. One bound for all of
            // them, as for one item: waited for one after another, each
            // with its own would add up.
            let waits_end = deadline.max(Instant::now()) + lock_timeout;
            for (c, mut waiter) in waiting {
                let call = &calls[c];
                let wait = Box::pin(call.wait_for_leader(&mut waiter, deadline, lock_timeout));
                match tokio::time::timeout_at(waits_end.into(), wait).await.unwrap_or_else(Err) {
                    Ok(Some(Shared::Value(payload))) => {
                        // The leader's own encoding: it may be over max_value_bytes.
                        match (storage.decode)(&payload, self.plan.codec, usize::MAX) {
                            Ok(output) => {
                                self.observer.outcome(Outcome::Coalesced);
                                wants[keyed[c]].answer = Some(output);
                            }
                            Err(_) => retry.push(c),
                        }
                    }
                    Ok(Some(Shared::Stale) | None) => retry.push(c),
                    Err(_) => {
                        self.observer.event(Event::LockTimeout);
                        retry.push(c);
                    }
                }
            }
            pending = retry.into_iter().filter(|&c| wants[keyed[c]].answer.is_none()).collect();
            if !pending.is_empty() && Instant::now() < deadline {
                // Another process holds some locks: give it time to store.
                let left = deadline.saturating_duration_since(Instant::now());
                tokio::time::sleep(super::lead::jittered(poll).min(left)).await;
                poll = (poll * 2).min(MAX_POLL);
            }
        }
        Ok(self.merge(wants))
    }

    /// Runs the body with the items at `run` (indices into `wants`), and
    /// records what it returned for each; an item it did not return is
    /// absent.
    async fn compute<E, F, Fut>(
        &self,
        wants: &mut [Want<K, V>],
        run: &[usize],
        outcome: Outcome,
        body: &mut F,
    ) -> Result<(), E>
    where
        F: FnMut(Vec<K>) -> Fut,
        Fut: Future<Output = Found<K, V, E>>,
    {
        let items: Vec<K> = run.iter().filter_map(|&i| wants[i].item.take()).collect();
        for _ in run {
            self.observer.outcome(outcome);
        }
        let found = crate::scope::normally(body(items)).await?;
        let mut in_run = vec![false; wants.len()];
        for &i in run {
            wants[i].answer = Some(None);
            in_run[i] = true;
        }
        // Items without a key, matched in the order asked for. Both lookups
        // are constant time: a body may return many thousands of items.
        let mut keyless = run.iter().copied().filter(|&i| wants[i].hash.is_none()).collect::<Vec<_>>().into_iter();
        for (item, value) in found {
            // Matched by key, the item's identity: the body may return
            // items in any order, and `K` need not be `Eq` or `Hash`.
            let at = match (self.key_of)(&item) {
                Ok(hash) => self.seen.get(&hash).copied(),
                Err(_) => keyless.next(),
            };
            if let Some(at) = at.filter(|&at| in_run.get(at).copied().unwrap_or(false)) {
                wants[at].item = Some(item);
                wants[at].answer = Some(Some(value));
            }
        }
        Ok(())
    }

    /// Releases the locks of items that will not be stored.
    async fn release(&self, led: Vec<Led<'_>>) {
        self.release_guards(led.into_iter().filter_map(|item| item.guard).collect()).await;
    }

    /// The items found, in the order first asked for.
    fn merge(&self, wants: Vec<Want<K, V>>) -> Vec<(K, V)> {
        wants
            .into_iter()
            .filter_map(|want| match (want.item, want.answer) {
                (Some(item), Some(Some(value))) => Some((item, value)),
                _ => None,
            })
            .collect()
    }
}
