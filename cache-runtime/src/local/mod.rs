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
//!
//! Epochs are kept for the namespaces call sites use, and for at most
//! [`MAX_IDLE_EPOCHS`] others: past that, those no site holds are
//! dropped. A namespace's epoch made anew starts above the last value of
//! any dropped one, so a sum an old entry remembers never comes back, and
//! an invalidation message for a namespace without an epoch is ignored:
//! nothing trusted depends on it.

mod bounds;
pub(crate) mod channel;

pub(crate) use bounds::Bounds;

use crate::codec::{Codec, EntryTimes};
use crate::keys::{CACHE_WIDE, KeyHash};
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
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
    /// Its stripe's forget count when it was stored: any forget of the
    /// stripe since hides it at once, before the forget's remove and the
    /// insert's own re-check settle which of them came last.
    forgets: u64,
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
    /// The count of the key's forget stripe then.
    forgets: u64,
}

/// Forgets are counted per stripe of keys, so that forgetting one entry
/// (or writing it through) drops the in-flight fills and hides the entries
/// of its stripe only: one key in 4096, not every one.
const FORGET_STRIPES: usize = 4096;

/// A call site's handles on its namespaces' epochs, resolved once.
#[derive(Debug)]
pub(crate) struct LocalSite {
    epochs: Box<[Arc<AtomicU64>]>,
    namespaces: u64,
}

/// Epochs kept although no call site holds them (namespaces invalidated
/// here or by other processes, sites gone) before they are dropped.
pub(crate) const MAX_IDLE_EPOCHS: usize = 4096;

#[derive(Default)]
struct Epochs {
    map: HashMap<String, Arc<AtomicU64>>,
    /// Where an epoch made from now on starts: above the last value of
    /// every epoch dropped so far.
    floor: u64,
    /// The map's size that triggers the next sweep.
    sweep_at: usize,
}

impl Epochs {
    /// Drops the epochs no site holds, raising the floor above them.
    fn sweep(&mut self) {
        let mut floor = self.floor;
        self.map.retain(|_, epoch| {
            // Handles are cloned only under the map's lock, which the caller
            // holds for writing: a count of 1 cannot grow meanwhile.
            let held = Arc::strong_count(epoch) > 1;
            if !held {
                floor = floor.max(epoch.load(Relaxed).saturating_add(1));
            }
            held
        });
        self.floor = floor;
        self.sweep_at = self.map.len().saturating_add(MAX_IDLE_EPOCHS);
        self.map.shrink_to(self.sweep_at);
    }
}

