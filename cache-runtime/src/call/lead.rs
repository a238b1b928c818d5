//! The leader of a key in this process and the stampede lock across
//! processes: taking the lock (or waiting for its holder's value), the
//! guard that releases it whatever happens, and how waiters follow the
//! leader.

use super::finish::Settle;
use super::lock::{LockGuard, token};
use super::{Before, Body, Call, Observed, Seen, now_ms, tier};
use crate::error::Fault;
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
    Offline(Failed),
}

/// How a request to the backend failed.
#[derive(Clone, Copy)]
enum Failed {
    /// The breaker refused it: it never left this process.
    Unsent,
    /// It may have run: its reply was lost.
    Unknown,
}

impl<R> Call<'_, R> {
    /// The process's leader for this key: takes the lock (or waits for its
    /// holder's value), computes, stores, shares.
    pub(super) async fn lead<B: Body<R>>(&self, leader: Leader<'_>, before: Before, deadline: Instant, body: B) -> R {
        if let Before::Unavailable = before {
            // The backend is unavailable: coalesce in this process only.
            return self.lead_without_store(leader, Outcome::Bypass, None, body).await;
        }
        let token = token();
        let lock = self.keys.lock();
        let mut poll = FIRST_POLL;
        let mut waited = false;
        let mut discarded = false;
        // A leader that did not look asks for the lock and reads in one
        // round trip first; then it holds the lock whatever the entry is.
        let mut first = matches!(before, Before::Skipped);
        let mut held = false;
        // Armed before asking: a caller dropped while the lock script runs
        // may hold the lock without having heard so. Releasing a lock it did
        // not get does nothing (the token differs).
        let mut guard = LockGuard::new(self.cache, lock.clone(), token.clone());
        let next = loop {
            let reply = if std::mem::take(&mut first) {
                self.lock_and_read(&lock, &token).await.map(|(reply, locked)| {
                    held = locked;
                    reply
                })
            } else {
                self.try_lock(&lock, &token, now_ms()).await
            };
            match reply {
                Ok(LockReply::Lead { observed, versions }) => {
                    break Next::Locked(Observed { versions, entry: observed });
                }
                Ok(LockReply::Hit(entry)) => {
                    if let Some(stored) = self.parse(&entry) {
                        if let Some((output, payload)) = self.open(&stored) {
                            self.observer.outcome(Outcome::Hit);
                            self.observer.site.looked(false);
                            let payload = Arc::new(payload.into_owned());
                            self.keep_locally(&payload, stored.times, false);
                            // Current when the lock request read it, but a
                            // waiter may have joined after that read and
                            // after another process's write returned:
                            // waiters read for themselves (see
                            // `Shared::Stale`).
                            leader.close();
                            leader.finish(Shared::Stale);
                            // A lock taken with the read goes with the guard.
                            if !held {
                                guard.disarm();
                            }
                            if let Some(seen) = tier::due(self.plan, stored.times, now_ms()) {
                                // Released first: the renewal asks for the
                                // lock and would find ours.
                                if held {
                                    self.let_go(&mut held, &lock, &token).await;
                                    guard.disarm();
                                }
                                body.renew_later(self.cache, self.hash, self.storage, seen);
                            }
                            return output;
                        }
                        if !discarded {
                            // Current header, undecodable payload: remove it so
                            // the lock (and the store) can replace it.
                            discarded = true;
                            self.let_go(&mut held, &lock, &token).await;
                            Box::pin(self.discard_corrupt(&digest(Some(&entry)))).await;
                            continue;
                        }
                    }
                    break Next::Unlocked;
                }
                Ok(LockReply::Wait) if Instant::now() + poll < deadline => {
                    if !waited {
                        self.observer.event(Event::LockWait);
                        waited = true;
                    }
                    tokio::time::sleep(jittered(poll).min(deadline.saturating_duration_since(Instant::now()))).await;
                    poll = (poll * 2).min(MAX_POLL);
                }
                Ok(LockReply::Wait) => {
                    self.observer.event(Event::LockTimeout);
                    break Next::Unlocked;
                }
                Err(failed) => break Next::Offline(failed),
            }
        };
        let (seen, stale) = match before {
            Before::Seen(Seen { versions, entry, stale }) => (Some((versions, entry)), stale),
            _ => (None, None),
        };
        let (observed, guard) = match next {
            Next::Locked(observed) => (Some(observed), Some(guard)),
            Next::Unlocked => {
                self.let_go(&mut held, &lock, &token).await;
                guard.disarm();
                // A leader that did not look before asking looks now.
                let seen = match seen {
                    Some(seen) => Some(seen),
                    None => self.read().await.map(|read| (read.versions, digest(read.entry.as_deref()))),
                };
                let observed = match seen {
                    Some((versions, entry)) => self.observed(versions, entry).await,
                    None => None,
                };
                (observed, None)
            }
            // The backend just failed this call: do not make it wait again.
            // The guard stays armed if the lock may have been taken before
            // the reply was lost; a request the breaker refused took
            // nothing, and a release would only be refused in turn.
            Next::Offline(failed) => {
                if let Failed::Unsent = failed {
                    guard.disarm();
                }
                drop(guard);
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

    /// Releases a lock taken with the read, before going on without it.
    async fn let_go(&self, held: &mut bool, lock: &str, token: &str) {
        if std::mem::take(held) {
            self.cache.release_lock(lock, token).await;
        }
    }

    /// Takes the lock and reads the entry in one round trip. Also whether
    /// the lock is ours, which a `Hit` then releases.
    async fn lock_and_read(&self, lock: &str, token: &str) -> Result<(LockReply, bool), Failed> {
        let request = LockRequest { lock, token, ttl: self.lock_timeout(), min_fresh_ms: now_ms() };
        let reply = self.cache.backend().lock_and_read(self.keys, &self.plan.codec.lock_head(), request).await;
        self.failed(reply)
    }

    /// Runs the lock request; `None` when the backend failed.
    /// `min_fresh_ms`: an entry fresh past this time answers as a hit.
    pub(super) async fn lock(&self, lock: &str, token: &str, min_fresh_ms: u64) -> Option<LockReply> {
        self.try_lock(lock, token, min_fresh_ms).await.ok()
    }

    async fn try_lock(&self, lock: &str, token: &str, min_fresh_ms: u64) -> Result<LockReply, Failed> {
        let request = LockRequest { lock, token, ttl: self.lock_timeout(), min_fresh_ms };
        let reply = self.cache.backend().lock(self.keys, &self.plan.codec.lock_head(), request).await;
        self.failed(reply)
    }

    /// Counts a fault, keeping whether the request may have reached Redis.
    fn failed<T>(&self, reply: Result<T, Fault>) -> Result<T, Failed> {
        let unsent = matches!(reply, Err(Fault::BreakerOpen));
        self.absorb(reply).ok_or(if unsent { Failed::Unsent } else { Failed::Unknown })
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
