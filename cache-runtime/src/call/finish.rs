//! The one step from a computed output to a stored and shared value:
//! the stale copy stands in for a failure, the output is encoded and
//! checked, stored under the versions it was computed with, the lock is
//! released, and what waiters may be given is decided. Every path that
//! computes (a leader, a write-through, a renewal, an uncoordinated miss)
//! ends here.

use super::lock::LockGuard;
use super::{Call, now_ms};
use crate::codec::EntryTimes;
use crate::flight::Shared;
use crate::observe::Event;
use crate::output::Encoded;
use crate::store::{StoreMode, StoreReply, StoreRequest};
use std::sync::Arc;

/// How a computed output is settled.
pub(super) struct Settle {
    /// The versions it was computed under; `None`: do not store it.
    pub observed: Option<Vec<Vec<u8>>>,
    /// The stampede lock held, released here.
    pub guard: Option<LockGuard>,
    /// A stale copy to return instead of an output that is not cacheable.
    pub stale: Option<Arc<Vec<u8>>>,
    pub mode: StoreMode,
    /// Whether anyone may be handed the value: encode it even when it is
    /// not stored.
    pub share: bool,
}

impl<R> Call<'_, R> {
    /// Settles `output`: returns what the caller gets and what waiters may
    /// be given (nothing when the output is not cacheable).
    pub(super) async fn settle(&self, output: R, settle: Settle) -> (R, Option<Shared>) {
        let Settle { observed, guard, stale, mode, share } = settle;
        let (output, stale_shared) = self.or_stale(output, stale);
        let encoded = if stale_shared.is_some() || (observed.is_none() && !share) {
            None
        } else {
            (self.storage.encode)(&output, self.plan.codec)
        };
        let shared = self.store_and_unlock(mode, observed, guard, encoded).await;
        (output, stale_shared.or(shared))
    }

    /// Stores under the lock `guard` holds, if any, and makes sure the lock
    /// is released: by the store, or here when no store ran.
    async fn store_and_unlock(
        &self,
        mode: StoreMode,
        observed: Option<Vec<Vec<u8>>>,
        mut guard: Option<LockGuard>,
        encoded: Option<Encoded>,
    ) -> Option<Shared> {
        let held = guard.as_ref().map(|g| (g.lock.as_str(), g.token.as_str()));
        let (released, shared) = self.store(mode, observed, held, encoded).await;
        if let Some(guard) = guard.as_mut() {
            if !released {
                self.cache.release_lock(&guard.lock, &guard.token).await;
            }
            guard.disarm();
        }
        shared
    }

    /// Stores an output, encoded by the caller (`None`: not cacheable).
    /// Taking the bytes rather than `&R` keeps the output out of the
    /// future's state across the round trip, so outputs need not be `Sync`.
    /// Returns whether the store released the lock, and what waiters may
    /// be given: the payload, `Stale` if a namespace was invalidated while
    /// computing, or nothing when the output is not cacheable.
    async fn store(
        &self,
        mode: StoreMode,
        observed: Option<Vec<Vec<u8>>>,
        held: Option<(&str, &str)>,
        encoded: Option<Encoded>,
    ) -> (bool, Option<Shared>) {
        let payload = match encoded {
            None => return (false, None),
            Some(Ok(payload)) => Arc::new(payload),
            Some(Err(e)) => {
                let why = format_args!("a value of prefix `{}` could not be encoded: {e}", self.plan.prefix);
                self.observer.event(Event::Unencodable(&why));
                return (false, None);
            }
        };
        let max = self.cache.max_value_bytes();
        if payload.len() > max {
            self.observer.event(Event::Oversize(&format_args!(
                "a value of prefix `{}` is {} bytes, over max_value_bytes ({max}): returned but not stored",
                self.plan.prefix,
                payload.len(),
            )));
            return (false, Some(Shared::Value(payload)));
        }
        let Some(observed) = observed else { return (false, Some(Shared::Value(payload))) };
        let now = now_ms();
        let fresh_ms = jittered_ttl_ms(self.ttl, self.plan.jitter);
        let times = EntryTimes { stored_ms: now, fresh_until_ms: now.saturating_add(fresh_ms) };
        let stale_ms = self.plan.stale_if_error.map_or(0, |window| window.as_millis() as u64);
        let request = StoreRequest {
            hash: self.hash,
            head: &self.plan.codec.head(),
            payload: &payload,
            ttl_ms: fresh_ms.saturating_add(stale_ms),
            times: &times.field(),
            now_ms: now,
            mode,
            held,
            observed: &observed,
        };
        match self.cache.backend().store(self.keys, request).await {
            Ok(StoreReply::Stored) => {
                self.observer.event(Event::Written { bytes: payload.len() });
                self.keep_locally(&payload, times);
                (true, Some(Shared::Value(payload)))
            }
            // A value at least as fresh was already there.
            Ok(StoreReply::AlreadyCurrent) => {
                self.observer.event(Event::WriteSkipped);
                (true, Some(Shared::Value(payload)))
            }
            Ok(StoreReply::VersionChanged) => {
                self.observer.event(Event::WriteSkipped);
                (true, Some(Shared::Stale))
            }
            Err(fault) => {
                self.observer.event(Event::Fault(&fault));
                (false, Some(Shared::Value(payload)))
            }
        }
    }

    /// An output that is not stored (an `Err`) gives way to the stale copy
    /// kept for `stale_if_error`, if there is one; returns what to share
    /// with waiters in that case.
    fn or_stale(&self, output: R, stale: Option<Arc<Vec<u8>>>) -> (R, Option<Shared>) {
        let Some(stale) = stale.filter(|_| !(self.storage.cacheable)(&output)) else { return (output, None) };
        match (self.storage.decode)(&stale, self.plan.codec) {
            Ok(kept) => {
                let why = format_args!("prefix `{}`: the function failed; serving the stale copy", self.plan.prefix);
                self.observer.event(Event::StaleServed(&why));
                (kept, Some(Shared::Value(stale)))
            }
            Err(_) => (output, None),
        }
    }
}

/// The stored TTL: uniform in `[ttl*(1-jitter), ttl*(1+jitter)]`, in ms.
pub(crate) fn jittered_ttl_ms(ttl: std::time::Duration, jitter: f64) -> u64 {
    let base = ttl.as_millis() as f64;
    let factor = if jitter > 0.0 { rand::random_range((1.0 - jitter)..=(1.0 + jitter)) } else { 1.0 };
    ((base * factor).round() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn jitter_stays_in_bounds() {
        let ttl = Duration::from_secs(100);
        let samples: Vec<u64> = (0..1000).map(|_| jittered_ttl_ms(ttl, 0.1)).collect();
        assert!(samples.iter().all(|&ms| (90_000..=110_000).contains(&ms)));
        assert!(samples.iter().any(|&ms| ms != samples[0]));
        assert_eq!(jittered_ttl_ms(ttl, 0.0), 100_000);
        assert_eq!(jittered_ttl_ms(Duration::from_micros(10), 0.0), 1);
    }
}
