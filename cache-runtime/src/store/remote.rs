//! Redis as the backend: reads through the batcher, the scripts, and what
//! Redis Cluster's slots change about them.

use super::scripts::{self, LockArgs, LockReply, StoreReply};
use super::{LockRequest, Read, StoreRequest};
use crate::batch::{self, Batcher};
use crate::codec;
use crate::connection::Connections;
use crate::error::Fault;
use crate::keys::{EntryKeys, KeyHash};
use crate::local::channel::Channel;
use ::redis::FromRedisValue;
use std::sync::Arc;
use std::time::Duration;

pub(crate) struct Redis {
    pub connections: Arc<Connections>,
    pub batcher: Arc<Batcher>,
    /// Where changes are announced to local tiers.
    pub channel: Channel,
    /// The nodes the invalidation channel may subscribe on, tried in turn:
    /// the server, or every cluster node; none behind Sentinel, where the
    /// local tier stays unused.
    pub channel_nodes: Arc<[redis::Client]>,
    pub connect_timeout: Duration,
}

impl Redis {
    /// One `MGET` of the entry and its namespace versions, batched with
    /// concurrent reads under load.
    pub(crate) async fn read(&self, keys: &EntryKeys<'_>) -> Result<Read, Fault> {
        // A half-moved cluster slot refuses multi-key reads: then key by
        // key. (Two steps, so the refused read is not kept in this future,
        // which every hit allocates.)
        let read = match self.batcher.mget(&self.connections, keys.entry(), keys.versions).await {
            Err(Fault::SlotMigrating(_)) => None,
            values => Some(values),
        };
        let mut values = match read {
            Some(values) => values?,
            None => Box::pin(batch::one_by_one(&self.connections, keys.entry(), keys.versions)).await?,
        };
        // Shifting one element of a short vector beats allocating another.
        let entry = values.remove(0);
        Ok(Read { entry, versions: values })
    }

    /// Runs the lock script; on a cluster, reads the tag versions first and
    /// pins them.
    pub(crate) async fn lock(
        &self,
        keys: &EntryKeys<'_>,
        head: &[u8],
        request: LockRequest<'_>,
    ) -> Result<LockReply, Fault> {
        let in_script = self.versions_in_script(keys);
        let pinned = match &keys.versions[in_script.len()..] {
            [] => Vec::new(),
            others => self.seed_versions(others).await?,
        };
        let invocation = LockArgs {
            entry: keys.entry(),
            lock: request.lock,
            version_keys: in_script,
            head,
            token: request.token,
            lock_ttl_ms: millis(request.ttl),
            min_fresh_ms: request.min_fresh_ms,
            pinned: &pinned,
        }
        .invocation();
        let reply = self.connections.run(|conn| conn.invoke::<Vec<Vec<u8>>>(&invocation)).await?;
        LockReply::parse(reply, keys.versions.len())
            .ok_or_else(|| Fault::Server("the lock script replied in an unexpected shape".to_owned()))
    }

