//! Redis for a bulk call (many items, one entry each): one `MGET` of every
//! entry and the shared version keys, the stampede locks of the missing
//! items in one pipeline (on one server `SET NX PX` each and an `MGET` of
//! their entries, or taken with the read, `claim.rs`; on a cluster `LOCK`
//! scripts), and their stores as one pipeline
//! (`fill.rs`: fills as `SET NX`, the rest as `STORE` scripts). Each lock
//! and store is the one a single call sends, so it keeps its checks
//! (docs/CONSISTENCY.md); only the round trips are shared. An entry and its lock share their prefix's hash
//! tag, so on a cluster a pipeline goes to one slot.

use super::Redis;
use super::scripts::{self, LockArgs, LockReply, StoreReply};
use super::{LockRequest, StoreRequest};
use crate::error::Fault;
use crate::keys::EntryKeys;
use redis::{FromRedisValue, Value};

/// What one `MGET` of a bulk call found: each entry's bytes, in the order
/// asked, and the versions of the namespaces they share.
pub(crate) struct ReadMany {
    pub entries: Vec<Option<Vec<u8>>>,
    pub versions: Vec<Option<Vec<u8>>>,
}

impl Redis {
    /// One `MGET` of `entries` and then `versions`.
    pub(crate) async fn read_many(&self, entries: &[&str], versions: &[String]) -> Result<ReadMany, Fault> {
        let mut mget = super::command(
            "MGET",
            entries.len() + versions.len(),
            super::bytes_of(entries) + super::bytes_of(versions),
        );
        mget.arg(entries).arg(versions);
        let mut values = self.connections.run(|conn| conn.query::<Vec<Option<Vec<u8>>>>(&mget)).await?;
        if values.len() != entries.len() + versions.len() {
            return Err(Fault::Server("MGET replied with the wrong count".to_owned()));
        }
        let versions = values.split_off(entries.len());
        Ok(ReadMany { entries: values, versions })
    }

    /// The lock of each item, in one round trip, and whether each is ours
    /// now (a `Hit` may have taken it, and its caller releases it). On one
    /// server, `SET NX PX` per lock then one `MGET` of the entries and
    /// their versions, as a single call's lock taken with its read: plain
    /// commands cost Redis a fraction of a script each. On a cluster, whose
    /// tag versions live in other slots, one `LOCK` script each, the tag
    /// versions read (and pinned) once for all.
    pub(crate) async fn lock_many(
        &self,
        items: &[(&EntryKeys<'_>, LockRequest<'_>)],
        head: &[u8],
    ) -> Result<Vec<Result<(LockReply, bool), Fault>>, Fault> {
        if self.connections.is_cluster() {
            let replies = self.lock_many_by_script(items, head).await?;
            let held = |reply: LockReply| {
                let held = matches!(reply, LockReply::Lead { .. });
                (reply, held)
            };
            return Ok(replies.into_iter().map(|reply| reply.map(held)).collect());
        }
        let Some((first, _)) = items.first() else { return Ok(Vec::new()) };
        let version_keys = &first.versions[..];
        let mut commands = Vec::with_capacity(items.len() + 1);
        for (_, request) in items {
            commands.push(super::remote::take_lock(request.lock, request.token, super::remote::millis(request.ttl)));
        }
        let entries: Vec<&str> = items.iter().map(|(keys, _)| keys.entry()).collect();
        let mut mget = super::command(
            "MGET",
            entries.len() + version_keys.len(),
            super::bytes_of(&entries) + super::bytes_of(version_keys),
        );
        mget.arg(&entries).arg(version_keys);
        commands.push(mget);
        let mut replies = self.pipelined(commands).await?;
        let values = match replies.pop() {
            Some(Ok(values)) => Vec::<Option<Vec<u8>>>::from_redis_value(values)
                .map_err(|e| Fault::Server(format!("the locks' MGET replied in an unexpected shape: {e}")))?,
            Some(Err(fault)) => return Err(fault),
            None => return Err(Fault::Server("a pipeline replied with the wrong count".to_owned())),
        };
        if values.len() != entries.len() + version_keys.len() {
            return Err(Fault::Server("MGET replied with the wrong count".to_owned()));
        }
        let (entries, read) = values.split_at(items.len());
        let seeded = match read.iter().cloned().collect::<Option<Vec<_>>>() {
            Some(versions) => Some(versions),
            None if replies.iter().any(|set| matches!(set, Ok(Value::Okay))) => {
                Some(self.seed_under_lock(version_keys).await?)
            }
            None => None,
        };
        Ok(replies
            .into_iter()
            .zip(entries.iter().cloned())
            .zip(items)
            .map(|((set, entry), (_, request))| {
                let locked = matches!(set, Ok(Value::Okay));
                let read = super::remote::locked_read(head, request.min_fresh_ms, locked, entry, read, seeded.clone());
                super::remote::refused_unless_hit(set.err(), read)
            })
            .collect())
    }

