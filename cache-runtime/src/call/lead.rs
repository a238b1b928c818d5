//! The leader of a key in this process and the stampede lock across
//! processes: taking the lock (or waiting for its holder's value), the
//! guard that releases it whatever happens, and how waiters follow the
//! leader.

use super::finish::Settle;
use super::lock::{LockGuard, token};
use super::{Body, Call, Observed, Seen, now_ms};
use crate::flight::{self, Leader, Shared};
use crate::observe::{Event, Outcome};
use crate::store::{LockReply, LockRequest, StoreMode, digest};
use std::sync::Arc;
use std::time::{Duration, Instant};

const FIRST_POLL: Duration = Duration::from_millis(4);
const MAX_POLL: Duration = Duration::from_millis(50);

/// How a leader goes on after trying the stampede lock.
enum Next {
    /// We hold the lock; what the entry and its versions are now.
    Locked(Observed),
    /// Compute without the lock (waited too long), but store.
    Unlocked,
    /// The backend failed: compute, and leave it alone for this call.
    Offline,
}

impl<R> Call<'_, R> {
    /// The process's leader for this key: takes the lock (or waits for its
    /// holder's value), computes, stores, shares.
    pub(super) async fn lead<B: Body<R>>(
        &self,
        leader: Leader<'_>,
        seen: Option<Seen>,
        deadline: Instant,
        body: B,
    ) -> R {
        let Some(seen) = seen else {
            // The backend is unavailable: coalesce in this process only.
            return self.lead_without_store(leader, Outcome::Bypass, None, body).await;
        };
        let token = token();
        let lock = self.keys.lock();
        let mut poll = FIRST_POLL;
        let mut waited = false;
        let mut discarded = false;
        // Armed before asking: a caller dropped while the lock script runs
        // may hold the lock without having heard so. Releasing a lock it did
        // not get does nothing (the token differs).
        let mut guard = LockGuard::new(self.cache, lock.clone(), token.clone());
        let next = loop {
            match self.lock(&lock, &token, now_ms()).await {
                Some(LockReply::Lead { observed, versions }) => {
                    break Next::Locked(Observed { versions, entry: observed });
                }
                Some(LockReply::Hit(entry)) => {
                    if let Some(stored) = self.parse(&entry) {
                        if let Some((output, payload)) = self.open(&stored) {
                            self.observer.outcome(Outcome::Hit);
                            let payload = Arc::new(payload.into_owned());
                            self.keep_locally(&payload, stored.times, false);
                            // Current when the lock script read it: shared
                            // with those who joined before, unless a write
                            // in this process came since.
                            leader.close();
                            let fresh = self.cache.fence() == self.fence;
                            leader.finish(if fresh { Shared::Value(payload) } else { Shared::Stale });
                            guard.disarm();
                            return output;
                        }
                        if !discarded {
                            // Current header, undecodable payload: remove it so
                            // the lock (and the store) can replace it.
                            discarded = true;
                            Box::pin(self.discard_corrupt(&digest(Some(&entry)))).await;
                            continue;
                        }
                    }
                    break Next::Unlocked;
                }
                Some(LockReply::Wait) if Instant::now() + poll < deadline => {
                    if !waited {
                        self.observer.event(Event::LockWait);
                        waited = true;
                    }
                    tokio::time::sleep(jittered(poll).min(deadline.saturating_duration_since(Instant::now()))).await;
                    poll = (poll * 2).min(MAX_POLL);
                }
                Some(LockReply::Wait) => {
                    self.observer.event(Event::LockTimeout);
                    break Next::Unlocked;
                }
                None => break Next::Offline,
            }
        };
        let Seen { versions, entry, stale } = seen;
        let (observed, guard) = match next {
            Next::Locked(observed) => (Some(observed), Some(guard)),
            Next::Unlocked => {
                guard.disarm();
                (self.observed(versions, entry).await, None)
            }
            // The backend just failed this call: do not make it wait again.
            Next::Offline => {
                guard.disarm();
                return self.lead_without_store(leader, Outcome::Miss, stale, body).await;
            }
        };
        // From here until the lock is released, a panic or a dropped future
        // releases it through the guard, and the waiters through `leader`.
        leader.computing();
        let output = self.compute(Outcome::Miss, body.run()).await;
        leader.close();
        let settle = Settle { observed, guard, stale, mode: StoreMode::Fill, share: leader.has_waiters() };
        let settled = self.settle(output, settle).await;
        // Nothing to share (an `Err`): dropping the leader lets a waiter
        // take over at once.
        if let Some(shared) = settled.shared {
            leader.finish(shared);
        }
        settled.output
    }

    /// Computes without storing, sharing the result with waiters in this
    /// process.
    async fn lead_without_store<B: Body<R>>(
        &self,
        leader: Leader<'_>,
        outcome: Outcome,
        stale: Option<Arc<Vec<u8>>>,
        body: B,
    ) -> R {
        leader.computing();
        let output = self.compute(outcome, body.run()).await;
        leader.close();
        // Encoded only when someone is waiting for it.
        let settle = Settle { observed: None, guard: None, stale, mode: StoreMode::Fill, share: leader.has_waiters() };
        let settled = self.settle(output, settle).await;
        if let Some(shared) = settled.shared {
            leader.finish(shared);
        }
        settled.output
    }

    /// Runs the lock request; `None` when the backend failed.
    /// `min_fresh_ms`: an entry fresh past this time answers as a hit.
    pub(super) async fn lock(&self, lock: &str, token: &str, min_fresh_ms: u64) -> Option<LockReply> {
        let request = LockRequest { lock, token, ttl: self.lock_timeout(), min_fresh_ms };
        let reply = self.cache.backend().lock(self.keys, &self.plan.codec.lock_head(), request).await;
        self.absorb(reply)
    }

    /// Waits for the leader to start computing, then one more lock timeout
    /// for its result. The leader joined first, so its deadline is no later
    /// than ours; it starts at the latest one round trip after it.
    pub(super) async fn wait_for_leader(
        &self,
        waiter: &mut tokio::sync::watch::Receiver<flight::Progress>,
        deadline: Instant,
        lock_timeout: Duration,
    ) -> Result<Option<Shared>, tokio::time::error::Elapsed> {
        let round_trip = self.cache.backend().round_trip();
        if !tokio::time::timeout_at((deadline + round_trip).into(), flight::started(waiter)).await? {
            return Ok(None);
        }
        tokio::time::timeout(lock_timeout, flight::done(waiter)).await
    }
}

/// `base` plus up to a quarter more, so pollers in many processes spread out.
pub(super) fn jittered(base: Duration) -> Duration {
    base + base.mul_f64(rand::random_range(0.0..0.25))
}
