//! A call's look: the local tier, then one read of the entry and its
//! namespace versions, and what the entry turns out to be.

use super::{Call, Lookup, Seen, now_ms, tier};
use crate::codec::{self, StoredEntry};
use crate::compress;
use crate::observe::{Event, Outcome};
use crate::store::{Read, digest};
use std::borrow::Cow;
use std::sync::Arc;

/// An entry whose header is current but whose payload does not decode:
/// what it held (its digest), and the miss it makes once discarded.
struct Corrupt {
    digest: String,
    seen: Seen,
}

impl<R> Call<'_, R> {
    /// One read of the entry and its namespace versions.
    pub(super) async fn read(&self) -> Option<Read> {
        let read = self.cache.backend().read(self.keys).await;
        self.absorb(read)
    }

    pub(super) async fn lookup(&self) -> Lookup<R> {
        let stale = match self.look_locally() {
            Ok(hit) => return hit,
            Err(stale) => stale,
        };
        let Some(Read { entry, versions }) = self.read().await else { return Lookup::Unavailable };
        self.judge(entry, Cow::Owned(versions), stale).await
    }

    /// The local tier's answer: a hit, or else the stale copy it keeps
    /// for `stale_if_error`, if any.
    pub(super) fn look_locally(&self) -> Result<Lookup<R>, Option<Arc<Vec<u8>>>> {
        let Some(local) = &self.local else { return Err(None) };
        match local.find(self.plan, self.hash) {
            tier::Found::Fresh(entry, now) => match self.decode_payload(&entry.payload) {
                Some(output) => {
                    self.observer.outcome(Outcome::LocalHit);
                    Ok(Lookup::Hit { output, renew: tier::due(self.plan, entry.times, now) })
                }
                None => {
                    local.forget(self.hash);
                    Err(None)
                }
            },
            tier::Found::Stale(payload) => Err(Some(payload)),
            tier::Found::Nothing => Err(None),
        }
    }

    /// What the entry read turns out to be. `versions` may be shared by
    /// several entries' reads (a bulk call's): they are copied only for a
    /// miss. The entry's digest is computed only for a miss too, the only
    /// outcome that needs it.
    pub(super) async fn judge(
        &self,
        entry: Option<Vec<u8>>,
        versions: Cow<'_, [Option<Vec<u8>>]>,
        stale: Option<Arc<Vec<u8>>>,
    ) -> Lookup<R> {
        match self.verdict(entry, versions, stale) {
            Ok(lookup) => lookup,
            Err(Corrupt { digest: read, mut seen }) => {
                let tombstone = Box::pin(self.discard_corrupt(&read)).await;
                // Replaced now, unless another process stored since (then
                // a store expecting the tombstone is refused).
                seen.entry = digest(Some(&tombstone));
                Lookup::Miss(seen)
            }
        }
    }

    /// [`judge`](Self::judge) without the network: an entry that must be
    /// discarded comes back as `Corrupt`. Kept apart so that the future of
    /// every lookup, allocated on every hit, does not carry this one's
    /// locals.
    fn verdict(
        &self,
        entry: Option<Vec<u8>>,
        versions: Cow<'_, [Option<Vec<u8>>]>,
        mut stale: Option<Arc<Vec<u8>>>,
    ) -> Result<Lookup<R>, Corrupt> {
        // A miss counts toward the site's run of misses (`Site::looked`).
        let seen = |entry: Option<&[u8]>, stale| {
            self.observer.site.looked(true);
            Seen { versions: versions.to_vec(), entry: digest(entry), stale }
        };
        let Some(bytes) = entry.as_deref().filter(|bytes| !codec::is_tombstone(bytes)) else {
            return Ok(Lookup::Miss(seen(entry.as_deref(), stale)));
        };
        let Some(stored) = self.parse(bytes) else { return Ok(Lookup::Miss(seen(Some(bytes), stale))) };
        if !stored.is_bound_to(versions.iter().map(Option::as_deref)) {
            self.observer.event(Event::StaleVersion);
            return Ok(Lookup::Miss(seen(Some(bytes), stale)));
        }
        let now = now_ms();
        if !stored.times.is_fresh(now) {
            // A copy kept past its TTL for `stale_if_error`.
            if tier::within_stale_window(self.plan, stored.times, now)
                && let Some(payload) = self.unpack(&stored)
            {
                stale = Some(Arc::new(payload.into_owned()));
            }
            return Ok(Lookup::Miss(seen(Some(bytes), stale)));
        }
        match self.open(&stored) {
            Some((output, payload)) => {
                self.observer.outcome(Outcome::Hit);
                self.observer.site.looked(false);
                if self.local.is_some() {
                    self.keep_locally(&Arc::new(payload.into_owned()), stored.times, false);
                }
                Ok(Lookup::Hit { output, renew: tier::due(self.plan, stored.times, now) })
            }
            None => Err(Corrupt { digest: digest(Some(bytes)), seen: seen(Some(bytes), stale) }),
        }
    }

    /// Replaces with a tombstone an entry whose header is current but whose
    /// payload does not decode here (`read`: its digest): left in place, a
    /// miss would not overwrite it. Returns the tombstone, what the key
    /// holds now unless someone stored since.
    pub(super) async fn discard_corrupt(&self, read: &str) -> Vec<u8> {
        let tombstone = crate::store::tombstone();
        let ttl = self.cache.tombstone_ttl(self.plan);
        let discarded = self.cache.backend().discard(self.keys, read, &tombstone, ttl).await;
        self.absorb(discarded);
        tombstone
    }

    /// An entry's parts, if it is one of ours in this call's codec.
    pub(super) fn parse<'b>(&self, bytes: &'b [u8]) -> Option<StoredEntry<'b>> {
        let stored = StoredEntry::parse(bytes).filter(|e| e.is_codec(self.plan.codec));
        if stored.is_none() {
            self.observer.event(Event::Undecodable(&format_args!(
                "`{}` holds no {} entry of this cache; recomputing",
                self.keys.entry(),
                self.plan.codec.name()
            )));
        }
        stored
    }

    /// An entry's payload, decompressed and decoded; `None` after counting
    /// why not.
    pub(super) fn open<'b>(&self, stored: &StoredEntry<'b>) -> Option<(R, Cow<'b, [u8]>)> {
        let payload = self.unpack(stored)?;
        Some((self.decode_payload(&payload)?, payload))
    }

    /// An entry's payload as its codec wrote it: the one place a payload
    /// read from Redis is decompressed, never past `max_value_bytes`.
    /// `None` after counting a corrupt or oversized one.
    pub(super) fn unpack<'b>(&self, stored: &StoredEntry<'b>) -> Option<Cow<'b, [u8]>> {
        match compress::unpack(stored.payload, stored.packing, self.cache.max_value_bytes()) {
            Ok(payload) => Some(payload),
            Err(e) => {
                let why = format_args!("`{}` could not be decompressed ({e}); recomputing", self.keys.entry());
                self.observer.event(Event::Undecodable(&why));
                None
            }
        }
    }

    pub(super) fn decode_payload(&self, payload: &[u8]) -> Option<R> {
        match (self.storage.decode)(payload, self.plan.codec, self.cache.max_value_bytes()) {
            Ok(output) => {
                self.observer.event(Event::Read { bytes: payload.len() });
                Some(output)
            }
            Err(e) => {
                let why = format_args!("`{}` could not be decoded ({e}); recomputing", self.keys.entry());
                self.observer.event(Event::Undecodable(&why));
                None
            }
        }
    }
}
