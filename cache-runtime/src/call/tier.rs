//! A call's use of the local tier: the fast path that answers before the
//! flow starts, the lookup inside it, and keeping what the call read or
//! computed.

use super::{Call, now_ms};
use crate::Cache;
use crate::codec::EntryTimes;
use crate::keys::KeyHash;
use crate::local::{Capture, LocalEntry, LocalSite, LocalTier};
use crate::observe::{Event, Observer, Outcome};
use crate::output::Storage;
use crate::policy::Plan;
use std::sync::Arc;
use std::time::Duration;

/// A call's handle on the local tier.
pub(super) struct Local<'c> {
    tier: &'c LocalTier,
    site: &'c LocalSite,
    /// Taken before the call's first read.
    capture: Capture,
    /// The most an entry may stay in the tier.
    keep_for: Duration,
}

/// What the local tier holds for a call.
pub(super) enum Found {
    /// A fresh entry, and the time it was judged at (0 when the clock was
    /// not needed).
    Fresh(Arc<LocalEntry>, u64),
    /// A stale copy kept for `stale_if_error` (memory-only caches).
    Stale(Arc<Vec<u8>>),
    Nothing,
}

impl<'c> Local<'c> {
    /// The tier, if this call uses it.
    pub(super) fn for_call(
        cache: &'c Cache,
        plan: &Plan<'_>,
        observer: &'c Observer<'c>,
        hash: KeyHash,
    ) -> Option<Self> {
        let Some((tier, keep_for)) = cache.local_for(plan) else {
            if plan.local_ttl.is_some() && observer.site.local.is_none() {
                observer.misconfigured(&format_args!(
                    "prefix `{}` asks for the local tier, but the cache has none: enable it with \
                     Cache::builder().local(capacity)",
                    plan.prefix
                ));
            }
            return None;
        };
        let site = observer.site.local.as_ref()?;
        Some(Local { tier, site, capture: tier.capture(site, &hash), keep_for })
    }

    pub(super) fn find(&self, plan: &Plan<'_>, hash: KeyHash) -> Found {
        find(self.tier, self.site, plan, hash)
    }

    pub(super) fn forget(&self, hash: KeyHash) {
        self.tier.forget(&hash);
    }
}

fn find(tier: &LocalTier, site: &LocalSite, plan: &Plan<'_>, hash: KeyHash) -> Found {
    let Some(entry) = tier.get(&hash, site).filter(|entry| entry.codec == plan.codec) else { return Found::Nothing };
    // The tier keeps an entry no longer than it is fresh, unless it is the
    // whole cache and keeps stale copies: only then, or for a refresh-ahead,
    // does a local hit need the clock.
    let keeps_stale = tier.is_whole_cache() && plan.stale_if_error.is_some();
    let now = if keeps_stale || plan.refresh_ahead > 0.0 { now_ms() } else { 0 };
    if !keeps_stale || entry.times.is_fresh(now) {
        Found::Fresh(entry, now)
    } else if within_stale_window(plan, entry.times, now) {
        Found::Stale(entry.payload.clone())
    } else {
        Found::Nothing
    }
}

/// A fresh entry of the local tier, decoded, and the refresh-ahead it is
/// due for; `None` sends the call down the full flow, which also deals
/// with stale copies and undecodable entries.
pub(super) fn hit<R>(
    cache: &Cache,
    plan: &Plan<'_>,
    observer: &Observer<'_>,
    hash: KeyHash,
    storage: Storage<R>,
) -> Option<(R, Option<EntryTimes>)> {
    if observer.site.invalid.is_some() || plan.ttl.or(cache.default_ttl()).is_none() {
        return None;
    }
    let (tier, _) = cache.local_for(plan)?;
    let Found::Fresh(entry, now) = find(tier, observer.site.local.as_ref()?, plan, hash) else {
        return None;
    };
    let output = (storage.decode)(&entry.payload, plan.codec, cache.max_value_bytes()).ok()?;
    observer.event(Event::Read { bytes: entry.payload.len() });
    observer.key(hash);
    observer.outcome(Outcome::LocalHit);
    Some((output, due(plan, entry.times, now)))
}

/// The refresh-ahead due on a hit of an entry with these times.
pub(super) fn due(plan: &Plan<'_>, times: EntryTimes, now: u64) -> Option<EntryTimes> {
    (plan.refresh_ahead > 0.0 && times.is_due(now, plan.refresh_ahead)).then_some(times)
}

/// Whether a stale entry may still stand in for a failed computation.
pub(super) fn within_stale_window(plan: &Plan<'_>, times: EntryTimes, now: u64) -> bool {
    plan.stale_if_error.is_some_and(|window| now < times.fresh_until_ms.saturating_add(window.as_millis() as u64))
}

impl<R> Call<'_, R> {
    /// Puts a payload in the local tier, if this call uses it: for as long
    /// as the entry is fresh (plus its stale window, when the tier is the
    /// whole cache), at most the plan's local TTL. `replacing`: the payload
    /// was written over the entry (a write-through, a renewal), and no fill
    /// of the old one may land after it.
    /// Returns whether it was kept.
    pub(super) fn keep_locally(&self, payload: &Arc<Vec<u8>>, times: EntryTimes, replacing: bool) -> bool {
        let Some(local) = &self.local else { return false };
        let until = if local.tier.is_whole_cache() {
            times.fresh_until_ms.saturating_add(self.plan.stale_if_error.map_or(0, |w| w.as_millis() as u64))
        } else {
            times.fresh_until_ms
        };
        let keep_for = Duration::from_millis(until.saturating_sub(now_ms())).min(local.keep_for);
        let parts = (payload.clone(), self.plan.codec, times);
        if replacing {
            local.tier.replace(self.hash, local.site, local.capture, parts, keep_for)
        } else {
            local.tier.insert(self.hash, local.site, local.capture, parts, keep_for)
        }
    }
}
