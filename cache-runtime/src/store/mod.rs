//! Where entries live: the one seam between the call flow and Redis.
//!
//! A cache's [`Backend`] is Redis, or nothing but this process's memory.
//! The call flow asks it the same five questions either way (read, lock,
//! store, release, discard) and never asks which it is. A memory-only cache
//! answers from the local tier, which the flow consults before it asks the
//! backend: its read finds nothing more, its lock is always granted (the
//! flight in `flight.rs` is the whole of the coordination within one
//! process), and its store succeeds for the flow to keep the value locally.

mod claim;
mod fill;
mod many;
mod purge;
mod remote;
pub(crate) mod scripts;

pub(crate) use claim::ClaimRequest;
pub(crate) use many::ReadMany;
pub(crate) use remote::Redis;
pub(crate) use scripts::{Claim, LockReply, StoreReply, digest, tombstone};

use crate::error::Fault;
use crate::keys::{EntryKeys, KeyHash};
use std::time::Duration;

pub(crate) enum Backend {
    Redis(Redis),
    /// This process is the whole cache.
    Memory,
}

/// What a read found: the entry's bytes and the current versions of its
/// namespaces (`None`: a namespace has no version yet). Both empty for a
/// memory-only cache.
pub(crate) struct Read {
    pub entry: Option<Vec<u8>>,
    pub versions: Vec<Option<Vec<u8>>>,
}

/// The lock a caller asks for: a token only it knows, and for how long.
pub(crate) struct LockRequest<'a> {
    pub lock: &'a str,
    pub token: &'a str,
    pub ttl: Duration,
    /// An entry fresh past this time (Unix ms) answers as a hit instead.
    pub min_fresh_ms: u64,
}

/// What a store announces. Either way it replaces only the entry its
/// computation observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreMode {
    /// A miss fills the entry.
    Fill,
    /// A write-through or a renewal replaces a value other processes may
    /// hold in their local tiers: they drop their copy.
    Replace,
}

/// One entry to store.
pub(crate) struct StoreRequest<'a> {
    pub hash: KeyHash,
    pub head: &'a [u8],
    pub payload: &'a [u8],
    /// How long Redis keeps it: its fresh life plus any stale window.
    pub ttl_ms: u64,
    /// `<stored>,<fresh until>`.
    pub times: &'a str,
    pub now_ms: u64,
    pub mode: StoreMode,
    /// The entry's digest when it was observed ([`digest`]).
    pub observed_entry: &'a str,
    /// The lock and token held, released by the store.
    pub held: Option<(&'a str, &'a str)>,
    /// The versions the value was computed under.
    pub observed: &'a [Vec<u8>],
    /// Whether the reply must tell a value stored under the versions it
    /// was computed with from one whose namespace was invalidated since:
    /// someone keeps it locally or is handed it. When nobody does, a fill
    /// spares reading the versions back, and an entry bound to versions
    /// that changed, which no reader takes, answers `Stored`.
    pub verify: bool,
}

impl Backend {
    pub(crate) fn redis(&self) -> Option<&Redis> {
        match self {
            Backend::Redis(redis) => Some(redis),
            Backend::Memory => None,
        }
    }

    /// The entry and its namespaces' versions.
    pub(crate) async fn read(&self, keys: &EntryKeys<'_>) -> Result<Read, Fault> {
        match self {
            Backend::Redis(redis) => redis.read(keys).await,
            Backend::Memory => Ok(Read { entry: None, versions: Vec::new() }),
        }
    }

    /// Takes the stampede lock, unless a current entry is there now or
    /// someone else holds it.
    pub(crate) async fn lock(
        &self,
        keys: &EntryKeys<'_>,
        head: &[u8],
        request: LockRequest<'_>,
    ) -> Result<LockReply, Fault> {
        match self {
            Backend::Redis(redis) => redis.lock(keys, head, request).await,
            Backend::Memory => Ok(LockReply::Lead { observed: String::new(), versions: Vec::new() }),
        }
    }

    /// Takes the stampede lock and reads the entry in one round trip: for a
    /// caller that expects a miss. Also whether the lock is now ours: it is
    /// taken even when a current entry is there (a `Hit`), and then the
    /// caller releases it.
    pub(crate) async fn lock_and_read(
        &self,
        keys: &EntryKeys<'_>,
        head: &[u8],
        request: LockRequest<'_>,
    ) -> Result<(LockReply, bool), Fault> {
        match self {
            Backend::Redis(redis) => redis.lock_and_read(keys, head, request).await,
            Backend::Memory => Ok((LockReply::Lead { observed: String::new(), versions: Vec::new() }, false)),
        }
    }

    /// The observed versions, giving any namespace without one its first.
    pub(crate) async fn seed_missing(
        &self,
        keys: &EntryKeys<'_>,
        observed: Vec<Option<Vec<u8>>>,
    ) -> Result<Vec<Vec<u8>>, Fault> {
        if let Some(all) = observed.iter().cloned().collect::<Option<Vec<_>>>() {
            return Ok(all);
        }
        match self {
            Backend::Redis(redis) => redis.seed_versions(keys.versions).await,
            Backend::Memory => Ok(Vec::new()),
        }
    }

