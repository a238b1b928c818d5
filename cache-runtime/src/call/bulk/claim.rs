//! A bulk call's read, and on one server the locks of what it misses in
//! the same round trip (`store::claim`): each item read is then a hit, a
//! miss whose lock this call took, a miss whose lock someone else holds,
//! or a miss to lock the usual way (`settle::lock_all`), when the script
//! found current what the call's own judgement does not, or the site's
//! guess did not ask for its lock.
//!
//! Which locks the read asks for: a site that remembers its recent items
//! (`recent.rs`) asks, with plain commands, for those of the items it has
//! not read lately; otherwise the `CLAIM` script judges every entry and
//! locks those it misses.
//!
//! A lock taken for an item that turns out not to need it (the call finds
//! the entry current after all, or another caller in this process is
//! computing the item) is released before the body runs. A call dropped
//! while the script runs releases every lock it asked for (`ClaimGuard`).

use super::super::lock::{ClaimGuard, LockGuard};
use super::super::{Call, Lookup, Observed, Seen};
use super::{Bulk, Led, Want};
use crate::error::Fault;
use crate::flight::{Progress, Role};
use crate::keys::EntryKeys;
use crate::observe::Event;
use crate::store::{Claim, ClaimRequest, ReadMany, Redis};
use std::borrow::Cow;
use tokio::sync::watch::Receiver;

/// What a claiming read returns: the read, each item's claim and guard,
/// and whether the site guessed.
type ClaimingRead = (ReadMany, Vec<(Claim, Option<LockGuard>)>, bool);

/// What one round's read made of each item it read.
#[derive(Default)]
pub(super) struct Judged {
    /// Misses, still to be locked (or not, with `lock = false`).
    pub missed: Vec<(usize, Seen)>,
    /// Misses whose lock the read took.
    pub claimed: Vec<(usize, LockGuard, Observed)>,
    /// Misses whose lock someone else holds.
    pub held: Vec<usize>,
    /// To look at again next round.
    pub retry: Vec<usize>,
    /// Locks taken for items that do not need them.
    pub spare: Vec<LockGuard>,
}

