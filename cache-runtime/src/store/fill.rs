//! Stores as one pipeline, and the common one without Lua: a miss's *fill*
//! of an entry it observed empty.
//!
//! `STORE` (`scripts.rs`) checks two things before it writes: the entry is
//! still what the computation observed, and so are its namespace versions.
//! When the computation observed nothing, `SET entry … NX` checks the first
//! as well: anything written since (another store, a write-through, a
//! forget's tombstone) makes it refuse; then `STORE` decides, since a key of
//! another type also refuses `NX` though reads saw it empty. The versions
//! are read by an `MGET` after the `SET`: versions only grow, and a
//! missing one restarts from a random seed, so versions equal after the
//! `SET` were equal at it. When
//! they differ, the entry stays in Redis bound to the old versions, which
//! no reader takes (every hit compares an entry's versions with the current
//! ones), and the store answers `VersionChanged`, so the value is neither
//! kept locally nor handed to waiters (docs/CONSISTENCY.md). When nobody
//! would keep it or be handed it (`StoreRequest::verify`), the versions are
//! not read back: the answer would change nothing. The lock is
//! released last, by the same script as any release: until then, other
//! processes' leaders polling it find the entry.
//!
//! Everything else keeps `STORE`: an entry observed (a tombstone or an older
//! entry, which `NX` cannot compare), a write-through or renewal (which
//! replaces and announces), and Redis Cluster (whose tag versions are pinned,
//! not read).

use super::scripts::{self, StoreArgs, StoreReply};
use super::{Redis, StoreMode, StoreRequest};
use crate::codec;
use crate::error::Fault;
use crate::keys::EntryKeys;
use redis::{FromRedisValue, Value};

/// Stores bound for one pipeline: per item, in order, its `SET NX` (a fill)
/// or its `STORE` script; then, if any fill must verify, one `MGET` of its
/// version keys; then one release of every lock the fills hold.
struct Stores<'k> {
    commands: Vec<redis::Cmd>,
    /// Per item: whether it is a fill, and whether the release frees its
    /// lock.
    fills: Vec<Option<Held>>,
    /// The version keys the `MGET` reads; `None` when it is not sent.
    version_keys: Option<&'k [String]>,
}

/// What an item's commands came to.
enum Fill {
    Done(Result<StoreReply, Fault>),
    /// `SET NX` found the key taken: a write since, or a foreign key.
    Occupied,
}

/// Whether a fill's lock is freed by the pipeline's release.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Held {
    Lock,
    Nothing,
}

impl Redis {
    /// Stores `items` in one pipeline, fills without Lua (see the module
    /// docs); one reply per item. Pinned versions (Redis Cluster) are the
    /// caller's to check: no fill has any.
    pub(super) async fn store_pipelined(
        &self,
        items: &[(&EntryKeys<'_>, StoreRequest<'_>)],
    ) -> Result<Vec<Result<StoreReply, Fault>>, Fault> {
        let Stores { commands, fills, version_keys } = self.stores(items);
        let replies = self.pipelined(commands).await?;
        let mut outcomes = read(items, &fills, version_keys.is_some(), replies);
        // A key holding another type than a string reads as empty (`MGET`
        // answers nil for it) but refuses `NX`, as a write since would.
        // `STORE` tells the two apart (it overwrites the first), at the
        // cost of a round trip that only contended or foreign keys pay.
        let occupied: Vec<usize> = (0..outcomes.len()).filter(|&i| matches!(outcomes[i], Fill::Occupied)).collect();
        if !occupied.is_empty() {
            // The lock went with the fill's pipeline: the script releases none.
            let commands = occupied.iter().map(|&i| self.store_command(items[i].0, &items[i].1, None)).collect();
            let again: Vec<Result<StoreReply, Fault>> = match self.pipelined(commands).await {
                Ok(replies) => replies.into_iter().map(script_reply).collect(),
                Err(fault) => occupied.iter().map(|_| Err(fault.clone())).collect(),
            };
            for (&i, reply) in occupied.iter().zip(again) {
                outcomes[i] = Fill::Done(reply);
            }
        }
        Ok(outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Fill::Done(reply) => reply,
                Fill::Occupied => Err(Fault::Server("a fill's key was left unanswered".to_owned())),
            })
            .collect())
    }

    /// Whether `request` may go without `STORE`: a miss that observed no
    /// entry, whose versions are all plain keys on one server.
    pub(super) fn fills(&self, request: &StoreRequest<'_>) -> bool {
        request.mode == StoreMode::Fill && request.observed_entry.is_empty() && !self.connections.is_cluster()
    }

    fn stores<'k>(&self, items: &[(&'k EntryKeys<'_>, StoreRequest<'_>)]) -> Stores<'k> {
        // One `MGET` serves the fills that must verify and share the first
        // such fill's version keys (every item of a bulk call does); any
        // other that must verify goes by script.
        let version_keys =
            items.iter().find(|(_, request)| self.fills(request) && request.verify).map(|(keys, _)| &keys.versions[..]);
        let mut commands = Vec::with_capacity(items.len() * 2 + 1);
        let mut fills = Vec::with_capacity(items.len());
        for (keys, request) in items {
            let fill = self.fills(request) && (!request.verify || Some(&keys.versions[..]) == version_keys);
            if fill {
                let bytes = codec::entry_bytes(request.head, request.observed, request.times, request.payload);
                let mut set = super::command("SET", 5, keys.entry().len() + bytes.len() + 26);
                set.arg(keys.entry()).arg(bytes).arg("PX").arg(request.ttl_ms).arg("NX");
                commands.push(set);
                fills.push(Some(if request.held.is_some() { Held::Lock } else { Held::Nothing }));
            } else {
                commands.push(self.store_command(keys, request, request.held));
                fills.push(None);
            }
        }
        let version_keys = version_keys.filter(|keys| !keys.is_empty());
        if let Some(keys) = version_keys {
            let mut mget = super::command("MGET", keys.len(), super::bytes_of(keys));
            mget.arg(keys);
            commands.push(mget);
        }
        let held: Vec<(&str, &str)> = items
            .iter()
            .zip(&fills)
            .filter_map(|((_, request), fill)| request.held.filter(|_| *fill == Some(Held::Lock)))
            .collect();
        if !held.is_empty() {
            commands.push(scripts::release_command(&held));
        }
        Stores { commands, fills, version_keys }
    }

    /// `STORE` for one item, as a pipeline's `EVALSHA`, releasing `held`.
    fn store_command(
        &self,
        keys: &EntryKeys<'_>,
        request: &StoreRequest<'_>,
        held: Option<(&str, &str)>,
    ) -> redis::Cmd {
        let in_script = self.versions_in_script(keys);
        let (lock, token) = held.unwrap_or((keys.entry(), ""));
        let (channel, message) = match request.mode {
            // Other processes drop their local copy of what was overwritten.
            StoreMode::Replace => (self.channel.name.as_str(), self.channel.entry_message(request.hash)),
            StoreMode::Fill => ("", String::new()),
        };
        StoreArgs {
            entry: keys.entry(),
            lock,
            version_keys: in_script,
            ttl_ms: request.ttl_ms,
            head: request.head,
            payload: request.payload,
            expect: request.observed_entry,
            token,
            times: request.times,
            now_ms: request.now_ms,
            channel,
            message: &message,
            observed: request.observed,
        }
        .command()
    }
}

