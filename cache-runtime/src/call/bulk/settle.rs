//! A bulk call's items from their lock to their stored entries: the locks
//! of the items it leads in one pipeline (`store::many`), what each item's
//! reply means for it, and one pipeline of stores (fills and `STORE`
//! scripts) for everything the body computed, each settled as a single call's
//! store is (`Call::stored`): kept locally, shared with waiters only when
//! a store checked it or nothing changed since.

use super::super::finish::{Entry, Storable};
use super::super::lock::{LockGuard, token};
use super::super::{Call, Observed, Seen, now_ms};
use super::{Absent, Bulk, Led, Want};
use crate::error::Fault;
use crate::flight::{Leader, Shared};
use crate::keys::EntryKeys;
use crate::observe::{Event, Outcome};
use crate::store::{LockReply, LockRequest, StoreMode, StoreRequest, digest};
use std::sync::Arc;
use std::time::Duration;

/// What an item's lock came to.
pub(super) enum Locked<'f, R> {
    /// This call computes it.
    Compute(Led<'f>),
    /// Stored by someone else since the read.
    Hit(usize, R),
    /// Someone holds the lock, or the entry needs another look; with the
    /// guard of a lock that may be this call's own, to release by token
    /// before then.
    Retry(usize, Option<LockGuard>),
}

/// What the lock reply `reply` means for the item `c` this call leads.
async fn lock_reply<'f, R>(
    call: &Call<'_, R>,
    c: usize,
    leader: Leader<'f>,
    mut guard: LockGuard,
    reply: Result<(LockReply, bool), Fault>,
) -> Locked<'f, R> {
    let (reply, held) = match reply {
        Ok((reply, held)) => (Ok(reply), held),
        Err(fault) => (Err(fault), false),
    };
    match reply {
        Ok(LockReply::Lead { observed, versions }) => Locked::Compute(Led {
            want: c,
            leader: Some(leader),
            guard: Some(guard),
            observed: Some(Observed { versions, entry: observed }),
        }),
        Ok(LockReply::Hit(entry)) => {
            // A lock taken with the read goes with the guard.
            if !held {
                guard.disarm();
            }
            let Some(stored) = call.parse(&entry) else { return Locked::Retry(c, None) };
            let Some((output, payload)) = call.open(&stored) else {
                // Current header, undecodable payload: remove it, so the
                // next round's lock can replace it.
                Box::pin(call.discard_corrupt(&digest(Some(&entry)))).await;
                return Locked::Retry(c, None);
            };
            call.observer.outcome(Outcome::Hit);
            let payload = Arc::new(payload.into_owned());
            call.keep_locally(&payload, stored.times, false);
            // Current when the lock request read it, but a waiter may have
            // joined after that read and after another process's write
            // returned: waiters read for themselves.
            leader.close();
            leader.finish(Shared::Stale);
            Locked::Hit(c, output)
        }
        Ok(LockReply::Wait) => {
            call.observer.event(Event::LockWait);
            // Dropping the leader lets this process's waiters look again
            // too; the next round reads what the holder stored. The holder
            // may be this request itself, sent again after its reply was
            // lost (`SET NX` cannot tell): the guard goes back with the
            // item, to release the lock by token, a no-op for anyone else.
            Locked::Retry(c, Some(guard))
        }
        // The script may have run: the guard, dropped armed, releases a
        // lock we may hold; unless the breaker refused it, and it took
        // nothing. Computed without storing, shared in-process.
        Err(fault) => {
            if let Fault::BreakerOpen = fault {
                guard.disarm();
            }
            Locked::Compute(Led { want: c, leader: Some(leader), guard: None, observed: None })
        }
    }
}

/// One item's store, ready for the pipeline.
struct Ready<'f> {
    c: usize,
    entry: Entry,
    observed: Observed,
    leader: Option<Leader<'f>>,
    guard: Option<LockGuard>,
    share: bool,
}