pub(crate) struct LocalTier {
    entries: moka::sync::Cache<KeyHash, Arc<LocalEntry>>,
    epochs: RwLock<Epochs>,
    /// Even: the invalidation channel is live (or not needed) and every
    /// invalidation since the generation began has been applied. Odd:
    /// nothing here is trusted.
    generation: AtomicU64,
    /// Bumped by every forgotten entry of the stripe: a fill that raced
    /// with one is dropped.
    forgets: Box<[AtomicU64]>,
    evictions: Arc<AtomicU64>,
    /// What the entries held weigh (`bounds::weight`): added on insert,
    /// taken off as moka removes them, whatever the cause.
    bytes: Arc<AtomicI64>,
    /// No Redis behind it: this tier is the whole cache, and keeps stale
    /// copies for `stale_if_error` itself.
    whole_cache: bool,
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
    /// A tier within `bounds` (at least one of them is set).
    /// `needs_channel`: it sits in front of Redis and trusts nothing until
    /// the channel is live.
    pub(crate) fn new(bounds: Bounds, needs_channel: bool) -> Self {
        let evictions = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicI64::new(0));
        let entries = bounds::entries(bounds, evictions.clone(), bytes.clone(), KeepFor);
        Self {
            entries,
            bytes,
            epochs: RwLock::new(Epochs { sweep_at: MAX_IDLE_EPOCHS, ..Epochs::default() }),
            generation: AtomicU64::new(u64::from(needs_channel)),
            forgets: (0..FORGET_STRIPES).map(|_| AtomicU64::new(0)).collect(),
            evictions,
            whole_cache: !needs_channel,
        }
    }

    /// Whether this tier is the whole cache (no Redis behind it).
    pub(crate) fn is_whole_cache(&self) -> bool {
        self.whole_cache
    }

    /// Entries dropped to stay within capacity.
    pub(crate) fn evictions(&self) -> u64 {
        self.evictions.load(Relaxed)
    }

    /// Entries held, and what they weigh (`bounds::weight`),
    /// after applying what moka had pending (it applies inserts and
    /// evictions in batches): for a snapshot, not for the hit path.
    pub(crate) fn size(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.entry_count(), u64::try_from(self.bytes.load(Relaxed)).unwrap_or(0))
    }

    /// The epoch of `namespace`, made if there is none.
    fn epoch(&self, namespace: &str) -> Arc<AtomicU64> {
        if let Some(epoch) = self.known_epoch(namespace) {
            return epoch;
        }
        match self.epochs.write() {
            Ok(mut epochs) => {
                if let Some(epoch) = epochs.map.get(namespace) {
                    return epoch.clone();
                }
                if epochs.map.len() >= epochs.sweep_at {
                    epochs.sweep();
                }
                let epoch = Arc::new(AtomicU64::new(epochs.floor));
                epochs.map.insert(namespace.to_owned(), epoch.clone());
                epoch
            }
            // Unreachable in practice (nothing panics under this lock); a
            // detached epoch only makes this site miss locally.
            Err(_) => Arc::new(AtomicU64::new(u64::MAX / 2)),
        }
    }

    /// The epoch of `namespace`, if it has one.
    fn known_epoch(&self, namespace: &str) -> Option<Arc<AtomicU64>> {
        self.epochs.read().ok()?.map.get(namespace).cloned()
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

    /// Taken before a read: what a fill from that read is checked against.
    pub(crate) fn capture(&self, site: &LocalSite, hash: &KeyHash) -> Capture {
        // Forgets first: a forget that lands between the two loads is then
        // seen as a change by `insert`, never missed.
        let forgets = self.forgets[stripe(hash)].load(SeqCst);
        Capture { mark: self.mark(site), forgets }
    }

    /// A trusted entry for `hash`, fresh or not.
    pub(crate) fn get(&self, hash: &KeyHash, site: &LocalSite) -> Option<Arc<LocalEntry>> {
        let mark = self.mark(site);
        if mark.generation % 2 == 1 {
            return None;
        }
        let forgets = self.forgets[stripe(hash)].load(SeqCst);
        self.entries.get(hash).filter(|entry| entry.mark == mark && entry.forgets == forgets)
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
    ) -> bool {
        let (payload, codec, times) = parts;
        let forgets = &self.forgets[stripe(&hash)];
        let unchanged = |tier: &Self| tier.mark(site) == capture.mark && forgets.load(SeqCst) == capture.forgets;
        if capture.mark.generation % 2 == 1 || keep_for.is_zero() || !unchanged(self) {
            return false;
        }
        let entry = LocalEntry { payload, codec, times, keep_for, mark: capture.mark, forgets: capture.forgets };
        // Before the insert: its removal (a replacement, an eviction) may
        // be applied at once, and the count must not go below zero.
        self.bytes.fetch_add(bounds::weight(&entry) as i64, Relaxed);
        self.entries.insert(hash, Arc::new(entry));
        // A forget applied between the check and the insert would not have
        // seen this entry.
        if forgets.load(SeqCst) != capture.forgets {
            self.entries.invalidate(&hash);
            return false;
        }
        true
    }

    /// Stores the entry a write put in Redis (or, memory-only, is the
    /// write), unless the key was forgotten or replaced since `capture`;
    /// and makes every fill of the key in flight stale, so that none that
    /// read the old value lands after it. The epochs are checked as for
    /// `insert`. Returns whether it was stored.
    pub(crate) fn replace(
        &self,
        hash: KeyHash,
        site: &LocalSite,
        capture: Capture,
        parts: (Arc<Vec<u8>>, Codec, EntryTimes),
        keep_for: Duration,
    ) -> bool {
        let forgets = &self.forgets[stripe(&hash)];
        if forgets.compare_exchange(capture.forgets, capture.forgets + 1, SeqCst, SeqCst).is_err() {
            return false;
        }
        self.insert(hash, site, Capture { forgets: capture.forgets + 1, ..capture }, parts, keep_for)
    }

    /// Drops one entry, in this process; returns whether there was one.
    pub(crate) fn forget(&self, hash: &KeyHash) -> bool {
        self.forgets[stripe(hash)].fetch_add(1, SeqCst);
        self.entries.remove(hash).is_some()
    }

    /// Makes every entry of `namespace` untrusted; returns the new epoch
    /// (increasing for each namespace: a memory-only cache's version).
    pub(crate) fn invalidate(&self, namespace: &str) -> u64 {
        let epoch = self.epoch(namespace).fetch_add(1, Relaxed).wrapping_add(1);
        self.drop_all_if_cleared(namespace);
        epoch
    }

    /// Another process invalidated `namespace`: only an epoch that exists
    /// can have entries depending on it, so none is made.
    pub(crate) fn invalidate_known(&self, namespace: &str) {
        if let Some(epoch) = self.known_epoch(namespace) {
            epoch.fetch_add(1, Relaxed);
        }
        self.drop_all_if_cleared(namespace);
    }

    /// After a clear (the cache-wide namespace's epoch moved, so nothing
    /// here is trusted any more), gives the memory back too. moka drops
    /// the entries lazily; no lock is held meanwhile.
    fn drop_all_if_cleared(&self, namespace: &str) {
        if namespace == CACHE_WIDE {
            self.entries.invalidate_all();
        }
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

    /// Epochs kept; for tests.
    #[cfg(test)]
    pub(crate) fn epoch_count(&self) -> usize {
        self.epochs.read().map_or(0, |epochs| epochs.map.len())
    }

    /// Removes what moka expired or replaced, so counts are exact; for tests.
    #[cfg(test)]
    fn entry_count(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.entry_count()
    }
}

fn stripe(hash: &KeyHash) -> usize {
    usize::from(u16::from_le_bytes(hash.first_bytes())) % FORGET_STRIPES
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u8) -> KeyHash {
        let mut hasher = crate::keys::KeyHasher::new("local-test", 1);
        hasher.part(&[n]);
        hasher.finish()
    }

    fn parts(value: u8) -> (Arc<Vec<u8>>, Codec, EntryTimes) {
        (Arc::new(vec![value]), Codec::Bincode, EntryTimes { stored_ms: 1, fresh_until_ms: u64::MAX })
    }

    const LONG: Duration = Duration::from_secs(60);

    #[test]
    fn an_invalidation_after_the_capture_keeps_the_fill_out() {
        let tier = LocalTier::new(Bounds::entries(100), false);
        let site = tier.site(["products", "catalog"].into_iter());
        let capture = tier.capture(&site, &hash(1));
        tier.insert(hash(1), &site, capture, parts(1), LONG);
        assert_eq!(tier.get(&hash(1), &site).map(|e| e.payload[0]), Some(1));

        let before = tier.capture(&site, &hash(2));
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
        let tier = LocalTier::new(Bounds::entries(100), false);
        let site = tier.site(["p"].into_iter());
        let capture = tier.capture(&site, &hash(1));
        tier.forget(&hash(1));
        tier.insert(hash(1), &site, capture, parts(1), LONG);
        assert!(tier.get(&hash(1), &site).is_none());
    }

    #[test]
    fn a_forget_drops_only_fills_of_its_own_stripe() {
        let tier = LocalTier::new(Bounds::entries(100), false);
        let site = tier.site(["p"].into_iter());
        let (forgotten, other) = (hash(1), (2..=255u8).map(hash).find(|h| stripe(h) != stripe(&hash(1))).unwrap());
        let capture = tier.capture(&site, &other);
        tier.forget(&forgotten);
        tier.insert(other, &site, capture, parts(2), LONG);
        assert!(tier.get(&other, &site).is_some(), "another key's fill survives the forget");
    }

    #[test]
    fn nothing_is_trusted_while_the_channel_is_down() {
        let tier = LocalTier::new(Bounds::entries(100), true);
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
        let tier = LocalTier::new(Bounds::entries(10), false);
        let site = tier.site(["p"].into_iter());
        for n in 0..50 {
            let capture = tier.capture(&site, &hash(n));
            tier.insert(hash(n), &site, capture, parts(n), LONG);
        }
        assert!(tier.entry_count() <= 10, "{}", tier.entry_count());
        assert!(tier.evictions() >= 40, "{}", tier.evictions());
    }

    #[test]
    fn entries_expire_after_their_keep_time() {
        let tier = LocalTier::new(Bounds::entries(10), false);
        let site = tier.site(["p"].into_iter());
        let capture = tier.capture(&site, &hash(1));
        tier.insert(hash(1), &site, capture, parts(1), Duration::from_millis(30));
        assert!(tier.get(&hash(1), &site).is_some());
        std::thread::sleep(Duration::from_millis(60));
        assert!(tier.get(&hash(1), &site).is_none());
    }

    #[test]
    fn epochs_stay_bounded_whatever_is_invalidated() {
        let tier = LocalTier::new(Bounds::entries(100), false);
        let held = tier.site(["products"].into_iter());
        for n in 0..3 * MAX_IDLE_EPOCHS {
            tier.invalidate_known(&format!("theirs-{n}"));
            tier.invalidate(&format!("ours-{n}"));
            drop(tier.site([format!("gone-{n}").as_str()].into_iter()));
        }
        assert!(tier.epoch_count() <= MAX_IDLE_EPOCHS + 1, "{} epochs", tier.epoch_count());
        let capture = tier.capture(&held, &hash(1));
        tier.insert(hash(1), &held, capture, parts(1), LONG);
        assert!(tier.get(&hash(1), &held).is_some(), "a held epoch survives the sweeps");
    }

    #[test]
    fn an_epoch_made_again_never_trusts_what_its_old_one_marked() {
        let tier = LocalTier::new(Bounds::entries(100), false);
        let site = tier.site(["a", "b"].into_iter());
        tier.invalidate("a");
        let capture = tier.capture(&site, &hash(1));
        tier.insert(hash(1), &site, capture, parts(1), LONG);
        drop(site);
        for n in 0..2 * MAX_IDLE_EPOCHS {
            tier.invalidate(&format!("filler-{n}"));
        }
        assert!(tier.known_epoch("a").is_none(), "swept");
        // Missed while nothing held it: ignored, and the entry is stale.
        tier.invalidate_known("a");
        let again = tier.site(["a", "b"].into_iter());
        assert!(tier.get(&hash(1), &again).is_none());
        // Counted up from 0 again, "a" would reach the sum the entry holds.
        tier.invalidate("a");
        assert!(tier.get(&hash(1), &again).is_none(), "an old mark came back");
        let versions: Vec<u64> = (0..3).map(|_| tier.invalidate("fresh")).collect();
        assert!(versions.windows(2).all(|w| w[1] == w[0] + 1), "{versions:?}");
    }
}