    /// Stores an entry bound to the versions it was computed under, and
    /// releases the lock held, if any.
    pub(crate) async fn store(&self, keys: &EntryKeys<'_>, request: StoreRequest<'_>) -> Result<StoreReply, Fault> {
        match self {
            Backend::Redis(redis) => redis.store(keys, request).await,
            Backend::Memory => Ok(StoreReply::Stored),
        }
    }

    /// A bulk call's read: every entry, then the versions they share.
    pub(crate) async fn read_many(&self, entries: &[&str], versions: &[String]) -> Result<ReadMany, Fault> {
        match self {
            Backend::Redis(redis) => redis.read_many(entries, versions).await,
            Backend::Memory => Ok(ReadMany { entries: vec![None; entries.len()], versions: Vec::new() }),
        }
    }

    /// A bulk call's locks, one per item, in one round trip, and whether
    /// each is held now (a `Hit` may hold it: its caller releases it).
    pub(crate) async fn lock_many(
        &self,
        items: &[(&EntryKeys<'_>, LockRequest<'_>)],
        head: &[u8],
    ) -> Result<Vec<Result<(LockReply, bool), Fault>>, Fault> {
        match self {
            Backend::Redis(redis) => redis.lock_many(items, head).await,
            Backend::Memory => Ok(items
                .iter()
                .map(|_| Ok((LockReply::Lead { observed: String::new(), versions: Vec::new() }, false)))
                .collect()),
        }
    }

    /// A bulk call's stores, one per item, in one round trip; each
    /// releases the lock its request holds.
    pub(crate) async fn store_many(
        &self,
        items: &[(&EntryKeys<'_>, StoreRequest<'_>)],
    ) -> Result<Vec<Result<StoreReply, Fault>>, Fault> {
        match self {
            Backend::Redis(redis) => redis.store_many(items).await,
            Backend::Memory => Ok(items.iter().map(|_| Ok(StoreReply::Stored)).collect()),
        }
    }

    /// Releases locks a bulk call holds, when no store did.
    pub(crate) async fn release_many(&self, held: &[(&str, &str)]) -> Result<(), Fault> {
        match self {
            Backend::Redis(redis) if !held.is_empty() => redis.release_many(held).await,
            _ => Ok(()),
        }
    }

    /// Releases a lock we hold, when no store did.
    pub(crate) async fn release(&self, lock: &str, token: &str) -> Result<(), Fault> {
        match self {
            Backend::Redis(redis) => redis.release(lock, token).await,
            Backend::Memory => Ok(()),
        }
    }

    /// Replaces an entry that cannot be decoded with `tombstone`, if it is
    /// still the one read; see [`Redis::discard`].
    pub(crate) async fn discard(
        &self,
        keys: &EntryKeys<'_>,
        read: &str,
        tombstone: &[u8],
        ttl: std::time::Duration,
    ) -> Result<(), Fault> {
        match self {
            Backend::Redis(redis) => redis.discard(keys, read, tombstone, ttl).await,
            Backend::Memory => Ok(()),
        }
    }

    /// Whether the entry and its versions are still what a caller observed:
    /// for values that were not stored (so no store checked them) and are
    /// to be handed to coalesced callers. Memory: this process sees every
    /// write itself (the cache's write fence).
    pub(crate) async fn unchanged(
        &self,
        keys: &EntryKeys<'_>,
        entry: &str,
        versions: &[Vec<u8>],
    ) -> Result<bool, Fault> {
        match self {
            Backend::Redis(redis) => {
                let read = redis.read(keys).await?;
                Ok(digest(read.entry.as_deref()) == entry
                    && read.versions.len() == versions.len()
                    && read.versions.iter().zip(versions).all(|(now, then)| now.as_deref() == Some(&then[..])))
            }
            Backend::Memory => Ok(true),
        }
    }

    /// Whether a successful store proves that the entry and its versions
    /// were still what the computation observed. A memory-only cache checks
    /// nothing at its store; its callers rely on the write fence.
    pub(crate) fn checks_stores(&self) -> bool {
        matches!(self, Backend::Redis(_))
    }

    /// The longest one operation may take.
    pub(crate) fn round_trip(&self) -> Duration {
        match self {
            Backend::Redis(redis) => redis.connections.longest_round_trip(),
            Backend::Memory => Duration::ZERO,
        }
    }
}

/// A command with room for `args` arguments of `bytes` bytes in all after
/// its name. redis-rs grows an empty command's buffers argument by
/// argument; on the miss path those reallocations were a tenth of the
/// client's time (`BENCH_ONLY=miss64 cargo bench --bench cache` under
/// `perf`).
pub(crate) fn command(name: &str, args: usize, bytes: usize) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(1 + args, name.len() + bytes);
    cmd.arg(name);
    cmd
}

/// The bytes of `keys`, for [`command`].
pub(crate) fn bytes_of<S: AsRef<str>>(keys: &[S]) -> usize {
    keys.iter().map(|key| key.as_ref().len()).sum()
}
