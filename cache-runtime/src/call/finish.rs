//! The one step from a computed output to a stored and shared value:
//! the stale copy stands in for a failure, the output is encoded and
//! checked, stored under the versions it was computed with, the lock is
//! released, and what waiters may be given is decided. Every path that
//! computes (a leader, a write-through, a renewal, an uncoordinated miss)
//! ends here.

use super::lock::LockGuard;
use super::{Call, Observed, now_ms};
use crate::codec::{EntryTimes, Packing};
use crate::compress;
use crate::error::Fault;
use crate::flight::Shared;
use crate::observe::Event;
use crate::output::Encoded;
use crate::store::{StoreMode, StoreReply, StoreRequest};
use std::borrow::Cow;
use std::sync::Arc;

/// How a computed output is settled.
pub(super) struct Settle {
    /// What it was computed from; `None`: do not store it.
    pub observed: Option<Observed>,
    /// The stampede lock held, released here.
    pub guard: Option<LockGuard>,
    /// A stale copy to return instead of an output that is not cacheable.
    pub stale: Option<Arc<Vec<u8>>>,
    pub mode: StoreMode,
    /// Whether anyone may be handed the value: encode it even when it is
    /// not stored, and check whether it may be shared.
    pub share: bool,
}

// Who may be handed a value: one that a store checked (the versions and
// the entry were still what the computation observed when it was stored)
// goes to every waiter, since each joined before the store. Any other
// value (not stored: too large, a failed store, the backend unreachable, a
// stale copy; or stored by a backend that checks nothing) is shared only
// when the cache's write fence has not moved since the computation began
// and, where the backend can be asked, the entry and its versions are
// unchanged: otherwise a caller that joined after a write returned would
// get what was computed before it. Those callers look again instead.

/// How a store ended, for those who must know.
pub(super) enum Stored {
    /// Stored, refused for a namespace's version, or nothing to store.
    Done,
    /// The entry was written by someone else since it was observed.
    Superseded,
    Failed(Fault),
}

/// What settling came to.
pub(super) struct Settled<R> {
    /// What the caller gets.
    pub output: R,
    /// What waiters may be given: nothing when the output is not cacheable.
    pub shared: Option<Shared>,
    /// The backend failure that kept the value from being stored, if any.
    pub fault: Option<Fault>,
    /// The entry was written by someone else since it was observed.
    pub superseded: bool,
}

/// What may become of an encoded output.
pub(super) enum Storable {
    /// Store it.
    Payload(Arc<Vec<u8>>),
    /// Return it, but do not store it (over `max_value_bytes`).
    Unstored(Arc<Vec<u8>>),
    /// Not cacheable, or it could not be encoded.
    Nothing,
}

/// An entry about to be stored: its payload, as Redis keeps it, and times.
pub(super) struct Entry {
    pub payload: Arc<Vec<u8>>,
    /// The payload compressed, when it is.
    packed: Option<Vec<u8>>,
    pub times: EntryTimes,
    /// `<stored>,<fresh until>`.
    times_field: String,
    head: &'static [u8],
    /// How long Redis keeps it: its fresh life plus any stale window.
    ttl_ms: u64,
}

impl Entry {
    /// Times the entry now, with the plan's jittered TTL, and packs it.
    pub(super) fn new<R>(call: &Call<'_, R>, payload: &Arc<Vec<u8>>) -> Self {
        let now = now_ms();
        let fresh_ms = jittered_ttl_ms(call.ttl, call.plan.jitter);
        let times = EntryTimes { stored_ms: now, fresh_until_ms: now.saturating_add(fresh_ms) };
        let stale_ms = call.plan.stale_if_error.map_or(0, |window| window.as_millis() as u64);
        // The one place a payload is compressed; only Redis holds the
        // compressed bytes (`compress.rs`).
        let (packing, packed) = match call.cache.backend().redis() {
            Some(_) => {
                let (compression, threshold) = call.cache.compression(call.plan.compress);
                compress::pack(payload, compression, threshold)
            }
            None => (Packing::Raw, Cow::Borrowed(&payload[..])),
        };
        let packed = match packed {
            Cow::Borrowed(_) => None,
            Cow::Owned(bytes) => Some(bytes),
        };
        Entry {
            payload: payload.clone(),
            packed,
            times,
            times_field: times.field(),
            head: call.plan.codec.head(packing),
            ttl_ms: fresh_ms.saturating_add(stale_ms),
        }
    }