    /// [`lock_many`](Self::lock_many) on a cluster: one `LOCK` script per
    /// item, in one pipeline.
    async fn lock_many_by_script(
        &self,
        items: &[(&EntryKeys<'_>, LockRequest<'_>)],
        head: &[u8],
    ) -> Result<Vec<Result<LockReply, Fault>>, Fault> {
        let Some((first, _)) = items.first() else { return Ok(Vec::new()) };
        let in_script = self.versions_in_script(first).len();
        let pinned = match &first.versions[in_script..] {
            [] => Vec::new(),
            others => self.seed_versions(others).await?,
        };
        let commands = items.iter().map(|(keys, request)| {
            LockArgs {
                entry: keys.entry(),
                lock: request.lock,
                version_keys: &keys.versions[..in_script],
                head,
                token: request.token,
                lock_ttl_ms: super::remote::millis(request.ttl),
                min_fresh_ms: request.min_fresh_ms,
                pinned: &pinned,
            }
            .command()
        });
        let replies = self.pipelined(commands.collect()).await?;
        let versions = first.versions.len();
        Ok(replies
            .into_iter()
            .map(|reply| {
                let reply = reply?;
                let parsed = redis::FromRedisValue::from_redis_value(reply).ok();
                parsed
                    .and_then(|reply| LockReply::parse(reply, versions))
                    .ok_or_else(|| Fault::Server("the lock script replied in an unexpected shape".to_owned()))
            })
            .collect())
    }

    /// Stores each item's entry, in one pipeline: a fill as `SET NX` (all
    /// of them checked against one `MGET` of the shared versions), any
    /// other with its own `STORE` script (`fill.rs`); on a cluster, then
    /// checks the pinned tag versions once.
    pub(crate) async fn store_many(
        &self,
        items: &[(&EntryKeys<'_>, StoreRequest<'_>)],
    ) -> Result<Vec<Result<StoreReply, Fault>>, Fault> {
        let Some(first) = items.first() else { return Ok(Vec::new()) };
        let in_script = self.versions_in_script(first.0).len();
        let mut replies = self.store_pipelined(items).await?;
        let pinned_keys = &first.0.versions[in_script..];
        if !pinned_keys.is_empty() && replies.iter().any(|r| matches!(r, Ok(StoreReply::Stored))) {
            // Every item of a call pins the tag versions it read once.
            let pinned = first.1.observed.get(in_script..).unwrap_or_default();
            let current = self.still_current(pinned_keys, pinned).await?;
            for (reply, (_, request)) in replies.iter_mut().zip(items) {
                let same = request.observed.get(in_script..).unwrap_or_default() == pinned;
                if matches!(reply, Ok(StoreReply::Stored)) && !(current && same) {
                    *reply = Ok(StoreReply::VersionChanged);
                }
            }
        }
        Ok(replies)
    }

    /// Releases the locks a failed bulk call holds, in one round trip.
    pub(crate) async fn release_many(&self, held: &[(&str, &str)]) -> Result<(), Fault> {
        let mut replies = self.pipelined(vec![scripts::release_command(held)]).await?;
        replies.pop().unwrap_or_else(|| Err(Fault::Server("a release replied with nothing".to_owned()))).map(drop)
    }

    /// Sends `commands` as one pipeline. A server that lost the scripts
    /// (restarted, flushed) answers `NOSCRIPT` to each: those are sent
    /// again after loading the scripts, in one more round trip. The
    /// commands it answered otherwise ran, and are not sent again.
    pub(super) async fn pipelined(&self, commands: Vec<redis::Cmd>) -> Result<Vec<Result<Value, Fault>>, Fault> {
        let count = commands.len();
        let mut pipeline = redis::Pipeline::with_capacity(count);
        pipeline.ignore_errors();
        // Moved, not cloned: a store's command carries its payload.
        for command in commands {
            pipeline.add_command(command);
        }
        let mut replies = self.pipeline(&pipeline, count).await?;
        let missing: Vec<usize> = (0..replies.len()).filter(|&i| no_script(&replies[i])).collect();
        if !missing.is_empty() {
            let mut again = redis::pipe();
            again.ignore_errors();
            let loads = scripts::load_pipelined();
            for load in &loads {
                again.add_command(load.clone());
            }
            let sent: Vec<&redis::Cmd> = pipeline.cmd_iter().collect();
            for &i in &missing {
                again.add_command(sent[i].clone());
            }
            let retried = self.pipeline(&again, loads.len() + missing.len()).await?;
            for (&i, reply) in missing.iter().zip(retried.into_iter().skip(loads.len())) {
                replies[i] = reply;
            }
        }
        Ok(replies
            .into_iter()
            .map(|reply| match reply {
                Value::ServerError(e) => Err(Fault::Server(format!("{e:?}"))),
                other => Ok(other),
            })
            .collect())
    }

    async fn pipeline(&self, pipeline: &redis::Pipeline, count: usize) -> Result<Vec<Value>, Fault> {
        let replies = self.connections.run(|conn| conn.pipeline(pipeline)).await?;
        if replies.len() != count {
            return Err(Fault::Server("a pipeline replied with the wrong count".to_owned()));
        }
        Ok(replies)
    }
}

fn no_script(reply: &Value) -> bool {
    matches!(reply, Value::ServerError(e) if e.code() == "NOSCRIPT")
}