    /// `SET lock NX PX` and an `MGET` of the entry and its versions, one
    /// pipeline: two plain commands instead of the lock script, for a
    /// caller that expects a miss. The read comes after the lock, so what
    /// it observes is what a computation under the lock is based on, as
    /// with the script. On a cluster, the script (tag versions live in
    /// other slots).
    pub(crate) async fn lock_and_read(
        &self,
        keys: &EntryKeys<'_>,
        head: &[u8],
        request: LockRequest<'_>,
    ) -> Result<(LockReply, bool), Fault> {
        if self.connections.is_cluster() {
            let reply = self.lock(keys, head, request).await?;
            let held = matches!(reply, LockReply::Lead { .. });
            return Ok((reply, held));
        }
        let set = take_lock(request.lock, request.token, millis(request.ttl));
        let mut mget =
            super::command("MGET", 1 + keys.versions.len(), keys.entry().len() + super::bytes_of(keys.versions));
        mget.arg(keys.entry()).arg(&keys.versions[..]);
        let mut pipe = ::redis::Pipeline::with_capacity(2);
        // A refused lock (memory full) must not fail the read: a current
        // entry is still a hit.
        pipe.ignore_errors().add_command(set).add_command(mget);
        let replies = self.connections.run(|conn| conn.pipeline(&pipe)).await?;
        let shape =
            |e: &dyn std::fmt::Display| Fault::Server(format!("the lock and read replied in an unexpected shape: {e}"));
        let [set, values] = <[::redis::Value; 2]>::try_from(replies).map_err(|_| shape(&"count"))?;
        if let ::redis::Value::ServerError(e) = &values {
            return Err(Fault::Server(format!("{e:?}")));
        }
        let mut values = Vec::<Option<Vec<u8>>>::from_redis_value(values).map_err(|e| shape(&e))?;
        if values.len() != 1 + keys.versions.len() {
            return Err(Fault::Server(format!(
                "MGET returned {} values for {} keys",
                values.len(),
                keys.versions.len() + 1
            )));
        }
        let locked = matches!(set, ::redis::Value::Okay);
        let entry = values.remove(0);
        let versions = match values.iter().cloned().collect::<Option<Vec<_>>>() {
            Some(versions) => Some(versions),
            None if locked => Some(self.seed_under_lock(keys.versions).await?),
            None => None,
        };
        let refused = match set {
            ::redis::Value::ServerError(e) => Some(Fault::Server(format!("{e:?}"))),
            _ => None,
        };
        refused_unless_hit(refused, locked_read(head, request.min_fresh_ms, locked, entry, &values, versions))
    }

    /// A namespace's first use, met with a lock taken: seeded under the
    /// lock, and observed as seeded. The lock is taken, so a breaker that
    /// refuses the seeding must not read as a request that never left
    /// (whose lock nobody would release).
    pub(super) async fn seed_under_lock(&self, version_keys: &[String]) -> Result<Vec<Vec<u8>>, Fault> {
        self.seed_versions(version_keys).await.map_err(|fault| match fault {
            Fault::BreakerOpen => {
                Fault::Connection("the breaker opened between taking the lock and seeding".to_owned())
            }
            fault => fault,
        })
    }

    /// The versions of `version_keys`, seeding those that have none: one
    /// script, or on a cluster one per key, since each lives in its own slot.
    pub(crate) async fn seed_versions(&self, version_keys: &[String]) -> Result<Vec<Vec<u8>>, Fault> {
        let per_script = if self.connections.is_cluster() { 1 } else { version_keys.len().max(1) };
        let mut seeded = Vec::with_capacity(version_keys.len());
        for group in version_keys.chunks(per_script) {
            let invocation = scripts::seed_versions(group);
            let versions = self.connections.run(|conn| conn.invoke::<Vec<Option<Vec<u8>>>>(&invocation)).await?;
            if versions.len() != group.len() {
                return Err(Fault::Server("seeding versions replied with the wrong count".to_owned()));
            }
            for version in versions {
                seeded.push(version.ok_or_else(|| Fault::Server("a seeded version is missing".to_owned()))?);
            }
        }
        Ok(seeded)
    }

    /// Stores one entry: the way a bulk call stores each of its items
    /// (`store_many`: the script, or a fill without it, then on a cluster
    /// the pinned versions' check).
    pub(crate) async fn store(&self, keys: &EntryKeys<'_>, request: StoreRequest<'_>) -> Result<StoreReply, Fault> {
        let mut replies = self.store_many(&[(keys, request)]).await?;
        replies.pop().unwrap_or_else(|| Err(Fault::Server("a store replied with nothing".to_owned())))
    }

    pub(super) async fn still_current(&self, keys: &[String], pinned: &[Vec<u8>]) -> Result<bool, Fault> {
        let mut mget = super::command("MGET", keys.len(), super::bytes_of(keys));
        mget.arg(keys);
        let current = self.connections.run(|conn| conn.query::<Vec<Option<Vec<u8>>>>(&mget)).await?;
        Ok(current.len() == pinned.len() && current.iter().zip(pinned).all(|(c, p)| c.as_ref() == Some(p)))
    }

    pub(crate) async fn release(&self, lock: &str, token: &str) -> Result<(), Fault> {
        let invocation = scripts::release(lock, token);
        self.connections.run(|conn| conn.invoke::<i64>(&invocation)).await.map(drop)
    }