    /// The store of this entry, bound to what was observed.
    pub(super) fn request<'a, R>(
        &'a self,
        call: &Call<'_, R>,
        mode: StoreMode,
        observed: &'a Observed,
        held: Option<(&'a str, &'a str)>,
        share: bool,
    ) -> StoreRequest<'a> {
        StoreRequest {
            hash: call.hash,
            head: self.head,
            payload: self.packed.as_deref().unwrap_or(&self.payload),
            ttl_ms: self.ttl_ms,
            times: &self.times_field,
            now_ms: self.times.stored_ms,
            mode,
            observed_entry: &observed.entry,
            held,
            observed: &observed.versions,
            verify: share || call.local.is_some(),
        }
    }
}

impl<R> Call<'_, R> {
    /// Settles `output`; see the module docs.
    pub(super) async fn settle(&self, output: R, settle: Settle) -> Settled<R> {
        let Settle { observed, mut guard, stale, mode, share } = settle;
        let (output, stale_copy) = self.or_stale(output, stale);
        if let Some(stale_copy) = stale_copy {
            // Nothing is stored: the lock is released, and the stale copy
            // shared only if nothing changed since it was read.
            if let Some(guard) = guard.as_mut() {
                self.cache.release_lock(&guard.lock, &guard.token).await;
                guard.disarm();
            }
            let shared = if share { Some(self.unverified(stale_copy, observed.as_ref()).await) } else { None };
            return Settled { output, shared, fault: None, superseded: false };
        }
        let encoded = if observed.is_none() && !share { None } else { (self.storage.encode)(&output, self.plan.codec) };
        let (shared, fault, superseded) = self.store_and_unlock(mode, observed, guard, encoded, share).await;
        Settled { output, shared, fault, superseded }
    }

    /// What waiters get of a value that no store checked; see above.
    async fn unverified(&self, payload: Arc<Vec<u8>>, observed: Option<&Observed>) -> Shared {
        if self.cache.fence() != self.fence {
            return Shared::Stale;
        }
        let Some(observed) = observed else { return Shared::Value(payload) };
        match self.cache.backend().unchanged(self.keys, &observed.entry, &observed.versions).await {
            Ok(true) => Shared::Value(payload),
            Ok(false) => Shared::Stale,
            Err(fault) => {
                self.observer.event(Event::Fault(&fault));
                Shared::Stale
            }
        }
    }

    /// Stores under the lock `guard` holds, if any, and makes sure the lock
    /// is released: by the store, or here when no store ran.
    async fn store_and_unlock(
        &self,
        mode: StoreMode,
        observed: Option<Observed>,
        mut guard: Option<LockGuard>,
        encoded: Option<Encoded>,
        share: bool,
    ) -> (Option<Shared>, Option<Fault>, bool) {
        let held = guard.as_ref().map(|g| (g.lock.as_str(), g.token.as_str()));
        let (released, shared, outcome) = self.store(mode, observed, held, encoded, share).await;
        if let Some(guard) = guard.as_mut() {
            if !released {
                self.cache.release_lock(&guard.lock, &guard.token).await;
            }
            guard.disarm();
        }
        match outcome {
            Stored::Failed(fault) => (shared, Some(fault), false),
            Stored::Superseded => (shared, None, true),
            Stored::Done => (shared, None, false),
        }
    }

    /// Stores an output, encoded by the caller (`None`: not cacheable).
    /// Taking the bytes rather than `&R` keeps the output out of the
    /// future's state across the round trip, so outputs need not be `Sync`.
    /// Returns whether the store released the lock, and what waiters may
    /// be given (when `share`): the payload, `Stale` if it may not be
    /// shared, or nothing when the output is not cacheable.
    async fn store(
        &self,
        mode: StoreMode,
        observed: Option<Observed>,
        held: Option<(&str, &str)>,
        encoded: Option<Encoded>,
        share: bool,
    ) -> (bool, Option<Shared>, Stored) {
        let payload = match self.storable(encoded) {
            Storable::Payload(payload) => payload,
            Storable::Nothing => return (false, None, Stored::Done),
            Storable::Unstored(payload) => {
                return (false, self.share_unverified(share, payload, observed.as_ref()).await, Stored::Done);
            }
        };
        let Some(observed) = observed else {
            return (false, self.share_unverified(share, payload, None).await, Stored::Done);
        };
        let entry = Entry::new(self, &payload);
        let request = entry.request(self, mode, &observed, held, share);
        let reply = self.cache.backend().store(self.keys, request).await;
        self.stored(reply, entry, mode, &observed, share).await
    }

    /// What `store` does with the store's reply; see there.
    pub(super) async fn stored(
        &self,
        reply: Result<StoreReply, Fault>,
        entry: Entry,
        mode: StoreMode,
        observed: &Observed,
        share: bool,
    ) -> (bool, Option<Shared>, Stored) {
        let Entry { payload, times, .. } = entry;
        match reply {
            Ok(StoreReply::Stored) => {
                let kept = self.keep_locally(&payload, times, mode != StoreMode::Fill);
                if self.cache.backend().checks_stores() {
                    self.observer.event(Event::Written { bytes: payload.len() });
                    (true, Some(Shared::Value(payload)), Stored::Done)
                } else if kept {
                    // Memory-only: the local tier is the store.
                    self.observer.event(Event::Written { bytes: payload.len() });
                    (true, self.share_unverified(share, payload, Some(observed)).await, Stored::Done)
                } else {
                    // Memory-only, and the key was forgotten, replaced or
                    // invalidated since it was read.
                    self.observer.event(Event::WriteSkipped);
                    (true, Some(Shared::Stale), Stored::Superseded)
                }
            }
            // Someone wrote the entry since it was observed (a write-through,
            // a forget, another caller's store), or a namespace was
            // invalidated: waiters look again.
            Ok(reply @ (StoreReply::Superseded | StoreReply::VersionChanged)) => {
                self.observer.event(Event::WriteSkipped);
                let outcome = if reply == StoreReply::Superseded { Stored::Superseded } else { Stored::Done };
                (true, Some(Shared::Stale), outcome)
            }
            Err(fault) => {
                self.observer.event(Event::Fault(&fault));
                (false, self.share_unverified(share, payload, None).await, Stored::Failed(fault))
            }
        }
    }

    /// Whether an encoded output may be stored: it encoded, its type
    /// round-trips, and it is within `max_value_bytes`. Each failure is
    /// counted here.
    pub(super) fn storable(&self, encoded: Option<Encoded>) -> Storable {
        let payload = match encoded {
            None => return Storable::Nothing,
            Some(Ok(payload)) => Arc::new(payload),
            Some(Err(e)) => {
                let why = format_args!("a value of prefix `{}` could not be encoded: {e}", self.plan.prefix);
                self.observer.event(Event::Unencodable(&why));
                return Storable::Nothing;
            }
        };
        if !self.round_trips(&payload) {
            return Storable::Nothing;
        }
        let max = self.cache.max_value_bytes();
        if payload.len() > max {
            self.observer.event(Event::Oversize(&format_args!(
                "a value of prefix `{}` is {} bytes, over max_value_bytes ({max}): returned but not stored",
                self.plan.prefix,
                payload.len(),
            )));
            return Storable::Unstored(payload);
        }
        Storable::Payload(payload)
    }

    /// Whether the output type decodes what its codec encoded: checked on
    /// a call site's first store, since a type whose serde attributes the
    /// codec cannot read back would be stored, fail to decode, and be
    /// computed again on every call.
    fn round_trips(&self, payload: &[u8]) -> bool {
        let name = std::any::type_name::<R>();
        let check = || (name, (self.storage.decode)(payload, self.plan.codec, usize::MAX).err().map(|e| e.to_string()));
        let (checked, failure) = self.observer.site.round_trip.get_or_init(check);
        let failure = if *checked == name { failure.clone() } else { check().1 };
        match failure {
            None => true,
            Some(why) => {
                self.observer.misconfigured(&no_round_trip(self.plan, name, &why));
                false
            }
        }
    }

    pub(super) async fn share_unverified(
        &self,
        share: bool,
        payload: Arc<Vec<u8>>,
        observed: Option<&Observed>,
    ) -> Option<Shared> {
        if share { Some(self.unverified(payload, observed).await) } else { None }
    }

    /// An output that is not stored (an `Err`) gives way to the stale copy
    /// kept for `stale_if_error`, if there is one; returns that copy's bytes
    /// in that case.
    fn or_stale(&self, output: R, stale: Option<Arc<Vec<u8>>>) -> (R, Option<Arc<Vec<u8>>>) {
        let Some(stale) = stale.filter(|_| !(self.storage.cacheable)(&output)) else { return (output, None) };
        match (self.storage.decode)(&stale, self.plan.codec, self.cache.max_value_bytes()) {
            Ok(kept) => {
                let why = format_args!("prefix `{}`: the function failed; serving the stale copy", self.plan.prefix);
                self.observer.event(Event::StaleServed(&why));
                (kept, Some(stale))
            }
            Err(_) => (output, None),
        }
    }
}

/// Why a call site whose type does not round-trip stops caching, and the fix.
pub(super) fn no_round_trip(plan: &crate::policy::Plan<'_>, name: &str, why: &str) -> String {
    format!(
        "prefix `{}`: `{name}` does not decode what {} encoded ({why}), so its calls are no longer cached: serde \
         attributes such as `flatten`, `skip_serializing_if`, `untagged` or internally tagged enums, and \
         `serde_json::Value`, need `codec = \"json\"`",
        plan.prefix,
        plan.codec.name()
    )
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
