//! Which entries a bulk call site read lately: its guess of which items of
//! the next read are missing, so that the read takes their locks with
//! plain `SET NX PX` (`store::claim`) instead of the `CLAIM` script, whose
//! Lua costs Redis about ten times an `MGET` of the same entries. An item
//! read lately was found current then, or stored since by whoever took its
//! lock; an item never read is the likely miss: a new id, a page not seen
//! before.
//!
//! Only a guess, so only ever a cost: a wrong one never changes what a
//! call returns or stores. An item guessed current that is not is locked
//! in one more round trip, as before; an item guessed missing that is
//! current had its lock taken for nothing, and released. A site whose
//! guess was wrong on balance (locks taken for current entries and misses
//! left unlocked outnumber the misses it locked: more distinct items than
//! it remembers, another process filling them, an invalidation) uses the
//! script for a while, longer after each wrong guess in a row. A lock the
//! server refused says nothing either way.

use crate::keys::KeyHash;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

/// How many items a site remembers: 8 bytes each, allocated on its
/// second bulk read. A page of 100 with 10 new ids needs its 90 regulars; a site
/// whose working set is far larger guesses badly and falls back.
const SLOTS: usize = 4096;
/// Slots per bucket: a key may sit in any slot of its bucket, so two
/// regulars whose keys share a bucket do not keep evicting each other.
const WAYS: usize = 4;
/// A fingerprint's marks: set in every one (0 is an empty slot), and set
/// once the item is read again (a regular, evicted last).
const PRESENT: u64 = 1;
const AGAIN: u64 = 2;
/// Claiming reads made with the script after a wrong guess, doubled for
/// each further wrong guess in a row.
const FIRST_DOUBT: u32 = 16;
const MAX_DOUBT: u32 = 1024;

/// A site's memory of the items it read lately; see the module docs.
#[derive(Debug, Default)]
pub(crate) struct Recent {
    /// Buckets of [`WAYS`] fingerprints. A key whose fingerprint is in its
    /// bucket was read lately. Collisions only make a guess wrong.
    slots: OnceLock<Box<[AtomicU64]>>,
    /// Claiming reads still to make with the script.
    doubt: AtomicU32,
    /// The doubt after the next wrong guess.
    next_doubt: AtomicU32,
    /// Whether the site has read once: see [`Recent::read`].
    read_before: AtomicBool,
}

impl Recent {
    /// Whether the site should guess for a read of `items`: it has read
    /// before, the read is not larger than what it can remember, and its
    /// last guesses were not wrong. Counts a read made without guessing.
    pub(crate) fn trusted(&self, items: usize) -> bool {
        if self.slots.get().is_none() || items > SLOTS / 2 {
            return false;
        }
        let doubt = self.doubt.load(Relaxed);
        if doubt == 0 {
            return true;
        }
        // Racing readers may both count one: it only shortens the doubt.
        self.doubt.store(doubt - 1, Relaxed);
        false
    }

    /// Whether `hash` was read lately.
    pub(crate) fn knows(&self, hash: KeyHash) -> bool {
        let Some(slots) = self.slots.get() else { return false };
        let (bucket, print) = place(slots, hash);
        bucket.iter().any(|slot| slot.load(Relaxed) & !AGAIN == print)
    }

    /// Remembers that `hashes` were read. A new item takes an empty slot
    /// of its bucket, or one whose item was not read again since it came
    /// (second chance): items read once, new ids, go before regulars.
    ///
    /// The table is made on the site's second read: a site made for one
    /// call (a `Policy` built per call) reads once, and allocates nothing.
    pub(crate) fn read(&self, hashes: impl IntoIterator<Item = KeyHash>) {
        if !self.read_before.load(Relaxed) {
            self.read_before.store(true, Relaxed);
            return;
        }
        let slots = self.slots.get_or_init(|| (0..SLOTS).map(|_| AtomicU64::new(0)).collect());
        // Races between readers lose an item at worst: a wrong guess.
        for hash in hashes {
            let (bucket, print) = place(slots, hash);
            if let Some(slot) = bucket.iter().find(|slot| slot.load(Relaxed) & !AGAIN == print) {
                // A load first: a regular's slot is not written again.
                if slot.load(Relaxed) & AGAIN == 0 {
                    slot.fetch_or(AGAIN, Relaxed);
                }
                continue;
            }
            let empty = bucket.iter().find(|slot| slot.load(Relaxed) == 0);
            let once = || bucket.iter().find(|slot| slot.load(Relaxed) & AGAIN == 0);
            let victim = empty.or_else(once).unwrap_or_else(|| {
                // Every slot a regular: all get a second chance, and the
                // one this fingerprint picks goes.
                bucket.iter().for_each(|slot| {
                    slot.fetch_and(!AGAIN, Relaxed);
                });
                &bucket[usize::from(print.to_le_bytes()[1]) % WAYS]
            });
            victim.store(print, Relaxed);
        }
    }

