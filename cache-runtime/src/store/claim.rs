//! A bulk call's read that also takes the stampede locks of the items it
//! misses, in one pipeline, where a read then a pipeline of locks took two
//! round trips. Two ways: the `CLAIM` script, which judges every entry and
//! locks those it misses, then an `MGET` of the entries and versions; or,
//! for the items the caller guesses are missing (`recent.rs`), `SET NX PX`
//! each then the `MGET`, no script. Either way the `MGET` comes after the
//! locks, so what it reads is what a computation under them is based on,
//! as with a single call's lock taken with its read (docs/CONSISTENCY.md).
//! Only on one server (or behind Sentinel): on a cluster the tag versions
//! live in other slots than the entries, and the bulk call reads and locks
//! in two round trips as before.

use super::Redis;
use super::many::ReadMany;
use super::remote::millis;
use super::scripts::{self, Claim, ClaimArgs};
use crate::error::Fault;
use redis::{FromRedisValue, Value};
use std::time::Duration;

/// The locks a claiming read asks for.
pub(crate) struct ClaimRequest<'a> {
    /// One per entry, in the same order.
    pub locks: &'a [String],
    pub token: &'a str,
    pub ttl: Duration,
}

/// What a claiming read found: the entries and versions, as an `MGET`
/// would have, and which locks it took.
pub(crate) struct Claimed {
    pub read: ReadMany,
    pub claims: Vec<Claim>,
    /// Why the server refused locks ([`Claim::Refused`]), to count.
    pub refused: Option<Fault>,
}

impl Redis {
    /// Whether [`claim_many`](Self::claim_many) can run here.
    pub(crate) fn can_claim(&self) -> bool {
        !self.connections.is_cluster()
    }

    /// Takes the lock of each of `entries` that is not current, then
    /// reads them and `versions`; see `scripts::CLAIM`.
    pub(crate) async fn claim_many(
        &self,
        entries: &[&str],
        versions: &[String],
        head: &[u8],
        request: ClaimRequest<'_>,
    ) -> Result<Claimed, Fault> {
        let claim = ClaimArgs {
            version_keys: versions,
            entries,
            locks: request.locks,
            head,
            token: request.token,
            lock_ttl_ms: millis(request.ttl),
        }
        .command();
        let mut mget = super::command(
            "MGET",
            entries.len() + versions.len(),
            super::bytes_of(entries) + super::bytes_of(versions),
        );
        mget.arg(entries).arg(versions);
        let mut pipeline = redis::pipe();
        pipeline.ignore_errors().add_command(claim.clone()).add_command(mget.clone());
        let mut replies = self.connections.run(|conn| conn.pipeline(&pipeline)).await?;
        if matches!(replies.first(), Some(Value::ServerError(e)) if e.code() == "NOSCRIPT") {
            // A server that lost the script (restarted, flushed) answered
            // the MGET too: both again, in order, after loading it.
            let mut again = redis::pipe();
            again.ignore_errors().add_command(scripts::load_claim()).add_command(claim).add_command(mget);
            replies = self.connections.run(|conn| conn.pipeline(&again)).await?;
            replies.drain(..replies.len().min(1));
        }
        let shape = |what: &str| Fault::Server(format!("the claim pipeline replied in an unexpected shape: {what}"));
        let [claims, values] = <[Value; 2]>::try_from(replies).map_err(|_| shape("count"))?;
        let mut values = Vec::<Option<Vec<u8>>>::from_redis_value(values).map_err(|e| shape(&e.to_string()))?;
        let mut refused = None;
        let claims = match claims {
            // The script refused (memory full: it writes) or failed part
            // way; the read stands.
            Value::ServerError(e) => {
                refused = Some(Fault::Server(format!("{e:?}")));
                vec![Claim::Refused; entries.len()]
            }
            claims => {
                let claims = Vec::<i64>::from_redis_value(claims).map_err(|e| shape(&e.to_string()))?;
                claims.into_iter().map(Claim::parse).collect::<Option<Vec<_>>>().ok_or_else(|| shape("claims"))?
            }
        };
        if claims.len() != entries.len() || values.len() != entries.len() + versions.len() {
            return Err(shape("count"));
        }
        let versions = values.split_off(entries.len());
        Ok(Claimed { read: ReadMany { entries: values, versions }, claims, refused })
    }

    /// [`claim_many`](Self::claim_many) without the script, for entries
    /// the caller guesses are missing (`recent.rs`): `SET NX PX` for the
    /// lock of each entry at `asked` (`request.locks` in the same order),
    /// then an `MGET` of every entry and `version_keys`, in one pipeline.
    /// Plain commands cost Redis a fraction of the script's Lua. Unlike
    /// the script:
    /// - an entry not asked for is not locked even when it misses
    ///   ([`Claim::Unasked`]);
    /// - a lock the server refused (memory full, a replica) does not fail
    ///   the read ([`Claim::Refused`]), nor does the script's refusal in
    ///   [`claim_many`](Self::claim_many): what is current is served;
    /// - a lock this request took and whose reply was lost (sent again on a
    ///   new connection) reads as [`Claim::Held`]; the caller releases a
    ///   held lock by its token, which frees only its own;
    /// - versions found missing are seeded after the `MGET` when a lock was
    ///   taken (as `lock_many` does), and every entry judged against them.
    pub(crate) async fn claim_asked(
        &self,
        entries: &[&str],
        version_keys: &[String],
        asked: &[usize],
        request: ClaimRequest<'_>,
    ) -> Result<Claimed, Fault> {
        let ttl = millis(request.ttl);
        let mut commands = Vec::with_capacity(asked.len() + 1);
        commands.extend(request.locks.iter().map(|lock| super::remote::take_lock(lock, request.token, ttl)));
        let mut mget = super::command(
            "MGET",
            entries.len() + version_keys.len(),
            super::bytes_of(entries) + super::bytes_of(version_keys),
        );
        mget.arg(entries).arg(version_keys);
        commands.push(mget);
        let mut replies = self.pipelined(commands).await?;
        let shape = |what: &str| Fault::Server(format!("the claim pipeline replied in an unexpected shape: {what}"));
        let mut values = match replies.pop() {
            Some(values) => Vec::<Option<Vec<u8>>>::from_redis_value(values?).map_err(|e| shape(&e.to_string()))?,
            None => return Err(shape("count")),
        };
        if replies.len() != asked.len() || values.len() != entries.len() + version_keys.len() {
            return Err(shape("count"));
        }
        let mut claims = vec![Claim::Unasked; entries.len()];
        let mut refused = None;
        for (&at, reply) in asked.iter().zip(replies) {
            let claim = match reply {
                Ok(Value::Okay) => Claim::Taken,
                Ok(_) => Claim::Held,
                Err(fault) => {
                    refused = Some(fault);
                    Claim::Refused
                }
            };
            *claims.get_mut(at).ok_or_else(|| shape("asked"))? = claim;
        }
        let mut versions = values.split_off(entries.len());
        if versions.iter().any(Option::is_none) && claims.contains(&Claim::Taken) {
            let seeded = self.seed_under_lock(version_keys).await?;
            versions = seeded.into_iter().map(Some).collect();
        }
        Ok(Claimed { read: ReadMany { entries: values, versions }, claims, refused })
    }
}
