//! What a call site remembers per cache, so that a hit does no work that
//! is the same every time: its prefix's counters, the Redis keys of its
//! namespaces' versions, and their local epochs.

use crate::keys::{CACHE_WIDE, check_namespace, version_key};
use crate::local::{LocalSite, LocalTier};
use crate::recent::Recent;
use crate::stats::{Counters, Registry};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};

/// A call site's state for one cache.
#[derive(Debug)]
pub(crate) struct Site {
    pub counters: Arc<Counters>,
    /// One version key per namespace, the prefix's first, the cache-wide
    /// namespace's last (`keys::CACHE_WIDE`); shared with batched lookups.
    pub version_keys: Arc<[String]>,
    /// Why the site's namespace names cannot be used, checked once.
    pub invalid: Option<String>,
    /// Its namespaces' epochs in the cache's local tier, if it has one.
    pub local: Option<LocalSite>,
    /// Whether the site's output type decodes what its codec encoded,
    /// checked on the first store: the type's name, and why not.
    pub round_trip: OnceLock<(&'static str, Option<String>)>,
    /// Set once the site's misconfiguration has been logged.
    pub reported: OnceLock<()>,
    /// Redis lookups that missed in a row, saturating: a site past
    /// [`Site::MISS_LIKELY`] asks for the lock in its first round trip.
    misses_in_a_row: AtomicU32,
    /// Whether the site's last bulk read missed an item: its next bulk
    /// read takes the locks of what it misses (`store::claim`).
    bulk_missed: AtomicBool,
    /// The items its bulk reads read lately; only for the site a cell
    /// keeps: one made for a single call would remember nothing.
    pub recent: Option<Recent>,
}

impl Site {
    fn new<'n>(cache: CacheView<'_>, prefix: &str, namespaces: impl Iterator<Item = &'n str>, kept: bool) -> Self {
        let mut namespaces: Vec<&str> = namespaces.collect();
        // The user's names are checked; the cache-wide one is ours, and
        // made of a character they may not use.
        let invalid = namespaces.iter().try_for_each(|ns| check_namespace(ns)).err();
        namespaces.push(CACHE_WIDE);
        Site {
            counters: cache.registry.of(prefix),
            version_keys: namespaces.iter().map(|ns| version_key(cache.key_prefix, ns)).collect::<Vec<_>>().into(),
            invalid,
            local: cache.local.map(|tier| tier.site(namespaces.iter().copied())),
            round_trip: OnceLock::new(),
            reported: OnceLock::new(),
            misses_in_a_row: AtomicU32::new(0),
            // A new site is more likely cold than warm.
            bulk_missed: AtomicBool::new(true),
            recent: kept.then(Recent::default),
        }
    }

    /// Misses in a row after which a call expects to miss: after a deploy,
    /// a flush or an invalidation, most calls of a site miss at once.
    pub const MISS_LIKELY: u32 = 8;

    /// Counts a Redis lookup of this site: a miss or a hit.
    pub(crate) fn looked(&self, missed: bool) {
        if missed {
            // Saturating, and not written again once there: the counter
            // is shared by every concurrent call of the site.
            if self.misses_in_a_row.load(Relaxed) < Self::MISS_LIKELY {
                self.misses_in_a_row.fetch_add(1, Relaxed);
            }
        } else if self.misses_in_a_row.load(Relaxed) != 0 {
            self.misses_in_a_row.store(0, Relaxed);
        }
    }

    /// Counts a bulk read of this site: whether it missed any item.
    pub(crate) fn read_many(&self, missed: bool) {
        if self.bulk_missed.load(Relaxed) != missed {
            self.bulk_missed.store(missed, Relaxed);
        }
    }

    /// Whether the site's last bulk read missed an item. A bulk read that
    /// expects misses takes their locks in the same round trip (those of
    /// the items the site has not read lately, or, with a script, those
    /// of every entry it finds missing); one that expects none reads with
    /// a plain `MGET`.
    pub(crate) fn bulk_misses_likely(&self) -> bool {
        self.bulk_missed.load(Relaxed)
    }

    /// Whether the site's recent lookups all missed.
    pub(crate) fn miss_likely(&self) -> bool {
        self.misses_in_a_row.load(Relaxed) >= Self::MISS_LIKELY
    }
}

/// What a site needs to know of the cache it is used with.
#[derive(Clone, Copy)]
pub(crate) struct CacheView<'c> {
    pub id: u64,
    pub key_prefix: &'c str,
    pub registry: &'c Registry,
    pub local: Option<&'c LocalTier>,
}

/// Where a call site (a `#[cached]` function, or a `Policy`) keeps its
/// `Site` for the first cache it is used with; other caches get a fresh
/// one per call. Not a public API.
#[doc(hidden)]
#[derive(Debug, Default)]
pub struct SiteCell(OnceLock<(u64, Arc<Site>)>);

impl SiteCell {
    /// An empty cell, for a `static`.
    pub const fn new() -> Self {
        Self(OnceLock::new())
    }

    pub(crate) fn get<'s, 'n>(
        &'s self,
        cache: CacheView<'_>,
        prefix: &str,
        namespaces: impl Iterator<Item = &'n str>,
    ) -> SiteRef<'s> {
        if let Some((id, site)) = self.0.get() {
            if *id == cache.id {
                return SiteRef::Borrowed(site);
            }
            return SiteRef::Owned(Arc::new(Site::new(cache, prefix, namespaces, false)));
        }
        let site = Arc::new(Site::new(cache, prefix, namespaces, true));
        let _ = self.0.set((cache.id, site.clone()));
        SiteRef::Owned(site)
    }
}

impl Clone for SiteCell {
    /// A clone starts empty: it may be used with another cache.
    fn clone(&self) -> Self {
        Self::new()
    }
}

/// A call's site state.
pub(crate) enum SiteRef<'a> {
    Borrowed(&'a Site),
    Owned(Arc<Site>),
}

impl std::ops::Deref for SiteRef<'_> {
    type Target = Site;
    fn deref(&self) -> &Site {
        match self {
            SiteRef::Borrowed(site) => site,
            SiteRef::Owned(site) => site,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::bump;

    #[test]
    fn a_cell_serves_the_cache_it_was_filled_for() {
        let (registry, other) = (Registry::default(), Registry::default());
        let view = CacheView { id: 1, key_prefix: "app", registry: &registry, local: None };
        let other_view = CacheView { id: 2, key_prefix: "other", registry: &other, local: None };
        let cell = SiteCell::new();
        let namespaces = || ["p", "tag"].into_iter();
        bump(&cell.get(view, "p", namespaces()).counters.hits);
        let again = cell.get(view, "p", namespaces());
        assert!(matches!(again, SiteRef::Borrowed(_)), "the second call borrows");
        bump(&again.counters.hits);
        let elsewhere = cell.get(other_view, "p", namespaces());
        bump(&elsewhere.counters.hits);
        assert_eq!(&*elsewhere.version_keys, ["other:p:{p}#v", "other:tag:{tag}#v", "other:#all:{#all}#v"]);
        assert!(elsewhere.invalid.is_none());
        assert!(SiteCell::new().get(view, "bad name", ["bad name"].into_iter()).invalid.is_some());
        for _ in 0..Site::MISS_LIKELY - 1 {
            again.looked(true);
        }
        assert!(!again.miss_likely());
        again.looked(true);
        assert!(again.miss_likely(), "a run of misses makes the next one likely");
        again.looked(false);
        assert!(!again.miss_likely(), "one hit ends it");
        assert_eq!(registry.snapshot().total.hits, 2);
        assert_eq!(other.snapshot().total.hits, 1);
    }
}