impl<K, V> Bulk<'_, K, V> {
    /// Stores what the body computed for the items in `led`, in one round
    /// trip, releases their locks and hands waiters what they may have.
    pub(super) async fn settle(
        &self,
        calls: &[Call<'_, Option<V>>],
        keyed: &[usize],
        wants: &mut [Want<K, V>],
        led: Vec<Led<'_>>,
    ) {
        let mut ready = Vec::with_capacity(led.len());
        for Led { want: c, leader, mut guard, observed } in led {
            let call = &calls[c];
            // Nothing more joins: every waiter handed a value joined before
            // the check below.
            if let Some(leader) = &leader {
                leader.close();
            }
            let share = leader.as_ref().is_some_and(Leader::has_waiters);
            let answer = wants[keyed[c]].answer.as_ref();
            let encoded = match answer {
                Some(None) if self.absent == Absent::Skip => None,
                Some(answer) => (call.storage.encode)(answer, self.plan.codec),
                None => None,
            };
            let payload = match call.storable(encoded) {
                Storable::Payload(payload) => payload,
                Storable::Unstored(payload) => {
                    release(call, guard.as_mut()).await;
                    let shared = call.share_unverified(share, payload, observed.as_ref()).await;
                    finish(leader, shared);
                    continue;
                }
                // Not stored: its waiters look again (dropping the leader).
                Storable::Nothing => {
                    release(call, guard.as_mut()).await;
                    continue;
                }
            };
            let Some(observed) = observed else {
                let shared = call.share_unverified(share, payload, None).await;
                finish(leader, shared);
                continue;
            };
            ready.push(Ready { c, entry: Entry::new(call, &payload), observed, leader, guard, share });
        }
        if ready.is_empty() {
            return;
        }
        let requests: Vec<(&EntryKeys<'_>, StoreRequest<'_>)> = ready
            .iter()
            .map(|r| {
                let held = r.guard.as_ref().map(|g| (g.lock.as_str(), g.token.as_str()));
                (calls[r.c].keys, r.entry.request(&calls[r.c], StoreMode::Fill, &r.observed, held, r.share))
            })
            .collect();
        let replies = match self.cache.backend().store_many(&requests).await {
            Ok(replies) => replies,
            Err(fault) => requests.iter().map(|_| Err(fault.clone())).collect(),
        };
        drop(requests);
        for (Ready { c, entry, observed, leader, mut guard, share }, reply) in ready.into_iter().zip(replies) {
            let call = &calls[c];
            let (released, shared, _) = call.stored(reply, entry, StoreMode::Fill, &observed, share).await;
            if let Some(guard) = guard.as_mut() {
                if released {
                    guard.disarm();
                } else {
                    release(call, Some(guard)).await;
                }
            }
            finish(leader, shared);
        }
    }
}

/// Releases a lock that no store released.
async fn release<R>(call: &Call<'_, R>, guard: Option<&mut LockGuard>) {
    if let Some(guard) = guard {
        call.cache.release_lock(&guard.lock, &guard.token).await;
        guard.disarm();
    }
}

/// Hands waiters what they may have; with nothing, dropping the leader
/// lets one of them take over.
fn finish(leader: Option<Leader<'_>>, shared: Option<Shared>) {
    if let (Some(leader), Some(shared)) = (leader, shared) {
        leader.finish(shared);
    }
}

impl LockGuard {
    /// A guard for an item's lock, armed before the lock is asked for.
    fn for_item<R>(call: &Call<'_, R>) -> Self {
        LockGuard::new(call.cache, call.keys.lock(), token())
    }
}

impl LockRequest<'_> {
    fn for_guard<'g>(guard: &'g LockGuard, ttl: Duration) -> LockRequest<'g> {
        LockRequest { lock: &guard.lock, token: &guard.token, ttl, min_fresh_ms: now_ms() }
    }
}

impl<K, V> Bulk<'_, K, V> {
    /// What each unlocked computation is bound to: the versions seen,
    /// seeded once for all items.
    pub(super) async fn observed_all<R>(
        &self,
        calls: &[Call<'_, R>],
        missed: &[(usize, Seen)],
    ) -> Vec<Option<Observed>> {
        let Some((c, seen)) = missed.first() else { return Vec::new() };
        let seeded = self.cache.backend().seed_missing(calls[*c].keys, seen.versions.clone()).await;
        let versions = match seeded {
            Ok(versions) => Some(versions),
            Err(fault) => {
                self.observer.event(Event::Fault(&fault));
                None
            }
        };
        missed
            .iter()
            .map(|(_, seen)| versions.clone().map(|versions| Observed { versions, entry: seen.entry.clone() }))
            .collect()
    }

    /// Takes the lock of every item this call leads, in one round trip.
    pub(super) async fn lock_all<'f, R>(
        &self,
        calls: &[Call<'_, R>],
        keys: &[EntryKeys<'_>],
        leaders: Vec<(usize, Leader<'f>)>,
    ) -> Vec<Locked<'f, R>> {
        if leaders.is_empty() {
            return Vec::new();
        }
        let lock_timeout = self.plan.lock_timeout.unwrap_or(self.cache.lock_timeout());
        // Armed before asking: a call dropped while the scripts run may
        // hold locks without having heard so.
        let guards: Vec<LockGuard> = leaders.iter().map(|(c, _)| LockGuard::for_item(&calls[*c])).collect();
        let requests: Vec<(&EntryKeys<'_>, LockRequest<'_>)> = leaders
            .iter()
            .zip(&guards)
            .map(|((c, _), guard)| (&keys[*c], LockRequest::for_guard(guard, lock_timeout)))
            .collect();
        let replies = self.cache.backend().lock_many(&requests, &self.plan.codec.lock_head()).await;
        drop(requests);
        let replies = match replies {
            Ok(replies) => replies,
            Err(fault) => {
                self.observer.event(Event::Fault(&fault));
                leaders.iter().map(|_| Err(fault.clone())).collect()
            }
        };
        let mut locked = Vec::with_capacity(leaders.len());
        for (((c, leader), guard), reply) in leaders.into_iter().zip(guards).zip(replies) {
            locked.push(lock_reply(&calls[c], c, leader, guard, reply).await);
        }
        locked
    }
}