/// What each item's commands answered. `replies` has one per command, in
/// the order [`Redis::stores`] built them.
fn read(
    items: &[(&EntryKeys<'_>, StoreRequest<'_>)],
    fills: &[Option<Held>],
    mget_sent: bool,
    replies: Vec<Result<Value, Fault>>,
) -> Vec<Fill> {
    let mut replies = replies.into_iter();
    let firsts: Vec<Result<Value, Fault>> = replies.by_ref().take(items.len()).collect();
    let current = match mget_sent.then(|| replies.next()) {
        None => Ok(Vec::new()),
        Some(Some(Ok(value))) => Vec::<Option<Vec<u8>>>::from_redis_value(value)
            .map_err(|e| Fault::Server(format!("the fill's MGET replied in an unexpected shape: {e}"))),
        Some(Some(Err(fault))) => Err(fault),
        Some(None) => Err(Fault::Server("a pipeline replied with the wrong count".to_owned())),
    };
    // One release for every lock the fills hold, if any.
    let released = match replies.next() {
        Some(Ok(_)) | None => Ok(()),
        Some(Err(fault)) => Err(fault),
    };
    items
        .iter()
        .zip(fills)
        .zip(firsts)
        .map(|(((_, request), fill), first)| {
            let Some(held) = fill else { return Fill::Done(script_reply(first)) };
            let stored = fill_reply(first, &current, request);
            match held {
                // A release that failed leaves the lock to the caller's
                // guard, which releases it when a store did not.
                Held::Lock => match &released {
                    Ok(()) => stored,
                    Err(fault) => Fill::Done(Err(fault.clone())),
                },
                Held::Nothing => stored,
            }
        })
        .collect()
}

fn script_reply(reply: Result<Value, Fault>) -> Result<StoreReply, Fault> {
    i64::from_redis_value(reply?)
        .map(StoreReply::parse)
        .map_err(|_| Fault::Server("the store script replied in an unexpected shape".to_owned()))
}

/// A fill's `SET NX` reply, judged against the versions read after it
/// when the request must verify.
fn fill_reply(
    set: Result<Value, Fault>,
    current: &Result<Vec<Option<Vec<u8>>>, Fault>,
    request: &StoreRequest<'_>,
) -> Fill {
    match set {
        Ok(Value::Okay) => {}
        Ok(Value::Nil) => return Fill::Occupied,
        Ok(other) => return Fill::Done(Err(Fault::Server(format!("a fill's SET NX replied {other:?}")))),
        Err(fault) => return Fill::Done(Err(fault)),
    }
    if !request.verify {
        return Fill::Done(Ok(StoreReply::Stored));
    }
    let observed = request.observed;
    Fill::Done(current.as_ref().map_err(Clone::clone).map(|current| {
        let same = current.len() == observed.len()
            && current.iter().zip(observed).all(|(now, then)| now.as_deref() == Some(&then[..]));
        if same { StoreReply::Stored } else { StoreReply::VersionChanged }
    }))
}