    /// Replaces with `tombstone` an entry whose header is current but whose
    /// payload does not decode (corrupt, or written by a build that packs
    /// differently): left in place, a miss would not overwrite it, since it
    /// looks current. Only if it is still the one `read` (its digest):
    /// another process may have stored a good entry since.
    pub(crate) async fn discard(
        &self,
        keys: &EntryKeys<'_>,
        read: &str,
        tombstone: &[u8],
        ttl: Duration,
    ) -> Result<(), Fault> {
        let invocation = scripts::discard(keys.entry(), read, tombstone, millis(ttl));
        self.connections.run(|conn| conn.invoke::<i64>(&invocation)).await.map(drop)
    }

    /// Bumps a namespace's version; tries Redis even while the breaker is
    /// open, since a write path must learn whether it reached Redis.
    pub(crate) async fn invalidate(&self, version_key: &str, namespace: &str) -> Result<u64, Fault> {
        let invocation =
            scripts::invalidate(version_key, &self.channel.name, &self.channel.namespace_message(namespace));
        self.connections.run_unguarded(|conn| conn.invoke::<u64>(&invocation)).await
    }

    /// Replaces one entry with a tombstone that lives `ttl`; returns
    /// whether there was an entry.
    pub(crate) async fn forget(&self, entry: &str, hash: KeyHash, ttl: Duration) -> Result<bool, Fault> {
        let message = self.channel.entry_message(hash);
        let invocation = scripts::forget(entry, millis(ttl), &self.channel.name, &message);
        let deleted = self.connections.run_unguarded(|conn| conn.invoke::<u64>(&invocation)).await?;
        Ok(deleted > 0)
    }

    /// The version keys the scripts read themselves: all of them, or on a
    /// cluster only the prefix's, which shares the entry's slot. The others
    /// are pinned (see `scripts`).
    pub(super) fn versions_in_script<'k>(&self, keys: &'k EntryKeys<'_>) -> &'k [String] {
        let versions = &keys.versions[..];
        if self.connections.is_cluster() { &versions[..versions.len().min(1)] } else { versions }
    }
}

/// `SET lock token NX PX ttl_ms`: a stampede lock taken with a plain
/// command, pipelined with the read that follows it.
pub(super) fn take_lock(lock: &str, token: &str, ttl_ms: u64) -> ::redis::Cmd {
    let mut set = super::command("SET", 5, lock.len() + token.len() + 26);
    set.arg(lock).arg(token).arg("NX").arg("PX").arg(ttl_ms);
    set
}

/// A lock the server refused (memory full, a replica) fails the request,
/// unless its read found the entry current: then it is a hit, since reads
/// still work. Waiting for a lock nobody holds would only stall the call.
pub(super) fn refused_unless_hit(refused: Option<Fault>, read: (LockReply, bool)) -> Result<(LockReply, bool), Fault> {
    match (refused, read) {
        (_, hit @ (LockReply::Hit(_), _)) => Ok(hit),
        (Some(fault), _) => Err(fault),
        (None, read) => Ok(read),
    }
}

pub(super) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// What a lock taken with a read of the entry found: `locked`, whether
/// `SET NX` took it; `read`, the versions as read; `seeded`, the versions
/// to compute under when the lock is ours (read, or seeded where none).
/// A current entry is a `Hit` even when the lock was taken, which the
/// caller then releases.
pub(super) fn locked_read(
    head: &[u8],
    min_fresh_ms: u64,
    locked: bool,
    entry: Option<Vec<u8>>,
    read: &[Option<Vec<u8>>],
    seeded: Option<Vec<Vec<u8>>>,
) -> (LockReply, bool) {
    let current = entry.as_deref().is_some_and(|bytes| {
        bytes.starts_with(head)
            && codec::StoredEntry::parse(bytes).is_some_and(|stored| {
                stored.is_bound_to(read.iter().map(Option::as_deref)) && stored.times.fresh_until_ms > min_fresh_ms
            })
    });
    match (entry, seeded) {
        (Some(entry), _) if current => (LockReply::Hit(entry), locked),
        (entry, Some(versions)) if locked => {
            (LockReply::Lead { observed: scripts::digest(entry.as_deref()), versions }, true)
        }
        _ => (LockReply::Wait, false),
    }
}
