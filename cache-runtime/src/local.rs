//! The in-process tier: a bounded moka cache of encoded entries, in front
//! of Redis or, for a memory-only cache, instead of it.
//!
//! Coherence is by epochs rather than by scanning: every namespace has a
//! local epoch, bumped by `invalidate` in this process and by invalidation
//! messages from others (`channel.rs`). An entry remembers the sum of its
//! namespaces' epochs when its read began (epochs only grow, so the sum
//! changes exactly when one of them does) and the channel generation; a
//! local hit needs both unchanged. A fill whose read raced with an
//! invalidation is therefore never served, and entries stored before the
//! channel dropped are never trusted again.

use crate::codec::{Codec, EntryTimes};
use crate::key::KeyHash;
use moka::notification::RemovalCause;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// One entry held in this process.
#[derive(Debug)]
pub(crate) struct LocalEntry {
    pub payload: Arc<Vec<u8>>,
    pub codec: Codec,
    pub times: EntryTimes,
    /// How long moka keeps it, from insertion.
    keep_for: Duration,
    mark: Mark,
}

/// What must be unchanged for an entry to be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    generation: u64,
    epochs: u64,
    /// Which namespaces `epochs` sums: two policies can share a key hash
    /// with different tags.
    namespaces: u64,
}

/// The state taken before a read, checked again when its result is stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Capture {
    pub mark: Mark,
    /// The key's stripe of `LocalTier::forgets`, and its count then.
    stripe: usize,
    forgets: u64,
}

/// Forgets are counted per stripe of keys: a forget drops the fills that
/// raced with it on keys of its stripe, not every fill in the process (a
/// memory-only cache, whose tier is the store, would otherwise lose every
/// entry computed while any other key was refreshed).
const FORGET_STRIPES: usize = 4096;

fn stripe(hash: &KeyHash) -> usize {
    let hex = hash.to_hex();
    let nibble = |c: u8| (c as char).to_digit(16).unwrap_or(0) as usize;
    (nibble(hex[0]) << 8 | nibble(hex[1]) << 4 | nibble(hex[2])) % FORGET_STRIPES
}

/// A call site's handles on its namespaces' epochs, resolved once.
#[derive(Debug)]
pub(crate) struct LocalSite {
    epochs: Box<[Arc<AtomicU64>]>,
    namespaces: u64,
}

pub(crate) struct LocalTier {
    entries: moka::sync::Cache<KeyHash, Arc<LocalEntry>>,
    epochs: RwLock<HashMap<String, Arc<AtomicU64>>>,
    /// Even: the invalidation channel is live (or not needed) and every
    /// invalidation since the generation began has been applied. Odd:
    /// nothing here is trusted.
    generation: AtomicU64,
    /// Bumped by every forgotten entry, per stripe of keys: a fill that
    /// raced with one of its stripe is dropped.
    forgets: Box<[AtomicU64]>,
    evictions: Arc<AtomicU64>,
}

impl std::fmt::Debug for LocalTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTier")
            .field("entries", &self.entries.entry_count())
            .field("generation", &self.generation.load(Relaxed))
            .finish_non_exhaustive()
    }
}

struct KeepFor;

impl moka::Expiry<KeyHash, Arc<LocalEntry>> for KeepFor {
    fn expire_after_create(&self, _: &KeyHash, entry: &Arc<LocalEntry>, _: Instant) -> Option<Duration> {
        Some(entry.keep_for)
    }

    fn expire_after_update(
        &self,
        _: &KeyHash,
        entry: &Arc<LocalEntry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.keep_for)
    }
}

impl LocalTier {
    /// A tier of at most `capacity` entries. `needs_channel`: it sits in
    /// front of Redis and trusts nothing until the channel is live.
    pub(crate) fn new(capacity: u64, needs_channel: bool) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let counter = evictions.clone();
        let entries = moka::sync::Cache::builder()
            .max_capacity(capacity)
            .expire_after(KeepFor)
            .eviction_listener(move |_, _, cause| {
                if cause == RemovalCause::Size {
                    counter.fetch_add(1, Relaxed);
                }
            })
            .build();
        Self {
            entries,
            epochs: RwLock::default(),
            generation: AtomicU64::new(u64::from(needs_channel)),
            forgets: (0..FORGET_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            evictions,
        }
    }

