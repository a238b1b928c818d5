//! How big the local tier may grow: in entries, in bytes, or both, and
//! what an entry weighs.

use super::LocalEntry;
use crate::keys::KeyHash;
use moka::notification::RemovalCause;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// What an entry costs besides its payload: the entry itself, its key,
/// the `Arc`s' counts and moka's node for it (about 100 bytes, from
/// moka's source). A budget in bytes counts this too, so a tier of tiny
/// values cannot hold millions of entries within a small budget.
pub(crate) const ENTRY_OVERHEAD: usize = std::mem::size_of::<LocalEntry>() + std::mem::size_of::<KeyHash>() + 32 + 100;

/// What an entry weighs: its encoded payload and the overhead.
pub(super) fn weight(entry: &LocalEntry) -> u64 {
    (entry.payload.len() + ENTRY_OVERHEAD) as u64
}

/// How the tier is bounded: in entries, in bytes, or both (the builder
/// sets at least one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Bounds {
    pub entries: Option<u64>,
    pub bytes: Option<u64>,
}

impl Bounds {
    /// At most `capacity` entries; for tests.
    #[cfg(test)]
    pub(crate) fn entries(capacity: u64) -> Self {
        Bounds { entries: Some(capacity), bytes: None }
    }
}

/// The moka cache of a tier within `bounds`, expiring entries by `expiry`;
/// it counts the entries evicted for room in `evictions`, and takes every
/// removed entry's weight off `bytes` (the tier adds it on insert).
pub(super) fn entries(
    bounds: Bounds,
    evictions: Arc<AtomicU64>,
    bytes: Arc<AtomicI64>,
    expiry: impl moka::Expiry<KeyHash, Arc<LocalEntry>> + Send + Sync + 'static,
) -> moka::sync::Cache<KeyHash, Arc<LocalEntry>> {
    let builder =
        moka::sync::Cache::builder().expire_after(expiry).eviction_listener(move |_, entry: Arc<LocalEntry>, cause| {
            bytes.fetch_sub(weight(&entry) as i64, Relaxed);
            if cause == RemovalCause::Size {
                evictions.fetch_add(1, Relaxed);
            }
        });
    match bounds {
        Bounds { entries: Some(capacity), bytes: None } => builder.max_capacity(capacity).build(),
        // With both bounds, an entry weighs at least its share of the
        // budget, `bytes / entries`: weights within the budget then mean
        // at most `entries` entries and at most `bytes` bytes. moka has
        // one capacity; this keeps both. (The builder refuses a share
        // over `u32::MAX`, moka's largest weight.)
        Bounds { entries, bytes: budget } => {
            let budget = budget.unwrap_or(u64::MAX);
            let least = entries.map_or(0, |entries| budget.div_ceil(entries.max(1)));
            builder
                .max_capacity(budget)
                .weigher(move |_, entry: &Arc<LocalEntry>| u32::try_from(weight(entry).max(least)).unwrap_or(u32::MAX))
                .build()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Codec, EntryTimes};
    use crate::keys::CACHE_WIDE;
    use crate::local::LocalTier;
    use std::time::Duration;

    const LONG: Duration = Duration::from_secs(60);

    fn sized(len: usize) -> (Arc<Vec<u8>>, Codec, EntryTimes) {
        (Arc::new(vec![7; len]), Codec::Bincode, EntryTimes { stored_ms: 1, fresh_until_ms: u64::MAX })
    }

    fn fill(tier: &LocalTier, sizes: impl Iterator<Item = usize>) {
        let site = tier.site(["p"].into_iter());
        let mut hasher = crate::keys::KeyHasher::new("bytes", 1);
        for (n, len) in sizes.enumerate() {
            let hash = hasher.part(&n.to_le_bytes()).finish();
            let capture = tier.capture(&site, &hash);
            tier.insert(hash, &site, capture, sized(len), LONG);
        }
    }

    #[test]
    fn a_byte_budget_holds_whatever_the_sizes() {
        let budget = 64 << 10;
        let tier = LocalTier::new(Bounds { entries: None, bytes: Some(budget) }, false);
        // 1 byte to 16 KiB, and one larger than the whole budget.
        fill(&tier, (0..2000).map(|n| (n * 7919) % (16 << 10) + 1).chain([budget as usize * 2]));
        let (entries, bytes) = tier.size();
        assert!(bytes <= budget, "{bytes} bytes in {entries} entries over a budget of {budget}");
        assert!(bytes > budget / 2, "the budget is used: {bytes}");
        assert!(tier.evictions() > 1000, "{}", tier.evictions());
        tier.invalidate(CACHE_WIDE);
        assert_eq!(tier.size(), (0, 0), "a clear gives everything back, bytes counted down to zero");
    }

    #[test]
    fn with_both_bounds_both_hold() {
        let (capacity, budget) = (10, 100 << 10);
        let tier = LocalTier::new(Bounds { entries: Some(capacity), bytes: Some(budget) }, false);
        fill(&tier, std::iter::repeat_n(10, 100));
        assert!(tier.size().0 <= capacity, "small entries: the count binds, {:?}", tier.size());
        fill(&tier, std::iter::repeat_n(40 << 10, 100));
        let (entries, bytes) = tier.size();
        assert!(bytes <= budget && entries <= 2, "large entries: the bytes bind, {entries} entries {bytes} bytes");
        let counted = LocalTier::new(Bounds::entries(1000), false);
        fill(&counted, [100, 200].into_iter());
        assert_eq!(counted.size(), (2, 300 + 2 * ENTRY_OVERHEAD as u64), "bytes are counted without a budget too");
    }
}