impl<'c, K, V> Bulk<'c, K, V> {
    /// Reads the items at `unread` (indices into `calls`), taking the locks
    /// of their misses too when `claim`, and judges each entry as a single
    /// call would; hits are recorded in `wants`.
    pub(super) async fn read_and_judge(
        &self,
        calls: &[Call<'_, Option<V>>],
        keys: &[EntryKeys<'_>],
        keyed: &[usize],
        wants: &mut [Want<K, V>],
        unread: &[usize],
        claim: bool,
    ) -> Result<Judged, Fault> {
        let mut judged = Judged::default();
        if unread.is_empty() {
            return Ok(judged);
        }
        let entries: Vec<&str> = unread.iter().map(|&c| keys[c].entry()).collect();
        let version_keys = &self.observer.site.version_keys;
        let recent = self.observer.site.recent.as_ref();
        let redis = self.cache.backend().redis().filter(|redis| claim && redis.can_claim());
        let (read, mut guards, guessed) = match redis {
            Some(redis) => self.claiming_read(redis, keys, unread, &entries).await?,
            None => (self.cache.backend().read_many(&entries, version_keys).await?, Vec::new(), false),
        };
        drop(entries);
        let ReadMany { entries, versions } = read;
        let mut missed_any = false;
        // How the guess did: locks it took for entries found current, misses
        // it did not lock, and misses it locked.
        let (mut wasted, mut unlocked, mut needed) = (0, 0, 0);
        for (n, (&c, entry)) in unread.iter().zip(entries).enumerate() {
            let (claim, guard) =
                guards.get_mut(n).map_or((Claim::Unasked, None), |(claim, guard)| (*claim, guard.take()));
            let maybe_ours = matches!(claim, Claim::Held | Claim::Refused);
            let (guard, maybe_ours) = if maybe_ours { (None, guard) } else { (guard, None) };
            judged.spare.extend(maybe_ours);
            match calls[c].judge(entry, Cow::Borrowed(&versions), None).await {
                Lookup::Hit { output, .. } => {
                    self.hit(&mut wants[keyed[c]], output);
                    wasted += usize::from(guard.is_some());
                    judged.spare.extend(guard);
                }
                Lookup::Miss(seen) => {
                    missed_any = true;
                    // A refused lock says nothing of the guess.
                    match claim {
                        Claim::Unasked => unlocked += 1,
                        Claim::Refused => {}
                        _ => needed += 1,
                    }
                    match (guard, claim) {
                        (Some(guard), _) => match seen.versions.iter().cloned().collect::<Option<Vec<_>>>() {
                            Some(versions) => {
                                judged.claimed.push((c, guard, Observed { versions, entry: seen.entry }));
                            }
                            // Both ways seed the versions they lock under;
                            // should one be missing all the same, the lock
                            // goes before the item is looked at again.
                            None => {
                                judged.spare.push(guard);
                                judged.retry.push(c);
                            }
                        },
                        (None, Claim::Held) => judged.held.push(c),
                        (None, _) => judged.missed.push((c, seen)),
                    }
                }
                // Not an outcome of a read; looked at again if it were.
                Lookup::Unavailable => {
                    judged.retry.push(c);
                    judged.spare.extend(guard);
                }
            }
        }
        self.observer.site.read_many(missed_any);
        if let Some(recent) = recent {
            if guessed {
                recent.guessed(wasted + unlocked, needed);
            }
            recent.read(unread.iter().map(|&c| keys[c].hash()));
        }
        Ok(judged)
    }

    /// The read of `entries` (those of the items at `unread`) that also
    /// takes locks: of the items the site guesses missing, with plain
    /// commands, or by script of every item it finds missing. Returns the
    /// read, each item's claim and guard, and whether the site guessed.
    async fn claiming_read(
        &self,
        redis: &Redis,
        keys: &[EntryKeys<'_>],
        unread: &[usize],
        entries: &[&str],
    ) -> Result<ClaimingRead, Fault> {
        let version_keys = &self.observer.site.version_keys;
        // The items guessed missing (indices into `unread`); without a
        // guess, every item is asked for, by script.
        let guesses = self
            .observer
            .site
            .recent
            .as_ref()
            .filter(|recent| recent.trusted(unread.len()))
            .map(|recent| (0..unread.len()).filter(|&n| !recent.knows(keys[unread[n]].hash())).collect::<Vec<_>>());
        let guessed = guesses.is_some();
        let asked = guesses.unwrap_or_else(|| (0..unread.len()).collect());
        let locks = asked.iter().map(|&n| keys[unread[n]].lock()).collect();
        // Armed before asking: see `ClaimGuard`.
        let guard = ClaimGuard::new(self.cache, locks);
        let request = ClaimRequest {
            locks: &guard.locks,
            token: &guard.token,
            ttl: self.plan.lock_timeout.unwrap_or(self.cache.lock_timeout()),
        };
        // Dropped armed on a fault: the locks may have been taken.
        let claimed = if guessed {
            redis.claim_asked(entries, version_keys, &asked, request).await?
        } else {
            redis.claim_many(entries, version_keys, &self.plan.codec.lock_head(), request).await?
        };
        if let Some(fault) = &claimed.refused {
            self.observer.event(Event::Fault(fault));
        }
        let claims = claimed.claims;
        let mut guards: Vec<(Claim, Option<LockGuard>)> = claims.iter().map(|&claim| (claim, None)).collect();
        // Without the script a held lock may be this request's own (its
        // reply lost), and so may a refused one: they get a guard too, which
        // frees the lock only if it is.
        let guarded = |claim| match claim {
            Claim::Taken | Claim::Refused => true,
            Claim::Held => guessed,
            Claim::Current | Claim::Unasked => false,
        };
        for (&n, guard) in asked.iter().zip(guard.split(|i| guarded(claims[asked[i]]))) {
            guards[n].1 = guard;
        }
        Ok((claimed.read, guards, guessed))
    }

    /// The items whose lock the read took, each now led by this call, or
    /// followed when another caller in this process computes it (its lock
    /// then goes back, for that caller to take).
    pub(super) fn lead_claimed(
        &self,
        keys: &[EntryKeys<'_>],
        judged: &mut Judged,
        led: &mut Vec<Led<'c>>,
        waiting: &mut Vec<(usize, Receiver<Progress>)>,
        retry: &mut Vec<usize>,
    ) {
        for (c, guard, observed) in judged.claimed.drain(..) {
            match self.cache.flights().join(keys[c].entry()) {
                Role::Leader(leader) => {
                    led.push(Led { want: c, leader: Some(leader), guard: Some(guard), observed: Some(observed) });
                }
                Role::Waiter(waiter) => {
                    judged.spare.push(guard);
                    waiting.push((c, waiter));
                }
            }
        }
        for c in judged.held.drain(..) {
            match self.cache.flights().join(keys[c].entry()) {
                Role::Leader(_leader) => {
                    // Dropping the leader lets this process's waiters look
                    // again too; the next round reads what the holder stored.
                    self.observer.event(Event::LockWait);
                    retry.push(c);
                }
                Role::Waiter(waiter) => waiting.push((c, waiter)),
            }
        }
    }

    /// Releases locks that no store will, in one round trip.
    pub(super) async fn release_guards(&self, mut guards: Vec<LockGuard>) {
        if guards.is_empty() {
            return;
        }
        let held: Vec<(&str, &str)> = guards.iter().map(|g| (g.lock.as_str(), g.token.as_str())).collect();
        let released = self.cache.backend().release_many(&held).await;
        drop(held);
        match released {
            Ok(()) => guards.iter_mut().for_each(LockGuard::disarm),
            // Dropped armed, the guards try again from a task.
            Err(fault) => self.observer.event(Event::Fault(&fault)),
        }
    }
}