    /// Entries dropped to stay within capacity.
    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.load(Relaxed)
    }

    fn epoch(&self, namespace: &str) -> Arc<AtomicU64> {
        if let Ok(map) = self.epochs.read()
            && let Some(epoch) = map.get(namespace)
        {
            return epoch.clone();
        }
        match self.epochs.write() {
            Ok(mut map) => map.entry(namespace.to_owned()).or_default().clone(),
            // Unreachable in practice (nothing panics under this lock); a
            // detached epoch only makes this site miss locally.
            Err(_) => Arc::new(AtomicU64::new(u64::MAX / 2)),
        }
    }

    pub(crate) fn site<'n>(&self, namespaces: impl Iterator<Item = &'n str>) -> LocalSite {
        let mut digest = blake3::Hasher::new();
        let epochs = namespaces
            .map(|ns| {
                digest.update(&(ns.len() as u64).to_le_bytes()).update(ns.as_bytes());
                self.epoch(ns)
            })
            .collect();
        let mut namespaces = [0u8; 8];
        namespaces.copy_from_slice(&digest.finalize().as_bytes()[..8]);
        LocalSite { epochs, namespaces: u64::from_le_bytes(namespaces) }
    }

    fn mark(&self, site: &LocalSite) -> Mark {
        Mark {
            generation: self.generation.load(Relaxed),
            epochs: site.epochs.iter().map(|e| e.load(Relaxed)).fold(0, u64::wrapping_add),
            namespaces: site.namespaces,
        }
    }

    /// Taken before a read of `hash`: what a fill from that read is
    /// checked against.
    pub(crate) fn capture(&self, site: &LocalSite, hash: &KeyHash) -> Capture {
        // Forgets first: a forget that lands between the two loads is then
        // seen as a change by `insert`, never missed.
        let stripe = stripe(hash);
        let forgets = self.forgets[stripe].load(Relaxed);
        Capture { mark: self.mark(site), stripe, forgets }
    }

    /// A trusted entry for `hash`, fresh or not.
    pub(crate) fn get(&self, hash: &KeyHash, site: &LocalSite) -> Option<Arc<LocalEntry>> {
        let mark = self.mark(site);
        if mark.generation % 2 == 1 {
            return None;
        }
        self.entries.get(hash).filter(|entry| entry.mark == mark)
    }

    /// Stores an entry read or computed after `capture`, unless an
    /// invalidation, a forget or a channel drop happened since.
    pub(crate) fn insert(
        &self,
        hash: KeyHash,
        site: &LocalSite,
        capture: Capture,
        parts: (Arc<Vec<u8>>, Codec, EntryTimes),
        keep_for: Duration,
    ) {
        let (payload, codec, times) = parts;
        let forgets = &self.forgets[capture.stripe % FORGET_STRIPES];
        let unchanged = |tier: &Self| tier.mark(site) == capture.mark && forgets.load(Relaxed) == capture.forgets;
        if capture.mark.generation % 2 == 1 || keep_for.is_zero() || !unchanged(self) {
            return;
        }
        self.entries.insert(hash, Arc::new(LocalEntry { payload, codec, times, keep_for, mark: capture.mark }));
        // A forget applied between the check and the insert would not have
        // seen this entry.
        if forgets.load(Relaxed) != capture.forgets {
            self.entries.invalidate(&hash);
        }
    }

    /// Drops one entry, in this process; returns whether there was one.
    pub(crate) fn forget(&self, hash: &KeyHash) -> bool {
        self.forgets[stripe(hash)].fetch_add(1, Relaxed);
        self.entries.remove(hash).is_some()
    }

    /// Makes every entry of `namespace` untrusted; returns the new epoch.
    pub(crate) fn invalidate(&self, namespace: &str) -> u64 {
        self.epoch(namespace).fetch_add(1, Relaxed) + 1
    }

    /// The channel is live: entries stored from now on may be trusted.
    pub(crate) fn trust(&self) {
        let _ = self.generation.fetch_update(Relaxed, Relaxed, |g| (g % 2 == 1).then_some(g + 1));
    }

    /// The channel is down: trust nothing stored so far, nor anything
    /// stored until it is back.
    pub(crate) fn distrust(&self) {
        let _ = self.generation.fetch_update(Relaxed, Relaxed, |g| (g % 2 == 0).then_some(g + 1));
    }

    /// Removes what moka expired or replaced, so counts are exact; for tests.
    #[cfg(test)]
    fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> KeyHash {
        let mut hasher = crate::KeyHasher::new("local-test", 1);
        hasher.part(&[n]);
        hasher.finish()
    }

    fn parts(value: u8) -> (Arc<Vec<u8>>, Codec, EntryTimes) {
        (Arc::new(vec![value]), Codec::Bincode, EntryTimes { stored_ms: 1, fresh_until_ms: u64::MAX })
    }

    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn an_invalidation_after_the_capture_keeps_the_fill_out() {
        let tier = LocalTier::new(100, false);
        let site = tier.site(["products", "catalog"].into_iter());
        let capture = tier.capture(&site, &hash(1));
        tier.insert(hash(1), &site, capture, parts(1), LONG);
        assert_eq!(tier.get(&hash(1), &site).map(|e| e.payload[0]), Some(1));

        let before = tier.capture(&site, &hash(1));
        tier.invalidate("catalog");
        assert!(tier.get(&hash(1), &site).is_none(), "the tag's invalidation hides the entry");
        tier.insert(hash(2), &site, before, parts(2), LONG);
        assert!(tier.get(&hash(2), &site).is_none(), "a fill read before the invalidation is dropped");

        let other = tier.site(["orders"].into_iter());
        let capture = tier.capture(&other, &hash(3));
        tier.insert(hash(3), &other, capture, parts(3), LONG);
        tier.invalidate("products");
        assert!(tier.get(&hash(3), &other).is_some(), "other namespaces are untouched");
    }

    #[test]
    fn a_forget_racing_a_fill_wins() {
        let tier = LocalTier::new(100, false);
        let site = tier.site(["p"].into_iter());
        let capture = tier.capture(&site, &hash(1));
        tier.forget(&hash(1));
        tier.insert(hash(1), &site, capture, parts(1), LONG);
        assert!(tier.get(&hash(1), &site).is_none());
    }

    #[test]
    fn a_forget_leaves_fills_of_other_stripes_alone() {
        let tier = LocalTier::new(100, false);
        let site = tier.site(["p"].into_iter());
        let other = (2..=255).map(hash).find(|h| stripe(h) != stripe(&hash(1))).expect("another stripe");
        let capture = tier.capture(&site, &other);
        tier.forget(&hash(1));
        tier.insert(other, &site, capture, parts(2), LONG);
        assert!(tier.get(&other, &site).is_some(), "a refresh of one key does not drop another's fill");
    }

    #[test]
    fn nothing_is_trusted_while_the_channel_is_down() {
        let tier = LocalTier::new(100, true);
        let site = tier.site(["p"].into_iter());
        let capture = tier.capture(&site, &hash(1));
        tier.insert(hash(1), &site, capture, parts(1), LONG);
        assert!(tier.get(&hash(1), &site).is_none(), "not listening yet");

        tier.trust();
        let capture = tier.capture(&site, &hash(1));
        tier.insert(hash(1), &site, capture, parts(1), LONG);
        assert!(tier.get(&hash(1), &site).is_some());

        tier.distrust();
        assert!(tier.get(&hash(1), &site).is_none(), "the channel dropped");
        tier.trust();
        assert!(tier.get(&hash(1), &site).is_none(), "entries from before the drop stay untrusted");
    }

    #[test]
    fn capacity_is_enforced_and_evictions_counted() {
        let tier = LocalTier::new(10, false);
        let site = tier.site(["p"].into_iter());
        for n in 0..50 {
            let capture = tier.capture(&site, &hash(1));
            tier.insert(hash(n), &site, capture, parts(n), LONG);
        }
        assert!(tier.entry_count() <= 10, "{}", tier.entry_count());
        assert!(tier.evictions() >= 40, "{}", tier.evictions());
    }

    #[test]
    fn entries_expire_after_their_keep_time() {
        let tier = LocalTier::new(10, false);
        let site = tier.site(["p"].into_iter());
        let capture = tier.capture(&site, &hash(1));
        tier.insert(hash(1), &site, capture, parts(1), Duration::from_millis(30));
        assert!(tier.get(&hash(1), &site).is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(tier.get(&hash(1), &site).is_none());
    }
}