    /// Judges a guess by the items it got `wrong` (locked but current,
    /// missing but not locked) and `right` (locked and missing).
    pub(crate) fn guessed(&self, wrong: usize, right: usize) {
        if wrong <= right {
            if self.next_doubt.load(Relaxed) != 0 {
                self.next_doubt.store(0, Relaxed);
            }
            return;
        }
        let doubt = self.next_doubt.load(Relaxed).max(FIRST_DOUBT);
        self.doubt.store(doubt, Relaxed);
        self.next_doubt.store((doubt * 2).min(MAX_DOUBT), Relaxed);
    }
}

/// A key's bucket, and its fingerprint there (marked [`PRESENT`], never
/// [`AGAIN`]): two independent parts of its hash, itself uniform.
fn place(slots: &[AtomicU64], hash: KeyHash) -> (&[AtomicU64], u64) {
    let (print, slot) = hash.words();
    // Truncation intended: the bucket takes the low bits.
    #[allow(clippy::cast_possible_truncation)]
    let bucket = slot as usize % (slots.len() / WAYS);
    (&slots[bucket * WAYS..(bucket + 1) * WAYS], (print & !AGAIN) | PRESENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(n: u64) -> KeyHash {
        let mut hasher = crate::keys::KeyHasher::new("recent", 1);
        hasher.arg(&n).expect("a number encodes");
        hasher.finish()
    }

    #[test]
    fn a_site_guesses_from_its_second_read_on() {
        let recent = Recent::default();
        assert!(!recent.trusted(100), "nothing read yet: nothing to guess from");
        recent.read((0..100).map(hash));
        assert!(recent.slots.get().is_none(), "one read allocates nothing: the site may be a call's own");
        assert!(!recent.trusted(100) && !recent.knows(hash(1)));
        recent.read((0..100).map(hash));
        assert!(recent.trusted(100));
        assert!(!recent.trusted(SLOTS), "a read larger than the table is not guessed");
        assert!((0..100).all(|n| recent.knows(hash(n))));
        assert!((100..200).filter(|&n| recent.knows(hash(n))).count() < 2, "unread items are unknown");
    }

    #[test]
    fn regulars_outlast_items_read_once() {
        let recent = Recent::default();
        recent.read([]);
        let regulars: Vec<KeyHash> = (0..500).map(hash).collect();
        // Pages of the regulars and new ids: far more new ids than slots.
        for page in 0..100u64 {
            recent.read(regulars.iter().copied().chain((0..50).map(|n| hash(1_000_000 + page * 50 + n))));
        }
        let forgotten = regulars.iter().filter(|&&h| !recent.knows(h)).count();
        assert_eq!(forgotten, 0, "5,000 new ids evicted {forgotten} of 500 regulars");
    }

    #[test]
    fn wrong_guesses_send_reads_to_the_script_longer_each_time() {
        let recent = Recent::default();
        recent.read([hash(1)]);
        recent.read([hash(1)]);
        recent.guessed(10, 2);
        let doubted = (0..100).take_while(|_| !recent.trusted(1)).count();
        assert_eq!(doubted, FIRST_DOUBT as usize);
        recent.guessed(10, 2);
        let doubted = (0..100).take_while(|_| !recent.trusted(1)).count();
        assert_eq!(doubted, 2 * FIRST_DOUBT as usize, "a second wrong guess in a row doubts twice as long");
        recent.guessed(0, 10);
        recent.guessed(10, 2);
        let doubted = (0..100).take_while(|_| !recent.trusted(1)).count();
        assert_eq!(doubted, FIRST_DOUBT as usize, "a right guess ends the row");
    }
}
